"""The report's Pareto section, for a program with several objectives.

:func:`pareto_summary` computes, from the trusted results' objective values
(:attr:`ReportData.vectors <bridge.reportdata.ReportData.vectors>`): the Pareto front,
the hypervolume after each experiment (from a fixed reference point: the objectives'
thresholds where the program gives them, else each objective's worst trusted value
pushed out by 10 % of its range), and the experiment that best meets the thresholds
(among the results that meet every threshold, the one with the largest smallest
margin, each margin as a fraction of that objective's range; when none meets them
all, the one that misses them least). :func:`plot_pareto` draws ``pareto.png`` (the
first two objectives, the front joined in order, the thresholds; and the hypervolume
against the experiment number), :func:`pareto_html` the section's text and tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge.reportdata import ReportData, fmt_num
from bridge.reporthtml import esc, html_table
from bridge.reportplots import figure
from loops.pareto import hypervolume, min_frame, nondominated, reference_point

__all__ = ["PARETO", "ParetoSummary", "pareto_html", "pareto_summary", "plot_pareto"]

PARETO = "pareto.png"


@dataclass(frozen=True)
class ParetoSummary:
    """The front and its hypervolume, from a report's data."""

    measures: tuple[str, ...]
    directions: tuple[str, ...]
    thresholds: tuple[float | None, ...]
    #: trusted results in experiment order: (experiment id, objective values)
    results: list[tuple[str, tuple[float, ...]]]
    front: list[str]  # ids of the experiments on the front
    reference: tuple[float, ...]  # in the objectives' own directions
    #: (experiment number, hypervolume after it), one per experiment that ran
    hypervolume: list[tuple[int, float]]
    best_id: str | None
    best_meets: bool


def pareto_summary(data: ReportData) -> ParetoSummary | None:
    """The Pareto summary of a campaign with several objectives (None for one)."""
    if len(data.goals) < 2:
        return None
    measures = tuple(o.measure for o in data.goals)
    directions = tuple(o.direction for o in data.goals)
    thresholds = tuple(o.threshold for o in data.goals)
    ran = [e for e in data.experiments if e.state in ("done", "failed")]
    results = [(e.id, data.vectors[e.id]) for e in ran if e.id in data.vectors]
    y = min_frame([v for _, v in results], directions)
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    t_min = [None if t is None else float(s * t) for t, s in zip(thresholds, signs, strict=True)]
    ref = reference_point(y, t_min)
    front_mask = nondominated(y) if len(y) else np.zeros(0, dtype=bool)
    front = [rid for (rid, _), keep in zip(results, front_mask, strict=True) if keep]
    hv: list[tuple[int, float]] = []
    rows: list[np.ndarray] = []
    by_id = dict(results)
    for n, e in enumerate(ran, 1):
        if e.id in by_id:
            rows.append(min_frame([by_id[e.id]], directions)[0])
        hv.append((n, hypervolume(np.array(rows), ref) if rows else 0.0))
    best_id, best_meets = None, False
    if len(y):
        span = np.ptp(y, axis=0)
        span = np.where(span > 0, span, 1.0)
        slack = (ref - y) / span  # > 0: better than the reference (the threshold)
        worst = slack.min(axis=1)
        i = int(np.argmax(worst))
        best_id, best_meets = (
            results[i][0],
            bool(all(t is None or y[i, j] <= t for j, t in enumerate(t_min))),
        )
    return ParetoSummary(
        measures,
        directions,
        thresholds,
        results,
        front,
        tuple(float(s * r) for s, r in zip(signs, ref, strict=True)),
        hv,
        best_id,
        best_meets,
    )


def plot_pareto(summary: ParetoSummary, path: Path) -> None:
    """``pareto.png``: the first two objectives with the front, and the hypervolume."""
    fig = figure(11.0, 4.6)
    ax, ax_hv = fig.subplots(1, 2, width_ratios=(3, 2))
    front = set(summary.front)
    xs = [v[0] for _, v in summary.results]
    ys = [v[1] for _, v in summary.results]
    ax.scatter(xs, ys, color="0.6", s=22, label="trusted result")
    pts = sorted((v[0], v[1]) for rid, v in summary.results if rid in front)
    if pts:
        ax.scatter(*zip(*pts, strict=True), color="tab:blue", s=40, zorder=3, label="Pareto front")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", lw=1.0)
    best = dict(summary.results).get(summary.best_id or "")
    if best is not None:
        ax.scatter(
            [best[0]],
            [best[1]],
            marker="*",
            s=220,
            color="gold",
            edgecolors="black",
            zorder=4,
            label="best at the thresholds",
        )
    for j, line in ((0, ax.axvline), (1, ax.axhline)):
        t = summary.thresholds[j]
        if t is not None:
            line(t, color="tab:red", ls="--", lw=1.0)
    ax.set_xlabel(f"{summary.measures[0]} ({summary.directions[0]})")
    ax.set_ylabel(f"{summary.measures[1]} ({summary.directions[1]})")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("objectives (dashed: thresholds)", fontsize=10)
    if summary.hypervolume:
        n, hv = zip(*summary.hypervolume, strict=True)
        ax_hv.plot(n, hv, drawstyle="steps-post", color="tab:green")
    ax_hv.set_xlabel("experiment")
    ax_hv.set_ylabel("hypervolume")
    ax_hv.set_title("hypervolume over time", fontsize=10)
    fig.savefig(path, format="png")


def pareto_html(summary: ParetoSummary, data: ReportData) -> list[str]:
    """The section's paragraphs and the front's table."""
    out: list[str] = []
    ref = ", ".join(
        f"{m} {fmt_num(r)}" + (" (its threshold)" if t is not None else "")
        for m, r, t in zip(summary.measures, summary.reference, summary.thresholds, strict=True)
    )
    final = summary.hypervolume[-1][1] if summary.hypervolume else 0.0
    out.append(
        f'<img src="{PARETO}" alt="the objectives of every trusted result, the front, and the '
        'hypervolume per experiment">'
    )
    out.append(
        f"<p>{len(summary.front)} of {len(summary.results)} trusted results are on the Pareto "
        f"front (no other result is as good on every objective and better on one). "
        f"Hypervolume after {len(summary.hypervolume)} experiments: {esc(fmt_num(final))}, "
        f"from the reference point {esc(ref)}.</p>"
    )
    if summary.best_id is not None:
        values = dict(summary.results)[summary.best_id]
        shown = ", ".join(
            f"{m}={fmt_num(v)}" for m, v in zip(summary.measures, values, strict=True)
        )
        verdict = (
            "meets every threshold with the largest margin"
            if summary.best_meets
            else "misses the thresholds least (no result meets them all)"
        )
        out.append(f"<p>{esc(summary.best_id)} ({esc(shown)}) {verdict}.</p>")
    by_id = {e.id: e for e in data.experiments}
    rows = []
    for rid, vec in summary.results:
        if rid in summary.front:
            params = by_id[rid].params
            rows.append(
                (
                    rid,
                    *(fmt_num(v) for v in vec),
                    ", ".join(f"{k}={fmt_num(v)}" for k, v in params.items()),
                )
            )
    if rows:
        out.append(html_table(("experiment", *summary.measures, "parameters"), rows))
    return out
