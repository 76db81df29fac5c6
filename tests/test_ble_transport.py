"""BleTransport against a simulated BlueZ.

The radio is simulated: a BLE radio cannot exist on these machines (no
AF_BLUETOOTH, no /dev/vhci). simulators.ble.bluez stands in for bluetoothd +
controller + radio on a private dbus-daemon; bleak's real BlueZ backend, dbus-fast
and the D-Bus wire protocol run unchanged (DBUS_SYSTEM_BUS_ADDRESS points at the
private bus, restored after each test).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from instruments.errors import (
    DeviceRejected,
    InvalidURLError,
    LinkLostError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports import transport_for
from instruments.transports.ble import BleTransport, normalize_uuid
from simulators import SimClock, StationWorld
from simulators.ble import (
    AttError,
    BleSimulatorUnavailable,
    BlueZStandIn,
    Characteristic,
    ColorSensorSim,
    Peripheral,
    Service,
)
from simulators.ble.color_sensor import (
    BATTERY_LEVEL_UUID,
    CONTROL_UUID,
    MEASUREMENT_UUID,
    SERVICE_UUID,
)

pytestmark = pytest.mark.timeout(30)

ECHO_SERVICE = "0000fff0-0000-1000-8000-00805f9b34fb"
ECHO_RX = "0000fff1-0000-1000-8000-00805f9b34fb"  # write / write-without-response
ECHO_TX = "0000fff2-0000-1000-8000-00805f9b34fb"  # notify (echoes what was written)
ECHO_RO = "0000fff3-0000-1000-8000-00805f9b34fb"  # read only, slow when told to


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


@pytest.fixture
async def bluez() -> AsyncIterator[BlueZStandIn]:
    stand_in = BlueZStandIn()
    await stand_in.start()
    try:
        with stand_in.environ():
            yield stand_in
    finally:
        await stand_in.stop()


class EchoDevice:
    """A generic peripheral for the transport tests: what is written comes back as a notification."""

    ADDRESS = "C0:FF:EE:00:00:01"

    def __init__(self, bluez: BlueZStandIn) -> None:
        self.bluez = bluez
        self.written: list[tuple[bytes, bool]] = []
        self.release = asyncio.Event()
        self.slow = False
        bluez.add_peripheral(
            Peripheral(
                self.ADDRESS,
                "Echo",
                services=[
                    Service(
                        ECHO_SERVICE,
                        [
                            Characteristic(
                                ECHO_RX, ("write", "write-without-response"), write=self.on_write
                            ),
                            Characteristic(ECHO_TX, ("notify",)),
                            Characteristic(ECHO_RO, ("read",), read=self.on_read),
                        ],
                    )
                ],
                advertised_uuids=[ECHO_SERVICE],
                manufacturer_data={0xFFFF: b"\x01\x02"},
            )
        )

    def on_write(self, data: bytes, with_response: bool) -> None:
        if data == b"":
            raise AttError(0x0D, "empty")
        self.written.append((data, with_response))
        self.bluez.notify(self.ADDRESS, ECHO_TX, data)

    async def on_read(self) -> bytes:
        if self.slow:
            await self.release.wait()
        return b"ro"


# ------------------------------------------------------------------- URLs
@pytest.mark.parametrize(
    "url, address, name",
    [
        ("ble://AA:BB:CC:DD:EE:FF", "AA:BB:CC:DD:EE:FF", None),
        ("ble://aa-bb-cc-dd-ee-ff?timeout=3", "AA:BB:CC:DD:EE:FF", None),
        ("ble://name/LB-COLOR-EE01?scan_timeout=1", None, "LB-COLOR-EE01"),
        ("ble://name/My%20Sensor", None, "My Sensor"),
    ],
)
def test_url_forms(url: str, address: str | None, name: str | None) -> None:
    t = BleTransport(url)
    assert (t.address, t.device_name) == (address, name)


@pytest.mark.parametrize(
    "url",
    [
        "ble://AA:BB:CC:DD:EE",
        "ble://not-an-address",
        "ble://name/",
        "ble://AA:BB:CC:DD:EE:FF?baud=9600",
        "ble://AA:BB:CC:DD:EE:FF?timeout=0",
        "ble://AA:BB:CC:DD:EE:FF?scan_timeout=soon",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidURLError, match="invalid transport URL"):
        transport_for(url)


def test_uuid_forms() -> None:
    assert normalize_uuid("2A19") == normalize_uuid("0x2a19") == BATTERY_LEVEL_UUID
    with pytest.raises(ValueError):
        normalize_uuid("xyz")


# ------------------------------------------------------------ scan/connect
async def test_scan_finds_sensor_by_name(sensor_sim: ColorSensorSim) -> None:
    found = await BleTransport.scan(0.3)
    assert [(a, n) for a, n, _ in found] == [(sensor_sim.address, sensor_sim.name)]
    assert -65 < found[0][2] < -50  # sim RSSI -58 +- 2 dB


async def test_connect_by_address_and_by_name(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    for url in (sensor_sim.url, sensor_sim.name_url + "?scan_timeout=2"):
        t = transport_for(url)
        assert isinstance(t, BleTransport)
        await t.open()
        try:
            assert t.is_connected
            assert MEASUREMENT_UUID in t.services[SERVICE_UUID]
            assert await t.read("2a19") == bytes([sensor_sim.battery_percent])
        finally:
            await t.close()
        await t.close()  # idempotent
        assert not t.is_connected
    notes = [r.note for r in world.wire.entries("color-sensor")]
    assert notes.count("connect") == 2 and notes.count("disconnect (local)") == 2


async def test_device_not_found_names_the_url(sensor_sim: ColorSensorSim) -> None:
    for url in (
        "ble://11:22:33:44:55:66?scan_timeout=0.3",
        "ble://name/NO-SUCH-DEVICE?scan_timeout=0.3",
    ):
        t = transport_for(url)
        with pytest.raises(TransportOpenError) as err:
            await t.open()
        assert url in str(err.value) and "not found" in str(err.value)
        await t.close()


# -------------------------------------------------------- GATT operations
async def test_read_write_notify_on_a_generic_peripheral(bluez: BlueZStandIn) -> None:
    echo = EchoDevice(bluez)
    t = BleTransport(f"ble://{EchoDevice.ADDRESS}?timeout=2")
    await t.open()
    try:
        queue = await t.subscribe("fff2")
        assert await t.subscribe(ECHO_TX) is queue  # idempotent, short UUIDs accepted
        await t.write("fff1", b"hello")  # with response
        await t.write(ECHO_RX, b"quiet", response=False)  # a command: no ATT response
        assert await t.next_notification("fff2", 2.0) == b"hello"
        assert await t.next_notification("fff2", 2.0) == b"quiet"
        assert echo.written == [(b"hello", True), (b"quiet", False)]
        assert bluez.is_notifying(EchoDevice.ADDRESS, ECHO_TX)
        assert await t.read("fff3") == b"ro"

        with pytest.raises(DeviceRejected) as rejected:
            await t.write("fff1", b"")  # the peripheral answers ATT 0x0D
        assert rejected.value.code == "ATT 0x0D"
        with pytest.raises(DeviceRejected, match="ATT 0x02"):
            await t.read("fff2")  # not readable: Read Not Permitted
        with pytest.raises(TransportError, match="no such characteristic"):
            await t.read("abcd")

        await t.unsubscribe("fff2")
        await t.unsubscribe("fff2")
        await asyncio.sleep(0.02)
        assert not bluez.is_notifying(EchoDevice.ADDRESS, ECHO_TX)
        with pytest.raises(TransportError, match="not subscribed"):
            await t.next_notification("fff2", 0.1)
    finally:
        await t.close()


async def test_every_operation_has_a_timeout(bluez: BlueZStandIn) -> None:
    echo = EchoDevice(bluez)
    echo.slow = True
    t = BleTransport(f"ble://{EchoDevice.ADDRESS}?timeout=0.3")
    await t.open()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportTimeout) as err:
            await t.read("fff3")
        assert 0.25 < loop.time() - started < 2.0
        assert t.url in str(err.value)
        queue = await t.subscribe("fff2")
        with pytest.raises(TransportTimeout):
            await t.next_notification("fff2", 0.1)
        assert queue.empty()
    finally:
        echo.release.set()
        await t.close()


async def test_notification_queue_drops_oldest_when_full(bluez: BlueZStandIn) -> None:
    EchoDevice(bluez)
    t = BleTransport(f"ble://{EchoDevice.ADDRESS}")
    await t.open()
    try:
        queue = await t.subscribe("fff2", maxsize=2)
        for i in range(4):
            await t.write("fff1", bytes([i]))
        await asyncio.sleep(0.05)
        assert [queue.get_nowait(), queue.get_nowait()] == [b"\x02", b"\x03"]
        assert t.dropped_notifications == 2
    finally:
        await t.close()


# --------------------------------------------------------------- link loss
async def test_link_lost_then_reconnect_on_demand(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    t = BleTransport(sensor_sim.url + "?timeout=3")
    await t.open()
    lost = asyncio.Event()
    t.on_disconnect(lost.set)
    try:
        queue = await t.subscribe(MEASUREMENT_UUID)
        waiter = asyncio.ensure_future(t.next_notification(MEASUREMENT_UUID, 5.0))
        await asyncio.sleep(0.02)
        world.faults.inject("dropped-connection", device="color-sensor")
        with pytest.raises(LinkLostError):
            await waiter  # woken by the loss, not by its timeout
        await asyncio.wait_for(lost.wait(), 2.0)
        assert not t.is_open and not t.is_connected

        # the waiter got the report, so the next operation reconnects
        assert await t.read(BATTERY_LEVEL_UUID) == bytes([sensor_sim.battery_percent])
        assert t.is_connected

        # a second drop: the next operation reports it once, the one after reconnects
        lost.clear()
        world.faults.inject("dropped-connection", device="color-sensor")
        await asyncio.wait_for(lost.wait(), 2.0)
        with pytest.raises(LinkLostError) as err:
            await t.read(BATTERY_LEVEL_UUID)
        assert t.url in str(err.value)
        await t.write(CONTROL_UUID, b"\x01\x0a\x00")  # reconnects, re-subscribes
        payload = await t.next_notification(MEASUREMENT_UUID, 3.0)
        assert payload is not None and len(payload) == 11
        assert await t.subscribe(MEASUREMENT_UUID) is queue  # the same queue across reconnects
    finally:
        await t.close()
    entries = world.wire.entries("color-sensor")
    assert [r.note for r in entries].count("connect") == 3
    assert sum(r.note == "notifications on" and r.data == MEASUREMENT_UUID for r in entries) == 3


# ----------------------------------------------------------- leaks, errors
async def test_close_idempotent_and_no_leaks(world: StationWorld) -> None:
    before = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    sim = ColorSensorSim(world, address="AA:BB:CC:DD:EE:09")
    await sim.start()
    pid = sim.bluez.daemon_pid
    assert pid is not None
    socket_path = sim.dbus_address.split("path=", 1)[1].split(",", 1)[0]
    with sim.environ():
        t = BleTransport(sim.url)
        await t.close()  # never opened: fine
        await t.open()
        await t.open()  # already open: no-op
        await t.close()
        await t.close()
    assert os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") == before
    await sim.stop()
    await sim.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the dbus-daemon is gone (and reaped)
    assert not await asyncio.to_thread(os.path.exists, socket_path)
    # the leak fixtures in conftest check sockets, threads and tasks after this


async def test_without_dbus_daemon_the_error_says_so() -> None:
    stand_in = BlueZStandIn(dbus_daemon="/nonexistent/dbus-daemon")
    with pytest.raises(BleSimulatorUnavailable, match=r"needs dbus-daemon \(Linux\)"):
        await stand_in.start()
    await stand_in.stop()


async def test_no_bluez_reachable_is_an_open_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    with pytest.raises(TransportOpenError, match="BlueZ is not reachable"):
        await BleTransport.scan(0.1)
    t = BleTransport("ble://AA:BB:CC:DD:EE:01?scan_timeout=0.2")
    with pytest.raises(TransportOpenError, match="AA:BB:CC:DD:EE:01"):
        await t.open()
    await t.close()


async def test_a_connection_left_by_a_killed_process_is_reused(
    sensor_sim: ColorSensorSim, world: StationWorld
) -> None:
    """kill -9 of a process holding the connection leaves BlueZ connected to the sensor,
    which then stops advertising (bleak #367, BlueZ #89): the next open must find it among
    the connected devices instead of scanning for an advertisement that never comes."""
    import signal
    import sys

    code = (
        "import asyncio, sys\n"
        "from instruments.transports import transport_for\n"
        "async def main():\n"
        f"    t = transport_for({sensor_sim.url!r})\n"
        "    await t.open()\n"
        "    print('open', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"open"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert [r.note for r in world.wire.entries("color-sensor")].count("connect") == 1
    scan = await BleTransport.scan(0.3)
    assert sensor_sim.address not in [a for a, _, _ in scan]  # connected: not advertising
    t = transport_for(sensor_sim.url + "?scan_timeout=0.5")
    await t.open()
    try:
        assert t.is_connected
        assert await t.read("2a19") == bytes([sensor_sim.battery_percent])
    finally:
        await t.close()
