"""Budgets and counters are durable (issue 12): what a station's safety budgets consumed is
journaled and restored when a new station actor starts (a resume, a restarted service),
and a campaign that would exceed a budget's window is refused, saying when it allows more.

Stations and journal in this process (:class:`~loops.stations.LocalStation`,
:class:`~loops.journal.AsyncJournal`) on a simulated bench; the bench's envelope has a
dye budget per simulated hour (7.2 real seconds at this speed), or a rate of experiments
per hour. (The budget use of a step cut by a kill: tests/test_kill_outcome.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import pytest
from reference import ObservedJournal, relaxed_staleness

from bridge.campaigns import lab_clock
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import sim_lab_yaml
from loops.campaign import BudgetWindow, CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import Program, load_program
from loops.recipe import build_recipe
from loops.stationledger import budget_status, window_text
from loops.stations import LocalStation, StationActor
from safety.envelopeload import reference_envelope
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


def new_actor(lab: LabConfig, journal: AsyncJournal, budget: str = BUDGET) -> LocalStation:
    """A fresh station actor on the bench, as a resume or a restarted service makes one;
    ``budget`` replaces the envelope's budgets (staleness limits of 10 s, not 2-3: a monitor
    tripping on a starved poll of a loaded 2-core machine is not what this tests)."""
    st = lab.stations["bench-a"]
    text = st.envelope_text
    assert isinstance(text, str) and "dye_ml_per_day:" in text and "max_age_s: " in text
    lines = relaxed_staleness(text).splitlines()
    envelope = "\n".join(
        f"  {budget}" if line.strip().startswith("dye_ml_per_day:") else line
        for line in lines
        if not line.strip().startswith("experiments_per_hour:")
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


def test_a_budget_says_when_its_window_allows_more() -> None:
    envelope = reference_envelope()  # 30 experiments per hour, 50 mL of dye per day
    ledger = envelope.ledger
    for minute in range(30):  # one experiment a minute, 1.5 mL each, from t = 0
        ledger.consume("experiments", 1, 60.0 * minute)
        ledger.consume("vial.added", 1.5, 60.0 * minute)
    now = 1800.0
    status = {b["name"]: b for b in budget_status(envelope, now, speed=2.0, wall=1000.0)}
    rate, dye = status["experiments_per_hour"], status["dye_ml_per_day"]
    assert rate["used"] == 30 and not rate["ok"]
    assert rate["frees_at"] == pytest.approx(3600.0, abs=0.5)  # the first leaves the hour
    assert rate["frees_at_wall"] == pytest.approx(1000.0 + (3600.0 - now) / 2.0, abs=0.5)
    assert dye["used"] == 45 and dye["ok"]  # 5 mL left: something fits
    text = window_text(rate, wall=1000.0)
    assert "budget experiments_per_hour: 30 of 30 used in the last hour" in text, text
    assert "its window allows another experiment at " in text and "(in 15 min 0 s)" in text
    # 10 mL do not fit in the day's 5 mL left: 1.5 mL leave per minute from t = 86400 on
    (dye,) = [
        b
        for b in budget_status(envelope, now, asks={"vial.added": 10.0}, wall=0.0)
        if b["name"] == "dye_ml_per_day"
    ]
    assert not dye["ok"] and dye["frees_at"] == pytest.approx(86400.0 + 3 * 60.0, abs=0.5)
    assert "10 mL more at" in window_text(dye)
    (never,) = [
        b
        for b in budget_status(envelope, now, asks={"vial.added": 60.0})
        if b["name"] == "dye_ml_per_day"
    ]
    assert never["frees_at"] is None and "never fits" in window_text(never)


@pytest.mark.timeout(150)
async def test_a_rate_of_experiments_survives_a_restart_and_a_resume_waits_for_its_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One experiment per (simulated) hour: the second is refused on the station; a new
    actor (a resume, a restarted service) restores the count, and the resume is refused
    with when the window allows the next one, until it does."""
    rate = "experiments_per_hour: 1"
    base = load_program(EXAMPLE)
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=2),
        stop=dataclasses.replace(base.stop, target=None),
    )
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        now = lab_clock(lab)[1]
        for key, value in lab.stations["bench-a"].env.items():
            monkeypatch.setenv(key, value)
        async with await AsyncJournal.open(lab.store) as journal:
            first = new_actor(lab, journal, rate)
            await first.call(StationActor.start)
            try:
                runner = CampaignRunner(
                    program, journal, {"bench-a": first}, campaign_id="rate", clock_now=now
                )
                await runner.prepare()
                assert (await runner.propose(PARAMS, "agent:rate-test")).accepted
                summary = await runner.run()  # the second experiment is refused: 1 per hour
            finally:
                await first.call(StationActor.stop)
            assert summary.counts["done"] == 1 and summary.counts["cancelled"] == 1, summary
            assert "experiments_per_hour" in summary.stations["bench-a"]["reason"], summary
            started = [r for r in await journal.call(Journal.consumption, "bench-a")]
            assert [r[0] for r in started].count("experiments") == 1, started

            second = new_actor(lab, journal, rate)  # the restart: the count is restored
            await second.call(StationActor.start)
            try:
                owner = await journal.call(Journal.owner, "rate")
                rows = len(await journal.call(Journal.campaign_log, "rate"))
                resume = CampaignRunner(
                    program, journal, {"bench-a": second}, campaign_id="rate", clock_now=now
                )
                with pytest.raises(BudgetWindow) as refused:
                    await resume.prepare(resume=True, operator="tester")
                text = str(refused.value)
                assert "campaign rate resumes on no station now" in text, text
                assert "budget experiments_per_hour: 1 of 1 used in the last hour" in text, text
                assert "its window allows another experiment at" in text, text
                # refused before anything: no new owner, nothing journaled
                assert await journal.call(Journal.owner, "rate") == owner
                assert len(await journal.call(Journal.campaign_log, "rate")) == rows
                # once the hour since the first experiment has passed, the resume runs
                (budget,) = await second.call(StationActor.budgets)
                deadline = time.monotonic() + 60
                while now() <= budget["frees_at"]:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                resume = CampaignRunner(
                    program, journal, {"bench-a": second}, campaign_id="rate", clock_now=now
                )
                await resume.prepare(resume=True, operator="tester")
                summary = await resume.run()
            finally:
                await second.call(StationActor.stop)
            assert summary.counts["done"] == 2, summary


