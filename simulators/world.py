"""The physics behind one simulated station.

One :class:`StationWorld` per station holds everything the device simulators
share: the vial (volumes of each dye and of the heat-formed product), the
syringe pumps' motion, the hotplate's first-order thermal dynamics, the
enclosure's lid and light, and the lighting the camera sees. It is advanced
lazily to the simulated clock's ``now()`` whenever a simulator reads or
changes it, in steps of at most ``max_step`` simulated seconds, under one lock
(simulators run on several threads: pymodbus and the HTTP camera on asyncio,
paho on its own thread).

Model
-----
* Vial: capacity 3.0 mL. Liquid beyond capacity spills (``spilled_ml``).
* Dyes are stock solutions; the colour depends on the fractions of each
  species (Beer-Lambert with per-channel absorbances, path length fixed).
* Temperature- and time-dependent colour shift: blue dye converts to a
  yellow-brown product at ``k(T) = k25 * 2 ** ((T - 25) / 10)`` per second
  (doubling every 10 °C), so heating time and temperature change the colour.
* Hotplate: the plate approaches the setpoint (heater on) or ambient (off)
  with time constant ``tau_plate``; the liquid approaches the plate with
  ``tau_liquid`` (halved while stirring). The stirrer ramps to its setpoint.
  Device watchdog: no register write for ``watchdog_s`` switches heater and
  stirrer off and sets the watchdog-tripped flag.
* Colour sensor: counts = white reference x transmission x integration time
  / 100 ms x (1 + noise); saturation above 65535; dark below a floor.
* Lighting drift: a slow sinusoidal gain on the camera's illumination, plus
  the enclosure LED.

Faults (:class:`Faults`) that change physics live here (clogged pump, stuck
heater); faults on a wire (garbled bytes, exceptions, dropped connections) are
read by the simulator of that wire.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulators.clock import SimClock

AMBIENT_C = 22.0
VIAL_CAPACITY_ML = 3.0
DYES = ("red", "green", "blue")
SPECIES = ("red", "green", "blue", "product")

# Absorbance (per unit fraction, over the vial's path length) in R, G, B.
ABSORBANCE: dict[str, tuple[float, float, float]] = {
    "red": (0.04, 1.30, 1.00),
    "green": (1.10, 0.06, 0.85),
    "blue": (1.25, 0.75, 0.05),
    "product": (0.10, 0.35, 1.20),
}
# Colour-sensor counts for a white reference at 100 ms integration.
WHITE_COUNTS = (42000.0, 45000.0, 39000.0)
K25_PER_S = 1.5e-4  # blue -> product rate at 25 degC


class Faults:
    """Injected faults, by name, with parameters. Thread-safe.

    Known names (simulators read the ones that concern them):

    ``clogged-pump``      ``pump=<fluid or address>, factor=0.4``: acknowledges, delivers ``factor`` of it
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
                          (R reset, S stalled, T safe-mode timeout, E comms error) until cleared
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
        "heartbeat-stop",
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
    fluid: str  # "red" | "green" | "blue" | "waste"
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
    delivered_to_vial_ml: float = 0.0  # what physically arrived (differs when clogged)
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


@dataclass
class EnclosureState:
    lid: str = "closed"
    light_on: bool = False
    intensity: float = 0.0
    started_sim_t: float = 0.0


@dataclass
class VialState:
    species_ml: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SPECIES, 0.0))
    present: bool = True
    spilled_ml: float = 0.0

    @property
    def volume_ml(self) -> float:
        return float(sum(self.species_ml.values()))


