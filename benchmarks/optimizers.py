"""labbridge's optimizer strategies side by side with other libraries' (issue 16).

Run:  python benchmarks/optimizers.py [--seeds 10] [--workers 2] [--out benchmarks/results]
      python benchmarks/optimizers.py --quick            # CI smoke run (< 60 s)
      python benchmarks/optimizers.py --problems hartmann6 --strategies bayes,optuna-gp
      python benchmarks/optimizers.py --rerun hartmann6:bayes:1:3   # one run, its trace

Strategies: ours (``bayes``: :class:`loops.optimizer.BayesOptimizer` as a
campaign builds it; ``random``: :class:`loops.optimizer.RandomSearch`) and the
peers of :mod:`benchmarks.peers` (``bayes-opt`` as its README shows,
``optuna-tpe``, ``optuna-gp``, and ``botorch``: labbridge's own optional
``strategy: botorch``, :mod:`loops.optbotorch`, compared under its library's name;
``pip install -e '.[peers]'``). A peer whose library is missing is skipped with the
reason printed. Ax is not run:
it drives the same BoTorch model and acquisition through its own service layer
at ~25-30 s per 30-evaluation run on this machine (and pulls in pandas,
plotly and IPython); ``botorch`` is its default generation strategy without that layer.

Problems (all minimised): ``branin``, ``hartmann6``, ``colour-match`` and
``buffer`` from :mod:`benchmarks.campaign` (their targets, known constraints
and experiment models), and ``hartmann6-constrained``: Hartmann-6 with a region
nobody declared where an experiment *fails* (status ``failed``, no value; a
heater trip): the half space ``sum(x) > 3`` and the ball of radius 0.3 around
Hartmann-6's second-best local minimum; its global minimum is feasible,
target -3.0 as for Hartmann-6.

Tables:

1. Experiments to target, one station: median [IQR], hit rate, and for our
   strategies the 95 % bootstrap interval of the median. Goals: level with or
   ahead of the best peer (the best peer's median is at or above the lower end
   of our interval), no heavy tail (upper quartile <= 1.5x the median).
2. K = 4 stations vs one (the test functions; every experiment takes one time
   unit, so the hit's finishing time is the rounds): experiments and rounds to
   target. Goal: experiments K=4 / K=1 <= 1.25 on Hartmann-6.
3. ``ask()`` time at 50/200/500/1000 observations (uniform points of
   Hartmann-6, each timed ask cancelled), p50 and p95. Goal: ours p95 < 0.25 s
   at 1000.

Reproducible: each run seeds every random source from its seed; BLAS, OpenMP
and torch use one thread per process (as in the workers), so a seed run twice
in the same environment gives the same trace (``--rerun`` prints one). The
results (``<out>/optimizers.json``, the tables in ``<out>/optimizers.txt``)
record the seeds, each run's trace digest, and the versions of every library
that shapes a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OpenMP/MKL threads for torch (peers): one per process, fixed before any import loads them
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Run as a script, this file's directory is sys.path[0]: benchmarks/safety.py would then
# shadow the safety package. Drop it and import the benchmark helpers from the repo root.
_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import campaign  # noqa: E402
from benchmarks.campaign import Progress, Trace, quantile  # noqa: E402
from benchmarks.optrun import (  # noqa: E402
    PROBLEMS,
    STRATEGIES,
    Run,
    TimingJob,
    effective,
    environment,
    fmt_median,
    fmt_num,
    make_problem,
    pool_map,
    run_one,
    run_timing,
    stats,
    trace_digest,
)
from benchmarks.peers import PEERS, missing_peers  # noqa: E402

__all__ = [
    "BATCH_GOAL",
    "Settings",
    "batch_section",
    "load_reused",
    "main",
    "parse_args",
    "suggest_section",
    "to_target_section",
]

#: strategies that know pending points (run with K stations too)
BATCH_STRATEGIES = ("bayes", "random", "optuna-tpe", "optuna-gp", "botorch")
BATCH_PROBLEMS = ("hartmann6", "branin")
SUGGEST_SIZES = (50, 200, 500, 1000)
TAIL_GOAL = 1.5  # upper quartile / median
BATCH_GOAL = 1.25  # experiments K=4 / K=1 on Hartmann-6
SUGGEST_GOAL_S = 0.25  # p95 at 1000 observations


# --------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    seeds: int = 10
    cap: int = 150
    stations: int = 4
    workers: int = 2
    problems: tuple[str, ...] = PROBLEMS
    strategies: tuple[str, ...] = STRATEGIES
    batch_problems: tuple[str, ...] = BATCH_PROBLEMS
    suggest_sizes: tuple[int, ...] = SUGGEST_SIZES
    suggest_repeats: int = 10
    suggest_budget_s: float = 60.0  # per strategy and size: fewer repeats past it (>= 3)
    out: Path = Path(_HERE) / "results"
    quick: bool = False
    reuse: tuple[Path, ...] = ()


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, str | None]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (10)")
    ap.add_argument("--cap", type=int, default=None, help="experiments cap per run (150)")
    ap.add_argument("--stations", type=int, default=4, help="K of the batch table (4)")
    ap.add_argument("--workers", type=int, default=2, help="processes (2; 1 runs in-process)")
    ap.add_argument(
        "--problems", default=None, help=f"comma-separated, of {','.join(PROBLEMS)} (none: no runs)"
    )
    ap.add_argument(
        "--strategies", default=None, help=f"comma-separated, of {','.join(STRATEGIES)}"
    )
    ap.add_argument(
        "--suggest-sizes",
        default=None,
        help="observation counts of the ask() timing (50,200,500,1000; none: no timing)",
    )
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 1 seed, 2 problems")
    ap.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="optimizers.json of an earlier run (same --seeds/--cap/--stations): its rows join "
        "the tables where this run has none (peers need not run again); repeatable",
    )
    ap.add_argument(
        "--rerun",
        default=None,
        metavar="PROBLEM:STRATEGY:K:SEED",
        help="run one campaign and print its trace and digest (reproducibility check)",
    )
    a = ap.parse_args(argv)

    def names(text: str | None, known: Sequence[str], what: str) -> tuple[str, ...] | None:
        if text is None:
            return None
        if text == "none" and what == "problems":
            return ()
        got = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in got if x not in known]
        if bad or not got:
            ap.error(f"--{what} {text!r}: unknown {bad or 'empty'} (known: {', '.join(known)})")
        return got

    problems = names(a.problems, PROBLEMS, "problems")
    strategies = names(a.strategies, STRATEGIES, "strategies")
    sizes: tuple[int, ...] | None = None
    if a.suggest_sizes == "none":
        sizes = ()
    elif a.suggest_sizes is not None:
        try:
            sizes = tuple(int(x) for x in a.suggest_sizes.split(",") if x.strip())
        except ValueError:
            ap.error(f"--suggest-sizes {a.suggest_sizes!r}: expected integers like 50,200")
        if not sizes or min(sizes) < 1:
            ap.error(f"--suggest-sizes {a.suggest_sizes!r}: expected integers >= 1")
    for name in ("seeds", "cap", "workers"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name} must be >= 1, got {v}")
    if a.stations < 2:
        ap.error(f"--stations must be >= 2 (compared with one), got {a.stations}")
    if a.quick:
        quick_strats = ("bayes", "random", "optuna-tpe")
        settings = Settings(
            seeds=a.seeds or 1,
            cap=a.cap or 60,
            stations=a.stations,
            workers=a.workers,
            problems=("branin", "hartmann6-constrained") if problems is None else problems,
            strategies=strategies or quick_strats,
            batch_problems=("branin",),
            suggest_sizes=(50, 200) if sizes is None else sizes,
            suggest_repeats=2,
            out=a.out or Path(tempfile.gettempdir()) / "labbridge-optimizers-quick",
            quick=True,
            reuse=tuple(a.reuse),
        )
    else:
        settings = Settings(
            seeds=a.seeds or 10,
            cap=a.cap or 150,
            stations=a.stations,
            workers=a.workers,
            problems=PROBLEMS if problems is None else problems,
            strategies=strategies or STRATEGIES,
            suggest_sizes=SUGGEST_SIZES if sizes is None else sizes,
            out=a.out or Path(_HERE) / "results",
            reuse=tuple(a.reuse),
        )
    if a.rerun is not None:
        parts = a.rerun.split(":")
        if (
            len(parts) != 4
            or parts[0] not in PROBLEMS
            or parts[1] not in STRATEGIES
            or not (parts[2].isdigit() and parts[3].isdigit())
        ):
            ap.error(
                f"--rerun {a.rerun!r}: expected PROBLEM:STRATEGY:K:SEED, e.g. branin:bayes:1:0"
            )
    return settings, a.rerun


# --------------------------------------------------------------------- sections
@dataclass
class Reused:
    """Rows of earlier results files (``--reuse``): peers need not run again when only our
    strategy changed. ``to_target[problem][strategy]``, ``batch[problem][strategy]``,
    ``suggest[strategy][n]``; ``sources``: what came from where."""

    to_target: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch: dict[str, dict[str, Any]] = field(default_factory=dict)
    suggest: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _revive(value: Any) -> Any:
    """A results file's values back to numbers ("inf" was written for infinity)."""
    if isinstance(value, dict):
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return math.inf if value == "inf" else value


