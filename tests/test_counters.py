"""Counters: a command adds to a channel (instruments/declare.py ``Add``), end to end.

A soft lamp (this file's: the point is the safety layer, not a wire) counts its exposures:
the guard tracks the count (before + amount), the envelope bounds it (``max``; deny by
default), rules name it, a budget counts what was added per window and a clear
(``Set(..., value=0)``) gives no budget back; the dry run follows the same count over a
timeline. The journal reservation of a counted step before it acts, and a budget over a
counter across a restart: tests/test_extending.py (the tinylab dosing pump's doses).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from test_declare import _Link, broken_driver_error

from instruments.declare import (
    ACTUATE,
    READ,
    SAFER,
    Add,
    Call,
    DeclarationError,
    Param,
    Set,
    declare,
)
from instruments.driver import Channel, Driver
from instruments.transports.base import Transport
from loops.plancost import cost_channels
from safety.dryrun import dry_run
from safety.effects import Layout, bounds, initial_commanded, safe_state_updates
from safety.envelope import EnvelopeError
from safety.envelopeload import load_envelope
from safety.guard import Guard
from safety.model import AuditTrail, Command, Latch, SafetyRefusal, StationState


class Lamp(Driver):
    """A flash lamp whose tube is rated for so many exposures."""

    kind = "flash-lamp"
    safe_state_calls = (Call("arm", on=False),)

    def __init__(self, transport: Transport, *, name: str | None = None) -> None:
        super().__init__(transport, name=name)
        self.sent: list[str] = []

    @property
    def channels(self) -> Mapping[str, Channel]:
        return {}

    @declare(ACTUATE, on=Param(bool), sets=[Set("armed", arg="on")], safer_when={"on": False})
    async def arm(self, on: bool) -> None:
        self.sent.append(f"arm {on}")

    @declare(ACTUATE, sets=[Add("exposures", value=1)])
    async def expose(self) -> None:
        self.sent.append("expose")

    @declare(ACTUATE, count=Param(int, min=1, max=100), sets=[Add("exposures", arg="count")])
    async def burst(self, count: int) -> None:
        self.sent.append(f"burst {count}")

    @declare(ACTUATE, sets=[Set("exposures", value=0)])
    async def new_tube(self) -> None:
        """The operator fitted a new tube: the count starts again."""
        self.sent.append("new tube")

    async def read(self) -> dict[str, Any]:
        return {}

    async def safe_state(self) -> None:
        await self.arm(False)


ENVELOPE = """\
channels:
  lamp.armed: {unbounded: "on/off"}
  lamp.exposures: {max: 6}
rules:
  - name: armed-to-expose
    when: lamp.exposures > 0 -> lamp.armed
budgets:
  exposures_per_minute: {counts: lamp.exposures, per: minute, max: 5}
