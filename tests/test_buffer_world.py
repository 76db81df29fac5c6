"""The buffer bench's physics (no wire): phosphate chemistry, mixing, the pH electrode, the
balance, and the faults that change them. Deterministic: a clock moved by hand."""

from __future__ import annotations

import math
import statistics

import pytest

from simulators.buffer_world import (
    BALANCE_CAPACITY_G,
    BEAKER_CAPACITY_ML,
    BEAKER_TARE_G,
    PROBE_MIN_ML,
    STOCKS,
    BufferWorld,
    mixing_tau_s,
)
from simulators.clock import SimClock
from simulators.phosphate import PKA_25, nernst_mv, pkw, solve_ph
from simulators.world import AMBIENT_C


class ManualClock(SimClock):
    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


def make_world(seed: int = 0) -> tuple[BufferWorld, ManualClock]:
    clock = ManualClock()
    return BufferWorld(clock=clock, seed=seed), clock


def run_pump(
    world: BufferWorld, fluid: str, ml: float, rate: float = 30.0, direction: str = "INF"
) -> None:
    with world.lock:
        pump = world.pump_by_fluid(fluid)
        pump.rate_ml_min, pump.direction = rate, direction
        pump.remaining_ml, pump.phase = ml, "running"


def stir(world: BufferWorld, rpm: int) -> None:
    with world.lock:
        world.hotplate.stirrer_setpoint_rpm = rpm
        world.hotplate.stirrer_enabled = rpm > 0


def mix(acid: float, base: float, water: float = 0.0) -> tuple[float, float]:
    """(phosphate, sodium) mol/L of a mixture of the stocks (mL)."""
    total = acid + base + water
    p = (STOCKS["acid"].phosphate_m * acid + STOCKS["base"].phosphate_m * base) / total
    na = (STOCKS["acid"].sodium_m * acid + STOCKS["base"].sodium_m * base) / total
    return p, na


# ---------------------------------------------------------------- chemistry
def test_reference_solutions() -> None:
    mono = solve_ph(0.2, 0.2, 25.0)  # the acid stock: between pKa1 and pKa2, shifted by activity
    assert 4.4 <= mono.ph <= 4.6
    equi = solve_ph(0.05, 0.075, 25.0)  # 25 mM NaH2PO4 + 25 mM Na2HPO4
    assert equi.ionic_strength == pytest.approx(0.1, rel=1e-3)
    # pKa2 - 3 x Davies term at I = 0.1 (0.509 x (0.240 - 0.03) = 0.107): 6.88, not 7.20
    assert 6.8 <= equi.ph <= 6.9
    assert equi.ph == pytest.approx(
        PKA_25[1] - 3 * 0.5092 * (math.sqrt(0.1) / (1 + math.sqrt(0.1)) - 0.03), abs=0.005
    )
    assert solve_ph(0.0, 0.0, 25.0).ph == pytest.approx(7.0, abs=0.01)
    dilute = solve_ph(2e-4, 3e-4, 25.0)  # I ~ 4e-4: activity correction almost gone
    assert dilute.ph == pytest.approx(PKA_25[1], abs=0.04)
    basic = solve_ph(0.2, 0.4, 25.0)  # the base stock
    assert 9.0 <= basic.ph <= 9.5


def test_more_dibasic_raises_ph_monotonically() -> None:
    phs = [solve_ph(*mix(100 - b, b), 25.0).ph for b in range(0, 101, 5)]
    assert all(b > a for a, b in zip(phs, phs[1:], strict=False))
    assert phs[0] < 5 and phs[-1] > 9


