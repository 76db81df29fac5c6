"""The physics both simulated benches share: time, faults, wire log, pumps, hotplate.

:class:`BenchWorld` is the base of every station's world (the colour bench's
:class:`~simulators.world.StationWorld`, the buffer bench's
:class:`~simulators.buffer_world.BufferWorld`). It holds what the device
simulators of :mod:`simulators.pump` and :mod:`simulators.hotplate` use:

* ``clock`` (simulated seconds), ``rng`` (numpy, seeded: everything is
  deterministic given the seed and the sequence of calls), ``lock`` (an RLock:
  simulators run on several threads), ``faults`` (:class:`Faults`), ``wire``
  (:class:`WireLog`);
* ``pumps`` (address -> :class:`PumpState`): motion integrated by
  :meth:`BenchWorld.advance`; what a pump's stroke does to the vessel is the
  subclass's :meth:`BenchWorld._pump_effect` hook (``delta`` mL of the stroke,
  before the ``clogged-pump`` factor, which :meth:`BenchWorld.delivery_factor`
  gives);
* ``hotplate`` (:class:`HotplateState`): the plate approaches the setpoint
  (heater on) or ambient (off) with ``tau_plate_s``; the liquid approaches the
  plate with ``tau_liquid_s`` (halved while stirring) when the subclass's
  :meth:`BenchWorld._liquid_on_plate` says there is liquid, else ambient; the
  stirrer ramps to its setpoint (time constant 2 s). Device watchdog: no
  register write for ``watchdog_s`` switches heater and stirrer off and sets
  the watchdog-tripped flag (:meth:`BenchWorld.hotplate_write` feeds it).
  Over-temperature cut-out: a plate above ``max_c`` (or the
  ``hotplate-overtemp`` fault) sets the flag and heating stops until an
  enable is written with the plate below ``max_c`` and the fault cleared.

The world is advanced lazily to the clock's ``now()`` whenever a simulator
reads or changes it, in steps of at most ``max_step`` simulated seconds:
pumps, then the hotplate, then the subclass's :meth:`BenchWorld._step_contents`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulators.clock import SimClock

AMBIENT_C = 22.0


class Faults:
    """Injected faults, by name, with parameters. Thread-safe.

    One list for both benches (simulators read the ones that concern them).
    Colour bench and shared:

    ``clogged-pump``      ``pump=<fluid or address>`` (default pump 0), ``factor=0.4``: acknowledges,
                          delivers ``factor`` of it (the balance shows the missing mass)
    ``stuck-heater``      ``temperature_c=120``: the heater stays on whatever the enable register says
    ``sensor-dropout``    the colour sensor stops notifying and reads fail
    ``garbled-bytes``     ``device=pumps|hotplate|..., probability=1.0``: replies are corrupted
    ``modbus-exception``  ``code=4``: every Modbus request gets this exception code
    ``dropped-connection`` ``device=...``: the simulator drops its link (edge-triggered)
    ``broker-restart``    the MQTT broker restarts (edge-triggered)
    ``camera-freeze``     the camera serves the same frame forever
    ``vial-missing``      the vial is removed from the scene
    ``no-reply``          ``device=...``: the device stops answering
    ``heartbeat-stop``    ``device=enclosure``: the device stops publishing heartbeats (still answers)
    ``pump-alarm``        ``pump=<fluid or address>, code=S``: the pump stops and answers ``A?<code>``
                          (R reset, S stalled, T safe-mode timeout, E comms error) until cleared;
                          ``on_run=True``: only once it is told to ``RUN`` (a motor that stalls
                          when it starts), answering normally until then
    ``hotplate-overtemp``  the hotplate's over-temperature cut-out fires (a failed plate sensor or
                          a runaway the device sees first): status bit2 set, heating cut, until
                          cleared (and an enable written, as for a real over-temperature)
    ``hotplate-probe-fault`` the hotplate's liquid probe fails open: input 1 reads 0x8000 (no value)
                          and status bit3 (probe fault) is set until cleared

    Buffer bench (:mod:`simulators.buffer_world`; ``garbled-bytes``, ``no-reply`` and
    ``modbus-exception`` take ``device="ph"`` or ``"hotplate"`` there, one unit of the shared line):

    ``probe-out``          the pH probe is out of the liquid (not immersed)
    ``probe-drift``        ``mv_per_h=60``: the electrode drifts this fast (instead of ~0.5 mV/h)
    ``balance-overload``   ``mass_g=250``: an extra load on the pan (negative: pan lifted -> underload)
    ``balance-vibration``  ``sigma_mg=5``: extra vibration noise; the balance never settles
    """

    KNOWN = (
        "clogged-pump",
        "stuck-heater",
        "sensor-dropout",
        "garbled-bytes",
        "modbus-exception",
        "dropped-connection",
        "broker-restart",
        "camera-freeze",
        "vial-missing",
        "no-reply",
        "pump-alarm",
        "hotplate-overtemp",
        "hotplate-probe-fault",
        "heartbeat-stop",
        "probe-out",
        "probe-drift",
        "balance-overload",
        "balance-vibration",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, dict[str, Any]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def inject(self, name: str, **params: Any) -> None:
        if name not in self.KNOWN:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(self.KNOWN)}")
        with self._lock:
            self._active[name] = dict(params)
            listeners = list(self._listeners)
        for cb in listeners:
            cb(name, dict(params))

    def clear(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._active.clear()
            else:
                self._active.pop(name, None)

    def get(self, name: str) -> dict[str, Any] | None:
        """Parameters of an active fault, or None."""
        with self._lock:
            params = self._active.get(name)
            return dict(params) if params is not None else None

    def active(self, name: str, **match: Any) -> dict[str, Any] | None:
        """The fault's parameters if active and every ``match`` key equals (or is absent)."""
        params = self.get(name)
        if params is None:
            return None
        for key, value in match.items():
            if key in params and params[key] != value:
                return None
        return params

    def on_inject(self, callback: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``callback(name, params)`` on every injection (for edge-triggered faults)."""
        with self._lock:
            self._listeners.append(callback)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._active)


@dataclass
class WireRecord:
    sim_t: float
    real_t: float
    device: str
    data: Any
    note: str = ""


class WireLog:
    """Everything that reached a simulated device, in arrival order (thread-safe).

    Tests use it to observe from the device side what really went over the wire.
    """

    def __init__(self, clock: SimClock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: list[WireRecord] = []

    def record(self, device: str, data: Any, note: str = "") -> None:
        rec = WireRecord(self._clock.now(), time.monotonic(), device, data, note)
        with self._lock:
            self._records.append(rec)

    def entries(self, device: str | None = None) -> list[WireRecord]:
        with self._lock:
            return [r for r in self._records if device is None or r.device == device]

    def data(self, device: str | None = None) -> list[Any]:
        return [r.data for r in self.entries(device)]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


@dataclass
class PumpState:
    """One syringe pump as the physics sees it. Volumes in mL, rate in mL/min."""

    address: int
    fluid: (
        str  # colour bench: red | green | blue | waste; buffer bench: acid | base | water | waste
    )
    diameter_mm: float = 14.43
    rate_ml_min: float = 1.0
    rate_units: str = "MM"
    volume_ml: float = 0.0
    volume_units: str = "ML"
    direction: str = "INF"  # INF | WDR
    phase: str = "stopped"  # stopped | running | paused
    remaining_ml: float = 0.0  # of the current run
    dispensed_inf_ml: float = 0.0
    dispensed_wdr_ml: float = 0.0
    delivered_to_vial_ml: float = 0.0  # what physically reached the vessel (less when clogged)
    alarm: str | None = None  # None or an alarm code letter (R, S, T, E)

    MIN_RATE = 0.001
    MAX_RATE = 30.0


@dataclass
class HotplateState:
    setpoint_c: float = 25.0
    stirrer_setpoint_rpm: int = 0
    heater_enabled: bool = False
    stirrer_enabled: bool = False
    watchdog_s: int = 0
    last_write_sim_t: float = 0.0
    plate_c: float = AMBIENT_C
    liquid_c: float = AMBIENT_C
    stirrer_rpm: float = 0.0
    probe_present: bool = True
    over_temperature: bool = False
    watchdog_tripped: bool = False
    max_c: float = 340.0
    tau_plate_s: float = 40.0
    tau_liquid_s: float = 90.0


class BenchWorld:
    """Shared physics of one simulated station. See the module docstring.

    Subclasses pass their pumps (address -> :class:`PumpState`) and implement
    :meth:`_pump_effect`, :meth:`_liquid_on_plate` and :meth:`_step_contents`.
    """

    def __init__(
        self,
        name: str,
        pumps: dict[int, PumpState],
        *,
        clock: SimClock | None = None,
        seed: int = 0,
        max_step: float = 0.5,
    ) -> None:
        self.name = name
        self.clock = clock or SimClock()
        self.rng = np.random.default_rng(seed)
        self.lock = threading.RLock()
        self.faults = Faults()
        self.wire = WireLog(self.clock)
        self.max_step = max_step
        self.pumps = pumps
        self.hotplate = HotplateState()
        self._t = self.clock.now()

    # ------------------------------------------------------------------ time
    def advance(self) -> float:
        """Integrate the physics up to the clock's now; returns simulated now."""
        with self.lock:
            now = self.clock.now()
            while self._t < now:
                dt = min(self.max_step, now - self._t)
                self._step(dt)
                self._t += dt
            return self._t

    @property
    def sim_time(self) -> float:
        """The simulated time the world has been integrated to (the last :meth:`advance`)."""
        return self._t

    def _step(self, dt: float) -> None:
        self._step_pumps(dt)
        self._step_hotplate(dt)
        self._step_contents(dt)

    def _step_contents(self, dt: float) -> None:
        """What happens in the vessel during ``dt`` (chemistry, mixing, probes). Hook."""

    # ----------------------------------------------------------------- pumps
    def pump_by_fluid(self, fluid: str) -> PumpState:
        for pump in self.pumps.values():
            if pump.fluid == fluid:
                return pump
        raise KeyError(fluid)

    def delivery_factor(self, pump: PumpState) -> float:
        """Fraction of a stroke that really moves liquid (``clogged-pump`` fault; default pump 0)."""
        clog = self.faults.get("clogged-pump")
        if clog is None:
            return 1.0
        target = clog.get("pump", self.pumps[min(self.pumps)].fluid)
        if target in (pump.fluid, pump.address, str(pump.address)):
            return float(clog.get("factor", 0.4))
        return 1.0

    def _step_pumps(self, dt: float) -> None:
        for pump in self.pumps.values():
            if pump.phase != "running":
                continue
            delta = min(pump.remaining_ml, pump.rate_ml_min / 60.0 * dt)
            pump.remaining_ml -= delta
            if pump.direction == "INF":
                pump.dispensed_inf_ml += delta
            else:
                pump.dispensed_wdr_ml += delta
            self._pump_effect(pump, delta)
            if pump.remaining_ml <= 1e-12:
                pump.remaining_ml = 0.0
                pump.phase = "stopped"

    def _pump_effect(self, pump: PumpState, delta: float) -> None:
        """A stroke of ``delta`` mL of ``pump`` (its counters already moved). Hook."""
        raise NotImplementedError

    # -------------------------------------------------------------- hotplate
    def hotplate_write(self) -> None:
        """Note a register write (feeds the device watchdog). Call under ``lock``."""
        self.hotplate.last_write_sim_t = self.clock.now()

    def heater_effective(self) -> tuple[bool, float]:
        """(heating?, target plate temperature) including the stuck-heater fault."""
        hp = self.hotplate
        stuck = self.faults.get("stuck-heater")
        if stuck is not None:
            return True, float(stuck.get("temperature_c", 120.0))
        if hp.heater_enabled and not hp.over_temperature and not hp.watchdog_tripped:
            return True, hp.setpoint_c
        return False, AMBIENT_C

    def _liquid_on_plate(self) -> bool:
        """Is there liquid on the plate whose temperature follows it? Hook."""
        raise NotImplementedError

    def _step_hotplate(self, dt: float) -> None:
        hp = self.hotplate
        t = self._t + dt
        if hp.watchdog_s > 0 and (t - hp.last_write_sim_t) > hp.watchdog_s:
            if hp.heater_enabled or hp.stirrer_enabled:
                hp.heater_enabled = False
                hp.stirrer_enabled = False
                hp.watchdog_tripped = True
        if self.faults.get("hotplate-overtemp") is not None:
            hp.over_temperature = True  # the device's cut-out fired (it heats no more)
        heating, target = self.heater_effective()
        target = max(target, AMBIENT_C)  # a heater cannot cool below ambient
        hp.plate_c += (target - hp.plate_c) * (1.0 - math.exp(-dt / hp.tau_plate_s))
        if hp.plate_c > hp.max_c:
            hp.over_temperature = True
        stir_target = hp.stirrer_setpoint_rpm if hp.stirrer_enabled else 0.0
        hp.stirrer_rpm += (stir_target - hp.stirrer_rpm) * (1.0 - math.exp(-dt / 2.0))
        if self._liquid_on_plate():
            tau = hp.tau_liquid_s / (2.0 if hp.stirrer_rpm > 50 else 1.0)
            hp.liquid_c += (hp.plate_c - hp.liquid_c) * (1.0 - math.exp(-dt / tau))
        else:
            hp.liquid_c += (AMBIENT_C - hp.liquid_c) * (1.0 - math.exp(-dt / 30.0))


__all__ = [
    "AMBIENT_C",
    "BenchWorld",
    "Faults",
    "HotplateState",
    "PumpState",
    "WireLog",
    "WireRecord",
]