def load_reused(paths: Sequence[Path], settings: Settings) -> Reused:
    """Rows of earlier ``optimizers.json`` files made with the same seeds, cap and K."""
    out = Reused()
    for path in paths:
        try:
            doc = _revive(json.loads(path.read_text()))
            got = doc["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(
                f"--reuse {path}: not an optimizers.json results file ({exc})"
            ) from None
        want = {"seeds": list(range(settings.seeds)), "cap": settings.cap}
        if got.get("problems"):
            want["stations"] = settings.stations
        diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        if diff:
            raise SystemExit(
                f"--reuse {path}: made with other settings (file, now): {diff}; rerun it with "
                "the same --seeds/--cap/--stations"
            )
        for problem, entry in doc.get("to_target", {}).items():
            out.to_target.setdefault(problem, {}).update(entry["strategies"])
        for problem, entry in doc.get("batch", {}).items():
            out.batch.setdefault(problem, {}).update(entry["strategies"])
        for strategy, rows in doc.get("suggest", {}).items():
            if strategy != "goal":
                out.suggest[strategy] = rows
        env = doc.get("environment", {})
        versions = env.get("versions", {})
        load = " ".join(f"{x:.1f}" for x in env.get("load_avg") or [])
        for line in got.get("reused", []):  # what that file merged itself (once)
            nested = f"  (earlier) {line.strip()}"
            if line.startswith("reused ") and nested not in out.sources:
                out.sources.append(nested)
        out.sources.append(
            f"reused {path} ({', '.join(got.get('strategies', []))}; "
            f"{', '.join(got.get('problems', [])) or 'timing only'}; "
            f"{doc.get('elapsed_s', 0):.0f} s, load average {load or '-'} at its end; "
            f"optuna {versions.get('optuna', '-')}, botorch {versions.get('botorch', '-')})"
        )
    return out


