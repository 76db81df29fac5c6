"""The ``monitors:`` section of an envelope: a bench's station monitors, declared as data.

One entry per monitor, with its ``name``, its ``kind`` and that kind's
parameters (the classes of :mod:`safety.monitors`; ages in real seconds)::

    monitors:
      - name: liquid-overtemp            # a threshold with hysteresis
        kind: threshold
        channel: hotplate.liquid_c
        trip_above: 80                   # and/or trip_below
        clear_below: 75                  # and/or clear_above (with trip_below)
      - name: hotplate-reading-stale     # a reading older than max_age_s
        kind: staleness
        channel: hotplate.plate_c
        max_age_s: 2
        grace_s: 5                       # optional; also clear_age_s
      - name: enclosure-heartbeat-stale  # a device-reported age + the reading's age
        kind: heartbeat
        channel: enclosure.heartbeat_age_s
        max_age_s: 2
      - name: lid-open-while-heating     # trips while a rule-language condition holds
        kind: interlock
        trip_when: (hotplate.heating or hotplate.heater) and enclosure.lid != "closed"

Keys by kind: ``threshold``: ``channel``, ``trip_above``, ``clear_below``,
``trip_below``, ``clear_above``; ``staleness`` and ``heartbeat``:
``channel``, ``max_age_s``, ``grace_s``, ``clear_age_s``; ``interlock``:
``trip_when`` (:mod:`safety.expr`) and ``confirm`` (true: trip only once a
reading taken after the condition first held still shows it; see
:class:`~safety.monitors.Interlock`). Every entry may have a ``doc``.

The envelope keeps the :class:`MonitorSpec` (immutable data);
:meth:`MonitorSpec.build` makes a fresh :class:`~safety.monitors.Monitor`
for each supervisor (a monitor keeps its arming time). Errors name the file,
the line and the field like the rest of the envelope; a ``trip_when`` that
does not parse raises :class:`~safety.expr.RuleSyntaxError` at its file, line
and column.

Device faults
-------------
Besides these, every fault a station's drivers declare (``faults`` of the
driver class, :class:`instruments.declare.Fault`) is a monitor
``<instrument>.<fault>`` of its own, built by the supervisor
(:mod:`safety.devicefaults`) without a word in the envelope: deny by default.
An entry without a ``kind`` whose name is such a fault changes it on this
bench, with the reason written down::

    monitors:
      - name: hotplate.probe-fault       # switched off: the reason is the value
        disabled: no liquid probe fitted on this bench
      - name: probe.not-immersed         # narrowed: trips only while this also holds
        while: hotplate.stirrer
        doc: the beaker is emptied between experiments; stirring needs it full

Keys: ``name``, ``disabled`` (a text: why) or ``while`` (a condition in the rule
language over the station's channels), ``doc``. These are kept as
:class:`FaultSetting`; which faults exist is known only with the drivers, so a
name that no driver of the station declares is refused when the station is
built, naming the faults it has.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safety.expr import Expression, parse
from safety.monitors import Heartbeat, Interlock, Monitor, Staleness, Threshold
from safety.yamldoc import YamlDoc

__all__ = ["FAULT_SETTING_KEYS", "MONITOR_KINDS", "FaultSetting", "MonitorSpec", "parse_monitors"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_CHANNEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_FAULT_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
#: the keys of an entry that changes a device-declared fault
FAULT_SETTING_KEYS = ("name", "disabled", "while", "doc")
_SETTING_KEYS = {"disabled", "while", False}  # False: YAML reads a key "off" as false
_COMMON = ("name", "kind", "doc")
_AGES = ("channel", "max_age_s", "grace_s", "clear_age_s")
#: kind -> (its keys besides name/kind/doc, the required ones)
MONITOR_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "threshold": (
        ("channel", "trip_above", "clear_below", "trip_below", "clear_above"),
        ("channel",),
    ),
    "staleness": (_AGES, ("channel", "max_age_s")),
    "heartbeat": (_AGES, ("channel", "max_age_s")),
    "interlock": (("trip_when", "confirm"), ("trip_when",)),
}


@dataclass(frozen=True)
class MonitorSpec:
    """One declared monitor: ``params`` are its class's keyword arguments (besides the name)."""

    name: str
    kind: str
    params: Mapping[str, Any]
    doc: str = ""
    line: int | None = field(default=None, compare=False)
    index: int | None = field(default=None, compare=False)  # in the envelope's monitors list

    @property
    def channels(self) -> tuple[str, ...]:
        """The ``instrument.channel`` names it reads, in order."""
        when = self.params.get("trip_when")
        if isinstance(when, Expression):
            return tuple(when.names_in_order())
        return (self.params["channel"],)

    @property
    def channel_key(self) -> str:
        """The key that holds its channel names (for messages)."""
        return "trip_when" if self.kind == "interlock" else "channel"

    def build(self) -> Monitor:
        """A fresh monitor (not armed)."""
        p = dict(self.params)
        if self.kind == "threshold":
            return Threshold(self.name, p.pop("channel"), **p)
        if self.kind == "staleness":
            return Staleness(self.name, p.pop("channel"), p.pop("max_age_s"), **p)
        if self.kind == "heartbeat":
            return Heartbeat(self.name, p.pop("channel"), p.pop("max_age_s"), **p)
        if self.kind == "interlock":
            return Interlock(self.name, trip_when=p["trip_when"], confirm=p.get("confirm", False))
        raise ValueError(f"monitor {self.name}: unknown kind {self.kind!r}")  # pragma: no cover


