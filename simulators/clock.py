"""A simulated clock that can run N times faster than real time.

Simulated seconds advance at ``speed`` times the rate of ``time.monotonic()``.
Device-side periodic behaviour (heartbeats, pump motion, heating) is expressed
in simulated seconds; :meth:`SimClock.sleep` converts to real time.
"""

from __future__ import annotations

import asyncio
import threading
import time


class SimClock:
    """``now()`` is simulated seconds since the clock started.

    ``sim_at_real``: ``(simulated s, time.monotonic())`` at one instant, to run on the
    same simulated time as another clock (another process's: CLOCK_MONOTONIC is
    system-wide; lab.yaml ``simulated.sim_at_real``)."""

    def __init__(
        self, speed: float = 1.0, *, sim_at_real: tuple[float, float] | None = None
    ) -> None:
        if not speed > 0:
            raise ValueError(f"clock speed must be > 0, got {speed!r}")
        self._speed = float(speed)
        self._lock = threading.Lock()
        sim, real = (0.0, time.monotonic()) if sim_at_real is None else sim_at_real
        self._sim0, self._real0 = float(sim), float(real)

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"clock speed must be > 0, got {value!r}")
        with self._lock:
            now_real = time.monotonic()
            self._sim0 = self._sim0 + (now_real - self._real0) * self._speed
            self._real0 = now_real
            self._speed = float(value)

    def now(self) -> float:
        with self._lock:
            return self._sim0 + (time.monotonic() - self._real0) * self._speed

    def real_seconds(self, sim_seconds: float) -> float:
        """How long ``sim_seconds`` of simulated time take in real time."""
        return sim_seconds / self._speed

    async def sleep(self, sim_seconds: float) -> None:
        await asyncio.sleep(max(0.0, sim_seconds) / self._speed)

    def sleep_blocking(self, sim_seconds: float) -> None:
        time.sleep(max(0.0, sim_seconds) / self._speed)
