"""Unit tests of the simulated physics (no wire involved)."""

from __future__ import annotations

import math
import time

import pytest

from simulators import SimClock, StationWorld
from simulators.world import AMBIENT_C, VIAL_CAPACITY_ML


def run_pump(
    world: StationWorld, address: int, volume_ml: float, rate: float, direction: str = "INF"
) -> None:
    with world.lock:
        p = world.pumps[address]
        p.rate_ml_min = rate
        p.direction = direction
        p.remaining_ml = volume_ml
        p.phase = "running"


class ManualClock(SimClock):
    """A clock the test moves by hand (deterministic physics checks)."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


def test_clock_runs_faster_than_real_time() -> None:
    clock = SimClock(speed=50)
    t0 = clock.now()
    time.sleep(0.05)
    assert clock.now() - t0 == pytest.approx(2.5, rel=0.5)
    assert clock.real_seconds(10) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="speed"):
        SimClock(0)


def test_clock_speed_change_keeps_time_continuous() -> None:
    clock = ManualClock()
    real = SimClock(1.0)
    before = real.now()
    real.speed = 10
    assert real.now() >= before
    assert clock.now() == 0.0


def test_dispense_adds_dye_and_stops_at_volume() -> None:
    clock = ManualClock()
    world = StationWorld(clock=clock)
    run_pump(world, 0, 0.4, rate=6.0)  # 0.1 mL/s
    clock.t = 2.0
    world.advance()
    assert world.vial.species_ml["red"] == pytest.approx(0.2)
    assert world.pumps[0].phase == "running"
    clock.t = 10.0
    world.advance()
    assert world.vial.species_ml["red"] == pytest.approx(0.4)
    assert world.pumps[0].phase == "stopped"
    assert world.pumps[0].dispensed_inf_ml == pytest.approx(0.4)


def test_clogged_pump_reports_full_volume_but_delivers_less() -> None:
    clock = ManualClock()
    world = StationWorld(clock=clock)
    world.faults.inject("clogged-pump", pump="green", factor=0.25)
    run_pump(world, 1, 0.8, rate=30.0)
    clock.t = 5.0
    world.advance()
    assert world.pumps[1].dispensed_inf_ml == pytest.approx(0.8)
    assert world.vial.species_ml["green"] == pytest.approx(0.2)


def test_overfill_spills_and_drain_empties() -> None:
    clock = ManualClock()
    world = StationWorld(clock=clock)
    run_pump(world, 0, 2.0, rate=30.0)
    run_pump(world, 2, 2.0, rate=30.0)
    clock.t = 10.0
    world.advance()
    assert world.vial.volume_ml == pytest.approx(VIAL_CAPACITY_ML)
    assert world.vial.spilled_ml == pytest.approx(1.0)
    run_pump(world, 3, 5.0, rate=30.0, direction="WDR")
    clock.t = 30.0
    world.advance()
    assert world.vial.volume_ml == pytest.approx(0.0, abs=1e-9)


def test_thermal_first_order_time_constant() -> None:
    clock = ManualClock()
    world = StationWorld(clock=clock, max_step=0.1)
    world.vial.species_ml["red"] = 1.0
    hp = world.hotplate
    hp.heater_enabled = True
    hp.setpoint_c = 72.0
    clock.t = hp.tau_plate_s
    world.advance()
    # one time constant: 63.2 % of the step
    assert hp.plate_c == pytest.approx(AMBIENT_C + 50.0 * (1 - math.exp(-1)), abs=0.3)
    assert AMBIENT_C < hp.liquid_c < hp.plate_c  # the liquid lags the plate


def test_device_watchdog_switches_off() -> None:
    clock = ManualClock()
    world = StationWorld(clock=clock)
    hp = world.hotplate
    hp.heater_enabled = hp.stirrer_enabled = True
    hp.watchdog_s = 5
    world.hotplate_write()
    clock.t = 4.0
    world.advance()
    assert hp.heater_enabled and not hp.watchdog_tripped
    clock.t = 6.0
    world.advance()
    assert not hp.heater_enabled and not hp.stirrer_enabled and hp.watchdog_tripped


def test_stuck_heater_keeps_heating_when_disabled() -> None:
    clock = ManualClock()
    world = StationWorld(clock=clock)
    world.faults.inject("stuck-heater", temperature_c=150.0)
    clock.t = 400.0
    world.advance()
    assert world.hotplate.plate_c > 140.0


def test_heat_shifts_colour_faster_than_room_temperature() -> None:
    def product_after(temp_c: float) -> float:
        clock = ManualClock()
        world = StationWorld(clock=clock)
        world.vial.species_ml["blue"] = 1.0
        world.hotplate.liquid_c = temp_c
        world.hotplate.plate_c = temp_c
        world.hotplate.heater_enabled = True
        world.hotplate.setpoint_c = temp_c
        world.hotplate.tau_plate_s = world.hotplate.tau_liquid_s = 1e-3
        clock.t = 300.0
        world.advance()
        return world.vial.species_ml["product"]

    cold, hot = product_after(25.0), product_after(75.0)
    assert hot > 10 * cold > 0


def test_sensor_counts_follow_dye_and_report_saturation() -> None:
    world = StationWorld(clock=ManualClock(), seed=1)
    empty = world.sensor_counts(100)
    assert empty[4] == 0
    world.vial.species_ml["red"] = 1.0
    red = world.sensor_counts(100)
    assert red[0] > 3 * red[1] and red[0] > 3 * red[2]  # red dye passes red, absorbs green and blue
    saturated = world.sensor_counts(400)
    assert saturated[4] == 1
    assert max(saturated[:4]) == 65535


def test_faults_reject_unknown_names_and_notify_listeners() -> None:
    world = StationWorld(clock=ManualClock())
    seen: list[str] = []
    world.faults.on_inject(lambda name, params: seen.append(name))
    with pytest.raises(ValueError, match="unknown fault 'clogged'"):
        world.faults.inject("clogged")
    world.faults.inject("camera-freeze")
    assert seen == ["camera-freeze"]
    assert world.faults.active("garbled-bytes") is None
    world.faults.inject("garbled-bytes", device="pumps")
    assert world.faults.active("garbled-bytes", device="pumps") == {"device": "pumps"}
    assert world.faults.active("garbled-bytes", device="hotplate") is None
    world.faults.clear()
    assert world.faults.names() == []
