"""The guard on a simulated station: real drivers over the real wire, observed from the devices.

Every test opens a :class:`SimulatedLab` and the real drivers through
``instruments.connect``; what reached a device is read from ``world.wire``
(the simulators record every command they receive).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import instruments
from instruments.errors import InstrumentError
from safety.envelope import Envelope
from safety.envelopeload import load_envelope, reference_envelope
from safety.guard import Guard, GuardedInstrument
from safety.model import (
    AuditTrail,
    Command,
    Latch,
    SafetyRefusal,
    StationState,
    StationTripped,
)
from simulators.bench import SimulatedBench, SimulatedLab
from simulators.world import StationWorld

ACTUATED_DEVICES = ("pumps", "hotplate", "enclosure")
HEATER_RULE = "heater-needs-stirring-and-closed-lid"


@dataclass
class Station:
    lab: SimulatedLab
    bench: SimulatedBench
    guard: Guard
    latch: Latch
    audit: AuditTrail
    state: StationState

    @property
    def world(self) -> StationWorld:
        return self.bench.world

    def h(self, name: str, who: str = "test") -> GuardedInstrument:
        return self.guard.handle(name, who=who)

    def wire_count(self) -> int:
        return sum(len(self.world.wire.entries(d)) for d in ACTUATED_DEVICES)


@contextlib.asynccontextmanager
async def guarded_station(
    *,
    speed: float = 50.0,
    envelope: Envelope | None = None,
    names: tuple[str, ...] = ("red", "green", "blue", "waste", "hotplate", "enclosure"),
    driver_options: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[Station]:
    async with SimulatedLab(stations=1, speed=speed) as lab:
        bench = lab.stations[0]
        async with contextlib.AsyncExitStack() as stack:
            drivers: dict[str, Any] = {}
            for spec in bench.instruments():
                if spec.name in names:
                    options = {**spec.options, **(driver_options or {}).get(spec.name, {})}
                    drivers[spec.name] = await stack.enter_async_context(
                        instruments.connect(spec.kind, spec.url, **options)
                    )
            latch, audit, state = Latch(bench.name), AuditTrail(), StationState()
            guard = Guard(
                bench.name,
                drivers,
                envelope if envelope is not None else reference_envelope(),
                latch=latch,
                audit=audit,
                state=state,
                clock=lab.clock.now,
            )
            yield Station(lab, bench, guard, latch, audit, state)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def hotplate_writes(world: StationWorld) -> list[tuple[int, int]]:
    """(register, value) of every holding-register write that reached the hotplate."""
    out: list[tuple[int, int]] = []
    for rec in world.wire.entries("hotplate"):
        data = rec.data
        if data.get("fc") in (6, 16, 23):
            out += [(data["address"] + i, v) for i, v in enumerate(data["values"])]
    return out


# ------------------------------------------------------------------ basics
@pytest.mark.timeout(60)
async def test_refused_commands_never_reach_the_wire() -> None:
    async with guarded_station() as s:
        await s.guard.refresh()
        before = s.wire_count()
        hp, red = s.h("hotplate", "optimizer"), s.h("red")
        with pytest.raises(SafetyRefusal) as info:
            await hp.set_heater(True, 25.0)  # the stirrer is not turning
        verdict = info.value.verdict
        assert not verdict.allowed and verdict.rule == HEATER_RULE
        assert verdict.command.who == "optimizer"
        assert (
            "rule heater-needs-stirring-and-closed-lid: hotplate.heater=True, "
            "hotplate.stirrer_rpm=0, enclosure.lid='closed'" in str(info.value)
        )
        refused = [
            (hp.set_stirrer(True, 1500), "hotplate.stirrer_setpoint_rpm.max"),
            (hp.set_stirrer(False, 1300), "hotplate.stirrer_setpoint_rpm.max"),
            (hp.set_stirrer(False, 5000), "params"),  # beyond what the device takes (1500)
            (hp.set_state(heater=False, setpoint_c=95.0, stirrer=False, rpm=0), None),
            (red.dispense(3.0, 5.0), "vial.volume.max"),
            (red.dispense(0.5, 25.0), "red.rate_ml_min.max"),
            (red.dispense(-0.5, 5.0), "params"),
            (red.dispense(0.5, "fast"), "params"),
            (hp.set_heater("yes"), "params"),
            (s.h("enclosure").set_light(True, 1.5), "params"),  # the device takes 0-1
        ]
        for coro, rule in refused:
            with pytest.raises(SafetyRefusal) as info:
                await coro
            if rule is not None:
                assert info.value.verdict.rule == rule, info.value
        for command, why in [
            (Command("red", "run", {}), "not an allowed command"),
            (Command("red", "command", {"command": "RUN"}), "not an allowed command"),
            (Command("red", "set_rate", {"ml_min": 1.0}), "not an allowed command"),
            (Command("hotplate", "set_watchdog", {"seconds": 0}), "not an allowed command"),
            (Command("hotplate", "_write", {}), "not an allowed command"),
            (
                Command("waste", "dispense", {"volume_ml": 1, "rate_ml_min": 1}),
                "waste drains vessel vial",
            ),
            (
                Command("red", "withdraw", {"volume_ml": 1, "rate_ml_min": 1}),
                "red feeds vessel vial",
            ),
            (Command("furnace", "set_heater", {"on": True}), "no instrument 'furnace'"),
        ]:
            with pytest.raises(SafetyRefusal, match=r"\S") as info:
                await s.guard.execute(command)
            assert why in info.value.verdict.reason
        await asyncio.sleep(0.1)
        assert s.wire_count() == before, "a refused command reached a device"
        assert s.world.hotplate.heater_enabled is False


@pytest.mark.timeout(60)
async def test_allowed_commands_reach_the_wire_and_update_the_state() -> None:
    async with guarded_station() as s:
        assert await s.guard.refresh() == {}
        hp = s.h("hotplate", "optimizer")
        await hp.set_stirrer(True, 300)
        await hp.set_heater(True)  # at the measured setpoint (25 degC), checked and sent
        assert hotplate_writes(s.world) == [(1, 300), (3, 1), (0, 250), (2, 1)]
        assert s.world.hotplate.heater_enabled and s.world.hotplate.stirrer_enabled
        view = s.state.view()
        assert view["hotplate.heater"] is True and view["hotplate.stirrer_rpm"] == 300
        # the setpoint may rise 10 degC per (simulated) minute from where it was
        with pytest.raises(SafetyRefusal) as info:
            await hp.set_heater(True, 60.0)
        assert info.value.verdict.rule == "hotplate.setpoint_c.max_rise_per_min"
        t0 = s.lab.clock.now()
        await until(lambda: s.lab.clock.now() - t0 > 7.0)
        await hp.set_heater(True, 26.0)
        assert hotplate_writes(s.world)[-2:] == [(0, 260), (2, 1)]
        await hp.set_heater(False)  # always allowed
        red = s.h("red", "agent:7")
        await red.dispense(0.4, 8.0)
        assert s.world.wire.data("pumps")[-5:] == [
            "0RAT8.000MM",
            "0VOL0.400ML",
            "0DIRINF",
            "0CLDINF",
            "0RUN",
        ]
        assert s.state.view()["vial.volume"] == pytest.approx(0.4)
        assert (await red.wait_until_stopped(timeout=5, poll_interval=0.01)).value == "stopped"
        assert s.world.vial.species_ml["red"] == pytest.approx(0.4, abs=1e-6)


@pytest.mark.timeout(60)
async def test_the_audit_trail_has_every_verdict() -> None:
    async with guarded_station() as s:
        await s.guard.refresh()
        hp = s.h("hotplate", "optimizer")
        await hp.set_stirrer(True, 200)
        with pytest.raises(SafetyRefusal):
            await hp.set_stirrer(True, 1300, who="agent:x")
        await hp.read()
        with pytest.raises(SafetyRefusal):
            await s.guard.execute(Command("red", "run", {}, "agent:y"))
        records = s.audit.records(station=s.bench.name)
        assert [(r.allowed, r.command.action, r.command.who) for r in records] == [
            (True, "set_stirrer", "optimizer"),
            (False, "set_stirrer", "agent:x"),
            (True, "read", "optimizer"),
            (False, "run", "agent:y"),
        ]
        refusals = s.audit.records(allowed=False)
        assert refusals[0].rule == "hotplate.stirrer_setpoint_rpm.max"
        assert all(r.reason and r.rule for r in refusals)
        assert refusals[1].rule == "allowed-commands"
        assert records[0].values == {
            "hotplate.stirrer": True,
            "hotplate.stirrer_setpoint_rpm": 200,
            "hotplate.stirrer_rpm": 200,
        }
        assert records[0].as_dict()["command"]["params"] == {"on": True, "rpm": 200}
        # check() tells without executing or recording
        verdict = s.guard.check(Command("hotplate", "set_heater", {"on": True}, "x"))
        assert verdict.allowed and len(s.audit.records()) == 4


@pytest.mark.timeout(60)
async def test_a_latched_station_refuses_actuation_but_allows_safe_state_commands() -> None:
    async with guarded_station() as s:
        await s.guard.refresh()
        hp, red, enc = s.h("hotplate"), s.h("red"), s.h("enclosure")
        await enc.set_light(True, 0.5)
        await hp.set_stirrer(True, 300)
        await hp.set_heater(True)
        assert s.latch.trip("liquid 84.0 degC > 80 degC", "liquid-temperature")
        before = s.wire_count()
        for coro in (hp.set_stirrer(True, 400), red.dispense(0.1, 1.0), enc.set_light(True, 0.2)):
            with pytest.raises(StationTripped) as info:
                await coro
            assert info.value.verdict.rule == "latch"
            assert "liquid 84.0 degC > 80 degC" in info.value.verdict.reason
        assert s.wire_count() == before
        # the stirrer may not stop under a running heater, latched or not (checked, not waved through)
        with pytest.raises(SafetyRefusal) as refusal:
            await hp.set_stirrer(False)
        assert refusal.value.verdict.rule == HEATER_RULE
        await hp.set_heater(False)
        await hp.set_stirrer(False)
        await red.stop()
        await enc.set_light(False)
        assert (await hp.read())["heater_enabled"] is False  # reads work while latched
        assert hotplate_writes(s.world)[-2:] == [(2, 0), (3, 0)]
        assert s.world.wire.data("pumps")[-1] == "0STP"
        assert s.world.enclosure.light_on is False
        assert [r.rule for r in s.audit.records(allowed=False)] == ["latch"] * 3 + [HEATER_RULE]
        s.latch.reset("operator:ana", "cooled down, checked the vial", cleared=True)
        await hp.set_stirrer(True, 300)
        assert s.world.hotplate.stirrer_enabled


@pytest.mark.timeout(60)
async def test_an_opened_lid_makes_the_guard_refuse_heater_on_after_refresh() -> None:
    async with guarded_station() as s:
        await s.guard.refresh()
        hp = s.h("hotplate")
        await hp.set_stirrer(True, 300)
        await hp.set_heater(True)
        await hp.set_heater(False)
        s.bench.enclosure.set_lid("open")
        for _ in range(200):
            await s.guard.refresh(["enclosure"])
            if s.state.view().get("enclosure.lid") == "open":
                break
            await asyncio.sleep(0.01)
        assert s.state.view()["enclosure.lid"] == "open"
        writes = len(hotplate_writes(s.world))
        with pytest.raises(SafetyRefusal) as info:
            await hp.set_heater(True)
        assert info.value.verdict.rule == HEATER_RULE
        assert "enclosure.lid='open'" in str(info.value)
        assert len(hotplate_writes(s.world)) == writes
        s.bench.enclosure.set_lid("closed")
        for _ in range(200):
            await s.guard.refresh(["enclosure"])
            if s.state.view().get("enclosure.lid") == "closed":
                break
            await asyncio.sleep(0.01)
        await hp.set_heater(True)
        assert s.world.hotplate.heater_enabled


@pytest.mark.timeout(60)
async def test_vial_capacity_and_drains_are_credited_only_as_observed() -> None:
    async with guarded_station() as s:
        red, green, blue, waste = (s.h(n) for n in ("red", "green", "blue", "waste"))
        await red.dispense(1.5, 10.0)
        with pytest.raises(SafetyRefusal, match="flow-interlock"):
            await red.dispense(0.1, 10.0)  # still running its first dispense
        await green.dispense(1.2, 10.0)
        with pytest.raises(SafetyRefusal) as info:
            await blue.dispense(0.2, 10.0)
        assert info.value.verdict.rule == "vial.volume.max"
        assert "vial.volume=2.9 is above the maximum 2.8" in str(info.value)
        with pytest.raises(SafetyRefusal, match="flow-interlock.*may still be delivering"):
            await waste.withdraw(3.0, 20.0)
        await red.wait_until_stopped(timeout=10, poll_interval=0.01)
        await green.wait_until_stopped(timeout=10, poll_interval=0.01)
        # an interrupted drain credits only what the waste pump withdrew
        await waste.withdraw(3.0, 20.0)
        await asyncio.sleep(0.02)
        await waste.stop()
        await s.guard.refresh(["waste"])
        view = s.state.view()
        in_vial = view["vial.volume"]
        assert 0.0 < in_vial < 2.7
        assert in_vial == pytest.approx(s.world.vial.volume_ml, abs=0.05)
        # the full drain, observed, frees the vial
        await waste.withdraw(3.0, 20.0)
        with pytest.raises(SafetyRefusal, match="flow-interlock.*draining"):
            await blue.dispense(0.2, 10.0)
        await waste.wait_until_stopped(timeout=10, poll_interval=0.01)
        # reading the draining pump settles the books: the vial is empty before any command
        assert s.state.view()["vial.volume"] == pytest.approx(0.0, abs=1e-9)
        await blue.dispense(0.2, 10.0)
        view = s.state.view()
        assert view["vial.volume"] == pytest.approx(0.2)
        assert s.world.vial.spilled_ml == 0.0


@pytest.mark.timeout(60)
async def test_handles_expose_only_allowed_commands() -> None:
    async with guarded_station(
        names=("red", "waste", "hotplate", "green", "blue", "enclosure")
    ) as s:
        red = s.h("red", "optimizer")
        assert red.commands == [  # what the driver declares (instruments/declare.py)
            "describe",
            "dispense",
            "dispensed",
            "progress",
            "read",
            "status",
            "stop",
            "wait_until_stopped",
            "withdraw",
        ]
        with pytest.raises(SafetyRefusal) as info:  # the envelope's vessel says which way
            await s.h("waste").dispense(0.1, 1.0)
        assert info.value.verdict.rule == "vessels"
        for attr in ("driver", "transport", "run", "command", "set_rate", "_drivers", "safe_state"):
            with pytest.raises(AttributeError):
                getattr(red, attr)
        with pytest.raises(AttributeError, match="read-only"):
            red.name = "x"  # type: ignore[misc]
        assert "set_watchdog" not in s.h("hotplate").commands
        with pytest.raises(TypeError, match="missing argument"):
            await red.dispense(0.1)
        with pytest.raises(KeyError):
            s.guard.handle("furnace")
        assert (await red.describe())["kind"] == "syringe-pump"
        await red.as_who("agent:9").stop()
        assert s.audit.records()[-1].command.who == "agent:9"


@pytest.mark.timeout(60)
async def test_experiment_budget_and_guard_dry_run() -> None:
    text = (reference_bench_text()).replace("experiments_per_hour: 30", "experiments_per_hour: 2")
    env = load_envelope(text, source="bench.yaml")
    async with guarded_station(envelope=env) as s:
        before = s.wire_count()
        await s.guard.begin_experiment(who="optimizer")
        await s.guard.begin_experiment(who="optimizer")
        with pytest.raises(SafetyRefusal) as info:
            await s.guard.begin_experiment(who="optimizer")
        assert info.value.verdict.rule == "budget.experiments_per_hour"
        report = s.guard.dry_run(
            [
                Command("red", "dispense", {"volume_ml": 1.0, "rate_ml_min": 5.0}),
                Command("blue", "dispense", {"volume_ml": 2.0, "rate_ml_min": 5.0}),
                Command("hotplate", "set_heater", {"on": True, "setpoint_c": 25.0}),
            ]
        )
        assert report.refused_steps == [1, 2]
        assert s.state.view()["vial.volume"] == 0.0  # a dry run changes nothing
        assert s.wire_count() == before


@pytest.mark.timeout(60)
async def test_a_driver_failure_after_the_check_is_assumed_to_have_taken_effect() -> None:
    async with guarded_station(driver_options={"hotplate": {"timeout": 0.1}}) as s:
        await s.guard.refresh()
        hp = s.h("hotplate")
        await hp.set_stirrer(True, 300)
        await hp.set_heater(True)
        s.world.faults.inject("no-reply", device="hotplate")
        with pytest.raises(InstrumentError):
            await hp.set_stirrer(True, 400)
        assert s.state.view()["hotplate.stirrer_rpm"] == 400  # it may have arrived: assume it did
        with pytest.raises(InstrumentError):
            await hp.set_heater(False)  # a safer command failing: assume it did NOT happen
        assert s.state.view()["hotplate.heater"] is True
        with pytest.raises(SafetyRefusal):
            await hp.set_stirrer(False)  # so the heater rule still protects the liquid
        with pytest.raises(SafetyRefusal, match="rpm must be an integer"):
            await hp.set_stirrer(True, 300.5)  # the guard checks types before the driver does
        s.world.faults.clear()
        # the supervisor's safe state bypasses the guard and tells it afterwards
        s.guard.mark_safe_state(["hotplate"])
        view = s.state.view()
        assert (view["hotplate.heater"], view["hotplate.stirrer_rpm"]) == (False, 0)


@pytest.mark.timeout(60)
async def test_a_driver_refusing_before_sending_leaves_the_state_alone() -> None:
    bare = load_envelope(  # no limits: only the driver's
        "channels:\n  hotplate.heater: {unbounded: test}\n"
        "  hotplate.setpoint_c: {unbounded: test}\n"
    )
    async with guarded_station(envelope=bare, names=("hotplate",)) as s:
        s.world.hotplate.max_c = 100.0  # this device's maximum, below the model's 340 degC
        await s.guard.refresh()  # the driver learns it from input register 4
        before = len(hotplate_writes(s.world))
        with pytest.raises(ValueError, match="above the device maximum"):
            await s.h("hotplate").set_heater(False, 150.0)
        assert len(hotplate_writes(s.world)) == before
        assert s.state.commanded.get("hotplate.setpoint_c") is None
        assert s.audit.records()[-1].allowed  # the guard let it through; the driver refused


@pytest.mark.timeout(60)
async def test_a_trip_during_an_actuation_puts_that_instrument_back_to_safe_state() -> None:
    async with guarded_station() as s:
        enc = s.h("enclosure")
        task = asyncio.create_task(enc.set_light(True, 0.8))
        for _ in range(100_000):
            if s.guard.in_flight is not None:
                break
            await asyncio.sleep(0)
        assert s.guard.in_flight is not None
        s.latch.trip("e-stop pressed", "estop")
        await task
        await s.guard.wait_idle()
        lights = [d["light"]["on"] for d in s.world.wire.data("enclosure") if "light" in d]
        assert lights[-2:] == [True, False]
        assert s.world.enclosure.light_on is False
        assert s.state.view()["enclosure.light"] is False


def reference_bench_text() -> str:
    from safety.envelopeload import REFERENCE_BENCH

    return REFERENCE_BENCH.read_text()


# ------------------------------------------------------------------ property
DYES = ("red", "green", "blue")
MAX_SETPOINT_C = 80.0
CAPACITY_ML = 2.8


def near(values: list[Any], wide: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values at the edges of the envelope most of the time, anything else sometimes."""
    return st.one_of(st.sampled_from(values), wide)


