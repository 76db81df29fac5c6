"""The devices' own watchdogs, armed and fed by a station's supervisor.

A driver with ``set_watchdog(seconds)`` (the hotplate: holding register 4)
has a watchdog on the device itself: no register write for that long and the
device switches its heater and stirrer off, so the bench fails safe if
labbridge dies. :class:`DeviceWatchdogs` arms every such device of a station
when its supervisor starts and feeds it by rewriting the register every third
of its timeout; when the supervisor stops, nobody feeds it any more.

The timeout armed is the configured ``device_watchdog_s`` raised where needed
so that feeds are at least ``min_feed_interval_s`` real seconds apart: a
simulated bench running 500 times faster than real time cannot be fed every
3 ms, and a watchdog that fires because the scheduler was late switches
heating off under a running experiment (issue 12). On a real bench (time
scale 1) the configured timeout is armed unchanged. If it fires anyway, the
hotplate's declared ``watchdog-tripped`` fault trips the station
(:mod:`safety.devicefaults`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from instruments.driver import Driver

__all__ = ["MIN_FEED_INTERVAL_S", "DeviceWatchdogs"]

log = logging.getLogger(__name__)
#: real seconds the watchdog feeds are at least apart (its timeout is three of them): a
#: simulated bench's watchdog then tolerates a 2 s stall of the feeder or of the simulator
#: (both happened at 0.5 s on a loaded 2-core machine); a real bench is unaffected
MIN_FEED_INTERVAL_S = 1.0


class DeviceWatchdogs:
    """The device watchdogs of one station (module docstring). ``device_watchdog_s``: whole
    device seconds (0: do not arm); ``device_time_scale``: device seconds per real second;
    ``write_timeout``: real seconds one arming or feeding write may take."""

    def __init__(
        self,
        station: str,
        drivers: Mapping[str, Driver],
        *,
        device_watchdog_s: int,
        min_feed_interval_s: float = MIN_FEED_INTERVAL_S,
        device_time_scale: float = 1.0,
        write_timeout: float = 1.0,
    ) -> None:
        if isinstance(device_watchdog_s, bool) or not isinstance(device_watchdog_s, int):
            raise ValueError(f"device_watchdog_s must be whole seconds, got {device_watchdog_s!r}")
        if device_watchdog_s < 0:
            raise ValueError(f"device_watchdog_s must be >= 0, got {device_watchdog_s}")
        self.station = station
        self.configured_s = device_watchdog_s
        self.time_scale = float(device_time_scale)
        self.write_timeout = float(write_timeout)
        #: the drivers with a device watchdog (``set_watchdog``)
        self.drivers: dict[str, Driver] = {
            n: d for n, d in drivers.items() if callable(getattr(d, "set_watchdog", None))
        }
        #: the timeout written to the devices (device seconds; module docstring)
        self.armed_s = (
            max(
                device_watchdog_s,
                math.ceil(3 * float(min_feed_interval_s) * self.time_scale - 1e-9),
            )
            if device_watchdog_s > 0
            else 0
        )
        #: per instrument: armed (the last write succeeded)?
        self.armed: dict[str, bool] = {}

    @property
    def feed_interval_s(self) -> float:
        """Real seconds between feeds (a third of the armed timeout)."""
        return self.armed_s / self.time_scale / 3.0

    async def arm(self) -> None:
        """Write the timeout to every device with a watchdog (a failure is logged, not raised)."""
        if self.armed_s > 0:
            await asyncio.gather(*(self.write(n, d, "arm") for n, d in self.drivers.items()))

    async def write(self, name: str, driver: Driver, what: str) -> bool:
        """Arm or feed one device's watchdog; False (logged once per outage) if it failed."""
        set_watchdog: Callable[[int], Any] = getattr(driver, "set_watchdog")  # noqa: B009
        try:
            async with asyncio.timeout(self.write_timeout):
                await set_watchdog(self.armed_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = str(exc) or type(exc).__name__
            if self.armed.get(name, True):
                log.error(
                    "%s: %s device watchdog (%s, %d s) failed: %s",
                    self.station,
                    what,
                    name,
                    self.armed_s,
                    text,
                )
            self.armed[name] = False
            return False
        if not self.armed.get(name, False) and what != "arm":
            log.info("%s: %s device watchdog armed again", self.station, name)
        self.armed[name] = True
        return True

    async def feed(self, name: str, driver: Driver) -> None:
        """Feed one device's watchdog every :attr:`feed_interval_s`, until cancelled."""
        interval = self.feed_interval_s
        next_t = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            next_t = max(next_t + interval, time.monotonic())
            await self.write(name, driver, "feed")
