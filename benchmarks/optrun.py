"""What every optimizer benchmark run shares: the problems (``hartmann6-constrained`` and
:mod:`benchmarks.campaign`'s), our strategies and the peers by name, one seeded run on one
thread, the process pool, the statistics (censored medians, bootstrap intervals), the
``ask()`` timing, and the environment a results file records.

Used by benchmarks/optimizers.py (one objective) and benchmarks/optpareto.py (two).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmarks import campaign
from benchmarks.campaign import (
    Outcome,
    Problem,
    Trace,
    censored_median,
    quantile,
    simulate_campaign,
)
from benchmarks.peers import PEERS, peer_versions
from benchmarks.resultsfile import machine
from loops.optimizer import BayesOptimizer, Optimizer
from loops.testfunctions import HARTMANN6

__all__ = [
    "OURS",
    "PROBLEMS",
    "STRATEGIES",
    "Run",
    "TimingJob",
    "bootstrap_median",
    "effective",
    "environment",
    "fmt_median",
    "fmt_num",
    "h6_fails",
    "make_optimizer",
    "make_problem",
    "one_thread",
    "pool_map",
    "quantile_row",
    "run_one",
    "run_timing",
    "stats",
    "suggest_times",
    "timing_optimizer",
    "trace_digest",
]

PROBLEMS = ("branin", "hartmann6", "hartmann6-constrained", "colour-match", "buffer")
OURS = ("bayes", "random")
STRATEGIES = (*OURS, *PEERS)
# Hartmann-6's second-best local minimum (value -3.2032), inside the undeclared failing ball
_H6_LOCAL = np.array([0.40465, 0.88244, 0.84610, 0.57399, 0.13893, 0.03850])


def h6_fails(x: Sequence[float]) -> bool:
    """True where ``hartmann6-constrained``'s experiment fails (not told to the optimizer)."""
    u = np.asarray(x, dtype=np.float64)
    return bool(u.sum() > 3.0 or np.linalg.norm(u - _H6_LOCAL) < 0.3)


def _h6_constrained() -> Problem:
    fn = HARTMANN6

    def evaluate(params: Mapping[str, Any], noise_seed: int) -> Outcome:
        x = [float(params[k]) for k in fn.space]
        if h6_fails(x):
            return Outcome(None, 1.0, "failed")
        return Outcome(float(fn(params)), 1.0)

    return Problem(
        name="hartmann6-constrained",
        space=fn.space,
        target=campaign.TEST_FUNCTION_TARGETS["hartmann6"],
        evaluate=evaluate,
        minimum=fn.minimum,
        value_label="hartmann6 - minimum",
    )


def make_problem(name: str) -> Problem:
    """A problem of :data:`PROBLEMS` (built in each worker process)."""
    if name == "hartmann6-constrained":
        return _h6_constrained()
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r} (known: {', '.join(PROBLEMS)})")
    return campaign.make_problem(name)


def make_optimizer(problem: Problem, strategy: str, seed: int) -> Optimizer:
    """Our strategy as a campaign builds it, or a peer, for ``problem`` (minimising)."""
    if strategy in ("bayes", "random"):
        return campaign.make_strategy(problem, strategy, seed)
    if strategy in PEERS:
        return PEERS[strategy](problem.space, seed, problem.constraints)
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


# --------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One campaign: ``problem`` x ``strategy`` with ``stations`` in flight, capped at ``cap``."""

    problem: str
    strategy: str
    stations: int
    seed: int
    cap: int

    def label(self) -> str:
        return f"{self.problem}:{self.strategy}:{self.stations}:{self.seed}"


