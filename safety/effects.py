"""What each command does to a station's commanded channels, from the drivers' declarations.

Nothing here knows a driver kind or an instrument: every instrument's
commands, parameters, effects and safe state are declared next to its driver
code (instruments/declare.py), and the quantities several instruments change
together (the liquid in a vessel, budgets) are declared in the envelope
(safety/envelope.py). :class:`Layout` puts the two together for one station.

Each command call is classified from its declaration:

* ``read``: non-actuating: never checked against the envelope, allowed
  while the station is latched;
* ``safer``: moves an instrument towards its safe state and nothing else
  (a SAFER command, or an ACTUATE one whose ``safer_when`` matches, such as
  heater off without a setpoint): ALWAYS allowed, whatever the rules say and
  while the station is latched, so a station can always be made safe;
* ``actuate``: everything else, checked against the envelope with the state it
  would produce; refused while latched unless ``latch_ok_when`` matches (a
  stirrer stop is part of the safe state, but still checked: stopping it
  under a running heater breaks the heater rule).

A command that is not declared is refused as "not an allowed command".

Effects (flat ``<instrument>.<channel>`` names, see safety/model.py): each
declared ``Set`` whose condition holds sets its channel; each ``Add`` adds
its amount to its counter (the value before, 0 when the station started,
plus the amount: the envelope checks the sum like any value) and consumes
the budget resource of the same name (``<instrument>.<channel>``: what was
added, per window; a clear, ``Set(..., value=0)``, gives nothing back); a
command that counts is never classed safer. A ``Flow`` changes
the volume of the vessel the envelope connects the instrument to (``out``:
``<vessel>.volume`` grows by the volume the wire will carry and the budget
resource ``<vessel>.added`` is consumed; ``in``: it shrinks, floored at 0,
credited by the guard only as the instrument's progress shows,
``<vessel>.removed``). An instrument that moves liquid but feeds or drains no
declared vessel, or moves it against the vessel's direction (a feed pump
drawing the vessel into its stock), is refused.

Deny by default: an actuating command that sets a channel the envelope does
not list (limits, allowed values, or ``unbounded: <reason>``) is refused
(rule ``unbounded``); :func:`bounds` lists every actuated channel and how it
is bounded, for ``labbridge check``.

Switching something on without its setpoint (a parameter that ``keeps`` a
channel) uses the known value (commanded, else measured by ``refresh()``;
refused when unknown where the declaration says ``need_known``), checks it
against the envelope, and SENDS it with the command, so the device cannot act
on a setpoint the guard never saw (set on its front panel, say). Every
parameter is sent as checked (rounded to the device's step, as its wire
format carries it).

:func:`assess` is the one check the guard (before sending) and the dry run
(for a whole recipe) share: command -> effect -> latch -> envelope.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from instruments.declare import ACTUATE, READ, SAFER, Add, Call, CommandSpec, Set
from safety.envelope import Envelope, EnvelopeError
from safety.limits import Ledger, Vessel, Violation, is_number, same
from safety.model import Command

__all__ = [
    "ACTUATE",
    "READ",
    "SAFER",
    "Assessment",
    "Bound",
    "CommandRefused",
    "Drain",
    "Effect",
    "Layout",
    "assess",
    "bounds",
    "check_counted",
    "effect_of",
    "initial_commanded",
    "safe_state_updates",
]


class CommandRefused(Exception):
    """A command the guard does not pass, before any envelope check (``rule`` says which check)."""

    def __init__(self, rule: str, reason: str, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason
        self.values = dict(values or {})


# ------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class Layout:
    """A station's instruments as the checks need them: name -> driver kind, name -> declared
    commands and safe-state calls (from the driver classes), name -> the keys its ``read()``
    returns (its declared readable channels: only for driver objects, a class's channels
    depend on its options), and the envelope's vessels."""

    kinds: Mapping[str, str]
    commands: Mapping[str, Mapping[str, CommandSpec]] = field(default_factory=dict)
    safe_calls: Mapping[str, tuple[Call, ...]] = field(default_factory=dict)
    vessels: Mapping[str, Vessel] = field(default_factory=dict)
    readings: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, drivers: Mapping[str, Any], vessels: Mapping[str, Vessel] | None = None) -> Layout:
        """From driver objects (or classes): their ``kind``, ``commands``,
        ``safe_state_calls`` and, for an object, the readable ``channels`` (an object without
        declarations can only be read: it has no commands at all)."""
        return cls(
            {n: str(getattr(d, "kind", "")) for n, d in drivers.items()},
            {n: dict(getattr(d, "commands", {}) or {}) for n, d in drivers.items()},
            {n: tuple(getattr(d, "safe_state_calls", ()) or ()) for n, d in drivers.items()},
            dict(vessels or {}),
            {n: r for n, d in drivers.items() if (r := _readable(d)) is not None},
        )

    def commanded(self, name: str) -> frozenset[str]:
        """The channels of instrument ``name`` its declared commands set (without the name)."""
        return frozenset(s.channel for spec in self.actions(name).values() for s in spec.sets)

    def actions(self, name: str) -> Mapping[str, CommandSpec]:
        """The declared commands of instrument ``name`` (read-only; none for an unknown one)."""
        return self.commands.get(name, {})

    def flowing_channels(self) -> Mapping[str, str]:
        """``<instrument>.flowing`` -> instrument, for every instrument with a declared flow:
        true while the guard counts a flow it was sent as possibly still running (derived
        by the guard, never commanded; rules may name it). Worked out once per layout:
        every command check asks."""
        return self._flowing

    @functools.cached_property
    def _flowing(self) -> Mapping[str, str]:
        return MappingProxyType(
            {
                f"{name}.flowing": name
                for name, specs in self.commands.items()
                if any(spec.flow is not None for spec in specs.values())
            }
        )

    def momentary_rest(self) -> dict[str, bool]:
        """Every declared momentary channel (``Set(..., momentary=True)``) at rest."""
        return {
            f"{name}.{s.channel}": not s.value
            for name, specs in self.commands.items()
            for spec in specs.values()
            for s in spec.sets
            if isinstance(s, Set) and s.momentary
        }

    def counter_channels(self) -> list[str]:
        """Every counter channel (``<instrument>.<channel>`` an ``Add`` of an instrument's
        commands adds to), sorted."""
        return sorted(
            {
                f"{name}.{c}"
                for name, specs in self.commands.items()
                for spec in specs.values()
                for c in spec.counters()
            }
        )

    def vessel_of(self, name: str) -> tuple[Vessel, str] | None:
        """The vessel instrument ``name`` feeds (``"out"``) or drains (``"in"``), if any."""
        for v in self.vessels.values():
            if name in v.fed_by:
                return v, "out"
            if name in v.drained_by:
                return v, "in"
        return None


