"""The lab service's approvals: agents' proposals awaiting a human, and the decisions.

:class:`ServiceApprovals` is inherited by :class:`~bridge.service.LabService`: the proposals
awaiting approval in the lab's journal (``loops/campaignapproval.py``) and a decision on one,
with the approver's authenticated identity (the MQTT API passes the broker user) and
reason, journaled and applied by the campaign's runner.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.servicetypes import CampaignHandle, ServiceError
from loops.journal import JournalError

log = logging.getLogger(__name__)

__all__ = ["ServiceApprovals"]


class ServiceApprovals:
    """:meth:`approvals` and :meth:`decide` of :class:`~bridge.service.LabService`.

    The attributes below are set by :class:`~bridge.service.LabService` (``_journal_call``:
    :class:`~bridge.servicequeries.ServiceQueries`', which it inherits too).
    """

    _campaigns: dict[str, CampaignHandle]
    _require_open: Callable[[], None]
    _journal_call: Callable[..., Awaitable[Any]]

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
