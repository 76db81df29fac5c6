"""The pH transmitter driver and the shared RS-485 line, against a minimal emulator of the spec.

``SpecRtuBus`` is written from PROTOCOLS.md ("Wire protocols of the second
bench") only: a hand-written Modbus RTU responder on the master side of a real
pty, serving unit 1 (a hotplate's register map) and unit 2 (the pH
transmitter) on one line, with per-unit faults (garbled replies, no reply, a
reply that comes too late) and a check that no request ever arrives while a
reply is still owed (requests on one RS-485 line must be serialized).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tty
from collections.abc import AsyncIterator

import pytest

from instruments.declare import ACTUATE, READ
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.ph_meter import BUFFERS, PhMeter, PhStatus
from instruments.errors import (
    CalibrationError,
    ModbusExceptionError,
    ProbeNotImmersedError,
    ProtocolError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.modbus import ModbusTransport


def crc16(data: bytes) -> bytes:
    """Modbus RTU CRC-16 (polynomial 0xA001, initial 0xFFFF), low byte first."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


class SpecUnit:
    """One Modbus unit: holding and input registers (address -> value) and write checks."""

    def __init__(self, holding: dict[int, int], inputs: dict[int, int]) -> None:
        self.holding = holding
        self.inputs = inputs

    def read(self, table: dict[int, int], address: int, count: int) -> list[int] | int:
        if any(a not in table for a in range(address, address + count)):
            return 2
        return [table[a] for a in range(address, address + count)]

    def write(self, address: int, values: list[int]) -> int | None:
        """None if written, else the exception code."""
        for offset, value in enumerate(values):
            if address + offset not in self.holding:
                return 2
            if not self.valid(address + offset, value):
                return 3
        for offset, value in enumerate(values):
            self.holding[address + offset] = value
            self.written(address + offset, value)
        return None

    def valid(self, address: int, value: int) -> bool:
        return True

    def written(self, address: int, value: int) -> None:
        pass

    def read_holding(self, address: int, count: int) -> list[int] | int:
        return self.read(self.holding, address, count)

    def read_inputs(self, address: int, count: int) -> list[int] | int:
        return self.read(self.inputs, address, count)


def signed(raw: int) -> int:
    return raw - 0x10000 if raw & 0x8000 else raw


class SpecPh(SpecUnit):
    """The pH transmitter of PROTOCOLS.md: input 0-3, holding 0-2 and 10."""

    def __init__(self) -> None:
        super().__init__({0: 1, 1: 250, 2: 0, 10: 0}, {0: 7000, 1: 251, 2: 0, 3: 0b1})
        self.immersed = True
        self.cal_polls = 2  # reads of holding 10 before it reads back 0
        self.cal_stuck = False
        self.calibrated: list[int] = []
        self._polls_left = 0

    def set_ph(self, ph: float, temperature_c: float = 25.1, mv: float = 0.0) -> None:
        self.inputs[0] = round(ph * 1000)
        self.inputs[1] = round(temperature_c * 10) & 0xFFFF
        self.inputs[2] = round(mv * 10) & 0xFFFF

    def valid(self, address: int, value: int) -> bool:
        if address == 0:
            return value in (0, 1)
        if address == 1:
            return -300 <= signed(value) <= 1300
        if address == 2:
            return 0 <= value <= 60
        return value in (4010, 7000, 10010)  # address 10

    def written(self, address: int, value: int) -> None:
        if address == 10:
            self.calibrated.append(value)
            self._polls_left = self.cal_polls

    def read_holding(self, address: int, count: int) -> list[int] | int:
        regs = super().read_holding(address, count)
        if isinstance(regs, list) and address <= 10 < address + count:
            if self.holding[10] and not self.cal_stuck:
                if self._polls_left == 0:
                    self.holding[10] = 0
                self._polls_left -= 1
            regs = super().read_holding(address, count)
        return regs

    def read_inputs(self, address: int, count: int) -> list[int] | int:
        status = self.inputs[3] & ~0b10110
        if not self.immersed:
            status |= 0b110  # not immersed, and the repeated value is out of range
        if self.holding[10]:
            status |= 0b10000
        self.inputs[3] = status
        return super().read_inputs(address, count)