def _ordered(names: set[str]) -> list[str]:
    return [s for s in STRATEGIES if s in names]


def _runs(settings: Settings, strategies: Sequence[str]) -> list[Run]:
    out: list[Run] = []
    slow_first = sorted(settings.problems, key=lambda p: p not in ("hartmann6", "buffer"))
    for problem in slow_first:
        for strategy in strategies:
            for seed in range(settings.seeds):
                out.append(Run(problem, strategy, 1, seed, settings.cap))
                if problem in settings.batch_problems and strategy in BATCH_STRATEGIES:
                    out.append(Run(problem, strategy, settings.stations, seed, settings.cap))
    return out


def _goal_lines(
    problem: str, rows: Mapping[str, Mapping[str, Any]], strategies: Sequence[str]
) -> tuple[list[str], dict[str, Any]]:
    """Ours vs the best peer (by median) and the tail goal, as lines and data."""
    peers = {s: rows[s] for s in strategies if s in PEERS and s in rows}
    ours = rows.get("bayes")
    if ours is None:
        return [], {}
    best_name = min(peers, key=lambda s: effective(peers[s])) if peers else None
    goal: dict[str, Any] = {"best_peer": best_name}
    lines: list[str] = []
    if best_name is not None:
        ci = ours["ci95"]
        peer_med = effective(peers[best_name])
        level = ci is not None and peer_med >= ci[0]
        goal.update({"best_peer_median": peer_med, "level_or_ahead": level})
        lines.append(
            f"  goal ahead/level: best peer {best_name} median {fmt_median(peers[best_name])}, ours "
            f"{fmt_median(ours)} CI [{fmt_num(ci[0] if ci else None, ours['cap'])}, "
            f"{fmt_num(ci[1] if ci else None, ours['cap'])}] -> {'met' if level else 'NOT met'}"
        )
    med = effective(ours)
    tail = ours["q3"] / med if med and math.isfinite(med) else math.inf
    goal.update({"q3_over_median": tail, "no_heavy_tail": tail <= TAIL_GOAL})
    lines.append(
        f"  goal no heavy tail: ours q3/median {tail:.2f} (<= {TAIL_GOAL}) -> "
        f"{'met' if tail <= TAIL_GOAL else 'NOT met'}"
    )
    return lines, goal


