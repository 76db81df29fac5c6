"""The lab page: a Starlette app over one :class:`~bridge.service.LabService`, served by
``labbridge serve --web`` and ``labbridge sim`` (:func:`lab_page`).

Views (one page, ``bridge/webstatic/``: hand-written HTML, CSS and JavaScript, no CDN):
the lab (stations, live readings beside the envelope's limits, refusals and trips), a
campaign (state, budget, best verified result, live convergence, parameters explored,
the queue), an experiment (steps, measurements, verification with its camera frames,
the journal's record), the cameras (each station's newest frame with the overlays) and
the history (every campaign of the journal, each opening its report).

HTTP API (JSON; errors are ``{"error": "<one line>"}`` with a 4xx status)::

    GET  /api/state                      the lab now, and who you are (with your CSRF token)
    GET  /api/events                     server-sent events: the service's, and ``stations``
    GET  /api/campaigns                  the journal's campaigns, newest first
    GET  /api/campaigns/<id>             one campaign with its experiments
    GET  /api/campaigns/<id>/approvals   its proposals awaiting a human's approval
    GET  /api/experiments/<id>           one experiment's record
    GET  /api/experiments/<id>/<role>.jpg   a stored frame (reference, outcome)
    GET  /api/experiments/<id>/overlay.png  the outcome frame with the camera's overlays
    GET  /api/cameras                    each station's newest outcome frame
    GET  /reports/<id>/                  the campaign's report (written on first use)
    POST /api/login {"user", "password"}  POST /api/logout
    POST /api/estop {"reason"?}                      (viewer, operator)
    POST /api/reset {"why", "stations"?, "drain"?}   (operator)
    POST /api/campaigns/<id>/control {"action", "reason"?}   (operator)
    POST /api/campaigns/<id>/approvals/<experiment> {"decision": "approve"|"deny", "reason"}
                                                             (operator)

Every ``POST`` but the login needs the session and its CSRF token (:mod:`bridge.webauth`);
actions go through the same service calls as MQTT (``estop``, ``reset``, ``control``,
``decide``) with the logged-in user as who. Bodies are at most :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bridge.export import CampaignDataError
from bridge.httpserve import HttpBind, serve_asgi
from bridge.service import CAMPAIGN_ID, CONTROL_ACTIONS, LabService
from bridge.servicetypes import ServiceError, UnknownExperiment
from bridge.webauth import COOKIE, CSRF_HEADER, AuthRefused, Session, Sessions
from bridge.webevents import PageEvents, plain
from bridge.webviews import (
    approvals_view,
    campaign_view,
    channel_words,
    checks_view,
    history_view,
    latest_frames,
    measurements_view,
    parameter_rows,
    read_campaign,
    station_limits,
    steps_view,
)
from instruments.deadline import bounded
from loops.campaign import CampaignClosed

log = logging.getLogger(__name__)

__all__ = ["MAX_BODY_BYTES", "STATIC", "LabPage", "lab_page"]

STATIC = Path(__file__).resolve().parent / "webstatic"
MAX_BODY_BYTES = 16 * 1024
MAX_TEXT_CHARS = 500
#: an event stream sends a comment this often (s) when nothing happens (proxies keep it open)
PING_S = 15.0
_EXPERIMENT_ID = CAMPAIGN_ID  # the journal's experiment ids are <campaign>-<seq> (a subset)
_ROLES = ("reference", "outcome")
_PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
#: the report is static HTML with its CSS inline and no script
_REPORT_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"
)
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


class Refused(Exception):
    """A request refused: one line and an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status, headers=_HEADERS)


