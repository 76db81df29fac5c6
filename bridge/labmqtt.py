"""The MQTT API's settings from lab.yaml's ``mqtt:`` section (:func:`mqtt_settings`) and a
broker URL given on the command line (:func:`parse_broker_url`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from bridge.laberrors import LabConfigError
from bridge.mqttlink import MAX_PAYLOAD_BYTES, ROOT, ApiSettings
from safety.yamldoc import YamlDoc

if TYPE_CHECKING:
    from bridge.labconfig import LabConfig

__all__ = ["mqtt_settings", "parse_broker_url"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
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
    "request_rate",
    "request_burst",
    "queue_size",
)
_TLS_KEYS = ("ca", "insecure")
_URL_OPTIONS = ("password_env", "password_file", "ca", "insecure", "client_id", "protocol")


def _lab_doc(lab: LabConfig) -> tuple[YamlDoc, Path]:
    """The lab file's positions (kept by :func:`load_lab`, for line numbers) and its directory."""
    path = Path(lab.source)
    base = path.resolve().parent if path.is_file() else Path.cwd()
    return lab.doc or YamlDoc(lab.source, error_cls=LabConfigError), base


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


def mqtt_settings(lab: LabConfig, broker: str | None = None) -> ApiSettings:
    """Validate lab.yaml's ``mqtt:`` mapping (and ``broker``, a URL that overrides its ``url``).

    Fields: ``url`` (``mqtt[s]://[user@]host[:port]``), ``username``,
    ``password_env`` or ``password_file`` (never a password inline), ``tls: {ca,
    insecure}``, ``client_id`` (default ``labbridge-<bridge_id>``), ``protocol``
    (``auto``, ``5``, ``3.1.1``), ``keepalive``, ``session_expiry_s`` (0: a clean
    session), ``max_payload_bytes``, ``status_interval_s``, ``request_rate``, ``request_burst``,
    ``queue_size``. Relative paths are
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
    rate = raw.get("request_rate", 20.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 10_000:
        raise doc.error(f"must be a number in (0, 10000], got {rate!r}", (*at, "request_rate"))
    fields["request_rate"] = float(rate)
    fields["request_burst"] = integer("request_burst", 40, 1, 100_000)
    fields["queue_size"] = integer("queue_size", 64, 1, 100_000)
    fields.setdefault("client_id", f"labbridge-{lab.bridge_id}")
    fields["source"] = lab.source
    return ApiSettings(**fields)
