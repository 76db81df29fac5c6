"""The guard: the only way code above ``safety/`` acts on an instrument.

``Guard(station, drivers, envelope, latch=..., audit=..., state=...)`` holds a
station's drivers; code above this layer gets :class:`GuardedInstrument`
handles from :meth:`Guard.handle`, never a driver::

    hotplate = guard.handle("hotplate", who="optimizer")
    await hotplate.set_stirrer(True, 300)
    await hotplate.set_heater(True, 60.0)            # checked, then sent
    await guard.handle("acid").dispense(0.4, 5.0, who="agent:7")

Every command goes through :meth:`Guard.execute`:

1. it must be an allowed command with valid parameters (safety/effects.py);
2. a latched station (tripped or e-stopped, not yet reset) refuses everything
   but reads and safe-state commands (:class:`~safety.model.StationTripped`);
3. the state it would produce (``state.view()`` + its effects) must be inside
   the envelope, unless it only makes the station safer (always allowed);
4. the verdict (allowed or refused, who, the command, the rule, the values)
   goes to the audit trail, and only then is the driver called. A refusal
   raises :class:`~safety.model.SafetyRefusal` and nothing reaches the wire.
5. After the driver returns, ``state.commanded`` (and the envelope's ledger:
   change times, budgets) is updated from the command's effects.

Commands that change something are serialized per station (one
``asyncio.Lock``), so check-then-act is atomic; reads run without the lock.

Decisions where the contract had to choose:

* A driver error after the check (timeout, lost link, device error) may or may
  not have left the command executed. An actuating command is then assumed
  to HAVE taken effect (its effects and consumption are recorded: the more
  conservative picture for the next checks); a safer command is assumed NOT to
  have (the heater may still be on). A ``ValueError``/``TypeError`` is a
  driver refusing before sending anything: nothing is recorded.
* Draining: a flow ``in`` (out of a vessel, safety/effects.py) does not empty
  the vessel in the guard's books when it is sent; its volume shrinks as the
  instrument's declared ``progress`` read shows liquid taken (``in_ml``),
  read before the next actuation and on ``refresh()``. A drain that is
  interrupted (stop, e-stop, alarm) or whose progress cannot be read therefore
  never over-credits the vessel's capacity. Any read of the draining
  instrument (a recipe waiting for it) settles the books too, so the next
  proposal's dry run sees the vessel as it is. An interrupted delivery keeps
  counting its full volume (conservative).
* Flow interlock (rule ``flow-interlock``): no drain of a vessel while a
  delivery into it may still be running (its volume / rate x 1.1 + 0.5 s,
  unless a safer command to that instrument or a read of it reporting
  ``moving`` false showed it stopped), no delivery while the vessel is being
  drained, no second flow on an instrument still running its first. A drain
  racing a delivery would let the books credit liquid that has not arrived.
* Switching on without a setpoint (``set_heater(True)``) sends the known,
  checked setpoint explicitly (see safety/effects.py).
* A trip that lands while an actuation is in flight: when the driver call
  returns and the station is latched, the guard puts that instrument into its
  safe state again (the supervisor's safe state may have run before the
  command's write arrived).
* ``check()`` and the dry run do not write to the audit trail; ``execute()``
  records every verdict, reads included.

Python cannot make a handle airtight: a determined caller can walk from a
bound method to the guard and its drivers through introspection. The handle
offers no attribute that leads to a driver (no ``.driver``, ``.transport``);
the import-linter layer contract (nothing above ``safety`` imports
``instruments``) is the real enforcement, and code review the rest.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from instruments.declare import CommandSpec
from safety.dryrun import DryRunReport, dry_run
from safety.effects import (
    ACTUATE,
    READ,
    SAFER,
    Assessment,
    Drain,
    Effect,
    Layout,
    assess,
    check_counted,
    drained,
    initial_commanded,
    safe_state_updates,
)
from safety.envelope import Envelope
from safety.limits import Violation
from safety.model import (
    AuditTrail,
    Command,
    Latch,
    SafetyRefusal,
    StationState,
    StationTripped,
    Verdict,
)

log = logging.getLogger(__name__)
#: a flow is assumed to run up to this factor of volume/rate (+0.5 s) unless seen stopped
FLOW_SLACK = 1.1

__all__ = ["Guard", "GuardedInstrument"]


class Guard:
    """Checks every command of one station against its envelope before a driver sees it.

    ``drivers``: instrument name -> open driver (its class declares its commands,
    instruments/declare.py); the envelope's vessels say which flows fill and
    empty what; ``clock``: seconds for rates and
    budgets (``time.monotonic``; a simulated clock in tests);
    ``command_timeout``: bound (s) on one actuating driver call, which holds the
    station's lock; ``read_timeout``: bound on each read of :meth:`refresh`
    and of the drain progress.

    Raises :class:`~safety.envelope.EnvelopeError` if the envelope names an
    instrument the station does not have.
    """

    def __init__(
        self,
        station: str,
        drivers: Mapping[str, Any],
        envelope: Envelope,
        *,
        latch: Latch,
        audit: AuditTrail,
        state: StationState,
        clock: Callable[[], float] = time.monotonic,
        command_timeout: float = 30.0,
        read_timeout: float = 10.0,
    ) -> None:
        if command_timeout <= 0 or read_timeout <= 0:
            raise ValueError("command_timeout and read_timeout must be > 0 s")
        self.station = station
        self._drivers = dict(drivers)
        self.layout = Layout.of(self._drivers, envelope.vessels)
        envelope.validate_known(self.layout.kinds.keys())
        check_counted(self.layout, envelope)
        self.envelope = envelope
        self.latch = latch
        self.audit = audit
        self.state = state
        self._clock = clock
        self.command_timeout = command_timeout
        self.read_timeout = read_timeout
        self._lock = asyncio.Lock()
        self._drain: Drain | None = None
        self._drain_credited = 0.0
        self._in_flight: Command | None = None
        #: instrument -> guard-clock time by which its last flow has surely finished
        self._flowing: dict[str, float] = {}
        defaults = initial_commanded(self.layout)
        present = self.state.view()
        self.state.set_commanded({k: v for k, v in defaults.items() if k not in present})
        envelope.ledger.start(clock())

    def __repr__(self) -> str:
        return f"<Guard {self.station}: {', '.join(self.layout.kinds)}>"

    # ------------------------------------------------------------ handles
    @property
    def instruments(self) -> dict[str, str]:
        """Instrument name -> driver kind."""
        return dict(self.layout.kinds)

    def handle(self, name: str, *, who: str = "unknown") -> GuardedInstrument:
        """The guarded handle of instrument ``name``; ``who`` is the default proposer."""
        if name not in self._drivers:
            raise KeyError(
                f"{self.station} has no instrument {name!r} (has: {', '.join(self._drivers)})"
            )
        return GuardedInstrument(
            name, self.layout.kinds[name], self.layout.actions(name), self.execute, who
        )

    @property
    def in_flight(self) -> Command | None:
        """The actuating command whose driver call is running now, if any."""
        return self._in_flight

    async def wait_idle(self) -> None:
        """Wait until no actuating command is running (e.g. before a safe state after a trip)."""
        async with self._lock:
            pass

    # ------------------------------------------------------------ checking
    def _latched(self) -> str | None:
        record = self.latch.trip_record
        if record is None:
            return None
        return f"{record.source}: {record.reason}"

    def _assess(self, command: Command, now: float, view: Mapping[str, Any]) -> Assessment:
        a = assess(
            command,
            layout=self.layout,
            envelope=self.envelope,
            view=view,
            now=now,
            latched=self._latched(),
        )
        if a.allowed and a.effect is not None:
            violation = self._flow_interlock(a.effect, now)
            if violation is not None:
                a = Assessment(command, a.effect, (violation,))
        return a

    def _view(self, now: float) -> dict[str, Any]:
        """The state the checks see: commanded and measured values, and each flowing
        instrument's ``<name>.flowing`` (its last flow may still be running at ``now``)."""
        view = self.state.view()
        for channel, name in self.layout.flowing_channels().items():
            view[channel] = self._flowing.get(name, float("-inf")) > now
        return view

    def _flow_interlock(self, effect: Effect, now: float) -> Violation | None:
        """No drain while a delivery into the vessel may still be running, no delivery while
        it is drained, no second flow on an instrument that may still be running its first."""
        flow = effect.action.flow
        if flow is None or effect.category != ACTUATE:
            return None
        name = effect.command.instrument
        found = self.layout.vessel_of(name)
        until = self._flowing.get(name)
        if until is not None and until > now:
            reason = (
                f"flow-interlock: {name}.{effect.action.name}() while {name} may still be running "
                f"its previous flow (up to {until - now:.3g} s more); wait until it stopped"
            )
            return Violation("flow-interlock", reason, {"flowing": [name]})
        if found is None:
            return None
        vessel = found[0]
        if effect.drain is not None:
            busy = {p: t for p, t in self._flowing.items() if t > now and p in vessel.fed_by}
            if busy:
                others = ", ".join(f"{p} (up to {t - now:.3g} s more)" for p, t in busy.items())
                reason = (
                    f"flow-interlock: {name}.{effect.action.name}() drains {vessel.name} while "
                    f"{others} may still be delivering into it; wait until they stopped"
                )
                return Violation("flow-interlock", reason, {"flowing": sorted(busy)}, "rule")
        elif self._drain is not None and self._drain.vessel == vessel.name:
            reason = (
                f"flow-interlock: {name}.{effect.action.name}() while {self._drain.instrument} is "
                f"still draining {vessel.name}; wait for the drain to finish"
            )
            return Violation("flow-interlock", reason, {"draining": self._drain.instrument})
        return None

    def _verdict(self, a: Assessment) -> Verdict:
        return Verdict(a.allowed, self.station, a.command, a.reason, a.rule, a.values)

    def check(self, command: Command) -> Verdict:
        """The verdict ``execute`` would give now, without executing or recording it."""
        now = self._clock()
        return self._verdict(self._assess(command, now, self._view(now)))

    def dry_run(
        self,
        commands: Sequence[Command],
        *,
        times: Sequence[float] | None = None,
        after: Mapping[str, Any] | None = None,
        at: float | None = None,
    ) -> DryRunReport:
        """Check a whole recipe against the envelope from the current state (no I/O).

        ``after``: channel values that replace the current ones (the state an experiment
        under way is predicted to leave), ``at``: when the recipe starts (default now)."""
        now = self._clock()
        view = self._view(now)
        if after:
            view = {**view, **after}
        return dry_run(
            commands,
            self.envelope,
            view,
            layout=self.layout,
            now=now if at is None else max(now, at),
            times=times,
            ledger=self.envelope.ledger.copy(),
        )

    def _refuse(self, a: Assessment) -> NoReturn:
        verdict = self._verdict(a)
        self.audit.record(verdict)
        log.warning(
            "%s: refused %s (who: %s): %s", self.station, a.command, a.command.who, a.reason
        )
        raise (StationTripped if a.tripped else SafetyRefusal)(verdict)

    # ------------------------------------------------------------ executing
    async def execute(self, command: Command) -> Any:
        """Check ``command``; if allowed, record the verdict, send it, update the state.

        Raises :class:`SafetyRefusal` (:class:`StationTripped` when latched) if
        refused, or whatever the driver raises.
        """
        action = self.layout.actions(command.instrument).get(command.action)
        if action is not None and action.kind == READ:
            return await self._execute_read(command)
        async with self._lock:
            if self._drain is not None:
                await self._sync_drain()
            now = self._clock()
            view = self._view(now)
            a = self._assess(command, now, view)
            if not a.allowed:
                self._refuse(a)
            effect = a.effect
            assert effect is not None
            self.audit.record(self._verdict(a))
            driver = self._drivers[command.instrument]
            self._in_flight = command
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(self.command_timeout):
                    result = await _call(driver, effect.action, effect.params)
            except (ValueError, TypeError):
                raise  # the driver refused it before sending anything
            except BaseException as exc:
                if effect.category == ACTUATE:
                    log.warning(
                        "%s: %s failed (%r); assuming it took effect", self.station, command, exc
                    )
                    self._commit(effect, view, now, start_drain=False)
                raise
            finally:
                self._in_flight = None
            self._commit(effect, view, now, start_drain=True)
            if effect.category == ACTUATE and self.latch.tripped:
                await self._safe_after_trip(command.instrument)
            return result

    async def _execute_read(self, command: Command) -> Any:
        now = self._clock()
        a = self._assess(command, now, self._view(now))
        if not a.allowed:
            self._refuse(a)
        assert a.effect is not None
        self.audit.record(self._verdict(a))
        result = await _call(self._drivers[command.instrument], a.effect.action, a.effect.params)
        if command.instrument in self._flowing and _reports_stopped(result):
            self._flowing.pop(command.instrument, None)  # seen stopped: nothing more comes
        drain = self._drain
        if drain is not None and drain.instrument == command.instrument:
            async with self._lock:  # a read of the draining instrument settles the books
                await self._sync_drain()
        return result

    def _commit(
        self, effect: Effect, view: Mapping[str, Any], now: float, *, start_drain: bool
    ) -> None:
        updates = effect.committed_updates()
        if updates:
            self.state.set_commanded(updates)
        self.envelope.commit(view, updates, now=now, consumes=effect.consumes)
        name = effect.command.instrument
        if start_drain and effect.drain is not None:
            self._drain = effect.drain
            self._drain_credited = 0.0
        if effect.busy_s is not None:
            self._flowing[name] = self._clock() + effect.busy_s * FLOW_SLACK + 0.5
        elif effect.category == SAFER:
            self._flowing.pop(name, None)  # stopped: a flow does not resume by itself

    async def _safe_after_trip(self, name: str) -> None:
        log.warning(
            "%s: tripped while %s was in flight; safe state for %s again", self.station, name, name
        )
        try:
            async with asyncio.timeout(self.command_timeout):
                await self._drivers[name].safe_state()
        except Exception as exc:
            log.error("%s: safe state of %s after a trip failed: %s", self.station, name, exc)
        else:
            self.state.set_commanded(safe_state_updates(self.layout, [name]))

    async def _sync_drain(self) -> None:
        """Credit the vessel with what the draining instrument's declared progress read shows
        taken so far (call under the lock). Without a progress read nothing is credited."""
        drain = self._drain
        if drain is None:
            return
        if drain.progress is None:
            log.warning(
                "%s: %s declares no progress read: %s stays as full as before its drain",
                self.station,
                drain.instrument,
                drain.vessel,
            )
            self._drain = None
            return
        driver = self._drivers[drain.instrument]
        try:
            async with asyncio.timeout(self.read_timeout):
                progress = await getattr(driver, drain.progress)()
            moving, taken = progress["moving"], progress["in_ml"]
            if taken is None and moving is False:
                log.warning(
                    "%s: %s stopped without reporting what it took; %s stays as full as before",
                    self.station,
                    drain.instrument,
                    drain.vessel,
                )
                self._drain = None
                return
            if taken is None:
                raise ValueError("no volume reported")
        except Exception as exc:
            log.warning(
                "%s: cannot read the drain progress of %s (%s); %s is assumed as full as before",
                self.station,
                drain.instrument,
                exc,
                drain.vessel,
            )
            return
        taken = min(float(taken), drain.requested_ml)
        delta = taken - self._drain_credited
        if delta > 0:
            view = self.state.view()
            channel = f"{drain.vessel}.volume"
            update = {channel: drained(view.get(channel, 0.0), delta)}
            self.state.set_commanded(update)
            self.envelope.commit(view, update, now=self._clock())
            self._drain_credited = taken
        if taken >= drain.requested_ml - 1e-9 or not moving:
            self._drain = None

    # ------------------------------------------------------------ other entries
    async def refresh(self, names: Iterable[str] | None = None) -> dict[str, BaseException]:
        """Read every driver (concurrently) into ``state.measured``; returns the failures by name."""
        wanted = list(self._drivers if names is None else names)

        async def one(name: str) -> None:
            try:
                async with asyncio.timeout(self.read_timeout):
                    reading = await self._drivers[name].read()
            except Exception as exc:  # refused with the device's flags: keep them (driver.py)
                partial = getattr(exc, "reading", None)
                if not isinstance(partial, Mapping):
                    raise
                log.info(
                    "%s: %s reads without a value (device flags stored): %s",
                    self.station,
                    name,
                    exc,
                )
                reading = partial
            self.state.set_measured(name, reading)

        results = await asyncio.gather(*(one(n) for n in wanted), return_exceptions=True)
        failures: dict[str, BaseException] = {}
        for name, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("%s: reading %s failed: %r", self.station, name, result)
                failures[name] = result
        if self._drain is not None:
            async with self._lock:
                await self._sync_drain()
        return failures

    async def begin_experiment(self, *, who: str = "unknown") -> Verdict:
        """Consume one unit of the ``experiments`` budgets (and check the latch); recorded."""
        async with self._lock:
            now = self._clock()
            command = Command("station", "begin_experiment", {}, who)
            latched = self._latched()
            violations: list[Violation] = []
            if latched is not None:
                reason = f"station is latched after a trip ({latched}); no experiment until reset()"
                violations.append(Violation("latch", reason, {}, "latch"))
            else:
                violations = self.envelope.check_budget("experiments", 1, now=now)
            a = Assessment(command, None, tuple(violations), tripped=latched is not None)
            if violations:
                self._refuse(a)
            verdict = Verdict(True, self.station, command, "allowed (within the budgets)")
            self.audit.record(verdict)
            self.envelope.commit({}, {}, now=now, consumes={"experiments": 1})
            return verdict

    def mark_safe_state(self, names: Iterable[str] | None = None) -> None:
        """Tell the guard that ``names`` (default: all) were put into their safe state outside it
        (the supervisor's trip or e-stop): heater, stirrer, light, continuous off."""
        updates = safe_state_updates(self.layout, names)
        view = self.state.view()
        self.state.set_commanded(updates)
        self.envelope.commit(view, updates, now=self._clock())


