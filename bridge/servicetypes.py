"""The lab service's plain types: its errors, the answer to a start, a campaign's handle.

:class:`~bridge.service.LabService` (whose module re-exports these names) uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from loops.campaign import CampaignRunner, CampaignSummary
from loops.program import Program


class ServiceError(ValueError):
    """A request the service refuses; the message says what was wrong."""


class UnknownCampaign(ServiceError, LookupError):
    """No campaign with that id in this service."""


class UnknownExperiment(ServiceError, LookupError):
    """No experiment with that id in the lab's journal."""


@dataclass(frozen=True)
class StartResult:
    """The answer to a start: accepted (started now, or already known) or refused with errors."""

    campaign_id: str
    accepted: bool
    duplicate: bool = False
    state: str | None = None
    stations: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "campaign_id": self.campaign_id,
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "state": self.state,
            "stations": list(self.stations),
        }
        if self.errors:
            out["errors"] = list(self.errors)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class CampaignHandle:
    """One campaign this service started: its runner, its task and where it stands."""

    campaign_id: str
    program: Program
    stations: tuple[str, ...]
    who: str
    runner: CampaignRunner
    started_t: float = field(default_factory=time.time)
    state: str = "starting"
    reason: str | None = None
    summary: CampaignSummary | None = None
    task: asyncio.Task[None] | None = None
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def active(self) -> bool:
        """Still running (its task has not finished)."""
        return self.task is not None and not self.task.done()

    def status(self) -> dict[str, Any]:
        """Plain data for the ``campaigns/<id>/status`` topic."""
        progress = self.runner.progress()
        state = self.state
        if state == "running" and progress.get("paused"):
            state = "paused"
        return {
            "campaign_id": self.campaign_id,
            "state": state,
            "reason": self.reason,
            "program": self.program.name,
            "stations": list(self.stations),
            "started_by": self.who,
            "started_t": self.started_t,
            "objective": {
                "measure": self.program.objective.measure,
                "direction": "minimize" if self.program.objective.minimize else "maximize",
                "target": self.program.stop.target,
            },
            "progress": progress,
            "approvals": self.runner.awaiting(),
            "summary": None if self.summary is None else self.summary.as_dict(),
            "t": time.time(),
        }


__all__ = [
    "CampaignHandle",
    "ServiceError",
    "StartResult",
    "UnknownCampaign",
    "UnknownExperiment",
]
