"""Talking to the MQTT broker for the campaign API: settings, one paho link, JSON payloads.

:class:`MqttSettings` come from lab.yaml's ``mqtt:`` mapping (:func:`mqtt_settings`,
validated with errors that name the file, the line and the field) or a broker URL
(:func:`parse_broker_url`); secrets are never inline. :class:`MqttLink` is one
paho-mqtt 2.x client: MQTT v5 (falling back to 3.1.1 when the broker refuses v5,
e.g. the embedded amqtt), subscriptions kept across reconnects, publishes with v5
properties (response topic, correlation data, message expiry), received messages
on an asyncio queue as :class:`Incoming`.

Threads: paho runs its network loop on its own thread; its callbacks only hand
data to the event loop (``call_soon_threadsafe``), and blocking connects run on
one worker thread per link. TCP_NODELAY is set on the socket (NOTES.md: Nagle +
delayed ACK would add ~40 ms to a request and its reply). ``bridge`` may import
paho (the import-linter contract keeps it out of loops, safety and the drivers);
it may not import ``instruments.transports``, hence this small link of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.labconfig import LabConfig, LabConfigError
from safety.yamldoc import YamlDoc, compose_yaml

log = logging.getLogger(__name__)

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "ROOT",
    "ApiError",
    "Incoming",
    "MqttLink",
    "MqttSettings",
    "dumps",
    "mqtt_settings",
    "parse_broker_url",
    "parse_payload",
    "short",
]

#: every topic of the campaign API is under ``labbridge/<bridge_id>/``
ROOT = "labbridge"
#: requests larger than this are refused unread (lab.yaml ``mqtt.max_payload_bytes``)
MAX_PAYLOAD_BYTES = 65536
_PROTOCOLS = {"5": paho.MQTTv5, "3.1.1": paho.MQTTv311}
_UNSUPPORTED_PROTOCOL = 0x84
_NOT_AUTHORISED = {0x86, 0x87, 0x8C}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ApiError(RuntimeError):
    """The MQTT side failed (broker unreachable, credentials refused, a publish refused)."""


def short(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (error messages quote what they were sent)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ========================================================================  JSON
def _clean(value: Any) -> Any:
    """Plain JSON data: NaN/inf -> None, NumPy scalars -> Python, paths -> str, bytes dropped."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items() if not isinstance(v, bytes | bytearray)}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return _clean(item())
    return str(value)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of ``value`` (cleaned, see :func:`_clean`)."""
    return json.dumps(_clean(value), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_payload(payload: bytes) -> tuple[Any, str | None]:
    """``(data, None)`` for a UTF-8 JSON payload, else ``(None, what is wrong)``."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"the payload is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if not text.strip():
        return None, "the payload is empty (expected a JSON object)"
    try:
        return (
            json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates),
            None,
        )
    except RecursionError:
        return None, "the payload is not usable JSON: nested too deeply"
    except ValueError as exc:  # JSONDecodeError included
        return None, f"the payload is not JSON: {short(str(exc), 200)}"


# ====================================================================  settings
@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and how to log in (from lab.yaml ``mqtt:`` and/or a URL).

    Secrets are never inline: the password comes from an environment variable
    (``password_env``) or a file (``password_file``, first line), read when connecting.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    ca: Path | None = None
    insecure: bool = False
    client_id: str | None = None
    protocol: str = "auto"
    keepalive: int = 30
    session_expiry_s: int = 600
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    status_interval_s: float = 2.0
    timeout_s: float = 10.0
    source: str = ""

    @property
    def url(self) -> str:
        """The broker URL without secrets (for messages)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def password(self) -> str | None:
        """The password from ``password_env``/``password_file`` (None: none configured)."""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ApiError(
                    f"{self.url}: environment variable {self.password_env} (password_env) is not set"
                )
            return value
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ApiError(
                    f"{self.url}: cannot read password_file {self.password_file}: "
                    f"{exc.strerror or exc}"
                ) from None
            return lines[0] if lines else ""
        return None


_MQTT_KEYS = (
    "url",
    "username",
    "password_env",
    "password_file",
    "tls",
    "client_id",
    "protocol",
    "keepalive",
    "session_expiry_s",
    "max_payload_bytes",
    "status_interval_s",
)
_TLS_KEYS = ("ca", "insecure")
_URL_OPTIONS = ("password_env", "password_file", "ca", "insecure", "client_id", "protocol")


def _lab_doc(lab: LabConfig) -> tuple[YamlDoc, Path]:
    """The lab file's positions (for line numbers in errors) and its directory."""
    path = Path(lab.source)
    base = path.resolve().parent if path.is_file() else Path.cwd()
    if lab.doc is not None:  # kept by load_lab
        return lab.doc, base
    doc = YamlDoc(lab.source, error_cls=LabConfigError)
    if path.is_file():
        with contextlib.suppress(Exception):  # loaded already: this only adds line numbers
            compose_yaml(path.read_text(encoding="utf-8"), doc, key_types=(str,))
        return doc, path.resolve().parent
    return doc, Path.cwd()


