"""Proposals awaiting a human's approval, below :class:`~loops.journal.Journal`.

An agent's proposal that an approval policy (:mod:`loops.approval`) sends to a human goes
``proposed -> awaiting-approval`` (:meth:`JournalApprovals.await_approval`, with the rules
that asked and when it expires, wall-clock). A human's decision is recorded by
:meth:`JournalApprovals.decide` (who, why, through what: the MQTT API, the CLI on the
journal file, the Python API) and logged; the campaign that owns the experiment applies
it (``checked`` and queued, or ``rejected``: "denied by <who>: <why>"), or rejects it as
expired. The journal keeps the invariant that matters: an experiment leaves
``awaiting-approval`` for ``checked`` only with a recorded approval.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from loops.journal._model import NEXT_STATES, IllegalTransition, JournalError, _dumps, _loads
from loops.journal._owners import JournalOwners

AWAITING = "awaiting-approval"
DECISIONS = ("approve", "deny")
#: the longest reason a decision may carry (characters)
MAX_REASON = 1000
_COLUMNS = (
    "a.experiment_id, a.campaign_id, a.rules, a.requested, a.expires, a.decision, a.who, "
    "a.reason, a.via, a.decided, e.params, e.proposer, e.state, e.reason"
)


class ApprovalError(JournalError):
    """A decision the journal refuses: the experiment is not awaiting approval (never was,
    already decided, expired), the approver proposed it, or who/why is missing."""


def _row(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "experiment_id": r[0],
        "campaign_id": r[1],
        "rules": _loads(r[2]),
        "requested": r[3],
        "expires": r[4],
        "decision": r[5],
        "who": r[6],
        "reason": r[7],
        "via": r[8],
        "decided": r[9],
        "params": _loads(r[10]),
        "proposer": r[11],
        "state": r[12],
        "experiment_reason": r[13],
    }


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class JournalApprovals(JournalOwners):
    """:meth:`await_approval`, :meth:`decide`, :meth:`approvals` (module docstring)."""

    def await_approval(
        self,
        experiment_id: str,
        rules: Sequence[str],
        expires: float,
        *,
        optimizer_state: Mapping[str, Any] | None = None,
        epoch: int | None = None,
    ) -> int:
        """``proposed -> awaiting-approval``: ``rules`` (one line per policy that asked a
        human), until ``expires`` (wall clock, epoch seconds); the optimizer's state (the
        point pending) in the same transaction. Returns the log id."""
        rules = [str(r) for r in rules]
        if not rules:
            raise ValueError(f"experiment {experiment_id}: awaiting approval needs a rule")
        with self._tx() as conn:
            campaign_id, current, _, _ = self._current(conn, experiment_id)
            self._require_epoch(conn, campaign_id, epoch)
            if AWAITING not in NEXT_STATES[current]:
                raise IllegalTransition(experiment_id, current, AWAITING)
            conn.execute(
                "INSERT INTO approvals (experiment_id, campaign_id, rules, requested, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (experiment_id, campaign_id, _dumps(rules), time.time(), float(expires)),
            )
            return self._apply(
                conn,
                experiment_id,
                campaign_id,
                AWAITING,
                fields={"rules": rules, "expires": float(expires)},
                reason=f"awaiting approval until {_when(expires)}: {'; '.join(rules)}",
                optimizer_state=optimizer_state,
            )

    def decide(
        self,
        experiment_id: str,
        approve: bool,
        who: str,
        reason: str,
        *,
        via: str = "api",
        campaign_id: str | None = None,
    ) -> dict[str, Any]:
        """Record a human's decision on an experiment awaiting approval: ``who`` (an
        authenticated identity: the MQTT user, the OS user of the CLI) and ``reason``;
        ``via`` says through what; ``campaign_id``: the campaign the caller means (the
        experiment must be one of its). The campaign applies it (:meth:`approvals` lists the
        decisions it has not applied yet). Returns the approval's row.

        Raises :class:`ApprovalError` (one line) if the experiment is not awaiting approval
        (never was, already decided, expired), if ``who`` proposed it (an agent never
        approves its own proposal), or without who or reason.
        """
        who, reason = str(who or "").strip(), " ".join(str(reason or "").split())
        verb = "approve" if approve else "deny"
        if not who:
            raise ApprovalError(f"to {verb} {experiment_id}, say who decides")
        if not reason:
            raise ApprovalError(f"to {verb} {experiment_id}, give a reason (it is journaled)")
        if len(reason) > MAX_REASON:
            raise ApprovalError(f"the reason is {len(reason)} characters (at most {MAX_REASON})")
        with self._tx() as conn:
            owner, state, _, _ = self._current(conn, experiment_id)
            if campaign_id is not None and owner != campaign_id:
                raise ApprovalError(
                    f"experiment {experiment_id} is campaign {owner}'s, not {campaign_id}'s"
                )
            campaign_id = owner
            row = self._approval_row(conn, experiment_id)
            if row is None:
                raise ApprovalError(
                    f"experiment {experiment_id} is {state} and never awaited approval: "
                    "nothing to decide"
                )
            if state != AWAITING:
                raise ApprovalError(
                    f"experiment {experiment_id} is not awaiting approval: it is {state} "
                    f"({row['experiment_reason'] or 'no reason recorded'})"
                )
            if row["decision"] is not None:
                done = "approved" if row["decision"] == "approve" else "denied"
                raise ApprovalError(
                    f"experiment {experiment_id} was {done} already by {row['who']} at "
                    f"{_when(row['decided'])}; campaign {campaign_id} applies it when it runs"
                )
            now = time.time()
            if now >= row["expires"]:
                raise ApprovalError(
                    f"experiment {experiment_id}: its approval expired at "
                    f"{_when(row['expires'])}; campaign {campaign_id} rejects it"
                )
            proposer = str(row["proposer"])
            if proposer in (f"agent:{who}", who, f"operator:{who}"):
                raise ApprovalError(
                    f"{who} proposed experiment {experiment_id}: nobody approves or denies "
                    "their own proposal"
                )
            conn.execute(
                "UPDATE approvals SET decision = ?, who = ?, reason = ?, via = ?, decided = ? "
                "WHERE experiment_id = ?",
                (verb, who, reason, str(via), now, experiment_id),
            )
            self._log(
                conn,
                experiment_id,
                campaign_id,
                "approval",
                AWAITING,
                None,
                {"decision": verb, "who": who, "reason": reason, "via": str(via)},
                now,
            )
            out = self._approval_row(conn, experiment_id)
        assert out is not None
        return out

    def approvals(
        self, campaign_id: str | None = None, *, awaiting: bool = True
    ) -> list[dict[str, Any]]:
        """Approvals (oldest first) of one campaign or all; ``awaiting``: only experiments
        still in ``awaiting-approval`` (decided or not). Each: ``experiment_id``,
        ``campaign_id``, ``params``, ``proposer``, ``state``, ``rules``, ``requested``,
        ``expires`` (wall clock), and once decided ``decision`` (approve|deny), ``who``,
        ``reason``, ``via``, ``decided``."""
        sql = f"SELECT {_COLUMNS} FROM approvals a JOIN experiments e ON e.id = a.experiment_id"
        where, args = [], []
        if campaign_id is not None:
            where.append("a.campaign_id = ?")
            args.append(campaign_id)
        if awaiting:
            where.append("e.state = ?")
            args.append(AWAITING)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db().execute(sql + " ORDER BY a.requested, e.seq", args).fetchall()
        return [_row(r) for r in rows]

    def approval(self, experiment_id: str) -> dict[str, Any] | None:
        """One experiment's approval (as :meth:`approvals` gives it), None if it never
        awaited one."""
        return self._approval_row(self._db(), experiment_id)

    def _approval_row(self, conn: sqlite3.Connection, experiment_id: str) -> dict[str, Any] | None:
        r = conn.execute(
            f"SELECT {_COLUMNS} FROM approvals a JOIN experiments e ON e.id = a.experiment_id "
            "WHERE a.experiment_id = ?",
            (experiment_id,),
        ).fetchone()
        return None if r is None else _row(r)

    def _require_approved(self, conn: sqlite3.Connection, experiment_id: str) -> None:
        """Inside a transition out of ``awaiting-approval`` to ``checked``: a human approved."""
        row = self._approval_row(conn, experiment_id)
        if row is None or row["decision"] != "approve":
            raise IllegalTransition(
                experiment_id, AWAITING, "checked", "nobody approved it (decide() first)"
            )
