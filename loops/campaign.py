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

Modules: :mod:`loops.campaignbook` (the runner's state, events and optimizer
feedback), :mod:`loops.campaignresume` (prepare and resume),
:mod:`loops.campaignrecord` (recording outcomes), :mod:`loops.campaignapproval`
(proposals awaiting a human), :mod:`loops.campaignahead` (the stations' workers, one
proposal ahead), :mod:`loops.campaignlock`
(one process per campaign); this module schedules: claims, proposals, workers,
controls and the end of a campaign.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loops.campaignahead import CampaignAhead
from loops.campaignapproval import CampaignApproval
from loops.campaignbook import (
    AGENT_RUN,
    STATE_VERSION,
    Event,
    Item,
    OnEvent,
    Slot,
    make_optimizer,
    violation_text,
)
from loops.campaignlease import OwnerAlive
from loops.campaignlock import CampaignBusy, campaign_lock
from loops.campaignresume import BudgetWindow, CampaignResume
from loops.journal import Journal
from loops.optimizer import Exhausted
from loops.recipe import RecipeError, build_recipe
from loops.stacktime import cpu_part
from loops.stationerrors import cause_text
from loops.stationledger import window_text
from loops.stations import StationActor, StationLost

log = logging.getLogger(__name__)

__all__ = [
    "AGENT_RUN",
    "STATE_VERSION",
    "BudgetWindow",
    "CampaignBusy",
    "CampaignClosed",
    "CampaignRunner",
    "CampaignSummary",
    "Event",
    "OnEvent",
    "OwnerAlive",
    "ProposalReceipt",
    "campaign_lock",
    "make_optimizer",
]


class CampaignClosed(RuntimeError):
    """The campaign is not accepting proposals (not started, stopping or ended)."""


@dataclass(frozen=True)
class ProposalReceipt:
    """The answer to an agent's proposal: accepted (queued for a station), rejected with
    reasons, or awaiting a human's approval (neither yet: ``approval`` says why and until
    when, ``expires_t`` wall clock)."""

    experiment_id: str
    accepted: bool
    reasons: tuple[str, ...] = ()
    proposer: str = ""
    approval: Mapping[str, Any] | None = None

    @property
    def awaiting_approval(self) -> bool:
        return self.approval is not None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "experiment_id": self.experiment_id,
            "accepted": self.accepted,
            "awaiting_approval": self.awaiting_approval,
            "reasons": list(self.reasons),
            "proposer": self.proposer,
        }
        if self.approval is not None:
            out["approval"] = dict(self.approval)
        return out


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


