"""A campaign's program as data: its parameters and their space, constraints, objective,
budget, stop rules, recipe plan and approval policy (:class:`Program`), and the names and
choices program.md may use. Read from program.md by :mod:`loops.program`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from numpy.typing import NDArray

from loops.approval import ApprovalPolicy
from loops.optcost import CostSpec
from loops.optspace import choice_index
from loops.pareto import dominates, min_frame
from loops.plan import Plan
from safety.expr import EvaluationError, Expression
from safety.yamldoc import ConfigError

__all__ = [
    "finite",
    "is_number",
    "plain_number",
    "show_value",
    "Budget",
    "Constraint",
    "Objective",
    "Parameter",
    "Program",
    "ProgramError",
    "Space",
    "StopRules",
]


class ProgramError(ConfigError):
    """An invalid campaign spec: ``<source>:<line>: <field>: <problem>`` (line omitted if unknown)."""


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    """A number that is finite as a float (an integer like 10**400 is not: it overflows one)."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def show_value(value: Any) -> str:
    """``repr(value)``, cut short (a 400-digit integer in a message helps nobody)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def plain_number(value: Any) -> Any:
    """numpy scalars -> Python numbers (proposals come from numpy)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


# ------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Parameter:
    """One dimension of the search space: ``type`` float or int (bounds inclusive, SI-ish
    unit), or ordinal/categorical: one of ``choices`` (strings or numbers; an ordinal
    one's in order). A choice parameter's ``low``/``high`` are its indices, 0 and n - 1."""

    name: str
    type: str
    low: float
    high: float
    unit: str = ""
    doc: str = ""
    choices: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid value of this parameter (None if it is)."""
        if self.choices:
            if choice_index(self.choices, value) is None:
                listed = ", ".join(repr(c) for c in self.choices)
                return f"{self.name}={show_value(value)} is not one of {listed}"
            return None
        value = plain_number(value)
        if not finite(value):
            return f"{self.name} must be a finite number, got {show_value(value)}"
        if self.type == "int" and float(value) != round(float(value)):
            return f"{self.name} must be an integer, got {value!r}"
        if value < self.low or value > self.high:
            unit = f" {self.unit}" if self.unit else ""
            return f"{self.name}={value!r}{unit} is outside [{self.low!r}, {self.high!r}]{unit}"
        return None

    def clip(self, value: Any) -> float | int | str:
        """Clipped into the bounds; rounded to an ``int`` for int parameters; a choice as
        listed (ValueError if ``value`` is none of them)."""
        if self.choices:
            i = choice_index(self.choices, value)
            if i is None:
                raise ValueError(self.problem(value))
            return self.choices[i]
        v = min(float(self.high), max(float(self.low), float(value)))
        if self.type == "int":
            return int(min(self.high, max(self.low, round(v))))
        return v

    def to_unit(self, value: Any) -> float:
        """The value scaled to 0-1 over the bounds (a choice: its index over n - 1)."""
        if self.choices:
            i = choice_index(self.choices, value)
            if i is None:
                raise ValueError(self.problem(value))
            return i / (len(self.choices) - 1)
        return (float(value) - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> float | int | str:
        """A 0-1 value back to the bounds (clipped; rounded for int parameters; the choice
        at the nearest index)."""
        if self.choices:
            return self.choices[int(round(min(1.0, max(0.0, float(u))) * self.high))]
        return self.clip(self.low + float(u) * (self.high - self.low))

    def extremes(self) -> tuple[Any, Any]:
        """The lowest and highest value (the first and last choice)."""
        if self.choices:
            return self.choices[0], self.choices[-1]
        return self.low, self.high

    def middle(self) -> Any:
        """The value halfway (the middle choice)."""
        if self.choices:
            return self.choices[len(self.choices) // 2]
        return (self.low + self.high) / 2

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.choices:
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high)
        if self.unit:
            out["unit"] = self.unit
        if self.doc:
            out["doc"] = self.doc
        return out


@dataclass(frozen=True)
class Space:
    """The parameter space: helpers the optimizers share (bounds, validation, 0-1 scaling)."""

    parameters: tuple[Parameter, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def dims(self) -> int:
        return len(self.parameters)

    def __getitem__(self, name: str) -> Parameter:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def bounds(self) -> dict[str, tuple[float, float]]:
        """name -> (low, high), the form bayesian-optimization's ``pbounds`` takes."""
        return {p.name: (p.low, p.high) for p in self.parameters}

    def validate_params(self, params: Mapping[str, Any]) -> list[str]:
        """Every problem with ``params`` (missing, unknown, not a number, out of bounds), each
        naming the parameter; empty when valid."""
        problems: list[str] = []
        for p in self.parameters:
            if p.name not in params:
                problems.append(f"{p.name} is missing")
                continue
            problem = p.problem(params[p.name])
            if problem:
                problems.append(problem)
        for key in params:
            if key not in self.names:
                problems.append(
                    f"{key} is not a parameter of this campaign (parameters: {', '.join(self.names)})"
                )
        return problems

    def clip(self, params: Mapping[str, Any]) -> dict[str, float | int | str]:
        """Every parameter clipped into its bounds (ints rounded, numpy -> Python numbers,
        choices as listed)."""
        return {p.name: p.clip(plain_number(params[p.name])) for p in self.parameters}

    def to_unit(self, params: Mapping[str, Any]) -> list[float]:
        """Parameters -> a point in the unit cube, in :attr:`names` order (a choice: its
        index over n - 1; the optimizer's own map is :class:`loops.optspace.ParamSpace`)."""
        return [p.to_unit(plain_number(params[p.name])) for p in self.parameters]

    def from_unit(self, point: Sequence[float]) -> dict[str, float | int | str]:
        """A point in the unit cube (in :attr:`names` order) -> parameters (clipped, ints rounded)."""
        if len(point) != self.dims:
            raise ValueError(f"point has {len(point)} coordinates, the space {self.dims}")
        return {p.name: p.from_unit(u) for p, u in zip(self.parameters, point, strict=True)}