def to_target_section(
    traces: Mapping[tuple[str, str, int], Sequence[Trace]],
    settings: Settings,
    strategies: Sequence[str],
    reused: Reused | None = None,
) -> tuple[list[str], dict[str, Any]]:
    old = reused.to_target if reused else {}
    lines = [
        f"1. Experiments to target, one station ({settings.seeds} seeds, cap {settings.cap}): "
        "median [q1, q3], hits, 95 % bootstrap interval of the median, ask() s per experiment"
    ]
    data: dict[str, Any] = {}
    for problem in [p for p in PROBLEMS if p in settings.problems or p in old]:
        pb = make_problem(problem)
        lines.append(f"{problem} (target {pb.target:g}, {len(pb.space)}-D):")
        lines.append(
            f"  {'strategy':<12} {'median [q1, q3]':>20} {'hits':>7} {'CI95':>14} {'ask s':>7}"
        )
        rows: dict[str, Any] = {}
        here = old.get(problem, {})
        for strategy in _ordered(set(strategies) | set(here)):
            runs = traces.get((problem, strategy, 1))
            if not runs and strategy not in here:
                continue
            s = stats(runs, settings.cap) if runs else here[strategy]
            rows[strategy] = s
            ci = s["ci95"]
            ci_text = f"[{fmt_num(ci[0], s['cap'])}, {fmt_num(ci[1], s['cap'])}]" if ci else "-"
            iqr = f"{fmt_median(s)} [{fmt_num(s['q1'], s['cap'])}, {fmt_num(s['q3'], s['cap'])}]"
            lines.append(
                f"  {strategy:<12} {iqr:>20} {s['hits']:>3}/{s['runs']:<3} {ci_text:>14} "
                f"{s['ask_s_per_experiment']:>7.3f}"
            )
        goal_lines, goal = _goal_lines(problem, rows, list(rows))
        lines += goal_lines
        data[problem] = {"target": pb.target, "strategies": rows, "goal": goal}
    return lines, data


