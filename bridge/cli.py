"""The ``labbridge`` command line.

Commands available now (``labbridge COMMAND --help`` for each):

* ``sim``     start a simulated lab on loopback and run the demo experiment on it
* ``run``     run a campaign (``program.md``) on a lab's stations (a simulated lab by default)
* ``resume``  carry on a campaign that was stopped or killed, from its journal
* ``setup``   run each station's set-up recipes (a camera calibration, priming...) on its bench
* ``check``   validate a lab config without touching hardware
* ``report``  HTML + PNG report of a campaign (convergence, parameters, contact sheet, safety)
* ``export``  a campaign's experiments, transitions and verdicts as CSV or Parquet
* ``serve``   the MQTT campaign API for a lab (docs/mqtt-api.md)
* ``estop`` / ``reset`` / ``status``  over MQTT, to a running ``serve``
* ``mcp``     serve the lab to agents over the Model Context Protocol (docs/agents.md)
* ``agents``  issue, revoke and list agents' tokens
* ``users``   set, remove and list the lab page's users' passwords (docs/web.md)
* ``approvals`` / ``approve`` / ``deny``  agents' proposals awaiting a human, on the journal
* ``drivers`` list the registered driver kinds (built-in and from other packages)
* ``probe``   connect one instrument by kind and URL, print what it is and what it reads
              (the way to check real hardware is wired right)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bridge.webcli import DEFAULT_WEB, add_web_arguments

# Nothing heavy at import time (Ray, the optimizer, the safety layer, OpenCV load on use):
# ``labbridge COMMAND --help`` stays fast.


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
    p.add_argument("--runs", type=Path, default=Path("runs"), help="run folders (default runs/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


#: commands whose parser lives in a module that is slow to import: only the chosen one loads
_HEAVY_PARSERS = {
    "report": "write a campaign's HTML report with PNG plots",
    "export": "write a campaign's experiments, transitions and verdicts as CSV or Parquet",
}


def _command_of(argv: list[str] | None) -> str | None:
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
        help="on an unexpected error show its traceback (default: one line saying what is wrong)",
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    try:
        return _main(parser, args)
    except Exception as exc:  # each command reports what it expects; this is for the rest
        if args.debug:
            raise
        print(f"labbridge {args.command or ''}: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """An unexpected error as one line: what it says and how to see more."""
    if isinstance(exc, RecursionError):
        text = "the input is nested too deeply to process: simplify it"
    else:
        text = " ".join(str(exc).split()) or "no message"
        if len(text) > 500:
            text = text[:497] + "..."
    return f"{text} ({type(exc).__name__}; run with --debug for the traceback)"


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:
        # bleak warns that it cannot run `bluetoothctl` (absent with the simulated BLE bus) and
        # when the simulated bus goes away at the end; neither is actionable for a user.
        logging.getLogger("bleak").setLevel(logging.ERROR)

    if args.command is None:
        parser.print_help()
        return 2
    import safety
    from instruments.errors import InstrumentError

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
    if args.command in _OWNING_COMMANDS:
        with _run_folder():
            if args.command == "sim":
                return _sim_command(args)
            if args.command in ("run", "resume"):
                return _campaign_command(args)
            return int(args.handler(args))  # setup, serve, mcp
    if args.command in (
        "check",
        "estop",
        "reset",
        "status",
        "agents",
        "users",
        "approvals",
        "approve",
        "deny",
    ):
        return int(args.handler(args))
    if args.command == "report":
        from bridge.report import report_command

        return report_command(args)
    if args.command == "export":
        from bridge.export import export_command

        return export_command(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


#: commands that start Ray, simulators or stations: they run in a run folder of their own
_OWNING_COMMANDS = ("sim", "run", "resume", "setup", "serve", "mcp")


@contextlib.contextmanager
def _run_folder() -> Iterator[None]:
    """This process's run folder (:mod:`loops.runfolder`); first, what killed labbridge
    processes left behind (their Ray processes, their temp folders) is cleaned up."""
    from loops.runfolder import clean_leftovers, run_folder

    with run_folder():
        for line in clean_leftovers():
            print(f"labbridge: {line}", file=sys.stderr)
        yield


def _campaign_command(args: argparse.Namespace) -> int:
    import safety
    from bridge.campaigns import StationUnavailable, run_with_signals
    from bridge.labconfig import load_lab
    from instruments.errors import InstrumentError
    from loops.campaign import BudgetWindow, CampaignBusy, OwnerAlive
    from loops.journal import JournalError
    from loops.program import load_program
    from safety.yamldoc import ConfigError

    prog = f"labbridge {args.command}"
    resume = args.command == "resume"
    try:
        program = None if resume else load_program(args.program)
        cid = (
            args.campaign
            if resume
            else (
                args.campaign_id or f"{program.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # type: ignore[union-attr]
            )
        )
        lab_file = args.lab
        if lab_file is not None:
            lab = load_lab(lab_file)
            coro = run_with_signals(
                program,
                lab,
                campaign_id=cid,
                resume=resume,
                operator=args.operator,
                ray_address=args.ray_address,
                progress=not args.no_progress,
            )
            summary = asyncio.run(coro)
        else:
            summary = asyncio.run(_sim_campaign(args, program, cid, resume))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (
        ConfigError,
        CampaignBusy,
        BudgetWindow,
        OwnerAlive,
        JournalError,
        StationUnavailable,
        FileNotFoundError,
    ) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (InstrumentError, safety.SafetyError, OSError, ValueError) as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.lab is not None:
        where = f" --lab {args.lab}"
        journal = lab.store
        folder = lab.store.parent / "reports" / summary.campaign_id
    else:
        where = f" --runs {args.runs}" + (
            f" --bench {args.bench}" if args.bench != "colour" else ""
        )
        journal = args.runs / summary.campaign_id / "journal.db"
        folder = journal.parent / "report"
    code = _print_summary(summary, f"labbridge resume {summary.campaign_id}{where}")
    return _write_report(journal, summary.campaign_id, folder, prog) or code


def _write_report(journal: Path, campaign_id: str, folder: Path, prog: str) -> int:
    """Write a campaign's report (``labbridge report``'s) and say where; 1 if it could not."""
    try:
        from bridge.report import write_report

        print(f"report: {write_report(journal, campaign_id, folder)}")
    except Exception as exc:  # the campaign's data is safe in the journal: say why, carry on
        print(f"{prog}: the report could not be written: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_summary(summary: Any, resume_hint: str) -> int:
    """The campaign's outcome on stdout; exit status 0 when done, 3 when it stopped early."""
    best = summary.best
    print(f"campaign {summary.campaign_id}: {summary.state}: {summary.reason}")
    c = summary.counts
    print(
        f"  {c['run']} experiments run ({c['done']} done, {c['failed']} failed), "
        f"{c['rejected']} rejected by the checks, {c['agent']} from agents"
    )
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
        print(f"  best {best['value']:.4g} ({best['experiment_id']}): {params}")
    for name, st in summary.stations.items():
        if st["state"] == "out":
            print(f"  station {name} is out: {st['reason']}")
    if summary.state != "done":
        print(f"to carry on: {resume_hint}")
    return 0 if summary.state == "done" else 3