setpoints = near([None, 20.0, 25.0, 26.0, 28.0, 79.9, 80.0, 80.1, 95.0], st.floats(-10, 400))
rpms = near([None, 0, 99, 100, 300, 1200, 1201], st.integers(-50, 1600))
step = st.one_of(
    st.tuples(st.just("heater"), st.booleans(), setpoints),
    st.tuples(st.just("stirrer"), st.booleans(), rpms),
    st.tuples(
        st.just("state"),
        st.booleans(),
        near([25.0, 26.0, 80.0, 81.0], st.floats(0, 120)),
        st.booleans(),
        near([0, 100, 300, 1300], st.integers(0, 1500)),
    ),
    st.tuples(
        st.just("dispense"),
        st.sampled_from(DYES),
        near([0.4, 1.0, 1.4, 2.8, 2.9], st.floats(-0.5, 3.5)),
        st.sampled_from([0.0, 5.0, 20.0, 30.0, 31.0]),
    ),
    st.tuples(st.just("withdraw"), st.floats(0.1, 4.0), st.sampled_from([10.0, 20.0, 50.0])),
    st.tuples(st.just("stop"), st.sampled_from((*DYES, "waste"))),
    st.tuples(st.just("wait"), st.sampled_from((*DYES, "waste"))),
    st.tuples(st.just("light"), st.booleans(), near([None, 0.5, 1.0, 1.1], st.floats(-1, 2))),
    st.tuples(st.just("lid"), st.sampled_from(["open", "closed"])),
    st.tuples(st.just("sleep"), st.floats(0.5, 20.0)),  # simulated seconds
    st.tuples(st.just("trip")),
    st.tuples(st.just("reset")),
)


