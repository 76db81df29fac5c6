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

__all__ = ["MONITOR_KINDS", "MonitorSpec", "parse_monitors"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_CHANNEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
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


def parse_monitors(data: Any, doc: YamlDoc) -> list[MonitorSpec]:
    """The ``monitors`` list of an envelope (None: no monitors), validated."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise doc.error("must be a list of {name, kind, ...}", ("monitors",))
    out: list[MonitorSpec] = []
    seen: set[str] = set()
    for i, spec in enumerate(data):
        monitor = _monitor(i, spec, doc)
        if monitor.name in seen:
            raise doc.error(f"duplicate monitor name '{monitor.name}'", ("monitors", i, "name"))
        seen.add(monitor.name)
        out.append(monitor)
    return out


def _monitor(i: int, spec: Any, doc: YamlDoc) -> MonitorSpec:
    path: tuple[Any, ...] = ("monitors", i)
    kinds = ", ".join(MONITOR_KINDS)
    if not isinstance(spec, Mapping):
        raise doc.error(f"a monitor is a mapping {{name, kind, ...}}; kinds: {kinds}", path)
    for key in ("name", "kind"):
        if key not in spec:
            raise doc.error(f"missing '{key}'", path)
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
    out = MonitorSpec(name, kind, params, spec.get("doc") or "", line=doc.line(path))
    try:
        out.build()  # the classes' own checks (hysteresis order, max_age_s > 0, ...)
    except ValueError as exc:
        text = str(exc)
        problem = text.split(":", 1)[-1]
        named = [k for k in keys if k in spec and k in problem]  # the key it names first
        culprit = min(named, key=problem.find) if named else None
        raise doc.error(text, (*path, culprit) if culprit else path) from None
    return out
