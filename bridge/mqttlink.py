"""The campaign API's broker link: its settings, a link on the shared MQTT client, JSON payloads.

:class:`ApiSettings` are the shared :class:`~instruments.transports.mqttclient.MqttSettings`
(broker, TLS, login, client id, keepalive, MQTT version, session) plus the API's
own limits; ``bridge.labconfig`` builds them from lab.yaml's ``mqtt:`` mapping or
a broker URL. :class:`MqttLink` is the shared client with what the API needs on
top: every received message on one queue (:attr:`MqttLink.messages`, including a
persistent session's queued messages that arrive before the subscriptions are
made again), JSON publishes with MQTT v5 properties (content type, response
topic, correlation data, message expiry; dropped on 3.1.1), and failures as
:class:`ApiError`.

Layering: ``bridge`` may not import ``instruments.transports`` (import-linter,
"Nothing above safety/ holds a driver"); this module is the one exception written
into that contract, for the client module only, so paho stays inside
``instruments/transports`` and there is one MQTT client, not two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instruments.errors import TransportError
from instruments.transports.mqttclient import MqttClient, MqttMessage, MqttSettings

log = logging.getLogger(__name__)

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "ROOT",
    "ApiError",
    "ApiSettings",
    "Incoming",
    "MqttLink",
    "dumps",
    "parse_payload",
    "short",
    "topic_root",
]

#: every topic of the campaign API is under ``labbridge/<bridge_id>/``
ROOT = "labbridge"
#: requests larger than this are refused unread (lab.yaml ``mqtt.max_payload_bytes``)
MAX_PAYLOAD_BYTES = 65536
#: a received message (``received``, ``expired()``, ``response_topic``, ``correlation_data``)
Incoming = MqttMessage


def topic_root(bridge_id: str) -> str:
    """``labbridge/<bridge_id>``: the root of every topic of one bridge."""
    return f"{ROOT}/{bridge_id}"


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
class ApiSettings(MqttSettings):
    """The broker link's settings and the API's own: ``max_payload_bytes`` (larger requests
    are refused unread), ``status_interval_s`` (retained status refresh), ``request_rate``
    and ``request_burst`` (requests per second and user, e-stops excepted), ``queue_size``
    (requests waiting), ``source`` (where they came from, for messages). The session is
    persistent by default (600 s)."""

    session_expiry_s: int = 600
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    status_interval_s: float = 2.0
    request_rate: float = 20.0
    request_burst: int = 40
    queue_size: int = 64
    source: str = ""


# ========================================================================  link
@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    try:
        yield
    except TransportError as exc:
        raise ApiError(str(exc)) from None


class MqttLink(MqttClient):
    """The shared client for the campaign API (see the module docstring): ``open``/``close``,
    ``subscribe_all`` onto :attr:`messages`, ``send`` JSON; the Last Will ``will`` is
    ``(topic, payload)``, QoS 1, retained."""

    def __init__(self, settings: MqttSettings, *, will: tuple[str, bytes] | None = None) -> None:
        super().__init__(settings)
        self.messages: asyncio.Queue[MqttMessage] = asyncio.Queue()
        self.unrouted = self.messages
        if will is not None:
            self.set_will(*will)

    @property
    def is_open(self) -> bool:
        return self._client is not None

    async def open(self, subscriptions: Sequence[tuple[str, int]] = ()) -> None:
        """Connect and subscribe (waits for CONNACK and SUBACKs); raises :class:`ApiError` naming
        the broker and what went wrong (unreachable, credentials refused, ...)."""
        if self._client is not None:
            raise ApiError("the link is already open")
        with _api_errors():
            await self.connect()
        try:
            await self.subscribe_all(subscriptions)
        except BaseException:
            await self.close()
            raise

    async def subscribe_all(self, subscriptions: Sequence[tuple[str, int]]) -> None:
        """Subscribe ``(filter, qos)`` pairs onto :attr:`messages` (kept across reconnects)."""
        with _api_errors():
            for flt, qos in subscriptions:
                await self.subscribe(flt, qos, queue=self.messages)

    async def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the Last Will) and stop the threads."""
        await self.disconnect()

    async def send(
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
        """Publish JSON; with ``wait`` until the broker's PUBACK, raising :class:`ApiError`
        if it refuses (e.g. the ACL). v5 properties are dropped on a 3.1.1 link."""
        props = None
        if self.protocol == "5":
            props = {
                "content_type": "application/json",
                "response_topic": response_topic,
                "correlation_data": correlation_data,
                "message_expiry_interval": expiry_s,
            }
        with _api_errors():
            await self.publish(topic, payload, qos, retain, props, wait=wait)
