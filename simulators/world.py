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

Time, faults, wire log, pump motion and the hotplate's dynamics are shared
with the buffer bench in :class:`simulators.benchworld.BenchWorld` (re-exported
here with its dataclasses); this module adds the vial, its colour chemistry,
the colour sensor, the enclosure and the camera's lighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from simulators.benchworld import (
    AMBIENT_C,
    BenchWorld,
    Faults,
    HotplateState,
    PumpState,
    WireLog,
    WireRecord,
)
from simulators.clock import SimClock

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


class StationWorld(BenchWorld):
    """The shared physical state of one simulated station. See the module docstring."""

    def __init__(
        self,
        name: str = "bench-a",
        *,
        clock: SimClock | None = None,
        seed: int = 0,
        max_step: float = 0.5,
    ) -> None:
        pumps = {
            0: PumpState(0, "red"),
            1: PumpState(1, "green"),
            2: PumpState(2, "blue"),
            3: PumpState(3, "waste"),
        }
        super().__init__(name, pumps, clock=clock, seed=seed, max_step=max_step)
        self.vial = VialState()
        self.enclosure = EnclosureState(started_sim_t=self.clock.now())
        self.sensor_seq = 0

    def _step_contents(self, dt: float) -> None:
        self._step_chemistry(dt)

    def _liquid_on_plate(self) -> bool:
        return self.vial.present and self.vial.volume_ml > 0.05

    def _pump_effect(self, pump: PumpState, delta: float) -> None:
        vial = self.vial
        if pump.fluid in DYES and pump.direction == "INF":
            delivered = delta * self.delivery_factor(pump)
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
            take = min(total, delta * self.delivery_factor(pump))
            pump.delivered_to_vial_ml -= take
            if total > 0:
                for sp in SPECIES:
                    vial.species_ml[sp] -= vial.species_ml[sp] / total * take
                    vial.species_ml[sp] = max(0.0, vial.species_ml[sp])

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


__all__ = [
    "ABSORBANCE",
    "AMBIENT_C",
    "DYES",
    "K25_PER_S",
    "SPECIES",
    "VIAL_CAPACITY_ML",
    "WHITE_COUNTS",
    "EnclosureState",
    "Faults",
    "HotplateState",
    "PumpState",
    "StationWorld",
    "VialState",
    "WireLog",
    "WireRecord",
]
