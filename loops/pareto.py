"""Several objectives: dominance, the Pareto front, hypervolume and scalarisation.

Pure functions over an ``(n, k)`` array of objective values, every column already in
the *minimised* frame (:func:`min_frame` negates the maximised ones). Used by the
multi-objective optimizer (:mod:`loops.optmulti`), the stop rules of a program with
several objectives (:mod:`loops.programmodel`) and the report's Pareto section.

::

    Y = min_frame([[2.1, 0.9], [1.5, 1.4], [3.0, 1.0]], ["minimize", "minimize"])
    front = nondominated(Y)                  # [True, True, False]
    hv = hypervolume(Y[front], ref=[4.0, 2.0])

The hypervolume is exact (a sweep in 2-D, slicing along the last objective above),
fine for the few objectives and the hundreds of results a campaign has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "chebyshev",
    "dominates",
    "hypervolume",
    "min_frame",
    "nondominated",
    "normalise",
    "reference_point",
]


def min_frame(values: ArrayLike, directions: Sequence[str]) -> NDArray[np.float64]:
    """``values`` (n, k) with every maximised column negated: smaller is better everywhere."""
    y = np.array(values, dtype=np.float64, ndmin=2)
    if y.size == 0:
        return y.reshape(0, len(directions))
    if y.shape[1] != len(directions):
        raise ValueError(f"values have {y.shape[1]} objectives, directions {len(directions)}")
    for j, d in enumerate(directions):
        if d == "maximize":
            y[:, j] = -y[:, j]
        elif d != "minimize":
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {d!r}")
    return y


def dominates(a: ArrayLike, b: ArrayLike) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere (minimised frame)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.all(x <= y) and np.any(x < y))


def nondominated(y: ArrayLike) -> NDArray[np.bool_]:
    """Mask of the rows no other row dominates (duplicates of a front point all stay)."""
    pts = np.array(y, dtype=np.float64, ndmin=2)
    n = len(pts)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        le = np.all(pts <= pts[i], axis=1)
        lt = np.any(pts < pts[i], axis=1)
        if np.any(le & lt):
            keep[i] = False
    return keep


def hypervolume(y: ArrayLike, ref: ArrayLike) -> float:
    """The volume dominated by the rows of ``y`` and bounded by ``ref`` (minimised frame);
    rows not strictly better than ``ref`` in every objective add nothing."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    pts = np.array(y, dtype=np.float64, ndmin=2)
    if pts.size == 0:
        return 0.0
    if pts.shape[1] != len(r):
        raise ValueError(f"points have {pts.shape[1]} objectives, the reference {len(r)}")
    pts = pts[np.all(pts < r, axis=1)]
    if not len(pts):
        return 0.0
    return _hv(pts[nondominated(pts)], r)


def _hv(pts: NDArray[np.float64], r: NDArray[np.float64]) -> float:
    k = pts.shape[1]
    if k == 1:
        return float(r[0] - pts[:, 0].min())
    if k == 2:
        order = np.argsort(pts[:, 0], kind="stable")
        total, best_y = 0.0, float(r[1])
        for x, y in pts[order]:
            if y < best_y:
                total += (r[0] - x) * (best_y - y)
                best_y = float(y)
        return float(total)
    order = np.argsort(pts[:, -1], kind="stable")
    pts = pts[order]
    total = 0.0
    for i in range(len(pts)):
        top = pts[i + 1, -1] if i + 1 < len(pts) else r[-1]
        depth = float(top - pts[i, -1])
        if depth <= 0:
            continue
        below = pts[: i + 1, :-1]
        total += depth * _hv(below[nondominated(below)], r[:-1])
    return total


def reference_point(
    y: ArrayLike, thresholds: Sequence[float | None], *, margin: float = 0.1
) -> NDArray[np.float64]:
    """The hypervolume's reference (minimised frame): each objective's threshold when it has
    one, else its worst value in ``y`` pushed out by ``margin`` of its range (1 when
    ``y`` has a single value there)."""
    pts = np.array(y, dtype=np.float64, ndmin=2)
    ref = np.zeros(len(thresholds), dtype=np.float64)
    for j, t in enumerate(thresholds):
        if t is not None:
            ref[j] = float(t)
            continue
        col = pts[:, j] if pts.size else np.zeros(1)
        span = float(col.max() - col.min())
        ref[j] = float(col.max()) + margin * (span if span > 0 else 1.0)
    return ref


def normalise(y: ArrayLike) -> NDArray[np.float64]:
    """Each column scaled to [0, 1] over its own range (a constant column to 0)."""
    pts = np.array(y, dtype=np.float64, ndmin=2)
    if not pts.size:
        return pts
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (pts - lo) / span


def chebyshev(y: ArrayLike, weights: ArrayLike, *, rho: float = 0.05) -> NDArray[np.float64]:
    """ParEGO's augmented Chebyshev scalarisation of normalised rows (smaller is better):
    ``max_j(w_j y_j) + rho * sum_j(w_j y_j)``. Every Pareto-optimal point minimises it
    for some weights."""
    pts = np.array(y, dtype=np.float64, ndmin=2)
    w = np.asarray(weights, dtype=np.float64).ravel()
    wy = pts * w
    return np.asarray(wy.max(axis=1) + rho * wy.sum(axis=1), dtype=np.float64)
