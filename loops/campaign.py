"""The closed loop: a campaign keeps every station busy with proposals, safely and durably.

:class:`CampaignRunner` drives one campaign (a :class:`~loops.program.Program`)
over K stations and the journal, each behind a small link
(:class:`~loops.stations.StationLink`, :class:`~loops.journal.JournalLink`):
Ray actors (``loops.raylinks.ray_links``) or the same classes in this process
(:class:`~loops.stations.LocalStation`, :class:`~loops.journal.AsyncJournal`)::

    runner = CampaignRunner(program, journal, {"bench-a": link_a, "bench-b": link_b},
                            campaign_id="run-1")
    await runner.prepare()                 # or prepare(resume=True, operator="ana")
    summary = await runner.run()           # until a stop rule, the budget, or stop()

Every station has its own worker: as soon as its experiment finishes, it
claims the next proposal (asynchronous, never lock-step batches). A proposal
goes through, each transition journaled BEFORE it is acted on:

1. ``proposed`` (the optimizer's ``ask()``, which knows every pending point,
   or an agent's :meth:`CampaignRunner.propose`), with the proposer's identity
   and the recipe built from the parameters;
2. the program's constraints and the safety layer's dry run on the station
   that will run it: refused -> ``rejected`` with every reason, told to the
   optimizer as ``infeasible`` (never silently dropped); else ``checked``;
3. ``queued`` on that station; the station actor moves it to ``running`` and
   journals each step before it acts;
4. ``done`` with the result and the objective (the optimizer's state is saved
   in the same transaction), or ``failed`` with the reason (the station
   tripped itself into its safe state and is out of this campaign until an
   operator resets it). An experiment whose station died is marked
   ``failed`` with the step that was in progress: never retried on hardware.

Stop rules (:meth:`Program.stop_reason`: target reached, experiment budget,
time budget on the campaign's clock, no improvement in N) are checked before
every claim; the experiments in flight when a rule fires finish and count.

Resume (``prepare(resume=True)``) after a crash or a kill -9: the journal
marks ``running`` experiments ``interrupted`` and puts ``checked``/``queued``
ones back to ``proposed``; each interrupted experiment's station is
safe-stated, checked and drained (:meth:`StationActor.recover`, recorded with
the operator's name) before the experiment is closed as ``failed`` -- it is
never re-run. The optimizer is restored from its saved state and told every
outcome the saved state does not know yet, so no finished result is lost and
no proposal is asked twice.

The campaign state saved with the journal (``optimizer_state`` of the
campaign row) is :data:`STATE_VERSION`'s wrapper: ``optimizer`` (the
strategy's own JSON state), ``pending`` (experiment id -> proposal id),
``told`` (experiment ids whose outcome the optimizer has), ``elapsed_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loops.journal import Experiment, Journal, JournalLink, ResumeInfo
from loops.optimizer import (
    BayesOptimizer,
    Direction,
    Exhausted,
    GridSearch,
    RandomSearch,
    Status,
    UnknownProposal,
    optimizer_from_state,
)
from loops.program import Program
from loops.recipe import RecipeError, build_recipe
from loops.stations import StationActor, StationLink, StationLost

log = logging.getLogger(__name__)

__all__ = [
    "STATE_VERSION",
    "CampaignBusy",
    "CampaignClosed",
    "CampaignRunner",
    "CampaignSummary",
    "ProposalReceipt",
    "campaign_lock",
    "make_optimizer",
]

STATE_VERSION = 1
Event = dict[str, Any]
OnEvent = Callable[[Event], None]
#: consecutive rejected optimizer proposals after which the campaign stops (a space
#: the safety layer refuses almost everywhere: fix the program or the envelope)
MAX_CONSECUTIVE_REJECTIONS = 25


class CampaignClosed(RuntimeError):
    """The campaign is not accepting proposals (not started, stopping or ended)."""


class CampaignBusy(RuntimeError):
    """Another process already runs this campaign (its lock file is held)."""


@dataclass(frozen=True)
class ProposalReceipt:
    """The answer to an agent's proposal: accepted (queued for a station) or rejected with reasons."""

    experiment_id: str
    accepted: bool
    reasons: tuple[str, ...] = ()
    proposer: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "proposer": self.proposer,
        }


@dataclass(frozen=True)
class CampaignSummary:
    """How a campaign (or this run of it) ended."""

    campaign_id: str
    state: str
    reason: str
    best: dict[str, Any] | None
    counts: dict[str, int]
    elapsed_s: float
    stations: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "state": self.state,
            "reason": self.reason,
            "best": self.best,
            "counts": dict(self.counts),
            "elapsed_s": self.elapsed_s,
            "stations": {k: dict(v) for k, v in self.stations.items()},
        }


