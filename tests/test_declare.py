"""Drivers declare their commands (instruments/declare.py); the safety layer builds on them.

A driver defined here, outside the bundled ones, is guarded exactly like a
bundled driver: its declared actuations are checked against the envelope
(deny by default), its undeclared methods cannot be reached, its safe state
comes from its declaration. It talks to an in-memory device (this file's
"soft" device: the point is the guard, not a wire protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from instruments.declare import (
    ACTUATE,
    READ,
    SAFER,
    Call,
    DeclarationError,
    Flow,
    Param,
    Set,
    declare,
)
from instruments.driver import Channel, Driver
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.syringe_pump import SyringePump
from instruments.transports.base import Transport
from safety.effects import Layout, bounds, initial_commanded, safe_state_updates
from safety.envelopeload import load_envelope
from safety.guard import Guard
from safety.model import AuditTrail, Command, Latch, SafetyRefusal, StationState


class _Link(Transport):
    """A transport that is only a URL: the soft devices below keep their state in memory."""

    schemes = ("soft",)

    async def _open(self) -> None:
        return None

    async def _close(self) -> None:
        return None


class Furnace(Driver):
    """A tube furnace of someone else's lab: a heater with a ramp rate and a purge valve."""

    kind = "tube-furnace"
    safe_state_calls = (Call("set_power", on=False), Call("close_valve"))

    def __init__(self, transport: Transport, *, name: str | None = None) -> None:
        super().__init__(transport, name=name)
        self.sent: list[tuple[str, dict[str, Any]]] = []

    @property
    def channels(self) -> Mapping[str, Channel]:
        return {"temp_c": Channel("temp_c", "degC", settable=False)}

    @declare(
        ACTUATE,
        on=Param(bool),
        setpoint_c=Param(float, "degC", min=0, max=1200, optional=True, step=1.0),
        sets=[Set("power", arg="on"), Set("setpoint_c", arg="setpoint_c")],
        safer_when={"on": False, "setpoint_c": None},
    )
    async def set_power(self, on: bool, setpoint_c: float | None = None) -> None:
        self.sent.append(("set_power", {"on": on, "setpoint_c": setpoint_c}))

    @declare(
        ACTUATE, sccm=Param(float, "sccm", above=0, max=500), sets=[Set("purge_sccm", arg="sccm")]
    )
    async def open_valve(self, sccm: float) -> None:
        self.sent.append(("open_valve", {"sccm": sccm}))

    @declare(SAFER, sets=[Set("purge_sccm", value=0.0)])
    async def close_valve(self) -> None:
        self.sent.append(("close_valve", {}))

    async def service_mode(self) -> None:  # not declared: unreachable through the guard
        self.sent.append(("service_mode", {}))

    async def read(self) -> dict[str, Any]:
        return {"temp_c": 21.0}

    async def safe_state(self) -> None:
        await self.set_power(False)
        await self.close_valve()


def _guard(envelope_text: str) -> tuple[Guard, Furnace]:
    furnace = Furnace(_Link("soft://furnace"), name="furnace")
    guard = Guard(
        "lab-b",
        {"furnace": furnace},
        load_envelope(envelope_text),
        latch=Latch("lab-b"),
        audit=AuditTrail(),
        state=StationState(),
        clock=lambda: 0.0,
    )
    return guard, furnace


