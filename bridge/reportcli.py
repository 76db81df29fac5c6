"""``labbridge report``'s command line, kept apart from the report's plotting stack so that
``labbridge report --help`` answers at once (bridge/report.py imports matplotlib and OpenCV)."""

from __future__ import annotations

import argparse
from typing import Any

from bridge.export import add_journal_arguments

__all__ = ["add_report_parser"]


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to a ``parser.add_subparsers()`` object; returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="write a campaign's HTML report with PNG plots",
        description=(
            "Write report.html and PNGs for a campaign from its journal: state, stop reason, "
            "counts, the best result, convergence, the parameters explored, the camera contact "
            "sheet with the measured overlays, and the safety verdicts (refusals, rejected "
            "proposals, trips and failures). The journal is runs/<CAMPAIGN>/journal.db unless "
            "--runs or --journal says otherwise. Open the HTML in any browser; no JavaScript."
        ),
    )
    add_journal_arguments(parser, out_help="output folder (default: report/ next to the journal)")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=60,
        metavar="N",
        help="at most N frames on the contact sheet (default 60; all of them when there are fewer)",
    )
    parser.add_argument(
        "--best-tiles",
        type=int,
        default=24,
        metavar="N",
        help="over the cap: the N best trusted results plus the unverified and failed ones (default 24)",
    )
    return parser
