"""The physics behind one simulated buffer-formulation station (the second bench).

A beaker on an analytical balance on the hotplate-stirrer; four syringe pumps
(``acid`` 0, ``base`` 1, ``water`` 2, ``waste`` 3) on one daisy chain; a pH
probe in the beaker. :class:`BufferWorld` derives from
:class:`~simulators.benchworld.BenchWorld` (clock, rng, lock, faults, wire
log, pump motion, hotplate dynamics), so :class:`~simulators.pump.PumpChainSim`
and :class:`~simulators.hotplate.HotplateSim` run on it unchanged. It is
advanced lazily like the colour bench's world.

Model
-----
* Stocks (:data:`STOCKS`, 25 degC): ``acid`` 0.2 M NaH2PO4 (monobasic, density
  1.0160 g/mL), ``base`` 0.2 M Na2HPO4 (dibasic, 1.0215 g/mL), ``water``
  (0.99705 g/mL). Volumes are additive (no excess volume of mixing).
* Beaker: 150 mL low-form glass beaker with a stir bar, 52.3817 g
  (:data:`BEAKER_CAPACITY_ML`, :data:`BEAKER_TARE_G`). Liquid beyond the
  capacity spills over the rim and runs off the pan (``spilled_ml``; not
  weighed). The waste pump (withdrawing) takes the mixed liquid, composition
  preserved. Evaporation is negligible.
* Well-mixed composition: total phosphate and sodium from the stock volumes
  (``beaker.stock_ml``). The bulk around the probe approaches it with a
  mixing time constant of 5 s at 300 rpm, inversely proportional to the
  stirrer speed, at most 180 s (unstirred; :func:`mixing_tau_s`).
* pH: :func:`simulators.phosphate.solve_ph` (charge balance, pKa(T), Kw(T),
  Davies activities) of the bulk at the liquid's temperature. A beaker with
  no liquid has no pH (None).
* Temperature: the hotplate model of the base (liquid follows the plate,
  ``tau_liquid_s`` 300 s for this beaker, halved while stirring); liquid
  dispensed at ambient (22 degC) mixes in by volume.
* pH electrode: potential ``E = offset + drift - slope x Nernst(T) x (pH - 7)``
  with a realistic offset (+7.5 mV at pH 7) and slope (98.5 % of Nernst),
  first-order response (tau 10 s) towards the bulk's equilibrium potential,
  drift 0.5 mV/h (``probe-drift`` fault: ``mv_per_h``, default 60). Immersed
  only with at least :data:`PROBE_MIN_ML` (20 mL) in the beaker and not under
  the ``probe-out`` fault; out of the liquid the potential holds its last
  value and the probe's temperature sensor reads the air (ambient). The
  transmitter simulator (:mod:`simulators.ph_meter`) reads
  :meth:`BufferWorld.probe_samples` (one sample per integration step) for its
  damping and its stability flag, and converts potentials to pH with its own
  calibration.
* Balance (capacity 220 g, readability 0.1 mg): the load is beaker + the
  liquid that really entered (a clogged pump shows as missing mass) + the
  ``balance-overload`` fault's ``mass_g``. A reading adds a slow drift
  (+/- 0.1 mg sinusoid, period 40 min, plus 0.1 mg/h) and Gaussian noise:
  vibration ``0.05 mg x (1 + (rpm / 100)^2)``, the ``balance-vibration``
  fault's ``sigma_mg`` and a transient of 20 mg decaying with 0.4 s after the
  last disturbance (liquid moving in or out, the stirrer's setpoint or enable
  changing, the stirrer more than 20 rpm from its target). Stable once :data:`BALANCE_SETTLE_S` (2 s)
  have passed since the last disturbance and the steady noise is at most
  0.25 mg (so unstable while the stirrer turns above 200 rpm); never stable
  when over- or underloaded (load above 220 g, or below -1 g: the pan lifted).

Everything is deterministic given the seed and the sequence of calls (the
noise is drawn from ``world.rng`` at each reading).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from simulators.benchworld import AMBIENT_C, BenchWorld, PumpState
from simulators.clock import SimClock
from simulators.phosphate import Speciation, nernst_mv, solve_ph


@dataclass(frozen=True)
class Stock:
    """A stock solution: total phosphate and sodium (mol/L) and density (g/mL)."""

    phosphate_m: float
    sodium_m: float
    density_g_ml: float


STOCKS: dict[str, Stock] = {
    "acid": Stock(0.2, 0.2, 1.0160),  # 0.2 M NaH2PO4
    "base": Stock(0.2, 0.4, 1.0215),  # 0.2 M Na2HPO4
    "water": Stock(0.0, 0.0, 0.99705),
}
BEAKER_CAPACITY_ML = 150.0
BEAKER_TARE_G = 52.3817
PROBE_MIN_ML = 20.0
TAU_LIQUID_S = 300.0
TAU_MIX_300RPM_S = 5.0
TAU_MIX_UNSTIRRED_S = 180.0

ELECTRODE_OFFSET_MV = 7.5
ELECTRODE_SLOPE = 0.985
PROBE_TAU_S = 10.0
PROBE_DRIFT_MV_PER_H = 0.5
PROBE_FAULT_DRIFT_MV_PER_H = 60.0
PROBE_HISTORY_S = 75.0

BALANCE_CAPACITY_G = 220.0
BALANCE_UNDERLOAD_G = -1.0
BALANCE_SETTLE_S = 2.0
BALANCE_NOISE_MG = 0.05
BALANCE_STABLE_SIGMA_MG = 0.25
BALANCE_TRANSIENT_MG = 20.0
BALANCE_TRANSIENT_TAU_S = 0.4
BALANCE_OVERLOAD_G_DEFAULT = 250.0
STIRRER_RAMP_RPM = (
    20.0  # the stirrer is still ramping (a disturbance) while this far from its target
)


def mixing_tau_s(rpm: float) -> float:
    """Time constant with which the bulk around the probe approaches the mixed composition."""
    if rpm <= 0:
        return TAU_MIX_UNSTIRRED_S
    return min(TAU_MIX_UNSTIRRED_S, TAU_MIX_300RPM_S * 300.0 / rpm)


def vibration_sigma_mg(rpm: float) -> float:
    """The balance's steady noise (1 sigma, mg) while the stirrer turns at ``rpm``."""
    return BALANCE_NOISE_MG * (1.0 + (max(0.0, rpm) / 100.0) ** 2)