class CampaignRunner(CampaignResume, CampaignApproval, CampaignAhead):
    """One campaign over stations and a journal, through their links (module docstring).

    ``stations``: station name -> a :class:`~loops.stations.StationLink` to a started
    station; ``journal``: a :class:`~loops.journal.JournalLink`;
    ``clock_now``: the campaign's clock for the time budget (a simulated bench's
    clock on a simulated lab); ``on_event``: called (in the event loop) with
    every event dict (``event``: ``proposed``, ``rejected``, ``started``,
    ``finished``, ``failed``, ``cancelled``, ``station``, ``state``,
    ``awaiting_approval``, ``approval``); it must not block. ``agent_approvals``:
    agent name -> its approval policy (lab.yaml's; the program's own is
    ``program.approval``); ``approval_poll_s``: how often decisions recorded in the
    journal by another process are picked up while a proposal awaits one.

    Built from :class:`~loops.campaignbook.CampaignBook` (the state and the constructor),
    :class:`~loops.campaignresume.CampaignResume` (:meth:`prepare`),
    :class:`~loops.campaignrecord.CampaignRecorder` (outcomes) and
    :class:`~loops.campaignapproval.CampaignApproval` (proposals awaiting a human); the
    scheduling is here.
    """

    # --------------------------------------------------------------- controls
    def stop(self, reason: str = "stopped by the operator") -> None:
        """No new experiments; the ones running finish and are recorded."""
        self._stop_request = self._stop_request or reason
        self._running.set()  # a paused campaign wakes up to stop

    @property
    def stopping(self) -> bool:
        """Told to stop (:meth:`stop`, :meth:`abort`): it ends once its running experiments do."""
        return self._stop_request is not None

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
                Journal.set_campaign_state,
                self.campaign_id,
                "paused",
                reason=f"paused by {who}",
                epoch=self._epoch,
            )
            self._emit("state", state="paused", progress=self.progress())

    async def resume_running(self, who: str = "operator") -> None:
        """Undo :meth:`pause`."""
        if not self._running.is_set():
            self._running.set()
            await self.journal.call(
                Journal.set_campaign_state,
                self.campaign_id,
                "running",
                reason=f"resumed by {who}",
                epoch=self._epoch,
            )
            self._emit("state", state="running", progress=self.progress())

    # ----------------------------------------------------------------- agents
    async def propose(self, params: Mapping[str, Any], proposer: str) -> ProposalReceipt:
        """An external agent's proposal: journaled with ``proposer`` (``agent:<id>``), checked
        against the program's constraints and dry-run by the safety layer; accepted ones run
        before the optimizer's next proposal and are told to it like its own. One that an
        approval policy sends to a human waits (``awaiting_approval`` in the receipt) until
        it is approved (then queued), denied or expires (:mod:`loops.campaignapproval`).

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
            need = self._needs_approval(item)
            if need is not None:  # a human decides (loops/campaignapproval.py)
                reasons, approval = await self._await_approval(item, need)
                return ProposalReceipt(
                    item.experiment_id, False, tuple(reasons), proposer, approval=approval
                )
            try:
                item.pid = self.optimizer.add_pending(item.params).id
                self._pending[item.experiment_id] = item.pid
            except ValueError:  # validated already by program.feasible; defensive
                item.pid = None
            await self.journal.call(
                Journal.transition,
                item.experiment_id,
                "checked",
                optimizer_state=self._state(),
                epoch=self._epoch,
            )
            item.checked = True
            self._queue.append(item)
        return ProposalReceipt(item.experiment_id, True, (), proposer)

    # --------------------------------------------------------------- proposals
    async def _journal_proposal(
        self, params: dict[str, Any], proposer: str, pid: str | None
    ) -> Item:
        recipe: dict[str, Any] | None = None
        with contextlib.suppress(RecipeError, TypeError, ValueError):
            if self.program.feasible(params)[0]:
                recipe = build_recipe(self.program, params).as_dict()
        # the learned feasibility's prediction, journaled with the proposal (callers hold the
        # lock: the optimizer is not asked meanwhile)
        prediction = await asyncio.to_thread(self._prediction, params)
        cost = await asyncio.to_thread(self._cost_prediction, params)  # loops/optcost.py
        data = {k: v for k, v in (("feasibility", prediction), ("cost", cost)) if v is not None}
        eid = await self.journal.call(
            Journal.propose,
            self.campaign_id,
            params,
            proposer,
            recipe=recipe,
            data=data or None,
            epoch=self._epoch,
        )
        self._counts.proposed += 1
        if pid is not None:
            self._pending[eid] = pid
        self._emit("proposed", experiment_id=eid, params=params, proposer=proposer)
        return Item(eid, pid, params, recipe, proposer, checked=False)

    async def _check(self, item: Item, slot: Slot | None) -> tuple[list[str], bool]:
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
        item.rules = tuple(dict.fromkeys(str(v["rule"]) for v in violations if v.get("rule")))
        budget = bool(violations) and all(
            str(v.get("rule", "")).startswith("budget.") for v in violations
        )
        if budget:  # say when each window allows what the proposal asks
            return await self._budget_reasons(slot, violations), True
        return [violation_text(v) for v in violations], budget

    async def _budget_reasons(self, slot: Slot, violations: list[dict[str, Any]]) -> list[str]:
        """The budget violations of a dry run as when each budget's window allows the amount
        the proposal asks (:func:`~loops.stationledger.window_text`)."""
        asks: dict[str, float] = {}
        for v in violations:
            for key, value in dict(v.get("values") or {}).items():
                if str(key).endswith(" asked") and isinstance(value, int | float):
                    resource = str(key)[: -len(" asked")]
                    asks[resource] = max(asks.get(resource, 0.0), float(value))
        try:
            budgets = await slot.actor.call(StationActor.budgets, asks)
        except Exception:  # the station could not say: the dry run's words
            return [violation_text(v) for v in violations]
        names = {str(v.get("rule", ""))[len("budget.") :] for v in violations}
        texts = [window_text(b) for b in budgets if b["name"] in names and not b["ok"]]
        return texts or [violation_text(v) for v in violations]

    def _stop_reason(self) -> str | None:
        if self._abort_request is not None:
            return f"aborted: {self._abort_request}"
        if self._stop_request is not None:
            return self._stop_request
        reason = self.program.stop_reason(
            self._values, elapsed_s=self.elapsed_s, vectors=self._vectors
        )
        if reason is not None:
            return reason
        if self._exhausted is not None:
            return self._exhausted
        if all(s.state == "out" for s in self._slots.values()):
            outs = "; ".join(f"{s.name}: {s.reason}" for s in self._slots.values())
            return f"no station available ({outs})"
        return None

    async def _claim(self, slot: Slot, *, ahead: bool = False) -> Item | None:
        """The next checked proposal for ``slot``, or None when this station should stop
        claiming; ``ahead``: claimed while ``slot`` runs one (:mod:`loops.campaignahead`),
        the slot stays on the experiment it runs."""
        async with self._lock:
            while True:
                if self._stop_reason() is not None or slot.state == "out":
                    return None
                budget = self.program.budget.experiments
                if budget is not None and len(self._values) + self._in_flight >= budget:
                    return None
                queued = self._next_queued()
                if queued is not None:
                    item = queued
                else:
                    self._agent_run = 0
                    try:
                        proposal = await asyncio.to_thread(cpu_part, "ask", self.optimizer.ask)
                    except Exhausted as exc:
                        self._exhausted = f"search space exhausted: {exc}"
                        return None
                    item = await self._journal_proposal(
                        dict(proposal.params), self._strategy, proposal.id
                    )
                    await self.journal.call(
                        Journal.save_optimizer_state,
                        self.campaign_id,
                        self._state(),
                        epoch=self._epoch,
                    )
                if not item.checked:
                    try:
                        reasons, budget = await self._check(item, slot)
                    except Exception as exc:  # the actor died or refused: out, not retried
                        self._queue.appendleft(item)  # still 'proposed': another station checks it
                        dead = isinstance(exc, StationLost)
                        self._out(slot, str(exc) if dead else f"station failed: {cause_text(exc)}")
                        return None
                    if budget:  # the station's safety budget is spent for now: it rests
                        self._queue.appendleft(item)
                        self._out(
                            slot,
                            f"safety budget spent ({'; '.join(reasons)}); resume the campaign "
                            "once the budget's window allows more",
                            state="paused",
                        )
                        return None
                    need = None if reasons or item.approved else self._needs_approval(item)
                    if need is not None:  # an agent's, re-queued by a resume: it waits
                        await self._await_approval(item, need)
                        continue
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
                        Journal.transition,
                        item.experiment_id,
                        "checked",
                        recipe=item.recipe,
                        epoch=self._epoch,
                    )
                    item.checked = True
                self._consecutive_rejections = 0
                self._in_flight += 1
                if not ahead:
                    slot.state, slot.experiment = "busy", item.experiment_id
                return item

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
        workers: list[asyncio.Task[None]] = []
        self._workers = workers
        for slot in self._slots.values():
            self._start_worker(slot)
        approvals = asyncio.create_task(
            self._approval_loop(), name=f"campaign-{self.campaign_id}-approvals"
        )
        try:
            while running := [w for w in workers if not w.done()]:  # rejoin() may add one
                await asyncio.gather(*running)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await self._release_leases()
            raise
        finally:
            approvals.cancel()
            await asyncio.gather(approvals, return_exceptions=True)
            self._phase = "ended"
        await self._release_leases()  # every worker is done: nothing acts for us any more
        return await self._finish()

    def _start_worker(self, slot: Slot) -> None:
        adopted = self._adopted.pop(slot.name, None)  # still running for the dead owner
        work = self._worker(slot) if adopted is None else self._run_adopted(slot, adopted)
        self._workers.append(
            asyncio.create_task(work, name=f"campaign-{self.campaign_id}-{slot.name}")
        )

    async def _execute(
        self, slot: Slot, item: Item, *, on_sent: Callable[[], None] | None = None
    ) -> None:
        """Run ``item`` on ``slot`` and record what it came to; ``on_sent``: called once the
        run is sent to the station (:mod:`loops.campaignahead` claims the next one then)."""
        j, eid = self.journal, item.experiment_id
        assert item.recipe is not None  # a checked proposal has its recipe (see _check)
        await j.call(Journal.transition, eid, "queued", station=slot.name, epoch=self._epoch)
        self._emit(
            "started",
            experiment_id=eid,
            station=slot.name,
            params=item.params,
            proposer=item.proposer,
        )
        try:
            running = slot.actor.call(
                StationActor.run,
                eid,
                item.recipe,
                item.proposer,
                include_image=self._images_dir is not None,
                epoch=self._epoch,
            )
            if on_sent is not None:
                on_sent()
            out = await running
        except StationLost as exc:
            await self._station_lost(slot, item, str(exc))
            return
        except Exception as exc:  # the actor refused (busy, not open) or a bug: out, not retried
            await self._station_lost(
                slot, item, f"station {slot.name} refused to run: {cause_text(exc)}"
            )
            return
        slot.runs += 1
        async with self._lock.urgent():  # before the claims waiting (loops.urgentlock)
            await self._record(slot, item, out)

    async def _finish(self) -> CampaignSummary:
        reason = self._stop_reason() or "every station stopped claiming work"
        async with self._lock:
            while self._queue:  # accepted but never run: closed with the reason, not forgotten
                item = self._queue.popleft()
                self._forget(item)
                why = f"campaign ended before it ran ({reason})"
                await self.journal.call(
                    Journal.transition,
                    item.experiment_id,
                    "cancelled",
                    reason=why,
                    epoch=self._epoch,
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
            if state == "done":  # over by its own rules: nothing that waits can run any more
                await self._close_awaiting(reason)
            notes, self._notes = self._notes, []
            for note in notes:
                try:
                    await note
                except Exception as exc:  # the station's state is in the summary and the log
                    log.error("campaign %s: station event not journaled: %s", self.campaign_id, exc)
            await self.journal.call(
                Journal.save_optimizer_state, self.campaign_id, self._state(), epoch=self._epoch
            )
            await self.journal.call(
                Journal.set_campaign_state,
                self.campaign_id,
                state,
                reason=reason,
                epoch=self._epoch,
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
