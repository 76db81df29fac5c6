"""The station actor: one :class:`StationActor` per physical bench owns its guarded instruments.

The one definition of a station's API (how the campaign reaches it, and why
only data crosses: :mod:`loops.stations`). It opens the bench behind the safety
layer, dry-runs and runs recipes (each step journaled before it acts), verifies
outcomes, runs set-up recipes, and trips, resets and recovers the station.

Nothing acts without a live owner: the campaign holds a lease on the actor
(:mod:`loops.stationlease`) checked before every step and while steps act or wait;
a lost lease trips the station. The envelope's budget consumption is kept in the
journal (:mod:`loops.stationledger`) and restored when the actor starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from loops.checks import Verification, run_checks
from loops.journal import Journal, JournalLink
from loops.recipe import Result, dry_run_recipe, run_recipe
from loops.stationclock import ClockSpec, ScaledClock
from loops.stationerrors import (
    ExperimentStopped,
    StationBusy,
    StationError,
    StationNotOpen,
    cause_text,
    portable_error,
)
from loops.stationlease import LEASE_S, POLL_S, Lease
from loops.stationledger import restore_consumption, save_consumption, unsaved_consumption
from loops.steps import Recipe, Step, flatten
from safety import SafeStation, SafetyError, load_envelope, open_station

log = logging.getLogger(__name__)

__all__ = ["RECOVERY_MARGIN_ML", "TRIP_POLL_S", "StationActor"]

#: what :meth:`StationActor.recover` drains beyond each vessel's capacity (mL)
RECOVERY_MARGIN_ML = 0.2
#: how often a running recipe checks whether its station tripped (real seconds)
TRIP_POLL_S = 0.02


async def _until_tripped(station: SafeStation, work: Awaitable[Any]) -> Any:
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


# --------------------------------------------------------------------- station
class StationActor:
    """One bench's guarded station, owned by one Ray async actor (create with :func:`start_station_actor`).

    ``specs``: the station's instruments (``name``, ``kind``, ``url``,
    ``options``) as the lab config lists them; ``envelope``: the
    envelope's YAML text (or a mapping, or a path readable on the actor's
    machine); ``clock``: a simulated bench's clock (None: ``time.monotonic``
    and ``asyncio.sleep``); ``supervisor_options``: for the station's
    supervisor (``poll_interval``, ``device_time_scale``, ...); ``env``:
    environment variables set in the actor's process before the station opens
    (e.g. ``DBUS_SYSTEM_BUS_ADDRESS`` for a simulated BLE bus); ``journal``: a
    :class:`~loops.journal.JournalLink` (None: steps are not journaled);
    ``verification``: ``enabled``: after each successful run the recipe's declared
    checks run on its result (:func:`loops.checks.run_checks`); ``setup``: what the
    station's set-up recipes kept (``setup.<name>`` in the checks; :meth:`run_setup`
    adds to it).
    """

    def __init__(
        self,
        name: str,
        specs: Sequence[Mapping[str, Any]],
        envelope: str | Mapping[str, Any],
        *,
        clock: ClockSpec | None = None,
        supervisor_options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        journal: JournalLink | None = None,
        verification: Mapping[str, Any] | None = None,
        setup: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self._specs = [dict(s) for s in specs]
        self._envelope_spec = envelope
        self._clock_spec = clock
        self._clock = ScaledClock(clock) if clock is not None else None
        self._supervisor_options = dict(supervisor_options or {})
        self._env = {str(k): str(v) for k, v in (env or {}).items()}
        self._journal = journal
        self._stack: contextlib.AsyncExitStack | None = None
        self._station: SafeStation | None = None
        self._run_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._current: str | None = None
        self._runs = 0
        self._verify = bool(dict(verification or {}).get("enabled", False))
        self._setup: dict[str, Any] = dict(setup or {})
        self._lease = Lease(name)
        self._lease_watch: asyncio.Task[None] | None = None

    # clock -----------------------------------------------------------------
    def _now(self) -> float:
        return self._clock.now() if self._clock is not None else time.monotonic()

    async def _sleep(self, seconds: float) -> None:
        if self._clock is not None:
            await self._clock.sleep(seconds)
        else:
            await asyncio.sleep(max(0.0, seconds))

    @property
    def _speed(self) -> float:
        return self._clock.speed if self._clock is not None else 1.0

    async def _save_ledger(self, station: SafeStation) -> None:
        """The budget consumption since the last save, to the journal (logged if refused)."""
        if self._journal is None:
            return
        try:
            await save_consumption(
                station.guard.envelope.ledger, self._journal, self.name, self._now, self._speed
            )
        except Exception as exc:
            log.error("station %s: budget consumption not journaled: %s", self.name, exc)

    def _require(self) -> SafeStation:
        if self._station is None:
            raise StationNotOpen(f"station {self.name} is not open: call start() first")
        return self._station

    # lifecycle -------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Open the station here (connect every instrument behind the guard); idempotent.

        Returns :meth:`status`. An error names the instrument's URL (from
        ``instruments.connect``; as :class:`StationError` when its own type cannot
        be pickled) and leaves the station closed.
        """
        async with self._open_lock:
            if self._station is None:
                os.environ.update(self._env)  # before any transport reads it (bleak: D-Bus address)
                envelope = load_envelope(
                    self._envelope_spec, source=f"station {self.name} envelope"
                )
                options: dict[str, Any] = {"supervisor_options": self._supervisor_options}
                if self._clock is not None:
                    options["clock"] = self._clock.now
                stack = contextlib.AsyncExitStack()
                try:
                    station = await stack.enter_async_context(
                        open_station(self.name, self._specs, envelope, **options)
                    )
                except BaseException as exc:
                    await stack.aclose()
                    portable = (
                        portable_error(exc, StationError) if isinstance(exc, Exception) else exc
                    )
                    if portable is exc:
                        raise
                    raise portable from None
                if self._journal is not None:  # budgets carry across restarts
                    try:
                        await restore_consumption(
                            station.guard.envelope.ledger,
                            self._journal,
                            self.name,
                            self._now(),
                            self._speed,
                        )
                    except BaseException as exc:
                        await stack.aclose()
                        raise StationError(
                            f"station {self.name}: cannot read its budget consumption from the "
                            f"journal ({cause_text(exc)}); not opening without its budgets"
                        ) from None
                self._stack, self._station = stack, station
                log.info("station %s open: %s", self.name, ", ".join(station.instruments))
        return await self.status()

    async def stop(self) -> dict[str, Any]:
        """Close the station: supervisor stopped, every instrument safe-stated, links closed. Idempotent."""
        watch, self._lease_watch = self._lease_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        async with self._open_lock:
            stack, self._stack, self._station = self._stack, None, None
            if stack is not None:
                await stack.aclose()
        return await self.status()

    async def status(self) -> dict[str, Any]:
        """Plain data: ``open``, ``busy``, ``experiment`` (running now), ``runs``, plus the
        supervisor's status (``latched``, ``trip``, ``monitors``, ...) while open."""
        out: dict[str, Any] = {
            "station": self.name,
            "open": self._station is not None,
            "busy": self._run_lock.locked(),
            "experiment": self._current,
            "runs": self._runs,
            "clock": None if self._clock is None else self._now(),
            "lease": self._lease.as_dict(),
        }
        if self._station is not None:
            out.update(self._station.status())
            out["instruments"] = dict(self._station.instruments)
            out["tripped"] = self._station.tripped
        return out

    async def readings(self) -> dict[str, Any]:
        """Plain data, no I/O: the latest measured values (``instrument.channel`` -> value
        and its age in s, as the supervisor last polled them) and the commanded targets."""
        station = self._require()
        state, now = station.guard.state, time.monotonic()
        measured = dict(state.measured)  # one copy: the supervisor keeps updating it
        return {
            "station": self.name,
            "measured": {n: {"value": v, "age_s": now - t} for n, (v, t) in measured.items()},
            "commanded": dict(state.commanded),
            "tripped": station.tripped,
        }

    # lease -----------------------------------------------------------------
    async def lease(self, owner: str, epoch: int, ttl_s: float = LEASE_S) -> dict[str, Any]:
        """Take or renew the owner's lease (:mod:`loops.stationlease`) for ``ttl_s`` real
        seconds; returns it as data. Raises :class:`~loops.journal.StaleOwner` for an older
        epoch than one seen, :class:`~loops.stationlease.OwnerLost` for a lost epoch."""
        out = self._lease.take(owner, epoch, ttl_s)
        if self._lease_watch is None or self._lease_watch.done():
            self._lease_watch = asyncio.create_task(self._watch_lease(), name=f"lease-{self.name}")
        return out

    async def release(self, epoch: int) -> dict[str, Any]:
        """The owner at ``epoch`` is done with the station (its campaign ended)."""
        self._lease.release(epoch)
        return self._lease.as_dict()

    async def _watch_lease(self) -> None:
        """While a lease is held: when it runs out, trip the station (safe state, latched),
        the reason naming the lost owner; a running recipe stops at once (:func:`_until_tripped`)."""
        while True:
            await asyncio.sleep(POLL_S)
            if not self._lease.overdue():
                if self._lease.held:
                    continue
            else:  # after a stall of this process, a renewal may be queued: let it in first
                await asyncio.sleep(POLL_S)
                if self._lease.expire() is None:
                    continue
            station, why = self._station, self._lease.lost
            if not self._lease.timed_out or station is None or why is None:
                return  # released by its owner, or nothing open to safe-state
            log.error("station %s: %s: tripping", self.name, why)
            try:
                await station.trip(why, "lease", who=self._lease.owner)
            except Exception as exc:  # the supervisor logs each instrument's failure
                log.error("station %s: trip on lost lease failed: %s", self.name, exc)
            return

    async def placement(self) -> dict[str, Any]:
        """Where this actor runs: node id and IP, pid, and the Ray resources assigned to it."""
        import ray  # only a station running as a Ray actor has a placement

        ctx = ray.get_runtime_context()
        return {
            "station": self.name,
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "actor_id": ctx.get_actor_id(),
            "resources": dict(ctx.get_assigned_resources()),
        }

    # experiments -----------------------------------------------------------
    async def dry_run(
        self, recipe: Mapping[str, Any], who: str = "optimizer"
    ) -> list[dict[str, Any]]:
        """Check ``recipe`` (a :meth:`Recipe.as_dict`) against the envelope from the station's
        current state, no I/O. Returns the violations (``step``, ``command``, ``rule``,
        ``reason``, ``values``); empty: allowed."""
        station = self._require()
        report = dry_run_recipe(Recipe.from_dict(recipe), station, who=who, now=self._now())
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
        ``reference_image``: the JPEG bytes if ``include_image``). Every outcome also
        carries ``audit``: the safety verdicts (``Verdict.as_dict()``) of this run's commands. Failure at step i -> ``{"ok": False, "step": i,
        "error": ..., "error_type": ..., "trip": TripReport dict}``: the station is tripped
        (latched safe state) when ``trip_on_failure``; the campaign records the outcome.
        """
        station = self._require()
        self._lease.check(epoch)
        if self._run_lock.locked():
            raise StationBusy(
                f"station {self.name} is running experiment {self._current}; "
                f"refusing {experiment_id} (one experiment at a time)"
            )
        async with self._run_lock:
            self._current = experiment_id
            mark = len(station.audit.records())
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
                )
                # the safety layer's verdicts on this run's commands, for the store
                out["audit"] = [v.as_dict() for v in station.audit.records()[mark:]]
                return out
            finally:
                self._current = None
                self._runs += 1
                await self._save_ledger(station)

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
    ) -> dict[str, Any]:
        base = {"experiment_id": experiment_id, "station": self.name}
        report = dry_run_recipe(recipe, station, who=who, now=self._now())
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
        journal = self._journal  # the experiment unit is journaled with step 0 (or at the end)
        if mark_running and journal is not None:
            try:
                self._lease.check(epoch)
                await journal.call(
                    Journal.transition, experiment_id, "running", station=self.name, epoch=epoch
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

        async def on_step(i: int, step: Step, what: str, data: dict[str, Any]) -> None:
            nonlocal index, phase
            self._lease.check(epoch)  # no step acts, nothing is journaled, without a live owner
            index, phase = i, what
            if journal is None:
                return
            # the budget consumption so far goes to disk with the step event (one transaction)
            used = unsaved_consumption(station.guard.envelope.ledger, self._now, self._speed)
            if what == "started":  # on disk before the step acts
                await journal.call(
                    Journal.step_started,
                    experiment_id,
                    i,
                    step.as_dict(),
                    epoch=epoch,
                    consumption=used,
                )
            else:
                await journal.call(
                    Journal.step_done, experiment_id, i, data, epoch=epoch, consumption=used
                )

        try:
            result = await _until_tripped(
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
        out: dict[str, Any] = {
            **base,
            "ok": True,
            "result": result.as_dict(),
            "measurements": dict(result.measurements),
            "steps": len(recipe.steps),
        }
        if self._verify:
            out["verification"] = (await self._verify_outcome(result, recipe)).as_dict()
        if include_image:
            out["image"] = result.image
            out["reference_image"] = result.reference_image
        return out

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
        self._require()
        self._lease.check(epoch)
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
        try:
            return await _until_tripped(
                station,
                run_recipe(recipe, station, clock_sleep=self._sleep, who=who, clock_now=self._now),
            )
        except Exception as exc:
            reason = f"{what} failed: {cause_text(exc)}"
            await station.trip(reason, what.split(" ", 1)[0], who=who)
            raise StationError(f"station {self.name}: {reason}") from None
        finally:
            self._current = None
            await self._save_ledger(station)

    # safety ----------------------------------------------------------------
    async def trip(self, reason: str, who: str | None = None) -> dict[str, Any]:
        """Latch the station and drive every instrument to its safe state; the TripReport as a dict."""
        report = await self._require().trip(reason, "api", who=who)
        return report.as_dict()

    async def reset(self, who: str, why: str) -> dict[str, Any]:
        """Unlatch once every monitor cleared (``who``/``why`` recorded); returns :meth:`status`.
        Raises :class:`safety.ResetRefused` naming the monitor that is still active."""
        await self._require().reset(who, why)
        return await self.status()

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
        TripReport), ``drained_ml`` (what the draining pumps report) and ``status``. Raises :class:`StationBusy` while an experiment runs,
        and like :meth:`run` unless ``epoch`` holds the lease.
        """
        station = self._require()
        self._lease.check(epoch)
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
