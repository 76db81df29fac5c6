"""Closed-loop campaigns, optimizer level: experiments and bench time to target (issue 4).

Run:  python benchmarks/campaign.py [--seeds 10] [--workers 2] [--out benchmarks/results]
      python benchmarks/campaign.py --quick          # CI smoke run (< 60 s)
      python benchmarks/campaign.py --check-stack    # also run a few points through the stack
      python benchmarks/campaign.py --problems buffer   # some problems only

Problems (all minimised):

* ``colour-match``: ``examples/color-match/program.md`` (5 parameters, the
  program's constraints ``0.6 <= red + green + blue <= 2.6 mL`` given to the
  strategies as ``constraints=``, target ΔE00 <= the program's ``stop.target``,
  2.0). One experiment is the program's recipe executed on the simulator's
  physics (:mod:`benchmarks.colour_model`: a fresh ``StationWorld`` on a manual
  clock, no wire), giving ΔE00 and the experiment's bench time (dispense, ramp
  from 25 °C at 10 °C/min, hold, measure, drain, cool-down for the next one).
  Checked against the whole simulated stack at the point ``target_lab`` was
  measured at (printed as "reference point"; ``--check-stack`` compares more
  points through the real drivers and simulators).
* ``buffer``: ``examples/buffer/program.md`` (``acid_ml``, ``base_ml``; the
  constraint ``acid_ml + base_ml <= 60 mL``; target |pH - 7.40| <= 0.02, its
  ``stop.target``). One experiment is the program's recipe executed on the
  buffer simulator's chemistry (:mod:`benchmarks.buffer_model`: a fresh
  ``BufferWorld``, the pH read through the transmitter's driver and its
  simulated calibration, set up once per campaign by ``examples/buffer/setup.yaml``),
  verified by the program's checks (an unverified result is told ``untrusted``
  and does not count as reaching the target, as in a campaign). Printed as
  "reference point": the model at Sørensen's table point for pH 7.4.
* ``branin`` (2-D) and ``hartmann6`` (6-D) from :mod:`loops.testfunctions`,
  to ``f <= 0.5`` (the minimum is 0.3979) and ``f <= -3.0`` (90 % of the
  minimum -3.3224). Every evaluation counts one time unit.

Sections:

1. Acceleration factor: experiments to target, ours (``BayesOptimizer`` with
   the default settings a campaign uses, ``initial_points`` from the program: 8
   for colour-match, 6 for buffer; BayesOptimizer's default ``max(5, d + 2)`` for the test
   functions) versus
   ``RandomSearch``, one station, ``--seeds`` seeds each. Ours is capped at
   ``--cap`` experiments, random search at ``--random-cap``; a run that did not
   reach the target is censored and counted as such (a median over runs that
   more than half censor is shown as "> cap"). Random search draws independent
   uniform feasible points, so its experiments to target are geometric with
   the hit rate ``p`` of one draw: ``p`` is also estimated from a large uniform
   sample (``--mc``), which gives random search's median ``ln 2 / -ln(1 - p)``
   without censoring. AF = random median / ours median (literature median: 6).
2. K stations (colour-match): a discrete-event simulation of ``--stations``
   stations versus one: each experiment occupies its station for its bench
   time; when one finishes, its result is told and the freed station gets the
   next ``ask()`` while the others' points stay pending (as
   :func:`loops.testfunctions.run_values` with ``batch=K``, but with each
   experiment's own duration). Wall-clock to target is the bench time when the
   first result within target finishes; experiments are the results told up
   to then (in-flight ones are reported too). Goal: >= 3x faster with <= 1.3x
   the experiments.
3. ``suggest`` time at 50, 200 and 500 observations, ours
   (:func:`loops.optimizer.time_suggest`) next to the package's own
   ``BayesianOptimization.suggest()`` on the same data, in the same run.

Writes ``<out>/campaign.json`` (summary numbers) and
``<out>/campaign_convergence.png`` (best so far versus experiments, median
and inter-quartile band over seeds, ours vs random, one panel per problem;
and colour-match best so far versus bench hours, K stations vs one). With
``--problems`` naming some problems only, the files are
``campaign-<problems>.json`` and ``campaign-<problems>_convergence.png``, and
the colour-only parts (K stations, the real stack) run only with colour-match.

More sections (a real-Ray campaign on the simulated bench) plug in as
functions in :data:`SECTIONS`: ``(Settings, Progress) -> SectionReport``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import heapq
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TextIO

# Run as a script, this file's directory is sys.path[0]: benchmarks/safety.py would then
# shadow the safety package. Drop it and import the benchmark helpers from the repo root.
_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from benchmarks.buffer_model import SORENSEN_POINT, BufferObjective  # noqa: E402
from benchmarks.colour_model import REFERENCE_POINT, ColourMatchObjective  # noqa: E402
from loops.optbayes import default_initial_points  # noqa: E402
from loops.optimizer import (  # noqa: E402
    BayesOptimizer,
    Constraint,
    Exhausted,
    Optimizer,
    RandomSearch,
    SpaceSpec,
    time_suggest,
)
from loops.testfunctions import BRANIN, HARTMANN6, TestFunction  # noqa: E402

__all__ = [
    "LITERATURE_AF",
    "SECTIONS",
    "Outcome",
    "Problem",
    "Progress",
    "SectionReport",
    "Settings",
    "Summary",
    "Trace",
    "geometric_median",
    "main",
    "make_problem",
    "make_strategy",
    "run_task",
    "simulate_campaign",
    "summarise",
]

LITERATURE_AF = 6.0  # median acceleration factor reported for self-driving labs
STATION_SPEEDUP_GOAL = 3.0
STATION_EXPERIMENTS_GOAL = 1.3
PROBLEMS = ("colour-match", "buffer", "branin", "hartmann6")
TEST_FUNCTION_TARGETS = {"branin": 0.5, "hartmann6": -3.0}
INITIAL_POINTS = 8  # the colour-match program's; the test functions: BayesOptimizer's default
SUGGEST_SIZES = (50, 200, 500)
StrategyName = Literal["bayes", "random"]


# --------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Outcome:
    """One experiment: ``value``, its bench ``duration_s``; ``status`` ok, failed (no
    value) or untrusted (a value its checks did not verify: told, never counted as a hit)."""

    value: float | None
    duration_s: float
    status: Literal["ok", "failed", "untrusted"] = "ok"


@dataclass(frozen=True)
class Problem:
    """A campaign to benchmark: space, known constraints, target, and how to run one experiment.

    ``evaluate(params, noise_seed)``; ``minimum``: the known optimum (plots
    show the regret ``best - minimum``), None when unknown (colour-match: ΔE00
    itself). ``time_unit``: what ``Outcome.duration_s`` counts.
    """

    name: str
    space: SpaceSpec
    target: float
    evaluate: Callable[[Mapping[str, Any], int], Outcome]
    constraints: Constraint | None = None
    minimum: float | None = None
    initial_points: int = INITIAL_POINTS
    value_label: str = "value"
    time_unit: str = "evaluation"


def _function_problem(fn: TestFunction, target: float) -> Problem:
    def evaluate(params: Mapping[str, Any], noise_seed: int) -> Outcome:
        return Outcome(float(fn(params)), 1.0)

    return Problem(
        name=fn.name,
        space=fn.space,
        target=target,
        evaluate=evaluate,
        minimum=fn.minimum,
        initial_points=default_initial_points(len(fn.space)),
        value_label=f"{fn.name} - minimum",
    )


def _colour_problem() -> Problem:
    objective = ColourMatchObjective()

    def evaluate(params: Mapping[str, Any], noise_seed: int) -> Outcome:
        r = objective(params, seed=noise_seed)
        return Outcome(r.delta_e, r.duration_s, r.status)

    return Problem(
        name="colour-match",
        space=objective.space,
        target=objective.target,
        evaluate=evaluate,
        constraints=objective.feasible,
        initial_points=objective.program.initial_points,
        value_label="ΔE00 to target",
        time_unit="bench second",
    )


def _buffer_problem() -> Problem:
    objective = BufferObjective()  # runs the set-up: once per campaign (one per task)

    def evaluate(params: Mapping[str, Any], noise_seed: int) -> Outcome:
        r = objective(params, seed=noise_seed)
        return Outcome(r.ph_error, r.duration_s, r.status)

    return Problem(
        name="buffer",
        space=objective.space,
        target=objective.target,
        evaluate=evaluate,
        constraints=objective.feasible,
        initial_points=objective.program.initial_points,
        value_label="|pH - target|",
        time_unit="bench second",
    )


def make_problem(name: str) -> Problem:
    """``colour-match``, ``buffer``, ``branin`` or ``hartmann6`` (built in each worker
    process)."""
    if name == "colour-match":
        return _colour_problem()
    if name == "buffer":
        return _buffer_problem()
    if name == "branin":
        return _function_problem(BRANIN, TEST_FUNCTION_TARGETS["branin"])
    if name == "hartmann6":
        return _function_problem(HARTMANN6, TEST_FUNCTION_TARGETS["hartmann6"])
    raise ValueError(f"unknown problem {name!r} (known: {', '.join(PROBLEMS)})")


def make_strategy(problem: Problem, strategy: StrategyName, seed: int) -> Optimizer:
    """Our optimizer as a campaign builds it, or the random-search baseline."""
    if strategy == "bayes":
        return BayesOptimizer(
            problem.space,
            direction="minimize",
            seed=seed,
            initial_points=problem.initial_points,
            constraints=problem.constraints,
        )
    if strategy == "random":
        return RandomSearch(
            problem.space, seed, direction="minimize", constraints=problem.constraints
        )
    raise ValueError(f"unknown strategy {strategy!r} (known: bayes, random)")


# --------------------------------------------------------------------- simulation
@dataclass
class Trace:
    """One campaign run: results in the order they finished.

    ``finish_s``: bench time at which each result came in; ``values``: None for
    a failed experiment; ``started``: experiments started (told + in flight
    when the run stopped); ``ask_s``: seconds spent in ``ask()``.
    """

    problem: str
    strategy: str
    stations: int
    seed: int
    target: float
    finish_s: list[float] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    started: int = 0
    ask_s: float = 0.0
    exhausted: bool = False

    def hit_index(self) -> int | None:
        """0-based index of the first result within target, or None."""
        for i, v in enumerate(self.values):
            if v is not None and v <= self.target:
                return i
        return None

    def experiments_to_target(self) -> int | None:
        i = self.hit_index()
        return None if i is None else i + 1

    def time_to_target(self) -> float | None:
        i = self.hit_index()
        return None if i is None else self.finish_s[i]

    def best_so_far(self) -> list[float]:
        """Best value after each result (inf before the first successful one)."""
        out: list[float] = []
        best = math.inf
        for v in self.values:
            if v is not None and v < best:
                best = v
            out.append(best)
        return out


def simulate_campaign(
    optimizer: Optimizer,
    problem: Problem,
    *,
    stations: int,
    max_experiments: int,
    seed: int,
    strategy: str = "",
) -> Trace:
    """Discrete-event run of a campaign with ``stations`` stations until the target is reached.

    Every free station gets the next ``ask()``; the experiment occupies it for
    its ``duration_s``; the earliest-finishing experiment is told next (ties:
    first started first), and its station asks again while the others stay
    pending. Stops at the first result within target, after
    ``max_experiments`` results, or when the strategy is exhausted. An
    experiment's noise seed depends on ``seed`` and its start index only.
    """
    if stations < 1:
        raise ValueError(f"stations must be >= 1, got {stations}")
    if max_experiments < 1:
        raise ValueError(f"max_experiments must be >= 1, got {max_experiments}")
    trace = Trace(problem.name, strategy, stations, seed, problem.target)
    running: list[tuple[float, int, str, Outcome]] = []
    now = 0.0
    while True:
        while (
            not trace.exhausted
            and len(running) < stations
            and len(trace.values) + len(running) < max_experiments
        ):
            t0 = time.perf_counter()
            try:
                proposal = optimizer.ask()
            except Exhausted:
                trace.exhausted = True
                break
            finally:
                trace.ask_s += time.perf_counter() - t0
            outcome = problem.evaluate(proposal.params, seed * 1_000_003 + trace.started)
            if not outcome.duration_s >= 0:
                raise ValueError(f"{problem.name}: negative duration {outcome.duration_s!r}")
            heapq.heappush(running, (now + outcome.duration_s, trace.started, proposal.id, outcome))
            trace.started += 1
        if not running:
            return trace
        now, _, pid, outcome = heapq.heappop(running)
        optimizer.tell(pid, outcome.value, status=outcome.status)
        trace.finish_s.append(now)
        trace.values.append(outcome.value if outcome.status == "ok" else None)
        value = trace.values[-1]
        if value is not None and value <= problem.target:
            return trace
        if len(trace.values) >= max_experiments:
            return trace


@dataclass(frozen=True)
class Task:
    problem: str
    strategy: StrategyName
    stations: int
    seed: int
    cap: int


def run_task(task: Task) -> Trace:
    """One run (in a worker process: BLAS limited to one thread, 2 workers on 2 cores)."""
    problem = make_problem(task.problem)
    opt = make_strategy(problem, task.strategy, task.seed)
    return simulate_campaign(
        opt,
        problem,
        stations=task.stations,
        max_experiments=task.cap,
        seed=task.seed,
        strategy=task.strategy,
    )


def _worker_init() -> None:
    if sys.platform.startswith("linux"):  # a worker dies with the benchmark (SIGTERM'd, killed)
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the benchmark died before that took hold
            os._exit(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # scikit-learn depends on it; without it BLAS keeps its default
        pass


# --------------------------------------------------------------------- statistics
def quantile(values: Sequence[float], q: float) -> float:
    """Empirical quantile (an observed value: inverse CDF, no interpolation, so a censored
    run's ``inf`` is never mixed into a finite value); nan for no values."""
    if not values:
        return math.nan
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="inverted_cdf"))


