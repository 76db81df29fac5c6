"""Agents' quotas, enforced where every proposal enters the lab: the service's propose path.

:class:`QuotaGate` stands in front of :meth:`CampaignRunner.propose
<loops.campaign.CampaignRunner.propose>` for every channel (MCP agents by token, MQTT
users as ``agent:<user>``, the Python API). For a proposer with a quota
(:meth:`Quotas.for_proposer <bridge.quotaconfig.Quotas.for_proposer>`) it counts, from
the journal (:meth:`Journal.proposer_usage <loops.journal.Journal.proposer_usage>`:
durable across restarts, never from memory alone):

* ``queued_per_campaign``: its proposals waiting in the campaign: accepted and queued,
  or awaiting a human's approval (the runner's own books);
* ``proposals_per_hour``: its proposals journaled in the last hour;
* ``experiments_per_day``: its experiments that started running in the last 24 hours,
  plus those accepted (or awaiting approval) and not started yet;
* ``budgets``: per envelope budget, what the stations' budgets consumed while its
  experiments ran, in that budget's window (on the stations' clock: ``window / speed``
  of real time on a simulated bench).

A proposal over any of them is refused with :class:`QuotaExceeded` -- before it is
journaled, dry-run or queued, so nothing reaches a station -- one line naming the quota,
the count and when it frees up. A budget share is checked against what the agent's
experiments consumed so far: the experiment that crosses it still runs, and so do the
ones already accepted (at most ``queued_per_campaign`` per campaign).

Each proposer's proposals pass the gate one at a time (a lock per proposer, held through
the campaign's check of the proposal), so its count cannot race past a quota, and a flood
from one proposer puts at most one proposal at a time in front of the campaign's lock
(another agent's proposal and the optimizer's next claim wait behind one of its
proposals, not all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bridge.quotaconfig import Quota, Quotas
from bridge.servicetypes import ServiceError
from loops.stationledger import at_text

__all__ = ["QuotaExceeded", "QuotaGate", "QuotaUse"]

HOUR_S = 3600.0
DAY_S = 86400.0


@dataclass(frozen=True)
class QuotaUse:
    """One limit of a proposer's quota as it stands: ``used`` of ``limit`` (``unit``),
    ``ok`` when one more proposal is allowed, else ``frees_at`` (epoch seconds; None: not
    by waiting) and ``text``, the refusal."""

    quota: str
    limit: float
    used: float
    unit: str
    ok: bool
    frees_at: float | None = None
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "quota": self.quota,
            "limit": self.limit,
            "used": self.used,
            "unit": self.unit,
            "ok": self.ok,
            "frees_at": self.frees_at,
        }


class QuotaExceeded(ServiceError):
    """A proposal refused for its proposer's quota (nothing was journaled or dry-run)."""

    def __init__(self, use: QuotaUse) -> None:
        super().__init__(use.text)
        self.use = use

    def retry_after_s(self, now: float | None = None) -> float | None:
        if self.use.frees_at is None:
            return None
        return max(0.0, self.use.frees_at - (time.time() if now is None else now))


def _fmt(x: float) -> str:
    return f"{round(float(x), 6):g}"


def _frees(times: list[float], limit: float, window_s: float) -> float:
    """When a count of ``times`` (each leaving the window ``window_s`` after it) falls below
    ``limit``: the time the oldest surplus entry leaves."""
    ordered = sorted(times)
    return ordered[int(len(ordered) - limit)] + window_s