def _readable(driver: Any) -> frozenset[str] | None:
    """The keys a driver object's ``read()`` returns, from its declared ``channels``; None for
    a class (``channels`` is a property of the object) or an object that declares none."""
    declared = getattr(driver, "channels", None)
    if not isinstance(declared, Mapping) or not declared:
        return None
    return frozenset(n for n, ch in declared.items() if getattr(ch, "readable", True))


def _matches(cond: Mapping[str, Any] | None, params: Mapping[str, Any]) -> bool:
    if cond is None:
        return False
    return all(same(params.get(k), v) for k, v in cond.items())


def safe_state_updates(layout: Layout, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The commanded values once ``names`` (default: all) are in their safe state: the
    effects of each driver's declared ``safe_state_calls`` (flows never are safe-state calls,
    nor calls that count: instruments/declare.py refuses both)."""
    wanted = set(layout.kinds if names is None else names)
    out: dict[str, Any] = {}
    for name in layout.kinds:
        if name not in wanted:
            continue
        for call in layout.safe_calls.get(name, ()):
            command = Command(name, call.command, dict(call.args), "safety")
            out.update(effect_of(command, layout, {}).updates)
    return out


def initial_commanded(layout: Layout) -> dict[str, Any]:
    """Commanded values of a station in its safe state with empty vessels and counters at 0.

    The guard seeds the state with these (keys already present are kept): the
    station supervisor puts every instrument in its safe state when it starts.
    Setpoints (temperature, rpm, intensity, rates) are not assumed: they come
    from commands or from ``refresh()`` (the devices' registers).
    """
    out = safe_state_updates(layout)
    for v in layout.vessels.values():
        out[v.channel] = 0.0
    out.update(dict.fromkeys(layout.counter_channels(), 0))
    out.update(dict.fromkeys(layout.flowing_channels(), False))
    out.update(layout.momentary_rest())
    return out


@dataclass(frozen=True)
class Bound:
    """One channel an actuating command can set, and how the envelope bounds it."""

    channel: str
    commands: tuple[str, ...]
    bounded: bool
    how: str


def bounds(layout: Layout, envelope: Envelope) -> list[Bound]:
    """Every channel the station's actuating commands set (vessel volumes included), and how
    the envelope bounds it; ``bounded`` False means those commands will be refused."""
    setters: dict[str, list[str]] = {}
    for name, specs in layout.commands.items():
        for spec in specs.values():
            if spec.kind != ACTUATE:
                continue
            label = f"{name}.{spec.name}()"
            for s in spec.sets:
                setters.setdefault(f"{name}.{s.channel}", []).append(label)
            if spec.flow is not None:
                found = layout.vessel_of(name)
                if found is None:
                    setters.setdefault(f"{name} (moves liquid: no vessel)", []).append(label)
                elif found[1] == spec.flow.direction:  # the other way is always refused
                    setters.setdefault(found[0].channel, []).append(label)
    out = []
    for channel, labels in sorted(setters.items()):
        lim = envelope.channels.get(channel)
        how = lim.bounds() if lim is not None else "NOT BOUNDED: its commands are refused"
        out.append(Bound(channel, tuple(dict.fromkeys(labels)), lim is not None, how))
    return out


def check_counted(layout: Layout, envelope: Envelope) -> None:
    """Every budget that counts ``<instrument>.<channel>`` names a counter of the station
    (an ``Add`` of one of its instruments' commands); :class:`EnvelopeError` naming the
    budget's file, line and ``counts`` otherwise. Budgets over experiments and vessels are
    checked when the envelope loads (safety/envelopeload.py)."""
    counters = layout.counter_channels()
    for budget in envelope.counter_budgets():
        if budget.resource not in counters:
            known = ", ".join(counters) or "none (no command of this station adds to a counter)"
            raise EnvelopeError(
                f"cannot count {budget.resource!r}: no command of this station adds to it "
                f"(instruments/declare.py Add); its counters: {known}",
                source=envelope.source,
                line=budget.line,
                field=f"budgets.{budget.name}.counts",
            )


# ------------------------------------------------------------------ effects
@dataclass(frozen=True)
class Drain:
    """A flow out of ``vessel`` in progress: its volume before and the volume asked for (mL)."""

    instrument: str
    vessel: str
    base: float
    requested_ml: float
    progress: str | None = None


@dataclass(frozen=True)
class Effect:
    """What one allowed command would do: the commanded channels it sets, what it consumes."""

    command: Command
    action: CommandSpec
    kind: str
    updates: Mapping[str, Any] = field(default_factory=dict)
    consumes: Mapping[str, float] = field(default_factory=dict)
    category: str = READ
    latch_ok: bool = False  # allowed while latched (reads and safer commands always are)
    drain: Drain | None = None
    #: how long (s) the instrument may stay busy with a flow it was sent (volume / rate)
    busy_s: float | None = None
    #: the driver call's arguments as checked (rounded to the device's step, a setpoint
    #: the check filled in): the device gets exactly what was checked
    call_params: Mapping[str, Any] | None = None
    #: channels that hold their value only while this command is checked
    momentary: frozenset[str] = frozenset()

    @property
    def params(self) -> Mapping[str, Any]:
        """The keyword arguments the driver method is called with."""
        return self.command.params if self.call_params is None else self.call_params

    @property
    def safer(self) -> bool:
        return self.category == SAFER

    @property
    def actuates(self) -> bool:
        """Sends something that changes an instrument's state (safer commands included)."""
        return self.category != READ

    @property
    def allowed_when_latched(self) -> bool:
        return self.category in (READ, SAFER) or self.latch_ok

    def settled_updates(self) -> dict[str, Any]:
        """The commanded state once the command is done (the dry run's next step): a
        momentary channel back at rest; ``flowing`` left to whoever tracks the flow."""
        out = {k: (not v if k in self.momentary else v) for k, v in self.updates.items()}
        out.pop(f"{self.command.instrument}.flowing", None)
        return out

    def committed_updates(self) -> dict[str, Any]:
        """What the guard writes to ``state.commanded`` after success: the settled state,
        except that a draining vessel's volume is credited only as the instrument's progress
        shows it taken out."""
        out = self.settled_updates()
        if self.drain is not None:
            out.pop(f"{self.drain.vessel}.volume", None)
        return out


def drained(base: float, withdrawn_ml: float) -> float:
    """A vessel's volume after ``withdrawn_ml`` was taken out of ``base`` (never below 0)."""
    return max(0.0, float(base) - max(0.0, float(withdrawn_ml)))


def _checked_params(spec: CommandSpec, command: Command) -> dict[str, Any]:
    where = f"{command.instrument}.{spec.name}()"
    params = command.params
    for key in params:
        if key not in spec.params:
            raise CommandRefused("params", f"{where} has no parameter {key!r}")
    out: dict[str, Any] = {}
    for name, p in spec.params.items():
        value = params.get(name)
        if value is None:
            if not p.optional:
                raise CommandRefused("params", f"{where} needs {name}")
            continue
        try:
            out[name] = p.check(value)
        except ValueError as exc:
            raise CommandRefused("params", f"{where}: {name} {exc}", {name: value}) from None
    return out


def effect_of(command: Command, layout: Layout, view: Mapping[str, Any]) -> Effect:
    """The effect of ``command`` on a station whose current state is ``view``.

    Raises :class:`CommandRefused` for an unknown instrument, a command that is
    not declared, malformed parameters, a value it needs that is not known, or
    a flow no vessel accounts for.
    """
    name = command.instrument
    kind = layout.kinds.get(name)
    if kind is None:
        raise CommandRefused(
            "allowed-commands",
            f"no instrument {name!r} in this station (known: {', '.join(sorted(layout.kinds))})",
        )
    actions = layout.commands.get(name, {})
    spec = actions.get(command.action)
    if spec is None:
        raise CommandRefused(
            "allowed-commands",
            f"{name}.{command.action}() is not an allowed command for {name} ({kind or 'no kind'}); "
            f"allowed: {', '.join(sorted(actions)) or 'none (its driver declares no commands)'}",
        )
    given = _checked_params(spec, command)
    params = dict(given)
    for pname, p in spec.params.items():
        if pname in params or p.keeps is None or not _matches(p.fill_when, given):
            continue
        known = view.get(f"{name}.{p.keeps}")
        if known is None:
            if p.need_known:
                raise CommandRefused(
                    "state",
                    f"{name}.{spec.name}(): {pname} left out and {name}.{p.keeps} is not known "
                    f"(pass {pname}, or refresh() first)",
                    {f"{name}.{p.keeps}": None},
                )
            continue
        try:
            params[pname] = p.check(known)
        except ValueError as exc:
            raise CommandRefused(
                "state", f"{name}.{spec.name}(): the known {name}.{p.keeps} {exc}", {pname: known}
            ) from None
    updates: dict[str, Any] = {}
    momentary: set[str] = set()
    added: dict[str, Any] = {}  # counter -> amount (an int stays an int: counts read so)
    for s in spec.sets:
        if s.when and not _matches(s.when, params):
            continue
        value = params.get(s.arg) if s.arg is not None else s.value
        if value is None:
            continue
        channel = f"{name}.{s.channel}"
        if isinstance(s, Add):
            added[channel] = added.get(channel, 0) + value
            continue
        updates[channel] = value
        if s.momentary:
            momentary.add(channel)
    for channel, amount in added.items():
        before = view.get(channel, 0)
        if not is_number(before):
            raise CommandRefused("state", f"{channel} is {before!r}, not a count")
        updates[channel] = before + amount
    category = spec.kind
    if category == ACTUATE and not added and _matches(spec.safer_when, given):
        category = SAFER
    effect = Effect(
        command,
        spec,
        kind,
        updates=updates,
        consumes={c: float(a) for c, a in added.items() if a > 0},
        category=category,
        latch_ok=_matches(spec.latch_ok_when, given),
        call_params=params,
        momentary=frozenset(momentary),
    )
    if spec.flow is None:
        return effect
    return _flow(effect, layout, view)


def _flow(effect: Effect, layout: Layout, view: Mapping[str, Any]) -> Effect:
    spec, name = effect.action, effect.command.instrument
    flow = spec.flow
    assert flow is not None
    params = effect.params
    volume = float(params[flow.volume])
    busy = None
    if flow.rate is not None and params.get(flow.rate):
        busy = 60.0 * volume / float(params[flow.rate])
    found = layout.vessel_of(name)
    verb = "delivers liquid" if flow.direction == "out" else "draws liquid in"
    if found is None:
        raise CommandRefused(
            "vessels",
            f"{name}.{spec.name}() {verb}, but {name} feeds or drains no vessel of the envelope: "
            f"declare it under vessels (fed_by / drained_by) so its volume is bounded",
        )
    vessel, direction = found
    if direction != flow.direction:
        role = "feeds" if direction == "out" else "drains"
        raise CommandRefused(
            "vessels",
            f"{name}.{spec.name}() {verb}, but {name} {role} vessel {vessel.name}: it may only "
            f"{'add to' if direction == 'out' else 'take from'} it",
        )
    channel = vessel.channel
    before = view.get(channel, 0.0)
    if not is_number(before):
        raise CommandRefused("state", f"{channel} is {before!r}, not a number")
    updates = dict(effect.updates)
    updates[f"{name}.flowing"] = True  # while the rules check it; then the guard's to derive
    if direction == "out":
        updates[channel] = before + volume
        consumes = {**effect.consumes, f"{vessel.name}.added": volume, f"{name}.delivered": volume}
        return replace(effect, updates=updates, consumes=consumes, busy_s=busy)
    updates[channel] = drained(before, volume)
    drain = Drain(name, vessel.name, float(before), volume, flow.progress)
    return replace(
        effect,
        updates=updates,
        consumes={
            **effect.consumes,
            f"{vessel.name}.removed": volume,
            f"{name}.withdrawn": volume,
        },
        drain=drain,
        busy_s=busy,
    )


# ------------------------------------------------------------------ the check
@dataclass(frozen=True)
class Assessment:
    """The outcome of checking one command: its effect (None if malformed) and violations."""

    command: Command
    effect: Effect | None
    violations: tuple[Violation, ...] = ()
    tripped: bool = False  # refused because the station is latched

    @property
    def allowed(self) -> bool:
        return not self.violations

    @property
    def rule(self) -> str | None:
        return self.violations[0].rule if self.violations else None

    @property
    def reason(self) -> str:
        if not self.violations:
            if self.effect is None:  # pragma: no cover - an allowed command always has one
                return "allowed"
            return {
                READ: "allowed (does not actuate)",
                SAFER: "allowed (makes the station safer: always allowed)",
            }.get(self.effect.category, "allowed (within the envelope)")
        return "; ".join(v.reason for v in self.violations)

    @property
    def values(self) -> dict[str, Any]:
        if not self.violations:
            return dict(self.effect.updates) if self.effect is not None else {}
        out: dict[str, Any] = {}
        for v in self.violations:
            out.update(v.values)
        return out


def assess(
    command: Command,
    *,
    layout: Layout,
    envelope: Envelope,
    view: Mapping[str, Any],
    now: float,
    ledger: Ledger | None = None,
    latched: str | None = None,
) -> Assessment:
    """Check one command against the station's state ``view`` (no I/O, nothing changes).

    Order: is it an allowed command with valid parameters; if the station is
    latched (``latched`` = the trip reason), is it allowed while latched; is the
    state it would produce inside the envelope (safer and read commands skip
    the envelope).
    """
    try:
        effect = effect_of(command, layout, view)
    except CommandRefused as exc:
        return Assessment(command, None, (Violation(exc.rule, exc.reason, exc.values, "command"),))
    if latched is not None and not effect.allowed_when_latched:
        reason = (
            f"station is latched after a trip ({latched}); only safe-state commands are "
            f"allowed until reset()"
        )
        return Assessment(command, effect, (Violation("latch", reason, {}, "latch"),), True)
    if effect.category in (READ, SAFER):
        return Assessment(command, effect)
    derived = layout.flowing_channels()
    violations = [
        Violation(
            "unbounded",
            f"{command}: the envelope does not bound {channel}: add channels.{channel} with "
            f"min/max or allowed values (or unbounded: <reason>) to the lab's envelope",
            {channel: value},
            "limit",
        )
        for channel, value in effect.updates.items()
        if channel not in envelope.channels and channel not in derived
    ]
    violations += envelope.check(
        view, effect.updates, now=now, consumes=effect.consumes, ledger=ledger
    )
    return Assessment(command, effect, tuple(violations))
