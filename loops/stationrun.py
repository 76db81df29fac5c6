"""A station running one experiment: :class:`StationRuns` (part of
:class:`~loops.stationactor.StationActor`).

The recipe is dry-run again, the experiment moved ``queued -> running`` (with the
experiments budget's unit) in one transaction with its first step's start, and each step
journaled before it acts (``step_started``, with a reservation of what it may consume).
A step that cannot change the bench, or only moves it towards its safe state (a read, a
wait, a hold, a capture, a computation; a heater or a light switched off, as the guard
classes them: :func:`step_waits`), has its record queued in the journal's order without waiting for
the commit; every such record is committed before the next step that waits starts (in
that step's transaction) and before the last step's record, so a kill can lose at most
the records of such steps (:mod:`loops.stationwrites`). After a step (``step_done``, with
what it did consume): nothing acts between a step's end and the next step's start, so
that record goes to disk in the next start's transaction. The last step's record carries
what the run measured (measurements, the safety verdicts, the captures' JPEGs:
``step_done`` ``measured=``, one transaction), committed while the run is verified
(verification acts on nothing), and once verified the run's outcome is journaled
(:meth:`Journal.record_outcome <loops.journal.Journal.record_outcome>`: the
verification) before it is returned: a campaign process killed at any moment after the
last step loses nothing (a resume records the journaled outcome, or verifies what was
measured on the recovering station: :meth:`StationRecovery.recover_outcome
<loops.stationrecover.StationRecovery.recover_outcome>`). Every write carries the
lease's epoch and none is made without a live lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from loops.checks import Verification, run_checks
from loops.journal import Journal, StaleOwner
from loops.recipe import Result, dry_run_recipe, run_recipe
from loops.stacktime import cpu_part, current_timer, timing
from loops.stationcore import StationCore
from loops.stationerrors import ExperimentStopped, StationBusy, StationError, cause_text
from loops.stationledger import step_reservation, unsaved_consumption
from loops.stationverify import EarlyVerification
from loops.stationwrites import StepWrites
from loops.steps import Recipe, Step
from safety import SafeStation, SafetyError
from safety.effects import Command, CommandRefused, Effect, effect_of

log = logging.getLogger(__name__)

#: how long a journal write of a running experiment refused as a stale owner's waits for the
#: restarted owner that fenced it to take the station's lease over (real seconds)
TAKE_OVER_WAIT_S = 2.0

__all__ = ["TRIP_POLL_S", "StationRuns", "step_acts", "step_waits", "until_tripped"]

#: how often a running recipe checks whether its station tripped (real seconds)
TRIP_POLL_S = 0.02


async def until_tripped(station: SafeStation, work: Awaitable[Any]) -> Any:
    """Await ``work`` (a recipe run); if the station trips meanwhile, cancel it at once.

    A latched station refuses every actuating command anyway, but a recipe in a wait step
    (hold, cool, waiting for the pumps) would otherwise carry on waiting, and act again
    after an operator's reset. Raises :class:`ExperimentStopped` naming the trip.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=TRIP_POLL_S)
            if done:
                return task.result()
            if station.tripped:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                record = station.latch.trip_record
                why = record.reason if record is not None else "tripped"
                raise ExperimentStopped(f"the station tripped during the experiment: {why}")
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise


#: step kinds that never send a command (they read, wait, capture or compute)
QUIET_KINDS = frozenset({"read", "wait", "hold", "capture", "compute", "value"})


def step_acts(station: SafeStation, step: Step, who: str) -> bool:
    """Whether ``step`` may change the bench: a ramp, or a call of a command that actuates
    (safer commands included; one the guard would refuse counts as acting). Which
    steps' starts are waited for in the journal: :func:`step_waits`."""
    if step.kind in QUIET_KINDS:
        return False
    effect = _call_effect(station, step, who)
    return effect is None or effect.actuates


def _call_effect(station: SafeStation, step: Step, who: str) -> Effect | None:
    """What a ``call`` step's command would do from the station's state now; None for
    another kind of step that may act (a ramp), or a command the guard would refuse."""
    if step.kind != "call":
        return None
    p = step.params
    command = Command(p["instrument"], p["command"], dict(p.get("args") or {}), who)
    try:
        return effect_of(command, station.guard.layout, station.state.view())
    except CommandRefused:
        return None


