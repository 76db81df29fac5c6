"""Simulators: the device side of every wire protocol of the reference bench, plus the world.

Never imported by runtime code (import-linter checks it), except the bridge's
simulated-bench entry point.
"""

from simulators.clock import SimClock
from simulators.world import Faults, StationWorld, WireLog

__all__ = ["Faults", "SimClock", "StationWorld", "WireLog"]
