"""ModbusTransport over real loopback TCP sockets and real ptys, against the pymodbus-based HotplateSim.

Coils and discrete inputs (which the hotplate does not have) are tested against
a small pymodbus server built here from SimDevice/SimData.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    ModbusExceptionError,
    ProtocolError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports import transport_for
from instruments.transports.modbus import ModbusTransport, parse_modbus_url
from simulators.clock import SimClock
from simulators.hotplate import HotplateSim
from simulators.world import StationWorld


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
async def bus(sim: HotplateSim) -> AsyncIterator[ModbusTransport]:
    t = ModbusTransport(sim.url + "&timeout=0.3")
    await t.open()
    yield t
    await t.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- URLs
def test_url_parsing() -> None:
    tcp = parse_modbus_url("modbus-tcp://10.0.0.5:5020?unit=3&timeout=0.5&retries=2")
    assert (tcp.mode, tcp.host, tcp.port, tcp.unit, tcp.timeout, tcp.retries) == (
        "tcp",
        "10.0.0.5",
        5020,
        3,
        0.5,
        2,
    )
    assert parse_modbus_url("modbus-tcp://plc.local").port == 502
    rtu = parse_modbus_url(
        "modbus-rtu:///dev/ttyUSB1?baudrate=9600&bytesize=8&parity=E&stopbits=2&unit=7&timeout=2"
    )
    assert (rtu.mode, rtu.device, rtu.baudrate, rtu.parity, rtu.stopbits, rtu.unit) == (
        "rtu",
        "/dev/ttyUSB1",
        9600,
        "E",
        2,
        7,
    )
    assert rtu.timeout == 2.0
    assert isinstance(transport_for("modbus-tcp://127.0.0.1:1502"), ModbusTransport)


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("modbus-tcp://127.0.0.1:502?unti=1", "unknown option"),
        ("modbus-tcp://:502", "no host"),
        ("modbus-tcp://127.0.0.1:99999", "port"),
        ("modbus-tcp://127.0.0.1?unit=300", "unit"),
        ("modbus-tcp://127.0.0.1?timeout=0", "timeout"),
        ("modbus-tcp://127.0.0.1/x", "path"),
        ("modbus-rtu://dev/ttyUSB0", "absolute path"),
        ("modbus-rtu:///dev/ttyUSB0?parity=X", "parity"),
        ("modbus-rtu:///dev/ttyUSB0?bytesize=9", "bytesize"),
        ("modbus-rtu:///dev/ttyUSB0?unit=0", "unit"),
        ("modbus-rtu:///dev/ttyUSB0?baudrate=fast", "baudrate"),
    ],
)
def test_bad_urls(url: str, fragment: str) -> None:
    with pytest.raises(InvalidURLError, match=fragment) as info:
        ModbusTransport(url)
    assert info.value.url == url


async def test_open_errors_name_the_url() -> None:
    url = f"modbus-tcp://127.0.0.1:{_free_port()}?timeout=0.5"
    t = ModbusTransport(url)
    with pytest.raises(TransportOpenError) as info:
        await t.open()
    assert info.value.url == url and url in str(info.value)
    await t.close()
    rtu = ModbusTransport("modbus-rtu:///dev/does-not-exist-lb?unit=1")
    with pytest.raises(TransportOpenError, match="no such serial port"):
        await rtu.open()
    await rtu.close()


# ------------------------------------------------------------ registers
async def test_every_register_read_and_written(
    bus: ModbusTransport, sim: HotplateSim, world: StationWorld
) -> None:
    assert await bus.read_input_registers(0, 5) == [220, 220, 0, 0, 3400]
    await bus.write_register(0, 655)  # 65.5 degC
    await bus.write_register(1, 400)
    await bus.write_register(2, 1)
    await bus.write_register(3, 1)
    await bus.write_register(4, 30)
    assert await bus.read_holding_registers(0, 5) == [655, 400, 1, 1, 30]
    hp = world.hotplate
    assert (
        hp.setpoint_c,
        hp.stirrer_setpoint_rpm,
        hp.heater_enabled,
        hp.stirrer_enabled,
        hp.watchdog_s,
    ) == (
        65.5,
        400,
        True,
        True,
        30,
    )
    await bus.write_registers(0, [0xFFEC, 0, 0, 0, 0])  # -2.0 degC as signed 16-bit, everything off
    assert await bus.read_holding_registers(0, 5) == [0xFFEC, 0, 0, 0, 0]
    assert world.hotplate.setpoint_c == -2.0 and not world.hotplate.heater_enabled
    assert await bus.read_holding_registers(2, 1) == [0]
    assert (await bus.read_input_registers(4, 1)) == [3400]
    wire = world.wire.data("hotplate")
    assert {"fc": 6, "address": 2, "values": [1]} in wire
    assert {"fc": 16, "address": 0, "values": [0xFFEC, 0, 0, 0, 0]} in wire
    assert {"fc": 4, "address": 0, "count": 5} in wire


async def test_exception_replies(bus: ModbusTransport, world: StationWorld) -> None:
    with pytest.raises(ModbusExceptionError) as info:
        await bus.read_holding_registers(3, 5)  # 3..7: outside the map
    assert (info.value.function_code, info.value.address, info.value.exception_code) == (3, 3, 2)
    assert "function 3" in str(info.value) and "address 3" in str(info.value)
    with pytest.raises(ModbusExceptionError) as info:
        await bus.write_register(0, 3401)  # 340.1 degC > device maximum
    assert (info.value.function_code, info.value.address, info.value.exception_code) == (6, 0, 3)
    with pytest.raises(ModbusExceptionError) as info:
        await bus.write_registers(0, [500, 100, 1, 1, 0, 0])  # register 5 does not exist
    assert info.value.exception_code == 2 and info.value.function_code == 16
    assert world.hotplate.setpoint_c == 25.0  # nothing applied
    world.faults.inject("modbus-exception", code=4)
    with pytest.raises(ModbusExceptionError) as info:
        await bus.read_input_registers(0, 5)
    assert info.value.exception_code == 4 and info.value.function_code == 4
    with pytest.raises(ModbusExceptionError):
        await bus.write_register(2, 1)
    assert not world.hotplate.heater_enabled  # a failing device applies nothing
    world.faults.clear("modbus-exception")
    assert len(await bus.read_input_registers(0, 5)) == 5


async def test_argument_validation(bus: ModbusTransport, world: StationWorld) -> None:
    for call in (
        bus.write_register(0, 70000),
        bus.write_register(0, -1),
        bus.read_holding_registers(0, 0),
        bus.read_holding_registers(65535, 2),
        bus.write_registers(0, []),
    ):
        with pytest.raises(ValueError):
            await call
    assert world.wire.data("hotplate") == []  # nothing went out


# --------------------------------------------------------------- faults
async def test_no_reply_times_out_then_recovers(bus: ModbusTransport, world: StationWorld) -> None:
    world.faults.inject("no-reply", device="hotplate")
    start = time.monotonic()
    with pytest.raises(TransportTimeout) as info:
        await bus.read_holding_registers(0, 5, timeout=0.15)
    assert 0.14 <= time.monotonic() - start < 1.0
    assert info.value.url == bus.url and bus.url in str(info.value)
    with pytest.raises(TransportTimeout):
        await bus.write_register(2, 1)  # the URL's timeout (0.3 s)
    world.faults.clear("no-reply")
    assert len(await bus.read_holding_registers(0, 5)) == 5  # link reset and reopened on demand
    assert len(world.wire.data("hotplate")) == 3


async def test_garbled_reply_is_a_protocol_error(bus: ModbusTransport, world: StationWorld) -> None:
    world.faults.inject("garbled-bytes", device="hotplate")
    with pytest.raises(ProtocolError) as info:
        await bus.read_input_registers(0, 5)
    assert info.value.raw  # the bytes that arrived
    with pytest.raises(ProtocolError):
        await bus.write_register(1, 200)
    world.faults.clear("garbled-bytes")
    assert await bus.read_holding_registers(1, 1) == [200]  # the write itself was applied


async def test_unit_override(bus: ModbusTransport, world: StationWorld) -> None:
    with pytest.raises(TransportTimeout, match="unit 7"):
        await bus.read_holding_registers(0, 1, unit=7, timeout=0.1)
    assert "ignored" in world.wire.entries("hotplate")[-1].note
    assert len(await bus.read_holding_registers(0, 1, unit=1)) == 1


async def test_retries_option_repeats_reads_only(tcp_sim: HotplateSim, world: StationWorld) -> None:
    t = ModbusTransport(tcp_sim.url + "&timeout=0.1&retries=2")
    try:
        world.faults.inject("no-reply")
        with pytest.raises(TransportTimeout):
            await t.read_input_registers(0, 5)
        assert len(world.wire.data("hotplate")) == 3
        with pytest.raises(TransportTimeout):
            await t.write_register(2, 1)
        assert len(world.wire.data("hotplate")) == 4  # a write is never repeated here
    finally:
        await t.close()


async def test_dropped_connection_reconnects_on_demand(
    tcp_sim: HotplateSim, world: StationWorld
) -> None:
    t = ModbusTransport(tcp_sim.url + "&timeout=1")
    try:
        assert len(await t.read_input_registers(0, 5)) == 5
        world.faults.inject("dropped-connection", device="hotplate")
        for _ in range(100):
            if not t.connected:
                break
            await asyncio.sleep(0.01)
        assert not t.connected
        assert len(await t.read_input_registers(0, 5)) == 5  # reopened on demand
        assert t.connected
        world.faults.clear()

        # dropped while a request waits: LinkLostError at once, not a timeout
        world.faults.inject("no-reply")

        async def drop_soon() -> None:
            await asyncio.sleep(0.05)
            world.faults.inject("dropped-connection")

        dropper = asyncio.create_task(drop_soon())
        start = time.monotonic()
        with pytest.raises(LinkLostError) as info:
            await t.read_holding_registers(0, 5)
        await dropper
        assert time.monotonic() - start < 0.8 and info.value.url == t.url
        world.faults.clear()
        assert len(await t.read_holding_registers(0, 5)) == 5
    finally:
        await t.close()


async def test_requests_are_serialized(bus: ModbusTransport, world: StationWorld) -> None:
    async def write(rpm: int) -> int:
        await bus.write_register(1, rpm)
        return rpm

    results = await asyncio.gather(
        *(write(rpm) for rpm in range(100, 110)),
        *(bus.read_input_registers(0, 5) for _ in range(10)),
    )
    assert results[:10] == list(range(100, 110))
    assert all(isinstance(r, list) and len(r) == 5 for r in results[10:])
    assert len(world.wire.data("hotplate")) == 20
    assert world.hotplate.stirrer_setpoint_rpm == 109


async def test_close_is_idempotent_and_reopens_on_use(tcp_sim: HotplateSim) -> None:
    t = ModbusTransport(tcp_sim.url)
    await t.close()  # never opened
    await t.open()
    await t.open()
    assert t.is_open and t.connected
    await t.close()
    await t.close()
    assert not t.is_open and not t.connected
    assert len(await t.read_input_registers(0, 2)) == 2  # ensure_open
    await t.close()


async def test_sim_link_symlink_and_stop_idempotent(world: StationWorld, tmp_path: object) -> None:
    link = f"{tmp_path}/hotplate-tty"
    s = HotplateSim(world, mode="rtu", link=link)
    await s.start()
    try:
        assert s.url.startswith(f"modbus-rtu://{link}?")
        t = ModbusTransport(s.url)
        assert (await t.read_input_registers(4, 1)) == [3400]
        await t.close()
    finally:
        await s.stop()
        await s.stop()
    assert not _exists(link)


def _exists(path: str) -> bool:
    return os.path.lexists(path)


# ---------------------------------------------------------- coils (FC1/2/5)
async def test_coils_against_a_pymodbus_device() -> None:
    """Coils and discrete inputs on a small pymodbus SimDevice server (the hotplate has none)."""
    device = SimDevice(
        id=1,
        simdata=(
            [SimData(0, count=1, values=0b101, datatype=DataType.BITS)],
            [SimData(0, count=1, values=0b11, datatype=DataType.BITS)],
            [SimData(0, count=2, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=2, values=0, datatype=DataType.REGISTERS)],
        ),
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    t = ModbusTransport(f"modbus-tcp://127.0.0.1:{port}?unit=1&timeout=0.5")
    try:
        assert await t.read_coils(0, 4) == [True, False, True, False]
        await t.write_coil(1, True)
        await t.write_coil(0, False)
        assert await t.read_coils(0, 3) == [False, True, True]
        assert await t.read_discrete_inputs(0, 3) == [True, True, False]
        with pytest.raises(ModbusExceptionError) as info:
            await t.read_coils(100, 1)
        assert (info.value.function_code, info.value.exception_code) == (1, 2)
    finally:
        await t.close()
        await server.shutdown()
        for _ in range(3):
            await asyncio.sleep(0)


# ------------------------------------------- deadlines and early ends (no task per request)
async def test_ended_requests_leave_no_cancellation_behind(
    bus: ModbusTransport, world: StationWorld
) -> None:
    """A request is awaited in the caller's task: a deadline or a garbled reply ends it by
    cancelling that task, and the cancellation must not leak (``cancelling()`` back to 0)."""
    task = asyncio.current_task()
    assert task is not None
    world.faults.inject("no-reply", device="hotplate")
    with pytest.raises(TransportTimeout):
        await bus.read_holding_registers(0, 5, timeout=0.05)
    assert task.cancelling() == 0
    world.faults.clear("no-reply")
    world.faults.inject("garbled-bytes", device="hotplate")
    start = time.monotonic()
    with pytest.raises(ProtocolError):
        await bus.read_input_registers(0, 5, timeout=2)
    assert time.monotonic() - start < 1.0  # at once, not at the deadline
    assert task.cancelling() == 0
    world.faults.clear("garbled-bytes")
    async with asyncio.timeout(2):  # the task's own timeouts still work
        assert len(await bus.read_input_registers(0, 5)) == 5


async def test_cancelling_the_caller_propagates_and_resets_the_link(
    bus: ModbusTransport, world: StationWorld
) -> None:
    world.faults.inject("no-reply", device="hotplate")
    waiting = asyncio.create_task(bus.read_input_registers(0, 5, timeout=5))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting  # a cancellation from outside stays a cancellation
    world.faults.clear("no-reply")
    assert len(await bus.read_input_registers(0, 5)) == 5  # fresh link: no late reply mix-up


async def test_reply_racing_a_link_failure_leaves_no_cancellation(bus: ModbusTransport) -> None:
    """The reply and a link failure land in the same loop turn (forced here by failing the
    link right after pymodbus took the reply): either outcome is fine, a stray
    cancellation of the caller's task is not."""
    assert len(await bus.read_input_registers(0, 1)) == 1
    link = bus._link  # white box: the hook that forces the race
    assert link is not None and link.client is not None
    ctx = link.client.ctx
    original = ctx.callback_data

    def reply_then_failure(data: bytes, addr: tuple[str, int] | None = None) -> int:
        used = original(data, addr)
        link.end_request(LinkLostError(bus.url, "test: link failed in the reply's loop turn"))
        return used

    ctx.callback_data = reply_then_failure  # type: ignore[method-assign]
    task = asyncio.current_task()
    assert task is not None
    try:
        regs = await bus.read_input_registers(0, 5)
    except LinkLostError:
        regs = []
    assert regs == [] or len(regs) == 5
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)  # no cancellation is pending on this task either
    assert len(await bus.read_input_registers(0, 5)) == 5  # the link was reset and reopened