def step_waits(station: SafeStation, step: Step, who: str, reserve: Sequence[Any]) -> bool:
    """Whether ``step``'s start must be committed to the journal before it runs: it may
    change the bench other than towards its safe state (:func:`step_acts`, a call of a
    command the guard classes ``safer`` excepted), or it reserves some of a budget.

    The others (reads, waits, holds, captures, computations; switching a heater or a
    light off, which the guard classes safer) are sent in order without waiting (:class:`StepWrites`),
    committed before the next step that waits and before the last step's record is. A
    kill can lose the records of such steps since the last one that waited, and nothing
    else: the experiment is found ``running`` with an earlier step in progress, is
    marked interrupted (failed, never run again: :meth:`Journal.resume
    <loops.journal.Journal.resume>`), and its station is recovered through its safe state
    (tripped, every instrument safe-stated, drained by capacity:
    :meth:`~loops.stationrecover.StationRecovery.recover`), which is where a safer step
    only moved it; a step that reserves nothing consumed nothing the budgets miss."""
    if reserve:
        return True
    if step.kind in QUIET_KINDS:
        return False
    effect = _call_effect(station, step, who)
    return effect is None or (effect.actuates and not effect.safer)


def _image_digests(images: Mapping[str, bytes | None]) -> dict[str, dict[str, Any]]:
    """Role -> ``sha256`` and ``bytes`` of each JPEG given (how an outcome cites its images)."""
    return {
        role: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for role, data in images.items()
        if data
    }


