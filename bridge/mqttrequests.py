"""The MQTT campaign API's requests: routing, admission, replies, and what each request does.

:class:`RequestHandling` is the request half of :class:`~bridge.mqttapi.MqttApi` (which
inherits it): a request topic is routed to its kind and user, e-stops are handled at
once, every other request passes the size check, its user's rate limit and the bounded
queue, is parsed and schema-checked on the worker thread, and is answered on its reply
topic (or ``errors``). The rules are in :mod:`bridge.mqttapi`'s docstring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bridge.mqttlink import ApiError, ApiSettings, Incoming, MqttLink, dumps, parse_payload, short
from bridge.mqttschemas import schema_errors
from bridge.ratelimit import FairQueue, RateLimiter
from bridge.service import CAMPAIGN_ID, LabService, QuotaExceeded, ServiceError
from loops.campaign import CampaignClosed

log = logging.getLogger(__name__)

_KINDS = {
    "start": "campaigns/start",
    "proposal": "proposals",
    "control": "control",
    "approval": "approvals",
    "estop": "estop",
    "reset": "reset",
}


@dataclass
class Request:
    """One request in handling: where and how to answer it."""

    kind: str
    msg: Incoming
    campaign_id: str | None = None
    user: str = ""
    reply_topic: str | None = None
    correlation_id: str | None = None
    reply_problem: str | None = None


#: campaigns/<id>/<level>/<user> -> the request's kind
_CAMPAIGN_REQUESTS = {"proposals": "proposal", "control": "control", "approvals": "approval"}
#: requests worked before the others in the queue (they stop or unlatch things)
_FIRST = ("control", "reset")
#: the API's topics, relative to the root: request topics end in the sender's user
REQUEST_FILTERS = (
    ("campaigns/start/+", 1),
    ("campaigns/+/proposals/+", 1),
    ("campaigns/+/control/+", 1),
    ("campaigns/+/approvals/+", 1),
    ("reset/+", 0),
)
#: e-stops, on the e-stop connection
ESTOP_FILTER = "estop/+"


class RequestHandling:
    """Routing, admission, replies and the request kinds of :class:`~bridge.mqttapi.MqttApi`.

    The attributes below are set by :class:`~bridge.mqttapi.MqttApi`'s constructor.
    """

    settings: ApiSettings
    root: str
    link: MqttLink
    estop_link: MqttLink
    service: LabService | None
    state: str
    counts: dict[str, int]
    online_t: float | None
    _ordered: FairQueue[Request]
    _limiter: RateLimiter
    _parser: ThreadPoolExecutor | None
    _handlers: set[asyncio.Task[None]]

    def topic(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

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
        if len(parts) == 4 and parts[0] == "campaigns" and parts[2] in _CAMPAIGN_REQUESTS:
            return _CAMPAIGN_REQUESTS[parts[2]], parts[1], user
        if len(parts) == 2 and parts[0] in ("estop", "reset"):
            return parts[0], None, user
        return None, None, ""

    def _spawn(self, req: Request) -> asyncio.Task[None]:
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
            req = Request(kind, msg, cid, user)
            if kind == "estop":
                self._spawn(req)
                continue
            limit = self.settings.max_payload_bytes
            if len(msg.payload) > limit:  # not parsed: answered on a v5 response topic only
                self._reply_target(req, None)
                problem = f"the payload is too big: {len(msg.payload)} bytes (limit {limit})"
                await self._reply(req, False, errors=[problem])
                continue
            if not self._limiter.admit(user):  # request_rate/s, request_burst at most
                await self._busy(req, f"more than {self.settings.request_rate:g} requests/s")
                continue
            try:  # round-robin between users: one user's burst waits behind its own requests
                self._ordered.put_nowait(req, key=user, priority=0 if kind in _FIRST else 1)
            except asyncio.QueueFull:
                await self._busy(req, f"{self._ordered.maxsize} requests are waiting")

    async def _busy(self, req: Request, why: str) -> None:
        """Refuse unread: "busy, retry", at most once a second per user (the rest are counted)."""
        self._count(f"{req.kind}:busy")
        if not self._limiter.tell(req.user):
            return
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
            req = await self._ordered.get()
            # one at a time, in order; a cancelled worker leaves it be
            await asyncio.wait([self._spawn(req)])

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _reply_target(self, req: Request, data: Any) -> None:
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

    async def _reply(self, req: Request, ok: bool, **fields: Any) -> None:
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

    async def _handle(self, req: Request) -> None:
        try:
            await self._process(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not take the service down; the client is told
            log.exception("MQTT API: %s request on %s failed", req.kind, req.msg.topic)
            await self._reply(req, False, errors=[f"internal error: {type(exc).__name__}: {exc}"])

    def _parse(self, req: Request) -> tuple[Any, str | None, list[str]]:
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

    async def _process(self, req: Request) -> None:
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
        elif kind == "approval":
            await self._approval(req, data)
        else:
            await self._reset(req, data)

    async def _start(self, req: Request, data: Mapping[str, Any]) -> None:
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

    async def _proposal(self, req: Request, data: Mapping[str, Any]) -> None:
        assert self.service is not None and req.campaign_id is not None
        proposer = f"agent:{req.user}"
        try:
            receipt = await self.service.propose(req.campaign_id, data["params"], proposer)
        except QuotaExceeded as exc:  # its quota: nothing was journaled
            retry = exc.retry_after_s()
            await self._reply(
                req,
                False,
                campaign_id=req.campaign_id,
                errors=[str(exc)],
                quota=exc.use.as_dict(),
                **({} if retry is None else {"retry_after_s": round(retry, 3)}),
            )
            return
        except (ServiceError, CampaignClosed, ValueError) as exc:
            await self._reply(req, False, campaign_id=req.campaign_id, errors=[str(exc)])
            return
        if data.get("note"):
            log.info("proposal %s by %s: %s", receipt.experiment_id, proposer, data["note"])
        await self._reply(
            req,
            receipt.accepted or receipt.awaiting_approval,
            campaign_id=req.campaign_id,
            **receipt.as_dict(),
        )

    async def _control(self, req: Request, data: Mapping[str, Any]) -> None:
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

    async def _approval(self, req: Request, data: Mapping[str, Any]) -> None:
        """Approve or deny a proposal awaiting approval: the approver is the topic's user
        (the broker authenticated it; the ACL lets operator accounts only publish here)."""
        assert self.service is not None and req.campaign_id is not None
        if data.get("note"):
            log.info("approval of %s by %s: %s", data["experiment_id"], req.user, data["note"])
        try:
            decided = await self.service.decide(
                req.campaign_id,
                data["experiment_id"],
                data["decision"] == "approve",
                req.user,
                data["reason"],
                via="mqtt",
            )
        except ServiceError as exc:
            await self._reply(
                req,
                False,
                campaign_id=req.campaign_id,
                experiment_id=data["experiment_id"],
                errors=[str(exc)],
            )
            return
        await self._reply(req, True, **decided)

    async def _reset(self, req: Request, data: Mapping[str, Any]) -> None:
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

    async def _estop(self, req: Request, data: Any, problems: list[str]) -> None:
        """Any message trips every station; what was wrong with it goes back as warnings.

        But one: an empty message flagged retained is the clearing of a retained e-stop
        (``labbridge estop --clear-retained``, ``mosquitto_pub -r -n``), never an e-stop
        (over MQTT v5, where the service subscribes "retain as published"). A retained
        e-stop, or one queued while the service was down, trips too, and says so.
        """
        assert self.service is not None
        msg = req.msg
        if msg.retain and not msg.payload:
            log.warning(
                "MQTT API: the retained e-stop on %s was cleared by %s", msg.topic, req.user
            )
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


__all__ = ["ESTOP_FILTER", "REQUEST_FILTERS", "Request", "RequestHandling"]
