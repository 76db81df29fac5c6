"""The ask/tell contract of a campaign's optimizer (:class:`Optimizer`) and the bookkeeping
every strategy shares (:class:`StrategyBase`: ids, the pending set, observations, state).

What the statuses mean and how pending points are handled: :mod:`loops.optimizer`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from loops.optcost import CostModel
from loops.optfeasible import FeasibilityModel, Labelled, causes_of
from loops.optspace import (
    STATUSES,
    Constraint,
    Direction,
    Observation,
    Params,
    ParamSpace,
    ParamValue,
    Proposal,
    SpaceSpec,
    Status,
    UnknownProposal,
)

__all__ = [
    "STATE_VERSION",
    "Optimizer",
    "StrategyBase",
    "direction_sign",
    "penalty_value",
    "rng_state",
    "set_rng_state",
]

#: the version of :meth:`StrategyBase.state`
STATE_VERSION = 1


def direction_sign(direction: str) -> float:
    if direction == "minimize":
        return -1.0
    if direction == "maximize":
        return 1.0
    raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")


def penalty_value(values: Sequence[float]) -> float:
    """What a refused or failed point is told to a model, in the maximised frame: worse than
    every trusted result seen (``worst - 0.25 * (best - worst)``; -1 before any result)."""
    if not values:
        return -1.0
    lo, hi = min(values), max(values)
    spread = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - 0.25 * spread


def rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = rng.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def set_rng_state(rng: np.random.RandomState, s: Mapping[str, Any]) -> None:
    rng.set_state(
        (s["bit_generator"], np.array(s["key"], np.uint32), s["pos"], s["has_gauss"], s["gauss"])
    )


@runtime_checkable
class Optimizer(Protocol):
    """What a campaign needs from a strategy."""

    def ask(self) -> Proposal:
        """Next point to run; accounts for every pending point (K asks -> K distinct points)."""
        ...

    def tell(
        self,
        proposal: str | Mapping[str, ParamValue],
        value: float | None,
        *,
        status: Status = "ok",
        rules: Sequence[str] = (),
    ) -> Observation:
        """Report a result by proposal id (or by params, for a point we did not ask);
        ``rules``: the rules that refused an ``infeasible`` one."""
        ...

    def add_pending(self, params: Mapping[str, ParamValue]) -> Proposal:
        """Mark an externally proposed point (an agent's) as running."""
        ...

    def cancel(self, proposal_id: str) -> None:
        """Forget a pending point without a result (it was never started)."""
        ...

    def pending(self) -> list[Proposal]: ...

    def observations(self) -> list[Observation]: ...

    def best(self) -> tuple[Params, float] | None:
        """Best trusted (``ok``) result in the campaign's direction, or None."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state; ``from_state(space, state)`` restores it."""
        ...


class StrategyBase(ABC):
    """Bookkeeping shared by the strategies: ids, pending set, observations, state."""

    strategy: ClassVar[str]

    def __init__(
        self,
        space: SpaceSpec | ParamSpace,
        *,
        direction: Direction,
        constraints: Constraint | None,
    ) -> None:
        self.space = ParamSpace.of(space)
        self.direction: Direction = direction
        self._sign = direction_sign(direction)
        self.constraints = constraints
        self._pending: dict[str, Params] = {}
        self._observations: list[Observation] = []
        self._counter = 0
        #: the rules that refused each ``infeasible`` observation (by id), as told
        self._rules: dict[str, tuple[str, ...]] = {}
        #: learn where trouble is from the observations (:mod:`loops.optfeasible`) and weigh
        #: the acquisition by it; False: only the declared constraints and the penalties
        self.learn_feasibility = True
        self._feasibility: tuple[int, FeasibilityModel] | None = None
        #: cost-aware asks (:mod:`loops.optcost`): the acquisition is weighed by cost too
        #: (set by the campaign from the program's ``cost:``; not part of the state)
        self.cost_model: CostModel | None = None

    # -- public API ---------------------------------------------------------

    def ask(self) -> Proposal:
        """Next point, now pending. Raises :class:`Exhausted` when nothing is left."""
        params = self._propose()
        return self._add(params)

    def add_pending(self, params: Mapping[str, ParamValue]) -> Proposal:
        """Register a point proposed elsewhere (an agent) as running; returns its id."""
        return self._add(self.space.validate(params))

    def tell(
        self,
        proposal: str | Mapping[str, ParamValue],
        value: float | None,
        *,
        status: Status = "ok",
        rules: Sequence[str] = (),
    ) -> Observation:
        """Record a result; ``proposal`` is a pending id or the params of any point.

        Params that match a pending point resolve it; others are recorded as a
        new observation (an experiment we did not ask for). ``ok`` needs a
        finite value; the other statuses take a value or None. Raises
        :class:`UnknownProposal` for an id that is not pending, ValueError for
        bad params/values (nothing is recorded then). ``rules``: the names of the
        rules that refused an ``infeasible`` point (the dry run's), learned per rule.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if isinstance(rules, str) or not all(isinstance(r, str) for r in rules):
            raise ValueError(f"rules must be a sequence of rule names, got {rules!r}")
        val: float | None = None
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise ValueError(f"value must be a number or None, got {value!r}")
            val = float(value)
        if status == "ok" and (val is None or not math.isfinite(val)):
            raise ValueError(f"status 'ok' needs a finite value, got {value!r}")
        if isinstance(proposal, str):
            if proposal not in self._pending:
                raise UnknownProposal(
                    f"{proposal!r} is not pending (never asked, told or cancelled)"
                )
            pid, params = proposal, self._pending.pop(proposal)
        else:
            params = self.space.validate(proposal)
            key = self.space.key(params)
            match = next((i for i, p in self._pending.items() if self.space.key(p) == key), None)
            if match is not None:
                pid = match
                del self._pending[match]
            else:
                pid = self._new_id()
        if val is not None and not math.isfinite(val):
            val = None  # a NaN from a broken run is no value (and not JSON)
        obs = Observation(pid, params, val, status)
        self._observations.append(obs)
        if status == "infeasible" and rules:
            self._rules[pid] = tuple(rules)
        return obs

    def cancel(self, proposal_id: str) -> None:
        """Drop a pending point without information (it never ran)."""
        if proposal_id not in self._pending:
            raise UnknownProposal(f"{proposal_id!r} is not pending")
        del self._pending[proposal_id]

    def pending(self) -> list[Proposal]:
        return [Proposal(dict(p), i) for i, p in self._pending.items()]

    def observations(self) -> list[Observation]:
        return list(self._observations)

    def best(self) -> tuple[Params, float] | None:
        best: tuple[Params, float] | None = None
        for o in self._observations:
            if o.status == "ok" and o.value is not None:
                if best is None or self._sign * o.value > self._sign * best[1]:
                    best = (dict(o.params), o.value)
        return best

    def feasibility_model(self) -> FeasibilityModel:
        """The feasibility model of the observations so far (rebuilt when one is added;
        empty when :attr:`learn_feasibility` is off)."""
        n = len(self._observations) if self.learn_feasibility else -1
        if self._feasibility is None or self._feasibility[0] != n:
            points = [
                Labelled(
                    self.space.to_unit(o.params),
                    o.status,
                    causes_of(o.status, self._rules.get(o.id, ())),
                )
                for o in (self._observations if self.learn_feasibility else ())
            ]
            self._feasibility = (n, FeasibilityModel(points))
        return self._feasibility[1]

    def acquisition_weight(self, X: NDArray[np.float64]) -> NDArray[np.float64]:
        """Per row of ``X`` (the encoded unit space): the probability that the point is
        feasible (not refused, not failed, trusted; ones when nothing was learned), times
        the cost factor of :attr:`cost_model` (cheapest 1) when there is one."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        model = self.feasibility_model()
        w = np.ones(len(X)) if model.empty else model.weight(X)
        return w if self.cost_model is None else w * self.cost_model.weight(X)

    def feasibility(self, params: Mapping[str, ParamValue]) -> dict[str, Any]:
        """What the feasibility model predicts at ``params`` (JSON: :meth:`FeasibilityModel.explain
        <loops.optfeasible.FeasibilityModel.explain>`). Raises ValueError for params
        outside the space."""
        return self.feasibility_model().explain(self.space.to_unit(self.space.validate(params)))

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {s: 0 for s in STATUSES}
        for o in self._observations:
            c[o.status] += 1
        return {**c, "pending": len(self._pending), "ids": self._counter}

    def state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "strategy": self.strategy,
            "space": self.space.spec(),
            "direction": self.direction,
            "counter": self._counter,
            "observations": [o.to_dict() for o in self._observations],
            "pending": [{"id": i, "params": dict(p)} for i, p in self._pending.items()],
            "counts": self.counts(),
            "rules": {i: list(r) for i, r in self._rules.items()},
            "learn_feasibility": self.learn_feasibility,
            **self._extra_state(),
        }

    # -- for subclasses -----------------------------------------------------

    @abstractmethod
    def _propose(self) -> Params: ...

    def _extra_state(self) -> dict[str, Any]:
        """What this strategy saves besides the common part: its constructor's arguments as
        ``config`` (:meth:`from_state` passes them back), and whatever it has learned."""
        return {}

    @classmethod
    def from_state(
        cls,
        space: SpaceSpec | ParamSpace,
        state: Mapping[str, Any],
        *,
        constraints: Constraint | None = None,
    ) -> Self:
        """Restore from :meth:`state` (pass the same ``constraints`` callable again): built
        from the state's ``config``, then the common part, then :meth:`_restore_extra`."""
        cls._check_state(state)
        config = dict(state.get("config") or {})
        opt = cls(space, direction=state["direction"], constraints=constraints, **config)
        opt._restore_common(state)
        opt._restore_extra(state)
        return opt

    def _restore_extra(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """What :meth:`_extra_state` saved beyond ``config`` (nothing by default)."""

    def _restore_common(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: unsupported version {state.get('version')!r}")
        if state.get("strategy") != self.strategy:
            raise ValueError(
                f"state: strategy {state.get('strategy')!r}, expected {self.strategy!r}"
            )
        if state.get("space") != self.space.spec():
            raise ValueError(
                f"state: saved space {state.get('space')} differs from {self.space.spec()}"
            )
        self._counter = int(state["counter"])
        self._pending = {p["id"]: self.space.validate(p["params"]) for p in state["pending"]}
        self._observations = [
            Observation(o["id"], self.space.validate(o["params"]), o["value"], o["status"])
            for o in state["observations"]
        ]
        self._rules = {str(i): tuple(r) for i, r in dict(state.get("rules") or {}).items()}
        self.learn_feasibility = bool(state.get("learn_feasibility", True))
        self._feasibility = None

    def _new_id(self) -> str:
        self._counter += 1
        return f"p{self._counter}"

    def _add(self, params: Params) -> Proposal:
        pid = self._new_id()
        self._pending[pid] = params
        return Proposal(dict(params), pid)

    def _feasible(self, params: Mapping[str, ParamValue]) -> bool:
        return self.constraints is None or bool(self.constraints(params))

    @classmethod
    def _check_state(cls, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("strategy") != cls.strategy:
            got = state.get("strategy") if isinstance(state, Mapping) else state
            raise ValueError(f"state: not a {cls.strategy!r} state ({got!r})")
