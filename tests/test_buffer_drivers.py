"""The second bench's drivers against its simulators: the pH meter and the hotplate sharing the
simulated RS-485 line, the balance on its pty (each driver's spec-emulator tests are in
tests/test_ph_meter.py and tests/test_balance.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

import instruments
from instruments.errors import (
    BalanceNotExecutable,
    BalanceOverload,
    BalanceUnderload,
    InstrumentError,
    ProbeNotImmersedError,
)
from simulators.benchworld import AMBIENT_C
from simulators.buffer_bench import SimulatedBufferBench
from simulators.buffer_world import BEAKER_TARE_G, STOCKS, BufferWorld
from simulators.clock import SimClock
from simulators.ph_meter import BUFFERS
from simulators.phosphate import nernst_mv

SPEED = 50.0


@pytest.fixture
async def bench() -> AsyncIterator[SimulatedBufferBench]:
    b = SimulatedBufferBench(BufferWorld(clock=SimClock(SPEED)))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def spec(bench: SimulatedBufferBench, name: str) -> tuple[str, dict[str, object]]:
    s = next(s for s in bench.instruments() if s.name == name)
    return s.url, s.options


@pytest.mark.timeout(60)
async def test_ph_meter_and_hotplate_share_the_line(bench: SimulatedBufferBench) -> None:
    world = bench.world
    world.add("acid", 25.0)
    world.add("base", 75.0)
    async with (
        instruments.connect("hotplate", spec(bench, "hotplate")[0], timeout=0.5) as hp,
        instruments.connect("ph-meter", spec(bench, "ph")[0], timeout=0.5) as ph,
    ):
        await hp.set_stirrer(True, 300)
        await world.clock.sleep(120.0)
        before = await ph.read()
        assert before["calibration_due"] and before["stable"]
        true_ph = world.mixed_ph()
        assert true_ph is not None and abs(before["ph"] - true_ph) > 0.05  # factory calibration
        await ph.calibrate(7.00)
        await ph.calibrate(4.01)
        await world.clock.sleep(120.0)  # back from the pH 4 buffer: the probe settles
        after = await ph.read()
        assert not after["calibration_due"] and after["stable"]
        assert after["ph"] == pytest.approx(world.mixed_ph(), abs=0.005)
        assert (await hp.read())["stirring"] is True  # the other unit on the line

        world.faults.inject("garbled-bytes", device="ph")
        with pytest.raises(InstrumentError):
            await ph.read()
        assert (await hp.read())["stirrer_setpoint_rpm"] == 300  # not poisoned
        world.faults.clear()
        assert (await ph.read())["ph"] == pytest.approx(after["ph"], abs=0.01)

        world.faults.inject("probe-out")
        with pytest.raises(ProbeNotImmersedError):
            await ph.read()


@pytest.mark.timeout(60)
async def test_three_point_calibration_through_the_driver(bench: SimulatedBufferBench) -> None:
    """7.00, 4.01 and 10.01: the transmitter fits the electrode's slope and zero by least
    squares over the three points, and reads the beaker's buffer right within noise."""
    world = bench.world
    world.add("acid", 25.0)
    world.add("base", 75.0)
    async with (
        instruments.connect("hotplate", spec(bench, "hotplate")[0], timeout=0.5) as hp,
        instruments.connect("ph-meter", spec(bench, "ph")[0], timeout=0.5) as ph,
    ):
        await hp.set_stirrer(True, 300)
        await world.clock.sleep(120.0)
        assert (await ph.read())["calibration_due"]
        for buffer_ph in (7.00, 4.01, 10.01):
            await ph.calibrate(buffer_ph)
        cal = bench.ph.calibration
        assert sorted(cal.points) == [4010, 7000, 10010]
        # the least-squares line through all three points (E = zero + slope x (-N(T) (pH - 7)))
        xs = [-nernst_mv(tc) * (BUFFERS[b] - 7.0) for b, (_, tc, _) in cal.points.items()]
        slope, zero = np.polyfit(xs, [e for e, _, _ in cal.points.values()], 1)
        assert (cal.slope, cal.zero_mv) == pytest.approx((slope, zero), abs=1e-9)
        probe = world.probe  # the electrode's truth: +7.5 mV at pH 7, 98.5 % of Nernst
        assert cal.slope == pytest.approx(probe.slope, abs=2e-4)
        assert cal.zero_mv == pytest.approx(probe.offset_mv + probe.drift_mv, abs=0.02)
        for buffer_ph in BUFFERS.values():  # each buffer reads as its own value again
            mv = world.electrode_potential(buffer_ph, AMBIENT_C)
            assert cal.ph(mv, AMBIENT_C) == pytest.approx(buffer_ph, abs=0.005)
        await world.clock.sleep(120.0)  # back from the pH 10 buffer: the probe settles
        after = await ph.read()
        assert not after["calibration_due"] and after["stable"]
        true_ph = world.mixed_ph()
        assert true_ph is not None
        assert after["ph"] == pytest.approx(true_ph, abs=0.005)


@pytest.mark.timeout(60)
async def test_balance_driver_on_the_simulator(bench: SimulatedBufferBench) -> None:
    world = bench.world
    url, _ = spec(bench, "balance")
    async with instruments.connect("balance", url, timeout=0.5, stable_timeout=2.0) as bal:
        info = await bal.device_info()
        assert info["model"] == "LB-BAL220" and info["capacity_g"] == 220.0
        assert (await bal.weight()).value == pytest.approx(BEAKER_TARE_G, abs=0.0005)
        assert await bal.tare() == pytest.approx(BEAKER_TARE_G, abs=0.0005)
        url_p, opts = spec(bench, "water")
        async with instruments.connect("syringe-pump", url_p, **opts) as pump:
            await pump.dispense(10.0, 5.0)  # 120 s of simulated time
            assert not (await bal.weight_now()).stable  # dispensing: dynamic
            await pump.wait_until_stopped(timeout=10)
        stable = await bal.weight()
        assert stable.stable
        assert stable.value == pytest.approx(10.0 * STOCKS["water"].density_g_ml, abs=0.0005)
        readings = await bal.sample(3)
        assert len(readings) == 3 and all(r.stable for r in readings)

        world.faults.inject("balance-vibration")
        with pytest.raises(BalanceNotExecutable):
            await bal.weight()
        world.faults.clear()
        world.faults.inject("balance-overload")
        with pytest.raises(BalanceOverload):
            await bal.weight()
        world.faults.inject("balance-overload", mass_g=-100.0)
        with pytest.raises(BalanceUnderload):
            await bal.weight_now()
        world.faults.clear()
        await bal.clear_tare()
        assert (await bal.tare_weight()) == 0.0
