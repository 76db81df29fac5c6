"""The station actor: one :class:`StationActor` per physical bench owns its guarded instruments.

The one definition of a station's API (how the campaign reaches it, and why
only data crosses: :mod:`loops.stations`). It opens the bench behind the safety
layer, dry-runs and runs recipes (each step journaled before it acts), verifies
outcomes, runs set-up recipes, and trips, resets and recovers the station.

Nothing acts without a live owner: the campaign holds a lease on the actor
(:mod:`loops.stationlease`) checked before every step and while steps act or wait;
a lost lease trips the station and closes it (its instruments and its bench are let
go, :mod:`loops.benchlock`), and a new owner takes it only once an older owner's lease
is over. The envelope's budget consumption is kept in the journal
(:mod:`loops.stationledger`) and restored when the actor opens the bench.

Modules: :mod:`loops.stationcore` (state, clock, opening and closing the bench,
status), :mod:`loops.stationrun` (dry runs and experiments), :mod:`loops.stationrecover`
(set-up and recovery); this module: the life cycle, the lease, trips, resets and
budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from loops.stationlease import LEASE_S, POLL_S
from loops.stationledger import budget_status
from loops.stationrecover import RECOVERY_MARGIN_ML, StationRecovery
from loops.stationrun import TRIP_POLL_S

log = logging.getLogger(__name__)

__all__ = ["RECOVERY_MARGIN_ML", "TRIP_POLL_S", "StationActor"]


class StationActor(StationRecovery):
    """One bench's guarded station, owned by one Ray async actor (create with :func:`start_station_actor`).

    ``specs``: the station's instruments (``name``, ``kind``, ``url``,
    ``options``) as the lab config lists them; ``envelope``: the
    envelope's YAML text (or a mapping, or a path readable on the actor's
    machine); ``clock``: a simulated bench's clock (None: ``time.monotonic``
    and ``asyncio.sleep``); ``supervisor_options``: for the station's
    supervisor (``poll_interval``, ``device_time_scale``, ...); ``env``:
    environment variables set in the actor's process before the station opens
    (e.g. ``DBUS_SYSTEM_BUS_ADDRESS`` for a simulated BLE bus); ``journal``: a
    :class:`~loops.journal.JournalLink` (None: steps are not journaled);
    ``verification``: ``enabled``: after each successful run the recipe's declared
    checks run on its result (:func:`loops.checks.run_checks`); ``setup``: what the
    station's set-up recipes kept (``setup.<name>`` in the checks; :meth:`run_setup`
    adds to it); ``bench_wait_s``: how long :meth:`start` waits for another process
    to let the bench go (:data:`loops.benchlock.WAIT_S`).
    """

    # lifecycle -------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Open the station here (take the bench, connect every instrument behind the guard,
        restore the budgets); idempotent.

        Returns :meth:`status`. An error names the instrument's URL (from
        ``instruments.connect``; as :class:`StationError` when its own type cannot
        be pickled), or the process that holds the bench (:class:`~loops.benchlock.BenchBusy`),
        and leaves the station closed.
        """
        async with self._open_lock:
            if self._station is None:
                await self._open()
        return await self.status()

    async def stop(self) -> dict[str, Any]:
        """Close the station: supervisor stopped, every instrument safe-stated, links closed,
        the bench let go. Idempotent."""
        watch, self._lease_watch = self._lease_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self._close()
        self._lost = None
        return await self.status()

    # lease -----------------------------------------------------------------
    async def lease(self, owner: str, epoch: int, ttl_s: float = LEASE_S) -> dict[str, Any]:
        """Take or renew the owner's lease (:mod:`loops.stationlease`) for ``ttl_s`` real
        seconds; returns it as data. Raises :class:`~loops.journal.StaleOwner` for an older
        epoch than one seen, :class:`~loops.stationlease.OwnerLost` for a lost epoch,
        :class:`~loops.stationlease.LeaseHeld` while an older owner's lease is live. A
        station that closed itself when an older lease was lost opens again (latched); a new
        epoch's first lease returns once an older owner's run has ended."""
        new = epoch != self._lease.epoch
        out = self._lease.take(owner, epoch, ttl_s)
        if new:
            try:  # an older owner's run, stopped by the trip of its lost lease, ends first
                async with self._run_lock:
                    await self._reopen_after_loss(owner)
            except BaseException:
                self._lease.release(epoch)
                raise
            self._bench.note(lease=self._lease.as_dict())
        if self._lease_watch is None or self._lease_watch.done():
            self._lease_watch = asyncio.create_task(self._watch_lease(), name=f"lease-{self.name}")
        return out

    async def take_over(
        self, owner: str, old_epoch: int, epoch: int, ttl_s: float = LEASE_S
    ) -> dict[str, Any]:
        """A restarted owner of the same campaign moves the live lease of ``old_epoch`` to
        ``epoch`` (:meth:`Lease.take_over <loops.stationlease.Lease.take_over>`: it proved the
        old owner dead and fenced it off in the journal first); the experiment running under
        the old epoch carries on under the new one (its lease checks and journal writes use
        it from now on). Returns the lease as data plus ``running``: the experiment running
        now, and ``last_run``: the last one that ended (their outcomes:
        :meth:`wait_run`). Raises like :meth:`Lease.take_over`; nothing changes then."""
        out = self._lease.take_over(owner, old_epoch, epoch, ttl_s)
        if self._run_epoch == old_epoch:
            self._run_epoch = epoch
            self._epoch_moved.set()
        self._bench.note(lease=self._lease.as_dict())
        if self._lease_watch is None or self._lease_watch.done():
            self._lease_watch = asyncio.create_task(self._watch_lease(), name=f"lease-{self.name}")
        log.warning(
            "station %s: lease of epoch %d taken over by %s (epoch %d)%s",
            self.name,
            old_epoch,
            owner,
            epoch,
            f"; experiment {self._current} carries on" if self._current else "",
        )
        last = self._last_run[0] if self._last_run is not None else None
        return {**out, "running": self._current, "last_run": last}

    async def release(self, epoch: int) -> dict[str, Any]:
        """The owner at ``epoch`` is done with the station (its campaign ended)."""
        self._lease.release(epoch)
        self._bench.note(lease=self._lease.as_dict())
        return self._lease.as_dict()

    async def _watch_lease(self) -> None:
        """While a lease is held: when it runs out, trip the station (safe state, latched),
        the reason naming the lost owner (a running recipe stops at once:
        :func:`~loops.stationrun.until_tripped`), then close it: instruments and bench let
        go, nothing of the lost owner's can act again."""
        while True:
            await asyncio.sleep(POLL_S)
            if not self._lease.overdue():
                if self._lease.held:
                    continue
            else:  # after a stall of this process, a renewal may be queued: let it in first
                await asyncio.sleep(POLL_S)
                if self._lease.expire() is None:
                    continue
            station, why, epoch = self._station, self._lease.lost, self._lease.epoch
            if not self._lease.timed_out or station is None or why is None:
                if self._lease.held:
                    continue  # a new lease meanwhile: watch it
                return  # released by its owner, or nothing open to safe-state
            log.error("station %s: %s: tripping and closing", self.name, why)
            self._bench.note(lease=self._lease.as_dict())
            try:
                await station.trip(why, "lease", who=self._lease.owner)
            except Exception as exc:  # the supervisor logs each instrument's failure
                log.error("station %s: trip on lost lease failed: %s", self.name, exc)
            async with self._run_lock:  # the running recipe ends at the trip
                if self._lease.epoch == epoch:  # not taken by a newer owner meanwhile
                    try:
                        await self._close(lost=why)
                    except Exception as exc:
                        log.error("station %s: closing after a lost lease: %s", self.name, exc)
            if not self._lease.held:
                return

    async def placement(self) -> dict[str, Any]:
        """Where this actor runs: node id and IP, pid, and the Ray resources assigned to it."""
        import ray  # only a station running as a Ray actor has a placement

        ctx = ray.get_runtime_context()
        return {
            "station": self.name,
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "actor_id": ctx.get_actor_id(),
            "resources": dict(ctx.get_assigned_resources()),
        }

    # budgets ---------------------------------------------------------------
    async def budgets(self, asks: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Every safety budget of the envelope now (:func:`loops.stationledger.budget_status`):
        what its window used, whether one more experiment (or ``asks``: resource ->
        amount) fits, and when its window allows it (``frees_at_wall``, epoch seconds)."""
        station = self._require()
        return budget_status(
            station.guard.envelope, self._now(), asks=asks, speed=self._speed, wall=time.time()
        )

    # safety ----------------------------------------------------------------
    async def trip(self, reason: str, who: str | None = None) -> dict[str, Any]:
        """Latch the station and drive every instrument to its safe state; the TripReport as a dict."""
        report = await self._require().trip(reason, "api", who=who)
        return report.as_dict()

    async def reset(self, who: str, why: str) -> dict[str, Any]:
        """Unlatch once every monitor cleared (``who``/``why`` recorded); returns :meth:`status`.
        Raises :class:`safety.ResetRefused` naming the monitor that is still active. A
        station that closed itself when its lease was lost is opened again first."""
        await self._reopen_after_loss(who)
        await self._require().reset(who, why)
        return await self.status()
