"""The baseline strategies: :class:`RandomSearch` (seeded uniform points) and
:class:`GridSearch` (a full factorial grid), with the ask/tell contract of
:mod:`loops.optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from loops.optbase import StrategyBase, rng_state, set_rng_state
from loops.optspace import (
    Constraint,
    Direction,
    Exhausted,
    Params,
    ParamSpace,
    ParamValue,
    SpaceSpec,
)

__all__ = ["GridSearch", "RandomSearch"]


class RandomSearch(StrategyBase):
    """Uniform random points (int parameters rounded), seeded; skips infeasible ones.

    A baseline: it ignores results (infeasible, failed and untrusted are only recorded).
    """

    strategy = "random"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        seed: int = 0,
        *,
        direction: Direction = "minimize",
        constraints: Constraint | None = None,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        self.seed = int(seed)
        self._rng = np.random.RandomState(self.seed)

    def _propose(self) -> Params:
        for _ in range(10_000):
            p = self.space.from_unit(self._rng.uniform(size=len(self.space)))
            if self._feasible(p):
                return p
        raise Exhausted("random search: 10,000 draws in a row violated the constraints")

    def _extra_state(self) -> dict[str, Any]:
        return {"config": {"seed": self.seed}, "rng": rng_state(self._rng)}

    def _restore_extra(self, state: Mapping[str, Any]) -> None:
        set_rng_state(self._rng, state["rng"])


class GridSearch(StrategyBase):
    """Full factorial grid, ``points_per_axis`` values per parameter, row-major order.

    Float axes: ``linspace(low, high, n)`` (the midpoint when n == 1); int axes:
    the distinct rounded values of that; categorical/ordinal axes: every choice. Points already pending or observed
    (an agent's, say) and points violating ``constraints`` are skipped. Raises
    :class:`Exhausted` when the grid is done.
    """

    strategy = "grid"

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        points_per_axis: int,
        *,
        direction: Direction = "minimize",
        constraints: Constraint | None = None,
    ) -> None:
        super().__init__(space, direction=direction, constraints=constraints)
        if (
            isinstance(points_per_axis, bool)
            or not isinstance(points_per_axis, int)
            or points_per_axis < 1
        ):
            raise ValueError(f"points_per_axis must be an int >= 1, got {points_per_axis!r}")
        self.points_per_axis = points_per_axis
        self.axes: list[list[ParamValue]] = []
        for d in self.space.dims:
            if d.choices:  # categorical/ordinal: every choice, whatever points_per_axis
                self.axes.append(list(d.choices))
                continue
            vals = (
                np.linspace(d.low, d.high, points_per_axis)
                if points_per_axis > 1
                else np.array([(d.low + d.high) / 2])
            )
            if d.is_int:
                self.axes.append(sorted({int(np.rint(v)) for v in vals}))
            else:
                self.axes.append([float(v) for v in vals])
        self.size = math.prod(len(a) for a in self.axes)
        self._cursor = 0

    def _point(self, index: int) -> Params:
        idx = np.unravel_index(index, [len(a) for a in self.axes])
        return {d.name: a[int(i)] for d, a, i in zip(self.space.dims, self.axes, idx, strict=True)}

    def _propose(self) -> Params:
        used = {self.space.key(p) for p in self._pending.values()}
        used.update(self.space.key(o.params) for o in self._observations)
        while self._cursor < self.size:
            p = self._point(self._cursor)
            self._cursor += 1
            if self.space.key(p) not in used and self._feasible(p):
                return p
        raise Exhausted(f"grid search: all {self.size} grid points have been proposed")

    def remaining(self) -> Iterator[Params]:
        """Grid points not yet reached by the cursor (for display)."""
        for i in range(self._cursor, self.size):
            yield self._point(i)

    def _extra_state(self) -> dict[str, Any]:
        return {"config": {"points_per_axis": self.points_per_axis}, "cursor": self._cursor}

    def _restore_extra(self, state: Mapping[str, Any]) -> None:
        self._cursor = int(state["cursor"])
