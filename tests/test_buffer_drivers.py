"""The second bench's drivers against its simulators: the pH meter and the hotplate sharing the
simulated RS-485 line, the balance on its pty (each driver's spec-emulator tests are in
tests/test_ph_meter.py and tests/test_balance.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import instruments
from instruments.errors import (
    BalanceNotExecutable,
    BalanceOverload,
    BalanceUnderload,
    InstrumentError,
    ProbeNotImmersedError,
)
from simulators.buffer_bench import SimulatedBufferBench
from simulators.buffer_world import BEAKER_TARE_G, STOCKS, BufferWorld
from simulators.clock import SimClock

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
