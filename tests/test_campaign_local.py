"""A campaign with no Ray: the stations and the journal in this process, behind the same links.

The campaign loop depends on two small Protocols (:class:`~loops.stations.StationLink`,
:class:`~loops.journal.JournalLink`); this runs it over their in-process
implementations (:class:`~loops.stations.LocalStation` around a real
:class:`~loops.stations.StationActor` on a simulated bench, and an
:class:`~loops.journal.AsyncJournal`), with the real drivers, guard and journal.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
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


@pytest.mark.timeout(180)
async def test_a_campaign_runs_in_process_through_the_local_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = load_program(EXAMPLE)
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=3),
        stop=dataclasses.replace(base.stop, target=None),
    )
    events: list[dict[str, Any]] = []
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
                runner = CampaignRunner(
                    program,
                    journal,
                    {"bench-a": station},
                    campaign_id="local",
                    clock_now=now,
                    on_event=events.append,
                )
                summary = await runner.run()
            finally:
                status = await station.call(StationActor.stop)
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