def test_declarations_are_collected_and_described() -> None:
    assert set(Furnace.commands) == {
        "read",
        "describe",
        "set_power",
        "open_valve",
        "close_valve",
    }
    spec = Furnace.commands["set_power"]
    assert list(spec.params) == ["on", "setpoint_c"]
    assert spec.signature() == (
        "set_power(on: true/false, setpoint_c: a number >= 0 <= 1200 degC (optional))"
    )
    described = Furnace(_Link("soft://f")).describe()["commands"]
    assert described["open_valve"]["params"]["sccm"]["unit"] == "sccm"
    assert described["open_valve"]["sets"] == ["purge_sccm"]
    assert Hotplate.commands["set_heater"].kind == ACTUATE
    assert SyringePump.commands["dispense"].flow == Flow(
        "out", "volume_ml", "rate_ml_min", progress="progress"
    )


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "@declare(ACTUATE, on=Param(bool))\nasync def go(self, enabled: bool) -> None: ...",
            "declares parameter(s) on that the method does not have (it has: enabled)",
        ),
        (
            "@declare(ACTUATE, on=Param(bool))\n"
            "async def go(self, on: bool, speed: int) -> None: ...",
            "parameter(s) speed not declared",
        ),
        (
            "@declare(ACTUATE, on=Param(bool, optional=True))\n"
            "async def go(self, on: bool) -> None: ...",
            "parameter 'on' is optional in the declaration but has no default in the method",
        ),
        (
            "@declare(ACTUATE, on=Param(bool), sets=[Set('x', arg='speed')])\n"
            "async def go(self, on: bool) -> None: ...",
            "Set('x') names 'speed', which is not a parameter",
        ),
        (
            "@declare(READ, sets=[Set('x', value=1)])\nasync def go(self) -> None: ...",
            "a READ command cannot set channels",
        ),
        (
            "@declare(ACTUATE, v=Param(float), flow=Flow('out', 'v', progress='nope'))\n"
            "async def go(self, v: float) -> None: ...",
            "Flow.progress 'nope' is not a declared READ command",
        ),
    ],
)
def test_a_declaration_that_does_not_match_the_code_fails_when_the_class_is_made(
    body: str, problem: str
) -> None:
    names = {"ACTUATE": ACTUATE, "READ": READ, "Param": Param, "Set": Set, "Flow": Flow}
    assert problem in broken_driver_error(body, names)


def broken_driver_error(body: str, names: dict[str, Any]) -> str:
    """The :class:`DeclarationError` making a driver class with ``body`` (a method and its
    declaration) raises; ``names``: what the body uses besides ``declare`` and ``Driver``."""
    indented = "\n".join("    " + line for line in body.splitlines())
    source = (
        "class Broken(Driver):\n"
        "    kind = 'broken'\n"
        "    channels = {}\n"
        "    async def read(self): return {}\n"
        "    async def safe_state(self): return None\n" + indented + "\n"
    )
    with pytest.raises(DeclarationError) as info:
        exec(source, {**names, "declare": declare, "Driver": Driver})
    return str(info.value)
    assert str(info.value).startswith("Broken.go: ")


def test_safe_state_calls_must_be_declared_commands_that_make_it_safer() -> None:
    with pytest.raises(DeclarationError, match="'warp' is not a declared command"):

        class NoSuch(Furnace):
            safe_state_calls = (Call("warp"),)

    with pytest.raises(DeclarationError, match="missing argument"):

        class Unbound(Furnace):
            safe_state_calls = (Call("set_power"),)

    with pytest.raises(DeclarationError, match="must make the instrument safer, not read"):

        class Reads(Furnace):
            safe_state_calls = (Call("read"),)


def test_a_momentary_set_is_a_boolean_event() -> None:
    assert Set("taring", value=True, momentary=True).momentary
    for bad in ({"arg": "on"}, {"value": 3}):
        with pytest.raises(DeclarationError, match="momentary=True\\) needs value=True or False"):
            Set("taring", momentary=True, **bad)  # type: ignore[arg-type]


def test_params_check_types_ranges_steps_and_wire_format() -> None:
    p = Param(float, "degC", min=0, max=80, step=0.1)
    assert p.check(25.04) == 25.0 and p.check(7) == 7.0
    for bad in (True, "25", float("nan"), float("inf"), -0.1, 80.01):
        with pytest.raises(ValueError, match="must be a number >= 0 <= 80 degC"):
            p.check(bad)
    rpm = Param(int, "rpm", min=0, max=1500)
    assert rpm.check(300.0) == 300 and isinstance(rpm.check(300.0), int)
    with pytest.raises(ValueError):
        rpm.check(300.5)
    volume = SyringePump.commands["dispense"].params["volume_ml"]
    assert volume.check(0.12345) == pytest.approx(0.1235)  # 4 significant digits on the wire
    with pytest.raises(ValueError, match="must be a number > 0 mL"):
        volume.check(0.0)
    with pytest.raises(ValueError, match="cannot be carried"):
        volume.check(123456.0)


