"""``labbridge report``: one campaign as an HTML page with PNG plots, from its journal.

:func:`write_report` only reads the journal (a running campaign can be
reported while it runs: SQLite WAL; like every labbridge command, opening a
journal of an older schema migrates it) and writes to ``out_dir``:

* ``report.html``: self-contained apart from the PNGs beside it (relative
  links, inline CSS, no JavaScript): the campaign's state and stop reason,
  counts, the best trusted result and its parameters, then the sections below
  and a table of every experiment;
* ``convergence.png``: the objective of every result against the experiment
  number, the best-so-far line over the trusted results and the target;
  unverified results hollow, agent/operator proposals with their own markers,
  failed and rejected proposals (no objective) as marks along the bottom;
* ``parameters.png``: the parameters explored, coloured by the objective: a
  row of objective-vs-parameter panels over the lower triangle of parameter
  pairs (up to 6 parameters), parallel coordinates beyond that;
* ``pareto.png`` (several objectives): the first two objectives of every trusted
  result with the Pareto front and the thresholds, and the hypervolume per
  experiment; the section names the experiment that best meets the thresholds
  and lists the front (:mod:`bridge.reportpareto`);
* ``contact-sheet.png``: every included experiment's outcome frame with the
  camera's measured overlays (:func:`instruments.vision.overlay` of the analysis
  the verification recorded, drawn again exactly; re-analysed when none was
  recorded) and a caption: experiment id, objective, verified or the reason.
  A large campaign's sheet is capped (``best_tiles`` best trusted results plus
  every unverified or failed one, at most ``max_tiles``); the page says which
  experiments are shown and which are not.

The safety section lists the verdicts' counts by rule and by command, every
refusal with its rule and reason, every rejected proposal with its reasons,
and the trips and failures (with each trip's safe-state outcome) and the
campaign's own state changes.

The parts: :mod:`bridge.reportdata` (what the report shows, read once),
:mod:`bridge.reportplots` (the two plots), :mod:`bridge.reportsheet` (the contact
sheet), :mod:`bridge.reporthtml` (the sections' HTML); this module writes the
page and the files, and is the ``labbridge report`` command.

Rendering cost is dominated by matplotlib (~1-1.5 s for the two figures) and the
contact sheet (~15 ms per tile, PNG encoding included); docs/reports.md has
measured times.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bridge.export import CampaignDataError, open_journal, resolve_journal
from bridge.reportdata import best_result, fmt_num, read_report_data, verification_text
from bridge.reporthtml import (
    CSS,
    esc,
    experiments_html,
    html_table,
    safety_html,
    summary_html,
)
from bridge.reportlearned import feasibility_html, prior_html
from bridge.reportpareto import PARETO, pareto_html, pareto_summary, plot_pareto
from bridge.reportplots import MAX_SCATTER_PARAMETERS, plot_convergence, plot_parameters
from bridge.reportsheet import render_contact_sheet, select_tiles

__all__ = [
    "CONTACT_SHEET",
    "CONVERGENCE",
    "PARAMETERS",
    "REPORT",
    "report_command",
    "select_tiles",
    "write_report",
]

REPORT = "report.html"
CONVERGENCE = "convergence.png"
PARAMETERS = "parameters.png"
CONTACT_SHEET = "contact-sheet.png"


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(
    journal_path: str | Path,
    campaign_id: str,
    out_dir: str | Path,
    *,
    best_tiles: int = 24,
    max_tiles: int = 60,
    columns: int = 4,
    tile_width: int = 400,
) -> Path:
    """Write ``report.html`` and its PNGs for one campaign to ``out_dir``; returns the HTML's path.

    ``best_tiles`` / ``max_tiles``: the contact sheet's cap (:func:`select_tiles`);
    ``columns``: tiles per row, each ``tile_width`` pixels wide. Raises :class:`~bridge.export.CampaignDataError`
    for a missing journal or campaign (listing the campaigns the journal has) or
    an output folder that cannot be written.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    journal = open_journal(journal_path)
    try:
        data = read_report_data(journal, campaign_id)
    finally:
        journal.close()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CampaignDataError(f"cannot create the report folder {out}: {exc}") from None
    exps = data.experiments
    best = best_result(data)
    written: set[str] = set()
    body: list[str] = []
    c = data.campaign
    body.append(f"<h1>Campaign {esc(c.id)}</h1>")
    body.append(
        '<nav><a href="#summary">Summary</a><a href="#convergence">Convergence</a>'
        + ('<a href="#pareto">Pareto front</a>' if len(data.goals) > 1 else "")
        + '<a href="#parameters">Parameters</a><a href="#camera">Camera</a>'
        '<a href="#safety">Safety</a><a href="#experiments">Experiments</a></nav>'
    )
    body.append('<h2 id="summary">Summary</h2>')
    body += summary_html(data, best)

    body.append('<h2 id="convergence">Convergence</h2>')
    if exps:
        plot_convergence(data, out / CONVERGENCE)
        written.add(CONVERGENCE)
        body.append(
            f'<img src="{CONVERGENCE}" alt="objective per experiment and best so far">'
            "<p class='muted'>Filled markers: trusted results (circles: the optimizer's, diamonds: "
            "agents', squares: operators'); hollow orange: unverified results (the camera disagreed; "
            "not trusted, not in the best-so-far line); along the bottom: failed (red triangles), "
            "rejected (grey crosses), cancelled or interrupted (bars) proposals, which have no "
            "objective; ringed in purple: every proposal of an agent or operator.</p>"
        )
    else:
        body.append("<p>No experiments: nothing to plot.</p>")

    pareto = pareto_summary(data)
    if pareto is not None:
        body.append('<h2 id="pareto">Pareto front</h2>')
        plot_pareto(pareto, out / PARETO)
        written.add(PARETO)
        body += pareto_html(pareto, data)

    prior = prior_html(data)
    if prior:
        body.append('<h2 id="prior">Prior results</h2>')
        body += prior
    body.append('<h2 id="parameters">Parameters explored</h2>')
    if exps and data.params:
        plot_parameters(data, out / PARAMETERS)
        written.add(PARAMETERS)
        layout = (
            "top row: the objective against each parameter; below: every pair of parameters"
            if len(data.params) <= MAX_SCATTER_PARAMETERS
            else "parallel coordinates, each axis from the parameter's lower to its upper bound"
        )
        body.append(
            f'<img src="{PARAMETERS}" alt="parameters explored, coloured by objective">'
            f"<p class='muted'>{esc(layout)}; colour: the objective of trusted results; the star "
            "is the best result.</p>"
        )
    else:
        body.append("<p>No experiments: nothing to plot.</p>")

    body.append('<h2 id="camera">Camera contact sheet</h2>')
    chosen, statement = select_tiles(
        exps,
        lambda e: "outcome" in data.images.get(e.id, {}),
        minimize=data.minimize,
        best_tiles=best_tiles,
        max_tiles=max_tiles,
    )
    no_image = sum(1 for e in exps if "outcome" not in data.images.get(e.id, {}))
    if chosen:
        sheet, tiles = render_contact_sheet(data, chosen, columns, tile_width)
        _write_bytes(out / CONTACT_SHEET, sheet)
        written.add(CONTACT_SHEET)
        body.append(
            f"<p>Showing {esc(statement)}, in experiment order, {columns} per row"
            + (
                f"; {no_image} experiments have no outcome image (never ran, or failed before it)"
                if no_image
                else ""
            )
            + ". Overlays: green the vial, cyan the white patch, red the liquid surface and its "
            "volume, yellow the region whose colour was measured (swatch and L*a*b* top right), "
            "magenta changed regions, the frame's status at the bottom.</p>"
        )
        body.append(
            f'<a href="{CONTACT_SHEET}"><img src="{CONTACT_SHEET}" '
            'alt="camera frames of the experiments with overlays"></a>'
            "<p class='muted'>Open the image on its own for full size.</p>"
        )
        rows: list[Sequence[str]] = []
        for i, t in enumerate(tiles, 1):
            e = t.experiment
            rows.append((str(i), e.id, fmt_num(e.objective), verification_text(e), t.source))
        body.append(
            html_table(("tile", "experiment", data.measure, "verification", "overlay"), rows)
        )
    else:
        body.append(
            "<p>No camera images: "
            + (
                "no experiments."
                if not exps
                else f"none of the {len(exps)} experiments has an outcome image."
            )
            + "</p>"
        )
    unverified = [e for e in exps if e.state == "done" and e.verified is False]
    if unverified:
        body.append(f"<h3>Unverified results ({len(unverified)})</h3>")
        body.append(
            html_table(
                ("experiment", "station", data.measure, "reason"),
                [(e.id, e.station or "", fmt_num(e.objective), e.reason or "") for e in unverified],
            )
        )

    body.append('<h2 id="safety">Safety</h2>')
    body += safety_html(data)
    learned = feasibility_html(data)
    if learned:
        body.append('<h3 id="feasibility">Learned feasibility: predicted and what happened</h3>')
        body += learned
    body.append('<h2 id="experiments">Experiments</h2>')
    body += experiments_html(data)

    for name in (
        CONVERGENCE,
        PARAMETERS,
        CONTACT_SHEET,
        PARETO,
    ):  # no stale plot of an earlier report
        if name not in written:
            (out / name).unlink(missing_ok=True)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Campaign {esc(c.id)}: report</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = out / REPORT
    try:
        _write_bytes(path, page.encode("utf-8"))
    except OSError as exc:
        raise CampaignDataError(f"cannot write {path}: {exc}") from None
    return path


# ---------------------------------------------------------------------- CLI
def report_command(args: argparse.Namespace) -> int:
    """Run ``labbridge report``: prints where the report went; errors to stderr with status 1."""
    journal = resolve_journal(args)
    out = Path(args.out) if args.out is not None else journal.parent / "report"
    max_tiles = getattr(args, "max_tiles", 60)
    best_tiles = getattr(args, "best_tiles", 24)
    if max_tiles < 1 or best_tiles < 0:
        print(
            f"labbridge report: --max-tiles must be >= 1 and --best-tiles >= 0 "
            f"(got {max_tiles}, {best_tiles})",
            file=sys.stderr,
        )
        return 1
    try:
        path = write_report(journal, args.campaign, out, best_tiles=best_tiles, max_tiles=max_tiles)
    except CampaignDataError as exc:
        print(f"labbridge report: {exc}", file=sys.stderr)
        return 1
    pngs = sorted(
        p.name
        for p in path.parent.glob("*.png")
        if p.name in (CONVERGENCE, PARAMETERS, CONTACT_SHEET)
    )
    print(f"campaign {args.campaign}: report written to {path}")
    if pngs:
        print(f"  with {', '.join(pngs)} in {path.parent}")
    return 0
