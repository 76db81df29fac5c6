"""Learned feasibility, measured: proposals that land in an undeclared trouble region of
Hartmann-6, with the feasibility model (:mod:`loops.optfeasible`) and without it.

The problem (nothing of it is declared to the optimizer): Hartmann-6 on [0, 1]^6, minimised,
where

* ``x1 + x2 > 1.3`` is refused by the dry run's rule ``heater.max_power`` (told as
  ``infeasible`` with the rule's name), and
* a ball of radius 0.35 around Hartmann-6's second-best local minimum (value -3.20, so the
  model is drawn towards it) trips the station (told as ``failed``).

Each seed runs :class:`~loops.optbayes.BayesOptimizer` (the campaign's default settings:
12-point Latin hypercube, then EI) for ``--evals`` experiments, once with
``learn_feasibility`` on and once off (the old behaviour: penalised values and exclusion
zones only); the same seeds, the same initial design. Printed per arm: the proposals in
the trouble region (median, mean, total over seeds; the initial design's ones counted
apart, they are the same in both arms) and the best value reached::

    python benchmarks/feasibility.py --seeds 10 --evals 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.resultsfile import write_results  # noqa: E402
from loops.optbayes import BayesOptimizer  # noqa: E402
from loops.testfunctions import HARTMANN6  # noqa: E402

__all__ = ["INITIAL_POINTS", "RULE", "Run", "main", "run_seed", "trouble"]

RULE = "heater.max_power"
INITIAL_POINTS = 12
# Hartmann-6's second-best local minimum (-3.2032): the failing ball is centred on it
_LOCAL = np.array([0.40465, 0.88244, 0.84610, 0.57399, 0.13893, 0.03850])
_RADIUS = 0.35


def trouble(params: Mapping[str, Any]) -> str | None:
    """``"refused"`` (by :data:`RULE`), ``"failed"`` (a trip) or None (the experiment runs)."""
    u = np.array([float(params[k]) for k in HARTMANN6.space])
    if u[0] + u[1] > 1.3:
        return "refused"
    if float(np.linalg.norm(u - _LOCAL)) < _RADIUS:
        return "failed"
    return None


@dataclass(frozen=True)
class Run:
    seed: int
    learn: bool
    design_trouble: int  # in the initial design (the same for both arms)
    model_trouble: int  # in the model's proposals
    refused: int
    failed: int
    best: float
    seconds: float


def run_seed(seed: int, *, learn: bool, evals: int) -> Run:
    """One campaign of ``evals`` experiments on the problem (module docstring)."""
    opt = BayesOptimizer(HARTMANN6.space, seed=seed, initial_points=INITIAL_POINTS)
    opt.learn_feasibility = learn
    design = model = refused = failed = 0
    best = float("inf")
    t0 = time.perf_counter()
    for i in range(evals):
        p = opt.ask()
        what = trouble(p.params)
        if what is not None:
            if i < INITIAL_POINTS:
                design += 1
            else:
                model += 1
        if what == "refused":
            refused += 1
            opt.tell(p.id, None, status="infeasible", rules=[RULE])
        elif what == "failed":
            failed += 1
            opt.tell(p.id, None, status="failed")
        else:
            value = HARTMANN6(p.params)
            best = min(best, value)
            opt.tell(p.id, value)
    return Run(seed, learn, design, model, refused, failed, best, time.perf_counter() - t0)


def _summary(runs: Sequence[Run]) -> dict[str, Any]:
    trouble_n = [r.model_trouble for r in runs]
    gaps = [r.best - HARTMANN6.minimum for r in runs]
    return {
        "median_trouble": statistics.median(trouble_n),
        "mean_trouble": statistics.fmean(trouble_n),
        "total_trouble": sum(trouble_n),
        "refused": sum(r.refused for r in runs),
        "failed": sum(r.failed for r in runs),
        "median_gap": statistics.median(gaps),
        "seconds_per_run": statistics.fmean(r.seconds for r in runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="also write the runs as JSON here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.evals <= INITIAL_POINTS:
        ap.error(f"--seeds must be >= 1 and --evals > {INITIAL_POINTS} (the initial design)")
    runs = [
        run_seed(s, learn=learn, evals=args.evals)
        for learn in (True, False)
        for s in range(args.seeds)
    ]
    design = sum(r.design_trouble for r in runs if r.learn)
    print(
        f"Hartmann-6 with an undeclared trouble region: {args.seeds} seeds x {args.evals} "
        f"experiments ({INITIAL_POINTS} initial design, {design} of its points in trouble "
        "over the seeds, the same in both arms)"
    )
    print(
        f"{'feasibility model':<18} {'in trouble (median/mean/total)':>31} "
        f"{'refused':>8} {'failed':>7} {'best gap (median)':>18} {'s/run':>6}"
    )
    summary = {}
    for learn in (True, False):
        s = _summary([r for r in runs if r.learn == learn])
        summary["learned" if learn else "off"] = s
        print(
            f"{'learned' if learn else 'off':<18} "
            f"{s['median_trouble']:>12g} / {s['mean_trouble']:.1f} / {s['total_trouble']:<4d}"
            f"{'':>6}{s['refused']:>8d} {s['failed']:>7d} {s['median_gap']:>18.3f} "
            f"{s['seconds_per_run']:>6.1f}"
        )
    if args.out is not None:
        write_results(args.out, args, summary, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
