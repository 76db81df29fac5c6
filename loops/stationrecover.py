"""A station's set-up and recovery recipes: :class:`StationRecovery` (part of
:class:`~loops.stationactor.StationActor`).

Set-up recipes (a calibration, priming) and the recovery after an interrupted
experiment (trip, reset by an operator, drain every vessel) run through the guard like
an experiment's recipe, but are not experiments: they are not journaled as steps. A run
whose every step finished but whose owner died before its outcome was journaled is
verified here from the journal (:meth:`StationRecovery.recover_outcome`: no hardware).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loops.journal import Experiment, Journal
from loops.recipe import Result, dry_run_recipe, run_recipe
from loops.stationerrors import StationBusy, StationError, cause_text, portable_error
from loops.stationledger import step_reservation, unsaved_consumption
from loops.stationrun import StationRuns, until_tripped
from loops.steps import Recipe, Step, flatten
from safety import SafetyError

__all__ = ["RECOVERY_MARGIN_ML", "StationRecovery"]

#: what :meth:`StationRecovery.recover` drains beyond each vessel's capacity (mL)
RECOVERY_MARGIN_ML = 0.2


class StationRecovery(StationRuns):
    """Set-up recipes and recovery (module docstring)."""

    async def run_setup(
        self,
        recipe: Mapping[str, Any],
        keep: Sequence[str] = (),
        *,
        who: str = "operator:setup",
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """Run a set-up recipe (:mod:`loops.setup`: a calibration, priming...) through the
        guard and return the measurements it ``keep``s, which the station's checks use
        from now on (``setup.<name>``). Refused by the dry run -> :class:`StationError`
        and nothing acted; a failure trips the station (safe state) and raises
        :class:`StationError` naming the step."""
        bound = Recipe.from_dict(recipe)
        what = f"set-up {bound.name or 'recipe'}"
        self._lease.check(epoch)
        self._require()
        if self._run_lock.locked():
            raise StationBusy(f"station {self.name} is running {self._current}: not running {what}")
        async with self._run_lock:
            result = await self._run_locked(bound, who, what=what)
        flat: dict[str, Any] = {}
        for name, value in result.measurements.items():
            flatten(name, value, flat)
        kept: dict[str, Any] = {}
        for name in keep:
            if name not in flat:
                raise StationError(f"station {self.name}: {what} measured no {name!r}")
            kept[name] = flat[name]
        self._setup.update(kept)
        return kept

    async def _run_locked(self, recipe: Recipe, who: str, *, what: str) -> Result:
        """Dry-run ``recipe`` then run it through the guard (the caller holds the run lock;
        not journaled: set-up and recovery are not experiments). Refused -> a
        :class:`~safety.SafetyError`, nothing acted; a failure trips the station and raises
        :class:`StationError` naming the step."""
        station = self._require()
        report = dry_run_recipe(recipe, station, who=who, now=self._now())
        if not report.ok:
            raise SafetyError(f"station {self.name}: {what} refused: {report}")
        self._current = what
        journal = self._journal

        async def on_step(i: int, step: Step, phase: str, data: dict[str, Any]) -> None:
            # the budgets' use goes to disk step by step, the step about to act reserved: a
            # set-up that dispenses is cut by a kill as an experiment is (nothing uncounted)
            if journal is None:
                return
            rows = unsaved_consumption(station.guard.envelope.ledger, self._now, self._speed)
            reserve = step_reservation(station, step, who, self._now) if phase == "started" else []
            await journal.call(Journal.record_consumption, self.name, rows, reserve=reserve)
            self._reserved = bool(reserve)

        try:
            return await until_tripped(
                station,
                run_recipe(
                    recipe,
                    station,
                    clock_sleep=self._sleep,
                    who=who,
                    on_step=on_step,
                    clock_now=self._now,
                ),
            )
        except Exception as exc:
            reason = f"{what} failed: {cause_text(exc)}"
            await station.trip(reason, what.split(" ", 1)[0], who=who)
            raise StationError(f"station {self.name}: {reason}") from None
        finally:
            self._current = None
            await self._save_ledger(station)

    async def recover(
        self,
        who: str,
        why: str,
        *,
        drain_ml: float | None = None,
        drain_rate_ml_min: float = 20.0,
        epoch: int | None = None,
    ) -> dict[str, Any]:
        """Bring the bench back after an experiment was interrupted (its campaign process died).

        The station is tripped (every instrument to its safe state, latched), reset by
        ``who`` once its monitors are clear (raises :class:`safety.ResetRefused` naming
        the monitor otherwise, and the station stays latched), then every vessel of the
        envelope is drained through the guard by the instruments that drain it
        (``drain_ml``, default: more than the vessel holds, since a fresh guard cannot
        know what the interrupted experiment left in it). Returns ``trip`` (the
        TripReport), ``drained_ml`` (what the draining pumps report) and ``status``. Raises
        :class:`StationBusy` while an experiment runs, and like :meth:`run` unless ``epoch``
        holds the lease. A station that closed itself when its lease was lost is opened
        again first.
        """
        self._lease.check(epoch)
        await self._reopen_after_loss(who)
        station = self._require()
        if self._run_lock.locked():
            raise StationBusy(f"station {self.name} is running {self._current}: not recovering")
        async with self._run_lock:
            trip = (await station.trip(f"recovery: {why}", "recovery", who=who)).as_dict()
            try:
                await station.reset(who, f"recovery: {why}")
            except Exception as exc:  # ResetRefused names the monitor; keep it readable across Ray
                portable = portable_error(exc, StationError)
                if portable is exc:
                    raise
                raise portable from None
            recipe = Recipe(_drain_steps(station, drain_ml, drain_rate_ml_min), name="recovery")
            result = await self._run_locked(recipe, who, what="recovery drain")
        return {
            "trip": trip,
            "drained_ml": sum(
                float(p.get("in_ml") or 0.0)
                for p in result.measurements.get("drained", {}).values()
            ),
            "status": await self.status(),
        }

    async def recover_outcome(
        self, experiment_id: str, *, epoch: int | None = None
    ) -> dict[str, Any]:
        """Journal the outcome of a run of this station whose every step finished, but whose
        owner died before it was verified and journaled (:attr:`ResumeInfo.recovered
        <loops.journal.ResumeInfo.recovered>`): what the run measured is read from the
        journal (``step_done`` ``measured=``, with the captures' JPEGs), verified by this
        station's checks with its set-up values as the run would have been (when it
        verifies), and journaled as its outcome (:meth:`Journal.record_outcome`), marked
        ``recovered_on_resume``. Nothing reaches the hardware. Returns the outcome as
        journaled. Raises like :meth:`run` unless ``epoch`` holds the lease, and
        :class:`StationError` for an experiment that was not measured on this station.
        """
        self._lease.check(epoch)
        journal = self._journal
        if journal is None:
            raise StationError(
                f"station {self.name} has no journal: cannot recover {experiment_id}"
            )
        exp: Experiment = await journal.call(Journal.experiment, experiment_id)
        measured = await journal.call(Journal.measured, experiment_id)
        if measured is None or exp.station != self.name:
            raise StationError(
                f"station {self.name}: experiment {experiment_id} (on station {exp.station}) "
                "has no measurements journaled with a last step here: nothing to recover"
            )
        outcome: dict[str, Any] = {"recovered_on_resume": True}  # on top of what was measured
        if self._verify:
            images: dict[str, bytes | None] = {
                **await journal.call(Journal.outcome_images, experiment_id)
            }
            result = Result(measurements=dict(measured.get("measurements") or {}), images=images)
            verification = await self._verify_outcome(result, Recipe.from_dict(exp.recipe))
            outcome["verification"] = verification.as_dict()
        self._lease.check(epoch)
        await journal.call(Journal.record_outcome, experiment_id, outcome, epoch=epoch)
        recorded: dict[str, Any] | None = await journal.call(Journal.outcome, experiment_id)
        return recorded or {**measured, **outcome}


def _call(instrument: str, command: str, **args: Any) -> Step:
    return Step("call", {"instrument": instrument, "command": command, "args": args})


def _drain_steps(station: Any, volume_ml: float | None, rate_ml_min: float) -> tuple[Step, ...]:
    """Empty every vessel of the station's envelope through the instruments that drain it
    (their declared flow ``in``: ``volume_ml``, default the vessel's capacity plus a
    margin), each waited for and its progress read into ``drained.<instrument>``."""
    steps: list[Step] = []
    layout = station.guard.layout
    for vessel in station.guard.envelope.vessels.values():
        for name in vessel.drained_by:
            for spec in layout.actions(name).values():
                flow = spec.flow
                if flow is None or flow.direction != "in":
                    continue
                size = vessel.capacity if vessel.capacity is not None else vessel.max
                args = {flow.volume: volume_ml or round(size + RECOVERY_MARGIN_ML, 4)}
                if flow.rate is not None:
                    args[flow.rate] = rate_ml_min
                steps.append(_call(name, spec.name, **args))
                wait = {
                    "condition": f"not {name}.moving",
                    "instruments": [name],
                    "every_s": 1.0,
                    "timeout_s": 3600.0,
                    "inputs": {},
                }
                steps.append(Step("wait", wait))
                if flow.progress is not None:
                    into = {"instrument": name, "command": flow.progress, "args": {}}
                    steps.append(Step("call", {**into, "into": f"drained.{name}"}))
                break
    return tuple(steps)
