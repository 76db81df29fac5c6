"""An envelope from YAML: :func:`load_envelope` (a file, YAML text or parsed data) and
:func:`reference_envelope` (the reference bench's, ``safety/reference_bench.yaml``).

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
      exposures_per_hour: {counts: lamp.exposures, per: hour, max: 120}
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
that feeds / drains a vessel moved, e.g. one reagent's pump, or
``<instrument>.<channel>``: what the instrument's commands added to that
counter, instruments/declare.py ``Add``, checked against the station's
drivers when its guard is built and by ``labbridge check``), ``per``
(``minute``, ``hour`` or ``day``), ``max``, ``unit``, ``doc``. A counter is a
channel too: it is bounded under ``channels`` (``lamp.exposures: {max:
5000}``; the guard's count since the station started or the counter was
cleared) and rules name it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from instruments.declare import RESERVED_COUNTERS
from safety.envelope import Envelope, EnvelopeError, flow_resources
from safety.expr import parse
from safety.limits import WINDOWS_S, Budget, ChannelLimit, Rule, Vessel, is_number
from safety.monitorspec import parse_monitors
from safety.yamldoc import YamlDoc, compose_yaml

__all__ = ["REFERENCE_BENCH", "load_envelope", "reference_envelope"]

REFERENCE_BENCH = Path(__file__).with_name("reference_bench.yaml")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_RULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_BUDGET_RE = re.compile(r"experiments_per_(minute|hour|day)")
_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    countable = ["experiments", *flow_resources(vessels)]
    vessel_names = {v.name for v in vessels}
    budgets = [
        _budget(k, v, doc, countable, vessel_names)
        for k, v in _mapping(data, "budgets", doc).items()
    ]
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


def _counter_name(counts: str, vessels: Collection[str]) -> bool:
    """``counts`` names a counter (``<instrument>.<channel>``, which the station's drivers
    must declare): not a vessel's resource, nor a word no counter may use (a flow's)."""
    if not isinstance(counts, str) or not _NAME_RE.fullmatch(counts) or counts.count(".") != 1:
        return False
    owner, _, word = counts.partition(".")
    return owner not in vessels and word not in RESERVED_COUNTERS


def _budget(
    key: Any, value: Any, doc: YamlDoc, allowed: Collection[str], vessels: Collection[str]
) -> Budget:
    path: tuple[Any, ...] = ("budgets", key)
    if not isinstance(key, str) or not _WORD_RE.fullmatch(key):
        raise doc.error(f"a budget name is a word, got {key!r}", path)
    if not isinstance(value, Mapping):
        m = _BUDGET_RE.fullmatch(key)
        if m is None:
            raise doc.error(
                "a budget is {counts: <experiments | <vessel>.added|removed | "
                "<instrument>.delivered|withdrawn | <instrument>.<counter>>, "
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
    if counts not in allowed and not _counter_name(counts, vessels):
        raise doc.error(
            f"cannot count {counts!r}; known: {', '.join(allowed)}, or a counter "
            f"<instrument>.<channel> (a command's Add)",
            (*path, "counts"),
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
