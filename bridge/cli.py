"""The ``labbridge`` command line.

Commands available now (``labbridge COMMAND --help`` for each):

* ``sim``     start a simulated lab on loopback and run the demo experiment on it
* ``drivers`` list the registered driver kinds (built-in and from other packages)
* ``probe``   connect one instrument by kind and URL, print what it is and what it reads
              (the way to check real hardware is wired right)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import safety
from instruments.errors import InstrumentError


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"driver option {text!r} is not KEY=VALUE")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labbridge",
        description="A safe bridge between software and lab instruments.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser(
        "sim",
        help="start a simulated lab on loopback and run the demo experiment",
        description=(
            "Start simulated stations (pumps on a pty, hotplate as a Modbus TCP server, colour "
            "sensor on a BlueZ stand-in, enclosure on an MQTT broker, MJPEG camera), connect every "
            "instrument through the real drivers and run one experiment per station. Writes a run "
            "folder with the lab config, results.jsonl and the camera frames."
        ),
    )
    sim.add_argument(
        "--stations", type=_positive_int, default=1, help="number of simulated stations (default 1)"
    )
    sim.add_argument(
        "--speed",
        type=_positive_float,
        default=60.0,
        help="simulated clock speed, x real time (default 60)",
    )
    sim.add_argument(
        "--out", type=Path, default=None, help="run folder (default runs/sim-<timestamp>)"
    )
    sim.add_argument(
        "--broker",
        default=None,
        help="use this MQTT broker URL instead of starting one (mqtt://127.0.0.1:1883)",
    )
    sim.add_argument(
        "--embedded-broker",
        action="store_true",
        help="start the embedded pure-Python broker even when mosquitto is installed",
    )
    sim.add_argument(
        "--fault", default=None, help="inject a simulator fault at start (e.g. clogged-pump)"
    )
    sim.add_argument(
        "--keep-running",
        action="store_true",
        help="stay up as a simulated lab after the experiment (Ctrl-C to stop)",
    )

    sub.add_parser(
        "drivers", help="list registered driver kinds", description="List registered driver kinds."
    )

    probe = sub.add_parser(
        "probe",
        help="connect one instrument and print describe() and read()",
        description=(
            "Connect one instrument by driver kind and transport URL, print what it is and one reading, "
            "then put it in its safe state. Example: labbridge probe hotplate "
            "'modbus-rtu:///dev/ttyUSB1?baudrate=19200&unit=1'"
        ),
    )
    probe.add_argument("kind", help="driver kind (see `labbridge drivers`)")
    probe.add_argument("url", help="transport URL")
    probe.add_argument(
        "-o",
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="driver option, e.g. -o address=2 (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:
        # bleak warns that it cannot run `bluetoothctl` (absent with the simulated BLE bus) and
        # when the simulated bus goes away at the end; neither is actionable for a user.
        logging.getLogger("bleak").setLevel(logging.ERROR)

    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "drivers":
        for kind in safety.available_drivers():
            print(kind)
        return 0
    if args.command == "probe":
        try:
            result = asyncio.run(safety.probe(args.kind, args.url, dict(args.option)))
        except InstrumentError as exc:
            print(f"labbridge probe: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(result, indent=2, default=str))
        return 0
    if args.command == "sim":
        from bridge.simbench import sim_tour  # the only place that imports the simulators

        out = args.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
        try:
            results = asyncio.run(
                sim_tour(
                    stations=args.stations,
                    speed=args.speed,
                    out=out,
                    broker_url=args.broker,
                    embedded_broker=args.embedded_broker,
                    fault=args.fault,
                    keep_running=args.keep_running,
                )
            )
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(
                "\nstopped; every instrument was put in its safe state and the simulators shut down",
                file=sys.stderr,
            )
            return 130
        except (InstrumentError, safety.SafetyError, OSError, ValueError) as exc:
            print(f"labbridge sim: {exc}", file=sys.stderr)
            return 1
        for rec in results:
            c = rec["colour"]
            print(
                f"{rec['station']}: colour counts r={c['red']} g={c['green']} b={c['blue']} "
                f"({c['status']}), liquid {rec['hotplate']['liquid_c']:.1f} degC"
            )
        print(f"run folder: {out}")
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
