"""The station actor's state and the opening and closing of its bench: :class:`StationCore`.

The base of :class:`~loops.stationactor.StationActor`: its constructor, its clock, and
the one place the bench is opened and closed. Opening takes the bench's lock
(:mod:`loops.benchlock`: one process drives a bench; an older actor still holding it
is waited for), opens the instruments behind the guard and loads the station's budget
consumption from the journal (:mod:`loops.stationledger`); closing safe-states and
releases them and lets the bench go. A station closed because its lease was lost
(:meth:`StationCore._close` with ``lost=``) is opened again, latched, when a new owner
or an operator takes it (:meth:`StationCore._reopen_after_loss`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from loops.benchlock import WAIT_S, BenchLock
from loops.journal import Journal, JournalLink
from loops.stationclock import ClockSpec, ScaledClock
from loops.stationerrors import StationError, StationNotOpen, cause_text, portable_error
from loops.stationlease import Lease
from loops.stationledger import restore_consumption, save_consumption, unsaved_consumption
from safety import DryRunReport, SafeStation, load_envelope, open_station

log = logging.getLogger(__name__)

__all__ = ["StationCore"]


class StationCore:
    """A station actor's state, clock and bench (module docstring); the constructor's
    arguments are :class:`~loops.stationactor.StationActor`'s."""

    def __init__(
        self,
        name: str,
        specs: Sequence[Mapping[str, Any]],
        envelope: str | Mapping[str, Any],
        *,
        clock: ClockSpec | None = None,
        supervisor_options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        journal: JournalLink | None = None,
        verification: Mapping[str, Any] | None = None,
        setup: Mapping[str, Any] | None = None,
        bench_wait_s: float = WAIT_S,
    ) -> None:
        self.name = name
        self._specs = [dict(s) for s in specs]
        self._envelope_spec = envelope
        self._clock_spec = clock
        self._clock = ScaledClock(clock) if clock is not None else None
        self._supervisor_options = dict(supervisor_options or {})
        self._env = {str(k): str(v) for k, v in (env or {}).items()}
        self._journal = journal
        self._stack: contextlib.AsyncExitStack | None = None
        self._station: SafeStation | None = None
        self._run_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._current: str | None = None
        #: the dry run of the experiment under way (what it is predicted to leave)
        self._under_way: DryRunReport | None = None
        self._runs = 0
        self._verify = bool(dict(verification or {}).get("enabled", False))
        self._setup: dict[str, Any] = dict(setup or {})
        self._lease = Lease(name)
        self._lease_watch: asyncio.Task[None] | None = None
        self._bench = BenchLock(name, self._specs)
        self._bench_wait_s = float(bench_wait_s)
        self._lost: str | None = None  # closed because its lease was lost (why)
        self._last_trip: dict[str, Any] | None = None  # the trip it was closed with
        self._reserved = False  # a step's reservation is open in the journal
        #: the running experiment's owner epoch (moved by a take-over: StationActor.take_over)
        self._run_epoch: int | None = None
        self._epoch_moved = asyncio.Event()  # set when a take-over moves it
        self._run_done: asyncio.Future[dict[str, Any] | None] | None = None  # its outcome
        self._last_run: tuple[str, dict[str, Any] | None] | None = None  # the last that ended

    # clock -----------------------------------------------------------------
    def _now(self) -> float:
        return self._clock.now() if self._clock is not None else time.monotonic()

    async def _sleep(self, seconds: float) -> None:
        if self._clock is not None:
            await self._clock.sleep(seconds)
        else:
            await asyncio.sleep(max(0.0, seconds))

    @property
    def _speed(self) -> float:
        return self._clock.speed if self._clock is not None else 1.0

    def _require(self) -> SafeStation:
        if self._station is None:
            if self._lost is not None:
                raise StationNotOpen(
                    f"station {self.name} closed itself: {self._lost}; a new owner (or a reset) "
                    "opens it again"
                )
            raise StationNotOpen(f"station {self.name} is not open: call start() first")
        return self._station

    async def _save_ledger(self, station: SafeStation) -> None:
        """The budget consumption since the last save, to the journal, settling an open step
        reservation (logged if refused)."""
        if self._journal is None:
            return
        try:
            if self._reserved:  # what the step consumed is known now, even if nothing
                rows = unsaved_consumption(station.guard.envelope.ledger, self._now, self._speed)
                await self._journal.call(Journal.record_consumption, self.name, rows)
                self._reserved = False
            else:
                await save_consumption(
                    station.guard.envelope.ledger, self._journal, self.name, self._now, self._speed
                )
        except Exception as exc:
            log.error("station %s: budget consumption not journaled: %s", self.name, exc)

    async def status(self) -> dict[str, Any]:
        """Plain data: ``open``, ``busy``, ``experiment`` (running now), ``runs``, ``lease``,
        plus the supervisor's status (``latched``, ``trip``, ``monitors``, ...) while open.
        A station that closed itself when its lease was lost says so (``closed``: why) and
        keeps ``tripped`` and the ``trip`` it closed with."""
        out: dict[str, Any] = {
            "station": self.name,
            "open": self._station is not None,
            "busy": self._run_lock.locked(),
            "experiment": self._current,
            "runs": self._runs,
            "clock": None if self._clock is None else self._now(),
            "lease": self._lease.as_dict(),
        }
        if self._station is not None:
            out.update(self._station.status())
            out["instruments"] = dict(self._station.instruments)
            out["tripped"] = self._station.tripped
        elif self._lost is not None:
            out.update(closed=self._lost, tripped=True, latched=True, trip=self._last_trip)
        return out

    async def readings(self) -> dict[str, Any]:
        """Plain data, no I/O: the latest measured values (``instrument.channel`` -> value
        and its age in s, as the supervisor last polled them) and the commanded targets."""
        station = self._require()
        state, now = station.guard.state, time.monotonic()
        measured = dict(state.measured)  # one copy: the supervisor keeps updating it
        return {
            "station": self.name,
            "measured": {n: {"value": v, "age_s": now - t} for n, (v, t) in measured.items()},
            "commanded": dict(state.commanded),
            "tripped": station.tripped,
        }

    # the bench ---------------------------------------------------------------
    async def _open(self) -> SafeStation:
        """Take the bench (waiting for an older holder), open every instrument behind the
        guard and restore the budget consumption; the caller holds the open lock."""
        await self._bench.acquire(self._bench_wait_s)
        try:
            os.environ.update(self._env)  # before any transport reads it (bleak: D-Bus address)
            envelope = load_envelope(self._envelope_spec, source=f"station {self.name} envelope")
            options: dict[str, Any] = {"supervisor_options": self._supervisor_options}
            if self._clock is not None:
                options["clock"] = self._clock.now
            stack = contextlib.AsyncExitStack()
            try:
                station = await stack.enter_async_context(
                    open_station(self.name, self._specs, envelope, **options)
                )
            except BaseException as exc:
                await stack.aclose()
                portable = portable_error(exc, StationError) if isinstance(exc, Exception) else exc
                if portable is exc:
                    raise
                raise portable from None
            if self._journal is not None:  # budgets carry across restarts
                try:
                    await restore_consumption(
                        station.guard.envelope.ledger,
                        self._journal,
                        self.name,
                        self._now(),
                        self._speed,
                    )
                except BaseException as exc:
                    await stack.aclose()
                    raise StationError(
                        f"station {self.name}: cannot read its budget consumption from the "
                        f"journal ({cause_text(exc)}); not opening without its budgets"
                    ) from None
        except BaseException:
            self._bench.release()
            raise
        self._stack, self._station, self._lost = stack, station, None
        self._bench.note(lease=self._lease.as_dict())
        log.info("station %s open: %s", self.name, ", ".join(station.instruments))
        return station

    async def _close(self, *, lost: str | None = None) -> None:
        """Close the station (supervisor stopped, every instrument safe-stated, links closed)
        and let the bench go. ``lost``: why (its lease was lost): it opens again, latched,
        for a new owner or a reset (:meth:`_reopen_after_loss`)."""
        async with self._open_lock:
            stack, station = self._stack, self._station
            self._stack, self._station = None, None
            if station is not None and lost is not None:
                record = station.latch.trip_record
                self._last_trip = (
                    None if record is None else {"reason": record.reason, "source": record.source}
                )
                self._lost = lost
            try:
                if stack is not None:
                    await stack.aclose()
            finally:
                self._bench.release()

    async def _reopen_after_loss(self, who: str | None = None) -> None:
        """A station that closed itself after losing its lease: open it again, latched with
        the reason (an operator's reset or a resume's recovery unlatches it)."""
        async with self._open_lock:
            why = self._lost
            if self._station is not None or why is None:
                return
            station = await self._open()
        await station.trip(f"reopened after: {why}", "lease", who=who)