def _text(body: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            raise Refused(f"{key} is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise Refused(f"{key} must be text")
    if len(value) > MAX_TEXT_CHARS:
        raise Refused(f"{key} is longer than {MAX_TEXT_CHARS} characters")
    return value.strip()


class LabPage:
    """The app's state and handlers (one per served service)."""

    def __init__(self, service: LabService, origin: str, *, secure: bool) -> None:
        self.service = service
        self.origin = origin
        self.events = PageEvents(service)
        self.sessions = Sessions(service.lab.users, secure=secure)
        #: which process serves (a page that sees it change knows the service restarted)
        self.instance = secrets.token_hex(8)
        self._limits: dict[str, Any] = {}
        self._overlays: OrderedDict[str, bytes] = OrderedDict()
        self._reports: dict[str, tuple[Any, asyncio.Lock]] = {}

    # ------------------------------------------------------------------ plumbing
    def app(self) -> Starlette:
        api: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
            ("/api/state", self.state, ["GET"]),
            ("/api/events", self.stream, ["GET"]),
            ("/api/campaigns", self.campaigns, ["GET"]),
            ("/api/campaigns/{cid}", self.campaign, ["GET"]),
            ("/api/campaigns/{cid}/control", self.control, ["POST"]),
            ("/api/campaigns/{cid}/approvals", self.approvals, ["GET"]),
            ("/api/campaigns/{cid}/approvals/{eid}", self.decide, ["POST"]),
            ("/api/experiments/{eid}", self.experiment, ["GET"]),
            ("/api/experiments/{eid}/overlay.png", self.overlay, ["GET"]),
            ("/api/experiments/{eid}/{role}.jpg", self.frame, ["GET"]),
            ("/api/cameras", self.cameras, ["GET"]),
            ("/api/login", self.login, ["POST"]),
            ("/api/logout", self.logout, ["POST"]),
            ("/api/estop", self.estop, ["POST"]),
            ("/api/reset", self.reset, ["POST"]),
            ("/reports/{cid}/", self.report, ["GET"]),
            ("/reports/{cid}/{name}", self.report, ["GET"]),
            ("/", self.index, ["GET"]),
        ]
        routes: list[Any] = [Route(p, self._guard(h), methods=m) for p, h, m in api]
        routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.events.start()
        try:
            yield
        finally:
            await self.events.close()

    def _guard(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except AuthRefused as exc:
                return _error(str(exc), exc.status)
            except Refused as exc:
                return _error(str(exc), exc.status)
            except UnknownExperiment as exc:
                return _error(str(exc), 404)
            except (ServiceError, CampaignClosed) as exc:
                return _error(str(exc), 409)
            except CampaignDataError as exc:
                return _error(str(exc), 404)
            response.headers.update(_HEADERS)
            return response

        return run

    def _session(self, request: Request) -> Session | None:
        return self.sessions.session(request.cookies.get(COOKIE))

    async def _body(self, request: Request) -> dict[str, Any]:
        """A POST's JSON object: same origin, JSON, at most MAX_BODY_BYTES."""
        origin = request.headers.get("origin")
        if origin is not None and origin != self.origin:
            raise AuthRefused(f"cross-site request from {origin[:100]} refused", 403)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused("send JSON (Content-Type: application/json)", 415)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise Refused(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413)
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise Refused(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413)
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            raise Refused("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused("the request body must be a JSON object")
        return body

    async def _act(
        self, request: Request, action: str, what: str
    ) -> tuple[Session, dict[str, Any]]:
        body = await self._body(request)
        session = self.sessions.require(
            self._session(request), action, request.headers.get(CSRF_HEADER), what
        )
        return session, body

    # --------------------------------------------------------------------- reads
    async def index(self, request: Request) -> Response:
        return FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"},
        )

    def _station_limits(self, name: str) -> dict[str, Any]:
        if name not in self._limits:
            self._limits[name] = station_limits(self.service, name)
        return self._limits[name]

    async def state(self, request: Request) -> Response:
        session = self._session(request)
        service = self.service
        stations: dict[str, Any] = {}
        if service.state == "online":
            stations = await self.events.stations()
        you = None
        if session is not None:
            you = {
                "user": session.user,
                "role": service.lab.users.roles.get(session.user),
                "may": self.sessions.permissions(session),
                "csrf": session.csrf,
            }
        channels = {
            ch: channel_words(ch)
            for st in stations.values()
            for ch in [*(st.get("measured") or {}), *(st.get("commanded") or {})]
        }
        return JSONResponse(
            plain(
                {
                    "bridge_id": service.lab.bridge_id,
                    "simulated": service.lab.simulated,
                    "service": service.state,
                    "instance": self.instance,
                    "t": time.time(),
                    "stations": stations,
                    "limits": {n: self._station_limits(n) for n in service.stations},
                    "channels": channels,
                    "campaigns": {
                        cid: {
                            "state": h.status()["state"],
                            "stations": list(h.stations),
                            "live": h.active,
                        }
                        for cid, h in service.campaigns.items()
                    },
                    "alerts": list(self.events.alerts),
                    "you": you,
                    "login": bool(service.lab.users.roles),
                }
            ),
            headers={"Cache-Control": "no-store"},
        )

    async def stream(self, request: Request) -> Response:
        async def body() -> AsyncIterator[str]:
            yield f"retry: 1000\nevent: hello\ndata: {json.dumps({'instance': self.instance})}\n\n"
            async with self.events.subscribe() as queue:
                while True:
                    try:
                        message = await bounded(queue.get(), PING_S)
                    except TimeoutError:
                        yield ": ping\n\n"
                        continue
                    if self.events.is_end(message):
                        return
                    yield f"event: {message['kind']}\ndata: {json.dumps(message)}\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def campaigns(self, request: Request) -> Response:
        return JSONResponse({"campaigns": await history_view(self.service)})

    def _campaign_id(self, request: Request) -> str:
        cid = str(request.path_params["cid"])
        if not CAMPAIGN_ID.match(cid):
            raise Refused(f"{cid[:80]!r} is not a campaign id", 404)
        return cid

    def _experiment_id(self, request: Request) -> str:
        eid = str(request.path_params["eid"])
        if not _EXPERIMENT_ID.match(eid):
            raise Refused(f"{eid[:80]!r} is not an experiment id", 404)
        return eid

    async def campaign(self, request: Request) -> Response:
        cid = self._campaign_id(request)
        data = await asyncio.to_thread(read_campaign, self.service.lab.store, cid)
        return JSONResponse(campaign_view(self.service, data))

    async def approvals(self, request: Request) -> Response:
        return JSONResponse(await approvals_view(self.service, self._campaign_id(request)))

    async def experiment(self, request: Request) -> Response:
        exp = await self.service.experiment(self._experiment_id(request))
        record = await self.service.experiment_record(exp)
        record["images"] = {
            role: {**info, "url": f"/api/experiments/{exp.id}/{role}.jpg"}
            for role, info in record["images"].items()
        }
        if "outcome" in record["images"]:
            record["images"]["overlay"] = {"url": f"/api/experiments/{exp.id}/overlay.png"}
        data = await asyncio.to_thread(read_campaign, self.service.lab.store, exp.campaign_id)
        result = exp.result if isinstance(exp.result, dict) else {}
        verification = result.get("verification") or {}
        record["view"] = {
            "parameters": parameter_rows(self.service, data),
            "steps": steps_view(record),
            "planned_steps": len((exp.recipe or {}).get("steps") or []),
            "measurements": measurements_view(result.get("measurements") or {}),
            "checks": checks_view(verification),
            "verification_reasons": verification.get("reasons") or [],
            "transitions": [
                {"t": t["t"], "state": t["state"], "event": t["event"]}
                for t in record["log"]
                if t["event"] == "state"
            ],
        }
        return JSONResponse(plain(record))

    async def frame(self, request: Request) -> Response:
        eid, role = self._experiment_id(request), str(request.path_params["role"])
        if role not in _ROLES:
            raise Refused(f"no frame {role[:40]!r} (frames: {', '.join(_ROLES)})", 404)
        exp = await self.service.experiment(eid)
        data = await asyncio.to_thread(read_campaign, self.service.lab.store, exp.campaign_id)
        from bridge.reportsheet import image_file

        path = image_file(data, eid, role)
        if path is None:
            raise Refused(f"experiment {eid} has no {role} frame", 404)
        return FileResponse(
            path, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
        )

    async def overlay(self, request: Request) -> Response:
        eid = self._experiment_id(request)
        png = self._overlays.get(eid)
        if png is None:
            exp = await self.service.experiment(eid)
            data = await asyncio.to_thread(read_campaign, self.service.lab.store, exp.campaign_id)
            from bridge.reportsheet import overlay_frame

            found, why = await asyncio.to_thread(overlay_frame, data, exp)
            if found is None:
                raise Refused(f"experiment {eid}: {why}", 404)
            png = found
            if exp.state in ("done", "failed"):  # final: the frame never changes
                self._overlays[eid] = png
                while len(self._overlays) > 32:
                    self._overlays.popitem(last=False)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def cameras(self, request: Request) -> Response:
        frames = await latest_frames(self.service, self.events.frames)
        return JSONResponse({"stations": self.service.stations, "frames": frames})

    async def report(self, request: Request) -> Response:
        """The campaign's report, written (again) when the campaign changed since."""
        cid = self._campaign_id(request)
        name = str(request.path_params.get("name") or "report.html")
        from bridge.report import CONTACT_SHEET, CONVERGENCE, PARAMETERS, REPORT, write_report

        if name not in (REPORT, CONVERGENCE, PARAMETERS, CONTACT_SHEET):
            raise Refused(f"the report has no file {name[:80]!r}", 404)
        store = self.service.lab.store
        folder = Path(store).parent / "reports" / cid
        rows = {c.id: c for c in await self.service.stored_campaigns()}
        if cid not in rows:
            raise Refused(f"no campaign {cid!r} in the journal {store}", 404)
        stamp = (rows[cid].updated, rows[cid].state)
        done, lock = self._reports.setdefault(cid, (None, asyncio.Lock()))
        async with lock:
            done, _ = self._reports[cid]
            if done != stamp or not (folder / REPORT).is_file():
                await asyncio.to_thread(write_report, store, cid, folder)
                self._reports[cid] = (stamp, lock)
        path = folder / name
        if not path.is_file():
            raise Refused(f"the report of {cid} has no {name}", 404)
        kind = "text/html; charset=utf-8" if name == REPORT else "image/png"
        return FileResponse(
            path,
            media_type=kind,
            headers={"Content-Security-Policy": _REPORT_CSP, "Cache-Control": "no-cache"},
        )

    # ------------------------------------------------------------------- actions
    async def login(self, request: Request) -> Response:
        body = await self._body(request)
        session = await self.sessions.login(body.get("user"), body.get("password"))
        log.warning("lab page: %s logged in", session.user)
        response = JSONResponse({"user": session.user})
        response.set_cookie(**self.sessions.cookie(session))
        return response

    async def logout(self, request: Request) -> Response:
        await self._body(request)
        session = self._session(request)
        if session is not None:
            csrf = request.headers.get(CSRF_HEADER) or ""
            if not secrets.compare_digest(csrf.encode(), session.csrf.encode()):
                raise AuthRefused("the request lacks this session's CSRF token", 403)
        self.sessions.logout(session)
        response = JSONResponse({"user": None})
        response.delete_cookie(COOKIE, path="/")
        return response

    async def estop(self, request: Request) -> Response:
        session, body = await self._act(request, "estop", "e-stop the lab")
        reason = _text(body, "reason") or "e-stop from the lab page"
        report = await self.service.estop(reason, who=session.user)
        return JSONResponse(plain(report))

    async def reset(self, request: Request) -> Response:
        session, body = await self._act(request, "reset", "reset stations")
        why = _text(body, "why", required=True)
        stations = body.get("stations")
        if stations is not None and (
            not isinstance(stations, list)
            or len(stations) > 64
            or not all(isinstance(s, str) and len(s) <= 64 for s in stations)
        ):
            raise Refused("stations must be a list of station names")
        drain = body.get("drain", False)
        if not isinstance(drain, bool):
            raise Refused("drain must be true or false")
        assert why is not None
        report = await self.service.reset(session.user, why, stations or None, drain=drain)
        return JSONResponse(plain(report))

    async def control(self, request: Request) -> Response:
        cid = self._campaign_id(request)
        session, body = await self._act(
            request, "control", "pause, resume, stop or abort campaigns"
        )
        if body.get("action") not in CONTROL_ACTIONS:
            raise Refused(f"action must be one of {', '.join(CONTROL_ACTIONS)}")
        reason = _text(body, "reason")
        status = await self.service.control(
            cid,
            body["action"],
            who=session.user,
            reason=reason or f"{body['action']} from the lab page by {session.user}",
        )
        return JSONResponse(plain({"campaign_id": cid, "state": status["state"]}))

    async def decide(self, request: Request) -> Response:
        """Approve or deny a proposal awaiting approval, as the logged-in operator (the
        journal names them and the reason; never a name from the body)."""
        cid, eid = self._campaign_id(request), self._experiment_id(request)
        session, body = await self._act(request, "approve", "approve or deny proposals")
        decision = body.get("decision")
        if decision not in ("approve", "deny"):
            raise Refused("decision must be approve or deny")
        reason = _text(body, "reason", required=True)
        assert reason is not None
        exp = await self.service.experiment(eid)  # an unknown one is a 404
        if exp.campaign_id != cid:
            raise Refused(f"experiment {eid} is campaign {exp.campaign_id}'s, not {cid}'s", 404)
        out = await self.service.decide(
            cid, eid, decision == "approve", session.user, reason, via="web"
        )
        return JSONResponse(plain(out))


@contextlib.asynccontextmanager
async def lab_page(service: LabService, bind: HttpBind) -> AsyncIterator[str]:
    """Serve the lab page for ``service`` on ``bind`` while the block runs; yields its URL."""
    holder: list[LabPage] = []

    def make(base: str) -> Starlette:
        page = LabPage(service, base, secure=bind.tls)
        holder.append(page)
        return page.app()

    async with serve_asgi(make, bind, name="lab-page") as base:
        try:
            yield f"{base}/"
        finally:
            if holder:  # the event streams end now, so the server's graceful stop is quick
                await holder[0].events.close()
