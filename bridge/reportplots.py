"""The PNG plots of a campaign report (matplotlib on the Agg canvas, no pyplot):
``convergence.png`` (:func:`plot_convergence`) and ``parameters.png``
(:func:`plot_parameters`); what they show: :mod:`bridge.report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge.export import CampaignDataError
from bridge.reportdata import (
    ReportData,
    ReportParam,
    best_result,
    fmt_num,
    is_trusted,
    proposer_kind,
)
from loops.journal import Experiment
from loops.optspace import choice_index

__all__ = ["MAX_SCATTER_PARAMETERS", "plot_convergence", "plot_parameters"]


#: parameters up to which the parameter plot is a scatter matrix (parallel coordinates above)
MAX_SCATTER_PARAMETERS = 6


def figure(width: float, height: float) -> Any:
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


def plot_convergence(data: ReportData, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = figure(9.0, 4.8)
    ax = fig.add_subplot()
    done = [e for e in data.experiments if e.state == "done" and e.objective is not None]
    for kind in ("optimizer", "agent", "operator"):
        marker = _MARKERS[kind]
        mine = [e for e in done if proposer_kind(e.proposer) == kind]
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
        top = best_result(data)
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
    external = [e for e in data.experiments if proposer_kind(e.proposer) != "optimizer"]
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


def _norm_axis(p: ReportParam, values: Sequence[float]) -> tuple[float, float]:
    if p.low is not None and p.high is not None and p.high > p.low:
        return p.low, p.high
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    return (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)


def _numeric(value: Any, choices: Sequence[Any] = ()) -> float:
    if choices:  # a categorical/ordinal parameter: at its choice's index
        i = choice_index(choices, value)
        return math.nan if i is None else float(i)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return math.nan


def plot_parameters(data: ReportData, path: Path) -> None:
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    params = data.params
    k = len(params)
    exps = data.experiments
    trusted = [e for e in exps if is_trusted(e)]
    values = [float(e.objective or 0.0) for e in trusted]  # is_trusted: never None
    cmap = "viridis_r" if data.minimize else "viridis"
    norm = Normalize(min(values), max(values)) if values else Normalize(0.0, 1.0)
    best = best_result(data)
    groups: list[tuple[list[Experiment], dict[str, Any], str]] = [
        (
            [e for e in exps if e.state == "done" and e.verified is False],
            {"marker": "o", "facecolors": "none", "edgecolors": "tab:orange", "linewidths": 1.4},
            "unverified",
        ),
        ([e for e in exps if e.state == "rejected"], {"marker": "x", "color": "0.35"}, "rejected"),
        ([e for e in exps if e.state == "failed"], {"marker": "v", "color": "tab:red"}, "failed"),
    ]

    choices = {p.name: p.choices for p in params}

    def col(es: Sequence[Experiment], name: str) -> list[float]:
        return [_numeric(e.params.get(name), choices.get(name, ())) for e in es]

    handles = [
        Line2D([], [], marker="o", ls="", color="tab:blue", label="result (colour: objective)"),
        Line2D([], [], marker="o", ls="", mfc="none", mec="tab:orange", label="unverified"),
        Line2D([], [], marker="x", ls="", color="0.35", label="rejected"),
        Line2D([], [], marker="v", ls="", color="tab:red", label="failed"),
        Line2D([], [], marker="*", ls="", ms=12, mfc="gold", mec="black", label="best"),
    ]
    if k <= MAX_SCATTER_PARAMETERS:
        size = 2.1
        fig = figure(size * k + 1.6, size * k + 0.9)
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

        fig = figure(max(9.0, 1.1 * k + 2), 5.5)
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
                f"{p.name}\n{fmt_num(lo)}..{fmt_num(hi)}"
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
