"""Hotplate driver against the pymodbus HotplateSim (TCP and RTU on a pty) and a second,
hand-written Modbus TCP device built here from PROTOCOLS.md alone."""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

import instruments
from instruments.driver import SafeStateError
from instruments.drivers.hotplate import Hotplate
from instruments.errors import ModbusExceptionError, ProtocolError, TransportTimeout
from instruments.transports.base import Transport
from instruments.transports.modbus import ModbusTransport
from simulators.clock import SimClock
from simulators.hotplate import HotplateSim
from simulators.world import AMBIENT_C, StationWorld


@pytest.fixture
def world() -> StationWorld:
    return StationWorld(clock=SimClock(50.0))


@pytest.fixture(params=["tcp", "rtu"])
async def sim(request: pytest.FixtureRequest, world: StationWorld) -> AsyncIterator[HotplateSim]:
    s = HotplateSim(world, mode=request.param)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def tcp_sim(world: StationWorld) -> AsyncIterator[HotplateSim]:
    s = HotplateSim(world, mode="tcp")
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def hp(sim: HotplateSim) -> AsyncIterator[Hotplate]:
    async with instruments.connect("hotplate", sim.url, timeout=0.3) as driver:
        yield driver


@pytest.fixture
async def tcp_hp(tcp_sim: HotplateSim) -> AsyncIterator[Hotplate]:
    async with instruments.connect("hotplate", tcp_sim.url, timeout=0.1) as driver:
        yield driver


def _fill_vial(world: StationWorld, ml: float = 2.0) -> None:
    with world.lock:
        world.vial.species_ml["red"] = ml


# ----------------------------------------------------------- driver vs sim
async def test_read_and_set_every_register(hp: Hotplate, world: StationWorld) -> None:
    first = await hp.read()
    assert first == {
        "plate_c": AMBIENT_C,
        "liquid_c": AMBIENT_C,
        "stirrer_rpm": 0,
        "heating": False,
        "stirring": False,
        "over_temperature": False,
        "probe_fault": False,
        "watchdog_tripped": False,
        "setpoint_c": 25.0,
        "stirrer_setpoint_rpm": 0,
        "heater_enabled": False,
        "stirrer_enabled": False,
        "watchdog_s": 0,
        "max_c": 340.0,
    }
    world.wire.clear()
    await hp.set_stirrer(True, 300)
    await hp.set_heater(True, 60.5)
    await hp.set_watchdog(120)
    assert world.wire.data("hotplate") == [
        {"fc": 6, "address": 1, "values": [300]},
        {"fc": 6, "address": 3, "values": [1]},
        {"fc": 6, "address": 0, "values": [605]},  # setpoint first, then the enable
        {"fc": 6, "address": 2, "values": [1]},
        {"fc": 6, "address": 4, "values": [120]},
    ]
    state = await hp.read()
    assert (state["setpoint_c"], state["stirrer_setpoint_rpm"], state["watchdog_s"]) == (
        60.5,
        300,
        120,
    )
    assert state["heater_enabled"] and state["stirrer_enabled"] and state["heating"]
    assert world.hotplate.setpoint_c == 60.5 and world.hotplate.heater_enabled
    assert world.wire.data("hotplate")[-2:] == [
        {"fc": 3, "address": 0, "count": 5},
        {"fc": 4, "address": 0, "count": 5},
    ]
    await hp.set_state(heater=False, setpoint_c=45.0, stirrer=True, rpm=800)  # one FC16
    assert world.wire.data("hotplate")[-1] == {"fc": 16, "address": 0, "values": [450, 800, 0, 1]}
    state = await hp.read()
    assert (state["setpoint_c"], state["stirrer_setpoint_rpm"], state["heater_enabled"]) == (
        45.0,
        800,
        False,
    )
    await hp.set_heater(False)
    await hp.set_stirrer(False)
    await hp.set_watchdog(0)
    assert not world.hotplate.stirrer_enabled and world.hotplate.watchdog_s == 0


async def test_heating_raises_plate_and_liquid(hp: Hotplate, world: StationWorld) -> None:
    world.clock.speed = 200.0
    _fill_vial(world)
    await hp.set_stirrer(True, 400)
    await hp.set_heater(True, 70.0)
    await asyncio.sleep(0.6)  # 120 simulated s: 3 plate time constants
    state = await hp.read()
    assert state["plate_c"] > 60.0
    assert AMBIENT_C + 15.0 < state["liquid_c"] < state["plate_c"]
    assert state["heating"] and state["stirring"] and state["stirrer_rpm"] > 350
    await hp.set_heater(False)
    cooled_from = (await hp.read())["plate_c"]
    await asyncio.sleep(0.3)
    assert (await hp.read())["plate_c"] < cooled_from - 10.0


