"""A station's safety budgets carried across restarts: the envelope's ledger <-> the journal.

The guard counts budget consumption (experiments, mL added...) in the envelope's
:class:`~safety.envelope.Ledger`, on the station's clock (the simulated clock on a
simulated bench). :func:`save_consumption` writes what was consumed since the last
call to the journal (:meth:`Journal.record_consumption
<loops.journal.Journal.record_consumption>`) with the station's clock time and the
wall-clock time (epoch seconds) it corresponds to; :func:`restore_consumption` loads
a new station actor's ledger with the consumption of the last day.

Clocks: a station's clock restarts with its process (``time.monotonic``, or a
simulated clock rebuilt from lab.yaml), so what survives is the wall-clock time. A
restored entry's time on the new clock is ``now - (wall_now - t_wall) * speed``
(``speed``: the clock's seconds per real second, 1 on a real bench): a simulated
bench's world keeps running at its speed while the campaign process is down.

A step cut by a kill: :func:`step_reservation` is what the guard would commit for a
step about to act (a dispense's volume), journaled with its ``step_started`` and
counted until the step's actual consumption is recorded (:mod:`loops.journal`).

Windows: :func:`budget_status` says, per budget, what was used in its window, whether
one more unit (an experiment; any amount of a volume, or the amount a proposal asks)
still fits, and when the window allows it (``frees_at``: the station's clock and
``frees_at_wall``, epoch seconds); :func:`window_text` words it for an operator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from loops.journal import Journal, JournalLink
from loops.steps import Step
from safety import Command, SafeStation
from safety.effects import CommandRefused, effect_of
from safety.envelope import Envelope
from safety.limits import EPS, Ledger

__all__ = [
    "at_text",
    "budget_status",
    "restore_consumption",
    "save_consumption",
    "step_reservation",
    "unsaved_consumption",
    "window_text",
]

#: how precisely :func:`budget_status` finds when a window allows more (station seconds)
RESOLUTION_S = 0.5


async def restore_consumption(
    ledger: Ledger, journal: JournalLink, station: str, now: float, speed: float = 1.0
) -> int:
    """Load ``station``'s consumption of the last budget window from the journal into
    ``ledger`` (times moved onto the ledger's clock, whose time is ``now``), and keep
    new consumption for :func:`save_consumption`. A step its predecessor reserved and
    never finished counts for good (:meth:`Journal.keep_reservations`): the first write
    of this actor would otherwise settle (drop) it. Returns the entries restored."""
    await journal.call(Journal.keep_reservations, station)  # a dead predecessor's step
    wall = time.time()
    rows = await journal.call(Journal.consumption, station, wall - Ledger.MAX_WINDOW_S / speed)
    ledger.restore(
        (resource, amount, now - (wall - t_wall) * speed) for resource, amount, _, t_wall in rows
    )
    ledger.track_unsaved()
    return len(rows)


def unsaved_consumption(
    ledger: Ledger, now: Callable[[], float], speed: float = 1.0
) -> list[tuple[str, float, float, float]]:
    """What ``ledger`` consumed since the last call, as journal entries ``(resource, amount,
    t_clock, t_wall)`` (for a journal write that stores them with a step: one transaction)."""
    entries = ledger.take_unsaved()
    if not entries:
        return []
    t, wall = now(), time.time()
    return [(r, a, when, wall - (t - when) / speed) for r, a, when in entries]


def step_reservation(
    station: SafeStation, step: Step, who: str, now: Callable[[], float]
) -> list[tuple[str, float, float, float]]:
    """What ``step`` may consume when it acts on ``station`` (the effect the guard commits
    for its command from the station's state now: a dispense's volume), as journal entries
    ``(resource, amount, t_clock, t_wall)``; empty for a step that consumes nothing."""
    if step.kind != "call":
        return []
    p = step.params
    command = Command(p["instrument"], p["command"], dict(p.get("args") or {}), who)
    try:
        effect = effect_of(command, station.guard.layout, station.state.view())
    except CommandRefused:
        return []  # the guard refuses it: nothing acts
    t, wall = now(), time.time()
    return [(r, float(a), t, wall) for r, a in effect.consumes.items() if a > 0]


async def save_consumption(
    ledger: Ledger, journal: JournalLink, station: str, now: Callable[[], float], speed: float = 1.0
) -> int:
    """Write what ``ledger`` consumed since the last call to the journal; returns the rows."""
    rows = unsaved_consumption(ledger, now, speed)
    if not rows:
        return 0
    return await journal.call(Journal.record_consumption, station, rows)


def _fits(used: float, asked: float, limit: float) -> bool:
    """``asked`` more fits under ``limit`` (0 asked: anything at all is left)."""
    return used + asked <= limit + EPS if asked > 0 else used < limit - EPS


def budget_status(
    envelope: Envelope,
    now: float,
    *,
    asks: Mapping[str, float] | None = None,
    speed: float = 1.0,
    wall: float | None = None,
) -> list[dict[str, Any]]:
    """Every budget of ``envelope`` against its ledger at ``now`` (the station's clock):
    ``name``, ``resource``, ``per``, ``limit``, ``unit``, ``used``, ``asked`` (``asks`` by
    resource; default one experiment, and for other resources any amount at all), ``ok``
    (it fits now) and, when it does not, ``frees_at`` (the station's clock) and
    ``frees_at_wall`` (epoch seconds) when the window allows it (None: never, more than
    the budget asked)."""
    wall = time.time() if wall is None else wall
    out: list[dict[str, Any]] = []
    for budget in envelope.budgets:
        default = 1.0 if budget.resource == "experiments" else 0.0
        asked = float((asks or {}).get(budget.resource, default))
        used = envelope.ledger.used(budget.resource, budget.window_s, now)
        ok = _fits(used, asked, budget.limit)
        frees: float | None = None
        if not ok and _fits(0.0, asked, budget.limit):  # consumption leaves the window in time
            lo, hi = now, now + budget.window_s  # used() only falls as entries leave
            while hi - lo > RESOLUTION_S:
                mid = (lo + hi) / 2
                used_then = envelope.ledger.used(budget.resource, budget.window_s, mid)
                lo, hi = (lo, mid) if _fits(used_then, asked, budget.limit) else (mid, hi)
            frees = hi
        out.append(
            {
                "name": budget.name,
                "resource": budget.resource,
                "per": budget.window,
                "limit": budget.limit,
                "unit": budget.unit,
                "used": used,
                "asked": asked,
                "ok": ok,
                "frees_at": frees,
                "frees_at_wall": None if frees is None else wall + (frees - now) / speed,
            }
        )
    return out


def window_text(status: Mapping[str, Any], wall: float | None = None) -> str:
    """One budget of :func:`budget_status` that does not fit, for an operator: what was used
    and when its window allows more (local time and how long from ``wall``, default now)."""
    unit = f" {status['unit']}" if status.get("unit") else ""
    text = (
        f"budget {status['name']}: {_num(status['used'])}{unit} of "
        f"{_num(status['limit'])}{unit} used in the last {status['per']}"
    )
    asked = float(status.get("asked") or 0.0)
    what = (
        "another experiment"
        if status.get("resource") == "experiments" and asked == 1.0
        else f"{_num(asked)}{unit} more"
        if asked > 0
        else "more"
    )
    when = status.get("frees_at_wall")
    if when is None:
        return f"{text}; {what} never fits in it"
    return f"{text}; its window allows {what} {at_text(float(when), wall)}"


def at_text(when: float, wall: float | None = None) -> str:
    """``at <local time> (in <how long from wall, default now>)`` for a time in epoch seconds."""
    wait = max(0.0, float(when) - (time.time() if wall is None else wall))
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(math.ceil(float(when))))
    return f"at {clock} (in {_duration(wait)})"


def _num(value: Any) -> str:
    return f"{round(float(value), 6):g}"


def _duration(seconds: float) -> str:
    s = math.ceil(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
