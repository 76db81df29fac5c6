"""The parts an envelope is made of: channel limits, rules, vessels, budgets and the ledger.

:class:`~safety.envelope.Envelope` holds them and checks commands with them;
:mod:`safety.envelopeload` builds them from YAML. :class:`Ledger` is an envelope's
runtime state: when each channel last changed and what each budget consumed.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safety.expr import EvaluationError, Expression

__all__ = [
    "EPS",
    "WINDOWS_S",
    "Budget",
    "ChannelLimit",
    "Ledger",
    "Rule",
    "Vessel",
    "Violation",
    "describe",
    "fmt",
    "is_number",
    "same",
]

WINDOWS_S = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}
#: tolerance for float comparisons of limits and budgets (values are in SI-ish units)
EPS = 1e-9


def fmt(value: Any) -> str:
    """A value for messages: floats without representation noise (0.30000000000000004 -> 0.3)."""
    if value is None:
        return "<unknown>"
    if isinstance(value, float) and math.isfinite(value):
        return repr(round(value, 9))
    return repr(value)


def describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Violation:
    """One reason to refuse: ``rule`` is a rule name, ``<channel>.<limit>`` or ``budget.<name>``."""

    rule: str
    reason: str
    values: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "rule"  # limit | allowed | rate | rule | budget | command | latch

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class ChannelLimit:
    name: str
    min: float | None = None
    max: float | None = None
    allowed: tuple[Any, ...] | None = None
    max_rate_per_min: float | None = None
    max_rise_per_min: float | None = None
    unit: str = ""
    doc: str = ""
    line: int | None = field(default=None, compare=False)
    #: why the channel is deliberately not limited (deny by default needs it said)
    unbounded: str | None = None

    def bounds(self) -> str:
        """How the channel is bounded, in words (``labbridge check`` lists it)."""
        parts = []
        if self.allowed is not None:
            parts.append("one of " + ", ".join(fmt(a) for a in self.allowed))
        if self.min is not None:
            parts.append(f">= {fmt(self.min)}")
        if self.max is not None:
            parts.append(f"<= {fmt(self.max)}")
        if self.max_rate_per_min is not None:
            parts.append(f"changes <= {fmt(self.max_rate_per_min)}/min")
        if self.max_rise_per_min is not None:
            parts.append(f"rises <= {fmt(self.max_rise_per_min)}/min")
        if self.unbounded:
            parts.append(f"unbounded: {self.unbounded}")
        return (", ".join(parts) + (f" {self.unit}" if self.unit else "")) or "not bounded"

    def check(
        self, value: Any, before: Any, last: tuple[Any, float] | None, t0: float, now: float
    ) -> list[Violation]:
        """Limits and rate of change of one new commanded ``value`` (``before`` = current value)."""
        out: list[Violation] = []
        name = self.name
        if self.allowed is not None and not any(same(value, a) for a in self.allowed):
            options = ", ".join(fmt(a) for a in self.allowed)
            out.append(
                Violation(
                    f"{name}.allowed",
                    f"{name}.allowed: {name}={fmt(value)} is not one of {options}",
                    {name: value},
                    "allowed",
                )
            )
        ranged = self.min is not None or self.max is not None or self.rate is not None
        if not ranged:
            return out
        if not is_number(value) or not math.isfinite(value):
            which = "min" if self.min is not None else "max" if self.max is not None else "rate"
            out.append(
                Violation(
                    f"{name}.{which}",
                    f"{name}.{which}: {name}={fmt(value)} is not a finite number",
                    {name: value},
                    "limit",
                )
            )
            return out
        if self.min is not None and value < self.min - EPS:
            out.append(
                Violation(
                    f"{name}.min",
                    f"{name}.min: {name}={fmt(value)} is below the minimum {fmt(self.min)}",
                    {name: value},
                    "limit",
                )
            )
        if self.max is not None and value > self.max + EPS:
            out.append(
                Violation(
                    f"{name}.max",
                    f"{name}.max: {name}={fmt(value)} is above the maximum {fmt(self.max)}",
                    {name: value},
                    "limit",
                )
            )
        if self.rate is not None:
            out.extend(self._check_rate(value, before, last, t0, now))
        return out

    @property
    def rate(self) -> float | None:
        return self.max_rise_per_min if self.max_rise_per_min is not None else self.max_rate_per_min

    def _check_rate(
        self, value: float, before: Any, last: tuple[Any, float] | None, t0: float, now: float
    ) -> list[Violation]:
        if last is not None:
            base, t_base = last
        elif is_number(before):
            base, t_base = before, t0
        elif self.min is not None:
            base, t_base = self.min, t0
        else:
            return []  # nothing to measure a change from
        if not is_number(base) or value == base:
            return []
        rise_only = self.max_rise_per_min is not None
        change = value - base
        if rise_only and change <= 0:
            return []
        rate = self.rate
        assert rate is not None
        minutes = max(0.0, now - t_base) / 60.0
        if abs(change) <= rate * minutes + EPS:
            return []
        key = "max_rise_per_min" if rise_only else "max_rate_per_min"
        verb = "rise" if change > 0 else "fall"
        name = self.name
        return [
            Violation(
                f"{name}.{key}",
                f"{name}.{key}: {name} would {verb} from {fmt(base)} to {fmt(value)} within "
                f"{minutes * 60:.3g} s; at most {fmt(rate)} per minute allows "
                f"{fmt(rate * minutes)} in that time",
                {name: value, f"{name} (before)": base, "seconds since last change": now - t_base},
                "rate",
            )
        ]


def same(a: Any, b: Any) -> bool:
    """Equality that does not confuse True with 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


