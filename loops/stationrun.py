"""A station running one experiment: :class:`StationRuns` (part of
:class:`~loops.stationactor.StationActor`).

The recipe is dry-run again, the experiment moved ``queued -> running`` (with the
experiments budget's unit, one transaction), each step journaled before it acts
(``step_started``, with a reservation of what it may consume; a step that cannot change
the bench -- a read, a wait, a hold, a capture, a computation: :func:`step_acts` -- has
its record submitted in the journal's order without waiting for the commit, and every
such record is committed before the next step that acts starts and before the last
step's record, so a kill can lose at most the records of steps that only looked) and after
(``step_done``, with what it did consume; nothing acts between a step's end and the next
step's start, so that record goes to disk in the next start's transaction: one journal
round trip per step, not two). The last step's record carries what the run
measured (measurements, the safety verdicts, the captures' JPEGs: ``step_done``
``measured=``, one transaction), and once verified the run's outcome is journaled
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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from loops.checks import Verification, run_checks
from loops.journal import Journal, StaleOwner
from loops.recipe import Result, dry_run_recipe, run_recipe
from loops.stacktime import StackTimer, cpu_part, current_timer, timing
from loops.stationcore import StationCore
from loops.stationerrors import ExperimentStopped, StationBusy, StationError, cause_text
from loops.stationledger import step_reservation, unsaved_consumption
from loops.steps import Recipe, Step
from safety import SafeStation, SafetyError
from safety.effects import Command, CommandRefused, effect_of

log = logging.getLogger(__name__)

__all__ = ["TRIP_POLL_S", "StationRuns", "step_acts", "until_tripped"]

#: how often a running recipe checks whether its station tripped (real seconds)
TRIP_POLL_S = 0.02
#: how long a journal write of a running experiment refused as a stale owner's waits for the
#: restarted owner that fenced it to take the station's lease over (real seconds)
TAKE_OVER_WAIT_S = 2.0


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
    (safer commands included; one the guard would refuse counts as acting). Such a step's
    start is committed to the journal before it runs; the others' are submitted in order
    and committed before the next step that acts (:meth:`StationRuns.run`)."""
    if step.kind in QUIET_KINDS:
        return False
    if step.kind != "call":
        return True
    p = step.params
    command = Command(p["instrument"], p["command"], dict(p.get("args") or {}), who)
    try:
        return effect_of(command, station.guard.layout, station.state.view()).actuates
    except CommandRefused:
        return True


def in_order(
    writes: list[asyncio.Task[Any]], write: Callable[[], Awaitable[Any]]
) -> asyncio.Task[Any]:
    """Send ``write()`` once the last write in ``writes`` has committed (a Ray actor does
    not keep the order in which one caller's calls were sent), without waiting for it
    here; added to ``writes``. A write after one that failed fails the same way. Its
    time is counted as ``behind:<part>`` in the run's stack timer (not waited for)."""
    before = writes[-1] if writes else None

    async def send() -> Any:
        if before is not None:
            await before
        with timing(behind) as timer:
            try:
                return await write()
            finally:
                if run_timer is not None:
                    run_timer.merge(timer.as_dict(), "behind:")

    run_timer = current_timer()
    behind = StackTimer()
    task = asyncio.ensure_future(send())
    writes.append(task)
    return task


async def committed(writes: list[asyncio.Task[Any]]) -> None:
    """Wait for each journal write in ``writes``, in order, emptying the list (the first
    that failed raises)."""
    while writes:
        await writes.pop(0)


def abandon(writes: list[asyncio.Task[Any]]) -> None:
    """Let go of journal writes not waited for (a cancelled run): cancelled; what was
    sent already reaches the journal or not, nothing waits for it."""
    for w in writes:
        w.cancel()
    writes.clear()


