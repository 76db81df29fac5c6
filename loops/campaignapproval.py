"""Agents' proposals that wait for a human: :class:`CampaignApproval`.

After the constraints and the dry run passed, an agent's proposal that the campaign's or
its agent's approval policy (:mod:`loops.approval`) sends to a human is journaled
``awaiting-approval`` with the rules that asked and its expiry (wall clock: a human's
time, not the campaign's simulated clock), and the optimizer holds it as a pending point,
so it keeps the stations busy with other points meanwhile. A decision is recorded in the
journal (:meth:`Journal.decide <loops.journal.Journal.decide>`: by :meth:`decide` here, or
by another process on the journal file, e.g. ``labbridge approve``) and applied here:

* approved -> ``checked`` (the journal names the approver and why) and queued like an
  accepted agent proposal (the station dry-runs it again before it runs);
* denied -> ``rejected`` ("denied by <who>: <why>"), the pending point dropped without
  telling the optimizer it was infeasible (a human's no says nothing about the point);
* nobody decided in time -> ``rejected`` ("approval expired after ..."), likewise.

At most ``max_awaiting`` proposals (program.md's ``approval``) wait at once; more are
refused with that reason. Decisions are picked up every ``approval_poll_s`` while any
proposal waits. When the campaign ends by its own rules the ones still waiting are
cancelled; stopped or aborted (to be resumed) they keep waiting, and a resume re-adds
them as pending points and expires those whose time ran out meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from loops.approval import DEFAULT_MAX_AWAITING, ApprovalNeeded, approval_needed
from loops.campaignbook import Awaiting, Item
from loops.campaignrecord import CampaignRecorder
from loops.journal import AWAITING, Journal, JournalError

log = logging.getLogger(__name__)

__all__ = ["CampaignApproval"]


def _duration(seconds: float) -> str:
    seconds = round(seconds, 2)  # wall-clock stamps: 0.999 s of a 1 s expiry is 1 s
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


class CampaignApproval(CampaignRecorder):
    """Proposals awaiting a human, their decisions and expiry (module docstring)."""

    def awaiting(self) -> list[dict[str, Any]]:
        """The proposals awaiting approval now, oldest first (plain data)."""
        return [a.as_dict() for a in self._awaiting.values()]

    def _needs_approval(self, item: Item) -> ApprovalNeeded | None:
        agent = item.proposer.removeprefix("agent:")
        return approval_needed(
            [self.program.approval, self._agent_approvals.get(agent)],
            item.params,
            self.program.fixed,
            item.proposer,
        )

    async def _await_approval(
        self, item: Item, need: ApprovalNeeded
    ) -> tuple[list[str], dict[str, Any] | None]:
        """Journal ``item`` awaiting approval (caller holds the lock); returns the reasons it
        was refused instead (too many waiting), or what it waits for."""
        policy = self.program.approval
        limit = policy.max_awaiting if policy is not None else DEFAULT_MAX_AWAITING
        if len(self._awaiting) >= limit:
            reason = (
                f"{len(self._awaiting)} proposals of campaign {self.campaign_id} await approval "
                f"already (at most {limit}): wait until an operator decides them "
                "(labbridge approvals), then propose again"
            )
            await self._reject(item, [reason], tell=False)
            return [reason], None
        if item.pid is None:  # (a proposal a resume re-queued is pending already)
            try:
                item.pid = self.optimizer.add_pending(item.params).id
                self._pending[item.experiment_id] = item.pid
            except ValueError:  # validated already by program.feasible; defensive
                item.pid = None
        now = time.time()
        expires = now + need.expires_s
        await self.journal.call(
            Journal.await_approval,
            item.experiment_id,
            list(need.rules),
            expires,
            optimizer_state=self._state(),
            epoch=self._epoch,
        )
        waiting = self._awaiting[item.experiment_id] = Awaiting(item, need.rules, expires, now)
        info = {"rules": list(need.rules), "expires_t": expires, "expires_in_s": need.expires_s}
        self._emit("awaiting_approval", **waiting.as_dict(), expires_in_s=need.expires_s)
        log.info(
            "campaign %s: %s by %s awaits approval: %s",
            self.campaign_id,
            item.experiment_id,
            item.proposer,
            "; ".join(need.rules),
        )
        return [], info

    # -------------------------------------------------------------- decisions
    async def decide(
        self, experiment_id: str, approve: bool, who: str, reason: str, *, via: str = "api"
    ) -> dict[str, Any]:
        """A human's decision on a proposal of this campaign awaiting approval: journaled
        (who, why, ``via``), then applied at once. Returns the approval with the
        experiment's ``state`` after it. Raises :class:`~loops.journal.ApprovalError`
        (one line) if it is not awaiting approval or ``who`` proposed it."""
        try:
            await self.journal.call(
                Journal.decide,
                experiment_id,
                approve,
                who,
                reason,
                via=via,
                campaign_id=self.campaign_id,
            )
        except Exception as exc:  # through a Ray actor, the journal's error is its cause
            inner = getattr(exc, "cause", None)
            if isinstance(inner, JournalError):
                raise inner from None
            raise
        await self._settle_approvals()
        row: dict[str, Any] | None = await self.journal.call(Journal.approval, experiment_id)
        assert row is not None  # decide() found it
        return row

    async def _settle_approvals(self) -> None:
        """Apply the decisions the journal holds and expire what nobody decided in time."""
        if not self._awaiting:
            return
        rows = await self.journal.call(Journal.approvals, self.campaign_id)
        found = {r["experiment_id"]: r for r in rows}
        async with self._lock:
            now = time.time()
            for eid, waiting in list(self._awaiting.items()):
                row = found.get(eid)
                if row is None:  # not awaiting in the journal any more: nothing to apply
                    self._awaiting.pop(eid, None)
                elif row["decision"] is not None:
                    await self._apply_decision(waiting, row)
                elif now >= waiting.expires:
                    await self._expire(waiting)

    async def _apply_decision(self, waiting: Awaiting, row: dict[str, Any]) -> None:
        item, who, why = waiting.item, str(row["who"]), str(row["reason"])
        self._awaiting.pop(item.experiment_id, None)
        decision = {"who": who, "reason": why, "via": row.get("via")}
        if row["decision"] == "approve":
            await self.journal.call(
                Journal.transition,
                item.experiment_id,
                "checked",
                reason=f"approved by {who}: {why}",
                data={"approved_by": who, "reason": why, "via": row.get("via")},
                optimizer_state=self._state(),
                epoch=self._epoch,
            )
            item.checked = item.approved = True
            self._queue.append(item)
            self._approval_event(item, "approved", **decision)
            return
        self._approval_event(item, "denied", **decision)
        await self._reject(item, [f"denied by {who}: {why}"], tell=False)

    async def _expire(self, waiting: Awaiting) -> None:
        item = waiting.item
        self._awaiting.pop(item.experiment_id, None)
        reason = (
            f"approval expired after {_duration(waiting.expires - waiting.requested)} with no "
            f"decision (asked by {'; '.join(waiting.rules)})"
        )
        self._approval_event(item, "expired", reason=reason)
        await self._reject(item, [reason], tell=False)

    def _approval_event(self, item: Item, decision: str, **data: Any) -> None:
        self._emit(
            "approval",
            experiment_id=item.experiment_id,
            proposer=item.proposer,
            params=dict(item.params),
            decision=decision,
            **data,
        )

    async def _approval_loop(self) -> None:
        """While the campaign runs: pick up decisions and expiries (every ``approval_poll_s``
        while a proposal waits, at its expiry if sooner)."""
        while True:
            delay = self._approval_poll_s
            if self._awaiting:
                nearest = min(a.expires for a in self._awaiting.values())
                delay = max(0.0, min(delay, nearest - time.time()))
            await asyncio.sleep(delay)
            try:
                await self._settle_approvals()
            except Exception:  # the journal refused (an owner took over?): said, tried again
                log.exception("campaign %s: approvals not settled", self.campaign_id)

    async def _close_awaiting(self, reason: str) -> None:
        """The campaign ended by its own rules: what still waits is cancelled (caller holds
        the lock)."""
        for eid, waiting in list(self._awaiting.items()):
            self._awaiting.pop(eid, None)
            self._forget(waiting.item)
            why = f"campaign ended before a decision ({reason})"
            await self.journal.call(
                Journal.transition,
                eid,
                "cancelled",
                reason=why,
                optimizer_state=self._state(),
                epoch=self._epoch,
            )
            self._counts.cancelled += 1
            self._approval_event(waiting.item, "cancelled", reason=why)
            self._resolve(eid, {"event": "cancelled", "experiment_id": eid, "reason": why})

    async def _restore_awaiting(self, items: list[Item]) -> set[str]:
        """Resume: the proposals found awaiting approval wait again, as pending points;
        returns their optimizer ids. The re-queued ones a human approved before are marked
        so (the others meet the policy again when claimed: one journaled just before a
        crash never asked it). Decisions made and expiries passed while the campaign was
        down are applied by :meth:`_settle_approvals`."""
        if not items and not any(i.proposer.startswith("agent:") for i in self._queue):
            return set()
        rows = await self.journal.call(Journal.approvals, self.campaign_id, awaiting=False)
        found = {r["experiment_id"]: r for r in rows}
        for queued in self._queue:
            row = found.get(queued.experiment_id)
            queued.approved = row is not None and row["decision"] == "approve"
        live: set[str] = set()
        for item in items:
            row = found.get(item.experiment_id)
            if row is None or row["state"] != AWAITING:  # pragma: no cover - journal invariant
                continue
            if item.pid is None:
                try:
                    item.pid = self.optimizer.add_pending(item.params).id
                except ValueError:
                    item.pid = None
            if item.pid is not None:
                self._pending[item.experiment_id] = item.pid
                live.add(item.pid)
            self._awaiting[item.experiment_id] = Awaiting(
                item, tuple(row["rules"]), float(row["expires"]), float(row["requested"])
            )
        return live
