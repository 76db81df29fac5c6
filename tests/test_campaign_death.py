"""A campaign whose station actor dies always ends or carries on (issue 12's fault campaign
hung once: ``benchmarks/faults.py --faults 1000``).

The hang: bench-c's actor was killed (``ray.kill``) during step 1 of the first experiment
after a resume; the campaign marked the station out and the experiment failed, then its
end waited forever for the lease keeper, which kept renewing for nobody (the campaign row
stayed ``running``). The cause: the keeper's release of the dead station used
``asyncio.wait_for``, which on Python 3.11 returns the outcome of a call that completes as
the caller is cancelled and swallows the cancellation -- the dead station's release fails
at once, so the keeper's cancellation at the campaign's end could land in exactly that
moment. :func:`test_the_lease_keeper_ends_when_a_dead_stations_release_fails_as_the_campaign_ends`
makes that moment happen every time (in-process); the Ray tests kill the station actor at
the windows the fault campaign hits (after a reset and a resume, during the claim, between
experiments, during a resume's recovery) and check the campaign ends with the reason, and
that a new actor and a resume carry it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.campaigns import lab_clock, make_runner, set_up, start_lab_station
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import sim_lab_yaml
from loops.campaign import CampaignRunner, CampaignSummary
from loops.campaignrecord import RECOVERED, RECOVERED_LIVE
from loops.journal import AsyncJournal, Journal
from loops.program import Program, load_program
from loops.raylinks import JournalActor, start_journal_actor
from loops.stations import LocalStation, StationActor, StationLost
from simulators.bench import SimulatedLab

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
SPEED = 500.0
OPERATOR = "tester"
#: how long a campaign may take to end once its only station died (real s; it takes
#: well under a second: journal writes)
ENDS_S = 30.0


class DiesLikeARayActor:
    """A :class:`~loops.stations.StationLink` to an in-process, unopened station (leases
    only) that can die: after :meth:`kill` every call fails at once with
    :class:`StationLost`, as ``RayStation``'s calls to a killed actor do.
    ``on_release``: called as the dead station's release is asked (the caller's moment)."""

    def __init__(self) -> None:
        self.inner = LocalStation(StationActor("bench-a", [], "channels: {}\n"))
        self.name = "bench-a"
        self.dead = False
        self.on_release: Callable[[], None] | None = None

    def kill(self, on_release: Callable[[], None]) -> None:
        self.dead, self.on_release = True, on_release

    def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if not self.dead:
            return self.inner.call(fn, *args, **kwargs)
        if fn is StationActor.release and self.on_release is not None:
            hook, self.on_release = self.on_release, None
            hook()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_exception(StationLost(f"station bench-a died: {fn.__name__} not run"))
        return fut


@pytest.mark.timeout(60)
async def test_the_lease_keeper_ends_when_a_dead_stations_release_fails_as_the_campaign_ends(
    tmp_path: Path,
) -> None:
    base = load_program(EXAMPLE)
    program = dataclasses.replace(base, budget=dataclasses.replace(base.budget, experiments=2))
    link = DiesLikeARayActor()
    async with await AsyncJournal.open(tmp_path / "journal.db") as journal:
        runner = CampaignRunner(program, journal, {"bench-a": link}, campaign_id="keeper")
        await runner.prepare()
        keeper = runner._keeper
        assert keeper is not None and not keeper.done()
        ending: list[asyncio.Task[None]] = []
        ended = asyncio.Event()

        def end_now() -> None:  # the campaign's end, in the instant the release fails
            ending.append(asyncio.get_running_loop().create_task(runner._release_leases()))
            ended.set()

        link.kill(end_now)
        # the keeper's next renewal finds the station dead (out: lease refused), the one
        # after that releases its lease: the campaign ends in that very instant
        async with asyncio.timeout(10 * 1.0 + 5):
            await ended.wait()
        # asyncio.wait, not a timeout around an await: cancelling the end would cancel its
        # wait for the keeper, and the old end swallowed that cancellation too
        done, _ = await asyncio.wait({ending[0]}, timeout=10)
        if not done:
            keeper.cancel()  # the old keeper swallowed one cancellation: end it for the test
            ending[0].cancel()
            raise AssertionError("the campaign's end waited for a lease keeper that never stopped")
        await ending[0]
        assert keeper.done() and runner._keeper is None
        state = runner.progress()["stations"]["bench-a"]
        assert state["state"] == "out" and "died" in state["reason"], state
        runner.stop("test: done")
        async with asyncio.timeout(20):
            summary = await runner.run()
        assert summary.state == "stopped", summary
        row = await journal.call(Journal.campaign, "keeper")
        assert row.state == "stopped"
        await link.inner.actor.stop()  # what a killed actor's process takes with it


# ----------------------------------------------------------------- on Ray
def program(experiments: int) -> Program:
    """The colour-match example: random proposals, ``experiments`` and no other stop rule."""
    base = load_program(EXAMPLE)
    return dataclasses.replace(
        base,
        strategy="random",
        initial_points=1,
        budget=dataclasses.replace(base.budget, experiments=experiments, hours=None),
        stop=dataclasses.replace(base.stop, target=None, no_improvement=None),
    )


@dataclasses.dataclass
class Bench:
    """One simulated bench, its journal actor and its station actor (replaced as an operator
    would after a death: :meth:`new_actor`)."""

    lab: LabConfig
    journal: Any
    actor: Any
    actors: list[Any]
    events: list[dict[str, Any]]

    async def new_actor(self) -> None:
        actor = start_lab_station(self.lab, "bench-a", self.journal, lab_clock(self.lab)[0])
        self.actors.append(actor)
        await actor.start.remote()
        await actor.reset.remote(OPERATOR, "a new actor after the old one died")
        self.actor = actor

    def runner(self, prog: Program, on_event: Callable[[dict[str, Any]], None]) -> CampaignRunner:
        def both(event: dict[str, Any]) -> None:
            self.events.append(event)
            on_event(event)

        return make_runner(self.lab, prog, self.journal, {"bench-a": self.actor}, "death", both)


@contextlib.asynccontextmanager
async def ray_bench(
    ray: Any, tmp_path: Path, journal_class: Any = None, *args: Any
) -> AsyncIterator[Bench]:
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        if journal_class is None:
            journal = start_journal_actor(lab.store)
        else:
            remote = ray.remote(journal_class).options(num_cpus=0, max_restarts=0)
            journal = remote.remote(str(lab.store.resolve()), *args)
        bench = Bench(lab, journal, None, [], [])
        try:
            await bench.new_actor()
            await set_up(lab, {"bench-a": bench.actor}, who="tester:setup")
            yield bench
        finally:
            for actor in bench.actors:
                with contextlib.suppress(Exception):
                    await actor.stop.remote()
                ray.kill(actor, no_restart=True)
            with contextlib.suppress(Exception):
                await journal.close.remote()
            ray.kill(journal, no_restart=True)


async def ends(runner: CampaignRunner, task: asyncio.Task[CampaignSummary]) -> CampaignSummary:
    """The campaign's summary once it ended; fails if it has not within :data:`ENDS_S` of
    its station's death (what the fault campaign waited 45 minutes for)."""
    done, _ = await asyncio.wait({task}, timeout=ENDS_S)
    if not done:
        runner.stop("test: it did not end")
        task.cancel()
        raise AssertionError(f"the campaign did not end within {ENDS_S} s of its station's death")
    return task.result()


