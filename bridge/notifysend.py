"""What a notification says and how it goes out: :class:`Alert`, the service's events as
alerts (:func:`alert_for`), and the channels (:class:`Webhook`, :class:`Email`,
:class:`MqttAlerts`), each with one ``deliver`` that raises :class:`DeliveryFailed`.

The queueing, rate limits, retries and station watching are :mod:`bridge.notify`'s.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from bridge.mqttlink import ApiError, MqttLink, dumps, topic_root
from bridge.notifyconfig import (
    ChannelConfig,
    EmailConfig,
    MqttAlertConfig,
    NotifyConfig,
    SecretError,
    WebhookConfig,
    read_secret,
)

log = logging.getLogger(__name__)

__all__ = [
    "Alert",
    "Channel",
    "DeliveryFailed",
    "Email",
    "MqttAlerts",
    "Webhook",
    "alert_for",
    "fold",
    "make_channels",
]

#: campaign states after which a campaign takes no more work (bridge.service.ENDED)
ENDED = ("done", "stopped", "aborted", "error")
#: what a kind is called in a folded message ("3 trips")
KIND_WORDS = {
    "trip": ("trip", "trips"),
    "estop": ("e-stop", "e-stops"),
    "station_lost": ("lost station", "lost stations"),
    "station_back": ("station back", "stations back"),
    "campaign": ("campaign end", "campaign ends"),
    "approval": ("proposal awaiting approval", "proposals awaiting approval"),
    "verification": ("verification alert", "verification alerts"),
    "budget": ("budget alert", "budget alerts"),
}
#: a folded message names at most this many of the alerts it stands for
FOLD_LIST = 5


@dataclass(frozen=True)
class Alert:
    """One thing a person should know: ``kind`` (notifyconfig.KINDS), a one-line ``title``,
    the ``stations`` it is about (empty: the lab), the campaign and experiment, when (wall
    clock), the lab page's view of it (``view``: ``#/lab``, ``#/campaign/<id>``), and, for a
    message standing for several alerts, how many (``folded``) and since when."""

    kind: str
    title: str
    stations: tuple[str, ...] = ()
    campaign_id: str | None = None
    experiment_id: str | None = None
    t: float = field(default_factory=time.time)
    view: str = "#/lab"
    folded: int = 0
    since: float | None = None
    #: set by the notifier: the bridge and the page's URL of ``view``
    bridge_id: str = ""
    url: str | None = None

    @property
    def text(self) -> str:
        """The chat line: ``[bridge] title — url``."""
        link = f" — {self.url}" if self.url else ""
        return f"[{self.bridge_id}] {self.title}{link}"

    def as_dict(self) -> dict[str, Any]:
        """The JSON of a webhook POST and an MQTT alert: ``text`` (what chat tools show) and
        the structured fields."""
        return {
            "text": self.text,
            "kind": self.kind,
            "title": self.title,
            "bridge_id": self.bridge_id,
            "stations": list(self.stations),
            "campaign_id": self.campaign_id,
            "experiment_id": self.experiment_id,
            "url": self.url,
            "t": self.t,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t)),
            "folded": self.folded,
            "since": self.since,
        }


def fold(held: Sequence[Alert]) -> Alert:
    """One message for the alerts a rate limit held back: how many, since when, which."""
    if len(held) == 1:
        return replace(held[0], folded=1, since=held[0].t)
    first, last = held[0], held[-1]
    one, many = KIND_WORDS.get(first.kind, (first.kind, first.kind))
    names = "; ".join(a.title for a in held[-FOLD_LIST:])
    more = f" (the last {FOLD_LIST}: {names})" if len(held) > FOLD_LIST else f": {names}"
    since = time.strftime("%H:%M:%S", time.localtime(first.t))
    stations = tuple(dict.fromkeys(s for a in held for s in a.stations))
    campaigns = {a.campaign_id for a in held}
    return replace(
        last,
        title=f"{len(held)} {many if len(held) > 1 else one} since {since}{more}",
        stations=stations,
        campaign_id=last.campaign_id if len(campaigns) == 1 else None,
        experiment_id=None,
        view=last.view if len({a.view for a in held}) == 1 else "#/lab",
        folded=len(held),
        since=first.t,
    )


# ====================================================================== events
def alert_for(
    event: Mapping[str, Any], campaigns: Mapping[str, Sequence[str]], verification_failures: int
) -> Alert | None:
    """The alert for one service event (``campaigns``: each campaign's stations), or None.

    Service events (:meth:`bridge.service.LabService.add_listener`) and the notifier's
    own station watch (``_tripped``, ``_lost``)."""
    kind = event.get("event")
    cid = event.get("campaign_id")
    cid = str(cid) if cid else None
    station = str(event.get("station") or "") or None
    mine = (station,) if station else tuple(campaigns.get(cid or "", ()))
    at_campaign = f"#/campaign/{cid}" if cid else "#/lab"
    reason = str(event.get("reason") or "no reason given")
    if kind == "_tripped":
        return Alert("trip", f"station {station} tripped: {reason}", mine)
    if kind == "_lost":
        return Alert("station_lost", f"the service lost station {station}: {reason}", mine)
    if kind == "estop":
        tripped = tuple(str(s) for s in (event.get("stations") or {}))
        who = event.get("who") or "?"
        return Alert("estop", f"e-stop by {who}: {reason} ({len(tripped)} station(s))", tripped)
    if kind == "station" and event.get("state") == "out" and "e-stop by " not in reason:
        return Alert(
            "station_lost",
            f"station {station} is out of campaign {cid}: {reason}",
            mine,
            cid,
            view=at_campaign,
        )
    if kind == "station" and event.get("state") == "rejoined":  # serve/run --rejoin
        return Alert(
            "station_back",
            f"station {station} is back in campaign {cid}: {reason}",
            mine,
            cid,
            view=at_campaign,
        )
    if kind == "station" and event.get("state") == "paused" and "budget spent" in reason:
        return Alert(
            "budget",
            f"station {station} rests in campaign {cid}: {reason}",
            mine,
            cid,
            view=at_campaign,
        )
    if kind == "rejected":
        reasons = [str(r) for r in event.get("reasons") or []]
        if reasons and all(r.startswith("budget ") for r in reasons):  # stationledger.window_text
            eid = event.get("experiment_id")
            return Alert(
                "budget",
                f"proposal {eid} by {event.get('proposer') or '?'} in campaign {cid} refused: "
                + "; ".join(reasons),
                mine,
                cid,
                str(eid) if eid else None,
                view=f"#/experiment/{eid}" if eid else at_campaign,
            )
        return None
    if kind == "campaign" and event.get("state") in ENDED:
        state = str(event.get("state"))
        said = reason if reason.startswith(f"{state}:") else f"{state}: {reason}"
        return Alert("campaign", f"campaign {cid} {said}", mine, cid, view=at_campaign)
    if kind == "awaiting_approval":
        eid = event.get("experiment_id")
        rules = "; ".join(str(r) for r in event.get("rules") or []) or "an approval rule"
        expires = event.get("expires_t")
        until = (
            f"; expires {time.strftime('%H:%M:%S', time.localtime(float(expires)))}"
            if isinstance(expires, int | float)
            else ""
        )
        return Alert(
            "approval",
            f"proposal {eid} by {event.get('proposer') or '?'} in campaign {cid} awaits "
            f"approval ({rules}){until}",
            mine,
            cid,
            str(eid) if eid else None,
            view=at_campaign,
        )
    if kind == "unverified":
        n = int(event.get("in_a_row") or 0)
        if n < verification_failures or n % verification_failures:
            return None
        return Alert(
            "verification",
            f"station {station}: {n} results in a row failed verification in campaign {cid} "
            f"(last: {reason})",
            mine,
            cid,
            view=at_campaign,
        )
    return None


# ==================================================================== channels
class DeliveryFailed(Exception):
    """One delivery attempt failed: a one-line ``reason``; ``retry``: worth trying again."""

    def __init__(self, reason: str, *, retry: bool = True) -> None:
        super().__init__(reason)
        self.retry = retry


class Channel:
    """One way of telling people (``config``: its name and filters)."""

    kind = "channel"

    def __init__(self, config: ChannelConfig, settings: NotifyConfig) -> None:
        self.config = config
        self.settings = settings

    @property
    def name(self) -> str:
        return self.config.name

    async def open(self) -> None:
        return None

    async def deliver(self, alert: Alert) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def _where(url: str) -> str:
    """A URL as logs may show it: scheme, host and port (a webhook's path is often its key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/..."


class Webhook(Channel):
    """HTTP POST of the alert's JSON (:meth:`Alert.as_dict`: ``text`` for chat tools such as
    Slack's or Mattermost's incoming webhooks, and the structured fields). 2xx: delivered;
    408, 429, 5xx and network errors: retried; any other status: refused, not retried."""

    kind = "webhook"
    config: WebhookConfig

    def __init__(self, config: WebhookConfig, settings: NotifyConfig) -> None:
        super().__init__(config, settings)
        self._client: Any = None

    async def open(self) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(timeout=self.settings.timeout_s, trust_env=False)

    def _url(self) -> str:
        if self.config.url is not None:
            return self.config.url
        assert self.config.url_file is not None
        try:
            return read_secret(self.config.url_file, "url")
        except SecretError as exc:
            raise DeliveryFailed(str(exc), retry=False) from None

    async def deliver(self, alert: Alert) -> None:
        import httpx2

        if self._client is None:
            raise DeliveryFailed("the webhook channel is closed", retry=False)
        url = self._url()
        try:
            response = await self._client.post(url, json=alert.as_dict())
        except httpx2.HTTPError as exc:
            raise DeliveryFailed(
                f"POST to {_where(url)} failed: {type(exc).__name__}: {exc}".rstrip(": ")
            ) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        said = " ".join(response.text.split())[:120]
        retry = status in (408, 429) or status >= 500
        raise DeliveryFailed(
            f"{_where(url)} answered HTTP {status}{f' ({said})' if said else ''}"
            + ("" if retry else ": refused, not retried (check the webhook's URL)"),
            retry=retry,
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class Email(Channel):
    """A message to ``to`` over SMTP (aiosmtplib) with STARTTLS or implicit TLS, logged in
    with ``username`` and the password in ``password_file``. A refused login or recipients
    are not retried; a network error, a timeout or a temporary refusal is."""

    kind = "email"
    config: EmailConfig

    def __init__(self, config: EmailConfig, settings: NotifyConfig) -> None:
        super().__init__(config, settings)
        self._tls: ssl.SSLContext | None = None
        self._broken: str | None = None

    async def open(self) -> None:
        """The TLS context (a CA file that cannot be used: every message is refused, logged;
        the lab goes on)."""
        if self.config.tls == "none":
            return
        ca = self.config.ca
        try:
            self._tls = ssl.create_default_context(cafile=str(ca) if ca else None)
        except (OSError, ssl.SSLError) as exc:
            self._broken = f"notifications.email.{self.name}.ca: cannot use {ca}: {exc}"
            log.error("notifications: %s: no e-mail will go out", self._broken)

    def message(self, alert: Alert) -> EmailMessage:
        msg = EmailMessage()
        subject = f"[labbridge {alert.bridge_id}] {alert.title}"
        msg["Subject"] = subject if len(subject) <= 200 else subject[:197] + "..."
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.to)
        msg["Date"] = email.utils.formatdate(alert.t, localtime=True)
        msg["Message-ID"] = email.utils.make_msgid("labbridge", self.config.sender.split("@")[-1])
        lines = [alert.title, ""]
        if alert.url:
            lines += [f"The lab page: {alert.url}", ""]
        facts = {
            "kind": alert.kind,
            "stations": ", ".join(alert.stations),
            "campaign": alert.campaign_id,
            "experiment": alert.experiment_id,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(alert.t)),
            "folded": (
                f"{alert.folded} alert(s) since "
                f"{time.strftime('%H:%M:%S', time.localtime(alert.since or alert.t))} "
                "(rate limit)"
                if alert.folded
                else None
            ),
        }
        lines += [f"{k}: {v}" for k, v in facts.items() if v]
        lines += ["", f"-- labbridge {alert.bridge_id} (lab.yaml notifications.email.{self.name})"]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    async def deliver(self, alert: Alert) -> None:
        import aiosmtplib

        cfg = self.config
        if self._broken is not None:
            raise DeliveryFailed(self._broken, retry=False)
        password = None
        if cfg.password_file is not None:
            try:
                password = read_secret(cfg.password_file, "password")
            except SecretError as exc:
                raise DeliveryFailed(str(exc), retry=False) from None
        where = f"SMTP {cfg.host}:{cfg.port}"
        try:
            await aiosmtplib.send(
                self.message(alert),
                hostname=cfg.host,
                port=cfg.port,
                username=cfg.username,
                password=password,
                use_tls=cfg.tls == "implicit",
                start_tls=cfg.tls == "starttls",
                tls_context=self._tls,
                timeout=self.settings.timeout_s,
            )
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryFailed(
                f"{where} refused the login of {cfg.username}: {exc.code} {exc.message}: not "
                f"retried (check username and {cfg.password_file})",
                retry=False,
            ) from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            said = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            raise DeliveryFailed(f"{where} refused the recipients: {said}", retry=False) from None
        except aiosmtplib.SMTPResponseException as exc:
            retry = not 500 <= exc.code < 600  # 4xx: try later; 5xx: permanent
            raise DeliveryFailed(f"{where}: {exc.code} {exc.message}", retry=retry) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"{where}: {type(exc).__name__}: {exc}") from None