@dataclass(frozen=True)
class Constraint:
    """One feasibility rule over the parameters (``safety.expr`` language)."""

    text: str
    expression: Expression
    line: int | None = None

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Objective:
    """What to optimise: a measurement the recipe produces and the direction; with several
    objectives, optionally a ``threshold`` (the worst value still worth having: ``<=`` it
    when minimising, ``>=`` when maximising)."""

    measure: str
    direction: str = "minimize"
    threshold: float | None = None

    @property
    def minimize(self) -> bool:
        return self.direction == "minimize"

    def better(self, a: float, b: float) -> bool:
        """``a`` is strictly better than ``b``."""
        return a < b if self.minimize else a > b

    def score(self, value: float) -> float:
        """The value as a quantity to maximise (``-value`` when minimising)."""
        return -value if self.minimize else value

    def meets(self, value: float | None) -> bool:
        """``value`` meets the threshold (True without one; False without a value)."""
        if value is None or not math.isfinite(value):
            return False
        if self.threshold is None:
            return True
        return value <= self.threshold if self.minimize else value >= self.threshold

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measure": self.measure, "direction": self.direction}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


@dataclass(frozen=True)
class Budget:
    """At most ``experiments`` experiments run on stations and/or ``hours`` of campaign clock."""

    experiments: int | None = None
    hours: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in (("experiments", self.experiments), ("hours", self.hours))
            if v is not None
        }


@dataclass(frozen=True)
class StopRules:
    """Stop at ``target`` (objective reached) or after ``no_improvement`` experiments without one;
    with several objectives, ``at_thresholds``: when one result meets every threshold."""

    target: float | None = None
    no_improvement: int | None = None
    at_thresholds: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: v
            for k, v in (("target", self.target), ("no_improvement", self.no_improvement))
            if v is not None
        }
        if self.at_thresholds:
            out["at_thresholds"] = True
        return out


