"""The buffer bench's shared RS-485 line at the wire: the pH transmitter (unit 2) and the hotplate
(unit 1) on ONE pty and ONE pymodbus server, talked to with a plain pymodbus RTU client.

The clock is moved by hand, so every physical value is deterministic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from simulators.buffer_world import BufferWorld
from simulators.clock import SimClock
from simulators.hotplate import HotplateSim
from simulators.ph_meter import CALIBRATION_S, PhTransmitterSim
from simulators.phosphate import nernst_mv
from simulators.rs485 import RS485Line


class ManualClock(SimClock):
    def __init__(self) -> None:
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


@dataclass
class Line:
    world: BufferWorld
    clock: ManualClock
    line: RS485Line
    hotplate: HotplateSim
    ph: PhTransmitterSim
    client: AsyncModbusSerialClient

    async def inputs(self, unit: int = 2, address: int = 0, count: int = 4) -> list[int]:
        rr = await self.client.read_input_registers(address, count=count, device_id=unit)
        assert not rr.isError(), rr
        return list(rr.registers)

    async def holding(self, address: int, count: int = 1, unit: int = 2) -> list[int]:
        rr = await self.client.read_holding_registers(address, count=count, device_id=unit)
        assert not rr.isError(), rr
        return list(rr.registers)

    async def write(self, address: int, value: int, unit: int = 2) -> int | None:
        """Write one register; returns the exception code or None."""
        rr = await self.client.write_register(address, value, device_id=unit)
        return int(rr.exception_code) if rr.isError() else None

    def settle(self, seconds: float) -> None:
        self.clock.t += seconds
        self.world.advance()


@pytest.fixture
async def bus() -> AsyncIterator[Line]:
    clock = ManualClock()
    world = BufferWorld(clock=clock)
    line = RS485Line(world.wire, baudrate=9600)
    hotplate = HotplateSim(world, unit=1, line=line)
    ph = PhTransmitterSim(world, line, unit=2)
    await hotplate.start()
    await ph.start()
    assert hotplate.url.startswith(f"modbus-rtu://{line.path}?baudrate=9600&unit=1")
    assert ph.url == f"modbus-rtu://{line.path}?baudrate=9600&unit=2"
    client = AsyncModbusSerialClient(
        line.path, framer=FramerType.RTU, baudrate=9600, timeout=0.3, retries=0, reconnect_delay=0
    )
    await client.connect()
    try:
        yield Line(world, clock, line, hotplate, ph, client)
    finally:
        client.close()
        await ph.stop()
        await hotplate.stop()
        assert not line.running


def _s16(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


async def test_two_units_on_one_pty(bus: Line) -> None:
    bus.world.add("acid", 20.0)
    bus.world.add("base", 60.0)
    await bus.write(1, 300, unit=1)  # hotplate: stirrer setpoint, enable
    await bus.write(3, 1, unit=1)
    bus.settle(120.0)
    hp = await bus.inputs(unit=1, count=5)
    assert hp[2] == pytest.approx(300, abs=2) and hp[4] == 3400  # rpm, max temperature
    ph, temp, mv, status = await bus.inputs()
    true_ph = bus.world.mixed_ph()
    assert true_ph is not None
    # factory calibration (0 mV, 100 %) on a +7.5 mV, 98.5 % electrode: slightly off
    liquid_c = bus.world.hotplate.liquid_c
    expected = 7.0 - bus.world.electrode_potential(true_ph, liquid_c) / nernst_mv(liquid_c)
    assert ph / 1000 == pytest.approx(expected, abs=0.003)
    assert abs(ph / 1000 - true_ph) > 0.05
    assert _s16(temp) == round(bus.world.hotplate.liquid_c * 10)
    assert _s16(mv) / 10 == pytest.approx(bus.world.probe.potential_mv, abs=0.2)
    assert status & 0b1 and status & 0b1000 and not status & 0b10110  # stable, cal due
    assert bus.world.wire.data("ph")[-1] == {"fc": 4, "address": 0, "count": 4}
    assert bus.world.wire.data("hotplate")[-1] == {"fc": 4, "address": 0, "count": 5}


async def test_unknown_unit_is_silent_and_the_others_still_answer(bus: Line) -> None:
    with pytest.raises(ModbusIOException):
        await bus.client.read_input_registers(0, count=1, device_id=7)
    assert bus.world.wire.entries("rs485")[-1].note == "unit 7: not for this device, ignored"
    assert len(await bus.inputs()) == 4
    assert len(await bus.inputs(unit=1, count=5)) == 5


async def test_garbled_frames_on_one_unit_leave_the_other_answering(bus: Line) -> None:
    bus.world.faults.inject("garbled-bytes", device="ph")
    with pytest.raises(ModbusIOException):
        await bus.inputs()  # a bad CRC: the client drops the frame and times out
    assert (await bus.holding(4, unit=1)) == [0]  # the hotplate answers cleanly
    bus.world.faults.clear()
    assert len(await bus.inputs()) == 4
    bus.world.faults.inject("no-reply", device="hotplate")  # one unit not answering
    with pytest.raises(ModbusIOException):
        await bus.inputs(unit=1, count=5)
    assert len(await bus.inputs()) == 4
    bus.world.faults.clear()
    bus.world.faults.inject("modbus-exception", device="ph", code=4)
    rr = await bus.client.read_input_registers(0, count=4, device_id=2)
    assert rr.isError() and rr.exception_code == 4
    assert len(await bus.inputs(unit=1, count=5)) == 5


async def test_register_map_and_exceptions(bus: Line) -> None:
    assert await bus.holding(0, count=3) == [1, 250, 0]  # automatic, 25.0 degC, no damping
    assert await bus.holding(10) == [0]
    assert await bus.write(0, 2) == 3  # compensation is 0 or 1
    assert await bus.write(1, 1400) == 3  # 140 degC manual temperature
    assert await bus.write(2, 61) == 3  # damping 0-60 s
    assert await bus.write(10, 5000) == 3  # not a buffer
    assert await bus.write(5, 1) == 2  # no register 5
    rr = await bus.client.read_input_registers(4, count=1, device_id=2)
    assert rr.isError() and rr.exception_code == 2
    rr = await bus.client.read_holding_registers(0, count=11, device_id=2)  # spans 3-9
    assert rr.isError() and rr.exception_code == 2
    rr = await bus.client.read_coils(0, count=1, device_id=2)
    assert rr.isError() and rr.exception_code == 1
    rr = await bus.client.write_registers(0, [0, 0xFF38, 10], device_id=2)  # FC16: manual, -20.0
    assert rr.isError() and rr.exception_code == 3  # -20.0 degC is out of range: nothing applied
    assert await bus.holding(0, count=3) == [1, 250, 0]
    # manual, -10.0 degC, 10 s
    rr = await bus.client.write_registers(0, [0, 0xFF9C, 10], device_id=2)
    assert not rr.isError()
    assert await bus.holding(0, count=3) == [0, 0xFF9C, 10]
    _, temp, _, _ = await bus.inputs()
    assert _s16(temp) == -100  # the compensation temperature in manual mode


async def test_two_point_calibration_through_the_register(bus: Line) -> None:
    world = bus.world
    world.add("acid", 25.0)
    world.add("base", 75.0)
    assert await bus.write(1, 300, unit=1) is None
    assert await bus.write(3, 1, unit=1) is None
    bus.settle(300.0)
    assert (await bus.inputs())[3] & 0b1000  # calibration due
    for buffer in (7000, 4010):
        assert await bus.write(10, buffer) is None
        assert await bus.holding(10) == [buffer]
        status = (await bus.inputs())[3]
        assert status & 0b10000 and not status & 0b1  # calibrating, not stable
        assert await bus.write(10, 10010) == 6  # busy
        bus.settle(CALIBRATION_S + 0.5)
        assert await bus.holding(10) == [0]
    cal = bus.ph.calibration
    assert cal.slope == pytest.approx(0.985, abs=1e-4)  # found the electrode's real slope
    assert cal.zero_mv == pytest.approx(7.5 + world.probe.drift_mv, abs=0.01)
    status = (await bus.inputs())[3]
    assert not status & 0b1000  # calibration no longer due
    assert not status & 0b1  # the probe came out of the pH 4 buffer: still responding
    bus.settle(120.0)
    ph, _, _, status = await bus.inputs()
    true_ph = world.mixed_ph()
    assert true_ph is not None and status & 0b1
    assert ph / 1000 == pytest.approx(true_ph, abs=0.005)  # calibrated: right within noise


async def test_probe_not_immersed_returns_the_last_value(bus: Line) -> None:
    bus.world.add("water", 10.0)  # below the probe's junction
    bus.settle(5.0)
    ph, _, _, status = await bus.inputs()
    assert ph == 7000 and status & 0b110 == 0b110  # no reading yet: the power-on value
    bus.world.add("base", 60.0)
    bus.settle(200.0)
    ph, _, _, status = await bus.inputs()
    assert status & 0b110 == 0 and ph > 8500
    bus.world.faults.inject("probe-out")
    bus.settle(1.0)
    held, _, _, status = await bus.inputs()
    assert held == ph and status & 0b110 == 0b110 and not status & 0b1


async def test_damping_averages_and_stability_needs_ten_quiet_seconds(bus: Line) -> None:
    world = bus.world
    world.add("water", 50.0)
    assert await bus.write(1, 300, unit=1) is None
    assert await bus.write(3, 1, unit=1) is None
    bus.settle(120.0)
    water, _, _, status = await bus.inputs()
    assert status & 0b1
    world.add("base", 50.0)  # pH jumps to ~9
    bus.settle(3.0)
    fast, _, _, status = await bus.inputs()
    assert not status & 0b1
    assert await bus.write(2, 60) is None  # 60 s moving average
    slow, _, _, _ = await bus.inputs()
    assert water < slow < fast  # the average still remembers the water
    assert await bus.write(2, 0) is None
    bus.settle(120.0)
    final, _, _, status = await bus.inputs()
    assert status & 0b1 and final > fast
