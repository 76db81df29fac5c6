"""The ``labbridge`` command line's parser: every command, its options and their help
(:mod:`bridge.cli` runs them)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bridge.webcli import DEFAULT_WEB, add_web_arguments

__all__ = ["build_parser", "command_of"]


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


def _campaign_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (default $RAY_ADDRESS, else a local Ray on loopback)",
    )
    p.add_argument(
        "--operator",
        default=os.environ.get("USER") or "operator",
        help="who is running this (recorded with resets on resume; default $USER)",
    )
    p.add_argument(
        "--stations",
        type=_positive_int,
        default=None,
        help="simulated lab only: number of stations (default: the program's)",
    )
    p.add_argument(
        "--speed",
        type=_positive_float,
        default=200.0,
        help="simulated lab only: clock speed, x real time (default 200)",
    )
    p.add_argument(
        "--bench",
        choices=("colour", "buffer"),
        default="colour",
        help="simulated lab only: which bench (colour, default; buffer: examples/buffer)",
    )
    p.add_argument(
        "--rejoin",
        action="store_true",
        help=(
            "with --lab: a station whose Ray node dies rejoins the campaign once the node is "
            "back, after a recovery in --operator's name (trip, reset, drain; docs/cluster.md)"
        ),
    )
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders (default runs/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


#: commands whose parser lives in a module that is slow to import: only the chosen one loads
_HEAVY_PARSERS = {
    "report": "write a campaign's HTML report with PNG plots",
    "export": "write a campaign's experiments, transitions and verdicts as CSV or Parquet",
}


def command_of(argv: list[str] | None) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), if any."""
    for word in sys.argv[1:] if argv is None else argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``labbridge`` parser; ``command``: the one about to run (its full parser is built;
    the slow-to-import ``report`` and ``export`` are otherwise only listed)."""
    parser = argparse.ArgumentParser(
        prog="labbridge",
        description="A safe bridge between software and lab instruments.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error show its traceback (default: one line saying what is wrong)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser(
        "sim",
        help="start a simulated lab on loopback and run a campaign on it",
        description=(
            "Start simulated stations on loopback (pumps on a pty, hotplate as a Modbus TCP "
            "server, colour sensor on a BlueZ stand-in, enclosure on an MQTT broker, MJPEG "
            "camera), then run a campaign on them through the real drivers, the safety layer, "
            "Ray station actors, the optimizer and camera verification: by default the colour "
            "match that ships with labbridge, to its target, with a progress bar. Writes a run "
            "folder (lab.yaml, the journal, the camera calibration, the images)."
        ),
    )
    sim.add_argument(
        "--stations",
        type=_positive_int,
        default=None,
        help="number of simulated stations (default: the program's)",
    )
    sim.add_argument(
        "--speed",
        type=_positive_float,
        default=200.0,
        help="simulated clock speed, x real time (default 200)",
    )
    sim.add_argument(
        "--bench",
        choices=("colour", "buffer"),
        default="colour",
        help=(
            "which simulated bench: colour (the reference bench's colour match, default) or "
            "buffer (pH transmitter + balance: a phosphate buffer at pH 7.40, examples/buffer)"
        ),
    )
    sim.add_argument(
        "--campaign",
        type=Path,
        default=None,
        help="the campaign's program.md (default: the bench's own: the colour match, the buffer)",
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
        "--fault",
        default=None,
        help="inject a simulator fault once the stations are calibrated (e.g. clogged-pump)",
    )
    sim.add_argument(
        "--keep-running",
        action="store_true",
        help=(
            "stay up as a simulated lab after the campaign, serving the MQTT campaign API and "
            f"the lab page (at {DEFAULT_WEB} unless --web says otherwise; Ctrl-C to stop)"
        ),
    )
    add_web_arguments(sim, optional_address=True)
    sim.add_argument(
        "--notify",
        type=Path,
        default=None,
        metavar="YAML",
        help=(
            "tell people as the notifications: section of this YAML file says (docs/"
            "notifications.md); the campaign runs in a lab service with the lab page"
        ),
    )
    sim.add_argument("--ray-address", default=None, help="join this Ray cluster")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")

    run = sub.add_parser(
        "run",
        help="run a campaign (program.md) on a lab's stations",
        description=(
            "Run a campaign to its stop rules on Ray: one station actor per bench, every proposal "
            "dry-run by the safety layer, every experiment journaled before it acts. Without --lab "
            "a simulated lab with the program's number of stations starts on loopback and the run "
            "folder runs/<campaign> holds its lab.yaml and journal. Ctrl-C stops the campaign with "
            "every station in its safe state; `labbridge resume CAMPAIGN` carries on."
        ),
    )
    run.add_argument("program", type=Path, help="the campaign's program.md")
    run.add_argument("--lab", type=Path, default=None, help="lab config (default: a simulated lab)")
    run.add_argument("--campaign-id", default=None, help="campaign id (default <name>-<timestamp>)")
    _campaign_options(run)

    resume = sub.add_parser(
        "resume",
        help="carry on a stopped or killed campaign from its journal",
        description=(
            "Resume a campaign: finished results are kept, the optimizer state is restored, an "
            "experiment that was running is never re-run: its station is safe-stated, checked and "
            "drained first (recorded with --operator), then the campaign carries on to its stop rules."
        ),
    )
    resume.add_argument("campaign", help="the campaign id (as `labbridge run` printed it)")
    resume.add_argument(
        "--lab",
        type=Path,
        default=None,
        help="lab config (default: a new simulated lab, journal in runs/<campaign>/journal.db)",
    )
    _campaign_options(resume)

    from bridge.agentcli import add_agent_parsers
    from bridge.approvalcli import add_approval_parsers
    from bridge.labcli import add_lab_parsers
    from bridge.mqttcli import add_mqtt_client_parsers, add_serve_parser
    from bridge.webcli import add_user_parsers

    for name, what in _HEAVY_PARSERS.items():
        if name != command:
            sub.add_parser(name, help=what, add_help=False)
        elif name == "report":
            from bridge.reportcli import add_report_parser

            add_report_parser(sub)
        else:
            from bridge.export import add_export_parser

            add_export_parser(sub)
    add_lab_parsers(sub)
    add_serve_parser(sub)
    add_mqtt_client_parsers(sub)
    add_agent_parsers(sub)
    add_user_parsers(sub)
    add_approval_parsers(sub)

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
