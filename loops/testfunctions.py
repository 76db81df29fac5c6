"""Standard optimisation test functions and the runs the benchmark makes with them.

* :data:`BRANIN` -- 2-D, ``x1`` in [-5, 10], ``x2`` in [0, 15]; global minimum
  0.397887 at (-pi, 12.275), (pi, 2.275) and (9.42478, 2.475).
* :data:`HARTMANN6` -- 6-D, [0, 1]^6; global minimum -3.32237 at
  (0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573).

(Definitions: Surjanovic & Bingham, Virtual Library of Simulation Experiments,
sfu.ca/~ssurjano.) Both are minimised. :func:`run_to_target` counts the
evaluations a strategy needs to reach a value, sequentially or with ``batch``
experiments in flight (K stations: each finished experiment is told, then the
freed station gets the next proposal, while the others stay pending).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from loops.optimizer import Exhausted, Optimizer, ParamValue

__all__ = [
    "BRANIN",
    "HARTMANN6",
    "TestFunction",
    "branin",
    "hartmann6",
    "run_to_target",
    "run_values",
]


def branin(x: NDArray[np.float64]) -> float:
    """Branin-Hoo at ``x = (x1, x2)``."""
    x1, x2 = float(x[0]), float(x[1])
    b = 5.1 / (4 * math.pi**2)
    c = 5 / math.pi
    t = 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H6_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)


def hartmann6(x: NDArray[np.float64]) -> float:
    """Hartmann 6-D at ``x`` in [0, 1]^6."""
    x = np.asarray(x, dtype=np.float64)
    inner = np.sum(_H6_A * (x[None, :] - _H6_P) ** 2, axis=1)
    return float(-np.sum(_H6_ALPHA * np.exp(-inner)))


@dataclass(frozen=True)
class TestFunction:
    """A test function over a named box, called with a params mapping; minimised."""

    __test__ = False  # not a pytest class

    name: str
    space: dict[str, tuple[float, float, type]]
    minimum: float
    argmin: tuple[tuple[float, ...], ...]
    fn: Callable[[NDArray[np.float64]], float]

    def __call__(self, params: Mapping[str, ParamValue]) -> float:
        return self.fn(np.array([float(params[k]) for k in self.space], dtype=np.float64))


BRANIN = TestFunction(
    name="branin",
    space={"x1": (-5.0, 10.0, float), "x2": (0.0, 15.0, float)},
    minimum=0.397887,
    argmin=((-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)),
    fn=branin,
)

HARTMANN6 = TestFunction(
    name="hartmann6",
    space={f"x{i + 1}": (0.0, 1.0, float) for i in range(6)},
    minimum=-3.32237,
    argmin=((0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573),),
    fn=hartmann6,
)


def run_values(
    optimizer_factory: Callable[[], Optimizer],
    fn: Callable[[Mapping[str, ParamValue]], float],
    max_evals: int,
    *,
    batch: int = 1,
    stop_at: float | None = None,
) -> list[float]:
    """Values in the order experiments finish, with ``batch`` experiments in flight.

    Stations finish first-in first-out (equal durations). Stops after
    ``max_evals`` results, when the strategy is :class:`Exhausted`, or at the
    first value ``<= stop_at``. The optimizer must minimise.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    opt = optimizer_factory()
    in_flight: deque[tuple[str, dict[str, ParamValue]]] = deque()
    values: list[float] = []
    exhausted = False
    while len(values) < max_evals:
        while not exhausted and len(in_flight) < batch and len(values) + len(in_flight) < max_evals:
            try:
                p = opt.ask()
            except Exhausted:
                exhausted = True
                break
            in_flight.append((p.id, p.params))
        if not in_flight:
            break
        pid, params = in_flight.popleft()
        value = float(fn(params))
        opt.tell(pid, value)
        values.append(value)
        if stop_at is not None and value <= stop_at:
            break
    return values


def run_to_target(
    optimizer_factory: Callable[[], Optimizer],
    fn: Callable[[Mapping[str, ParamValue]], float],
    target: float,
    max_evals: int,
    batch: int = 1,
) -> int | None:
    """Evaluations until a value ``<= target`` (minimising), or None if not within ``max_evals``.

    ``batch`` = K simulates K stations (K proposals pending at every ask).
    """
    values = run_values(optimizer_factory, fn, max_evals, batch=batch, stop_at=target)
    if values and values[-1] <= target:
        return len(values)
    return None
