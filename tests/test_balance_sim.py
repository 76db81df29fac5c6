"""The balance simulator at the wire: every MT-SICS command and error reply of PROTOCOLS.md,
through pyserial on its pty (CR LF lines, 9600 8N1)."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import serial

from simulators.balance import SERIAL_NUMBER, BalanceSim, weight_text
from simulators.buffer_world import BEAKER_TARE_G, STOCKS, BufferWorld
from simulators.clock import SimClock

SPEED = 20.0  # the 3 s stability timeout is 0.15 s here
WEIGHT = re.compile(r"^S (S|D) (.{10}) g$")


@dataclass
class Bal:
    world: BufferWorld
    sim: BalanceSim
    port: serial.Serial

    async def send(self, data: bytes) -> None:
        await asyncio.to_thread(self.port.write, data)

    async def line(self, timeout: float = 2.0) -> str:
        self.port.timeout = timeout
        raw = await asyncio.to_thread(self.port.readline)
        assert raw.endswith(b"\r\n"), f"no complete line within {timeout} s: {raw!r}"
        return raw[:-2].decode("ascii")

    async def ask(self, command: str) -> str:
        await self.send(command.encode("ascii") + b"\r\n")
        return await self.line()

    async def silence(self, seconds: float = 0.3) -> bytes:
        self.port.timeout = seconds
        return await asyncio.to_thread(self.port.read, 200)


@pytest.fixture
async def bal() -> AsyncIterator[Bal]:
    world = BufferWorld(clock=SimClock(SPEED))
    sim = BalanceSim(world)
    await sim.start()
    assert sim.url == f"serial://{sim.link_path}?baudrate=9600"
    port = serial.Serial(sim.link_path, 9600, timeout=1.0)
    try:
        yield Bal(world, sim, port)
    finally:
        port.close()
        await sim.stop()


def weight(reply: str) -> tuple[str, float]:
    m = WEIGHT.match(reply)
    assert m, f"not a weight reply: {reply!r}"
    return m.group(1), float(m.group(2))


def test_weight_format() -> None:
    assert weight_text(12.3456) == "   12.3456"
    assert weight_text(-0.00001) == "    0.0000"
    assert weight_text(-152.4) == " -152.4000"
    assert len(weight_text(219.99999)) == 10


async def test_identity_and_reset(bal: Bal) -> None:
    assert await bal.ask("I2") == 'I2 A "LB-BAL220 220.0000 g"'
    assert await bal.ask("I4") == f'I4 A "{SERIAL_NUMBER}"'
    assert await bal.ask("@") == f'I4 A "{SERIAL_NUMBER}"'
    assert bal.world.wire.data("balance")[-3:] == ["I2", "I4", "@"]


async def test_stable_weight_tare_and_zero(bal: Bal) -> None:
    status, value = weight(await bal.ask("SI"))
    assert status == "S" and value == pytest.approx(BEAKER_TARE_G, abs=0.0005)
    assert await bal.ask("Z") == "Z +"  # a beaker on the pan is outside the zero range: tare it
    assert await bal.ask("ZI") == "ZI +"
    reply = await bal.ask("T")
    assert re.fullmatch(r"T S .{10} g", reply)
    tare = float(reply[4:14])
    assert tare == pytest.approx(BEAKER_TARE_G, abs=0.0005)
    assert await bal.ask("TA") == f"TA A {weight_text(tare)} g"
    bal.world.add("water", 20.0)
    await asyncio.sleep(3.0 / SPEED)  # settled again
    status, value = weight(await bal.ask("S"))
    assert status == "S" and value == pytest.approx(20.0 * STOCKS["water"].density_g_ml, abs=0.0005)
    assert await bal.ask("TAC") == "TAC A"
    _, gross = weight(await bal.ask("S"))
    assert gross == pytest.approx(BEAKER_TARE_G + 20.0 * STOCKS["water"].density_g_ml, abs=0.0005)
    assert await bal.ask("TA 10.5 g") == "TA A    10.5000 g"  # a preset tare
    _, net = weight(await bal.ask("S"))
    assert net == pytest.approx(gross - 10.5, abs=0.0005)
    bal.world.beaker_tare_g = 0.0  # the beaker taken off, the liquid with it
    bal.world.empty()
    await asyncio.sleep(3.0 / SPEED)
    assert await bal.ask("Z") == "Z A"  # an empty pan: zeroing clears the tare
    _, value = weight(await bal.ask("S"))
    assert abs(value) < 0.0005
    assert await bal.ask("ZI") in ("ZI S", "ZI D")
    bal.world.faults.inject("balance-overload", mass_g=-5.0)
    assert await bal.ask("T") == "T -"  # below zero: nothing to tare


async def test_errors(bal: Bal) -> None:
    assert await bal.ask("XYZ") == "ES"
    assert await bal.ask("s") == "ES"  # commands are upper case
    assert await bal.ask("S 5") == "ES"  # S takes no parameter
    assert await bal.ask("TA abc g") == "ES"
    assert await bal.ask("TA 500 g") == "EL"  # over capacity
    assert await bal.ask("TA 10 kg") == "EL"  # another unit
    await bal.send(b"S\xff\r\n")
    assert await bal.line() == "ET"
    await bal.send(b"S\x07I\r\n")
    assert await bal.line() == "ET"
    assert await bal.ask("SI") != "ET"  # the line is fine again


async def test_overload_underload_and_unstable(bal: Bal) -> None:
    bal.world.faults.inject("balance-overload")
    assert await bal.ask("S") == "S +"
    assert await bal.ask("SI") == "S +"
    assert await bal.ask("T") == "T +"
    assert await bal.ask("Z") == "Z +"
    bal.world.faults.inject("balance-overload", mass_g=-100.0)
    assert await bal.ask("S") == "S -"
    assert await bal.ask("SI") == "S -"
    bal.world.faults.clear()
    bal.world.faults.inject("balance-vibration")
    assert await bal.ask("S") == "S I"  # no stable reading within the device's timeout
    assert await bal.ask("Z") == "Z I"
    assert await bal.ask("T") == "T I"
    status, _ = weight(await bal.ask("SI"))
    assert status == "D"


async def test_streaming_stops_on_the_next_command(bal: Bal) -> None:
    await bal.send(b"SIR\r\n")
    lines = [await bal.line() for _ in range(4)]
    assert all(weight(line)[0] == "S" for line in lines)
    assert bal.sim.streaming
    await bal.send(b"I4\r\n")
    rest = []
    while (line := await bal.line()) != f'I4 A "{SERIAL_NUMBER}"':
        rest.append(line)
    assert all(WEIGHT.match(r) for r in rest)  # what was in flight
    assert await bal.silence() == b""  # streaming has stopped
    assert not bal.sim.streaming


async def test_a_dynamic_reading_is_never_stable(bal: Bal) -> None:
    with bal.world.lock:  # water running into the beaker, without end
        pump = bal.world.pump_by_fluid("water")
        pump.rate_ml_min, pump.remaining_ml, pump.phase = 5.0, math.inf, "running"
    await bal.send(b"SIR\r\n")
    statuses = [weight(await bal.line())[0] for _ in range(8)]
    assert statuses == ["D"] * 8
    assert await bal.ask("@") == f'I4 A "{SERIAL_NUMBER}"'  # reset: streaming ends
    assert await bal.silence(0.2) == b""
    assert await bal.ask("S") == "S I"
    assert weight(await bal.ask("SI"))[0] == "D"
    with bal.world.lock:
        pump.phase = "stopped"
    await asyncio.sleep(3.0 / SPEED)
    assert weight(await bal.ask("S"))[0] == "S"


async def test_reset_cancels_a_pending_command(bal: Bal) -> None:
    bal.world.faults.inject("balance-vibration")
    await bal.send(b"S\r\nSI\r\n@\r\n")  # S waits for stability; SI is queued behind it
    assert await bal.line() == f'I4 A "{SERIAL_NUMBER}"'
    assert await bal.silence(5.0 / SPEED) == b""  # neither "S I" nor the SI reply follows


async def test_no_reply_fault(bal: Bal) -> None:
    bal.world.faults.inject("no-reply", device="balance")
    await bal.send(b"SI\r\n")
    assert await bal.silence() == b""
    assert bal.world.wire.entries("balance")[-1].note == "no-reply"
    bal.world.faults.clear()
    assert weight(await bal.ask("SI"))[0] in ("S", "D")
