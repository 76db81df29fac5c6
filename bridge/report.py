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

Rendering cost is dominated by matplotlib (~1-1.5 s for the two figures) and the
contact sheet (~15 ms per tile, PNG encoding included); docs/reports.md has
measured times.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.export import (
    CampaignDataError,
    add_journal_arguments,
    open_campaign,
    open_journal,
    resolve_journal,
)
from instruments import vision
from instruments.colour import lab_to_srgb
from loops.journal import Campaign, Experiment, Journal, Transition
from loops.setup import SetupStore

__all__ = [
    "CONTACT_SHEET",
    "CONVERGENCE",
    "PARAMETERS",
    "REPORT",
    "add_report_parser",
    "report_command",
    "select_tiles",
    "write_report",
]

REPORT = "report.html"
CONVERGENCE = "convergence.png"
PARAMETERS = "parameters.png"
CONTACT_SHEET = "contact-sheet.png"
#: experiments listed one by one in the HTML tables (the export has all of them)
MAX_TABLE_ROWS = 2000
#: parameters up to which the parameter plot is a scatter matrix (parallel coordinates above)
MAX_SCATTER_PARAMETERS = 6

_ENDED = ("done", "stopped", "aborted")


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class _Param:
    name: str
    unit: str = ""
    low: float | None = None
    high: float | None = None


@dataclass
class _Data:
    """Everything the report shows, read from the journal once."""

    campaign: Campaign
    journal_path: Path
    direction: str
    measure: str
    target: float | None
    target_lab: tuple[float, float, float] | None
    budget: str
    strategy: str | None
    program_note: str | None
    params: list[_Param]
    experiments: list[Experiment]
    verdicts: list[dict[str, Any]]
    events: list[Transition]
    rejections: dict[str, list[str]]
    failures: dict[str, dict[str, Any]]
    images: dict[str, dict[str, dict[str, Any]]]
    stations_with_calibration: dict[str, Path] = field(default_factory=dict)

    @property
    def minimize(self) -> bool:
        return self.direction != "maximize"

    def better(self, a: float, b: float) -> bool:
        return a < b if self.minimize else a > b


def _read(journal: Journal, campaign_id: str) -> _Data:
    campaign = open_campaign(journal, campaign_id)
    exps = journal.experiments(campaign_id)
    direction, measure, target, target_lab = "minimize", "objective", None, None
    budget, strategy, note = "", None, None
    params: list[_Param] = []
    try:
        from loops.program import load_program

        program = load_program(campaign.program)
    except Exception as exc:  # an old or foreign program: report what the journal has
        program = None
        note = f"the campaign's program could not be read ({exc}); objective direction assumed minimize"
    if program is not None:
        direction = program.objective.direction
        measure = program.objective.measure
        target = program.stop.target
        lab = program.fixed.get("target_lab")  # a colour target, drawn as a swatch
        if isinstance(lab, list) and len(lab) == 3 and all(isinstance(v, int | float) for v in lab):
            target_lab = (float(lab[0]), float(lab[1]), float(lab[2]))
        strategy = program.strategy
        parts = []
        if program.budget.experiments is not None:
            parts.append(f"{program.budget.experiments} experiments")
        if program.budget.hours is not None:
            parts.append(f"{program.budget.hours:g} h")
        budget = ", ".join(parts)
        params = [_Param(p.name, p.unit, float(p.low), float(p.high)) for p in program.parameters]
    known = {p.name for p in params}
    for e in exps:
        for name in e.params:
            if name not in known:
                known.add(name)
                params.append(_Param(name))
    events: list[Transition] = []
    rejections: dict[str, list[str]] = {}
    failures: dict[str, dict[str, Any]] = {}
    for t in journal.campaign_log(campaign_id):
        if t.experiment_id is None:
            events.append(t)
        elif t.event == "state" and t.state == "rejected" and isinstance(t.data, Mapping):
            reasons = t.data.get("reasons")
            if isinstance(reasons, list):
                rejections[t.experiment_id] = [str(r) for r in reasons]
        elif t.event == "state" and t.state == "failed" and isinstance(t.data, Mapping):
            failures[t.experiment_id] = dict(t.data)
    images = {e.id: journal.images(e.id) for e in exps}
    folder = journal.path.parent
    calibrations = {}
    for station in {e.station for e in exps if e.station}:
        path = folder / "setup" / f"{station}.yaml"  # the set-up results of a run folder
        if path.is_file():
            calibrations[station] = path
    return _Data(
        campaign=campaign,
        journal_path=journal.path,
        direction=direction,
        measure=measure,
        target=target,
        target_lab=target_lab,
        budget=budget,
        strategy=strategy,
        program_note=note,
        params=params,
        experiments=exps,
        verdicts=journal.verdicts(campaign_id),
        events=events,
        rejections=rejections,
        failures=failures,
        images=images,
        stations_with_calibration=calibrations,
    )


def _trusted(e: Experiment) -> bool:
    return e.state == "done" and e.objective is not None and e.verified is not False


