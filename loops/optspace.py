"""The parameter space of a campaign's optimizer and the data it exchanges.

:class:`ParamSpace` (named float, int, ordinal and categorical parameters and their
map to the unit cube), :class:`Proposal` (a point to run) and :class:`Observation` (what happened
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
    "CHOICE_KINDS",
    "STATUSES",
    "Constraint",
    "Dimension",
    "Direction",
    "Exhausted",
    "Kind",
    "Observation",
    "ParamSpace",
    "ParamValue",
    "Params",
    "Proposal",
    "SpaceSpec",
    "Status",
    "UnknownProposal",
    "choice_index",
    "parse_choices",
    "space_params",
]

Status = Literal["ok", "infeasible", "failed", "untrusted"]
STATUSES: tuple[Status, ...] = ("ok", "infeasible", "failed", "untrusted")
Direction = Literal["minimize", "maximize"]
#: a parameter's value: a number, or one of a categorical/ordinal parameter's choices
ParamValue = float | int | str
Params = dict[str, ParamValue]
Kind = Literal["float", "int", "ordinal", "categorical"]
#: the parameter kinds that take a list of choices
CHOICE_KINDS = ("categorical", "ordinal")
#: ``{name: (low, high, type)}``; type is ``float``/``int`` or ``"float"``/``"int"``;
#: a 2-tuple ``(low, high)`` means float; ``("categorical", [choices])`` or
#: ``("ordinal", [choices in order])`` a parameter that takes one of ``choices``.
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
    """A point to run. ``params`` holds plain ``float``/``int``/choices (JSON-ready)."""

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
    """One parameter.

    Numbers: ``low <= value <= high``; ``is_int`` parameters take integer values.
    Choices (``choices`` not empty): the value is one of ``choices``; an
    *ordinal* one (``ordered``) lives on one unit column at its index's grid
    point (``low = 0``, ``high = len(choices) - 1``, like an int), a
    *categorical* one on ``len(choices)`` one-hot columns.
    """

    name: str
    low: float
    high: float
    is_int: bool
    choices: tuple[ParamValue, ...] = ()
    ordered: bool = False

    @property
    def span(self) -> float:
        return self.high - self.low

    @property
    def kind(self) -> Kind:
        if self.choices:
            return "ordinal" if self.ordered else "categorical"
        return "int" if self.is_int else "float"

    @property
    def width(self) -> int:
        """Columns of the unit cube this parameter takes (one-hot: one per choice)."""
        return len(self.choices) if self.kind == "categorical" else 1

    def index(self, value: Any) -> int | None:
        """The position of ``value`` among ``choices`` (numbers compare by value), or None."""
        return choice_index(self.choices, value)


def choice_index(choices: Sequence[Any], value: Any) -> int | None:
    """The position of ``value`` among ``choices`` (numbers compare by value: ``2.0`` is the
    choice ``2``; a string only equals a string, a bool is never a choice), or None."""
    if isinstance(value, bool):
        return None
    for i, c in enumerate(choices):
        if isinstance(c, str) or isinstance(value, str):
            if c == value:
                return i
        elif isinstance(value, int | float | np.number) and float(c) == float(value):
            return i
    return None


def parse_choices(kind: str, raw: Any) -> tuple[ParamValue, ...]:
    """The choices of a categorical/ordinal parameter: >= 2 distinct strings or finite
    numbers. ValueError says what is wrong (without the parameter's name)."""
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise ValueError(f"a {kind} parameter needs a list of choices, got {raw!r}")
    out: list[ParamValue] = []
    for c in raw:
        if isinstance(c, bool) or not isinstance(c, str | int | float):
            raise ValueError(f"a choice is a string or a number, got {c!r}")
        if isinstance(c, float) and not math.isfinite(c):
            raise ValueError(f"a choice must be finite, got {c!r}")
        if choice_index(out, c) is not None:
            raise ValueError(f"choice {c!r} is listed twice")
        out.append(c)
    if len(out) < 2:
        raise ValueError(f"a {kind} parameter needs at least 2 choices, got {raw!r}")
    return tuple(out)


@dataclass(frozen=True)
class ParamSpace:
    """A box of named parameters (float, int, ordinal, categorical) and its map to the unit cube.

    Build it with :meth:`of` from ``{name: (low, high, type)}`` (numbers) or
    ``{name: ("categorical" | "ordinal", [choices])}``. Unit coordinates:
    ``u = (value - low) / (high - low)``; int parameters live on the grid
    ``k / (high - low)``, an ordinal one on ``index / (n - 1)``, a categorical
    one on ``n`` one-hot columns (a unit point maps back to the choice of its
    largest column). ``len(space)`` is the number of unit columns (the GP's
    input dimension), ``space.names`` the parameters.
    """

    dims: tuple[Dimension, ...]
    #: the unit columns a model must see snapped (int and ordinal grids, one-hot blocks)
    _int_cols: NDArray[np.intp] = field(init=False, repr=False, compare=False)
    _grid_cols: NDArray[np.intp] = field(init=False, repr=False, compare=False)
    _grid_n: NDArray[np.float64] = field(init=False, repr=False, compare=False)
    _onehot: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _cols: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cols: list[int] = []
        grid: list[int] = []
        grid_n: list[float] = []
        onehot: list[tuple[int, int]] = []
        c = 0
        for d in self.dims:
            cols.append(c)
            if d.kind == "categorical":
                onehot.append((c, d.width))
            elif d.is_int and d.span > 0:
                grid.append(c)
                grid_n.append(d.span)
            c += d.width
        snapped = sorted(grid + [i for start, n in onehot for i in range(start, start + n)])
        object.__setattr__(self, "_int_cols", np.array(snapped, np.intp))
        object.__setattr__(self, "_grid_cols", np.array(grid, np.intp))
        object.__setattr__(self, "_grid_n", np.array(grid_n, np.float64))
        object.__setattr__(self, "_onehot", tuple(onehot))
        object.__setattr__(self, "_cols", tuple(cols))

    @classmethod
    def of(cls, spec: SpaceSpec | ParamSpace | Any) -> ParamSpace:
        """Parse ``{name: (low, high, type)}`` / ``{name: (kind, choices)}``; errors name the
        parameter.

        Also takes any object with a ``parameters`` sequence of items having
        ``name``, ``low``, ``high``, ``type`` and (for choices) ``choices`` (a
        campaign's space), without importing it.
        """
        if isinstance(spec, ParamSpace):
            return spec
        if not isinstance(spec, Mapping) and hasattr(spec, "parameters"):
            spec = {
                p.name: (p.type, list(p.choices))
                if getattr(p, "choices", ())
                else (p.low, p.high, p.type)
                for p in spec.parameters
            }
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
            if len(items) == 2 and items[0] in CHOICE_KINDS:
                kind = items[0]
                try:
                    choices = parse_choices(kind, items[1])
                except ValueError as exc:
                    raise ValueError(f"space.{name}: {exc}") from None
                dims.append(
                    Dimension(name, 0.0, float(len(choices) - 1), True, choices, kind == "ordinal")
                )
                continue
            if len(items) == 2:
                items.append(float)
            if len(items) != 3:
                raise ValueError(
                    f"space.{name}: expected (low, high, type) or (categorical|ordinal, "
                    f"[choices]), got {entry!r}"
                )
            low, high, kind = items
            if kind in (int, "int"):
                is_int = True
            elif kind in (float, "float"):
                is_int = False
            else:
                raise ValueError(
                    f"space.{name}: type must be float or int (or a (categorical|ordinal, "
                    f"[choices]) pair), got {kind!r}"
                )
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
        """The number of unit-cube columns (one per parameter, one per choice of a categorical)."""
        return sum(d.width for d in self.dims)

    def spec(self) -> dict[str, list[Any]]:
        """JSON form: ``{name: [low, high, "float"|"int"]}``, ``{name: [kind, [choices]]}``."""
        out: dict[str, list[Any]] = {}
        for d in self.dims:
            if d.choices:
                out[d.name] = [d.kind, list(d.choices)]
            elif d.is_int:
                out[d.name] = [int(d.low), int(d.high), "int"]
            else:
                out[d.name] = [d.low, d.high, "float"]
        return out

    def validate(self, params: Mapping[str, Any]) -> Params:
        """Check keys, types, bounds and choices; return plain ``float``/``int``/choice values.

        A value off its bound by less than 1e-9 of the span is clipped; an int
        parameter accepts an integral float (``3.0``); a choice is returned as
        listed (``2.0`` for the choice ``2``).
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
            if d.choices:
                i = d.index(v)
                if i is None:
                    listed = ", ".join(repr(c) for c in d.choices)
                    raise ValueError(f"params.{d.name}: {v!r} is not one of {listed}")
                out[d.name] = d.choices[i]
                continue
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

    def to_unit(self, params: Mapping[str, Any]) -> NDArray[np.float64]:
        """Unit-cube coordinates of (validated) params (``len(self)`` columns)."""
        out = np.zeros(len(self), dtype=np.float64)
        for d, c in zip(self.dims, self._cols, strict=True):
            v = params[d.name]
            if d.choices:
                i = d.index(v)
                if i is None:
                    raise ValueError(f"params.{d.name}: {v!r} is not one of {list(d.choices)}")
                if d.ordered:
                    out[c] = i / d.span
                else:
                    out[c + i] = 1.0
            elif d.span > 0:
                out[c] = (float(v) - d.low) / d.span
        return out

    def from_unit(self, u: NDArray[np.float64]) -> Params:
        """Params at unit coordinates ``u`` (clipped; int and ordinal parameters rounded, a
        categorical one the choice of its largest column)."""
        x = np.asarray(u, dtype=np.float64).ravel()
        if x.size != len(self):
            raise ValueError(f"unit point has {x.size} coordinates, the space {len(self)}")
        out: Params = {}
        for d, c in zip(self.dims, self._cols, strict=True):
            if d.choices and not d.ordered:
                out[d.name] = d.choices[int(np.argmax(x[c : c + d.width]))]
                continue
            v = min(max(d.low + float(x[c]) * d.span, d.low), d.high)
            if d.choices:
                out[d.name] = d.choices[int(np.rint(v))]
            else:
                out[d.name] = int(np.rint(v)) if d.is_int else v
        return out

    def round_unit(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Snap unit points ``x`` (n, d) or (d,): int/ordinal columns to their grid, each
        categorical block to the one-hot vector of its largest column."""
        x = np.array(x, dtype=np.float64, copy=True)
        view = x.reshape(-1, len(self))
        if self._grid_cols.size:
            n = self._grid_n
            view[:, self._grid_cols] = np.clip(np.rint(view[:, self._grid_cols] * n) / n, 0.0, 1.0)
        for start, width in self._onehot:
            block = view[:, start : start + width]
            hot = np.argmax(block, axis=1)
            block[:] = 0.0
            block[np.arange(len(block)), hot] = 1.0
        return x

    def key(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """Hashable identity of a point (exact values: floats, and the choices as listed);
        ``dict(zip(space.names, key))`` gives the point back."""
        return tuple(params[d.name] if d.choices else float(params[d.name]) for d in self.dims)


def space_params(space: SpaceSpec, u: Sequence[float] | NDArray[np.float64]) -> Params:
    """Params at unit coordinates ``u`` of ``space`` (helper for tests and benchmarks)."""
    return ParamSpace.of(space).from_unit(np.asarray(u, dtype=np.float64))