def censored_median(values: Sequence[float | None]) -> tuple[float, bool]:
    """Median with censored runs (None) counted as larger than every hit.

    Returns (median, censored): ``censored`` is True when the median falls on
    censored runs, and the value is then nan (only "> cap" is known).
    """
    n = len(values)
    if n == 0:
        return math.nan, False
    hits = sorted(v for v in values if v is not None)
    ordered: list[float] = [*hits, *([math.inf] * (n - len(hits)))]
    mid = statistics.median(ordered)
    return (math.nan, True) if math.isinf(mid) else (float(mid), False)


def geometric_median(p: float) -> float:
    """Median draws until the first hit, each draw hitting with probability ``p``."""
    if not 0 < p <= 1:
        return math.inf
    if p == 1:
        return 1.0
    return float(math.ceil(math.log(0.5) / math.log1p(-p)))


def bootstrap_ratio(
    numerator: Sequence[float | None],
    denominator: Sequence[float | None],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of median(numerator) / median(denominator).

    The two samples are resampled independently (different runs); censored
    runs (None) count as infinite, and a resample whose median is infinite
    gives an infinite (numerator) or zero (denominator) ratio. None if a
    sample is empty.
    """
    if not numerator or not denominator:
        return None
    rng = np.random.default_rng(seed)
    a = np.array([math.inf if v is None else float(v) for v in numerator])
    b = np.array([math.inf if v is None else float(v) for v in denominator])
    ma = np.median(rng.choice(a, size=(resamples, len(a))), axis=1)
    mb = np.median(rng.choice(b, size=(resamples, len(b))), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = ma / mb
    r = np.where(np.isnan(r), math.inf, r)  # inf / inf: the numerator side is censored
    lo, hi = np.quantile(r, [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


def _exps(traces: Sequence[Trace]) -> list[float | None]:
    return [None if (n := t.experiments_to_target()) is None else float(n) for t in traces]


def _med_iqr(s: Mapping[str, Any]) -> str:
    """``median [q1-q3]`` of a :class:`Summary` dict, censored values as ``>cap``."""

    def one(v: float) -> str:
        return f">{s['cap']}" if math.isinf(v) else _fmt(v, "g")

    med = f"> {s['cap']}" if s["censored"] else _fmt(s["median"], "g")
    return f"{med} [{one(s['q1'])}, {one(s['q3'])}]"


def _ci_text(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "[-]"
    return f"[{_fmt(ci[0], '.2f')}, {_fmt(ci[1], '.2f')}]"


@dataclass
class Summary:
    """Experiments (and bench time) to target over the runs of one configuration."""

    runs: int
    hits: int
    cap: int
    median: float  # experiments; nan when censored
    censored: bool
    q1: float
    q3: float
    per_seed: list[int | None]
    time_median: float | None = None  # bench seconds (over hits; None if not a timed problem)
    time_censored: bool = False
    started_median: float | None = None
    ask_s_median: float = 0.0

    def text(self) -> str:
        if self.censored:
            return f"> {self.cap}"
        return f"{self.median:g}"


def summarise(traces: Sequence[Trace], cap: int) -> Summary:
    """Censoring-aware summary of runs of one configuration."""
    exps = [t.experiments_to_target() for t in traces]
    med, cens = censored_median([float(e) if e is not None else None for e in exps])
    full = [float(e) if e is not None else math.inf for e in exps]
    q1, q3 = quantile(full, 0.25), quantile(full, 0.75)
    times = [t.time_to_target() for t in traces]
    tmed, tcens = censored_median(times)
    return Summary(
        runs=len(traces),
        hits=sum(e is not None for e in exps),
        cap=cap,
        median=med,
        censored=cens,
        q1=q1,
        q3=q3,
        per_seed=exps,
        time_median=tmed,
        time_censored=tcens,
        started_median=statistics.median(t.started for t in traces) if traces else None,
        ask_s_median=statistics.median(t.ask_s for t in traces) if traces else 0.0,
    )


def count_hits(problem: Problem, samples: int, seed: int) -> int:
    """Hits among ``samples`` uniform feasible draws: random search's per-draw hit rate.

    Draws through :class:`RandomSearch` itself (same constraints), evaluated
    without a model; failed experiments count as misses.
    """
    rs = RandomSearch(problem.space, seed, constraints=problem.constraints)
    hits = 0
    for i in range(samples):
        p = rs.ask()
        out = problem.evaluate(p.params, seed * 1_000_003 + i)
        rs.cancel(p.id)  # keep the optimizer's lists empty: only the draws matter
        if out.status == "ok" and out.value is not None and out.value <= problem.target:
            hits += 1
    return hits


@dataclass(frozen=True)
class HitTask:
    """``samples`` uniform draws of ``problem`` with ``seed`` (one chunk of the hit-rate sample)."""

    problem: str
    seed: int
    samples: int


def run_hit_task(task: HitTask) -> int:
    return count_hits(make_problem(task.problem), task.samples, task.seed)


# --------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """What a run of the benchmark does (from the command line)."""

    seeds: int = 30
    random_seeds: int = 100
    cap: int = 200
    random_cap: int = 500
    stations: int = 4
    workers: int = 2
    mc: Mapping[str, int] = field(
        default_factory=lambda: {
            "colour-match": 20_000,
            "buffer": 2000,
            "branin": 200_000,
            "hartmann6": 1_000_000,
        }
    )
    suggest_sizes: tuple[int, ...] = SUGGEST_SIZES
    suggest_repeats: int = 5
    suggest_dims: int = 3
    reference_seeds: int = 10
    stack_seeds: int = 3
    stack_speed: float = 100.0
    check_stack: bool = False
    out: Path = Path(_HERE) / "results"
    quick: bool = False
    problems: tuple[str, ...] = PROBLEMS

    @property
    def stem(self) -> str:
        """The result files' stem: ``campaign``, or ``campaign-<problems>`` for some only."""
        if set(self.problems) == set(PROBLEMS):
            return "campaign"
        return "campaign-" + "+".join(p for p in PROBLEMS if p in self.problems)


class Progress:
    """One self-rewriting progress line on stderr; when the stream is not a terminal (a CI
    log), plain lines, at most one every ``every_s`` seconds."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self._last = -math.inf
        self._dirty = False

    def update(self, text: str) -> None:
        now = time.monotonic()
        line = f"[campaign {now - self.t0:6.1f}s] {text}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self._dirty = True
        elif now - self._last >= self.every_s:
            self.stream.write(line + "\n")
            self._last = now
        else:
            return
        self.stream.flush()

    def done(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False


@dataclass
class SectionReport:
    """A section's printed table lines and its JSON data (``campaign.json[name]``)."""

    name: str
    lines: list[str]
    data: dict[str, Any]


# --------------------------------------------------------------------- sections
def _run_tasks(
    tasks: Sequence[Task | HitTask], workers: int, progress: Progress
) -> tuple[dict[tuple[str, str, int], list[Trace]], dict[str, tuple[int, int]]]:
    """Run every task (in ``workers`` processes); returns the traces by (problem, strategy,
    stations) sorted by seed, and (hits, draws) of the hit-rate samples by problem."""
    traces: dict[tuple[str, str, int], list[Trace]] = {}
    hits: dict[str, tuple[int, int]] = {}
    done = 0

    def record(task: Task | HitTask, result: Trace | int) -> None:
        nonlocal done
        done += 1
        if isinstance(task, HitTask):
            assert isinstance(result, int)
            h, n = hits.get(task.problem, (0, 0))
            hits[task.problem] = (h + result, n + task.samples)
            what = f"{task.problem}: {result} hits in {task.samples} uniform draws"
        else:
            assert isinstance(result, Trace)
            traces.setdefault((task.problem, task.strategy, task.stations), []).append(result)
            n_exp = result.experiments_to_target()
            what = (
                f"{task.problem} {task.strategy} K={task.stations} seed {task.seed}: "
                f"{n_exp if n_exp is not None else f'> {task.cap}'} experiments"
            )
        progress.update(f"tasks {done}/{len(tasks)}: {what}")

    if workers <= 1:
        for task in tasks:
            record(task, _run_any(task))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init
        ) as pool:
            futures = {pool.submit(_run_any, t): t for t in tasks}
            for fut in concurrent.futures.as_completed(futures):
                record(futures[fut], fut.result())
    for runs in traces.values():
        runs.sort(key=lambda t: t.seed)
    return traces, hits