@dataclass(frozen=True)
class Rule:
    name: str
    expr: Expression
    doc: str = ""
    line: int | None = field(default=None, compare=False)

    def check(self, post: Mapping[str, Any]) -> Violation | None:
        names = self.expr.names_in_order()
        values = {n: post.get(n) for n in names}
        try:
            result = self.expr.evaluate(post)
        except EvaluationError as exc:
            return Violation(
                self.name,
                f"rule {self.name} cannot be evaluated ({exc}): {describe(values)}",
                values,
                "rule",
            )
        if result is True:
            return None
        if result is not False:
            return Violation(
                self.name,
                f"rule {self.name} evaluated to {fmt(result)}, not true/false: {describe(values)}",
                values,
                "rule",
            )
        return Violation(self.name, f"rule {self.name}: {describe(values)}", values, "rule")


@dataclass(frozen=True)
class Vessel:
    """Liquid that instruments add to (``fed_by``: their ``out`` flows) and take from
    (``drained_by``: their ``in`` flows); ``<name>.volume`` may not exceed ``max``."""

    name: str
    max: float
    fed_by: tuple[str, ...] = ()
    drained_by: tuple[str, ...] = ()
    capacity: float | None = None
    unit: str = "mL"
    doc: str = ""
    line: int | None = field(default=None, compare=False)

    @property
    def channel(self) -> str:
        return f"{self.name}.volume"


@dataclass(frozen=True)
class Budget:
    name: str  # e.g. added_per_day
    resource: str  # experiments | <vessel>.added|removed | <instrument>.delivered|withdrawn
    window: str  # minute | hour | day
    limit: float
    line: int | None = field(default=None, compare=False)
    unit: str = ""

    @property
    def window_s(self) -> float:
        return WINDOWS_S[self.window]


class Ledger:
    """Runtime bookkeeping of one station's envelope: when each channel last changed, what
    was consumed when (for rolling budgets). Times come from the caller's clock (seconds).

    ``start(now)`` fixes ``t0``, the time rate limits count from for channels that
    never changed (the guard starts it when it is created). Thread-safe.

    Durable budgets: after :meth:`track_unsaved`, every consumption is also kept until
    :meth:`take_unsaved` hands it to whoever stores it (the station actor, in the
    journal); :meth:`restore` loads consumption from before a restart.
    """

    MAX_WINDOW_S = max(WINDOWS_S.values())

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.t0: float | None = None
        self._changes: dict[str, tuple[Any, float]] = {}
        self._consumed: dict[str, deque[tuple[float, float]]] = {}
        self._unsaved: list[tuple[str, float, float]] | None = None

    def start(self, now: float) -> None:
        with self._lock:
            if self.t0 is None:
                self.t0 = now

    def last_change(self, name: str) -> tuple[Any, float] | None:
        with self._lock:
            return self._changes.get(name)

    def record_changes(
        self, before: Mapping[str, Any], updates: Mapping[str, Any], now: float
    ) -> None:
        """Note the time of every update whose value differs from ``before`` (or was never noted)."""
        with self._lock:
            for name, value in updates.items():
                last = self._changes.get(name)
                if last is None or not same(last[0], value) or not same(before.get(name), value):
                    self._changes[name] = (value, now)

    def consume(self, resource: str, amount: float, now: float) -> None:
        if amount <= 0:
            return
        with self._lock:
            self._add(resource, float(amount), now)
            if self._unsaved is not None:
                self._unsaved.append((resource, float(amount), now))

    def _add(self, resource: str, amount: float, now: float) -> None:
        entries = self._consumed.setdefault(resource, deque())
        entries.append((now, amount))
        while entries and entries[0][0] < now - self.MAX_WINDOW_S:
            entries.popleft()

    def track_unsaved(self) -> None:
        """Keep every consumption from now on until :meth:`take_unsaved` collects it."""
        with self._lock:
            if self._unsaved is None:
                self._unsaved = []

    def take_unsaved(self) -> list[tuple[str, float, float]]:
        """The consumption since the last call, ``(resource, amount, time)``, and forget it."""
        with self._lock:
            out, self._unsaved = (self._unsaved or []), ([] if self._unsaved is not None else None)
        return out

    def restore(self, entries: Iterable[tuple[str, float, float]]) -> None:
        """Consumption from before a restart, ``(resource, amount, time on this ledger's
        clock)``, oldest first; counted by the budgets, not handed out as unsaved."""
        with self._lock:
            for resource, amount, when in sorted(entries, key=lambda e: e[2]):
                if amount > 0:
                    self._add(str(resource), float(amount), float(when))

    def used(self, resource: str, window_s: float, now: float) -> float:
        """Amount of ``resource`` consumed in ``(now - window_s, now]``."""
        with self._lock:
            entries = self._consumed.get(resource, ())
            return float(sum(a for t, a in entries if t > now - window_s))

    def copy(self) -> Ledger:
        other = Ledger()
        with self._lock:
            other.t0 = self.t0
            other._changes = dict(self._changes)
            other._consumed = {k: deque(v) for k, v in self._consumed.items()}
        return other
