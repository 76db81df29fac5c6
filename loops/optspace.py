"""The parameter space of a campaign's optimizer and the data it exchanges.

:class:`ParamSpace` (a box of named float/int parameters and its map to the unit
cube), :class:`Proposal` (a point to run) and :class:`Observation` (what happened
there), the statuses a result can have, and the errors of the ask/tell API. The
strategies and their contract: :mod:`loops.optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "STATUSES",
    "Constraint",
    "Dimension",
    "Direction",
    "Exhausted",
    "Observation",
    "ParamSpace",
    "ParamValue",
    "Params",
    "Proposal",
    "SpaceSpec",
    "Status",
    "UnknownProposal",
    "space_params",
]

Status = Literal["ok", "infeasible", "failed", "untrusted"]
STATUSES: tuple[Status, ...] = ("ok", "infeasible", "failed", "untrusted")
Direction = Literal["minimize", "maximize"]
ParamValue = float | int
Params = dict[str, ParamValue]
#: ``{name: (low, high, type)}``; type is ``float``/``int`` or ``"float"``/``"int"``;
#: a 2-tuple ``(low, high)`` means float.
SpaceSpec = Mapping[str, Sequence[Any]]
#: A known constraint: ``params -> True`` when the point may be run.
Constraint = Callable[[Mapping[str, ParamValue]], bool]


class Exhausted(Exception):
    """The strategy has nothing left to propose (grid done, or no feasible point left).

    Deliberately not a ``StopIteration``: that one turns into ``RuntimeError``
    inside generators (PEP 479) and cannot be set on an asyncio future.
    """


class UnknownProposal(KeyError):
    """``tell``/``cancel`` named a proposal id that is not pending."""


@dataclass(frozen=True)
class Proposal:
    """A point to run. ``params`` holds plain ``float``/``int`` (JSON-ready)."""

    params: Params
    id: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "params": dict(self.params)}


@dataclass(frozen=True)
class Observation:
    """What happened at a point. ``value`` is in the user's units and direction."""

    id: str
    params: Params
    value: float | None
    status: Status

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "params": dict(self.params),
            "value": self.value,
            "status": self.status,
        }


@dataclass(frozen=True)
class Dimension:
    """One parameter: ``low <= value <= high``; ``is_int`` parameters take integer values."""

    name: str
    low: float
    high: float
    is_int: bool

    @property
    def span(self) -> float:
        return self.high - self.low