"""


def _guard(text: str = ENVELOPE) -> tuple[Guard, Lamp, list[float]]:
    lamp = Lamp(_Link("soft://lamp"), name="lamp")
    clock = [0.0]
    guard = Guard(
        "lab-c",
        {"lamp": lamp},
        load_envelope(text),
        latch=Latch("lab-c"),
        audit=AuditTrail(),
        state=StationState(),
        clock=lambda: clock[0],
    )
    return guard, lamp, clock


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "@declare(ACTUATE, n=Param(int, min=0), sets=[Add('x', arg='count')])\n"
            "async def go(self, n: int) -> None: ...",
            "Add('x') names 'count', which is not a parameter",
        ),
        (
            "@declare(ACTUATE, n=Param(int), sets=[Add('x', arg='n')])\n"
            "async def go(self, n: int) -> None: ...",
            "Add('x') adds parameter 'n', which must be a number that cannot be negative",
        ),
        (
            "@declare(ACTUATE, on=Param(bool), sets=[Add('x', arg='on')])\n"
            "async def go(self, on: bool) -> None: ...",
            "Add('x') adds parameter 'on', which must be a number",
        ),
        (
            "@declare(SAFER, sets=[Add('x', value=1)])\nasync def go(self) -> None: ...",
            "Add('x') needs an ACTUATE command",
        ),
        (
            "@declare(READ, sets=[Add('x', value=1)])\nasync def go(self) -> None: ...",
            "Add('x') needs an ACTUATE command",
        ),
        (
            "@declare(ACTUATE, sets=[Add('x', value=1), Set('x', value=0)])\n"
            "async def go(self) -> None: ...",
            "Add('x') and Set('x') in one command",
        ),
    ],
)
def test_a_counter_declaration_that_does_not_fit_fails_when_the_class_is_made(
    body: str, problem: str
) -> None:
    names = {"ACTUATE": ACTUATE, "SAFER": SAFER, "READ": READ, "Param": Param, "Set": Set}
    message = broken_driver_error(body, {**names, "Add": Add})
    assert problem in message
    assert message.startswith("Broken.go: ")


def test_an_add_counts_up_and_a_safe_state_never_counts() -> None:
    with pytest.raises(DeclarationError, match=r"value must be a number > 0 .*Set\('x', value=0\)"):
        Add("x", value=0)
    with pytest.raises(DeclarationError, match="needs arg= or value="):
        Add("x")
    with pytest.raises(DeclarationError, match="the guard's own channels"):
        Add("delivered", value=1)
    with pytest.raises(DeclarationError, match=r"expose\(\) adds to exposures; the safe state"):

        class Counting(Lamp):
            safe_state_calls = (Call("expose"),)

    layout = Layout.of({"lamp": Lamp(_Link("soft://l"))})
    assert layout.counter_channels() == ["lamp.exposures"]
    assert initial_commanded(layout)["lamp.exposures"] == 0
    assert safe_state_updates(layout) == {"lamp.armed": False}
    assert Lamp.commands["burst"].as_dict()["adds"] == ["exposures"]
    assert Lamp.commands["burst"].channel_of("count") is None  # not a setpoint: no ramps
    assert cost_channels(layout) == ["duration", "lamp.exposures"]


async def test_the_guard_tracks_a_counter_bounds_it_and_rules_name_it() -> None:
    guard, lamp, clock = _guard()
    lamp_h = guard.handle("lamp", who="t")
    with pytest.raises(SafetyRefusal) as refused:
        await lamp_h.expose()  # 1 exposure unarmed: the rule names the counter
    assert refused.value.verdict.rule == "armed-to-expose"
    await lamp_h.arm(True)
    await lamp_h.expose()
    await lamp_h.burst(3)
    assert guard.state.commanded["lamp.exposures"] == 4
    clock[0] = 61.0  # a new minute: the budget is not what refuses next
    with pytest.raises(SafetyRefusal) as refused:
        await lamp_h.burst(3)  # 4 + 3 > max 6
    assert refused.value.verdict.rule == "lamp.exposures.max"
    assert "lamp.exposures=7 is above the maximum 6" in refused.value.verdict.reason
    await lamp_h.burst(2)
    assert guard.state.commanded["lamp.exposures"] == 6
    assert lamp.sent == ["arm True", "expose", "burst 3", "burst 2"]  # refusals sent nothing
    await lamp_h.new_tube()  # a clear is a set
    assert guard.state.commanded["lamp.exposures"] == 0
    await lamp_h.expose()
    assert guard.state.commanded["lamp.exposures"] == 1
    # deny by default: an envelope that does not bound the counter refuses what adds to it
    guard, lamp, _ = _guard("channels:\n  lamp.armed: {unbounded: on/off}\n")
    await guard.handle("lamp").arm(True)
    with pytest.raises(SafetyRefusal) as refused:
        await guard.handle("lamp").expose()
    assert refused.value.verdict.rule == "unbounded"
    assert "the envelope does not bound lamp.exposures" in refused.value.verdict.reason
    assert lamp.sent == ["arm True"]
    assert [b.channel for b in bounds(guard.layout, guard.envelope) if not b.bounded] == [
        "lamp.exposures"
    ]


async def test_a_budget_over_a_counter_refuses_past_its_window_and_a_clear_gives_nothing_back() -> (
    None
):
    guard, lamp, clock = _guard()
    lamp_h = guard.handle("lamp", who="t")
    await lamp_h.arm(True)
    await lamp_h.burst(4)
    await lamp_h.new_tube()  # the count is 0 again, what was used this minute is not
    clock[0] = 30.0
    with pytest.raises(SafetyRefusal) as refused:
        await lamp_h.burst(2)  # 4 + 2 > 5 in the last minute
    assert refused.value.verdict.rule == "budget.exposures_per_minute"
    assert "4.0 used in the last minute + 2.0 asked > 5" in refused.value.verdict.reason
    await lamp_h.expose()  # 4 + 1 fits
    clock[0] = 60.5  # the burst of 4 at t=0 left the window
    await lamp_h.burst(4)
    assert lamp.sent == ["arm True", "burst 4", "new tube", "expose", "burst 4"]
    used = guard.envelope.ledger.used("lamp.exposures", 60.0, clock[0])
    assert used == 5.0  # 1 at t=30 + 4 at t=60.5


def test_a_budget_must_count_a_counter_the_station_declares() -> None:
    with pytest.raises(EnvelopeError) as info:
        _guard(ENVELOPE.replace("counts: lamp.exposures", "counts: lamp.flashes"))
    assert "budgets.exposures_per_minute.counts: cannot count 'lamp.flashes'" in str(info.value)
    assert "its counters: lamp.exposures" in str(info.value)
    assert str(info.value).startswith("<envelope>:8: ")
    with pytest.raises(EnvelopeError, match=r"budgets.b.counts: cannot count 'beaker.addded'"):
        load_envelope(
            "vessels:\n  beaker: {max: 5, fed_by: [a]}\n"
            "budgets:\n  b: {counts: beaker.addded, per: day, max: 1}\n"
        )


def test_the_dry_run_follows_a_counter_over_a_timeline() -> None:
    envelope = load_envelope(ENVELOPE)
    layout = Layout.of({"lamp": Lamp(_Link("soft://l"))})

    def c(action: str, **params: Any) -> Command:
        return Command("lamp", action, params, "agent:t")

    recipe = [
        c("arm", on=True),
        c("burst", count=2),
        c("expose"),
        c("burst", count=2),  # t=30: 2 + 1 + 2 = 5 in the minute: fits
        c("expose"),  # t=40: a sixth in the minute: the budget refuses it
        c("burst", count=2),  # t=70: 1 + 2 + 2 in (10, 70]; 5 + 2 = 7 > max 6
        c("expose"),  # t=75: 6 exposures in all, 4 in (15, 75]
    ]
    times = [0.0, 10.0, 20.0, 30.0, 40.0, 70.0, 75.0]
    report = dry_run(recipe, envelope, {}, layout=layout, now=0.0, times=times)
    assert [(v.step, v.rule) for v in report.violations] == [
        (4, "budget.exposures_per_minute"),
        (5, "lamp.exposures.max"),
    ]
    assert report.final_state["lamp.exposures"] == 6
    assert envelope.ledger.used("lamp.exposures", 60.0, 75.0) == 0.0  # the dry run's own books