class _NotRunning(Exception):
    """The journal (or the lease) refused the run's start: nothing acted."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class StationRuns(StationCore):
    """Dry runs and experiment runs (module docstring)."""

    async def dry_run(
        self, recipe: Mapping[str, Any], who: str = "optimizer"
    ) -> list[dict[str, Any]]:
        """Check ``recipe`` (a :meth:`Recipe.as_dict`) against the envelope from the station's
        current state, no I/O; while an experiment runs, from the state its own dry run
        predicts it leaves, when it ends (the recipe is checked again before it runs).
        Returns the violations (``step``, ``command``, ``rule``, ``reason``, ``values``);
        empty: allowed."""
        station = self._require()
        report = dry_run_recipe(
            Recipe.from_dict(recipe), station, who=who, now=self._now(), after=self._under_way
        )
        violations: list[dict[str, Any]] = report.as_dict()["violations"]
        return violations

    async def run(
        self,
        experiment_id: str,
        recipe: Mapping[str, Any],
        who: str,
        *,
        mark_running: bool = True,
        trip_on_failure: bool = True,
        include_image: bool = False,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """Run one experiment's recipe on this station; returns plain data (never raises for
        a refused or failed experiment; raises :class:`StationBusy`/:class:`StationNotOpen`,
        and :class:`~loops.journal.StaleOwner`/:class:`~loops.stationlease.OwnerLost` unless
        ``epoch`` holds the station's lease, :meth:`lease`).

        The recipe is dry-run again first (the state may have changed since it was
        checked): refused -> ``{"ok": False, "rejected": True, "violations": [...]}`` and
        nothing reached the wire or the journal. Else the experiment goes ``queued ->
        running`` in the journal (``mark_running``), one budget unit is consumed, and each
        step is journaled started before it acts and done after. Success -> ``{"ok": True,
        "result": Result.as_dict(), "measurements": {...}, "steps": n, "verification":
        Verification dict}`` (``verification`` when enabled; ``image`` and
        ``reference_image``: the JPEG bytes if ``include_image``): what was measured is
        journaled with the last step (with the JPEGs when it verifies or
        ``include_image``), the outcome before it is returned (``outcome_journaled``).
        Every outcome also carries
        ``audit``: the safety verdicts (``Verdict.as_dict()``) of this run's commands.
        Failure at step i -> ``{"ok": False, "step": i, "error": ..., "error_type": ...,
        "trip": TripReport dict}``: the station is tripped (latched safe state) when
        ``trip_on_failure``; the campaign records the outcome.
        """
        self._lease.check(epoch)
        station = self._require()
        if self._run_lock.locked():
            raise StationBusy(
                f"station {self.name} is running experiment {self._current}; "
                f"refusing {experiment_id} (one experiment at a time)"
            )
        async with self._run_lock:
            self._current, self._run_epoch = experiment_id, epoch
            self._epoch_moved.clear()
            self._run_done = asyncio.get_running_loop().create_future()
            out: dict[str, Any] | None = None
            mark = len(station.audit.records())
            measured: dict[str, Any] = {}  # what went to the journal with the last step
            t0 = time.perf_counter()
            try:
                with timing() as timer:  # the stack's parts of this run (loops.stacktime)
                    out = await self._run(
                        station,
                        experiment_id,
                        Recipe.from_dict(recipe),
                        who,
                        mark_running=mark_running,
                        trip_on_failure=trip_on_failure,
                        include_image=include_image,
                        epoch=epoch,
                        audit_from=mark,
                        measured=measured,
                    )
                    # the safety layer's verdicts on this run's commands, for the store
                    out["audit"] = [v.as_dict() for v in station.audit.records()[mark:]]
                    if out.get("ok") and mark_running and self._journal is not None:
                        out["outcome_journaled"] = await self._journal_outcome(
                            experiment_id, out, measured
                        )
                timer.add("run", time.perf_counter() - t0)
                out["stack"] = timer.as_dict()  # how long its parts took (loops.stacktime)
                return out
            finally:
                self._current = self._under_way = None
                self._runs += 1
                self._end_run(experiment_id, out)
                await self._save_ledger(station)

    def _end_run(self, experiment_id: str, out: dict[str, Any] | None) -> None:
        """Keep the run's outcome for :meth:`wait_run` (an owner that took the station over
        while it ran: :meth:`StationActor.take_over <loops.stationactor.StationActor.take_over>`)."""
        done, self._run_done = self._run_done, None
        self._last_run = (experiment_id, out)
        if done is not None and not done.done():
            done.set_result(out)

    async def wait_run(self, experiment_id: str, *, epoch: int | None = None) -> dict[str, Any]:
        """The outcome of experiment ``experiment_id`` as :meth:`run` returned it (or returns
        it, once it ends): for an owner that took the station over while it ran, its caller
        being dead. Raises like :meth:`run` unless ``epoch`` holds the lease, and
        :class:`StationError` for an experiment that is neither running here nor the last
        that ended here, or that ended without an outcome (cancelled)."""
        self._lease.check(epoch)
        if self._current == experiment_id and self._run_done is not None:
            out = await asyncio.shield(self._run_done)
        elif self._last_run is not None and self._last_run[0] == experiment_id:
            out = self._last_run[1]
        else:
            raise StationError(
                f"station {self.name} is not running {experiment_id} and did not run it last"
            )
        if out is None:
            raise StationError(f"station {self.name}: {experiment_id} ended without an outcome")
        return out

    async def _fenced(self, write: Callable[[int | None], Awaitable[Any]]) -> Any:
        """``write(epoch)``, a journal write of the running experiment, with the run's epoch;
        if the journal refuses it as a stale owner's while the lease is live, a restarted
        owner of the campaign has taken the next epoch and is about to take this lease over
        (:meth:`StationActor.take_over`): it is written again with that epoch once it has,
        within :data:`TAKE_OVER_WAIT_S` (the step waits, it does not act meanwhile)."""
        epoch = self._run_epoch
        try:
            return await write(epoch)
        except Exception as exc:
            if not isinstance(exc, StaleOwner) and not isinstance(
                getattr(exc, "cause", None), StaleOwner
            ):
                raise
            if self._lease.held:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TAKE_OVER_WAIT_S):
                        await self._epoch_moved.wait()
            if self._run_epoch == epoch:
                raise
        return await write(self._run_epoch)

    async def _journal_outcome(
        self,
        experiment_id: str,
        out: Mapping[str, Any],
        measured: Mapping[str, Any],
    ) -> bool:
        """Journal a finished run's outcome (:meth:`Journal.record_outcome`: what it adds to
        what was ``measured`` with its last step, which took its JPEGs) before returning it;
        whether it was (a refusal is logged: the campaign still gets the outcome and
        records it)."""
        assert self._journal is not None
        outcome = {k: v for k, v in out.items() if k not in ("image", "reference_image")}
        outcome["images"] = _image_digests(
            {"outcome": out.get("image"), "reference": out.get("reference_image")}
        )
        outcome = {k: v for k, v in outcome.items() if k not in measured or measured[k] != v}
        try:
            self._lease.check(self._run_epoch)  # nothing is journaled without a live owner
            link = self._journal
            await self._fenced(
                lambda e: link.call(Journal.record_outcome, experiment_id, outcome, epoch=e)
            )
        except Exception as exc:
            log.error(
                "station %s: outcome of %s not journaled: %s",
                self.name,
                experiment_id,
                cause_text(exc),
            )
            return False
        return True

    async def _run(
        self,
        station: SafeStation,
        experiment_id: str,
        recipe: Recipe,
        who: str,
        *,
        mark_running: bool,
        trip_on_failure: bool,
        include_image: bool,
        epoch: int | None,
        audit_from: int,
        measured: dict[str, Any],
    ) -> dict[str, Any]:
        """The run (:meth:`run`); ``measured`` is filled with what was journaled with the
        last step."""
        base = {"experiment_id": experiment_id, "station": self.name}
        report = cpu_part("dry_run", dry_run_recipe, recipe, station, who=who, now=self._now())
        self._under_way = report if report.ok else None
        if not report.ok:
            return {
                **base,
                "ok": False,
                "rejected": True,
                "error": str(report),
                "violations": report.as_dict()["violations"],
            }
        try:  # the latch and the experiments budgets: refused -> nothing acted, nothing journaled
            await station.guard.begin_experiment(who=who)
        except SafetyError as exc:
            return {**base, "ok": False, "rejected": False, "refused": True, "error": str(exc)}
        journal = self._journal
        ledger = station.guard.envelope.ledger
        writes = StepWrites(journal, fenced=self._fenced) if journal is not None else None
        # 'running' (with the experiments budget's unit) goes to disk in one transaction
        # with the first step's start, waited for before that step runs whatever it is
        running = mark_running and writes is not None

        def mark_running_later() -> None:  # queued: it goes with the next write waited for
            assert writes is not None
            writes.later(
                Journal.transition,
                experiment_id,
                "running",
                station=self.name,
                epoch=epoch,
                consumption=unsaved_consumption(ledger, self._now, self._speed),
            )

        if running and not recipe.steps:  # no step to carry it: on its own
            try:
                self._lease.check(epoch)
                mark_running_later()
                assert writes is not None
                await writes.flush()
            except Exception as exc:  # the journal refused: do not act at all
                return self._refused_running(base, experiment_id, exc)
            running = False
        index, phase = -1, "before"  # the step in progress, for the failure record
        so_far = Result()  # what the run measured so far (run_recipe fills it)
        last = len(recipe.steps) - 1
        keep_images = self._verify or include_image
        finished: list[tuple[int, dict[str, Any]]] = []  # a step done, journaled with the next
        # verification starts once what it reads is measured (loops.stationverify)
        verifying = EarlyVerification(recipe.verification, self._setup) if self._verify else None

        async def on_step(i: int, step: Step, what: str, data: dict[str, Any]) -> None:
            nonlocal index, phase, running
            try:  # no step acts, nothing is journaled, without a live owner
                self._lease.check(self._run_epoch)
            except Exception as exc:
                if running:  # before the first step: not running, nothing acted
                    raise _NotRunning(exc) from exc
                raise
            index, phase = i, what
            if what == "done" and verifying is not None:
                verifying.offer(so_far)
            if writes is None:
                return
            if what == "done" and i < last:
                # nothing acts until the next step starts: its record goes to disk with that
                # step's start, one journal write per step boundary (its reservation stays
                # open until then, and a kill in between reads as "during step i")
                finished.append((i, data))
                return
            if running:  # the first step: 'running' first, in the same transaction
                mark_running_later()
            # the budget consumption so far goes to disk with the step event (one transaction)
            used = unsaved_consumption(ledger, self._now, self._speed)
            if what == "started":  # on disk before the step acts, with what it may consume
                reserve = step_reservation(station, step, who, self._now)
                done = finished.pop() if finished else None
                self._reserved = bool(reserve)
                record = (experiment_id, i, step.as_dict())
                extra = {"epoch": epoch, "consumption": used, "reserve": reserve, "done": done}
                if running or step_waits(station, step, who, reserve):
                    try:
                        await writes.now(Journal.step_started, *record, **extra)
                    except Exception as exc:
                        if running:  # not running: nothing acted (not a failure of a step)
                            raise _NotRunning(exc) from exc
                        raise
                    running = False
                else:  # committed before the next step that waits (step_waits)
                    writes.later(Journal.step_started, *record, **extra)
                return
            # the last step: what the run measured goes to disk with its record, committed
            # while the run is verified (nothing acts any more), before its outcome is
            images = {r: b for r, b in so_far.images.items() if b} if keep_images else {}
            measured.update(
                self._measured(base, recipe, so_far),
                audit=[v.as_dict() for v in station.audit.records()[audit_from:]],
                images=_image_digests({r: images.get(r) for r in ("outcome", "reference")}),
            )
            writes.later(
                Journal.step_done,
                experiment_id,
                i,
                data,
                epoch=epoch,
                consumption=used,
                measured=measured,
                images=images,
            )
            self._reserved = False

        async def steps() -> Result:
            """The recipe's steps, then their records committed."""
            result = await run_recipe(
                recipe,
                station,
                clock_sleep=self._sleep,
                who=who,
                on_step=on_step,
                clock_now=self._now,
                result=so_far,
            )
            if writes is not None:  # the last step's record, while the run is verified
                await writes.flush()
            return result

        try:
            result = await until_tripped(station, steps())
        except _NotRunning as exc:
            return self._refused_running(base, experiment_id, exc.cause)
        except BaseException as exc:  # a cancellation too: safe-state, then re-raise
            if verifying is not None:
                verifying.cancel()
            where = f"step {index} ({phase})" if index >= 0 else "before its first step"
            error = cause_text(exc)
            reason = f"experiment {experiment_id} failed at {where}: {error}"
            log.error("station %s: %s", self.name, reason)
            trip: dict[str, Any] | None = None
            if trip_on_failure:
                trip = (await station.trip(reason, "station-actor", who=who)).as_dict()
            if not isinstance(exc, Exception):
                if writes is not None:
                    writes.abandon()
                raise
            if writes is not None:  # the failed run's step records reach the journal first
                with contextlib.suppress(Exception):
                    await writes.flush()
            return {
                **base,
                "ok": False,
                "rejected": False,
                "refused": False,
                "step": index if index >= 0 else None,
                "step_done": phase == "done",
                "error": error,
                "error_type": error.split(":", 1)[0],
                "trip": trip,
            }
        out = self._measured(base, recipe, result)
        timer = current_timer()
        if timer is not None:  # the bench's own time: its steps as the bench's clock measured them
            timer.add("bench", sum(result.durations) / self._speed, count=len(result.durations))
        if verifying is not None:
            out["verification"] = (await verifying.outcome(result)).as_dict()
        if include_image:
            out["image"] = result.image
            out["reference_image"] = result.reference_image
        return out

    @staticmethod
    def _refused_running(
        base: Mapping[str, Any], experiment_id: str, exc: BaseException
    ) -> dict[str, Any]:
        """The outcome of a run the journal would not mark ``running``: nothing acted."""
        return {
            **base,
            "ok": False,
            "rejected": False,
            "refused": True,
            "error": f"journal refused {experiment_id} -> running: {cause_text(exc)}",
        }

    @staticmethod
    def _measured(base: Mapping[str, Any], recipe: Recipe, result: Result) -> dict[str, Any]:
        """A run that ran to its end, as :meth:`run` returns it before verification."""
        return {
            **base,
            "ok": True,
            "result": result.as_dict(),
            "measurements": dict(result.measurements),
            "steps": len(recipe.steps),
        }

    async def _verify_outcome(self, result: Any, recipe: Recipe) -> Verification:
        """The program's checks (loops/checks.py) on this result, with what the station's
        set-up kept and the recipe's images (CPU-bound analyses: off the event loop)."""
        checks = recipe.verification
        return await asyncio.to_thread(
            cpu_part,
            "verify",
            run_checks,
            checks,
            measurements=result.measurements,
            inputs=checks.get("inputs") or {},
            images=result.images,
            setup=self._setup,
        )
