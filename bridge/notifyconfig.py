"""lab.yaml's ``notifications:`` section: who is told when the lab needs a person, and how.

lab.yaml (every field but the channels has a default; docs/notifications.md)::

    notifications:
      page_url: https://lab-pc.example.org:8765/   # the lab page's link in every message
                                  # (default: the page's URL when serve/sim serves it)
      rate_limit_s: 300           # per channel and kind: one message per window, the rest
                                  # folded into one message at the window's end (0: off)
      verification_failures: 3    # unverified results in a row on a station before telling
      queue_size: 100             # messages waiting per channel; more are dropped (counted)
      attempts: 5                 # delivery attempts per message (retried with backoff)
      retry_s: 2                  # the first retry's delay, doubled each time ...
      retry_max_s: 300            # ... up to this
      timeout_s: 10               # one delivery attempt
      station_poll_s: 2           # how often stations are looked at (trips, lost stations)
      webhooks:
        chat:                     # a name (logs, counts)
          url_file: chat.secret   # JSON {"url": "https://..."} (mode 0600): the URL is a secret;
                                  # or url: https://... for one that is not
          events: [trip, estop, station_lost, campaign]   # default: every kind
          stations: [bench-a]     # default: every station
      email:
        oncall:
          host: smtp.example.org
          port: 587               # default: 587 for starttls, 465 for implicit
          tls: starttls           # starttls | implicit | none (none: only to this machine)
          ca: ca.pem              # trust this CA (default: the system's)
          from: labbridge@example.org
          to: [ana@example.org]
          username: labbridge
          password_file: smtp.secret   # JSON {"password": "..."} (mode 0600)
      mqtt:                       # the retained alert topics labbridge/<bridge_id>/<topic>/<kind>
        topic: alerts             # (through the service's own MQTT link)

Event kinds (:data:`KINDS`): ``trip`` (a station tripped), ``estop``, ``station_lost`` (the
service lost a station, or a campaign put one out), ``station_back`` (a station whose node
died rejoined its campaign: ``--rejoin``), ``campaign`` (a campaign ended or
stopped), ``approval`` (a proposal awaits approval), ``verification`` (N unverified results in
a row), ``budget`` (a safety budget spent: a station rests, a proposal refused).

Errors name the file, the line and the field, like every lab.yaml error
(``lab.yaml:31: notifications.email.oncall.tls: ...``). Secrets never sit in lab.yaml: the
password and a secret webhook URL are in files (:class:`bridge.secretfile.SecretFile`:
JSON, refused when others may read them), read when a message goes out.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge.secretfile import SecretFile
from safety.yamldoc import YamlDoc

__all__ = [
    "KINDS",
    "ChannelConfig",
    "EmailConfig",
    "MqttAlertConfig",
    "NotifyConfig",
    "SecretError",
    "WebhookConfig",
    "parse_notifications",
    "read_secret",
]

#: what people are told about (see the module docstring)
KINDS = (
    "trip",
    "estop",
    "station_lost",
    "station_back",
    "campaign",
    "approval",
    "verification",
    "budget",
)
TLS_MODES = ("starttls", "implicit", "none")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_ADDRESS = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")
_TOP = (
    "page_url",
    "rate_limit_s",
    "verification_failures",
    "queue_size",
    "attempts",
    "retry_s",
    "retry_max_s",
    "timeout_s",
    "station_poll_s",
    "webhooks",
    "email",
    "mqtt",
)
_FILTER = ("events", "stations")
_WEBHOOK = ("url", "url_file", *_FILTER)
_EMAIL = ("host", "port", "tls", "ca", "from", "to", "username", "password_file", *_FILTER)
_MQTT = ("topic", *_FILTER)
_SECRETS = ("password", "secret", "token", "api_key")


class SecretError(ValueError):
    """A secret file that cannot be used (the message names the file and what to do)."""


@dataclass(frozen=True)
class ChannelConfig:
    """What one channel is told: event kinds, and stations (None: every station)."""

    name: str
    events: frozenset[str] = frozenset(KINDS)
    stations: frozenset[str] | None = None
    #: where in lab.yaml (for the check's messages)
    at: tuple[Any, ...] = ()

    def wants(self, kind: str, stations: Sequence[str]) -> bool:
        """Whether a message of ``kind`` about ``stations`` (empty: the lab) goes here."""
        if kind not in self.events:
            return False
        return self.stations is None or not stations or bool(self.stations & set(stations))


@dataclass(frozen=True)
class WebhookConfig(ChannelConfig):
    """An HTTP POST of JSON (``text`` plus structured fields) to ``url`` or ``url_file``'s."""

    url: str | None = None
    url_file: Path | None = None


