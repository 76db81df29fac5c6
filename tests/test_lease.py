"""Nothing acts without a live owner (issue 12): station leases, owner epochs, fencing.

The kill -9 test runs a campaign's owner (a :class:`~loops.campaign.CampaignRunner`) in a
subprocess that joins the session's Ray; the simulated bench runs in this process and
the station and journal actors are this process's, so nothing but the lease stops the
station when the owner dies (Ray's own clean-up of a dead driver's actors does not
apply). What reached the bench is read from the simulators' wire log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from reference import actuating, relaxed_staleness

from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal, StaleOwner
from loops.program import load_program
from loops.raylinks import ray_links, start_journal_actor, start_station_actor
from loops.stationlease import LEASE_S, POLL_S, RENEW_S, Lease, LeaseHeld, OwnerLost
from loops.stations import ClockSpec, LocalStation, ScaledClock, StationActor, StationError
from safety.envelopeload import REFERENCE_BENCH
from simulators.bench import SimulatedBench, SimulatedLab

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
#: a slow enough bench that the experiment's heating ramp lasts ~15 real seconds (the
#: fencing bound is ~5 s)
SPEED = 20.0
#: a long experiment: the ramp to 75 degC takes 300 simulated s at the envelope's 10 degC/min
LONG = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 75.0, "hold_s": 600}
#: slack on top of the fencing bound for a loaded 2-core machine (scheduling, Ray calls)
MARGIN_S = 1.5

OWNER = """
import asyncio, dataclasses, json, sys
import ray
from loops.campaign import CampaignRunner
from loops.program import load_program
from loops.raylinks import init_ray, ray_links
from loops.stations import ClockSpec, ScaledClock

cfg = json.loads(sys.argv[1])

async def main() -> None:
    init_ray(cfg["address"], namespace=cfg["namespace"], log_to_driver=False)
    journal = ray.get_actor(cfg["journal"])
    station = ray.get_actor(cfg["station"])
    base = load_program(cfg["program"])
    program = dataclasses.replace(base, budget=dataclasses.replace(base.budget, experiments=1))
    link, stations = ray_links(journal, {cfg["bench"]: station})
    clock = ScaledClock(ClockSpec(cfg["speed"], tuple(cfg["sim_at_real"])))
    runner = CampaignRunner(
        program, link, stations, campaign_id="lease", clock_now=clock.now,
        lease_s=cfg.get("lease_s", 5.0),
    )
    await runner.prepare()
    print("owner epoch", runner.epoch, flush=True)
    receipt = await runner.propose(cfg["params"], "agent:lease-test")
    assert receipt.accepted, receipt
    await runner.run()

asyncio.run(main())
"""


def start_owner(cfg: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    """The campaign's owner: :data:`OWNER` in a Python subprocess, output to ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", OWNER, json.dumps(cfg)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def test_a_lease_runs_out_and_an_older_epoch_is_refused() -> None:
    lease = Lease("bench-a")
    lease.check(None)  # never leased: unfenced (a tool, labbridge setup)
    lease.take("owner-1", 1, ttl_s=0.05)
    lease.check(1)
    with pytest.raises(StaleOwner, match="without the owner's epoch"):
        lease.check(None)
    while lease.expire() is None:  # runs out on its own: nobody renews it
        time.sleep(0.01)
    assert lease.timed_out and "owner lost: owner-1 (epoch 1)" in (lease.lost or "")
    with pytest.raises(OwnerLost, match="owner lost"):
        lease.check(1)
    with pytest.raises(OwnerLost, match="higher epoch"):  # a lost epoch stays lost
        lease.take("owner-1", 1)
    lease.take("owner-2", 2, ttl_s=60)  # a new owner takes the station
    with pytest.raises(StaleOwner, match="epoch 2 .owner-2. owns it"):
        lease.take("owner-1", 1)
    with pytest.raises(LeaseHeld, match="leased by owner-2 .epoch 2. for"):  # owner-2 is live
        lease.take("owner-3", 3)
    with pytest.raises(StaleOwner):
        lease.check(1)
    lease.release(2)
    assert not lease.held and not lease.timed_out and lease.lost == "released by owner-2"
    lease.take("owner-3", 3)  # released: the next owner takes it at once
    with pytest.raises(ValueError, match="epoch"):
        lease.take("x", 0)
    with pytest.raises(ValueError, match="lease length"):
        lease.take("x", 3, ttl_s=float("nan"))


