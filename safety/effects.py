"""What each command does to a station's commanded channels, per driver kind; the shared check.

The guard exposes only commands that target a state, listed in :data:`ACTIONS`
per driver kind. Each one is classified:

* ``read``: non-actuating (``read``, ``describe``, ``measure``, ``capture``,
  pump ``status``/``wait_until_stopped``...): never checked against the
  envelope, allowed while the station is latched;
* ``safer``: moves an instrument towards its safe state and nothing else
  (``set_heater(False)`` without a setpoint, pump ``stop()``,
  ``set_light(False)`` without an intensity, ``stop_continuous()``): ALWAYS
  allowed, whatever the rules say and while the station is latched, so a
  station can always be made safe;
* ``actuate``: everything else, checked against the envelope with the state it
  would produce; refused while latched. ``set_stirrer(False)`` (no rpm) is an
  actuation that is let past the latch (it is part of the safe state) but is
  still checked: stopping the stirrer under a running heater breaks the
  heater rule.

Anything else (pump ``run()``/``command()``/``set_rate()``, raw register
writes, ``set_watchdog``, which only the safety supervisor arms) is refused as
"not an allowed command".

Commanded channels (flat ``<instrument>.<channel>`` names, see safety/model.py):

=================  ====================================================================
syringe-pump       ``dispense(volume_ml, rate_ml_min)`` (dye pumps only): ``<p>.volume`` +=
                   the volume the wire will carry, ``<p>.rate_ml_min``; consumes ``dye_ml``.
                   ``withdraw(volume_ml, rate_ml_min)`` (the waste pump only) drains the
                   vial: the dye volumes shrink in proportion (to 0 when it withdraws at
                   least their total), ``<p>.rate_ml_min``. ``stop(clear=False)``: safer.
                   A dye pump cannot withdraw (it would suck the vial into a stock
                   syringe) and the waste pump cannot dispense (waste back into the vial).
hotplate           ``set_heater(on, setpoint_c=None)`` -> ``heater``, ``setpoint_c`` (0.1 degC
                   steps, as on the wire; heater on without a setpoint re-asserts the known
                   one so its limits are checked). ``set_stirrer(on, rpm=None)`` ->
                   ``stirrer``, ``stirrer_setpoint_rpm``, ``stirrer_rpm`` (0 when off).
                   ``set_state(heater, setpoint_c, stirrer, rpm)`` -> all of them.
enclosure          ``set_light(on, intensity=None)`` -> ``light``, ``intensity``.
color-sensor       ``start_continuous(integration_ms=None)`` -> ``continuous``;
                   ``stop_continuous()`` (safer); ``measure``, ``latest``: reads.
camera             ``capture(timeout=None)``: read.
=================  ====================================================================

Switching something on without its setpoint (``set_heater(True)``,
``set_stirrer(True)``, ``set_light(True)``) uses the known setpoint (commanded,
else measured by ``refresh()``; refused when unknown for the heater and the
stirrer), checks it against the envelope, and SENDS it with the command, so the
device cannot heat at a setpoint the guard never saw (set on its front panel,
say).

Pump roles: ``"dye"`` or ``"waste"``, per instrument (default: ``waste`` for
the instrument named ``waste``, ``dye`` for the others).

:func:`assess` is the one check the guard (before sending) and the dry run
(for a whole recipe) share: command -> effect -> latch -> envelope.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from instruments.drivers.syringe_pump import RATE_UNITS, VOLUME_UNITS, encode_quantity
from safety.envelope import Envelope, Ledger, Violation, is_number
from safety.model import Command

__all__ = [
    "ACTIONS",
    "ACTUATE",
    "DYE_ML",
    "READ",
    "SAFER",
    "Action",
    "Assessment",
    "CommandRefused",
    "DYE",
    "Drain",
    "Effect",
    "Layout",
    "Param",
    "WASTE",
    "assess",
    "drained_volumes",
    "effect_of",
    "initial_commanded",
    "safe_state_updates",
]

DYE, WASTE = "dye", "waste"
READ, SAFER, ACTUATE = "read", "safer", "actuate"
#: resource name of the dye budget (mL dispensed by dye pumps)
DYE_ML = "dye_ml"


class CommandRefused(Exception):
    """A command the guard does not pass, before any envelope check (``rule`` says which check)."""

    def __init__(self, rule: str, reason: str, values: Mapping[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason
        self.values = dict(values or {})


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Param:
    """A command parameter: ``kind`` is bool | number | positive | int | ms."""

    name: str
    kind: str
    required: bool = True
    optional_none: bool = False  # None is a valid value (means "keep the device's")


@dataclass(frozen=True)
class Action:
    name: str
    params: tuple[Param, ...] = ()
    category: str = READ  # read | actuate | safer (safer/actuate may depend on the params)
    roles: tuple[str, ...] = ()  # syringe pumps: which roles may use it (empty: all)

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Positional + keyword arguments -> params by name (TypeError like a Python call)."""
        names = [p.name for p in self.params]
        if len(args) > len(names):
            raise TypeError(f"{self.name}() takes {len(names)} arguments, {len(args)} given")
        out = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{self.name}() got an unexpected argument {key!r}")
            if key in out:
                raise TypeError(f"{self.name}() got multiple values for argument {key!r}")
            out[key] = value
        missing = [p.name for p in self.params if p.required and p.name not in out]
        if missing:
            raise TypeError(f"{self.name}() missing argument(s): {', '.join(missing)}")
        return out