def batch_section(
    traces: Mapping[tuple[str, str, int], Sequence[Trace]],
    settings: Settings,
    strategies: Sequence[str],
    reused: Reused | None = None,
) -> tuple[list[str], dict[str, Any]]:
    old = reused.batch if reused else {}
    k = settings.stations
    lines = [
        f"2. {k} stations vs 1 ({settings.seeds} seeds; one time unit per experiment, so rounds "
        "= the hit's finishing time): medians"
    ]
    data: dict[str, Any] = {}
    for problem in settings.batch_problems:
        if problem not in settings.problems and problem not in old:
            continue
        lines.append(f"{problem}:")
        lines.append(
            f"  {'strategy':<12} {'exp K=1':>8} {f'exp K={k}':>8} {'ratio':>6} "
            f"{'rounds K=1':>10} {f'rounds K={k}':>10}"
        )
        rows: dict[str, Any] = {}
        here = old.get(problem, {})
        for strategy in _ordered(set(strategies) | set(here)):
            one, many = traces.get((problem, strategy, 1)), traces.get((problem, strategy, k))
            if one and many:
                s1, sk = stats(one, settings.cap), stats(many, settings.cap)
            elif strategy in here:
                s1, sk = here[strategy]["one"], here[strategy]["many"]
            else:
                continue
            e1, ek = effective(s1), effective(sk)
            ratio = ek / e1 if math.isfinite(e1) and math.isfinite(ek) and e1 else None
            rows[strategy] = {"one": s1, "many": sk, "experiments_ratio": ratio}
            r1 = math.inf if s1["rounds_censored"] else s1["rounds_median"]
            rk = math.inf if sk["rounds_censored"] else sk["rounds_median"]
            lines.append(
                f"  {strategy:<12} {fmt_median(s1):>8} {fmt_median(sk):>8} "
                f"{'-' if ratio is None else f'{ratio:.2f}':>6} {fmt_num(r1, settings.cap):>10} "
                f"{fmt_num(rk, settings.cap):>10}"
            )
        ours = rows.get("bayes")
        goal: dict[str, Any] = {}
        if ours is not None and problem == "hartmann6":
            r = ours["experiments_ratio"]
            goal = {"experiments_ratio_max": BATCH_GOAL, "met": r is not None and r <= BATCH_GOAL}
            lines.append(
                f"  goal: ours experiments K={k}/K=1 {'-' if r is None else f'{r:.2f}'} "
                f"(<= {BATCH_GOAL}) -> {'met' if goal['met'] else 'NOT met'}"
            )
        data[problem] = {"strategies": rows, "goal": goal}
    return lines, data


def suggest_section(
    settings: Settings, strategies: Sequence[str], progress: Progress, reused: Reused | None = None
) -> tuple[list[str], dict[str, Any]]:
    old = reused.suggest if reused else {}
    timed = [s for s in strategies if s != "random"] if settings.suggest_sizes else []
    if not timed and not old:
        return [], {}
    jobs = [
        TimingJob(s, n, settings.suggest_repeats, settings.suggest_budget_s)
        for n in settings.suggest_sizes
        for s in timed
    ]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}

    def done(job: TimingJob, times: list[tuple[float, float]]) -> None:
        results[(job.strategy, job.n_obs)] = times
        progress.update(f"ask() timing {job.strategy} at {job.n_obs}: {len(times)} asks")

    # one process: timings from two workers on two busy cores would disturb each other less,
    # but one at a time is what a campaign does
    pool_map(run_timing, jobs, 1, done)
    sizes = settings.suggest_sizes or tuple(sorted({int(n) for rows in old.values() for n in rows}))
    lines = [
        "3. ask() seconds at N observations (Hartmann-6, 6-D, uniform points), CPU p50 / p95 "
        f"(one thread: the time on an idle core), then wall p95 (up to {settings.suggest_repeats} "
        "asks each):",
        f"  {'strategy':<12} " + " ".join(f"{f'N={n}':>20}" for n in sizes),
    ]
    data: dict[str, Any] = {}
    for s in _ordered(set(timed) | set(old)):
        cells = []
        for n in sizes:
            if (s, n) not in results:
                row = old.get(s, {}).get(str(n))
                if row is None:
                    cells.append("-")
                    continue
                data.setdefault(s, {})[str(n)] = row
                cells.append(f"{row['cpu_p50']:.3f}/{row['cpu_p95']:.3f} ({row['wall_p95']:.2f})")
                continue
            wall = [w for w, _ in results[(s, n)]]
            cpu = [c for _, c in results[(s, n)]]
            row = {
                "cpu_p50": quantile(cpu, 0.5),
                "cpu_p95": quantile(cpu, 0.95),
                "wall_p50": quantile(wall, 0.5),
                "wall_p95": quantile(wall, 0.95),
                "asks": len(wall),
            }
            data.setdefault(s, {})[str(n)] = row
            cells.append(f"{row['cpu_p50']:.3f}/{row['cpu_p95']:.3f} ({row['wall_p95']:.2f})")
        lines.append(f"  {s:<12} " + " ".join(f"{c:>20}" for c in cells))
    top = max(sizes)
    if "bayes" in data and str(top) in data["bayes"]:
        cpu95, wall95 = data["bayes"][str(top)]["cpu_p95"], data["bayes"][str(top)]["wall_p95"]
        met = top >= 1000 and cpu95 < SUGGEST_GOAL_S
        verdict = "met" if met else "NOT met" if top >= 1000 else "not measured at 1000"
        lines.append(
            f"  goal: ours p95 at {top} observations {cpu95:.3f} s CPU, {wall95:.3f} s wall "
            f"(< {SUGGEST_GOAL_S} s at 1000, on an idle core: CPU) -> {verdict}"
        )
        data["goal"] = {"p95_s_max": SUGGEST_GOAL_S, "met": met, "measured": "cpu"}
    return lines, data


