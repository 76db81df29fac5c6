"""What every simulated station kind shares: its instruments as a lab config lists them,
starting and stopping its simulators, injecting faults into its world.

:class:`SimulatedStation` is the base of the colour bench
(:class:`simulators.bench.SimulatedBench`) and the buffer bench
(:class:`simulators.buffer_bench.SimulatedBufferBench`); :class:`InstrumentSpec`
is one instrument of a station (driver kind, URL, options).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from simulators.benchworld import BenchWorld

log = logging.getLogger(__name__)


@dataclass
class InstrumentSpec:
    """One instrument as a lab config names it: a driver kind, a URL and driver options."""

    name: str
    kind: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "options": dict(self.options),
        }


class SimulatedStation:
    """A station's simulators over one world. Subclasses fill ``_sims`` (started in order,
    stopped in reverse) and implement :meth:`instruments`."""

    def __init__(self, world: BenchWorld, *, index: int = 0) -> None:
        self.world = world
        self.name = world.name
        self.index = index
        self._sims: list[Any] = []
        self._started: list[Any] = []

    async def start(self) -> None:
        try:
            for sim in self._sims:
                await sim.start()
                self._started.append(sim)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every simulator (idempotent); failures are logged and the rest still stop."""
        while self._started:
            sim = self._started.pop()
            try:
                await sim.stop()
            except Exception as exc:
                log.error("%s: stopping %s failed: %s", self.name, type(sim).__name__, exc)

    def instruments(self) -> list[InstrumentSpec]:
        """The station's instruments as a lab config lists them (driver kind, URL, options)."""
        raise NotImplementedError

    def inject_fault(self, name: str, **params: Any) -> None:
        """Inject a fault into this station (see :class:`simulators.benchworld.Faults`)."""
        self.world.faults.inject(name, **params)

    def clear_fault(self, name: str | None = None) -> None:
        self.world.faults.clear(name)


__all__ = ["InstrumentSpec", "SimulatedStation"]