def journal_of(bench: Bench) -> Journal:
    return Journal(bench.lab.store)


@pytest.mark.timeout(240)
async def test_a_campaign_ends_whenever_its_station_actor_is_killed_and_a_resume_carries_on(
    ray_session: Any, tmp_path: Path
) -> None:
    """The fault campaign's windows, one after the other on one campaign: a kill during
    step 1 of the first experiment after a trip, a reset and a resume (the hang); as a
    resume takes the station, before its recovery; during a claim (the dry run); between
    two experiments. Each time the campaign ends within :data:`ENDS_S` with the station out
    and the death named, and a new actor and a resume carry it on to its budget."""
    prog = program(4)
    async with ray_bench(ray_session, tmp_path) as bench:
        # a trip during the first experiment: the campaign stops, the operator resets
        def trip(event: dict[str, Any]) -> None:
            if event["event"] == "started":
                bench.actor.trip.remote("test: a trip during the experiment", OPERATOR)

        runner = bench.runner(prog, trip)
        await runner.prepare()
        summary = await ends(runner, asyncio.create_task(runner.run()))
        assert summary.state == "stopped" and "no station available" in summary.reason
        await bench.actor.reset.remote(OPERATOR, "after the trip")

        # resumed: killed once step 1 (the wait for the plate to cool) of its experiment began
        killed: list[str] = []

        async def kill_at_step_1(eid: str) -> None:
            while True:
                log = await bench.journal.transitions.remote(eid)
                if any(t.event == "step_started" and t.step == 1 for t in log):
                    ray_session.kill(bench.actor, no_restart=True)
                    return
                await asyncio.sleep(0.01)

        watchers: list[asyncio.Task[None]] = []

        def at_step_1(event: dict[str, Any]) -> None:
            if event["event"] == "started" and not killed:
                killed.append(event["experiment_id"])
                watchers.append(asyncio.create_task(kill_at_step_1(event["experiment_id"])))

        runner = bench.runner(prog, at_step_1)
        await runner.prepare(resume=True, operator=OPERATOR)
        summary = await ends(runner, asyncio.create_task(runner.run()))
        await asyncio.gather(*watchers)
        assert summary.state == "stopped", summary
        assert "died" in summary.stations["bench-a"]["reason"], summary.stations
        j = journal_of(bench)
        try:
            exp = j.experiment(killed[0])
            assert exp.state == "failed" and "died" in (exp.reason or ""), exp
            # step 1 waits for the plate to cool: on a cool plate it may be over before the kill
            assert "during step " in (exp.reason or ""), exp.reason
            assert j.campaign("death").state == "stopped"
        finally:
            j.close()

        # a new actor; killed as the resume takes the station, before its recovery
        await bench.new_actor()
        runner = bench.runner(prog, lambda e: None)
        preparing = asyncio.create_task(runner.prepare(resume=True, operator=OPERATOR))
        while True:
            lease = (await bench.actor.status.remote())["lease"]
            if lease["held"] and lease["epoch"] == runner.epoch:
                ray_session.kill(bench.actor, no_restart=True)
                break
            assert not preparing.done(), preparing
            await asyncio.sleep(0.005)
        async with asyncio.timeout(ENDS_S):
            await preparing
        summary = await ends(runner, asyncio.create_task(runner.run()))
        assert summary.state == "stopped", summary
        assert summary.stations["bench-a"]["state"] == "out", summary.stations

        # a new actor each time; killed during the claim (the proposal's dry run), then
        # between two experiments
        for kill_at in ("proposed", "finished"):
            await bench.new_actor()

            def kill(event: dict[str, Any], kind: str = kill_at) -> None:
                if event["event"] == kind:
                    ray_session.kill(bench.actor, no_restart=True)

            runner = bench.runner(prog, kill)
            await runner.prepare(resume=True, operator=OPERATOR)
            summary = await ends(runner, asyncio.create_task(runner.run()))
            assert summary.state == "stopped", (kill_at, summary)
            assert "died" in summary.stations["bench-a"]["reason"], (kill_at, summary)

        # a new actor: the resume runs the campaign to its budget
        await bench.new_actor()
        runner = bench.runner(prog, lambda e: None)
        await runner.prepare(resume=True, operator=OPERATOR)
        summary = await ends(runner, asyncio.create_task(runner.run()))
        assert summary.state == "done", summary
        j = journal_of(bench)
        try:
            exps = j.experiments("death")
            ran = [e for e in exps if e.state in ("done", "failed")]
            assert len(ran) == 4, exps  # the budget, the failed ones included
            failed = {e.id: e.reason or "" for e in ran if e.state == "failed"}
            assert killed[0] in failed, failed  # the trip's may have come after its end
            assert all("died" in why or "trip" in why for why in failed.values()), failed
            assert all(e.state in ("done", "failed", "cancelled", "rejected") for e in exps), exps
            for e in exps:  # nothing started twice, nothing re-run
                started = [t.step for t in j.transitions(e.id) if t.event == "step_started"]
                assert len(started) == len(set(started)), (e.id, started)
            assert j.campaign("death").state == "done"
        finally:
            j.close()