class MqttAlerts(Channel):
    """The alert's JSON, retained (QoS 1, waiting for the broker's PUBACK), on
    ``labbridge/<bridge_id>/<topic>/<kind>`` through the service's own MQTT link: a
    subscriber that connects later still sees the newest alert of each kind."""

    kind = "mqtt"
    config: MqttAlertConfig

    def __init__(self, config: MqttAlertConfig, settings: NotifyConfig, link: MqttLink) -> None:
        super().__init__(config, settings)
        self.link = link

    def topic(self, bridge_id: str, kind: str) -> str:
        return f"{topic_root(bridge_id)}/{self.config.topic}/{kind}"

    async def deliver(self, alert: Alert) -> None:
        topic = self.topic(alert.bridge_id, alert.kind)
        try:
            await self.link.send(topic, dumps(alert.as_dict()), qos=1, retain=True, wait=True)
        except (ApiError, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"MQTT publish to {topic} failed: {exc}") from None


def make_channels(config: NotifyConfig, link: MqttLink | None) -> list[Channel]:
    """The channels of ``config`` (the MQTT one only with a ``link``: else it is logged)."""
    channels: list[Channel] = [Webhook(c, config) for c in config.webhooks]
    channels += [Email(c, config) for c in config.email]
    if config.mqtt is not None:
        if link is None:
            log.warning(
                "notifications.mqtt: this service has no MQTT link: no MQTT alerts are sent "
                "(the webhooks and e-mail still are)"
            )
        else:
            channels.append(MqttAlerts(config.mqtt, config, link))
    return channels


async def close_channels(channels: Sequence[Channel]) -> None:
    for channel in channels:
        with contextlib.suppress(Exception):
            await channel.close()
