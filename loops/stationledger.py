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
"""

from __future__ import annotations

import time
from collections.abc import Callable

from loops.journal import Journal, JournalLink
from safety.envelope import Ledger

__all__ = ["restore_consumption", "save_consumption", "unsaved_consumption"]


async def restore_consumption(
    ledger: Ledger, journal: JournalLink, station: str, now: float, speed: float = 1.0
) -> int:
    """Load ``station``'s consumption of the last budget window from the journal into
    ``ledger`` (times moved onto the ledger's clock, whose time is ``now``), and keep
    new consumption for :func:`save_consumption`. Returns the entries restored."""
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


async def save_consumption(
    ledger: Ledger, journal: JournalLink, station: str, now: Callable[[], float], speed: float = 1.0
) -> int:
    """Write what ``ledger`` consumed since the last call to the journal; returns the rows."""
    rows = unsaved_consumption(ledger, now, speed)
    if not rows:
        return 0
    return await journal.call(Journal.record_consumption, station, rows)
