"""The :class:`Journal` itself: the one definition of the journal's API (SQLite, WAL, synchronous=FULL).

The connection, the write transaction and the row-level helpers it uses are
:class:`~loops.journal._conn.JournalConnection`'s; the queries are
:class:`~loops.journal._reads.JournalReads`'; owners and budget consumption
:class:`~loops.journal._owners.JournalOwners`'; what a station writes while it runs
:class:`~loops.journal._steps.JournalSteps`'; resume
:class:`~loops.journal._resume.JournalResume`'; what one proposer used (its quotas' counts)
:class:`~loops.journal._usage.JournalUsage`'. This module: campaigns and the
experiments' state changes.

Fencing: every write a campaign's owner makes (proposals, transitions, results, the
optimizer's and the campaign's state, station events, evidence) takes ``epoch=``, the
owner's epoch (:meth:`Journal.take_ownership`); a write from an older owner is refused
(:class:`~loops.journal.StaleOwner`). None: a write without an owner (a tool's).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loops.journal._approvals import AWAITING, JournalApprovals
from loops.journal._model import (
    CAMPAIGN_STATES,
    EXPERIMENT_STATES,
    NEXT_STATES,
    Campaign,
    CampaignMismatch,
    IllegalTransition,
    JournalError,
    _dumps,
    _loads,
)
from loops.journal._owners import _consumption_rows
from loops.journal._reads import _EXPERIMENT_COLUMNS
from loops.journal._resume import JournalResume
from loops.journal._schema import _schema_version
from loops.journal._usage import JournalUsage

_PROPOSER = re.compile(r"^(optimizer(:\S+)?|agent:\S+|operator(:\S+)?)$")


class Journal(JournalResume, JournalApprovals, JournalUsage):
    """The durable record of campaigns and experiments (SQLite, WAL, synchronous=FULL).

    ``Journal(path)`` creates or opens the file and migrates its schema.
    ``busy_timeout_s``: how long a write waits for another process holding the
    write lock (a ``labbridge status`` reader never blocks it: WAL). Use it
    from one thread; ``close()`` (or ``with``) releases the file.
    """

    # ----------------------------------------------------------- diagnostics
    def settings(self) -> dict[str, Any]:
        """The connection's durability settings, as SQLite reports them."""
        conn = self._db()
        sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        level = int(conn.execute("PRAGMA synchronous").fetchone()[0])
        return {
            "path": str(self.path),
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
            "synchronous": sync.get(level, str(level)),
            "foreign_keys": bool(conn.execute("PRAGMA foreign_keys").fetchone()[0]),
            "schema_version": _schema_version(conn),
        }

    def write_all(self, writes: Sequence[Sequence[Any]]) -> list[Any]:
        """Several writes in one transaction (one fsync'ed commit: one round trip for a
        caller in another process), in the order given; returns their results. Each write is
        ``(name, args, kwargs)``: a method of this API by name (not ``write_all``) and its
        arguments. All or nothing: the first that raises rolls every one back and its error
        is raised as it is."""
        calls = []
        for i, write in enumerate(writes):
            name, args, kwargs = write
            if name not in JOURNAL_API or name == "write_all":
                raise ValueError(
                    f"write_all: write {i} names {name!r}, not a journal method; pass one of "
                    f"{', '.join(sorted(JOURNAL_API - {'write_all'}))}"
                )
            calls.append((getattr(self, name), tuple(args), dict(kwargs)))
        with self._tx():
            return [fn(*args, **kwargs) for fn, args, kwargs in calls]

    def commit_stats(self) -> dict[str, float]:
        """Duration of the last write transactions (BEGIN to fsync'ed COMMIT), in ms."""
        times = sorted(self._commit_times)
        if not times:
            return {"count": 0, "median_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
        p99 = times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]
        return {
            "count": len(times),
            "median_ms": statistics.median(times) * 1e3,
            "p99_ms": p99 * 1e3,
            "max_ms": times[-1] * 1e3,
        }

    # -------------------------------------------------------------- campaigns
    def create_campaign(
        self, campaign_id: str, name: str, program: Any, *, exist_ok: bool = False
    ) -> Campaign:
        """Create a campaign in state ``running``; ``program`` is program.md text or a dict.

        With ``exist_ok`` an existing campaign with the same id, name and program
        is returned unchanged (a restart); a different name or program raises
        :class:`CampaignMismatch`. Without it an existing id raises JournalError.
        """
        if not campaign_id or not isinstance(campaign_id, str):
            raise ValueError(f"campaign id must be a non-empty string, got {campaign_id!r}")
        program_json = _dumps(program)
        with self._tx() as conn:
            row = conn.execute(
                "SELECT name, program FROM campaigns WHERE id = ?", (campaign_id,)
            ).fetchone()
            if row is not None:
                if not exist_ok:
                    raise JournalError(f"campaign {campaign_id!r} already exists in {self.path}")
                if row[0] != name or _loads(row[1]) != _loads(program_json):
                    what = "name" if row[0] != name else "program"
                    raise CampaignMismatch(
                        f"campaign {campaign_id!r} exists in {self.path} with a different {what}; "
                        "resume it with the program it started with, or use a new campaign id"
                    )
            else:
                now = time.time()
                conn.execute(
                    "INSERT INTO campaigns (id, name, program, created, state, optimizer_state, "
                    "updated) VALUES (?, ?, ?, ?, 'running', NULL, ?)",
                    (campaign_id, name, program_json, now, now),
                )
                self._log(conn, None, campaign_id, "campaign", "running", None, {"created": name})
        return self.campaign(campaign_id)

    def set_campaign_state(
        self, campaign_id: str, state: str, *, reason: str | None = None, epoch: int | None = None
    ) -> int:
        """Record the campaign's state (running|paused|stopped|done|aborted); returns the log id."""
        if state not in CAMPAIGN_STATES:
            raise ValueError(
                f"unknown campaign state {state!r}; one of {', '.join(CAMPAIGN_STATES)}"
            )
        with self._tx() as conn:
            self._require_campaign(conn, campaign_id)
            self._require_epoch(conn, campaign_id, epoch)
            conn.execute(
                "UPDATE campaigns SET state = ?, updated = ? WHERE id = ?",
                (state, time.time(), campaign_id),
            )
            data = {"reason": reason} if reason else None
            return self._log(conn, None, campaign_id, "campaign", state, None, data)

    def save_optimizer_state(
        self, campaign_id: str, state: Mapping[str, Any], *, epoch: int | None = None
    ) -> None:
        """Store the optimizer's state (JSON-able dict). Prefer ``optimizer_state=`` on the
        transition that made it necessary (finish/fail/reject): one transaction for both."""
        with self._tx() as conn:
            self._require_campaign(conn, campaign_id)
            self._require_epoch(conn, campaign_id, epoch)
            self._save_optimizer(conn, campaign_id, state)

    # ------------------------------------------------------------ experiments
    def propose(
        self,
        campaign_id: str,
        params: Mapping[str, Any],
        proposer: str,
        *,
        recipe: Any = None,
        data: Any = None,
        epoch: int | None = None,
    ) -> str:
        """Record a new proposal; returns its id ``<campaign_id>-<seq:04d>`` (seq from 1).

        ``proposer``: ``optimizer[:<strategy>]``, ``agent:<id>`` or ``operator[:<who>]``.
        """
        if not isinstance(params, Mapping):
            raise TypeError(
                f"params must be a mapping of name -> value, got {type(params).__name__}"
            )
        if not isinstance(proposer, str) or not _PROPOSER.match(proposer):
            raise ValueError(
                f"proposer {proposer!r}: expected 'optimizer', 'optimizer:<strategy>', "
                "'agent:<id>', 'operator' or 'operator:<who>'"
            )
        params_json = _dumps(dict(params))
        recipe_json = _dumps(recipe)
        with self._tx() as conn:
            self._require_campaign(conn, campaign_id)
            self._require_epoch(conn, campaign_id, epoch)
            seq = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM experiments WHERE campaign_id = ?",
                (campaign_id,),
            ).fetchone()[0]
            eid = f"{campaign_id}-{seq:04d}"
            now = time.time()
            conn.execute(
                f"INSERT INTO experiments ({_EXPERIMENT_COLUMNS}) VALUES "
                "(?, ?, ?, NULL, ?, ?, 'proposed', NULL, ?, NULL, NULL, NULL, NULL, ?, ?)",
                (eid, campaign_id, seq, params_json, proposer, recipe_json, now, now),
            )
            payload: dict[str, Any] = {"params": dict(params), "proposer": proposer}
            if recipe is not None:
                payload["recipe"] = recipe
            if data is not None:
                payload["data"] = data
            self._log(conn, eid, campaign_id, "state", "proposed", None, payload)
        return eid

    def transition(
        self,
        experiment_id: str,
        state: str,
        *,
        step: int | None = None,
        data: Any = None,
        reason: str | None = None,
        station: str | None = None,
        recipe: Any = None,
        optimizer_state: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        consumption: Sequence[Sequence[object]] = (),
    ) -> int:
        """Move an experiment to ``state``, committed before returning; returns the log id.

        Validated against :data:`NEXT_STATES` (:class:`IllegalTransition` names
        both states). ``rejected``/``failed`` need a ``reason``; ``running`` needs
        a station (given now or when queued); ``done`` goes through :meth:`finish`
        and step events through :meth:`step_started`/:meth:`step_done`.
        ``station``/``recipe`` update the row when given (going back to
        ``proposed`` clears the station); ``step`` and ``data`` go to the log
        row only. ``optimizer_state`` is saved in the same transaction. ``epoch``: the
        writer's owner epoch (:meth:`take_ownership`); an older one raises :class:`StaleOwner`.
        ``consumption``: the station's budget consumption (as for :meth:`step_started`; the
        experiments unit goes with ``running``), stored in the same transaction.
        """
        return self._transition(
            experiment_id,
            state,
            step=step,
            data=data,
            reason=reason,
            station=station,
            recipe=recipe,
            optimizer_state=optimizer_state,
            epoch=epoch,
            consumption=consumption,
        )

    def _transition(
        self,
        experiment_id: str,
        state: str,
        *,
        fields: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> int:
        reason, station = kwargs.get("reason"), kwargs.get("station")
        epoch = kwargs.pop("epoch", None)
        consumption = kwargs.pop("consumption", ())
        if state not in NEXT_STATES:
            raise ValueError(
                f"unknown experiment state {state!r}; one of {', '.join(EXPERIMENT_STATES)}"
            )
        if state == "done":
            raise JournalError(
                f"experiment {experiment_id}: record a result with finish(), not transition('done')"
            )
        if state == AWAITING:
            raise JournalError(
                f"experiment {experiment_id}: send it to a human with await_approval(), "
                "not transition()"
            )
        if state in ("rejected", "failed", "interrupted") and not reason:
            raise ValueError(f"experiment {experiment_id}: moving to {state!r} needs a reason")
        with self._tx() as conn:
            campaign_id, current, cur_station, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            if state not in NEXT_STATES[current]:
                raise IllegalTransition(experiment_id, current, state)
            if current == AWAITING and state == "checked":
                self._require_approved(conn, experiment_id)
            if state == "running" and not (station or cur_station):
                raise JournalError(
                    f"experiment {experiment_id}: 'running' needs the station it runs on "
                    "(pass station= here or when queuing)"
                )
            if consumption:
                where = str(station or cur_station or "")
                self._store_consumption(conn, where, _consumption_rows(where, consumption))
            return self._apply(conn, experiment_id, campaign_id, state, fields=fields, **kwargs)

    def reject(
        self,
        experiment_id: str,
        reasons: Sequence[str],
        *,
        data: Any = None,
        optimizer_state: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> int:
        """proposed -> rejected (the dry run refused it); ``reasons``: one line per violation."""
        reasons = [str(r) for r in ([reasons] if isinstance(reasons, str) else reasons)]
        if not reasons:
            raise ValueError(f"experiment {experiment_id}: a rejection needs at least one reason")
        return self._transition(
            experiment_id,
            "rejected",
            fields={"reasons": reasons},
            reason="; ".join(reasons),
            data=data,
            optimizer_state=optimizer_state,
            epoch=epoch,
        )

    def fail(
        self,
        experiment_id: str,
        reason: str,
        *,
        data: Any = None,
        optimizer_state: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> int:
        """queued|running|interrupted -> failed with ``reason`` (a step in progress stays
        recorded as started and not done)."""
        return self.transition(
            experiment_id,
            "failed",
            reason=reason,
            data=data,
            optimizer_state=optimizer_state,
            epoch=epoch,
        )

    def finish(
        self,
        experiment_id: str,
        result: Any,
        objective: float,
        *,
        verified: bool | None = None,
        reason: str | None = None,
        optimizer_state: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> int:
        """running -> done with ``result`` (JSON-able) and a finite ``objective``.

        ``verified``: None (not checked), True, False (untrusted; ``reason`` says
        why, kept in the row). Refused while a step is started and not done.
        ``optimizer_state`` (after telling the optimizer this result) is saved in
        the same transaction.
        """
        value = float(objective)
        if not math.isfinite(value):
            raise ValueError(
                f"experiment {experiment_id}: objective {objective!r} is not finite; "
                "record the experiment with fail() instead"
            )
        with self._tx() as conn:
            campaign_id, current, _, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            if current != "running":
                raise IllegalTransition(experiment_id, current, "done")
            self._require_no_step_open(conn, experiment_id)
            conn.execute(
                "UPDATE experiments SET result = ?, objective = ?, verified = ? WHERE id = ?",
                (_dumps(result), value, None if verified is None else int(verified), experiment_id),
            )
            return self._apply(
                conn,
                experiment_id,
                campaign_id,
                "done",
                fields={"result": result, "objective": value, "verified": verified},
                reason=reason,
                optimizer_state=optimizer_state,
            )

    def mark_verified(
        self,
        experiment_id: str,
        verified: bool,
        *,
        reason: str | None = None,
        epoch: int | None = None,
    ) -> int:
        """Set a done experiment's verification (False: untrusted, the optimizer ignores it)."""
        with self._tx() as conn:
            campaign_id, current, _, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            if current != "done":
                raise IllegalTransition(
                    experiment_id, current, current, "only a done experiment can be verified"
                )
            conn.execute(
                "UPDATE experiments SET verified = ? WHERE id = ?", (int(verified), experiment_id)
            )
            return self._apply(
                conn,
                experiment_id,
                campaign_id,
                "done",
                event="verified",
                fields={"verified": bool(verified)},
                reason=reason,
            )

    def record_prior(
        self,
        campaign_id: str,
        data: Mapping[str, Any],
        *,
        optimizer_state: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> int:
        """Log that a prior campaign's results were told to the optimizer before the first
        proposal (event ``prior``; ``data``: which campaign, what was told and dropped, and a
        ``reason`` in words), with the optimizer's state in the same transaction."""
        with self._tx() as conn:
            current = self._campaign_state(conn, campaign_id)
            self._require_epoch(conn, campaign_id, epoch)
            if optimizer_state is not None:
                self._save_optimizer(conn, campaign_id, optimizer_state)
            return self._log(conn, None, campaign_id, "prior", current, None, dict(data))

    def station_event(
        self, campaign_id: str, station: str, state: str, reason: str, *, epoch: int | None = None
    ) -> int:
        """Log what happened to a station during a campaign (out, paused after disagreements,
        resting on a spent budget, died) as a campaign-level row (event ``station``)."""
        with self._tx() as conn:
            current = self._campaign_state(conn, campaign_id)
            self._require_epoch(conn, campaign_id, epoch)
            return self._log(
                conn,
                None,
                campaign_id,
                "station",
                current,
                None,
                {
                    "station": station,
                    "station_state": state,
                    "reason": f"station {station} {state}: {reason}",
                },
            )

    def record_evidence(
        self,
        experiment_id: str,
        *,
        verdicts: Sequence[Mapping[str, Any]] = (),
        images: Mapping[str, Mapping[str, Any]] | None = None,
        epoch: int | None = None,
    ) -> None:
        """Keep an experiment's evidence, in one transaction: the safety verdicts on its
        commands (``Verdict.as_dict()``: ``station``, ``command``, ``allowed``, ``rule``,
        ``reason``, ``t``, ...) and its images (role -> ``sha256``, ``path``, ``bytes``).
        Idempotent: the verdicts replace any an earlier, interrupted record of the same
        experiment kept (resume records a journaled outcome once more)."""
        with self._tx() as conn:
            campaign_id, _, station, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            if verdicts:
                conn.execute("DELETE FROM verdicts WHERE experiment_id = ?", (experiment_id,))
            for v in verdicts:
                command = v.get("command") or {}
                conn.execute(
                    "INSERT INTO verdicts (campaign_id, experiment_id, station, t, who, command, "
                    "allowed, rule, reason, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        campaign_id,
                        experiment_id,
                        str(v.get("station") or station or ""),
                        float(v.get("t") or time.time()),
                        command.get("who") if isinstance(command, Mapping) else None,
                        _dumps(command),
                        int(bool(v.get("allowed"))),
                        v.get("rule"),
                        str(v.get("reason") or ""),
                        _dumps(v.get("values")),
                    ),
                )
            for role, image in (images or {}).items():
                conn.execute(
                    "INSERT OR IGNORE INTO images (sha256, path, bytes, created) VALUES (?, ?, ?, ?)",
                    (image["sha256"], str(image["path"]), int(image["bytes"]), time.time()),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO experiment_images (experiment_id, role, sha256) "
                    "VALUES (?, ?, ?)",
                    (experiment_id, role, image["sha256"]),
                )


#: :class:`~loops.journal.AsyncJournal` and the Ray journal actor forward exactly these, so
#: a method added to :class:`Journal` is available through both without another edit.
JOURNAL_API: frozenset[str] = frozenset(
    name
    for name in dir(Journal)
    if callable(getattr(Journal, name)) and not name.startswith("_") and name != "close"
)


def api_name(fn: Callable[..., Any]) -> str:
    """The name of ``fn`` if it is a method of the journal's API (``Journal.propose``, ...);
    raises ValueError naming the allowed methods otherwise."""
    name = getattr(fn, "__name__", None)
    if name not in JOURNAL_API or getattr(Journal, name) is not fn:
        raise ValueError(
            f"{fn!r} is not a journal method; pass one of Journal.{', Journal.'.join(sorted(JOURNAL_API))}"
        )
    return name