@dataclass
class BeakerState:
    """The beaker's liquid: volume of each stock (the well-mixed composition)."""

    stock_ml: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STOCKS, 0.0))
    spilled_ml: float = 0.0
    bulk_phosphate_m: float = 0.0  # around the probe (lags the mixed composition)
    bulk_sodium_m: float = 0.0

    @property
    def volume_ml(self) -> float:
        return float(sum(self.stock_ml.values()))


@dataclass
class ProbeState:
    """The pH electrode: its parameters and its state (potential in mV, temperature in degC)."""

    offset_mv: float = ELECTRODE_OFFSET_MV
    slope: float = ELECTRODE_SLOPE  # fraction of the Nernst slope
    tau_s: float = PROBE_TAU_S
    drift_mv: float = 0.0
    potential_mv: float = ELECTRODE_OFFSET_MV  # a new probe in pH-7 storage solution
    temperature_c: float = AMBIENT_C
    immersed: bool = False


@dataclass(frozen=True)
class ProbeSample:
    """One integration step of the probe: end time, duration, potential, temperature, immersed."""

    t: float
    dt: float
    potential_mv: float
    temperature_c: float
    immersed: bool


@dataclass(frozen=True)
class BalanceReading:
    """What the weighing cell gives now (g, relative to the power-on zero with an empty pan)."""

    gross_g: float
    stable: bool
    overload: bool
    underload: bool


