"""The command line for approvals: ``labbridge approvals``, ``approve ID``, ``deny ID``.

They work on the lab's journal file (``--lab lab.yaml``: its ``store``; or ``--journal``),
not through a running service: a decision is recorded in the journal
(:meth:`~loops.journal.Journal.decide`) and the campaign's runner, whichever process runs
it (``labbridge run``, ``serve``, ``mcp``), picks it up within a second and applies it;
a campaign that is not running applies it when it is resumed. So one command serves
every way a campaign runs. The approver is the operating-system user running the
command (``getpass.getuser()``): whoever may write the journal file may decide, as with
every other file of the lab; from another machine an operator decides over MQTT
(``campaigns/<id>/approvals/<user>``, docs/mqtt-api.md) as the broker user.

Imports only the standard library at import time. docs/agents.md shows them in use.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_approval_parsers", "approvals_command", "decide_command"]

#: how often a waiting ``approve``/``deny`` looks whether the campaign applied it (s)
_POLL_S = 0.1


def _journal_path(args: argparse.Namespace) -> Path:
    """The journal file named by ``--journal`` or ``--lab``'s ``store``; ValueError if none."""
    if args.journal is not None:
        path = Path(args.journal)
    else:
        from bridge.labconfig import load_lab

        path = load_lab(args.lab).store
    if not path.is_file():
        raise ValueError(f"no journal at {path}: no campaign has run with this lab yet")
    return path


def _when(t: float) -> str:
    left = t - time.time()
    if left <= 0:
        return "expired"
    if left >= 3600:
        return f"expires in {left / 3600:.1f} h"
    if left >= 60:
        return f"expires in {left / 60:.0f} min"
    return f"expires in {left:.0f} s"


def approvals_command(args: argparse.Namespace) -> int:
    """``labbridge approvals``: the proposals awaiting approval, oldest first."""
    from loops.journal import Journal, JournalError
    from safety.yamldoc import ConfigError

    prog = "labbridge approvals"
    try:
        with Journal(_journal_path(args)) as journal:
            rows = journal.approvals(args.campaign)
    except (ConfigError, JournalError, ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        where = f" in campaign {args.campaign}" if args.campaign else ""
        print(f"no proposal awaits approval{where}")
        return 0
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        print(f"{r['experiment_id']}  {r['proposer']}  {_when(r['expires'])}  {params}")
        for rule in r["rules"]:
            print(f"    asked by {rule}")
        if r["decision"] is not None:
            print(
                f"    {r['decision']}d by {r['who']}: {r['reason']} (the campaign applies it "
                "when it runs)"
            )
    return 0


def decide_command(args: argparse.Namespace) -> int:
    """``labbridge approve|deny ID --reason TEXT``: record the decision in the journal, as
    the OS user, and wait (``--wait`` s) for the campaign to apply it."""
    from loops.journal import AWAITING, Journal, JournalError
    from safety.yamldoc import ConfigError

    prog = f"labbridge {args.command}"
    approve = args.command == "approve"
    who = getpass.getuser()
    try:
        with Journal(_journal_path(args)) as journal:
            row = journal.decide(args.experiment, approve, who, args.reason, via="cli")
            deadline = time.monotonic() + args.wait
            exp = journal.experiment(args.experiment)
            while exp.state == AWAITING and time.monotonic() < deadline:
                time.sleep(_POLL_S)
                exp = journal.experiment(args.experiment)
    except (ConfigError, JournalError, ValueError, OSError) as exc:
        print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    done = "approved" if approve else "denied"
    if exp.state == AWAITING:
        print(
            f"{args.experiment} {done} by {who} (journaled); campaign {row['campaign_id']} "
            f"did not apply it within {args.wait:g} s: it does when it runs (labbridge resume "
            f"{row['campaign_id']} if it is stopped)"
        )
        return 0
    then = "queued to run" if exp.state == "checked" else exp.state
    print(f"{args.experiment} {done} by {who}: {then} ({exp.reason})")
    return 0


def _where(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--lab", type=Path, help="lab config: its journal (store)")
    where.add_argument("--journal", type=Path, help="the journal file itself")


def add_approval_parsers(subparsers: Any) -> None:
    """``labbridge approvals``, ``labbridge approve`` and ``labbridge deny``."""
    ls = subparsers.add_parser(
        "approvals",
        help="list agents' proposals awaiting approval",
        description=(
            "List the proposals awaiting a human's approval in the lab's journal: the "
            "experiment, the agent, when it expires, its parameters and the rules that asked."
        ),
    )
    _where(ls)
    ls.add_argument("--campaign", default=None, help="only this campaign")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    ls.set_defaults(handler=approvals_command)
    for name, what in (
        ("approve", "approve a proposal awaiting approval: it is queued and runs"),
        ("deny", "deny a proposal awaiting approval: it is rejected"),
    ):
        p = subparsers.add_parser(
            name,
            help=what,
            description=(
                f"{what[0].upper()}{what[1:]}. Recorded in the journal with you (the OS user) "
                "and the reason; the campaign's runner applies it, whichever process runs it."
            ),
        )
        p.add_argument("experiment", help="the experiment id (labbridge approvals lists them)")
        p.add_argument("--reason", required=True, help="why (journaled with your name)")
        _where(p)
        p.add_argument(
            "--wait",
            type=float,
            default=10.0,
            help="seconds to wait for the campaign to apply it (default 10; 0: do not wait)",
        )
        p.set_defaults(handler=decide_command)