def test_a_restarted_owner_takes_a_live_lease_over_and_the_old_epoch_is_refused() -> None:
    """Lease.take_over (docs/cluster.md, "When the service restarts"): only a live lease of
    the epoch named moves; the old epoch is refused from then on; another owner cannot renew
    a lease at its epoch."""
    lease = Lease("bench-a")
    lease.take("service-1", 4, ttl_s=60)
    with pytest.raises(LeaseHeld, match="cannot renew another owner's lease"):
        lease.take("intruder", 4)
    with pytest.raises(StaleOwner, match="epoch 4's"):  # another campaign's epoch
        lease.take_over("service-2", 3, 5, ttl_s=60)
    with pytest.raises(ValueError, match="take-over epoch"):
        lease.take_over("service-2", 4, 4, ttl_s=60)
    out = lease.take_over("service-2", 4, 5, ttl_s=60)
    assert out["owner"] == "service-2" and out["epoch"] == 5 and out["held"], out
    with pytest.raises(StaleOwner, match="epoch 5 .service-2. owns it"):  # the old owner: fenced
        lease.take("service-1", 4)
    with pytest.raises(StaleOwner):
        lease.check(4)
    lease.check(5)
    lease.take("service-2", 5, ttl_s=0.05)  # renewed by its new owner, then left to run out
    while lease.expire() is None:
        time.sleep(0.01)
    with pytest.raises(OwnerLost, match="no longer live"):  # beyond the lease: no take-over
        lease.take_over("service-3", 5, 6, ttl_s=60)
    assert lease.epoch == 5 and not lease.held  # unchanged: the station tripped on its own


