"""A resume within the lease takes a killed owner's station over live: its experiment
finishes (docs/cluster.md, "When the service restarts"; the short form of
tests/test_restart.py, without ``ray start`` or the service).

As in tests/test_lease.py, the simulated bench, its journal and station actors are this
process's (the session's Ray), and the campaign's owner runs in a subprocess
(:data:`test_lease.OWNER`, with a 30 s lease); it is killed with SIGKILL during its
experiment's heating ramp. A resume in this process, holding the campaign's lock (as
``labbridge resume`` and ``serve`` do), takes the station's lease over, adopts the
experiment still running and records its outcome: done once, each step started once, each
pump run once on the bench's wire, the station never tripped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from reference import actuating
from test_lease import EXAMPLE, leased_bench, ramp_begun, start_owner

import loops.stationrun
from loops.campaign import CampaignRunner, campaign_lock
from loops.journal import Journal, StaleOwner
from loops.program import load_program
from loops.raylinks import ray_links
from loops.stations import ScaledClock, StationActor

#: a shorter experiment than test_lease's: a 2-minute ramp (6 real s at 20x), a 1-minute hold
SHORT = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 45.0, "hold_s": 60}
#: the owner's lease (real s): the resume comes well within it
LEASE_S = 30.0


@pytest.mark.timeout(150)
async def test_a_resume_within_the_lease_takes_the_station_over_and_its_experiment_finishes(
    ray_session: Any, tmp_path: Path
) -> None:
    log = tmp_path / "owner.log"
    proc: subprocess.Popen[bytes] | None = None
    base = load_program(EXAMPLE)
    program = dataclasses.replace(base, budget=dataclasses.replace(base.budget, experiments=1))
    try:
        async with leased_bench(ray_session, tmp_path) as setup:
            proc = start_owner({**setup.cfg, "params": SHORT, "lease_s": LEASE_S}, log)
            await ramp_begun(setup, proc, log)
            os.kill(proc.pid, signal.SIGKILL)  # the owner dies mid-ramp
            proc.wait()
            t_kill = time.monotonic()
            link, stations = ray_links(setup.journal, {setup.bench.name: setup.station})
            runner = CampaignRunner(
                program,
                link,
                stations,
                campaign_id="lease",
                clock_now=ScaledClock(setup.spec).now,
                lease_s=LEASE_S,
            )
            with campaign_lock(setup.store, "lease"):  # free: its holder is dead
                runner.holds_campaign_lock = True
                await runner.prepare(resume=True, operator="tester")
                t_resumed = time.monotonic()
                taken = runner.taken_over[setup.bench.name]
                assert taken["running"] and taken["epoch"] == 2, taken
                summary = await runner.run()
            status = await setup.station.status.remote()
            runs = [c for _, c in actuating(setup.bench, 0.0) if isinstance(c, str)]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"taken over {t_resumed - t_kill:.1f} s after the kill (lease {LEASE_S:g} s)")
    assert t_resumed - t_kill < LEASE_S
    assert summary.state == "done" and summary.counts["done"] == 1, summary
    assert not status["tripped"] and status["runs"] == 1, status
    assert len(runs) == len(set(runs)) == 4, runs  # red, green, blue, waste: each ran once
    j = Journal(setup.store)
    try:
        (exp,) = j.experiments("lease")
        transitions = j.transitions(exp.id)
        rows = j.campaign_log("lease")
    finally:
        j.close()
    assert exp.id == taken["running"] and exp.state == "done", (exp.state, exp.reason)
    steps = [t.step for t in transitions if t.event == "step_started"]
    assert steps == sorted(set(steps)), steps  # each step started once, in order
    assert sum(t.event == "state" and t.state == "done" for t in transitions) == 1
    events = [(r.data["station"], r.data["station_state"]) for r in rows if r.event == "station"]
    assert events == [(setup.bench.name, "taken_over")], events


async def test_a_write_refused_as_the_old_epochs_waits_for_the_take_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The instant between the new owner's epoch in the journal and its take-over of the
    station: the running experiment's journal write, refused as the old epoch's, is written
    again with the new epoch once the take-over comes; without one, it fails as before."""
    monkeypatch.setattr(loops.stationrun, "TAKE_OVER_WAIT_S", 0.3)
    station = StationActor("bench-a", [], "reference")  # never opened: no bench needed
    station._lease.take("owner-1", 1, ttl_s=60)
    station._run_epoch = 1
    written: list[int | None] = []

    async def write(epoch: int | None) -> int | None:
        if epoch != 2:  # the journal's current epoch is 2
            raise StaleOwner(f"write from owner epoch {epoch} refused")
        written.append(epoch)
        return epoch

    later = asyncio.get_running_loop().call_later(
        0.05, lambda: asyncio.ensure_future(station.take_over("owner-2", 1, 2, 60.0))
    )
    assert await station._fenced(write) == 2 and written == [2]
    later.cancel()
    station._run_epoch = 1  # no take-over comes: refused, as without one
    station._epoch_moved.clear()
    station._lease.epoch = 1
    try:
        with pytest.raises(StaleOwner):
            await station._fenced(write)
    finally:
        await station.stop()  # its lease watch ends
