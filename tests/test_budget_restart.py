"""Budgets and counters are durable (issue 12): what a station's safety budgets consumed is
journaled and restored when a new station actor starts (a resume, a restarted service).

Stations and journal in this process (:class:`~loops.stations.LocalStation`,
:class:`~loops.journal.AsyncJournal`) on a simulated bench; the bench's envelope has a
dye budget per simulated hour (7.2 real seconds at this speed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from bridge.campaigns import lab_clock
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import sim_lab_yaml
from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import Program, load_program
from loops.recipe import build_recipe
from loops.stations import LocalStation, StationActor
from simulators.bench import SimulatedLab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
SPEED = 500.0
#: 1.55 mL of dye, a short ramp and hold
PARAMS = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 30.0, "hold_s": 30}
BUDGET = "dye_ml_per_hour: {counts: vial.added, per: hour, max: 2.0, unit: mL}"


def one_experiment(base: Program) -> Program:
    return dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=1),
        stop=dataclasses.replace(base.stop, target=None),
    )


def new_actor(lab: LabConfig, journal: AsyncJournal) -> LocalStation:
    """A fresh station actor on the bench, as a resume or a restarted service makes one."""
    st = lab.stations["bench-a"]
    text = st.envelope_text
    assert isinstance(text, str) and "dye_ml_per_day:" in text
    envelope = "\n".join(
        f"  {BUDGET}" if line.strip().startswith("dye_ml_per_day:") else line
        for line in text.splitlines()
    )
    actor = StationActor(
        "bench-a",
        list(st.instruments),
        envelope,
        clock=lab_clock(lab)[0],
        supervisor_options=st.supervisor,
        journal=journal,
    )
    return LocalStation(actor)


@pytest.mark.timeout(120)
async def test_a_spent_budget_survives_a_new_station_actor_until_its_window_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = one_experiment(load_program(EXAMPLE))
    recipe = build_recipe(program, PARAMS).as_dict()
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        now = lab_clock(lab)[1]
        for key, value in lab.stations["bench-a"].env.items():
            monkeypatch.setenv(key, value)
        async with await AsyncJournal.open(lab.store) as journal:
            # a campaign spends 1.55 mL of the 2 mL per hour
            first = new_actor(lab, journal)
            await first.call(StationActor.start)
            try:
                runner = CampaignRunner(
                    program, journal, {"bench-a": first}, campaign_id="spend", clock_now=now
                )
                await runner.prepare()
                assert (await runner.propose(PARAMS, "agent:budget-test")).accepted
                summary = await runner.run()
                assert summary.counts["done"] == 1, summary
                assert await first.call(StationActor.dry_run, recipe, "optimizer") != []
            finally:
                await first.call(StationActor.stop)
            spent: list[Any] = await journal.call(Journal.consumption, "bench-a")
            dye = [row for row in spent if row[0] == "vial.added"]
            assert sum(row[1] for row in dye) == pytest.approx(1.55, abs=0.01), spent
            assert [row for row in spent if row[0] == "experiments"], spent

            # a new actor (as resume would create) knows: the next experiment is refused
            second = new_actor(lab, journal)
            await second.call(StationActor.start)
            try:
                violations = await second.call(StationActor.dry_run, recipe, "optimizer")
                assert {v["rule"] for v in violations} == {"budget.dye_ml_per_hour"}, violations
                runner = CampaignRunner(
                    program, journal, {"bench-a": second}, campaign_id="next", clock_now=now
                )
                await runner.prepare()
                receipt = await runner.propose(PARAMS, "agent:budget-test")
                assert not receipt.accepted
                assert "dye_ml_per_hour" in " ".join(receipt.reasons), receipt
                runner.stop("test: budget checked")
                await runner.run()
                # once the hour since the dye went in has passed, the same recipe is allowed
                window_end = max(row[2] for row in dye) + 3600.0
                deadline = time.monotonic() + 60
                while now() <= window_end:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                assert await second.call(StationActor.dry_run, recipe, "optimizer") == []
            finally:
                await second.call(StationActor.stop)