async def test_device_watchdog_trips_heater_and_stirrer(hp: Hotplate, world: StationWorld) -> None:
    world.clock.speed = 10.0  # the watchdog's 10 simulated s = 1 s real while we feed it
    await hp.set_watchdog(10)
    await hp.set_stirrer(True, 200)
    await hp.set_heater(True, 50.0)
    for _ in range(8):  # writes feed the watchdog: 0.04 s apart, it never trips
        await asyncio.sleep(0.04)
        await hp.set_heater(True, 50.0)
    state = await hp.read()
    assert state["heater_enabled"] and not state["watchdog_tripped"]
    world.clock.speed = 100.0
    await asyncio.sleep(0.3)  # 30 simulated s without a write; reads do not feed it
    assert (await hp.read())["watchdog_tripped"]
    state = await hp.read()
    assert (
        state["watchdog_tripped"] and not state["heater_enabled"] and not state["stirrer_enabled"]
    )
    assert not state["heating"]
    assert world.hotplate.watchdog_tripped and not world.hotplate.heater_enabled
    await hp.set_heater(True, 50.0)  # re-arms
    state = await hp.read()
    assert state["heater_enabled"] and state["heating"] and not state["watchdog_tripped"]


async def test_no_probe_reads_none(hp: Hotplate, world: StationWorld) -> None:
    with world.lock:
        world.hotplate.probe_present = False
    state = await hp.read()
    assert state["liquid_c"] is None and state["plate_c"] == AMBIENT_C


async def test_setpoint_and_speed_validation(tcp_hp: Hotplate, world: StationWorld) -> None:
    world.wire.clear()
    with pytest.raises(ValueError, match=r"340\.5.*340\.0"):
        await tcp_hp.set_heater(True, 340.5)
    with pytest.raises(ValueError, match="-5"):
        await tcp_hp.set_heater(True, -5.0)
    with pytest.raises(ValueError, match="nan"):
        await tcp_hp.set_heater(True, math.nan)
    with pytest.raises(ValueError, match=r"1600 rpm.*1500"):
        await tcp_hp.set_stirrer(True, 1600)
    with pytest.raises(ValueError, match="integer"):
        await tcp_hp.set_stirrer(True, 300.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="70000"):
        await tcp_hp.set_watchdog(70000)
    with pytest.raises(ValueError):
        await tcp_hp.set_state(heater=True, setpoint_c=400.0, stirrer=True, rpm=100)
    assert world.wire.data("hotplate") == []  # refused before anything was sent
    assert world.hotplate.heater_enabled is False


async def test_device_maximum_read_at_open(tcp_sim: HotplateSim, world: StationWorld) -> None:
    world.hotplate.max_c = 250.0
    async with instruments.connect("hotplate", tcp_sim.url) as hp:
        assert hp.max_c == 250.0
        assert hp.channels["setpoint_c"].maximum == 250.0
        assert hp.describe()["channels"]["setpoint_c"]["maximum"] == 250.0
        settable = {n for n, ch in hp.channels.items() if ch.settable}
        assert settable == {
            "setpoint_c",
            "stirrer_setpoint_rpm",
            "stirrer_rpm",
            "heater",
            "stirrer",
            "watchdog_s",
        }
        assert set(await hp.read()) == {n for n, ch in hp.channels.items() if ch.readable}
        with pytest.raises(ValueError, match="250"):
            await hp.set_heater(True, 260.0)
        world.hotplate.max_c = 200.0  # the device changed under us: its exception 3 comes through
        with pytest.raises(ModbusExceptionError) as info:
            await hp.set_heater(True, 220.0)
        assert (info.value.function_code, info.value.address, info.value.exception_code) == (
            6,
            0,
            3,
        )
        assert not world.hotplate.heater_enabled  # the enable was never sent
        await hp.read()
        assert hp.max_c == 200.0


async def test_modbus_exception_fault(tcp_hp: Hotplate, world: StationWorld) -> None:
    world.faults.inject("modbus-exception", code=4)
    world.wire.clear()
    with pytest.raises(ModbusExceptionError) as info:
        await tcp_hp.read()
    assert info.value.exception_code == 4 and info.value.function_code == 3
    assert len(world.wire.data("hotplate")) == 1  # a device error is not retried
    with pytest.raises(SafeStateError) as failed:
        await tcp_hp.safe_state()
    assert set(failed.value.failures) == {"heater off", "stirrer off"}  # both were tried
    world.faults.clear()


