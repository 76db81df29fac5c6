"""Expected hypervolume improvement (EHVI) for two objectives, by Monte Carlo over the
posterior of one GP per objective; used by :class:`loops.optmulti.ParetoOptimizer` over
the Bayesian strategy.

The objectives are modelled in the minimised frame, each normalised to [0, 1] over the
trusted results, by an independent Matern GP (:func:`loops.optgp.fit_gp`). The
reference point is the front's nadir pushed out by a tenth of the results' range (as
BoTorch's heuristic pushes it by a tenth of the front's), so the improvement counts
along the whole front. A candidate's EHVI is the mean, over fixed standard-normal
draws (the same for every candidate, so candidates compare without noise), of the
exact hypervolume the drawn outcome adds to the front (:func:`hvi2`). Pending and
untrusted points are fantasised: their outcomes are drawn jointly from the posterior
(``fantasies`` draws), each draw conditions the GPs and joins the front, and the EHVI
is averaged over the draws; a point that merely repeats what a pending one will bring
gains nothing. The score is ``log EHVI``; where every draw adds nothing it is
``-1000`` minus how far the predicted mean lies behind the front (the additive epsilon
indicator), so the search still moves towards the front.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.gaussian_process.kernels import Kernel

from loops.optgp import ModelData, Score, Tuning, condition, fit_gp, length_scales
from loops.pareto import nondominated

__all__ = ["MC_DRAWS", "ehvi_scorer", "hvi2", "reference"]

#: standard-normal draws per candidate
MC_DRAWS = 64
_CHUNK = 512  # candidates per vectorised block (bounds the memory: chunk x draws x front)
_FLOOR = -1000.0  # the score where no draw improves the front


def hvi2(
    points: NDArray[np.float64], front: NDArray[np.float64], ref: ArrayLike
) -> NDArray[np.float64]:
    """The exact hypervolume each row of ``points`` (n, 2) adds to ``front`` (m, 2), both
    minimised, bounded by ``ref``: the box from the point to ``ref`` minus the part of it
    the front already dominates (a staircase of the front clipped to the box)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    r0, r1 = float(r[0]), float(r[1])
    f = np.asarray(front, dtype=np.float64).reshape(-1, 2)
    f = f[np.all(f < np.array([r0, r1]), axis=1)]
    if len(f):
        f = f[nondominated(f)]
        f = f[np.lexsort((f[:, 1], f[:, 0]))]
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    a = np.minimum(p[:, 0], r0)
    b = np.minimum(p[:, 1], r1)
    box = (r0 - a) * (r1 - b)
    if not len(f):
        return box
    xp = np.minimum(np.maximum(a[:, None], f[None, :, 0]), r0)
    yp = np.minimum(np.maximum(b[:, None], f[None, :, 1]), r1)
    prev = np.concatenate([np.full((len(p), 1), r1), yp[:, :-1]], axis=1)
    dominated = ((r0 - xp) * (prev - yp)).sum(axis=1)
    return np.asarray(np.maximum(box - dominated, 0.0), dtype=np.float64)


def reference(front: NDArray[np.float64]) -> NDArray[np.float64]:
    """The front's nadir plus a tenth of its range in each objective, at least 0.1 (a tenth
    of the results' range once normalised)."""
    f = np.asarray(front, dtype=np.float64).reshape(-1, 2)
    hi, lo = f.max(axis=0), f.min(axis=0)
    return np.asarray(hi + 0.1 * np.maximum(hi - lo, 1.0), dtype=np.float64)


def _behind(mean: NDArray[np.float64], front: NDArray[np.float64]) -> NDArray[np.float64]:
    """How far each predicted mean (n, 2) lies behind the front: the least amount, over the
    front's points, by which it is worse in its worse objective (0 when nothing dominates it)."""
    gap = (mean[:, None, :] - front[None, :, :]).max(axis=2)  # (n, m)
    return np.asarray(np.maximum(gap.min(axis=1), 0.0), dtype=np.float64)


def ehvi_scorer(
    X: NDArray[np.float64],
    Y: NDArray[np.float64],
    X_lie: NDArray[np.float64],
    *,
    kernel: Kernel,
    tuning: Tuning,
    rng: np.random.RandomState,
    fantasies: int,
) -> tuple[Score, NDArray[np.float64]]:
    """``log EHVI`` over unit points (module docstring) and the GPs' length scales (the
    shorter of the two per column, for the search's step sizes).

    ``X`` (n, d) unit points with trusted results ``Y`` (n, 2), minimised frame;
    ``X_lie``: pending and untrusted points (fantasised)."""
    if Y.shape[1] != 2:
        raise ValueError(f"EHVI here is for 2 objectives, got {Y.shape[1]}")
    lo, hi = Y.min(axis=0), Y.max(axis=0)
    yn = (Y - lo) / np.where(hi > lo, hi - lo, 1.0)
    datas = [ModelData(X=X, y=yn[:, j], X_lie=X_lie, lie=math.nan) for j in range(2)]
    gps = [fit_gp(kernel, dj, tuning, rng) for dj in datas]
    d = X.shape[1]
    scales = np.minimum(length_scales(gps[0], d), length_scales(gps[1], d))
    if len(X_lie):
        seed = rng.randint(2**31 - 1)
        draws = [
            np.asarray(g.sample_y(X_lie, n_samples=fantasies, random_state=seed + j)).reshape(
                len(X_lie), fantasies
            )
            for j, g in enumerate(gps)
        ]
        worlds = []
        for k in range(fantasies):
            pair = [
                condition(g, dj, tuning, rng, dr[:, k])[0]
                for g, dj, dr in zip(gps, datas, draws, strict=True)
            ]
            fy = np.column_stack([dr[:, k] for dr in draws])
            worlds.append((pair, np.vstack([yn, fy])))
    else:
        worlds = [
            ([condition(g, dj, tuning, rng)[0] for g, dj in zip(gps, datas, strict=True)], yn)
        ]
    fronts = [(pair, ys[nondominated(ys)]) for pair, ys in worlds]
    ref = reference(yn[nondominated(yn)])
    z = rng.standard_normal(size=(MC_DRAWS, 2))

    def score(x: NDArray[np.float64]) -> NDArray[np.float64]:
        x = np.asarray(x, dtype=np.float64).reshape(-1, d)
        total = np.zeros(len(x))
        behind = np.full(len(x), np.inf)
        for pair, front in fronts:
            ms = [g.predict(x, return_std=True) for g in pair]
            mean = np.column_stack([np.asarray(m, dtype=np.float64) for m, _ in ms])
            sd = np.column_stack(
                [np.maximum(np.asarray(s, dtype=np.float64), 1e-12) for _, s in ms]
            )
            for i in range(0, len(x), _CHUNK):
                sl = slice(i, i + _CHUNK)
                y = mean[sl, None, :] + sd[sl, None, :] * z[None, :, :]
                total[sl] += hvi2(y.reshape(-1, 2), front, ref).reshape(-1, MC_DRAWS).mean(axis=1)
            behind = np.minimum(behind, _behind(mean, front))
        ehvi = total / len(fronts)
        with np.errstate(divide="ignore"):
            return np.where(ehvi > 0.0, np.log(ehvi), _FLOOR - behind)

    return score, scales
