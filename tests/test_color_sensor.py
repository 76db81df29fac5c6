"""ColorSensor driver over BLE, against ColorSensorSim and a minimal emulator written from PROTOCOLS.md.

The radio is simulated: a BLE radio cannot exist on these machines (no
AF_BLUETOOTH, no /dev/vhci). simulators.ble.bluez stands in for bluetoothd +
controller + radio on a private dbus-daemon; bleak's real BlueZ backend, dbus-fast
and the D-Bus wire protocol run unchanged (DBUS_SYSTEM_BUS_ADDRESS points at the
private bus, restored after each test).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

import instruments
from instruments.drivers.color_sensor import ColorReading, ColorSensor, parse_measurement
from instruments.errors import DeviceRejected, LinkLostError, ProtocolError, TransportTimeout
from instruments.transports.ble import BleTransport
from simulators import SimClock, StationWorld
from simulators.ble import (
    AttError,
    BlueZStandIn,
    Characteristic,
    ColorSensorSim,
    Peripheral,
    Service,
)
from simulators.world import WHITE_COUNTS

pytestmark = pytest.mark.timeout(30)

SERVICE = "6e400001-b5a3-f393-e0a9-e50e24dc0001"
MEASUREMENT = "6e400002-b5a3-f393-e0a9-e50e24dc0001"
CONTROL = "6e400003-b5a3-f393-e0a9-e50e24dc0001"


@pytest.fixture
def world() -> StationWorld:
    return StationWorld(clock=SimClock(speed=50))


@pytest.fixture
async def sensor_sim(world: StationWorld) -> AsyncIterator[ColorSensorSim]:
    sim = ColorSensorSim(world)
    await sim.start()
    try:
        with sim.environ():
            yield sim
    finally:
        await sim.stop()


@contextlib.asynccontextmanager
async def sensor(url: str, **options: Any) -> AsyncIterator[ColorSensor]:
    async with instruments.connect("color-sensor", url, **options) as driver:
        assert isinstance(driver, ColorSensor)
        yield driver


def control_writes(world: StationWorld) -> list[bytes]:
    return [
        r.data for r in world.wire.entries("color-sensor") if r.note.startswith("write control")
    ]


def set_vial(world: StationWorld, **species_ml: float) -> None:
    with world.lock:
        for sp in world.vial.species_ml:
            world.vial.species_ml[sp] = species_ml.get(sp, 0.0)


# ----------------------------------------------------------------- parsing
def test_parse_measurement_is_strict() -> None:
    good = struct.pack("<HHHHHB", 7, 100, 200, 300, 400, 1)
    assert parse_measurement(good) == (7, 100, 200, 300, 400, "saturated")
    for bad in (good[:-1], good + b"\x00", b""):
        with pytest.raises(ProtocolError, match="expected 11"):
            parse_measurement(bad)
    with pytest.raises(ProtocolError, match="status 3"):
        parse_measurement(good[:-1] + b"\x03")


def test_argument_checks() -> None:
    t = BleTransport("ble://AA:BB:CC:DD:EE:01")  # validated, not opened
    with pytest.raises(ValueError, match="integration time"):
        ColorSensor(t, integration_ms=70000)
    driver = ColorSensor(t)
    assert driver.channels["integration_ms"].maximum == 65535
    assert driver.describe()["kind"] == "color-sensor"
    with pytest.raises(ValueError, match="integration time"):
        asyncio.run(driver.measure(0))


# ---------------------------------------------------------- measurements
async def test_measure_once_via_notify(sensor_sim: ColorSensorSim, world: StationWorld) -> None:
    async with sensor(sensor_sim.url) as cs:
        reading = await cs.measure()
        assert reading.status == "ok" and reading.integration_ms == 100
        # empty vial: the sensor sees its LED through glass and air (0.92 x white)
        for counts, white in zip(
            (reading.red, reading.green, reading.blue), WHITE_COUNTS, strict=True
        ):
            assert counts == pytest.approx(0.92 * white, rel=0.03)
        assert reading.seq == world.sensor_seq
        half = await cs.measure(50)
        assert half.red == pytest.approx(reading.red / 2, rel=0.03)
        assert half.seq == reading.seq + 1 and half.gap == 0
    assert control_writes(world)[:2] == [b"\x01\x64\x00", b"\x01\x32\x00"]


async def test_continuous_readings_follow_the_world(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async def collect(cs: ColorSensor, n: int) -> list[ColorReading]:
        await cs.start_continuous(100)
        out: list[ColorReading] = []
        async with contextlib.aclosing(cs.readings()) as stream:
            async for reading in stream:
                out.append(reading)
                if len(out) == n:
                    break
        await cs.stop_continuous()
        return out

    async with sensor(sensor_sim.url) as cs:
        clear = await collect(cs, 5)
        set_vial(world, red=2.0)
        red = await collect(cs, 5)
    for batch in (clear, red):
        seqs = [r.seq for r in batch]
        assert seqs == list(range(seqs[0], seqs[0] + 5))
        assert all(r.gap == 0 for r in batch[1:])
    mean = lambda rs, ch: sum(getattr(r, ch) for r in rs) / len(rs)  # noqa: E731
    # red dye absorbs green and blue, passes red
    assert mean(red, "green") < 0.2 * mean(clear, "green")
    assert mean(red, "blue") < 0.2 * mean(clear, "blue")
    assert mean(red, "red") > 0.9 * mean(clear, "red")
    assert control_writes(world) == [
        b"\x02\x64\x00",
        b"\x03\x64\x00",
        b"\x02\x64\x00",
        b"\x03\x64\x00",
        b"\x03\x64\x00",
    ]
    assert not sensor_sim.continuous


async def test_read_measurement_characteristic_and_battery(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async with sensor(sensor_sim.url) as cs:
        measured = await cs.measure()
        latest = await cs.latest()
        assert (latest.seq, latest.red, latest.blue) == (measured.seq, measured.red, measured.blue)
        assert await cs.battery() == 87
        sensor_sim.battery_percent = 42
        assert await cs.battery() == 42
        # BlueZ echoes a read of a subscribed characteristic as a notification;
        # the next measure() must still return a fresh measurement
        again = await cs.measure()
        assert again.seq == measured.seq + 1
        snapshot = await cs.read()
        assert snapshot["battery_percent"] == 42 and snapshot["status"] == "ok"
    notes = [r.note for r in world.wire.entries("color-sensor")]
    assert notes.count("read measurement") == 1 and notes.count("read battery") == 3


async def test_calibrate_white_normalises_rgb(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async with sensor(sensor_sim.url) as cs:
        white = await cs.measure()
        cs.calibrate_white(white)
        again = await cs.measure(50)  # another integration time: normalised by it
        assert again.rgb is not None
        assert again.rgb == pytest.approx((1.0, 1.0, 1.0), abs=0.03)
        assert (await cs.measure(200)).status == "saturated"  # 2 x 0.92 x white > 65535
        set_vial(world, blue=2.0)
        blue = await cs.measure()
        assert blue.rgb is not None
        assert blue.rgb[2] > 0.8 and blue.rgb[0] < 0.1
        with pytest.raises(ValueError, match="'ok' reading"):
            cs.calibrate_white(ColorReading(1, 0, 0, 0, 0, "dark"))


# ------------------------------------------------------- errors and faults
async def test_malformed_control_write_is_rejected(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async with sensor(sensor_sim.url) as cs:
        with pytest.raises(DeviceRejected) as err:
            await cs.link.write(CONTROL, b"\x01\x64")  # 2 bytes instead of <BH>
        assert err.value.code == "ATT 0x0D"  # bluetoothd: InvalidArguments "Invalid Length"
        with pytest.raises(DeviceRejected, match="ATT 0x13"):
            await cs.link.write(CONTROL, b"\x09\x64\x00")  # unknown opcode
        assert (await cs.measure()).status == "ok"  # the link is fine afterwards
    assert control_writes(world)[:2] == [b"\x01\x64", b"\x09\x64\x00"]


async def test_sensor_dropout_times_out(sensor_sim: ColorSensorSim, world: StationWorld) -> None:
    async with sensor(sensor_sim.url, timeout=0.2, attempts=2) as cs:
        world.faults.inject("sensor-dropout")
        with pytest.raises(TransportTimeout, match="no notification|no measurement"):
            await cs.measure()
        with pytest.raises(DeviceRejected, match="ATT 0x80"):
            await cs.latest()
        assert await cs.battery() == 87  # the radio is fine, the optics are not
        world.faults.clear("sensor-dropout")
        assert (await cs.measure()).status == "ok"
    assert control_writes(world).count(b"\x01\x64\x00") == 3  # 2 attempts + the last measure


async def test_dropped_connection_link_lost_then_reconnect(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async with sensor(sensor_sim.url, timeout=3.0) as cs:
        lost = asyncio.Event()
        assert isinstance(cs.transport, BleTransport)
        cs.transport.on_disconnect(lost.set)
        first = await cs.measure()
        world.faults.inject("dropped-connection", device="color-sensor")
        await asyncio.wait_for(lost.wait(), 2.0)
        with pytest.raises(LinkLostError):
            await cs.link.read("2a19")
        assert (await cs.measure()).seq == first.seq + 1  # reconnected on demand

        # during continuous mode: the stream is re-armed after the reconnect (readings
        # queued before the drop may still arrive first on a loaded machine: read on until
        # two have come after the third connect)
        def connects() -> int:
            return [r.note for r in world.wire.entries("color-sensor")].count("connect")

        await cs.start_continuous(100)
        got: list[ColorReading] = []
        after_reconnect = 0
        async with contextlib.aclosing(cs.readings()) as stream:
            async for reading in stream:
                got.append(reading)
                assert len(got) < 200, "the stream never came back after the drop"
                if len(got) == 2:
                    world.faults.inject("dropped-connection", device="color-sensor")
                elif len(got) > 2 and connects() == 3:
                    after_reconnect += 1
                    if after_reconnect == 2:
                        break
        assert all(b.seq > a.seq for a, b in zip(got, got[1:], strict=False))
    notes = [r.note for r in world.wire.entries("color-sensor")]
    assert notes.count("connect") == 3
    assert control_writes(world).count(b"\x02\x64\x00") == 2


async def test_garbled_payload_is_a_protocol_error(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async with sensor(sensor_sim.url, timeout=1.0, attempts=2) as cs:
        world.faults.inject("garbled-bytes", device="pumps")  # another device's fault
        assert (await cs.measure()).status == "ok"
        world.faults.inject("garbled-bytes", device="color-sensor")
        with pytest.raises(ProtocolError, match="expected 11"):
            await cs.measure()
        with pytest.raises(ProtocolError):
            await cs.latest()
        world.faults.clear("garbled-bytes")
        assert (await cs.measure()).status == "ok"


async def test_connect_via_registry_safe_state_on_exit(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    async with instruments.connect(
        "color-sensor", sensor_sim.name_url + "?timeout=5&scan_timeout=2"
    ) as cs:
        await cs.start_continuous(200)
        await asyncio.sleep(0.05)
        assert sensor_sim.continuous
    await asyncio.sleep(0.02)
    assert not sensor_sim.continuous
    assert control_writes(world)[-1] == b"\x03\xc8\x00"
    assert world.wire.entries("color-sensor")[-1].note == "disconnect (local)"
    await cs.safe_state()  # idempotent, also with the link closed


# ------------------------------------------ a second emulator, from the spec
class SpecEmulator:
    """A minimal colour sensor written from PROTOCOLS.md alone (not from ColorSensorSim).

    Fixed counts (1000, 2000, 3000, clear 4000 per 100 ms), status from the
    counts, notifications right after the integration time in real time, a
    sequence counter that starts near the 16-bit wrap and skips one number
    (a lost measurement) to exercise gap detection. Battery 42 %.
    """

    ADDRESS = "D0:0D:F0:0D:00:07"
    NAME = "LB-COLOR-0007"

    def __init__(self, bluez: BlueZStandIn) -> None:
        self.bluez = bluez
        self.seq = 0xFFFD
        self.last = b""
        self.task: asyncio.Task[None] | None = None
        bluez.add_peripheral(
            Peripheral(
                self.ADDRESS,
                self.NAME,
                services=[
                    Service(
                        SERVICE,
                        [
                            Characteristic(MEASUREMENT, ("read", "notify"), read=lambda: self.last),
                            Characteristic(CONTROL, ("write",), write=self.control),
                        ],
                    ),
                    Service("180f", [Characteristic("2a19", ("read",), value=bytes([42]))]),
                ],
                advertised_uuids=[SERVICE],
                on_disconnect=lambda reason: self.stop(),
            )
        )

    def sample(self, ms: int) -> bytes:
        self.seq = (self.seq + (2 if self.seq == 0xFFFE else 1)) & 0xFFFF  # skips 0xFFFF
        r, g, b, c = (int(x * ms / 100) for x in (1000, 2000, 3000, 4000))
        status = 1 if max(r, g, b, c) >= 65535 else 2 if c < 300 else 0
        self.last = struct.pack(
            "<HHHHHB", self.seq, min(r, 65535), min(g, 65535), min(b, 65535), min(c, 65535), status
        )
        return self.last

    def control(self, data: bytes, with_response: bool) -> None:
        if len(data) != 3:
            raise AttError(0x0D)
        opcode, ms = struct.unpack("<BH", data)
        self.stop()
        if opcode == 3:
            return
        if opcode not in (1, 2) or ms == 0:
            raise AttError(0x13)
        self.task = asyncio.ensure_future(self.run(ms, once=opcode == 1))

    async def run(self, ms: int, once: bool) -> None:
        while True:
            await asyncio.sleep(ms / 1000)
            self.bluez.notify(self.ADDRESS, MEASUREMENT, self.sample(ms))
            if once:
                return

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


async def test_driver_against_a_minimal_spec_emulator() -> None:
    bluez = BlueZStandIn()
    await bluez.start()
    emulator = SpecEmulator(bluez)
    try:
        with bluez.environ():
            async with sensor(
                f"ble://name/{SpecEmulator.NAME}?scan_timeout=2", integration_ms=20
            ) as cs:
                first = await cs.measure()
                assert (first.seq, first.red, first.green, first.blue, first.clear) == (
                    0xFFFE,
                    200,
                    400,
                    600,
                    800,
                )
                assert first.status == "ok"
                assert await cs.battery() == 42
                await cs.start_continuous(10)
                got: list[ColorReading] = []
                async with contextlib.aclosing(cs.readings()) as stream:
                    async for reading in stream:
                        got.append(reading)
                        if len(got) == 3:
                            break
                await cs.stop_continuous()
                # 0xFFFE -> (0xFFFF lost) -> 0 -> 1 -> 2: one gap reported, not fatal
                assert [r.seq for r in got] == [0, 1, 2]
                assert [r.gap for r in got] == [1, 0, 0]
                assert got[0].red == 100
                assert (await cs.latest()).seq == 2
    finally:
        emulator.stop()
        await bluez.stop()
