"""What a station writes while it runs an experiment, below :class:`~loops.journal.Journal`.

Each physical step is journaled before it acts (:meth:`JournalSteps.step_started`) and
after (:meth:`JournalSteps.step_done`), with the budget consumption since the station's
last write in the same transaction, and with a reservation for the step about to act
(what the guard would commit for it: counted if the step is cut by a kill, replaced by
the actual consumption when the step is recorded done). The last step's record carries
what the run measured (event ``measured``: measurements, the safety verdicts, the JPEGs,
one transaction with its ``step_done``); once verified, the station journals the run's
outcome (:meth:`JournalSteps.record_outcome`: the verification, on top of what was
measured) before it returns it. A campaign process killed before it records the result
loses nothing: resume records a journaled outcome as it is
(:class:`~loops.journal.CompletedRun`), and verifies a run that was only measured on the
recovering station first (:attr:`~loops.journal.ResumeInfo.recovered`). Every write
carries the station's lease epoch (:class:`~loops.journal.StaleOwner` for an older one).
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
        done: Sequence[Any] | None = None,
    ) -> int:
        """Step ``index`` (0-based) of a running experiment is about to act; returns the log id.

        Refused (:class:`StepOrderError`) if that index (or a later one) already
        started, or the previous step has not been recorded done: a physical
        step is never started twice. ``epoch``: the station's lease epoch (an older owner's
        write raises :class:`StaleOwner`); ``consumption``: the station's budget consumption
        since its last write (:meth:`record_consumption`), stored in the same transaction;
        ``reserve``: what this step may consume (same entries), counted until the station
        records what it did consume. ``done``: ``(index, data)`` of the step that just
        finished, recorded done first in the same transaction, as :meth:`step_done` would
        (one write per step boundary instead of two; ``consumption`` settles its reservation).
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
            if done is not None:
                self._step_done_row(conn, experiment_id, campaign_id, int(done[0]), done[1])
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
        measured: Mapping[str, Any] | None = None,
        images: Mapping[str, bytes] | None = None,
    ) -> int:
        """Step ``index`` finished (``data``: its readings/outcome); returns the log id.
        ``epoch`` and ``consumption`` as for :meth:`step_started` (the step's reservation
        is settled by it).

        ``measured`` (the recipe's last step only): what the run measured, unverified
        (JSON-able: measurements, ``result``, ``audit``, ``images``: role ->
        ``sha256``/``bytes``), kept in the same transaction as an event ``measured``, with
        ``images`` (the captures' JPEGs by role, kept until the result is final): a run
        whose every step finished is never lost, whatever happens before its outcome is
        recorded (:meth:`resume`).
        """
        if measured is None and images:
            raise ValueError(f"experiment {experiment_id}: images go with measured= only")
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
            rowid = self._step_done_row(conn, experiment_id, campaign_id, index, data)
            if measured is not None:
                self._keep_measured(conn, experiment_id, campaign_id, index, measured, images)
            return rowid

    def _step_done_row(
        self, conn: Any, experiment_id: str, campaign_id: str, index: int, data: Any
    ) -> int:
        """The ``step_done`` event of step ``index`` (inside a write of a running experiment):
        refused unless that step is the last one started and not yet done."""
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

    def _keep_measured(
        self,
        conn: Any,
        experiment_id: str,
        campaign_id: str,
        index: int,
        measured: Mapping[str, Any],
        images: Mapping[str, bytes] | None,
    ) -> None:
        """The ``measured`` event of :meth:`step_done` (inside its transaction)."""
        row = conn.execute(
            "SELECT recipe FROM experiments WHERE id = ?", (experiment_id,)
        ).fetchone()
        recipe = _loads(row[0]) if row is not None else None
        steps = recipe.get("steps") if isinstance(recipe, dict) else None
        if isinstance(steps, list) and index != len(steps) - 1:
            raise JournalError(
                f"experiment {experiment_id}: what the run measured goes with its last step "
                f"({len(steps) - 1}), not step {index}"
            )
        if self._event_data(conn, experiment_id, "measured") is not None:
            raise JournalError(f"experiment {experiment_id}: its measurements are recorded already")
        self._keep_images(conn, experiment_id, images)
        self._apply(
            conn,
            experiment_id,
            campaign_id,
            "running",
            event="measured",
            step=index,
            data=dict(measured),
        )

    def _keep_images(
        self, conn: Any, experiment_id: str, images: Mapping[str, bytes] | None
    ) -> None:
        """Keep a run's JPEGs (role -> bytes) until its result is final; a role kept already
        (with the run's measurements) is not stored twice."""
        for role, data in (images or {}).items():
            if not data:
                continue
            digest = hashlib.sha256(bytes(data)).hexdigest()
            kept = conn.execute(
                "SELECT sha256 FROM outcome_images WHERE experiment_id = ? AND role = ?",
                (experiment_id, str(role)),
            ).fetchone()
            if kept is not None:
                if kept[0] != digest:
                    raise JournalError(
                        f"experiment {experiment_id}: its {role} image is kept already, with "
                        f"another content (sha256 {kept[0]}, not {digest})"
                    )
                continue
            conn.execute(
                "INSERT INTO outcome_images (experiment_id, role, sha256, data) "
                "VALUES (?, ?, ?, ?)",
                (experiment_id, str(role), digest, bytes(data)),
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
        until the result is final. What the last step's record kept
        (``step_done(measured=...)``) need not be given again (the station gives what it
        adds: the verification; an image kept already is not stored twice): :meth:`outcome`
        returns both, this event's keys over the measured ones.
        Refused while a step is open, twice, or from an older owner (``epoch``);
        ``consumption`` as for :meth:`step_started`.
        """
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
            self._keep_images(conn, experiment_id, images)
            return self._apply(
                conn, experiment_id, campaign_id, "running", event="outcome", data=dict(outcome)
            )

    def outcome(self, experiment_id: str) -> dict[str, Any] | None:
        """The outcome the station journaled for ``experiment_id`` (None: none was)."""
        return self._outcome_row(self._db(), experiment_id)

    def measured(self, experiment_id: str) -> dict[str, Any] | None:
        """What ``experiment_id``'s run measured, journaled with its last step (unverified;
        None: no run of it got that far)."""
        return self._event_data(self._db(), experiment_id, "measured")

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
        """The journaled outcome: what was measured with the last step, completed by the
        ``outcome`` event (None: no outcome)."""
        outcome = self._event_data(conn, experiment_id, "outcome")
        if outcome is None:
            return None
        return {**(self._event_data(conn, experiment_id, "measured") or {}), **outcome}

    def _event_data(self, conn: Any, experiment_id: str, event: str) -> dict[str, Any] | None:
        """The caller's data of the experiment's last ``event`` row (None: no such row)."""
        row = conn.execute(
            "SELECT data FROM transitions WHERE experiment_id = ? AND event = ? "
            "ORDER BY id DESC LIMIT 1",
            (experiment_id, event),
        ).fetchone()
        if row is None:
            return None
        payload = _loads(row[0])
        data = payload.get("data") if isinstance(payload, dict) else None
        return dict(data) if isinstance(data, dict) else {}
