"""``labbridge check`` (a lab config, and a program against it, without touching hardware)
and ``labbridge setup`` (each station's set-up recipes on its bench)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


def add_lab_parsers(sub: Any) -> None:
    """Add ``check`` and ``setup`` to a ``parser.add_subparsers()`` object."""
    chk = sub.add_parser(
        "check",
        help="validate a lab config without touching hardware",
        description=(
            "Validate a lab config: its format (every error names the file, line and field), "
            "each station's envelope (limits, rules, budgets; names must be the station's "
            "instruments), each driver kind, transport URL and driver options, every "
            "actuated channel and how it is bounded, each station's set-up recipes and whether "
            "they have run; with --program, a program's recipe against each station "
            "and a dry run of its space's corners and centre. Nothing is connected."
        ),
    )
    chk.add_argument("lab", type=Path, help="the lab config (lab.yaml)")
    chk.add_argument(
        "--program",
        type=Path,
        help=(
            "also check this program.md against each station: its recipe's instruments, "
            "commands and arguments, and a dry run of the corners and centre of its space"
        ),
    )
    chk.add_argument(
        "--assume",
        action="append",
        default=[],
        metavar="CHANNEL=VALUE",
        help=(
            "a measured value the dry run assumes (e.g. enclosure.lid=closed, "
            "hotplate.setpoint_c=25); repeat for several"
        ),
    )

    stp = sub.add_parser(
        "setup",
        help="run each station's set-up recipes (calibrations, priming...) on its bench",
        description=(
            "Run the set-up recipes the lab config lists for each station (or --station; "
            "all of them, or --recipe), in order, through the safety layer: e.g. the reference "
            "bench's camera calibration (frames of the vial at known volumes, fitted). What "
            "they keep is saved in the station's setup_file (default setup/<station>.yaml "
            "next to the lab config); campaigns verify every experiment with it. A real "
            "bench's campaign refuses to start until its 'once' recipes have run."
        ),
    )
    stp.add_argument("--lab", type=Path, required=True, help="lab config")
    stp.add_argument(
        "--station", action="append", default=None, help="only this station (repeatable)"
    )
    stp.add_argument(
        "--recipe", action="append", default=None, help="only this set-up recipe (repeatable)"
    )
    stp.add_argument("--ray-address", default=None, help="join this Ray cluster")
    chk.set_defaults(handler=_check_command)
    stp.set_defaults(handler=_setup_command)


def _check_command(args: argparse.Namespace) -> int:
    from bridge.labconfig import load_lab
    from safety.yamldoc import ConfigError

    try:
        lab = load_lab(args.lab)
    except ConfigError as exc:
        print(f"labbridge check: {exc}", file=sys.stderr)
        return 1
    problems = lab.check()
    for problem in problems:
        print(problem, file=sys.stderr)
    for name, st in lab.stations.items():
        kinds = ", ".join(f"{i['name']} ({i['kind']})" for i in st.instruments)
        print(f"station {name}: {len(st.instruments)} instruments: {kinds}")
        print(f"  envelope: {st.envelope_source}")
        print("  actuated channels (deny by default: an unbounded one is refused):")
        for b in _bounds(st):
            print(f"    {b.channel}: {b.how}  [{', '.join(b.commands)}]")
        print(f"  verification: {'on' if st.verification else 'off'}")
        ran = st.setup_store.load()["ran"] if st.setup_store else {}
        for recipe in st.setup:
            last = ran.get(recipe.name)
            state = f"ran {last['at']} by {last['who']}" if last else "NOT RUN: labbridge setup"
            print(f"  set-up {recipe.name} ({recipe.every}): {state}")
    print(f"journal: {lab.store}; Ray: {lab.ray_address or 'local (loopback)'}")
    if lab.notifications is not None:  # what each channel sends (its problems: lab.check())
        for note in lab.notifications.check(bool(lab.mqtt.get("url")))[1]:
            print(note)
    if args.program is not None:
        found = _check_program(lab, args.program, args.assume)
        for problem in found:
            print(problem, file=sys.stderr)
        problems += found
    if problems:
        print(f"{args.lab}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.lab}: OK")
    return 0


def _assumed(items: list[str]) -> dict[str, Any]:
    """``CHANNEL=VALUE`` pairs, values read as YAML scalars (closed, 25, true)."""
    import yaml

    from safety.yamldoc import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or "." not in name:
            raise ConfigError(
                f"{item!r}: give CHANNEL=VALUE, e.g. enclosure.lid=closed", source="--assume"
            )
        try:
            out[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{item!r}: {text!r} is not a value", source="--assume") from None
    return out


def _check_program(lab: Any, path: Path, assume_items: list[str]) -> list[str]:
    """``check --program``: the program against each station (loops/check.py); prints each
    station's dry runs, returns the problems."""
    from loops.check import check_program
    from loops.optregistry import missing_extra
    from loops.plancost import CostError, station_cost
    from loops.program import load_program
    from safety import load_envelope, station_layout
    from safety.yamldoc import ConfigError

    try:
        program = load_program(path)
        assume = _assumed(assume_items)
    except ConfigError as exc:
        return [str(exc)]
    problems: list[str] = []
    if (missing := missing_extra(program.strategy)) is not None:
        problems.append(f"{path}: {missing}")
    for name, st in lab.stations.items():
        try:
            envelope = load_envelope(st.envelope_text, source=st.envelope_source)
            layout = station_layout(st.instruments, envelope)
        except Exception as exc:  # lab.check() reported it already
            problems.append(f"station {name}: cannot check the program: {exc}")
            continue
        result = check_program(program, name, layout, envelope, assume=assume)
        problems += result.problems
        if program.cost is not None:  # cost: names what this station's plans consume
            try:
                station_cost(program, st.instruments, st.envelope_text, assume=assume)
            except CostError as exc:
                problems.append(f"station {name}: {exc}")
        if not result.ok:
            continue
        tried = [p for p in result.points if not p.infeasible]
        refused = [p for p in tried if not p.ok]
        print(
            f"program {program.name} on station {name}: dry run of {len(tried)} points "
            f"(corners and centre the constraints allow): {len(tried) - len(refused)} pass, "
            f"{len(refused)} refused"
        )
        for point in refused:
            values = ", ".join(
                f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}"
                for k, v in point.params.items()
            )
            print(f"  {point.label} ({values}): refused")
            for reason in point.reasons:
                print(f"    {reason}")
        unknown = sorted({n for p in refused for n in p.unknown})
        if unknown:
            print(
                f"  the dry run does not know {', '.join(unknown)} (measured on the bench): "
                f"say what to assume, e.g. --assume {unknown[0]}=<value>"
            )
    return problems


