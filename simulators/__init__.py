"""Simulators: the device side of every wire protocol of the benches, plus their worlds.

Two benches: the colour match (:class:`~simulators.world.StationWorld`,
:class:`~simulators.bench.SimulatedBench`) and the buffer formulation
(:class:`~simulators.buffer_world.BufferWorld`,
:class:`~simulators.buffer_bench.SimulatedBufferBench`), both on the shared
physics of :class:`~simulators.benchworld.BenchWorld`.

Never imported by runtime code (import-linter checks it), except the bridge's
simulated-bench entry point.
"""

from simulators.clock import SimClock
from simulators.world import Faults, StationWorld, WireLog

__all__ = ["Faults", "SimClock", "StationWorld", "WireLog"]