class SpecRtuBus:
    """Units on one RS-485 line, answered on the master side of a pty (see module docstring)."""

    def __init__(self, units: dict[int, SpecUnit]) -> None:
        self.units = units
        self.garble: set[int] = set()
        self.mute: set[int] = set()
        self.late: dict[int, float] = {}  # unit -> seconds to delay its reply
        self.requests: list[tuple[int, int]] = []  # (unit, function code)
        self.overlaps = 0  # requests that arrived while a reply was still owed
        self._owed = 0
        self._rx = bytearray()
        self._timers: set[asyncio.TimerHandle] = set()
        self.path = ""

    async def __aenter__(self) -> SpecRtuBus:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master, self._on_data)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for timer in self._timers:
            timer.cancel()
        self._loop.remove_reader(self._master)
        os.close(self._master)
        os.close(self._slave)

    def url(self, unit: int, **opts: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"baudrate": 9600, "unit": unit, **opts}.items())
        return f"modbus-rtu://{self.path}?{query}"

    # ---------------------------------------------------------------- the line
    def _on_data(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._rx += os.read(self._master, 4096)
        while (n := self._frame_length()) is not None and len(self._rx) >= n:
            frame, self._rx = bytes(self._rx[:n]), self._rx[n:]
            if crc16(frame[:-2]) != frame[-2:]:
                self._rx.clear()  # a slave ignores a frame with a bad CRC
                return
            self._request(frame[:-2])

    def _frame_length(self) -> int | None:
        if len(self._rx) < 2:
            return None
        if self._rx[1] in (3, 4, 6):
            return 8
        if self._rx[1] == 16:
            return 9 + self._rx[6] if len(self._rx) >= 7 else None
        self._rx.clear()  # nothing this bus speaks
        return None

    def _request(self, frame: bytes) -> None:
        unit, fc = frame[0], frame[1]
        self.requests.append((unit, fc))
        if self._owed:
            self.overlaps += 1
        device = self.units.get(unit)
        if device is None or unit in self.mute:
            return  # only the addressed unit answers; a mute one does not
        address, value = struct.unpack(">HH", frame[2:6])
        pdu: bytes
        if fc in (3, 4):
            regs = (device.read_holding if fc == 3 else device.read_inputs)(address, value)
            if isinstance(regs, int):
                pdu = bytes([fc | 0x80, regs])
            else:
                pdu = bytes([fc, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)
        elif fc == 6:
            code = device.write(address, [value])
            pdu = frame[1:6] if code is None else bytes([fc | 0x80, code])
        else:
            values = list(struct.unpack(f">{value}H", frame[7 : 7 + 2 * value]))
            code = device.write(address, values)
            pdu = frame[1:6] if code is None else bytes([fc | 0x80, code])
        reply = bytes([unit]) + pdu
        reply += crc16(reply)
        if unit in self.garble:
            reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
        self._owed += 1
        # a short turnaround, so that a second request sent without waiting would be seen
        timer = self._loop.call_later(self.late.get(unit, 0.002), self._send, reply)
        self._timers.add(timer)

    def _send(self, reply: bytes) -> None:
        self._owed -= 1
        with contextlib.suppress(OSError):
            os.write(self._master, reply)


def hotplate_unit() -> SpecUnit:
    """Unit 1: the hotplate's register map (holding 0-4, input 0-4; 340 degC maximum)."""
    return SpecUnit({a: 0 for a in range(5)}, {0: 220, 1: 221, 2: 0, 3: 0, 4: 3400})


@pytest.fixture
async def bus() -> AsyncIterator[SpecRtuBus]:
    ph = SpecPh()
    async with SpecRtuBus({1: hotplate_unit(), 2: ph}) as line:
        yield line


def ph_of(bus: SpecRtuBus) -> SpecPh:
    unit = bus.units[2]
    assert isinstance(unit, SpecPh)
    return unit


@contextlib.asynccontextmanager
async def ph_meter(bus: SpecRtuBus, **kwargs: object) -> AsyncIterator[PhMeter]:
    meter = PhMeter(ModbusTransport(bus.url(2)), timeout=0.3, **kwargs)  # type: ignore[arg-type]
    async with meter:
        yield meter


# ---------------------------------------------------------------- declarations
def test_declared_commands_with_units_and_ranges() -> None:
    c = PhMeter.commands
    assert {n: s.kind for n, s in c.items()} == {
        "read": READ,
        "describe": READ,
        "status": READ,
        "set_compensation": ACTUATE,
        "set_damping": ACTUATE,
        "calibrate": ACTUATE,
    }
    comp = c["set_compensation"]
    assert comp.params["mode"].allowed == ("manual", "automatic")
    assert comp.params["temperature_c"].unit == "degC" and comp.params["temperature_c"].optional
    assert {s.channel for s in comp.sets} == {"compensation", "manual_temperature_c"}
    damp = c["set_damping"].params["seconds"]
    assert (damp.unit, damp.min, damp.max) == ("s", 0, 60)
    cal = c["calibrate"]
    assert cal.params["buffer_ph"].allowed == (4.01, 7.0, 10.01)
    assert {s.channel for s in cal.sets} == {
        "last_buffer_ph",
        "calibrated_ph4",
        "calibrated_ph7",
        "calibrated_ph10",
        "calibration_point",
    }
    # true only while a calibrate is checked (rules: no calibration while a pump runs)
    assert [s.channel for s in cal.sets if s.momentary] == ["calibration_point"]
    assert PhMeter.safe_state_calls == ()
    with pytest.raises(ValueError, match="must be one of"):
        cal.params["buffer_ph"].check(6.86)
    with pytest.raises(ValueError, match="<= 60"):
        damp.check(61)


def test_constructor_refuses_a_non_modbus_transport_and_bad_settings() -> None:
    from instruments.transports.serial import SerialTransport

    with pytest.raises(TypeError, match="Modbus register transport"):
        PhMeter(SerialTransport("loop://"))
    with pytest.raises(ValueError, match="unit 0"):
        PhMeter(ModbusTransport("modbus-rtu:///dev/null?unit=2"), unit=0)
    # the unit: given, else the URL's, else the transmitter's default 2
    assert PhMeter(ModbusTransport("modbus-rtu:///dev/null?unit=5"), unit=7).unit == 7
    assert PhMeter(ModbusTransport("modbus-rtu:///dev/null?unit=5")).unit == 5
    assert PhMeter(ModbusTransport("modbus-rtu:///dev/null?unit=1")).unit == 1
    assert PhMeter(ModbusTransport("modbus-rtu:///dev/null")).unit == 2
    assert set(PhMeter(ModbusTransport("modbus-rtu:///dev/null")).channels) >= {
        "compensation",
        "manual_temperature_c",
        "damping_s",
        "last_buffer_ph",
        "calibrated_ph4",
        "calibrated_ph7",
        "calibrated_ph10",
    }


# ---------------------------------------------------------------- reads
async def test_read_gives_ph_temperature_potential_status_and_settings(bus: SpecRtuBus) -> None:
    ph_of(bus).set_ph(6.862, temperature_c=-2.5, mv=-41.3)
    async with ph_meter(bus) as meter:
        assert meter.unit == 2
        reading = await meter.read()
    assert reading == {
        "ph": 6.862,
        "temperature_c": -2.5,
        "potential_mv": -41.3,
        "stable": True,
        "not_immersed": False,
        "out_of_range": False,
        "calibration_due": False,
        "calibrating": False,
        "compensation": "automatic",
        "manual_temperature_c": 25.0,
        "damping_s": 0,
    }
    assert bus.requests[-2:] == [(2, 4), (2, 3)]  # one FC4 (input 0-3), one FC3 (holding 0-2)


async def test_status_bits(bus: SpecRtuBus) -> None:
    ph_of(bus).inputs[3] = 0b01001  # stable, calibration due
    async with ph_meter(bus) as meter:
        status = await meter.status()
    assert status == PhStatus(0b01001, True, False, False, True, False)
    assert PhStatus.of(0b11111).as_dict() == dict.fromkeys(
        ("stable", "not_immersed", "out_of_range", "calibration_due", "calibrating"), True
    )


async def test_a_reading_while_the_probe_is_not_immersed_is_an_error(bus: SpecRtuBus) -> None:
    async with ph_meter(bus) as meter:
        ph_of(bus).immersed = False
        with pytest.raises(ProbeNotImmersedError, match="not immersed") as info:
            await meter.read()
        assert info.value.last_ph == 7.0  # the repeated value is kept for the log, not returned
        partial = info.value.reading  # what a supervisor keeps: the flags, no pH
        assert partial is not None and partial["ph"] is None
        assert partial["not_immersed"] and partial["out_of_range"]
        status = await meter.status()  # the status alone does not raise
        assert status.not_immersed and status.out_of_range
        with pytest.raises(ProbeNotImmersedError):
            await meter.calibrate(7.00)  # nor does a calibration start in air
        assert ph_of(bus).calibrated == []
        ph_of(bus).immersed = True
        whole = await meter.read()
        assert whole["ph"] == 7.0 and set(whole) == set(partial)  # the same channels


# ---------------------------------------------------------------- commands
async def test_compensation_and_damping(bus: SpecRtuBus) -> None:
    unit = ph_of(bus)
    async with ph_meter(bus) as meter:
        await meter.set_compensation("manual", -3.25)
        assert unit.holding[0] == 0 and signed(unit.holding[1]) == -32  # 0.1 degC, signed
        assert bus.requests[-1] == (2, 16)  # mode and temperature in one request
        await meter.set_compensation("automatic")
        assert unit.holding[0] == 1 and bus.requests[-1] == (2, 6)
        await meter.set_damping(60)
        assert unit.holding[2] == 60
        reading = await meter.read()
        assert (reading["compensation"], reading["damping_s"]) == ("automatic", 60)
        sent = len(bus.requests)
        for bad in (
            lambda: meter.set_compensation("auto"),
            lambda: meter.set_compensation("manual", 150.0),
            lambda: meter.set_damping(61),
            lambda: meter.set_damping(True),  # type: ignore[arg-type]
        ):
            with pytest.raises(ValueError):
                await bad()
        assert len(bus.requests) == sent  # refused before anything was sent


async def test_device_exceptions_are_typed(bus: SpecRtuBus) -> None:
    async with ph_meter(bus) as meter:
        with pytest.raises(ModbusExceptionError) as info:
            await meter.bus.write_register(2, 61, unit=2)  # outside 0-60: exception 3
        assert (info.value.function_code, info.value.exception_code) == (6, 3)
        with pytest.raises(ModbusExceptionError) as info:
            await meter.bus.read_input_registers(4, 1, unit=2)  # no such register: exception 2
        assert info.value.exception_code == 2


@pytest.mark.parametrize("buffer_ph", list(BUFFERS))
async def test_calibrate_writes_the_buffer_and_polls_until_done(
    bus: SpecRtuBus, buffer_ph: float
) -> None:
    unit = ph_of(bus)
    unit.cal_polls = 3
    async with ph_meter(bus, poll_interval=0.01) as meter:
        opened = len(bus.requests)
        await meter.calibrate(buffer_ph)
    assert unit.calibrated == [BUFFERS[buffer_ph]]
    assert unit.holding[10] == 0
    assert bus.requests[opened : opened + 2] == [(2, 4), (2, 6)]  # the status, the buffer
    polls = [r for r in bus.requests[opened:] if r == (2, 3)]
    assert len(polls) == 4  # three reads while busy, the fourth reads 0


async def test_calibration_that_does_not_finish_times_out_clearly(bus: SpecRtuBus) -> None:
    ph_of(bus).cal_stuck = True
    async with ph_meter(bus, poll_interval=0.02) as meter:
        with pytest.raises(CalibrationError, match="did not finish within 0.1 s") as info:
            await meter.calibrate(4.01, timeout=0.1)
        assert info.value.buffer_ph == 4.01
        assert "4.01 buffer" in str(info.value)
        with pytest.raises(ValueError, match="not one of"):
            await meter.calibrate(9.21)


async def test_safe_state_sends_nothing(bus: SpecRtuBus) -> None:
    async with ph_meter(bus) as meter:
        before = len(bus.requests)
        await meter.safe_state()
        assert len(bus.requests) == before


# ---------------------------------------------------------------- the shared RS-485 line
@contextlib.asynccontextmanager
async def both(bus: SpecRtuBus, timeout: float = 0.3) -> AsyncIterator[tuple[Hotplate, PhMeter]]:
    """The hotplate (unit 1) and the pH meter (unit 2) on one line; ``timeout`` is the pH
    meter's. The hotplate's is generous: its requests must succeed on a loaded machine (a
    request after the pH meter's failure also reopens the port within that deadline)."""
    hotplate = Hotplate(ModbusTransport(bus.url(1)), name="hotplate", timeout=2.0)
    meter = PhMeter(ModbusTransport(bus.url(2)), name="ph", timeout=timeout)
    async with hotplate, meter:
        yield hotplate, meter


async def test_two_units_share_one_port_and_their_requests_are_serialized(
    bus: SpecRtuBus,
) -> None:
    ph_of(bus).set_ph(7.4)
    async with both(bus) as (hotplate, meter):
        t1, t2 = hotplate.transport, meter.transport
        assert isinstance(t1, ModbusTransport) and isinstance(t2, ModbusTransport)
        assert t1.line_users == t2.line_users == 2
        assert t1._link is t2._link  # one client, one port

        async def plate(k: int) -> None:
            await hotplate.set_stirrer(True, 100 + k)
            assert 100 <= (await hotplate.read())["stirrer_setpoint_rpm"] < 108

        async def ph(k: int) -> None:
            await meter.set_damping(k)
            assert (await meter.read())["ph"] == 7.4

        await asyncio.gather(*(f(k) for k in range(8) for f in (plate, ph)))
        assert 100 <= bus.units[1].holding[1] < 108 and 0 <= ph_of(bus).holding[2] < 8
    assert len(bus.requests) >= 8 * 6 and {u for u, _ in bus.requests} == {1, 2}
    assert bus.overlaps == 0  # never a request while a reply was owed


async def test_line_settings_must_agree(bus: SpecRtuBus) -> None:
    first = ModbusTransport(bus.url(1))
    async with first:
        other = ModbusTransport(bus.url(2, parity="E"))
        with pytest.raises(TransportOpenError, match="same settings"):
            await other.open()
        await other.close()
        assert first.line_users == 1


@pytest.mark.parametrize("fault", ["garble", "mute"])
async def test_one_unit_failing_does_not_poison_the_other(bus: SpecRtuBus, fault: str) -> None:
    faults = getattr(bus, fault)
    expected = ProtocolError if fault == "garble" else TransportTimeout
    async with both(bus, timeout=0.15) as (hotplate, meter):
        faults.add(2)

        async def plate_reads() -> list[float]:
            return [(await hotplate.read())["plate_c"] for _ in range(5)]

        async def ph_read() -> None:
            with pytest.raises(expected):
                await meter.read()

        temps, _ = await asyncio.gather(plate_reads(), ph_read())
        assert temps == [22.0] * 5
        assert (await hotplate.read())["plate_c"] == 22.0  # right after the failure
        faults.discard(2)
        # and the failing unit recovers (a generous deadline: this request reopens the port)
        assert await meter.bus.read_input_registers(0, 1, unit=2, timeout=2.0) == [7000]
        assert (await meter.read())["ph"] == 7.0
    assert bus.overlaps == 0


async def test_a_late_reply_is_never_taken_for_the_other_units_answer(bus: SpecRtuBus) -> None:
    bus.units[1].inputs[0] = 555  # 55.5 degC: unmistakable
    async with both(bus, timeout=2.0) as (hotplate, meter):
        bus.late[2] = 0.15  # unit 2 answers 0.05 s after the deadline...
        bus.late[1] = 0.1  # ...while unit 1, asked right after, is still working on its answer
        with pytest.raises(TransportTimeout):
            await meter.bus.read_input_registers(0, 4, unit=2, timeout=0.1)
        regs = await hotplate.bus.read_input_registers(0, 4, unit=1, timeout=0.5)
        assert regs == [555, 221, 0, 0]  # not unit 2's [7000, 251, 0, 1]
        assert bus.overlaps == 1  # unit 1 was asked while unit 2's late reply was owed
        bus.late.clear()
        assert (await hotplate.read())["plate_c"] == 55.5
        assert (await meter.read())["ph"] == 7.0


async def test_closing_one_user_leaves_the_line_open_for_the_other(bus: SpecRtuBus) -> None:
    hotplate = Hotplate(ModbusTransport(bus.url(1)), name="hotplate")
    meter = PhMeter(ModbusTransport(bus.url(2)), name="ph")
    await hotplate.open()
    await meter.open()
    t1 = hotplate.transport
    assert isinstance(t1, ModbusTransport)
    await meter.close()
    assert t1.line_users == 1 and t1.connected
    assert (await hotplate.read())["plate_c"] == 22.0
    await meter.close()  # idempotent: the count does not drop twice
    assert t1.line_users == 1
    await meter.open()  # and a user can come back
    assert (await meter.read())["ph"] == 7.0
    await hotplate.close()
    assert (await meter.read())["ph"] == 7.0
    await meter.close()
    assert t1.line_users == 0 and not t1.connected


async def test_open_refuses_another_device_at_the_unit(bus: SpecRtuBus) -> None:
    meter = PhMeter(ModbusTransport(bus.url(1)), timeout=0.5)  # unit 1: the hotplate
    with pytest.raises(ProtocolError, match="unit 1 has no holding register 10") as info:
        await meter.open()
    assert "check unit= in the URL" in str(info.value)
    t = meter.transport
    assert isinstance(t, ModbusTransport) and t.line_users == 0  # nothing left open


async def test_open_fails_cleanly_when_the_unit_does_not_answer(bus: SpecRtuBus) -> None:
    bus.mute.add(2)
    meter = PhMeter(ModbusTransport(bus.url(2)), timeout=0.05)
    with pytest.raises(TransportTimeout):
        await meter.open()
    t = meter.transport
    assert isinstance(t, ModbusTransport) and t.line_users == 0  # nothing left open