@dataclass(frozen=True)
class EmailConfig(ChannelConfig):
    """SMTP with TLS (STARTTLS or implicit), the password from ``password_file``."""

    host: str = ""
    port: int = 587
    tls: str = "starttls"
    ca: Path | None = None
    sender: str = ""
    to: tuple[str, ...] = ()
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class MqttAlertConfig(ChannelConfig):
    """Retained alerts on ``labbridge/<bridge_id>/<topic>/<kind>`` over the service's link."""

    topic: str = "alerts"


@dataclass(frozen=True)
class NotifyConfig:
    """A validated ``notifications:`` section (see the module docstring)."""

    source: str = "<lab>"
    page_url: str | None = None
    rate_limit_s: float = 300.0
    verification_failures: int = 3
    queue_size: int = 100
    attempts: int = 5
    retry_s: float = 2.0
    retry_max_s: float = 300.0
    timeout_s: float = 10.0
    station_poll_s: float = 2.0
    webhooks: tuple[WebhookConfig, ...] = ()
    email: tuple[EmailConfig, ...] = ()
    mqtt: MqttAlertConfig | None = None
    doc: YamlDoc | None = field(default=None, repr=False, compare=False)

    @property
    def channels(self) -> list[ChannelConfig]:
        return [*self.webhooks, *self.email, *([self.mqtt] if self.mqtt else [])]

    def check(self, has_mqtt: bool) -> tuple[list[str], list[str]]:
        """``labbridge check``: (problems, notes). Problems: a secret file that is missing,
        unreadable, open to others or without its field. Notes: what each channel sends."""
        problems: list[str] = []
        notes: list[str] = []
        for ch in self.channels:
            what = ", ".join(k for k in KINDS if k in ch.events)
            where = f"stations {', '.join(sorted(ch.stations))}" if ch.stations else "every station"
            if isinstance(ch, WebhookConfig):
                notes.append(f"notifications: webhook {ch.name} ({what}; {where})")
                if ch.url_file is not None:
                    problems += self._secret_problem(ch.url_file, "url", (*ch.at, "url_file"))
            elif isinstance(ch, EmailConfig):
                notes.append(
                    f"notifications: e-mail {ch.name} via {ch.host}:{ch.port} ({ch.tls}) to "
                    f"{', '.join(ch.to)} ({what}; {where})"
                )
                if ch.password_file is not None:
                    problems += self._secret_problem(
                        ch.password_file, "password", (*ch.at, "password_file")
                    )
                if ch.ca is not None and not ch.ca.is_file():
                    problems.append(self._error(f"no CA file {ch.ca}", (*ch.at, "ca")))
            elif isinstance(ch, MqttAlertConfig):
                notes.append(
                    f"notifications: MQTT retained alerts on labbridge/<bridge_id>/{ch.topic}/"
                    f"<kind> ({what}; {where})"
                )
                if not has_mqtt:
                    notes.append(
                        "notifications.mqtt: this lab.yaml has no mqtt.url: the alerts go out "
                        "only when `labbridge serve --broker URL` (or `labbridge sim`) runs the "
                        "service with its MQTT link; `labbridge mcp` has none and sends no "
                        "MQTT alerts"
                    )
        if not self.channels:
            notes.append("notifications: no channel (webhooks, email, mqtt): nobody is told")
        return problems, notes

    def _secret_problem(self, path: Path, key: str, at: tuple[Any, ...]) -> list[str]:
        try:
            read_secret(path, key)
        except SecretError as exc:
            return [self._error(str(exc), at)]
        return []

    def _error(self, problem: str, at: tuple[Any, ...]) -> str:
        if self.doc is not None:
            return str(self.doc.error(problem, at))
        return f"{self.source}: {'.'.join(map(str, at))}: {problem}"


