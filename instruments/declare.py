"""What a driver can do, declared next to the code: its commands, their parameters and effects.

The safety layer builds everything it checks from these declarations (the
guard, the effects on the station's commanded channels, the dry run, the safe
state, the supervisor's expectations): a driver from another package
(entry-point group ``labbridge.drivers``) is guarded exactly like a bundled
one, and no table in ``safety/`` knows any driver kind. A command that is not
declared cannot be reached through the guard at all.

Declare a command with :func:`declare` on the driver method::

    class Hotplate(Driver):
        @declare(
            ACTUATE,
            on=Param(bool, doc="heater enable"),
            setpoint_c=Param(float, "degC", min=0, max=340, optional=True, step=0.1,
                             keeps="setpoint_c", fill_when={"on": True}),
            sets=[Set("heater", arg="on"), Set("setpoint_c", arg="setpoint_c")],
            safer_when={"on": False, "setpoint_c": None},
        )
        async def set_heater(self, on: bool, setpoint_c: float | None = None) -> None: ...

        safe_state_calls = (Call("set_heater", on=False), Call("set_stirrer", on=False))

Kinds: ``READ`` (does not actuate: never checked against the envelope,
allowed while the station is latched), ``SAFER`` (moves the instrument towards
its safe state and nothing else: always allowed) and ``ACTUATE`` (checked
against the envelope with the state it would produce; refused while latched
unless ``latch_ok_when`` matches). ``safer_when``/``latch_ok_when`` map
parameter names to the values (``None``: not given) that make one call of an
``ACTUATE`` command safer / allowed while latched.

Effects on the station's commanded channels (``<instrument>.<channel>``):

* :class:`Set`: the channel takes a parameter's value (``arg``) or a constant
  (``value``), optionally only when other parameters have given values
  (``when``); a parameter that is not given sets nothing;
* :class:`Add`: the command adds a parameter's value (``arg``) or a constant
  (``value``) to a counter channel, optionally only when other parameters have
  given values (``when``): a lamp's exposures, a stage's moves, grams dosed.
  The guard's count starts at 0 when the station starts (like a vessel's
  volume) and grows by the amount with every command sent; the envelope
  bounds it like any channel (``max``), rules name it, and a budget may count
  what was added per minute/hour/day (``counts: <instrument>.<channel>``,
  kept in the journal across restarts). A counter only counts up: an
  ``arg`` must be a number parameter that cannot be negative, a ``value`` a
  number > 0; only ``ACTUATE`` commands count, and a command that would count
  is never "safer". To **clear** a counter, a command declares
  ``Set(channel, value=0)``: a clear is a set, and there is no separate
  class because a clear needs nothing more (the budgets count what was
  added in their window, which a clear does not give back);
* :class:`Flow`: the command moves liquid: ``"out"`` delivers ``volume`` mL
  through the instrument's outlet, ``"in"`` draws it in through its inlet, at
  ``rate`` mL/min. Which vessel that fills or empties is the lab's business:
  the envelope's ``vessels`` say it (a counter the envelope bounds, with its
  budgets), so the driver knows nothing about vials. ``progress`` names a
  ``READ`` command whose result is a mapping with ``moving`` (bool),
  ``out_ml`` and ``in_ml`` (mL moved since the flow started): the guard
  credits a draining vessel only as far as that shows.

A :class:`Param` that ``keeps`` a channel may be left out (``None``): the
known value of that channel is then sent explicitly when ``fill_when``
matches (heater on at the setpoint the guard knows), so the device cannot act
on a value the guard never checked; with ``need_known`` the command is
refused when that value is not known.

Declarations are checked when the class is created (:func:`collect`, called
by ``Driver.__init_subclass__``): every declared parameter must be a
parameter of the method and every parameter of the method declared, with
optional ones matching the signature's defaults; names in ``sets``,
``safer_when``, ``fill_when`` and ``Flow`` must be parameters (an ``Add``'s a
number that cannot be negative); safe-state calls must name declared commands
with valid arguments and must not count (the supervisor's safe state runs
outside the guard's books). A renamed argument
fails at import, not at run time.

Device faults
-------------
What the device itself reports when it stopped doing what it was told (a
watchdog or cut-out that switched a heater off, a pump's alarm, a probe out of
the liquid) is declared too, as the class attribute ``faults``: fault name ->
:class:`Fault`, a condition over the driver's *own* channels (the keys of its
``read()`` and the channels its commands set, without the instrument's name)
and a sentence of what it means::

    faults = {
        "watchdog-tripped": Fault(
            "watchdog_tripped and (heater or stirrer)",
            "the device's watchdog switched heating and stirring off while they were commanded",
            confirm=True,
        ),
    }

The station supervisor turns every declared fault of every instrument of a
station into a monitor ``<instrument>.<fault>`` that trips the station while
the condition holds (:mod:`safety.devicefaults`); a lab's envelope may narrow
one (``while``) or switch it off, with a written reason. The condition is in
the rule language of :mod:`safety.expr`; this layer checks its shape when the
class is created (:func:`check_faults`), the safety layer parses it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "ACTUATE",
    "KINDS",
    "READ",
    "RESERVED_COUNTERS",
    "SAFER",
    "Add",
    "Call",
    "CommandSpec",
    "DeclarationError",
    "Fault",
    "Flow",
    "Param",
    "Set",
    "check_faults",
    "collect",
    "declare",
]

READ, SAFER, ACTUATE = "read", "safer", "actuate"
KINDS = (READ, SAFER, ACTUATE)
_ATTR = "__labbridge_command__"
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_FAULT_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_CHANNEL_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
F = TypeVar("F", bound=Callable[..., Any])


class DeclarationError(TypeError):
    """A driver's declaration does not match its code (raised when the class is created)."""


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Param:
    """One parameter of a command: its type, unit and the range the DEVICE accepts.

    ``type``: ``bool``, ``int``, ``float`` or ``str``; ``min``/``max``
    inclusive, ``above`` an exclusive lower bound; ``allowed`` discrete values.
    ``optional``: may be left out (``None``, the signature has a default).
    ``step``: the device's resolution (the value is rounded to it, as the wire
    carries it); ``wire``: a function giving the value the wire will carry
    (raises ``ValueError`` when it cannot be carried), for formats a step does
    not describe. ``keeps``/``fill_when``/``need_known``: see the module
    docstring. The lab's envelope is usually narrower than the device's range.
    """

    type: type = float
    unit: str = ""
    min: float | None = None
    max: float | None = None
    above: float | None = None
    allowed: tuple[Any, ...] | None = None
    optional: bool = False
    step: float | None = None
    wire: Callable[[Any], Any] | None = None
    keeps: str | None = None
    fill_when: Mapping[str, Any] = field(default_factory=dict)
    need_known: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in (bool, int, float, str):
            raise DeclarationError(f"Param type must be bool, int, float or str, not {self.type}")
        if self.step is not None and not (_real(self.step) and self.step > 0):
            raise DeclarationError(f"Param step must be > 0, got {self.step!r}")

    def describe(self) -> str:
        """The type, unit and range in words (for messages and docs)."""
        what = {bool: "true/false", int: "an integer", float: "a number", str: "a text"}[self.type]
        parts = [what]
        if self.allowed is not None:
            parts = [f"one of {', '.join(repr(a) for a in self.allowed)}"]
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        text = " ".join(parts)
        return f"{text} {self.unit}".rstrip()

    def check(self, value: Any) -> Any:
        """The value as the device will get it; ``ValueError`` naming the problem if invalid."""
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = _real(value) and math.isfinite(value) and value == int(value)
            value = int(value) if ok else value
        elif self.type is float:
            ok = _real(value) and math.isfinite(float(value))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if ok and self.allowed is not None:
            ok = value in self.allowed
        if ok and self.type in (int, float):
            ok = (
                (self.min is None or value >= self.min)
                and (self.max is None or value <= self.max)
                and (self.above is None or value > self.above)
            )
        if not ok:
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        if self.step is not None and self.type is float:
            value = round(round(value / self.step) * self.step, 9)
        if self.wire is not None:
            value = self.wire(value)
        return value


