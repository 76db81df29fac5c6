"""One station behind the safety layer: the only object above ``instruments`` that owns drivers.

:func:`open_station` connects every instrument of a station (kind + URL +
options, as the lab config lists them), and hands back a :class:`SafeStation`
that exposes *guarded* handles only: every command goes through the
:class:`~safety.guard.Guard` (envelope, latch, audit), and a
:class:`~safety.supervisor.StationSupervisor` watches the station (monitors,
latched trips, device watchdog). Leaving the context stops the supervisor and
puts every instrument in its safe state before closing its link.

These are software interlocks layered above the hardware ones: the bench's
hardware e-stop and the devices' own cut-outs never depend on labbridge.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import instruments
from instruments.errors import InstrumentError
from instruments.registry import available_drivers, driver_class, unopened
from instruments.registry import check as _check_driver
from safety.capabilities import require
from safety.devicefaults import fault_monitors
from safety.dryrun import DryRunReport
from safety.effects import Bound, Layout, bounds
from safety.envelope import Envelope
from safety.guard import Guard, GuardedInstrument
from safety.model import AuditTrail, Command, Latch, StationState, Verdict
from safety.monitors import Monitor
from safety.supervisor import StationSupervisor, TripReport

log = logging.getLogger(__name__)
P = TypeVar("P")


class SafeStation:
    """Guard + supervisor over one station's open drivers (see the module docstring).

    ``clock`` is the guard's clock for rates and budgets (``time.monotonic`` on
    a real bench; a simulated bench passes its simulated clock). The station's
    monitors are those its envelope declares (its ``monitors:`` section;
    ``monitors`` replaces them) and the faults its drivers declare
    (``<instrument>.<fault>``, safety/devicefaults.py; the envelope may switch
    one off or narrow it, with a reason).
    ``supervisor_options`` go to :class:`StationSupervisor` (``poll_interval``,
    ``safe_timeout``, ``device_watchdog_s``, ``device_time_scale``, ...).
    """

    def __init__(
        self,
        name: str,
        drivers: Mapping[str, Any],
        envelope: Envelope,
        *,
        monitors: Iterable[Monitor] | None = None,
        audit: AuditTrail | None = None,
        clock: Callable[[], float] = time.monotonic,
        supervisor_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.latch = Latch(name)
        self.state = StationState()
        self.audit = audit or AuditTrail()
        self.guard = Guard(
            name,
            drivers,
            envelope,
            latch=self.latch,
            audit=self.audit,
            state=self.state,
            clock=clock,
        )
        self.supervisor = StationSupervisor(
            name,
            drivers,
            latch=self.latch,
            state=self.state,
            monitors=list(monitors) if monitors is not None else envelope.build_monitors(),
            fault_settings=envelope.fault_settings,
            audit=self.audit,
            **dict(supervisor_options or {}),
        )

    @property
    def instruments(self) -> dict[str, str]:
        """Instrument name -> driver kind."""
        return self.guard.instruments

    def handle(self, name: str, *, who: str = "unknown") -> GuardedInstrument:
        """The guarded handle of one instrument (the only handle code above safety/ gets)."""
        return self.guard.handle(name, who=who)

    def handle_as(self, name: str, capability: type[P], *, who: str = "unknown") -> P:
        """The guarded handle of one instrument typed by what it is (safety/capabilities.py:
        ``Pump``, ``HeaterStirrer``, ``Light``, ``Sensor``, ``Camera``); ``TypeError`` naming
        what it lacks when its driver does not declare those commands."""
        return require(self.guard.handle(name, who=who), capability)

    async def execute(self, command: Command) -> Any:
        return await self.guard.execute(command)

    def check(self, command: Command) -> Verdict:
        return self.guard.check(command)

    def dry_run(self, commands: Sequence[Command], **kwargs: Any) -> DryRunReport:
        """Check a whole recipe against the envelope from the current state (no I/O)."""
        return self.guard.dry_run(commands, **kwargs)

    async def start(self) -> None:
        """Read every instrument once, then arm the device watchdog and start the monitors."""
        failures = await self.guard.refresh()
        for name, exc in failures.items():
            log.warning("%s: first read of %s failed: %s", self.name, name, exc)
        await self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()

    async def trip(self, reason: str, source: str = "api", *, who: str | None = None) -> TripReport:
        """Latch the station and put every instrument in its safe state (concurrently)."""
        report = await self.supervisor.trip(reason, source, who=who)
        self.guard.mark_safe_state()
        return report

    async def reset(self, who: str, why: str) -> None:
        """Unlatch, only once every monitor has cleared; says who and why. Nothing resumes by itself."""
        await self.supervisor.reset(who, why)

    @property
    def tripped(self) -> bool:
        return self.latch.tripped

    def status(self) -> dict[str, Any]:
        return {"station": self.name, **self.supervisor.status()}


@contextlib.asynccontextmanager
async def open_station(
    name: str,
    instrument_specs: Iterable[Mapping[str, Any]],
    envelope: Envelope,
    **options: Any,
) -> AsyncIterator[SafeStation]:
    """Connect a station's instruments and run them behind the safety layer.

    ``instrument_specs``: mappings with ``name``, ``kind``, ``url`` and optional
    ``options`` (driver keyword options). ``options`` go to :class:`SafeStation`. On exit (also on an error
    or a cancellation) the supervisor stops and every instrument is put in its
    safe state before its link is closed.
    """
    specs = list(instrument_specs)
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"station {name}: instrument names must be unique, got {names}")
    async with contextlib.AsyncExitStack() as stack:
        drivers: dict[str, Any] = {}
        for spec in specs:
            drivers[spec["name"]] = await stack.enter_async_context(
                instruments.connect(spec["kind"], spec["url"], **dict(spec.get("options") or {}))
            )
        station = SafeStation(name, drivers, envelope, **options)
        await station.start()
        try:
            yield station
        finally:
            await station.stop()


async def probe(kind: str, url: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Connect one instrument, return ``describe()`` and one ``read()``, then safe-state it.

    Nothing is actuated (a read and the safe state only): the diagnostic behind
    ``labbridge probe`` for checking that real hardware is wired right.
    """
    async with instruments.connect(kind, url, **dict(options or {})) as driver:
        return {"describe": driver.describe(), "read": await driver.read()}