def _sim_command(args: argparse.Namespace) -> int:
    import safety
    from bridge.campaigns import StationUnavailable
    from bridge.httpserve import BindError
    from bridge.simbench import bench_data, known_faults, sim_campaign  # imports the simulators
    from instruments.errors import InstrumentError
    from loops.program import load_program
    from safety.yamldoc import ConfigError

    if args.fault is not None and args.fault not in known_faults():
        print(
            f"labbridge sim: unknown fault {args.fault!r} (known: {', '.join(known_faults())})",
            file=sys.stderr,
        )
        return 1
    out = args.out or Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    web = None
    address = args.web or (DEFAULT_WEB if args.keep_running or args.notify else None)
    if address is not None:  # the campaign runs inside a lab service with the lab page
        from bridge.webcli import web_bind

        try:
            web = web_bind(address, args.web_tls_cert, args.web_tls_key)
        except BindError as exc:
            print(f"labbridge sim: {exc}", file=sys.stderr)
            return 1
    try:
        program = load_program(args.campaign or bench_data(args.bench).program)
        if (out / "journal.db").exists():
            raise FileExistsError(f"{out / 'journal.db'} exists: choose another --out")
        summary = asyncio.run(
            sim_campaign(
                program,
                campaign_id=out.name,
                out=out,
                stations=args.stations,
                speed=args.speed,
                broker_url=args.broker,
                embedded_broker=args.embedded_broker,
                fault=args.fault,
                ray_address=args.ray_address,
                progress=not args.no_progress,
                keep_running=args.keep_running,
                bench=args.bench,
                web=web,
                web_any_port=args.web is None,
                notify=args.notify,
            )
        )
    except KeyboardInterrupt:
        print("labbridge sim: interrupted", file=sys.stderr)
        return 130
    except (
        BindError,
        ConfigError,
        StationUnavailable,
        InstrumentError,
        safety.SafetyError,
        OSError,
        ValueError,
    ) as exc:
        print(f"labbridge sim: {exc}", file=sys.stderr)
        return 1
    bench = f" --bench {args.bench}" if args.bench != "colour" else ""
    code = _print_summary(summary, f"labbridge resume {out.name} --runs {out.parent}{bench}")
    reported = _write_report(out / "journal.db", out.name, out / "report", "labbridge sim")
    code = code or reported
    print(f"run folder: {out}")
    return code


async def _sim_campaign(
    args: argparse.Namespace, program: Any, campaign_id: str, resume: bool
) -> Any:
    from bridge.simbench import sim_campaign  # the only place that imports the simulators
    from loops.journal import Journal
    from loops.program import load_program

    out = args.runs / campaign_id
    store = out / "journal.db"
    if resume:
        if not store.exists():
            raise FileNotFoundError(
                f"no journal {store}: give the campaign's --lab, or the --runs folder it ran in"
            )
        journal = Journal(store)
        try:
            stored = journal.campaign(campaign_id)
        finally:
            journal.close()
        program = load_program(stored.program, source=f"campaign {campaign_id} (journal)")
    elif store.exists():
        raise FileExistsError(
            f"{store} exists: campaign {campaign_id} ran before; resume it instead"
        )
    return await sim_campaign(
        program,
        campaign_id=campaign_id,
        out=out,
        stations=args.stations,
        speed=args.speed,
        resume=resume,
        operator=args.operator,
        ray_address=args.ray_address,
        progress=not args.no_progress,
        bench=args.bench,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
