"""A station running one experiment: :class:`StationRuns` (part of
:class:`~loops.stationactor.StationActor`).

The recipe is dry-run again, the experiment moved ``queued -> running`` (with the
experiments budget's unit, one transaction), each step journaled before it acts
(``step_started``, with a reservation of what it may consume) and after
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
from collections.abc import Awaitable, Mapping
from typing import Any

from loops.checks import Verification, run_checks
from loops.journal import Journal
from loops.recipe import Result, dry_run_recipe, run_recipe
from loops.stationcore import StationCore
from loops.stationerrors import ExperimentStopped, StationBusy, cause_text
from loops.stationledger import step_reservation, unsaved_consumption
from loops.steps import Recipe, Step
from safety import SafeStation, SafetyError

log = logging.getLogger(__name__)

__all__ = ["TRIP_POLL_S", "StationRuns", "until_tripped"]

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
            self._current = experiment_id
            mark = len(station.audit.records())
            measured: dict[str, Any] = {}  # what went to the journal with the last step
            try:
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
                        experiment_id, out, epoch, measured
                    )
                return out
            finally:
                self._current = self._under_way = None
                self._runs += 1
                await self._save_ledger(station)

    async def _journal_outcome(
        self,
        experiment_id: str,
        out: Mapping[str, Any],
        epoch: int | None,
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
            self._lease.check(epoch)  # nothing is journaled as progress without a live owner
            await self._journal.call(Journal.record_outcome, experiment_id, outcome, epoch=epoch)
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
        report = dry_run_recipe(recipe, station, who=who, now=self._now())
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

        async def on_step(i: int, step: Step, what: str, data: dict[str, Any]) -> None:
            nonlocal index, phase
            self._lease.check(epoch)  # no step acts, nothing is journaled, without a live owner
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
                await journal.call(
                    Journal.step_started,
                    experiment_id,
                    i,
                    step.as_dict(),
                    epoch=epoch,
                    consumption=used,
                    reserve=reserve,
                    done=finished.pop() if finished else None,
                )
                self._reserved = bool(reserve)
            else:  # the last step: what the run measured goes to disk with its record
                images = {r: b for r, b in so_far.images.items() if b} if keep_images else {}
                measured.update(
                    self._measured(base, recipe, so_far),
                    audit=[v.as_dict() for v in station.audit.records()[audit_from:]],
                    images=_image_digests({r: images.get(r) for r in ("outcome", "reference")}),
                )
                await journal.call(
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
                raise
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
            run_checks,
            checks,
            measurements=result.measurements,
            inputs=checks.get("inputs") or {},
            images=result.images,
            setup=self._setup,
        )