@dataclass(frozen=True)
class FaultSetting:
    """The envelope's word on one device-declared fault (module docstring, "Device faults"):
    ``disabled`` (why it is switched off on this bench) or ``when`` (it trips only while this
    condition also holds)."""

    name: str
    disabled: str | None = None
    when: Expression | None = None
    doc: str = ""
    line: int | None = field(default=None, compare=False)
    index: int | None = field(default=None, compare=False)  # in the envelope's monitors list
    source: str = field(default="<envelope>", compare=False)

    @property
    def instrument(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def fault(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def channels(self) -> tuple[str, ...]:
        """The ``instrument.channel`` names its ``while`` reads."""
        return tuple(self.when.names_in_order()) if self.when is not None else ()


def parse_monitors(data: Any, doc: YamlDoc) -> tuple[list[MonitorSpec], list[FaultSetting]]:
    """The ``monitors`` list of an envelope (None: none), validated: the monitors it declares
    and its settings of device-declared faults."""
    if data is None:
        return [], []
    if not isinstance(data, list):
        raise doc.error("must be a list of {name, kind, ...}", ("monitors",))
    out: list[MonitorSpec] = []
    settings: list[FaultSetting] = []
    seen: set[str] = set()
    for i, spec in enumerate(data):
        if isinstance(spec, Mapping) and "kind" not in spec and _SETTING_KEYS & set(spec):
            settings.append(_fault_setting(i, spec, doc))
            name = settings[-1].name
        else:
            out.append(_monitor(i, spec, doc))
            name = out[-1].name
        if name in seen:
            raise doc.error(f"duplicate monitor name '{name}'", ("monitors", i, "name"))
        seen.add(name)
    return out, settings


def _fault_setting(i: int, spec: Mapping[str, Any], doc: YamlDoc) -> FaultSetting:
    path: tuple[Any, ...] = ("monitors", i)
    for key in spec:
        if key is False:
            raise doc.error("YAML reads the key 'off' as false: write disabled: <why>", path)
        if key not in FAULT_SETTING_KEYS:
            raise doc.error(
                f"unknown key '{key}' for a device fault's setting (known: "
                f"{', '.join(FAULT_SETTING_KEYS)}; a monitor of its own needs a 'kind')",
                (*path, key),
            )
    name = spec.get("name")
    if not isinstance(name, str) or not _FAULT_RE.fullmatch(name):
        raise doc.error(
            f"a device fault is named '<instrument>.<fault>' (e.g. hotplate.probe-fault), "
            f"got {name!r}",
            (*path, "name"),
        )
    if "disabled" in spec and "while" in spec:
        raise doc.error("give disabled (and why) or while (narrowed), not both", path)
    if spec.get("doc") is not None and not isinstance(spec["doc"], str):
        raise doc.error("must be a string", (*path, "doc"))
    disabled = spec.get("disabled")
    when: Expression | None = None
    if "disabled" in spec:
        if not isinstance(disabled, str) or not disabled.strip():
            raise doc.error(
                f"disabled is the reason the fault is switched off on this bench (a text), "
                f"got {disabled!r}",
                (*path, "disabled"),
            )
    elif "while" not in spec:
        raise doc.error("give disabled: <why> or while: <condition>", path)
    else:
        text = spec["while"]
        if not isinstance(text, str):
            raise doc.error(f"must be a rule text (a string), got {text!r}", (*path, "while"))
        line, column, indent = doc.scalars.get((*path, "while"), (doc.line(path) or 1, 1, 0))
        when = parse(text, source=doc.source, line=line, column=column, indent=indent)
    return FaultSetting(
        name, disabled, when, spec.get("doc") or "", line=doc.line(path), index=i, source=doc.source
    )


def _monitor(i: int, spec: Any, doc: YamlDoc) -> MonitorSpec:
    path: tuple[Any, ...] = ("monitors", i)
    kinds = ", ".join(MONITOR_KINDS)
    if not isinstance(spec, Mapping):
        raise doc.error(f"a monitor is a mapping {{name, kind, ...}}; kinds: {kinds}", path)
    if "name" not in spec:
        raise doc.error("missing 'name'", path)
    if "kind" not in spec:
        raise doc.error(
            f"missing 'kind' (a monitor: {kinds}; or, to change a fault a driver declares, "
            f"name: <instrument>.<fault> with disabled: <why> or while: <condition>)",
            path,
        )
    name = spec["name"]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise doc.error(
            f"a monitor name is a word (letters, digits, - _ . :), got {name!r}", (*path, "name")
        )
    kind = spec["kind"]
    if kind not in MONITOR_KINDS:
        raise doc.error(f"unknown kind {kind!r}; known: {kinds}", (*path, "kind"))
    keys, required = MONITOR_KINDS[kind]
    allowed = (*_COMMON, *keys)
    for key in spec:
        if key not in allowed:
            raise doc.error(
                f"unknown key '{key}' for a {kind} monitor (known: {', '.join(allowed)})",
                (*path, key),
            )
    for key in required:
        if key not in spec:
            raise doc.error(f"missing '{key}' (a {kind} monitor needs {', '.join(required)})", path)
    if spec.get("doc") is not None and not isinstance(spec["doc"], str):
        raise doc.error("must be a string", (*path, "doc"))
    params: dict[str, Any] = {}
    for key in keys:
        value = spec.get(key)
        if value is None:
            continue
        at = (*path, key)
        if key == "channel":
            if not isinstance(value, str) or not _CHANNEL_RE.fullmatch(value):
                raise doc.error(f"a channel is '<instrument>.<channel>', got {value!r}", at)
            params[key] = value
        elif key == "confirm":
            if not isinstance(value, bool):
                raise doc.error(f"must be true or false, got {value!r}", at)
            params[key] = value
        elif key == "trip_when":
            if not isinstance(value, str):
                raise doc.error(f"must be a rule text (a string), got {value!r}", at)
            line, column, indent = doc.scalars.get(at, (doc.line(at) or 1, 1, 0))
            params[key] = parse(value, source=doc.source, line=line, column=column, indent=indent)
        else:
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise doc.error(f"must be a number, got {value!r}", at)
            if not math.isfinite(value):
                raise doc.error(f"must be a finite number, got {value!r}", at)
            if key.endswith("_s") and value < 0:
                raise doc.error(f"must be >= 0 (real seconds), got {value!r}", at)
            params[key] = float(value)
    out = MonitorSpec(name, kind, params, spec.get("doc") or "", line=doc.line(path), index=i)
    try:
        out.build()  # the classes' own checks (hysteresis order, max_age_s > 0, ...)
    except ValueError as exc:
        text = str(exc)
        problem = text.split(":", 1)[-1]
        named = [k for k in keys if k in spec and k in problem]  # the key it names first
        culprit = min(named, key=problem.find) if named else None
        raise doc.error(text, (*path, culprit) if culprit else path) from None
    return out
