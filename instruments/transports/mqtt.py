"""MQTT pub/sub transport over paho-mqtt 2.x (the only module that imports paho).

URL::

    mqtt://[user[:password]@]host[:1883]/prefix?options
    mqtts://[user[:password]@]host[:8883]/prefix?options      (TLS)

The URL path is the *topic prefix*: ``publish("enclosure/enc-1/cmd")`` on
``mqtt://host/lab`` goes to ``lab/enclosure/enc-1/cmd``. A topic starting with
``/`` is absolute (the prefix is not added): ``"/other/x"`` is ``other/x``
(write ``"//x"`` for a broker topic that itself starts with ``/``). Received
messages carry both forms: ``topic`` (relative to the prefix, or ``/`` +
absolute when outside it, so it can be published to as is) and
``absolute_topic``.

Options (all optional):

================  =======================================================
``client_id``     MQTT client id (default ``labbridge-<random>``)
``protocol``      ``5``, ``3.1.1`` or ``auto`` (default: v5, falling back to
                  3.1.1 when the broker refuses v5, e.g. amqtt)
``keepalive``     seconds between PINGs (default 30)
``timeout``       seconds for CONNACK, SUBACK, PUBACK/PUBCOMP (default 5)
``ca``            CA file to verify the broker (mqtts; default: system CAs)
``insecure``      ``true``: do not check the certificate's host name (mqtts)
``password_env``  read the password from this environment variable
``password_file`` read the password from this file (first line)
``reconnect_min`` / ``reconnect_max``  automatic reconnect back-off, s (0.2 / 5)
================  =======================================================

Give a password by ``password_env`` or ``password_file`` rather than inline
(an inline password works but logs a warning). User and password are
URL-decoded. The password never appears in ``url``, errors or logs.

Threads: paho runs its network loop on its own thread (``loop_start``). Its
callbacks only convert data and hand it to the event loop with
``loop.call_soon_threadsafe``; no user code ever runs on paho's thread. The
blocking parts (TCP/TLS connect, joining paho's thread) run on this link's
:class:`DeviceWorker`. ``publish``/``subscribe`` call paho directly: with the
network thread running they only queue a packet and wake that thread.

After a dropped link paho reconnects by itself (back-off ``reconnect_min`` ..
``reconnect_max``), and every active subscription is subscribed again in
``on_connect``. ``connected`` (an :class:`asyncio.Event`) and
:meth:`MqttTransport.on_connection_change` report the link state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from instruments.errors import (
    InvalidURLError,
    LinkLostError,
    TransportError,
    TransportOpenError,
    TransportTimeout,
)
from instruments.transports.base import DeviceWorker, Transport, URLOptions, split_url

log = logging.getLogger(__name__)

PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}
# MQTT v5 PUBLISH properties we map, by our (snake_case) name.
_PROPERTY_NAMES = {
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "message_expiry_interval": "MessageExpiryInterval",
    "content_type": "ContentType",
    "payload_format_indicator": "PayloadFormatIndicator",
    "user_properties": "UserProperty",
}
# CONNACK reason codes that mean "bad credentials / not allowed" (v5 and v3 mapped to v5).
_NOT_AUTHORISED = {0x86, 0x87, 0x8C}
_UNSUPPORTED_PROTOCOL = 0x84

Payload = bytes | bytearray | str


@dataclass(frozen=True)
class MqttMessage:
    """One received message.

    ``topic`` is relative to the transport's prefix (``/`` + absolute topic
    when outside it); ``properties`` holds the MQTT v5 properties present
    (``response_topic``, ``correlation_data`` (bytes), ``message_expiry_interval``
    (s), ``content_type``, ``payload_format_indicator``, ``user_properties``
    (list of (key, value))); empty for MQTT 3.1.1.
    """

    topic: str
    absolute_topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (raises UnicodeDecodeError, a ValueError)."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ValueError if it is not)."""
        import json

        return json.loads(self.payload.decode("utf-8"))


@dataclass
class _Subscription:
    qos: int
    sid: int  # MQTT v5 subscription identifier (routes overlapping filters exactly)
    queues: list[asyncio.Queue[MqttMessage]]


class _ConnectFailed(Exception):
    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


