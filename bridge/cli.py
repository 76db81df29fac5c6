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
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bridge.cliparser import build_parser, command_of
from bridge.webcli import DEFAULT_WEB

# Nothing heavy at import time (Ray, the optimizer, the safety layer, OpenCV load on use):
# ``labbridge COMMAND --help`` stays fast.


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(command_of(argv))
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
    from loops.optregistry import StrategyUnavailable
    from safety.yamldoc import ConfigError

    prog = f"labbridge {args.command}"
    resume = args.command == "resume"
    try:
        program = None if resume else _load_runnable(args.program)
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
                rejoin=args.rejoin,
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
        StrategyUnavailable,  # resume: the journal's program chose it
        FileNotFoundError,
    ) as exc:
        if getattr(args, "debug", False):  # --debug: the traceback, not the line
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (InstrumentError, safety.SafetyError, OSError, ValueError) as exc:
        if getattr(args, "debug", False):  # --debug: the traceback, not the line
            raise
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
        # a categorical/ordinal parameter's value may be a string (a choice)
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}"
            for k, v in best["params"].items()
        )
        print(f"  best {best['value']:.4g} ({best['experiment_id']}): {params}")
    for name, st in summary.stations.items():
        if st["state"] == "out":
            print(f"  station {name} is out: {st['reason']}")
    if summary.state != "done":
        print(f"to carry on: {resume_hint}")
    return 0 if summary.state == "done" else 3


def _load_runnable(path: Any) -> Any:
    """The program at ``path`` (a file, or a built-in's text) for a campaign to run here:
    refused with :class:`~loops.optregistry.StrategyUnavailable` (one line naming the
    ``pip install``) before anything starts when its strategy's extra is not installed."""
    from loops.optregistry import StrategyUnavailable, missing_extra
    from loops.program import load_program

    program = load_program(path)
    if (missing := missing_extra(program.strategy)) is not None:
        raise StrategyUnavailable(f"{path}: {missing}")
    return program


def _sim_command(args: argparse.Namespace) -> int:
    import safety
    from bridge.campaigns import StationUnavailable
    from bridge.httpserve import BindError
    from bridge.simbench import bench_data, known_faults, sim_campaign  # imports the simulators
    from instruments.errors import InstrumentError
    from loops.optregistry import StrategyUnavailable
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
        program = _load_runnable(args.campaign or bench_data(args.bench).program)
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
        StrategyUnavailable,
        InstrumentError,
        safety.SafetyError,
        OSError,
        ValueError,
    ) as exc:
        if getattr(args, "debug", False):  # --debug: the traceback, not the line
            raise
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
