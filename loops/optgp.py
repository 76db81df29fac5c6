"""The Bayesian strategy's model: a scikit-learn Matern GP on the unit cube, its
hyperparameter fit, its conditioning on the data and the pending points' lies, and the
acquisition functions (log expected improvement, UCB) it scores candidates with.

Used by :class:`loops.optbayes.BayesOptimizer`; where the candidates come from and how
the best is refined: :mod:`loops.optsearch`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.special import erfcx, logsumexp, ndtr
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Kernel, Matern

__all__ = [
    "FAST_TUNING",
    "PACKAGE_TUNING",
    "ModelData",
    "Score",
    "Tuning",
    "averaged",
    "condition",
    "fit_gp",
    "length_scales",
    "log_ei",
    "matern",
    "scaled",
    "score_fn",
]

_LOG_2PI_HALF = 0.5 * math.log(2.0 * math.pi)
_LOG_PI_2_HALF = 0.5 * math.log(math.pi / 2.0)
_ALPHA = 1e-6  # the GP's jitter (noiseless measurements up to rounding)

#: an acquisition over unit points (n, d) -> (n,), larger is better
Score = Callable[[NDArray[np.float64]], NDArray[np.float64]]


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
class Tuning:
    """Model and acquisition-optimizer settings.

    Each model-based ask scores ``n_random`` uniform candidates and
    ``n_local`` candidates drawn around the best results (Gaussian steps of
    half the fitted length scale, at most 0.2), then refines the
    ``n_refine`` best allowed ones by ``refine_rounds`` rounds of shrinking
    random steps (:mod:`loops.optsearch`). GP hyperparameters: maximum
    likelihood with ``gp_restarts`` extra starts on at most ``max_fit_points``
    rows; the GP is conditioned on at most
    ``max_cond_points`` rows (the better half by value, then a seeded random
    choice of the rest).
    """

    n_random: int
    n_local: int
    n_refine: int
    refine_rounds: int
    gp_restarts: int
    max_fit_points: int
    max_cond_points: int


#: Thorough settings (``fast=False``): 5x the candidates, more restarts, every row.
PACKAGE_TUNING = Tuning(
    n_random=10_000,
    n_local=5_000,
    n_refine=20,
    refine_rounds=10,
    gp_restarts=5,
    max_fit_points=1_000_000,
    max_cond_points=1_000_000,
)
#: The default (``fast=True``); timings: benchmarks/optimizers.py.
FAST_TUNING = Tuning(
    n_random=2_000,
    n_local=1_000,
    n_refine=8,
    refine_rounds=8,
    gp_restarts=1,
    max_fit_points=100,
    max_cond_points=300,
)


@dataclass(frozen=True)
class ModelData:
    X: NDArray[np.float64]  # unit points with data (trusted or penalised)
    y: NDArray[np.float64]  # their targets, maximised frame
    X_lie: NDArray[np.float64]  # pending / untrusted points to lie about
    lie: float  # constant lie (nan: the GP's prediction, per point)


def matern(d: int) -> Kernel:
    """Matern 5/2 with one length scale per unit-cube column."""
    return Matern(length_scale=np.full(d, 0.5), length_scale_bounds=(1e-3, 1e3), nu=2.5)


def scaled(kernel: Kernel) -> Kernel:
    """``kernel`` times a fitted signal variance (on the standardised targets).

    With the variance fixed at 1, experiments to target (median over seeds 0-19) were
    35 on Hartmann-6 and 23 on Branin; fitted, 31 and 20 (benchmarks/optimizers.py).
    """
    return ConstantKernel(1.0, (1e-2, 1e2)) * kernel


def _gpr(kernel: Kernel, **kw: object) -> GaussianProcessRegressor:
    return GaussianProcessRegressor(kernel=kernel, alpha=_ALPHA, normalize_y=True, **kw)


def fit_gp(
    kernel: Kernel, data: ModelData, tuning: Tuning, rng: np.random.RandomState
) -> GaussianProcessRegressor:
    """GP with hyperparameters (maximum likelihood) fitted on the real data (lies never
    shape them).

    Above ``max_fit_points`` rows the hyperparameters are fitted on a seeded
    random subset. Extra random starts while the data is small (a multimodal
    likelihood); past the fit cap one start from the default length scales.
    """
    gp = _gpr(
        kernel,
        n_restarts_optimizer=tuning.gp_restarts if len(data.y) < tuning.max_fit_points else 0,
        random_state=rng,
    )
    X, y = data.X, data.y
    if len(y) > tuning.max_fit_points:
        idx = np.sort(rng.choice(len(y), tuning.max_fit_points, replace=False))
        X, y = X[idx], y[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp.fit(X, y)
    return gp


def condition(
    gp: GaussianProcessRegressor,
    data: ModelData,
    tuning: Tuning,
    rng: np.random.RandomState,
    lies: NDArray[np.float64] | None = None,
) -> tuple[GaussianProcessRegressor, float]:
    """The GP on the data and the lies (hyperparameters kept), and the incumbent: the
    best value among the data and the lies (a believed lie counts).

    Above ``max_cond_points`` rows: the better half of that many by value
    and a seeded random choice of the rest (the lies always). ``lies``: the
    values of the pending points (one fantasy); else ``data.lie``, or the
    GP's prediction where that is nan (Kriging believer).
    """
    X, y = data.X, data.y
    cap = tuning.max_cond_points
    if len(y) > cap:
        order = np.argsort(-y, kind="stable")
        top, rest = order[: cap // 2], order[cap // 2 :]
        pick = np.sort(np.concatenate([top, rng.choice(rest, cap - len(top), replace=False)]))
        X, y = X[pick], y[pick]
    if len(data.X_lie):
        if lies is None:
            if math.isnan(data.lie):
                lies = np.asarray(gp.predict(data.X_lie), dtype=np.float64)
            else:
                lies = np.full(len(data.X_lie), data.lie)
        X, y = np.vstack([X, data.X_lie]), np.concatenate([y, lies])
    if len(y) != len(gp.y_train_) or not np.array_equal(X, gp.X_train_):
        gp = _gpr(gp.kernel_, optimizer=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.fit(X, y)
    return gp, float(np.max(y))


def length_scales(gp: GaussianProcessRegressor, d: int) -> NDArray[np.float64]:
    """The fitted length scales, one per unit column."""
    params = gp.kernel_.get_params()
    scale = next(
        v for k, v in params.items() if k == "length_scale" or k.endswith("__length_scale")
    )
    return np.broadcast_to(np.asarray(scale, dtype=np.float64), (d,)).copy()


def score_fn(
    gp: GaussianProcessRegressor, best: float, kind: str, *, xi: float, kappa: float
) -> Score:
    """Score of unit points, larger is better: log EI over ``best + xi``, or UCB."""

    def score(x: NDArray[np.float64]) -> NDArray[np.float64]:
        mean, std = gp.predict(x, return_std=True)
        mean = np.asarray(mean, dtype=np.float64)
        std = np.maximum(np.asarray(std, dtype=np.float64), 1e-12)
        if kind == "ucb":
            return mean + kappa * std
        return log_ei((mean - best - xi) / std) + np.log(std)

    return score


def averaged(scores: list[Score], kind: str) -> Score:
    """The mean of several acquisitions (one per fantasy): EI's mean in log space."""

    def score(x: NDArray[np.float64]) -> NDArray[np.float64]:
        v = np.stack([s(x) for s in scores])
        if kind == "ucb":
            return np.asarray(v.mean(axis=0), dtype=np.float64)
        return np.asarray(logsumexp(v, axis=0) - math.log(len(scores)), dtype=np.float64)

    return score
