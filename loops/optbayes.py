"""The Bayesian strategy: :class:`BayesOptimizer` (a Matern GP with MAP length scales, log
EI or UCB maximised over candidates that respect the constraints, exclusions and pending
points), and :func:`time_suggest`, the timing of its ``ask()`` against bayesian-optimization's
own ``suggest()``.

How it treats statuses, pending points and constraints: :mod:`loops.optimizer`.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Self

import numpy as np
from bayes_opt import BayesianOptimization
from bayes_opt.parameter import wrap_kernel
from numpy.typing import NDArray
from scipy.optimize import minimize
from scipy.special import erfcx, log_ndtr, logsumexp, ndtr
from scipy.stats import qmc
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Kernel, Matern

from loops.optbase import StrategyBase, rng_state, set_rng_state
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
    "FAST_TUNING",
    "PACKAGE_TUNING",
    "BayesOptimizer",
    "default_initial_points",
    "log_ei",
    "time_suggest",
]

_FANTASIES = 4  # posterior draws of the pending outcomes (lie="fantasies")
_LOG_2PI_HALF = 0.5 * math.log(2.0 * math.pi)
_LOG_PI_2_HALF = 0.5 * math.log(math.pi / 2.0)


def log_ei(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """``log(phi(z) + z Phi(z))``, the log of expected improvement per unit of sigma.

    Accurate where EI underflows (far below the incumbent, ``z << 0``), so
    the acquisition still orders candidates there (Ament et al. 2023, "LogEI").
    """
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    hi = z > -1.0
    zh = z[hi]
    out[hi] = np.log(np.exp(-0.5 * zh**2) / math.sqrt(2 * math.pi) + zh * ndtr(zh))
    zl = z[~hi]
    # phi(z) + z Phi(z) = phi(z) (1 - |z| erfcx(-z/sqrt2) sqrt(pi/2)) for z <= -1
    t = np.log(erfcx(-zl / math.sqrt(2.0)) * np.abs(zl)) + _LOG_PI_2_HALF
    out[~hi] = -0.5 * zl**2 - _LOG_2PI_HALF + np.log(-np.expm1(np.minimum(t, -1e-300)))
    return out


@dataclass(frozen=True)
class _Tuning:
    """Model and acquisition-optimizer settings.

    Each model-based ask scores ``n_random`` uniform candidates and
    ``n_local`` candidates drawn around the best results (Gaussian steps of
    half the fitted length scale, at most 0.2), then refines the
    ``n_refine`` best allowed ones by ``refine_rounds`` rounds of shrinking
    random steps. GP hyperparameters: maximum a posteriori with a log-normal
    prior on the length scales (``prior``; else maximum likelihood), fitted
    with ``gp_restarts`` extra starts on at most ``max_fit_points`` rows; the
    GP is conditioned on at most ``max_cond_points`` rows (the better half
    by value, then a seeded random choice of the rest).
    """

    n_random: int
    n_local: int
    n_refine: int
    refine_rounds: int
    gp_restarts: int
    max_fit_points: int
    max_cond_points: int
    prior: bool = True
    prior_shift: float = math.sqrt(2.0)
    prior_sd: float = math.sqrt(3.0)


#: Thorough settings (``fast=False``): 5x the candidates, more restarts, every row.
PACKAGE_TUNING = _Tuning(
    n_random=10_000,
    n_local=5_000,
    n_refine=20,
    refine_rounds=10,
    gp_restarts=5,
    max_fit_points=1_000_000,
    max_cond_points=1_000_000,
)
#: The default (``fast=True``); see time_suggest() and benchmarks/optimizers.py for timings.
FAST_TUNING = _Tuning(
    n_random=2_000,
    n_local=1_000,
    n_refine=8,
    refine_rounds=8,
    gp_restarts=1,
    max_fit_points=150,
    max_cond_points=400,
)


def _map_optimizer(
    mu: float, sigma: float, n_prior: int
) -> Callable[..., tuple[NDArray[np.float64], float]]:
    """A GPR ``optimizer``: L-BFGS-B on the negative log marginal likelihood plus a normal
    prior ``N(mu, sigma)`` on the first ``n_prior`` log hyperparameters (the length scales)."""

    def optimizer(
        obj_func: Callable[..., tuple[float, NDArray[np.float64]]],
        initial_theta: NDArray[np.float64],
        bounds: NDArray[np.float64],
    ) -> tuple[NDArray[np.float64], float]:
        def f(theta: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
            v, g = obj_func(theta, eval_gradient=True)
            dt = (theta[:n_prior] - mu) / sigma
            g = np.array(g, dtype=np.float64)
            g[:n_prior] += dt / sigma
            return float(v) + 0.5 * float(dt @ dt), g

        res = minimize(f, initial_theta, jac=True, method="L-BFGS-B", bounds=bounds)
        return np.asarray(res.x, dtype=np.float64), float(res.fun)

    return optimizer


def default_initial_points(dims: int) -> int:
    """Initial design size when none is given: ``max(8, 2 * dims)`` (8 on Branin's 2-D,
    12 on Hartmann-6: there 8 left a heavy tail, benchmarks/optimizers.py)."""
    return max(8, 2 * dims)


@dataclass(frozen=True)
class _ModelData:
    X: NDArray[np.float64]  # unit points with data (trusted or penalised)
    y: NDArray[np.float64]  # their targets, maximised frame
    X_lie: NDArray[np.float64]  # pending / untrusted points to lie about
    lie: float  # constant lie (nan for "believer": predicted per point)


class BayesOptimizer(StrategyBase):
    """Gaussian-process Bayesian optimisation, ask/tell with pending points.

    ``initial_points`` points of a seeded Latin hypercube come first (the ones
    that violate ``constraints`` are skipped; by default
    :func:`default_initial_points`, ``max(8, 2 d)``). Then each ask fits a GP
    (scikit-learn; Matern 5/2, ``alpha=1e-6``, ``normalize_y``, one length
    scale per parameter on the unit cube, int parameters rounded inside the
    kernel with bayesian-optimization's ``wrap_kernel``) to the trusted
    results and the penalised infeasible/failed points, its length scales
    maximum a posteriori under a dimension-scaled log-normal prior; adds the
    pending and untrusted points with their lie; and maximises the
    acquisition (``"ei"``: log expected improvement over the incumbent +
    ``xi``, ``"ucb"``: mean + ``kappa`` sd) over uniform candidates and
    candidates around the best results, refining the best allowed ones by
    shrinking random steps. A point outside the constraints or an exclusion
    zone is never scored as a proposal.

    ``fast=True`` uses :data:`FAST_TUNING`, ``fast=False``
    :data:`PACKAGE_TUNING` (5x the candidates, every row in the GP).
    ``lie``: the value given to pending and untrusted points, ``"believer"``
    (the GP's prediction) or the ``"mean"``/``"min"``/``"max"`` of the
    trusted results (maximised frame); ``"penalize"``: no value, EI is
    locally penalised around them instead. ``exclusion_radius``: unit-cube
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
        lie: Literal["believer", "mean", "min", "max", "penalize", "fantasies"] = "believer",
        exclusion_radius: float = 0.02,
        xi: float = 0.01,
        kappa: float = 2.576,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        if acquisition not in ("ei", "ucb"):
            raise ValueError(f"acquisition must be 'ei' or 'ucb', got {acquisition!r}")
        if lie not in ("believer", "mean", "min", "max", "penalize", "fantasies"):
            raise ValueError(
                "lie must be 'believer', 'mean', 'min', 'max', 'penalize' or 'fantasies', "
                f"got {lie!r}"
            )
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
        lie["penalize"] = lie["fantasies"] = math.nan
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

    def _unexcluded_fn(self) -> Callable[[NDArray[np.float64]], NDArray[np.bool_]]:
        """Vectorised test of unit points: in the box, outside every exclusion zone and not
        an exact repeat (the known constraints are not checked here)."""
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

        def unexcluded(x: NDArray[np.float64]) -> NDArray[np.bool_]:
            xr = self.space.round_unit(np.asarray(x, dtype=np.float64).reshape(-1, len(self.space)))
            ok = ~near(xr, zone, zone_n, r2) & ~near(xr, exact, exact_n, 1e-12)
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

    def _fit_gp(self, data: _ModelData) -> GaussianProcessRegressor:
        """GP with hyperparameters fitted on the real data (lies never shape them).

        Above ``max_fit_points`` rows the hyperparameters are fitted on a seeded
        random subset. With ``prior``, the length scales' logs have a normal
        prior ``N(sqrt(2) + log(d) / 2, sqrt(3))`` (on the unit cube: the
        dimension-scaled prior of Hvarfner et al. 2024, BoTorch's default), so
        a few points in many dimensions do not fit a wiggly model.
        """
        d = len(self.space)
        optimizer: Any = "fmin_l_bfgs_b"
        if self.tuning.prior:
            optimizer = _map_optimizer(
                self.tuning.prior_shift + 0.5 * math.log(d), self.tuning.prior_sd, d
            )
        gp = GaussianProcessRegressor(
            kernel=self._kernel,
            alpha=1e-6,
            normalize_y=True,
            optimizer=optimizer,
            # extra random starts while the data is small (a multimodal likelihood); past the
            # fit cap one start from the default length scales (a fit there costs 3x a start)
            n_restarts_optimizer=self.tuning.gp_restarts
            if len(data.y) < self.tuning.max_fit_points
            else 0,
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

    def _condition(
        self,
        gp: GaussianProcessRegressor,
        data: _ModelData,
        lies: NDArray[np.float64] | None = None,
    ) -> tuple[GaussianProcessRegressor, NDArray[np.float64], float]:
        """The GP on the data and the lies (hyperparameters kept), the fitted length scales,
        and the incumbent: the best value among the data and the lies (a believed lie counts).

        Above ``max_cond_points`` rows: the better half of that many by value
        and a seeded random choice of the rest (the lies always). ``lies``:
        the values to give the pending points (one fantasy) instead of the lie.
        """
        X, y = data.X, data.y
        cap = self.tuning.max_cond_points
        if len(y) > cap:
            order = np.argsort(-y, kind="stable")
            top, rest = order[: cap // 2], order[cap // 2 :]
            pick = np.concatenate([top, self._rng.choice(rest, cap - len(top), replace=False)])
            X, y = X[np.sort(pick)], y[np.sort(pick)]
        if len(data.X_lie):
            if lies is not None:
                pass
            elif self.lie in ("believer", "fantasies"):  # the model's own prediction
                lies = np.asarray(gp.predict(data.X_lie), dtype=np.float64)
            else:
                lies = np.full(len(data.X_lie), data.lie)
            X, y = np.vstack([X, data.X_lie]), np.concatenate([y, lies])
        scales = np.broadcast_to(
            np.asarray(gp.kernel_.get_params()["length_scale"], dtype=np.float64),
            (len(self.space),),
        )
        if len(y) != len(gp.y_train_) or not np.array_equal(X, gp.X_train_):
            gp = GaussianProcessRegressor(
                kernel=gp.kernel_, alpha=1e-6, normalize_y=True, optimizer=None
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gp.fit(X, y)
        return gp, scales, float(np.max(y))

    def _acquisition(
        self, gp: GaussianProcessRegressor, best: float
    ) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
        """Score of unit points, larger is better: log EI over ``best + xi``, or UCB."""

        def score(x: NDArray[np.float64]) -> NDArray[np.float64]:
            mean, std = gp.predict(x, return_std=True)
            mean = np.asarray(mean, dtype=np.float64)
            std = np.maximum(np.asarray(std, dtype=np.float64), 1e-12)
            if self.acquisition == "ucb":
                return mean + self.kappa * std
            return log_ei((mean - best - self.xi) / std) + np.log(std)

        return score

    def _penalizer(
        self, gp: GaussianProcessRegressor, pending: NDArray[np.float64], best: float
    ) -> Callable[[NDArray[np.float64]], NDArray[np.float64]]:
        """Local penalisation of the pending points (González et al. 2016), in log space.

        ``log Phi((L |x - x_j| - best + mu_j) / sd_j)`` summed over the pending
        ``x_j``: near zero far from them, very negative inside the ball where,
        given the mean's Lipschitz constant ``L`` (the largest gradient of the
        GP mean over a seeded sample), the maximum cannot lie.
        """
        if not len(pending):
            return lambda x: np.zeros(len(x))
        d = len(self.space)
        mu, sd = gp.predict(pending, return_std=True)
        sd = np.maximum(np.asarray(sd, dtype=np.float64), 1e-9)
        sample = self._rng.uniform(size=(200, d))
        h = 1e-4
        base = np.asarray(gp.predict(sample), dtype=np.float64)
        grads = np.stack(
            [(np.asarray(gp.predict(sample + h * np.eye(d)[i])) - base) / h for i in range(d)],
            axis=1,
        )
        lip = max(float(np.sqrt((grads**2).sum(axis=1)).max()), 1e-7)

        def penal(x: NDArray[np.float64]) -> NDArray[np.float64]:
            dist = np.sqrt(((x[:, None, :] - pending[None, :, :]) ** 2).sum(axis=2))
            z = (lip * dist - best + np.asarray(mu)[None, :]) / sd[None, :]
            return np.asarray(log_ndtr(z).sum(axis=1), dtype=np.float64)

        return penal

    def _suggest(self, data: _ModelData) -> Params:
        """Maximise the acquisition over candidates, then refine the best allowed ones."""
        d = len(self.space)
        tn = self.tuning
        gp_real = self._fit_gp(data)
        score: Callable[[NDArray[np.float64]], NDArray[np.float64]]
        if self.lie == "penalize":
            gp, scales, incumbent = self._condition(gp_real, replace(data, X_lie=data.X_lie[:0]))
            acq = self._acquisition(gp, incumbent)
            penal = self._penalizer(gp, data.X_lie, incumbent)

            def penalised(x: NDArray[np.float64]) -> NDArray[np.float64]:
                return acq(x) + penal(x)

            score = penalised

        elif self.lie == "fantasies" and len(data.X_lie):
            # EI averaged over joint posterior draws of the pending points' outcomes
            draws = np.asarray(
                gp_real.sample_y(
                    data.X_lie, n_samples=_FANTASIES, random_state=self._rng.randint(2**31 - 1)
                ),
                dtype=np.float64,
            ).reshape(len(data.X_lie), _FANTASIES)
            fits = [self._condition(gp_real, data, draws[:, j]) for j in range(_FANTASIES)]
            scales = fits[0][1]
            accs = [self._acquisition(g, inc) for g, _, inc in fits]

            def averaged(x: NDArray[np.float64]) -> NDArray[np.float64]:
                v = np.stack([a(x) for a in accs])
                if self.acquisition == "ucb":
                    return np.asarray(v.mean(axis=0), dtype=np.float64)
                return np.asarray(logsumexp(v, axis=0) - math.log(len(accs)), dtype=np.float64)

            score = averaged
        else:
            gp, scales, incumbent = self._condition(gp_real, data)
            score = self._acquisition(gp, incumbent)
        unexcluded = self._unexcluded_fn()
        rng = self._rng
        # candidates: uniform, and Gaussian steps around the best results (half a length scale)
        step = np.clip(0.5 * scales, 0.005, 0.2)
        top = data.X[np.argsort(-data.y, kind="stable")[: max(1, min(5, len(data.y)))]]
        centres = top[rng.randint(0, len(top), size=tn.n_local)]
        centres[: tn.n_local // 2] = top[0]  # half of them around the incumbent
        cand = np.vstack(
            [
                rng.uniform(size=(tn.n_random, d)),
                np.clip(centres + rng.normal(size=(tn.n_local, d)) * step, 0.0, 1.0),
            ]
        )
        cand = self.space.round_unit(cand)
        ok = unexcluded(cand)
        cand = cand[ok]
        vals = score(cand) if len(cand) else np.empty(0)
        starts: list[tuple[float, NDArray[np.float64]]] = []
        for i in np.argsort(-vals, kind="stable"):
            if len(starts) == tn.n_refine:
                break
            if self._feasible(self.space.from_unit(cand[i])):
                starts.append((float(vals[i]), cand[i]))
        if not starts:
            return self._random_allowed()
        # refinement: shrinking random steps from each start, kept when better and allowed
        per = 4 * d
        for r in range(tn.refine_rounds):
            size = step * 0.5**r
            base = np.array([x for _, x in starts])
            trial = np.repeat(base, per, axis=0) + rng.normal(size=(len(base) * per, d)) * np.tile(
                size, (len(base) * per, 1)
            )
            trial = self.space.round_unit(np.clip(trial, 0.0, 1.0))
            tv = score(trial)
            tv[~unexcluded(trial)] = -np.inf
            for j in range(len(starts)):
                block = tv[j * per : (j + 1) * per]
                for k in np.argsort(-block, kind="stable"):
                    if not block[k] > starts[j][0]:
                        break
                    x = trial[j * per + k]
                    if self._feasible(self.space.from_unit(x)):
                        starts[j] = (float(block[k]), x)
                        break
        best = max(starts, key=lambda s: s[0])[1]
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