async def test_a_third_party_driver_is_guarded_from_its_declarations() -> None:
    guard, furnace = _guard(
        "channels:\n"
        "  furnace.setpoint_c: {max: 900, max_rise_per_min: 600}\n"
        "  furnace.power: {unbounded: on/off; the setpoint limit bounds the heat}\n"
        "rules:\n"
        "  - {name: purge-while-hot, when: furnace.power -> furnace.purge_sccm >= 50}\n"
    )
    h = guard.handle("furnace", who="agent:a")
    assert h.commands == ["close_valve", "describe", "open_valve", "read", "set_power"]
    with pytest.raises(AttributeError, match="not an allowed command"):
        h.service_mode  # noqa: B018 - undeclared: not on the handle
    with pytest.raises(SafetyRefusal) as info:
        await guard.execute(Command("furnace", "service_mode", {}, "agent:a"))
    assert info.value.verdict.rule == "allowed-commands"
    # deny by default: the purge flow is not bounded by this envelope
    with pytest.raises(SafetyRefusal) as info:
        await h.open_valve(100.0)
    assert info.value.verdict.rule == "unbounded"
    assert "add channels.furnace.purge_sccm" in info.value.verdict.reason
    # no purge: the rule refuses heating; out of the device's range: the declaration refuses
    with pytest.raises(SafetyRefusal) as info:
        await h.set_power(True, 500.0)
    assert info.value.verdict.rule == "purge-while-hot"
    with pytest.raises(SafetyRefusal) as info:
        await h.set_power(False, 1500.0)
    assert info.value.verdict.rule == "params"
    assert furnace.sent == []  # nothing refused reached the device
    await h.close_valve()  # safer: always allowed
    assert furnace.sent == [("close_valve", {})]


async def test_the_third_party_driver_acts_within_the_envelope_and_has_a_safe_state() -> None:
    guard, furnace = _guard(
        "channels:\n"
        "  furnace.setpoint_c: {max: 900, max_rise_per_min: 600}\n"
        "  furnace.power: {unbounded: on/off}\n"
        "  furnace.purge_sccm: {min: 0, max: 200}\n"
        "rules:\n"
        "  - {name: purge-while-hot, when: furnace.power -> furnace.purge_sccm >= 50}\n"
    )
    h = guard.handle("furnace", who="agent:a")
    with pytest.raises(SafetyRefusal, match="furnace.purge_sccm.max"):
        await h.open_valve(300.0)
    await h.open_valve(100.0)
    await h.set_power(True, 500.4)
    assert furnace.sent[-1] == ("set_power", {"on": True, "setpoint_c": 500.0})  # as checked
    with pytest.raises(SafetyRefusal, match="purge-while-hot"):
        await h.open_valve(10.0)  # too little purge while the furnace heats
    view = guard.state.view()
    assert (view["furnace.power"], view["furnace.setpoint_c"], view["furnace.purge_sccm"]) == (
        True,
        500.0,
        100.0,
    )
    layout = guard.layout
    assert safe_state_updates(layout) == {"furnace.power": False, "furnace.purge_sccm": 0.0}
    assert initial_commanded(layout) == {"furnace.power": False, "furnace.purge_sccm": 0.0}
    guard.mark_safe_state()
    assert guard.state.view()["furnace.power"] is False
    listed = {b.channel: (b.bounded, b.how) for b in bounds(layout, guard.envelope)}
    assert listed == {
        "furnace.power": (True, "unbounded: on/off"),
        "furnace.purge_sccm": (True, ">= 0, <= 200"),
        "furnace.setpoint_c": (True, "<= 900, rises <= 600/min"),
    }


def test_a_layout_without_declarations_can_do_nothing() -> None:
    layout = Layout.of({"thing": object()})
    assert layout.actions("thing") == {}
    assert safe_state_updates(layout) == {}


def test_handles_are_typed_by_capability() -> None:
    """``require`` / ``SafeStation.handle_as``: a handle typed by what the instrument is, or a
    TypeError naming what its driver does not declare."""
    from safety.capabilities import HeaterStirrer, Pump, require
    from safety.guard import GuardedInstrument

    async def never(command: Command) -> None:  # pragma: no cover - nothing is called here
        raise AssertionError(command)

    pump = GuardedInstrument("acid", "syringe-pump", SyringePump.commands, never, "agent:a")
    typed: Pump = require(pump, Pump)  # mypy checks calls against the Protocol from here on
    assert typed is pump
    with pytest.raises(TypeError) as info:
        require(pump, HeaterStirrer)
    assert str(info.value).startswith(
        "acid (syringe-pump) is not a HeaterStirrer: it declares no set_heater, set_stirrer"
    )
    guard, _ = _guard("channels:\n  furnace.power: {unbounded: on/off}\n")
    with pytest.raises(TypeError, match="furnace \\(tube-furnace\\) is not a Pump"):
        require(guard.handle("furnace"), Pump)
