"""The safety envelope of one station: channel limits, rates of change, rules, budgets, monitors.

Its YAML form, and every key, are in :mod:`safety.envelopeload` (``load_envelope``,
``reference_envelope``); its parts in :mod:`safety.limits`.

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
  rolling window must stay within the budget (experiments, the liquid the
  vessels' flows move, what a command adds to a counter: safety/effects.py).

Errors in the YAML name the file, the line and the field
(:class:`EnvelopeError`); a rule that does not parse raises
:class:`~safety.expr.RuleSyntaxError` with the file, line and column of the
bad token inside the YAML file. Both are ``ValueError``s.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from safety.limits import (
    EPS,
    Budget,
    ChannelLimit,
    Ledger,
    Rule,
    Vessel,
    Violation,
    fmt,
)
from safety.monitors import Monitor
from safety.monitorspec import FaultSetting, MonitorSpec
from safety.yamldoc import ConfigError

__all__ = ["Envelope", "EnvelopeError", "flow_resources"]


class EnvelopeError(ConfigError):
    """An invalid envelope: ``<source>:<line>: <field>: <problem>`` (line omitted when unknown)."""


def flow_resources(vessels: Iterable[Vessel]) -> list[str]:
    """What the flows of ``vessels`` consume, for budgets: each vessel's ``added`` and
    ``removed``, each feeding instrument's ``delivered`` and each draining one's
    ``withdrawn`` (by vessel name)."""
    out: list[str] = []
    for v in sorted(vessels, key=lambda v: v.name):
        out += [f"{v.name}.added", f"{v.name}.removed"]
        out += [f"{i}.delivered" for i in v.fed_by] + [f"{i}.withdrawn" for i in v.drained_by]
    return out


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

    def counter_budgets(self) -> list[Budget]:
        """The budgets over what commands add to a counter (``counts: <instrument>.<channel>``,
        neither experiments nor a vessel's flows): which counters the station has is its
        drivers' business (:func:`safety.effects.check_counted`)."""
        other = {"experiments", *flow_resources(self.vessels.values())}
        return [b for b in self.budgets if b.resource not in other]

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
