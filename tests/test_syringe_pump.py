"""SyringePump driver against PumpChainSim on a real pty (and TCP), and against a second,
minimal emulator written here from PROTOCOLS.md alone (``SpecPump``, on a TCP socket)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable

import pytest

import instruments
from instruments.drivers.pump_wire import PumpStatus, encode_quantity, format_number, parse_reply
from instruments.drivers.syringe_pump import SyringePump
from instruments.errors import (
    DeviceAlarm,
    DeviceRejected,
    LinkLostError,
    ProtocolError,
    TransportTimeout,
)
from instruments.transports import transport_for
from instruments.transports.serial import SerialTransport
from simulators.clock import SimClock
from simulators.pump import PumpChainSim
from simulators.world import StationWorld


@pytest.fixture
def world() -> StationWorld:
    return StationWorld(clock=SimClock(speed=100))


@pytest.fixture
async def sim(world: StationWorld) -> AsyncIterator[PumpChainSim]:
    s = PumpChainSim(world, tcp=True)
    await s.start()
    yield s
    await s.stop()


@contextlib.asynccontextmanager
async def opened(
    url: str, address: int = 0, *, reply_timeout: float = 0.3, diameter_mm: float = 14.43
) -> AsyncIterator[SyringePump]:
    pump = SyringePump(
        transport_for(url), address=address, timeout=reply_timeout, diameter_mm=diameter_mm
    )
    try:
        await pump.open()
        yield pump
    finally:
        await pump.close()


@pytest.fixture
async def red(sim: PumpChainSim) -> AsyncIterator[SyringePump]:
    async with opened(sim.url, 0) as pump:
        yield pump


def sent(world: StationWorld, line: str) -> int:
    """How many times ``line`` reached the pumps (seen from the device side)."""
    return world.wire.data("pumps").count(line)


# ---------------------------------------------------------------- number format, reply parsing
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.4, "0.400"),
        (12.5, "12.50"),
        (1234, "1234"),
        (2.5, "2.500"),
        (123.45, "123.5"),
        (9.9996, "10.00"),
        (999.96, "1000"),
        (0, "0.000"),
        (0.0005, "0.001"),
    ],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, 9999.5, 123456.0])
def test_format_number_refuses(value: float) -> None:
    with pytest.raises(ValueError):
        format_number(value)


def test_units_are_chosen_to_keep_precision() -> None:
    from instruments.drivers.pump_wire import RATE_UNITS, VOLUME_UNITS

    assert encode_quantity(0.0005, VOLUME_UNITS, "v")[:2] == ("0.500", "UL")
    assert encode_quantity(0.4, VOLUME_UNITS, "v")[:2] == ("0.400", "ML")
    assert encode_quantity(0.1234, VOLUME_UNITS, "v")[:2] == ("123.4", "UL")
    assert encode_quantity(2.5, RATE_UNITS, "r")[:2] == ("2.500", "MM")
    assert encode_quantity(0.0123, RATE_UNITS, "r")[:2] == ("12.30", "UM")
    assert encode_quantity(1 / 60, RATE_UNITS, "r")[:2] == ("1.000", "MH")
    assert encode_quantity(61.23 / 60000, RATE_UNITS, "r")[:2] == ("61.23", "UH")
    assert encode_quantity(1 / 60000, RATE_UNITS, "r")[:2] == (
        "0.001",
        "MH",
    )  # exact: the first unit wins
    for bad in (0.0, -1.0, 1e-9, 20000.0, math.nan):
        with pytest.raises(ValueError):
            encode_quantity(bad, VOLUME_UNITS, "v")


@pytest.mark.parametrize(
    "raw",
    [
        b"01S\x03",  # no STX
        b"\x0201S",  # no ETX
        b"\x0202S\x03",  # another pump's address
        b"\x021S\x03",  # one-digit address
        b"\x0201X\x03",  # unknown status letter
        b"\x0201S?XYZ\x03",  # unknown error code
        b"\x0201A\x03",  # alarm without code
        b"\x0201A?Q\x03",  # unknown alarm code
        b"\x0201S14.\xc33\x03",  # non-ASCII (garbled) data
        b"noise\x0201S\x03",  # bytes before STX
    ],
)
def test_parse_reply_is_strict(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(raw, address=1, device="p")


def test_parse_reply_good_frames() -> None:
    r = parse_reply(b"\x0201I2.500MM\x03", address=1, device="p")
    assert (r.status, r.data, r.error, r.alarm) == (PumpStatus.INFUSING, "2.500MM", None, None)
    assert parse_reply(b"\x0201S?OOR\x03", address=1, device="p").error == "?OOR"
    assert parse_reply(b"\x0201A?S\x03", address=1, device="p").alarm == "S"


# ---------------------------------------------------------------- every command
async def test_open_checks_the_pump_and_sets_the_diameter(
    sim: PumpChainSim, world: StationWorld
) -> None:
    async with opened(sim.url, 1, diameter_mm=10.0) as pump:
        assert world.pumps[1].diameter_mm == 10.0
        assert world.wire.data("pumps")[:3] == ["1VER", "1DIA", "1DIA10.00"]
        info = pump.describe()
        assert (
            info["address"] == 1
            and info["firmware"] == "NE1000V3.934"
            and info["diameter_mm"] == 10.0
        )
        assert info["kind"] == "syringe-pump"
        low, high = pump.rate_limits_ml_min
        assert high == pytest.approx(30.0 * (10.0 / 14.43) ** 2)
        assert pump.channels["rate_ml_min"].maximum == pytest.approx(high)
        assert pump.channels["direction"].allowed == ("infuse", "withdraw")
        assert await pump.diameter() == 10.0
        assert await pump.set_diameter(14.43) == 14.43


async def test_rate_volume_direction_in_every_unit(red: SyringePump, world: StationWorld) -> None:
    for ml_min, wire in [
        (2.5, "0RAT2.500MM"),
        (0.0123, "0RAT12.30UM"),
        (1 / 60, "0RAT1.000MH"),
        (61.23 / 60000, "0RAT61.23UH"),
        (29.99, "0RAT29.99MM"),
    ]:
        assert await red.set_rate(ml_min) == pytest.approx(ml_min, rel=1e-3)
        assert world.wire.data("pumps")[-1] == wire
        assert await red.rate() == pytest.approx(ml_min, rel=1e-3)
        assert world.pumps[0].rate_ml_min == pytest.approx(ml_min, rel=1e-3)
    for ml, wire in [(0.4, "0VOL0.400ML"), (0.0005, "0VOL0.500UL"), (12.5, "0VOL12.50ML")]:
        await red.set_volume(ml)
        assert world.wire.data("pumps")[-1] == wire
        assert await red.volume() == pytest.approx(ml)
    await red.set_direction("withdraw")
    assert await red.direction() == "withdraw" and world.pumps[0].direction == "WDR"
    assert await red.reverse_direction() == "infuse"
    assert sent(world, "0DIRREV") == 1
    await red.set_direction("infuse")
    assert await red.version() == "NE1000V3.934"
    with pytest.raises(ValueError):
        await red.set_direction("sideways")


async def test_run_stop_pause_resume_clear_and_counters(
    red: SyringePump, world: StationWorld
) -> None:
    await red.set_rate(0.6)  # 0.01 mL per simulated second
    await red.set_volume(1.0)
    await red.clear_dispensed()
    assert await red.run() is PumpStatus.INFUSING
    await asyncio.sleep(0.02)
    assert await red.stop() is PumpStatus.PAUSED
    paused_at = (await red.dispensed())[0]
    assert 0 < paused_at < 1.0
    assert world.pumps[0].phase == "paused"
    assert await red.run() is PumpStatus.INFUSING  # resumes the paused run
    assert world.pumps[0].remaining_ml == pytest.approx(1.0 - paused_at, abs=0.05)
    await asyncio.sleep(0.02)
    assert await red.stop(clear=True) is PumpStatus.STOPPED
    assert world.pumps[0].phase == "stopped" and world.pumps[0].remaining_ml == 0
    infused, withdrawn = await red.dispensed()
    assert infused > paused_at and withdrawn == 0
    await red.clear_dispensed("infuse")
    assert await red.dispensed() == (0.0, 0.0)
    assert sent(world, "0CLDINF") == 2 and sent(world, "0CLDWDR") == 1


async def test_read_returns_the_whole_state(red: SyringePump) -> None:
    await red.set_rate(1.5)
    await red.set_volume(0.25)
    assert await red.read() == {
        "status": "stopped",
        "moving": False,
        "alarmed": False,
        "alarm": None,
        "rate_ml_min": 1.5,
        "volume_ml": 0.25,
        "direction": "infuse",
        "infused_ml": 0.0,
        "withdrawn_ml": 0.0,
    }


async def test_values_the_format_cannot_carry_are_refused_before_sending(
    red: SyringePump, world: StationWorld
) -> None:
    before = len(world.wire.data("pumps"))
    for call in (
        red.set_volume(1e-8),
        red.set_volume(0.0),
        red.set_rate(-1.0),
        red.set_rate(20000.0),
        red.dispense(0.5, math.nan),
        red.set_diameter(0.0),
    ):
        with pytest.raises(ValueError):
            await call
    assert len(world.wire.data("pumps")) == before


# ---------------------------------------------------------------- error replies and alarms
async def test_every_error_reply_is_a_typed_rejection(
    red: SyringePump, world: StationWorld
) -> None:
    with pytest.raises(DeviceRejected) as err:
        await red.command("XYZ")
    assert err.value.code == "?" and "unrecognised" in str(err.value)
    with pytest.raises(DeviceRejected) as err:
        await red.set_rate(45.0)
    assert err.value.code == "?OOR" and "out of range" in err.value.meaning
    await red.dispense(1.0, 0.6)
    with pytest.raises(DeviceRejected) as err:
        await red.set_rate(1.0)
    assert err.value.code == "?NA"
    with pytest.raises(DeviceRejected) as err:
        await red.dispense(
            0.2, 1.0
        )  # still running: the pump refuses the new rate, nothing changes
    assert err.value.code == "?NA" and world.pumps[0].volume_ml == 1.0
    with pytest.raises(DeviceRejected) as err:
        await red.run()
    assert err.value.code == "?IGN"
    await red.safe_state()
    assert isinstance(red.transport, SerialTransport)
    raw = await red.transport.transaction(b"0DI\xffA\r", b"\x03")  # a corrupted packet
    assert parse_reply(raw, address=0, device="t").error == "?COM"


async def test_pump_alarm(sim: PumpChainSim, world: StationWorld) -> None:
    async with opened(sim.url, 1) as green:
        await green.dispense(1.0, 0.6)
        world.faults.inject("pump-alarm", pump="green", code="S")
        assert world.pumps[1].phase == "stopped"  # the motor stalled
        with pytest.raises(DeviceAlarm) as err:
            await green.set_rate(1.0)
        assert err.value.code == "S" and "stalled" in err.value.meaning
        assert await green.status() is PumpStatus.ALARM and green.last_alarm == "S"
        reading = await green.read()
        assert (reading["status"], reading["alarmed"], reading["alarm"]) == ("alarm", True, "S")
        with pytest.raises(DeviceAlarm):
            await green.wait_until_stopped(timeout=1.0)
        with pytest.raises(DeviceAlarm):
            await green.dispense(0.1, 1.0)
        await green.safe_state()  # an alarmed pump has stopped: safe state succeeds
        async with opened(sim.url, 2) as blue:  # the other pumps of the chain are unaffected
            assert await blue.status() is PumpStatus.STOPPED
        world.faults.clear("pump-alarm")
        assert await green.status() is PumpStatus.STOPPED
        await green.set_rate(1.0)
        assert (await green.read())["alarmed"] is False
        # on_run: a motor that stalls as it starts: answers normally until the RUN
        world.faults.inject("pump-alarm", pump="green", code="S", on_run=True)
        assert await green.status() is PumpStatus.STOPPED
        with pytest.raises(DeviceAlarm):
            await green.dispense(0.1, 1.0)
        assert world.pumps[1].phase == "stopped" and world.pumps[1].alarm == "S"
        assert (await green.read())["alarmed"] is True  # and from then on, until cleared
        world.faults.clear("pump-alarm")
        assert (await green.read())["alarmed"] is False


async def test_no_reply_times_out_after_bounded_retries(
    sim: PumpChainSim, world: StationWorld
) -> None:
    async with opened(sim.url, 0, reply_timeout=0.1) as pump:
        world.faults.inject("no-reply", device="pumps")
        started = time.monotonic()
        with pytest.raises(TransportTimeout):
            await pump.version()
        assert 0.25 < time.monotonic() - started < 1.5
        assert [r.note for r in world.wire.entries("pumps")[-3:]] == ["no-reply"] * 3
        with pytest.raises(TransportTimeout):
            await pump.run()
        assert sent(world, "0RUN") == 1  # sent once, never retried
        assert world.pumps[0].phase == "stopped"  # a deaf pump did not execute it
        world.faults.clear("no-reply")
        assert await pump.version() == "NE1000V3.934"


async def test_unknown_address_gets_no_reply_and_address_may_be_omitted(sim: PumpChainSim) -> None:
    async with SerialTransport(sim.url + "&timeout=0.1") as t:
        assert isinstance(t, SerialTransport)
        with pytest.raises(TransportTimeout):
            await t.transaction(b"7VER\r", b"\x03")
        assert await t.transaction(b"VER\r", b"\x03") == b"\x0200SNE1000V3.934\x03"
        assert await t.transaction(b" 1 rat 2.5 mm\r", b"\x03") == b"\x0201S\x03"
        assert await t.transaction(b"1RAT\r", b"\x03") == b"\x0201S2.500MM\x03"
        assert await t.transaction(b"1VOL12345\r", b"\x03") == b"\x0201S?OOR\x03"


# ---------------------------------------------------------------- garbled replies, RUN never retried
async def test_garbled_replies_raise_protocol_error(red: SyringePump, world: StationWorld) -> None:
    world.faults.inject("garbled-bytes", device="pumps", probability=1.0)
    with pytest.raises(ProtocolError):
        await red.version()
    assert sent(world, "0VER") == 1 + 3  # open() + 3 attempts
    red.timeout = 0.1
    world.faults.inject("garbled-bytes", device="pumps", mode="truncate")
    with pytest.raises(TransportTimeout):
        await red.volume()


async def test_intermittent_garbling_is_absorbed_by_retries(
    red: SyringePump, world: StationWorld
) -> None:
    world.faults.inject("garbled-bytes", device="pumps", count=2)
    assert await red.version() == "NE1000V3.934"
    assert sent(world, "0VER") == 1 + 3
    world.faults.inject("garbled-bytes", device="pumps", probability=0.25)
    for i in range(10):
        await red.set_rate(1.0 + i / 10)
        assert await red.rate() == pytest.approx(1.0 + i / 10)


async def test_run_is_never_retried_even_when_its_reply_is_garbled(
    red: SyringePump, world: StationWorld
) -> None:
    await red.set_rate(0.6)
    await red.set_volume(1.0)
    world.faults.inject("garbled-bytes", device="pumps", count=1)
    with pytest.raises(ProtocolError) as err:
        await red.run()
    assert any("not retried" in note for note in getattr(err.value, "__notes__", []))
    assert sent(world, "0RUN") == 1
    assert world.pumps[0].phase == "running"  # it did start: the caller must ask
    assert await red.status() is PumpStatus.INFUSING
    await red.safe_state()


# ---------------------------------------------------------------- the daisy chain
async def test_four_pumps_share_one_line_concurrently(
    sim: PumpChainSim, world: StationWorld
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        pumps = [await stack.enter_async_context(opened(sim.url, a)) for a in range(4)]
        assert isinstance(pumps[0].transport, SerialTransport)
        assert pumps[0].transport.line_users == 4

        async def exercise(pump: SyringePump, k: int) -> list[float]:
            got = []
            for i in range(8):
                rate = round(0.5 + pump.address + i / 10 + k, 3)
                await pump.set_rate(rate)
                got.append(await pump.rate())
            return got

        results = await asyncio.gather(*(exercise(p, 0) for p in pumps))
        for pump, got in zip(pumps, results, strict=True):
            assert got == [pytest.approx(round(0.5 + pump.address + i / 10, 3)) for i in range(8)]
        assert all(
            re.fullmatch(r"[0-3][A-Z]{3}[0-9.A-Z]*", line) for line in world.wire.data("pumps")
        )
        statuses = await asyncio.gather(
            pumps[0].dispense(0.3, 9.0), pumps[1].dispense(0.2, 6.0), pumps[2].dispense(0.1, 3.0)
        )
        assert statuses == [PumpStatus.INFUSING] * 3
        await asyncio.gather(
            *(p.wait_until_stopped(timeout=5.0, poll_interval=0.01) for p in pumps[:3])
        )
        vial = world.snapshot()["vial"]["species_ml"]  # (blue slowly turns into product)
        assert (vial["red"], vial["green"], vial["blue"] + vial["product"]) == pytest.approx(
            (0.3, 0.2, 0.1)
        )
        await asyncio.gather(*(p.safe_state() for p in pumps))


async def test_stale_input_is_discarded_before_a_command(
    red: SyringePump, sim: PumpChainSim, world: StationWorld
) -> None:
    sim.write_noise(b"\x0200S?OOR\x03\x0200SNE9\x03junk")  # a late reply and noise
    await asyncio.sleep(0.02)
    assert await red.version() == "NE1000V3.934"
    assert sent(world, "0VER") == 2  # open() + one clean exchange, no retry


# ---------------------------------------------------------------- dropped connection
async def test_dropped_connection_then_reconnect_on_demand(
    red: SyringePump, sim: PumpChainSim, world: StationWorld
) -> None:
    world.faults.inject("dropped-connection", device="pumps")
    assert sim.drops == 1
    with pytest.raises(LinkLostError) as err:
        await red.run()
    assert sim.url in str(err.value)
    assert sent(world, "0RUN") == 0
    assert await red.version() == "NE1000V3.934"  # the port was reopened behind the same name
    world.faults.inject("dropped-connection", device="pumps")
    assert await red.status() is PumpStatus.STOPPED  # idempotent: retried through the reconnect
    world.faults.inject("dropped-connection", device="pumps")
    await red.safe_state()  # works after the fault too
    assert sim.drops == 3 and world.wire.data("pumps")[-2:] == ["0STP", "0STP"]


async def test_tcp_device_server_and_dropped_connection(
    sim: PumpChainSim, world: StationWorld
) -> None:
    async with opened(sim.tcp_url, 3) as waste:
        assert await waste.version() == "NE1000V3.934"
        world.faults.inject("dropped-connection", device="pumps")
        await asyncio.sleep(0.05)
        with pytest.raises(LinkLostError):
            await waste.run()
        assert await waste.status() is PumpStatus.STOPPED
        assert sent(world, "3RUN") == 0


async def test_close_is_idempotent(sim: PumpChainSim) -> None:
    pump = SyringePump(transport_for(sim.url), address=0)
    await pump.close()
    await pump.open()
    await pump.close()
    await pump.close()
    assert not pump.transport.is_open


# ---------------------------------------------------------------- physics
async def test_dispense_and_withdraw_move_liquid_in_the_world(
    sim: PumpChainSim, world: StationWorld
) -> None:
    async with opened(sim.url, 0) as red, opened(sim.url, 3) as waste:
        assert await red.dispense(0.4, 12.0) is PumpStatus.INFUSING
        assert await red.wait_until_stopped(timeout=5.0, poll_interval=0.01) is PumpStatus.STOPPED
        assert world.snapshot()["vial"]["volume_ml"] == pytest.approx(0.4, abs=1e-9)
        assert await red.dispensed() == pytest.approx((0.4, 0.0))
        assert await waste.withdraw(1.0, 30.0) is PumpStatus.WITHDRAWING
        await waste.wait_until_stopped(timeout=5.0, poll_interval=0.01)
        assert world.snapshot()["vial"]["volume_ml"] == pytest.approx(0.0, abs=1e-9)
        assert (await waste.dispensed())[1] == pytest.approx(1.0)


async def test_clogged_pump_delivers_less_than_it_reports(
    red: SyringePump, world: StationWorld
) -> None:
    world.faults.inject("clogged-pump", pump="red", factor=0.4)
    await red.dispense(0.5, 15.0)
    await red.wait_until_stopped(timeout=5.0, poll_interval=0.01)
    assert (await red.dispensed())[0] == pytest.approx(0.5)
    assert world.snapshot()["vial"]["species_ml"]["red"] == pytest.approx(0.2, abs=1e-9)


async def test_dispense_after_pause_starts_afresh(red: SyringePump, world: StationWorld) -> None:
    await red.dispense(1.0, 0.6)
    await red.stop()
    assert await red.status() is PumpStatus.PAUSED
    await red.dispense(0.05, 6.0)
    assert world.pumps[0].remaining_ml <= 0.05  # the new volume, not the paused remainder
    await red.wait_until_stopped(timeout=5.0, poll_interval=0.01)


async def test_wait_until_stopped_times_out(red: SyringePump) -> None:
    await red.dispense(5.0, 0.01)
    with pytest.raises(TimeoutError):
        await red.wait_until_stopped(timeout=0.1, poll_interval=0.02)
    await red.safe_state()


async def test_safe_state_is_idempotent_and_clears_the_phase(
    red: SyringePump, world: StationWorld
) -> None:
    await red.safe_state()  # on a stopped pump
    await red.dispense(1.0, 0.6)
    await red.safe_state()
    await red.safe_state()
    assert world.pumps[0].phase == "stopped" and world.pumps[0].remaining_ml == 0
    assert await red.status() is PumpStatus.STOPPED


async def test_connect_by_kind_and_address(sim: PumpChainSim, world: StationWorld) -> None:
    async with instruments.connect("syringe-pump", sim.url, address=2) as blue:
        assert isinstance(blue, SyringePump) and blue.address == 2
        await blue.dispense(0.05, 3.0)
    assert world.wire.data("pumps")[-2:] == ["2STP", "2STP"]  # safe state on exit
    assert world.pumps[2].phase == "stopped"


# ---------------------------------------------------------------- a second, independent emulator
class SpecPump:
    """A minimal single pump written from PROTOCOLS.md only, served as a TCP serial device server.

    Numbers are formatted as ``%.4g`` (e.g. ``2.5MM``), unlike PumpChainSim, and
    ``override`` can replace a reply to test strict parsing.
    """

    def __init__(self, address: int) -> None:
        self.address = address
        self.diameter = 14.43
        self.rate = (1.0, "MM")
        self.volume = (0.0, "ML")
        self.direction = "INF"
        self.phase = "S"  # S, R(unning), P
        self.left_ml = 0.0
        self.counters = {"INF": 0.0, "WDR": 0.0}
        self.t = time.monotonic()
        self.received: list[str] = []
        self.override: Callable[[str], bytes] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"socket://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                line = (await reader.readuntil(b"\r")).decode("ascii").strip().replace(" ", "")
                self.received.append(line)
                reply = self.override(line) if self.override else self.answer(line)
                if reply:
                    writer.write(reply)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    def _advance(self) -> None:
        now = time.monotonic()
        if self.phase == "R":
            factor = {"MM": 1.0, "UM": 1e-3, "MH": 1 / 60, "UH": 1 / 60000}[self.rate[1]]
            moved = min(self.left_ml, self.rate[0] * factor / 60 * (now - self.t))
            self.left_ml -= moved
            self.counters[self.direction] += moved
            if self.left_ml <= 0:
                self.phase = "S"
        self.t = now

    @staticmethod
    def num(x: float) -> str:
        """At most 4 significant digits in 5 characters, as short as possible (``2.5``, ``0.05``)."""
        text = f"{x:.4g}"
        return text if "e" not in text and len(text) <= 5 else f"{x:.3f}"

    def answer(self, line: str) -> bytes | None:
        m = re.fullmatch(r"(\d{0,2})([A-Z]{3})(.*)", line)
        if not m or int(m.group(1) or 0) != self.address:
            return None
        self._advance()
        cmd, arg = m.group(2), m.group(3)
        data = ""
        if cmd == "VER":
            data = "SPEC1.0"
        elif cmd == "DIA":
            if arg:
                self.diameter = float(arg)
            else:
                data = self.num(self.diameter)
        elif cmd == "RAT":
            if arg:
                rm = re.fullmatch(r"([\d.]+)(UM|MM|UH|MH)", arg)
                if rm is None:
                    data = "?"
                elif self.phase == "R":
                    data = "?NA"
                else:
                    self.rate = (float(rm.group(1)), rm.group(2))
            else:
                data = f"{self.num(self.rate[0])}{self.rate[1]}"
        elif cmd == "VOL":
            if arg:
                vm = re.fullmatch(r"([\d.]+)(UL|ML)", arg)
                self.volume = (float(vm.group(1)), vm.group(2)) if vm else self.volume
            else:
                data = f"{self.num(self.volume[0])}{self.volume[1]}"
        elif cmd == "DIR":
            if arg == "REV":
                self.direction = "WDR" if self.direction == "INF" else "INF"
            elif arg:
                self.direction = arg
            else:
                data = self.direction
        elif cmd == "RUN":
            if self.phase == "S":
                self.left_ml = self.volume[0] * (1e-3 if self.volume[1] == "UL" else 1.0)
            self.phase = "R"
        elif cmd == "STP":
            self.phase = {"R": "P", "P": "S", "S": "S"}[self.phase]
        elif cmd == "DIS":
            data = f"I{self.num(self.counters['INF'])}W{self.num(self.counters['WDR'])}ML"
        elif cmd == "CLD":
            self.counters[arg] = 0.0
        else:
            data = "?"
        status = {"R": "I" if self.direction == "INF" else "W", "P": "P", "S": "S"}[self.phase]
        return f"\x02{self.address:02d}{status}{data}\x03".encode("ascii")


async def test_driver_follows_the_spec_against_an_independent_emulator() -> None:
    spec = SpecPump(address=7)
    async with spec as url, opened(url, 7, diameter_mm=20.0) as pump:
        assert pump.firmware == "SPEC1.0" and spec.diameter == 20.0
        assert await pump.dispense(0.05, 30.0) is PumpStatus.INFUSING
        assert spec.received[-5:] == ["7RAT30.00MM", "7VOL0.050ML", "7DIRINF", "7CLDINF", "7RUN"]
        assert await pump.wait_until_stopped(timeout=3.0, poll_interval=0.02) is PumpStatus.STOPPED
        state = await pump.read()
        assert state["infused_ml"] == pytest.approx(0.05, abs=1e-3)
        assert (state["rate_ml_min"], state["volume_ml"], state["direction"]) == (
            30.0,
            0.05,
            "infuse",
        )
        await pump.withdraw(0.02, 1 / 60)
        assert spec.received[-5] == "7RAT1.000MH"
        assert await pump.status() is PumpStatus.WITHDRAWING
        await pump.safe_state()
        assert spec.phase == "S" and spec.received[-2:] == ["7STP", "7STP"]

        pump.timeout = 0.1
        for bad in (b"\x0208S\x03", b"07SSPEC1.0\x03", b"\x0207XSPEC1.0\x03"):
            spec.override = lambda line, bad=bad: bad
            with pytest.raises(ProtocolError):
                await pump.version()
        spec.override = lambda line: b"\x0207S1x.5MM\x03"
        with pytest.raises(ProtocolError, match="unparsable rate"):
            await pump.rate()
        spec.override = lambda line: b"\x0207S2.5MM"  # no ETX
        with pytest.raises(TransportTimeout):
            await pump.rate()
        spec.override = None
        assert await pump.rate() == pytest.approx(1 / 60)
