"""One MQTT client over paho-mqtt 2.x, below both the MQTT transport and the bridge's campaign API.

:class:`MqttSettings` (in :mod:`.mqttdata`, re-exported here with the other data types)
says where the broker is and how to log in (host, port, TLS, user and password source,
client id, keepalive, MQTT version, session, Last Will); :class:`MqttClient` is one paho
client on those settings (built and connected by :mod:`.mqttconnect`):
``connect``/``disconnect``, ``publish`` (v5 properties, QoS 1/2 acknowledged),
``subscribe`` onto asyncio queues, automatic reconnects that subscribe again.
Two users build on it: :class:`~instruments.transports.mqtt.MqttTransport`
(``mqtt://`` URLs, a topic prefix, the enclosure driver) and the bridge's
campaign API link (``bridge/mqttlink.py``, settings from lab.yaml).

Why here: this module, its parts (``mqttdata.py``, ``mqttconnect.py``) and ``mqtt.py``
are the only ones that import paho (import-linter: "paho only in the MQTT transport"). ``bridge`` may not import
``instruments.transports`` ("Nothing above safety/ holds a driver"), with one
exception written into that contract: ``bridge.mqttlink`` imports this module.
It holds no driver and no transport, only a broker link, so the guard is not
bypassed; a copy of the client in ``bridge`` would be the alternative.

Threads: paho runs its network loop on its own thread (``loop_start``). Its
callbacks only convert data and hand it to the event loop with
``loop.call_soon_threadsafe``; no user code ever runs on paho's thread. The
blocking parts (TCP/TLS connect, joining paho's thread) run on this client's
:class:`DeviceWorker`. ``publish``/``subscribe`` call paho directly: with the
network thread running they only queue a packet and wake that thread.
TCP_NODELAY is set on the socket (NOTES.md: Nagle + delayed ACK add ~40 ms to
a command and its ack).

After a dropped link paho reconnects by itself (back-off ``reconnect_min_s`` ..
``reconnect_max_s``), and every active subscription is subscribed again on
paho's thread in ``on_connect``. ``connected`` (an :class:`asyncio.Event`) and
:meth:`MqttClient.on_connection_change` report the link state.

Topics: with a ``prefix``, ``publish("a/b")`` goes to ``<prefix>/a/b``; a topic
starting with ``/`` is absolute (``"/other/x"`` is ``other/x``; ``"//x"`` is the
broker topic ``/x``). Received messages carry both forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from instruments.deadline import bounded
from instruments.errors import LinkLostError, TransportError, TransportOpenError, TransportTimeout
from instruments.transports.base import DeviceWorker
from instruments.transports.mqttconnect import (
    UNSUPPORTED_PROTOCOL,
    ConnectFailed,
    connect_blocking,
    new_client,
    refusal_text,
    stop_client_blocking,
)
from instruments.transports.mqttdata import (
    PROTOCOLS,
    MqttMessage,
    MqttSettings,
    MqttWill,
    Payload,
    check_qos,
    properties_from_dict,
    properties_to_dict,
)

log = logging.getLogger(__name__)


@dataclass
class _Subscription:
    qos: int
    sid: int  # MQTT v5 subscription identifier (routes overlapping filters exactly)
    queues: list[asyncio.Queue[MqttMessage]]


class MqttClient:
    """One paho client on :class:`MqttSettings`: connect, publish, subscribe onto queues, reconnects.

    ``prefix`` is the topic prefix (see the module docstring); ``name`` names
    the link in errors and logs (default ``settings.url``). Messages that match
    no subscription (a persistent session's queued messages, delivered before
    the subscriptions are made again) go to ``unrouted`` if it is set.
    """

    def __init__(
        self, settings: MqttSettings, *, prefix: str = "", name: str | None = None
    ) -> None:
        self.settings = settings
        self.prefix = prefix
        self.name = name or settings.url
        self.client_id = settings.client_id or f"labbridge-{secrets.token_hex(4)}"
        #: set while connected to the broker (cleared during automatic reconnects)
        self.connected = asyncio.Event()
        #: the MQTT version in use once connected: "5" or "3.1.1"
        self.protocol: str | None = None
        self.reconnects = 0
        self.unrouted: asyncio.Queue[MqttMessage] | None = None
        self._client: paho.Client | None = None
        self._worker: DeviceWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._subs: dict[str, _Subscription] = {}
        # filter -> (qos, subscription id): what paho's thread re-subscribes on connect
        self._sub_qos: dict[str, tuple[int, int]] = {}
        self._next_sid = 1
        self._sub_lock = threading.Lock()
        self._pending_pub: dict[int, asyncio.Future[ReasonCode]] = {}
        self._pending_sub: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._listeners: list[Callable[[bool], None]] = []

    # --------------------------------------------------------------- topics
    def topic(self, topic: str) -> str:
        """The absolute broker topic for ``topic`` (relative to the prefix unless it starts with ``/``)."""
        if topic.startswith("/"):
            absolute = topic[1:]
        elif self.prefix:
            absolute = f"{self.prefix}/{topic}" if topic else self.prefix
        else:
            absolute = topic
        if not absolute:
            raise ValueError(f"{self.name}: empty topic")
        return absolute

    def relative(self, absolute: str) -> str:
        """Inverse of :meth:`topic`: relative to the prefix, or ``/`` + absolute outside it."""
        if not self.prefix:
            return "/" + absolute if absolute.startswith("/") else absolute
        if absolute.startswith(self.prefix + "/"):
            return absolute[len(self.prefix) + 1 :]
        return "/" + absolute

    # ------------------------------------------------------------ the will
    def set_will(self, topic: str, payload: Payload, qos: int = 1, retain: bool = True) -> None:
        """Last Will: published by the broker if this link dies without a DISCONNECT. Call before connecting."""
        if self._client is not None:
            raise TransportError(self.name, "set_will() must be called before open()")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        will = MqttWill(self.topic(topic), data, check_qos(qos), retain)
        self.settings = replace(self.settings, will=will)

    # --------------------------------------------------------- connection
    def on_connection_change(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``callback(connected)`` on the event loop at every (re)connect and drop.

        Returns a function that removes the callback.
        """
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def _build_client(self, protocol: str) -> paho.Client:
        """Create and configure the paho client (runs on the worker: reads CA/password files)."""
        client = new_client(self.settings, self.client_id, protocol, self.name)
        client.on_connect = self._paho_on_connect
        client.on_disconnect = self._paho_on_disconnect
        client.on_message = self._paho_on_message
        client.on_publish = self._paho_on_publish
        client.on_subscribe = self._paho_on_subscribe
        return client

    async def connect(self) -> None:
        """Connect (v5, falling back to 3.1.1 under ``protocol="auto"``); waits for the CONNACK.

        Raises :class:`TransportOpenError` naming the broker and what went wrong
        (unreachable, TLS, credentials refused, no CONNACK).
        """
        self._loop = asyncio.get_running_loop()
        self._worker = DeviceWorker(f"mqtt-{self.client_id}")
        wanted = self.settings.protocol
        protocols = ["5", "3.1.1"] if wanted == "auto" else [wanted]
        try:
            for i, protocol in enumerate(protocols):
                reason = await self._try_connect(protocol)
                if reason.value == UNSUPPORTED_PROTOCOL and i + 1 < len(protocols):
                    log.info(
                        "%s: broker refused MQTT v%s, trying v%s",
                        self.name,
                        protocol,
                        protocols[i + 1],
                    )
                    await self._drop_client()
                    continue
                if reason.is_failure:
                    await self._drop_client()
                    raise TransportOpenError(
                        self.name, refusal_text(self.settings, reason, protocol)
                    )
                self.protocol = protocol
                break
        except BaseException:
            await self._drop_client()
            await self._stop_worker()
            raise
        log.info("%s: connected (MQTT %s, client id %s)", self.name, self.protocol, self.client_id)

    async def _try_connect(self, protocol: str) -> ReasonCode:
        """One connection attempt; returns the CONNACK reason (success or refusal)."""
        assert self._worker is not None and self._loop is not None
        s = self.settings
        client = await self._worker.run(
            self._build_client, protocol, timeout=s.timeout_s, url=self.name
        )
        self._client = client
        self._connack = self._loop.create_future()
        try:
            await self._worker.run(
                connect_blocking, client, s, protocol, timeout=s.timeout_s + 1.0, url=self.name
            )
        except TransportTimeout:
            raise TransportOpenError(
                self.name, f"no connection to {s.host}:{s.port} within {s.timeout_s:g} s"
            ) from None
        except ConnectFailed as exc:
            raise TransportOpenError(
                self.name, f"{exc.what} {s.host}:{s.port}: {exc.detail}"
            ) from None
        try:
            return await bounded(asyncio.shield(self._connack), s.timeout_s)
        except TimeoutError:
            raise TransportOpenError(
                self.name, f"no CONNACK from the broker within {s.timeout_s:g} s"
            ) from None

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._worker is not None:
            try:
                await self._worker.run(
                    stop_client_blocking,
                    client,
                    timeout=self.settings.timeout_s + 2.0,
                    url=self.name,
                )
            except TransportTimeout:
                log.error("%s: paho's network thread did not stop in time", self.name)
        self._set_connected(False, notify=False)

    async def disconnect(self) -> None:
        """Disconnect cleanly (the broker does not publish the Last Will) and stop the threads.

        Subscriptions are kept: after a new :meth:`connect` the same queues keep
        receiving (they are subscribed again on connect).
        """
        await self._drop_client()
        error = LinkLostError(self.name, "transport closed")
        for futs in (self._pending_pub, self._pending_sub):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()  # retrieved: no "never retrieved" warning if nobody awaits it
            futs.clear()
        await self._stop_worker()
        log.info("%s: closed", self.name)

    async def _stop_worker(self) -> None:
        if self._worker is not None:
            await self._worker.aclose()
            self._worker = None

    # -------------------------------------------------- paho's thread side
    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(fn, *args)

    def _paho_on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if not reason.is_failure:
            with self._sub_lock:
                subs = list(self._sub_qos.items())
            # Subscribe again after a reconnect (the broker's session may be gone).
            if subs and client.protocol == paho.MQTTv5:
                for flt, (qos, sid) in subs:
                    client.subscribe(
                        flt, options=self._sub_options(qos), properties=self._sid_properties(sid)
                    )
            elif subs:
                client.subscribe([(flt, qos) for flt, (qos, _sid) in subs])
        self._to_loop(self._on_connack, client, reason)

    def _sub_options(self, qos: int) -> SubscribeOptions:
        return SubscribeOptions(qos=qos, retainAsPublished=self.settings.retain_as_published)

    @staticmethod
    def _sid_properties(sid: int) -> Properties:
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = sid
        return props

    def _paho_on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._on_disconnected, client, reason)

    def _paho_on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        absolute = message.topic
        raw_props = getattr(message, "properties", None)
        sids = getattr(raw_props, "SubscriptionIdentifier", None) if raw_props is not None else None
        msg = MqttMessage(
            topic=self.relative(absolute),
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            properties=properties_to_dict(raw_props),
            absolute_topic=absolute,
            received=time.monotonic(),
        )
        self._to_loop(self._dispatch, msg, list(sids) if sids else None)

    def _paho_on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._on_published, mid, reason)

    def _paho_on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        self._to_loop(self._on_subscribed, mid, list(reasons))

    # ------------------------------------------------- event-loop side
    def _set_connected(self, connected: bool, notify: bool = True) -> None:
        was = self.connected.is_set()
        if connected:
            self.connected.set()
        else:
            self.connected.clear()
        if notify and was != connected:
            for cb in list(self._listeners):
                try:
                    cb(connected)
                except Exception:  # a listener's bug must not break the link
                    log.exception("%s: connection listener %r failed", self.name, cb)

    def _on_connack(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:  # a callback of a client we already dropped
            return
        first = self._connack is not None and not self._connack.done()
        if first:
            assert self._connack is not None
            self._connack.set_result(reason)
        if reason.is_failure:
            if not first:
                log.error("%s: reconnect refused by the broker: %s", self.name, reason)
            return
        if not first:
            self.reconnects += 1
            log.warning(
                "%s: reconnected to the broker (re-subscribed %d filters)",
                self.name,
                len(self._subs),
            )
        self._set_connected(True)

    def _on_disconnected(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:  # our own close, or a dropped client
            return
        if self.connected.is_set():
            log.warning("%s: link to the broker lost (%s); reconnecting", self.name, reason)
        self._set_connected(False)

    def _dispatch(self, msg: MqttMessage, sids: list[int] | None) -> None:
        """Put ``msg`` once on every queue with a filter matching its topic.

        A broker sends one copy per matching subscription. MQTT v5 copies carry
        subscription identifiers: a queue takes the copy tagged with the lowest
        identifier among its matching filters, so it gets each message once.
        3.1.1 copies carry nothing: with overlapping filters (on one queue or
        not) the broker's copies all reach the queue. A copy tagged only with
        identifiers of an earlier session (a persistent session's queued
        message) is routed by its topic alone. A message no filter matches goes
        to :attr:`unrouted` if it is set.
        """
        canonical: dict[int, tuple[int, asyncio.Queue[MqttMessage]]] = {}
        known: set[int] = set()
        for flt, sub in list(self._subs.items()):
            if not paho.topic_matches_sub(flt, msg.absolute_topic):
                continue
            known.add(sub.sid)
            for q in sub.queues:
                best = canonical.get(id(q))
                if best is None or sub.sid < best[0]:
                    canonical[id(q)] = (sub.sid, q)
        if not canonical:
            if self.unrouted is not None:
                self.unrouted.put_nowait(msg)
            return
        if sids is not None and not known.intersection(sids):
            sids = None
        for sid, q in canonical.values():
            if sids is None or sid in sids:
                q.put_nowait(msg)

    def _on_published(self, mid: int, reason: ReasonCode) -> None:
        fut = self._pending_pub.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _on_subscribed(self, mid: int, reasons: list[ReasonCode]) -> None:
        fut = self._pending_sub.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reasons)

    # --------------------------------------------------------------- API
    async def _wait_connected(self, what: str) -> paho.Client:
        if self._client is None:
            raise LinkLostError(self.name, f"cannot {what}: the transport is not open")
        if not self.connected.is_set():
            timeout = self.settings.timeout_s
            try:
                await bounded(self.connected.wait(), timeout)
            except TimeoutError:
                raise LinkLostError(
                    self.name,
                    f"cannot {what}: not connected to the broker for {timeout:g} s (reconnecting)",
                ) from None
        if self._client is None:
            raise LinkLostError(self.name, f"cannot {what}: the transport was closed")
        return self._client

    async def publish(
        self,
        topic: str,
        payload: Payload = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        wait: bool = True,
    ) -> None:
        """Publish ``payload`` (bytes, or str sent as UTF-8) to ``topic``.

        With ``wait`` (the default), QoS 1/2 wait for the broker's
        PUBACK/PUBCOMP (``timeout``, default the settings') and raise
        :class:`TransportTimeout` without it, or :class:`TransportError` if the
        broker refuses (v5 reason code, e.g. an ACL); a reconnect in progress is
        waited for up to ``timeout``, then :class:`LinkLostError`. QoS 0, or
        ``wait=False``, returns once queued to paho (which sends QoS 1/2 after a
        reconnect). ``properties``: MQTT v5 only (see :class:`MqttMessage` for
        the names).
        """
        check_qos(qos)
        absolute = self.topic(topic)
        if "+" in absolute or "#" in absolute:
            raise ValueError(f"{self.name}: cannot publish to a topic with wildcards: {absolute!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        deadline = self.settings.timeout_s if timeout is None else timeout
        if wait:
            client = await self._wait_connected(f"publish to {absolute}")
        elif self._client is not None:
            client = self._client
        else:
            raise LinkLostError(self.name, f"cannot publish to {absolute}: the link is closed")
        paho_props = None
        if properties:
            if self.protocol != "5":
                raise ValueError(
                    f"{self.name}: MQTT v5 properties need protocol 5 (this link is {self.protocol})"
                )
            paho_props = properties_from_dict(properties)
        info = client.publish(absolute, data, qos=qos, retain=retain, properties=paho_props)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and (qos > 0 or not wait):
            pass  # paho keeps a QoS 1/2 message and sends it after the reconnect
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            error = LinkLostError if qos == 0 else TransportError
            raise error(self.name, f"publish to {absolute} failed: {paho.error_string(info.rc)}")
        if qos == 0 or not wait:
            return
        assert self._loop is not None
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._pending_pub[info.mid] = fut
        try:
            reason = await bounded(fut, deadline)
        except TimeoutError:
            raise TransportTimeout(
                self.name,
                f"no {'PUBACK' if qos == 1 else 'PUBCOMP'} for {absolute} within {deadline:g} s",
            ) from None
        finally:
            self._pending_pub.pop(info.mid, None)
        if reason.is_failure:
            raise TransportError(self.name, f"broker refused the publish to {absolute}: {reason}")

    async def subscribe(
        self,
        topic_filter: str,
        qos: int = 0,
        *,
        queue: asyncio.Queue[MqttMessage] | None = None,
        timeout: float | None = None,
    ) -> asyncio.Queue[MqttMessage]:
        """Subscribe to ``topic_filter`` (relative to the prefix, ``+``/``#`` allowed); returns the queue.

        Matching messages (retained ones first) are put on the queue, on the
        event loop. Pass ``queue`` to collect several filters in one queue (a
        message is put on a given queue once even if several of its filters
        match). Waits for the SUBACK (``timeout``); a refused filter raises
        :class:`TransportError`. The subscription survives reconnects;
        :meth:`unsubscribe` ends it. Queues are unbounded: consume them, or
        unsubscribe.
        """
        check_qos(qos)
        absolute = self.topic(topic_filter)
        deadline = self.settings.timeout_s if timeout is None else timeout
        client = await self._wait_connected(f"subscribe to {absolute}")
        q: asyncio.Queue[MqttMessage] = queue if queue is not None else asyncio.Queue()
        sub = self._subs.get(absolute)
        new = sub is None
        if sub is None:
            sub = self._subs[absolute] = _Subscription(qos, self._next_sid, [])
            self._next_sid += 1
        sub.queues.append(q)
        # Always (re)send SUBSCRIBE, so a new queue on an existing filter also
        # receives the retained messages (the broker re-sends them).
        send_qos = max(sub.qos, qos) if not new else qos
        sub.qos = send_qos
        with self._sub_lock:
            self._sub_qos[absolute] = (send_qos, sub.sid)
        try:
            if self.protocol == "5":
                rc, mid = client.subscribe(
                    absolute,
                    options=self._sub_options(send_qos),
                    properties=self._sid_properties(sub.sid),
                )
            else:
                rc, mid = client.subscribe(absolute, send_qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise LinkLostError(
                    self.name, f"subscribe to {absolute} failed: {paho.error_string(rc)}"
                )
            assert self._loop is not None
            fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
            self._pending_sub[mid] = fut
            try:
                reasons = await bounded(fut, deadline)
            except TimeoutError:
                raise TransportTimeout(
                    self.name, f"no SUBACK for {absolute} within {deadline:g} s"
                ) from None
            finally:
                self._pending_sub.pop(mid, None)
            if not reasons or reasons[0].is_failure:
                raise TransportError(
                    self.name, f"broker refused the subscription to {absolute}: {reasons}"
                )
        except BaseException:
            self._forget(absolute, q)
            raise
        return q

    def _forget(self, absolute: str, q: asyncio.Queue[MqttMessage]) -> bool:
        """Remove ``q`` from the filter; True if the filter has no queue left."""
        sub = self._subs.get(absolute)
        if sub is None:
            return False
        with contextlib.suppress(ValueError):
            sub.queues.remove(q)
        if sub.queues:
            return False
        del self._subs[absolute]
        with self._sub_lock:
            self._sub_qos.pop(absolute, None)
        return True

    async def unsubscribe(
        self, topic_filter: str, queue: asyncio.Queue[MqttMessage] | None = None
    ) -> None:
        """Stop delivering ``topic_filter`` to ``queue`` (to every queue if None); UNSUBSCRIBE when unused."""
        absolute = self.topic(topic_filter)
        sub = self._subs.get(absolute)
        if sub is None:
            return
        gone = False
        for q in [queue] if queue is not None else list(sub.queues):
            gone = self._forget(absolute, q)
        if gone and self._client is not None and self.connected.is_set():
            self._client.unsubscribe(absolute)

    @property
    def subscriptions(self) -> dict[str, int]:
        """Active subscriptions: absolute filter -> QoS."""
        return {flt: sub.qos for flt, sub in self._subs.items()}


__all__ = [
    "PROTOCOLS",
    "Payload",
    "MqttClient",
    "MqttMessage",
    "MqttSettings",
    "MqttWill",
    "properties_from_dict",
    "properties_to_dict",
]
