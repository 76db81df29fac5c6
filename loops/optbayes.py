"""The Bayesian strategy: :class:`BayesOptimizer` (bayesian-optimization's ``TargetSpace``,
a Matern GP and EI/UCB acquisitions masked by the constraints, exclusions and pending
points), and :func:`time_suggest`, the timing of its ``ask()`` against the package's own.

How it treats statuses, pending points and constraints: :mod:`loops.optimizer`.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import numpy as np
from bayes_opt import BayesianOptimization
from bayes_opt import acquisition as bo_acquisition
from bayes_opt.parameter import wrap_kernel
from bayes_opt.target_space import TargetSpace
from numpy.typing import NDArray
from scipy.stats import qmc
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Kernel, Matern

from loops.optbase import StrategyBase, rng_state, set_rng_state
from loops.optfeasible import weigh
from loops.optspace import (
    Constraint,
    Direction,
    Exhausted,
    Params,
    ParamSpace,
    SpaceSpec,
    space_params,
)

__all__ = ["FAST_TUNING", "PACKAGE_TUNING", "BayesOptimizer", "time_suggest"]

_BIG = 1e10  # acquisition value (minimised) of a point that may not be proposed
_Weight = Callable[[NDArray[np.float64]], NDArray[np.float64]] | None


def _masked(
    acq: Callable[[NDArray[Any]], NDArray[Any]],
    allowed: Callable[[NDArray[np.float64]], NDArray[np.bool_]],
    dim: int,
    weight: _Weight = None,
) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
    """Acquisition (to minimise) with disallowed or non-finite points pushed to _BIG, weighted
    by the learned probability of feasibility (:func:`loops.optfeasible.weigh`)."""

    def f(x: NDArray[np.float64]) -> NDArray[np.float64]:
        x2 = x.reshape(-1, dim)
        raw = np.asarray(acq(x2), dtype=np.float64)
        v = raw.reshape(-1) if weight is None else weigh(raw.reshape(-1), weight(x2))
        ok = allowed(x2) & np.isfinite(v)
        return np.where(ok, v, _BIG).reshape(raw.shape)

    return f


class _MaskedEI(bo_acquisition.ExpectedImprovement):
    """The package's EI, never proposing outside ``allowed`` (constraints, exclusions)."""

    def __init__(
        self,
        xi: float,
        allowed: Callable[[NDArray[np.float64]], NDArray[np.bool_]],
        weight: _Weight = None,
    ):
        super().__init__(xi=xi)
        self.allowed, self.weight = allowed, weight

    def _get_acq(self, gp: GaussianProcessRegressor, constraint: Any = None) -> Any:
        acq = super()._get_acq(gp, constraint)
        return _masked(acq, self.allowed, gp.X_train_.shape[1], self.weight)


class _MaskedUCB(bo_acquisition.UpperConfidenceBound):
    """The package's UCB, never proposing outside ``allowed``."""

    def __init__(
        self,
        kappa: float,
        allowed: Callable[[NDArray[np.float64]], NDArray[np.bool_]],
        weight: _Weight = None,
    ):
        super().__init__(kappa=kappa)
        self.allowed, self.weight = allowed, weight

    def _get_acq(self, gp: GaussianProcessRegressor, constraint: Any = None) -> Any:
        acq = super()._get_acq(gp, constraint)
        return _masked(acq, self.allowed, gp.X_train_.shape[1], self.weight)


@dataclass(frozen=True)
class _Tuning:
    """Acquisition-optimizer settings.

    ``n_random`` random candidates and ``n_smart`` L-BFGS-B starts (the
    package's ``acquisition.suggest`` arguments), ``gp_restarts`` extra starts
    of the GP hyperparameter fit, hyperparameters fitted on at most
    ``max_fit_points`` rows.
    """

    n_random: int
    n_smart: int
    gp_restarts: int
    max_fit_points: int


