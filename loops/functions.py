"""Functions a recipe's ``compute`` steps (and checks) call by name: a registry, extended by
other packages through the entry-point group ``labbridge.functions`` like drivers are.

A function takes keyword arguments (plain data: numbers, texts, lists, the
mappings a ``call ... into`` records) and returns plain data; a ``ValueError``
or ``ArithmeticError`` it raises means the measurement cannot be used (the
runner reports it as a :class:`~loops.recipe.MeasurementError` naming the
step). Register one in your package's ``pyproject.toml``::

    [project.entry-points."labbridge.functions"]
    ionic_strength = "mylab.chem:ionic_strength"

labbridge's own (for the reference bench) are registered the same way, in its
``pyproject.toml``. Entry points are read once per process: call
:func:`refresh` after installing a package into a running one. Built in here: ``mean``, ``total``,
``minimum``, ``maximum`` over a list of numbers, and ``distance`` (``|a - b|``: how far
a measurement is from its target, the objective of a "hit this value" experiment).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "BUILTIN", "refresh", "registry", "resolve"]

ENTRY_POINT_GROUP = "labbridge.functions"


def _numbers(values: Sequence[Any]) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"needs a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"needs finite numbers, got {v!r}")
        out.append(float(v))
    return out


def mean(values: Sequence[Any]) -> float:
    """The arithmetic mean of a list of numbers."""
    xs = _numbers(values)
    return sum(xs) / len(xs)


def total(values: Sequence[Any]) -> float:
    """The sum of a list of numbers."""
    return sum(_numbers(values))


def minimum(values: Sequence[Any]) -> float:
    """The smallest of a list of numbers."""
    return min(_numbers(values))


def maximum(values: Sequence[Any]) -> float:
    """The largest of a list of numbers."""
    return max(_numbers(values))


def distance(a: Any, b: Any) -> float:
    """``|a - b|`` of two numbers, or the Euclidean distance of two equally long lists."""
    xs = _numbers(a if isinstance(a, Sequence) and not isinstance(a, str) else [a])
    ys = _numbers(b if isinstance(b, Sequence) and not isinstance(b, str) else [b])
    if len(xs) != len(ys):
        raise ValueError(f"needs two numbers or two lists of one length, got {a!r} and {b!r}")
    return math.dist(xs, ys)


BUILTIN: dict[str, Callable[..., Any]] = {
    "distance": distance,
    "mean": mean,
    "total": total,
    "minimum": minimum,
    "maximum": maximum,
}


@functools.cache
def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def registry() -> dict[str, str | Callable[..., Any]]:
    """Every registered function name -> the function (built in) or its entry point."""
    out: dict[str, str | Callable[..., Any]] = dict(BUILTIN)
    out.update(_entry_points())
    return out


@functools.cache
def resolve(name: str) -> Callable[..., Any]:
    """The function registered as ``name`` (imported on first use). ``KeyError`` names the
    registered ones; an entry point that is not callable is a ``TypeError``."""
    found = registry().get(name)
    if found is None:
        raise KeyError(f"unknown function {name!r} (registered: {', '.join(sorted(registry()))})")
    if callable(found):
        return found
    module_name, _, attr = found.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"entry point {name!r} ({found}) is not a function")
    return obj


def refresh() -> None:
    """Forget the entry points and functions looked up so far (they are cached): a package
    installed, or put on ``sys.path``, while this process runs is seen from the next lookup,
    and one taken away is no longer offered."""
    importlib.invalidate_caches()
    _entry_points.cache_clear()
    resolve.cache_clear()


def call(name: str, args: Mapping[str, Any]) -> Any:
    """Call the function registered as ``name`` with keyword ``args``."""
    return resolve(name)(**dict(args))