def _bounds(st: Any) -> list[Any]:
    """The station's actuated channels and how its envelope bounds them ([] if it cannot load:
    the problems above say why)."""
    from safety import actuated_channels, load_envelope

    try:
        envelope = load_envelope(st.envelope_text, source=st.envelope_source)
        return actuated_channels(st.instruments, envelope)
    except Exception:  # an envelope or a driver kind lab.check() already reported
        return []


def _setup_command(args: argparse.Namespace) -> int:
    from bridge.campaigns import StationUnavailable, open_lab, set_up
    from bridge.labconfig import load_lab
    from safety.yamldoc import ConfigError

    async def go() -> tuple[Any, dict[str, list[str]]]:
        lab = load_lab(args.lab)
        names = args.station or [n for n, st in lab.stations.items() if st.setup]
        unknown = [n for n in names if n not in lab.stations]
        if unknown:
            raise ValueError(f"{args.lab}: no station {', '.join(unknown)}")
        none = [n for n in names if not lab.stations[n].setup]
        if none or not names:
            raise ValueError(
                f"{args.lab}: no set-up recipes for {', '.join(none) or 'any station'}"
            )
        chosen = {
            n: [r for r in lab.stations[n].setup if args.recipe is None or r.name in args.recipe]
            for n in names
        }
        missing = set(args.recipe or ()) - {r.name for rs in chosen.values() for r in rs}
        if missing:
            raise ValueError(f"{args.lab}: no set-up recipe {', '.join(sorted(missing))}")
        async with open_lab(
            lab, ray_address=args.ray_address, stations=names, set_up_first=False
        ) as (
            _,
            actors,
        ):
            return lab, await set_up(lab, actors, chosen)

    try:
        lab, done = asyncio.run(go())
    except (ConfigError, StationUnavailable, ValueError, OSError) as exc:
        if getattr(args, "debug", False):  # --debug: the traceback, not the line
            raise
        print(f"labbridge setup: {exc}", file=sys.stderr)
        return 1
    for name, recipes in done.items():
        store = lab.stations[name].setup_store
        print(f"{name}: {', '.join(recipes)} done; kept in {store.path if store else '-'}")
    return 0
