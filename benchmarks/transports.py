"""Round-trip latency of our transports + drivers versus the raw libraries, side by side.

Run:  python benchmarks/transports.py [--n 2000] [--rounds 5]

Each pair is measured on the same simulator in the same run, interleaved in
rounds (ours, raw, ours, raw, ...) so drift on a shared 2-core machine hits
both sides alike:

* Modbus TCP: one input-register read (FC4, 5 registers) through our
  ``ModbusTransport``; and ``Hotplate.read()`` (FC3 + FC4) through the driver,
  versus the raw pymodbus ``AsyncModbusTcpClient`` doing the same requests.
* Serial: a pump query (``0DIA``) through ``SyringePump`` + ``SerialTransport``
  versus raw pyserial (write + read_until) on the same pty.
* MQTT: an enclosure command -> ack round trip through ``Enclosure.set_light``
  + ``MqttTransport`` versus raw paho (publish cmd, wait for the ack) on the
  same mosquitto (or the embedded broker when mosquitto is missing).

Goal (issue 2): our stack within 1.2x of the raw library. The ratio printed is
ours / raw of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
import serial
from pymodbus.client import AsyncModbusTcpClient

from instruments.drivers.enclosure import Enclosure
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.syringe_pump import SyringePump
from instruments.transports import transport_for
from simulators import SimClock, StationWorld
from simulators.broker import start_broker
from simulators.enclosure import EnclosureSim
from simulators.hotplate import HotplateSim
from simulators.pump import PumpChainSim


@dataclass
class Result:
    name: str
    ours: list[float]
    raw: list[float]

    @staticmethod
    def _p(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> str:
        om, rm = statistics.median(self.ours), statistics.median(self.raw)
        o99, r99 = self._p(self.ours, 0.99), self._p(self.raw, 0.99)
        return (
            f"{self.name:<38} {om * 1e6:9.1f} {o99 * 1e6:9.1f} {rm * 1e6:9.1f} {r99 * 1e6:9.1f}"
            f" {om / rm:7.2f}x {o99 / r99:7.2f}x"
        )


async def timed_async(op: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await op()
        out.append(time.perf_counter() - t0)
    return out


def timed_sync(op: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        op()
        out.append(time.perf_counter() - t0)
    return out


async def interleave(
    name: str,
    ours: Callable[[int], Awaitable[list[float]]],
    raw: Callable[[int], Awaitable[list[float]]],
    n: int,
    rounds: int,
) -> Result:
    res = Result(name, [], [])
    per = max(1, n // rounds)
    await ours(min(50, per))  # warm-up, not recorded
    await raw(min(50, per))
    for _ in range(rounds):
        res.ours += await ours(per)
        res.raw += await raw(per)
    return res


# ----------------------------------------------------------------------- Modbus
async def bench_modbus(world: StationWorld, n: int, rounds: int) -> list[Result]:
    sim = HotplateSim(world, mode="tcp")
    await sim.start()
    transport = transport_for(sim.url)
    hotplate = Hotplate(transport)
    raw = AsyncModbusTcpClient(sim.host, port=sim.port, timeout=1, retries=0)
    try:
        await hotplate.open()
        await raw.connect()

        async def raw_fc4() -> object:
            rr = await raw.read_input_registers(0, count=5, device_id=1)
            if rr.isError():
                raise RuntimeError(rr)
            return rr.registers

        async def raw_both() -> object:
            a = await raw.read_holding_registers(0, count=5, device_id=1)
            b = await raw.read_input_registers(0, count=5, device_id=1)
            if a.isError() or b.isError():
                raise RuntimeError((a, b))
            return a.registers, b.registers

        fc4 = await interleave(
            "Modbus TCP read (FC4 x5): transport",
            lambda k: timed_async(lambda: transport.read_input_registers(0, 5), k),  # type: ignore[attr-defined]
            lambda k: timed_async(raw_fc4, k),
            n,
            rounds,
        )
        full = await interleave(
            "Modbus TCP Hotplate.read() (FC3+FC4)",
            lambda k: timed_async(hotplate.read, k),
            lambda k: timed_async(raw_both, k),
            n,
            rounds,
        )
        return [fc4, full]
    finally:
        raw.close()
        await hotplate.close()
        await sim.stop()


# ----------------------------------------------------------------------- Serial
async def bench_serial(world: StationWorld, n: int, rounds: int) -> list[Result]:
    sim = PumpChainSim(world)
    await sim.start()
    pump = SyringePump(transport_for(sim.url), address=0)
    try:
        await pump.open()

        async def ours(k: int) -> list[float]:
            return await timed_async(pump.diameter, k)

        # Raw pyserial on the same pty (a second, non-exclusive handle; our transport only
        # reads inside a transaction, so the two never compete for a reply). Blocking,
        # so it runs on a thread while the simulator answers on this loop.
        raw_port = serial.Serial(os.path.realpath(sim.link_path), 9600, timeout=1.0)

        def query() -> bytes:
            raw_port.reset_input_buffer()
            raw_port.write(b"0DIA\r")
            reply: bytes = raw_port.read_until(b"\x03")
            if not reply.endswith(b"\x03"):
                raise RuntimeError(f"raw pyserial: no reply ({reply!r})")
            return reply

        async def raw(k: int) -> list[float]:
            return await asyncio.to_thread(timed_sync, query, k)

        try:
            return [await interleave("Serial pump query (0DIA): driver", ours, raw, n, rounds)]
        finally:
            raw_port.close()
    finally:
        await pump.close()
        await sim.stop()


# ------------------------------------------------------------------------- MQTT
async def bench_mqtt(world: StationWorld, n: int, rounds: int) -> list[Result]:
    broker = start_broker()
    sim = EnclosureSim(world, broker.url, prefix="bench", enclosure_id="enc-1")
    await sim.start()
    enclosure = Enclosure(transport_for(sim.url), enclosure_id="enc-1")
    host, port = broker.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    raw = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}")
    acks: dict[str, threading.Event] = {}

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        ev = acks.get(json.loads(msg.payload).get("id"))
        if ev is not None:
            ev.set()

    raw.on_message = on_message
    try:
        await enclosure.open()
        raw.connect(host, int(port))
        raw.loop_start()
        raw.subscribe("bench/enclosure/enc-1/cmd/ack", qos=0)
        await asyncio.sleep(0.2)
        state = {"on": False}

        async def ours(k: int) -> list[float]:
            async def toggle() -> None:
                state["on"] = not state["on"]
                await enclosure.set_light(state["on"], 0.5)

            return await timed_async(toggle, k)

        def raw_round_trip() -> None:
            cid = uuid.uuid4().hex
            ev = threading.Event()
            acks[cid] = ev
            state["on"] = not state["on"]
            raw.publish(  # QoS 1, as the driver sends commands: the same packets on both sides
                "bench/enclosure/enc-1/cmd",
                json.dumps({"light": {"on": state["on"], "intensity": 0.5}, "id": cid}),
                qos=1,
            )
            if not ev.wait(2.0):
                raise RuntimeError("raw paho: no ack within 2 s")
            del acks[cid]

        async def raw_side(k: int) -> list[float]:
            return await asyncio.to_thread(timed_sync, raw_round_trip, k)

        return [
            await interleave("MQTT command -> ack: Enclosure driver", ours, raw_side, n, rounds)
        ]
    finally:
        raw.loop_stop()
        raw.disconnect()
        await enclosure.close()
        await sim.stop()
        broker.stop()


async def main_async(n: int, rounds: int) -> list[Result]:
    world = StationWorld("bench", clock=SimClock(1.0))
    results = []
    results += await bench_modbus(world, n, rounds)
    results += await bench_serial(world, n, rounds)
    results += await bench_mqtt(world, max(200, n // 4), rounds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="round trips per side (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.n, args.rounds))
    print()
    print(
        f"{'round trip (microseconds)':<38} {'ours p50':>9} {'ours p99':>9} {'raw p50':>9} {'raw p99':>9}"
        f" {'p50 ratio':>8} {'p99 ratio':>8}"
    )
    for r in results:
        print(r.row())
    print("\ngoal: ours within 1.2x of the raw library (p50 ratio <= 1.20)")


if __name__ == "__main__":
    main()
