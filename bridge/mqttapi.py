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
a second per user); the queue is worked in arrival order (``control`` and
``reset`` first), the JSON, schema and program parsing on a worker thread.

The service's session is persistent (``session_expiry_s``, default 600 s):
``campaigns/start``, ``proposals``, ``control`` and ``estop`` are subscribed with
QoS 1, so the broker keeps them while the service restarts (their v5 message
expiry still applies); ``reset`` is QoS 0 and never queued: a reset must be
live.

Modules: ``bridge/mqttlink.py`` (the settings, the link on the shared MQTT client, JSON
payloads), ``bridge/mqttschemas.py`` (the JSON Schemas), this one (the API and
``serve``), ``bridge/mqttcli.py`` (the command line: ``serve``'s parser, the clients
``estop``, ``reset``, ``status``); the lab itself is ``bridge/service.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from bridge.labconfig import LabConfig, load_lab, mqtt_settings, parse_broker_url
from bridge.mqttlink import (
    ApiError,
    ApiSettings,
    Incoming,
    MqttLink,
    dumps,
    parse_payload,
    short,
    topic_root,
)
from bridge.mqttschemas import SCHEMAS, schema_errors, write_schemas
from bridge.service import CAMPAIGN_ID, LabService, ServiceError
from loops.campaign import CampaignClosed
from safety.yamldoc import ConfigError

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
    "serve",
    "serve_command",
    "topic_root",
    "write_schemas",
]

API_VERSION = 2
#: room in a packet beyond the payload: fixed header, topic, v5 properties (response topic,
#: correlation data, ...); a request packet larger than payload limit + this is never read
PACKET_OVERHEAD_BYTES = 4096


# =========================================================================  API
_KINDS = {
    "start": "campaigns/start",
    "proposal": "proposals",
    "control": "control",
    "estop": "estop",
    "reset": "reset",
}


@dataclass
class _Request:
    """One request in handling: where and how to answer it."""

    kind: str
    msg: Incoming
    campaign_id: str | None = None
    user: str = ""
    reply_topic: str | None = None
    correlation_id: str | None = None
    reply_problem: str | None = None


#: requests worked before the others in the queue (they stop or unlatch things)
_FIRST = ("control", "reset")
#: the API's topics, relative to the root: request topics end in the sender's user
_REQUEST_FILTERS = (
    ("campaigns/start/+", 1),
    ("campaigns/+/proposals/+", 1),
    ("campaigns/+/control/+", 1),
    ("reset/+", 0),
)
#: e-stops, on the e-stop connection
_ESTOP_FILTER = "estop/+"


@dataclass
class _Bucket:
    """One user's token bucket: ``tokens`` left at ``t``; ``told``: when last told "busy"."""

    tokens: float
    t: float
    told: float = -1e9


