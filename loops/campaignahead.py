"""A station's worker, one proposal ahead: :class:`CampaignAhead` (part of
:class:`~loops.campaign.CampaignRunner`).

Each station has a worker: it claims a checked proposal (:meth:`CampaignRunner._claim
<loops.campaign.CampaignRunner._claim>`: the optimizer's ask, the journal, the dry run on
that station) and runs it. While the station runs one experiment, the worker already
claims the next one for it (``claim_ahead``): the optimizer is asked with the running
experiment pending (every strategy knows pending points; the ask starts once the run is
sent, so its CPU does not delay the run's dispatch), the proposal is journaled and
dry-run on the station from the state its running recipe leaves
(:meth:`StationActor.dry_run <loops.stationrun.StationRuns.dry_run>`), so when the
experiment ends the next is ready and the bench does not wait for the ask, the journal
and the check. Nothing about safety changes: the station dry-runs the recipe again
before it runs it, on its state then, and refuses it if that changed.

A proposal claimed ahead that does not run (the campaign reached its target, was paused
or stopped, the station went out meanwhile) goes back to the head of the campaign's
queue, as :meth:`_unclaim` does with any claimed proposal: another station runs it, the
resume after a pause runs it, or the campaign's end closes it ``cancelled`` with the
reason. The budget counts it while it is claimed (never more proposals claimed than the
budget has experiments left).

The stack time (:mod:`loops.stacktime`) of a proposal claimed ahead is counted in its
own experiment's timer, not in the running one's, with its parts named ``ahead:<part>``
(they overlapped the previous experiment's run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from loops.campaignbook import CampaignBook, Item, Slot
from loops.stacktime import StackTimer, timing

__all__ = ["CampaignAhead"]


class CampaignAhead(CampaignBook):
    """The stations' workers (module docstring)."""

    #: claim a station's next proposal while it runs one (module docstring); off by
    #: default: a campaign that ends at its target then closes up to one proposal per
    #: station ``cancelled``, and an agent's proposal made while a station runs waits for
    #: the one claimed ahead (set it on the runner: ``run_campaign(on_runner=...)``)
    claim_ahead = False

    _claim: Callable[..., Coroutine[Any, Any, Item | None]]  # CampaignRunner's
    _execute: Callable[..., Awaitable[None]]  # CampaignRunner's (slot, item, on_sent=)
    _stop_reason: Callable[[], str | None]  # CampaignRunner's

    async def _worker(self, slot: Slot) -> None:
        ahead: asyncio.Task[Item | None] | None = None
        timer: StackTimer | None = None  # the timer of the proposal claimed ahead
        cancelled = False
        try:
            while slot.state != "out":
                await self._running.wait()
                with timing() as stack:  # this experiment's stack time, from its claim
                    claimed_ahead = ahead is not None
                    if ahead is not None:
                        item, ahead = await ahead, None
                        assert timer is not None
                        stack.merge(timer.as_dict(), "ahead:")  # overlapped with a run
                        timer = None
                        if item is not None and slot.state != "out":
                            slot.state, slot.experiment = "busy", item.experiment_id
                    else:
                        item = await self._claim(slot)
                    if item is None:
                        return
                    if (claimed_ahead and slot.state == "out") or (
                        not self._running.is_set() or self._stop_reason() is not None
                    ):  # paused, stopped (or out, ahead) while it was being claimed
                        await self._unclaim(slot, item)
                        continue

                    def claim_next() -> None:  # once the run is on its way to the station
                        nonlocal ahead, timer
                        ahead, timer = self._ahead(slot)

                    try:
                        await self._execute(
                            slot, item, on_sent=claim_next if self.claim_ahead else None
                        )
                    finally:
                        self._in_flight -= 1
                        if slot.state == "busy":
                            slot.state, slot.experiment = "idle", None
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if ahead is not None:  # claimed for a station that stopped claiming: unclaimed
                await self._drop_ahead(slot, ahead, cancel=cancelled)

    def _ahead(self, slot: Slot) -> tuple[asyncio.Task[Item | None], StackTimer]:
        """Claim ``slot``'s next proposal in a task of its own, timed in a timer of its own."""
        with timing() as timer:  # the task copies this context: the new timer is its own
            task: asyncio.Task[Item | None] = asyncio.create_task(
                self._claim(slot, ahead=True),
                name=f"campaign-{self.campaign_id}-{slot.name}-ahead",
            )
        return task, timer

    async def _drop_ahead(
        self, slot: Slot, ahead: asyncio.Task[Item | None], *, cancel: bool
    ) -> None:
        """The worker ends with a claim ahead: its proposal goes back to the queue once
        claimed (a worker that is cancelled cancels the claim, as it would its own)."""
        if cancel:
            ahead.cancel()
        (claimed,) = await asyncio.gather(ahead, return_exceptions=True)
        if isinstance(claimed, Item):
            await self._unclaim(slot, claimed)

    async def _unclaim(self, slot: Slot, item: Item) -> None:
        """Put a claimed, checked proposal back at the head of the queue, unrun: the campaign
        was paused (it runs after the resume) or told to stop (it is cancelled at the end)
        while the optimizer was asked or the proposal dry-run, or its station went out."""
        async with self._lock:
            self._queue.appendleft(item)
            self._in_flight -= 1
            if slot.state == "busy" and slot.experiment == item.experiment_id:
                slot.state, slot.experiment = "idle", None