def _best(data: _Data) -> Experiment | None:
    best: Experiment | None = None
    best_value = math.nan
    for e in data.experiments:
        if _trusted(e) and e.objective is not None:
            if best is None or data.better(e.objective, best_value):
                best, best_value = e, e.objective
    return best


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _kind(proposer: str) -> str:
    return proposer.split(":", 1)[0]


# -------------------------------------------------------------- formatting
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _params_text(params: Mapping[str, Any], info: Sequence[_Param] = ()) -> str:
    units = {p.name: p.unit for p in info}
    parts = []
    for k, v in params.items():
        unit = f" {units[k]}" if units.get(k) else ""
        parts.append(f"{k}={_num(v)}{unit}")
    return ", ".join(parts)


def _verification_text(e: Experiment) -> str:
    if e.state != "done":
        return f"{e.state}: {e.reason}" if e.reason else f"no result ({e.state})"
    if e.verified is True:
        return "verified"
    if e.verified is False:
        return e.reason or "unverified"
    return "not checked (verification off)"


def _swatch(lab: Sequence[float] | None) -> str:
    if lab is None:
        return ""
    r, g, b = lab_to_srgb(lab, clip=True)
    colour = f"rgb({round(255 * r)}, {round(255 * g)}, {round(255 * b)})"
    return f'<span class="swatch" style="background: {colour}"></span>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (the caller escaped them)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if raw else _esc(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CampaignDataError(
            "the report's plots need matplotlib, which is not installed: pip install matplotlib"
        ) from None

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_MARKERS = {"optimizer": "o", "agent": "D", "operator": "s"}
_NO_RESULT = {  # state -> (marker, colour, label): drawn along the bottom of objective axes
    "failed": ("v", "tab:red", "failed (no result)"),
    "rejected": ("x", "0.35", "rejected by the checks"),
    "cancelled": ("|", "0.55", "cancelled"),
    "interrupted": ("|", "tab:red", "interrupted"),
}


def _plot_convergence(data: _Data, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(9.0, 4.8)
    ax = fig.add_subplot()
    done = [e for e in data.experiments if e.state == "done" and e.objective is not None]
    for kind in ("optimizer", "agent", "operator"):
        marker = _MARKERS[kind]
        mine = [e for e in done if _kind(e.proposer) == kind]
        trusted = [e for e in mine if e.verified is not False]
        untrusted = [e for e in mine if e.verified is False]
        who = "" if kind == "optimizer" else f" ({kind} proposal)"
        if trusted:
            ax.scatter(
                [e.seq for e in trusted],
                [e.objective for e in trusted],
                marker=marker,
                s=36,
                color="tab:blue" if kind == "optimizer" else "tab:purple",
                label=f"result{who}",
                zorder=3,
            )
        if untrusted:
            ax.scatter(
                [e.seq for e in untrusted],
                [e.objective for e in untrusted],
                marker=marker,
                s=52,
                facecolors="none",
                edgecolors="tab:orange",
                linewidths=1.6,
                label=f"unverified, not trusted{who}",
                zorder=3,
            )
    trusted_all = [(e.seq, e.objective) for e in done if e.verified is not False]
    if trusted_all:
        xs, ys = [], []
        best: float | None = None
        for seq, value in trusted_all:
            if value is not None and (best is None or data.better(value, best)):
                best = value
            xs.append(seq)
            ys.append(best)
        last = max(e.seq for e in data.experiments)
        ax.step(
            [*xs, last], [*ys, ys[-1]], where="post", color="tab:green", lw=1.8, label="best so far"
        )
        top = _best(data)
        if top is not None:
            ax.scatter(
                [top.seq],
                [top.objective],
                marker="*",
                s=260,
                color="gold",
                edgecolors="black",
                zorder=4,
                label=f"best ({top.id})",
            )
    if data.target is not None:
        ax.axhline(data.target, color="tab:red", ls="--", lw=1.2, label=f"target {data.target:g}")
    bottom = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for state, (marker, colour, label) in _NO_RESULT.items():
        xs = [e.seq for e in data.experiments if e.state == state]
        if xs:
            ax.scatter(
                xs,
                [0.04] * len(xs),
                transform=bottom,
                marker=marker,
                color=colour,
                s=40,
                label=label,
                clip_on=False,
                zorder=3,
            )
    external = [e for e in data.experiments if _kind(e.proposer) != "optimizer"]
    if external:  # agents' and operators' proposals, whatever became of them, ringed in purple
        with_value = [e for e in external if e.objective is not None]
        without = [e for e in external if e.objective is None]
        ring = {"marker": "o", "s": 190, "facecolors": "none", "edgecolors": "tab:purple"}
        if with_value:
            ax.scatter(
                [e.seq for e in with_value],
                [e.objective for e in with_value],
                linewidths=1.3,
                label="agent or operator proposal",
                zorder=2,
                **ring,
            )
        if without:
            ax.scatter(
                [e.seq for e in without],
                [0.04] * len(without),
                transform=bottom,
                linewidths=1.3,
                clip_on=False,
                zorder=2,
                label=None if with_value else "agent or operator proposal",
                **ring,
            )
    if not done:
        ax.text(0.5, 0.5, "no results yet", transform=ax.transAxes, ha="center", color="0.4")
    ax.margins(y=0.14)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment number (seq)")
    ax.set_ylabel(f"{data.measure} ({data.direction})")
    ax.set_title(f"campaign {data.campaign.id}: convergence")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncols=2, framealpha=0.85)
    fig.savefig(path, format="png")


