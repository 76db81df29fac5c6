"""Cost-aware asks: :class:`CostModel`, the acquisition weighed by what a point costs.

A program opts in with ``cost:`` (:class:`CostSpec`): ``duration`` (bench minutes of the
compiled plan) or a consumed channel of the dry run (``<pump>.delivered``,
``<pump>.withdrawn``, ``<vessel>.added``, ``<vessel>.removed``: mL), optionally with a
``power`` (``cost: {of: duration, power: 0.5}`` weighs cost less). The exact cost of a
point is the compiled plan's (:mod:`loops.plancost`: the same timeline and effects the dry
run checks), given here as a function ``exact(params) -> float | None`` (None: the plan
cannot be costed there: the dry run refuses it).

The acquisition is evaluated on thousands of candidates per ask (measured: the plan's exact
cost takes ~1 ms per point on the bundled example programs, too slow for that), so it sees a
model: a Gaussian-process regression on ``log(cost + c0)`` over the encoded unit space,
fitted on points costed exactly: a seeded Latin-hypercube design costed when the model is
built (at most ``design`` points) plus every proposal (:meth:`CostModel.explain` costs it
exactly when it is journaled). ``c0`` is a tenth of the mean cost seen, so a point that
costs nothing (no reagent at all) is not infinitely cheap. The GP interpolates (noise 1e-8):
at a costed point it predicts that point's cost.

:meth:`CostModel.weight` is ``((c_min + c0) / (cost + c0)) ** power`` in (0, 1]: the
strategy multiplies it into the acquisition beside the learned feasibility
(:meth:`loops.optbase.StrategyBase.acquisition_weight`), so EI becomes EI per unit cost
(scaled by the cheapest costed point so the weight stays a factor in [0, 1]).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from loops.optspace import ParamSpace

if TYPE_CHECKING:  # scikit-learn and scipy load when a model is built, not with a program
    from sklearn.gaussian_process import GaussianProcessRegressor

__all__ = ["CONSUMED", "DURATION", "CostModel", "CostSpec", "ExactCost", "cost_spec_problem"]

#: ``cost: duration``: the compiled plan's bench minutes
DURATION = "duration"
#: the consumed channels of the dry run's effects (safety/effects.py), by suffix
CONSUMED = ("delivered", "withdrawn", "added", "removed")
_CHANNEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\.(" + "|".join(CONSUMED) + r")")

ExactCost = Callable[[Mapping[str, Any]], float | None]


@dataclass(frozen=True)
class CostSpec:
    """``cost:`` of a program: what a point costs (``of``) and how strongly it weighs."""

    of: str
    power: float = 1.0

    @property
    def unit(self) -> str:
        return "min" if self.of == DURATION else "mL"

    def as_spec(self) -> str | dict[str, Any]:
        return self.of if self.power == 1.0 else {"of": self.of, "power": self.power}


def cost_spec_problem(of: Any, instruments: list[str]) -> str | None:
    """Why ``of`` is not a cost (one line naming the valid choices), or None.
    ``instruments``: those the recipe calls (a pump's channel must name one of them)."""
    choices = (
        f"{DURATION}, or <pump>.delivered / <pump>.withdrawn / <vessel>.added / "
        f"<vessel>.removed (mL), or <instrument>.<counter> (what its commands add to it; "
        f"the recipe calls: {', '.join(instruments) or 'nothing'})"
    )
    if not isinstance(of, str) or not (of == DURATION or _CHANNEL_RE.fullmatch(of)):
        return f"must be {choices}, got {of!r}"
    name, _, what = of.partition(".")
    if what in ("delivered", "withdrawn") and name not in instruments:
        return f"{of!r}: the recipe calls no instrument {name!r}; must be {choices}"
    return None


class CostModel:
    """The cost of points of ``space`` (module docstring): exact where costed, a GP between.

    ``exact``: the plan's cost of a point (None where it cannot be costed); ``design``: how
    many points of a seeded Latin hypercube are costed now (fewer if the plan refuses
    some); ``max_points``: the GP is fitted on at most this many (the design and the most
    recent proposals)."""

    def __init__(
        self,
        space: ParamSpace,
        exact: ExactCost,
        spec: CostSpec,
        *,
        design: int | None = None,
        seed: int = 0,
        max_points: int = 200,
    ) -> None:
        if spec.power <= 0 or not math.isfinite(spec.power):
            raise ValueError(f"cost power must be a positive number, got {spec.power!r}")
        self.space = space
        self.spec = spec
        self._exact = exact
        self.max_points = int(max_points)
        self._costed: dict[Any, tuple[NDArray[np.float64], float]] = {}
        self._fitted: tuple[int, GaussianProcessRegressor | None, float, float] | None = None
        n = design if design is not None else min(64, 8 + 4 * len(space.dims))
        if n > 0:
            from scipy.stats import qmc

            rows = qmc.LatinHypercube(d=len(space), seed=seed).random(n)
            for row in rows:
                self.exact(space.from_unit(space.round_unit(row)))
        self.design_points = len(self._costed)

    # -- exact costs ------------------------------------------------------------
    def exact(self, params: Mapping[str, Any]) -> float | None:
        """The plan's cost of ``params`` (remembered: the model learns from it)."""
        p = self.space.validate(params)
        key = self.space.key(p)
        if key in self._costed:
            return self._costed[key][1]
        cost = self._exact(p)
        if cost is None or not math.isfinite(cost):
            return None
        cost = max(0.0, float(cost))
        self._costed[key] = (self.space.to_unit(p), cost)
        return cost

    @property
    def costed(self) -> int:
        """How many points were costed exactly."""
        return len(self._costed)

    # -- the model --------------------------------------------------------------
    def _model(self) -> tuple[GaussianProcessRegressor | None, float, float]:
        """(GP on log(cost + c0) or None when every cost is the same, c0, the cheapest)."""
        n = len(self._costed)
        if self._fitted is not None and self._fitted[0] == n:
            return self._fitted[1:]
        rows = list(self._costed.values())
        if len(rows) > self.max_points:  # the design, then the most recent proposals
            keep = self.max_points - self.design_points
            rows = rows[: self.design_points] + rows[len(rows) - max(0, keep) :]
        costs = np.array([c for _, c in rows], dtype=np.float64)
        if not len(costs):
            raise ValueError(
                "cost: no point of the space could be costed (the plan is refused everywhere "
                "the design tried): check the program against the station (labbridge check)"
            )
        c0 = max(0.1 * float(costs.mean()), 1e-9)
        cheapest = float(costs.min())
        gp: GaussianProcessRegressor | None = None
        if float(costs.max() - costs.min()) > 1e-12 * max(1.0, float(costs.max())):
            from sklearn.gaussian_process import GaussianProcessRegressor
            from sklearn.gaussian_process.kernels import RBF, ConstantKernel

            X = np.vstack([x for x, _ in rows])
            d = X.shape[1]
            kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.full(d, 0.5), (1e-2, 1e2))
            gp = GaussianProcessRegressor(kernel=kernel, alpha=1e-8, normalize_y=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # hyperparameters at a bound: still a fit
                gp.fit(X, np.log(costs + c0))
        self._fitted = (n, gp, c0, cheapest)
        return gp, c0, cheapest

    def predict(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """The predicted cost at each row of ``X`` (the encoded unit space)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        gp, c0, cheapest = self._model()
        if gp is None:
            return np.full(len(X), cheapest)
        return np.maximum(np.exp(np.asarray(gp.predict(X), dtype=np.float64)) - c0, 0.0)

    def weight(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """``((c_min + c0) / (cost + c0)) ** power`` per row of ``X``: 1 at the cheapest."""
        gp, c0, cheapest = self._model()
        ratio = (cheapest + c0) / (self.predict(X) + c0)
        return np.clip(ratio, 1e-6, 1.0) ** self.spec.power

    def explain(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """JSON for a proposal: ``of``, ``unit``, ``predicted`` (by the model before this
        point was costed), ``exact`` (the plan's, None where it cannot be costed) and
        ``costed`` (points the model was fitted on). Raises ValueError outside the space."""
        p = self.space.validate(params)
        predicted = float(self.predict(self.space.to_unit(p)[None, :])[0])
        fitted_on = len(self._costed)
        exact = self.exact(p)
        return {
            "of": self.spec.of,
            "unit": self.spec.unit,
            "predicted": round(predicted, 4),
            "exact": None if exact is None else round(exact, 4),
            "costed": fitted_on,
        }
