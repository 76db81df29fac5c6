"""Feasibility learned from what happened: :class:`FeasibilityModel`.

The known constraints of a program are declared; the rest of a bench's trouble is
found by running into it: the safety layer's dry run refuses a recipe (naming the
rule), a station trips or an experiment fails, a result cannot be verified. Each of
these is an observation of the optimizer (statuses ``infeasible``, ``failed``,
``untrusted``; a refusal with the rules that refused it). This module learns from them
where trouble is likely, so a strategy stops proposing near it.

One binary classifier per *cause*, each over the points that could show it:

* ``refused:<rule>`` (one per rule seen): every point the dry run judged (refused or
  not): 1 where that rule refused it. A refusal without a rule is ``refused``.
* ``failed`` (trips and failed experiments): the points that ran.
* ``untrusted`` (unverified results): the points that ran to a result.

The classifier is scikit-learn's :class:`~sklearn.gaussian_process.GaussianProcessClassifier`
(Laplace approximation, constant x isotropic RBF kernel on the encoded unit space,
hyperparameters fitted once per fit, no restarts, so deterministic) on at most
``max_points`` (100) points per cause: the most recent troubled ones (up to half) and
the most recent others, so a fit is bounded (measured in 6-D on a machine loaded ~8x its
2 cores: 0.4 s at 50 points, 1.0 s at 100, 5 s at 150-200). A cause with no trouble seen
yet has no model and predicts 0.

:meth:`FeasibilityModel.weight` is the probability of no trouble, the product over the
causes of ``1 - p``: the factor a strategy multiplies its acquisition by
(:meth:`loops.optbase.StrategyBase.acquisition_weight`). :meth:`FeasibilityModel.explain`
says it per cause for one point (what the campaign journals with each proposal).

The model holds no state of its own: it is rebuilt from the observations and their
causes (saved in the strategy's state), so a restored strategy predicts the same.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.gaussian_process import GaussianProcessClassifier
from sklearn.gaussian_process.kernels import RBF, ConstantKernel

log = logging.getLogger(__name__)

__all__ = [
    "FAILED",
    "REFUSED",
    "UNTRUSTED",
    "FeasibilityModel",
    "Labelled",
    "causes_of",
    "log_weight",
    "weigh",
]

#: the cause of a refusal without a named rule (and the prefix of one with a rule)
REFUSED = "refused"
FAILED = "failed"
UNTRUSTED = "untrusted"


def causes_of(status: str, rules: Sequence[str] = ()) -> tuple[str, ...]:
    """The causes an observation with ``status`` shows (``rules``: the dry run's refusing
    rules of an ``infeasible`` one)."""
    if status == "infeasible":
        named = tuple(dict.fromkeys(f"{REFUSED}:{r}" for r in rules if r))
        return named or (REFUSED,)
    if status in (FAILED, UNTRUSTED):
        return (status,)
    return ()


@dataclass(frozen=True)
class Labelled:
    """One observed point in the unit space: its status and the causes it showed."""

    x: NDArray[np.float64]
    status: str
    causes: tuple[str, ...]


def _judged_by(cause: str, status: str) -> bool:
    """Whether a point with ``status`` tells anything about ``cause``."""
    if cause.startswith(REFUSED):
        return True  # every point was dry-run (refused or not)
    if cause == FAILED:
        return status in ("ok", "untrusted", "failed")
    return status in ("ok", "untrusted")  # UNTRUSTED: the points that gave a result


def log_weight(weight: NDArray[np.float64]) -> NDArray[np.float64]:
    """``log`` of the probability of feasibility, to add to a log-scale acquisition (log EI,
    EHVI): a weight of 0 is ``-inf`` (never proposed while anything else is), a tiny one
    a very large penalty. A floor of 1e-6 let a 1e6-fold better expected improvement win
    where the weight was 0 (tests/test_optimizer.py)."""
    w = np.clip(np.asarray(weight, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return np.asarray(np.log(w), dtype=np.float64)


def weigh(values: NDArray[np.float64], weight: NDArray[np.float64]) -> NDArray[np.float64]:
    """Acquisition values *to minimise* weighted by the probability of feasibility.

    Negative values (an improvement, as ``-EI``) shrink towards 0 with the weight;
    positive ones (``-UCB`` where the bound is below zero) grow as it falls, so a
    likely infeasible point ranks worse either way; weight 1 changes nothing.
    """
    w = np.clip(np.asarray(weight, dtype=np.float64), 1e-6, 1.0)
    v = np.asarray(values, dtype=np.float64)
    return np.where(v <= 0.0, v * w, v / w)


class FeasibilityModel:
    """Per-cause classifiers of trouble over the unit space (module docstring).

    ``max_points``: at most this many points per classifier (:meth:`_window`).
    """

    def __init__(self, points: Sequence[Labelled], *, max_points: int = 100):
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.max_points = int(max_points)
        self.n_points = len(points)
        self.models: dict[str, GaussianProcessClassifier] = {}
        #: per cause: how many points were judged and how many showed it
        self.support: dict[str, tuple[int, int]] = {}
        #: causes whose classifier could not be fitted, and why (they weigh nothing)
        self.unfitted: dict[str, str] = {}
        causes = dict.fromkeys(c for p in points for c in p.causes)
        for cause in causes:
            judged = self._window(cause, [p for p in points if _judged_by(cause, p.status)])
            y = np.array([cause in p.causes for p in judged], dtype=int)
            self.support[cause] = (len(judged), int(y.sum()))
            if len(judged) == 0 or y.min() == y.max():
                continue  # only trouble (nothing to tell it from) or none in the window
            X = np.vstack([p.x for p in judged])
            try:
                self.models[cause] = self._fit(X, y)
            except (np.linalg.LinAlgError, ValueError) as exc:  # never a failed ask for it
                self.unfitted[cause] = f"{type(exc).__name__}: {exc}"
                log.warning("feasibility model for %s not fitted: %s", cause, exc)

    def _window(self, cause: str, judged: list[Labelled]) -> list[Labelled]:
        """At most ``max_points`` of ``judged``: the most recent troubled ones (up to half),
        then the most recent others; in their order. A region avoided since it was learned
        keeps its points (the window never forgets trouble for lack of new trouble)."""
        if len(judged) <= self.max_points:
            return judged
        bad = [i for i, p in enumerate(judged) if cause in p.causes][-(self.max_points // 2) :]
        good = [i for i, p in enumerate(judged) if cause not in p.causes]
        keep = set(bad) | set(good[len(good) - (self.max_points - len(bad)) :])
        return [p for i, p in enumerate(judged) if i in keep]

    def _fit(self, X: NDArray[np.float64], y: NDArray[np.int_]) -> GaussianProcessClassifier:
        kernel = ConstantKernel(1.0, (0.1, 100.0)) * RBF(0.2, (0.02, 5.0))
        gpc = GaussianProcessClassifier(kernel=kernel, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hyperparameters at a bound: still a fit
            gpc.fit(X, y)
        return gpc

    @property
    def empty(self) -> bool:
        """No trouble learned: every prediction is 0, every weight 1."""
        return not self.models

    def probabilities(self, X: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
        """Per cause, the probability of that trouble at each row of ``X`` (unit space)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        out: dict[str, NDArray[np.float64]] = {}
        for cause, gpc in self.models.items():
            # the fitted binary classifier itself: half the cost of the wrapper's checks, and
            # the acquisition's optimiser calls this thousands of times per ask
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = gpc.base_estimator_.predict_proba(X)[:, 1]
            out[cause] = np.asarray(p, dtype=np.float64)
        return out

    def weight(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Probability of no trouble at each row of ``X`` (ones when nothing was learned)."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        w = np.ones(len(X), dtype=np.float64)
        for p in self.probabilities(X).values():
            w *= 1.0 - p
        return w

    def explain(self, x: NDArray[np.float64]) -> dict[str, Any]:
        """One point's prediction, JSON-ready: ``p_feasible`` (no trouble at all),
        ``p_refused`` (by any rule) and ``rule`` (the likeliest refusing one, or None),
        ``by_rule`` (each rule's probability), ``p_failed``, ``p_untrusted``, and
        ``learned_from`` (points the model was built on)."""
        probs = {c: float(p[0]) for c, p in self.probabilities(np.atleast_2d(x)).items()}
        rules = {c: p for c, p in probs.items() if c.startswith(REFUSED)}
        not_refused = float(np.prod([1.0 - p for p in rules.values()])) if rules else 1.0
        likeliest = max(rules, key=lambda c: rules[c]) if rules else None
        return {
            "p_feasible": round(float(np.prod([1.0 - p for p in probs.values()])), 4),
            "p_refused": round(1.0 - not_refused, 4),
            "rule": _rule_name(likeliest) if likeliest is not None else None,
            "by_rule": {_rule_name(c): round(p, 4) for c, p in rules.items()},
            "p_failed": round(probs.get(FAILED, 0.0), 4),
            "p_untrusted": round(probs.get(UNTRUSTED, 0.0), 4),
            "learned_from": self.n_points,
            **({"not_fitted": dict(self.unfitted)} if self.unfitted else {}),
        }


def _rule_name(cause: str) -> str:
    """``refused:<rule>`` -> ``<rule>``; a refusal without a rule is ``(unnamed)``."""
    return cause.split(":", 1)[1] if ":" in cause else "(unnamed)"
