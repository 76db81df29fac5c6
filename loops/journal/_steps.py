"""What a station writes while it runs an experiment, below :class:`~loops.journal.Journal`.

Each physical step is journaled before it acts (:meth:`JournalSteps.step_started`) and
after (:meth:`JournalSteps.step_done`), with the budget consumption since the station's
last write in the same transaction, and with a reservation for the step about to act
(what the guard would commit for it: counted if the step is cut by a kill, replaced by
the actual consumption when the step is recorded done). When every step has run, the
station journals the run's outcome (:meth:`JournalSteps.record_outcome`: measurements,
verification, the safety verdicts, the images) before it returns it: a campaign process
killed before it records the result loses nothing, resume records it
(:class:`~loops.journal.CompletedRun`). Every write carries the station's lease epoch
(:class:`~loops.journal.StaleOwner` for an older one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from loops.journal._model import IllegalTransition, JournalError, StepOrderError, _loads
from loops.journal._owners import JournalOwners, _consumption_rows


class JournalSteps(JournalOwners):
    """Step events, reservations and a finished run's outcome (module docstring)."""

    def step_started(
        self,
        experiment_id: str,
        index: int,
        step: Any = None,
        *,
        epoch: int | None = None,
        consumption: Sequence[Sequence[object]] = (),
        reserve: Sequence[Sequence[object]] = (),
    ) -> int:
        """Step ``index`` (0-based) of a running experiment is about to act; returns the log id.

        Refused (:class:`StepOrderError`) if that index (or a later one) already
        started, or the previous step has not been recorded done: a physical
        step is never started twice. ``epoch``: the station's lease epoch (an older owner's
        write raises :class:`StaleOwner`); ``consumption``: the station's budget consumption
        since its last write (:meth:`record_consumption`), stored in the same transaction;
        ``reserve``: what this step may consume (same entries), counted until the station
        records what it did consume.
        """
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"step index must be an int >= 0, got {index!r}")
        with self._tx() as conn:
            campaign_id, current, station, last = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            self._store_consumption(
                conn,
                station or "",
                _consumption_rows(station or "", consumption),
                reserve=_consumption_rows(station or "", reserve),
            )
            if current != "running":
                raise IllegalTransition(
                    experiment_id, current, "running", f"step {index} can only start while running"
                )
            self._require_no_step_open(conn, experiment_id)
            if last is not None and index <= last:
                raise StepOrderError(
                    f"experiment {experiment_id}: step {index} cannot start, step {last} already "
                    "started (a physical step is never run twice)"
                )
            return self._apply(
                conn,
                experiment_id,
                campaign_id,
                "running",
                event="step_started",
                step=index,
                fields={"step": step},
                touch_step=True,
            )

    def step_done(
        self,
        experiment_id: str,
        index: int,
        data: Any = None,
        *,
        epoch: int | None = None,
        consumption: Sequence[Sequence[object]] = (),
    ) -> int:
        """Step ``index`` finished (``data``: its readings/outcome); returns the log id.
        ``epoch`` and ``consumption`` as for :meth:`step_started` (the step's reservation
        is settled by it)."""
        with self._tx() as conn:
            campaign_id, current, station, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            self._store_consumption(
                conn, station or "", _consumption_rows(station or "", consumption)
            )
            if current != "running":
                raise IllegalTransition(
                    experiment_id, current, "running", f"step {index} can only finish while running"
                )
            last_event = self._last_step_event(conn, experiment_id)
            if last_event is None or last_event != ("step_started", index):
                raise StepOrderError(
                    f"experiment {experiment_id}: step {index} done, but the last step event is "
                    f"{last_event[0] + ' ' + str(last_event[1]) if last_event else 'none'}"
                )
            return self._apply(
                conn,
                experiment_id,
                campaign_id,
                "running",
                event="step_done",
                step=index,
                data=data,
            )

    def record_outcome(
        self,
        experiment_id: str,
        outcome: Mapping[str, Any],
        *,
        images: Mapping[str, bytes] | None = None,
        epoch: int | None = None,
        consumption: Sequence[Sequence[object]] = (),
    ) -> int:
        """A running experiment's recipe ran to its end: keep what the run came to before the
        station returns it; returns the log id (event ``outcome``, the state stays
        ``running`` until the campaign records the result with :meth:`finish`).

        ``outcome``: JSON-able (measurements, ``result``, ``verification``, ``audit``,
        ``images``: role -> ``sha256``/``bytes``); ``images``: the JPEGs by role, kept
        until the result is final. Refused while a step is open, twice, or from an older
        owner (``epoch``); ``consumption`` as for :meth:`step_started`.
        """
        blobs = {str(role): bytes(data) for role, data in (images or {}).items() if data}
        with self._tx() as conn:
            campaign_id, current, station, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            self._store_consumption(
                conn, station or "", _consumption_rows(station or "", consumption)
            )
            if current != "running":
                raise IllegalTransition(
                    experiment_id, current, "running", "an outcome is recorded while running"
                )
            self._require_no_step_open(conn, experiment_id)
            if self._outcome_row(conn, experiment_id) is not None:
                raise JournalError(f"experiment {experiment_id}: its outcome is recorded already")
            for role, data in blobs.items():
                conn.execute(
                    "INSERT INTO outcome_images (experiment_id, role, sha256, data) "
                    "VALUES (?, ?, ?, ?)",
                    (experiment_id, role, hashlib.sha256(data).hexdigest(), data),
                )
            return self._apply(
                conn, experiment_id, campaign_id, "running", event="outcome", data=dict(outcome)
            )

    def outcome(self, experiment_id: str) -> dict[str, Any] | None:
        """The outcome the station journaled for ``experiment_id`` (None: none was)."""
        return self._outcome_row(self._db(), experiment_id)

    def outcome_images(self, experiment_id: str) -> dict[str, bytes]:
        """The JPEGs journaled with a run's outcome, role -> bytes (empty once the result is
        final: they are on disk then)."""
        rows = (
            self._db()
            .execute(
                "SELECT role, data FROM outcome_images WHERE experiment_id = ? ORDER BY role",
                (experiment_id,),
            )
            .fetchall()
        )
        return {str(role): bytes(data) for role, data in rows}

    def _outcome_row(self, conn: Any, experiment_id: str) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT data FROM transitions WHERE experiment_id = ? AND event = 'outcome' "
            "ORDER BY id DESC LIMIT 1",
            (experiment_id,),
        ).fetchone()
        if row is None:
            return None
        payload = _loads(row[0])
        data = payload.get("data") if isinstance(payload, dict) else None
        return dict(data) if isinstance(data, dict) else {}