def parse_broker_url(url: str, *, source: str = "--broker") -> dict[str, Any]:
    """``mqtt[s]://[user@]host[:port][?options]`` -> settings fields (raises LabConfigError).

    Options: ``password_env``, ``password_file``, ``ca``, ``insecure``, ``client_id``,
    ``protocol``. A password in the URL is refused (it would show in process lists
    and logs); so is a path (the API's topics are ``labbridge/<bridge_id>/...``).
    """

    def bad(problem: str) -> LabConfigError:
        return LabConfigError(problem, source=source, field="url")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(f"{url!r} is not a broker URL: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise bad(f"{url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise bad(f"{url!r}: no broker host (mqtt://host:1883)")
    if parts.password is not None:
        raise bad(
            "a password in the URL would show in process lists and logs: give "
            "password_env or password_file instead"
        )
    if parts.path.strip("/"):
        raise bad(
            f"{url!r}: a path ({parts.path}) is not used: the API's topics are "
            f"{ROOT}/<bridge_id>/...; remove it"
        )
    tls = parts.scheme == "mqtts"
    out: dict[str, Any] = {
        "host": parts.hostname,
        "port": port or (8883 if tls else 1883),
        "tls": tls,
    }
    if parts.username:
        out["username"] = unquote(parts.username)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URL_OPTIONS:
            raise bad(f"unknown option {key!r} (known: {', '.join(_URL_OPTIONS)})")
        if key == "insecure":
            if value.lower() not in ("true", "false", "1", "0"):
                raise bad(f"insecure must be true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        elif key in ("password_file", "ca"):
            out[key] = Path(value)
        else:
            out[key] = value
    return out


def mqtt_settings(lab: LabConfig, broker: str | None = None) -> MqttSettings:
    """Validate lab.yaml's ``mqtt:`` mapping (and ``broker``, a URL that overrides its ``url``).

    Fields: ``url`` (``mqtt[s]://[user@]host[:port]``), ``username``,
    ``password_env`` or ``password_file`` (never a password inline), ``tls: {ca,
    insecure}``, ``client_id`` (default ``labbridge-<bridge_id>``), ``protocol``
    (``auto``, ``5``, ``3.1.1``), ``keepalive``, ``session_expiry_s`` (0: a clean
    session), ``max_payload_bytes``, ``status_interval_s``. Relative paths are
    relative to the lab file. Errors name the file, the line and the field.
    """
    doc, base = _lab_doc(lab)
    raw = lab.mqtt or {}
    at: tuple[Any, ...] = ("mqtt",)
    if not isinstance(raw, Mapping):
        raise doc.error(f"must be a mapping, got {type(raw).__name__}", at)
    for key in raw:
        if key == "password":
            raise doc.error(
                "secrets are never inline in the lab config: use password_env (an environment "
                "variable) or password_file (a file readable only by the service)",
                (*at, key),
            )
        if key not in _MQTT_KEYS:
            raise doc.error(f"unknown field '{key}' (known: {', '.join(_MQTT_KEYS)})", (*at, key))

    def text(
        key: str, pattern: re.Pattern[str] | None = None, what: str = "a string"
    ) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise doc.error(f"must be {what}, got {value!r}", (*at, key))
        if pattern is not None and not pattern.match(value):
            raise doc.error(f"{value!r} is not {what}", (*at, key))
        return value

    def integer(key: str, default: int, low: int, high: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise doc.error(f"must be an integer in {low}..{high}, got {value!r}", (*at, key))
        return value

    fields: dict[str, Any] = {}
    url = broker if broker is not None else text("url", what="a broker URL (mqtt://host:1883)")
    if url is None:
        raise LabConfigError(
            f"no MQTT broker: give --broker URL or mqtt.url in {lab.source}",
            source=lab.source,
            field="mqtt.url",
        )
    try:
        fields.update(
            parse_broker_url(url, source="--broker" if broker is not None else lab.source)
        )
    except LabConfigError as exc:
        if broker is not None:
            raise
        raise doc.error(exc.problem, (*at, "url")) from None
    username = text("username", what="a user name")
    if username is not None and not (broker is not None and fields.get("username")):
        if fields.get("username") not in (None, username):
            raise doc.error(
                f"the URL names user {fields['username']!r} and username {username!r}",
                (*at, "username"),
            )
        fields["username"] = username
    for key in ("password_env", "password_file", "client_id", "protocol"):
        value = raw.get(key)
        if key == "protocol" and isinstance(value, int | float) and not isinstance(value, bool):
            value = "5" if value == 5 else str(value)
        if value is None:
            continue
        if key == "password_env":
            text(key, _ENV_NAME, "an environment variable name")
        elif key == "protocol":
            if value not in ("auto", "5", "3.1.1"):
                raise doc.error(f"must be auto, 5 or 3.1.1, got {value!r}", (*at, key))
        else:
            text(key, what="a file path" if key == "password_file" else "a string")
        if key in fields and broker is None:
            raise doc.error(f"given twice (in the URL and as {key})", (*at, key))
        if key not in fields:
            fields[key] = Path(value) if key == "password_file" else value
    tls_raw = raw.get("tls")
    if tls_raw is not None:
        if not isinstance(tls_raw, Mapping):
            raise doc.error("must be a mapping {ca: path, insecure: false}", (*at, "tls"))
        for key in tls_raw:
            if key not in _TLS_KEYS:
                raise doc.error(
                    f"unknown field '{key}' (known: {', '.join(_TLS_KEYS)})", (*at, "tls", key)
                )
        ca = tls_raw.get("ca")
        if ca is not None:
            if not isinstance(ca, str) or not ca.strip():
                raise doc.error(f"must be a file path, got {ca!r}", (*at, "tls", "ca"))
            fields.setdefault("ca", Path(ca))
        insecure = tls_raw.get("insecure", False)
        if not isinstance(insecure, bool):
            raise doc.error(f"must be true or false, got {insecure!r}", (*at, "tls", "insecure"))
        fields.setdefault("insecure", insecure)
        if not fields["tls"]:
            raise doc.error("tls settings need an mqtts:// URL", (*at, "tls"))
    if not fields["tls"] and (fields.get("ca") is not None or fields.get("insecure")):
        raise LabConfigError(
            "ca/insecure need an mqtts:// URL", source=lab.source, field="mqtt.url"
        )
    if fields.get("password_env") is not None and fields.get("password_file") is not None:
        raise doc.error("give the password one way: password_env or password_file", at)
    has_password = fields.get("password_env") is not None or fields.get("password_file") is not None
    if has_password and not fields.get("username"):
        raise doc.error("a password needs a user name (username, or mqtt://user@host)", at)
    for key in ("password_file", "ca"):
        value = fields.get(key)
        if isinstance(value, Path) and not value.is_absolute():
            fields[key] = base / value
    fields["keepalive"] = integer("keepalive", 30, 5, 3600)
    fields["session_expiry_s"] = integer("session_expiry_s", 600, 0, 7 * 24 * 3600)
    fields["max_payload_bytes"] = integer("max_payload_bytes", MAX_PAYLOAD_BYTES, 1024, 16 << 20)
    interval = raw.get("status_interval_s", 2.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
        raise doc.error(f"must be a number > 0, got {interval!r}", (*at, "status_interval_s"))
    fields["status_interval_s"] = float(interval)
    fields.setdefault("client_id", f"labbridge-{lab.bridge_id}")
    fields["source"] = lab.source
    return MqttSettings(**fields)


# ========================================================================  link
@dataclass(frozen=True)
class Incoming:
    """One received message; ``expiry_s`` is the v5 message expiry left when it arrived."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_s: int | None = None
    received: float = 0.0

    def expired(self, now: float | None = None) -> bool:
        """Past its MQTT v5 message expiry (counted from when it reached us)."""
        if self.expiry_s is None:
            return False
        return (time.monotonic() if now is None else now) >= self.received + self.expiry_s


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle: a request and its reply are small messages (NOTES.md: +40 ms otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """One paho client: connect (v5, falling back to 3.1.1 when ``protocol`` is ``auto``),
    subscriptions that survive reconnects, publish with v5 properties, received messages
    on :attr:`messages` (an asyncio queue). See the module docstring for the threads."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        clean: bool = True,
        session_expiry_s: int = 0,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.clean = clean
        self.session_expiry_s = session_expiry_s
        self.will = will
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue()
        self.connected = asyncio.Event()
        #: "5" or "3.1.1" once open
        self.protocol: str | None = None
        self.reconnects = 0
        self._subs: dict[str, int] = {}
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._pending_pub: dict[int, asyncio.Future[ReasonCode]] = {}
        self._pending_sub: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def on_connection_change(self, callback: Callable[[bool], None]) -> None:
        """``callback(connected)`` on the event loop at every reconnect and drop (not the first connect)."""
        self._listeners.append(callback)

    # ------------------------------------------------------------- connect
    def _build(self, protocol: str) -> paho.Client:
        s = self.settings
        version = _PROTOCOLS[protocol]
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            clean_session=self.clean if version != paho.MQTTv5 else None,
        )
        client.connect_timeout = s.timeout_s
        client.reconnect_delay_set(1, 10)
        client.on_socket_open = _no_delay
        if s.username:
            client.username_pw_set(s.username, s.password())
        if s.tls:
            try:
                context = ssl.create_default_context(cafile=str(s.ca) if s.ca is not None else None)
            except (OSError, ssl.SSLError) as exc:
                raise ApiError(f"{s.url}: cannot load CA file {s.ca}: {exc}") from None
            if s.insecure:
                context.check_hostname = False
            client.tls_set_context(context)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        return client

    def _connect_blocking(self, client: paho.Client, protocol: str) -> str | None:
        """TCP (+TLS) connect and CONNECT, then paho's network thread; the error text or None."""
        s = self.settings
        failure = None
        try:
            if protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                if not self.clean and self.session_expiry_s > 0:
                    props.SessionExpiryInterval = self.session_expiry_s
                client.connect(
                    s.host, s.port, s.keepalive, clean_start=self.clean, properties=props
                )
            else:
                client.connect(s.host, s.port, s.keepalive)
        except ssl.SSLError as exc:
            failure = f"TLS handshake with {s.host}:{s.port} failed: {exc}"
        except OSError as exc:
            failure = f"cannot connect to {s.host}:{s.port}: {exc.strerror or exc}"
        if failure is not None:
            return failure
        client.loop_start()
        return None

    @staticmethod
    def _stop_blocking(client: paho.Client) -> None:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
        reset = getattr(client, "_reset_sockets", None)
        if reset is not None:  # paho closes its wake-up socket pair only in __del__
            reset()

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None and self._executor is not None
        return await self._loop.run_in_executor(self._executor, fn, *args)

    async def open(self, subscriptions: Sequence[tuple[str, int]] = ()) -> None:
        """Connect and subscribe (waits for CONNACK and SUBACK); raises :class:`ApiError` naming
        the broker and what went wrong (unreachable, credentials refused, ...)."""
        if self._client is not None:
            raise ApiError("the link is already open")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"lb-mqtt-{self.client_id}")
        self._subs = {flt: qos for flt, qos in subscriptions}
        s = self.settings
        protocols = ["5", "3.1.1"] if s.protocol == "auto" else [s.protocol]
        try:
            for i, protocol in enumerate(protocols):
                reason = await self._try(protocol)
                if reason.value == _UNSUPPORTED_PROTOCOL and i + 1 < len(protocols):
                    await self._drop()
                    continue
                if reason.is_failure:
                    await self._drop()
                    if reason.value in _NOT_AUTHORISED:
                        who = f"user {s.username!r}" if s.username else "anonymous clients"
                        raise ApiError(
                            f"{s.url}: the broker refused the connection: not authorised "
                            f"({reason}; check the credentials of {who})"
                        )
                    raise ApiError(f"{s.url}: the broker refused the connection: {reason}")
                self.protocol = protocol
                break
            await self._await_subscribed()
        except BaseException:
            await self._drop()
            self._shutdown_executor()
            raise
        log.info("%s: connected as %s (MQTT %s)", s.url, self.client_id, self.protocol)

    async def _try(self, protocol: str) -> ReasonCode:
        assert self._loop is not None
        client = await self._in_worker(self._build, protocol)
        self._client = client
        self._connack = self._loop.create_future()
        try:
            failure = await asyncio.wait_for(
                self._in_worker(self._connect_blocking, client, protocol),
                self.settings.timeout_s + 1,
            )
        except TimeoutError:
            raise ApiError(
                f"{self.settings.url}: no connection within {self.settings.timeout_s:g} s"
            ) from None
        if failure is not None:
            raise ApiError(f"{self.settings.url}: {failure}")
        try:
            return await asyncio.wait_for(asyncio.shield(self._connack), self.settings.timeout_s)
        except TimeoutError:
            raise ApiError(
                f"{self.settings.url}: no CONNACK from the broker within {self.settings.timeout_s:g} s"
            ) from None

    async def _await_subscribed(self) -> None:
        futures = list(self._pending_sub.values())
        if not futures:
            return
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), self.settings.timeout_s)
        except TimeoutError:
            raise ApiError(
                f"{self.settings.url}: no SUBACK within {self.settings.timeout_s:g} s"
            ) from None
        refused = [str(r) for reasons in results for r in reasons if r.is_failure]
        if refused:
            raise ApiError(
                f"{self.settings.url}: the broker refused subscriptions to "
                f"{', '.join(self._subs)} ({', '.join(refused)}): check the ACL of "
                f"{self.settings.username or 'this client'}"
            )

    async def subscribe(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        """Add subscriptions (kept across reconnects); waits for the SUBACK."""
        new = {flt: qos for flt, qos in subscriptions}
        self._subs.update(new)
        client = self._client
        if client is None or not self.connected.is_set():
            raise ApiError(f"{self.settings.url}: cannot subscribe: not connected")
        self._send_subscribe(client, new)
        await self._await_subscribed()

    def _send_subscribe(self, client: paho.Client, subs: Mapping[str, int]) -> None:
        if not subs:
            return
        assert self._loop is not None
        rc, mid = client.subscribe([(flt, qos) for flt, qos in subs.items()])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_sub[mid] = self._loop.create_future()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._executor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._in_worker(self._stop_blocking, client), 10.0)
        self.connected.clear()

    def _shutdown_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the Last Will) and stop the threads."""
        await self._drop()
        error = ApiError(f"{self.settings.url}: link closed")
        for futs in (self._pending_pub, self._pending_sub):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()
            futs.clear()
        self._shutdown_executor()

    # ------------------------------------------------------------- publish
    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: int | None = None,
        wait: bool = False,
    ) -> None:
        """Publish; with ``wait`` (QoS 1) until the broker's PUBACK, raising :class:`ApiError`
        if it refuses (e.g. the ACL). v5 properties are dropped on a 3.1.1 link."""
        client = self._client
        if client is None:
            raise ApiError(f"{self.settings.url}: cannot publish to {topic}: the link is closed")
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        info = client.publish(topic, data, qos=qos, retain=retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise ApiError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if not wait or qos == 0:
            return
        assert self._loop is not None
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._pending_pub[info.mid] = fut
        try:
            reason = await asyncio.wait_for(fut, self.settings.timeout_s)
        except TimeoutError:
            raise ApiError(f"no PUBACK for {topic} within {self.settings.timeout_s:g} s") from None
        finally:
            self._pending_pub.pop(info.mid, None)
        if reason.is_failure:
            raise ApiError(f"the broker refused the publish to {topic}: {reason}")

    # ------------------------------------------------- paho's thread side
    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._on_connack, client, reason)

    def _paho_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._on_disconnect, client, reason)

    def _paho_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        msg = Incoming(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            response_topic=response,
            correlation_data=bytes(corr) if corr is not None else None,
            expiry_s=int(expiry) if expiry is not None else None,
            received=time.monotonic(),
        )
        self._to_loop(self.messages.put_nowait, msg)

    def _paho_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._on_published, mid, reason)

    def _paho_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        self._to_loop(self._on_subscribed, mid, list(reasons))

    # --------------------------------------------------- event-loop side
    def _on_connack(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:
            return
        first = self._connack is not None and not self._connack.done()
        if first:
            assert self._connack is not None
            self._connack.set_result(reason)
        if reason.is_failure:
            if not first:
                log.error("%s: reconnect refused: %s", self.settings.url, reason)
            return
        self._send_subscribe(client, self._subs)  # again after a reconnect: the session may be new
        self.connected.set()
        if not first:
            self.reconnects += 1
            log.warning("%s: reconnected to the broker", self.settings.url)
            self._notify(True)

    def _on_disconnect(self, client: paho.Client, reason: ReasonCode) -> None:
        if client is not self._client:
            return
        if self.connected.is_set():
            log.warning("%s: link to the broker lost (%s); reconnecting", self.settings.url, reason)
            self.connected.clear()
            self._notify(False)

    def _notify(self, connected: bool) -> None:
        for cb in list(self._listeners):
            try:
                cb(connected)
            except Exception:
                log.exception("connection listener %r failed", cb)

    def _on_published(self, mid: int, reason: ReasonCode) -> None:
        fut = self._pending_pub.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _on_subscribed(self, mid: int, reasons: list[ReasonCode]) -> None:
        fut = self._pending_sub.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reasons)
