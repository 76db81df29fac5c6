"""The reference bench's instruments as the safety layer sees them without hardware: each
instrument's driver class (its declared commands), and the layout a dry run checks against;
what reached a simulated reference bench, read from its wire log."""

from __future__ import annotations

import re
from typing import Any

from instruments.drivers.camera import Camera
from instruments.drivers.color_sensor import ColorSensor
from instruments.drivers.enclosure import Enclosure
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.syringe_pump import SyringePump
from safety.effects import Layout
from safety.envelope import Envelope
from simulators.bench import SimulatedBench

#: instrument name -> driver class, as on the reference bench
DRIVERS: dict[str, Any] = {
    "red": SyringePump,
    "green": SyringePump,
    "blue": SyringePump,
    "waste": SyringePump,
    "hotplate": Hotplate,
    "color": ColorSensor,
    "enclosure": Enclosure,
    "camera": Camera,
}


def layout(env: Envelope, drivers: dict[str, Any] = DRIVERS) -> Layout:
    """The station's layout from the driver classes' declarations and the envelope's vessels."""
    return Layout.of(drivers, env.vessels)


def relaxed_staleness(envelope_text: str) -> str:
    """An envelope's text with every staleness/heartbeat limit at 10 s (for tests where a
    monitor tripping on a starved poll of a loaded 2-core machine is not what is tested)."""
    text, n = re.subn(r"max_age_s: \d+(?:\.\d+)?\n", "max_age_s: 10\n", envelope_text)
    assert n, "the envelope has no max_age_s to relax"
    return text


def actuating(bench: SimulatedBench, since: float) -> list[tuple[float, Any]]:
    """(monotonic time, command) of every actuating command that reached the bench after
    ``since``: a pump RUN (``"<address>RUN"``), a hotplate setpoint or stirrer speed, a
    heater/stirrer enable (``(register, values)``)."""
    out: list[tuple[float, Any]] = []
    for r in bench.world.wire.entries("pumps"):
        if r.real_t > since and not r.note and str(r.data).strip().endswith("RUN"):
            out.append((r.real_t, r.data))
    for r in bench.world.wire.entries("hotplate"):
        data = r.data if isinstance(r.data, dict) else {}
        if r.real_t <= since or data.get("fc") not in (6, 16):
            continue
        address, values = data.get("address"), list(data.get("values") or [])
        if address in (0, 1) or (address in (2, 3) and 1 in values):
            out.append((r.real_t, (address, values)))
    return sorted(out, key=lambda e: e[0])