@dataclass(frozen=True)
class Set:
    """The command sets ``channel`` to parameter ``arg``'s value or to ``value``, when the
    parameters named in ``when`` have those values (``None``: not given).

    ``momentary``: the channel holds ``value`` (a boolean) only while this command is
    checked, and ``not value`` otherwise: an event the envelope's rules can name (``a
    tare while a pump runs``) without it sticking to every later command."""

    channel: str
    arg: str | None = None
    value: Any = None
    when: Mapping[str, Any] = field(default_factory=dict)
    momentary: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.channel):
            raise DeclarationError(f"Set channel {self.channel!r} is not a channel name")
        if self.arg is None and self.value is None:
            raise DeclarationError(f"Set({self.channel!r}) needs arg= or value=")
        if self.momentary and (self.arg is not None or not isinstance(self.value, bool)):
            raise DeclarationError(
                f"Set({self.channel!r}, momentary=True) needs value=True or False"
            )


#: channel names an ``Add`` may not use: the guard's own (a flow's ``flowing``) and the
#: words of the flows' budget resources (``<vessel>.added`` / ``.removed``,
#: ``<instrument>.delivered`` / ``.withdrawn``): a budget over one is never a counter's
RESERVED_COUNTERS = ("flowing", "added", "removed", "delivered", "withdrawn")