def vols_before_runs(bench: Any, since: float) -> list[Any]:
    """The red pump's (address 0) last ``0VOL<x>`` before each of its ``0RUN`` on the wire."""
    out, last = [], None
    for r in bench.world.wire.entries("pumps"):
        text = str(r.data).strip()
        if r.real_t <= since or r.note:
            continue
        if re.fullmatch(r"0VOL[0-9.]+(ML|UL)", text):
            last = r
        elif text == "0RUN" and last is not None:
            out.append(last)
    return out


@pytest.mark.timeout(120)
async def test_a_set_up_that_dispenses_has_each_dispense_reserved_on_disk_before_the_pump_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set-up recipes (the reference camera calibration dispenses red dye) are not
    experiments, but a kill in the middle of one must not leave dye uncounted either:
    each dispense's reservation is journaled before its pump RUN reaches the wire."""
    from loops.setup import REFERENCE_SETUP, load_setup

    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        bench = sim.stations[0]
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        for key, value in lab.stations["bench-a"].env.items():
            monkeypatch.setenv(key, value)
        async with await AsyncJournal.open(lab.store) as journal:
            observed = ObservedJournal(journal)
            actor = new_actor(
                lab,
                observed,  # type: ignore[arg-type]  # a JournalLink by its call()
                budget="dye_ml_per_day: {counts: vial.added, per: day, max: 50, unit: mL}",
            )
            await actor.call(StationActor.start)
            try:
                setup = load_setup(REFERENCE_SETUP)
                t0 = time.monotonic()
                await actor.call(StationActor.run_setup, setup.recipe.as_dict(), list(setup.keep))
            finally:
                await actor.call(StationActor.stop)
            runs = [
                r.real_t
                for r in bench.world.wire.entries("pumps")
                if r.real_t > t0 and not r.note and str(r.data).strip() == "0RUN"  # red: 0
            ]
            dye = [(t, rows) for t, rows in observed.reservations if rows[0][0] == "vial.added"]
            assert runs and len(dye) >= len(runs), (runs, observed.reservations)
            for run_t in runs:  # the latest reservation before each RUN is a dispense's
                before = [t for t, _ in dye if t < run_t]
                assert before, f"a red pump RUN at {run_t:.3f} with no dye reserved before it"
            with Journal(lab.store) as j:  # and when the set-up ended, nothing stays reserved
                assert j.consumption("bench-a", reserved=True) == []
                counted = sum(a for r, a, _, _ in j.consumption("bench-a") if r == "vial.added")
            # what the pumps were told to dispense, read back from the wire: each RUN moves the
            # volume of the last VOL before it (the pump protocol), in mL
            asked = sum(
                float(v[:-2]) * {"ML": 1.0, "UL": 1e-3}[v[-2:]]
                for v in (str(r.data).strip()[4:] for r in vols_before_runs(bench, t0))
            )
            assert asked > 0 and counted == pytest.approx(asked, abs=0.01), (counted, asked)