async def _apply_step(s: Station, step: tuple[Any, ...]) -> None:
    kind = step[0]
    hp = s.h("hotplate", "hypothesis")
    if kind == "heater":
        await hp.set_heater(step[1], step[2])
    elif kind == "stirrer":
        await hp.set_stirrer(step[1], step[2])
    elif kind == "state":
        await hp.set_state(heater=step[1], setpoint_c=step[2], stirrer=step[3], rpm=step[4])
    elif kind == "dispense":
        await s.h(step[1]).dispense(step[2], step[3])
    elif kind == "withdraw":
        await s.h("waste").withdraw(step[1], step[2])
    elif kind == "stop":
        await s.h(step[1]).stop()
    elif kind == "wait":
        await s.h(step[1]).wait_until_stopped(timeout=10, poll_interval=0.01)
    elif kind == "light":
        await s.h("enclosure").set_light(step[1], step[2])
    elif kind == "lid":
        s.bench.enclosure.set_lid(step[1])
        for _ in range(400):  # the guard learns the lid state only from a reading
            await s.guard.refresh(["enclosure"])
            if s.state.view().get("enclosure.lid") == step[1]:
                break
            await asyncio.sleep(0.005)
    elif kind == "sleep":
        await asyncio.sleep(step[1] / s.lab.clock.speed)
    elif kind == "trip":
        s.latch.trip("hypothesis trip", "test")
    elif kind == "reset":
        s.latch.reset("test", "hypothesis reset", cleared=True)


