"""The MQTT campaign API: ``labbridge serve`` puts a :class:`~bridge.service.LabService` on a broker.

Topics, under the root ``labbridge/<bridge_id>/`` (``docs/mqtt-api.md`` has every
payload with ``mosquitto_pub``/``mosquitto_sub`` examples; the JSON Schemas are in
``docs/schemas/`` and in :data:`SCHEMAS`)::

    status                          retained service status; Last Will {"state": "offline"}
    campaigns/start/<user>          start a campaign: {"id", "program", "lab"?, ...}; idempotent by id
    campaigns/<id>/status           retained state and progress of one campaign
    campaigns/<id>/results          one message per finished experiment
    campaigns/<id>/proposals/<user> agents propose experiments: {"params", "note"?}
    campaigns/<id>/control/<user>   {"action": "pause"|"resume"|"stop"|"abort", "reason"?}
    campaigns/<id>/approvals/<user> operators approve or deny a proposal awaiting approval:
                                    {"experiment_id", "decision": "approve"|"deny", "reason"}
    campaigns/<id>/approvals        events: a proposal awaits approval, was approved, denied,
                                    expired or cancelled (the campaign's status lists those
                                    awaiting)
    estop/<user>                    trips every station: {"reason"}
    reset/<user>                    {"why", "stations"?, "drain"?}
    replies/<user>/...              where answers go (see below)
    errors                          problems with requests that named no reply topic

Identity: the last level of a request topic is the sender's broker user, and
the broker's ACL lets each account publish only under its own name
(``pattern write ...%u`` or a per-user ``topic`` line, ``docs/mosquitto/acl``). Who
started, proposed, controlled, e-stopped or reset is that user, never a payload
field (a payload may add a ``note``). Replies go only to ``replies/<that user>/``.

Requests are answered on the MQTT v5 response topic with the request's
correlation data, or (MQTT 3.1.1) on the ``reply_to`` topic given in the payload
with its ``correlation_id`` echoed. Reply topics must lie under
``labbridge/<bridge_id>/replies/``: the service never publishes into other
topics on a client's say-so (a reply into ``estop`` or a device's command topic
would be a confused deputy). A request that names no usable reply topic gets
its error on ``errors``.

Every request is checked before anything is done: size (``max_payload_bytes``; an
MQTT v5 link also tells the broker its maximum packet size, so the broker drops
larger messages for it instead of sending them; over 3.1.1 only the broker's
``message_size_limit`` keeps them unread),
UTF-8 JSON (no NaN, no duplicate keys), its JSON Schema (unknown fields are
errors), a retained message is never acted on (it would replay at every
restart), and an MQTT v5 message past its message expiry interval (counted from
when it reached the service) is not acted on. The reply lists every problem.
A malformed request never reaches a station. The one exception is ``estop``:
any message on it trips every station (an e-stop is never refused for its
format; the reply says what was wrong with the payload).

E-stops come over a connection of their own (client id ``<client_id>-estop``,
its own socket, paho thread and persistent session), so they never wait behind
other requests in a socket or a broker queue. The event loop that dispatches
them never parses a request: e-stops are handled at once, each in its own
task; every other request passes a
per-user rate limit (``request_rate``/s, bursts of ``request_burst``) and a
bounded queue (``queue_size``), else it is answered "busy, retry" (at most once
a second per user); the queue is worked one request at a time, ``control`` and
``reset`` first, each user's requests in arrival order and the users in turn (one
user's burst never waits in front of another user's request:
:class:`~bridge.ratelimit.FairQueue`), the JSON, schema and program parsing on a
worker thread.

The service's session is persistent (``session_expiry_s``, default 600 s):
``campaigns/start``, ``proposals``, ``control`` and ``estop`` are subscribed with
QoS 1, so the broker keeps them while the service restarts (their v5 message
expiry still applies); ``reset`` is QoS 0 and never queued: a reset must be
live.

Modules: ``bridge/mqttlink.py`` (the settings, the link on the shared MQTT client, JSON
payloads), ``bridge/mqttschemas.py`` (the JSON Schemas), this one (the API's life cycle,
statuses and results), ``bridge/mqttserve.py`` (``serve``: the service, the API and what
it hosts, run until stopped), ``bridge/mqttrequests.py`` (routing, admission, replies and
the request kinds), ``bridge/mqttcli.py`` (the command line: ``serve``'s parser, the
clients ``estop``, ``reset``, ``status``); the lab itself is ``bridge/service.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from bridge.labmqtt import mqtt_settings, parse_broker_url
from bridge.mqttlink import (
    ApiError,
    ApiSettings,
    Incoming,
    MqttLink,
    dumps,
    parse_payload,
    topic_root,
)
from bridge.mqttrequests import (
    ESTOP_FILTER,
    REQUEST_FILTERS,
    Request,
    RequestHandling,
)
from bridge.mqttschemas import SCHEMAS, write_schemas
from bridge.ratelimit import FairQueue, RateLimiter
from bridge.service import LabService

log = logging.getLogger(__name__)

__all__ = [
    "API_VERSION",
    "SCHEMAS",
    "ApiError",
    "ApiSettings",
    "Incoming",
    "MqttApi",
    "MqttLink",
    "mqtt_settings",
    "parse_broker_url",
    "parse_payload",
    "topic_root",
    "write_schemas",
]

API_VERSION = 2
#: room in a packet beyond the payload: fixed header, topic, v5 properties (response topic,
#: correlation data, ...); a request packet larger than payload limit + this is never read
PACKET_OVERHEAD_BYTES = 4096


class MqttApi(RequestHandling):
    """The MQTT front end of one :class:`~bridge.service.LabService` (see the module docstring).

    ``await api.connect()`` (status ``starting``, the Last Will set), then
    ``await api.attach(service)`` once the service is open (subscribes, status
    ``online``), :meth:`detach` to stop taking requests, :meth:`close` to publish
    the final statuses and ``offline`` and disconnect.
    """

    def __init__(self, settings: ApiSettings, bridge_id: str) -> None:
        self.settings = settings
        self.bridge_id = bridge_id
        self.root = topic_root(bridge_id)
        #: who serves: host, process and start time (in the status, and in the refusal of a second)
        self.instance = (
            f"{socket.gethostname()} pid {os.getpid()} started {time.strftime('%H:%M:%S')}"
        )
        offline = {
            "state": "offline",
            "bridge_id": bridge_id,
            "api": API_VERSION,
            "instance": self.instance,
        }
        self.link = MqttLink(
            replace(
                settings,
                client_id=settings.client_id or f"labbridge-{bridge_id}",
                # v5: the broker drops larger messages for the service, unsent and unread
                max_packet_bytes=settings.max_payload_bytes + PACKET_OVERHEAD_BYTES,
                # v5: a live message published retained (or a retained one cleared) is told apart
                retain_as_published=True,
            ),
            will=(
                f"{self.root}/status",
                dumps({**offline, "reason": "connection to labbridge lost (Last Will)"}),
            ),
        )
        #: e-stops come on a connection of their own (its own socket, paho thread and
        #: persistent session): never behind other requests in a socket or a broker queue
        self.estop_link = MqttLink(
            replace(self.link.settings, client_id=f"{self.link.client_id}-estop")
        )
        self.service: LabService | None = None
        #: lab.yaml's notifications while serve() runs (bridge/notify.py; None: none)
        self.notifier: Any = None
        self.state = "new"
        #: requests answered and how: counts by kind and outcome (for status displays, tests)
        self.counts: dict[str, int] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ordered: FairQueue[Request] = FairQueue(settings.queue_size)
        self._limiter = RateLimiter(settings.request_rate, settings.request_burst)
        self._parser: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._remove_listener: Callable[[], None] | None = None
        self._last_status: dict[str, Any] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        #: when the service came online (monotonic): requests received earlier were queued
        self.online_t: float | None = None

    # --------------------------------------------------------------- lifecycle
    async def connect(self) -> None:
        """Connect to the broker and publish the retained status ``starting``.

        Refuses (:class:`ApiError`) while the retained status says another service of this
        bridge is up: connecting with the same client id would take over its session (the
        broker drops the older connection, and the two would take turns).
        """
        await self._check_alone()
        await self.link.open()
        try:
            await self.estop_link.open()
        except BaseException:
            await self.link.close()
            raise
        self.state = "starting"
        self.link.on_connection_change(self._on_connection)
        await self._publish_status({"state": "starting"}, wait=True)

    async def attach(self, service: LabService) -> None:
        """Serve ``service``: subscribe to the request topics, publish status ``online``."""
        if self.service is not None:
            raise ApiError("already serving a lab service")
        self.service = service
        self._remove_listener = service.add_listener(self._events.put_nowait)
        self.state = "online"
        self.online_t = time.monotonic()
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqttapi-parse")
        self._tasks = [
            asyncio.create_task(self._dispatch(self.link), name="mqttapi-dispatch"),
            asyncio.create_task(self._worker(), name="mqttapi-worker"),
            asyncio.create_task(self._publisher(), name="mqttapi-publisher"),
            asyncio.create_task(self._ticker(), name="mqttapi-ticker"),
            asyncio.create_task(self._dispatch(self.estop_link), name="mqttapi-estops"),
        ]
        await self.estop_link.subscribe_all([(self.topic(ESTOP_FILTER), 1)])
        await self.link.subscribe_all([(self.topic(f), qos) for f, qos in REQUEST_FILTERS])
        # "online" waits for the broker's PUBACK: a client that subscribes once attach()
        # returned gets "online", never the "starting" that connect() left retained
        self._events.put_nowait({"event": "_all", "wait": True})
        await self.flush()
        log.info("MQTT campaign API online at %s/%s", self.settings.url, self.root)

    async def detach(self) -> None:
        """Stop taking requests (status ``stopping``): from now on every request but an e-stop
        is answered "shutting down"; e-stops are still acted on until :meth:`close`."""
        if self.state != "online":
            return
        self.state = "stopping"
        if self._handlers:  # the requests in progress finish
            await asyncio.wait(list(self._handlers), timeout=self.settings.timeout_s)
        self._events.put_nowait({"event": "_status"})
        await self.flush()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every pending event is published (results, statuses)."""
        if not self._tasks or self._tasks[2].done():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not (self._events.empty() and self._idle.is_set()):
                    if self._idle.is_set():  # an event waits for the publisher to take it
                        await asyncio.sleep(0)
                    else:
                        await self._idle.wait()

    async def close(self, reason: str = "shut down") -> None:
        """Publish pending results and statuses, then ``offline`` (retained), and disconnect."""
        await self.detach()
        await self.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self._tasks = []
        parser, self._parser = self._parser, None
        if parser is not None:
            parser.shutdown(wait=True, cancel_futures=True)
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self.link.is_open:
            self.state = "offline"
            with contextlib.suppress(ApiError):
                await self._publish_status({"state": "offline", "reason": reason}, wait=True)
            await self.link.close()
        await self.estop_link.close()
        self.service = None

    async def __aenter__(self) -> MqttApi:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _check_alone(self) -> None:
        probe_id = f"{self.link.client_id}-probe-{secrets.token_hex(3)}"
        probe = MqttLink(replace(self.settings, client_id=probe_id, session_expiry_s=0))
        await probe.open([(self.topic("status"), 1)])
        if self.link.settings.protocol == "auto" and probe.protocol is not None:
            # what the broker speaks (amqtt: 3.1.1; it does not answer a v5 CONNECT that
            # asks for a persistent session, so the link must not try v5 first there)
            self.link.settings = replace(self.link.settings, protocol=probe.protocol)
            self.estop_link.settings = replace(self.estop_link.settings, protocol=probe.protocol)
        status = None
        try:  # a retained status comes right after the SUBACK
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    msg = await probe.messages.get()
                    status, _ = parse_payload(msg.payload)
        finally:
            await probe.close()
        if isinstance(status, Mapping) and status.get("state") in (
            "starting",
            "online",
            "stopping",
        ):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(status.get("t") or 0)))
            raise ApiError(
                f"{self.topic('status')} says labbridge for {self.bridge_id} is "
                f"{status.get('state')} already ({status.get('instance', '?')}, status of {since}): "
                "stop that one first. If it is gone without its Last Will (the broker restarted "
                f"with persistence while it was down), clear the status: mosquitto_pub -u "
                f"{self.settings.username or '<service user>'} -r -n -t {self.topic('status')}"
            )

    def _on_connection(self, connected: bool) -> None:
        if connected:  # the broker may have lost our retained messages: publish them again
            self._last_status = None
            self._events.put_nowait({"event": "_all"})

    # ----------------------------------------------------------------- status
    async def _publish_status(self, status: Mapping[str, Any], *, wait: bool = False) -> None:
        body = {
            "bridge_id": self.bridge_id,
            "api": API_VERSION,
            "root": self.root,
            "instance": self.instance,
            **status,
            "t": time.time(),
        }
        await self.link.send(self.topic("status"), dumps(body), qos=1, retain=True, wait=wait)

    async def _refresh_status(self, force: bool = False, wait: bool = False) -> None:
        if self.service is None:
            return
        snapshot = await self.service.status()
        status = {"state": self.state if self.state != "new" else "starting", **snapshot}
        if force or status != self._last_status:
            self._last_status = status
            await self._publish_status(status, wait=wait)

    async def _publish_campaign(self, campaign_id: str) -> None:
        if self.service is None or campaign_id not in self.service.campaigns:
            return
        status = self.service.campaign_status(campaign_id)
        await self.link.send(
            self.topic("campaigns", campaign_id, "status"), dumps(status), qos=1, retain=True
        )

    def _result(self, campaign_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
        done = event.get("event") == "finished"
        out: dict[str, Any] = {
            "campaign_id": campaign_id,
            "experiment_id": event.get("experiment_id"),
            "outcome": "done" if done else "failed",
            "station": event.get("station"),
            "proposer": event.get("proposer") or "unknown",
            "parameters": dict(event.get("params") or {}),
            "measurements": dict(event.get("measurements") or {}) if done else None,
            "objective": None,
            "verified": event.get("verified") if done else None,
            "verification": event.get("verification") if done else None,
            "reason": None if done else event.get("reason"),
            "t": time.time(),
        }
        handle = self.service.campaigns.get(campaign_id) if self.service is not None else None
        if done and handle is not None:
            objective = handle.program.objective
            out["objective"] = {
                "measure": objective.measure,
                "value": event.get("objective"),
                "direction": "minimize" if objective.minimize else "maximize",
            }
        if event.get("images"):
            out["images"] = event["images"]
        progress = event.get("progress")
        if isinstance(progress, Mapping):
            out["progress"] = {
                k: progress.get(k) for k in ("experiments", "budget", "in_flight", "best")
            }
        return out

    async def _publisher(self) -> None:
        """Events of the service -> results (one per experiment) and retained statuses, in order."""
        while True:
            event = await self._events.get()
            self._idle.clear()
            try:
                batch = [event]
                while not self._events.empty():
                    batch.append(self._events.get_nowait())
                campaigns: list[str] = []
                status, force, wait = False, False, False
                for ev in batch:
                    kind = ev.get("event")
                    cid = ev.get("campaign_id")
                    if kind in ("finished", "failed") and isinstance(cid, str):
                        await self.link.send(
                            self.topic("campaigns", cid, "results"), dumps(self._result(cid, ev))
                        )
                    if kind in ("awaiting_approval", "approval") and isinstance(cid, str):
                        await self.link.send(
                            self.topic("campaigns", cid, "approvals"),
                            dumps(_approval_event(cid, ev)),
                        )
                    if isinstance(cid, str) and cid not in campaigns:
                        campaigns.append(cid)
                    if kind in ("campaign", "estop", "reset", "station", "_tick", "_status"):
                        status = True
                    if kind == "_all" and self.service is not None:
                        campaigns += [c for c in self.service.campaigns if c not in campaigns]
                        status = force = True
                        wait = wait or bool(ev.get("wait"))
                for cid in campaigns:
                    await self._publish_campaign(cid)
                if status:
                    await self._refresh_status(force=force, wait=wait)
            except Exception:  # never let a publishing problem stop the service
                log.exception("MQTT API: publishing failed")
            finally:
                if self._events.empty():
                    self._idle.set()

    async def _ticker(self) -> None:
        """Refresh the retained status now and then (a monitor may trip a station any time)."""
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            self._events.put_nowait({"event": "_tick"})


def _approval_event(campaign_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    """A runner's ``awaiting_approval``/``approval`` event as the ``approvals`` message."""
    out: dict[str, Any] = {
        "campaign_id": campaign_id,
        "experiment_id": event.get("experiment_id"),
        "event": "awaiting" if event.get("event") == "awaiting_approval" else event.get("decision"),
        "proposer": event.get("proposer") or "unknown",
        "params": dict(event.get("params") or {}),
    }
    for key in ("rules", "expires_t", "who", "reason", "via"):
        if key in event:
            out[key] = event[key]
    out["t"] = time.time()
    return out