class QuotaGate:
    """The quota check of :meth:`LabService.propose <bridge.service.LabService.propose>`
    (module docstring). ``journal``: ``await journal(method, *args, **kwargs)`` on the lab's
    journal; ``speed``: the stations' clock's seconds per real second (a simulated lab's)."""

    def __init__(
        self,
        quotas: Quotas,
        journal: Callable[..., Awaitable[Any]],
        *,
        speed: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.quotas = quotas
        self._journal = journal
        self._speed = speed
        self._clock = clock
        self._turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def _turn(self, proposer: str) -> AsyncIterator[None]:
        """One proposal of ``proposer`` at a time (a lock per proposer, dropped when idle)."""
        lock, users = self._turns.setdefault(proposer, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                self._turns.pop(proposer, None)

    @contextlib.asynccontextmanager
    async def admit(
        self, proposer: str, campaign_id: str, queued: Callable[[], int]
    ) -> AsyncIterator[None]:
        """Hold ``proposer``'s turn while the block runs, once its quota allows one more
        proposal to ``campaign_id`` (``queued()``: its proposals waiting in the campaign's
        queue); raises :class:`QuotaExceeded` otherwise."""
        async with self._turn(proposer):
            refused = await self.refusal(proposer, campaign_id, queued)
            if refused is not None:
                raise QuotaExceeded(refused)
            yield

    async def refusal(
        self, proposer: str, campaign_id: str, queued: Callable[[], int]
    ) -> QuotaUse | None:
        """The first limit that refuses one more proposal of ``proposer`` to ``campaign_id``
        now, or None (no quota, or it allows one)."""
        quota = self.quotas.for_proposer(proposer)
        if quota is None:
            return None
        waiting = queued()
        if waiting >= quota.queued_per_campaign:
            return QuotaUse(
                "queued_per_campaign",
                quota.queued_per_campaign,
                waiting,
                "proposals",
                False,
                text=(
                    f"quota of {proposer}: queued_per_campaign {quota.queued_per_campaign} "
                    f"({quota.where}): {waiting} of its proposals wait in campaign "
                    f"{campaign_id} (queued, or awaiting approval); propose again once one of "
                    "them has started or was decided"
                ),
            )
        return next((u for u in await self.usage(proposer, quota) if not u.ok), None)

    async def usage(self, proposer: str, quota: Quota | None = None) -> list[QuotaUse]:
        """``proposer``'s counted limits as they stand (empty: no quota, or none counted)."""
        quota = quota if quota is not None else self.quotas.for_proposer(proposer)
        if quota is None:
            return []
        now = self._clock()
        shares = [
            (name, share, spec)
            for name, share in quota.budgets.items()
            for spec in self.quotas.budgets.get(name, ())
        ]
        if quota.proposals_per_hour is None and quota.experiments_per_day is None and not shares:
            return []
        got = await self._journal(
            "proposer_usage",
            proposer,
            proposals_since=None if quota.proposals_per_hour is None else now - HOUR_S,
            runs_since=None if quota.experiments_per_day is None else now - DAY_S,
            consumption=[
                (s.station, s.resource, now - s.window_s / self._speed) for _, _, s in shares
            ],
        )
        out: list[QuotaUse] = []
        who = f"quota of {proposer}"
        if quota.proposals_per_hour is not None:
            limit = quota.proposals_per_hour
            times = list(got["proposals"])
            ok = len(times) < limit
            frees = None if ok or limit == 0 else _frees(times, limit, HOUR_S)
            text = (
                f"{who}: proposals_per_hour {limit} ({quota.where}): {len(times)} proposals "
                f"journaled in the last hour; "
                + (f"the next is allowed {at_text(frees, now)}" if frees else "it allows none")
            )
            out.append(
                QuotaUse("proposals_per_hour", limit, len(times), "proposals", ok, frees, text)
            )
        if quota.experiments_per_day is not None:
            limit = quota.experiments_per_day
            ran, pending = list(got["runs"]), int(got["pending"])
            used = len(ran) + pending
            ok = used < limit
            frees = None
            if not ok and limit > 0:  # a waiting one runs now at the earliest
                frees = _frees(ran + [now] * pending, limit, DAY_S)
            text = (
                f"{who}: experiments_per_day {limit} ({quota.where}): {len(ran)} of its "
                f"experiments ran in the last 24 h and {pending} wait to run; "
                + (f"the next is allowed {at_text(frees, now)}" if frees else "it allows none")
            )
            out.append(QuotaUse("experiments_per_day", limit, used, "experiments", ok, frees, text))
        for name, share in quota.budgets.items():
            specs = self.quotas.budgets.get(name, ())
            rows = [
                (t + s.window_s / self._speed, amount)
                for s in specs
                for t, amount in got["consumption"].get((s.station, s.resource), [])
            ]
            used = sum(a for _, a in rows)
            unit = specs[0].unit if specs else ""
            ok = used < share - 1e-9
            frees = None
            if not ok and share > 0:  # the oldest consumption leaves the window first
                left = used
                for leaves, amount in sorted(rows):
                    left -= amount
                    if left < share - 1e-9:
                        frees = leaves
                        break
            per = specs[0].window if specs else "window"
            u = f" {unit}" if unit else ""
            text = (
                f"{who}: budgets.{name} {_fmt(share)}{u} ({quota.where}): its experiments "
                f"consumed {_fmt(used)}{u} of {name} in the last {per}; "
                + (f"more is allowed {at_text(frees, now)}" if frees else "it allows none")
            )
            out.append(QuotaUse(f"budgets.{name}", share, used, unit, ok, frees, text))
        return out