def hangs_at_the_outcome(when: str) -> Any:
    """A journal actor class whose first ``record_outcome`` never returns: ``"before"`` it
    reaches the journal, ``"after"`` it committed (the test kills the station there).
    Defined in a function: pickled by value for Ray's worker."""

    class HangsAtTheOutcome(JournalActor):
        def __init__(self, path: str, when: str) -> None:
            super().__init__(path)
            self.when, self.hung = when, False

        async def record_outcome(self, *args: Any, **kwargs: Any) -> Any:
            if self.hung:
                return await self._call("record_outcome", *args, **kwargs)
            if self.when == "after":
                await self._call("record_outcome", *args, **kwargs)
            self.hung = True
            await asyncio.Event().wait()  # until the station that asked is killed

        async def has_hung(self) -> bool:
            return self.hung

    return HangsAtTheOutcome


@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["after", "before"])
async def test_a_station_that_dies_after_its_last_step_keeps_the_measurement(
    ray_session: Any, tmp_path: Path, when: str
) -> None:
    """The station actor is killed after the experiment's last step was journaled with what
    it measured: with the outcome journaled (``after``) the live campaign records the
    result at once, marked recovered; measured but not verified yet (``before``) it stays
    running and the resume on a new actor verifies and records it. Never failed, never
    re-run."""
    async with ray_bench(ray_session, tmp_path, hangs_at_the_outcome(when), when) as bench:

        async def kill_once_hung() -> None:
            while True:
                if await bench.journal.has_hung.remote():
                    ray_session.kill(bench.actor, no_restart=True)
                    return
                await asyncio.sleep(0.01)

        runner = bench.runner(program(1), lambda e: None)
        await runner.prepare()
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(kill_once_hung(), 120)
        summary = await ends(runner, task)
        eid = next(e["experiment_id"] for e in bench.events if e["event"] == "started")
        j = journal_of(bench)
        try:
            exp = j.experiment(eid)
            measured = j.measured(eid)
        finally:
            j.close()
        assert measured is not None
        if when == "after":
            assert exp.state == "done", exp
            assert exp.objective == measured["measurements"][runner.program.objective.measure]
            assert RECOVERED_LIVE in (exp.reason or ""), exp.reason
            assert exp.result is not None and exp.result.get("recovered_after_death") is True
            assert summary.counts["done"] == 1 and summary.counts["failed"] == 0, summary
            assert [e["event"] for e in bench.events].count("finished") == 1
            return
        assert exp.state == "running", exp  # not failed: the resume verifies it
        assert summary.counts["failed"] == 0, summary
        assert "awaits recovery" in summary.stations["bench-a"]["reason"], summary.stations
        assert any(e["event"] == "measured" for e in bench.events)
        await bench.new_actor()
        runner = bench.runner(program(1), lambda e: None)
        await runner.prepare(resume=True, operator=OPERATOR)
        summary = await ends(runner, asyncio.create_task(runner.run()))
        assert summary.state == "done", summary
        j = journal_of(bench)
        try:
            exp = j.experiment(eid)
            steps = [t.step for t in j.transitions(eid) if t.event == "step_started"]
        finally:
            j.close()
        assert exp.state == "done" and RECOVERED in (exp.reason or ""), exp
        assert exp.objective == measured["measurements"][runner.program.objective.measure]
        assert len(steps) == len(set(steps)), steps  # never re-run