async def test_timeouts_are_retried_then_raised(tcp_hp: Hotplate, world: StationWorld) -> None:
    world.faults.inject("no-reply", device="hotplate")
    world.wire.clear()
    with pytest.raises(TransportTimeout):
        await tcp_hp.read()
    assert len(world.wire.data("hotplate")) == Hotplate.ATTEMPTS
    world.faults.clear("no-reply")
    assert (await tcp_hp.read())["max_c"] == 340.0


async def test_garbled_frames(hp: Hotplate, world: StationWorld) -> None:
    world.faults.inject("garbled-bytes", device="hotplate", probability=1.0)
    with pytest.raises(ProtocolError):
        await hp.read()
    world.faults.inject("garbled-bytes", device="hotplate", probability=0.3)
    for _ in range(5):  # retries ride over occasional garbage (seeded: deterministic)
        assert (await hp.read())["max_c"] == 340.0
    world.faults.clear()


async def test_dropped_connection_then_reconnect(tcp_hp: Hotplate, world: StationWorld) -> None:
    await tcp_hp.set_stirrer(True, 250)
    world.faults.inject("dropped-connection", device="hotplate")
    await asyncio.sleep(0.05)
    assert (await tcp_hp.read())["stirrer_setpoint_rpm"] == 250
    await tcp_hp.set_stirrer(False)
    assert not world.hotplate.stirrer_enabled


async def test_stuck_heater_shows_in_status(tcp_hp: Hotplate, world: StationWorld) -> None:
    world.faults.inject("stuck-heater", temperature_c=120.0)
    await tcp_hp.safe_state()
    await asyncio.sleep(0.3)
    state = await tcp_hp.read()
    assert state["heating"] and not state["heater_enabled"] and state["plate_c"] > AMBIENT_C + 5
    world.faults.clear()


async def test_safe_state_idempotent_and_effective(hp: Hotplate, world: StationWorld) -> None:
    await hp.set_stirrer(True, 300)
    await hp.set_heater(True, 60.0)
    world.wire.clear()
    await hp.safe_state()
    await hp.safe_state()
    assert not world.hotplate.heater_enabled and not world.hotplate.stirrer_enabled
    off = [{"fc": 6, "address": 2, "values": [0]}, {"fc": 6, "address": 3, "values": [0]}]
    assert world.wire.data("hotplate") == off + off
    state = await hp.read()
    assert not state["heater_enabled"] and not state["stirrer_enabled"]


async def test_connect_safe_state_on_exit_and_close(
    tcp_sim: HotplateSim, world: StationWorld
) -> None:
    async with instruments.connect("hotplate", tcp_sim.url, unit=1, timeout=0.5) as hp:
        assert isinstance(hp, Hotplate) and hp.kind == "hotplate"
        await hp.set_stirrer(True, 300)
        await hp.set_heater(True, 55.0)
        assert world.hotplate.heater_enabled
    assert not world.hotplate.heater_enabled and not world.hotplate.stirrer_enabled
    await hp.close()  # already closed by connect(): idempotent
    await hp.close()


async def test_open_fails_cleanly_when_the_device_is_silent(
    tcp_sim: HotplateSim, world: StationWorld
) -> None:
    world.faults.inject("no-reply", device="hotplate")
    transport = ModbusTransport(tcp_sim.url)
    hp = Hotplate(transport, timeout=0.05)
    with pytest.raises(TransportTimeout):
        async with hp:
            pass
    assert not transport.is_open and not transport.connected
    world.faults.clear()
    async with Hotplate(transport, name="plate-1") as hp2:  # the driver used without connect()
        assert hp2.name == "plate-1" and (await hp2.read())["max_c"] == 340.0
    assert not transport.is_open


async def test_driver_needs_a_register_bus() -> None:
    class NotModbus(Transport):
        async def _open(self) -> None:
            pass

        async def _close(self) -> None:
            pass

    with pytest.raises(TypeError, match="Modbus register transport"):
        Hotplate(NotModbus("loop://"))
    with pytest.raises(ValueError):
        Hotplate(ModbusTransport("modbus-tcp://127.0.0.1:1502"), timeout=0)


