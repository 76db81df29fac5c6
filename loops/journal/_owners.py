"""Who owns a campaign (its epoch, the fencing token) and what each station's safety budgets
consumed: the durable parts of leases and ledgers, below :class:`~loops.journal.Journal`.

Every ``prepare`` of a campaign (a run, a resume, a restarted service) takes the next
epoch of the journal, above every campaign's (:meth:`JournalOwners.take_ownership`:
a station serves one campaign after another); the station actor passes the epoch of the
lease it runs under with each progress write (``running``, ``step_started``,
``step_done``), and the journal refuses a write whose epoch is not the campaign's
current one (:class:`~loops.journal.StaleOwner`): an orphan of a dead owner cannot
record progress once a new owner took over.

Consumption (``record_consumption``/``consumption``): one row per budget unit the
envelope's ledger consumed on a station, with the station's clock (``t_clock``, the
simulated clock on a simulated bench) and the wall clock (``t_wall``, epoch seconds:
the one clock that survives a restart); see :meth:`StationActor.start
<loops.stationactor.StationActor.start>` for how a new actor restores them. A step that
starts reserves what the guard would commit for it (``reserved`` rows), settled by the
station's next record of what it actually consumed: a step cut by a kill counts in full.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Sequence

from loops.journal._conn import JournalConnection
from loops.journal._model import StaleOwner


class JournalOwners(JournalConnection):
    """The campaign's owner epoch and the stations' budget consumption (module docstring)."""

    def take_ownership(self, campaign_id: str, owner: str) -> int:
        """Make ``owner`` (a description: process, host) the campaign's owner; returns its
        epoch, one more than any epoch of any campaign in this journal (a station serves
        one campaign after another, and each new owner must outrank every one before).
        Writes carrying an older epoch of this campaign are refused."""
        with self._tx() as conn:
            self._require_campaign(conn, campaign_id)
            conn.execute(
                "UPDATE campaigns SET owner_epoch = "
                "(SELECT COALESCE(MAX(owner_epoch), 0) + 1 FROM campaigns), "
                "owner = ?, owner_since = ? WHERE id = ?",
                (str(owner), time.time(), campaign_id),
            )
            row = conn.execute(
                "SELECT owner_epoch FROM campaigns WHERE id = ?", (campaign_id,)
            ).fetchone()
            return int(row[0])

    def owner(self, campaign_id: str) -> dict[str, object]:
        """The campaign's current owner: ``epoch``, ``owner``, ``since`` (epoch seconds)."""
        conn = self._db()
        self._require_campaign(conn, campaign_id)
        row = conn.execute(
            "SELECT owner_epoch, owner, owner_since FROM campaigns WHERE id = ?", (campaign_id,)
        ).fetchone()
        return {"epoch": int(row[0]), "owner": row[1], "since": row[2]}

    def _require_epoch(self, conn: sqlite3.Connection, campaign_id: str, epoch: int | None) -> None:
        """Inside a write: refuse it unless ``epoch`` is the campaign's current owner epoch
        (None: a write that carries no epoch, e.g. a tool's; not fenced)."""
        if epoch is None:
            return
        row = conn.execute(
            "SELECT owner_epoch, owner FROM campaigns WHERE id = ?", (campaign_id,)
        ).fetchone()
        if row is not None and int(row[0]) != int(epoch):
            raise StaleOwner(
                f"campaign {campaign_id}: write from owner epoch {epoch} refused; epoch "
                f"{row[0]} ({row[1]}) owns the campaign now"
            )

    # ------------------------------------------------------------ consumption
    def record_consumption(
        self,
        station: str,
        entries: Sequence[Sequence[object]],
        *,
        reserve: Sequence[Sequence[object]] = (),
    ) -> int:
        """Store what a station's safety budgets consumed: ``entries`` of ``(resource,
        amount, t_clock, t_wall)``; returns how many rows were written. The station's
        open reservation (:meth:`step_started` ``reserve=``) is settled: what it consumed
        is known now (an empty ``entries`` settles it too). ``reserve``: what the step
        about to act may consume (same entries; a set-up or recovery step, which is not an
        experiment's step event), counted until the next write settles it."""
        rows = _consumption_rows(station, entries)
        with self._tx() as conn:
            self._store_consumption(
                conn, str(station), rows, reserve=_consumption_rows(station, reserve)
            )
        return len(rows)

    def keep_reservations(self, station: str) -> int:
        """A new station actor takes the bench: the open reservation of the step its
        predecessor started and never finished (the owner died) becomes consumption for
        good, so the new actor's writes (which settle only their own reservations) never
        drop it. Returns the rows kept."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE consumption SET reserved = 0 WHERE station = ? AND reserved = 1",
                (str(station),),
            )
        return int(cur.rowcount or 0)

    def _store_consumption(
        self,
        conn: sqlite3.Connection,
        station: str,
        rows: Sequence[tuple[str, str, float, float, float]],
        *,
        reserve: Sequence[tuple[str, str, float, float, float]] = (),
    ) -> None:
        """Inside a write: settle ``station``'s reservation, store its actual consumption
        ``rows``, then reserve ``reserve`` for the step about to act (one station runs one
        step at a time: an actual write is what every earlier reservation came to)."""
        conn.execute("DELETE FROM consumption WHERE station = ? AND reserved = 1", (station,))
        sql = (
            "INSERT INTO consumption (station, resource, amount, t_clock, t_wall, reserved) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        conn.executemany(sql, [(*r, 0) for r in rows])
        conn.executemany(sql, [(*r, 1) for r in reserve])

    def consumption(
        self, station: str, since_wall: float = 0.0, *, reserved: bool | None = None
    ) -> list[tuple[str, float, float, float]]:
        """What ``station``'s budgets consumed after ``since_wall`` (epoch seconds), oldest
        first: ``(resource, amount, t_clock, t_wall)``. ``reserved``: None (default) counts
        a step that started and never finished as what was reserved for it (conservative:
        its owner died between the command and the step's record); True: only those
        reservations; False: only what was recorded as consumed."""
        where = "" if reserved is None else f" AND reserved = {int(bool(reserved))}"
        rows = (
            self._db()
            .execute(
                "SELECT resource, amount, t_clock, t_wall FROM consumption "
                f"WHERE station = ? AND t_wall > ?{where} ORDER BY t_wall, id",
                (str(station), float(since_wall)),
            )
            .fetchall()
        )
        return [(str(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in rows]


def _consumption_rows(
    station: str, entries: Sequence[Sequence[object]]
) -> list[tuple[str, str, float, float, float]]:
    """``(resource, amount, t_clock, t_wall)`` entries as rows, validated."""
    rows: list[tuple[str, str, float, float, float]] = []
    for entry in entries:
        if len(entry) != 4:
            raise ValueError(
                f"consumption entry {entry!r}: expected (resource, amount, t_clock, t_wall)"
            )
        resource, amount, t_clock, t_wall = entry
        numbers = (float(amount), float(t_clock), float(t_wall))  # type: ignore[arg-type]
        if not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"consumption entry {entry!r}: amount and times must be finite")
        rows.append((str(station), str(resource), *numbers))
    return rows
