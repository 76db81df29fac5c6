"""The station supervisor: polls the instruments, runs the monitors, trips and latches.

One :class:`StationSupervisor` per station. While running it

* polls every instrument's ``read()`` (one task per instrument, each read with
  ``read_timeout``; a failing read is logged and its channels simply age, which
  the :class:`~safety.monitors.Staleness` monitors catch) into
  ``state.measured``, and evaluates the monitors after every reading and every
  ``poll_interval``. A read the driver refuses because the device flags its
  value invalid (a probe out of the liquid, an overloaded scale: a
  :class:`~instruments.errors.DeviceError` with a ``reading``) still gives its
  flags: that partial reading is stored (the refused values ``None``), noted
  once in the log when it starts and when it ends, never as a failure;
* watches, besides the ``monitors`` it is given (the envelope's), every fault
  its drivers declare, as a monitor ``<instrument>.<fault>``
  (:mod:`safety.devicefaults`; ``fault_settings`` from the envelope switch
  one off or narrow it, with a reason);
* arms each device watchdog it finds (a driver with ``set_watchdog(s)``: the
  hotplate's holding register 4, which switches heater and stirrer off on the
  device itself when no register write arrives for that long, so the bench
  fails safe if labbridge dies) and feeds it every third of its timeout
  (:mod:`safety.devicewatchdog`: the timeout armed is ``device_watchdog_s``,
  raised on a fast simulated bench so that feeds are at least
  ``min_feed_interval_s`` real seconds apart);
* on a trip (a monitor that trips, :meth:`trip`, or anyone who trips the
  :class:`~safety.model.Latch`) latches and drives *every* instrument of the
  station to its safe state concurrently, each ``safe_state()`` bounded by
  ``safe_timeout`` so a hung or dead driver does not hold up the others;
  failures are logged and reported (:class:`TripReport`), never raised out of
  the loop. While latched the safe state is re-asserted every
  ``reassert_interval`` s (a trip is a level: a stuck relay gets told again).

Nothing resumes by itself: ``await reset(who, why)`` only unlatches, and only
when every monitor is cleared on freshly read values (hysteresis: the liquid
must be below 75 degC, not just below 80). Each trip's :class:`TripReport`
keeps its reaction time (the tripping reading to the last safe-state action).
These are software interlocks above the bench's hardware ones, which never
depend on labbridge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from instruments.driver import Driver
from safety.devicefaults import fault_monitors
from safety.devicewatchdog import MIN_FEED_INTERVAL_S, DeviceWatchdogs
from safety.effects import Layout, safe_state_updates
from safety.model import (
    AuditTrail,
    Command,
    Latch,
    ResetRefused,
    StationState,
    TripRecord,
    Verdict,
)
from safety.monitors import Monitor, MonitorResult, Staleness, evaluate_all
from safety.monitorspec import FaultSetting
from safety.tripreport import SafeOutcome, TripReport

log = logging.getLogger(__name__)

#: how often a reset looks again at a monitor still waiting out its grace (real seconds)
GRACE_POLL_S = 0.05


class StationSupervisor:
    """Monitors, latched trips, reset and device watchdogs for one station (module docstring).

    ``drivers`` maps instrument names (``acid``, ``hotplate``, ``enclosure``...)
    to open drivers; ``monitors`` see ``instrument.channel`` names; the drivers'
    declared faults are added to them (``fault_settings``: the envelope's word on
    them). ``poll`` restricts polling to some instruments (default: every driver).
    ``device_watchdog_s`` (whole device seconds, 0 = do not arm; raised to
    :attr:`armed_watchdog_s` so that feeds are ``min_feed_interval_s`` real seconds
    apart) is written to every driver with ``set_watchdog``; ``device_time_scale`` is device seconds
    per real second (1 on a real bench, the ``SimClock`` speed on a simulated
    one), used only to pace the watchdog feed. Other times are real seconds.
    """

    def __init__(
        self,
        station: str,
        drivers: Mapping[str, Driver],
        *,
        latch: Latch,
        state: StationState,
        monitors: Iterable[Monitor],
        fault_settings: Iterable[FaultSetting] = (),
        poll_interval: float = 0.1,
        safe_timeout: float = 2.0,
        device_watchdog_s: int = 5,
        min_feed_interval_s: float = MIN_FEED_INTERVAL_S,
        audit: AuditTrail | None = None,
        read_timeout: float = 1.0,
        poll: Collection[str] | None = None,
        reassert_interval: float | None = 1.0,
        device_time_scale: float = 1.0,
    ) -> None:
        if latch.station != station:
            raise ValueError(f"latch is for station {latch.station!r}, not {station!r}")
        for label, value in (
            ("poll_interval", poll_interval),
            ("safe_timeout", safe_timeout),
            ("read_timeout", read_timeout),
            ("device_time_scale", device_time_scale),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if reassert_interval is not None and not reassert_interval > 0:
            raise ValueError(f"reassert_interval must be > 0 or None, got {reassert_interval!r}")
        self.station = station
        self.drivers: dict[str, Driver] = dict(drivers)
        self.latch = latch
        self.state = state
        self.monitors: list[Monitor] = list(monitors)
        device, off = fault_monitors(self.drivers, fault_settings)
        clash = sorted({m.name for m in self.monitors} & ({m.name for m in device} | set(off)))
        if clash:
            raise ValueError(
                f"monitor(s) {', '.join(clash)} have the name of a fault the drivers declare "
                f"(watched already); change one with disabled/while in the envelope instead"
            )
        self.monitors += device
        #: the drivers' faults the envelope switched off: name -> why
        self.faults_disabled: dict[str, str] = off
        names = [m.name for m in self.monitors]
        if len(set(names)) != len(names):
            raise ValueError(f"monitor names must be unique, got {names}")
        unknown = set(poll or ()) - set(self.drivers)
        if unknown:
            raise ValueError(f"poll names unknown instruments: {sorted(unknown)}")
        self.poll: list[str] = list(self.drivers) if poll is None else list(poll)
        self.poll_interval = float(poll_interval)
        self.safe_timeout = float(safe_timeout)
        self.read_timeout = float(read_timeout)
        self.device_watchdog_s = device_watchdog_s
        self.device_time_scale = float(device_time_scale)
        #: the devices' own watchdogs (safety/devicewatchdog.py)
        self.watchdogs = DeviceWatchdogs(
            station,
            self.drivers,
            device_watchdog_s=device_watchdog_s,
            min_feed_interval_s=min_feed_interval_s,
            device_time_scale=self.device_time_scale,
            write_timeout=self.read_timeout,
        )
        #: the timeout written to the devices (device seconds; safety/devicewatchdog.py)
        self.armed_watchdog_s = self.watchdogs.armed_s
        #: per instrument with a device watchdog: armed (the last write succeeded)?
        self.watchdog_armed = self.watchdogs.armed
        self.reassert_interval = reassert_interval
        self.audit = audit
        #: every trip of this station (not re-assertions), oldest first
        self.trips: list[TripReport] = []
        #: the latest re-assertions while latched
        self.reasserts: deque[TripReport] = deque(maxlen=50)
        #: the latest evaluation of every monitor
        self.last_results: dict[str, MonitorResult] = {}
        #: per instrument: consecutive failed reads, and the last error
        self.read_failures: dict[str, int] = dict.fromkeys(self.drivers, 0)
        self.last_read_error: dict[str, str] = {}
        #: per instrument whose last read was refused with the device's flags: why
        self.partial_reads: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._storms: set[asyncio.Task[TripReport]] = set()
        self._stragglers: set[asyncio.Future[Any]] = set()
        self._tripped_names: set[str] = set()
        self._handled_trip: TripRecord | None = None
        self._last_storm_done: float | None = None
        self._last_outcomes: dict[str, SafeOutcome] = {}
        self._running = False

    # ------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._running

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The supervisor's background tasks (pollers, monitor loop, watchdog feeders)."""
        return list(self._tasks)

    @property
    def watchdog_drivers(self) -> dict[str, Driver]:
        """Drivers with a device watchdog (``set_watchdog``)."""
        return dict(self.watchdogs.drivers)

    @property
    def feed_interval_s(self) -> float:
        """Real seconds between device watchdog feeds (a third of its armed timeout)."""
        return self.watchdogs.feed_interval_s

    async def start(self) -> None:
        """Arm the device watchdogs, then start polling and monitoring (idempotent)."""
        if self._running:
            return
        self._running = True
        now = time.monotonic()
        for monitor in self.monitors:
            monitor.arm(now)
        try:
            if self.device_watchdog_s > 0:
                await self.watchdogs.arm()
                for name, driver in self.watchdogs.drivers.items():
                    self._spawn(self.watchdogs.feed(name, driver), f"watchdog-feed-{name}")
            for name in self.poll:
                self._spawn(self._poll_loop(name, self.drivers[name]), f"poll-{name}")
            self._spawn(self._monitor_loop(), "monitor")
        except BaseException:
            await self.stop()
            raise
        log.info(
            "%s: supervising %d instruments with %d monitors",
            self.station,
            len(self.drivers),
            len(self.monitors),
        )

    def _spawn(self, coro: Any, what: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"supervisor-{self.station}-{what}"))

    async def stop(self) -> None:
        """Stop polling and monitoring; wait for a safe state in progress. Idempotent.

        The device watchdog stays armed: with nobody feeding it, the device
        switches its heater and stirrer off by itself (fail safe).
        """
        self._running = False
        tasks, self._tasks = self._tasks, []
        alive: set[asyncio.Task[None]] = {t for t in tasks if not t.done()}
        for _ in range(10):
            if not alive:
                break
            for task in alive:
                task.cancel()  # again if a cancellation was swallowed on its way
            _, alive = await asyncio.wait(alive, timeout=0.5)
        for task in alive:
            log.error("%s: %s did not stop", self.station, task.get_name())
        # safe-state storms are bounded by safe_timeout: let them finish
        while self._storms:
            await asyncio.gather(*list(self._storms), return_exceptions=True)
        if self._stragglers:
            # safe_state() calls that ignored their cancellation: give them a little longer
            _, pending = await asyncio.wait(list(self._stragglers), timeout=self.safe_timeout)
            for straggler in pending:
                log.error(
                    "%s: a safe_state() is still running after stop(): %r", self.station, straggler
                )

    async def __aenter__(self) -> StationSupervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------- polling
    async def _poll_loop(self, name: str, driver: Driver) -> None:
        while True:
            t0 = time.monotonic()
            await self.poll_instrument(name, driver)
            self._evaluate()
            await asyncio.sleep(max(0.0, self.poll_interval - (time.monotonic() - t0)))

    async def poll_instrument(self, name: str, driver: Driver | None = None) -> bool:
        """Read one instrument into ``state.measured`` (bounded by ``read_timeout``). True if read."""
        drv = self.drivers[name] if driver is None else driver
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # (stop()) when the read finishes at the same moment
            async with asyncio.timeout(self.read_timeout):
                reading = await drv.read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            partial = getattr(exc, "reading", None)
            if isinstance(partial, Mapping):  # the device answered: its flags say why no value
                return self._partial(name, partial, str(exc) or type(exc).__name__)
            text = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                text = f"read timed out after {self.read_timeout:g} s"
            self.read_failures[name] = self.read_failures.get(name, 0) + 1
            self.last_read_error[name] = text
            if self.read_failures[name] == 1:
                log.warning(
                    "%s: reading %s failed (its channels now age): %s", self.station, name, text
                )
            else:
                log.debug("%s: reading %s failed again: %s", self.station, name, text)
            return False
        self.state.set_measured(name, reading, time.monotonic())
        if self.partial_reads.pop(name, None) is not None:
            log.info("%s: %s gives a whole reading again", self.station, name)
        if self.read_failures.get(name):
            log.info(
                "%s: %s answers again after %d failed reads",
                self.station,
                name,
                self.read_failures[name],
            )
        self.read_failures[name] = 0
        return True

    def _partial(self, name: str, reading: Mapping[str, Any], why: str) -> bool:
        """Store a reading the driver refused with the device's flags (module docstring)."""
        self.state.set_measured(name, reading, time.monotonic())
        if self.partial_reads.get(name) != why:
            log.info(
                "%s: %s reads without a value (device flags stored): %s", self.station, name, why
            )
        self.partial_reads[name] = why
        self.read_failures[name] = 0
        return True

    async def poll_once(self) -> dict[str, bool]:
        """Read every polled instrument now (concurrently) and evaluate the monitors."""
        names = list(self.poll)
        done = await asyncio.gather(*(self.poll_instrument(n) for n in names))
        self._evaluate()
        return dict(zip(names, done, strict=True))

    # ------------------------------------------------------------ monitors
    def check(self) -> dict[str, MonitorResult]:
        """Evaluate every monitor on the current state (no side effects)."""
        return evaluate_all(self.monitors, self.state)

    async def _monitor_loop(self) -> None:
        while True:
            self._evaluate()
            await asyncio.sleep(self.poll_interval)

    def _evaluate(self) -> None:
        """Evaluate the monitors; latch and start a safe-state storm on a trip (never raises)."""
        try:
            self._evaluate_unsafe()
        except Exception:  # a bug here must not kill the loop that feeds the watchdog
            log.exception("%s: monitor evaluation failed", self.station)

    def _evaluate_unsafe(self) -> None:
        now = time.monotonic()
        results = self.check()
        self.last_results = results
        tripped = [m for m in self.monitors if results[m.name].tripped]
        previous, self._tripped_names = self._tripped_names, {m.name for m in tripped}
        for monitor in tripped:
            if self.latch.tripped and monitor.name in previous:
                continue  # level still holds, already latched: the re-assertion handles it
            reason = results[monitor.name].reason
            if self.latch.trip(reason, monitor.name):
                log.error("%s: TRIP by %s", self.station, reason)
                self._start_storm(
                    TripReport(
                        self.station, reason, monitor.name, t_reading=self._stamp(monitor, now)
                    ),
                )
            else:
                log.warning("%s: also tripped while latched: %s", self.station, reason)
        record = self.latch.trip_record
        if record is not None and record is not self._handled_trip and not self._storms:
            # latched by someone else (the guard, another process's API call): make it safe
            log.error(
                "%s: latched by %s (%s): safe state", self.station, record.source, record.reason
            )
            self._start_storm(TripReport(self.station, record.reason, record.source))
        elif (
            record is not None
            and not self._storms
            and self.reassert_interval is not None
            and self._last_storm_done is not None
            and now - self._last_storm_done >= self.reassert_interval
        ):
            self._start_storm(
                TripReport(self.station, record.reason, record.source, kind="reassert")
            )

    def _stamp(self, monitor: Monitor, default: float) -> float:
        """Monotonic time of the newest reading the monitor looked at (``default`` if none)."""
        if isinstance(monitor, Staleness):
            return default  # no reading tripped it: its absence did, noticed now
        entries = dict(self.state.measured)
        stamps = [entries[ch][1] for ch in monitor.channels if ch in entries]
        return max(stamps) if stamps else default

    # ---------------------------------------------------------- safe state
    def _start_storm(self, report: TripReport) -> asyncio.Task[TripReport]:
        if report.kind == "trip":
            self._handled_trip = self.latch.trip_record
            self.trips.append(report)  # visible at once, ``done`` once the storm finished
            self._record(
                report.who or report.source, "trip", report.reason, allowed=True, rule=report.source
            )
        else:
            self.reasserts.append(report)
        task = asyncio.create_task(
            self._storm(report), name=f"supervisor-{self.station}-safe-state-{report.kind}"
        )
        self._storms.add(task)
        task.add_done_callback(self._storms.discard)
        return task

    async def _storm(self, report: TripReport) -> TripReport:
        """Every instrument to its safe state, concurrently, each bounded by ``safe_timeout``."""
        names = list(self.drivers)
        outcomes = await asyncio.gather(*(self._safe_one(n, self.drivers[n]) for n in names))
        report.outcomes = dict(zip(names, outcomes, strict=True))
        report.t_done = time.monotonic()
        self._last_storm_done = report.t_done
        self._last_outcomes = report.outcomes
        if report.failed:
            (log.error if report.kind == "trip" else log.warning)(
                "%s (%s)", report.summary(), report.kind
            )
        elif report.kind == "trip":
            log.warning("%s in %.1f ms", report.summary(), 1e3 * (report.reaction_s or 0))
        return report

    async def _safe_one(self, name: str, driver: Driver) -> SafeOutcome:
        """``driver.safe_state()`` with a hard bound: a call that ignores cancellation is left behind."""
        t0 = time.monotonic()
        inner = asyncio.ensure_future(driver.safe_state())
        try:
            done, _ = await asyncio.wait({inner}, timeout=self.safe_timeout)
        except asyncio.CancelledError:
            inner.cancel()
            self._straggle(inner)
            raise
        elapsed = time.monotonic() - t0
        if not done:
            inner.cancel()
            self._straggle(inner)
            text = f"safe_state() timed out after {self.safe_timeout:g} s"
            log.error("%s: %s: %s", self.station, name, text)
            return SafeOutcome(name, False, elapsed, text, timed_out=True)
        exc = inner.exception()
        if exc is not None:
            text = str(exc) or type(exc).__name__
            log.error("%s: %s: safe state failed: %s", self.station, name, text)
            return SafeOutcome(name, False, elapsed, text)
        updates = safe_state_updates(Layout.of({name: driver}), [name])
        if updates:
            self.state.set_commanded(updates)
        return SafeOutcome(name, True, elapsed)

    def _straggle(self, task: asyncio.Future[Any]) -> None:
        if task.done():
            return
        self._stragglers.add(task)

        def _done(t: asyncio.Future[Any]) -> None:
            self._stragglers.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("%s: late safe-state failure: %s", self.station, t.exception())

        task.add_done_callback(_done)

    async def trip(
        self, reason: str, source: str = "api", *, force: bool = False, who: str | None = None
    ) -> TripReport:
        """Latch and drive every instrument to its safe state; returns when all finished or timed out.

        Idempotent: while latched, returns at once with ``already_tripped=True``
        (and the last safe-state outcomes) unless ``force``, or unless nobody
        has safe-stated this latch yet (someone tripped the latch directly while
        the supervisor was not running).
        """
        t0 = time.monotonic()
        newly = self.latch.trip(reason, source)
        handled = self._handled_trip is not None and self._handled_trip is self.latch.trip_record
        if not newly and not force and handled:
            current = self.latch.trip_record
            return TripReport(
                self.station,
                current.reason if current else reason,
                current.source if current else source,
                already_tripped=True,
                t_reading=t0,
                t_detected=t0,
                t_done=t0,
                outcomes=dict(self._last_outcomes),
            )
        if newly:
            log.error("%s: TRIP (%s): %s", self.station, source, reason)
        report = TripReport(self.station, reason, source, t_reading=t0, t_detected=t0, who=who)
        # shielded: a caller that gives up (or is cancelled) does not abort the safe state
        return await asyncio.shield(self._start_storm(report))

    # ------------------------------------------------------------------ reset
    async def reset(self, who: str, why: str, *, refresh: bool = True) -> bool:
        """Unlatch, if every monitor is cleared. Returns False if the station was not latched.

        Waits for a safe state in progress (bounded by ``safe_timeout``), reads
        the instruments the monitors watch once more (``refresh``), then
        evaluates every monitor on that state; a monitor still in its grace period (no
        reading yet: a device that just connected and has not sent its first heartbeat)
        is waited for until its first reading or the grace's end, so a reset right after
        the station opened is decided on what the devices say. Raises :class:`ResetRefused`
        naming the monitors and values that still hold, or when ``who``/``why``
        is empty. Nothing is switched back on: reset only unlatches.
        """
        if not who.strip() or not why.strip():
            raise ResetRefused(f"{self.station}: a reset must say who resets it and why")
        if not self.latch.tripped:
            return False
        while self._storms:  # a re-assertion must not undo a command sent after the reset
            await asyncio.gather(*list(self._storms), return_exceptions=True)
        if refresh:
            watched = set().union(*(m.instruments for m in self.monitors)) & set(self.drivers)
            await asyncio.gather(*(self.poll_instrument(n) for n in sorted(watched)))
        while self._storms:  # a re-assertion started while we read: wait for it too
            await asyncio.gather(*list(self._storms), return_exceptions=True)
        results = self.check()
        while waiting := [r.grace_left_s for r in results.values() if r.grace_left_s > 0]:
            await asyncio.sleep(min(GRACE_POLL_S, *waiting) + 0.001)
            results = self.check()
        self.last_results = results
        holding = [r for r in results.values() if not r.cleared]
        if holding:
            still = "; ".join(r.reason for r in holding)
            rule = ",".join(r.monitor for r in holding)
            self._record(who, "reset", still, allowed=False, rule=rule, why=why)
            raise ResetRefused(
                f"{self.station}: cannot reset, the trip condition still holds: {still}"
            )
        self.latch.reset(who, why, cleared=True)
        self._tripped_names = set()
        self._handled_trip = None
        self._last_storm_done = None
        self._record(who, "reset", f"reset by {who}: {why}", allowed=True, why=why)
        log.warning("%s: reset by %s: %s", self.station, who, why)
        return True

    # ------------------------------------------------------------------ report
    @property
    def trip_reactions(self) -> list[float]:
        """Real seconds from the tripping reading to the last safe-state action, per finished trip."""
        return [r.reaction_s for r in self.trips if r.reaction_s is not None]

    def status(self) -> dict[str, Any]:
        """A plain-data picture for status displays and the API."""
        record = self.latch.trip_record
        return {
            "station": self.station,
            "running": self._running,
            "latched": record is not None,
            "trip": None if record is None else {"reason": record.reason, "source": record.source},
            "monitors": {k: r.as_dict() for k, r in self.last_results.items()},
            "read_failures": dict(self.read_failures),
            "partial_reads": dict(self.partial_reads),
            "faults_disabled": dict(self.faults_disabled),
            "watchdog_armed": dict(self.watchdog_armed),
            "trips": len(self.trips),
        }

    def _record(
        self,
        who: str,
        action: str,
        reason: str,
        *,
        allowed: bool,
        rule: str | None = None,
        why: str | None = None,
    ) -> None:
        if self.audit is None:
            return
        params: dict[str, Any] = {}
        if why is not None:
            params["why"] = why
        if action == "trip" and rule is not None:
            params["source"] = rule
        verdict = Verdict(
            allowed=allowed,
            station=self.station,
            command=Command("station", action, params, who),
            reason=reason,
            rule=rule,
        )
        try:
            self.audit.record(verdict)
        except Exception:  # an audit sink must not stop a trip
            log.exception("%s: audit sink failed", self.station)


__all__ = ["SafeOutcome", "StationSupervisor", "TripReport"]