# ------------------------------------------- a second device, from the spec
class MiniHotplate:
    """A minimal Modbus TCP hotplate written from PROTOCOLS.md alone (no pymodbus).

    MBAP framing, FC3/FC4/FC6/FC16, exception 1 for other functions, 2 outside
    holding/input 0-4, 3 for a setpoint above the maximum. ``fail_writes``
    maps a holding address to an exception code, to make one write fail.
    """

    def __init__(self, max_c: float = 250.0) -> None:
        self.holding = [200, 0, 0, 0, 0]
        self.inputs = [
            0xFF9C,
            0x8000,
            0,
            0b01100,
            round(max_c * 10),
        ]  # -10.0 degC, no probe, bits 2+3
        self.requests: list[tuple[int, int, list[int]]] = []
        self.fail_writes: dict[int, int] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._conns):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                header = await reader.readexactly(7)
                tid, pid, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                reply = self._handle(pdu)
                writer.write(struct.pack(">HHHB", tid, pid, len(reply) + 1, unit) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    def _handle(self, pdu: bytes) -> bytes:
        fc = pdu[0]

        def exc(code: int) -> bytes:
            return bytes([fc | 0x80, code])

        if fc in (3, 4):
            address, count = struct.unpack(">HH", pdu[1:5])
            self.requests.append((fc, address, [count]))
            table = self.holding if fc == 3 else self.inputs
            if address + count > len(table):
                return exc(2)
            values = table[address : address + count]
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *values)
        if fc == 6:
            address, value = struct.unpack(">HH", pdu[1:5])
            self.requests.append((fc, address, [value]))
            if (problem := self._write(address, [value])) is not None:
                return exc(problem)
            return pdu[:5]
        if fc == 16:
            address, count, nbytes = struct.unpack(">HHB", pdu[1:6])
            values = list(struct.unpack(f">{count}H", pdu[6 : 6 + nbytes]))
            self.requests.append((fc, address, values))
            if (problem := self._write(address, values)) is not None:
                return exc(problem)
            return pdu[:5]
        return exc(1)

    def _write(self, address: int, values: list[int]) -> int | None:
        if address + len(values) > len(self.holding):
            return 2
        for i, v in enumerate(values):
            if address + i in self.fail_writes:
                return self.fail_writes[address + i]
            signed = v - 0x10000 if v & 0x8000 else v
            if address + i == 0 and signed > self.inputs[4]:
                return 3
        self.holding[address : address + len(values)] = values
        return None


@pytest.fixture
async def mini() -> AsyncIterator[MiniHotplate]:
    device = MiniHotplate()
    await device.start()
    yield device
    await device.stop()


async def test_driver_against_a_second_device(mini: MiniHotplate) -> None:
    url = f"modbus-tcp://127.0.0.1:{mini.port}?unit=1&timeout=0.5"
    async with instruments.connect("hotplate", url) as hp:
        assert hp.max_c == 250.0
        state: dict[str, Any] = await hp.read()
        assert state["plate_c"] == -10.0 and state["liquid_c"] is None
        assert state["over_temperature"] and state["probe_fault"]
        assert not state["heating"] and not state["watchdog_tripped"]
        assert state["setpoint_c"] == 20.0
        await hp.set_heater(True, 80.0)
        await hp.set_stirrer(True, 600)
        await hp.set_watchdog(30)
        assert mini.holding == [800, 600, 1, 1, 30]
        await hp.set_state(heater=False, setpoint_c=0.5, stirrer=False, rpm=0)
        assert mini.requests[-1] == (16, 0, [5, 0, 0, 0])
        with pytest.raises(ValueError, match="250"):
            await hp.set_heater(True, 260.0)
        with pytest.raises(
            ModbusExceptionError
        ) as info:  # the device's own check, past the driver's
            await hp.bus.write_register(0, 2600)
        assert info.value.exception_code == 3
        with pytest.raises(ModbusExceptionError) as info:
            await hp.bus.read_input_registers(5, 1)
        assert info.value.exception_code == 2
        await hp.set_heater(True, 50.0)
        await hp.set_stirrer(True, 100)
        mini.fail_writes = {2: 4}  # the heater enable write fails, the stirrer's must still happen
        with pytest.raises(SafeStateError) as failed:
            await hp.safe_state()
        assert set(failed.value.failures) == {"heater off"}
        assert mini.holding[3] == 0
        mini.fail_writes = {}
    assert (
        mini.holding[2] == 0 and mini.holding[3] == 0
    )  # connect() put it in its safe state on exit
