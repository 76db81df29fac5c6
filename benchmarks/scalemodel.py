"""What the optimizer alone allows K stations: the colour match on the bench-time model.

:mod:`benchmarks.scale` measures a real campaign on a real cluster, one seed per station
count. Whether K stations *can* reach the target K times sooner is decided first by the
optimizer: with K proposals in flight it needs more experiments to the target than with
one. This runs :func:`benchmarks.campaign.simulate_campaign` (each experiment takes its
bench time on the colour model's physics, the stack costs nothing) for each station count
over several seeds, and prints the speed-up to the target vs one station and the
experiments ratio: the ceiling any stack reaches on this problem.

    python -m benchmarks.scale --model-seeds 20      # with the real runs' table
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from benchmarks import campaign

__all__ = ["ModelRow", "model_rows", "model_table"]


@dataclass(frozen=True)
class ModelRow:
    """One station count over the seeds: per seed, bench seconds and experiments to the
    target (None: not reached within the cap)."""

    stations: int
    time_s: tuple[float | None, ...]
    experiments: tuple[int | None, ...]


def model_rows(
    stations: Sequence[int], seeds: int, *, target: float, cap: int = 100
) -> list[ModelRow]:
    """The colour match (``target`` ΔE2000, at most ``cap`` experiments) with the bayes
    strategy for each station count on seeds ``0 .. seeds-1`` (each seed the same
    noise for every count)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    rows = []
    for k in stations:
        times: list[float | None] = []
        exps: list[int | None] = []
        for seed in range(seeds):
            problem = replace(campaign.make_problem("colour-match"), target=target)
            opt = campaign.make_strategy(problem, "bayes", seed)
            trace = campaign.simulate_campaign(
                opt, problem, stations=k, max_experiments=cap, seed=seed, strategy="bayes"
            )
            times.append(trace.time_to_target())
            exps.append(trace.experiments_to_target())
        rows.append(ModelRow(k, tuple(times), tuple(exps)))
    return rows


def _median(values: Sequence[float | None]) -> float:
    """Median with a miss counted as infinitely late."""
    return statistics.median(float("inf") if v is None else float(v) for v in values)


def model_table(rows: Sequence[ModelRow], *, target: float) -> str:
    """The rows as a table: speed-up to the target vs the first row's station count (the
    ratio of the medians, and the median of the per-seed ratios) and the experiments
    ratio (of the medians)."""
    if not rows:
        return ""
    base = rows[0]
    seeds = len(base.time_s)
    out = [
        f"What the optimizer allows (bench-time model, benchmarks/campaign.py: each experiment "
        f"its bench time on the colour physics, the stack free; colour match to ΔE {target:g}, "
        f"bayes, {seeds} seeds, medians; a miss counts as never):",
        "",
        f"| stations | bench s to target | speed-up vs {base.stations} | per-seed speed-up "
        f"| experiments | exps vs {base.stations} | reached |",
        "|---|---|---|---|---|---|---|",
    ]
    t0, e0 = _median(base.time_s), _median(base.experiments)
    for row in rows:
        t, e = _median(row.time_s), _median(row.experiments)
        per_seed = [
            a / b
            for a, b in zip(base.time_s, row.time_s, strict=True)
            if a is not None and b is not None and b > 0
        ]
        ps = f"{statistics.median(per_seed):.2f}x" if per_seed else "-"
        reached = sum(v is not None for v in row.time_s)
        speed = f"{t0 / t:.2f}x" if math.isfinite(t) and math.isfinite(t0) else "-"
        ratio = f"{e / e0:.2f}x" if math.isfinite(e) and math.isfinite(e0) else "-"
        out.append(
            f"| {row.stations} | {t:.0f} | {speed} | {ps} | {e:g} | {ratio} | {reached}/{seeds} |"
        )
    return "\n".join(out)
