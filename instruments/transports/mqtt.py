"""MQTT pub/sub transport: ``mqtt://`` URLs on the shared paho client (:mod:`.mqttclient`).

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

Threads, reconnects and re-subscription are :class:`~.mqttclient.MqttClient`'s
(see its module): paho's callbacks never run user code on paho's thread, and
``connected`` / :meth:`MqttTransport.on_connection_change` report the link state.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from urllib.parse import unquote, urlsplit

from instruments.errors import InvalidURLError
from instruments.transports.base import Transport, URLOptions, split_url
from instruments.transports.mqttclient import (
    PROTOCOLS,
    MqttClient,
    MqttMessage,
    MqttSettings,
    properties_from_dict,
    properties_to_dict,
)

log = logging.getLogger(__name__)


def _redact(url: str) -> str:
    """The URL with an inline password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _settings(url: str, shown: str) -> tuple[MqttSettings, str]:
    """``url`` -> (settings, topic prefix); raises :class:`InvalidURLError` naming ``shown``."""
    scheme, _, raw_opts = split_url(url)
    if scheme not in MqttTransport.schemes:
        raise InvalidURLError(shown, f"scheme {scheme!r} is not mqtt:// or mqtts://")
    tls = scheme == "mqtts"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise InvalidURLError(shown, "the port is not a number in 0..65535") from None
    if not parts.hostname:
        raise InvalidURLError(shown, "no broker host (expected mqtt://host:port/prefix)")
    prefix = parts.path.strip("/")
    if "+" in prefix or "#" in prefix:
        raise InvalidURLError(
            shown, f"topic prefix {prefix!r} must not contain the wildcards '+' or '#'"
        )
    inline = unquote(parts.password) if parts.password is not None else None
    opts = URLOptions(shown, raw_opts)
    ca = opts.optional_str("ca")
    password_file = opts.optional_str("password_file")
    settings = MqttSettings(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        inline_password=inline,
        client_id=opts.str("client_id", f"labbridge-{secrets.token_hex(4)}"),
        protocol=opts.choice("protocol", "auto", ("auto", *PROTOCOLS)),
        keepalive=opts.int("keepalive", 30),
        timeout_s=opts.float("timeout", 5.0),
        ca=Path(ca) if ca is not None else None,
        insecure=opts.bool("insecure", False),
        password_env=opts.optional_str("password_env"),
        password_file=Path(password_file) if password_file is not None else None,
        reconnect_min_s=opts.float("reconnect_min", 0.2),
        reconnect_max_s=opts.float("reconnect_max", 5.0),
    )
    opts.finish()
    s = settings
    if s.keepalive < 1:
        raise InvalidURLError(shown, "keepalive must be at least 1 s")
    if s.timeout_s <= 0:
        raise InvalidURLError(shown, "timeout must be > 0")
    if s.reconnect_min_s <= 0 or s.reconnect_max_s < s.reconnect_min_s:
        raise InvalidURLError(shown, "need 0 < reconnect_min <= reconnect_max")
    if not tls and (s.ca is not None or s.insecure):
        raise InvalidURLError(shown, "options ca/insecure need mqtts://")
    sources = [x for x in (inline, s.password_env, s.password_file) if x is not None]
    if len(sources) > 1:
        raise InvalidURLError(
            shown, "give the password one way: inline, password_env or password_file"
        )
    if sources and not s.username:
        raise InvalidURLError(shown, "a password needs a user name (mqtt://user@host/...)")
    if inline is not None:
        log.warning(
            "%s: password given inline in the URL; prefer ?password_env= or ?password_file=",
            shown,
        )
    return settings, prefix


class MqttTransport(Transport, MqttClient):
    """An MQTT client link: ``publish``, ``subscribe`` (asyncio queues), Last Will, auto-reconnect.

    See the module docstring for the URL; the client part (topics, publish,
    subscribe, the will, connection state) is :class:`MqttClient`'s. Topics are
    relative to the URL's prefix unless they start with ``/``.
    """

    schemes = ("mqtt", "mqtts")

    def __init__(self, url: str) -> None:
        Transport.__init__(self, _redact(url))
        settings, prefix = _settings(url, self.url)
        MqttClient.__init__(self, settings, prefix=prefix, name=self.url)

    async def _open(self) -> None:
        await self.connect()

    async def _close(self) -> None:
        await self.disconnect()


__all__ = [
    "PROTOCOLS",
    "MqttMessage",
    "MqttTransport",
    "properties_from_dict",
    "properties_to_dict",
]