def check_instrument(kind: str, url: str, options: Mapping[str, Any] | None = None) -> None:
    """Validate an instrument's kind, transport URL and driver options without touching it
    (``labbridge check``); raises the instrument layer's error naming what is wrong."""
    _check_driver(kind, url, **dict(options or {}))


def actuated_channels(
    instrument_specs: Iterable[Mapping[str, Any]], envelope: Envelope
) -> list[Bound]:
    """Every channel the station's instruments can be commanded to set, from their drivers'
    declarations, and how ``envelope`` bounds it (nothing is opened). A channel it does not
    bound is listed with ``bounded`` False: the commands that set it will be refused."""
    return bounds(station_layout(instrument_specs, envelope), envelope)


def check_device_faults(
    instrument_specs: Iterable[Mapping[str, Any]], envelope: Envelope
) -> dict[str, str]:
    """Check the envelope's settings of device faults (``disabled``/``while``) against the
    faults the station's drivers declare, without opening anything (``labbridge check``);
    :class:`~safety.envelope.EnvelopeError` naming the known faults. Returns the disabled
    ones (name -> why). A kind that is not installed is skipped (reported on its own)."""
    classes: dict[str, Any] = {}
    for spec in instrument_specs:
        if spec["kind"] in available_drivers():
            classes[spec["name"]] = driver_class(spec["kind"])
    return fault_monitors(classes, envelope.fault_settings)[1]


def station_layout(instrument_specs: Iterable[Mapping[str, Any]], envelope: Envelope) -> Layout:
    """The station's layout (instrument kinds, their drivers' declared commands, safe states
    and channels, the envelope's vessels) from unopened drivers: nothing is opened. An
    instrument whose URL or options are invalid (``labbridge check`` reports it) gets its
    class's declarations: its commands without its channels."""
    drivers: dict[str, Any] = {}
    for spec in instrument_specs:
        try:
            drivers[spec["name"]] = unopened(
                spec["kind"], spec["url"], **dict(spec.get("options") or {})
            )
        except (InstrumentError, KeyError, TypeError, ValueError):
            drivers[spec["name"]] = driver_class(spec["kind"])
    return Layout.of(drivers, envelope.vessels)


__all__ = [
    "SafeStation",
    "actuated_channels",
    "available_drivers",
    "check_device_faults",
    "check_instrument",
    "open_station",
    "probe",
    "station_layout",
]