class BufferWorld(BenchWorld):
    """The shared physical state of one buffer-formulation station. See the module docstring.

    Public API (call from any thread; each call advances the world to now):
    :meth:`add` / :meth:`withdraw` / :meth:`empty` (put liquid in or take it
    out directly, as an operator would), :meth:`mixed_ph`, :meth:`bulk_ph`,
    :meth:`liquid_mass_g`, :meth:`balance_load_g`, :meth:`balance_reading`,
    :meth:`electrode_potential`, :meth:`probe_in_buffer`,
    :meth:`probe_samples`, :meth:`snapshot`; state in ``beaker``
    (:class:`BeakerState`), ``probe`` (:class:`ProbeState`), ``pumps`` and
    ``hotplate`` (the base), ``stocks``.
    """

    def __init__(
        self,
        name: str = "buffer-a",
        *,
        clock: SimClock | None = None,
        seed: int = 0,
        max_step: float = 0.5,
    ) -> None:
        pumps = {
            0: PumpState(0, "acid"),
            1: PumpState(1, "base"),
            2: PumpState(2, "water"),
            3: PumpState(3, "waste"),
        }
        super().__init__(name, pumps, clock=clock, seed=seed, max_step=max_step)
        self.hotplate.tau_liquid_s = TAU_LIQUID_S
        self.stocks: dict[str, Stock] = dict(STOCKS)
        self.beaker = BeakerState()
        self.probe = ProbeState()
        self.capacity_ml = BEAKER_CAPACITY_ML
        self.beaker_tare_g = BEAKER_TARE_G
        self._samples: deque[ProbeSample] = deque()
        self._disturbed_t = -math.inf
        self._stirrer_seen = (self.hotplate.stirrer_enabled, self.hotplate.stirrer_setpoint_rpm)
        self._ph_cache: tuple[tuple[str, str, float], Speciation | None] | None = None

    # ----------------------------------------------------------------- liquid
    def add(self, stock: str, ml: float) -> float:
        """Pour ``ml`` of a stock into the beaker (an operator, or a pump's stroke).

        Returns the volume that stayed in the beaker (the rest spilled).
        """
        if stock not in self.stocks:
            raise KeyError(f"unknown stock {stock!r}; stocks: {', '.join(self.stocks)}")
        if ml < 0:
            raise ValueError(f"cannot add a negative volume ({ml} mL)")
        self.advance()
        with self.lock:
            return self._add(stock, ml)

    def _add(self, stock: str, ml: float) -> float:
        beaker = self.beaker
        before = beaker.volume_ml
        into = min(max(0.0, self.capacity_ml - before), ml)
        beaker.spilled_ml += ml - into
        if into <= 0:
            return 0.0
        hp = self.hotplate
        hp.liquid_c = (before * hp.liquid_c + into * AMBIENT_C) / (before + into)
        beaker.stock_ml[stock] += into
        if before < 0.5:  # nothing for fresh liquid to mix into: the bulk is what arrived
            beaker.bulk_phosphate_m, beaker.bulk_sodium_m = self._mixed_concentrations()
        self._disturbed_t = self._t
        return into

    def withdraw(self, ml: float) -> float:
        """Take up to ``ml`` of the mixed liquid out (composition preserved); returns what was taken."""
        if ml < 0:
            raise ValueError(f"cannot withdraw a negative volume ({ml} mL)")
        self.advance()
        with self.lock:
            return self._withdraw(ml)

    def _withdraw(self, ml: float) -> float:
        beaker = self.beaker
        total = beaker.volume_ml
        take = min(total, ml)
        if take <= 0:
            return 0.0
        keep = (total - take) / total
        for name in beaker.stock_ml:
            beaker.stock_ml[name] *= keep
        if beaker.volume_ml < 1e-9:
            beaker.stock_ml = dict.fromkeys(beaker.stock_ml, 0.0)
            beaker.bulk_phosphate_m = beaker.bulk_sodium_m = 0.0
        self._disturbed_t = self._t
        return take

    def empty(self) -> None:
        """Empty the beaker (rinsed and dried: an operator between experiments)."""
        self.advance()
        with self.lock:
            self.beaker.stock_ml = dict.fromkeys(self.beaker.stock_ml, 0.0)
            self.beaker.bulk_phosphate_m = self.beaker.bulk_sodium_m = 0.0
            self.hotplate.liquid_c = AMBIENT_C
            self._disturbed_t = self._t

    def _mixed_concentrations(self) -> tuple[float, float]:
        """(phosphate, sodium) in mol/L of the well-mixed liquid; (0, 0) when empty."""
        volume = self.beaker.volume_ml
        if volume <= 0:
            return 0.0, 0.0
        p = sum(self.stocks[s].phosphate_m * v for s, v in self.beaker.stock_ml.items())
        na = sum(self.stocks[s].sodium_m * v for s, v in self.beaker.stock_ml.items())
        return p / volume, na / volume

    def liquid_mass_g(self) -> float:
        """Mass of the liquid in the beaker (g)."""
        with self.lock:
            return float(
                sum(self.stocks[s].density_g_ml * v for s, v in self.beaker.stock_ml.items())
            )

    # ------------------------------------------------------------------- pH
    def _solve(self, phosphate_m: float, sodium_m: float, temperature_c: float) -> Speciation:
        key = (f"{phosphate_m:.6g}", f"{sodium_m:.6g}", round(temperature_c, 2))  # ~1e-6 pH
        if self._ph_cache is not None and self._ph_cache[0] == key:
            cached = self._ph_cache[1]
            assert cached is not None
            return cached
        spec = solve_ph(phosphate_m, sodium_m, temperature_c)
        self._ph_cache = (key, spec)
        return spec

    def mixed_ph(self) -> float | None:
        """The true pH of the well-mixed liquid now (None when the beaker is empty)."""
        self.advance()
        with self.lock:
            if self.beaker.volume_ml <= 0:
                return None
            p, na = self._mixed_concentrations()
            return solve_ph(p, na, self.hotplate.liquid_c).ph

    def bulk_ph(self) -> float | None:
        """The true pH of the liquid around the probe now (lags :meth:`mixed_ph` while mixing)."""
        self.advance()
        with self.lock:
            if self.beaker.volume_ml <= 0:
                return None
            b = self.beaker
            return self._solve(b.bulk_phosphate_m, b.bulk_sodium_m, self.hotplate.liquid_c).ph

    # ---------------------------------------------------------------- probe
    def electrode_potential(self, ph: float, temperature_c: float) -> float:
        """The potential (mV) the electrode settles to in a solution of ``ph`` at ``temperature_c``."""
        p = self.probe
        return p.offset_mv + p.drift_mv - p.slope * nernst_mv(temperature_c) * (ph - 7.0)

    def probe_in_buffer(self, ph: float, temperature_c: float) -> float:
        """The operator dips the probe in a buffer of ``ph`` and waits: it settles to that
        buffer's potential (returned); back in the beaker it responds from there."""
        self.advance()
        with self.lock:
            self.probe.potential_mv = self.electrode_potential(ph, temperature_c)
            return self.probe.potential_mv

    def probe_samples(self, window_s: float) -> list[ProbeSample]:
        """The probe's samples (one per integration step) of the last ``window_s`` seconds
        before :attr:`sim_time` (the world is advanced first; the last sample ends at it)."""
        with self.lock:
            now = self.advance()
            return [s for s in self._samples if s.t > now - window_s]

    def _probe_immersed(self) -> bool:
        return self.beaker.volume_ml >= PROBE_MIN_ML and self.faults.get("probe-out") is None

    # -------------------------------------------------------------- balance
    def balance_load_g(self) -> float:
        """The true load on the pan (g): beaker, liquid and the overload fault's mass."""
        with self.lock:
            load = self.beaker_tare_g + self.liquid_mass_g()
            fault = self.faults.get("balance-overload")
            if fault is not None:
                load += float(fault.get("mass_g", BALANCE_OVERLOAD_G_DEFAULT))
            return load

    def balance_drift_g(self, t: float) -> float:
        return 1e-4 * math.sin(2.0 * math.pi * t / 2400.0) + 1e-4 * t / 3600.0

    def balance_reading(self) -> BalanceReading:
        """One reading of the weighing cell now, with drift and noise. See the module docstring."""
        now = self.advance()
        with self.lock:
            load = self.balance_load_g()
            rpm = self.hotplate.stirrer_rpm
            steady = vibration_sigma_mg(rpm)
            fault = self.faults.get("balance-vibration")
            if fault is not None:
                steady = math.hypot(steady, float(fault.get("sigma_mg", 5.0)))
            since = now - self._disturbed_t
            transient = BALANCE_TRANSIENT_MG * math.exp(-since / BALANCE_TRANSIENT_TAU_S)
            sigma_g = math.hypot(steady, transient) / 1000.0
            gross = load + self.balance_drift_g(now) + float(self.rng.normal(0.0, sigma_g))
            overload = load > BALANCE_CAPACITY_G
            underload = load < BALANCE_UNDERLOAD_G
            stable = (
                not overload
                and not underload
                and since >= BALANCE_SETTLE_S
                and steady <= BALANCE_STABLE_SIGMA_MG
            )
            return BalanceReading(gross, stable, overload, underload)

    # ----------------------------------------------------------- integration
    def _liquid_on_plate(self) -> bool:
        return self.beaker.volume_ml > 1.0

    def _pump_effect(self, pump: PumpState, delta: float) -> None:
        if delta <= 0:
            return
        if pump.fluid in self.stocks and pump.direction == "INF":
            delivered = delta * self.delivery_factor(pump)
            pump.delivered_to_vial_ml += delivered
            self._add(pump.fluid, delivered)
        elif pump.fluid == "waste" and pump.direction == "WDR":
            pump.delivered_to_vial_ml -= self._withdraw(delta * self.delivery_factor(pump))

    def _step_contents(self, dt: float) -> None:
        t_end = self._t + dt
        hp = self.hotplate
        beaker = self.beaker
        # the balance: a stirrer change or ramp is a disturbance
        stirrer = (hp.stirrer_enabled, hp.stirrer_setpoint_rpm)
        target = hp.stirrer_setpoint_rpm if hp.stirrer_enabled else 0.0
        if stirrer != self._stirrer_seen or abs(hp.stirrer_rpm - target) > STIRRER_RAMP_RPM:
            self._stirrer_seen = stirrer
            self._disturbed_t = t_end
        # mixing
        p_mix, na_mix = self._mixed_concentrations()
        if beaker.volume_ml > 0:
            k = 1.0 - math.exp(-dt / mixing_tau_s(hp.stirrer_rpm))
            beaker.bulk_phosphate_m += (p_mix - beaker.bulk_phosphate_m) * k
            beaker.bulk_sodium_m += (na_mix - beaker.bulk_sodium_m) * k
        # the electrode
        probe = self.probe
        fault = self.faults.get("probe-drift")
        rate = (
            PROBE_DRIFT_MV_PER_H
            if fault is None
            else float(fault.get("mv_per_h", PROBE_FAULT_DRIFT_MV_PER_H))
        )
        probe.drift_mv += rate * dt / 3600.0
        probe.immersed = self._probe_immersed()
        if probe.immersed:
            probe.temperature_c = hp.liquid_c
            ph = self._solve(beaker.bulk_phosphate_m, beaker.bulk_sodium_m, hp.liquid_c).ph
            target_mv = self.electrode_potential(ph, hp.liquid_c)
            probe.potential_mv += (target_mv - probe.potential_mv) * (
                1.0 - math.exp(-dt / probe.tau_s)
            )
        else:
            probe.temperature_c = AMBIENT_C
        self._samples.append(
            ProbeSample(t_end, dt, probe.potential_mv, probe.temperature_c, probe.immersed)
        )
        while self._samples and self._samples[0].t < t_end - PROBE_HISTORY_S:
            self._samples.popleft()

    # -------------------------------------------------------------- snapshot
    def snapshot(self) -> dict[str, Any]:
        """A plain-data picture of the world (for tests, models, debugging)."""
        now = self.advance()
        with self.lock:
            hp = self.hotplate
            p_mix, na_mix = self._mixed_concentrations()
            empty = self.beaker.volume_ml <= 0
            return {
                "sim_t": now,
                "beaker": {
                    "volume_ml": self.beaker.volume_ml,
                    "stock_ml": dict(self.beaker.stock_ml),
                    "spilled_ml": self.beaker.spilled_ml,
                    "phosphate_m": p_mix,
                    "sodium_m": na_mix,
                    "mixed_ph": None if empty else solve_ph(p_mix, na_mix, hp.liquid_c).ph,
                    "liquid_mass_g": self.liquid_mass_g(),
                },
                "probe": {
                    "immersed": self.probe.immersed,
                    "potential_mv": self.probe.potential_mv,
                    "temperature_c": self.probe.temperature_c,
                    "drift_mv": self.probe.drift_mv,
                },
                "balance_load_g": self.balance_load_g(),
                "hotplate": {
                    "plate_c": hp.plate_c,
                    "liquid_c": hp.liquid_c,
                    "stirrer_rpm": hp.stirrer_rpm,
                    "stirrer_enabled": hp.stirrer_enabled,
                    "heater_enabled": hp.heater_enabled,
                },
                "pumps": {
                    p.fluid: {
                        "phase": p.phase,
                        "dispensed_inf_ml": p.dispensed_inf_ml,
                        "dispensed_wdr_ml": p.dispensed_wdr_ml,
                        "delivered_ml": p.delivered_to_vial_ml,
                    }
                    for p in self.pumps.values()
                },
                "faults": self.faults.names(),
            }


__all__ = [
    "BALANCE_CAPACITY_G",
    "BEAKER_CAPACITY_ML",
    "BEAKER_TARE_G",
    "PROBE_MIN_ML",
    "STOCKS",
    "BalanceReading",
    "BeakerState",
    "BufferWorld",
    "ProbeSample",
    "ProbeState",
    "Stock",
    "mixing_tau_s",
    "vibration_sigma_mg",
]
