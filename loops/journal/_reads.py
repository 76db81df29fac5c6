"""The journal's queries: :class:`JournalReads`, the read-only half of :class:`~loops.journal.Journal`."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loops.journal._model import (
    NEXT_STATES,
    Campaign,
    Experiment,
    JournalError,
    Transition,
    UnknownCampaign,
    UnknownExperiment,
    _dumps,
    _loads,
)

_EXPERIMENT_COLUMNS = (
    "id, campaign_id, seq, station, params, proposer, state, step, recipe, result, "
    "objective, verified, reason, created, updated"
)
_TRANSITION_COLUMNS = "id, experiment_id, campaign_id, t, event, state, step, data"


def _experiment(row: tuple[Any, ...]) -> Experiment:
    return Experiment(
        id=row[0],
        campaign_id=row[1],
        seq=row[2],
        station=row[3],
        params=_loads(row[4]),
        proposer=row[5],
        state=row[6],
        step=row[7],
        recipe=_loads(row[8]),
        result=_loads(row[9]),
        objective=row[10],
        verified=None if row[11] is None else bool(row[11]),
        reason=row[12],
        created=row[13],
        updated=row[14],
    )


def _transition(row: tuple[Any, ...]) -> Transition:
    return Transition(
        id=row[0],
        experiment_id=row[1],
        campaign_id=row[2],
        t=row[3],
        event=row[4],
        state=row[5],
        step=row[6],
        data=_loads(row[7]),
    )


class JournalReads:
    """Campaigns, experiments, their logs, verdicts and images as stored, and the CSV rows
    (no writes; :class:`~loops.journal.Journal` adds those and owns the connection)."""

    path: Path
    _conn: sqlite3.Connection | None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"journal {self.path} is closed")
        return self._conn

    def campaign(self, campaign_id: str) -> Campaign:
        """The campaign row; raises :class:`UnknownCampaign`."""
        row = (
            self._db()
            .execute(
                "SELECT id, name, program, state, optimizer_state, created, updated "
                "FROM campaigns WHERE id = ?",
                (campaign_id,),
            )
            .fetchone()
        )
        if row is None:
            raise UnknownCampaign(f"no campaign {campaign_id!r} in journal {self.path}")
        return Campaign(
            id=row[0],
            name=row[1],
            program=_loads(row[2]),
            state=row[3],
            optimizer_state=_loads(row[4]),
            created=row[5],
            updated=row[6],
        )

    def campaigns(self) -> list[Campaign]:
        """Every campaign, oldest first."""
        ids = self._db().execute("SELECT id FROM campaigns ORDER BY created, id").fetchall()
        return [self.campaign(r[0]) for r in ids]

    def verdicts(self, campaign_id: str, experiment_id: str | None = None) -> list[dict[str, Any]]:
        """The safety verdicts recorded for a campaign (or one experiment), oldest first."""
        sql = (
            "SELECT id, experiment_id, station, t, who, command, allowed, rule, reason, data "
            "FROM verdicts WHERE campaign_id = ?"
        )
        args: list[Any] = [campaign_id]
        if experiment_id is not None:
            sql += " AND experiment_id = ?"
            args.append(experiment_id)
        rows = self._db().execute(sql + " ORDER BY id", args).fetchall()
        return [
            {
                "id": r[0],
                "experiment_id": r[1],
                "station": r[2],
                "t": r[3],
                "who": r[4],
                "command": _loads(r[5]),
                "allowed": bool(r[6]),
                "rule": r[7],
                "reason": r[8],
                "values": _loads(r[9]),
            }
            for r in rows
        ]

    def images(self, experiment_id: str) -> dict[str, dict[str, Any]]:
        """An experiment's images: role -> ``sha256``, ``path``, ``bytes``."""
        rows = (
            self._db()
            .execute(
                "SELECT e.role, i.sha256, i.path, i.bytes FROM experiment_images e "
                "JOIN images i ON i.sha256 = e.sha256 WHERE e.experiment_id = ? ORDER BY e.role",
                (experiment_id,),
            )
            .fetchall()
        )
        return {r[0]: {"sha256": r[1], "path": r[2], "bytes": r[3]} for r in rows}

    # ------------------------------------------------------------------ reads
    def experiment(self, experiment_id: str) -> Experiment:
        """One experiment; raises :class:`UnknownExperiment`."""
        row = (
            self._db()
            .execute(
                f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?", (experiment_id,)
            )
            .fetchone()
        )
        if row is None:
            raise UnknownExperiment(f"no experiment {experiment_id!r} in journal {self.path}")
        return _experiment(row)

    def experiments(
        self, campaign_id: str, state: str | Iterable[str] | None = None
    ) -> list[Experiment]:
        """The campaign's experiments in seq order, optionally only those in ``state``(s)."""
        sql = f"SELECT {_EXPERIMENT_COLUMNS} FROM experiments WHERE campaign_id = ?"
        args: list[Any] = [campaign_id]
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            unknown = [s for s in states if s not in NEXT_STATES]
            if unknown:
                raise ValueError(f"unknown experiment state(s) {unknown}")
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += states
        rows = self._db().execute(sql + " ORDER BY seq", args).fetchall()
        return [_experiment(r) for r in rows]

    def transitions(self, experiment_id: str) -> list[Transition]:
        """The experiment's log, oldest first."""
        rows = (
            self._db()
            .execute(
                f"SELECT {_TRANSITION_COLUMNS} FROM transitions WHERE experiment_id = ? ORDER BY id",
                (experiment_id,),
            )
            .fetchall()
        )
        return [_transition(r) for r in rows]

    def campaign_log(self, campaign_id: str, *, since: int = 0) -> list[Transition]:
        """Every log row of the campaign (experiments and campaign events) with id > ``since``."""
        rows = (
            self._db()
            .execute(
                f"SELECT {_TRANSITION_COLUMNS} FROM transitions WHERE campaign_id = ? AND id > ? "
                "ORDER BY id",
                (campaign_id, since),
            )
            .fetchall()
        )
        return [_transition(r) for r in rows]

    # ----------------------------------------------------------------- export
    def to_rows(self, campaign_id: str) -> list[dict[str, Any]]:
        """One flat dict per experiment (seq order), the same keys in every row (for CSV).

        Columns: experiment, seq, station, proposer, state, step, objective,
        verified, reason, created, updated, then ``param.<name>`` and
        ``result.<key>`` (nested values as JSON text).
        """
        self.campaign(campaign_id)
        exps = self.experiments(campaign_id)
        param_keys: dict[str, None] = {}
        result_keys: dict[str, None] = {}
        for e in exps:
            param_keys.update(dict.fromkeys(e.params))
            if isinstance(e.result, Mapping):
                result_keys.update(dict.fromkeys(e.result))

        def flat(v: Any) -> Any:
            return v if v is None or isinstance(v, str | int | float | bool) else _dumps(v)

        rows = []
        for e in exps:
            row: dict[str, Any] = {
                "experiment": e.id,
                "seq": e.seq,
                "station": e.station,
                "proposer": e.proposer,
                "state": e.state,
                "step": e.step,
                "objective": e.objective,
                "verified": e.verified,
                "reason": e.reason,
                "created": e.created,
                "updated": e.updated,
            }
            for k in param_keys:
                row[f"param.{k}"] = flat(e.params.get(k))
            result = e.result if isinstance(e.result, Mapping) else {}
            for k in result_keys:
                row[f"result.{k}"] = flat(result.get(k))
            rows.append(row)
        return rows
