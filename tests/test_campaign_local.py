"""A campaign with no Ray: the stations and the journal in this process, behind the same links.

The campaign loop depends on two small Protocols (:class:`~loops.stations.StationLink`,
:class:`~loops.journal.JournalLink`); this runs it over their in-process
implementations (:class:`~loops.stations.LocalStation` around a real
:class:`~loops.stations.StationActor` on a simulated bench, and an
:class:`~loops.journal.AsyncJournal`), with the real drivers, guard and journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.campaigns import lab_clock
from bridge.labconfig import load_lab
from bridge.simbench import sim_lab_yaml
from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import load_program
from loops.stations import LocalStation, StationActor
from simulators.bench import SimulatedLab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"


@contextlib.asynccontextmanager
async def local_campaign(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    experiments: int,
    on_event: Callable[[dict[str, Any]], None],
) -> AsyncIterator[tuple[CampaignRunner, Any, dict[str, Any], Any]]:
    """A campaign of the colour-match example (``experiments``, no target) on one simulated
    station, in this process; yields the runner, the lab, the station's status once it
    has stopped (filled in on the way out) and the simulated bench."""
    base = load_program(EXAMPLE)
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=experiments),
        stop=dataclasses.replace(base.stop, target=None),
    )
    end: dict[str, Any] = {}
    async with SimulatedLab(stations=1, speed=500.0) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        clock, now = lab_clock(lab)
        st = lab.stations["bench-a"]
        for key, value in st.env.items():  # what a station's own process would get
            monkeypatch.setenv(key, value)
        async with await AsyncJournal.open(lab.store) as journal:
            actor = StationActor(
                "bench-a",
                list(st.instruments),
                st.envelope_text,
                clock=clock,
                supervisor_options=st.supervisor,
                journal=journal,
                verification={"enabled": False},
            )
            station = LocalStation(actor)
            assert (await station.call(StationActor.start))["open"]
            try:
                yield (
                    CampaignRunner(
                        program,
                        journal,
                        {"bench-a": station},
                        campaign_id="local",
                        clock_now=now,
                        on_event=on_event,
                    ),
                    lab,
                    end,
                    sim.stations[0],
                )
            finally:
                end.update(await station.call(StationActor.stop))


@pytest.mark.timeout(180)
async def test_a_campaign_runs_in_process_through_the_local_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[dict[str, Any]] = []
    async with local_campaign(tmp_path, monkeypatch, 3, events.append) as (runner, lab, status, _):
        summary = await runner.run()
    assert not status["open"]
    assert summary.state == "done", summary
    assert summary.counts["run"] == 3 and summary.counts["done"] == 3, summary.counts
    assert summary.best is not None and summary.best["value"] >= 0
    assert [e["event"] for e in events].count("finished") == 3
    j = Journal(lab.store)
    try:
        exps = j.experiments("local")
        assert [e.state for e in exps] == ["done"] * 3
        for e in exps:  # every transition and every step journaled, by the station itself
            log = j.transitions(e.id)
            states = [t.state for t in log if t.event == "state"]
            assert states == ["proposed", "checked", "queued", "running", "done"], states
            started = [t.step for t in log if t.event == "step_started"]
            done = [t.step for t in log if t.event == "step_done"]
            assert started == done == list(range(len(e.recipe["steps"])))
            assert e.station == "bench-a" and e.objective is not None
        assert j.campaign("local").state == "done"
        assert set(j.campaign("local").optimizer_state["told"]) == {e.id for e in exps}
    finally:
        j.close()


@pytest.mark.timeout(60)
def test_the_campaign_loop_does_not_import_ray() -> None:
    code = "import sys, loops.campaign, loops.stations, loops.journal; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "loops.campaign/stations/journal pulled in Ray"


@pytest.mark.timeout(180)
async def test_a_pause_while_the_optimizer_is_asked_holds_that_experiment_until_the_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pause arrives while a station claims its next proposal (the optimizer's ask()
    is under way): that proposal waits, unrun, until the campaign is resumed."""
    events: list[dict[str, Any]] = []
    asking, release, proposed = threading.Event(), threading.Event(), asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "proposed":
            proposed.set()

    async with local_campaign(tmp_path, monkeypatch, 2, on_event) as (runner, lab, _, _):
        await runner.prepare()
        ask = runner.optimizer.ask

        def held_ask() -> Any:
            if not release.is_set():
                asking.set()
                release.wait(60)
            return ask()

        monkeypatch.setattr(runner.optimizer, "ask", held_ask)
        task = asyncio.create_task(runner.run())
        try:
            assert await asyncio.to_thread(asking.wait, 60)
            await runner.pause("ana")
            release.set()
            # the claim completes while paused: its proposal is journaled, and nothing starts
            await asyncio.wait_for(proposed.wait(), 60)
            await asyncio.sleep(1.0)
            assert not [e for e in events if e["event"] == "started"], events
            j = Journal(lab.store)
            try:
                (waiting,) = j.experiments("local")
                assert waiting.state == "checked"  # checked, back in the queue, not run
            finally:
                j.close()
            await runner.resume_running("ana")
            summary = await asyncio.wait_for(task, 120)
        finally:
            if not task.done():  # a failed assertion: the campaign ends, nothing left running
                await runner.abort("test over")
                await asyncio.gather(task, return_exceptions=True)
    assert summary.state == "done" and summary.counts["done"] == 2, summary
    started = [e["experiment_id"] for e in events if e["event"] == "started"]
    assert started[0] == waiting.id  # the held proposal ran first after the resume


@pytest.mark.timeout(180)
async def test_a_proposal_made_while_the_station_runs_is_checked_against_the_state_it_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent proposes while the only station holds 1.8 mL in its vial: the proposal's
    1.5 mL is checked against the emptied vial the running experiment leaves (its recipe
    drains it), not refused as an overfill of the vial as it is now; it runs next, and the
    vial never holds more than the envelope's 2.8 mL."""
    events: list[dict[str, Any]] = []
    fixed = {"temperature_c": 30.0, "hold_s": 600}
    async with local_campaign(tmp_path, monkeypatch, 2, events.append) as (runner, _, _, bench):
        await runner.prepare()
        first = await runner.propose(
            {"red_ml": 1.0, "green_ml": 0.8, "blue_ml": 0.0, **fixed}, "agent:alice"
        )
        assert first.accepted, first
        task = asyncio.create_task(runner.run())
        try:
            most = 0.0
            while (vial := bench.world.vial.volume_ml) < 1.7:  # the first one is under way
                assert not task.done(), task
                await asyncio.sleep(0.01)
            second = await runner.propose(
                {"red_ml": 0.5, "green_ml": 0.5, "blue_ml": 0.5, **fixed}, "agent:alice"
            )
            assert bench.world.vial.volume_ml > 1.0, "the first experiment ended too soon"
            assert second.accepted, (vial, second.reasons)
            while not task.done():
                most = max(most, bench.world.vial.volume_ml)
                await asyncio.sleep(0.01)
            summary = task.result()
        finally:
            if not task.done():
                await runner.abort("test over")
                await asyncio.gather(task, return_exceptions=True)
    assert summary.counts["done"] == 2, summary
    started = [e["experiment_id"] for e in events if e["event"] == "started"]
    assert started == [first.experiment_id, second.experiment_id]
    assert most <= 2.8, most