@dataclass(frozen=True)
class Add:
    """The command adds parameter ``arg``'s value or the constant ``value`` to the counter
    ``channel``, when the parameters named in ``when`` have those values (``None``: not
    given); a parameter that is not given adds nothing. Clear a counter with
    ``Set(channel, value=0)`` (module docstring)."""

    channel: str
    arg: str | None = None
    value: float | None = None
    when: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.channel):
            raise DeclarationError(f"Add channel {self.channel!r} is not a channel name")
        if self.channel in RESERVED_COUNTERS:
            raise DeclarationError(
                f"Add({self.channel!r}): {', '.join(RESERVED_COUNTERS)} are the guard's own "
                f"channels and the flows' budget words; name the counter otherwise"
            )
        if (self.arg is None) == (self.value is None):
            raise DeclarationError(f"Add({self.channel!r}) needs arg= or value= (one of them)")
        if self.value is not None and not (
            _real(self.value) and math.isfinite(self.value) and self.value > 0
        ):
            raise DeclarationError(
                f"Add({self.channel!r}): value must be a number > 0 (a counter only counts "
                f"up; clear it with Set({self.channel!r}, value=0)), got {self.value!r}"
            )


@dataclass(frozen=True)
class Flow:
    """The command moves ``volume`` mL (a parameter) at ``rate`` mL/min (a parameter),
    ``"out"`` of the instrument or ``"in"`` to it; ``progress`` is the READ command that
    reports ``moving``, ``out_ml`` and ``in_ml``."""

    direction: str
    volume: str
    rate: str | None = None
    progress: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in ("out", "in"):
            raise DeclarationError(f"Flow direction must be 'out' or 'in', not {self.direction!r}")


