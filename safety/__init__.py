"""Safety: envelope, guard on every actuation, dry run, monitors, latched trips, e-stop, audit.

These are software interlocks layered *above* the hardware ones: the bench's
hardware e-stop and the devices' own cut-outs never depend on labbridge.

Nothing above this layer holds a driver: :func:`open_station` connects a
station's instruments and hands back a :class:`SafeStation` whose guarded
handles are the only way to act (import-linter checks that ``loops`` and
``bridge`` never import drivers, transports or ``instruments.connect``).
"""

from safety.capabilities import Camera, HeaterStirrer, Light, Pump, Sensor, require
from safety.dryrun import DryRunReport, dry_run
from safety.envelope import Envelope, EnvelopeError
from safety.envelopeload import load_envelope, reference_envelope
from safety.estop import EStop, EStopReport, install_signal_handlers
from safety.expr import RuleSyntaxError
from safety.guard import Guard, GuardedInstrument
from safety.limits import Violation
from safety.model import (
    AuditTrail,
    Command,
    Latch,
    ResetRefused,
    SafetyError,
    SafetyRefusal,
    StationState,
    StationTripped,
    Verdict,
)
from safety.monitors import Heartbeat, Interlock, Monitor, Staleness, Threshold
from safety.monitorspec import FaultSetting, MonitorSpec
from safety.station import (
    SafeStation,
    actuated_channels,
    available_drivers,
    check_device_faults,
    check_instrument,
    open_station,
    probe,
    station_layout,
)
from safety.supervisor import StationSupervisor, TripReport

__all__ = [
    "AuditTrail",
    "Camera",
    "HeaterStirrer",
    "Light",
    "Pump",
    "Sensor",
    "require",
    "Command",
    "DryRunReport",
    "EStop",
    "EStopReport",
    "Envelope",
    "EnvelopeError",
    "FaultSetting",
    "Guard",
    "GuardedInstrument",
    "Heartbeat",
    "Interlock",
    "Latch",
    "Monitor",
    "MonitorSpec",
    "ResetRefused",
    "RuleSyntaxError",
    "SafeStation",
    "SafetyError",
    "SafetyRefusal",
    "Staleness",
    "StationState",
    "StationSupervisor",
    "StationTripped",
    "Threshold",
    "TripReport",
    "Verdict",
    "Violation",
    "actuated_channels",
    "available_drivers",
    "check_device_faults",
    "check_instrument",
    "dry_run",
    "install_signal_handlers",
    "load_envelope",
    "open_station",
    "probe",
    "station_layout",
    "reference_envelope",
]
