"""The Bayesian strategy: :class:`BayesOptimizer` (a Matern GP, log EI or UCB maximised
over candidates that respect the constraints, exclusions and pending points; the model in
:mod:`loops.optgp`, the search in :mod:`loops.optsearch`), and :func:`time_suggest`, the timing of its ``ask()`` against bayesian-optimization's
own ``suggest()``.

How it treats statuses, pending points and constraints: :mod:`loops.optimizer`.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from bayes_opt import BayesianOptimization
from bayes_opt.parameter import wrap_kernel
from numpy.typing import NDArray
from scipy.stats import qmc
from sklearn.gaussian_process.kernels import Kernel

from loops.optbase import StrategyBase, penalty_value, rng_state, set_rng_state
from loops.optfeasible import log_weight, weigh
from loops.optgp import (
    FAST_TUNING,
    PACKAGE_TUNING,
    ModelData,
    Score,
    averaged,
    condition,
    fit_gp,
    length_scales,
    log_ei,
    matern,
    scaled,
    score_fn,
)
from loops.optsearch import maximise
from loops.optspace import (
    Constraint,
    Direction,
    Exhausted,
    Params,
    ParamSpace,
    SpaceSpec,
    space_params,
)

__all__ = [
    "FANTASIES",
    "FAST_TUNING",
    "LIES",
    "PACKAGE_TUNING",
    "BayesOptimizer",
    "default_initial_points",
    "log_ei",
    "time_suggest",
]

#: what pending and untrusted points are told to the model (the class docstring)
LIES = ("fantasies", "believer", "mean", "min", "max")
FANTASIES = 4  # joint posterior draws of the pending outcomes (lie="fantasies")


def default_initial_points(dims: int) -> int:
    """Initial design size when none is given: ``max(5, dims + 2)`` (5 on Branin's 2-D,
    8 on Hartmann-6, where 2 dims needed a median of 30 experiments to target against
    27.5 with 8, over 30 seeds; benchmarks/optimizers.py)."""
    return max(5, dims + 2)


def _grid(x: NDArray[np.float64]) -> NDArray[np.int64]:
    """Unit points on a 1e-9 grid (rows that compare equal are the same point)."""
    return np.asarray(np.rint(np.asarray(x) * 1e9), dtype=np.int64) + 0  # + 0: no -0


class BayesOptimizer(StrategyBase):
    """Gaussian-process Bayesian optimisation, ask/tell with pending points.

    ``initial_points`` points of a seeded Latin hypercube come first (the ones
    that violate ``constraints`` are skipped; by default
    :func:`default_initial_points`, ``max(5, d + 2)``). Then each ask fits a GP
    (scikit-learn; Matern 5/2 times a fitted signal variance, ``alpha=1e-6``,
    ``normalize_y``, one length scale per unit column, maximum likelihood; int,
    ordinal and categorical
    columns snapped inside the kernel with bayesian-optimization's
    ``wrap_kernel``) to the trusted results and the penalised
    infeasible/failed points; adds the pending and untrusted points with
    their lie; and maximises the
    acquisition (``"ei"``: log expected improvement over the incumbent +
    ``xi``, ``"ucb"``: mean + ``kappa`` sd) over uniform candidates and
    candidates around the best results, refining the best allowed ones by
    shrinking random steps. A point outside the constraints or an exclusion
    zone is never scored as a proposal.

    ``fast=True`` uses :data:`FAST_TUNING`, ``fast=False``
    :data:`PACKAGE_TUNING` (5x the candidates, every row in the GP).
    ``lie``: what pending and untrusted points are told to the model:
    ``"fantasies"`` (the default: EI averaged over 4 joint posterior draws of
    their outcomes, each conditioning the GP), ``"believer"`` (the GP's
    prediction) or the ``"mean"``/``"min"``/``"max"`` of the trusted results
    (maximised frame); with no pending point they are all the same.
    ``exclusion_radius``: unit-cube
    distance within which nothing is proposed around pending, infeasible,
    failed and untrusted points. The model maximises; ``direction="minimize"``
    negates the values internally. Measured against bayes-opt, Optuna and
    BoTorch: ``benchmarks/optimizers.py``.
    """

    strategy = "bayes"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        *,
        direction: Direction = "minimize",
        seed: int = 0,
        initial_points: int | None = None,
        constraints: Constraint | None = None,
        acquisition: Literal["ei", "ucb"] = "ei",
        fast: bool = True,
        lie: Literal["fantasies", "believer", "mean", "min", "max"] = "fantasies",
        exclusion_radius: float = 0.02,
        xi: float = 0.01,
        kappa: float = 2.576,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        if acquisition not in ("ei", "ucb"):
            raise ValueError(f"acquisition must be 'ei' or 'ucb', got {acquisition!r}")
        if lie not in LIES:
            raise ValueError(f"lie must be one of {', '.join(LIES)}, got {lie!r}")
        if initial_points is None:
            initial_points = default_initial_points(len(self.space))
        if isinstance(initial_points, bool) or not isinstance(initial_points, int):
            raise ValueError(f"initial_points must be an int >= 0, got {initial_points!r}")
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
        #: replaces the GP acquisition: the model data -> a log-scale score and the length
        #: scales (the ParetoOptimizer's EHVI, :mod:`loops.optehvi`); still weighted by
        #: :meth:`acquisition_weight` and searched over the allowed points
        self.score_override: Callable[[ModelData], tuple[Score, NDArray[np.float64]]] | None = None

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

    def _restore_extra(self, state: Mapping[str, Any]) -> None:
        self._design = [self.space.validate(p) for p in state["design"]]
        self._cursor = int(state["cursor"])
        set_rng_state(self._rng, state["rng"])

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
        kernel = matern(d)
        if self.space._int_cols.size:
            kernel = wrap_kernel(kernel, transform=self.space.round_unit)
        return scaled(kernel)

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

    def _model_data(self) -> ModelData:
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
        penalty = penalty_value(ys)
        if ys:
            lo, hi = min(ys), max(ys)
            lie = {"believer": math.nan, "mean": statistics.fmean(ys), "min": lo, "max": hi}
        else:
            lie = {"believer": math.nan, "mean": penalty, "min": penalty, "max": penalty}
        lie["fantasies"] = math.nan
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
        return ModelData(
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

    def _unexcluded_fn(self) -> Callable[[NDArray[np.float64]], NDArray[np.bool_]]:
        """Vectorised test of unit points: in the box, outside every exclusion zone and not
        an exact repeat (the known constraints are not checked here)."""
        zone, exact = self._exclusions()
        r2 = max(self.exclusion_radius, 1e-9) ** 2
        zone_n = (zone**2).sum(1)
        # exact repeats by hashing on a 1e-9 grid (a distance matrix to every result
        # cost 0.15 s per ask at 1,000 results)
        exact_keys = {row.tobytes() for row in _grid(exact)}

        def near_zone(x: NDArray[np.float64]) -> NDArray[np.bool_]:
            if not len(zone):
                return np.zeros(len(x), dtype=bool)
            d2 = (x**2).sum(1)[:, None] + zone_n[None, :] - 2.0 * x @ zone.T
            return np.asarray(d2.min(axis=1) <= r2)

        def repeated(x: NDArray[np.float64]) -> NDArray[np.bool_]:
            if not exact_keys:
                return np.zeros(len(x), dtype=bool)
            keys = _grid(x)
            return np.fromiter((k.tobytes() in exact_keys for k in keys), bool, len(keys))

        def unexcluded(x: NDArray[np.float64]) -> NDArray[np.bool_]:
            xr = self.space.round_unit(np.asarray(x, dtype=np.float64).reshape(-1, len(self.space)))
            ok = ~near_zone(xr) & ~repeated(xr)
            return ok & np.all((xr >= 0.0) & (xr <= 1.0), axis=1)

        return unexcluded

    def _allowed_fn(self) -> Callable[[NDArray[np.float64]], NDArray[np.bool_]]:
        """:meth:`_unexcluded_fn` and the known constraints."""
        unexcluded = self._unexcluded_fn()

        def allowed(x: NDArray[np.float64]) -> NDArray[np.bool_]:
            xr = self.space.round_unit(np.asarray(x, dtype=np.float64).reshape(-1, len(self.space)))
            ok = unexcluded(xr)
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

    def _scorer(self, data: ModelData) -> tuple[Score, NDArray[np.float64]]:
        """The acquisition every candidate is scored with, and the GP's length scales.

        The one place candidate values are computed: the GP fitted on the real
        data, conditioned on the pending points' lies (or averaged over
        ``FANTASIES`` joint posterior draws of their outcomes), and weighted
        by :meth:`acquisition_weight` (the learned probability of feasibility,
        :mod:`loops.optfeasible`; nothing when nothing was learned): EI times
        the weight (in log space), UCB as :func:`loops.optfeasible.weigh` does.
        """
        weight = self.acquisition_weight
        if self.score_override is not None:  # a log-scale acquisition from outside (EHVI)
            other, scales = self.score_override(data)

            def weighted_log(x: NDArray[np.float64]) -> NDArray[np.float64]:
                return other(x) + log_weight(weight(x))

            return weighted_log, scales
        tn = self.tuning
        gp_real = fit_gp(self._kernel, data, tn, self._rng)
        scales = length_scales(gp_real, len(self.space))
        kw = {"xi": self.xi, "kappa": self.kappa}
        score: Score
        if self.lie == "fantasies" and len(data.X_lie):
            draws = np.asarray(
                gp_real.sample_y(
                    data.X_lie, n_samples=FANTASIES, random_state=self._rng.randint(2**31 - 1)
                ),
                dtype=np.float64,
            ).reshape(len(data.X_lie), FANTASIES)
            fits = [condition(gp_real, data, tn, self._rng, draws[:, j]) for j in range(FANTASIES)]
            score = averaged(
                [score_fn(g, inc, self.acquisition, **kw) for g, inc in fits], self.acquisition
            )
        else:
            gp, incumbent = condition(gp_real, data, tn, self._rng)
            score = score_fn(gp, incumbent, self.acquisition, **kw)
        # learned feasibility (loops/optfeasible.py): the acquisition times P(feasible); EI in
        # log space, UCB as optfeasible.weigh treats a value to minimise
        base = score

        def weighted(x: NDArray[np.float64]) -> NDArray[np.float64]:
            w = np.asarray(weight(x), dtype=np.float64)
            if self.acquisition == "ucb":
                return -weigh(-base(x), w)
            return base(x) + log_weight(w)

        return weighted, scales

    def _suggest(self, data: ModelData) -> Params:
        """Maximise the acquisition over the allowed unit points (:mod:`loops.optsearch`)."""
        score, scales = self._scorer(data)
        best = maximise(
            score,
            X=data.X,
            y=data.y,
            scales=scales,
            tuning=self.tuning,
            rng=self._rng,
            snap=self.space.round_unit,
            unexcluded=self._unexcluded_fn(),
            feasible=lambda u: self._feasible(self.space.from_unit(u)),
        )
        if best is None:
            return self._random_allowed()
        return self.space.from_unit(best)


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
