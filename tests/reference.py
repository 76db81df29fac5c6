"""The reference bench's instruments as the safety layer sees them without hardware: each
instrument's driver class (its declared commands), and the layout a dry run checks against."""

from __future__ import annotations

from typing import Any

from instruments.drivers.camera import Camera
from instruments.drivers.color_sensor import ColorSensor
from instruments.drivers.enclosure import Enclosure
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.syringe_pump import SyringePump
from safety.effects import Layout
from safety.envelope import Envelope

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
