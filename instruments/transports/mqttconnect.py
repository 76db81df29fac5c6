"""Opening and closing one paho client: the blocking half of the shared MQTT client.

:func:`new_client` builds and configures a paho client from
:class:`~instruments.transports.mqttdata.MqttSettings` (it reads the CA and password
files), :func:`connect_blocking` connects it and starts paho's network thread,
:func:`stop_client_blocking` disconnects it and joins that thread. All three block: the
:class:`~instruments.transports.mqttclient.MqttClient` runs them on its
:class:`~instruments.transports.base.DeviceWorker`. :func:`refusal_text` says what a
refused CONNACK means.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from instruments.errors import TransportOpenError
from instruments.transports.mqttdata import PROTOCOLS, MqttSettings

# CONNACK reason codes that mean "bad credentials / not allowed" (v5 and v3 mapped to v5).
NOT_AUTHORISED = {0x86, 0x87, 0x8C}
UNSUPPORTED_PROTOCOL = 0x84


class ConnectFailed(Exception):
    """The TCP or TLS connect failed: ``what`` (a phrase naming the step) and ``detail``."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle on the broker link: a command and its ack are small messages, and
    Nagle + delayed ACK would add ~40 ms to every back-to-back pair on loopback or a LAN."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_client(s: MqttSettings, client_id: str, protocol: str, name: str) -> paho.Client:
    """A paho client configured from ``s`` (no callbacks yet). Blocking: reads CA/password files.

    ``name`` names the link in a :class:`TransportOpenError` (an unreadable CA file).
    """
    version = PROTOCOLS[protocol]
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=version,
        clean_session=s.session_expiry_s == 0 if version != paho.MQTTv5 else None,
    )
    client.connect_timeout = s.timeout_s
    client.reconnect_delay_set(s.reconnect_min_s, s.reconnect_max_s)  # type: ignore[arg-type]
    client.on_socket_open = _no_delay
    if s.username:
        client.username_pw_set(s.username, s.password())
    if s.tls:
        try:
            context = ssl.create_default_context(cafile=str(s.ca) if s.ca is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise TransportOpenError(name, f"cannot load CA file {s.ca}: {exc}") from None
        client.tls_set_context(context)
        client.tls_insecure_set(s.insecure)
    if s.will is not None:
        client.will_set(s.will.topic, s.will.payload, s.will.qos, s.will.retain)
    return client


def connect_blocking(client: paho.Client, s: MqttSettings, protocol: str) -> None:
    """TCP (+TLS) connect and send CONNECT, then start paho's network thread. Worker thread.

    A failure is re-raised as a fresh :class:`ConnectFailed` outside the
    ``except`` block: the original traceback holds paho's half-open socket
    (paho does not close it when the TLS handshake fails), and dropping the
    traceback closes it now instead of at the next garbage collection.
    """
    failure: tuple[str, str] | None = None
    try:
        if protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            if s.session_expiry_s > 0:
                props.SessionExpiryInterval = s.session_expiry_s
            if s.max_packet_bytes is not None:
                props.MaximumPacketSize = s.max_packet_bytes
            client.connect(
                s.host,
                s.port,
                s.keepalive,
                clean_start=s.session_expiry_s == 0,
                properties=props,
            )
        else:
            client.connect(s.host, s.port, s.keepalive)
    except ssl.SSLError as exc:
        failure = ("TLS handshake failed with the broker at", str(exc))
    except OSError as exc:
        failure = (
            "cannot connect to the broker at",
            exc.strerror or str(exc) or type(exc).__name__,
        )
    if failure is not None:
        raise ConnectFailed(*failure)
    client.loop_start()


def stop_client_blocking(client: paho.Client) -> None:
    """Disconnect, join paho's thread and close its sockets (worker thread)."""
    with contextlib.suppress(Exception):
        client.disconnect()
    client.loop_stop()
    # paho closes its wake-up socket pair only in __del__: close it now so
    # no file descriptor outlives close().
    reset = getattr(client, "_reset_sockets", None)
    if reset is not None:
        reset()


def refusal_text(s: MqttSettings, reason: ReasonCode, protocol: str) -> str:
    """What a refused CONNACK (``reason``, for MQTT ``protocol``) means, for an error message."""
    if reason.value in NOT_AUTHORISED:
        who = f"user {s.username!r}" if s.username else "anonymous clients"
        return f"broker refused the connection: not authorised ({reason}; check the credentials of {who})"
    if reason.value == UNSUPPORTED_PROTOCOL:
        return f"broker refused MQTT v{protocol} ({reason}); try ?protocol=3.1.1"
    return f"broker refused the connection: {reason}"