@dataclass(frozen=True)
class Fault:
    """A fault the device reports (module docstring, "Device faults").

    ``when``: a condition in the rule language over the driver's own channels (``read()``
    keys and the channels its commands set, without the instrument's name:
    ``watchdog_tripped and heater``), true while the device is in that fault. ``doc``: one
    sentence of what it means, shown with the trip. ``confirm``: trip only once a reading
    taken after the condition first held still shows it (for conditions that mix what the
    guard commands, recorded at once, with a flag the device clears at that command, seen
    at its next reading; :class:`safety.monitors.Interlock`). ``show``: further channels
    of the driver shown with the trip (an alarm's code)."""

    when: str
    doc: str
    confirm: bool = False
    show: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.when, str) or not self.when.strip():
            raise DeclarationError(f"Fault condition must be a rule text, got {self.when!r}")
        if not isinstance(self.doc, str) or not self.doc.strip():
            raise DeclarationError(f"Fault({self.when!r}) needs a doc: what the fault means")
        if not isinstance(self.confirm, bool):
            raise DeclarationError(f"Fault({self.when!r}): confirm must be True or False")
        object.__setattr__(self, "show", tuple(self.show))
        for name in self.show:
            if not isinstance(name, str) or not _CHANNEL_WORD.fullmatch(name):
                raise DeclarationError(
                    f"Fault({self.when!r}): show names the driver's own channels "
                    f"(identifiers), got {name!r}"
                )


def check_faults(owner: str, faults: Any) -> dict[str, Fault]:
    """A driver's ``faults`` (name -> :class:`Fault`), checked; :class:`DeclarationError`
    naming the driver and the fault. Names are lower-case words joined by ``-``
    (``watchdog-tripped``): the station's monitor is ``<instrument>.<name>``."""
    if not isinstance(faults, Mapping):
        raise DeclarationError(f"{owner}.faults must be a mapping name -> Fault(...)")
    out: dict[str, Fault] = {}
    for name, fault in faults.items():
        if not isinstance(name, str) or not _FAULT_NAME.fullmatch(name):
            raise DeclarationError(
                f"{owner}.faults: a fault name is lower-case words joined by '-' "
                f"(e.g. watchdog-tripped), got {name!r}"
            )
        if not isinstance(fault, Fault):
            raise DeclarationError(f"{owner}.faults[{name!r}] must be a Fault(...)")
        out[name] = fault
    return out


@dataclass(frozen=True)
class Call:
    """One call of a declared command with keyword arguments (a safe-state step)."""

    command: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, command: str, **args: Any) -> None:
        object.__setattr__(self, "command", command)
        object.__setattr__(self, "args", dict(args))

    def __str__(self) -> str:
        return f"{self.command}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"


@dataclass(frozen=True)
class CommandSpec:
    """A declared command (see the module docstring). ``params`` are in the method's order."""

    name: str
    kind: str
    params: Mapping[str, Param] = field(default_factory=dict)
    sets: tuple[Set | Add, ...] = ()
    flow: Flow | None = None
    safer_when: Mapping[str, Any] | None = None
    latch_ok_when: Mapping[str, Any] | None = None
    doc: str = ""

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Positional + keyword arguments -> params by name (TypeError like a Python call)."""
        names = list(self.params)
        if len(args) > len(names):
            raise TypeError(f"{self.name}() takes {len(names)} arguments, {len(args)} given")
        out = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in self.params:
                raise TypeError(f"{self.name}() got an unexpected argument {key!r}")
            if key in out:
                raise TypeError(f"{self.name}() got multiple values for argument {key!r}")
            out[key] = value
        missing = [n for n, p in self.params.items() if not p.optional and n not in out]
        if missing:
            raise TypeError(f"{self.name}() missing argument(s): {', '.join(missing)}")
        return out

    def channel_of(self, arg: str) -> str | None:
        """The channel parameter ``arg`` sets (its ``Set``), None if it sets none."""
        return next((s.channel for s in self.sets if isinstance(s, Set) and s.arg == arg), None)

    def counters(self) -> tuple[str, ...]:
        """The counter channels the command adds to (its ``Add``s), in declaration order."""
        return tuple(dict.fromkeys(s.channel for s in self.sets if isinstance(s, Add)))

    def signature(self) -> str:
        """``set_heater(on: true/false, setpoint_c: a number >= 0 <= 340 degC = keep)``."""
        parts = []
        for name, p in self.params.items():
            parts.append(f"{name}: {p.describe()}" + (" (optional)" if p.optional else ""))
        return f"{self.name}({', '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: kind, parameters with units and ranges, the channels it sets."""
        return {
            "name": self.name,
            "kind": self.kind,
            "doc": self.doc,
            "params": {
                n: {
                    "type": p.type.__name__,
                    "unit": p.unit,
                    "min": p.min,
                    "max": p.max,
                    "above": p.above,
                    "allowed": list(p.allowed) if p.allowed is not None else None,
                    "optional": p.optional,
                    "doc": p.doc,
                }
                for n, p in self.params.items()
            },
            "sets": sorted({s.channel for s in self.sets}),
            "adds": list(self.counters()),
            "flow": None if self.flow is None else self.flow.direction,
        }