@dataclass(frozen=True)
class ParamSpace:
    """A box of named float/int parameters and its map to the unit cube.

    Build it with :meth:`of` from ``{name: (low, high, type)}``. Unit
    coordinates: ``u = (value - low) / (high - low)``; int parameters live on
    the grid ``k / (high - low)``.
    """

    dims: tuple[Dimension, ...]
    _int_cols: NDArray[np.intp] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cols = np.array([i for i, d in enumerate(self.dims) if d.is_int and d.span > 0], np.intp)
        object.__setattr__(self, "_int_cols", cols)

    @classmethod
    def of(cls, spec: SpaceSpec | ParamSpace | Any) -> ParamSpace:
        """Parse ``{name: (low, high, type)}``; errors name the parameter.

        Also takes any object with a ``parameters`` sequence of items having
        ``name``, ``low``, ``high`` and ``type`` (a campaign's space), without
        importing it.
        """
        if isinstance(spec, ParamSpace):
            return spec
        if not isinstance(spec, Mapping) and hasattr(spec, "parameters"):
            spec = {p.name: (p.low, p.high, p.type) for p in spec.parameters}
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError("space: expected a non-empty mapping name -> (low, high, type)")
        dims = []
        for name, entry in spec.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"space: parameter names must be non-empty strings, got {name!r}")
            try:
                items = list(entry)
            except TypeError:
                raise ValueError(
                    f"space.{name}: expected (low, high, type), got {entry!r}"
                ) from None
            if len(items) == 2:
                items.append(float)
            if len(items) != 3:
                raise ValueError(f"space.{name}: expected (low, high, type), got {entry!r}")
            low, high, kind = items
            if kind in (int, "int"):
                is_int = True
            elif kind in (float, "float"):
                is_int = False
            else:
                raise ValueError(f"space.{name}: type must be float or int, got {kind!r}")
            for label, v in (("low", low), ("high", high)):
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise ValueError(f"space.{name}: {label} must be a finite number, got {v!r}")
            if low > high:
                raise ValueError(f"space.{name}: low {low} > high {high}")
            if is_int and (float(low) != int(low) or float(high) != int(high)):
                raise ValueError(f"space.{name}: int bounds must be integers, got ({low}, {high})")
            dims.append(Dimension(name, float(low), float(high), is_int))
        return cls(tuple(dims))

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def __len__(self) -> int:
        return len(self.dims)

    def spec(self) -> dict[str, list[Any]]:
        """JSON form: ``{name: [low, high, "float"|"int"]}``."""
        return {
            d.name: [int(d.low), int(d.high), "int"] if d.is_int else [d.low, d.high, "float"]
            for d in self.dims
        }

    def validate(self, params: Mapping[str, Any]) -> Params:
        """Check keys, types and bounds; return plain ``float``/``int`` values.

        A value off its bound by less than 1e-9 of the span is clipped; an int
        parameter accepts an integral float (``3.0``).
        """
        keys = set(params)
        names = set(self.names)
        if keys != names:
            missing = sorted(names - keys)
            extra = sorted(keys - names)
            raise ValueError(f"params: missing {missing}, unknown {extra}")
        out: Params = {}
        for d in self.dims:
            v = params[d.name]
            if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
                raise ValueError(f"params.{d.name}: expected a number, got {v!r}")
            x = float(v)
            tol = 1e-9 * max(d.span, 1.0)
            if not math.isfinite(x) or x < d.low - tol or x > d.high + tol:
                raise ValueError(f"params.{d.name}: {v!r} outside [{d.low:g}, {d.high:g}]")
            x = min(max(x, d.low), d.high)
            if d.is_int:
                if abs(x - round(x)) > 1e-9:
                    raise ValueError(f"params.{d.name}: expected an integer, got {v!r}")
                out[d.name] = int(round(x))
            else:
                out[d.name] = x
        return out

    def to_unit(self, params: Mapping[str, ParamValue]) -> NDArray[np.float64]:
        """Unit-cube coordinates of (validated) params."""
        return np.array(
            [(float(params[d.name]) - d.low) / d.span if d.span > 0 else 0.0 for d in self.dims],
            dtype=np.float64,
        )

    def from_unit(self, u: NDArray[np.float64]) -> Params:
        """Params at unit coordinates ``u`` (clipped; int parameters rounded)."""
        out: Params = {}
        for d, x in zip(self.dims, np.asarray(u, dtype=np.float64).ravel(), strict=True):
            v = min(max(d.low + float(x) * d.span, d.low), d.high)
            out[d.name] = int(np.rint(v)) if d.is_int else v
        return out

    def round_unit(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Snap the int columns of unit points ``x`` (n, d) or (d,) to their grid."""
        x = np.array(x, dtype=np.float64, copy=True)
        if self._int_cols.size:
            view = x.reshape(-1, len(self.dims))
            n = np.array([self.dims[i].span for i in self._int_cols])
            view[:, self._int_cols] = np.clip(np.rint(view[:, self._int_cols] * n) / n, 0.0, 1.0)
        return x

    def key(self, params: Mapping[str, ParamValue]) -> tuple[float, ...]:
        """Hashable identity of a point (exact values)."""
        return tuple(float(params[n]) for n in self.names)


def space_params(space: SpaceSpec, u: Sequence[float] | NDArray[np.float64]) -> Params:
    """Params at unit coordinates ``u`` of ``space`` (helper for tests and benchmarks)."""
    return ParamSpace.of(space).from_unit(np.asarray(u, dtype=np.float64))