# ================================================================= secret files
_secret_files: dict[tuple[Path, str], SecretFile[str]] = {}


def read_secret(path: Path, key: str) -> str:
    """``key`` of the JSON object in the private file ``path`` (read again when it changes;
    raises :class:`SecretError` naming the file and the fix)."""
    found = _secret_files.get((path, key))
    if found is None:
        fix = f'write {{"{key}": "..."}} into it (chmod 600)'

        def parse(data: Any) -> str:
            value = data.get(key) if isinstance(data, dict) else None
            if not isinstance(value, str) or not value:
                raise SecretError(f"the secret file {path} has no {key!r}: {fix}")
            return value

        def missing() -> str:
            raise SecretError(f"no secret file {path}: {fix}")

        found = SecretFile(
            path,
            what="the secret file",
            parse=parse,
            missing=missing,
            error_cls=SecretError,
            fix=fix,
        )
        _secret_files[(path, key)] = found
    return found.load()


# ====================================================================== parsing
def _mapping(
    value: Any, at: tuple[Any, ...], doc: YamlDoc, allowed: tuple[str, ...] | None
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise doc.error(f"must be a mapping, got {type(value).__name__}", at)
    for key in value:
        if key in _SECRETS:
            raise doc.error(
                "secrets are never inline in the lab config: put it in a file readable only by "
                "the service (password_file, url_file)",
                (*at, key),
            )
        if allowed is not None and key not in allowed:
            raise doc.error(f"unknown field '{key}' (known: {', '.join(allowed)})", (*at, key))
    return dict(value)


def _number(
    raw: Mapping[str, Any],
    key: str,
    default: float,
    at: tuple[Any, ...],
    doc: YamlDoc,
    *,
    low: float = 0.0,
    zero: bool = False,
) -> float:
    value = raw.get(key, default)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value >= low if zero else value > low)
    )
    if not ok:
        bound = f">= {low:g}" if zero else f"> {low:g}"
        raise doc.error(f"must be a number {bound} (seconds), got {value!r}", (*at, key))
    return float(value)


def _integer(
    raw: Mapping[str, Any],
    key: str,
    default: int,
    low: int,
    high: int,
    at: tuple[Any, ...],
    doc: YamlDoc,
) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise doc.error(f"must be an integer in {low}..{high}, got {value!r}", (*at, key))
    return value


def _text(
    raw: Mapping[str, Any],
    key: str,
    at: tuple[Any, ...],
    doc: YamlDoc,
    what: str,
    *,
    required: bool = False,
) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise doc.error(f"missing field '{key}' ({what})", at)
        return None
    if not isinstance(value, str) or not value.strip():
        raise doc.error(f"must be {what}, got {value!r}", (*at, key))
    return value.strip()