def test_the_journal_fences_progress_writes_of_an_older_owner(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        j.create_campaign("c", "n", "program")
        assert j.take_ownership("c", "first") == 1
        eid = j.propose("c", {"x": 1}, "optimizer")
        j.transition(eid, "checked")
        j.transition(eid, "queued", station="s")
        j.transition(eid, "running", epoch=1)
        j.step_started(eid, 0, {"call": "x"}, epoch=1)
        assert j.take_ownership("c", "second") == 2
        assert j.owner("c")["owner"] == "second"
        with pytest.raises(StaleOwner, match="epoch 1 refused; epoch 2 .second."):
            j.step_done(eid, 0, {}, epoch=1)
        with pytest.raises(StaleOwner):
            j.step_started(eid, 1, {}, epoch=1)
        j.step_done(eid, 0, {}, epoch=2)
        assert [t.event for t in j.transitions(eid)][-2:] == ["step_started", "step_done"]
        j.step_started(eid, 1, {}, epoch=2)
        j.step_done(eid, 1, {}, epoch=2)
        # every write an owner makes is fenced: the old owner's outcome, result, state...
        stale: list[Any] = [
            lambda: j.record_outcome(eid, {"ok": True}, epoch=1),
            lambda: j.finish(eid, {"x": 1}, 1.0, epoch=1),
            lambda: j.fail(eid, "old owner", epoch=1),
            lambda: j.propose("c", {"x": 2}, "optimizer", epoch=1),
            lambda: j.save_optimizer_state("c", {"version": 1}, epoch=1),
            lambda: j.set_campaign_state("c", "stopped", reason="old owner", epoch=1),
            lambda: j.station_event("c", "s", "out", "old owner", epoch=1),
            lambda: j.record_evidence(eid, verdicts=[{"command": {}}], epoch=1),
            lambda: j.resume("c", epoch=1),
        ]
        before = (len(j.campaign_log("c")), j.campaign("c").state)
        for write in stale:
            with pytest.raises(StaleOwner):
                write()
        assert (len(j.campaign_log("c")), j.campaign("c").state) == before
        j.record_outcome(eid, {"ok": True}, epoch=2)
        j.finish(eid, {"x": 1}, 1.0, epoch=2)
        # epochs are the journal's: another campaign's owner outranks every owner before
        j.create_campaign("d", "n", "program")
        assert j.take_ownership("d", "third") == 3 and j.owner("c")["epoch"] == 2


async def test_a_campaign_runner_fenced_by_a_newer_owner_writes_nothing(tmp_path: Path) -> None:
    """Two owners of one campaign: once the second took over (resume), every journal write
    of the first (a proposal, the optimizer's state, a claim) is refused."""
    base = load_program(EXAMPLE)
    program = dataclasses.replace(base, budget=dataclasses.replace(base.budget, experiments=2))
    params = {**LONG, "temperature_c": 40.0, "hold_s": 60}

    def idle_station() -> LocalStation:  # never opened: leases only, nothing reaches a bench
        return LocalStation(StationActor("bench-a", [], "channels: {}\n"))

    async with await AsyncJournal.open(tmp_path / "journal.db") as journal:
        first = CampaignRunner(program, journal, {"bench-a": idle_station()}, campaign_id="two")
        await first.prepare()
        second = CampaignRunner(program, journal, {"bench-a": idle_station()}, campaign_id="two")
        try:
            await second.prepare(resume=True, operator="tester")
            assert (first.epoch, second.epoch) == (1, 2)
            owner = await journal.call(Journal.owner, "two")
            assert owner["epoch"] == 2 and f"pid {os.getpid()}" in str(owner["owner"])
            before = len(await journal.call(Journal.campaign_log, "two"))
            with pytest.raises(StaleOwner):
                await first.propose(params, "agent:old-owner")
            with pytest.raises(StaleOwner):  # its first claim journals a proposal: refused
                await first.run()
            assert len(await journal.call(Journal.campaign_log, "two")) == before
            assert await journal.call(Journal.experiments, "two") == []
            receipt = await second.propose(params, "agent:new-owner")  # the owner's are taken
            assert not receipt.accepted and "no station" in receipt.reasons[0]  # (out: unopened)
            assert len(await journal.call(Journal.experiments, "two")) == 1
        finally:
            second.stop("test: done")
            await second.run()


@dataclasses.dataclass
class LeasedBench:
    """A simulated bench, its journal and station actors (this process's Ray), and how an
    owner subprocess (:data:`OWNER`) reaches them."""

    bench: SimulatedBench
    spec: ClockSpec
    journal: Any
    station: Any
    cfg: dict[str, Any]
    store: Path


@contextlib.asynccontextmanager
async def leased_bench(ray: Any, tmp_path: Path) -> AsyncIterator[LeasedBench]:
    tag = uuid.uuid4().hex[:8]
    store = tmp_path / "journal.db"
    async with SimulatedLab(speed=SPEED) as lab:
        bench = lab.stations[0]
        assert lab.bluez is not None
        spec = ClockSpec.of(bench.world.clock.now, SPEED)
        journal = start_journal_actor(store, actor_name=f"lease-journal-{tag}")
        station = start_station_actor(
            bench.name,
            [s.as_dict() for s in bench.instruments()],
            # staleness limits of 10 s, not 2-3: a monitor tripping on a starved poll while the
            # owner's Ray driver starts on a loaded 2-core machine is not what this tests
            relaxed_staleness(REFERENCE_BENCH.read_text(encoding="utf-8")),
            clock=spec,
            supervisor_options={
                "device_time_scale": SPEED,
                "poll_interval": 0.05,
                "safe_timeout": 2.0,
            },
            env={"DBUS_SYSTEM_BUS_ADDRESS": lab.bluez.address},
            journal=journal,
            actor_name=f"lease-station-{tag}",
        )
        try:
            await station.start.remote()
            cfg = {
                "address": ray.get_runtime_context().gcs_address,
                "namespace": ray.get_runtime_context().namespace,
                "journal": f"lease-journal-{tag}",
                "station": f"lease-station-{tag}",
                "bench": bench.name,
                "program": str(EXAMPLE),
                "params": LONG,
                "speed": spec.speed,
                "sim_at_real": list(spec.sim_at_real),
            }
            yield LeasedBench(bench, spec, journal, station, cfg, store)
            await station.stop.remote()
            await journal.close.remote()
        finally:
            for actor in (station, journal):
                ray.kill(actor, no_restart=True)
            for actor in (station, journal):
                deadline = time.monotonic() + 10.0
                while True:
                    try:
                        await actor.__ray_ready__.remote()
                    except ray.exceptions.RayActorError:
                        break
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)