def _during(t: float, log: list[tuple[float, Any]], initial: Any) -> Any:
    value = initial
    for when, state in log:
        if when <= t:
            value = state
    return value


def _check_wire(
    s: Station, lid_log: list[tuple[float, Any]], latch_log: list[tuple[float, Any]]
) -> None:
    """What reached the devices, replayed: setpoint, heater interlock, latch, vial content."""
    stirrer_rpm, stirrer_on, heater_on = 0, False, False
    for rec in s.world.wire.entries("hotplate"):
        data = rec.data
        if data.get("fc") not in (6, 16, 23):
            continue
        latched = _during(rec.real_t, latch_log, False)
        for offset, value in enumerate(data["values"]):
            reg = data["address"] + offset
            if reg == 0:
                assert value / 10.0 <= MAX_SETPOINT_C, f"setpoint {value / 10} degC arrived"
            elif reg == 1:
                stirrer_rpm = value
            elif reg == 2:
                heater_on = bool(value)
            elif reg == 3:
                stirrer_on = bool(value)
            assert not (latched and (reg in (0, 1) or value == 1)), (
                f"actuation while latched: {data}"
            )
        if heater_on:
            assert stirrer_on and stirrer_rpm >= 100, f"heater on without stirring: {data}"
            if data["address"] <= 2 < data["address"] + len(data["values"]):
                assert _during(rec.real_t, lid_log, "closed") == "closed", "heater on, lid open"
    for rec in s.world.wire.entries("pumps"):
        if _during(rec.real_t, latch_log, False):
            assert rec.data[1:4] in ("STP", "DIS", "RAT", "VOL", "DIR"), f"{rec.data} while latched"
            assert rec.data[1:4] not in ("RAT", "VOL", "DIR") or len(rec.data) == 4  # queries only
    for rec in s.world.wire.entries("enclosure"):
        light = rec.data.get("light", {})
        if _during(rec.real_t, latch_log, False):
            assert light.get("on") is False and "intensity" not in light, (
                f"{rec.data} while latched"
            )
    # dye content from the pump line: a RUN on a dye pump adds its VOL
    added = 0.0
    vol: dict[int, float] = {}
    for line in s.world.wire.data("pumps"):
        addr, cmd, arg = int(line[0]), line[1:4], line[4:]
        if cmd == "VOL" and arg:
            vol[addr] = float(arg[:-2]) * (1e-3 if arg.endswith("UL") else 1.0)
        elif cmd == "RUN" and addr in (0, 1, 2):
            added += vol[addr]
    if not any(line.startswith("3RUN") for line in s.world.wire.data("pumps")):
        assert added <= CAPACITY_ML + 1e-6, f"{added} mL of dye went into the vial"
    assert s.world.vial.spilled_ml == 0.0