def test_temperature_dependence() -> None:
    p, na = mix(30, 70)
    ph15, ph25, ph37 = (solve_ph(p, na, t).ph for t in (15.0, 25.0, 37.0))
    assert ph15 > ph25 > ph37  # pKa2 falls with temperature
    assert (ph37 - ph15) / 22 == pytest.approx(-0.0028, abs=0.001)
    assert pkw(25.0) == pytest.approx(14.0, abs=0.01)
    # neutral water is 6.63 at 50 degC
    assert solve_ph(0, 0, 50.0).ph == pytest.approx(pkw(50.0) / 2, abs=0.01)
    assert nernst_mv(25.0) == pytest.approx(59.16, abs=0.01)
    with pytest.raises(ValueError, match="concentrations"):
        solve_ph(-0.1, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        solve_ph(0.1, 0.1, 150.0)


# ---------------------------------------------------------------- liquid
def test_pumps_fill_the_beaker_and_the_ph_is_the_mixture() -> None:
    world, clock = make_world()
    run_pump(world, "acid", 15.0)
    run_pump(world, "base", 45.0)
    clock.t = 120.0
    world.advance()
    assert world.beaker.stock_ml["acid"] == pytest.approx(15.0)
    assert world.beaker.stock_ml["base"] == pytest.approx(45.0)
    expected = solve_ph(*mix(15, 45), world.hotplate.liquid_c).ph
    assert world.mixed_ph() == pytest.approx(expected)
    assert world.pump_by_fluid("acid").delivered_to_vial_ml == pytest.approx(15.0)


def test_mixing_lag_short_while_stirring() -> None:
    assert mixing_tau_s(300) == pytest.approx(5.0)
    assert mixing_tau_s(0) == pytest.approx(180.0)
    results = {}
    for rpm in (0, 300):
        world, clock = make_world()
        stir(world, rpm)
        world.add("acid", 40.0)  # the bulk is the acid stock
        world.add("base", 40.0)
        clock.t = 30.0
        results[rpm] = abs(world.bulk_ph() - world.mixed_ph())
    assert results[300] < 0.01  # mixed within ~30 s at 300 rpm
    assert results[0] > 0.5  # unstirred: still far from it


def test_waste_withdraws_the_mixed_liquid() -> None:
    world, clock = make_world()
    world.add("acid", 30.0)
    world.add("base", 50.0)
    before = world.mixed_ph()
    run_pump(world, "waste", 20.0, direction="WDR")
    clock.t = 60.0
    world.advance()
    assert world.beaker.volume_ml == pytest.approx(60.0)
    assert world.mixed_ph() == pytest.approx(before)
    assert world.beaker.stock_ml["acid"] / world.beaker.stock_ml["base"] == pytest.approx(30 / 50)


def test_beaker_spills_beyond_its_capacity_and_the_spill_is_not_weighed() -> None:
    world, _ = make_world()
    assert world.add("water", 160.0) == pytest.approx(BEAKER_CAPACITY_ML)
    assert world.beaker.spilled_ml == pytest.approx(160.0 - BEAKER_CAPACITY_ML)
    assert world.balance_load_g() == pytest.approx(
        BEAKER_TARE_G + 150.0 * STOCKS["water"].density_g_ml
    )
    with pytest.raises(KeyError, match="stock"):
        world.add("ethanol", 1.0)
    with pytest.raises(ValueError, match="negative"):
        world.add("water", -1.0)


def test_liquid_temperature_follows_the_hotplate() -> None:
    world, clock = make_world()
    world.add("water", 80.0)
    assert world.hotplate.liquid_c == pytest.approx(AMBIENT_C)
    with world.lock:
        world.hotplate.setpoint_c, world.hotplate.heater_enabled = 25.0, True
    stir(world, 300)
    clock.t = 1800.0
    world.advance()
    assert world.hotplate.liquid_c == pytest.approx(25.0, abs=0.1)
    world.add("water", 20.0)  # at ambient: the mixture cools
    assert world.hotplate.liquid_c == pytest.approx(
        (80 * world.hotplate.plate_c + 20 * AMBIENT_C) / 100, abs=0.1
    )


# ---------------------------------------------------------------- electrode
def test_probe_first_order_response_and_immersion() -> None:
    world, clock = make_world()
    stir(world, 300)
    world.add("water", PROBE_MIN_ML - 1.0)
    clock.t = 5.0
    world.advance()
    assert not world.probe.immersed  # too little liquid to cover the junction
    world.add("base", 80.0)
    clock.t = 40.0  # mixed (tau 5 s); the probe is still at its storage potential
    world.advance()
    start = world.probe.potential_mv
    target = world.electrode_potential(world.bulk_ph(), world.hotplate.liquid_c)
    clock.t = 50.0  # one tau
    world.advance()
    frac = (world.probe.potential_mv - start) / (target - start)
    assert frac == pytest.approx(1 - math.exp(-1), abs=0.03)
    clock.t = 200.0
    world.advance()
    assert world.probe.immersed
    assert world.probe.potential_mv == pytest.approx(
        world.electrode_potential(world.bulk_ph(), world.hotplate.liquid_c), abs=0.05
    )
    # the electrode: offset at pH 7, 98.5 % of Nernst
    assert world.electrode_potential(7.0, 25.0) == pytest.approx(7.5 + world.probe.drift_mv)
    slope = world.electrode_potential(4.0, 25.0) - world.electrode_potential(7.0, 25.0)
    assert slope / 3 == pytest.approx(0.985 * 59.16, abs=0.05)


def test_probe_out_fault_and_drift() -> None:
    world, clock = make_world()
    stir(world, 300)
    world.add("water", 50.0)
    clock.t = 3600.0
    world.advance()
    assert world.probe.drift_mv == pytest.approx(0.5, abs=1e-6)  # 0.5 mV/h
    world.faults.inject("probe-out")
    clock.t = 3601.0
    world.advance()
    held = world.probe.potential_mv
    assert not world.probe.immersed and world.probe.temperature_c == AMBIENT_C
    world.add("base", 50.0)
    clock.t = 3700.0
    world.advance()
    assert world.probe.potential_mv == held  # out of the liquid: no response
    world.faults.clear("probe-out")
    world.faults.inject("probe-drift", mv_per_h=60.0)
    clock.t = 3700.0 + 1800.0
    world.advance()
    assert world.probe.drift_mv == pytest.approx(0.5 + 0.5 / 36 * 1.0 + 30.0, abs=0.01)
    samples = world.probe_samples(10.0)
    assert samples and all(s.immersed for s in samples) and samples[-1].t == clock.t


# ---------------------------------------------------------------- balance
def readings(world: BufferWorld, clock: ManualClock, n: int, dt: float = 0.1) -> list[float]:
    out = []
    for _ in range(n):
        clock.t += dt
        out.append(world.balance_reading().gross_g)
    return out


def test_balance_mass_is_what_entered() -> None:
    world, clock = make_world()
    run_pump(world, "acid", 10.0)
    run_pump(world, "water", 20.0)
    clock.t = 60.0
    expected = (
        BEAKER_TARE_G + 10.0 * STOCKS["acid"].density_g_ml + 20.0 * STOCKS["water"].density_g_ml
    )
    values = readings(world, clock, 50)
    assert statistics.mean(values) == pytest.approx(expected, abs=0.0003)
    assert world.balance_reading().stable


def test_clogged_pump_shows_as_missing_mass() -> None:
    world, clock = make_world()
    world.faults.inject("clogged-pump", pump="base", factor=0.5)
    run_pump(world, "base", 10.0)
    clock.t = 60.0
    world.advance()
    pump = world.pump_by_fluid("base")
    assert pump.dispensed_inf_ml == pytest.approx(10.0)  # what the pump reports
    added = statistics.mean(readings(world, clock, 20)) - BEAKER_TARE_G
    assert added == pytest.approx(5.0 * STOCKS["base"].density_g_ml, abs=0.001)


def test_balance_noise_grows_with_the_stirrer_and_settles() -> None:
    spreads = {}
    stable = {}
    for rpm in (0, 150, 300):
        world, clock = make_world()
        world.add("water", 60.0)
        stir(world, rpm)
        clock.t = 30.0
        values = readings(world, clock, 200)
        spreads[rpm] = statistics.stdev(values)
        stable[rpm] = world.balance_reading().stable
    assert spreads[0] < spreads[150] < spreads[300]
    assert spreads[300] > 4 * spreads[0]
    assert stable == {0: True, 150: True, 300: False}  # unstable above ~200 rpm


def test_balance_settles_about_two_seconds_after_a_disturbance() -> None:
    world, clock = make_world()
    world.add("water", 50.0)
    clock.t = 10.0
    assert world.balance_reading().stable
    run_pump(world, "water", 1.0, rate=6.0)  # 10 s of dispensing
    clock.t = 15.0
    assert not world.balance_reading().stable
    clock.t = 20.0 + 1.0  # stopped at 20 s
    assert not world.balance_reading().stable
    clock.t = 20.0 + 2.5
    assert world.balance_reading().stable
    stir(world, 100)  # a stirrer change is a disturbance too
    clock.t = 23.0
    assert not world.balance_reading().stable
    clock.t = 30.0
    assert world.balance_reading().stable


def test_balance_faults() -> None:
    world, clock = make_world()
    world.faults.inject("balance-overload")
    clock.t = 5.0
    r = world.balance_reading()
    assert r.overload and not r.stable and world.balance_load_g() > BALANCE_CAPACITY_G
    world.faults.inject("balance-overload", mass_g=-100.0)  # the pan lifted
    r = world.balance_reading()
    assert r.underload and not r.overload and not r.stable
    world.faults.clear("balance-overload")
    world.faults.inject("balance-vibration", sigma_mg=5.0)
    clock.t = 60.0
    assert not any(world.balance_reading().stable for _ in range(5))
    assert statistics.stdev(readings(world, clock, 100)) > 0.003
    world.faults.clear()
    clock.t = 70.0
    assert world.balance_reading().stable


def test_deterministic_given_the_seed() -> None:
    def run(seed: int) -> list[float]:
        world, clock = make_world(seed)
        world.add("acid", 25.0)
        stir(world, 150)
        return readings(world, clock, 20) + [world.probe.potential_mv]

    assert run(3) == run(3)
    assert run(3) != run(4)
