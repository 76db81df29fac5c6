"""The campaign's ownership of its stations: epoch and leases (:class:`CampaignLease`).

Before anything acts, ``prepare`` takes the campaign's next owner epoch in the journal
(:meth:`Journal.take_ownership <loops.journal.Journal.take_ownership>`) and a lease on
every station with it (:meth:`StationActor.lease
<loops.stationactor.StationActor.lease>`). A station still leased by an older owner
(a run or resume still alive: stalled, stopped) is waited for until that lease is
released or runs out (the station trips then: the older owner's experiment stops
before this owner acts), up to :data:`HANDOVER_S`; an older owner that keeps renewing
is alive and keeps its stations (:class:`OwnerAlive` if it keeps them all). Every
journal write of the runner carries the epoch, so the older owner, if it wakes up,
can no longer write either. A keeper task renews the leases every
:data:`~loops.stationlease.RENEW_S` real seconds until the campaign ends, when they are
released. If this process dies, the leases run out and every station trips within
the bound of :mod:`loops.stationlease`. A station that refuses the renewal (a newer
owner fenced this one off, or the lease was lost) is taken out of the campaign; a
fenced owner stops the whole campaign.

The keeper ends when the campaign does, whatever its stations do: every call it makes is
bounded with ``asyncio.timeout`` (not ``asyncio.wait_for``: on Python 3.11 a ``wait_for``
whose call completes -- a dead station's release failing at once -- just as the keeper is
cancelled returns that call's outcome and swallows the cancellation; the keeper then
renewed for nobody and the campaign's end waited for it forever), it stops at a flag as
well as at the cancellation, and the end waits for it for a bounded time only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from instruments.deadline import bounded
from loops.campaignbook import CampaignBook, Slot
from loops.journal import Journal, StaleOwner
from loops.stationerrors import cause_text
from loops.stationlease import LEASE_S, POLL_S, RENEW_S, LeaseHeld
from loops.stations import StationActor, StationLink

log = logging.getLogger(__name__)

__all__ = ["HANDOVER_S", "CampaignLease", "OwnerAlive"]

#: how long a new owner waits for an older owner's lease on a station to end: a whole
#: lease after a last renewal, the trip, and a margin for a loaded machine (real seconds)
HANDOVER_S = 2 * LEASE_S + 2 * POLL_S + 2.0
#: how long the campaign's end waits for the keeper to stop, and for its stations to take
#: the release of their leases (real seconds); a station that does not answer by then has
#: its lease run out instead (it trips: the bound of loops.stationlease)
RELEASE_S = 2 * RENEW_S


class OwnerAlive(RuntimeError):
    """Every station of the campaign is still leased by an older owner that keeps renewing
    its leases: that process is alive (stop it before taking over)."""


class CampaignLease(CampaignBook):
    """Taking, keeping and releasing the stations' leases (module docstring)."""

    _keeper: asyncio.Task[None] | None = None
    _released: set[str]
    #: set by whoever holds the campaign's lock file (:func:`~loops.campaignlock.campaign_lock`)
    #: around :meth:`prepare`: the kernel frees it only when its holder is dead, so the
    #: campaign's older owner is dead, and a station it still leases is taken over live
    #: (:meth:`_take_over`) instead of waited for until its lease runs out and it trips
    holds_campaign_lock: bool = False
    #: station -> what :meth:`StationActor.take_over` returned (the lease moved to this owner
    #: live; ``running``/``last_run``: the experiments the station knows), set by prepare
    taken_over: dict[str, dict[str, Any]]
    _workers: list[asyncio.Task[None]]  # one per station that claims work (CampaignRunner.run)

    _start_worker: Callable[[Slot], None]  # CampaignRunner's: a worker for the slot

    def out_stations(self) -> dict[str, StationLink]:
        """The stations out of the campaign now (died, tripped, refused...) and their links."""
        return {n: s.actor for n, s in self._slots.items() if s.state == "out"}

    async def rejoin(self, name: str, link: StationLink, why: str) -> None:
        """Station ``name``, out of the running campaign (its actor died with its node, say),
        takes work again on ``link``: a new actor, already brought to a safe, reset, drained
        state (:meth:`StationActor.recover <loops.stationrecover.StationRecovery.recover>`,
        by an operator). Leased with this owner's epoch (raises what the lease raises and
        the station stays out), journaled as a station event with ``why``, then it claims
        proposals like the others. Raises ``ValueError`` for a station that is not out, or
        a campaign that is not running or is stopping (it would never claim)."""
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"campaign {self.campaign_id} has no station {name}")
        if self._phase != "running" or self._stop_request is not None:
            raise ValueError(f"campaign {self.campaign_id} is not running: {name} cannot rejoin")
        if slot.state != "out":
            raise ValueError(f"station {name} is {slot.state} in campaign {self.campaign_id}")
        epoch = self._epoch
        assert epoch is not None
        await bounded(
            link.call(StationActor.lease, self._owner_name(), epoch, self._lease_s), 2 * RENEW_S
        )
        if self._phase != "running" or self._stop_request is not None:  # ended meanwhile
            with contextlib.suppress(Exception):
                await bounded(link.call(StationActor.release, epoch), RELEASE_S)
            raise ValueError(f"campaign {self.campaign_id} ended: {name} did not rejoin")
        slot.actor, slot.state, slot.reason, slot.disagreements = link, "idle", None, 0
        slot.rejoined = why  # in the campaign's progress (its status), as the event says
        self._released.discard(name)
        self._start_worker(slot)  # no await since the check: run() is still waiting for workers
        log.warning("campaign %s: station %s rejoined: %s", self.campaign_id, name, why)
        self._emit("station", station=name, state="rejoined", reason=why)
        # journaled as a station going out is: awaited before the campaign's end
        self._notes.append(
            self.journal.call(
                Journal.station_event, self.campaign_id, name, "rejoined", why, epoch=epoch
            )
        )

    @property
    def epoch(self) -> int | None:
        """This owner's epoch (None before :meth:`prepare`)."""
        return self._epoch

    def _owner_name(self) -> str:
        return f"campaign {self.campaign_id} (pid {os.getpid()} on {socket.gethostname()})"

    async def _take_leases(self) -> None:
        """Become the campaign's owner (next epoch) and lease every station; start the keeper.

        With :attr:`holds_campaign_lock`, a station whose lease of the older owner's epoch is
        still live is taken over (:meth:`_take_over`): its running experiment carries on."""
        owner = self._owner_name()
        old: int | None = None
        if self.holds_campaign_lock:  # the epoch the dead owner's stations are leased with
            with contextlib.suppress(Exception):  # a new campaign: none
                current = await self.journal.call(Journal.owner, self.campaign_id)
                old = int(str(current["epoch"]))
        self._epoch = await self.journal.call(Journal.take_ownership, self.campaign_id, owner)
        self._released = set()
        self.taken_over = {}
        if old is not None and old >= 1:  # its writes are fenced off now: take its leases
            await self._take_over(old)
        await self._hand_over()
        self._keeper = asyncio.create_task(self._keep(), name=f"campaign-{self.campaign_id}-leases")

    async def _take_over(self, old: int) -> None:
        """Move each station's live lease of epoch ``old`` (this campaign's dead owner: see
        :attr:`holds_campaign_lock`) to this owner's epoch (:meth:`StationActor.take_over`);
        a station whose lease is not live, or another's, is leased as usual
        (:meth:`_hand_over`)."""
        epoch, owner = self._epoch, self._owner_name()
        assert epoch is not None
        live = [s for s in self._slots.values() if s.state != "out"]
        done = await asyncio.gather(
            *(
                bounded(
                    s.actor.call(StationActor.take_over, owner, old, epoch, self._lease_s),
                    2 * RENEW_S,
                )
                for s in live
            ),
            return_exceptions=True,
        )
        for slot, outcome in zip(live, done, strict=True):
            if isinstance(outcome, BaseException):
                log.info(
                    "campaign %s: %s not taken over: %s",
                    self.campaign_id,
                    slot.name,
                    cause_text(outcome),
                )
                continue
            self.taken_over[slot.name] = dict(outcome)
            log.warning(
                "campaign %s: station %s taken over from epoch %d (its lease was live)%s",
                self.campaign_id,
                slot.name,
                old,
                f"; experiment {outcome['running']} still runs" if outcome.get("running") else "",
            )

    async def _hand_over(self) -> None:
        """The first lease on every station: one still leased by an older owner is asked again
        until that lease has ended (:class:`LeaseHeld`), up to :data:`HANDOVER_S` (a whole lease
        of this campaign's length more, when it is longer than the default)."""
        epoch = self._epoch
        assert epoch is not None
        owner = self._owner_name()
        deadline = time.monotonic() + HANDOVER_S + 2 * max(0.0, self._lease_s - LEASE_S)
        waiting = [
            s for s in self._slots.values() if s.state != "out" and s.name not in self.taken_over
        ]
        seen: set[str] = set()
        alive: list[str] = []  # still held when the wait ran out: their owners renew them
        while waiting:
            done = await asyncio.gather(
                *(s.actor.call(StationActor.lease, owner, epoch, self._lease_s) for s in waiting),
                return_exceptions=True,
            )
            still: list[Slot] = []
            for slot, outcome in zip(waiting, done, strict=True):
                if isinstance(outcome, LeaseHeld) and time.monotonic() < deadline:
                    if slot.name not in seen:
                        seen.add(slot.name)
                        why = cause_text(outcome).split(": ", 1)[-1]
                        log.warning("campaign %s: waiting: %s", self.campaign_id, why)
                    still.append(slot)
                elif isinstance(outcome, BaseException):
                    if isinstance(outcome, LeaseHeld):
                        alive.append(cause_text(outcome))
                    self._lease_refused(slot, outcome)
            waiting = still
            if waiting:
                await asyncio.sleep(2 * POLL_S)
        if alive and all(s.state == "out" for s in self._slots.values()):
            raise OwnerAlive(
                f"campaign {self.campaign_id}: an older owner still renews its leases after "
                f"{HANDOVER_S:g} s ({'; '.join(alive)}): it is alive; stop it first"
            )

    async def _renew(self) -> None:
        epoch = self._epoch
        assert epoch is not None
        owner = self._owner_name()
        live = [s for s in self._slots.values() if s.state != "out"]
        for slot in self._slots.values():  # a station out of the campaign: its lease ends now
            if slot.state == "out" and slot.name not in self._released:
                self._released.add(slot.name)
                with contextlib.suppress(Exception):  # died, refused, slow: it runs out instead
                    await bounded(slot.actor.call(StationActor.release, epoch), RENEW_S)
        calls = [slot.actor.call(StationActor.lease, owner, epoch, self._lease_s) for slot in live]
        done = await asyncio.gather(
            *(bounded(c, 2 * RENEW_S) for c in calls), return_exceptions=True
        )
        for slot, outcome in zip(live, done, strict=True):
            if isinstance(outcome, TimeoutError):
                continue  # slow, not refused: the next renewal tries again
            if isinstance(outcome, BaseException):
                self._lease_refused(slot, outcome)

    def _lease_refused(self, slot: Slot, exc: BaseException) -> None:
        why = cause_text(exc)
        if slot.state != "out":
            self._out(slot, f"lease refused: {why}")
        if isinstance(exc, StaleOwner):  # a newer owner runs this campaign: stop acting
            reason = f"fenced off by a newer owner of campaign {self.campaign_id}: {why}"
            self._stop_request = self._stop_request or reason  # CampaignRunner.stop()
            self._running.set()

    async def _keep(self) -> None:
        last = time.monotonic()
        while self._keeper is not None:  # None once the campaign ended (_release_leases)
            await asyncio.sleep(RENEW_S)
            if self._keeper is None:
                return
            gap = time.monotonic() - last
            if gap > self._lease_s / 2:  # this process stalls: its stations may trip
                log.warning(
                    "campaign %s: lease renewal %.1f s after the last (leases last %g s)",
                    self.campaign_id,
                    gap,
                    self._lease_s,
                )
            await self._renew()
            last = time.monotonic()

    async def _release_leases(self) -> None:
        """Stop renewing and release every station's lease (the campaign ended)."""
        keeper, self._keeper = self._keeper, None  # the keeper stops at this too
        if keeper is not None:
            keeper.cancel()
            done, _ = await asyncio.wait({keeper}, timeout=RELEASE_S)
            if not done:  # it swallowed the cancellation: it stops at its next tick (flag)
                log.error(
                    "campaign %s: the lease keeper did not stop within %g s (still %s)",
                    self.campaign_id,
                    RELEASE_S,
                    keeper,
                )
            elif not keeper.cancelled() and (failure := keeper.exception()) is not None:
                log.error(
                    "campaign %s: the lease keeper failed: %s",
                    self.campaign_id,
                    cause_text(failure),
                )
        epoch = self._epoch
        if epoch is None:
            return
        await asyncio.gather(  # a dead station raises at once; a stalled one runs out instead
            *(
                bounded(s.actor.call(StationActor.release, epoch), RELEASE_S)
                for s in self._slots.values()
            ),
            return_exceptions=True,
        )