def make_optimizer(program: Program) -> BayesOptimizer | RandomSearch | GridSearch:
    """The program's strategy over its space, with its constraints, direction and seed."""
    space = {p.name: (p.low, p.high, p.type) for p in program.parameters}
    direction: Direction = "minimize" if program.objective.minimize else "maximize"

    def feasible(params: Mapping[str, Any]) -> bool:
        return program.feasible(params)[0]

    if program.strategy == "bayes":
        return BayesOptimizer(
            space,
            direction=direction,
            seed=program.seed,
            initial_points=program.initial_points,
            constraints=feasible,
        )
    if program.strategy == "random":
        return RandomSearch(space, program.seed, direction=direction, constraints=feasible)
    if program.strategy == "grid":
        budget = program.budget.experiments or 100
        per_axis = max(2, math.floor(budget ** (1.0 / max(1, len(space)))))
        return GridSearch(space, per_axis, direction=direction, constraints=feasible)
    raise ValueError(f"unknown strategy {program.strategy!r} (bayes, random or grid)")


@contextlib.contextmanager
def campaign_lock(journal_path: str | Path, campaign_id: str) -> Iterator[Path]:
    """Hold ``<journal>.<campaign>.lock`` (flock) while this process runs the campaign.

    A second ``run``/``resume`` of the same campaign raises :class:`CampaignBusy`
    instead of racing the first one for the same stations and journal rows. The
    kernel drops the lock when the holder dies (kill -9 included).
    """
    path = Path(f"{Path(journal_path).resolve()}.{campaign_id}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CampaignBusy(
                f"campaign {campaign_id} is already running (pid {holder} holds {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


@dataclass
class _Item:
    """A proposal on its way to a station."""

    experiment_id: str
    pid: str | None  # the optimizer's pending id (None: not in the optimizer's space)
    params: dict[str, Any]
    recipe: dict[str, Any] | None
    proposer: str
    checked: bool


@dataclass
class _Slot:
    """One station as the campaign sees it."""

    name: str
    actor: StationLink
    state: str = "idle"  # idle | busy | out
    experiment: str | None = None
    reason: str | None = None
    runs: int = 0
    disagreements: int = 0  # unverified results in a row

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "experiment": self.experiment,
            "reason": self.reason,
            "runs": self.runs,
        }


@dataclass
class _Counts:
    proposed: int = 0
    rejected: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    agent: int = 0
    by_station: dict[str, int] = field(default_factory=dict)


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    return f"{type(err).__name__}: {err}"


def _violation_text(v: Mapping[str, Any]) -> str:
    step = v.get("step")
    where = f"step {step}" if step is not None else "recipe"
    command = v.get("command") or {}
    what = command.get("description") if isinstance(command, Mapping) else None
    rule = v.get("rule") or "?"
    text = f"{where}: {rule}: {v.get('reason', '?')}"
    return f"{text} ({what})" if what else text