def trace_digest(trace: Trace) -> str:
    """Short hash of a trace's values and finishing times (equal traces, equal digests)."""
    text = json.dumps([trace.values, trace.finish_s, trace.started], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def one_thread() -> Any:
    """Limit BLAS/OpenMP pools to one thread (as in the workers) for the rest of the process."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def run_one(run: Run) -> Trace:
    """One campaign run, on one thread (the same trace whichever process runs it)."""
    one_thread()
    problem = make_problem(run.problem)
    opt = make_optimizer(problem, run.strategy, run.seed)
    return simulate_campaign(
        opt,
        problem,
        stations=run.stations,
        max_experiments=run.cap,
        seed=run.seed,
        strategy=run.strategy,
    )


def pool_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int,
    done: Callable[[Any, Any], None],
) -> None:
    """``fn`` over ``items`` in ``workers`` processes (in-process for 1); ``done(item, result)``."""
    if workers <= 1:
        for item in items:
            done(item, fn(item))
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=campaign._worker_init,
    ) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        for fut in concurrent.futures.as_completed(futures):
            done(futures[fut], fut.result())


# --------------------------------------------------------------------- statistics
def bootstrap_median(
    values: Sequence[float | None], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the median; censored runs (None) count as inf."""
    if not values:
        return None
    a = np.array([math.inf if v is None else float(v) for v in values])
    rng = np.random.default_rng(seed)
    meds = np.quantile(rng.choice(a, size=(resamples, len(a))), 0.5, axis=1, method="inverted_cdf")
    lo, hi = np.quantile(meds, [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


def stats(traces: Sequence[Trace], cap: int) -> dict[str, Any]:
    exps = [t.experiments_to_target() for t in traces]
    vals: list[float | None] = [None if e is None else float(e) for e in exps]
    med, cens = censored_median(vals)
    full = [math.inf if v is None else v for v in vals]
    rounds = [t.time_to_target() for t in traces]
    rmed, rcens = censored_median(rounds)
    return {
        "runs": len(traces),
        "hits": sum(e is not None for e in exps),
        "cap": cap,
        "median": med,
        "censored": cens,
        "q1": quantile(full, 0.25),
        "q3": quantile(full, 0.75),
        "ci95": bootstrap_median(vals),
        "rounds_median": rmed,
        "rounds_censored": rcens,
        "ask_s_per_experiment": statistics.median(t.ask_s / max(1, t.started) for t in traces),
        "per_seed": {str(t.seed): t.experiments_to_target() for t in traces},
        "digests": {str(t.seed): trace_digest(t) for t in traces},
    }


def fmt_num(x: float | None, cap: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return f">{cap}"
    return f"{x:g}"


def fmt_median(s: Mapping[str, Any]) -> str:
    return f">{s['cap']}" if s["censored"] else fmt_num(s["median"], s["cap"])


def effective(s: Mapping[str, Any]) -> float:
    """The median for comparisons: censored counts as infinite."""
    return math.inf if s["censored"] else float(s["median"])


def quantile_row(values: Sequence[float]) -> str:
    """``median [q1, q3]`` of finite values, 4 significant digits."""
    q1, med, q3 = (quantile(list(values), q) for q in (0.25, 0.5, 0.75))
    return f"{med:.4g} [{q1:.4g}, {q3:.4g}]"


def timing_optimizer(strategy: str, seed: int) -> Optimizer:
    """The strategy on Hartmann-6's space with no initial design (every ask is model-based)."""
    problem = replace(make_problem("hartmann6"), initial_points=0)
    if strategy == "bayes":
        return BayesOptimizer(problem.space, direction="minimize", seed=seed, initial_points=0)
    return make_optimizer(problem, strategy, seed)


def suggest_times(
    strategy: str, n_obs: int, *, repeats: int, budget_s: float, seed: int = 0
) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``repeats`` timed ``ask()`` (each cancelled) after ``n_obs``
    told results.

    Uniform points of Hartmann-6, told as points the strategy did not ask
    for. One thread, so the CPU seconds are what the ask costs on an idle
    core whatever else the machine runs; the wall seconds include waiting
    for a core. Stops early (after at least 3) once ``budget_s`` of wall time
    is spent.
    """
    one_thread()
    opt = timing_optimizer(strategy, seed)
    rng = np.random.default_rng(seed)
    names = list(HARTMANN6.space)
    for u in rng.uniform(size=(n_obs, len(names))):
        params = dict(zip(names, map(float, u), strict=True))
        opt.tell(params, HARTMANN6(params))
    times: list[tuple[float, float]] = []
    spent = 0.0
    for i in range(repeats):
        if i >= 3 and spent > budget_s:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        p = opt.ask()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        opt.cancel(p.id)
        times.append((dt, dc))
        spent += dt
    return times


@dataclass(frozen=True)
class TimingJob:
    strategy: str
    n_obs: int
    repeats: int
    budget_s: float


def run_timing(job: TimingJob) -> list[tuple[float, float]]:
    return suggest_times(job.strategy, job.n_obs, repeats=job.repeats, budget_s=job.budget_s)


def environment() -> dict[str, Any]:
    try:
        from threadpoolctl import threadpool_info

        blas = [
            {k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for i in threadpool_info()
        ]
    except ImportError:
        blas = []
    return {
        **machine(),
        "versions": peer_versions(),
        "blas": blas,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE")},
    }