# --------------------------------------------------------------------- main
def rerun(label: str) -> int:
    problem, strategy, k, seed = label.split(":")
    trace = run_one(Run(problem, strategy, int(k), int(seed), 150))
    print(json.dumps({"run": label, "values": trace.values, "digest": trace_digest(trace)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, one = parse_args(argv)
    if one is not None:
        return rerun(one)
    reused = load_reused(settings.reuse, settings)
    missing = missing_peers([s for s in settings.strategies if s in PEERS])
    strategies = [s for s in settings.strategies if s not in missing]
    progress = Progress()
    t0 = time.monotonic()
    traces: dict[tuple[str, str, int], list[Trace]] = {}
    runs = _runs(settings, strategies)
    count = 0

    def done(run: Run, trace: Trace) -> None:
        nonlocal count
        count += 1
        traces.setdefault((run.problem, run.strategy, run.stations), []).append(trace)
        n = trace.experiments_to_target()
        progress.update(f"runs {count}/{len(runs)}: {run.label()}: {n or f'> {run.cap}'}")

    try:
        pool_map(run_one, runs, settings.workers, done)
        for v in traces.values():
            v.sort(key=lambda t: t.seed)
        sec1, data1 = to_target_section(traces, settings, strategies, reused)
        sec2, data2 = batch_section(traces, settings, strategies, reused)
        sec3, data3 = suggest_section(settings, strategies, progress, reused)
    finally:
        progress.done()
    elapsed = time.monotonic() - t0
    env = environment()
    head = [
        f"benchmarks/optimizers.py{' --quick' if settings.quick else ''}: {settings.seeds} seed(s) "
        f"(0..{settings.seeds - 1}), {settings.workers} worker(s), {env['cpus']} cores, load "
        f"average {' '.join(f'{x:.1f}' for x in env['load_avg'] or [])} at the end, "
        f"{elapsed:.0f} s" + (" (this run only merges the files below)" if not runs else ""),
        "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
    ]
    head += reused.sources
    if reused.sources:
        head.append(
            "rows: this run's own where it ran them, else the last --reuse file (in the order "
            "given) that has them"
        )
    head += [f"skipped {name}: {why}" for name, why in missing.items()]
    head.append(
        "skipped ax: not run (same BoTorch model and acquisition as 'botorch' behind its service "
        "layer, ~25-30 s per 30-evaluation run here)"
    )
    text = "\n".join([*head, "", *sec1, "", *sec2, "", *sec3]) + "\n"
    print(text, end="")
    doc = {
        "benchmark": "optimizers",
        "quick": settings.quick,
        "settings": {
            "seeds": list(range(settings.seeds)),
            "cap": settings.cap,
            "stations": settings.stations,
            "problems": list(settings.problems),
            "strategies": strategies,
            "skipped": missing,
            "reused": reused.sources,
            "suggest_sizes": list(settings.suggest_sizes),
        },
        "environment": env,
        "elapsed_s": elapsed,
        "to_target": data1,
        "batch": data2,
        "suggest": data3,
    }
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "optimizers.json").write_text(
        json.dumps(campaign._jsonable(doc), indent=1, ensure_ascii=False) + "\n"
    )
    (settings.out / "optimizers.txt").write_text(text)
    print(f"\nwrote {settings.out / 'optimizers.json'} and optimizers.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