def _path(
    raw: Mapping[str, Any], key: str, at: tuple[Any, ...], doc: YamlDoc, base: Path, what: str
) -> Path | None:
    value = _text(raw, key, at, doc, what)
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _filters(
    raw: Mapping[str, Any], at: tuple[Any, ...], doc: YamlDoc, stations: Sequence[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    events = raw.get("events")
    if events is not None:
        if not isinstance(events, list) or not events:
            raise doc.error(f"must be a list of event kinds ({', '.join(KINDS)})", (*at, "events"))
        for i, kind in enumerate(events):
            if kind not in KINDS:
                raise doc.error(
                    f"unknown event kind {kind!r} (kinds: {', '.join(KINDS)})", (*at, "events", i)
                )
        out["events"] = frozenset(events)
    names = raw.get("stations")
    if names is not None:
        if not isinstance(names, list) or not names:
            raise doc.error("must be a list of station names", (*at, "stations"))
        for i, name in enumerate(names):
            if name not in stations:
                raise doc.error(
                    f"no station {name!r} in this lab (stations: {', '.join(stations)})",
                    (*at, "stations", i),
                )
        out["stations"] = frozenset(names)
    return out


def _channels(raw: Any, at: tuple[Any, ...], doc: YamlDoc) -> dict[str, Any]:
    data = _mapping(raw, at, doc, None)
    for name in data:
        if not isinstance(name, str) or not _NAME.match(name):
            raise doc.error(f"{name!r} is not a channel name (letters, digits, _ . -)", (*at, name))
    return data


def _webhook(
    name: str, raw: Any, at: tuple[Any, ...], doc: YamlDoc, base: Path, stations: Sequence[str]
) -> WebhookConfig:
    data = _mapping(raw, at, doc, _WEBHOOK)
    url = _text(data, "url", at, doc, "an http(s):// URL")
    url_file = _path(data, "url_file", at, doc, base, 'a file path (JSON {"url": ...})')
    if (url is None) == (url_file is None):
        raise doc.error("give the URL one way: url, or url_file (when the URL is a secret)", at)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise doc.error(f"{url!r} is not an http:// or https:// URL", (*at, "url"))
        if parts.password is not None:
            raise doc.error(
                "a password in the URL would show in logs: put the URL in url_file", (*at, "url")
            )
    return WebhookConfig(
        name, at=at, url=url, url_file=url_file, **_filters(data, at, doc, stations)
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _email(
    name: str, raw: Any, at: tuple[Any, ...], doc: YamlDoc, base: Path, stations: Sequence[str]
) -> EmailConfig:
    data = _mapping(raw, at, doc, _EMAIL)
    host = _text(data, "host", at, doc, "the SMTP server's host name", required=True)
    assert host is not None
    tls = data.get("tls", "starttls")
    if tls not in TLS_MODES:
        raise doc.error(
            f"must be starttls (port 587), implicit (port 465) or none, got {tls!r}", (*at, "tls")
        )
    if tls == "none" and not _loopback(host):
        raise doc.error(
            "plain SMTP would send the password and the lab's alerts in clear: use starttls or "
            "implicit (none is for a relay on this machine only: localhost, 127.0.0.1)",
            (*at, "tls"),
        )
    port = _integer(data, "port", 465 if tls == "implicit" else 587, 1, 65535, at, doc)
    sender = _text(data, "from", at, doc, "an e-mail address", required=True)
    assert sender is not None
    if not _ADDRESS.match(sender):
        raise doc.error(f"{sender!r} is not an e-mail address", (*at, "from"))
    to = data.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise doc.error("must be a list of e-mail addresses", (*at, "to"))
    for i, address in enumerate(to):
        if not isinstance(address, str) or not _ADDRESS.match(address):
            raise doc.error(f"{address!r} is not an e-mail address", (*at, "to", i))
    username = _text(data, "username", at, doc, "a user name")
    password_file = _path(
        data, "password_file", at, doc, base, 'a file path (JSON {"password": ...})'
    )
    if (username is None) != (password_file is None):
        raise doc.error("a login needs both username and password_file (or neither)", at)
    if tls == "none" and password_file is not None:
        raise doc.error("a password is never sent over plain SMTP: use starttls or implicit", at)
    return EmailConfig(
        name,
        at=at,
        host=host,
        port=port,
        tls=str(tls),
        ca=_path(data, "ca", at, doc, base, "a CA certificate file (PEM)"),
        sender=sender,
        to=tuple(to),
        username=username,
        password_file=password_file,
        **_filters(data, at, doc, stations),
    )


def parse_notifications(
    value: Any, doc: YamlDoc, base: Path, stations: Sequence[str]
) -> NotifyConfig | None:
    """Validate lab.yaml's ``notifications:`` (None when absent); errors name file, line, field."""
    if value is None:
        return None
    at: tuple[Any, ...] = ("notifications",)
    raw = _mapping(value, at, doc, _TOP)
    page_url = _text(raw, "page_url", at, doc, "the lab page's URL (http(s)://host:port/)")
    if page_url is not None:
        parts = urlsplit(page_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise doc.error(f"{page_url!r} is not an http:// or https:// URL", (*at, "page_url"))
    webhooks = tuple(
        _webhook(n, v, (*at, "webhooks", n), doc, base, stations)
        for n, v in _channels(raw.get("webhooks") or {}, (*at, "webhooks"), doc).items()
    )
    email = tuple(
        _email(n, v, (*at, "email", n), doc, base, stations)
        for n, v in _channels(raw.get("email") or {}, (*at, "email"), doc).items()
    )
    names = [c.name for c in (*webhooks, *email)]
    for c in (*webhooks, *email):
        if names.count(c.name) > 1:
            raise doc.error(f"two channels named {c.name!r} (webhooks and email)", c.at)
    mqtt = None
    if raw.get("mqtt") is not None:
        mat = (*at, "mqtt")
        mraw = _mapping(raw["mqtt"], mat, doc, _MQTT)
        topic = _text(mraw, "topic", mat, doc, "a topic below labbridge/<bridge_id>/") or "alerts"
        if not _TOPIC.match(topic):
            raise doc.error(
                f"{topic!r} is not a topic of plain levels (letters, digits, _ . -, no + or #)",
                (*mat, "topic"),
            )
        mqtt = MqttAlertConfig("mqtt", at=mat, topic=topic, **_filters(mraw, mat, doc, stations))
    retry_s = _number(raw, "retry_s", 2.0, at, doc)
    retry_max_s = _number(raw, "retry_max_s", max(300.0, retry_s), at, doc)
    if retry_max_s < retry_s:
        raise doc.error(
            f"must be >= retry_s ({retry_s:g}), got {retry_max_s:g}", (*at, "retry_max_s")
        )
    return NotifyConfig(
        source=doc.source,
        page_url=page_url,
        rate_limit_s=_number(raw, "rate_limit_s", 300.0, at, doc, zero=True),
        verification_failures=_integer(raw, "verification_failures", 3, 1, 1000, at, doc),
        queue_size=_integer(raw, "queue_size", 100, 1, 100_000, at, doc),
        attempts=_integer(raw, "attempts", 5, 1, 100, at, doc),
        retry_s=retry_s,
        retry_max_s=retry_max_s,
        timeout_s=_number(raw, "timeout_s", 10.0, at, doc),
        station_poll_s=_number(raw, "station_poll_s", 2.0, at, doc),
        webhooks=webhooks,
        email=email,
        mqtt=mqtt,
        doc=doc,
    )


def notifications_from(path: Path) -> str:
    """The ``notifications:`` section of the YAML file ``path`` (a lab.yaml, or a file with
    just that section) as lab.yaml text, its files (``url_file``, ``password_file``, ``ca``)
    made absolute from ``path``'s folder: ``labbridge sim --notify`` adds it to the lab.yaml it
    writes, where :func:`parse_notifications` validates it."""
    import yaml

    from safety.yamldoc import ConfigError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not YAML: {' '.join(str(exc).split())}", source=str(path)) from None
    section = data.get("notifications") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ConfigError("no 'notifications:' mapping in it", source=str(path))
    base = path.resolve().parent
    for kind in ("webhooks", "email"):
        channels = section.get(kind)
        for channel in channels.values() if isinstance(channels, dict) else ():
            for key in ("url_file", "password_file", "ca"):
                value = channel.get(key) if isinstance(channel, dict) else None
                if isinstance(value, str) and not Path(value).expanduser().is_absolute():
                    channel[key] = str(base / value)
    return yaml.safe_dump({"notifications": section}, sort_keys=False)