_ON = Param("on", "bool")
_READS = (Action("read"), Action("describe"))

#: The commands the guard lets through, per driver kind.
ACTIONS: dict[str, dict[str, Action]] = {
    "syringe-pump": {
        a.name: a
        for a in (
            Action(
                "dispense",
                (Param("volume_ml", "positive"), Param("rate_ml_min", "positive")),
                ACTUATE,
                (DYE,),
            ),
            Action(
                "withdraw",
                (Param("volume_ml", "positive"), Param("rate_ml_min", "positive")),
                ACTUATE,
                (WASTE,),
            ),
            Action("stop", (Param("clear", "bool", required=False),), SAFER),
            Action("status"),
            Action("dispensed"),
            Action(
                "wait_until_stopped",
                (Param("timeout", "positive", False), Param("poll_interval", "positive", False)),
            ),
            *_READS,
        )
    },
    "hotplate": {
        a.name: a
        for a in (
            Action("set_heater", (_ON, Param("setpoint_c", "number", False, True)), ACTUATE),
            Action("set_stirrer", (_ON, Param("rpm", "int", False, True)), ACTUATE),
            Action(
                "set_state",
                (
                    Param("heater", "bool"),
                    Param("setpoint_c", "number"),
                    Param("stirrer", "bool"),
                    Param("rpm", "int"),
                ),
                ACTUATE,
            ),
            *_READS,
        )
    },
    "enclosure": {
        a.name: a
        for a in (
            Action("set_light", (_ON, Param("intensity", "number", False, True)), ACTUATE),
            *_READS,
        )
    },
    "color-sensor": {
        a.name: a
        for a in (
            Action("measure", (Param("integration_ms", "ms", False, True),)),
            Action("latest"),
            Action("start_continuous", (Param("integration_ms", "ms", False, True),), ACTUATE),
            Action("stop_continuous", (), SAFER),
            *_READS,
        )
    },
    "camera": {
        a.name: a
        for a in (Action("capture", (Param("timeout", "positive", False, True),)), *_READS)
    },
}
#: a kind the table does not know (a third-party driver) gets reads only
DEFAULT_ACTIONS: dict[str, Action] = {a.name: a for a in _READS}