#: bayesian-optimization 3.4's own defaults (``suggest()`` and the GP it builds).
PACKAGE_TUNING = _Tuning(n_random=10_000, n_smart=10, gp_restarts=5, max_fit_points=1_000_000)
#: Ours (``fast=True``); see time_suggest() and the report for the measurements.
FAST_TUNING = _Tuning(n_random=2_000, n_smart=2, gp_restarts=1, max_fit_points=150)


@dataclass(frozen=True)
class _ModelData:
    X: NDArray[np.float64]  # unit points with data (trusted or penalised)
    y: NDArray[np.float64]  # their targets, maximised frame
    X_lie: NDArray[np.float64]  # pending / untrusted points to lie about
    lie: float  # constant lie (nan for "believer": predicted per point)


class BayesOptimizer(StrategyBase):
    """Gaussian-process Bayesian optimisation over bayesian-optimization 3.4.

    ``initial_points`` points of a seeded Latin hypercube come first (the ones
    that violate ``constraints`` are skipped). Then each ask fits the
    package's GP set-up (Matern 5/2, ``alpha=1e-6``, ``normalize_y``), here
    with one length scale per parameter on the unit cube and int parameters
    rounded inside the kernel (as the package does for its int parameters),
    to the trusted results and the penalised infeasible/failed points; adds
    the pending and untrusted points with their lie; and maximises the
    package's acquisition (``"ei"``: ``ExpectedImprovement(xi)``, ``"ucb"``:
    ``UpperConfidenceBound(kappa)``) with its random-candidates + L-BFGS-B
    optimiser, masked by the constraints and the exclusion zones.

    ``fast=True`` uses :data:`FAST_TUNING` (2,000 random candidates, 2
    L-BFGS-B starts, 1 GP restart, hyperparameters fitted on at most 150
    rows) instead of the package's 10,000 / 10 / 5 / all: the same
    evaluations to target on Hartmann-6, and ~0.02 / 0.08 / 0.17 s per
    suggest at 50 / 200 / 500 observations in 3-D (package settings on this
    model: 0.13 / 0.42 / 6.8 s; the package's own ``suggest()``: 0.12 / 0.19
    / 0.54 s). ``lie``: the value given to pending and untrusted points,
    ``"believer"`` (the GP's prediction) or the ``"mean"``/``"min"``/``"max"``
    of the trusted results (maximised frame). ``exclusion_radius``: unit-cube
    distance within which nothing is proposed around pending, infeasible,
    failed and untrusted points. bayes_opt maximises; ``direction="minimize"``
    negates the values internally.
    """

    strategy = "bayes"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        *,
        direction: Direction = "minimize",
        seed: int = 0,
        initial_points: int = 8,
        constraints: Constraint | None = None,
        acquisition: Literal["ei", "ucb"] = "ei",
        fast: bool = True,
        lie: Literal["believer", "mean", "min", "max"] = "believer",
        exclusion_radius: float = 0.02,
        xi: float = 0.01,
        kappa: float = 2.576,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        if acquisition not in ("ei", "ucb"):
            raise ValueError(f"acquisition must be 'ei' or 'ucb', got {acquisition!r}")
        if lie not in ("believer", "mean", "min", "max"):
            raise ValueError(f"lie must be 'believer', 'mean', 'min' or 'max', got {lie!r}")
        if initial_points < 0:
            raise ValueError(f"initial_points must be >= 0, got {initial_points}")
        if not exclusion_radius >= 0:
            raise ValueError(f"exclusion_radius must be >= 0, got {exclusion_radius}")
        self.seed = int(seed)
        self.initial_points = int(initial_points)
        self.acquisition = acquisition
        self.fast = bool(fast)
        self.lie = lie
        self.exclusion_radius = float(exclusion_radius)
        self.xi = float(xi)
        self.kappa = float(kappa)
        self.tuning = FAST_TUNING if self.fast else PACKAGE_TUNING
        self._rng = np.random.RandomState(self.seed)
        self._design: list[Params] = self._make_design()
        self._cursor = 0
        self._kernel = self._make_kernel()
        #: seconds spent in the last model-based suggest (0 for design/random points)
        self.last_suggest_seconds = 0.0

    # -- state --------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "initial_points": self.initial_points,
            "acquisition": self.acquisition,
            "fast": self.fast,
            "lie": self.lie,
            "exclusion_radius": self.exclusion_radius,
            "xi": self.xi,
            "kappa": self.kappa,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {
            "config": self._config(),
            "design": [dict(p) for p in self._design],
            "cursor": self._cursor,
            "rng": rng_state(self._rng),
        }

    @classmethod
    def from_state(
        cls,
        space: SpaceSpec | ParamSpace,
        state: Mapping[str, Any],
        *,
        constraints: Constraint | None = None,
    ) -> Self:
        """Restore from :meth:`state` (pass the same ``constraints`` callable again)."""
        cls._check_state(state)
        opt = cls(space, direction=state["direction"], constraints=constraints, **state["config"])
        opt._restore_common(state)
        opt._design = [opt.space.validate(p) for p in state["design"]]
        opt._cursor = int(state["cursor"])
        set_rng_state(opt._rng, state["rng"])
        return opt

    # -- proposing ----------------------------------------------------------

    def _make_design(self) -> list[Params]:
        """Seeded Latin hypercube of ``initial_points`` feasible points (batches until enough)."""
        n = self.initial_points
        if n == 0:
            return []
        engine = qmc.LatinHypercube(d=len(self.space), rng=np.random.default_rng(self.seed))
        out: list[Params] = []
        seen: set[tuple[float, ...]] = set()
        for _ in range(50):
            for u in engine.random(n):
                p = self.space.from_unit(u)
                k = self.space.key(p)
                if k not in seen and self._feasible(p):
                    seen.add(k)
                    out.append(p)
                    if len(out) == n:
                        return out
        return out  # constraints leave little room: the model phase takes over

    def _make_kernel(self) -> Kernel:
        d = len(self.space)
        kernel: Kernel = Matern(
            length_scale=np.full(d, 0.5), length_scale_bounds=(1e-3, 1e3), nu=2.5
        )
        if self.space._int_cols.size:
            kernel = wrap_kernel(kernel, transform=self.space.round_unit)
        return kernel

    def _propose(self) -> Params:
        self.last_suggest_seconds = 0.0
        while self._cursor < len(self._design):
            p = self._design[self._cursor]
            self._cursor += 1
            if self._allowed(self.space.to_unit(p)[None, :])[0]:
                return dict(p)
        data = self._model_data()
        if not len(data.y):  # nothing measured yet (all pending/untrusted): keep filling space
            return self._random_allowed()
        t0 = time.perf_counter()
        try:
            return self._suggest(data)
        finally:
            self.last_suggest_seconds = time.perf_counter() - t0

    def _model_data(self) -> _ModelData:
        """GP data in the unit cube and the maximised frame, duplicates merged.

        Rows: trusted results (mean per point) and penalised infeasible/failed
        points; separately the points to lie about (pending and untrusted ones
        that are not already data points).
        """
        ys = [
            self._sign * o.value
            for o in self._observations
            if o.status == "ok" and o.value is not None
        ]
        if ys:
            lo, hi = min(ys), max(ys)
            spread = hi - lo if hi > lo else max(abs(hi), 1.0)
            penalty = lo - 0.25 * spread
            lie = {"believer": math.nan, "mean": statistics.fmean(ys), "min": lo, "max": hi}
        else:
            penalty = -1.0
            lie = {"believer": math.nan, "mean": penalty, "min": penalty, "max": penalty}
        oks: dict[tuple[float, ...], list[float]] = {}
        pens: set[tuple[float, ...]] = set()
        lies: dict[tuple[float, ...], None] = {}  # ordered set
        for o in self._observations:
            k = self.space.key(o.params)
            if o.status == "ok" and o.value is not None:
                oks.setdefault(k, []).append(self._sign * o.value)
            elif o.status in ("infeasible", "failed"):
                pens.add(k)
            else:
                lies[k] = None
        for p in self._pending.values():
            lies[self.space.key(p)] = None
        keys = list(oks) + [
            k
            for k in dict.fromkeys(self.space.key(o.params) for o in self._observations)
            if k in pens and k not in oks
        ]
        y = [statistics.fmean(oks[k]) if k in oks else penalty for k in keys]
        lie_keys = [k for k in lies if k not in oks and k not in pens]
        d = len(self.space)
        return _ModelData(
            X=self._units(keys).reshape(-1, d),
            y=np.array(y, dtype=np.float64),
            X_lie=self._units(lie_keys).reshape(-1, d),
            lie=lie[self.lie],
        )

    def _units(self, keys: Sequence[tuple[float, ...]]) -> NDArray[np.float64]:
        names = self.space.names
        return np.array(
            [self.space.to_unit(dict(zip(names, k, strict=True))) for k in keys], dtype=np.float64
        )

    def _exclusions(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Unit points with an exclusion zone, and points that must not be repeated exactly."""
        zone = [self.space.to_unit(p) for p in self._pending.values()]
        exact: list[NDArray[np.float64]] = []
        trusted = {self.space.key(o.params) for o in self._observations if o.status == "ok"}
        for o in self._observations:
            # A point that also has a trusted result (re-run) keeps only its exact spot.
            near_ok = o.status == "ok" or self.space.key(o.params) in trusted
            (exact if near_ok else zone).append(self.space.to_unit(o.params))
        d = len(self.space)
        return np.array(zone).reshape(-1, d), np.array(exact).reshape(-1, d)

    def _allowed_fn(self) -> Callable[[NDArray[np.float64]], NDArray[np.bool_]]:
        zone, exact = self._exclusions()
        r2 = max(self.exclusion_radius, 1e-9) ** 2
        zone_n = (zone**2).sum(1)
        exact_n = (exact**2).sum(1)

        def near(
            x: NDArray[np.float64], pts: NDArray[np.float64], pn: NDArray[np.float64], lim: float
        ) -> NDArray[np.bool_]:
            if not len(pts):
                return np.zeros(len(x), dtype=bool)
            d2 = (x**2).sum(1)[:, None] + pn[None, :] - 2.0 * x @ pts.T
            return np.asarray(d2.min(axis=1) <= lim)

        def allowed(x: NDArray[np.float64]) -> NDArray[np.bool_]:
            xr = self.space.round_unit(np.asarray(x, dtype=np.float64).reshape(-1, len(self.space)))
            ok = ~near(xr, zone, zone_n, r2) & ~near(xr, exact, exact_n, 1e-12)
            ok &= np.all((xr >= 0.0) & (xr <= 1.0), axis=1)
            if self.constraints is not None:
                for i in np.flatnonzero(ok):
                    ok[i] = self._feasible(self.space.from_unit(xr[i]))
            return ok

        return allowed

    def _allowed(self, x: NDArray[np.float64]) -> NDArray[np.bool_]:
        return self._allowed_fn()(x)

    def _random_allowed(self, tries: int = 100_000) -> Params:
        allowed = self._allowed_fn()
        for _ in range(max(1, tries // 1000)):
            cand = self.space.round_unit(self._rng.uniform(size=(1000, len(self.space))))
            ok = np.flatnonzero(allowed(cand))
            if ok.size:
                return self.space.from_unit(cand[ok[0]])
        raise Exhausted(
            "no feasible, unexcluded point found: the constraints and the exclusion zones "
            "around pending/infeasible/failed/untrusted points cover the space"
        )

    def _fit_gp(self, data: _ModelData) -> GaussianProcessRegressor:
        """GP with hyperparameters fitted on the real data (lies never shape them).

        Above ``max_fit_points`` rows the hyperparameters are fitted on a seeded
        random subset, then the GP is conditioned on all rows with them fixed.
        """
        gp = GaussianProcessRegressor(
            kernel=self._kernel,
            alpha=1e-6,
            normalize_y=True,
            n_restarts_optimizer=self.tuning.gp_restarts,
            random_state=self._rng,
        )
        X, y = data.X, data.y
        if len(y) > self.tuning.max_fit_points:
            idx = np.sort(self._rng.choice(len(y), self.tuning.max_fit_points, replace=False))
            X, y = X[idx], y[idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.fit(X, y)
        return gp

    def _suggest(self, data: _ModelData) -> Params:
        d = len(self.space)
        gp = self._fit_gp(data)
        X, y = data.X, data.y
        if len(data.X_lie):
            if self.lie == "believer":  # Kriging believer: the model's own prediction
                lies = np.asarray(gp.predict(data.X_lie), dtype=np.float64)
            else:
                lies = np.full(len(data.X_lie), data.lie)
            X, y = np.vstack([X, data.X_lie]), np.concatenate([y, lies])
        if len(y) != len(gp.y_train_):  # condition on every row, hyperparameters kept
            gp = GaussianProcessRegressor(
                kernel=gp.kernel_, alpha=1e-6, normalize_y=True, optimizer=None
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gp.fit(X, y)
        ts = TargetSpace(None, {f"x{i}": (0.0, 1.0) for i in range(d)})
        for xi, yi in zip(X, y, strict=True):
            ts.register(xi, float(yi))
        allowed = self._allowed_fn()
        # the hook of learned feasibility (loops/optfeasible.py): acquisition x P(feasible)
        weight = self.acquisition_weight
        acq: bo_acquisition.AcquisitionFunction
        if self.acquisition == "ei":
            acq = _MaskedEI(self.xi, allowed, weight)
        else:
            acq = _MaskedUCB(self.kappa, allowed, weight)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = acq.suggest(
                gp=gp,
                target_space=ts,
                n_random=self.tuning.n_random,
                n_smart=self.tuning.n_smart,
                fit_gp=False,
                random_state=self._rng,
            )
            params = self.space.from_unit(self.space.round_unit(np.asarray(x, dtype=np.float64)))
            if allowed(self.space.to_unit(params)[None, :])[0]:
                return params
            # The optimum is in a masked region (all the random stage saw was masked, or
            # L-BFGS-B ended outside): take the best allowed point of larger samples.
            f = acq._get_acq(gp)
            for _ in range(10):
                cand = self.space.round_unit(self._rng.uniform(size=(self.tuning.n_random, d)))
                v = f(cand)
                i = int(np.argmin(v))
                if v[i] < _BIG:
                    return self.space.from_unit(cand[i])
        return self._random_allowed()


def time_suggest(
    n_obs: int,
    *,
    dims: int = 3,
    fast: bool = True,
    reference: bool = False,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Median seconds of one model-based ``ask()`` with ``n_obs`` trusted observations.

    ``dims`` float parameters in [0, 1]; the observations are uniform random
    points of a smooth function. Each timed ask is cancelled afterwards, so
    every repeat sees the same data. ``fast=False``: our model with the
    package's acquisition settings (:data:`PACKAGE_TUNING`).
    ``reference=True``: the package itself, ``BayesianOptimization.suggest()``
    with all its defaults, on the same data (the "before" column).
    """
    space = {f"x{i}": (0.0, 1.0, float) for i in range(dims)}
    rng = np.random.RandomState(seed)
    units = rng.uniform(size=(n_obs, dims))
    values = [float(np.sum(np.sin(3.0 * u) * (u - 0.4) ** 2)) for u in units]
    times = []
    if reference:
        bo = BayesianOptimization(
            None, {k: (0.0, 1.0) for k in space}, random_state=seed, verbose=0
        )
        for u, v in zip(units, values, strict=True):
            bo.register(dict(zip(space, map(float, u), strict=True)), -v)
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bo.suggest()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    opt = BayesOptimizer(space, direction="minimize", seed=seed, initial_points=0, fast=fast)
    for u, v in zip(units, values, strict=True):
        opt.tell(space_params(space, u), v)
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        p = opt.ask()
        times.append(time.perf_counter() - t0)
        opt.cancel(p.id)
    return statistics.median(times)