def _reports_stopped(result: Any) -> bool:
    """A read result that says the instrument is not moving: a ``moving`` attribute or key
    that is False (the convention of instruments/declare.py ``Flow.progress``)."""
    moving = getattr(result, "moving", None)
    if isinstance(result, Mapping):
        moving = result.get("moving")
    return moving is False


async def _call(driver: Any, action: CommandSpec, params: Mapping[str, Any]) -> Any:
    result = getattr(driver, action.name)(**dict(params))
    if inspect.isawaitable(result):
        result = await result
    return result


class GuardedInstrument:
    """A handle on one instrument of a station: the allowed commands, each checked by the guard.

    Methods have the driver's names and arguments (``await h.set_heater(True,
    60.0)``), plus a keyword-only ``who=`` that overrides the handle's. There is
    no attribute leading to the driver; see the :mod:`safety.guard` docstring
    for why that is a convention Python cannot enforce.
    """

    __slots__ = ("_name", "_kind", "_actions", "_execute", "_who")

    def __init__(
        self,
        name: str,
        kind: str,
        actions: Mapping[str, CommandSpec],
        execute: Callable[[Command], Any],
        who: str,
    ) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_actions", dict(actions))
        object.__setattr__(self, "_execute", execute)
        object.__setattr__(self, "_who", who)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"a guarded handle is read-only (cannot set {key!r})")

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def who(self) -> str:
        return self._who

    @property
    def commands(self) -> list[str]:
        """The allowed commands of this instrument."""
        return sorted(self._actions)

    def as_who(self, who: str) -> GuardedInstrument:
        """The same handle acting on behalf of ``who``."""
        return GuardedInstrument(self._name, self._kind, self._actions, self._execute, who)

    def __getattr__(self, attr: str) -> Any:
        actions = object.__getattribute__(self, "_actions")
        action = actions.get(attr)
        if action is None:
            name = object.__getattribute__(self, "_name")
            raise AttributeError(
                f"{name}: {attr!r} is not an allowed command (allowed: {', '.join(sorted(actions))})"
            )
        execute = object.__getattribute__(self, "_execute")
        default_who = object.__getattribute__(self, "_who")
        name = object.__getattribute__(self, "_name")

        async def command(*args: Any, who: str | None = None, **kwargs: Any) -> Any:
            params = action.bind(args, kwargs)
            return await execute(Command(name, attr, params, who or default_who))

        command.__name__ = attr
        command.__qualname__ = f"GuardedInstrument.{attr}"
        return command

    def __dir__(self) -> list[str]:
        return sorted({"name", "kind", "who", "commands", "as_who", *self._actions})

    def __repr__(self) -> str:
        return f"<GuardedInstrument {self._name} ({self._kind}) as {self._who}>"
