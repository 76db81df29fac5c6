"""Two objectives: labbridge's ParetoOptimizer side by side with other libraries' (issue 16).

Run:  python benchmarks/optpareto.py [--seeds 10] [--workers 2] [--out benchmarks/results]
      python benchmarks/optpareto.py --quick        # smoke run: 1 seed, 12 experiments

Problems (both objectives minimised, one station):

- ``branin-currin``: BoTorch's standard two-objective test (Branin and Currin on
  [0, 1]^2), reference point (18, 6) as BoTorch uses it.
- ``colour-dye``: the colour match's ΔE00 to target and the total dye used
  (red + green + blue mL) on the colour model of :mod:`benchmarks.colour_model`
  (its known constraints; a saturated/dark sensor is a failed experiment),
  reference point (30 ΔE00, 2.6 mL: the program's dye limit).

Strategies: ``pareto`` (:class:`loops.optmulti.ParetoOptimizer` over the
default :class:`~loops.optbayes.BayesOptimizer` with its defaults),
``random`` (the same over :class:`~loops.optbaselines.RandomSearch`),
``optuna-tpe`` / ``optuna-gp`` (Optuna's multi-objective TPE and GP samplers)
and ``botorch`` (a Sobol design of ``max(5, 2 d)`` points, then qLogNEHVI on
a SingleTaskGP per objective); a peer whose library is missing is skipped
with the reason. A proposal a known constraint refuses is not an experiment
(the dry run refuses it): the peer is told the worst values seen and asks
again.

Table: hypervolume after 20 and 40 experiments, median [IQR] over the seeds.
Goal: ours at 40 >= the best peer's median. The results file
(``<out>/optpareto.json``) records the seeds, each run's hypervolumes and the
versions of every library that shapes a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from benchmarks.campaign import quantile  # noqa: E402
from benchmarks.colour_model import ColourMatchObjective  # noqa: E402
from benchmarks.optrun import pool_map, quantile_row  # noqa: E402
from benchmarks.peers import missing_peers, peer_versions  # noqa: E402
from loops.optbaselines import RandomSearch  # noqa: E402
from loops.optbayes import BayesOptimizer  # noqa: E402
from loops.optmulti import ParetoOptimizer  # noqa: E402
from loops.optspace import Constraint, Params, ParamSpace  # noqa: E402
from loops.pareto import hypervolume  # noqa: E402
from loops.testfunctions import branin  # noqa: E402

__all__ = ["PROBLEMS", "STRATEGIES", "MoProblem", "main", "make_problem", "run_one"]

PROBLEMS = ("branin-currin", "colour-dye")
OURS = ("pareto", "random")
PEERS = ("optuna-tpe", "optuna-gp", "botorch")
STRATEGIES = (*OURS, *PEERS)
PEER_NEEDS = {"optuna-tpe": "optuna-tpe", "optuna-gp": "optuna-gp", "botorch": "botorch"}
CHECKPOINTS = (20, 40)
_TRIES = 1000  # refused proposals in a row before a run gives up

Vector = tuple[float, float]


@dataclass(frozen=True)
class MoProblem:
    """Two minimised objectives over ``space``; ``evaluate`` gives a vector or None (failed)."""

    name: str
    space: dict[str, tuple[Any, ...]]
    ref: Vector
    evaluate: Callable[[Params, int], Vector | None]
    constraints: Constraint | None = None


def _currin(x1: float, x2: float) -> float:
    x2 = max(x2, 1e-12)
    num = 2300 * x1**3 + 1900 * x1**2 + 2092 * x1 + 60
    return (1 - math.exp(-1 / (2 * x2))) * num / (100 * x1**3 + 500 * x1**2 + 4 * x1 + 20)


def make_problem(name: str) -> MoProblem:
    """A problem of :data:`PROBLEMS`."""
    if name == "branin-currin":

        def bc(p: Params, seed: int) -> Vector:
            x1, x2 = float(p["x1"]), float(p["x2"])
            return (branin(np.array([15 * x1 - 5, 15 * x2])), _currin(x1, x2))

        return MoProblem(name, {"x1": (0.0, 1.0, float), "x2": (0.0, 1.0, float)}, (18.0, 6.0), bc)
    if name == "colour-dye":
        objective = ColourMatchObjective()

        def cd(p: Params, seed: int) -> Vector | None:
            r = objective(p, seed=seed)
            if r.status != "ok" or r.delta_e is None:
                return None
            dye = float(p["red_ml"]) + float(p["green_ml"]) + float(p["blue_ml"])
            return (float(r.delta_e), dye)

        return MoProblem(name, dict(objective.space), (30.0, 2.6), cd, objective.feasible)
    raise ValueError(f"unknown problem {name!r} (known: {', '.join(PROBLEMS)})")


# --------------------------------------------------------------------- strategies
class _Ours:
    """ParetoOptimizer over our Bayesian strategy (``pareto``) or random search."""

    def __init__(self, pb: MoProblem, strategy: str, seed: int) -> None:
        inner: BayesOptimizer | RandomSearch
        if strategy == "pareto":
            inner = BayesOptimizer(
                pb.space, direction="minimize", seed=seed, constraints=pb.constraints
            )
        else:
            inner = RandomSearch(pb.space, seed, direction="minimize", constraints=pb.constraints)
        self.opt = ParetoOptimizer(inner, ["minimize", "minimize"], seed=seed)

    def run(self, pb: MoProblem, n: int, seed: int) -> list[Vector | None]:
        out: list[Vector | None] = []
        for i in range(n):
            p = self.opt.ask()
            v = pb.evaluate(p.params, seed * 1000 + i)
            if v is None:
                self.opt.tell(p.id, None, status="failed")
            else:
                self.opt.tell(p.id, list(v))
            out.append(v)
        return out


class _OptunaMo:
    """An Optuna study with two minimised objectives (TPE or GP sampler)."""

    def __init__(self, pb: MoProblem, kind: str, seed: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        sampler: Any = (
            optuna.samplers.TPESampler(seed=seed)
            if kind == "tpe"
            else optuna.samplers.GPSampler(seed=seed)
        )
        self.study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        self.space = ParamSpace.of(pb.space)
        d = optuna.distributions
        self.dists = {
            x.name: d.IntDistribution(int(x.low), int(x.high))
            if x.is_int
            else d.FloatDistribution(x.low, x.high)
            for x in self.space.dims
        }

    def run(self, pb: MoProblem, n: int, seed: int) -> list[Vector | None]:
        out: list[Vector | None] = []
        worst = [-math.inf, -math.inf]
        fail = self.optuna.trial.TrialState.FAIL
        while len(out) < n:
            for _ in range(_TRIES):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trial = self.study.ask(self.dists)
                params = self.space.validate(trial.params)
                if pb.constraints is None or pb.constraints(params):
                    break
                # refused by the dry run: the worst values seen (a FAIL teaches the GP nothing)
                if math.isinf(worst[0]):
                    self.study.tell(trial, state=fail)
                else:
                    self.study.tell(trial, list(worst))
            else:
                raise RuntimeError(f"{_TRIES} proposals in a row violated the constraints")
            v = pb.evaluate(params, seed * 1000 + len(out))
            if v is None:
                self.study.tell(trial, state=fail)
            else:
                self.study.tell(trial, list(v))
                worst = [max(w, x) for w, x in zip(worst, v, strict=True)]
            out.append(v)
        return out


class _BoTorchMo:
    """Sobol, then qLogNEHVI on one SingleTaskGP per objective (BoTorch's tutorial loop)."""

    def __init__(self, pb: MoProblem, seed: int) -> None:
        import torch

        self.torch = torch
        self.space = ParamSpace.of(pb.space)
        self.sobol = torch.quasirandom.SobolEngine(len(self.space), scramble=True, seed=seed)
        self.init = max(5, 2 * len(self.space))
        torch.manual_seed(seed)

    def _next(self, X: list[np.ndarray], Y: list[Vector], pb: MoProblem) -> np.ndarray:
        torch = self.torch
        if len(Y) < self.init:
            return np.asarray(self.sobol.draw(1, dtype=torch.float64)[0].numpy())
        from botorch.acquisition.multi_objective.logei import (
            qLogNoisyExpectedHypervolumeImprovement,
        )
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms.outcome import Standardize
        from botorch.optim import optimize_acqf
        from gpytorch.mlls import SumMarginalLogLikelihood

        tx = torch.tensor(np.array(X))
        ty = -torch.tensor(np.array(Y), dtype=torch.float64)  # BoTorch maximises
        d = tx.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = [
                SingleTaskGP(tx, ty[:, i : i + 1], outcome_transform=Standardize(m=1))
                for i in range(2)
            ]
            model = ModelListGP(*models)
            fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
            acq = qLogNoisyExpectedHypervolumeImprovement(
                model, ref_point=[-r for r in pb.ref], X_baseline=tx, prune_baseline=True
            )
            bounds = torch.stack([torch.zeros(d), torch.ones(d)]).double()
            cand, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=10, raw_samples=512)
        u = self.space.round_unit(cand[0].detach().numpy())
        if pb.constraints is None or pb.constraints(self.space.from_unit(u)):
            return np.asarray(u)
        # outside a known constraint: the best feasible point of a Sobol sample instead
        cands = self.sobol.draw(2048, dtype=torch.float64)
        ok = [i for i, c in enumerate(cands.numpy()) if pb.constraints(self.space.from_unit(c))]
        with torch.no_grad():
            vals = acq(cands[ok].unsqueeze(1))
        return np.asarray(cands[ok][int(torch.argmax(vals))].numpy())

    def run(self, pb: MoProblem, n: int, seed: int) -> list[Vector | None]:
        out: list[Vector | None] = []
        X: list[np.ndarray] = []
        Y: list[Vector] = []
        while len(out) < n:
            for _ in range(_TRIES):
                u = self._next(X, Y, pb)
                params = self.space.from_unit(u)
                if pb.constraints is None or pb.constraints(params):
                    break
            else:
                raise RuntimeError(f"{_TRIES} proposals in a row violated the constraints")
            v = pb.evaluate(params, seed * 1000 + len(out))
            if v is not None:  # a failed experiment: no value to model (the next draw differs)
                X.append(self.space.to_unit(params))
                Y.append(v)
            out.append(v)
        return out