@dataclass(frozen=True)
class Layout:
    """A station's instruments as the checks need them: name -> driver kind, pump roles."""

    kinds: Mapping[str, str]
    roles: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, role in self.roles.items():
            if role not in (DYE, WASTE):
                raise ValueError(f"pump role of {name!r} must be 'dye' or 'waste', got {role!r}")
            if self.kinds.get(name) != "syringe-pump":
                raise ValueError(f"{name!r} has a pump role but is not a syringe-pump")

    @classmethod
    def of(cls, drivers: Mapping[str, Any], roles: Mapping[str, str] | None = None) -> Layout:
        """From driver objects (their ``kind`` class attribute)."""
        return cls({n: str(getattr(d, "kind", "")) for n, d in drivers.items()}, dict(roles or {}))

    def role(self, name: str) -> str | None:
        if self.kinds.get(name) != "syringe-pump":
            return None
        return self.roles.get(name, WASTE if name == WASTE else DYE)

    def pumps(self, role: str) -> list[str]:
        return [n for n in self.kinds if self.role(n) == role]

    def dye_volumes(self) -> list[str]:
        """The commanded channels of what is in the vial: ``<dye pump>.volume``."""
        return [f"{n}.volume" for n in self.pumps(DYE)]

    def actions(self, name: str) -> dict[str, Action]:
        """The allowed commands of instrument ``name``."""
        kind = self.kinds.get(name)
        if kind is None:
            return {}
        table = ACTIONS.get(kind, DEFAULT_ACTIONS)
        role = self.role(name)
        return {k: a for k, a in table.items() if not a.roles or role in a.roles}

    def commanded_channels(self) -> dict[str, set[str]]:
        """instrument -> the commanded channel names the effects may set (for validation)."""
        out: dict[str, set[str]] = {}
        for name, kind in self.kinds.items():
            chans: set[str] = set()
            if kind == "syringe-pump":
                chans = {"rate_ml_min"} | ({"volume"} if self.role(name) == DYE else set())
            elif kind == "hotplate":
                chans = {"heater", "setpoint_c", "stirrer", "stirrer_rpm", "stirrer_setpoint_rpm"}
            elif kind == "enclosure":
                chans = {"light", "intensity"}
            elif kind == "color-sensor":
                chans = {"continuous"}
            out[name] = chans
        return out


def initial_commanded(layout: Layout) -> dict[str, Any]:
    """Commanded values of a station in its safe state with an empty vial.

    The guard seeds the state with these (keys already present are kept): the
    station supervisor puts every instrument in its safe state when it starts.
    Setpoints (temperature, rpm, intensity, rates) are not assumed: they come
    from commands or from ``refresh()`` (the device's registers).
    """
    out: dict[str, Any] = {}
    for name, kind in layout.kinds.items():
        if kind == "syringe-pump" and layout.role(name) == DYE:
            out[f"{name}.volume"] = 0.0
        elif kind == "hotplate":
            out.update(
                {f"{name}.heater": False, f"{name}.stirrer": False, f"{name}.stirrer_rpm": 0}
            )
        elif kind == "enclosure":
            out[f"{name}.light"] = False
        elif kind == "color-sensor":
            out[f"{name}.continuous"] = False
    return out


