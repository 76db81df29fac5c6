"""E-stop: one call that trips every station and drives every instrument to its safe state.

``await EStop(supervisors).estop(reason, who=...)`` calls
:meth:`StationSupervisor.trip` on every station concurrently; each station
safe-states its instruments concurrently, each ``safe_state()`` bounded by the
station's ``safe_timeout``, so the whole call is bounded even when a driver
hangs or raises, and the instruments that can be made safe are. Idempotent: a
second call while the stations are latched returns at once, reporting
``already_tripped``. The returned :class:`EStopReport` names, per station, the
instruments that reached their safe state and those that failed or timed out.

:func:`install_signal_handlers` makes SIGINT/SIGTERM run the e-stop once (for
the application). A software e-stop is layered above the bench's hardware
e-stop, which never depends on labbridge.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safety.supervisor import StationSupervisor, TripReport

log = logging.getLogger(__name__)


@dataclass
class EStopReport:
    """The outcome of one e-stop: a :class:`TripReport` per station (``elapsed_s`` real seconds)."""

    reason: str
    who: str
    t: float = field(default_factory=time.time)
    elapsed_s: float = 0.0
    stations: dict[str, TripReport] = field(default_factory=dict)
    #: stations whose trip itself failed or did not finish in time (should not happen)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def already_tripped(self) -> bool:
        """Every station was latched already: nothing new was done."""
        return bool(self.stations) and all(r.already_tripped for r in self.stations.values())

    @property
    def failed(self) -> dict[str, list[str]]:
        """Per station, the instruments whose safe state failed or timed out."""
        return {s: r.failed for s, r in self.stations.items() if r.failed}

    @property
    def safe(self) -> dict[str, list[str]]:
        """Per station, the instruments that reached their safe state."""
        return {s: r.safe for s, r in self.stations.items()}

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.already_tripped or r.ok for r in self.stations.values())

    def summary(self) -> str:
        head = f"e-stop by {self.who} ({self.reason}) in {self.elapsed_s * 1e3:.0f} ms"
        lines = [head] + [r.summary() for r in self.stations.values()]
        lines += [f"{s}: ERROR {e}" for s, e in self.errors.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "who": self.who,
            "t": self.t,
            "elapsed_s": self.elapsed_s,
            "already_tripped": self.already_tripped,
            "ok": self.ok,
            "stations": {s: r.as_dict() for s, r in self.stations.items()},
            "errors": dict(self.errors),
        }


class EStop:
    """Trips every station given. ``timeout`` bounds the whole call (default: the largest
    ``safe_timeout`` plus 1 s; the per-action timeouts normally end it sooner)."""

    def __init__(
        self,
        supervisors: Iterable[StationSupervisor] | Mapping[str, StationSupervisor],
        *,
        timeout: float | None = None,
    ) -> None:
        items = (
            list(supervisors.values()) if isinstance(supervisors, Mapping) else list(supervisors)
        )
        self.supervisors: dict[str, StationSupervisor] = {}
        for sup in items:
            if sup.station in self.supervisors:
                raise ValueError(f"station {sup.station!r} given twice")
            self.supervisors[sup.station] = sup
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        default = max((s.safe_timeout for s in self.supervisors.values()), default=0.0) + 1.0
        self.timeout = default if timeout is None else float(timeout)
        #: every e-stop call, oldest first
        self.history: list[EStopReport] = []

    @property
    def tripped(self) -> bool:
        """Every station is latched."""
        return all(s.latch.tripped for s in self.supervisors.values())

    async def estop(self, reason: str, who: str = "operator") -> EStopReport:
        """Trip every station concurrently; never raises because an instrument failed."""
        t0 = time.monotonic()
        report = EStopReport(reason, who)
        text = f"e-stop by {who}: {reason}"
        log.critical("E-STOP by %s: %s", who, reason)
        tasks = {
            name: asyncio.create_task(sup.trip(text, "estop", who=who), name=f"estop-{name}")
            for name, sup in self.supervisors.items()
        }
        if tasks:
            await asyncio.wait(tasks.values(), timeout=self.timeout)
        for name, task in tasks.items():
            if not task.done():
                # the station's safe state goes on (it is shielded); we stop waiting for it
                task.cancel()
                report.errors[name] = f"trip did not finish within {self.timeout:g} s"
                continue
            if task.cancelled():
                report.errors[name] = "trip was cancelled"
                continue
            exc = task.exception()
            if exc is not None:
                report.errors[name] = f"trip failed: {exc!r}"
                continue
            report.stations[name] = task.result()
        report.elapsed_s = time.monotonic() - t0
        self.history.append(report)
        if report.ok:
            log.warning("%s", report.summary())
        else:
            log.error("%s", report.summary())
        return report

    async def __call__(self, reason: str, who: str = "operator") -> EStopReport:
        return await self.estop(reason, who)


OnDone = Callable[[EStopReport | None], Any]


class SignalHandlers:
    """SIGINT/SIGTERM handlers installed on a loop by :func:`install_signal_handlers`.

    The first signal starts ``estop("signal SIGTERM", who="signal")`` as
    :attr:`task`; later signals are logged and ignored (the e-stop is already
    running or done). :meth:`remove` restores the previous handlers.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        estop: EStop,
        on_done: OnDone | None,
        signals: Iterable[signal.Signals],
    ) -> None:
        self.loop = loop
        self.estop = estop
        self.on_done = on_done
        self.signals = tuple(signals)
        self.task: asyncio.Task[EStopReport | None] | None = None
        #: the name of the signal that fired (``SIGTERM``), or None
        self.fired: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            self.loop.add_signal_handler(sig, self._handle, sig)
        self._installed = True

    def remove(self) -> None:
        """Remove our handlers and put the previous Python-level ones back (idempotent)."""
        if not self._installed:
            return
        self._installed = False
        for sig in self.signals:
            self.loop.remove_signal_handler(sig)
            previous = self._previous.get(sig)
            if previous is not None:
                signal.signal(sig, previous)

    def _handle(self, sig: signal.Signals) -> None:
        name = signal.Signals(sig).name
        if self.task is not None:
            log.warning("%s received again: the e-stop already ran (%s)", name, self.fired)
            return
        self.fired = name
        self.task = self.loop.create_task(self._run(name), name=f"estop-{name}")

    async def _run(self, name: str) -> EStopReport | None:
        report: EStopReport | None = None
        try:
            report = await self.estop.estop(f"signal {name}", who="signal")
        except Exception:
            log.exception("e-stop on %s failed", name)
        if self.on_done is not None:
            result = self.on_done(report)
            if inspect.isawaitable(result):
                await result
        return report

    async def wait(self) -> EStopReport | None:
        """The report of the e-stop a signal started (waits for it; None if none fired)."""
        return None if self.task is None else await self.task


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    estop: EStop,
    on_done: OnDone | None = None,
    *,
    signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> SignalHandlers:
    """SIGINT and SIGTERM run ``estop("signal <NAME>")`` once, then ``on_done(report)``.

    ``on_done`` (sync or async) is where the application shuts down; the
    report is None if the e-stop itself raised. Returns the handlers; call
    ``remove()`` to restore the previous ones. Main thread, Unix event loops.
    """
    handlers = SignalHandlers(loop, estop, on_done, signals)
    handlers.install()
    return handlers


__all__ = ["EStop", "EStopReport", "SignalHandlers", "install_signal_handlers"]