def _run_any(task: Task | HitTask) -> Trace | int:
    return run_hit_task(task) if isinstance(task, HitTask) else run_task(task)


def _hit_tasks(settings: Settings) -> list[HitTask]:
    """The hit-rate samples, in chunks of at most ~10 s of work each (they run in the pool)."""
    chunk = {"colour-match": 2500, "buffer": 80, "branin": 100_000, "hartmann6": 250_000}
    out = []
    for name in settings.problems:
        total = settings.mc[name]
        for i, start in enumerate(range(0, total, chunk[name])):
            out.append(HitTask(name, 7919 * (i + 1), min(chunk[name], total - start)))
    return out


def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return format(x, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def _stations_part(
    traces: Mapping[tuple[str, str, int], Sequence[Trace]], settings: Settings
) -> tuple[dict[str, Any], list[str]]:
    """colour-match, K stations vs one: the summary data and the table lines."""
    k = settings.stations
    one = summarise(traces[("colour-match", "bayes", 1)], settings.cap)
    many = summarise(traces[("colour-match", "bayes", k)], settings.cap)
    speedup = _ratio(one.time_median, many.time_median)
    exp_ratio = _ratio(many.median, one.median)
    runs_1 = traces[("colour-match", "bayes", 1)]
    runs_k = traces[("colour-match", "bayes", k)]
    speedup_ci = bootstrap_ratio(
        [t.time_to_target() for t in runs_1], [t.time_to_target() for t in runs_k]
    )
    exp_ratio_ci = bootstrap_ratio(_exps(runs_k), _exps(runs_1))
    stations = {
        "problem": "colour-match",
        "stations": k,
        "one": asdict(one),
        "many": asdict(many),
        "wall_clock_ratio": speedup,
        "wall_clock_ratio_ci95": speedup_ci,
        "experiments_ratio": exp_ratio,
        "experiments_ratio_ci95": exp_ratio_ci,
        "goal": {"wall_clock_ratio_min": STATION_SPEEDUP_GOAL, "experiments_ratio_max": 1.3},
        "goal_met": (
            speedup is not None
            and exp_ratio is not None
            and speedup >= STATION_SPEEDUP_GOAL
            and exp_ratio <= STATION_EXPERIMENTS_GOAL
        ),
    }

    lines = [
        f"colour-match, {k} stations vs 1 ({settings.seeds} seeds, bench time simulated):",
        f"{'stations':>8} {'experiments med':>16} {'started med':>12} "
        f"{'bench h to target med':>22} {'hit':>6}",
    ]
    for label, s in (("1", one), (str(k), many)):
        t = s.time_median
        th = "> cap" if s.time_censored else _fmt(None if t is None else t / 3600.0, ".2f")
        lines.append(
            f"{label:>8} {s.text():>16} {_fmt(s.started_median, 'g'):>12} {th:>22} "
            f"{s.hits:>2}/{s.runs:<3}"
        )
    lines.append(
        f"  wall-clock 1/{k}: {_fmt(speedup, '.2f')}x faster {_ci_text(speedup_ci)} "
        f"(goal >= {STATION_SPEEDUP_GOAL:g}x); experiments {k}/1: {_fmt(exp_ratio, '.2f')}x "
        f"{_ci_text(exp_ratio_ci)} (goal <= {STATION_EXPERIMENTS_GOAL:g}x)"
        f" -> {'met' if stations['goal_met'] else 'NOT met'} (ratios of medians; "
        "brackets: 95 % bootstrap interval over seeds)"
    )
    return stations, lines


def optimizer_section(settings: Settings, progress: Progress) -> SectionReport:
    """Acceleration factor (ours vs random) and K stations vs one; writes the convergence plot."""
    _pyplot()  # fail before minutes of runs, not after
    tasks: list[Task | HitTask] = []
    slowest_first = ("hartmann6", "buffer", "colour-match", "branin")  # balances the pool
    for name in (p for p in slowest_first if p in settings.problems):
        for seed in range(max(settings.seeds, settings.random_seeds)):
            if seed < settings.seeds:
                tasks.append(Task(name, "bayes", 1, seed, settings.cap))
                if name == "colour-match":
                    tasks.append(Task(name, "bayes", settings.stations, seed, settings.cap))
            if seed < settings.random_seeds:
                tasks.append(Task(name, "random", 1, seed, settings.random_cap))
    traces, hit_counts = _run_tasks([*_hit_tasks(settings), *tasks], settings.workers, progress)

    problems = {name: make_problem(name) for name in settings.problems}
    acc_rows: list[dict[str, Any]] = []
    for name in settings.problems:
        pb = problems[name]
        ours = summarise(traces[(name, "bayes", 1)], settings.cap)
        rnd = summarise(traces[(name, "random", 1)], settings.random_cap)
        hits, samples = hit_counts[name]
        p = hits / samples
        # no hit at all: the median is only bounded, by p's 95 % upper limit (rule of three)
        geo = geometric_median(p) if hits else geometric_median(3.0 / samples)
        geo_bound = hits == 0
        af_emp = None if ours.censored else _ratio(rnd.median, ours.median)
        af_ci = bootstrap_ratio(
            _exps(traces[(name, "random", 1)]), _exps(traces[(name, "bayes", 1)])
        )
        af_low = None
        if rnd.censored and not ours.censored:
            af_low = settings.random_cap / ours.median  # random needs more than its cap
        acc_rows.append(
            {
                "problem": name,
                "target": pb.target,
                "dims": len(pb.space),
                "initial_points": pb.initial_points,
                "ours": asdict(ours),
                "random": asdict(rnd),
                "random_hit_rate": p,
                "random_hit_rate_draws": samples,
                "random_hit_rate_hits": hits,
                "random_geometric_median": geo,
                "random_geometric_median_is_lower_bound": geo_bound,
                "af_empirical": af_emp,
                "af_empirical_ci95": af_ci,
                "af_lower_bound": af_low,
                "af_geometric": None if ours.censored else _ratio(geo, ours.median),
            }
        )

    lines = [
        f"Experiments to target, one station ({settings.seeds} seeds for ours, "
        f"{settings.random_seeds} for random search; ours capped at {settings.cap}, "
        f"random at {settings.random_cap}):",
        f"{'problem':<13} {'target':>6} {'ours med [IQR]':>17} {'hit':>7} "
        f"{'random med [IQR]':>20} {'hit':>7} {'AF [95% CI]':>20} "
        f"{'random p':>9} {'med(p)':>7} {'AF(p)':>7}",
    ]
    for row in acc_rows:
        o, r = row["ours"], row["random"]
        af = row["af_empirical"]
        af_txt = _fmt(af, ".1f") if af is not None else "-"
        if row["af_lower_bound"] is not None:
            af_txt = f">{row['af_lower_bound']:.1f}"
        ci = row["af_empirical_ci95"]
        if ci is not None and math.isfinite(ci[0]):
            af_txt += f" {_ci_text(ci)}"
        geo_txt = _fmt(row["random_geometric_median"], ".0f")
        afp_txt = _fmt(row["af_geometric"], ".1f")
        if row["random_geometric_median_is_lower_bound"]:
            geo_txt, afp_txt = ">" + geo_txt, ">" + afp_txt
        lines.append(
            f"{row['problem']:<13} {row['target']:>6g} {_med_iqr(o):>17} "
            f"{o['hits']:>3}/{o['runs']:<3} {_med_iqr(r):>20} {r['hits']:>3}/{r['runs']:<3} "
            f"{af_txt:>20} {row['random_hit_rate']:>9.2e} {geo_txt:>7} {afp_txt:>7}"
        )
    lines += [
        f"  AF = random median / ours median (self-driving-lab literature median: "
        f"{LITERATURE_AF:g}); CI: percentile bootstrap over seeds. A run that misses the "
        "target by its cap is censored: '> cap'.",
        "  random p: hit rate of one uniform feasible draw (from a separate sample: "
        + ", ".join(f"{row['random_hit_rate_draws']} for {row['problem']}" for row in acc_rows)
        + "); med(p) = ln 0.5 / ln(1 - p), random search's median without censoring; "
        "AF(p) = med(p) / ours median.",
    ]
    stations: dict[str, Any] | None = None
    if "colour-match" in settings.problems:
        stations, station_lines = _stations_part(traces, settings)
        lines += ["", *station_lines]
    png = settings.out / f"{settings.stem}_convergence.png"
    progress.update(f"plotting {png}")
    plot_convergence(traces, problems, settings, png)
    lines.append(f"  convergence plot: {png}")
    return SectionReport(
        "optimizer",
        lines,
        {"acceleration": acc_rows, "stations": stations, "plot": png.name},
    )


def suggest_section(settings: Settings, progress: Progress) -> SectionReport:
    """``suggest`` seconds at n observations: ours next to the package's own, same data."""
    rows = []
    for n in settings.suggest_sizes:
        progress.update(f"suggest timing at {n} observations")
        ours: list[float] = []
        ref: list[float] = []
        for _ in range(settings.suggest_repeats):  # interleaved: drift hits both alike
            ours.append(time_suggest(n, dims=settings.suggest_dims, repeats=1))
            ref.append(time_suggest(n, dims=settings.suggest_dims, reference=True, repeats=1))
        o, r = statistics.median(ours), statistics.median(ref)
        rows.append({"observations": n, "ours_s": o, "package_s": r, "ratio": r / o})
    lines = [
        f"suggest() time, {settings.suggest_dims}-D, median of {settings.suggest_repeats} calls each "
        "of ours and the package's, interleaved (ours = BayesOptimizer.ask, fast settings; "
        "package = BayesianOptimization.suggest, its defaults; same data):",
        f"{'observations':>12} {'ours ms':>9} {'package ms':>11} {'package/ours':>13}",
    ]
    for row in rows:
        lines.append(
            f"{row['observations']:>12} {row['ours_s'] * 1e3:>9.1f} "
            f"{row['package_s'] * 1e3:>11.1f} {row['ratio']:>12.2f}x"
        )
    return SectionReport("suggest", lines, {"dims": settings.suggest_dims, "rows": rows})


def reference_section(settings: Settings, progress: Progress) -> SectionReport:
    """The colour model at the point program.md's target was measured at (through the
    stack), the buffer model at a textbook point; each for the problems selected."""
    lines: list[str] = []
    data: dict[str, Any] = {}
    if "colour-match" in settings.problems:
        data, lines = _colour_reference(settings, progress)
    if "buffer" in settings.problems:
        data["buffer"], buffer_lines = _buffer_reference(settings, progress)
        lines += buffer_lines
    return SectionReport("reference", lines, data)


def _buffer_reference(settings: Settings, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """The buffer model at Sørensen's table point for pH 7.4 (the chemistry's own check)."""
    progress.update("buffer model at Sørensen's pH 7.4 point")
    objective = BufferObjective()
    results = [objective(SORENSEN_POINT, seed=s) for s in range(settings.reference_seeds)]
    phs = [r.ph for r in results if r.ph is not None]
    truth = [r.true_ph for r in results if r.true_ph is not None]
    cal = objective.station.calibration
    data: dict[str, Any] = {
        "point": dict(SORENSEN_POINT),
        "table_ph": 7.40,
        "ph_median": statistics.median(phs) if phs else None,
        "ph_min": min(phs) if phs else None,
        "ph_max": max(phs) if phs else None,
        "true_ph_median": statistics.median(truth) if truth else None,
        "not_ok": [r.status for r in results if r.status != "ok"],
        "duration_s": results[0].duration_s,
        "steps_s": results[0].steps_s,
        "setup": {"kept": objective.kept, "zero_mv": cal.zero_mv, "slope": cal.slope},
    }
    lines = [
        "buffer model at Sørensen's table point for pH 7.40 (19 + 81 mL of the 0.2 M stocks "
        f"in 200 mL, scaled to 60 mL: {', '.join(f'{k}={v:g}' for k, v in SORENSEN_POINT.items())}):",
        f"  pH read {_fmt(data['ph_median'], '.3f')} (median; {_fmt(data['ph_min'], '.3f')}-"
        f"{_fmt(data['ph_max'], '.3f')} over {len(results)} noise seeds), the chemistry's own pH "
        f"of the mixed liquid {_fmt(data['true_ph_median'], '.3f')} (at the liquid's "
        f"{_fmt(results[0].measurements.get('temperature_c'), '.1f')} degC); "
        f"{len(results) - len(data['not_ok'])}/{len(results)} verified; bench time "
        f"{results[0].duration_s:.0f} s per experiment; set-up calibration "
        f"{cal.zero_mv:.2f} mV, slope {100 * cal.slope:.1f} %",
    ]
    if settings.check_stack:
        lines += _check_buffer_stack(objective, progress, data)
    return data, lines


def _check_buffer_stack(
    objective: BufferObjective, progress: Progress, data: dict[str, Any]
) -> list[str]:
    """:data:`benchmarks.buffer_stack.STACK_POINTS` through the whole simulated buffer
    bench (set-up, drivers, wire, guard, envelope) next to the model."""
    import asyncio

    from benchmarks.buffer_stack import STACK_POINTS as BUFFER_POINTS
    from benchmarks.buffer_stack import run_points_on_stack

    speed = 20.0
    rows = asyncio.run(run_points_on_stack(BUFFER_POINTS, speed=speed, progress=progress.update))
    for row in rows:  # the model runs its recipes on its own event loop
        model = [objective(row["point"], seed=s) for s in range(3)]
        row["model_ph"] = statistics.median(r.ph for r in model if r.ph is not None)
        row["model_verified"] = [r.status == "ok" for r in model]
    data["stack_check"] = rows
    lines = [
        f"  pH through the whole simulated buffer stack (set-up and recipe, speed {speed:g}) "
        "vs the model (median of 3 noise seeds):"
    ]
    for r in rows:
        point = ", ".join(f"{k}={v:g}" for k, v in r["point"].items())
        lines.append(
            f"    {point}: stack {r['stack_ph']:.3f} (verified: {r['stack_verified']}, "
            f"{r['stack_temperature_c']:.1f} degC), model {r['model_ph']:.3f}"
        )
    return lines


def _colour_reference(settings: Settings, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """The colour model at the point program.md's target was measured at (through the stack)."""
    progress.update("colour model at the reference point")
    objective = ColourMatchObjective()
    results = [objective(REFERENCE_POINT, seed=s) for s in range(settings.reference_seeds)]
    des = [r.delta_e for r in results if r.delta_e is not None]
    data: dict[str, Any] = {
        "point": dict(REFERENCE_POINT),
        "target_lab": list(objective.program.fixed.get("target_lab") or []),
        "delta_e_median": statistics.median(des) if des else None,
        "delta_e_max": max(des) if des else None,
        "failed": len(results) - len(des),
        "duration_s": results[0].duration_s,
        "steps_s": results[0].steps_s,
    }
    lines = [
        "colour model at the point target_lab was measured at through the whole stack "
        f"({', '.join(f'{k}={v:g}' for k, v in REFERENCE_POINT.items())}):",
        f"  ΔE00 to target median {_fmt(data['delta_e_median'], '.2f')}, "
        f"max {_fmt(data['delta_e_max'], '.2f')} over {len(results)} noise seeds; "
        f"bench time {results[0].duration_s:.0f} s per experiment",
    ]
    if settings.check_stack:
        lines += _check_stack(objective, progress, data)
    return data, lines


STACK_POINTS: tuple[dict[str, float | int], ...] = (
    dict(REFERENCE_POINT),
    {"red_ml": 0.3, "green_ml": 0.8, "blue_ml": 0.2, "temperature_c": 70.0, "hold_s": 400},
    {"red_ml": 1.0, "green_ml": 0.0, "blue_ml": 1.1, "temperature_c": 25.0, "hold_s": 30},
)


def _check_stack(
    objective: ColourMatchObjective, progress: Progress, data: dict[str, Any]
) -> list[str]:
    """Run :data:`STACK_POINTS` through the whole simulated bench (drivers, wire, guard)."""
    import asyncio

    from bridge.simbench import open_sim_station
    from loops.recipe import build_recipe, run_recipe
    from simulators.bench import SimulatedLab

    speed = 50.0

    async def run() -> list[dict[str, Any]]:
        rows = []
        async with SimulatedLab(stations=1, speed=speed) as lab:
            bench = lab.stations[0]
            async with open_sim_station(bench, speed) as station:
                for i, p in enumerate(STACK_POINTS):
                    progress.update(f"whole stack: point {i + 1}/{len(STACK_POINTS)}")
                    res = await run_recipe(
                        build_recipe(objective.program, p),
                        station,
                        clock_sleep=bench.world.clock.sleep,
                        clock_now=bench.world.clock.now,
                        who="benchmark",
                    )
                    rows.append(
                        {
                            "point": p,
                            "stack_delta_e": res.measurements["delta_e2000"],
                            "stack_lab": res.measurements["lab"],
                        }
                    )
        return rows

    rows = asyncio.run(run())
    for row in rows:  # the model runs its recipes on its own event loop
        model = [objective(row["point"], seed=s) for s in range(5)]
        row["model_delta_e"] = statistics.median(r.delta_e for r in model if r.delta_e is not None)
        row["model_lab"] = list(model[0].lab or ())
    data["stack_check"] = rows
    lines = [f"  ΔE00 to target through the whole simulated stack (speed {speed:g}) vs the model:"]
    for r in rows:
        point = ", ".join(f"{k}={v:g}" for k, v in r["point"].items())
        lines.append(
            f"    {point}: stack {r['stack_delta_e']:.2f}, model {r['model_delta_e']:.2f} "
            "(median of 5 noise seeds)"
        )
    return lines


#: The benchmark's sections, in order. Each takes the settings and the progress line and
#: returns its table lines and JSON data; a real-Ray campaign section goes here too.
def _stack_run(stations: int, seed: int, speed: float, root: Path) -> dict[str, Any]:
    """One real campaign (Ray station actors, simulators, camera verification) to its target."""
    import asyncio

    from bridge.simbench import sim_campaign
    from loops.journal import Journal
    from loops.program import builtin_program, load_program

    base = load_program(builtin_program("color-match"))
    program = replace(base, seed=seed, stations=stations)
    out = root / f"k{stations}-s{seed}"
    t0 = time.monotonic()
    summary = asyncio.run(
        sim_campaign(program, campaign_id=out.name, out=out, speed=speed, progress=False)
    )
    total_s = time.monotonic() - t0
    journal = Journal(out / "journal.db")
    try:
        exps = journal.experiments(out.name)
        started = {
            e.id: next(t.t for t in journal.transitions(e.id) if t.state == "running")
            for e in exps
            if e.station is not None
        }
    finally:
        journal.close()
    ran = sorted((e for e in exps if e.state in ("done", "failed")), key=lambda e: e.updated)
    target = program.stop.target
    hit = next(
        (
            i
            for i, e in enumerate(ran)
            if e.state == "done"
            and e.verified is not False
            and target is not None
            and e.objective is not None
            and e.objective <= target
        ),
        None,
    )
    first = min(started.values()) if started else None
    wall = None if hit is None or first is None else ran[hit].updated - first
    return {
        "stations": stations,
        "seed": seed,
        "state": summary.state,
        "reason": summary.reason,
        "finished_to_target": None if hit is None else hit + 1,
        "started_to_target": None
        if hit is None
        else sum(1 for t in started.values() if t <= ran[hit].updated),
        "run": summary.counts["run"],
        "wall_s_to_target": wall,
        "bench_h_to_target": None if wall is None else wall * speed / 3600.0,
        "total_s": total_s,
    }


def stack_section(settings: Settings, progress: Progress) -> SectionReport:
    """The real stack: ``labbridge sim``'s campaign on 1 and K simulated stations, same seeds
    (colour-match; skipped when it is not among the problems)."""
    if "colour-match" not in settings.problems:
        return SectionReport("stack", ["Real stack: skipped (colour-match not run)"], {})
    import ray

    from loops.raylinks import init_ray

    ks = (1, settings.stations)
    names = [f"bench-{chr(ord('a') + i)}" for i in range(max(ks))]
    init_ray(stations=names, local=True, log_to_driver=False)
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="labbridge-stack-") as tmp:
            for seed in range(1, settings.stack_seeds + 1):
                for k in ks:  # interleaved: drift on a shared machine hits both alike
                    progress.update(f"real stack: {k} station(s), seed {seed}")
                    runs.append(_stack_run(k, seed, settings.stack_speed, Path(tmp)))
    finally:
        ray.shutdown()
    by_k = {k: [r for r in runs if r["stations"] == k] for k in ks}

    def med(k: int, key: str) -> float | None:  # over the runs that reached the target
        vals = [r[key] for r in by_k[k] if r[key] is not None]
        return statistics.median(vals) if vals else None

    hits = {k: sum(r["finished_to_target"] is not None for r in by_k[k]) for k in ks}

    rows = {
        k: {
            key: med(k, key)
            for key in (
                "finished_to_target",
                "started_to_target",
                "wall_s_to_target",
                "bench_h_to_target",
            )
        }
        for k in ks
    }
    one, many = rows[1], rows[settings.stations]
    speedup = _ratio(one["wall_s_to_target"], many["wall_s_to_target"])
    more = _ratio(many["finished_to_target"], one["finished_to_target"])
    lines = [
        f"Real stack (labbridge sim's campaign: Ray station actors, drivers over the wire, "
        f"safety layer, camera verification), colour match at {settings.stack_speed:g}x, "
        f"{settings.stack_seeds} seed(s), median over the runs that reached the target:",
        f"{'stations':>9} {'exp to target':>14} {'started':>8} {'wall s':>8} {'bench h':>8} "
        f"{'hit':>6}",
    ]
    for k in ks:
        r = rows[k]
        lines.append(
            f"{k:>9} {_fmt(r['finished_to_target'])!s:>14} {_fmt(r['started_to_target'])!s:>8} "
            f"{_fmt(r['wall_s_to_target'])!s:>8} {_fmt(r['bench_h_to_target'])!s:>8} "
            f"{hits[k]:>3}/{len(by_k[k])}"
        )
    lines.append(
        f"{settings.stations} stations vs 1: {_fmt(speedup)}x faster to target "
        f"(goal >= 3x), {_fmt(more)}x the experiments (goal <= 1.3x)"
    )
    for r in runs:
        if r["finished_to_target"] is None:
            lines.append(
                f"  miss: {r['stations']} station(s), seed {r['seed']}: {r['state']}: {r['reason']}"
            )
    lines.append(
        "  (each station's envelope allows 50 mL of dye a day: one station can run out before "
        "the target, K stations have K budgets. Bench h = wall s x speed: the stack's own time "
        "per experiment (Ray calls, journal fsyncs, dry runs, ask, verification, ~0.5-1 s on "
        "this machine) counts as bench time too, so at high speeds it, not the bench, bounds "
        "the speed-up; the model above has none)"
    )
    return SectionReport(
        "stack",
        lines,
        {
            "speed": settings.stack_speed,
            "runs": runs,
            "medians": {str(k): rows[k] for k in ks},
            "speedup": speedup,
            "experiments_ratio": more,
        },
    )


SECTIONS: list[Callable[[Settings, Progress], SectionReport]] = [
    reference_section,
    optimizer_section,
    suggest_section,
    stack_section,
]


# --------------------------------------------------------------------- plot
def _band(curves: Sequence[Sequence[float]], length: int) -> tuple[np.ndarray, ...]:
    """Median and quartiles per x over curves carried forward to ``length``.

    A run with no successful result yet (best ``inf``) counts as worse than
    every value, so a quantile that falls on such runs is nan (not drawn).
    """
    big = 1e300
    m = np.full((len(curves), length), big)
    for i, c in enumerate(curves):
        if not c:
            continue
        row = np.asarray(c, dtype=np.float64)[:length]
        m[i, : len(row)] = row
        m[i, len(row) :] = row[-1]
    m[~np.isfinite(m)] = big
    q = np.percentile(m, [50, 25, 75], axis=0)
    q[q >= big / 10] = np.nan
    return q[0], q[1], q[2]


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a clear exit naming the missing package."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(
            f"benchmarks/campaign.py draws its convergence plot with matplotlib ({exc}): "
            "pip install matplotlib"
        ) from None
    return plt


def plot_convergence(
    traces: Mapping[tuple[str, str, int], Sequence[Trace]],
    problems: Mapping[str, Problem],
    settings: Settings,
    path: Path,
) -> None:
    """Best so far vs experiments (median, IQR band; ours vs random), one panel per problem,
    plus colour-match best so far vs bench hours with K stations vs one (when it ran)."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [p for p in PROBLEMS if p in problems]
    colour = "colour-match" in problems
    panels = len(names) + colour
    cols = 1 if panels == 1 else 2 if panels <= 4 else 3
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 4 * rows), constrained_layout=True, squeeze=False
    )
    for spare in axes.flat[panels:]:
        spare.set_visible(False)
    colours = {"bayes": "tab:blue", "random": "tab:orange"}
    labels = {"bayes": "ours (BayesOptimizer)", "random": "random search"}
    for ax, name in zip(axes.flat, names, strict=False):
        pb = problems[name]
        offset = pb.minimum if pb.minimum is not None else 0.0
        for strategy in ("bayes", "random"):
            runs = traces.get((name, strategy, 1), [])
            if not runs:
                continue
            curves = [[v - offset for v in t.best_so_far()] for t in runs]
            length = max(len(c) for c in curves)
            med, lo, hi = _band(curves, length)
            x = np.arange(1, length + 1)
            ax.plot(x, med, color=colours[strategy], label=f"{labels[strategy]}, median")
            ax.fill_between(x, lo, hi, color=colours[strategy], alpha=0.25, lw=0)
        ax.axhline(pb.target - offset, color="k", ls="--", lw=1, label="target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("experiments")
        ax.set_ylabel(f"best so far: {pb.value_label}")
        ax.set_title(f"{name} ({len(pb.space)}-D)")
        ax.legend(fontsize=8)
    if colour:
        _plot_stations(axes.flat[len(names)], traces, problems, settings)
    fig.suptitle(
        f"Best so far, median and inter-quartile band over seeds ({settings.seeds} ours, "
        f"{settings.random_seeds} random)\n(a run stopped at its target keeps its last value)",
        fontsize=10,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_stations(
    ax: Any,
    traces: Mapping[tuple[str, str, int], Sequence[Trace]],
    problems: Mapping[str, Problem],
    settings: Settings,
) -> None:
    """colour-match best so far vs bench hours, K stations vs one."""
    k = settings.stations
    for stations, colour in ((1, "tab:blue"), (k, "tab:green")):
        runs = traces.get(("colour-match", "bayes", stations), [])
        if not runs:
            continue
        horizon = max(t.finish_s[-1] for t in runs if t.finish_s) / 3600.0
        grid = np.linspace(0.0, horizon, 400)
        curves = []
        for t in runs:
            best = t.best_so_far()
            finish = np.asarray(t.finish_s) / 3600.0
            idx = np.searchsorted(finish, grid, side="right") - 1
            curves.append([best[i] if i >= 0 else math.inf for i in idx])
        med, lo, hi = _band(curves, len(grid))
        ax.plot(grid, med, color=colour, label=f"ours, {stations} station(s), median")
        ax.fill_between(grid, lo, hi, color=colour, alpha=0.25, lw=0)
    ax.axhline(problems["colour-match"].target, color="k", ls="--", lw=1, label="target")
    ax.set_yscale("log")
    ax.set_xlabel("bench hours (simulated)")
    ax.set_ylabel("best so far: ΔE00 to target")
    ax.set_title(f"colour-match: {k} stations vs 1")
    ax.legend(fontsize=8)


# --------------------------------------------------------------------- main
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        f = float(value)
        return None if math.isnan(f) else ("inf" if math.isinf(f) else round(f, 6))
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seeds", type=int, default=None, help="seeds for our optimizer (30)")
    ap.add_argument(
        "--random-seeds", type=int, default=None, help="seeds for random search (100; cheap)"
    )
    ap.add_argument("--cap", type=int, default=None, help="experiments cap for ours (200)")
    ap.add_argument("--random-cap", type=int, default=None, help="cap for random search (500)")
    ap.add_argument(
        "--hit-draws",
        type=int,
        default=None,
        help="uniform draws for random search's hit rate, each problem (20000 colour-match, "
        "2000 buffer, 200000 branin, 1000000 hartmann6; --quick: fewer)",
    )
    ap.add_argument("--stations", type=int, default=4, help="stations for the K-station run (4)")
    ap.add_argument("--workers", type=int, default=2, help="processes (2; 1 runs in-process)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (benchmarks/results; --quick: a folder under the temp dir)",
    )
    ap.add_argument("--check-stack", action="store_true", help="also run points through the stack")
    ap.add_argument(
        "--stack-seeds",
        type=int,
        default=None,
        help="seeds of the real-stack campaigns, 1 vs --stations stations (3; --quick: 1, 1 vs 2)",
    )
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 2 seeds, small caps")
    ap.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated problems to run ({','.join(PROBLEMS)}: all); some only: the "
        "results are campaign-<problems>.json and the colour-only sections need colour-match",
    )
    a = ap.parse_args(argv)
    problems = tuple(p.strip() for p in a.problems.split(",") if p.strip())
    unknown = [p for p in problems if p not in PROBLEMS]
    if unknown or not problems:
        ap.error(
            f"--problems {a.problems!r}: unknown {', '.join(map(repr, unknown)) or 'empty'} "
            f"(known: {', '.join(PROBLEMS)})"
        )
    for name in ("seeds", "random_seeds", "cap", "random_cap", "hit_draws"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if a.stations < 2:
        ap.error(f"--stations must be >= 2 (compared with one), got {a.stations}")
    if a.workers < 1:
        ap.error(f"--workers must be >= 1, got {a.workers}")
    draws = dict.fromkeys(PROBLEMS, a.hit_draws) if a.hit_draws else None
    if a.quick:
        return Settings(
            seeds=a.seeds or 2,
            random_seeds=a.random_seeds or 2,
            cap=a.cap or 60,
            random_cap=a.random_cap or 100,
            workers=a.workers,
            mc=draws or {"colour-match": 1000, "buffer": 80, "branin": 20_000, "hartmann6": 50_000},
            suggest_sizes=(50, 200),
            suggest_repeats=1,
            reference_seeds=3,
            stack_seeds=a.stack_seeds or 1,
            stack_speed=500.0,
            stations=a.stations if a.stations != 4 else 2,
            check_stack=a.check_stack,
            out=a.out or Path(tempfile.gettempdir()) / "labbridge-campaign-quick",
            quick=True,
            problems=problems,
        )
    full = Settings(
        seeds=a.seeds or 30,
        random_seeds=a.random_seeds or 100,
        cap=a.cap or 200,
        random_cap=a.random_cap or 500,
        stations=a.stations,
        workers=a.workers,
        stack_seeds=a.stack_seeds or 3,
        check_stack=a.check_stack,
        out=a.out or Path(_HERE) / "results",
        problems=problems,
    )
    return replace(full, mc=draws) if draws else full


def run_sections(
    settings: Settings,
    sections: Iterable[Callable[[Settings, Progress], SectionReport]] = SECTIONS,
    progress: Progress | None = None,
) -> list[SectionReport]:
    progress = progress or Progress()
    reports = []
    try:
        for section in sections:
            reports.append(section(settings, progress))
    finally:
        progress.done()
    return reports


def main(
    argv: Sequence[str] | None = None,
    sections: Sequence[Callable[[Settings, Progress], SectionReport]] | None = None,
) -> int:
    """Run ``sections`` (default :data:`SECTIONS`), print the tables, write ``campaign.json``."""
    settings = parse_args(argv)
    t0 = time.monotonic()
    reports = run_sections(settings, SECTIONS if sections is None else sections)
    elapsed = time.monotonic() - t0
    print(
        f"benchmarks/campaign.py{' --quick' if settings.quick else ''}: {settings.seeds} seeds, "
        f"{settings.workers} worker(s), {os.cpu_count()} cores, {elapsed:.0f} s"
    )
    for r in reports:
        print()
        print("\n".join(r.lines))
    import bayes_opt

    doc = {
        "benchmark": "campaign",
        "quick": settings.quick,
        "settings": {
            "seeds": settings.seeds,
            "random_seeds": settings.random_seeds,
            "cap": settings.cap,
            "random_cap": settings.random_cap,
            "stations": settings.stations,
            "initial_points": {  # the programs' and, for the test functions, the default
                name: make_problem(name).initial_points for name in settings.problems
            },
            "problems": list(settings.problems),
            "targets": {
                "colour-match": ColourMatchObjective().target,
                "buffer": BufferObjective().target,
                **TEST_FUNCTION_TARGETS,
            },
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "bayes_opt": getattr(bayes_opt, "__version__", "?"),
        },
        "elapsed_s": elapsed,
        **{r.name: r.data for r in reports},
    }
    settings.out.mkdir(parents=True, exist_ok=True)
    path = settings.out / f"{settings.stem}.json"
    path.write_text(json.dumps(_jsonable(doc), indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
