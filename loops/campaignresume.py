"""Resuming a campaign after a crash or a kill -9: :class:`CampaignResume`.

``prepare(resume=True)`` (see :mod:`loops.campaign`): the optimizer is restored
from its saved state and told every outcome it does not know yet; an experiment whose
station journaled its outcome before the campaign's process stopped is recorded as the
result it is (:class:`~loops.journal.CompletedRun`), and one whose every step finished
but whose outcome was not journaled yet is verified on its station from what the journal
kept and recorded too, marked as recovered (:meth:`CampaignResume._record_recovered`);
every station is safe-stated,
checked and drained (:meth:`StationActor.recover
<loops.stationactor.StationActor.recover>`, recorded with the operator's name) and
each interrupted experiment is closed as ``failed``, never re-run. Proposals found
awaiting a human's approval wait again, as pending points; decisions recorded and
expiries passed while the campaign was down are applied (:mod:`loops.campaignapproval`).

Budgets (a new campaign and a resume): a station whose safety budget's window is
spent (one more experiment does not fit; a volume budget with nothing left) rests,
with when its window allows more; if every station does, the campaign does not start
at all (:class:`BudgetWindow`, the message saying when).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from loops.campaignapproval import CampaignApproval
from loops.campaignbook import STATE_VERSION, Item, Slot, restore_optimizer
from loops.campaignlease import CampaignLease
from loops.campaignprior import Prior, read_prior, refusing_rules
from loops.journal import AWAITING, CompletedRun, Experiment, Journal, ResumeInfo
from loops.optmulti import ParetoOptimizer
from loops.stationerrors import cause_text
from loops.stationledger import window_text
from loops.stations import StationActor

log = logging.getLogger(__name__)

__all__ = ["BudgetWindow", "CampaignResume"]


class BudgetWindow(RuntimeError):
    """Every station's safety budget is spent for now: the campaign does not start (or
    resume) until a window allows more; the message says when."""


class CampaignResume(CampaignLease, CampaignApproval):
    """Creating a campaign in the journal, or picking it up after a crash (:meth:`prepare`)."""

    _worker: Callable[[Slot], Coroutine[Any, Any, None]]  # CampaignAhead's: claim and run

    async def prepare(self, *, resume: bool = False, operator: str = "operator") -> None:
        """Create the campaign in the journal, or (``resume``) pick it up after a crash.

        On resume every interrupted experiment's station is recovered first
        (:meth:`StationActor.recover`: safe state, reset by ``operator``, vessels
        drained) and the experiment closed as failed, never re-run.
        """
        if self._phase != "new":
            raise RuntimeError(f"campaign {self.campaign_id} is already {self._phase}")
        j = self.journal
        spent = await self._spent_budgets()
        if spent and len(spent) == sum(s.state != "out" for s in self._slots.values()):
            raise BudgetWindow(
                f"campaign {self.campaign_id} {'resumes' if resume else 'starts'} on no station "
                "now: "
                + "; ".join(f"station {n}: {why}" for n, why in spent.items())
                + f"; {'resume' if resume else 'start'} it once a window allows more"
            )
        try:
            if not resume:
                # every prior is read first: an unknown one or one with nothing in common
                # creates nothing (PriorError)
                priors = [
                    await read_prior(
                        j,
                        prior_id,
                        self.optimizer.space,
                        self._outcome,
                        this_campaign=self.campaign_id,
                    )
                    for prior_id in self.program.prior
                ]
                await j.call(
                    Journal.create_campaign,
                    self.campaign_id,
                    self.program.name,
                    self.program.to_markdown(),
                )
                await self._take_leases()
                for prior in priors:  # told before the first ask, journaled as such
                    self._tell_prior(prior)
                    await j.call(
                        Journal.record_prior,
                        self.campaign_id,
                        prior.record(),
                        optimizer_state=self._state(),
                        epoch=self._epoch,
                    )
                self._rest(spent)
                await j.call(
                    Journal.save_optimizer_state, self.campaign_id, self._state(), epoch=self._epoch
                )
            else:
                await self._take_leases()  # the next epoch: an older owner is over or fenced off
                keep = sorted(  # the experiments the stations taken over still run (or ran)
                    {
                        e
                        for t in self.taken_over.values()
                        for e in (t.get("running"), t.get("last_run"))
                        if e
                    }
                )
                info: ResumeInfo = await j.call(
                    Journal.resume, self.campaign_id, epoch=self._epoch, keep=keep
                )
                await self._restore(info, operator)
                self._rest(spent)
                if info.campaign.state != "running":
                    await j.call(
                        Journal.set_campaign_state,
                        self.campaign_id,
                        "running",
                        reason=f"resumed by {operator}",
                        epoch=self._epoch,
                    )
        except BaseException:
            await self._release_leases()  # nothing keeps renewing for a campaign not prepared
            raise
        self._phase = "prepared"

    async def _spent_budgets(self) -> dict[str, str]:
        """Station -> why no experiment fits its budgets now, and when one does (stations
        that cannot say are left to the dry runs)."""
        out: dict[str, str] = {}
        for slot in self._slots.values():
            if slot.state == "out":
                continue
            try:
                budgets = await slot.actor.call(StationActor.budgets)
            except Exception as exc:
                log.info("campaign %s: budgets of %s: %s", self.campaign_id, slot.name, exc)
                continue
            blocked = [window_text(b) for b in budgets if not b["ok"]]
            if blocked:
                out[slot.name] = "; ".join(blocked)
        return out

    def _tell_prior(self, prior: Prior) -> None:
        """Tell the optimizer a prior campaign's points (not this campaign's experiments: no
        budget, stop rule or count sees them)."""
        multi = isinstance(self.optimizer, ParetoOptimizer)
        for p in prior.points:
            told: Any = p.vector if multi else p.value
            self.optimizer.tell(p.params, told, status=p.status, rules=p.rules)

    def _rest(self, spent: dict[str, str]) -> None:
        for name, why in spent.items():
            slot = self._slots[name]
            if slot.state != "out":
                self._out(slot, f"safety budget spent: {why}", state="paused")

    def _vector_of(self, exp: Experiment) -> tuple[float, ...] | None:
        """Every objective's value of a done experiment (several objectives), from its
        journaled measurements; None otherwise."""
        if not self.program.multi or exp.state != "done" or not isinstance(exp.result, Mapping):
            return None
        measurements = exp.result.get("measurements")
        return self._outcome(measurements)[1] if isinstance(measurements, Mapping) else None

    async def _restore(self, info: ResumeInfo, operator: str) -> None:
        saved = info.optimizer_state or {}
        if saved.get("version") == STATE_VERSION and saved.get("optimizer"):
            self.optimizer = restore_optimizer(self.optimizer, saved["optimizer"])
            self._pending = {str(k): str(v) for k, v in saved.get("pending", {}).items()}
            self._told = set(saved.get("told", []))
            self._elapsed_before = float(saved.get("elapsed_s", 0.0))
        experiments: list[Experiment] = await self.journal.call(
            Journal.experiments, self.campaign_id
        )
        pending_ids = {p.id for p in self.optimizer.pending()}
        live: set[str] = set()
        awaiting: list[Item] = []  # awaiting a human: they wait again (campaignapproval)
        rules: dict[str, list[str]] | None = None  # the journal's refusing rules, read once
        ran = sorted(
            (e for e in experiments if e.state in ("done", "failed") and e.station is not None),
            key=lambda e: e.updated,
        )
        for exp in ran:  # the stop rules' view: every experiment that reached a station
            value = exp.objective if exp.state == "done" else None
            self._record_value(exp.id, exp.params, value, self._vector_of(exp))
        for exp in experiments:
            pid = self._pending.get(exp.id)
            item = Item(
                exp.id,
                pid if pid in pending_ids else None,
                dict(exp.params),
                exp.recipe,
                exp.proposer,
                checked=False,
            )
            self._count_restored(exp)
            if exp.state == AWAITING:
                awaiting.append(item)
                continue
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
                vector = self._vector_of(exp)
                self._tell(item, exp.objective, "ok" if exp.trusted else "untrusted", vector)
            elif exp.state == "failed":
                self._tell(item, None, "failed")
            elif exp.state == "rejected":  # refused, the optimizer not told: with its rules
                if rules is None:
                    rules = await refusing_rules(self.journal, self.campaign_id)
                item.rules = tuple(rules.get(exp.id, ()))
                self._tell(item, None, "infeasible")
            elif exp.state == "cancelled":
                self._forget(item)
        for run in info.completed:  # ran to its end before the stop: its result, exactly once
            await self._record_completed(run)
        for run in info.recovered:  # ran to its end, not verified yet: verify it, then as above
            await self._record_recovered(run)
        recovered: set[str] = set()
        for exp in info.adopted:  # its station still runs it (or ran it) for us
            if not self._adopt(exp, live):  # not this campaign's station: as an interrupted one
                await self._recover(exp, exp.step, operator)
                recovered.add(exp.station or "")
        for interrupted in info.interrupted:
            await self._recover(interrupted.experiment, interrupted.last_step_started, operator)
            recovered.add(interrupted.experiment.station or "")
        for slot in self._slots.values():  # nobody watched the others either: same treatment
            if slot.name not in recovered and slot.state != "out":
                if await self._watched(slot):
                    continue
                await self._recover_station(
                    slot,
                    operator,
                    f"resume of campaign {self.campaign_id}: the station was unattended since "
                    "the campaign's process stopped",
                )
        live |= await self._restore_awaiting(awaiting)
        for p in self.optimizer.pending():  # asked but never journaled: nothing ran
            if p.id not in live:
                self.optimizer.cancel(p.id)
        self._pending = {e: p for e, p in self._pending.items() if p in live}
        await self._settle_approvals()  # decided or expired while the campaign was down
        await self.journal.call(
            Journal.save_optimizer_state, self.campaign_id, self._state(), epoch=self._epoch
        )
        self._emit("state", state="resumed", progress=self.progress())

    def _adopt(self, exp: Experiment, live: set[str]) -> bool:
        """Whether ``exp`` (left ``running`` by the journal's resume, ``keep``) is adopted:
        its station was taken over live (:meth:`~loops.campaignlease.CampaignLease._take_over`)
        and runs it, or ran it last; the station is then busy with it and
        :meth:`_run_adopted` waits for its outcome and records it as the dead owner would
        have, instead of a recovery closing it failed."""
        slot = self._slots.get(exp.station or "")
        known = self.taken_over.get(slot.name) if slot is not None else None
        if (
            slot is None
            or known is None
            or exp.id not in (known.get("running"), known.get("last_run"))
        ):
            return False
        pid = self._pending.get(exp.id)
        if pid is not None:
            live.add(pid)  # pending for the optimizer until its outcome is told
        self._adopted[slot.name] = Item(
            exp.id, pid, dict(exp.params), exp.recipe, exp.proposer, checked=True
        )
        slot.state, slot.experiment = "busy", exp.id
        self._in_flight += 1
        why = f"taken over live by {self._owner_name()}: experiment {exp.id} carries on"
        log.warning("campaign %s: station %s %s", self.campaign_id, slot.name, why)
        self._emit("station", station=slot.name, state="taken_over", reason=why)
        self._note_station(slot, "taken_over", why)
        return True

    async def _watched(self, slot: Slot) -> bool:
        """Whether ``slot``'s station needs no recovery on resume: its lease was taken over
        live (never unowned, its monitors running) and it is not tripped. Journaled as a
        station event."""
        if slot.name not in self.taken_over or slot.name in self._adopted:
            return slot.name in self._adopted
        try:
            status = await slot.actor.call(StationActor.status)
        except Exception as exc:
            log.info("campaign %s: status of %s: %s", self.campaign_id, slot.name, exc)
            return False
        if status.get("tripped") or not status.get("open"):
            return False
        why = f"taken over live by {self._owner_name()}: idle and not tripped, not recovered"
        self._emit("station", station=slot.name, state="taken_over", reason=why)
        self._note_station(slot, "taken_over", why)
        return True

    def _note_station(self, slot: Slot, state: str, why: str) -> None:
        self._notes.append(
            self.journal.call(
                Journal.station_event, self.campaign_id, slot.name, state, why, epoch=self._epoch
            )
        )

    async def _run_adopted(self, slot: Slot, item: Item) -> None:
        """Wait for an adopted experiment's outcome on its station (:meth:`StationActor.wait_run`)
        and record it as :meth:`~loops.campaign.CampaignRunner._execute` does; a station that
        died or cannot say is handled as a station lost during a run (its journaled outcome,
        if it ran to its end, is the result; never re-run). Then the station's worker claims
        work as the others do."""
        try:
            try:
                out = await slot.actor.call(
                    StationActor.wait_run, item.experiment_id, epoch=self._epoch
                )
            except Exception as exc:
                await self._station_lost(
                    slot,
                    item,
                    f"station {slot.name} lost experiment {item.experiment_id} taken over: "
                    f"{cause_text(exc)}",
                )
                return
            slot.runs += 1
            async with self._lock.urgent():
                await self._record(slot, item, out)
        finally:
            self._in_flight -= 1
            if slot.state == "busy":
                slot.state, slot.experiment = "idle", None
        await self._worker(slot)

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

    async def _record_completed(self, run: CompletedRun) -> None:
        """Record the result of an experiment whose station journaled its outcome (every
        step ran) before the campaign's process stopped, as the run returned it: verified
        as it was verified, its JPEGs written from the journal."""
        exp = run.experiment
        slot = self._slots.get(exp.station or "")
        if slot is None:
            log.warning(
                "campaign %s: experiment %s ran to its end on station %s, which is not in this "
                "lab: its outcome stays in the journal until a resume with that station",
                self.campaign_id,
                exp.id,
                exp.station,
            )
            return
        pid = self._pending.get(exp.id)
        item = Item(exp.id, pid, dict(exp.params), exp.recipe, exp.proposer, checked=True)
        out = {
            **run.outcome,
            "image": run.images.get("outcome"),
            "reference_image": run.images.get("reference"),
            "recorded_on_resume": True,
        }
        await self._record(slot, item, out)

    async def _record_recovered(self, run: CompletedRun) -> None:
        """Record an experiment whose every step finished and was measured (journaled with
        its last step) but whose outcome was not journaled before the campaign's process
        stopped: its station verifies what was measured and journals the outcome
        (:meth:`StationActor.recover_outcome`, nothing on the hardware), then it is recorded
        as a journaled outcome is, marked ``recovered_on_resume``. A station that cannot
        leaves it ``running`` for a later resume (never failed, never re-run)."""
        exp = run.experiment
        slot = self._slots.get(exp.station or "")
        try:
            if slot is None:
                raise LookupError(f"station {exp.station} is not in this lab")
            outcome = await slot.actor.call(StationActor.recover_outcome, exp.id, epoch=self._epoch)
        except Exception as exc:
            log.warning(
                "campaign %s: experiment %s ran to its end on station %s, but its result "
                "could not be verified there on resume (%s): it stays in the journal until a "
                "resume with that station",
                self.campaign_id,
                exp.id,
                exp.station,
                cause_text(exc),
            )
            return
        await self._record_completed(CompletedRun(exp, outcome, run.images))

    async def _recover(self, exp: Experiment, step: int | None, operator: str) -> None:
        """Safe-state, check and drain the station an interrupted experiment ran on; close it."""
        where = "before its first step" if step is None else f"at step {step}"
        slot = self._slots.get(exp.station or "")
        item = Item(
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
        await self.journal.call(
            Journal.fail, exp.id, reason, optimizer_state=self._state(), epoch=self._epoch
        )
        self._counts.failed += 1
        self._record_value(exp.id, exp.params, None)
        self._emit(
            "failed", experiment_id=exp.id, station=slot.name, reason=reason, params=exp.params
        )

    async def _recover_station(self, slot: Slot, operator: str, why: str) -> str:
        """:meth:`StationActor.recover` (safe state, reset by ``operator``, vessels drained),
        journaled as a station event; a station that cannot be recovered is out. Returns
        what happened, as a sentence."""
        try:
            report = await slot.actor.call(StationActor.recover, operator, why, epoch=self._epoch)
        except Exception as exc:
            self._out(slot, f"recovery on resume failed: {cause_text(exc)}")
            return f"station {slot.name} could not be recovered: {cause_text(exc)}"
        outcome = (
            f"station {slot.name} safe-stated, checked and drained "
            f"({report.get('drained_ml', 0.0):.2f} mL) by {operator} on resume"
        )
        self._emit("station", station=slot.name, state="recovered", reason=why)
        self._notes.append(
            self.journal.call(
                Journal.station_event,
                self.campaign_id,
                slot.name,
                "recovered",
                outcome,
                epoch=self._epoch,
            )
        )
        return outcome
