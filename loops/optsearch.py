"""Maximising an acquisition over the unit cube: uniform candidates and candidates around
the best results, the best allowed ones refined by shrinking random steps.

No gradients: the acquisition is scored in batches (one GP prediction per batch), and
a step is kept only when it is better *and* allowed (in the box, outside the exclusion
zones, within the known constraints), so the search never leaves the allowed set.
Used by :class:`loops.optbayes.BayesOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from loops.optgp import Score, Tuning

__all__ = ["maximise"]

Mask = Callable[[NDArray[np.float64]], NDArray[np.bool_]]


def maximise(
    score: Score,
    *,
    X: NDArray[np.float64],
    y: NDArray[np.float64],
    scales: NDArray[np.float64],
    tuning: Tuning,
    rng: np.random.RandomState,
    snap: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    unexcluded: Mask,
    feasible: Callable[[NDArray[np.float64]], bool],
) -> NDArray[np.float64] | None:
    """The best allowed unit point found, or None when no candidate was allowed.

    ``X``/``y``: the data (maximised frame; candidates go around its best five
    rows, half of them around the best); ``scales``: the GP's length scales
    (steps of half of one, between 0.005 and 0.2); ``snap``: the space's
    rounding of int/ordinal/categorical columns; ``unexcluded``: a vectorised
    test (box, exclusion zones); ``feasible``: the known constraints at one
    point (checked only on the few candidates that could win).
    """
    d = X.shape[1]
    step = np.clip(0.5 * scales, 0.005, 0.2)
    top = X[np.argsort(-y, kind="stable")[: max(1, min(5, len(y)))]]
    centres = top[rng.randint(0, len(top), size=tuning.n_local)]
    centres[: tuning.n_local // 2] = top[0]  # half of them around the incumbent
    cand = np.vstack(
        [
            rng.uniform(size=(tuning.n_random, d)),
            np.clip(centres + rng.normal(size=(tuning.n_local, d)) * step, 0.0, 1.0),
        ]
    )
    cand = snap(cand)
    cand = cand[unexcluded(cand)]
    vals = score(cand) if len(cand) else np.empty(0)
    starts: list[tuple[float, NDArray[np.float64]]] = []
    for i in np.argsort(-vals, kind="stable"):
        if len(starts) == tuning.n_refine:
            break
        if feasible(cand[i]):
            starts.append((float(vals[i]), cand[i]))
    if not starts:
        return None
    per = 4 * d
    for r in range(tuning.refine_rounds):
        size = step * 0.5**r
        base = np.array([x for _, x in starts])
        trial = np.repeat(base, per, axis=0) + rng.normal(size=(len(base) * per, d)) * size
        trial = snap(np.clip(trial, 0.0, 1.0))
        tv = score(trial)
        tv[~unexcluded(trial)] = -np.inf
        for j in range(len(starts)):
            block = tv[j * per : (j + 1) * per]
            for k in np.argsort(-block, kind="stable"):
                if not block[k] > starts[j][0]:
                    break
                if feasible(trial[j * per + k]):
                    starts[j] = (float(block[k]), trial[j * per + k])
                    break
    return max(starts, key=lambda s: s[0])[1]
