"""The shared MQTT client's plain data: broker settings, the Last Will, received messages.

:class:`MqttSettings` says where the broker is and how to log in (host, port, TLS, user
and password source, client id, keepalive, MQTT version, session, Last Will);
:class:`MqttMessage` is one received message with its MQTT v5 properties, which
:func:`properties_to_dict` and :func:`properties_from_dict` convert to and from paho's.
:class:`~instruments.transports.mqttclient.MqttClient` (which re-exports these names) is
the client on them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from instruments.errors import TransportOpenError

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
Payload = bytes | bytearray | str


@dataclass(frozen=True)
class MqttWill:
    """The Last Will: published by the broker if the link dies without a DISCONNECT."""

    topic: str  # absolute
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttSettings:
    """Where the broker is and how to log in.

    The password comes from ``password_env`` (an environment variable) or
    ``password_file`` (its first line), read when connecting, or, discouraged,
    ``inline_password`` (never shown in ``repr`` or ``url``). ``protocol``:
    ``"5"``, ``"3.1.1"`` or ``"auto"`` (v5, then 3.1.1 if the broker refuses v5).
    ``session_expiry_s`` 0 is a clean session; more keeps the broker's session
    (subscriptions, queued QoS 1/2 messages) that long after a disconnect.
    ``timeout_s`` bounds CONNACK, SUBACK and PUBACK/PUBCOMP waits.
    ``max_packet_bytes`` (MQTT v5 only): the largest packet this client accepts; the
    broker drops larger messages for it instead of sending them (paho itself reads
    every packet whole before any callback: this is the only way to leave one unread).
    ``retain_as_published`` (MQTT v5 only): subscribe with the option of that name, so a
    message published retained arrives flagged ``retain`` also when it is live (without
    it only the retained copies sent at subscribe time are flagged).
    """

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    ca: Path | None = None
    insecure: bool = False
    client_id: str | None = None
    protocol: str = "auto"
    keepalive: int = 30
    timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 10.0
    session_expiry_s: int = 0
    max_packet_bytes: int | None = None
    retain_as_published: bool = False
    will: MqttWill | None = None
    inline_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", *PROTOCOLS):
            raise ValueError(f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")

    @property
    def url(self) -> str:
        """The broker URL without secrets (for messages)."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def password(self) -> str | None:
        """The password (None: none configured); raises :class:`TransportOpenError` if its
        environment variable is unset or its file unreadable."""
        if self.inline_password is not None:
            return self.inline_password
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise TransportOpenError(
                    self.url, f"environment variable {self.password_env} (password_env) is not set"
                )
            return value
        if self.password_file is not None:
            try:
                lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise TransportOpenError(
                    self.url,
                    f"cannot read password_file {self.password_file}: {exc.strerror or exc}",
                ) from None
            return lines[0] if lines else ""
        return None


@dataclass(frozen=True)
class MqttMessage:
    """One received message.

    ``topic`` is relative to the client's prefix (``/`` + absolute topic when
    outside it; the absolute topic without a prefix); ``properties`` holds the
    MQTT v5 properties present (``response_topic``, ``correlation_data``
    (bytes), ``message_expiry_interval`` (s), ``content_type``,
    ``payload_format_indicator``, ``user_properties`` (list of (key, value)));
    empty for MQTT 3.1.1. ``received`` is ``time.monotonic()`` on arrival.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)
    absolute_topic: str = ""
    received: float = 0.0

    @property
    def text(self) -> str:
        """The payload decoded as UTF-8 (raises UnicodeDecodeError, a ValueError)."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises ValueError if it is not)."""
        return json.loads(self.payload.decode("utf-8"))

    @property
    def response_topic(self) -> str | None:
        return self.properties.get("response_topic")

    @property
    def correlation_data(self) -> bytes | None:
        corr = self.properties.get("correlation_data")
        return bytes(corr) if corr is not None else None

    @property
    def expiry_s(self) -> int | None:
        """The v5 message expiry left when it arrived, s (None: none)."""
        expiry = self.properties.get("message_expiry_interval")
        return int(expiry) if expiry is not None else None

    def expired(self, now: float | None = None) -> bool:
        """Past its MQTT v5 message expiry (counted from when it reached us)."""
        if self.expiry_s is None:
            return False
        return (time.monotonic() if now is None else now) >= self.received + self.expiry_s


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


def check_qos(qos: int) -> int:
    """``qos`` if it is 0, 1 or 2; ValueError otherwise."""
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    return qos


__all__ = [
    "PROTOCOLS",
    "MqttMessage",
    "MqttSettings",
    "MqttWill",
    "Payload",
    "check_qos",
    "properties_from_dict",
    "properties_to_dict",
]