class CampaignRunner:
    """One campaign over stations and a journal, through their links (module docstring).

    ``stations``: station name -> a :class:`~loops.stations.StationLink` to a started
    station; ``journal``: a :class:`~loops.journal.JournalLink`;
    ``clock_now``: the campaign's clock for the time budget (a simulated bench's
    clock on a simulated lab); ``on_event``: called (in the event loop) with
    every event dict (``event``: ``proposed``, ``rejected``, ``started``,
    ``finished``, ``failed``, ``cancelled``, ``station``, ``state``); it must
    not block.
    """

    def __init__(
        self,
        program: Program,
        journal: JournalLink,
        stations: Mapping[str, StationLink],
        *,
        campaign_id: str,
        clock_now: Callable[[], float] = time.monotonic,
        on_event: OnEvent | None = None,
        max_consecutive_rejections: int = MAX_CONSECUTIVE_REJECTIONS,
        max_disagreements: Mapping[str, int] | None = None,
        images_dir: Path | None = None,
    ) -> None:
        if not stations:
            raise ValueError("a campaign needs at least one station")
        self.program = program
        self.campaign_id = campaign_id
        self.journal = journal
        self.optimizer = make_optimizer(program)
        self._slots = {name: _Slot(name, actor) for name, actor in stations.items()}
        self._clock_now = clock_now
        self._on_event = on_event
        self._max_rejections = max_consecutive_rejections
        self._max_disagreements = dict(max_disagreements or {})
        self._images_dir = images_dir
        self._lock = asyncio.Lock()  # claims, asks, tells and state saves: one at a time
        self._queue: deque[_Item] = deque()  # agent and resumed proposals, run before new asks
        self._pending: dict[str, str] = {}  # experiment id -> optimizer proposal id
        self._told: set[str] = set()
        self._values: list[float | None] = []  # objective per experiment run, finish order
        self._best: tuple[str, dict[str, Any], float] | None = None
        self._counts = _Counts()
        self._consecutive_rejections = 0
        self._in_flight = 0
        self._elapsed_before = 0.0
        self._t0: float | None = None
        self._stop_request: str | None = None
        self._abort_request: str | None = None
        self._exhausted: str | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._phase = "new"  # new | prepared | running | ended
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._notes: list[Awaitable[int]] = []  # journal writes in flight (station events)
        self._strategy = f"optimizer:{self.optimizer.strategy}"

    # ------------------------------------------------------------------ events
    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is None:
            return
        payload: Event = {"event": event, "campaign_id": self.campaign_id, **data}
        try:
            self._on_event(payload)
        except Exception:  # a broken listener must not break the campaign
            log.exception("campaign %s: on_event listener failed", self.campaign_id)

    # ------------------------------------------------------------------- state
    @property
    def elapsed_s(self) -> float:
        """Campaign clock seconds, over every run of this campaign (resumes included)."""
        if self._t0 is None:
            return self._elapsed_before
        return self._elapsed_before + (self._clock_now() - self._t0)

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "optimizer": self.optimizer.state(),
            "pending": dict(self._pending),
            "told": sorted(self._told),
            "elapsed_s": self.elapsed_s,
        }

    def progress(self) -> dict[str, Any]:
        """A snapshot for progress displays and status topics (plain data)."""
        c = self._counts
        budget = self.program.budget.experiments
        best = None
        if self._best is not None:
            best = {"experiment_id": self._best[0], "params": self._best[1], "value": self._best[2]}
        return {
            "campaign_id": self.campaign_id,
            "phase": self._phase,
            "paused": not self._running.is_set(),
            "experiments": len(self._values),
            "budget": budget,
            "in_flight": self._in_flight,
            "queued": len(self._queue),
            "done": c.done,
            "failed": c.failed,
            "rejected": c.rejected,
            "agent": c.agent,
            "best": best,
            "target": self.program.stop.target,
            "elapsed_s": self.elapsed_s,
            "stations": {n: s.as_dict() for n, s in self._slots.items()},
        }

    def _tell(self, item: _Item, value: float | None, status: Status) -> None:
        """Tell the optimizer an outcome (by pending id, else by params); remember it was told."""
        if item.pid is not None and item.pid in {p.id for p in self.optimizer.pending()}:
            self.optimizer.tell(item.pid, value, status=status)
        else:
            try:
                self.optimizer.tell(item.params, value, status=status)
            except ValueError as exc:  # params outside the space (an agent's): nothing to learn
                log.info("campaign %s: %s not told: %s", self.campaign_id, item.experiment_id, exc)
        self._pending.pop(item.experiment_id, None)
        self._told.add(item.experiment_id)

    def _forget(self, item: _Item) -> None:
        """Drop a proposal from the optimizer without information (it never ran)."""
        if item.pid is not None:
            with contextlib.suppress(UnknownProposal):
                self.optimizer.cancel(item.pid)
        self._pending.pop(item.experiment_id, None)
        self._told.add(item.experiment_id)

    def _record_value(
        self, experiment_id: str, params: Mapping[str, Any], value: float | None
    ) -> None:
        self._values.append(value)
        if value is None or not math.isfinite(value):
            return
        if self._best is None or self.program.objective.better(value, self._best[2]):
            self._best = (experiment_id, dict(params), value)

    # ----------------------------------------------------------------- prepare
    async def prepare(self, *, resume: bool = False, operator: str = "operator") -> None:
        """Create the campaign in the journal, or (``resume``) pick it up after a crash.

        On resume every interrupted experiment's station is recovered first
        (:meth:`StationActor.recover`: safe state, reset by ``operator``, vessels
        drained) and the experiment closed as failed, never re-run.
        """
        if self._phase != "new":
            raise RuntimeError(f"campaign {self.campaign_id} is already {self._phase}")
        j = self.journal
        if not resume:
            await j.call(
                Journal.create_campaign,
                self.campaign_id,
                self.program.name,
                self.program.to_markdown(),
            )
            await j.call(Journal.save_optimizer_state, self.campaign_id, self._state())
        else:
            info: ResumeInfo = await j.call(Journal.resume, self.campaign_id)
            await self._restore(info, operator)
            if info.campaign.state != "running":
                await j.call(
                    Journal.set_campaign_state,
                    self.campaign_id,
                    "running",
                    reason=f"resumed by {operator}",
                )
        self._phase = "prepared"

    async def _restore(self, info: ResumeInfo, operator: str) -> None:
        saved = info.optimizer_state or {}
        if saved.get("version") == STATE_VERSION and saved.get("optimizer"):
            self.optimizer = optimizer_from_state(
                self.optimizer.space,
                saved["optimizer"],
                constraints=self.optimizer.constraints,
            )
            self._pending = {str(k): str(v) for k, v in saved.get("pending", {}).items()}
            self._told = set(saved.get("told", []))
            self._elapsed_before = float(saved.get("elapsed_s", 0.0))
        experiments: list[Experiment] = await self.journal.call(
            Journal.experiments, self.campaign_id
        )
        pending_ids = {p.id for p in self.optimizer.pending()}
        live: set[str] = set()
        ran = sorted(
            (e for e in experiments if e.state in ("done", "failed") and e.station is not None),
            key=lambda e: e.updated,
        )
        for exp in ran:  # the stop rules' view: every experiment that reached a station
            self._record_value(exp.id, exp.params, exp.objective if exp.state == "done" else None)
        for exp in experiments:
            pid = self._pending.get(exp.id)
            item = _Item(
                exp.id,
                pid if pid in pending_ids else None,
                dict(exp.params),
                exp.recipe,
                exp.proposer,
                checked=False,
            )
            self._count_restored(exp)
            if exp.state == "proposed":
                if item.pid is None:
                    try:
                        item.pid = self.optimizer.add_pending(exp.params).id
                    except ValueError:
                        item.pid = None
                if item.pid is not None:
                    self._pending[exp.id] = item.pid
                    live.add(item.pid)
                self._queue.append(item)
                continue
            if exp.id in self._told or exp.state == "interrupted":
                continue
            if exp.state == "done":
                self._tell(item, exp.objective, "ok" if exp.trusted else "untrusted")
            elif exp.state == "failed":
                self._tell(item, None, "failed")
            elif exp.state == "rejected":
                self._tell(item, None, "infeasible")
            elif exp.state == "cancelled":
                self._forget(item)
        recovered: set[str] = set()
        for interrupted in info.interrupted:
            await self._recover(interrupted.experiment, interrupted.last_step_started, operator)
            recovered.add(interrupted.experiment.station or "")
        for slot in self._slots.values():  # nobody watched the others either: same treatment
            if slot.name not in recovered and slot.state != "out":
                await self._recover_station(
                    slot,
                    operator,
                    f"resume of campaign {self.campaign_id}: the station was unattended since "
                    "the campaign's process stopped",
                )
        for p in self.optimizer.pending():  # asked but never journaled: nothing ran
            if p.id not in live:
                self.optimizer.cancel(p.id)
        self._pending = {e: p for e, p in self._pending.items() if p in live}
        await self.journal.call(Journal.save_optimizer_state, self.campaign_id, self._state())
        self._emit("state", state="resumed", progress=self.progress())

    def _count_restored(self, exp: Experiment) -> None:
        c = self._counts
        c.proposed += 1
        if exp.proposer.startswith("agent:"):
            c.agent += 1
        if exp.state == "done":
            c.done += 1
        elif exp.state == "failed":
            c.failed += 1
        elif exp.state == "rejected":
            c.rejected += 1
        elif exp.state == "cancelled":
            c.cancelled += 1
        if exp.station and exp.state in ("done", "failed"):
            c.by_station[exp.station] = c.by_station.get(exp.station, 0) + 1

    async def _recover(self, exp: Experiment, step: int | None, operator: str) -> None:
        """Safe-state, check and drain the station an interrupted experiment ran on; close it."""
        where = "before its first step" if step is None else f"at step {step}"
        slot = self._slots.get(exp.station or "")
        item = _Item(
            exp.id, self._pending.get(exp.id), dict(exp.params), exp.recipe, exp.proposer, False
        )
        if slot is None:
            log.warning(
                "campaign %s: experiment %s was interrupted %s on station %s, which is not in this "
                "lab: it stays 'interrupted' until that station is checked",
                self.campaign_id,
                exp.id,
                where,
                exp.station,
            )
            self._emit("station", station=exp.station, state="unknown", experiment_id=exp.id)
            return
        why = f"resume of campaign {self.campaign_id}: experiment {exp.id} was interrupted {where}"
        outcome = await self._recover_station(slot, operator, why)
        reason = f"interrupted {where} (campaign process stopped); {outcome}; never re-run"
        self._tell(item, None, "failed")
        await self.journal.call(Journal.fail, exp.id, reason, optimizer_state=self._state())
        self._counts.failed += 1
        self._record_value(exp.id, exp.params, None)
        self._emit(
            "failed", experiment_id=exp.id, station=slot.name, reason=reason, params=exp.params
        )

    async def _recover_station(self, slot: _Slot, operator: str, why: str) -> str:
        """:meth:`StationActor.recover` (safe state, reset by ``operator``, vessels drained),
        journaled as a station event; a station that cannot be recovered is out. Returns
        what happened, as a sentence."""
        try:
            report = await slot.actor.call(StationActor.recover, operator, why)
        except Exception as exc:
            self._out(slot, f"recovery on resume failed: {_cause(exc)}")
            return f"station {slot.name} could not be recovered: {_cause(exc)}"
        outcome = (
            f"station {slot.name} safe-stated, checked and drained "
            f"({report.get('drained_ml', 0.0):.2f} mL) by {operator} on resume"
        )
        self._emit("station", station=slot.name, state="recovered", reason=why)
        self._notes.append(
            self.journal.call(
                Journal.station_event, self.campaign_id, slot.name, "recovered", outcome
            )
        )
        return outcome

    # --------------------------------------------------------------- controls
    def stop(self, reason: str = "stopped by the operator") -> None:
        """No new experiments; the ones running finish and are recorded."""
        self._stop_request = self._stop_request or reason
        self._running.set()  # a paused campaign wakes up to stop

    async def abort(self, reason: str, who: str = "operator") -> None:
        """Stop now: trip every station (latched safe state); running experiments fail."""
        self._abort_request = self._abort_request or reason
        self.stop(reason)
        await asyncio.gather(
            *(
                s.actor.call(StationActor.trip, f"campaign aborted: {reason}", who)
                for s in self._slots.values()
            ),
            return_exceptions=True,
        )

    async def pause(self, who: str = "operator") -> None:
        """No new experiments until :meth:`resume_running`; running ones finish."""
        if self._running.is_set() and self._phase == "running":
            self._running.clear()
            await self.journal.call(
                Journal.set_campaign_state, self.campaign_id, "paused", reason=f"paused by {who}"
            )
            self._emit("state", state="paused", progress=self.progress())

    async def resume_running(self, who: str = "operator") -> None:
        """Undo :meth:`pause`."""
        if not self._running.is_set():
            self._running.set()
            await self.journal.call(
                Journal.set_campaign_state, self.campaign_id, "running", reason=f"resumed by {who}"
            )
            self._emit("state", state="running", progress=self.progress())

    # ----------------------------------------------------------------- agents
    async def propose(self, params: Mapping[str, Any], proposer: str) -> ProposalReceipt:
        """An external agent's proposal: journaled with ``proposer`` (``agent:<id>``), checked
        against the program's constraints and dry-run by the safety layer; accepted ones run
        before the optimizer's next proposal and are told to it like its own.

        Raises :class:`CampaignClosed` once the campaign stops accepting work, and
        ValueError for a proposer that is not ``agent:<id>`` or ``operator[:<who>]``.
        """
        if not isinstance(proposer, str) or not (
            proposer.startswith("agent:") or proposer.startswith("operator")
        ):
            raise ValueError(f"proposer {proposer!r}: expected 'agent:<id>' or 'operator:<who>'")
        if self._phase not in ("prepared", "running") or self._stop_request is not None:
            raise CampaignClosed(
                f"campaign {self.campaign_id} is not accepting proposals ({self._phase})"
            )
        if not isinstance(params, Mapping):
            raise ValueError(
                f"params must be a mapping of parameter -> value, got {type(params).__name__}"
            )
        async with self._lock:
            item = await self._journal_proposal(dict(params), proposer, pid=None)
            self._counts.agent += 1
            slot = next((s for s in self._slots.values() if s.state == "idle"), None) or next(
                (s for s in self._slots.values() if s.state != "out"), None
            )
            reasons, budget = await self._check(item, slot)
            if reasons:  # a spent budget or no station says nothing about the point
                await self._reject(item, reasons, tell=not budget and slot is not None)
                return ProposalReceipt(item.experiment_id, False, tuple(reasons), proposer)
            try:
                item.pid = self.optimizer.add_pending(item.params).id
                self._pending[item.experiment_id] = item.pid
            except ValueError:  # validated already by program.feasible; defensive
                item.pid = None
            await self.journal.call(
                Journal.transition, item.experiment_id, "checked", optimizer_state=self._state()
            )
            item.checked = True
            self._queue.append(item)
        return ProposalReceipt(item.experiment_id, True, (), proposer)

    async def wait_for(self, experiment_id: str) -> dict[str, Any]:
        """The outcome event (``finished``/``failed``/``rejected``/``cancelled``) of an experiment."""
        fut = self._waiters.get(experiment_id)
        if fut is None:
            fut = self._waiters[experiment_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(fut)

    def _resolve(self, experiment_id: str, outcome: dict[str, Any]) -> None:
        fut = self._waiters.get(experiment_id)
        if fut is None:
            fut = self._waiters[experiment_id] = asyncio.get_running_loop().create_future()
        if not fut.done():
            fut.set_result(outcome)

    # --------------------------------------------------------------- proposals
    async def _journal_proposal(
        self, params: dict[str, Any], proposer: str, pid: str | None
    ) -> _Item:
        recipe: dict[str, Any] | None = None
        with contextlib.suppress(RecipeError, TypeError, ValueError):
            if self.program.feasible(params)[0]:
                recipe = build_recipe(self.program, params).as_dict()
        eid = await self.journal.call(
            Journal.propose, self.campaign_id, params, proposer, recipe=recipe
        )
        self._counts.proposed += 1
        if pid is not None:
            self._pending[eid] = pid
        self._emit("proposed", experiment_id=eid, params=params, proposer=proposer)
        return _Item(eid, pid, params, recipe, proposer, checked=False)

    async def _check(self, item: _Item, slot: _Slot | None) -> tuple[list[str], bool]:
        """Constraints, the recipe and the safety layer's dry run: the reasons it is refused,
        and whether every reason is a safety budget (a matter of time, not of the point)."""
        ok, reasons = self.program.feasible(item.params)
        if not ok:
            return reasons, False
        if item.recipe is None:
            try:
                item.recipe = build_recipe(self.program, item.params).as_dict()
            except RecipeError as exc:
                return [f"recipe: {exc}"], False
        if slot is None:
            return ["no station is available to dry-run the proposal"], False
        violations = await slot.actor.call(StationActor.dry_run, item.recipe, item.proposer)
        budget = bool(violations) and all(
            str(v.get("rule", "")).startswith("budget.") for v in violations
        )
        return [_violation_text(v) for v in violations], budget

    async def _reject(self, item: _Item, reasons: Sequence[str], *, tell: bool = True) -> None:
        if tell:
            self._tell(item, None, "infeasible")
        else:
            self._forget(item)
        await self.journal.call(
            Journal.reject, item.experiment_id, list(reasons), optimizer_state=self._state()
        )
        self._counts.rejected += 1
        event = {
            "experiment_id": item.experiment_id,
            "params": item.params,
            "proposer": item.proposer,
            "reasons": list(reasons),
        }
        self._emit("rejected", **event)
        self._resolve(item.experiment_id, {"event": "rejected", **event})

    def _stop_reason(self) -> str | None:
        if self._abort_request is not None:
            return f"aborted: {self._abort_request}"
        if self._stop_request is not None:
            return self._stop_request
        reason = self.program.stop_reason(self._values, elapsed_s=self.elapsed_s)
        if reason is not None:
            return reason
        if self._exhausted is not None:
            return self._exhausted
        if all(s.state == "out" for s in self._slots.values()):
            outs = "; ".join(f"{s.name}: {s.reason}" for s in self._slots.values())
            return f"no station available ({outs})"
        return None

    async def _claim(self, slot: _Slot) -> _Item | None:
        """The next checked proposal for ``slot``, or None when this station should stop claiming."""
        async with self._lock:
            while True:
                if self._stop_reason() is not None or slot.state == "out":
                    return None
                budget = self.program.budget.experiments
                if budget is not None and len(self._values) + self._in_flight >= budget:
                    return None
                if self._queue:
                    item = self._queue.popleft()
                else:
                    try:
                        proposal = await asyncio.to_thread(self.optimizer.ask)
                    except Exhausted as exc:
                        self._exhausted = f"search space exhausted: {exc}"
                        return None
                    item = await self._journal_proposal(
                        dict(proposal.params), self._strategy, proposal.id
                    )
                    await self.journal.call(
                        Journal.save_optimizer_state, self.campaign_id, self._state()
                    )
                if not item.checked:
                    try:
                        reasons, budget = await self._check(item, slot)
                    except Exception as exc:  # the actor died or refused: out, not retried
                        self._queue.appendleft(item)  # still 'proposed': another station checks it
                        dead = isinstance(exc, StationLost)
                        self._out(slot, str(exc) if dead else f"station failed: {_cause(exc)}")
                        return None
                    if budget:  # the station's safety budget is spent for now: it rests
                        self._queue.appendleft(item)
                        self._out(
                            slot,
                            f"safety budget spent ({reasons[0]}); resume the campaign once the "
                            "budget's window allows more",
                            state="paused",
                        )
                        return None
                    if reasons:
                        await self._reject(item, reasons)
                        if not item.proposer.startswith("agent:"):
                            self._consecutive_rejections += 1
                        if self._consecutive_rejections >= self._max_rejections:
                            self._exhausted = (
                                f"{self._consecutive_rejections} proposals in a row were refused "
                                f"(last: {reasons[0]}); check the program's space against the envelope"
                            )
                            return None
                        continue
                    await self.journal.call(
                        Journal.transition, item.experiment_id, "checked", recipe=item.recipe
                    )
                    item.checked = True
                self._consecutive_rejections = 0
                self._in_flight += 1
                slot.state, slot.experiment = "busy", item.experiment_id
                return item

    def _out(self, slot: _Slot, reason: str, *, state: str = "out") -> None:
        slot.state, slot.reason, slot.experiment = "out", reason, None
        log.error("campaign %s: station %s is %s: %s", self.campaign_id, slot.name, state, reason)
        self._emit("station", station=slot.name, state=state, reason=reason)
        # journaled without waiting here (callers hold the lock); awaited before the end
        self._notes.append(
            self.journal.call(Journal.station_event, self.campaign_id, slot.name, state, reason)
        )

    # ------------------------------------------------------------------ running
    async def run(self) -> CampaignSummary:
        """Keep every station busy until a stop rule, the budget, :meth:`stop` or :meth:`abort`."""
        if self._phase == "new":
            await self.prepare()
        if self._phase != "prepared":
            raise RuntimeError(f"campaign {self.campaign_id} is {self._phase}: cannot run it again")
        self._phase = "running"
        self._t0 = self._clock_now()
        self._emit("state", state="running", progress=self.progress())
        workers = [
            asyncio.create_task(self._worker(slot), name=f"campaign-{self.campaign_id}-{slot.name}")
            for slot in self._slots.values()
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            self._phase = "ended"
        return await self._finish()

    async def _worker(self, slot: _Slot) -> None:
        while slot.state != "out":
            await self._running.wait()
            item = await self._claim(slot)
            if item is None:
                return
            try:
                await self._execute(slot, item)
            finally:
                self._in_flight -= 1
                if slot.state == "busy":
                    slot.state, slot.experiment = "idle", None

    async def _execute(self, slot: _Slot, item: _Item) -> None:
        j, eid = self.journal, item.experiment_id
        assert item.recipe is not None  # a checked proposal has its recipe (see _check)
        await j.call(Journal.transition, eid, "queued", station=slot.name)
        self._emit(
            "started",
            experiment_id=eid,
            station=slot.name,
            params=item.params,
            proposer=item.proposer,
        )
        try:
            out = await slot.actor.call(
                StationActor.run,
                eid,
                item.recipe,
                item.proposer,
                include_image=self._images_dir is not None,
            )
        except StationLost as exc:
            await self._station_lost(slot, item, str(exc))
            return
        except Exception as exc:  # the actor refused (busy, not open) or a bug: out, not retried
            await self._station_lost(
                slot, item, f"station {slot.name} refused to run: {_cause(exc)}"
            )
            return
        slot.runs += 1
        async with self._lock:
            await self._record(slot, item, out)

    async def _station_lost(self, slot: _Slot, item: _Item, reason: str) -> None:
        """The station died or failed outside a recipe step: mark the experiment, never retry it."""
        self._out(slot, reason)
        async with self._lock:
            exp: Experiment = await self.journal.call(Journal.experiment, item.experiment_id)
            if exp.state == "running":
                step = "before its first step" if exp.step is None else f"during step {exp.step}"
                why = (
                    f"{reason} {step}; the instruments could not be safe-stated from here "
                    "(device watchdogs apply): check the bench; never retried"
                )
            else:
                why = f"{reason} before the experiment started; not retried"
            self._tell(item, None, "failed")
            await self.journal.call(
                Journal.fail, item.experiment_id, why, optimizer_state=self._state()
            )
            self._counts.failed += 1
            if exp.state == "running":
                self._record_value(item.experiment_id, item.params, None)
            self._failed_event(slot, item, why)

    def _failed_event(self, slot: _Slot, item: _Item, reason: str, **extra: Any) -> None:
        event = {
            "experiment_id": item.experiment_id,
            "station": slot.name,
            "params": item.params,
            "proposer": item.proposer,
            "reason": reason,
            **extra,
        }
        self._emit("failed", **event)
        self._resolve(item.experiment_id, {"event": "failed", **event})

    async def _record(self, slot: _Slot, item: _Item, out: Mapping[str, Any]) -> None:
        j, eid = self.journal, item.experiment_id
        measure = self.program.objective.measure
        images = self._save_images(out)
        if images or out.get("audit"):  # the evidence first, then the outcome that cites it
            await j.call(
                Journal.record_evidence, eid, verdicts=out.get("audit") or (), images=images
            )
        if out.get("ok"):
            measurements = dict(out.get("measurements") or {})
            value = measurements.get(measure)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                verification = out.get("verification")
                verified, reason = None, None
                if verification is not None:
                    verified = verification.get("verified")
                    if verified is False:
                        reason = "unverified: " + "; ".join(verification.get("reasons") or ["?"])
                self._tell(item, float(value), "untrusted" if verified is False else "ok")
                result = {**dict(out.get("result") or {}), "station": slot.name}
                if verification is not None:
                    result["verification"] = verification
                if images:
                    result["images"] = images
                await j.call(
                    Journal.finish,
                    eid,
                    result,
                    float(value),
                    verified=verified,
                    reason=reason,
                    optimizer_state=self._state(),
                )
                self._counts.done += 1
                self._counts.by_station[slot.name] = self._counts.by_station.get(slot.name, 0) + 1
                # an untrusted value counts against the budget but is no result (stop rules)
                self._record_value(eid, item.params, None if verified is False else float(value))
                event = {
                    "experiment_id": eid,
                    "station": slot.name,
                    "params": item.params,
                    "proposer": item.proposer,
                    "objective": float(value),
                    "measurements": measurements,
                    "verified": verified,
                    "verification": verification,
                    "images": images,
                }
                self._emit("finished", **event, progress=self.progress())
                self._resolve(eid, {"event": "finished", **event})
                self._count_disagreement(slot, verified, reason)
                return
            reason = f"the recipe ran but produced no finite {measure!r} (got {value!r})"
            self._tell(item, None, "failed")
            await j.call(
                Journal.fail,
                eid,
                reason,
                data={"measurements": measurements},
                optimizer_state=self._state(),
            )
            self._counts.failed += 1
            self._record_value(eid, item.params, None)
            self._failed_event(slot, item, reason)
            return
        if out.get("rejected"):  # the station's state changed since the check: nothing acted
            reasons = [_violation_text(v) for v in out.get("violations") or []] or [
                str(out.get("error"))
            ]
            violations = out.get("violations") or []
            budget = bool(violations) and all(
                str(v.get("rule", "")).startswith("budget.") for v in violations
            )
            await j.call(
                Journal.transition, eid, "proposed", reason="the dry run at start refused it"
            )
            await self._reject(item, reasons, tell=not budget)
            if budget:
                self._out(slot, f"safety budget spent ({reasons[0]})", state="paused")
            return
        if out.get("refused"):  # latched, a budget, or the journal: nothing acted
            reason = f"station {slot.name} refused to start it: {out.get('error')}"
            self._forget(item)
            await j.call(
                Journal.transition, eid, "cancelled", reason=reason, optimizer_state=self._state()
            )
            self._counts.cancelled += 1
            self._out(slot, str(out.get("error")))
            event = {"experiment_id": eid, "station": slot.name, "reason": reason}
            self._emit("cancelled", **event)
            self._resolve(eid, {"event": "cancelled", **event})
            return
        step = out.get("step")
        where = "before its first step" if step is None else f"at step {step}"
        reason = f"failed {where}: {out.get('error')}"
        self._tell(item, None, "failed")
        await j.call(
            Journal.fail,
            eid,
            reason,
            data={k: v for k, v in out.items() if k != "image"},
            optimizer_state=self._state(),
        )
        self._counts.failed += 1
        self._record_value(eid, item.params, None)
        self._failed_event(slot, item, reason, trip=out.get("trip"))
        self._out(slot, f"tripped after {eid} {reason}; check it and reset it to use it again")

    def _save_images(self, out: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Write the run's JPEGs under ``images_dir`` by content hash (before the journal
        names them); role -> ``sha256``, ``path``, ``bytes``."""
        if self._images_dir is None:
            return {}
        saved: dict[str, dict[str, Any]] = {}
        for role, key in (("outcome", "image"), ("reference", "reference_image")):
            data = out.get(key)
            if not data:
                continue
            digest = hashlib.sha256(data).hexdigest()
            path = self._images_dir / f"{digest}.jpg"
            if not path.exists():
                self._images_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            saved[role] = {"sha256": digest, "path": str(path), "bytes": len(data)}
        return saved

    def _count_disagreement(self, slot: _Slot, verified: bool | None, reason: str | None) -> None:
        """Pause a station after ``max_disagreements`` unverified results in a row."""
        if verified is not False:
            slot.disagreements = 0
            return
        slot.disagreements += 1
        limit = self._max_disagreements.get(slot.name, 3)
        self._emit("unverified", station=slot.name, reason=reason, in_a_row=slot.disagreements)
        if slot.disagreements >= limit:
            self._out(
                slot,
                f"paused: {slot.disagreements} results in a row disagree with the camera "
                f"(last: {reason}); check the bench (pumps, sensor, camera), then resume the campaign",
                state="paused",
            )

    async def _finish(self) -> CampaignSummary:
        reason = self._stop_reason() or "every station stopped claiming work"
        async with self._lock:
            while self._queue:  # accepted but never run: closed with the reason, not forgotten
                item = self._queue.popleft()
                self._forget(item)
                why = f"campaign ended before it ran ({reason})"
                await self.journal.call(
                    Journal.transition, item.experiment_id, "cancelled", reason=why
                )
                self._counts.cancelled += 1
                self._resolve(
                    item.experiment_id,
                    {"event": "cancelled", "experiment_id": item.experiment_id, "reason": why},
                )
            if self._abort_request is not None:
                state = "aborted"
            elif self._stop_request is not None or reason.startswith("no station available"):
                state = "stopped"
            else:
                state = "done"
            notes, self._notes = self._notes, []
            for note in notes:
                try:
                    await note
                except Exception as exc:  # the station's state is in the summary and the log
                    log.error("campaign %s: station event not journaled: %s", self.campaign_id, exc)
            await self.journal.call(Journal.save_optimizer_state, self.campaign_id, self._state())
            await self.journal.call(
                Journal.set_campaign_state, self.campaign_id, state, reason=reason
            )
        best = None
        if self._best is not None:
            best = {"experiment_id": self._best[0], "params": self._best[1], "value": self._best[2]}
        c = self._counts
        summary = CampaignSummary(
            campaign_id=self.campaign_id,
            state=state,
            reason=reason,
            best=best,
            counts={
                "proposed": c.proposed,
                "done": c.done,
                "failed": c.failed,
                "rejected": c.rejected,
                "cancelled": c.cancelled,
                "agent": c.agent,
                "run": len(self._values),
            },
            elapsed_s=self.elapsed_s,
            stations={
                n: {**s.as_dict(), "experiments": c.by_station.get(n, 0)}
                for n, s in self._slots.items()
            },
        )
        self._emit("state", state=state, reason=reason, summary=summary.as_dict())
        return summary
