"""The journal's connection and its row-level writes, below :class:`~loops.journal.Journal`.

:class:`JournalConnection` opens the SQLite file (WAL, ``synchronous=FULL``, foreign keys,
schema migrated), closes it, runs one write transaction (:meth:`~JournalConnection._tx`,
timed for ``commit_stats``) and holds the helpers every write of the API uses inside
one: the current row, the step log, the state update with its append-only log row.
Its one public method is ``close`` (the owner's, not part of the API);
:class:`~loops.journal.Journal` (``_store``) is the API.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from loops.journal._model import (
    FINAL_STATES,
    JournalError,
    StepOrderError,
    UnknownCampaign,
    UnknownExperiment,
    _dumps,
    _loads,
)
from loops.journal._reads import JournalReads
from loops.journal._schema import migrate

_HISTORY = 1000  # commit durations kept for commit_stats()


class JournalConnection(JournalReads):
    """One SQLite connection to a journal file, and the writes' building blocks.

    Use it from one thread; ``close()`` (or ``with``) releases the file.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        text = str(path)
        if text == ":memory:" or text.startswith("file::memory:") or text == "":
            raise JournalError("a journal must be a file: an in-memory database is not durable")
        self.path = Path(path)
        self._commit_times: deque[float] = deque(maxlen=_HISTORY)
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(text, isolation_level=None, timeout=busy_timeout_s)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {text}: {e}") from e
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(
                    f"journal {text}: cannot switch to WAL (journal_mode is {mode!r}); "
                    "put the journal on a local filesystem"
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            migrate(conn)
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise JournalError(f"cannot open journal {text}: {e}") from e
            raise
        self._conn = conn

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection (idempotent). The WAL is checkpointed by SQLite."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT (fsync'ed) or ROLLBACK. Inside
        another (:meth:`Journal.write_all <loops.journal.Journal.write_all>`) it is a
        savepoint of that one: its changes go with the outer commit, or are rolled back
        alone when it fails."""
        conn = self._db()
        if conn.in_transaction:
            conn.execute("SAVEPOINT inner_write")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO inner_write")
                conn.execute("RELEASE inner_write")
                raise
            conn.execute("RELEASE inner_write")
            return
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._commit_times.append(time.perf_counter() - t0)

    # ---------------------------------------------------------------- helpers
    def _require_campaign(self, conn: sqlite3.Connection, campaign_id: str) -> None:
        self._campaign_state(conn, campaign_id)

    def _campaign_state(self, conn: sqlite3.Connection, campaign_id: str) -> str:
        """The campaign's state; :class:`UnknownCampaign` when the journal has no such one."""
        row = conn.execute("SELECT state FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
        if row is None:
            raise UnknownCampaign(f"no campaign {campaign_id!r} in journal {self.path}")
        return str(row[0])

    def _current(
        self, conn: sqlite3.Connection, experiment_id: str
    ) -> tuple[str, str, str | None, int | None]:
        row = conn.execute(
            "SELECT campaign_id, state, station, step FROM experiments WHERE id = ?",
            (experiment_id,),
        ).fetchone()
        if row is None:
            raise UnknownExperiment(f"no experiment {experiment_id!r} in journal {self.path}")
        return row[0], row[1], row[2], row[3]

    def _last_step_event(
        self, conn: sqlite3.Connection, experiment_id: str
    ) -> tuple[str, int] | None:
        row = conn.execute(
            "SELECT event, step FROM transitions WHERE experiment_id = ? "
            "AND event IN ('step_started', 'step_done') ORDER BY id DESC LIMIT 1",
            (experiment_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def _require_no_step_open(self, conn: sqlite3.Connection, experiment_id: str) -> None:
        last = self._last_step_event(conn, experiment_id)
        if last is not None and last[0] == "step_started":
            raise StepOrderError(
                f"experiment {experiment_id}: step {last[1]} started and is not recorded done"
            )

    def _step_info(self, conn: sqlite3.Connection, experiment_id: str) -> dict[str, Any]:
        rows = conn.execute(
            "SELECT event, step, data FROM transitions WHERE experiment_id = ? "
            "AND event IN ('step_started', 'step_done') ORDER BY id",
            (experiment_id,),
        ).fetchall()
        last_started: int | None = None
        last_step: Any = None
        done: list[int] = []
        for event, step, data in rows:
            if event == "step_started":
                last_started = step
                payload = _loads(data)
                last_step = payload.get("step") if isinstance(payload, dict) else payload
            else:
                done.append(step)
        return {
            "last_step_started": last_started,
            "last_step": last_step,
            "last_step_done": last_started is not None and last_started in done,
            "steps_done": tuple(done),
        }

    def _save_optimizer(
        self, conn: sqlite3.Connection, campaign_id: str, state: Mapping[str, Any]
    ) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"optimizer state must be a mapping, got {type(state).__name__}")
        conn.execute(
            "UPDATE campaigns SET optimizer_state = ?, updated = ? WHERE id = ?",
            (_dumps(dict(state)), time.time(), campaign_id),
        )

    def _apply(
        self,
        conn: sqlite3.Connection,
        experiment_id: str,
        campaign_id: str,
        state: str,
        *,
        event: str = "state",
        step: int | None = None,
        fields: Mapping[str, Any] | None = None,
        data: Any = None,
        reason: str | None = None,
        station: str | None = None,
        recipe: Any = None,
        optimizer_state: Mapping[str, Any] | None = None,
        touch_step: bool = False,
    ) -> int:
        """Update the experiment row and append its log row (inside the caller's transaction).

        The log row's data is None or an object: the event's own ``fields``, plus
        ``reason``/``station``/``recipe`` when given and the caller's ``data``
        under ``"data"``.
        """
        now = time.time()
        sets = ["state = ?", "updated = ?"]
        args: list[Any] = [state, now]
        if reason is not None and event == "state":
            sets.append("reason = ?")
            args.append(reason)
        if state == "proposed":
            sets.append("station = NULL")
        elif station is not None:
            sets.append("station = ?")
            args.append(station)
        if recipe is not None:
            sets.append("recipe = ?")
            args.append(_dumps(recipe))
        if touch_step and step is not None:
            sets.append("step = ?")
            args.append(step)
        conn.execute(
            f"UPDATE experiments SET {', '.join(sets)} WHERE id = ?", [*args, experiment_id]
        )
        if optimizer_state is not None:
            self._save_optimizer(conn, campaign_id, optimizer_state)
        if state in FINAL_STATES:  # its JPEGs are on disk now, or the result says they are not
            conn.execute("DELETE FROM outcome_images WHERE experiment_id = ?", (experiment_id,))
        payload: dict[str, Any] = dict(fields or {})
        for key, value in (("reason", reason), ("station", station), ("recipe", recipe)):
            if value is not None:
                payload[key] = value
        if data is not None:
            payload["data"] = data
        return self._log(conn, experiment_id, campaign_id, event, state, step, payload or None, now)

    def _log(
        self,
        conn: sqlite3.Connection,
        experiment_id: str | None,
        campaign_id: str,
        event: str,
        state: str,
        step: int | None,
        data: Any,
        t: float | None = None,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO transitions (experiment_id, campaign_id, t, event, state, step, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                experiment_id,
                campaign_id,
                time.time() if t is None else t,
                event,
                state,
                step,
                _dumps(data),
            ),
        )
        rowid = cur.lastrowid
        assert rowid is not None
        return rowid


#: The journal's API: every public method of :class:`Journal` but ``close`` (the owner's).
