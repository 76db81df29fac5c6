"""The optimizer strategies by name: the one list that program.md's ``strategy:``, a saved
state's ``"strategy"`` and :func:`loops.optimizer.optimizer_from_state` go by.

Names only at import (no numpy, scikit-learn or torch): loading a program does not load
a model. :func:`strategy_class` imports a strategy's module when it is first needed; a
strategy behind an optional extra that is not installed is a :class:`StrategyUnavailable`
naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

__all__ = ["STRATEGY_NAMES", "StrategyUnavailable", "missing_extra", "strategy_class"]


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    extra: str | None = None  # the pyproject extra its libraries come from
    needs: tuple[str, ...] = ()  # those libraries (named in the error when missing)


_REGISTRY: dict[str, _Entry] = {
    "bayes": _Entry("loops.optbayes", "BayesOptimizer"),
    "random": _Entry("loops.optbaselines", "RandomSearch"),
    "grid": _Entry("loops.optbaselines", "GridSearch"),
    "botorch": _Entry(
        "loops.optbotorch",
        "BoTorchStrategy",
        "botorch",
        ("torch", "botorch", "gpytorch", "linear_operator"),
    ),
}

#: every strategy name, in the order the docs list them
STRATEGY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


class StrategyUnavailable(ImportError):
    """A strategy whose optional libraries are not installed (the message names the extra)."""


def _unavailable(name: str, entry: _Entry, missing: list[str]) -> str:
    return (
        f"strategy {name!r} needs {', '.join(entry.needs)} (missing: {', '.join(missing)}): "
        f"pip install 'labbridge[{entry.extra}]'"
    )


def missing_extra(name: str) -> str | None:
    """Why strategy ``name`` cannot be used here (its extra is not installed: the line names
    the ``pip install``), or None (a known strategy that can, or an unknown name: the
    program's parser refuses those). Looks the libraries up without importing them, so that
    ``labbridge check`` and a campaign's start can refuse it before anything runs."""
    entry = _REGISTRY.get(name)
    if entry is None or entry.extra is None:
        return None
    missing = [module for module in entry.needs if not _findable(module)]
    return _unavailable(name, entry, missing) if missing else None


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install counts as missing
        return False


def strategy_class(name: str) -> Any:
    """The class of strategy ``name`` (imported on first use).

    Raises ``ValueError`` for an unknown name (the known ones listed) and
    :class:`StrategyUnavailable` when the strategy's extra is not installed.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGY_NAMES)})")
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        top = (exc.name or "").partition(".")[0]  # botorch.acquisition: botorch's
        if entry.extra is None or top not in entry.needs:
            raise
        why = missing_extra(name) or _unavailable(name, entry, [top])
        raise StrategyUnavailable(why) from exc
    return getattr(module, entry.cls)
