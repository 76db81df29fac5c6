"""The lab as a service: one opened lab, campaigns by id, agent proposals, control, e-stop, reset.

:class:`LabService` is what ``labbridge serve`` puts behind MQTT (``bridge/mqttapi.py``);
it knows nothing of MQTT and can be driven from Python the same way::

    async with LabService(load_lab("lab.yaml")) as service:
        started = await service.start_campaign("color-1", Path("program.md").read_text())
        receipt = await service.propose("color-1", {"red_ml": 0.7, ...}, "agent:alice")
        await service.control("color-1", "pause", who="ana")
        report = await service.estop("smoke in the fume hood", who="ana")
        await service.reset(who="ana", why="hood checked, smoke was steam")

It owns one opened lab (:func:`bridge.campaigns.open_lab`: Ray, the journal actor,
one station actor per bench) for its whole life, and runs each campaign as an
asyncio task over a :class:`~loops.campaign.CampaignRunner` on the stations it
chose for it. A station runs one campaign at a time.

* **start** is idempotent by campaign id: the same id again (with the same
  program) starts nothing and answers with the campaign's state, also for a
  campaign found in the journal from an earlier run; the same id with another
  program is refused. A campaign holds the journal's per-campaign lock
  (:func:`~loops.campaign.campaign_lock`), so ``labbridge run`` cannot run it at
  the same time in another process.
* **e-stop** trips every station through its actor, all at once (latched safe
  state: heater and stirrer off, pumps stopped, light off), then aborts every
  running campaign. Idempotent: stations already latched report
  ``already_tripped``. It never waits for anything else the service does: not
  for a start (a program is parsed on a worker thread, off the event loop), not
  for a reset in progress (a reset waits for e-stops in progress, and trips its
  stations again if an e-stop arrives while it runs).
* **reset** needs who and why; a station whose trip condition still holds stays
  latched and says which monitor holds it.
* **approvals** (:meth:`LabService.approvals`, :meth:`LabService.decide`): agents'
  proposals awaiting a human (``loops/campaignapproval.py``) and the decisions on them,
  with the approver's authenticated identity and reason, journaled.
* **shutdown** aborts running campaigns (their stations tripped into the safe
  state) and closing the service closes every station (instruments safe-stated).

Listeners (:meth:`LabService.add_listener`) receive every campaign runner event
(``event``: ``proposed``, ``rejected``, ``started``, ``finished``, ``failed``,
``cancelled``, ``station``, ``unverified``, ``state``, ``awaiting_approval``,
``approval``, with ``campaign_id``)
and the service's own events (``campaign`` when one starts or ends, ``estop``,
``reset``). They are called on the event loop and must not block.

Modules: this one (life cycle, listeners, campaigns, status), ``bridge/servicesafety.py``
(e-stop, reset, station calls), ``bridge/servicequeries.py`` (a dry run that queues
nothing, live readings, journal reads), ``bridge/serviceapprovals.py`` (proposals
awaiting approval, decisions), ``bridge/servicerestart.py`` (a restarted service picks up
the campaigns its stations still run), ``bridge/servicetypes.py`` (errors, results, handles).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge.campaigns import START_TIMEOUT_S, make_runner, open_lab, run_rejoining
from bridge.labconfig import LabConfig
from bridge.quotas import QuotaExceeded, QuotaGate
from bridge.serviceapprovals import ServiceApprovals
from bridge.servicequeries import ServiceQueries
from bridge.servicerestart import ServiceRestart
from bridge.servicesafety import StationSafety
from bridge.servicetypes import (
    CampaignHandle,
    ServiceError,
    StartResult,
    UnknownCampaign,
    UnknownExperiment,
)
from loops.campaign import (
    CampaignBusy,
    CampaignClosed,
    campaign_lock,
)
from loops.optregistry import missing_extra
from loops.program import Program, load_program
from loops.stationerrors import cause_text
from safety.yamldoc import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "CAMPAIGN_ID",
    "CONTROL_ACTIONS",
    "CampaignClosed",
    "CampaignHandle",
    "LabService",
    "QuotaExceeded",
    "ServiceError",
    "StartResult",
    "UnknownCampaign",
    "UnknownExperiment",
]

#: a campaign id: also one MQTT topic level (no ``/``, ``+``, ``#``)
CAMPAIGN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONTROL_ACTIONS = ("pause", "resume", "stop", "abort")
#: campaign states after which it takes no more work
ENDED = ("done", "stopped", "aborted", "error")
#: how long one station may take to answer a status, trip or reset call (s)
STATION_CALL_TIMEOUT_S = 10.0
#: how long a reset waits for an experiment still running on a tripped station to stop (s)
RESET_WAIT_S = 30.0

Listener = Callable[[dict[str, Any]], None]
#: the lock beside the journal that the service holding the lab keeps (not a campaign id)
OWNER_LOCK = "service~owner"


@contextlib.contextmanager
def _owner_lock(lab: LabConfig) -> Iterator[None]:
    """One service per lab at a time (``serve``, ``mcp``): a second is refused at once."""
    held, holder = contextlib.ExitStack(), ""
    try:
        held.enter_context(campaign_lock(lab.store, OWNER_LOCK))
    except CampaignBusy:
        path = Path(f"{Path(lab.store).resolve()}.{OWNER_LOCK}.lock")
        with contextlib.suppress(OSError):
            holder = path.read_text().strip()
        raise ServiceError(
            f"the lab {lab.source} is open in another labbridge process (pid {holder or '?'} "
            f"holds {path}): one process owns a lab at a time; stop that one, or serve MCP "
            "from it with `labbridge serve --mcp-http`"
        ) from None
    with held:
        yield


class LabService(StationSafety, ServiceQueries, ServiceApprovals, ServiceRestart):
    """One opened lab serving campaigns by id (see the module docstring).

    ``lab``: the validated lab config; ``stations``: open only these (default all);
    ``ray_address``: join this Ray cluster (else the lab's, ``$RAY_ADDRESS``, or a
    local loopback Ray); ``operator``: recorded as who stopped campaigns on shutdown, and
    as who recovered a station that rejoins; ``rejoin``: a campaign's station whose actor
    died (its Ray node went down) rejoins it once its node is back, recovered in
    ``operator``'s name (:func:`~bridge.campaigns.run_rejoining`, ``serve --rejoin``);
    ``station_timeout_s``: for one station's status, trip or reset call; ``reset_wait_s``:
    how long a reset waits for an experiment still running on a tripped station.
    Use as an async context manager, or :meth:`open` / :meth:`close`.
    """

    def __init__(
        self,
        lab: LabConfig,
        *,
        stations: Sequence[str] | None = None,
        ray_address: str | None = None,
        operator: str = "operator",
        start_timeout_s: float = START_TIMEOUT_S,
        station_timeout_s: float = STATION_CALL_TIMEOUT_S,
        reset_wait_s: float = RESET_WAIT_S,
        rejoin: bool = False,
    ) -> None:
        self.lab = lab
        self.operator = operator
        self.rejoin = rejoin
        self._names = list(stations) if stations else list(lab.stations)
        self._ray_address = ray_address
        self._start_timeout_s = start_timeout_s
        self._station_timeout_s = station_timeout_s
        self._reset_wait_s = reset_wait_s
        self._stack: contextlib.AsyncExitStack | None = None
        self.journal: Any = None
        self.actors: dict[str, Any] = {}
        self._campaigns: dict[str, CampaignHandle] = {}
        self._start_lock = asyncio.Lock()
        # resets one at a time; an e-stop never takes this lock (see reset())
        self._safety_lock = asyncio.Lock()
        self._estops_running = 0
        self._estops_idle = asyncio.Event()
        self._estops_idle.set()
        self._estop_seq = 0
        # programs are parsed here, off the event loop that serves e-stops
        self._parser: ThreadPoolExecutor | None = None
        self._listeners: list[Listener] = []
        self.state = "new"  # new | online | stopping | closed
        #: every e-stop answered, oldest first (plain data, as returned)
        self.estops: list[dict[str, Any]] = []
        #: agents' quotas: every proposal passes it (propose)
        self.quota_gate = QuotaGate(lab.quotas, self._journal_call, speed=lab.speed or 1.0)

    # --------------------------------------------------------------- lifecycle
    async def open(self) -> LabService:
        """Open the lab: Ray, the journal, every station (raises what :func:`open_lab` raises)."""
        if self._stack is not None:
            return self
        stack = contextlib.AsyncExitStack()
        kept: set[str] = set()  # stations found alive with a live lease (a restart)
        try:
            stack.enter_context(_owner_lock(self.lab))
            journal, actors = await stack.enter_async_context(
                open_lab(
                    self.lab,
                    ray_address=self._ray_address,
                    stations=self._names,
                    start_timeout_s=self._start_timeout_s,
                    kept=kept,
                )
            )
        except BaseException:
            await stack.aclose()
            raise
        # open_lab's own dict, not a copy: a station that rejoins a campaign replaces its
        # dead actor there (run_rejoining), for this service's calls and for the lab's close
        self._stack, self.journal, self.actors = stack, journal, actors
        self.state = "online"
        log.info("lab %s open: stations %s", self.lab.bridge_id, ", ".join(self.actors))
        if kept:
            await self._pick_up(kept)
        return self

    async def shutdown(self, reason: str = "service shutting down", who: str | None = None) -> None:
        """Stop taking campaigns; abort the running ones (their stations tripped into the safe
        state, running experiments recorded failed) and wait for them to end."""
        if self.state in ("stopping", "closed"):
            return
        self.state = "stopping"
        who = who or self.operator
        active = [h for h in self._campaigns.values() if h.active]
        await asyncio.gather(
            *(h.runner.abort(reason, who=who) for h in active), return_exceptions=True
        )
        await self._wait_tasks(active, timeout=60.0)

    async def close(self, reason: str = "service closed") -> None:
        """:meth:`shutdown`, then close every station (instruments safe-stated) and Ray actors."""
        await self.shutdown(reason)
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self.actors, self.journal = {}, None
        self.state = "closed"
        parser, self._parser = self._parser, None
        if parser is not None:
            parser.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> LabService:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _wait_tasks(self, handles: Sequence[CampaignHandle], timeout: float) -> None:
        tasks = [h.task for h in handles if h.task is not None and not h.task.done()]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:  # a runner that does not end: cancel it (stations were tripped)
            log.error("campaign task %s did not end within %g s: cancelling it", task, timeout)
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _require_open(self) -> None:
        if self._stack is None or self.state != "online":
            raise ServiceError(f"the lab service is {self.state}: not taking requests")

    # --------------------------------------------------------------- listeners
    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for every event (see the module docstring); returns a remover."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _emit(self, event: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not break the service
                log.exception("lab service listener %r failed", listener)

    def _runner_event(self, handle: CampaignHandle, event: dict[str, Any]) -> None:
        if event.get("event") == "state":
            state = str(event.get("state"))
            if state in ("running", "paused", "done", "stopped", "aborted"):
                handle.state = state
            if event.get("reason"):
                handle.reason = str(event["reason"])
        self._emit(event)

    # --------------------------------------------------------------- campaigns
    @property
    def stations(self) -> list[str]:
        return list(self.actors)

    @property
    def campaigns(self) -> dict[str, CampaignHandle]:
        """Every campaign started by this service (running or ended), by id."""
        return dict(self._campaigns)

    def campaign(self, campaign_id: str) -> CampaignHandle:
        handle = self._campaigns.get(campaign_id)
        if handle is None:
            known = ", ".join(sorted(self._campaigns)) or "none"
            raise UnknownCampaign(
                f"no campaign {campaign_id!r} in this service (campaigns: {known})"
            )
        return handle

    def campaign_status(self, campaign_id: str) -> dict[str, Any]:
        """The campaign's state and progress (plain data); raises :class:`UnknownCampaign`."""
        return self.campaign(campaign_id).status()

    async def wait_campaign(self, campaign_id: str) -> CampaignHandle:
        """Wait until the campaign's task has ended; returns its handle."""
        handle = self.campaign(campaign_id)
        if handle.task is not None:
            await asyncio.shield(handle.task)
        return handle

    async def start_campaign(
        self,
        campaign_id: str,
        program: Program | str | Mapping[str, Any],
        *,
        body: str | None = None,
        stations: Sequence[str] | None = None,
        who: str = "api",
    ) -> StartResult:
        """Start campaign ``campaign_id`` with ``program`` (a :class:`Program`, program.md text,
        or its front matter as a mapping with ``body`` as its Markdown).

        ``stations``: run on exactly these (default: up to the program's ``stations``
        free, untripped stations of the lab). Idempotent by id (see the module
        docstring). Never raises for a bad request: the result lists every error.
        """
        self._require_open()
        if not isinstance(campaign_id, str) or not CAMPAIGN_ID.match(campaign_id):
            return StartResult(
                str(campaign_id),
                False,
                errors=(
                    f"campaign id {campaign_id!r} is not 1-64 letters, digits, '_', '.', '-' "
                    "(starting with a letter or digit)",
                ),
            )
        try:
            prog = (
                program
                if isinstance(program, Program)
                else await self.parse_program(
                    program, source=f"campaign {campaign_id} program", body=body
                )
            )
        except (ConfigError, TypeError, ValueError) as exc:
            return StartResult(campaign_id, False, errors=(str(exc),))
        if (missing := missing_extra(prog.strategy)) is not None:
            return StartResult(campaign_id, False, errors=(missing,))
        async with self._start_lock:
            existing = self._campaigns.get(campaign_id)
            if existing is not None:
                if existing.program.to_markdown() != prog.to_markdown():
                    return StartResult(
                        campaign_id,
                        False,
                        errors=(
                            f"campaign {campaign_id} was started with a different program; "
                            "a new campaign needs a new id",
                        ),
                    )
                return StartResult(
                    campaign_id,
                    True,
                    duplicate=True,
                    state=existing.status()["state"],
                    stations=existing.stations,
                    note=f"campaign {campaign_id} is already known: not started again",
                )
            stored = await self._stored_campaign(campaign_id)
            if stored is not None:
                if stored.program != prog.to_markdown():
                    return StartResult(
                        campaign_id,
                        False,
                        errors=(
                            f"campaign {campaign_id} exists in the journal {self.lab.store} "
                            "with a different program; a new campaign needs a new id",
                        ),
                    )
                return StartResult(
                    campaign_id,
                    True,
                    duplicate=True,
                    state=stored.state,
                    note=(
                        f"campaign {campaign_id} exists in the journal ({stored.state}): not "
                        f"started again (`labbridge resume {campaign_id} --lab ...` carries on "
                        "an interrupted one)"
                    ),
                )
            chosen, errors = await self._choose_stations(prog, stations)
            if errors:
                return StartResult(campaign_id, False, errors=tuple(errors))
            try:
                handle = self._handle(campaign_id, prog, chosen, who)
            except ConfigError as exc:  # an agent's approval rule names what it lacks
                return StartResult(campaign_id, False, errors=(str(exc),))
            try:
                handle.lock.enter_context(campaign_lock(self.lab.store, campaign_id))
            except CampaignBusy as exc:
                return StartResult(campaign_id, False, errors=(str(exc),))
            handle.runner.holds_campaign_lock = True
            try:
                await handle.runner.prepare()
            except Exception as exc:
                handle.lock.close()
                return StartResult(
                    campaign_id,
                    False,
                    errors=(f"campaign {campaign_id} could not be created: {cause_text(exc)}",),
                )
            self._campaigns[campaign_id] = handle
            handle.state = "running"
            handle.task = asyncio.create_task(self._run(handle), name=f"campaign-{campaign_id}")
            await asyncio.sleep(0)  # the runner is running before anyone can pause it
        log.info("campaign %s started by %s on %s", campaign_id, who, ", ".join(chosen))
        self._emit(
            {
                "event": "campaign",
                "campaign_id": campaign_id,
                "state": "started",
                "stations": list(chosen),
                "who": who,
            }
        )
        return StartResult(campaign_id, True, state="running", stations=chosen)

    async def parse_program(
        self, program: str | Mapping[str, Any], *, source: str, body: str | None = None
    ) -> Program:
        """:func:`~loops.program.load_program` on the service's parser thread (one; programs
        queue for it), so that the event loop stays free for e-stops. Bounded: the YAML
        limits of :mod:`safety.yamldoc` apply, and the API limits the payload size. A string is
        always program text: a client never makes the service read a file of its own."""
        if self._parser is None:
            self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labservice-parse")
        call = functools.partial(load_program, program, source=source, body=body, files=False)
        return await asyncio.get_running_loop().run_in_executor(self._parser, call)

    def _handle(
        self, campaign_id: str, program: Program, stations: tuple[str, ...], who: str
    ) -> CampaignHandle:
        holder: list[CampaignHandle] = []

        def on_event(event: dict[str, Any]) -> None:
            if holder:
                self._runner_event(holder[0], event)

        runner = make_runner(
            self.lab,
            program,
            self.journal,
            {n: self.actors[n] for n in stations},
            campaign_id,
            on_event,
        )
        handle = CampaignHandle(campaign_id, program, stations, who, runner)
        holder.append(handle)
        return handle

    async def _stored_campaign(self, campaign_id: str) -> Any:
        """The journal's campaign row, or None if the journal does not know the id."""
        try:
            return await self.journal.campaign.remote(campaign_id)
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, LookupError) or type(cause).__name__ == "UnknownCampaign":
                return None
            raise

    async def _choose_stations(
        self, program: Program, requested: Sequence[str] | None
    ) -> tuple[tuple[str, ...], list[str]]:
        in_use = {
            s: h.campaign_id for h in self._campaigns.values() if h.active for s in h.stations
        }
        if requested is not None:
            names = list(dict.fromkeys(requested))
            unknown = [n for n in names if n not in self.actors]
            if unknown or not names:
                return (), [
                    f"no station {', '.join(unknown) or '(none given)'} in this lab "
                    f"(stations: {', '.join(self.actors)})"
                ]
        else:
            names = list(self.actors)
        statuses = await self._station_statuses(names)
        problems: dict[str, str] = {}
        for n in names:
            st = statuses[n]
            if n in in_use:
                problems[n] = f"station {n} is running campaign {in_use[n]}"
            elif "error" in st:
                problems[n] = f"station {n} does not answer: {st['error']}"
            elif st.get("tripped"):
                trip = st.get("trip") or {}
                problems[n] = (
                    f"station {n} is tripped ({trip.get('reason', 'latched')}): "
                    "reset it first (who and why)"
                )
            elif not st.get("open", False):
                problems[n] = f"station {n} is not open"
        if requested is not None:
            if problems:
                return (), list(problems.values())
            return tuple(names), []
        free = [n for n in names if n not in problems]
        if not free:
            return (), ["no station is free: " + "; ".join(problems.values())]
        return tuple(free[: max(1, program.stations)]), []

    async def _run(self, handle: CampaignHandle) -> None:
        try:
            if self.rejoin:
                summary = await run_rejoining(
                    handle.runner, self.lab, self.journal, self.actors, self.operator
                )
            else:
                summary = await handle.runner.run()
            handle.summary = summary
            handle.state, handle.reason = summary.state, summary.reason
        except asyncio.CancelledError:
            handle.state, handle.reason = "aborted", "cancelled"
            raise
        except Exception as exc:
            handle.state = "error"
            handle.reason = f"the campaign runner failed: {cause_text(exc)}"
            log.exception("campaign %s failed", handle.campaign_id)
            # experiments may still be in flight on the stations: make them safe
            await asyncio.gather(
                *(
                    self._station_call(
                        n, "trip", f"campaign {handle.campaign_id} failed", "service"
                    )
                    for n in handle.stations
                ),
                return_exceptions=True,
            )
            with contextlib.suppress(Exception):
                await self.journal.set_campaign_state.remote(
                    handle.campaign_id, "aborted", reason=handle.reason
                )
        finally:
            handle.lock.close()
            self._emit(
                {
                    "event": "campaign",
                    "campaign_id": handle.campaign_id,
                    "state": handle.state,
                    "reason": handle.reason,
                }
            )

    async def control(
        self, campaign_id: str, action: str, *, who: str, reason: str | None = None
    ) -> dict[str, Any]:
        """``pause``, ``resume``, ``stop`` (running experiments finish) or ``abort`` (stations
        tripped) a running campaign; returns its status."""
        self._require_open()
        if action not in CONTROL_ACTIONS:
            raise ServiceError(f"unknown action {action!r} (one of {', '.join(CONTROL_ACTIONS)})")
        if not who or not who.strip():
            raise ServiceError("a control request must say who sends it")
        handle = self.campaign(campaign_id)
        if not handle.active:
            raise ServiceError(
                f"campaign {campaign_id} has ended ({handle.state}): nothing to {action}"
            )
        runner = handle.runner
        if action == "pause":
            await runner.pause(who)
        elif action == "resume":
            await runner.resume_running(who)
        elif action == "stop":
            runner.stop(reason or f"stopped by {who}")
        else:
            await runner.abort(reason or f"aborted by {who}", who=who)
        log.warning(
            "campaign %s: %s by %s%s", campaign_id, action, who, f": {reason}" if reason else ""
        )
        return handle.status()

    # ------------------------------------------------------------------ status
    async def status(self) -> dict[str, Any]:
        """The service, its stations and campaigns as plain data (the ``status`` topic)."""
        names = list(self.actors)
        raw = await self._station_statuses(names) if names else {}
        in_use = {
            s: h.campaign_id for h in self._campaigns.values() if h.active for s in h.stations
        }
        stations: dict[str, Any] = {}
        for name, st in raw.items():
            if "error" in st:
                stations[name] = {"ok": False, "error": st["error"], "campaign": in_use.get(name)}
                continue
            trip = st.get("trip")
            stations[name] = {
                "ok": True,
                "open": bool(st.get("open")),
                "busy": bool(st.get("busy")),
                "experiment": st.get("experiment"),
                "runs": int(st.get("runs") or 0),
                "tripped": bool(st.get("tripped")),
                "trip": dict(trip) if isinstance(trip, Mapping) else None,
                "trips": int(st.get("trips") or 0),
                "campaign": in_use.get(name),
            }
        return {
            "bridge_id": self.lab.bridge_id,
            "service": self.state,
            "simulated": self.lab.simulated,
            "stations": stations,
            "campaigns": {
                cid: {"state": h.status()["state"], "stations": list(h.stations)}
                for cid, h in self._campaigns.items()
            },
        }
