"""A station in the lab's own words, from its declarations: nothing is opened or measured.

:func:`describe_station` is what an agent reads before planning (the MCP ``lab`` tool):
each instrument's driver kind and declared commands (parameters with units and device
ranges, what they set), the channels the envelope bounds and how, its rules with their
reasons, vessels, budgets and monitors. :func:`envelope_lines` says the envelope in
short lines (the MCP tools' descriptions). Both read the lab config, the envelope
(:func:`safety.load_envelope`) and the drivers' declarations (:func:`safety.station_layout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.labconfig import StationConfig
from safety import actuated_channels, load_envelope, station_layout
from safety.envelope import Envelope

__all__ = ["describe_station", "envelope_lines"]


def _envelope(st: StationConfig) -> Envelope:
    return load_envelope(st.envelope_text, source=st.envelope_source)


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def describe_station(st: StationConfig) -> dict[str, Any]:
    """The station as plain data (JSON-able): ``instruments`` (kind, commands), ``limits``
    (every channel an actuating command sets, and how the envelope bounds it), ``rules``,
    ``vessels``, ``budgets``, ``monitors``."""
    envelope = _envelope(st)
    layout = station_layout(st.instruments, envelope)
    instruments = {}
    for spec in st.instruments:
        name = spec["name"]
        commands = layout.actions(name)
        instruments[name] = {
            "kind": spec["kind"],
            "commands": {
                c.name: {
                    "kind": c.kind,
                    "signature": c.signature(),
                    "doc": c.doc,
                    "sets": sorted({f"{name}.{s.channel}" for s in c.sets}),
                }
                for c in commands.values()
            },
        }
    return {
        "station": st.name,
        "instruments": instruments,
        "limits": {
            b.channel: {"bounded": b.bounded, "how": b.how, "set_by": list(b.commands)}
            for b in actuated_channels(st.instruments, envelope)
        },
        "rules": [{"name": r.name, "rule": str(r.expr), "why": r.doc} for r in envelope.rules],
        "vessels": {
            v.name: {
                "max": v.max,
                "capacity": v.capacity,
                "unit": v.unit,
                "fed_by": list(v.fed_by),
                "drained_by": list(v.drained_by),
                "doc": v.doc,
            }
            for v in envelope.vessels.values()
        },
        "budgets": [
            {
                "name": b.name,
                "counts": b.resource,
                "max": b.limit,
                "per": b.window,
                "unit": b.unit,
            }
            for b in envelope.budgets
        ],
        "monitors": [
            {"name": m.name, "kind": m.kind, "watches": _params(m.params), "doc": m.doc}
            for m in envelope.monitors
        ],
        "note": (
            "every command is checked against these limits and rules when it is sent; a whole "
            "proposal is dry-run against them before it is queued; a monitor that trips puts "
            "every instrument in its safe state until an operator resets the station"
        ),
    }


def envelope_lines(st: StationConfig) -> list[str]:
    """The station's envelope in short lines: its bounded channels, vessels, rules, budgets."""
    envelope = _envelope(st)
    out = [
        f"{b.channel}: {b.how}" for b in actuated_channels(st.instruments, envelope) if b.bounded
    ]
    out += [f"rule {r.name}: {r.expr}" + (f" ({r.doc})" if r.doc else "") for r in envelope.rules]
    for b in envelope.budgets:
        unit = f" {b.unit}" if b.unit else ""
        out.append(f"budget {b.name}: at most {b.limit:g}{unit} of {b.resource} per {b.window}")
    return out
