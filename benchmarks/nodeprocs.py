"""What :mod:`benchmarks.twonode` runs on each node's side: its simulated benches, a probe.

    python -m benchmarks.nodeprocs sim --first 2 --stations 2 --sim-at-real S R --out lab.yaml --store j.db
    python -m benchmarks.nodeprocs probe modbus-tcp://127.0.0.1:PORT?unit=1 samples.jsonl

``sim`` serves one node's simulated benches (named from index ``--first`` on, on the
lab's simulated clock ``--sim-at-real``) until SIGTERM, once they serve writing their
lab.yaml (:func:`bridge.simbench.sim_lab_yaml`) to ``--out``. ``probe`` reads a hotplate's
registers over Modbus TCP every ``--every`` s and appends them as JSON lines
(:class:`benchmarks.twonode.HotplateProbe`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


async def _serve_sim(args: argparse.Namespace) -> None:
    """This node's simulated benches, up until SIGTERM; their lab.yaml written once they serve."""
    from bridge.simbench import sim_lab_yaml
    from simulators.bench import SimulatedLab
    from simulators.clock import SimClock

    first = args.first

    class NodeLab(SimulatedLab):
        """The benches of one node: named (and addressed) from index ``first`` on."""

        def _station(self, i: int) -> Any:
            return super()._station(first + i)

    lab = NodeLab(stations=args.stations, speed=args.speed, camera_fps=args.camera_fps)
    lab.clock = SimClock(args.speed, sim_at_real=tuple(args.sim_at_real))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with lab:
        text = sim_lab_yaml(lab, Path(args.store))
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)  # whole, at once: the harness waits for it
        await stop.wait()


async def _probe(args: argparse.Namespace, out: Any) -> None:
    """Read a hotplate's registers over Modbus TCP every ``--every`` s (see HotplateProbe)."""
    from pymodbus.client import AsyncModbusTcpClient

    parts = urlsplit(args.url)
    unit = int(parse_qs(parts.query).get("unit", ["1"])[0])
    client = AsyncModbusTcpClient(parts.hostname or "127.0.0.1", port=parts.port or 502)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await client.connect()
    while not stop.is_set():
        hr = await client.read_holding_registers(0, count=5, device_id=unit)
        ir = await client.read_input_registers(0, count=5, device_id=unit)
        if not hr.isError() and not ir.isError():
            plate = ir.registers[0] - 0x10000 if ir.registers[0] & 0x8000 else ir.registers[0]
            row = {
                "t": time.monotonic(),
                "heater": hr.registers[2],
                "stirrer": hr.registers[3],
                "watchdog_s": hr.registers[4],
                "status": ir.registers[3],
                "plate_c": plate / 10,
            }
            out.write(json.dumps(row) + "\n")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.every):
                await stop.wait()
    client.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nodeprocs")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("sim", help="serve one node's simulated benches")
    sim.add_argument("--first", type=int, default=0)
    sim.add_argument("--stations", type=int, default=1)
    sim.add_argument("--speed", type=float, default=500.0)
    sim.add_argument("--camera-fps", type=float, default=4.0)
    sim.add_argument("--sim-at-real", type=float, nargs=2, required=True)
    sim.add_argument("--out", required=True)
    sim.add_argument("--store", required=True)
    probe = sub.add_parser("probe", help="read a hotplate's registers over Modbus TCP")
    probe.add_argument("url")
    probe.add_argument("path")
    probe.add_argument("--every", type=float, default=0.02)
    args = parser.parse_args(argv)
    if args.command == "sim":
        asyncio.run(_serve_sim(args))
        return
    with open(args.path, "a", buffering=1) as out:  # a line at a time: the test reads it
        asyncio.run(_probe(args, out))


if __name__ == "__main__":
    main()