def declare(
    kind: str,
    *,
    sets: Iterable[Set | Add] = (),
    flow: Flow | None = None,
    safer_when: Mapping[str, Any] | None = None,
    latch_ok_when: Mapping[str, Any] | None = None,
    doc: str = "",
    **params: Param,
) -> Callable[[F], F]:
    """Declare the decorated driver method as a command (module docstring). Parameters are
    given as keyword arguments ``name=Param(...)``; the method's signature is checked when its
    class is created."""
    if kind not in KINDS:
        raise DeclarationError(f"command kind must be one of {', '.join(KINDS)}, not {kind!r}")
    for name, p in params.items():
        if not isinstance(p, Param):
            raise DeclarationError(f"parameter {name!r} must be declared with Param(...)")

    def decorate(fn: F) -> F:
        spec = CommandSpec(
            fn.__name__,
            kind,
            dict(params),
            tuple(sets),
            flow,
            dict(safer_when) if safer_when is not None else None,
            dict(latch_ok_when) if latch_ok_when is not None else None,
            doc or (inspect.getdoc(fn) or "").split("\n\n")[0],
        )
        setattr(fn, _ATTR, spec)
        return fn

    return decorate


def _check_against_signature(owner: str, fn: Callable[..., Any], spec: CommandSpec) -> CommandSpec:
    where = f"{owner}.{spec.name}"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:  # pragma: no cover - builtins only
        raise DeclarationError(f"{where}: cannot read the signature ({exc})") from None
    names = [
        n
        for n, p in sig.parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    declared = set(spec.params)
    missing = [n for n in names if n not in declared]
    extra = sorted(declared - set(names))
    if extra:
        raise DeclarationError(
            f"{where}: declares parameter(s) {', '.join(extra)} that the method does not "
            f"have (it has: {', '.join(names) or 'none'})"
        )
    if missing:
        raise DeclarationError(f"{where}: parameter(s) {', '.join(missing)} not declared")
    for n in names:
        has_default = sig.parameters[n].default is not inspect.Parameter.empty
        if spec.params[n].optional != has_default:
            raise DeclarationError(
                f"{where}: parameter {n!r} is {'optional' if spec.params[n].optional else 'required'} "
                f"in the declaration but {'has' if has_default else 'has no'} default in the method"
            )
    ordered = {n: spec.params[n] for n in names}

    def need_param(name: str, what: str) -> None:
        if name not in ordered:
            raise DeclarationError(f"{where}: {what} names {name!r}, which is not a parameter")

    for s in spec.sets:
        what = f"{type(s).__name__}({s.channel!r})"
        if s.arg is not None:
            need_param(s.arg, what)
        for k in s.when:
            need_param(k, f"{what}.when")
        if isinstance(s, Add):
            _check_add(where, spec, s, ordered)
    for label, cond in (("safer_when", spec.safer_when), ("latch_ok_when", spec.latch_ok_when)):
        for k in cond or {}:
            need_param(k, label)
    for n, p in ordered.items():
        for k in p.fill_when:
            need_param(k, f"{n}.fill_when")
        if p.keeps is not None and not p.optional:
            raise DeclarationError(f"{where}: {n} keeps {p.keeps!r} but is not optional")
    if spec.flow is not None:
        need_param(spec.flow.volume, "Flow.volume")
        if spec.flow.rate is not None:
            need_param(spec.flow.rate, "Flow.rate")
        if spec.kind != ACTUATE:
            raise DeclarationError(f"{where}: a Flow command must be ACTUATE")
    if spec.kind == READ and (spec.sets or spec.safer_when or spec.latch_ok_when):
        raise DeclarationError(f"{where}: a READ command cannot set channels")
    if spec.kind == SAFER and spec.flow is not None:  # pragma: no cover - caught above
        raise DeclarationError(f"{where}: a SAFER command cannot move liquid")
    return CommandSpec(
        spec.name,
        spec.kind,
        ordered,
        spec.sets,
        spec.flow,
        spec.safer_when,
        spec.latch_ok_when,
        spec.doc,
    )


def _check_add(where: str, spec: CommandSpec, add: Add, params: Mapping[str, Param]) -> None:
    """An ``Add`` counts up, from an ACTUATE command, on a channel no ``Set`` of the same
    command also sets (which of the two would the channel end at?)."""
    what = f"Add({add.channel!r})"
    if spec.kind != ACTUATE:
        raise DeclarationError(f"{where}: {what} needs an ACTUATE command (only actuations count)")
    if any(isinstance(s, Set) and s.channel == add.channel for s in spec.sets):
        raise DeclarationError(
            f"{where}: {what} and Set({add.channel!r}) in one command; a command either "
            f"adds to a counter or sets (clears) it"
        )
    if add.arg is None:
        return
    p = params[add.arg]
    floor = p.min if p.min is not None else p.above
    if p.type not in (int, float) or floor is None or floor < 0:
        raise DeclarationError(
            f"{where}: {what} adds parameter {add.arg!r}, which must be a number that cannot "
            f"be negative (Param(float|int, min=0 or above=0)); it is {p.describe()}"
        )


def _applies(when: Mapping[str, Any], args: Mapping[str, Any]) -> bool:
    """``when`` holds for the arguments ``args`` (bools are not numbers)."""
    return all(
        isinstance(args.get(k), bool) == isinstance(v, bool) and args.get(k) == v
        for k, v in when.items()
    )


def collect(cls: type, safe_state_calls: Iterable[Call] = ()) -> dict[str, CommandSpec]:
    """Every declared command of ``cls`` (its bases' included), checked against the methods.

    A method overridden without a decorator keeps its base's declaration, checked against
    the override's signature. Raises :class:`DeclarationError`.
    """
    specs: dict[str, CommandSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            spec = getattr(attr, _ATTR, None)
            if isinstance(spec, CommandSpec):
                specs[name] = spec
    owner = cls.__qualname__
    out: dict[str, CommandSpec] = {}
    for name, spec in specs.items():
        fn = getattr(cls, name)
        out[name] = _check_against_signature(owner, fn, spec)
    for spec in out.values():
        flow = spec.flow
        if flow is not None and flow.progress is not None:
            progress = out.get(flow.progress)
            if progress is None or progress.kind != READ:
                raise DeclarationError(
                    f"{owner}.{spec.name}: Flow.progress {flow.progress!r} is not a declared "
                    f"READ command"
                )
    for call in safe_state_calls:
        spec = out.get(call.command)
        if spec is None:
            raise DeclarationError(
                f"{owner}.safe_state_calls: {call.command!r} is not a declared command"
            )
        try:
            spec.bind((), call.args)
        except TypeError as exc:
            raise DeclarationError(f"{owner}.safe_state_calls: {exc}") from None
        if spec.kind == READ or spec.flow is not None:
            raise DeclarationError(
                f"{owner}.safe_state_calls: {call} must make the instrument safer, not "
                f"{'read' if spec.kind == READ else 'move liquid'}"
            )
        counted = [
            a.channel
            for a in spec.sets
            if isinstance(a, Add)
            and _applies(a.when, call.args)
            and (a.arg is None or call.args.get(a.arg) is not None)
        ]
        if counted:
            raise DeclarationError(
                f"{owner}.safe_state_calls: {call} adds to {', '.join(counted)}; the safe "
                f"state runs outside the guard's books, so it must not count"
            )
    return out
