"""The MCP server's tools and resources: a :class:`~bridge.service.LabService` for agents.

Every call is made by one authenticated agent (:class:`~bridge.agents.Agent`: the stdio
transport's token, or each HTTP request's bearer token) and is refused, as a one-line tool
error naming the scope or the problem and what to do, unless lab.yaml's scopes for that
agent allow it. No tool commands an instrument: an agent reads, dry-runs and proposes;
the campaign runs accepted proposals through the safety layer like its optimizer's own.

Tools: ``lab``, ``readings``, ``campaigns``, ``campaign``, ``results``, ``experiment``,
``why_refused``, ``wait_for_experiment`` (read), ``dry_run`` (read; nothing queued),
``propose``, ``start_campaign``, ``control``. Resources:
``labbridge://campaigns/{campaign_id}/program.md`` and ``.../report.html``. Their
descriptions carry the lab's own limits (the envelope's channels, rules and budgets).
Inputs are bounded (string lengths, at most 64 parameters, numbers only).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import Field, StrictFloat, StrictInt

from bridge.agents import Agent, Authenticator, AuthError, ScopeRefused
from bridge.labconfig import LabConfig
from bridge.labdescribe import describe_station
from bridge.mcpcalls import CallGate, Forward, LabMCP
from bridge.service import (
    CAMPAIGN_ID,
    CampaignHandle,
    LabService,
    ServiceError,
)
from loops.campaign import CampaignClosed
from loops.journal import Experiment
from loops.program import Program
from safety.yamldoc import ConfigError

log = logging.getLogger(__name__)

__all__ = ["CALLS", "LabMCP", "LabTools"]  # LabMCP: bridge/mcpcalls.py

#: every tool, then every resource, by the name of its method (and tool)
CALLS = (
    "lab",
    "readings",
    "campaigns",
    "campaign",
    "results",
    "experiment",
    "why_refused",
    "wait_for_experiment",
    "dry_run",
    "propose",
    "start_campaign",
    "control",
    "program_md",
    "report_html",
)
#: the bearer token of a call forwarded from the HTTP transport's process (bridge/mcpproc.py)
FORWARDED_TOKEN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "forwarded_token", default=None
)

#: a program.md an agent may send (as the MQTT API's payload limit)
MAX_PROGRAM_CHARS = 65_536
#: the longest wait_for_experiment (s)
MAX_WAIT_S = 300.0

CampaignId = Annotated[str, Field(min_length=1, max_length=64, description="a campaign id")]
ExperimentId = Annotated[
    str, Field(min_length=1, max_length=80, description="an experiment id (<campaign>-<seq>)")
]
StationName = Annotated[str, Field(min_length=1, max_length=64, description="a station name")]
Params = Annotated[
    dict[Annotated[str, Field(max_length=64)], StrictInt | StrictFloat],
    Field(
        max_length=64,
        description="the campaign's parameters, name -> number, in the units the campaign "
        'tool gives (e.g. {"temperature_c": 40.0})',
    ),
]
Note = Annotated[str | None, Field(max_length=500, description="a note, logged")]


def _plain(value: Any) -> Any:
    """JSON-able data (anything exotic as text)."""
    return json.loads(json.dumps(value, default=str))


def _summary(program: Program) -> dict[str, Any]:
    """What an agent needs of a program to propose: parameters, constraints, objective."""
    return {
        "name": program.name,
        "parameters": {p.name: p.as_dict() for p in program.parameters},
        "constraints": [c.text for c in program.constraints],
        "objective": {**program.objective.as_dict(), "target": program.stop.target},
        "budget": program.budget.as_dict(),
        "stop": program.stop.as_dict(),
        "stations": program.stations,
        "fixed": dict(program.fixed),
    }


def _row(e: Experiment) -> dict[str, Any]:
    result = e.result if isinstance(e.result, Mapping) else {}
    return {
        "experiment_id": e.id,
        "seq": e.seq,
        "proposer": e.proposer,
        "state": e.state,
        "station": e.station,
        "params": e.params,
        "objective": e.objective,
        "measurements": result.get("measurements"),
        "verified": e.verified,
        "verification": result.get("verification"),
        "reason": e.reason,
    }


class LabTools:
    """The tools and resources over ``service`` for agents authenticated by ``auth``.

    ``token``: the stdio transport's token (from the environment; checked again on every
    call, so a revocation applies at once); None: each HTTP request's bearer token, checked
    by the transport (:class:`~bridge.mcpserver.BearerTokens`) and again here.

    Over HTTP the transport runs in a process of its own (:mod:`bridge.mcpproc`): there
    :meth:`forwarding` builds the same server with no service, each admitted call forwarded
    (``forward``) to the lab service's process, which runs it with :meth:`run_forwarded`.
    """

    def __init__(
        self,
        service: LabService | None,
        auth: Authenticator,
        *,
        token: str | None = None,
        lab: LabConfig | None = None,
        stations: Sequence[str] = (),
        forward: Forward | None = None,
    ):
        self._service = service
        #: the lab and its open stations (the tools' descriptions are written from them)
        self.lab_config: LabConfig = service.lab if service is not None else _given(lab)
        self.stations = list(service.stations) if service is not None else list(stations)
        self.auth = auth
        self.token = token
        #: station -> its description (:func:`describe_station`): the lab config does not change
        self._described: dict[str, dict[str, Any]] = {}
        #: each call's agent and rate (its quota's tool_calls_per_s), then where it runs
        self.gate = CallGate(
            self.agent,
            self.lab_config.quotas,
            None if forward is None else self._forwarder(forward),
        )

    @classmethod
    def forwarding(
        cls, lab: LabConfig, stations: Sequence[str], auth: Authenticator, forward: Forward
    ) -> LabTools:
        """The tools of the transport's process: described from ``lab`` and its open
        ``stations``; every admitted call goes to ``forward(name, arguments, token,
        resource)``."""
        return cls(None, auth, lab=lab, stations=stations, forward=forward)

    @property
    def service(self) -> LabService:
        if self._service is None:  # the transport's process: calls are forwarded, never run
            raise RuntimeError("LabTools.forwarding runs no call: it forwards them")
        return self._service

    # ------------------------------------------------------------------ identity
    def _token(self, ctx: Context[Any, Any] | None) -> str:
        token = self.token or FORWARDED_TOKEN.get()
        if token is None and ctx is not None:
            request = ctx.request_context.request
            scope = getattr(request, "scope", None)
            user = scope.get("user") if isinstance(scope, Mapping) else None
            access = getattr(user, "access_token", None)
            token = getattr(access, "token", None)
        if not isinstance(token, str):
            raise AuthError("not authenticated: send the agent's token as a bearer token")
        return token

    def agent(self, ctx: Context[Any, Any] | None) -> Agent:
        """The agent making this call: never a name from its arguments."""
        return self.auth.authenticate(self._token(ctx))

    def _forwarder(self, forward: Forward) -> Callable[..., Awaitable[Any]]:
        async def call(name: str, kwargs: dict[str, Any], resource: bool) -> Any:
            ctx = kwargs.pop("ctx", None)
            return await forward(name, kwargs, self._token(ctx), resource)

        return call

    async def run_forwarded(self, name: str, arguments: dict[str, Any], token: str) -> Any:
        """Run the call ``name`` (one of :data:`CALLS`) forwarded by the transport's process
        as the agent of ``token`` (authenticated again here)."""
        if name not in CALLS:
            raise ToolError(f"no tool or resource {name!r}")
        FORWARDED_TOKEN.set(token)  # this call's task only
        return await getattr(self, name)(**arguments, ctx=None)

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """A refusal becomes a one-line tool error saying what was wrong and what to do
        (anything else is a bug: the SDK logs it here and tells the client only that the
        tool failed)."""
        try:
            yield
        except (AuthError, ScopeRefused, ServiceError, CampaignClosed, ConfigError) as exc:
            raise ToolError(" ".join(str(exc).split())) from None

    def _campaign_id(self, campaign_id: str) -> str:
        if not CAMPAIGN_ID.match(campaign_id):
            raise ToolError(
                f"{campaign_id!r} is not a campaign id (1-64 letters, digits, '_', '.', '-'): "
                "the campaigns tool lists the ones you may read"
            )
        return campaign_id

    def _active(self, agent: Agent, action: str, campaign_id: str) -> CampaignHandle:
        """The service's campaign, once the agent may ``action`` it on its stations."""
        agent.require(action, self._campaign_id(campaign_id))
        handle = self.service.campaign(campaign_id)
        agent.require_stations(handle.stations, f"campaign {campaign_id} runs on it")
        return handle

    async def _readable(self, agent: Agent, experiment_id: str) -> Experiment:
        exp = await self.service.experiment(experiment_id)
        agent.require("read", exp.campaign_id)
        return exp

    # --------------------------------------------------------------------- reads
    async def lab(self, ctx: Context[Any, Any]) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            lab = self.service.lab
            stations = [s for s in self.service.stations if agent.config.may_use(s)]
            return _plain(
                {
                    "bridge_id": lab.bridge_id,
                    "simulated": lab.simulated,
                    "you": {
                        "agent": agent.proposer,
                        "scopes": agent.config.as_dict(),
                        **await self._quota(agent),
                    },
                    "stations": {s: self._describe(s) for s in stations},
                    "not_yours": [s for s in self.service.stations if s not in stations],
                }
            )

    async def _quota(self, agent: Agent) -> dict[str, Any]:
        """The agent's quota and how much of it is used (counted from the journal)."""
        quota = self.service.lab.quotas.for_proposer(agent.proposer)
        uses = await self.service.quota_usage(agent.proposer)
        return {
            "quota": quota.as_dict() if quota is not None else None,
            "quota_used": [u.as_dict() for u in uses],
        }

    def _describe(self, station: str) -> dict[str, Any]:
        if station not in self._described:
            self._described[station] = _plain(describe_station(self.service.lab.stations[station]))
        return self._described[station]

    async def readings(self, station: StationName, ctx: Context[Any, Any]) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            agent.require_stations([station], "to read it")
            return _plain(await self.service.readings(station))

    async def campaigns(self, ctx: Context[Any, Any]) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            out: dict[str, Any] = {}
            for cid, handle in self.service.campaigns.items():
                if agent.may("read", cid):
                    st = handle.status()
                    p = st["progress"]
                    out[cid] = {
                        "state": st["state"],
                        "stations": st["stations"],
                        "started_by": st["started_by"],
                        "experiments": p.get("experiments"),
                        "budget": p.get("budget"),
                        "best": p.get("best"),
                    }
            for row in await self.service.stored_campaigns():
                if row.id not in out and agent.may("read", row.id):
                    out[row.id] = {"state": row.state, "in_this_service": False}
            return _plain({"campaigns": out})

    async def campaign(self, campaign_id: CampaignId, ctx: Context[Any, Any]) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            agent.require("read", self._campaign_id(campaign_id))
            handle = self.service.campaigns.get(campaign_id)
            if handle is not None:
                return _plain({**handle.status(), "program": _summary(handle.program)})
            row = await self._stored(campaign_id)
            program = await self.service.parse_program(
                row.program, source=f"campaign {campaign_id} program"
            )
            return _plain(
                {
                    "campaign_id": campaign_id,
                    "state": row.state,
                    "in_this_service": False,
                    "program": _summary(program),
                }
            )

    async def _stored(self, campaign_id: str) -> Any:
        rows = await self.service.stored_campaigns()
        for row in rows:
            if row.id == campaign_id:
                return row
        known = ", ".join(sorted(self.service.campaigns)) or "none"
        raise ServiceError(
            f"no campaign {campaign_id!r} in this lab (running here: {known}); the campaigns "
            "tool lists the ones you may read"
        )

    async def results(
        self,
        campaign_id: CampaignId,
        ctx: Context[Any, Any],
        since_seq: Annotated[int, Field(ge=0, description="only experiments after this seq")] = 0,
        limit: Annotated[int, Field(ge=1, le=200, description="at most this many")] = 50,
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            agent.require("read", self._campaign_id(campaign_id))
            rows = [e for e in await self.service.experiments(campaign_id) if e.seq > since_seq]
            if not rows and campaign_id not in self.service.campaigns:
                await self._stored(campaign_id)  # says so if there is no such campaign
            shown = rows[:limit]
            return _plain(
                {
                    "campaign_id": campaign_id,
                    "experiments": [_row(e) for e in shown],
                    "more": len(rows) > len(shown),
                    "next_since_seq": shown[-1].seq if shown else since_seq,
                }
            )

    async def experiment(
        self, experiment_id: ExperimentId, ctx: Context[Any, Any]
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            exp = await self._readable(agent, experiment_id)
            return _plain(await self.service.experiment_record(exp))

    async def why_refused(
        self, experiment_id: ExperimentId, ctx: Context[Any, Any]
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            exp = await self._readable(agent, experiment_id)
            record = await self.service.experiment_record(exp)
            reasons: list[str] = []
            for entry in record["log"]:
                if entry["state"] == "rejected" and entry["event"] == "state":
                    reasons = list(entry["data"].get("reasons") or [])
            if exp.state == "rejected" and not reasons and exp.reason:
                reasons = [exp.reason]
            return _plain(
                {
                    "experiment_id": exp.id,
                    "state": exp.state,
                    "refused": exp.state == "rejected",
                    "reasons": reasons,
                    "reason": exp.reason,
                }
            )

    async def wait_for_experiment(
        self,
        experiment_id: ExperimentId,
        ctx: Context[Any, Any],
        timeout_s: Annotated[float, Field(gt=0, le=MAX_WAIT_S)] = 60.0,
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            exp = await self._readable(agent, experiment_id)
            exp = await self.service.wait_experiment(exp, timeout_s)
            return _plain(_row(exp))

    async def dry_run(
        self, campaign_id: CampaignId, params: Params, ctx: Context[Any, Any]
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            self._active(agent, "propose", campaign_id)
            verdict = await self.service.dry_run(campaign_id, params, agent.proposer)
            refused = await self.service.quota_refusal(campaign_id, agent.proposer)
            verdict["quota"] = None if refused is None else refused.text
            if refused is not None:  # a proposal now would be refused for its quota
                verdict["ok"] = False
                verdict["reasons"] = [*verdict["reasons"], refused.text]
            return _plain(verdict)

    # -------------------------------------------------------------------- acting
    async def propose(
        self, campaign_id: CampaignId, params: Params, ctx: Context[Any, Any], note: Note = None
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            self._active(agent, "propose", campaign_id)
            receipt = await self.service.propose(campaign_id, params, agent.proposer)
            if note:
                log.info("proposal %s by %s: %s", receipt.experiment_id, agent.proposer, note)
            return _plain({"campaign_id": campaign_id, **receipt.as_dict()})

    async def start_campaign(
        self,
        campaign_id: CampaignId,
        program: Annotated[
            str,
            Field(
                min_length=1,
                max_length=MAX_PROGRAM_CHARS,
                description="the program.md text: YAML front matter between --- lines "
                "(parameters, constraints, objective, budget, recipe), then Markdown",
            ),
        ],
        ctx: Context[Any, Any],
        stations: Annotated[
            list[StationName] | None,
            Field(max_length=16, description="run on exactly these stations"),
        ] = None,
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            agent.require("start", self._campaign_id(campaign_id))
            mine = [s for s in self.service.stations if agent.config.may_use(s)]
            if stations is not None:
                agent.require_stations(stations, "to run the campaign on")
            elif len(mine) < len(self.service.stations):
                raise ScopeRefused(
                    f"agent {agent.name} may run campaigns on {', '.join(mine) or 'no station'} "
                    "only: name the stations to run on (stations=[...])"
                )
            result = await self.service.start_campaign(
                campaign_id, program, stations=stations, who=agent.proposer
            )
            if not result.accepted:
                why = " ".join("; ".join(result.errors).split())
                raise ToolError(f"campaign {campaign_id} not started: {why}")
            return _plain(result.as_dict())

    async def control(
        self,
        campaign_id: CampaignId,
        action: Literal["pause", "resume", "stop", "abort"],
        ctx: Context[Any, Any],
        reason: Note = None,
    ) -> dict[str, Any]:
        with self._refusals():
            agent = self.agent(ctx)
            self._active(agent, "control", campaign_id)
            status = await self.service.control(
                campaign_id, action, who=agent.proposer, reason=reason
            )
            return _plain({"campaign_id": campaign_id, "action": action, "state": status["state"]})

    # ----------------------------------------------------------------- resources
    async def program_md(self, campaign_id: str, ctx: Context[Any, Any]) -> str:
        try:
            agent = self.agent(ctx)
            agent.require("read", self._campaign_id(campaign_id))
            handle = self.service.campaigns.get(campaign_id)
            if handle is not None:
                return handle.program.to_markdown()
            row = await self._stored(campaign_id)
            return row.program if isinstance(row.program, str) else json.dumps(row.program)
        except (AuthError, ScopeRefused, ServiceError, ToolError) as exc:
            raise ResourceError(str(exc)) from None

    async def report_html(self, campaign_id: str, ctx: Context[Any, Any]) -> str:
        try:
            agent = self.agent(ctx)
            agent.require("read", self._campaign_id(campaign_id))
            await self._stored(campaign_id)
        except (AuthError, ScopeRefused, ServiceError, ToolError) as exc:
            raise ResourceError(str(exc)) from None
        from bridge.export import CampaignDataError
        from bridge.report import write_report  # matplotlib, OpenCV: on use only

        store = self.service.lab.store
        out = Path(store).parent / "reports" / campaign_id
        try:
            path = await asyncio.to_thread(write_report, store, campaign_id, out)
        except CampaignDataError as exc:
            raise ResourceError(str(exc)) from None
        return path.read_text(encoding="utf-8")


def _given(lab: LabConfig | None) -> LabConfig:
    if lab is None:
        raise TypeError("LabTools: a service, or the lab config (forwarding)")
    return lab