async def _reset(s: Station) -> None:
    """Back to a safe, empty station between examples (outside the guard, like a supervisor)."""
    s.latch.reset("test", "next example", cleared=True)
    for name in ("red", "green", "blue", "waste"):
        await s.h(name).stop()
        await s.h(name).wait_until_stopped(timeout=10, poll_interval=0.01)
    await s.h("hotplate").set_heater(False)
    await s.h("hotplate").set_stirrer(False, 0)  # the wire replay starts from rpm 0, off
    s.bench.enclosure.set_lid("closed")
    with s.world.lock:
        for species in s.world.vial.species_ml:
            s.world.vial.species_ml[species] = 0.0
        s.world.vial.spilled_ml = 0.0
    s.guard.mark_safe_state()
    s.state.set_commanded({"vial.volume": 0.0})
    await s.guard.refresh(["hotplate", "waste"])
    for _ in range(400):
        await s.guard.refresh(["enclosure"])
        if s.state.view().get("enclosure.lid") == "closed":
            break
        await asyncio.sleep(0.005)
    s.world.wire.clear()


@pytest.fixture
async def sim_station() -> AsyncIterator[Station]:
    # Pumps may run fast and the setpoint may rise 5 degC per simulated second, so that the
    # limits (not only the rate) are reached within an example; the rest is the reference bench.
    text = (
        reference_bench_text()
        .replace("max: 10, unit: mL/min", "max: 30, unit: mL/min")
        .replace("max_rise_per_min: 10", "max_rise_per_min: 300")
    )
    async with guarded_station(speed=100.0, envelope=load_envelope(text)) as s:
        yield s