def _image_digests(images: Mapping[str, bytes | None]) -> dict[str, dict[str, Any]]:
    """Role -> ``sha256`` and ``bytes`` of each JPEG given (how an outcome cites its images)."""
    return {
        role: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        for role, data in images.items()
        if data
    }


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
        if mark_running and journal is not None:
            try:  # the experiments unit goes to disk with 'running' (one transaction)
                self._lease.check(epoch)
                await journal.call(
                    Journal.transition,
                    experiment_id,
                    "running",
                    station=self.name,
                    epoch=epoch,
                    consumption=unsaved_consumption(ledger, self._now, self._speed),
                )
            except Exception as exc:  # the journal refused: do not act at all
                return {
                    **base,
                    "ok": False,
                    "rejected": False,
                    "refused": True,
                    "error": f"journal refused {experiment_id} -> running: {cause_text(exc)}",
                }
        index, phase = -1, "before"  # the step in progress, for the failure record
        so_far = Result()  # what the run measured so far (run_recipe fills it)
        last = len(recipe.steps) - 1
        keep_images = self._verify or include_image
        finished: list[tuple[int, dict[str, Any]]] = []  # a step done, journaled with the next
        # the start records of steps that cannot change the bench (reads, waits, computes),
        # submitted in order but not waited for: every one of them is committed before the
        # next step that acts starts, and before the last step's record (in_order, committed)
        in_flight: list[asyncio.Task[Any]] = []

        async def on_step(i: int, step: Step, what: str, data: dict[str, Any]) -> None:
            nonlocal index, phase
            self._lease.check(self._run_epoch)  # nothing acts or is journaled without an owner
            index, phase = i, what
            if journal is None:
                return
            if what == "done" and i < last:
                # nothing acts until the next step starts: its record goes to disk with that
                # step's start, one journal write per step boundary (its reservation stays
                # open until then, and a kill in between reads as "during step i")
                finished.append((i, data))
                return
            # the budget consumption so far goes to disk with the step event (one transaction)
            used = unsaved_consumption(ledger, self._now, self._speed)
            if what == "started":  # on disk before the step acts, with what it may consume
                reserve = step_reservation(station, step, who, self._now)
                done = finished.pop() if finished else None
                self._reserved = bool(reserve)
                link = journal  # for the closure: not None here

                def write() -> Awaitable[Any]:
                    return self._fenced(
                        lambda e: link.call(
                            Journal.step_started,
                            experiment_id,
                            i,
                            step.as_dict(),
                            epoch=e,
                            consumption=used,
                            reserve=reserve,
                            done=done,
                        )
                    )

                if not step_acts(station, step, who):
                    in_order(in_flight, write)  # sent after the ones before; waited for below
                    return
                await committed(in_flight)
                await write()
            else:  # the last step: what the run measured goes to disk with its record
                images = {r: b for r, b in so_far.images.items() if b} if keep_images else {}
                measured.update(
                    self._measured(base, recipe, so_far),
                    audit=[v.as_dict() for v in station.audit.records()[audit_from:]],
                    images=_image_digests({r: images.get(r) for r in ("outcome", "reference")}),
                )
                await committed(in_flight)
                link = journal
                await self._fenced(
                    lambda e: link.call(
                        Journal.step_done,
                        experiment_id,
                        i,
                        data,
                        epoch=e,
                        consumption=used,
                        measured=measured,
                        images=images,
                    )
                )
                self._reserved = False

        try:
            result = await until_tripped(
                station,
                run_recipe(
                    recipe,
                    station,
                    clock_sleep=self._sleep,
                    who=who,
                    on_step=on_step,
                    clock_now=self._now,
                    result=so_far,
                ),
            )
        except BaseException as exc:  # a cancellation too: safe-state, then re-raise
            where = f"step {index} ({phase})" if index >= 0 else "before its first step"
            error = cause_text(exc)
            reason = f"experiment {experiment_id} failed at {where}: {error}"
            log.error("station %s: %s", self.name, reason)
            trip: dict[str, Any] | None = None
            if trip_on_failure:
                trip = (await station.trip(reason, "station-actor", who=who)).as_dict()
            if not isinstance(exc, Exception):
                abandon(in_flight)
                raise
            # the failed run's step records reach the journal before its failure does
            await asyncio.gather(*in_flight, return_exceptions=True)
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
        if self._verify:
            out["verification"] = (await self._verify_outcome(result, recipe)).as_dict()
        if include_image:
            out["image"] = result.image
            out["reference_image"] = result.reference_image
        return out

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