@dataclass(frozen=True)
class Program:
    """A validated campaign spec (see the module docstring). ``body`` is the Markdown."""

    name: str
    parameters: tuple[Parameter, ...]
    objective: Objective
    budget: Budget
    #: the recipe's steps as written (plain data; loops/plan.py), and compiled
    recipe: list[Any]
    plan: Plan
    #: how results are verified (loops/checks.py), as plain data
    verification: Mapping[str, Any] = field(default_factory=dict)
    constraints: tuple[Constraint, ...] = ()
    stop: StopRules = field(default_factory=StopRules)
    strategy: str = "bayes"
    initial_points: int = 4
    stations: int = 1
    seed: int = 0
    fixed: Mapping[str, Any] = field(default_factory=dict)
    body: str = ""
    source: str = "<program>"
    #: when an agent's proposal waits for a human (None: auto; loops/approval.py)
    approval: ApprovalPolicy | None = None
    #: every objective when there are several (``objective`` is the first); () for one
    objectives: tuple[Objective, ...] = ()
    #: campaigns (ids in the same journal) whose results are told to the optimizer first
    prior: tuple[str, ...] = ()
    #: ``learned`` (refusals, failures and unverified results teach the optimizer where
    #: trouble is: loops/optfeasible.py) or ``declared`` (the constraints only)
    feasibility: str = "learned"
    #: ``cost:``: what a point costs, for cost-aware asks (loops/optcost.py); None: off
    cost: CostSpec | None = None
    #: the file the recipe's steps were read from (``recipe: <file>``); None: in the program
    recipe_file: str | None = None

    @property
    def space(self) -> Space:
        return Space(self.parameters)

    @property
    def goals(self) -> tuple[Objective, ...]:
        """Every objective, the first one (``objective``) first."""
        return self.objectives or (self.objective,)

    @property
    def multi(self) -> bool:
        """The program has several objectives (the optimizer proposes along their front)."""
        return len(self.goals) > 1

    def objective_values(self, measurements: Mapping[str, Any]) -> tuple[float, ...] | None:
        """Every objective's value from a result's measurements (dotted names looked up
        nested or flat), or None when one of them is missing or not a finite number."""
        out = []
        for o in self.goals:
            v: Any = measurements.get(o.measure)
            if v is None and "." in o.measure:
                v = measurements
                for part in o.measure.split("."):
                    v = v.get(part) if isinstance(v, Mapping) else None
            if not finite(v):
                return None
            out.append(float(v))
        return tuple(out)

    def feasible(self, params: Mapping[str, Any]) -> tuple[bool, list[str]]:
        """Whether ``params`` is a valid point that satisfies every constraint; the reasons if not.

        Parameter problems (missing, out of bounds) come first; then each
        constraint that is false or cannot be evaluated, with the values it saw.
        """
        reasons = self.space.validate_params(params)
        if reasons:
            return False, reasons
        state = {**dict(self.fixed), **{k: plain_number(v) for k, v in params.items()}}
        for c in self.constraints:
            try:
                ok = c.expression.evaluate(state)
            except EvaluationError as exc:
                reasons.append(f"constraint '{c.text}' cannot be evaluated: {exc}")
                continue
            if ok is not True:
                seen = ", ".join(
                    f"{n}={state[n]!r}" for n in sorted(c.expression.names()) if n in state
                )
                reasons.append(f"constraint '{c.text}' is false ({seen})")
        return not reasons, reasons

    def reached(self, value: float | None) -> bool:
        """``value`` meets ``stop.target`` (False without a target or a value)."""
        if value is None or self.stop.target is None or not math.isfinite(value):
            return False
        target = self.stop.target
        return value <= target if self.objective.minimize else value >= target

    def stop_reason(
        self,
        values: Sequence[float | None],
        *,
        elapsed_s: float = 0.0,
        vectors: Sequence[Sequence[float] | None] | None = None,
    ) -> str | None:
        """Why the campaign should stop now, or None.

        ``values``: the objective value of every experiment that counts against
        the budget, in the order they finished (None for a failed one);
        ``elapsed_s``: seconds of campaign clock. Checked in order: target
        reached, experiment budget spent, time budget spent, no improvement in
        the last ``stop.no_improvement`` experiments (failures count as no
        improvement). With several objectives, ``vectors`` (every objective's
        value per experiment, same order, None for no trusted result) replace
        the values in the rules: ``at_thresholds`` (one result meets every
        threshold) instead of the target, and an improvement is a result that
        joins the Pareto front.
        """
        if self.multi:
            return self._stop_reason_multi(vectors or [None] * len(values), elapsed_s)
        best: float | None = None
        since = 0
        for v in values:
            if (
                v is not None
                and math.isfinite(v)
                and (best is None or self.objective.better(v, best))
            ):
                best, since = v, 0
            else:
                since += 1
        if best is not None and self.reached(best):
            return (
                f"target reached: {self.objective.measure}={best:.4g} (target {self.stop.target:g})"
            )
        budget = self._budget_reason(len(values), elapsed_s)
        if budget is not None:
            return budget
        limit = self.stop.no_improvement
        if limit is not None and since >= limit:
            if best is None:
                return f"no successful experiment in the last {since}"
            return f"no improvement in the last {since} experiments (best {best:.4g})"
        return None

    def _budget_reason(self, n: int, elapsed_s: float) -> str | None:
        if self.budget.experiments is not None and n >= self.budget.experiments:
            return f"experiment budget spent: {n} of {self.budget.experiments}"
        if self.budget.hours is not None and elapsed_s >= self.budget.hours * 3600.0:
            return f"time budget spent: {elapsed_s / 3600.0:.3g} h of {self.budget.hours:g} h"
        return None

    def _stop_reason_multi(
        self, vectors: Sequence[Sequence[float] | None], elapsed_s: float
    ) -> str | None:
        goals = self.goals
        directions = [o.direction for o in goals]
        front: list[NDArray[np.float64]] = []  # the minimised-frame front so far
        since = 0
        met: Sequence[float] | None = None
        for v in vectors:
            if v is None:
                since += 1
                continue
            if (
                met is None
                and self.stop.at_thresholds
                and all(o.meets(x) for o, x in zip(goals, v, strict=True))
            ):
                met = v
            y = min_frame([list(v)], directions)[0]
            if any(dominates(f, y) or bool(np.all(f == y)) for f in front):
                since += 1
                continue
            front = [f for f in front if not dominates(y, f)] + [y]
            since = 0
        if met is not None:
            shown = ", ".join(f"{o.measure}={x:.4g}" for o, x in zip(goals, met, strict=True))
            return f"thresholds met: {shown}"
        budget = self._budget_reason(len(vectors), elapsed_s)
        if budget is not None:
            return budget
        limit = self.stop.no_improvement
        if limit is not None and since >= limit:
            if not front:
                return f"no successful experiment in the last {since}"
            return (
                f"no new Pareto-optimal result in the last {since} experiments "
                f"({len(front)} on the front)"
            )
        return None

    def as_dict(self) -> dict[str, Any]:
        """The front matter as plain data (JSON-able); :func:`load_program` reads it back."""
        out: dict[str, Any] = {
            "name": self.name,
            "parameters": {p.name: p.as_dict() for p in self.parameters},
        }
        if self.constraints:
            out["constraints"] = [c.text for c in self.constraints]
        if self.multi:
            out["objectives"] = [o.as_dict() for o in self.goals]
        else:
            out["objective"] = self.objective.as_dict()
        out["budget"] = self.budget.as_dict()
        stop = self.stop.as_dict()
        if stop:
            out["stop"] = stop
        out.update(
            strategy=self.strategy,
            initial_points=self.initial_points,
            stations=self.stations,
            seed=self.seed,
            recipe=self.recipe,
        )
        if self.fixed:
            out["fixed"] = dict(self.fixed)
        if self.verification.get("checks"):
            out["verification"] = {k: v for k, v in self.verification.items() if v}
        if self.approval is not None:
            out["approval"] = self.approval.as_spec()
        if self.prior:
            out["prior"] = list(self.prior)
        if self.feasibility != "learned":
            out["feasibility"] = self.feasibility
        if self.cost is not None:
            out["cost"] = self.cost.as_spec()
        return out

    def to_markdown(self) -> str:
        """``program.md`` text: the front matter (from :meth:`as_dict`) and the body."""
        front = yaml.safe_dump(self.as_dict(), sort_keys=False, default_flow_style=None)
        return f"---\n{front}---\n{self.body}"


# -------------------------------------------------------------------- loading
