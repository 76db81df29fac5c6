"""Live updates for the lab page: the service's events, fanned out to every open page.

:class:`PageEvents` listens to the :class:`~bridge.service.LabService` (its campaign runner
events: ``proposed``, ``started``, ``finished``, ``failed``, ``rejected``, ``station``, ...,
and its own ``campaign``, ``estop``, ``reset``) and hands each, as plain JSON-able data, to
every subscriber (one per server-sent event stream). While at least one page is open it
also polls the stations once per ``interval_s`` (the supervisors' latest readings and each
station's status: cheap calls to the station actors, no I/O to any device) and sends
``stations`` when something changed, so readings update without any page asking:
one poller for all pages, however many are open.

A page that falls behind (its queue of :data:`QUEUE_SIZE` messages full) is not waited
for: it gets ``resync`` and its stream ends; the browser reconnects and reloads. Nothing
here ever blocks the service: listeners are called on the event loop and only enqueue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from bridge.service import LabService
from instruments.deadline import bounded

log = logging.getLogger(__name__)

__all__ = ["QUEUE_SIZE", "PageEvents", "plain"]

#: messages one page may have waiting before it is told to resync
QUEUE_SIZE = 256
#: refusals, trips, proposals awaiting approval, e-stops and resets the lab view lists
ALERTS = 20
_CLOSE = {"kind": "_close"}


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-able data (numpy scalars, tuples, non-finite floats as None)."""
    if depth > 32:
        return None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v, depth + 1) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        with contextlib.suppress(Exception):
            return plain(item(), depth + 1)
    return str(value)


class PageEvents:
    """The fan-out of one service's events to the open pages (see the module docstring)."""

    def __init__(self, service: LabService, *, interval_s: float = 1.0) -> None:
        self.service = service
        self.interval_s = interval_s
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._remove: Any = None
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._last_stations: Any = None
        #: the newest outcome frame of each station seen (station -> experiment id, t)
        self.frames: dict[str, dict[str, Any]] = {}
        #: the latest refusals, failures, trips, e-stops and resets, newest last
        self.alerts: deque[dict[str, Any]] = deque(maxlen=ALERTS)
        #: messages sent (for tests and the benchmark)
        self.sent = 0

    def start(self) -> None:
        self._remove = self.service.add_listener(self._on_event)
        self._poller = asyncio.create_task(self._poll(), name="lab-page-poller")

    async def close(self) -> None:
        """End every stream (each gets its end), stop polling, stop listening."""
        self._closed = True
        if self._remove is not None:
            self._remove()
            self._remove = None
        for q in list(self._queues):
            self._put(q, _CLOSE, force=True)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    # ---------------------------------------------------------------- fan-out
    def _put(
        self, q: asyncio.Queue[dict[str, Any]], message: dict[str, Any], force: bool = False
    ) -> None:
        try:
            q.put_nowait(message)
        except asyncio.QueueFull:
            while not q.empty():  # behind: drop what it has, tell it to start over
                q.get_nowait()
            q.put_nowait({"kind": "resync", "why": "this page fell behind the lab's events"})
            q.put_nowait(_CLOSE)
            if not force:
                self._queues.discard(q)

    def publish(self, message: dict[str, Any]) -> None:
        """Send ``message`` (plain data with a ``kind``) to every open page."""
        for q in list(self._queues):
            self._put(q, message)
        self.sent += len(self._queues)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("event") or "event")
        message = plain({k: v for k, v in event.items() if k != "event"})
        message["kind"] = kind
        message["t"] = time.time()
        if kind == "finished":
            images = event.get("images") or {}
            if "outcome" in images and event.get("station"):
                self.frames[str(event["station"])] = {
                    "experiment_id": event.get("experiment_id"),
                    "campaign_id": event.get("campaign_id"),
                    "t": message["t"],
                }
        alert = _alert(kind, message)
        if alert is not None:
            self.alerts.append(alert)
        self.publish(message)
        if kind in ("estop", "reset", "station", "campaign", "started", "finished", "failed"):
            self._wake.set()  # the stations' picture changed: send it now

    # ---------------------------------------------------------------- streams
    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of this page's messages while the block runs (the first is ``hello``)."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=QUEUE_SIZE)
        if self._closed:
            q.put_nowait(_CLOSE)
        else:
            self._queues.add(q)
            self._wake.set()
        try:
            yield q
        finally:
            self._queues.discard(q)

    @staticmethod
    def is_end(message: Mapping[str, Any]) -> bool:
        return message is _CLOSE

    @property
    def pages(self) -> int:
        """Pages connected now."""
        return len(self._queues)

    # ---------------------------------------------------------------- polling
    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await bounded(self._wake.wait(), self.interval_s)
            self._wake.clear()
            if not self._queues or self.service.state != "online":
                self._last_stations = None
                continue
            try:
                snapshot = await self.stations()
            except Exception as exc:  # a station that does not answer is shown, not fatal
                log.warning("lab page: station snapshot failed: %s", exc)
                continue
            if snapshot != self._last_stations:
                self._trips(self._last_stations or {}, snapshot)
                self._last_stations = snapshot
                self.publish({"kind": "stations", "stations": snapshot, "t": time.time()})

    def _trips(self, before: Mapping[str, Any], now: Mapping[str, Any]) -> None:
        """A station that tripped since the last snapshot (a monitor, not an e-stop) is an
        alert too."""
        for name, st in now.items():
            if st.get("tripped") and not (before.get(name) or {}).get("tripped", True):
                trip = st.get("trip") or {}
                alert = {
                    "kind": "trip",
                    "station": name,
                    "t": time.time(),
                    "text": f"station {name} tripped: {trip.get('reason') or 'latched'}",
                }
                self.alerts.append(alert)
                self.publish({**alert, "kind": "alert", "alert": alert})

    async def stations(self) -> dict[str, Any]:
        """Every station's status and live readings (plain data)."""
        status = await self.service.status()
        out: dict[str, Any] = {}
        names = list(status["stations"])
        readings = await asyncio.gather(
            *(self.service.readings(n) for n in names), return_exceptions=True
        )
        for name, r in zip(names, readings, strict=True):
            st = dict(status["stations"][name])
            if isinstance(r, BaseException):
                st["readings_error"] = str(r)
            else:
                st["measured"] = {
                    k: {"value": v.get("value"), "age_s": round(float(v.get("age_s") or 0.0), 1)}
                    for k, v in r["measured"].items()
                }
                st["commanded"] = r["commanded"]
                st["monitors"] = r["monitors"]
            if st.get("experiment"):  # running experiment N at step k of n
                with contextlib.suppress(Exception):
                    exp = await self.service.experiment(str(st["experiment"]))
                    st["step"] = exp.step
                    st["steps"] = len((exp.recipe or {}).get("steps") or [])
            out[name] = plain(st)
        return out