def _norm_axis(p: _Param, values: Sequence[float]) -> tuple[float, float]:
    if p.low is not None and p.high is not None and p.high > p.low:
        return p.low, p.high
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    return (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)


def _numeric(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return math.nan


def _plot_parameters(data: _Data, path: Path) -> None:
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    params = data.params
    k = len(params)
    exps = data.experiments
    trusted = [e for e in exps if _trusted(e)]
    values = [float(e.objective or 0.0) for e in trusted]  # _trusted: never None
    cmap = "viridis_r" if data.minimize else "viridis"
    norm = Normalize(min(values), max(values)) if values else Normalize(0.0, 1.0)
    best = _best(data)
    groups: list[tuple[list[Experiment], dict[str, Any], str]] = [
        (
            [e for e in exps if e.state == "done" and e.verified is False],
            {"marker": "o", "facecolors": "none", "edgecolors": "tab:orange", "linewidths": 1.4},
            "unverified",
        ),
        ([e for e in exps if e.state == "rejected"], {"marker": "x", "color": "0.35"}, "rejected"),
        ([e for e in exps if e.state == "failed"], {"marker": "v", "color": "tab:red"}, "failed"),
    ]

    def col(es: Sequence[Experiment], name: str) -> list[float]:
        return [_numeric(e.params.get(name)) for e in es]

    handles = [
        Line2D([], [], marker="o", ls="", color="tab:blue", label="result (colour: objective)"),
        Line2D([], [], marker="o", ls="", mfc="none", mec="tab:orange", label="unverified"),
        Line2D([], [], marker="x", ls="", color="0.35", label="rejected"),
        Line2D([], [], marker="v", ls="", color="tab:red", label="failed"),
        Line2D([], [], marker="*", ls="", ms=12, mfc="gold", mec="black", label="best"),
    ]
    if k <= MAX_SCATTER_PARAMETERS:
        size = 2.1
        fig = _figure(size * k + 1.6, size * k + 0.9)
        axes = fig.subplots(k, k, squeeze=False)
        for j, pj in enumerate(params):
            xs_all = col(exps, pj.name)
            xlim = _norm_axis(pj, xs_all)
            pad = 0.04 * (xlim[1] - xlim[0])
            for r in range(k):
                ax = axes[r][j]
                if r > 0 and j >= r:
                    ax.set_axis_off()
                    continue
                if r == 0:  # objective vs parameter j
                    ax.scatter(col(trusted, pj.name), values, c=values, cmap=cmap, norm=norm, s=18)
                    for es, style, _ in groups:
                        if not es:
                            continue
                        if style["marker"] == "o":
                            ax.scatter(col(es, pj.name), [e.objective for e in es], s=22, **style)
                        else:
                            ax.scatter(
                                col(es, pj.name),
                                [0.04] * len(es),
                                transform=ax.get_xaxis_transform(),
                                s=22,
                                clip_on=False,
                                **style,
                            )
                    if best is not None:
                        ax.scatter(
                            [_numeric(best.params.get(pj.name))],
                            [best.objective],
                            marker="*",
                            s=160,
                            color="gold",
                            edgecolors="black",
                            zorder=4,
                        )
                    if data.target is not None:
                        ax.axhline(data.target, color="tab:red", ls="--", lw=0.9)
                    ax.margins(y=0.12)
                    if j == 0:
                        ax.set_ylabel(data.measure)
                else:  # parameter r (y) vs parameter j (x)
                    pr = params[r]
                    ylim = _norm_axis(pr, col(exps, pr.name))
                    ax.scatter(
                        col(trusted, pj.name),
                        col(trusted, pr.name),
                        c=values,
                        cmap=cmap,
                        norm=norm,
                        s=18,
                    )
                    for es, style, _ in groups:
                        if es:
                            ax.scatter(col(es, pj.name), col(es, pr.name), s=22, **style)
                    if best is not None:
                        ax.scatter(
                            [_numeric(best.params.get(pj.name))],
                            [_numeric(best.params.get(pr.name))],
                            marker="*",
                            s=160,
                            color="gold",
                            edgecolors="black",
                            zorder=4,
                        )
                    ypad = 0.04 * (ylim[1] - ylim[0])
                    ax.set_ylim(ylim[0] - ypad, ylim[1] + ypad)
                    if j == 0:
                        ax.set_ylabel(pr.name + (f" ({pr.unit})" if pr.unit else ""))
                    else:
                        ax.tick_params(labelleft=False)
                ax.set_xlim(xlim[0] - pad, xlim[1] + pad)
                ax.tick_params(labelsize="x-small")
                ax.grid(True, alpha=0.25)
                if r + 1 < k and j <= r:  # the panel below shares this x axis and labels it
                    ax.tick_params(labelbottom=False)
            # the lowest visible panel of each column carries its x label
            lowest = k - 1 if j < k - 1 else 0
            axes[lowest][j].set_xlabel(pj.name + (f" ({pj.unit})" if pj.unit else ""))
        all_axes = [ax for row in axes for ax in row]
    else:  # parallel coordinates: one polyline per experiment over the normalised axes
        from matplotlib.collections import LineCollection

        fig = _figure(max(9.0, 1.1 * k + 2), 5.5)
        ax = fig.add_subplot()
        spans = [_norm_axis(p, col(exps, p.name)) for p in params]

        def line(e: Experiment) -> list[tuple[float, float]]:
            pts = []
            for i, (p, (lo, hi)) in enumerate(zip(params, spans, strict=True)):
                v = _numeric(e.params.get(p.name))
                pts.append((float(i), (v - lo) / (hi - lo) if math.isfinite(v) else math.nan))
            return pts

        from matplotlib import colormaps

        cm = colormaps[cmap]
        ax.add_collection(
            LineCollection(
                [line(e) for e in trusted],
                colors=[cm(norm(v)) for v in values],
                linewidths=1.2,
                alpha=0.8,
            )
        )
        for es, style, _ in groups:
            if es:
                colour = style.get("color", style.get("edgecolors"))
                ax.add_collection(
                    LineCollection(
                        [line(e) for e in es],
                        colors=colour,
                        linewidths=1.0,
                        linestyles="dashed" if style["marker"] != "o" else "dotted",
                    )
                )
        if best is not None:
            ax.add_collection(LineCollection([line(best)], colors="black", linewidths=2.6))
        ax.set_xlim(-0.2, k - 0.8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(range(k))
        ax.set_xticklabels(
            [
                f"{p.name}\n{_num(lo)}..{_num(hi)}"
                for p, (lo, hi) in zip(params, spans, strict=True)
            ],
            fontsize="small",
        )
        ax.set_yticks([0, 1], ["low", "high"])
        for i in range(k):
            ax.axvline(i, color="0.6", lw=0.8)
        handles = [
            Line2D([], [], color="tab:blue", label="result (colour: objective)"),
            Line2D([], [], color="tab:orange", ls="dotted", label="unverified"),
            Line2D([], [], color="0.35", ls="dashed", label="rejected"),
            Line2D([], [], color="tab:red", ls="dashed", label="failed"),
            Line2D([], [], color="black", lw=2.6, label="best"),
        ]
        all_axes = [ax]
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=all_axes, shrink=0.6, label=f"{data.measure} (trusted results)")
    fig.legend(handles=handles, loc="outside lower center", ncols=5, fontsize="small")
    fig.suptitle(f"campaign {data.campaign.id}: parameters explored ({len(exps)} proposals)")
    fig.savefig(path, format="png")


# ------------------------------------------------------------- contact sheet
def select_tiles(
    experiments: Sequence[Experiment],
    has_image: Callable[[Experiment], bool],
    *,
    minimize: bool = True,
    best_tiles: int = 24,
    max_tiles: int = 60,
) -> tuple[list[Experiment], str]:
    """Which experiments the contact sheet shows, in seq order, and a sentence that says so.

    Every experiment with an outcome image when there are at most ``max_tiles``;
    otherwise the ``best_tiles`` best trusted results plus the unverified and
    failed ones (in seq order) up to ``max_tiles`` in all.
    """
    if best_tiles < 0 or max_tiles < 1:
        raise ValueError(
            f"best_tiles must be >= 0 and max_tiles >= 1, got {best_tiles}, {max_tiles}"
        )
    candidates = [e for e in experiments if has_image(e)]
    if len(candidates) <= max_tiles:
        return candidates, f"all {len(candidates)} experiments with a camera image"
    trusted = [e for e in candidates if _trusted(e)]
    problems = [e for e in candidates if not _trusted(e) and e.state in ("done", "failed")]
    sign = 1.0 if minimize else -1.0
    ranked = sorted(trusted, key=lambda e: (sign * float(e.objective or 0.0), e.seq))
    best = ranked[: min(best_tiles, max_tiles)]
    room = max_tiles - len(best)
    shown_problems = problems[:room]
    chosen = sorted(best + shown_problems, key=lambda e: e.seq)
    text = (
        f"{len(chosen)} of {len(candidates)} experiments with a camera image (cap {max_tiles}): "
        f"the {len(best)} best trusted results and "
        + (
            f"all {len(problems)} unverified or failed ones"
            if len(shown_problems) == len(problems)
            else f"the first {len(shown_problems)} of {len(problems)} unverified or failed ones"
        )
    )
    return chosen, text


def _placeholder(width: int = 640, height: int = 480) -> np.ndarray:
    """A striped grey frame for an experiment whose image is missing (its caption says why)."""
    img = np.full((height, width, 3), 70, np.uint8)
    img[::16, :] = 90
    return img


def _image_path(data: _Data, info: Mapping[str, Any]) -> Path | None:
    """The stored path, else ``images/<sha256>.jpg`` next to the journal (a moved run folder)."""
    stored = Path(str(info.get("path", "")))
    if stored.is_file():
        return stored
    fallback = data.journal_path.parent / "images" / f"{info.get('sha256')}.jpg"
    return fallback if fallback.is_file() else None


def _load_frame(data: _Data, info: Mapping[str, Any] | None) -> tuple[np.ndarray | None, str]:
    if info is None:
        return None, "no image"
    path = _image_path(data, info)
    if path is None:
        return None, f"image file missing ({info.get('path')})"
    try:
        return vision.decode_jpeg(path.read_bytes()), ""
    except (OSError, vision.VisionError) as exc:
        return None, f"image unreadable: {exc}"


def _analysis(data: _Data, e: Experiment, frame: np.ndarray) -> tuple[vision.FrameAnalysis, str]:
    """The analysis the verification recorded (exactly as measured); else analyse the frame
    again with the station's calibration from the run folder when there is one."""
    result = e.result if isinstance(e.result, Mapping) else {}
    verification = result.get("verification")
    recorded = verification.get("analysis") if isinstance(verification, Mapping) else None
    if isinstance(recorded, Mapping) and "width" not in recorded:  # the analyses by name:
        found = [a.get("analysis") for a in recorded.values() if isinstance(a, Mapping)]
        recorded = next((a for a in found if isinstance(a, Mapping)), None)  # the camera's
    if isinstance(recorded, Mapping):
        try:
            analysis = vision.analysis_from_dict(recorded)
            if (analysis.width, analysis.height) == (frame.shape[1], frame.shape[0]):
                return analysis, "recorded"
        except vision.VisionError:
            pass  # recorded by another version: analyse again
    calibration = None
    cal_path = data.stations_with_calibration.get(e.station or "")
    if cal_path is not None:
        try:  # the camera calibration the station's set-up kept, if it kept one
            kept = SetupStore(cal_path).values().get("calibration")
            calibration = vision.Calibration.from_dict(kept) if isinstance(kept, dict) else None
        except Exception:
            calibration = None
    reference = None
    ref_info = data.images.get(e.id, {}).get("reference")
    if ref_info is not None:
        ref, _ = _load_frame(data, ref_info)
        if ref is not None and ref.shape == frame.shape:
            reference = ref
    return vision.analyse(frame, calibration, reference), "re-analysed"


@dataclass(frozen=True)
class _Tile:
    experiment: Experiment
    caption: tuple[str, ...]
    colour: tuple[int, int, int]
    source: str


def _caption(data: _Data, e: Experiment) -> tuple[tuple[str, ...], tuple[int, int, int]]:
    who = "" if _kind(e.proposer) == "optimizer" else f" | {e.proposer}"
    first = f"{e.id} | {e.station or '-'}{who}"
    value = f"{data.measure} = {_num(e.objective)}" if e.objective is not None else "no result"
    if e.state == "done" and e.verified is True:
        return (first, value, "verified"), (90, 210, 90)
    if e.state == "done" and e.verified is None:
        return (first, value, "not checked (verification off)"), (200, 200, 200)
    return (first, value, _verification_text(e)), (80, 80, 255)


def _write_contact_sheet(
    data: _Data, chosen: Sequence[Experiment], path: Path, columns: int, tile_width: int
) -> list[_Tile]:
    frames: list[np.ndarray] = []
    tiles: list[_Tile] = []
    for e in chosen:
        frame, problem = _load_frame(data, data.images.get(e.id, {}).get("outcome"))
        caption, colour = _caption(data, e)
        if frame is None:
            frames.append(_placeholder())
            tiles.append(_Tile(e, (*caption[:2], problem), (80, 80, 255), problem))
            continue
        analysis, source = _analysis(data, e, frame)
        frames.append(vision.overlay(frame, analysis))
        tiles.append(_Tile(e, caption, colour, source))
    sheet = vision.contact_sheet(
        frames,
        [t.caption for t in tiles],
        colours=[t.colour for t in tiles],
        columns=columns,
        tile_width=tile_width,
    )
    _write_bytes(path, vision.encode_png(sheet))
    return tiles


# ---------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; }
.state { font-weight: bold; } .bad { color: #b00; } .good { color: #070; } .muted { color: #666; }
.swatch { display: inline-block; width: 1.4em; height: 1em; border: 1px solid #444;
          vertical-align: middle; margin-right: 0.3em; }
img { max-width: 100%; border: 1px solid #ccc; }
nav a { margin-right: 1em; }
.note { background: #fff6dd; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
"""


def _summary_html(data: _Data, best: Experiment | None) -> list[str]:
    c = data.campaign
    exps = data.experiments
    out: list[str] = []
    reason = None
    for t in reversed(data.events):
        if (
            t.event == "campaign"
            and isinstance(t.data, Mapping)
            and t.data.get("reason")
            and t.state == c.state
        ):
            reason = str(t.data["reason"])
            break
    state_cls = "good" if c.state == "done" else ("bad" if c.state == "aborted" else "")
    out.append(
        f'<p>State: <span class="state {state_cls}">{_esc(c.state)}</span>'
        + (f" — {_esc(reason)}" if reason else "")
        + "</p>"
    )
    if c.state not in _ENDED:
        out.append(
            '<p class="note">The campaign has not ended: it is running, paused, or its process '
            f"was stopped or killed (<code>labbridge resume {_esc(c.id)}</code> carries on). "
            "This report shows the journal as it was when the report was written.</p>"
        )
    if data.program_note:
        out.append(f'<p class="note">{_esc(data.program_note)}</p>')
    objective = _esc(f"{data.measure}, {data.direction}")
    if data.target is not None:
        objective += _esc(f", stop at {data.target:g}")
    if data.target_lab is not None:
        lab = ", ".join(f"{v:g}" for v in data.target_lab)
        objective += f" (target colour {_swatch(data.target_lab)}L*a*b* {_esc(lab)})"
    rows: list[Sequence[str]] = [
        ("campaign", _esc(c.id) + (f" ({_esc(c.name)})" if c.name and c.name != c.id else "")),
        ("journal", _esc(data.journal_path)),
        ("objective", objective),
        ("budget", _esc(data.budget or "—")),
        ("strategy", _esc(data.strategy or "—")),
        ("started", _esc(_when(c.created))),
        (
            "last change",
            _esc(f"{_when(c.updated)} ({_duration(c.updated - c.created)} after the start)"),
        ),
        ("report written", _esc(_when(time.time()))),
    ]
    out.append(_table(("", ""), rows, raw=True))

    states = Counter(e.state for e in exps)
    done = [e for e in exps if e.state == "done"]
    verified = Counter(
        "verified" if e.verified else ("unverified" if e.verified is False else "not checked")
        for e in done
    )
    proposers = Counter(e.proposer for e in exps)
    stations = Counter(e.station for e in exps if e.station)
    out.append("<h3>Counts</h3>")
    if not exps:
        out.append(
            '<p class="note">This campaign has no experiments (yet): nothing was proposed.</p>'
        )
        return out
    count_rows = [("experiments proposed", str(len(exps)))]
    for state in (
        "done",
        "failed",
        "rejected",
        "cancelled",
        "interrupted",
        "running",
        "queued",
        "checked",
        "proposed",
    ):
        if states.get(state):
            count_rows.append((f"  {state}", str(states[state])))
    for label in ("verified", "unverified", "not checked"):
        if verified.get(label):
            count_rows.append((f"results {label}", str(verified[label])))
    for who, n in sorted(proposers.items()):
        count_rows.append((f"proposed by {who}", str(n)))
    for station, n in sorted(stations.items()):
        count_rows.append((f"ran on {station}", str(n)))
    refused = sum(1 for v in data.verdicts if not v["allowed"])
    count_rows.append(("safety verdicts (refused)", f"{len(data.verdicts)} ({refused})"))
    out.append(_table(("", "count"), count_rows))

    out.append("<h3>Best result</h3>")
    if best is None:
        out.append(
            "<p>No trusted result: no experiment finished with a verified (or unchecked) result.</p>"
        )
    else:
        measurements = _mapping(_mapping(best.result).get("measurements"))
        out.append(
            f"<p><b>{_esc(best.id)}</b>: {_esc(data.measure)} = <b>{_esc(_num(best.objective))}</b> "
            f"({_esc(_verification_text(best))}; proposed by {_esc(best.proposer)}, "
            f"ran on {_esc(best.station or '—')})"
            + (
                f"; measured colour {_swatch(measurements.get('lab'))}"
                if isinstance(measurements.get("lab"), list) and len(measurements["lab"]) == 3
                else ""
            )
            + "</p>"
        )
        units = {p.name: p for p in data.params}
        prow = []
        for k, v in best.params.items():
            p = units.get(k)
            bounds = f"{_num(p.low)} – {_num(p.high)}" if p and p.low is not None else ""
            prow.append((k, _num(v), p.unit if p else "", bounds))
        out.append(_table(("parameter", "value", "unit", "bounds"), prow))
        better_untrusted = [
            e
            for e in done
            if e.verified is False
            and e.objective is not None
            and data.better(e.objective, float(best.objective or 0.0))
        ]
        if better_untrusted:
            out.append(
                '<p class="note">Not trusted, so not the best: '
                + ", ".join(
                    f"{_esc(e.id)} ({_esc(_num(e.objective))}, unverified)"
                    for e in better_untrusted
                )
                + " had a better objective but the camera disagreed with the instruments.</p>"
            )
    return out


def _command_text(command: Any) -> str:
    if not isinstance(command, Mapping):
        return str(command)
    params = command.get("params")
    args = ", ".join(f"{k}={v!r}" for k, v in params.items()) if isinstance(params, Mapping) else ""
    return f"{command.get('instrument')}.{command.get('action')}({args})"


def _safety_html(data: _Data) -> list[str]:
    out: list[str] = []
    verdicts = data.verdicts
    refused = [v for v in verdicts if not v["allowed"]]
    out.append(
        f"<p>{len(verdicts)} commands were checked by the safety layer: "
        f"{len(verdicts) - len(refused)} allowed, {len(refused)} refused. "
        f"{sum(e.state == 'rejected' for e in data.experiments)} proposals were rejected by the "
        "checks (the program's constraints, the safety layer's dry run) before they acted.</p>"
    )
    if verdicts:
        by_rule: dict[str, list[int]] = {}
        for v in verdicts:
            key = v["rule"] or v["reason"] or "(no rule)"
            by_rule.setdefault(key, [0, 0])[0 if v["allowed"] else 1] += 1
        out.append(
            "<h3>Verdicts by rule</h3><p class='muted'>Allowed commands that no rule had to "
            "judge are counted by their reason.</p>"
        )
        out.append(
            _table(
                ("rule", "allowed", "refused"),
                [
                    (r, str(a), str(f))
                    for r, (a, f) in sorted(by_rule.items(), key=lambda kv: -sum(kv[1]))
                ],
            )
        )
        by_command: dict[str, list[int]] = {}
        for v in verdicts:
            cmd = v["command"] if isinstance(v["command"], Mapping) else {}
            key = f"{cmd.get('instrument')}.{cmd.get('action')}"
            by_command.setdefault(key, [0, 0])[0 if v["allowed"] else 1] += 1
        out.append("<h3>Verdicts by command</h3>")
        out.append(
            _table(
                ("command", "allowed", "refused"),
                [
                    (c, str(a), str(f))
                    for c, (a, f) in sorted(by_command.items(), key=lambda kv: -sum(kv[1]))
                ],
            )
        )
    out.append(f'<h3 id="refusals">Refusals ({len(refused)})</h3>')
    if refused:
        rows: list[Sequence[str]] = [
            (
                _when(v["t"]),
                v["experiment_id"] or "",
                v["station"],
                v["who"] or "",
                _command_text(v["command"]),
                v["rule"] or "",
                v["reason"],
            )
            for v in refused[:MAX_TABLE_ROWS]
        ]
        out.append(
            _table(("time", "experiment", "station", "who", "command", "rule", "reason"), rows)
        )
        if len(refused) > MAX_TABLE_ROWS:
            out.append(
                f"<p class='note'>{len(refused) - MAX_TABLE_ROWS} more refusals are not listed here; "
                "<code>labbridge export</code> writes all of them.</p>"
            )
    else:
        out.append("<p>No command was refused.</p>")
    rejected = [e for e in data.experiments if e.state == "rejected"]
    out.append(f'<h3 id="rejected">Rejected proposals ({len(rejected)})</h3>')
    if rejected:
        rows = []
        for e in rejected:
            reasons = data.rejections.get(e.id) or ([e.reason] if e.reason else [])
            items = "".join(f"<li>{_esc(r)}</li>" for r in reasons)
            rows.append(
                (
                    _esc(e.id),
                    _esc(e.proposer),
                    _esc(_params_text(e.params, data.params)),
                    f"<ul>{items}</ul>",
                )
            )
        out.append(_table(("experiment", "proposer", "parameters", "reasons"), rows, raw=True))
    else:
        out.append("<p>No proposal was rejected.</p>")
    trips = [
        v
        for v in verdicts
        if isinstance(v["command"], Mapping) and v["command"].get("action") in ("trip", "estop")
    ]
    problems = [e for e in data.experiments if e.state in ("failed", "interrupted", "cancelled")]
    out.append(
        f'<h3 id="failures">Trips and failures ({_plural(len(problems), "experiment")}, '
        f"{_plural(len(trips), 'trip')})</h3>"
    )
    if problems:
        rows = []
        for e in problems:
            detail = _mapping(data.failures.get(e.id, {}).get("data"))
            trip = detail.get("trip") if isinstance(detail.get("trip"), Mapping) else None
            trip_text = ""
            if trip is not None:
                safe = ", ".join(str(s) for s in trip.get("safe") or [])
                failed = ", ".join(str(s) for s in trip.get("failed") or [])
                trip_text = f"tripped: {trip.get('reason', '')}; safe state: {safe or '—'}"
                if failed:
                    trip_text += f"; NOT safe-stated: {failed}"
                if isinstance(trip.get("reaction_s"), int | float):
                    trip_text += f"; reaction {1000 * trip['reaction_s']:.1f} ms"
            rows.append((e.id, e.state, e.station or "", e.proposer, e.reason or "", trip_text))
        out.append(_table(("experiment", "state", "station", "proposer", "reason", "trip"), rows))
    else:
        out.append("<p>No experiment failed, was interrupted or was cancelled.</p>")
    if trips:
        rows = [
            (_when(v["t"]), v["station"], v["experiment_id"] or "", v["rule"] or "", v["reason"])
            for v in trips
        ]
        out.append("<p>Trips recorded by the safety layer:</p>")
        out.append(_table(("time", "station", "experiment", "source", "reason"), rows))
    if data.events:
        out.append("<h3>Campaign and station events</h3>")
        rows = []
        for t in data.events:
            d = t.data if isinstance(t.data, Mapping) else {}
            text = d.get("reason") or ("created" if d.get("created") else "")
            if d.get("resumed"):
                text = "resumed: " + ", ".join(
                    f"{k} {', '.join(d.get(k) or []) or 'none'}"
                    for k in ("interrupted", "requeued")
                )
            rows.append((_when(t.t), t.state, str(text)))
        out.append(_table(("time", "state", "why"), rows))
    return out


def _experiments_html(data: _Data) -> list[str]:
    exps = data.experiments
    if not exps:
        return ["<p>No experiments.</p>"]
    names = [p.name for p in data.params]
    rows: list[Sequence[str]] = []
    for e in exps[:MAX_TABLE_ROWS]:
        cls = "bad" if (e.state != "done" or e.verified is False) else ""
        rows.append(
            [
                str(e.seq),
                _esc(e.id),
                f'<span class="{cls}">{_esc(e.state)}</span>',
                _esc(e.proposer),
                _esc(e.station or ""),
            ]
            + [_esc(_num(e.params.get(n))) for n in names]
            + [_esc(_num(e.objective)), _esc(_verification_text(e))]
        )
    out = [
        _table(
            [
                "seq",
                "experiment",
                "state",
                "proposer",
                "station",
                *names,
                data.measure,
                "verification / reason",
            ],
            rows,
            raw=True,
        )
    ]
    if len(exps) > MAX_TABLE_ROWS:
        out.append(
            f"<p class='note'>{len(exps) - MAX_TABLE_ROWS} more experiments are not listed; "
            "<code>labbridge export</code> writes all of them.</p>"
        )
    return out


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
        data = _read(journal, campaign_id)
    finally:
        journal.close()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CampaignDataError(f"cannot create the report folder {out}: {exc}") from None
    exps = data.experiments
    best = _best(data)
    written: set[str] = set()
    body: list[str] = []
    c = data.campaign
    body.append(f"<h1>Campaign {_esc(c.id)}</h1>")
    body.append(
        '<nav><a href="#summary">Summary</a><a href="#convergence">Convergence</a>'
        '<a href="#parameters">Parameters</a><a href="#camera">Camera</a>'
        '<a href="#safety">Safety</a><a href="#experiments">Experiments</a></nav>'
    )
    body.append('<h2 id="summary">Summary</h2>')
    body += _summary_html(data, best)

    body.append('<h2 id="convergence">Convergence</h2>')
    if exps:
        _plot_convergence(data, out / CONVERGENCE)
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

    body.append('<h2 id="parameters">Parameters explored</h2>')
    if exps and data.params:
        _plot_parameters(data, out / PARAMETERS)
        written.add(PARAMETERS)
        layout = (
            "top row: the objective against each parameter; below: every pair of parameters"
            if len(data.params) <= MAX_SCATTER_PARAMETERS
            else "parallel coordinates, each axis from the parameter's lower to its upper bound"
        )
        body.append(
            f'<img src="{PARAMETERS}" alt="parameters explored, coloured by objective">'
            f"<p class='muted'>{_esc(layout)}; colour: the objective of trusted results; the star "
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
        tiles = _write_contact_sheet(data, chosen, out / CONTACT_SHEET, columns, tile_width)
        written.add(CONTACT_SHEET)
        body.append(
            f"<p>Showing {_esc(statement)}, in experiment order, {columns} per row"
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
            rows.append((str(i), e.id, _num(e.objective), _verification_text(e), t.source))
        body.append(_table(("tile", "experiment", data.measure, "verification", "overlay"), rows))
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
            _table(
                ("experiment", "station", data.measure, "reason"),
                [(e.id, e.station or "", _num(e.objective), e.reason or "") for e in unverified],
            )
        )

    body.append('<h2 id="safety">Safety</h2>')
    body += _safety_html(data)
    body.append('<h2 id="experiments">Experiments</h2>')
    body += _experiments_html(data)

    for name in (CONVERGENCE, PARAMETERS, CONTACT_SHEET):  # no stale plot of an earlier report
        if name not in written:
            (out / name).unlink(missing_ok=True)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Campaign {_esc(c.id)}: report</title><style>{_CSS}</style></head><body>\n"
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
