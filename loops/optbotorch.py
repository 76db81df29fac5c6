"""The BoTorch strategy (``strategy: botorch``, the ``botorch`` extra): :class:`BoTorchStrategy`.

BoTorch's single-objective loop as its tutorials (and Ax's default generation strategy)
run it, behind the ask/tell contract of :mod:`loops.optimizer`: a scrambled Sobol design
of ``max(5, 2 d)`` points (``d``: unit-cube columns), then at every ask a ``SingleTaskGP``
(inputs in the unit cube, ``Standardize`` outcome) fitted by ``fit_gpytorch_mll``,
``qLogNoisyExpectedImprovement`` with the pending points as ``X_pending``, maximised by
``optimize_acqf`` (q = 1, 10 restarts, 512 raw samples). With 4 in flight on Hartmann-6 it
needs fewer experiments than the ``bayes`` strategy (docs/optimizer.md, "The botorch
strategy"); an ask costs several times more CPU.

Imported only when the strategy is chosen (:mod:`loops.optregistry`): torch and BoTorch
are an optional extra (``pip install 'labbridge[botorch]'``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim import optimize_acqf
from gpytorch.mlls import ExactMarginalLogLikelihood
from numpy.typing import NDArray
from torch.quasirandom import SobolEngine

from loops.optbase import StrategyBase, penalty_value
from loops.optfeasible import log_weight
from loops.optspace import (
    Constraint,
    Direction,
    Exhausted,
    Params,
    ParamSpace,
    SpaceSpec,
)

__all__ = ["BoTorchStrategy", "default_initial_points"]

_TRIES = 1000  # design points in a row refused (constraints, repeats) before giving up
_POOL = 2048  # Sobol points scored when the optimiser's best is not allowed or weights apply
_POOL_BATCHES = 8  # more such batches while none of them is allowed


def default_initial_points(columns: int) -> int:
    """The Sobol design's size when none is given: ``max(5, 2 d)`` over the unit-cube
    columns (BoTorch's tutorials and Ax's default; the ``bayes`` strategy uses ``d + 2``)."""
    return max(5, 2 * columns)


class BoTorchStrategy(StrategyBase):
    """Sobol design, then BoTorch's GP and qLogNEI at each ask (module docstring).

    How it treats what it is told (the ``bayes`` strategy's contract, :mod:`loops.optimizer`):

    * ``ok`` results are the GP's data (every result a row; the model maximises, so
      ``direction="minimize"`` negates them).
    * ``infeasible`` and ``failed`` points join the data with the ``bayes`` strategy's
      penalty (:func:`loops.optbase.penalty_value`: worse than every result seen), unless
      the same point also has a trusted result.
    * ``untrusted`` points are treated like running ones: ``X_pending``, never data.
    * The learned feasibility and a cost model (:meth:`StrategyBase.acquisition_weight`)
      weigh the choice, not the gradient search: when either has something to say, the
      proposal is the best of the optimiser's restart points and a Sobol sample of 2048
      by ``log qNEI + log weight``. Otherwise it is the optimiser's best point, as in
      BoTorch's loop.
    * A proposal never violates ``constraints`` and never repeats a pending or observed
      point: when the optimiser's point does (after int, ordinal and categorical columns are
      snapped, :meth:`ParamSpace.round_unit`), the best allowed point of that pool is
      proposed instead; :class:`Exhausted` when nothing allowed is found.

    An ask runs torch on one thread (:meth:`_suggest`). The state is plain JSON: randomness derives from ``seed``, the Sobol position and the id
    counter (each model-based ask seeds torch from ``(seed, counter)`` inside
    ``torch.random.fork_rng``, so the caller's torch RNG is left alone), and the model is
    rebuilt from the observations at every ask. ``initial_points``: the design's size
    (:func:`default_initial_points` by default); told results of any status and pending
    points count towards it, and the design continues while no result is trusted.
    """

    strategy = "botorch"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        *,
        direction: Direction = "minimize",
        seed: int = 0,
        initial_points: int | None = None,
        constraints: Constraint | None = None,
        num_restarts: int = 10,
        raw_samples: int = 512,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        if initial_points is None:
            initial_points = default_initial_points(len(self.space))
        for name, value, low in (
            ("initial_points", initial_points, 0),
            ("num_restarts", num_restarts, 1),
            ("raw_samples", raw_samples, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.seed = int(seed)
        self.initial_points = int(initial_points)
        self.num_restarts = int(num_restarts)
        self.raw_samples = int(raw_samples)
        self._sobol_drawn = 0  # design points drawn from the seeded Sobol sequence
        #: seconds spent in the last model-based suggest (0 for design points)
        self.last_suggest_seconds = 0.0

    # -- state --------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "initial_points": self.initial_points,
            "num_restarts": self.num_restarts,
            "raw_samples": self.raw_samples,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"config": self._config(), "sobol_drawn": self._sobol_drawn}

    def _restore_extra(self, state: Mapping[str, Any]) -> None:
        self._sobol_drawn = int(state["sobol_drawn"])

    # -- proposing ----------------------------------------------------------

    def _taken(self) -> set[tuple[Any, ...]]:
        """Points a proposal must not repeat: every pending and observed one."""
        keys = {self.space.key(p) for p in self._pending.values()}
        keys.update(self.space.key(o.params) for o in self._observations)
        return keys

    def _allowed(self, params: Params, taken: set[tuple[Any, ...]]) -> bool:
        return self.space.key(params) not in taken and self._feasible(params)

    def _propose(self) -> Params:
        self.last_suggest_seconds = 0.0
        trusted = any(o.status == "ok" for o in self._observations)
        spent = len(self._observations) + len(self._pending)
        if not trusted or spent < self.initial_points:
            return self._design_point()
        t0 = time.perf_counter()
        try:
            return self._suggest()
        finally:
            self.last_suggest_seconds = time.perf_counter() - t0

    def _design_point(self) -> Params:
        """The next allowed point of the seeded Sobol sequence."""
        engine = SobolEngine(len(self.space), scramble=True, seed=self.seed)
        if self._sobol_drawn:
            engine.fast_forward(self._sobol_drawn)
        taken = self._taken()
        for _ in range(_TRIES):
            u = engine.draw(1, dtype=torch.float64)[0].numpy()
            self._sobol_drawn += 1
            params = self.space.from_unit(u)
            if self._allowed(params, taken):
                return params
        raise Exhausted(
            f"botorch: {_TRIES} design points in a row violated the constraints or repeated "
            "a pending or observed point"
        )

    def _model_data(
        self,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """Unit-cube rows and maximised values (trusted results, penalised refusals and
        failures), and the points to treat as running (pending and untrusted ones)."""
        ys = [
            self._sign * o.value
            for o in self._observations
            if o.status == "ok" and o.value is not None
        ]
        penalty = penalty_value(ys)
        ok_keys = {self.space.key(o.params) for o in self._observations if o.status == "ok"}
        rows: list[NDArray[np.float64]] = []
        values: list[float] = []
        penalised: set[tuple[Any, ...]] = set()
        running: dict[tuple[Any, ...], NDArray[np.float64]] = {}
        for o in self._observations:
            key = self.space.key(o.params)
            if o.status == "ok" and o.value is not None:
                rows.append(self.space.to_unit(o.params))
                values.append(self._sign * o.value)
            elif o.status in ("infeasible", "failed"):
                if key not in ok_keys and key not in penalised:
                    penalised.add(key)
                    rows.append(self.space.to_unit(o.params))
                    values.append(penalty)
            elif key not in ok_keys:
                running[key] = self.space.to_unit(o.params)
        for p in self._pending.values():
            running.setdefault(self.space.key(p), self.space.to_unit(p))
        for key in penalised:
            running.pop(key, None)
        d = len(self.space)
        return (
            np.array(rows, dtype=np.float64).reshape(-1, d),
            np.array(values, dtype=np.float64).reshape(-1, 1),
            np.array(list(running.values()), dtype=np.float64).reshape(-1, d),
        )

    def _ask_seed(self) -> int:
        """torch's seed for this ask: from the seed and the id counter (both in the state)."""
        return int(np.random.SeedSequence([self.seed, self._counter]).generate_state(1)[0])

    def _suggest(self) -> Params:
        """One model-based ask, torch on one thread (restored afterwards): the GP's matrices
        are small, and two threads made an ask ~3x slower on a busy 2-core machine."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._suggest_one_thread()
        finally:
            torch.set_num_threads(threads)

    def _suggest_one_thread(self) -> Params:
        X, Y, running = self._model_data()
        d = len(self.space)
        bounds = torch.stack(
            [torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)]
        )
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fit and optimiser warnings: still a proposal
            torch.manual_seed(self._ask_seed())
            tX = torch.from_numpy(X)
            model = SingleTaskGP(tX, torch.from_numpy(Y), outcome_transform=Standardize(m=1))
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
            acq = qLogNoisyExpectedImprovement(
                model, X_baseline=tX, X_pending=torch.from_numpy(running) if len(running) else None
            )
            cands, vals = optimize_acqf(
                acq,
                bounds=bounds,
                q=1,
                num_restarts=self.num_restarts,
                raw_samples=self.raw_samples,
                return_best_only=False,
            )
            starts = cands.detach().reshape(-1, d).numpy()
            taken = self._taken()
            weighted = not self.feasibility_model().empty or self.cost_model is not None
            if not weighted and vals is not None:
                best = self.space.from_unit(self.space.round_unit(starts[int(torch.argmax(vals))]))
                if self._allowed(best, taken):
                    return best
            return self._best_of_pool(acq, starts, taken, weighted)

    def _best_of_pool(
        self, acq: Any, starts: NDArray[np.float64], taken: set[tuple[Any, ...]], weighted: bool
    ) -> Params:
        """The allowed point of highest (weighted) acquisition among the restart points and
        Sobol samples (more batches while none is allowed). Runs inside :meth:`_suggest`'s
        seeded torch RNG."""
        sobol = SobolEngine(len(self.space), scramble=True, seed=self._ask_seed())
        pool = starts
        for _ in range(_POOL_BATCHES):
            pool = np.vstack([pool, sobol.draw(_POOL, dtype=torch.float64).numpy()])
            snapped = self.space.round_unit(pool)
            points: dict[tuple[Any, ...], int] = {}
            for i, u in enumerate(snapped):
                params = self.space.from_unit(u)
                key = self.space.key(params)
                if key not in points and self._allowed(params, taken):
                    points[key] = i
            if points:
                break
            pool = np.empty((0, len(self.space)))
        else:
            raise Exhausted(
                "botorch: no allowed point found: the constraints and the pending and observed "
                "points cover the space"
            )
        rows = snapped[list(points.values())]
        with torch.no_grad():  # in chunks: each holds a joint posterior with the baseline
            score = np.concatenate(
                [
                    acq(torch.from_numpy(rows[i : i + 256]).unsqueeze(1)).numpy()
                    for i in range(0, len(rows), 256)
                ]
            ).astype(np.float64)
        if weighted:
            score = score + log_weight(self.acquisition_weight(rows))
        return self.space.from_unit(rows[int(np.argmax(score))])
