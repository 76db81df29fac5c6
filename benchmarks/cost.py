"""Cost-aware asks, measured: bench minutes to a target with the acquisition weighed by cost
(program.md ``cost: duration``, :mod:`loops.optcost`) and without.

Two toy problems on [0, 1]^2, minimised, where one experiment's plan takes
``1 + 16 x`` bench minutes (a 1-minute recipe to a 17-minute one, as a hold time would):

* ``two-basins``: two equally deep Gaussian wells, one at the cheap end (x = 0.15, y = 0.7)
  and one at the dear end (x = 0.85, y = 0.3): the target is reachable either way;
* ``dear-optimum``: one well, at x = 0.8, y = 0.4: only dear experiments reach the target
  (what cost-awareness costs when the cheap region holds nothing).

Each well is ``-exp(-d^2 / 0.05)``; the target is -0.9 (within 0.072 of a well's centre).
Each seed runs :class:`~loops.optbayes.BayesOptimizer` as a campaign builds it (4-point Latin
hypercube, then EI) until the target or ``--evals`` experiments, once with a
:class:`~loops.optcost.CostModel` of the duration (its design costed exactly, as the plan
would be) and once without; the same seeds. Printed per problem and arm: bench minutes and
experiments to the target (median and IQR over the seeds that reached it; a run that did
not counts its whole budget) and the hit rate::

    python benchmarks/cost.py --seeds 12 --evals 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.resultsfile import write_results  # noqa: E402
from loops.optbayes import BayesOptimizer  # noqa: E402
from loops.optcost import CostModel, CostSpec  # noqa: E402
from loops.optspace import ParamSpace  # noqa: E402

__all__ = ["INITIAL_POINTS", "PROBLEMS", "TARGET", "Run", "main", "minutes", "run_seed"]

INITIAL_POINTS = 4
TARGET = -0.9
SPACE = ParamSpace.of({"x": (0.0, 1.0), "y": (0.0, 1.0)})


def minutes(params: Mapping[str, Any]) -> float:
    """One experiment's bench minutes: 1 at x = 0, 17 at x = 1."""
    return 1.0 + 16.0 * float(params["x"])


def _wells(*centres: tuple[float, float]) -> Callable[[Mapping[str, Any]], float]:
    def f(params: Mapping[str, Any]) -> float:
        x, y = float(params["x"]), float(params["y"])
        return -max(float(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.05)) for cx, cy in centres)

    return f


PROBLEMS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "two-basins": _wells((0.15, 0.7), (0.85, 0.3)),
    "dear-optimum": _wells((0.8, 0.4)),
}


@dataclass(frozen=True)
class Run:
    problem: str
    seed: int
    cost_aware: bool
    hit: bool
    experiments: int  # to the target (the budget when it was not reached)
    minutes: float  # bench minutes spent by then
    seconds: float


def run_seed(problem: str, seed: int, *, cost_aware: bool, evals: int) -> Run:
    """One campaign on ``problem`` until the target or ``evals`` experiments."""
    f = PROBLEMS[problem]
    opt = BayesOptimizer(SPACE, seed=seed, initial_points=INITIAL_POINTS)
    if cost_aware:
        opt.cost_model = CostModel(SPACE, minutes, CostSpec("duration"), seed=seed)
    spent, hit, n = 0.0, False, 0
    t0 = time.perf_counter()
    while n < evals and not hit:
        p = opt.ask()
        n += 1
        spent += minutes(p.params)
        value = f(p.params)
        hit = value <= TARGET
        opt.tell(p.id, value)
    return Run(problem, seed, cost_aware, hit, n, round(spent, 3), time.perf_counter() - t0)


def _summary(runs: Sequence[Run]) -> dict[str, Any]:
    def q(values: list[float]) -> list[float]:
        a = np.percentile(values, [25, 50, 75])
        return [round(float(v), 1) for v in a]

    return {
        "hit_rate": f"{sum(r.hit for r in runs)}/{len(runs)}",
        "minutes_q25_median_q75": q([r.minutes for r in runs]),
        "experiments_q25_median_q75": q([float(r.experiments) for r in runs]),
        "total_minutes": round(sum(r.minutes for r in runs), 1),
        "seconds_per_run": round(statistics.fmean(r.seconds for r in runs), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--problem", choices=sorted(PROBLEMS), action="append")
    ap.add_argument("--out", type=Path, default=None, help="also write the runs as JSON here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.evals <= INITIAL_POINTS:
        ap.error(f"--seeds must be >= 1 and --evals > {INITIAL_POINTS} (the initial design)")
    problems = args.problem or list(PROBLEMS)
    runs = [
        run_seed(problem, s, cost_aware=aware, evals=args.evals)
        for problem in problems
        for aware in (True, False)
        for s in range(args.seeds)
    ]
    print(
        f"bench minutes to the target ({TARGET}): {args.seeds} seeds x at most {args.evals} "
        f"experiments, 1 + 16 x minutes each; median [IQR] (a miss counts its whole budget)"
    )
    print(f"{'problem':<14} {'cost:':<9} {'hits':>6} {'bench minutes':>22} {'experiments':>20}")
    summary: dict[str, dict[str, Any]] = {}
    for problem in problems:
        for aware in (True, False):
            s = _summary([r for r in runs if r.problem == problem and r.cost_aware == aware])
            summary.setdefault(problem, {})["duration" if aware else "off"] = s
            m, e = s["minutes_q25_median_q75"], s["experiments_q25_median_q75"]
            print(
                f"{problem:<14} {'duration' if aware else 'off':<9} {s['hit_rate']:>6} "
                f"{m[1]:>8.1f} [{m[0]:.1f}, {m[2]:.1f}]{'':>2} {e[1]:>6.1f} [{e[0]:.1f}, {e[2]:.1f}]"
            )
    if args.out is not None:
        write_results(args.out, args, summary, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
