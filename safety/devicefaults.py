"""The faults a station's instruments declare, as monitors of its supervisor.

A driver declares what its device reports when it stopped doing what it was
told (``faults`` of the driver class, :class:`instruments.declare.Fault`: the
hotplate's watchdog and over-temperature trips, a pump's alarm, a probe out of
the liquid), as a condition over its *own* channels. For every instrument of a
station and every fault its driver declares, :func:`fault_monitors` builds an
:class:`~safety.monitors.Interlock` named ``<instrument>.<fault>`` whose
condition is the declared one with every name qualified by the instrument
(``watchdog_tripped and heater`` on instrument ``hotplate`` becomes
``hotplate.watchdog_tripped and hotplate.heater``): it trips the station while
the condition holds, and its trip reason carries the fault's sentence.

Deny by default: no envelope has to remember them. An envelope changes one only
with a written reason (:class:`~safety.monitorspec.FaultSetting`, its
``monitors:`` section): ``{name: hotplate.probe-fault, disabled: "no liquid
probe fitted"}`` switches it off (logged when the station starts, listed in the
supervisor's status); ``{name: probe.not-immersed, while: hotplate.stirrer}``
narrows it (it trips only while that condition over the station's channels
also holds). A setting that names no declared fault is an
:class:`~safety.envelope.EnvelopeError` naming the faults the station has.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from instruments.declare import DeclarationError, Fault
from safety.envelope import EnvelopeError
from safety.expr import Expr, Expression, Name, RuleSyntaxError, parse, to_source
from safety.monitors import Interlock
from safety.monitorspec import FaultSetting

__all__ = [
    "DeclaredFault",
    "check_fault_settings",
    "declared_faults",
    "fault_monitors",
    "qualify",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeclaredFault:
    """One fault of one instrument of a station: ``name`` is ``<instrument>.<fault>``;
    ``when`` its condition over the station's channels (qualified); ``owner`` the driver
    class that declares it (for messages)."""

    name: str
    instrument: str
    owner: str
    fault: Fault
    when: Expression


def _prefixed(node: Expr, prefix: str) -> Expr:
    """``node`` with every name prefixed (the syntax tree's nodes are frozen dataclasses)."""
    if isinstance(node, Name):
        return dataclasses.replace(node, name=prefix + node.name)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if isinstance(value, Expr):
            changes[f.name] = _prefixed(value, prefix)
        elif isinstance(value, tuple) and value and all(isinstance(v, Expr) for v in value):
            changes[f.name] = tuple(_prefixed(v, prefix) for v in value)
    return dataclasses.replace(node, **changes) if changes else node  # type: ignore[type-var]


def qualify(text: str, instrument: str, *, source: str) -> Expression:
    """A driver's fault condition (its own channel names) as a condition over the station's
    channels (``<instrument>.<name>``). :class:`DeclarationError` naming ``source`` if it
    does not parse or names a channel with a dot (another instrument's)."""
    try:
        own = parse(text, source=source)
    except RuleSyntaxError as exc:
        raise DeclarationError(f"{source}: {exc}") from None
    dotted = [n for n in own.names_in_order() if "." in n]
    if dotted:
        raise DeclarationError(
            f"{source}: names {', '.join(dotted)}: a fault's condition names the driver's own "
            f"channels, without an instrument (e.g. watchdog_tripped, not hotplate.watchdog_tripped)"
        )
    return parse(to_source(_prefixed(own.ast, f"{instrument}.")), source=source)


def declared_faults(drivers: Mapping[str, Any]) -> dict[str, DeclaredFault]:
    """Every fault the station's drivers (instances or classes, by instrument name) declare,
    by monitor name ``<instrument>.<fault>``, in the station's order."""
    out: dict[str, DeclaredFault] = {}
    for instrument, driver in drivers.items():
        cls = driver if isinstance(driver, type) else type(driver)
        faults: Mapping[str, Fault] = getattr(cls, "faults", None) or {}
        for fault_name, fault in faults.items():
            source = f"{cls.__qualname__}.faults[{fault_name!r}]"
            name = f"{instrument}.{fault_name}"
            out[name] = DeclaredFault(
                name,
                instrument,
                cls.__qualname__,
                fault,
                qualify(fault.when, instrument, source=source),
            )
    return out


def check_fault_settings(
    declared: Mapping[str, DeclaredFault], settings: Iterable[FaultSetting]
) -> dict[str, FaultSetting]:
    """The envelope's settings by fault name; :class:`EnvelopeError` at the setting's file
    and line if one names a fault no driver of the station declares."""
    out: dict[str, FaultSetting] = {}
    for setting in settings:
        if setting.name not in declared:
            mine = [n for n, d in declared.items() if d.instrument == setting.instrument]
            known = ", ".join(mine or declared) or "none"
            whose = (
                f"{setting.instrument}'s driver declares"
                if mine
                else "the station's drivers declare"
            )
            field = f"monitors[{setting.index}].name" if setting.index is not None else "monitors"
            raise EnvelopeError(
                f"'{setting.name}' is not a fault {whose} (known: {known})",
                source=setting.source,
                line=setting.line,
                field=field,
            )
        out[setting.name] = setting
    return out


def fault_monitors(
    drivers: Mapping[str, Any], settings: Iterable[FaultSetting] = ()
) -> tuple[list[Interlock], dict[str, str]]:
    """The station's device-fault monitors (module docstring) and the faults the envelope
    switched off (name -> its reason). Fresh monitors: build them once per supervisor."""
    declared = declared_faults(drivers)
    chosen = check_fault_settings(declared, settings)
    monitors: list[Interlock] = []
    off: dict[str, str] = {}
    for name, d in declared.items():
        setting = chosen.get(name)
        if setting is not None and setting.disabled is not None:
            off[name] = setting.disabled
            continue
        when = d.when
        if setting is not None and setting.when is not None:
            when = parse(
                f"({d.when.text}) and ({setting.when.text})",
                source=f"{d.owner}.faults + {setting.source}",
            )
        channels = [f"{d.instrument}.{c}" for c in d.fault.show]
        monitors.append(
            Interlock(
                name, trip_when=when, confirm=d.fault.confirm, channels=channels, doc=d.fault.doc
            )
        )
    for name, why in off.items():
        log.info("device fault %s is switched off by the envelope: %s", name, why)
    return monitors, off
