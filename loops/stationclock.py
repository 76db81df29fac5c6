"""A simulated bench's clock, portable across processes: :class:`ClockSpec` (data) and
:class:`ScaledClock` (the clock it defines).

A station actor (:mod:`loops.stationactor`) runs its guard and its recipes'
durations on the simulator's accelerated clock: the campaign captures it as a
:class:`ClockSpec` and the actor rebuilds it (``time.monotonic`` is system-wide on
Linux, so one ``(sim, real)`` pair and the speed define the same clock in every
process of the machine).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ClockSpec", "ScaledClock"]


@dataclass(frozen=True)
class ClockSpec:
    """A simulated clock as data: ``speed`` simulated seconds per real second, and
    ``sim_at_real`` = (simulated seconds, ``time.monotonic()``) at one instant.

    Build it next to the simulator with :meth:`of` (``ClockSpec.of(clock.now,
    clock.speed)``); :class:`ScaledClock` turns it back into a clock in another
    process on the same machine (CLOCK_MONOTONIC is system-wide on Linux).
    """

    speed: float
    sim_at_real: tuple[float, float]

    def __post_init__(self) -> None:
        if not (
            isinstance(self.speed, int | float) and math.isfinite(self.speed) and self.speed > 0
        ):
            raise ValueError(f"clock speed must be a finite number > 0, got {self.speed!r}")
        if len(self.sim_at_real) != 2:
            raise ValueError(
                f"sim_at_real is (sim_seconds, monotonic_seconds), got {self.sim_at_real!r}"
            )

    @classmethod
    def of(cls, now: Callable[[], float], speed: float) -> ClockSpec:
        """Capture the clock ``now()`` (a callable giving simulated seconds) running at ``speed``."""
        real = time.monotonic()
        return cls(float(speed), (float(now()), real))


class ScaledClock:
    """``now()`` in simulated seconds, ``sleep(s)`` for ``s`` simulated seconds (see :class:`ClockSpec`)."""

    def __init__(self, spec: ClockSpec) -> None:
        self.spec = spec
        self.speed = float(spec.speed)
        self._sim0, self._real0 = (float(v) for v in spec.sim_at_real)

    def now(self) -> float:
        return self._sim0 + (time.monotonic() - self._real0) * self.speed

    def real_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds) / self.speed)
