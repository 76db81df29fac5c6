"""The lab service's side of agents' proposals: proposing through the proposer's quota,
the quota as it stands, the proposals awaiting a human and the decisions on them.

:class:`ServiceApprovals` is inherited by :class:`~bridge.service.LabService`: every
channel's proposals (MCP, MQTT, Python) pass the proposer's quota
(:class:`~bridge.quotas.QuotaGate`) into the campaign's runner; the proposals awaiting
approval in the lab's journal (``loops/campaignapproval.py``) and a decision on one, with
the approver's authenticated identity (the MQTT API passes the broker user) and reason,
journaled and applied by the campaign's runner.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from bridge.quotas import QuotaGate, QuotaUse
from bridge.servicetypes import CampaignHandle, ServiceError
from loops.campaign import ProposalReceipt
from loops.journal import JournalError

log = logging.getLogger(__name__)

__all__ = ["ServiceApprovals"]


class ServiceApprovals:
    """:meth:`propose`, the quota's :meth:`quota_refusal` and :meth:`quota_usage`,
    :meth:`approvals` and :meth:`decide` of :class:`~bridge.service.LabService`.

    The attributes below are set by :class:`~bridge.service.LabService` (``_journal_call``:
    :class:`~bridge.servicequeries.ServiceQueries`', which it inherits too).
    """

    _campaigns: dict[str, CampaignHandle]
    _require_open: Callable[[], None]
    _journal_call: Callable[..., Awaitable[Any]]
    quota_gate: QuotaGate
    campaign: Callable[[str], CampaignHandle]

    async def propose(
        self, campaign_id: str, params: Mapping[str, Any], proposer: str
    ) -> ProposalReceipt:
        """An agent's proposal into a running campaign (``proposer``: ``agent:<id>``).

        Every channel's proposals come here (MCP, MQTT, Python), and pass the proposer's
        quota first (:class:`~bridge.quotas.QuotaGate`, one proposal of a proposer at a
        time). Raises :class:`~bridge.servicetypes.UnknownCampaign`,
        :class:`~bridge.quotas.QuotaExceeded` (nothing journaled),
        :class:`~loops.campaign.CampaignClosed` (ended or stopping) or ValueError (a
        proposer that is not ``agent:<id>``/``operator:<who>``).
        """
        self._require_open()
        runner = self.campaign(campaign_id).runner
        async with self.quota_gate.admit(proposer, campaign_id, lambda: runner.queued_by(proposer)):
            return await runner.propose(params, proposer)

    async def quota_refusal(self, campaign_id: str, proposer: str) -> QuotaUse | None:
        """What of ``proposer``'s quota would refuse a proposal to the campaign now (None:
        nothing); the check :meth:`propose` makes, without proposing."""
        self._require_open()
        runner = self.campaign(campaign_id).runner
        return await self.quota_gate.refusal(
            proposer, campaign_id, lambda: runner.queued_by(proposer)
        )

    async def quota_usage(self, proposer: str) -> list[QuotaUse]:
        """``proposer``'s quota as it stands, counted from the journal (empty: no quota)."""
        self._require_open()
        return await self.quota_gate.usage(proposer)

    async def approvals(self, campaign_id: str | None = None) -> list[dict[str, Any]]:
        """Proposals awaiting a human's approval (of one campaign or every one in the lab's
        journal), oldest first: experiment, proposer, parameters, the rules that asked,
        ``expires`` (wall clock) and any decision not applied yet."""
        rows: list[dict[str, Any]] = await self._journal_call("approvals", campaign_id)
        return rows

    async def decide(
        self,
        campaign_id: str,
        experiment_id: str,
        approve: bool,
        who: str,
        reason: str,
        *,
        via: str = "api",
    ) -> dict[str, Any]:
        """Approve or deny a proposal of ``campaign_id`` awaiting approval, as ``who`` (an
        authenticated identity: the MQTT API passes the broker user) with ``reason``; both
        are journaled. A campaign running here applies it at once (approved: queued;
        denied: rejected); one that is not (stopped, or run by another process) when it
        runs. Raises :class:`ServiceError` (one line) when it cannot be decided: not
        awaiting approval (never, decided, expired), unknown, or proposed by ``who``."""
        self._require_open()
        handle = self._campaigns.get(campaign_id)
        try:
            if handle is not None and handle.active:
                row = await handle.runner.decide(experiment_id, approve, who, reason, via=via)
            else:
                row = await self._journal_call(
                    "decide", experiment_id, approve, who, reason, via=via, campaign_id=campaign_id
                )
        except Exception as exc:  # through a Ray actor, the journal's error is its cause
            inner = getattr(exc, "cause", None)
            if isinstance(inner, JournalError) or isinstance(exc, JournalError):
                raise ServiceError(str(inner if isinstance(inner, JournalError) else exc)) from None
            raise
        applied = row["state"] != "awaiting-approval"
        log.warning(
            "campaign %s: %s %s by %s: %s",
            campaign_id,
            experiment_id,
            "approved" if approve else "denied",
            who,
            row["reason"],
        )
        out = {
            "campaign_id": campaign_id,
            "experiment_id": experiment_id,
            "decision": "approve" if approve else "deny",
            "who": row["who"],
            "reason": row["reason"],
            "state": row["state"],
            "applied": applied,
        }
        if not applied:
            out["note"] = (
                f"campaign {campaign_id} is not running in this service: the decision is "
                "journaled and applies when it runs again (labbridge resume)"
            )
        return out