class MqttApi:
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
        self.state = "new"
        #: requests answered and how: counts by kind and outcome (for status displays, tests)
        self.counts: dict[str, int] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ordered: asyncio.PriorityQueue[tuple[int, int, _Request]] = asyncio.PriorityQueue(
            maxsize=settings.queue_size
        )
        self._seq = 0
        self._buckets: dict[str, _Bucket] = {}
        self._parser: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._remove_listener: Callable[[], None] | None = None
        self._last_status: dict[str, Any] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        #: when the service came online (monotonic): requests received earlier were queued
        self.online_t: float | None = None

    def topic(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

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
        await self.estop_link.subscribe_all([(self.topic(_ESTOP_FILTER), 1)])
        await self.link.subscribe_all([(self.topic(f), qos) for f, qos in _REQUEST_FILTERS])
        self._events.put_nowait({"event": "_all"})
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

    async def _refresh_status(self, force: bool = False) -> None:
        if self.service is None:
            return
        snapshot = await self.service.status()
        status = {"state": self.state if self.state != "new" else "starting", **snapshot}
        if force or status != self._last_status:
            self._last_status = status
            await self._publish_status(status)

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
                status, force = False, False
                for ev in batch:
                    kind = ev.get("event")
                    cid = ev.get("campaign_id")
                    if kind in ("finished", "failed") and isinstance(cid, str):
                        await self.link.send(
                            self.topic("campaigns", cid, "results"), dumps(self._result(cid, ev))
                        )
                    if isinstance(cid, str) and cid not in campaigns:
                        campaigns.append(cid)
                    if kind in ("campaign", "estop", "reset", "station", "_tick", "_status"):
                        status = True
                    if kind == "_all" and self.service is not None:
                        campaigns += [c for c in self.service.campaigns if c not in campaigns]
                        status = force = True
                for cid in campaigns:
                    await self._publish_campaign(cid)
                if status:
                    await self._refresh_status(force=force)
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

    # --------------------------------------------------------------- requests
    def _route(self, topic: str) -> tuple[str | None, str | None, str]:
        """``(kind, campaign id, user)`` of a request topic (kind None: not one)."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None, None, ""
        parts = topic[len(prefix) :].split("/")
        user = parts[-1]
        if not user:
            return None, None, ""
        if len(parts) == 3 and parts[:2] == ["campaigns", "start"]:
            return "start", None, user
        if len(parts) == 4 and parts[0] == "campaigns" and parts[2] in ("proposals", "control"):
            return ("proposal" if parts[2] == "proposals" else "control"), parts[1], user
        if len(parts) == 2 and parts[0] in ("estop", "reset"):
            return parts[0], None, user
        return None, None, ""

    def _spawn(self, req: _Request) -> asyncio.Task[None]:
        task = asyncio.create_task(self._handle(req), name=f"mqttapi-{req.kind}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return task

    async def _dispatch(self, link: MqttLink) -> None:
        """E-stops at once, each in its own task; every other request, if its size, its
        user's rate and the queue allow, onto the queue (see the module docstring)."""
        while True:
            msg = await link.messages.get()
            kind, cid, user = self._route(msg.topic)
            if kind is None:
                log.warning("MQTT API: message on unexpected topic %s ignored", msg.topic)
                continue
            req = _Request(kind, msg, cid, user)
            if kind == "estop":
                self._spawn(req)
                continue
            limit = self.settings.max_payload_bytes
            if len(msg.payload) > limit:  # not parsed: answered on a v5 response topic only
                self._reply_target(req, None)
                problem = f"the payload is too big: {len(msg.payload)} bytes (limit {limit})"
                await self._reply(req, False, errors=[problem])
                continue
            if not self._admit(user):
                await self._busy(req, f"more than {self.settings.request_rate:g} requests/s")
                continue
            self._seq += 1
            try:
                self._ordered.put_nowait((0 if kind in _FIRST else 1, self._seq, req))
            except asyncio.QueueFull:
                await self._busy(req, f"{self._ordered.maxsize} requests are waiting")

    def _admit(self, user: str) -> bool:
        """Take a token from ``user``'s bucket (``request_rate``/s, ``request_burst`` at most)."""
        now = time.monotonic()
        rate, burst = self.settings.request_rate, float(self.settings.request_burst)
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) > 10_000:  # users are broker accounts; forget idle ones
                self._buckets = {u: b for u, b in self._buckets.items() if now - b.t < 60}
            bucket = self._buckets[user] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.t) * rate)
        bucket.t = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    async def _busy(self, req: _Request, why: str) -> None:
        """Refuse unread: "busy, retry", at most once a second per user (the rest are counted)."""
        self._count(f"{req.kind}:busy")
        bucket = self._buckets.setdefault(req.user, _Bucket(0.0, time.monotonic()))
        now = time.monotonic()
        if now - bucket.told < 1.0:
            return
        bucket.told = now
        self._reply_target(req, None)
        await self._reply(
            req,
            False,
            busy=True,
            retry_after_s=1.0,
            errors=[
                f"busy ({why}; user {req.user}): not acted on, not read; retry in a second. "
                "Requests refused while busy are not answered one by one."
            ],
        )

    async def _worker(self) -> None:
        while True:
            _, _, req = await self._ordered.get()
            # one at a time, in order; a cancelled worker leaves it be
            await asyncio.wait([self._spawn(req)])

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _reply_target(self, req: _Request, data: Any) -> None:
        """Where to answer: the v5 response topic, else ``reply_to``; refuse topics outside replies/."""
        msg = req.msg
        if isinstance(data, Mapping) and isinstance(data.get("correlation_id"), str):
            req.correlation_id = data["correlation_id"]
        topic = msg.response_topic
        if topic is None and isinstance(data, Mapping) and isinstance(data.get("reply_to"), str):
            topic = data["reply_to"]
        if topic is None:
            return
        allowed = self.topic("replies", req.user) + "/"
        if (
            not topic.startswith(allowed)
            or len(topic) > 512
            or len(topic) <= len(allowed)
            or "+" in topic
            or "#" in topic
            or "\x00" in topic
        ):
            req.reply_problem = (
                f"cannot answer on {short(topic, 120)!r}: replies to {req.user} go to topics "
                f"under {allowed} (e.g. {allowed}<anything>)"
            )
            return
        req.reply_topic = topic

    async def _reply(self, req: _Request, ok: bool, **fields: Any) -> None:
        body: dict[str, Any] = {"request": _KINDS[req.kind], "ok": ok, **fields}
        if req.correlation_id is not None:
            body["correlation_id"] = req.correlation_id
        body["t"] = time.time()
        self._count(f"{req.kind}:{'ok' if ok else 'error'}")
        target = req.reply_topic
        if target is None:
            if ok and req.reply_problem is None and not fields.get("warnings"):
                return  # nobody asked for an answer
            target = self.topic("errors")
            body["topic"] = req.msg.topic
            if req.reply_problem is not None:
                body.setdefault("errors", []).insert(0, req.reply_problem)
        link = self.estop_link if req.kind == "estop" else self.link
        try:
            await link.send(
                target,
                dumps(body),
                qos=1,
                correlation_data=req.msg.correlation_data if req.reply_topic else None,
            )
        except ApiError as exc:
            log.error("MQTT API: cannot send the reply to %s: %s", target, exc)

    async def _handle(self, req: _Request) -> None:
        try:
            await self._process(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not take the service down; the client is told
            log.exception("MQTT API: %s request on %s failed", req.kind, req.msg.topic)
            await self._reply(req, False, errors=[f"internal error: {type(exc).__name__}: {exc}"])

    def _parse(self, req: _Request) -> tuple[Any, str | None, list[str]]:
        """``(data, parse error, schema errors)``; sets the reply target. CPU-bound: the worker
        thread's, but for e-stops (which are small or cut short)."""
        data, parse_error = parse_payload(req.msg.payload)
        self._reply_target(req, data)
        if parse_error is not None:
            return None, parse_error, []
        errors = schema_errors("proposal" if req.kind == "proposal" else req.kind, data)
        if req.campaign_id is not None and not CAMPAIGN_ID.match(req.campaign_id):
            errors.insert(0, f"topic: {req.campaign_id!r} is not a campaign id")
        return data, None, errors

    async def _process(self, req: _Request) -> None:
        msg, kind = req.msg, req.kind
        limit = self.settings.max_payload_bytes
        if kind == "estop" and len(msg.payload) > limit:
            self._reply_target(req, None)
            problem = f"the payload is too big: {len(msg.payload)} bytes (limit {limit})"
            await self._estop(req, None, [problem])
            return
        if kind == "estop" or self._parser is None:
            data, parse_error, errors = self._parse(req)
        else:
            loop = asyncio.get_running_loop()
            data, parse_error, errors = await loop.run_in_executor(self._parser, self._parse, req)
        if kind != "estop" and msg.retain:
            await self._reply(
                req,
                False,
                errors=[
                    f"a retained message on {msg.topic} is not acted on (it would replay at every "
                    f"restart): publish without retain, and clear it with "
                    f"`mosquitto_pub -r -n -t {msg.topic}`"
                ],
            )
            return
        if msg.expired() and kind != "estop":  # an expired e-stop still trips: it is safer
            log.warning("MQTT API: expired %s request on %s not acted on", kind, msg.topic)
            await self._reply(
                req,
                False,
                errors=[
                    f"the message expired (message expiry interval {msg.expiry_s} s) before it "
                    "could be acted on: nothing was done"
                ],
            )
            return
        if kind == "estop":
            await self._estop(req, data, [parse_error] if parse_error else errors)
            return
        queued = self.queued_s(msg)
        if queued is not None and msg.expiry_s is None:
            await self._reply(
                req,
                False,
                errors=[
                    f"not acted on: queued by the broker while labbridge was down or starting "
                    f"(received {queued:.1f} s before it came online), and it has no message "
                    "expiry, so it could be hours old. Send it again; a request that may wait "
                    "for the service must carry an MQTT v5 message expiry interval"
                ],
            )
            return
        if self.state != "online":
            await self._reply(
                req, False, errors=[f"labbridge is {self.state}: not taking requests (but e-stops)"]
            )
            return
        if parse_error is not None:
            await self._reply(req, False, errors=[parse_error])
            return
        if errors:
            await self._reply(req, False, errors=errors)
            return
        if req.reply_problem is not None:  # valid, but we could not answer: do nothing
            await self._reply(req, False, errors=["not acted on: no usable reply topic"])
            return
        assert self.service is not None
        if kind == "start":
            await self._start(req, data)
        elif kind == "proposal":
            await self._proposal(req, data)
        elif kind == "control":
            await self._control(req, data)
        else:
            await self._reset(req, data)

    async def _start(self, req: _Request, data: Mapping[str, Any]) -> None:
        assert self.service is not None
        lab = data.get("lab") or {}
        if data.get("note"):
            log.info("campaign %s start by %s: %s", data["id"], req.user, data["note"])
        result = await self.service.start_campaign(
            data["id"],
            data["program"],
            body=data.get("body"),
            stations=lab.get("stations"),
            who=req.user,
        )
        fields = result.as_dict()
        if result.accepted:
            cid = result.campaign_id
            fields["topics"] = {
                "status": self.topic("campaigns", cid, "status"),
                "results": self.topic("campaigns", cid, "results"),
                "proposals": self.topic("campaigns", cid, "proposals"),
                "control": self.topic("campaigns", cid, "control"),
            }
        await self._reply(req, result.accepted, **fields)

    async def _proposal(self, req: _Request, data: Mapping[str, Any]) -> None:
        assert self.service is not None and req.campaign_id is not None
        proposer = f"agent:{req.user}"
        try:
            receipt = await self.service.propose(req.campaign_id, data["params"], proposer)
        except (ServiceError, CampaignClosed, ValueError) as exc:
            await self._reply(req, False, campaign_id=req.campaign_id, errors=[str(exc)])
            return
        if data.get("note"):
            log.info("proposal %s by %s: %s", receipt.experiment_id, proposer, data["note"])
        await self._reply(req, receipt.accepted, campaign_id=req.campaign_id, **receipt.as_dict())

    async def _control(self, req: _Request, data: Mapping[str, Any]) -> None:
        assert self.service is not None and req.campaign_id is not None
        try:
            status = await self.service.control(
                req.campaign_id, data["action"], who=req.user, reason=data.get("reason")
            )
        except ServiceError as exc:
            await self._reply(req, False, campaign_id=req.campaign_id, errors=[str(exc)])
            return
        await self._reply(
            req, True, campaign_id=req.campaign_id, action=data["action"], state=status["state"]
        )

    async def _reset(self, req: _Request, data: Mapping[str, Any]) -> None:
        assert self.service is not None
        try:
            report = await self.service.reset(
                req.user, data["why"], data.get("stations"), drain=bool(data.get("drain"))
            )
        except ServiceError as exc:
            await self._reply(req, False, errors=[str(exc)])
            return
        errors = [f"{n}: {s['error']}" for n, s in report["stations"].items() if not s["ok"]]
        await self._reply(req, report["ok"], stations=report["stations"], errors=errors)

    def queued_s(self, msg: Incoming) -> float | None:
        """How long before the service came online ``msg`` was received (None: after): a
        request the broker queued while the service was down or starting."""
        if self.online_t is None or msg.received >= self.online_t:
            return None
        return self.online_t - msg.received

    async def _estop(self, req: _Request, data: Any, problems: list[str]) -> None:
        """Any message trips every station; what was wrong with it goes back as warnings.

        But one: an empty message flagged retained is the clearing of a retained e-stop
        (``labbridge estop --clear-retained``, ``mosquitto_pub -r -n``), never an e-stop
        (over MQTT v5, where the service subscribes "retain as published"). A retained
        e-stop, or one queued while the service was down, trips too, and says so.
        """
        assert self.service is not None
        msg = req.msg
        if msg.retain and not msg.payload:
            log.warning("MQTT API: the retained e-stop on %s was cleared by %s", msg.topic, req.user)
            self._count("estop:cleared")
            return
        notes = []
        if msg.retain:
            notes.append(
                f"this e-stop is retained on {msg.topic}: it trips every station again whenever "
                f"the service (re)subscribes; clear it with `labbridge estop --clear-retained` "
                f"or `mosquitto_pub -r -n -t {msg.topic}` (an empty retained message is not an "
                "e-stop)"
            )
        queued = self.queued_s(msg)
        if queued is not None:
            notes.append(
                f"stale: queued by the broker while labbridge was down or starting (received "
                f"{queued:.1f} s before it came online); acted on anyway (an e-stop is safer)"
            )
        reason = None
        who = req.user
        if isinstance(data, Mapping):
            if isinstance(data.get("reason"), str) and data["reason"].strip():
                reason = data["reason"]
        elif isinstance(data, str) and data.strip():
            reason = data
        elif data is None and req.msg.payload and len(req.msg.payload) <= 1000:
            text = req.msg.payload.decode("utf-8", "replace")
            text = "".join(c if c.isprintable() else " " for c in text).strip()
            reason = text or None
        reason = short(reason or "e-stop over MQTT (no reason given)", 1000)
        try:
            report = await self.service.estop(reason, who)
        except ServiceError as exc:  # the stations are closed already (shutting down)
            await self._reply(req, False, errors=[str(exc)])
            return
        warnings = []
        if problems:
            warnings = [
                *problems,
                "acted on anyway: an e-stop is never refused for its format "
                '(send {"reason": "..."})',
            ]
        fields = {k: v for k, v in report.items() if k != "ok"}
        if queued is not None or msg.retain:
            fields.update(stale=queued is not None, retained=msg.retain)
        await self._reply(req, bool(report["ok"]), warnings=[*warnings, *notes], **fields)


# ======================================================================= serve
async def serve(
    lab: LabConfig,
    settings: ApiSettings,
    *,
    ray_address: str | None = None,
    operator: str = "operator",
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    on_online: Callable[[MqttApi, LabService], None] | None = None,
) -> str:
    """Run the lab's MQTT campaign API until ``stop`` is set or SIGINT/SIGTERM arrives.

    On the way out every running campaign is aborted (its stations tripped into the
    safe state), every station is closed (instruments safe-stated), and the retained
    status goes ``offline``. A second signal gives up waiting. ``on_online``: called once
    the API is subscribed and serving (default: print that it is). Returns why it stopped.
    """
    from loops.raylinks import init_ray

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    stop = stop or asyncio.Event()
    why: list[str] = []

    def on_signal(name: str) -> None:
        if why and main_task is not None:
            main_task.cancel()
            return
        why.append(name)
        print(
            f"\n{name}: stopping: campaigns aborted, every station to its safe state",
            file=sys.stderr,
        )
        stop.set()

    # Ray's driver installs its own SIGTERM handler in ray.init: start (or join) Ray first
    init_ray(
        ray_address or lab.ray_address, stations=list(lab.stations), local=True, log_to_driver=False
    )
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
    api = MqttApi(settings, lab.bridge_id)
    final = "shut down"
    try:
        await api.connect()
        try:
            async with LabService(lab, ray_address=ray_address, operator=operator) as service:
                await api.attach(service)  # subscribed: requests are served from now on
                if on_online is not None:
                    on_online(api, service)
                else:
                    print(
                        f"labbridge serve: {lab.bridge_id} online at {settings.url} "
                        f"(topics {api.root}/...; stations {', '.join(service.stations)}); "
                        "Ctrl-C to stop",
                        file=sys.stderr,
                    )
                await stop.wait()
                reason = f"{why[0] if why else 'stop requested'}: labbridge serve shutting down"
                await api.detach()
                await service.shutdown(reason, who=operator)
                await api.flush()
            final = f"shut down ({why[0] if why else 'stop requested'})"
        except BaseException as exc:
            final = f"stopped: {type(exc).__name__}: {exc}" if str(exc) else "stopped"
            raise
        finally:
            await api.close(final)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    return final


# ======================================================================== CLI
def serve_command(args: argparse.Namespace) -> int:
    """Run ``labbridge serve``; 0 after an orderly shutdown, 1 on a config or broker error."""
    prog = "labbridge serve"
    try:
        lab = load_lab(args.lab)
        settings = mqtt_settings(lab, args.broker)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    from bridge.campaigns import StationUnavailable

    try:
        final = asyncio.run(
            serve(lab, settings, ray_address=args.ray_address, operator=args.operator)
        )
    except (ApiError, StationUnavailable, ConfigError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(f"{prog}: {final}", file=sys.stderr)
    return 0
