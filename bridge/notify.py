"""Notifications: people are told when the lab needs them, and the lab never waits for it.

:class:`Notifier` listens to a :class:`~bridge.service.LabService` (its listener only puts
the event on a bounded queue) and watches its stations (every ``station_poll_s``: a station
that tripped, one the service lost). A router task turns events into alerts
(:func:`bridge.notifysend.alert_for`), filters them per channel (event kinds, stations),
rate-limits them per channel and kind, and puts each on its channel's bounded queue; one
worker task per channel delivers (:mod:`bridge.notifysend`: webhook, e-mail, MQTT), retrying
a failed attempt with backoff (``retry_s`` doubling up to ``retry_max_s``, ``attempts`` at
most). So a dead mail server delays nothing but its own mail.

Rate limit, per channel and kind: the first alert after a quiet ``rate_limit_s`` goes at
once; those arriving within the window are held and go out together when it ends, as one
message saying how many were folded (:func:`bridge.notifysend.fold`).

Nothing is lost silently: an alert dropped (a queue full, its attempts spent, refused, or
still waiting at shutdown) is counted (:attr:`Notifier.counts`) and logged with one line
that says why.

:func:`notifications` runs one for a service while a block runs (``labbridge serve`` and
``labbridge sim`` use it, see :func:`bridge.mqttserve.serve`); lab.yaml's ``notifications:``
is :mod:`bridge.notifyconfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bridge.mqttlink import MqttLink
from bridge.notifyconfig import NotifyConfig
from bridge.notifysend import (
    Alert,
    Channel,
    DeliveryFailed,
    alert_for,
    close_channels,
    fold,
    make_channels,
)

log = logging.getLogger(__name__)

__all__ = ["ChannelCounts", "Notifier", "notifications", "recording_url"]

#: how long closing waits for the queued alerts to go out before it drops them (s)
DRAIN_S = 5.0
#: events from the service waiting for the router (more are dropped: counted and logged)
INTAKE_SIZE = 1000


@dataclass
class ChannelCounts:
    """What one channel did: messages delivered, alerts folded into them, attempts that
    failed (and were retried or not), alerts dropped (with the last reason)."""

    sent: int = 0
    folded: int = 0
    failed_attempts: int = 0
    dropped: int = 0
    last_error: str | None = None
    #: the alerts delivered, newest last (the last 50: for tests and status displays)
    delivered: list[Alert] = field(default_factory=list)


@dataclass
class _Window:
    """One channel and kind's rate limit: closed until ``until`` (loop time), alerts held."""

    until: float = 0.0
    held: list[Alert] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Notifier:
    """The notifications of one lab service (see the module docstring).

    ``link``: the service's MQTT link (None: no MQTT alerts); ``page_url``: the lab page's
    URL now (None: unknown), used when lab.yaml gives no ``page_url``; ``channels``: instead
    of those of ``config`` (tests).
    """

    def __init__(
        self,
        config: NotifyConfig,
        bridge_id: str,
        *,
        link: MqttLink | None = None,
        page_url: Callable[[], str | None] | None = None,
        channels: Sequence[Channel] | None = None,
    ) -> None:
        self.config = config
        self.bridge_id = bridge_id
        self._page_url = page_url
        self.channels = list(channels) if channels is not None else make_channels(config, link)
        self.counts = {c.name: ChannelCounts() for c in self.channels}
        #: events the service sent that never reached the router (intake full)
        self.intake_dropped = 0
        self._intake: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue(INTAKE_SIZE)
        self._queues: dict[str, asyncio.Queue[Alert]] = {
            c.name: asyncio.Queue(config.queue_size) for c in self.channels
        }
        self._windows: dict[tuple[str, str], _Window] = {}
        self._campaigns: dict[str, tuple[str, ...]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[str, Alert | None] = {c.name: None for c in self.channels}
        self._service: Any = None
        self._remove: Callable[[], None] | None = None
        self._stations: dict[str, dict[str, Any]] = {}
        self._closed = False

    # --------------------------------------------------------------- life cycle
    async def start(self, service: Any = None) -> None:
        """Open the channels and start the tasks; with ``service`` (a LabService), listen to
        it and watch its stations."""
        for channel in self.channels:
            await channel.open()
        self._tasks.append(asyncio.create_task(self._route(), name="notify-router"))
        for channel in self.channels:
            self._tasks.append(
                asyncio.create_task(self._work(channel), name=f"notify-{channel.name}")
            )
        if service is not None:
            self._service = service
            self._remove = service.add_listener(self.on_event)
            self._tasks.append(asyncio.create_task(self._watch(), name="notify-stations"))

    async def close(self, drain_s: float = DRAIN_S) -> None:
        """Stop listening, send what the rate limits hold, wait up to ``drain_s`` for the
        queues to empty, then stop; what is still undelivered is dropped (counted, logged)."""
        if self._closed:
            return
        self._closed = True
        if self._remove is not None:
            self._remove()
            self._remove = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                if self._service is not None:  # a trip since the last look is still told
                    await self._look_all()
                await self._intake.join()  # the router takes what the service sent
                for key in list(self._windows):
                    self._flush(key)
                for q in self._queues.values():
                    await q.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for window in self._windows.values():
            if window.timer is not None:
                window.timer.cancel()
        left = self._intake.qsize()
        if left:
            self.intake_dropped += left
            log.error("notifications: %d event(s) not routed at shutdown (dropped)", left)
        for channel in self.channels:
            q, busy = self._queues[channel.name], self._busy[channel.name]
            left_alerts = [*([busy] if busy is not None else [])]
            while not q.empty():
                left_alerts.append(q.get_nowait())
            lost = sum(max(1, a.folded) for a in left_alerts)
            lost += sum(len(w.held) for (n, _), w in self._windows.items() if n == channel.name)
            if lost:
                self._drop(channel.name, lost, "still undelivered at shutdown")
        await close_channels(self.channels)

    # ------------------------------------------------------------------ intake
    def on_event(self, event: Mapping[str, Any]) -> None:
        """The service's listener: only enqueues (a full intake drops, counted and logged)."""
        try:
            self._intake.put_nowait(event)
        except asyncio.QueueFull:
            self.intake_dropped += 1
            log.error(
                "notifications: dropped a %s event: %d events wait for the router already",
                event.get("event"),
                INTAKE_SIZE,
            )

    def page_url(self) -> str | None:
        if self.config.page_url:
            return self.config.page_url
        return self._page_url() if self._page_url is not None else None

    def _link(self, alert: Alert) -> Alert:
        base = self.page_url()
        url = f"{base.rstrip('/')}/{alert.view}" if base else None
        return replace(alert, bridge_id=self.bridge_id, url=url)

    async def _route(self) -> None:
        while True:
            event = await self._intake.get()
            try:
                self._route_one(event)
            except Exception:  # a bad event must not stop the notifications
                log.exception("notifications: could not route %r", event.get("event"))
            finally:
                self._intake.task_done()

    def _route_one(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "campaign" and event.get("stations"):
            self._campaigns[str(event.get("campaign_id"))] = tuple(event["stations"])
        if event.get("event") == "estop":  # its trips are the e-stop's alert, not new trips
            for name in event.get("stations") or {}:
                self._stations.setdefault(str(name), {})["tripped"] = True
        alert = alert_for(event, self._campaigns, self.config.verification_failures)
        if alert is None:
            return
        for channel in self.channels:
            if channel.config.wants(alert.kind, alert.stations):
                self._limit(channel.name, alert)

    # -------------------------------------------------------------- rate limit
    def _limit(self, name: str, alert: Alert) -> None:
        key = (name, alert.kind)
        window = self._windows.setdefault(key, _Window())
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.config.rate_limit_s <= 0 or (now >= window.until and not window.held):
            window.until = now + self.config.rate_limit_s
            self._enqueue(name, alert)
            return
        window.held.append(alert)
        if window.timer is None:
            window.timer = loop.call_at(window.until, self._flush, key)

    def _flush(self, key: tuple[str, str]) -> None:
        window = self._windows[key]
        if window.timer is not None:
            window.timer.cancel()
            window.timer = None
        if not window.held:
            return
        held, window.held = window.held, []
        window.until = asyncio.get_running_loop().time() + self.config.rate_limit_s
        self._enqueue(key[0], fold(held))

    def _enqueue(self, name: str, alert: Alert) -> None:
        try:
            self._queues[name].put_nowait(self._link(alert))
        except asyncio.QueueFull:
            self._drop(
                name,
                max(1, alert.folded),
                f"its queue is full ({self.config.queue_size} waiting): {alert.kind} alert "
                f"not sent: {alert.title}",
            )

    def _drop(self, name: str, n: int, why: str) -> None:
        counts = self.counts[name]
        counts.dropped += n
        counts.last_error = why
        log.error("notifications: %s: %d alert(s) dropped: %s", name, n, why)

    # ---------------------------------------------------------------- delivery
    async def _work(self, channel: Channel) -> None:
        q, counts = self._queues[channel.name], self.counts[channel.name]
        cfg = self.config
        while True:
            alert = await q.get()
            self._busy[channel.name] = alert
            delay = cfg.retry_s
            for attempt in range(1, cfg.attempts + 1):
                try:
                    async with asyncio.timeout(cfg.timeout_s + 1.0):
                        await channel.deliver(alert)
                except (DeliveryFailed, TimeoutError) as exc:
                    reason = str(exc) or f"no answer within {cfg.timeout_s:g} s"
                    retry = getattr(exc, "retry", True)
                    counts.failed_attempts += 1
                    counts.last_error = reason
                    if not retry or attempt == cfg.attempts:
                        spent = f"after {attempt} attempt(s)" if retry else "not retried"
                        self._drop(
                            channel.name,
                            max(1, alert.folded),
                            f"{alert.kind} alert {spent}: {reason}",
                        )
                        break
                    log.warning(
                        "notifications: %s: attempt %d of %d failed: %s; retrying in %g s",
                        channel.name,
                        attempt,
                        cfg.attempts,
                        reason,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, cfg.retry_max_s)
                except Exception as exc:  # a bug in a channel: dropped with its reason
                    counts.failed_attempts += 1
                    self._drop(channel.name, max(1, alert.folded), f"{type(exc).__name__}: {exc}")
                    log.exception("notifications: %s failed", channel.name)
                    break
                else:
                    counts.sent += 1
                    counts.folded += alert.folded
                    counts.delivered = [*counts.delivered[-49:], alert]
                    log.info(
                        "notifications: %s: sent %s: %s", channel.name, alert.kind, alert.title
                    )
                    break
            self._busy[channel.name] = None
            q.task_done()

    # ---------------------------------------------------------------- stations
    async def _watch(self) -> None:
        """Every ``station_poll_s`` (and once more on closing): a station newly tripped (by a
        monitor, a lost lease, a failed experiment; not by an e-stop, an abort or a failed
        campaign: those have alerts of their own) or no longer answering becomes an event."""
        while True:
            await asyncio.sleep(self.config.station_poll_s)
            if self._service.state == "online":
                await self._look_all()

    async def _look_all(self) -> None:
        if not self._service.actors:  # closed: no station to look at
            return
        try:
            status = await self._service.status()
        except Exception as exc:  # the next look may work; the service logs its own
            log.warning("notifications: station status failed: %s", exc)
            return
        for name, st in (status.get("stations") or {}).items():
            self._look(str(name), st)

    def _look(self, name: str, st: Mapping[str, Any]) -> None:
        before = self._stations.setdefault(name, {"ok": True, "tripped": False})
        if not st.get("ok", True):
            if before.get("ok", True):
                self.on_event({"event": "_lost", "station": name, "reason": st.get("error")})
            before["ok"] = False
            return
        before["ok"] = True
        tripped = bool(st.get("tripped"))
        if tripped and not before.get("tripped"):
            trip = st.get("trip") or {}
            reason = str(trip.get("reason") or "latched")
            # an e-stop, an abort or a failed campaign tripped it: that has its own alert
            by_request = trip.get("source") in ("api", "estop") or reason.startswith("e-stop by ")
            if not by_request:
                self.on_event({"event": "_tripped", "station": name, "reason": reason})
        before["tripped"] = tripped


@contextlib.asynccontextmanager
async def notifications(
    config: NotifyConfig | None,
    service: Any,
    bridge_id: str,
    *,
    link: MqttLink | None = None,
    page_url: Callable[[], str | None] | None = None,
) -> AsyncIterator[Notifier | None]:
    """A :class:`Notifier` for ``service`` while the block runs (None when ``config`` is)."""
    if config is None:
        yield None
        return
    notifier = Notifier(config, bridge_id, link=link, page_url=page_url)
    await notifier.start(service)
    try:
        yield notifier
    finally:
        await notifier.close()


@contextlib.asynccontextmanager
async def recording_url(
    front: contextlib.AbstractAsyncContextManager[str], into: list[str]
) -> AsyncIterator[str]:
    """Enter ``front`` (the lab page: it yields its URL) and append that URL to ``into``."""
    async with front as url:
        into.append(url)
        yield url