def _redact(url: str) -> str:
    """The URL with an inline password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _check_topic_part(url: str, what: str, value: str) -> None:
    if "+" in value or "#" in value:
        raise InvalidURLError(url, f"{what} {value!r} must not contain the wildcards '+' or '#'")


def properties_to_dict(props: Properties | None) -> dict[str, Any]:
    """The v5 properties we know, as a plain dict (see :class:`MqttMessage`)."""
    out: dict[str, Any] = {}
    if props is None:
        return out
    for ours, theirs in _PROPERTY_NAMES.items():
        if hasattr(props, theirs):
            value = getattr(props, theirs)
            if ours == "user_properties":
                value = [tuple(kv) for kv in value]
            out[ours] = value
    return out


def properties_from_dict(values: dict[str, Any]) -> Properties:
    """Build paho PUBLISH properties from our names; unknown names raise ValueError."""
    props = Properties(PacketTypes.PUBLISH)
    for key, value in values.items():
        if key not in _PROPERTY_NAMES:
            raise ValueError(
                f"unknown MQTT v5 property {key!r}; known: {', '.join(_PROPERTY_NAMES)}"
            )
        if value is None:
            continue
        if key == "correlation_data" and isinstance(value, str):
            value = value.encode()
        if key == "user_properties":
            for k, v in value:
                props.UserProperty = (str(k), str(v))
            continue
        setattr(props, _PROPERTY_NAMES[key], value)
    return props


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle on the broker link: a command and its ack are small messages, and
    Nagle + delayed ACK would add ~40 ms to every back-to-back pair on loopback or a LAN."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransport(Transport):
    """An MQTT client link: ``publish``, ``subscribe`` (asyncio queues), Last Will, auto-reconnect.

    See the module docstring for the URL and the threading model. Topics are
    relative to the URL's prefix unless they start with ``/``.
    """

    schemes = ("mqtt", "mqtts")

    def __init__(self, url: str) -> None:
        scheme, _, raw_opts = split_url(url)
        super().__init__(_redact(url))
        if scheme not in self.schemes:
            raise InvalidURLError(self.url, f"scheme {scheme!r} is not mqtt:// or mqtts://")
        self.tls = scheme == "mqtts"
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise InvalidURLError(self.url, "the port is not a number in 0..65535") from None
        if not parts.hostname:
            raise InvalidURLError(self.url, "no broker host (expected mqtt://host:port/prefix)")
        self.host = parts.hostname
        self.port = port or (8883 if self.tls else 1883)
        self.username = unquote(parts.username) if parts.username else None
        self._inline_password = unquote(parts.password) if parts.password is not None else None
        self.prefix = parts.path.strip("/")
        _check_topic_part(self.url, "topic prefix", self.prefix)

        opts = URLOptions(self.url, raw_opts)
        self.client_id = opts.str("client_id", f"labbridge-{secrets.token_hex(4)}")
        self.requested_protocol = opts.choice("protocol", "auto", ("auto", "5", "3.1.1"))
        self.keepalive = opts.int("keepalive", 30)
        self.timeout = opts.float("timeout", 5.0)
        self.ca_file = opts.optional_str("ca")
        self.insecure = opts.bool("insecure", False)
        self.password_env = opts.optional_str("password_env")
        self.password_file = opts.optional_str("password_file")
        self.reconnect_min = opts.float("reconnect_min", 0.2)
        self.reconnect_max = opts.float("reconnect_max", 5.0)
        opts.finish()

        if self.keepalive < 1:
            raise InvalidURLError(self.url, "keepalive must be at least 1 s")
        if self.timeout <= 0:
            raise InvalidURLError(self.url, "timeout must be > 0")
        if self.reconnect_min <= 0 or self.reconnect_max < self.reconnect_min:
            raise InvalidURLError(self.url, "need 0 < reconnect_min <= reconnect_max")
        if not self.tls and (self.ca_file is not None or self.insecure):
            raise InvalidURLError(self.url, "options ca/insecure need mqtts://")
        sources = [
            s
            for s in (self._inline_password, self.password_env, self.password_file)
            if s is not None
        ]
        if len(sources) > 1:
            raise InvalidURLError(
                self.url, "give the password one way: inline, password_env or password_file"
            )
        if sources and not self.username:
            raise InvalidURLError(self.url, "a password needs a user name (mqtt://user@host/...)")
        if self._inline_password is not None:
            log.warning(
                "%s: password given inline in the URL; prefer ?password_env= or ?password_file=",
                self.url,
            )

        #: set while connected to the broker (cleared during automatic reconnects)
        self.connected = asyncio.Event()
        #: the MQTT version in use after open(): "5" or "3.1.1"
        self.protocol: str | None = None
        self._will: tuple[str, bytes, int, bool] | None = None
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
        self.reconnects = 0

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
            raise ValueError(f"{self.url}: empty topic")
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
        """Last Will: published by the broker if this link dies without a DISCONNECT. Call before open()."""
        if self.is_open:
            raise TransportError(self.url, "set_will() must be called before open()")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        self._will = (self.topic(topic), data, qos, retain)

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

    def _password(self) -> str | None:
        if self._inline_password is not None:
            return self._inline_password
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise TransportOpenError(
                    self.url, f"environment variable {self.password_env} (password_env) is not set"
                )
            return value
        if self.password_file is not None:
            try:
                lines = Path(self.password_file).read_text().splitlines()
            except OSError as exc:
                raise TransportOpenError(
                    self.url,
                    f"cannot read password_file {self.password_file}: {exc.strerror or exc}",
                ) from None
            return lines[0] if lines else ""
        return None

    def _build_client(self, protocol: str) -> paho.Client:
        """Create and configure the paho client (runs on the worker: reads CA/password files)."""
        version = PROTOCOLS[protocol]
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            clean_session=True if version != paho.MQTTv5 else None,
        )
        client.connect_timeout = self.timeout
        client.reconnect_delay_set(self.reconnect_min, self.reconnect_max)  # type: ignore[arg-type]
        client.on_socket_open = _no_delay
        if self.username:
            client.username_pw_set(self.username, self._password())
        if self.tls:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TransportOpenError(
                    self.url, f"cannot load CA file {self.ca_file}: {exc}"
                ) from None
            client.tls_set_context(context)
            client.tls_insecure_set(self.insecure)
        if self._will is not None:
            topic, payload, qos, retain = self._will
            client.will_set(topic, payload, qos, retain)
        client.on_connect = self._paho_on_connect
        client.on_disconnect = self._paho_on_disconnect
        client.on_message = self._paho_on_message
        client.on_publish = self._paho_on_publish
        client.on_subscribe = self._paho_on_subscribe
        return client

    def _connect_blocking(self, client: paho.Client) -> None:
        """TCP (+TLS) connect and send CONNECT, then start paho's network thread. Worker thread.

        A failure is re-raised as a fresh :class:`_ConnectFailed` outside the
        ``except`` block: the original traceback holds paho's half-open socket
        (paho does not close it when the TLS handshake fails), and dropping the
        traceback closes it now instead of at the next garbage collection.
        """
        failure: tuple[str, str] | None = None
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive)
        except ssl.SSLError as exc:
            failure = ("TLS handshake failed with the broker at", str(exc))
        except OSError as exc:
            failure = (
                "cannot connect to the broker at",
                exc.strerror or str(exc) or type(exc).__name__,
            )
        if failure is not None:
            raise _ConnectFailed(*failure)
        client.loop_start()

    @staticmethod
    def _stop_client_blocking(client: paho.Client) -> None:
        """Disconnect, join paho's thread and close its sockets (worker thread)."""
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
        # paho closes its wake-up socket pair only in __del__: close it now so
        # no file descriptor outlives close().
        reset = getattr(client, "_reset_sockets", None)
        if reset is not None:
            reset()

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = DeviceWorker(f"mqtt-{self.client_id}")
        protocols = (
            ["5", "3.1.1"] if self.requested_protocol == "auto" else [self.requested_protocol]
        )
        try:
            for i, protocol in enumerate(protocols):
                reason = await self._try_connect(protocol)
                if reason.value == _UNSUPPORTED_PROTOCOL and i + 1 < len(protocols):
                    log.info(
                        "%s: broker refused MQTT v%s, trying v%s",
                        self.url,
                        protocol,
                        protocols[i + 1],
                    )
                    await self._drop_client()
                    continue
                if reason.is_failure:
                    await self._drop_client()
                    raise TransportOpenError(self.url, self._refusal_text(reason, protocol))
                self.protocol = protocol
                break
        except BaseException:
            await self._drop_client()
            if self._worker is not None:
                await self._worker.aclose()
                self._worker = None
            raise
        log.info("%s: connected (MQTT %s, client id %s)", self.url, self.protocol, self.client_id)

    def _refusal_text(self, reason: ReasonCode, protocol: str) -> str:
        if reason.value in _NOT_AUTHORISED:
            who = f"user {self.username!r}" if self.username else "anonymous clients"
            return f"broker refused the connection: not authorised ({reason}; check the credentials of {who})"
        if reason.value == _UNSUPPORTED_PROTOCOL:
            return f"broker refused MQTT v{protocol} ({reason}); try ?protocol=3.1.1"
        return f"broker refused the connection: {reason}"

    async def _try_connect(self, protocol: str) -> ReasonCode:
        """One connection attempt; returns the CONNACK reason (success or refusal)."""
        assert self._worker is not None and self._loop is not None
        client = await self._worker.run(
            self._build_client, protocol, timeout=self.timeout, url=self.url
        )
        self._client = client
        self._connack = self._loop.create_future()
        try:
            await self._worker.run(
                self._connect_blocking, client, timeout=self.timeout + 1.0, url=self.url
            )
        except TransportTimeout:
            raise TransportOpenError(
                self.url, f"no connection to {self.host}:{self.port} within {self.timeout:g} s"
            ) from None
        except _ConnectFailed as exc:
            raise TransportOpenError(
                self.url, f"{exc.what} {self.host}:{self.port}: {exc.detail}"
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(self._connack), self.timeout)
        except TimeoutError:
            raise TransportOpenError(
                self.url, f"no CONNACK from the broker within {self.timeout:g} s"
            ) from None

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._worker is not None:
            try:
                await self._worker.run(
                    self._stop_client_blocking, client, timeout=self.timeout + 2.0, url=self.url
                )
            except TransportTimeout:
                log.error("%s: paho's network thread did not stop in time", self.url)
        self._set_connected(False, notify=False)

    async def _close(self) -> None:
        await self._drop_client()
        error = LinkLostError(self.url, "transport closed")
        for futs in (self._pending_pub, self._pending_sub):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()  # retrieved: no "never retrieved" warning if nobody awaits it
            futs.clear()
        if self._worker is not None:
            await self._worker.aclose()
            self._worker = None
        # Subscriptions are kept: after reconnect() (close + open) the same
        # queues keep receiving (they are re-subscribed on connect).
        log.info("%s: closed", self.url)

    async def _release(self) -> None:
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
            # Re-subscribe after a reconnect (the broker's session is gone).
            if subs and client.protocol == paho.MQTTv5:
                for flt, (qos, sid) in subs:
                    client.subscribe(flt, qos, properties=self._sid_properties(sid))
            elif subs:
                client.subscribe([(flt, qos) for flt, (qos, _sid) in subs])
        self._to_loop(self._on_connack, client, reason)

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
        props = properties_to_dict(raw_props)
        sids = getattr(raw_props, "SubscriptionIdentifier", None) if raw_props is not None else None
        msg = MqttMessage(
            topic=self.relative(absolute),
            absolute_topic=absolute,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            properties=props,
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
                    log.exception("%s: connection listener %r failed", self.url, cb)

    def _on_connack(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:  # a callback of a client we already dropped
            return
        first = self._connack is not None and not self._connack.done()
        if first:
            assert self._connack is not None
            self._connack.set_result(reason)
        if reason.is_failure:
            if not first:
                log.error("%s: reconnect refused by the broker: %s", self.url, reason)
            return
        if not first:
            self.reconnects += 1
            log.warning(
                "%s: reconnected to the broker (re-subscribed %d filters)",
                self.url,
                len(self._subs),
            )
        self._set_connected(True)

    def _on_disconnected(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:  # our own close, or a dropped client
            return
        if self.connected.is_set():
            log.warning("%s: link to the broker lost (%s); reconnecting", self.url, reason)
        self._set_connected(False)

    def _dispatch(self, msg: MqttMessage, sids: list[int] | None) -> None:
        """Put ``msg`` once on every queue with a filter matching its topic.

        A broker sends one copy per matching subscription. MQTT v5 copies carry
        subscription identifiers: a queue takes the copy tagged with the lowest
        identifier among its matching filters, so it gets each message once.
        3.1.1 copies carry nothing: with overlapping filters (on one queue or
        not) the broker's copies all reach the queue.
        """
        canonical: dict[int, tuple[int, asyncio.Queue[MqttMessage]]] = {}
        for flt, sub in list(self._subs.items()):
            if not paho.topic_matches_sub(flt, msg.absolute_topic):
                continue
            for q in sub.queues:
                best = canonical.get(id(q))
                if best is None or sub.sid < best[0]:
                    canonical[id(q)] = (sub.sid, q)
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
        if not self.is_open or self._client is None:
            raise LinkLostError(self.url, f"cannot {what}: the transport is not open")
        if not self.connected.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), self.timeout)
            except TimeoutError:
                raise LinkLostError(
                    self.url,
                    f"cannot {what}: not connected to the broker for {self.timeout:g} s (reconnecting)",
                ) from None
        if self._client is None:
            raise LinkLostError(self.url, f"cannot {what}: the transport was closed")
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
    ) -> None:
        """Publish ``payload`` (bytes, or str sent as UTF-8) to ``topic``.

        QoS 1/2 wait for the broker's PUBACK/PUBCOMP (``timeout``, default the
        URL's) and raise :class:`TransportTimeout` without it, or
        :class:`TransportError` if the broker refuses (v5 reason code, e.g. an
        ACL). QoS 0 returns once queued to paho. ``properties``: MQTT v5 only
        (see :class:`MqttMessage` for the names). Waits up to ``timeout`` for a
        reconnect in progress, then raises :class:`LinkLostError`.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        absolute = self.topic(topic)
        if "+" in absolute or "#" in absolute:
            raise ValueError(f"{self.url}: cannot publish to a topic with wildcards: {absolute!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        deadline = self.timeout if timeout is None else timeout
        client = await self._wait_connected(f"publish to {absolute}")
        paho_props = None
        if properties:
            if self.protocol != "5":
                raise ValueError(
                    f"{self.url}: MQTT v5 properties need protocol 5 (this link is {self.protocol})"
                )
            paho_props = properties_from_dict(properties)
        info = client.publish(absolute, data, qos=qos, retain=retain, properties=paho_props)
        if qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise LinkLostError(
                    self.url, f"publish to {absolute} failed: {paho.error_string(info.rc)}"
                )
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(
                self.url, f"publish to {absolute} failed: {paho.error_string(info.rc)}"
            )
        # NO_CONN: paho keeps the message and sends it after the reconnect.
        assert self._loop is not None
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._pending_pub[info.mid] = fut
        try:
            reason = await asyncio.wait_for(fut, deadline)
        except TimeoutError:
            raise TransportTimeout(
                self.url,
                f"no {'PUBACK' if qos == 1 else 'PUBCOMP'} for {absolute} within {deadline:g} s",
            ) from None
        finally:
            self._pending_pub.pop(info.mid, None)
        if reason.is_failure:
            raise TransportError(self.url, f"broker refused the publish to {absolute}: {reason}")

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
        :class:`TransportError`. The subscription survives reconnects (automatic
        ones and :meth:`reconnect`); :meth:`unsubscribe` ends it. Queues are
        unbounded: consume them, or unsubscribe.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        absolute = self.topic(topic_filter)
        deadline = self.timeout if timeout is None else timeout
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
                    absolute, send_qos, properties=self._sid_properties(sub.sid)
                )
            else:
                rc, mid = client.subscribe(absolute, send_qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise LinkLostError(
                    self.url, f"subscribe to {absolute} failed: {paho.error_string(rc)}"
                )
            assert self._loop is not None
            fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
            self._pending_sub[mid] = fut
            try:
                reasons = await asyncio.wait_for(fut, deadline)
            except TimeoutError:
                raise TransportTimeout(
                    self.url, f"no SUBACK for {absolute} within {deadline:g} s"
                ) from None
            finally:
                self._pending_sub.pop(mid, None)
            if not reasons or reasons[0].is_failure:
                raise TransportError(
                    self.url, f"broker refused the subscription to {absolute}: {reasons}"
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
    "MqttMessage",
    "MqttTransport",
    "properties_from_dict",
    "properties_to_dict",
]