STATS: dict[str, int] = {"allowed": 0, "refused": 0}


@pytest.mark.timeout(300)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=1, max_size=16))
async def test_property_nothing_outside_the_envelope_reaches_the_devices(
    sim_station: Station, steps: list[tuple[Any, ...]]
) -> None:
    """Random commands (out-of-range values included), lid changes, trips and resets through the
    guard; replayed from the devices' side, nothing outside the envelope ever arrived."""
    s = sim_station
    await _reset(s)
    lid_log: list[tuple[float, Any]] = []
    latch_log: list[tuple[float, Any]] = []
    most = 0.0

    async def sample_vial() -> None:
        nonlocal most
        while True:
            s.world.advance()
            most = max(most, s.world.vial.volume_ml)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample_vial())
    audit_start = len(s.audit.records())
    try:
        for item in steps:
            if item[0] == "lid":
                lid_log.append((time.monotonic(), item[1]))
            try:
                await _apply_step(s, item)
            except SafetyRefusal:
                pass
            except (InstrumentError, TimeoutError, ValueError):
                pass  # a driver or device refusing (ValueError before sending, ?NA while running)
            if item[0] in ("trip", "reset"):
                latch_log.append((time.monotonic(), item[0] == "trip"))
        for name in ("red", "green", "blue", "waste"):
            await s.h(name).wait_until_stopped(timeout=10, poll_interval=0.01)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    _check_wire(s, lid_log, latch_log)
    assert most <= CAPACITY_ML + 1e-6, f"the vial held {most} mL"
    for verdict in s.audit.records()[audit_start:]:
        assert verdict.reason, verdict
        if not verdict.allowed:
            assert verdict.rule, verdict
        STATS["allowed" if verdict.allowed else "refused"] += 1