# --------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    problem: str
    strategy: str
    seed: int
    n: int


def run_one(run: Run) -> list[list[float] | None]:
    """One run: the objective vectors in experiment order (None: failed)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    pb = make_problem(run.problem)
    runner: Any
    if run.strategy in OURS:
        runner = _Ours(pb, run.strategy, run.seed)
    elif run.strategy in ("optuna-tpe", "optuna-gp"):
        runner = _OptunaMo(pb, run.strategy.split("-")[1], run.seed)
    elif run.strategy == "botorch":
        runner = _BoTorchMo(pb, run.seed)
    else:
        raise ValueError(f"unknown strategy {run.strategy!r} (known: {', '.join(STRATEGIES)})")
    return [None if v is None else list(v) for v in runner.run(pb, run.n, run.seed)]


def hv_after(values: Sequence[Sequence[float] | None], n: int, ref: Sequence[float]) -> float:
    """Hypervolume (minimising, up to ``ref``) of the first ``n`` results."""
    pts = [v for v in values[:n] if v is not None]
    return hypervolume(np.array(pts).reshape(-1, 2), ref) if pts else 0.0


def table(
    results: Mapping[str, Mapping[str, list[list[list[float] | None]]]], checkpoints: Sequence[int]
) -> list[str]:
    lines = []
    for pname, per in results.items():
        ref = make_problem(pname).ref
        lines.append(f"{pname} (reference point {ref}):")
        lines.append(f"  {'strategy':12s}" + "".join(f"{'HV@' + str(c):>26s}" for c in checkpoints))
        meds: dict[str, float] = {}
        for strat, runs in per.items():
            cells = []
            for c in checkpoints:
                hv = [hv_after(r, c, ref) for r in runs]
                cells.append(quantile_row(hv))
                if c == checkpoints[-1]:
                    meds[strat] = quantile(hv, 0.5)  # as in the table
            lines.append(f"  {strat:12s}" + "".join(f"{x:>26s}" for x in cells))
        peers = {k: v for k, v in meds.items() if k in PEERS}
        if "pareto" in meds and peers:
            best = max(peers, key=lambda k: peers[k])
            ok = meds["pareto"] >= peers[best]
            lines.append(
                f"  goal HV@{checkpoints[-1]} >= best peer: ours {meds['pareto']:.4g}, "
                f"{best} {peers[best]:.4g} -> {'met' if ok else 'NOT met'}"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--out", type=Path, default=Path(_HERE) / "results")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 12 experiments")
    ap.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="optpareto.json of an earlier run with the same seeds: its strategies join the "
        "table where this run has none; repeatable",
    )
    a = ap.parse_args(argv)
    problems = [x for x in a.problems.split(",") if x]
    strategies = [x for x in a.strategies.split(",") if x]
    for what, got, known in (
        ("problems", problems, PROBLEMS),
        ("strategies", strategies, STRATEGIES),
    ):
        bad = [x for x in got if x not in known]
        if bad or not got:
            ap.error(f"--{what}: unknown {bad or 'empty'} (known: {', '.join(known)})")
    if a.seeds < 1 or a.workers < 1:
        ap.error("--seeds and --workers must be >= 1")
    seeds = 1 if a.quick else a.seeds
    checkpoints = (6, 12) if a.quick else CHECKPOINTS
    missing = missing_peers([PEER_NEEDS[s] for s in strategies if s in PEERS])
    for name, why in missing.items():
        print(f"skipped {name}: {why}")
    strategies = [s for s in strategies if s not in missing]
    runs = [
        Run(p, s, seed, checkpoints[-1])
        for p in problems
        for s in strategies
        for seed in range(seeds)
    ]
    got: dict[Run, list[list[float] | None]] = {}
    t0 = time.monotonic()

    def done(run: Run, values: list[list[float] | None]) -> None:
        got[run] = values
        print(f"[{time.monotonic() - t0:6.0f} s] {len(got)}/{len(runs)} {run}", file=sys.stderr)

    pool_map(run_one, runs, a.workers, done)
    results: dict[str, dict[str, list[list[list[float] | None]]]] = {
        p: {s: [got[Run(p, s, k, checkpoints[-1])] for k in range(seeds)] for s in strategies}
        for p in problems
    }
    sources = []
    for path in a.reuse:
        try:
            doc = json.loads(path.read_text())
            old, old_seeds = doc["runs"], doc["seeds"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(
                f"--reuse {path}: not an optpareto.json results file ({exc})"
            ) from None
        if old_seeds != list(range(seeds)) or doc["checkpoints"] != list(checkpoints):
            raise SystemExit(f"--reuse {path}: made with other seeds or checkpoints; rerun it")
        for p, per in old.items():
            if p in results:
                for strat, runs_ in per.items():
                    results[p].setdefault(strat, runs_)
        sources.append(f"reused {path} ({doc.get('elapsed_s', 0):.0f} s)")
    lines = [
        f"benchmarks/optpareto.py: {seeds} seed(s) (0..{seeds - 1}), {a.workers} worker(s), "
        f"{time.monotonic() - t0:.0f} s",
        "versions: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()),
        *sources,
        "",
        f"Hypervolume after {' and '.join(map(str, checkpoints))} experiments, one station: "
        "median [q1, q3]",
        *table(results, checkpoints),
    ]
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "optpareto.txt").write_text("\n".join(lines) + "\n")
    (a.out / "optpareto.json").write_text(
        json.dumps(
            {
                "seeds": list(range(seeds)),
                "checkpoints": list(checkpoints),
                "versions": peer_versions(),
                "refs": {p: list(make_problem(p).ref) for p in problems},
                "elapsed_s": time.monotonic() - t0,
                "reused": sources,
                "runs": results,
            },
            indent=1,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