async def ramp_begun(setup: LeasedBench, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the owner's experiment has begun its heating ramp (~15 real s of
    setpoints ahead)."""
    deadline = time.monotonic() + 60
    while not [c for _, c in actuating(setup.bench, 0.0) if c[0] == 0]:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
async def test_kill_9_of_the_owner_stops_the_station_within_the_fencing_bound(
    ray_session: Any, tmp_path: Path
) -> None:
    log = tmp_path / "owner.log"
    proc: subprocess.Popen[bytes] | None = None
    bound = LEASE_S + 2 * POLL_S
    try:
        async with leased_bench(ray_session, tmp_path) as setup:
            bench, station, journal = setup.bench, setup.station, setup.journal
            proc = start_owner(setup.cfg, log)
            await ramp_begun(setup, proc, log)
            os.kill(proc.pid, signal.SIGKILL)
            t_kill, wall_kill = time.monotonic(), time.time()
            proc.wait()
            before = len(actuating(bench, 0.0))
            # the station trips by itself: safe state, latched, the lost owner named; it
            # closes then (instruments and bench let go)
            deadline = time.monotonic() + 30
            while not (status := await station.status.remote())["tripped"]:
                assert time.monotonic() < deadline, "the station never tripped after the kill"
                await asyncio.sleep(0.05)
            t_trip = time.monotonic()
            assert "owner lost: campaign lease" in status["trip"]["reason"], status["trip"]
            assert not status["lease"]["held"]
            await asyncio.sleep(2.0)  # anything still on its way arrives meanwhile
            bench.world.advance()
            assert not bench.world.hotplate.heater_enabled
            assert not bench.world.hotplate.stirrer_enabled
            late = actuating(bench, t_kill)
            worst = max((t - t_kill for t, _ in late), default=0.0)
            print(
                f"fencing bound {bound:.2f} s (+{MARGIN_S} s slack); trip {t_trip - t_kill:.2f} s "
                f"after the kill; last actuating command {worst:.2f} s after it "
                f"({len(late)} after, {before} before)"
            )
            assert worst <= bound + MARGIN_S, late
            status = await station.status.remote()
            assert not status["open"] and "owner lost" in status["closed"], status
            # fencing: the lost epoch stays lost; a new owner takes over, the old is refused
            with pytest.raises(OwnerLost):
                await station.lease.remote("the dead owner", 1)
            epoch = await journal.take_ownership.remote("lease", "test: new owner")
            assert epoch == 2
            await station.lease.remote("test: new owner", epoch, 30.0)
            status = await station.status.remote()  # open again, latched with the reason
            assert status["open"] and status["tripped"], status
            assert "reopened after: owner lost" in status["trip"]["reason"], status["trip"]
            with pytest.raises(StaleOwner):
                await station.lease.remote("the dead owner", 1)
            with pytest.raises(StaleOwner):
                await station.run.remote("x", {"steps": []}, "optimizer", epoch=1)
            await station.release.remote(epoch)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    # nothing was journaled as the experiment's progress after the owner's lease ran out
    with Journal(setup.store) as j:
        (exp,) = j.experiments("lease")
        steps = [t for t in j.transitions(exp.id) if t.event.startswith("step")]
        assert steps, "the experiment never started"
        assert all(t.t <= wall_kill + bound + MARGIN_S for t in steps), [
            (t.event, t.step, round(t.t - wall_kill, 2)) for t in steps
        ]
        assert exp.state == "running"  # the owner died: resume closes it, never re-runs it


@pytest.mark.timeout(150)
async def test_a_resume_while_the_old_owner_is_alive_takes_over_only_once_its_lease_is_over(
    ray_session: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old owner is stopped (SIGSTOP), not dead, when the resume starts: the resume
    waits until the old lease has run out (the station trips: the old experiment stops)
    before it acts, and the old owner, woken up, can neither write nor act."""
    log = tmp_path / "owner.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        async with leased_bench(ray_session, tmp_path) as setup:
            bench, station = setup.bench, setup.station
            proc = start_owner(setup.cfg, log)
            await ramp_begun(setup, proc, log)
            os.kill(proc.pid, signal.SIGSTOP)  # alive, holding its lease until it runs out
            t_stop = time.monotonic()
            held = await station.status.remote()
            assert held["lease"]["held"] and held["lease"]["epoch"] == 1, held["lease"]
            link, stations = ray_links(setup.journal, {bench.name: station})
            base = load_program(EXAMPLE)
            program = dataclasses.replace(
                base, budget=dataclasses.replace(base.budget, experiments=1)
            )
            clock = ScaledClock(setup.spec)
            runner = CampaignRunner(
                program, link, stations, campaign_id="lease", clock_now=clock.now
            )
            seen: list[tuple[int | None, str]] = []  # (lease epoch, trip reason) over time

            taken: list[float] = []  # when epoch 2 was first seen

            async def watch() -> None:
                while True:
                    st = await station.status.remote()
                    seen.append((st["lease"]["epoch"], (st.get("trip") or {}).get("reason", "")))
                    if st["lease"]["epoch"] == 2 and not taken:
                        taken.append(time.monotonic())
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch())
            try:
                with caplog.at_level(logging.WARNING, logger="loops.campaignlease"):
                    await runner.prepare(resume=True, operator="tester")
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            t_took = time.monotonic()
            assert runner.epoch == 2
            waited = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
            assert waited and "leased by campaign lease" in waited[0], caplog.text
            # the old lease ran out and the station tripped BEFORE epoch 2 took it: seen as
            # epoch 1 tripped "owner lost" by the watcher, or (a loaded machine may delay the
            # watcher past that moment) in epoch 2's first status: closed or reopened latched
            # with that trip
            first_new = next(i for i, (epoch, _) in enumerate(seen) if epoch == 2)
            lost = [i for i, (epoch, why) in enumerate(seen) if epoch == 1 and "owner lost" in why]
            reopened = "owner lost" in seen[first_new][1]
            # or the new owner took it once the old lease had run out, before the actor's
            # watcher (every POLL_S) declared it lost: never earlier than the lease allows
            # after the old owner's last renewal (at most RENEW_S before the SIGSTOP)
            ran_out = bool(taken) and taken[0] >= t_stop + LEASE_S - RENEW_S - POLL_S
            assert (lost and lost[0] < first_new) or reopened or ran_out, (seen, taken, t_stop)
            status = await station.status.remote()
            assert status["lease"]["epoch"] == 2 and status["lease"]["held"]
            summary = await runner.run()  # the budget's one experiment is the interrupted one
            assert summary.counts["failed"] == 1, summary
            with Journal(setup.store) as j:
                (exp,) = j.experiments("lease")
                events = [
                    (t.data or {}).get("station_state")
                    for t in j.campaign_log("lease")
                    if t.event == "station"
                ]
                rows_before = len(j.campaign_log("lease"))
            assert exp.state == "failed" and "never re-run" in (exp.reason or ""), exp.reason
            assert "recovered" in events, events
            # on the wire: after the old lease ended nothing of the old experiment acted; the
            # only actuating command since is the recovery's drain (the waste pump)
            trip_wire = [
                r.real_t
                for r in bench.world.wire.entries("hotplate")
                if r.real_t > t_stop
                and isinstance(r.data, dict)
                and r.data.get("address") == 2
                and 0 in list(r.data.get("values") or [])
            ]
            assert trip_wire, "the station never switched the heater off"
            after = [c for _, c in actuating(bench, trip_wire[0])]
            assert [c for c in after if not str(c).strip().startswith("3")] == [], after
            print(
                f"resume took over {t_took - t_stop:.2f} s after SIGSTOP (lease {LEASE_S:g} s); "
                f"actuating commands after the trip: {len(after)} (the drain)"
            )
            # the old owner wakes up: fenced, it writes nothing and stops
            os.kill(proc.pid, signal.SIGCONT)
            t_cont = time.monotonic()
            deadline = time.monotonic() + 60
            while proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.1)
            text = log.read_text()
            assert proc.returncode != 0 and "StaleOwner" in text, text[-3000:]
            with Journal(setup.store) as j:
                assert len(j.campaign_log("lease")) == rows_before
            assert not [c for t, c in actuating(bench, t_cont)], actuating(bench, t_cont)
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