fault_step = st.one_of(
    st.tuples(
        st.just("fault"), st.sampled_from(["pumps", "hotplate"]), st.sampled_from([0.3, 1.0])
    ),
    st.tuples(st.just("drop"), st.sampled_from(["pumps", "hotplate"])),
    st.tuples(st.just("clear")),
)


@pytest.mark.timeout(300)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.tuples(st.just("fault"), st.sampled_from(["pumps", "hotplate"]), st.just(0.5)),
    rest=st.lists(st.one_of(step, fault_step), min_size=1, max_size=16),
)
async def test_property_faults_never_let_anything_outside_the_envelope_through(
    sim_station: Station, first: tuple[Any, ...], rest: list[tuple[Any, ...]]
) -> None:
    """As above, with wire faults injected at random (garbled replies, dropped links): commands
    then fail with typed errors, and still nothing outside the envelope reaches a device."""
    s = sim_station
    steps = [first, *rest]
    s.world.faults.clear()
    await _reset(s)
    lid_log: list[tuple[float, Any]] = []
    latch_log: list[tuple[float, Any]] = []
    failures = 0
    try:
        for item in steps:
            if item[0] == "fault":
                s.world.faults.inject("garbled-bytes", device=item[1], probability=item[2])
                continue
            if item[0] == "drop":
                s.world.faults.inject("dropped-connection", device=item[1])
                continue
            if item[0] == "clear":
                s.world.faults.clear()
                continue
            if item[0] == "lid":
                lid_log.append((time.monotonic(), item[1]))
            try:
                await _apply_step(s, item)
            except SafetyRefusal:
                pass
            except (InstrumentError, TimeoutError, ValueError):
                failures += 1  # a garbled reply or a dropped link: a typed error, never silence
            if item[0] in ("trip", "reset"):
                latch_log.append((time.monotonic(), item[0] == "trip"))
        event(f"commands failed under faults: {failures > 0}")
        s.world.faults.clear()
        for name in ("red", "green", "blue", "waste"):
            await s.h(name).wait_until_stopped(timeout=10, poll_interval=0.01)
    finally:
        s.world.faults.clear()
    _check_wire(s, lid_log, latch_log)
    for verdict in s.audit.records():
        assert verdict.reason, verdict
        if not verdict.allowed:
            assert verdict.rule, verdict