def _alert(kind: str, m: Mapping[str, Any]) -> dict[str, Any] | None:
    """The line the lab view lists for an event worth a person's attention, or None."""
    eid = m.get("experiment_id")
    if kind == "rejected":
        why = "; ".join(str(r) for r in m.get("reasons") or []) or m.get("reason") or "?"
        text = f"proposal {eid} by {m.get('proposer') or '?'} refused: {why}"
    elif kind == "failed":
        text = f"experiment {eid} on {m.get('station') or '?'} failed: {m.get('reason') or '?'}"
    elif kind == "unverified":
        text = f"station {m.get('station')}: result not verified: {m.get('reason') or '?'}"
    elif kind == "station" and m.get("state") == "out":
        text = f"station {m.get('station')} is out of the campaign: {m.get('reason') or '?'}"
    elif kind == "station" and m.get("state") == "rejoined":
        text = f"station {m.get('station')} rejoined the campaign: {m.get('reason') or '?'}"
    elif kind == "awaiting_approval":
        rules = "; ".join(str(r) for r in m.get("rules") or []) or "?"
        text = f"proposal {eid} by {m.get('proposer') or '?'} awaits approval: {rules}"
    elif kind == "approval" and m.get("decision") == "expired":
        text = f"proposal {eid} by {m.get('proposer') or '?'}: {m.get('reason') or 'expired'}"
    elif kind == "estop":
        text = f"e-stop by {m.get('who')}: {m.get('reason')}"
    elif kind == "reset":
        ok = [n for n, s in (m.get("stations") or {}).items() if s.get("ok")]
        text = f"reset by {m.get('who')} ({m.get('why')}): {', '.join(ok) or 'nothing'} reset"
    else:
        return None
    return {
        "kind": kind,
        "t": m.get("t") or time.time(),
        "text": text,
        "station": m.get("station"),
        "campaign_id": m.get("campaign_id"),
        "experiment_id": eid,
    }