@pytest.mark.timeout(120)
async def test_a_second_actor_on_a_bench_waits_until_the_first_lets_it_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two station actors for one bench (a fresh Ray per run, an actor left behind): the
    second opens the bench only once the first let it go (its lease was lost: it tripped
    and closed), and refuses, naming the holder, while the first keeps it."""
    async with SimulatedLab(speed=500.0) as lab:
        bench = lab.stations[0]
        assert lab.bluez is not None
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", lab.bluez.address)
        spec = ClockSpec.of(bench.world.clock.now, 500.0)
        specs = [s.as_dict() for s in bench.instruments()]
        envelope = relaxed_staleness(REFERENCE_BENCH.read_text(encoding="utf-8"))

        def actor(wait_s: float) -> StationActor:
            return StationActor(
                bench.name,
                specs,
                envelope,
                clock=spec,
                supervisor_options={"device_time_scale": 500.0, "poll_interval": 0.05},
                bench_wait_s=wait_s,
            )

        first, second = actor(1.0), actor(60.0)
        await first.start()
        try:
            with pytest.raises(StationError, match="no lease: open outside a campaign"):
                await actor(0.3).start()  # held, and never let go: refused, holder named
            await first.lease("owner that dies", 1, ttl_s=0.5)  # and is never renewed
            opened = await second.start()  # waits: the first trips, closes, lets go
            status = await first.status()
            assert not status["open"] and "owner lost: owner that dies" in status["closed"]
            assert opened["open"] and not opened["tripped"]
            with pytest.raises(StationError, match=f"pid {os.getpid()}"):
                await first.lease("new owner", 2)  # it would open again: the bench is taken
        finally:
            await second.stop()
            await first.stop()
