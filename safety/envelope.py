"""The safety envelope of one station: channel limits, rates of change, rules, budgets, monitors.

Declared in YAML (a mapping; the lab config embeds one per station)::

    channels:                      # flat "<instrument>.<channel>" names, see safety/model.py
      hotplate.setpoint_c: {min: 0, max: 80, max_rise_per_min: 10}
      hotplate.stirrer_rpm: {min: 0, max: 1200}
      hotplate.heater: {unbounded: "on/off; rules say when it may be on"}
      pump_a.rate_ml_min: {min: 0.01, max: 10}
      enclosure.lid: {allowed: [open, closed]}
    vessels:                       # liquid that several instruments change together
      beaker: {max: 2.8, capacity: 3.0, unit: mL, fed_by: [pump_a, pump_b], drained_by: [drain]}
    rules:                         # the rule language of safety/expr.py
      - name: heater-needs-stirring-and-closed-lid
        when: hotplate.heater -> hotplate.stirrer_rpm >= 100 and enclosure.lid == "closed"
    budgets:                       # rolling windows: minute, hour or day
      experiments_per_hour: 30     # shorthand for {counts: experiments, per: hour, max: 30}
      added_per_day: {counts: beaker.added, per: day, max: 50, unit: mL}
    monitors:                      # station monitors (safety/monitorspec.py): a trip latches
      - {name: too-hot, kind: threshold, channel: hotplate.liquid_c, trip_above: 80, clear_below: 75}
      - {name: lid-open-while-heating, kind: interlock,
         trip_when: 'hotplate.heater and enclosure.lid != "closed"'}

Channel keys: ``min``, ``max``, ``allowed`` (a list), ``max_rate_per_min`` (the
commanded value may change by at most this much per minute, up or down),
``max_rise_per_min`` (only increases are limited: lowering a setpoint is
always fine), ``unbounded`` (a reason: the channel is deliberately not
limited), ``unit`` and ``doc`` (informational). Deny by default: an actuating
command that sets a channel the envelope does not list is refused
(safety/effects.py).

Vessel keys: ``max`` (the most it may hold: ``<vessel>.volume`` is limited to
it), ``capacity`` (informational), ``unit``, ``doc``, ``fed_by`` (instruments
whose ``out`` flows go into it) and ``drained_by`` (instruments whose ``in``
flows come from it). The guard tracks ``<vessel>.volume`` from the flows
(instruments/declare.py ``Flow``); rules use it like any channel. An
instrument feeds or drains at most one vessel and only in its direction.

Monitors (a list; kinds ``threshold``, ``staleness``, ``heartbeat``,
``interlock``) are watched by the station supervisor, not checked here: see
:mod:`safety.monitorspec` for their keys; :meth:`Envelope.build_monitors`
makes them. Their channels are validated like the rest
(:meth:`Envelope.validate_known`). The faults the station's drivers declare
are monitors too, without a word here; an entry ``{name:
<instrument>.<fault>, disabled: <why>}`` or ``{..., while: <condition>}`` switches
one off or narrows it (``Envelope.fault_settings``, :mod:`safety.devicefaults`).

Rule keys: ``name``, ``when``, ``doc``. Budget keys: ``counts``
(``experiments``, consumed by ``Guard.begin_experiment``, or
``<vessel>.added`` / ``<vessel>.removed``: volume flowed in / out;
``<instrument>.delivered`` / ``<instrument>.withdrawn``: what one instrument
that feeds / drains a vessel moved, e.g. one reagent's pump), ``per``
(``minute``, ``hour`` or ``day``), ``max``, ``unit``, ``doc``.

What :meth:`Envelope.check` refuses (the guard and the dry run call it with
the station state before a command and the command's updates):

* **limits** (min/max, allowed values), only for the channels the command
  sets (a value that is not a number where a range is declared is refused);
* **rate of change**, only when a channel's value changes: ``|new - old|``
  (or ``new - old`` for ``max_rise_per_min``) must not exceed the rate times
  the minutes since that channel last changed (the :class:`Ledger` keeps the
  time). A channel with no recorded change starts from its value in the state
  (else its ``min``) at the time the ledger started (the guard's start):
  a fresh station ramps from where it is;
* **rules**: EVERY rule is evaluated on the state after the command, and any
  rule that is false, or cannot be evaluated (an unknown name, a type error),
  refuses the command, whether or not the rule was already false before: a
  station whose state breaks a rule accepts only the commands that make it
  safer (heater off, pump stop, light off...), which never reach this check
  (see safety/effects.py). Rules are not restricted to the changed channels,
  so a rule cannot be dodged by changing something else;
* **budgets**: what the command consumes plus what was consumed in the
  rolling window must stay within the budget.

Errors in the YAML name the file, the line and the field
(:class:`EnvelopeError`); a rule that does not parse raises
:class:`~safety.expr.RuleSyntaxError` with the file, line and column of the
bad token inside the YAML file. Both are ``ValueError``s.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
import threading
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safety.expr import EvaluationError, Expression, parse
from safety.monitors import Monitor
from safety.monitorspec import FaultSetting, MonitorSpec, parse_monitors
from safety.yamldoc import ConfigError, YamlDoc, compose_yaml

__all__ = [
    "Budget",
    "Vessel",
    "ChannelLimit",
    "Envelope",
    "EnvelopeError",
    "Ledger",
    "Rule",
    "Violation",
    "load_envelope",
    "reference_envelope",
    "REFERENCE_BENCH",
]

REFERENCE_BENCH = Path(__file__).with_name("reference_bench.yaml")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_RULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_BUDGET_RE = re.compile(r"experiments_per_(minute|hour|day)")
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WINDOWS_S = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}
CHANNEL_KEYS = (
    "min",
    "max",
    "allowed",
    "max_rate_per_min",
    "max_rise_per_min",
    "unbounded",
    "unit",
    "doc",
)
VESSEL_KEYS = ("max", "capacity", "unit", "fed_by", "drained_by", "doc")
BUDGET_KEYS = ("counts", "per", "max", "unit", "doc")
RULE_KEYS = ("name", "when", "doc")
TOP_KEYS = ("channels", "vessels", "rules", "budgets", "monitors")
#: tolerance for float comparisons of limits and budgets (values are in SI-ish units)
EPS = 1e-9


class EnvelopeError(ConfigError):
    """An invalid envelope: ``<source>:<line>: <field>: <problem>`` (line omitted when unknown)."""


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


class Envelope:
    """The envelope of one station (see the module docstring). ``ledger`` is its runtime state."""

    def __init__(
        self,
        channels: Iterable[ChannelLimit] = (),
        rules: Iterable[Rule] = (),
        budgets: Iterable[Budget] = (),
        *,
        vessels: Iterable[Vessel] = (),
        monitors: Iterable[MonitorSpec] = (),
        fault_settings: Iterable[FaultSetting] = (),
        source: str = "<envelope>",
    ) -> None:
        self.channels: dict[str, ChannelLimit] = {c.name: c for c in channels}
        self.vessels: dict[str, Vessel] = {v.name: v for v in vessels}
        for v in self.vessels.values():
            self.channels.setdefault(
                v.channel, ChannelLimit(v.channel, max=v.max, unit=v.unit, line=v.line)
            )
        self.rules: list[Rule] = list(rules)
        self.budgets: list[Budget] = list(budgets)
        #: the station monitors, declared (:meth:`build_monitors` makes them)
        self.monitors: list[MonitorSpec] = list(monitors)
        #: what the envelope says about the faults its drivers declare (disabled / while)
        self.fault_settings: list[FaultSetting] = list(fault_settings)
        self.source = source
        self.ledger = Ledger()

    def __repr__(self) -> str:
        return (
            f"<Envelope {self.source}: {len(self.channels)} channels, {len(self.vessels)} vessels, "
            f"{len(self.rules)} rules, {len(self.budgets)} budgets, {len(self.monitors)} monitors>"
        )

    def fresh(self) -> Envelope:
        """The same limits with a new, empty ledger (e.g. for another station)."""
        other = copy.copy(self)
        other.ledger = Ledger()
        return other

    def names(self) -> set[str]:
        """Every channel name the envelope refers to (limits, rules and monitors)."""
        out = set(self.channels)
        for rule in self.rules:
            out |= rule.expr.names()
        for monitor in self.monitors:
            out |= set(monitor.channels)
        for setting in self.fault_settings:
            out |= set(setting.channels)
        return out

    def build_monitors(self) -> list[Monitor]:
        """Fresh station monitors from the ``monitors`` section (one set per supervisor)."""
        return [spec.build() for spec in self.monitors]

    def validate_known(self, known: Collection[str] | Mapping[str, Collection[str] | None]) -> None:
        """Raise :class:`EnvelopeError` if a channel, rule or monitor names an unknown instrument/channel.

        ``known``: instrument names (any channel), full ``instrument.channel``
        names, or a mapping instrument -> its channel names (None/empty: any).
        """
        vessel_channels = {v.channel for v in self.vessels.values()}
        if isinstance(known, Mapping):
            instruments = set(known)
        else:
            instruments = {n.partition(".")[0] for n in known}
        if isinstance(known, Mapping):
            known = {**known, **{v.name: ["volume"] for v in self.vessels.values()}}
        else:
            known = [*known, *vessel_channels]
        check = _known_checker(known)
        for name, lim in self.channels.items():
            problem = check(name)
            if problem:
                raise EnvelopeError(
                    problem, source=self.source, line=lim.line, field=f"channels.{name}"
                )
        for i, rule in enumerate(self.rules):
            for name in rule.expr.names_in_order():
                problem = check(name)
                if problem:
                    raise EnvelopeError(
                        f"{problem} in rule {rule.name} ({rule.expr.text})",
                        source=self.source,
                        line=rule.line,
                        field=f"rules[{i}].when",
                    )
        for i, monitor in enumerate(self.monitors):
            for name in monitor.channels:
                problem = check(name)
                if problem:
                    raise EnvelopeError(
                        f"{problem} in monitor {monitor.name}",
                        source=self.source,
                        line=monitor.line,
                        field=f"monitors[{monitor.index if monitor.index is not None else i}]"
                        f".{monitor.channel_key}",
                    )
        for setting in self.fault_settings:
            where = f"monitors[{setting.index}]" if setting.index is not None else "monitors"
            if setting.instrument not in instruments:
                raise EnvelopeError(
                    f"{setting.name} names unknown instrument '{setting.instrument}'; known: "
                    f"{', '.join(sorted(instruments))}",
                    source=self.source,
                    line=setting.line,
                    field=f"{where}.name",
                )
            for name in setting.channels:
                problem = check(name)
                if problem:
                    raise EnvelopeError(
                        f"{problem} in the setting of {setting.name}",
                        source=self.source,
                        line=setting.line,
                        field=f"{where}.while",
                    )
        for v in self.vessels.values():
            if v.name in instruments:
                raise EnvelopeError(
                    f"vessel '{v.name}' has the name of an instrument; give it another",
                    source=self.source,
                    line=v.line,
                    field=f"vessels.{v.name}",
                )
            for key in ("fed_by", "drained_by"):
                for inst in getattr(v, key):
                    if inst not in instruments:
                        raise EnvelopeError(
                            f"unknown instrument '{inst}'; known: {', '.join(sorted(instruments))}",
                            source=self.source,
                            line=v.line,
                            field=f"vessels.{v.name}.{key}",
                        )

    # ---------------------------------------------------------------- checks
    def check(
        self,
        state_before: Mapping[str, Any],
        updates: Mapping[str, Any],
        *,
        now: float,
        consumes: Mapping[str, float] | None = None,
        ledger: Ledger | None = None,
    ) -> list[Violation]:
        """Every violation of the state after applying ``updates`` (empty: allowed).

        ``consumes``: budget resources the command uses (``{"dye_ml": 0.4}``);
        ``ledger``: the runtime bookkeeping to use (default: this envelope's own).
        """
        ledger = self.ledger if ledger is None else ledger
        ledger.start(now)
        t0 = ledger.t0 if ledger.t0 is not None else now
        post = dict(state_before)
        post.update(updates)
        out: list[Violation] = []
        for name, value in updates.items():
            lim = self.channels.get(name)
            if lim is not None:
                out += lim.check(value, state_before.get(name), ledger.last_change(name), t0, now)
        for rule in self.rules:
            violation = rule.check(post)
            if violation is not None:
                out.append(violation)
        for resource, amount in (consumes or {}).items():
            out += self.check_budget(resource, amount, now=now, ledger=ledger)
        return out

    def check_rules(self, state: Mapping[str, Any]) -> list[Violation]:
        """The rules that ``state`` breaks (or that cannot be evaluated on it)."""
        return [v for v in (rule.check(state) for rule in self.rules) if v is not None]

    def check_budget(
        self, resource: str, amount: float, *, now: float, ledger: Ledger | None = None
    ) -> list[Violation]:
        ledger = self.ledger if ledger is None else ledger
        out: list[Violation] = []
        if amount <= 0:
            return out
        for budget in self.budgets:
            if budget.resource != resource:
                continue
            unit = f" {budget.unit}" if budget.unit else ""
            used = ledger.used(resource, budget.window_s, now)
            if used + amount > budget.limit + EPS:
                out.append(
                    Violation(
                        f"budget.{budget.name}",
                        f"budget {budget.name}: {fmt(used)}{unit} used in the last {budget.window} "
                        f"+ {fmt(amount)}{unit} asked > {fmt(budget.limit)}{unit}",
                        {
                            f"{resource} used": used,
                            f"{resource} asked": amount,
                            "limit": budget.limit,
                        },
                        "budget",
                    )
                )
        return out

    def commit(
        self,
        state_before: Mapping[str, Any],
        updates: Mapping[str, Any],
        *,
        now: float,
        consumes: Mapping[str, float] | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        """Record that ``updates`` were applied at ``now`` and ``consumes`` was used."""
        ledger = self.ledger if ledger is None else ledger
        ledger.start(now)
        ledger.record_changes(state_before, updates, now)
        for resource, amount in (consumes or {}).items():
            ledger.consume(resource, amount, now)


def _known_checker(
    known: Collection[str] | Mapping[str, Collection[str] | None],
) -> Any:
    instruments: dict[str, set[str] | None] = {}
    if isinstance(known, Mapping):
        for inst, chans in known.items():
            instruments[inst] = set(chans) if chans else None
    else:
        for name in known:
            inst, dot, chan = name.partition(".")
            if not dot:
                instruments[inst] = None
            elif instruments.get(inst, set()) is not None:
                instruments.setdefault(inst, set()).add(chan)  # type: ignore[union-attr]

    def check(name: str) -> str | None:
        inst, _, chan = name.partition(".")
        if inst not in instruments:
            return f"unknown instrument '{inst}' (in '{name}'); known: {', '.join(sorted(instruments))}"
        chans = instruments[inst]
        if chans is not None and chan not in chans:
            return f"unknown channel '{name}'; {inst} has: {', '.join(sorted(chans))}"
        return None

    return check


# -------------------------------------------------------------------- loading
def _compose(text: str, source: str) -> tuple[Any, YamlDoc]:
    doc = YamlDoc(source, error_cls=EnvelopeError)
    data = compose_yaml(text, doc)
    return ({} if data is None else data), doc


def load_envelope(
    spec: str | Path | Mapping[str, Any],
    *,
    source: str | None = None,
    known: Collection[str] | Mapping[str, Collection[str] | None] | None = None,
) -> Envelope:
    """Load and validate an envelope.

    ``spec``: a :class:`~pathlib.Path` (or a ``str`` ending in ``.yaml``/``.yml``
    without a newline) is read as a file; any other ``str`` is YAML text; a
    mapping is already-parsed data (errors then carry no line numbers).
    ``source`` names it in messages (default: the path, or ``<envelope>``).
    ``known``: if given, every channel and rule name must belong to a known
    instrument/channel (see :meth:`Envelope.validate_known`).
    """
    if isinstance(spec, str) and "\n" not in spec and spec.strip().endswith((".yaml", ".yml")):
        spec = Path(spec)
    if isinstance(spec, Path):
        name = source or str(spec)
        try:
            text = spec.read_text(encoding="utf-8")
        except OSError as exc:
            raise EnvelopeError(f"cannot read: {exc.strerror or exc}", source=name) from None
        data, doc = _compose(text, name)
    elif isinstance(spec, str):
        name = source or "<envelope>"
        data, doc = _compose(spec, name)
    elif isinstance(spec, Mapping):
        name = source or "<envelope>"
        data, doc = spec, YamlDoc(name, error_cls=EnvelopeError)
    else:
        raise TypeError(f"an envelope is a path, YAML text or a mapping, not {type(spec).__name__}")
    envelope = _build(data, doc)
    if known is not None:
        envelope.validate_known(known)
    return envelope


def reference_envelope(
    known: Collection[str] | Mapping[str, Collection[str] | None] | None = None,
) -> Envelope:
    """The envelope of the reference bench (``safety/reference_bench.yaml``), with a fresh ledger."""
    return load_envelope(REFERENCE_BENCH, source=REFERENCE_BENCH.name, known=known)


def _build(data: Any, doc: YamlDoc) -> Envelope:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise doc.error(f"an envelope is a mapping with {', '.join(TOP_KEYS)}", ())
    _no_unknown(data, TOP_KEYS, (), doc)
    channels = [_channel(name, spec, doc) for name, spec in _mapping(data, "channels", doc).items()]
    rules_data = data.get("rules") or []
    if not isinstance(rules_data, list):
        raise doc.error("must be a list of {name, when}", ("rules",))
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, spec in enumerate(rules_data):
        rule = _rule(i, spec, doc)
        if rule.name in seen:
            raise doc.error(f"duplicate rule name '{rule.name}'", ("rules", i, "name"))
        seen.add(rule.name)
        rules.append(rule)
    vessels = [_vessel(k, v, doc) for k, v in _mapping(data, "vessels", doc).items()]
    owners: dict[str, str] = {}
    for v in vessels:
        for inst in (*v.fed_by, *v.drained_by):
            if inst in owners:
                raise doc.error(
                    f"'{inst}' already feeds or drains vessel '{owners[inst]}': an instrument "
                    f"belongs to one vessel",
                    ("vessels", v.name),
                )
            owners[inst] = v.name
    countable = ["experiments"]
    for v in sorted(vessels, key=lambda v: v.name):
        countable += [f"{v.name}.added", f"{v.name}.removed"]
        countable += [f"{i}.delivered" for i in v.fed_by] + [f"{i}.withdrawn" for i in v.drained_by]
    budgets = [_budget(k, v, doc, countable) for k, v in _mapping(data, "budgets", doc).items()]
    monitors, fault_settings = parse_monitors(data.get("monitors"), doc)
    return Envelope(
        channels,
        rules,
        budgets,
        vessels=vessels,
        monitors=monitors,
        fault_settings=fault_settings,
        source=doc.source,
    )


def _mapping(data: Mapping[str, Any], key: str, doc: YamlDoc) -> Mapping[Any, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise doc.error("must be a mapping", (key,))
    return value


def _no_unknown(
    spec: Mapping[Any, Any], allowed: Iterable[str], path: tuple[Any, ...], doc: YamlDoc
) -> None:
    allowed = tuple(allowed)
    for key in spec:
        if key not in allowed:
            raise doc.error(f"unknown key '{key}' (known: {', '.join(allowed)})", (*path, key))


def _number(value: Any, path: tuple[Any, ...], doc: YamlDoc, *, positive: bool = False) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise doc.error(f"must be a number, got {value!r}", path)
    if positive and value <= 0:
        raise doc.error(f"must be > 0, got {value!r}", path)
    return value


def _channel(name: Any, spec: Any, doc: YamlDoc) -> ChannelLimit:
    path: tuple[Any, ...] = ("channels", name)
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise doc.error(f"channel names are '<instrument>.<channel>', got {name!r}", path)
    if not isinstance(spec, Mapping) or not spec:
        raise doc.error(f"must be a mapping with some of {', '.join(CHANNEL_KEYS)}", path)
    _no_unknown(spec, CHANNEL_KEYS, path, doc)
    lo = _number(spec["min"], (*path, "min"), doc) if spec.get("min") is not None else None
    hi = _number(spec["max"], (*path, "max"), doc) if spec.get("max") is not None else None
    if lo is not None and hi is not None and lo > hi:
        raise doc.error(f"min {lo!r} > max {hi!r}", (*path, "min"))
    allowed = spec.get("allowed")
    if allowed is not None:
        if not isinstance(allowed, list) or not allowed:
            raise doc.error("must be a non-empty list of values", (*path, "allowed"))
        for i, item in enumerate(allowed):
            if not isinstance(item, str | bool | int | float):
                raise doc.error(
                    f"values must be strings, numbers or booleans, got {item!r}",
                    (*path, "allowed", i),
                )
    rates = {}
    for key in ("max_rate_per_min", "max_rise_per_min"):
        if spec.get(key) is not None:
            rates[key] = _number(spec[key], (*path, key), doc, positive=True)
    if len(rates) == 2:
        raise doc.error(
            "give max_rate_per_min or max_rise_per_min, not both", (*path, "max_rise_per_min")
        )
    for key in ("unit", "doc"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise doc.error("must be a string", (*path, key))
    unbounded = spec.get("unbounded")
    if unbounded is not None and (not isinstance(unbounded, str) or not unbounded.strip()):
        raise doc.error("give the reason the channel is not limited (a text)", (*path, "unbounded"))
    return ChannelLimit(
        name,
        lo,
        hi,
        tuple(allowed) if allowed is not None else None,
        rates.get("max_rate_per_min"),
        rates.get("max_rise_per_min"),
        spec.get("unit") or "",
        spec.get("doc") or "",
        line=doc.line(path),
        unbounded=unbounded,
    )


def _names(value: Any, path: tuple[Any, ...], doc: YamlDoc) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _WORD_RE.fullmatch(v) for v in value
    ):
        raise doc.error(f"must be a list of instrument names, got {value!r}", path)
    return tuple(value)


def _vessel(name: Any, spec: Any, doc: YamlDoc) -> Vessel:
    path: tuple[Any, ...] = ("vessels", name)
    if not isinstance(name, str) or not _WORD_RE.fullmatch(name):
        raise doc.error(f"a vessel name is a word, got {name!r}", path)
    if not isinstance(spec, Mapping) or "max" not in spec:
        raise doc.error("a vessel is a mapping with max (and fed_by, drained_by)", path)
    _no_unknown(spec, VESSEL_KEYS, path, doc)
    most = _number(spec["max"], (*path, "max"), doc, positive=True)
    capacity = None
    if spec.get("capacity") is not None:
        capacity = _number(spec["capacity"], (*path, "capacity"), doc, positive=True)
        if most > capacity:
            raise doc.error(f"max {most!r} > capacity {capacity!r}", (*path, "max"))
    fed_by = _names(spec.get("fed_by"), (*path, "fed_by"), doc)
    drained_by = _names(spec.get("drained_by"), (*path, "drained_by"), doc)
    both = set(fed_by) & set(drained_by)
    if both:
        raise doc.error(f"{', '.join(sorted(both))} both feeds and drains it", path)
    for key in ("unit", "doc"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise doc.error("must be a string", (*path, key))
    return Vessel(
        name,
        most,
        fed_by,
        drained_by,
        capacity,
        spec.get("unit") or "mL",
        spec.get("doc") or "",
        line=doc.line(path),
    )


def _rule(i: int, spec: Any, doc: YamlDoc) -> Rule:
    path: tuple[Any, ...] = ("rules", i)
    if not isinstance(spec, Mapping):
        raise doc.error("a rule is a mapping {name, when}", path)
    _no_unknown(spec, RULE_KEYS, path, doc)
    for key in ("name", "when"):
        if key not in spec:
            raise doc.error(f"missing '{key}'", path)
    name = spec["name"]
    if not isinstance(name, str) or not _RULE_NAME_RE.fullmatch(name):
        raise doc.error(
            f"a rule name is a word (letters, digits, - _ . :), got {name!r}", (*path, "name")
        )
    text = spec["when"]
    if not isinstance(text, str):
        raise doc.error(f"must be a rule text (a string), got {text!r}", (*path, "when"))
    line, column, indent = doc.scalars.get((*path, "when"), (doc.line((*path, "when")) or 1, 1, 0))
    expr = parse(
        text, source=doc.source, line=line, column=column, indent=indent
    )  # RuleSyntaxError as is
    if spec.get("doc") is not None and not isinstance(spec["doc"], str):
        raise doc.error("must be a string", (*path, "doc"))
    return Rule(name, expr, spec.get("doc") or "", line=doc.line((*path, "when")))


def _budget(key: Any, value: Any, doc: YamlDoc, allowed: Collection[str]) -> Budget:
    path: tuple[Any, ...] = ("budgets", key)
    if not isinstance(key, str) or not _WORD_RE.fullmatch(key):
        raise doc.error(f"a budget name is a word, got {key!r}", path)
    if not isinstance(value, Mapping):
        m = _BUDGET_RE.fullmatch(key)
        if m is None:
            raise doc.error(
                "a budget is {counts: <experiments | <vessel>.added|removed | "
                "<instrument>.delivered|withdrawn>, "
                "per: <minute|hour|day>, max: N} (or experiments_per_<minute|hour|day>: N)",
                path,
            )
        value = {"counts": "experiments", "per": m.group(1), "max": value}
        max_path = path
    else:
        max_path = (*path, "max")
    _no_unknown(value, BUDGET_KEYS, path, doc)
    for k in ("counts", "per", "max"):
        if k not in value:
            raise doc.error(f"missing '{k}'", path)
    counts = value["counts"]
    if counts not in allowed:
        raise doc.error(
            f"cannot count {counts!r}; known: {', '.join(allowed)}", (*path, "counts")
        )
    per = value["per"]
    if per not in WINDOWS_S:
        raise doc.error(f"must be minute, hour or day, got {per!r}", (*path, "per"))
    limit = _number(value["max"], max_path, doc)
    if limit < 0:
        raise doc.error(f"must be >= 0, got {value['max']!r}", max_path)
    unit = value.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise doc.error("must be a string", (*path, "unit"))
    return Budget(key, counts, per, limit, line=doc.line(path), unit=unit or "")