class StationWorld:
    """The shared physical state of one simulated station. See the module docstring."""

    def __init__(
        self,
        name: str = "bench-a",
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
        self.vial = VialState()
        self.pumps: dict[int, PumpState] = {
            0: PumpState(0, "red"),
            1: PumpState(1, "green"),
            2: PumpState(2, "blue"),
            3: PumpState(3, "waste"),
        }
        self.hotplate = HotplateState()
        self.enclosure = EnclosureState(started_sim_t=self.clock.now())
        self.sensor_seq = 0
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

    def _step(self, dt: float) -> None:
        self._step_pumps(dt)
        self._step_hotplate(dt)
        self._step_chemistry(dt)

    # ----------------------------------------------------------------- pumps
    def pump_by_fluid(self, fluid: str) -> PumpState:
        for pump in self.pumps.values():
            if pump.fluid == fluid:
                return pump
        raise KeyError(fluid)

    def _delivery_factor(self, pump: PumpState) -> float:
        clog = self.faults.get("clogged-pump")
        if clog is None:
            return 1.0
        target = clog.get("pump", "red")
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
        vial = self.vial
        if pump.fluid in DYES and pump.direction == "INF":
            delivered = delta * self._delivery_factor(pump)
            pump.delivered_to_vial_ml += delivered
            if not vial.present:
                vial.spilled_ml += delivered
                return
            room = max(0.0, VIAL_CAPACITY_ML - vial.volume_ml)
            into = min(room, delivered)
            vial.species_ml[pump.fluid] += into
            vial.spilled_ml += delivered - into
        elif pump.fluid == "waste" and pump.direction == "WDR" and vial.present:
            total = vial.volume_ml
            take = min(total, delta * self._delivery_factor(pump))
            pump.delivered_to_vial_ml -= take
            if total > 0:
                for sp in SPECIES:
                    vial.species_ml[sp] -= vial.species_ml[sp] / total * take
                    vial.species_ml[sp] = max(0.0, vial.species_ml[sp])

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

    def _step_hotplate(self, dt: float) -> None:
        hp = self.hotplate
        t = self._t + dt
        if hp.watchdog_s > 0 and (t - hp.last_write_sim_t) > hp.watchdog_s:
            if hp.heater_enabled or hp.stirrer_enabled:
                hp.heater_enabled = False
                hp.stirrer_enabled = False
                hp.watchdog_tripped = True
        heating, target = self.heater_effective()
        target = max(target, AMBIENT_C)  # a heater cannot cool below ambient
        hp.plate_c += (target - hp.plate_c) * (1.0 - math.exp(-dt / hp.tau_plate_s))
        if hp.plate_c > hp.max_c:
            hp.over_temperature = True
        stir_target = hp.stirrer_setpoint_rpm if hp.stirrer_enabled else 0.0
        hp.stirrer_rpm += (stir_target - hp.stirrer_rpm) * (1.0 - math.exp(-dt / 2.0))
        if self.vial.present and self.vial.volume_ml > 0.05:
            tau = hp.tau_liquid_s / (2.0 if hp.stirrer_rpm > 50 else 1.0)
            hp.liquid_c += (hp.plate_c - hp.liquid_c) * (1.0 - math.exp(-dt / tau))
        else:
            hp.liquid_c += (AMBIENT_C - hp.liquid_c) * (1.0 - math.exp(-dt / 30.0))

    # ------------------------------------------------------------- chemistry
    def _step_chemistry(self, dt: float) -> None:
        blue = self.vial.species_ml["blue"]
        if blue <= 0:
            return
        k = K25_PER_S * 2.0 ** ((self.hotplate.liquid_c - 25.0) / 10.0)
        converted = blue * (1.0 - math.exp(-k * dt))
        self.vial.species_ml["blue"] -= converted
        self.vial.species_ml["product"] += converted

    def fractions(self) -> dict[str, float]:
        total = self.vial.volume_ml
        if total <= 0:
            return dict.fromkeys(SPECIES, 0.0)
        return {sp: v / total for sp, v in self.vial.species_ml.items()}

    def transmission(self) -> tuple[float, float, float]:
        """Fraction of white light the liquid transmits in R, G, B (1.0 = clear/empty)."""
        with self.lock:
            fr = self.fractions()
        absorb = [0.0, 0.0, 0.0]
        for sp, f in fr.items():
            for c in range(3):
                absorb[c] += ABSORBANCE[sp][c] * f
        r, g, b = (10.0 ** (-a) for a in absorb)
        return (r, g, b)

    # ------------------------------------------------------- colour sensor
    def sensor_counts(self, integration_ms: int) -> tuple[int, int, int, int, int]:
        """(red, green, blue, clear, status) as the colour sensor would measure now.

        status: 0 ok, 1 saturated, 2 dark. The sensor looks through the vial at
        its own white LED; with less than 0.3 mL the window sees air (white).
        """
        self.advance()
        with self.lock:
            volume = self.vial.volume_ml
            present = self.vial.present
        if present and volume >= 0.3:
            trans = self.transmission()
        else:
            trans = (0.92, 0.92, 0.92)  # glass / air only
        scale = integration_ms / 100.0
        values = []
        for c in range(3):
            noise = 1.0 + float(self.rng.normal(0.0, 0.004))
            values.append(
                WHITE_COUNTS[c] * trans[c] * scale * noise + float(self.rng.normal(0, 15))
            )
        clear = 0.35 * sum(values)
        raw = [*values, clear]
        status = 0
        if any(v > 65535 for v in raw):
            status = 1
        elif clear < 300:
            status = 2
        counts = [int(min(65535, max(0, round(v)))) for v in raw]
        with self.lock:
            self.sensor_seq = (self.sensor_seq + 1) & 0xFFFF
        return (counts[0], counts[1], counts[2], counts[3], status)

    # --------------------------------------------------------------- camera
    def lighting_gain(self, sim_t: float | None = None) -> float:
        """Illumination the camera sees: ambient drift plus the enclosure LED."""
        t = self.clock.now() if sim_t is None else sim_t
        ambient = (
            0.80
            + 0.08 * math.sin(2 * math.pi * t / 600.0)
            + 0.03 * math.sin(2 * math.pi * t / 97.0)
        )
        led = 0.25 * self.enclosure.intensity if self.enclosure.light_on else 0.0
        return ambient + led

    def snapshot(self) -> dict[str, Any]:
        """A plain-data picture of the world (for tests, the camera renderer, debugging)."""
        now = self.advance()
        with self.lock:
            hp = self.hotplate
            return {
                "sim_t": now,
                "vial": {
                    "present": self.vial.present,
                    "volume_ml": self.vial.volume_ml,
                    "species_ml": dict(self.vial.species_ml),
                    "spilled_ml": self.vial.spilled_ml,
                },
                "transmission": self.transmission(),
                "hotplate": {
                    "plate_c": hp.plate_c,
                    "liquid_c": hp.liquid_c,
                    "stirrer_rpm": hp.stirrer_rpm,
                    "setpoint_c": hp.setpoint_c,
                    "heater_enabled": hp.heater_enabled,
                    "stirrer_enabled": hp.stirrer_enabled,
                    "watchdog_tripped": hp.watchdog_tripped,
                },
                "pumps": {
                    p.fluid: {
                        "phase": p.phase,
                        "dispensed_inf_ml": p.dispensed_inf_ml,
                        "delivered_to_vial_ml": p.delivered_to_vial_ml,
                    }
                    for p in self.pumps.values()
                },
                "enclosure": {
                    "lid": self.enclosure.lid,
                    "light_on": self.enclosure.light_on,
                    "intensity": self.enclosure.intensity,
                },
                "lighting_gain": self.lighting_gain(now),
                "faults": self.faults.names(),
            }