def safe_state_updates(layout: Layout, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The commanded values once ``names`` (default: all) are in their safe state (drivers'
    ``safe_state()``: heater and stirrer off, light off, continuous off; pumps stopped, which
    leaves the vial as it is)."""
    wanted = set(layout.kinds if names is None else names)
    out: dict[str, Any] = {}
    for name, kind in layout.kinds.items():
        if name not in wanted:
            continue
        if kind == "hotplate":
            out.update(
                {f"{name}.heater": False, f"{name}.stirrer": False, f"{name}.stirrer_rpm": 0}
            )
        elif kind == "enclosure":
            out[f"{name}.light"] = False
        elif kind == "color-sensor":
            out[f"{name}.continuous"] = False
    return out


# ------------------------------------------------------------------ effects
@dataclass(frozen=True)
class Drain:
    """A waste withdraw in progress: the dye volumes before it and the volume asked for (mL)."""

    instrument: str
    base: Mapping[str, float]
    requested_ml: float


@dataclass(frozen=True)
class Effect:
    """What one allowed command would do: the commanded channels it sets, what it consumes."""

    command: Command
    action: Action
    kind: str
    updates: Mapping[str, Any] = field(default_factory=dict)
    consumes: Mapping[str, float] = field(default_factory=dict)
    category: str = READ
    latch_ok: bool = False  # allowed while latched (reads and safer commands always are)
    drain: Drain | None = None
    #: the driver call's arguments when they differ from the command's: a state the check
    #: filled in (heater on at the known setpoint) is sent explicitly, so the device gets
    #: exactly what was checked, whatever its register held
    call_params: Mapping[str, Any] | None = None

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

    def committed_updates(self) -> dict[str, Any]:
        """What the guard writes to ``state.commanded`` after success: a drain's dye volumes
        are credited only as the waste pump's counter shows them withdrawn."""
        if self.drain is None:
            return dict(self.updates)
        return {k: v for k, v in self.updates.items() if k not in self.drain.base}


def drained_volumes(base: Mapping[str, float], withdrawn_ml: float) -> dict[str, float]:
    """Dye volumes after withdrawing ``withdrawn_ml`` from a vial holding ``base`` (proportional)."""
    total = sum(v for v in base.values() if is_number(v))
    if total <= 0 or withdrawn_ml >= total - 1e-12:
        return dict.fromkeys(base, 0.0)
    keep = 1.0 - max(0.0, withdrawn_ml) / total
    return {k: (v * keep if is_number(v) else v) for k, v in base.items()}


def _validate(action: Action, params: Mapping[str, Any], command: Command) -> None:
    known = {p.name: p for p in action.params}
    for key in params:
        if key not in known:
            raise CommandRefused(
                "params", f"{command.instrument}.{action.name}() has no parameter {key!r}"
            )
    for p in action.params:
        if p.name not in params:
            if p.required:
                raise CommandRefused(
                    "params", f"{command.instrument}.{action.name}() needs {p.name}"
                )
            continue
        value = params[p.name]
        if value is None and p.optional_none:
            continue
        ok = True
        if p.kind == "bool":
            ok = isinstance(value, bool)
            what = "true or false"
        elif p.kind in ("int", "ms"):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            what = "an integer >= 0"
        else:
            ok = is_number(value) and math.isfinite(value)
            what = "a finite number"
            if ok and p.kind == "positive" and value <= 0:
                ok, what = False, "a number > 0"
        if not ok:
            raise CommandRefused(
                "params",
                f"{command.instrument}.{action.name}(): {p.name} must be {what}, got {value!r}",
                {p.name: value},
            )


def _quantize(value: float, units: Mapping[str, float], what: str) -> float:
    """The value the syringe pump's number format will carry (4 significant digits)."""
    try:
        return encode_quantity(value, units, what)[2]
    except ValueError as exc:
        raise CommandRefused("params", str(exc), {what: value}) from None


def effect_of(command: Command, layout: Layout, view: Mapping[str, Any]) -> Effect:
    """The effect of ``command`` on a station whose current state is ``view``.

    Raises :class:`CommandRefused` for an unknown instrument, a command that is
    not allowed, or malformed parameters.
    """
    name = command.instrument
    kind = layout.kinds.get(name)
    if kind is None:
        raise CommandRefused(
            "allowed-commands",
            f"no instrument {name!r} in this station (known: {', '.join(sorted(layout.kinds))})",
        )
    actions = layout.actions(name)
    action = actions.get(command.action)
    if action is None:
        role = layout.role(name)
        what = f"{kind} ({role})" if role else kind
        raise CommandRefused(
            "allowed-commands",
            f"{name}.{command.action}() is not an allowed command for a {what}; allowed: "
            f"{', '.join(sorted(actions))}",
        )
    params = command.params
    _validate(action, params, command)
    effect = Effect(command, action, kind, category=action.category)

    def known(channel: str, why: str) -> Any:
        value = view.get(channel)
        if value is None:
            raise CommandRefused("state", f"{name}.{action.name}(): {why}", {channel: None})
        return value

    act = action.name
    p = f"{name}."
    if kind == "syringe-pump" and act == "dispense":
        volume = _quantize(params["volume_ml"], VOLUME_UNITS, "volume (mL)")
        rate = _quantize(params["rate_ml_min"], RATE_UNITS, "rate (mL/min)")
        before = known(p + "volume", "the volume of this dye in the vial is not known")
        if not is_number(before):
            raise CommandRefused("state", f"{p}volume is {before!r}, not a number")
        return _with(
            effect,
            updates={p + "volume": before + volume, p + "rate_ml_min": rate},
            consumes={DYE_ML: volume},
        )
    if kind == "syringe-pump" and act == "withdraw":
        volume = _quantize(params["volume_ml"], VOLUME_UNITS, "volume (mL)")
        rate = _quantize(params["rate_ml_min"], RATE_UNITS, "rate (mL/min)")
        base = {ch: view.get(ch, 0.0) for ch in layout.dye_volumes()}
        updates: dict[str, Any] = drained_volumes(base, volume)
        updates[p + "rate_ml_min"] = rate
        return _with(effect, updates=updates, drain=Drain(name, base, volume))
    if kind == "hotplate" and act == "set_heater":
        on, setpoint = params["on"], params.get("setpoint_c")
        updates = {p + "heater": on}
        if setpoint is not None:
            updates[p + "setpoint_c"] = round(setpoint * 10) / 10
        elif on:
            current = known(
                p + "setpoint_c",
                "heater on without setpoint_c, and the setpoint is not known "
                "(pass setpoint_c, or refresh() first)",
            )
            updates[p + "setpoint_c"] = current
            return _with(effect, updates=updates, call_params={"on": True, "setpoint_c": current})
        category = SAFER if (not on and setpoint is None) else ACTUATE
        return _with(effect, updates=updates, category=category)
    if kind == "hotplate" and act == "set_stirrer":
        on, rpm = params["on"], params.get("rpm")
        updates = {p + "stirrer": on}
        if rpm is not None:
            updates[p + "stirrer_setpoint_rpm"] = rpm
        if on:
            speed = rpm
            if speed is None:
                speed = known(
                    p + "stirrer_setpoint_rpm",
                    "stirrer on without rpm, and the stirrer setpoint is not known "
                    "(pass rpm, or refresh() first)",
                )
                updates[p + "stirrer_setpoint_rpm"] = speed
                effect = _with(effect, call_params={"on": True, "rpm": speed})
            updates[p + "stirrer_rpm"] = speed
        else:
            updates[p + "stirrer_rpm"] = 0
        return _with(effect, updates=updates, latch_ok=(not on and rpm is None))
    if kind == "hotplate" and act == "set_state":
        heater, stirrer, rpm = params["heater"], params["stirrer"], params["rpm"]
        return _with(
            effect,
            updates={
                p + "heater": heater,
                p + "setpoint_c": round(params["setpoint_c"] * 10) / 10,
                p + "stirrer": stirrer,
                p + "stirrer_setpoint_rpm": rpm,
                p + "stirrer_rpm": rpm if stirrer else 0,
            },
        )
    if kind == "enclosure" and act == "set_light":
        on, intensity = params["on"], params.get("intensity")
        updates = {p + "light": on}
        if intensity is not None:
            updates[p + "intensity"] = intensity
        elif on and view.get(p + "intensity") is not None:
            updates[p + "intensity"] = view[p + "intensity"]  # re-asserted: its limits apply
            effect = _with(effect, call_params={"on": True, "intensity": view[p + "intensity"]})
        category = SAFER if (not on and intensity is None) else ACTUATE
        return _with(effect, updates=updates, category=category)
    if kind == "color-sensor" and act == "start_continuous":
        return _with(effect, updates={p + "continuous": True})
    if kind == "color-sensor" and act == "stop_continuous":
        return _with(effect, updates={p + "continuous": False})
    return effect  # reads, pump stop: no commanded channel changes


def _with(effect: Effect, **changes: Any) -> Effect:
    return replace(effect, **changes)


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
    violations = envelope.check(
        view, effect.updates, now=now, consumes=effect.consumes, ledger=ledger
    )
    return Assessment(command, effect, tuple(violations))
