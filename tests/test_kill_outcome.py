"""What a kill -9 of the campaign's process cannot take away (issue 12): a finished
experiment's measurement (its outcome journaled, or only measured with its last step),
and the budget use of a step that was acting; and what it can (an experiment cut
mid-recipe is closed failed, never re-run).

The owner runs in a subprocess with its station and journal in its own process
(:class:`~loops.stations.LocalStation`, :class:`~loops.journal.AsyncJournal`): the
kill takes them all. The simulated bench runs in this process. The owner's journal link
hangs at one chosen write (:data:`OWNER`'s ``Blocking``), which is where the test kills
it: a real ``kill -9`` at that exact moment, not a simulated one. What reached the bench
is read from the simulators' wire log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from reference import actuating, relaxed_staleness

from bridge.campaigns import lab_clock
from bridge.labconfig import LabConfig, load_lab
from bridge.reportdata import read_report_data, verification_text
from bridge.reporthtml import safety_html
from bridge.simbench import sim_lab_yaml
from loops.campaign import CampaignRunner, CampaignSummary
from loops.journal import AsyncJournal, Journal
from loops.program import load_program
from loops.recipe import build_recipe
from loops.stations import LocalStation, StationActor
from simulators.bench import SimulatedBench, SimulatedLab

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
SPEED = 500.0
#: 1.55 mL of dye, a short ramp and hold
PARAMS = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 30.0, "hold_s": 30}
BUDGET = "dye_ml_per_hour: {counts: vial.added, per: hour, max: 2.0, unit: mL}"

OWNER = """
import asyncio, dataclasses, json, logging, os, sys
from pathlib import Path
from bridge.campaigns import lab_clock
from bridge.labconfig import load_lab
from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import load_program
from loops.stations import LocalStation, StationActor

cfg = json.loads(sys.argv[1])
TARGET = getattr(Journal, cfg["block"])
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(name)s: %(message)s")


class Blocking:
    # The owner's journal link, which never returns from one call: the first that makes
    # the write cfg["block"] (at cfg["step"] if given), alone or in a batch (write_all):
    # "before" it reaches the journal, or "after" it committed. The test kills the
    # process there.
    def __init__(self, inner):
        self.inner, self.done = inner, False

    def call(self, fn, *args, **kwargs):
        writes = args[0] if fn is Journal.write_all else [(fn.__name__, args, kwargs)]
        for name, a, kw in writes:
            if name == TARGET.__name__ and not self.done and cfg.get("step") in (None, a[1]):
                self.done = True
                return self._hang(fn, args, kwargs, [a, kw])
        return self.inner.call(fn, *args, **kwargs)

    async def _hang(self, fn, args, kwargs, held):
        if cfg["when"] == "after":
            await self.inner.call(fn, *args, **kwargs)
        Path(cfg["held"]).write_text(json.dumps(held, default=repr))  # the write held
        print(f"hanging {cfg['when']} {TARGET.__name__}", flush=True)
        await asyncio.Event().wait()


async def main():
    lab = load_lab(cfg["lab"])
    st = lab.stations["bench-a"]
    os.environ.update(st.env)
    clock, now = lab_clock(lab)
    base = load_program(cfg["program"])
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=1),
        stop=dataclasses.replace(base.stop, target=None),
    )
    async with await AsyncJournal.open(lab.store) as inner:
        journal = Blocking(inner)
        actor = StationActor(
            "bench-a", list(st.instruments), Path(cfg["envelope"]).read_text(), clock=clock,
            supervisor_options=st.supervisor, journal=journal,
            verification={"enabled": cfg["verify"]},
        )
        await actor.start()
        for recipe in st.setup if cfg["verify"] else ():  # the camera's calibration, kept
            kept = await actor.run_setup(recipe.recipe.as_dict(), list(recipe.keep))
            st.setup_store.record(recipe, kept, who="kill-test")  # in the lab's setup file
        runner = CampaignRunner(
            program, journal, {"bench-a": LocalStation(actor)}, campaign_id=cfg["campaign"],
            clock_now=now, images_dir=Path(cfg["images"]),
        )
        await runner.prepare()
        assert (await runner.propose(cfg["params"], "agent:kill-test")).accepted
        await runner.run()
        print("the campaign ended: it was never blocked", flush=True)


asyncio.run(main())
"""


def envelope(lab: LabConfig, *, dye_per_hour: bool = False) -> str:
    """The bench's envelope with staleness limits of 10 s, not 2-3 (a monitor tripping on a
    starved poll of a loaded 2-core machine is not what this tests); ``dye_per_hour``: a
    dye budget of 2 mL per (simulated) hour instead of the day's."""
    text = lab.stations["bench-a"].envelope_text
    assert isinstance(text, str) and "dye_ml_per_day:" in text and "max_age_s: " in text
    return "\n".join(
        f"  {BUDGET}" if dye_per_hour and line.strip().startswith("dye_ml_per_day:") else line
        for line in relaxed_staleness(text).splitlines()
    )


def start_owner(cfg: dict[str, object], log: Path) -> subprocess.Popen[bytes]:
    """:data:`OWNER` in a Python subprocess, output to ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", OWNER, json.dumps(cfg)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def kill_owner_at(
    lab: LabConfig,
    tmp_path: Path,
    campaign: str,
    block: str,
    when: str,
    *,
    step: int | None = None,
    verify: bool = False,
    dye_per_hour: bool = False,
    settle_s: float = 0.0,
) -> Any:
    """Run :data:`OWNER` until it hangs at ``block`` (``when``: before/after the write),
    then (``settle_s`` later: a write not waited for lets the run go on) ``kill -9`` it;
    bounded. ``verify``: the station verifies (after its set-up, what it kept saved in
    the lab's setup file). Returns the held write's ``[args, kwargs]``."""
    text = tmp_path / "envelope.yaml"
    text.write_text(envelope(lab, dye_per_hour=dye_per_hour))
    cfg = {
        "lab": str(lab.source),
        "program": str(EXAMPLE),
        "envelope": str(text),
        "verify": verify,
        "images": str(lab.store.parent / "images"),
        "campaign": campaign,
        "params": PARAMS,
        "block": block,
        "when": when,
        "step": step,
        "held": str(tmp_path / f"{campaign}.held.json"),
    }
    log = tmp_path / f"{campaign}.log"
    proc = start_owner(cfg, log)
    try:
        deadline = time.monotonic() + 120
        while f"hanging {when} {block}" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(Path(str(cfg["held"])).read_text())


def new_station(
    lab: LabConfig, journal: AsyncJournal, text: str, *, verify: bool = False
) -> LocalStation:
    """A fresh station actor on the bench, as a resume or a restarted service makes one
    (``verify``: it verifies, with what the station's set-up kept in the lab's setup file)."""
    st = lab.stations["bench-a"]
    assert st.setup_store is not None
    actor = StationActor(
        "bench-a",
        list(st.instruments),
        text,
        clock=lab_clock(lab)[0],
        supervisor_options=st.supervisor,
        journal=journal,
        verification={"enabled": verify},
        setup=st.setup_store.values() if verify else None,
    )
    return LocalStation(actor)


def sim_lab(sim: SimulatedLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LabConfig:
    """The simulated lab's config (its journal in ``tmp_path``), its environment set here."""
    path = tmp_path / "lab.yaml"
    path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
    lab = load_lab(path)
    for key, value in lab.stations["bench-a"].env.items():
        monkeypatch.setenv(key, value)
    return lab


async def resume_one(lab: LabConfig, campaign: str, *, verify: bool = False) -> CampaignSummary:
    """``labbridge resume`` of a one-experiment campaign on a fresh station actor (as
    :data:`OWNER` runs it), to its end; the station closed after."""
    program = load_program(EXAMPLE)
    async with await AsyncJournal.open(lab.store) as journal:
        station = new_station(lab, journal, envelope(lab), verify=verify)
        await station.call(StationActor.start)
        try:
            runner = CampaignRunner(
                dataclasses.replace(
                    program,
                    budget=dataclasses.replace(program.budget, experiments=1),
                    stop=dataclasses.replace(program.stop, target=None),
                ),
                journal,
                {"bench-a": station},
                campaign_id=campaign,
                clock_now=lab_clock(lab)[1],
                images_dir=lab.store.parent / "images",
            )
            await runner.prepare(resume=True, operator="tester")
            return await runner.run()
        finally:
            await station.call(StationActor.stop)


def step_of(recipe: Any, kind: str, **params: Any) -> int:
    """The index of the recipe's (a journaled ``Recipe.as_dict()``) first ``kind`` step with
    ``params``."""
    return next(
        i
        for i, s in enumerate(recipe["steps"])
        if s["kind"] == kind and all(s.get(k) == v for k, v in params.items())
    )


@pytest.mark.timeout(180)
async def test_a_finished_experiment_killed_before_its_result_is_recorded_once_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        lab = sim_lab(sim, tmp_path, monkeypatch)
        # every step ran and the station journaled the outcome; the owner dies before it
        # sees it (nothing of the run reached the campaign's books or the images folder)
        await kill_owner_at(lab, tmp_path, "kept", "record_outcome", "after", verify=True)
        images = lab.store.parent / "images"
        assert not images.exists() or not list(images.iterdir())
        with Journal(lab.store) as j:
            (exp,) = j.experiments("kept")
            outcome = j.outcome(exp.id)
            jpegs = j.outcome_images(exp.id)
        assert exp.state == "running" and outcome is not None and outcome["ok"]
        assert set(jpegs) == {"outcome", "reference"}, sorted(jpegs)
        value = outcome["measurements"]["delta_e2000"]
        verified = outcome["verification"]["verified"]
        assert isinstance(value, float) and isinstance(verified, bool)
        summary = await resume_one(lab, "kept")
    assert summary.counts["done"] == 1 and summary.counts["failed"] == 0, summary
    with Journal(lab.store) as j:
        done = j.experiment(exp.id)
        log = j.transitions(exp.id)
        verdicts = j.verdicts("kept", exp.id)
        left = j.outcome_images(exp.id)
        resumed = [t.data for t in j.campaign_log("kept") if (t.data or {}).get("resumed")]
    # recorded as the result it is: the same measurement, verified as it was verified
    assert done.state == "done" and done.objective == value, (done.state, done.reason)
    assert done.verified is verified
    assert done.result["recorded_on_resume"] and "images_missing" not in done.result
    states = [t.state for t in log if t.event == "state"]
    assert states == ["proposed", "checked", "queued", "running", "done"], states  # once
    assert [t.event for t in log].count("outcome") == 1
    assert resumed and resumed[0]["completed"] == [exp.id] and resumed[0]["interrupted"] == []
    assert len(verdicts) == len(outcome["audit"]) > 0  # the evidence, once
    assert left == {}  # on disk now, no longer in the journal
    for role, cited in done.result["images"].items():  # the JPEGs it cites, on disk
        data = Path(cited["path"]).read_bytes()
        assert (
            hashlib.sha256(data).hexdigest() == cited["sha256"] == outcome["images"][role]["sha256"]
        )
        assert data == jpegs[role]


def sensor_log(bench: SimulatedBench, monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """Every measurement the bench's colour sensor produces from now on: its sequence
    number -> ``(red, green, blue, clear, status)`` counts (the simulator's own
    ``sensor_counts``, observed, not replaced)."""
    world, produced = bench.world, {}
    counts = world.sensor_counts

    def observed(integration_ms: int) -> tuple[int, int, int, int, int]:
        out = counts(integration_ms)
        produced[world.sensor_seq] = out
        return out

    monkeypatch.setattr(world, "sensor_counts", observed)
    return produced


def after_resume(bench: SimulatedBench, since: float) -> tuple[list[Any], list[Any]]:
    """What reached the bench after ``since``: its actuating commands other than the waste
    pump's (the recovery's drain), and the waste pump's RUNs."""
    commands = [c for _, c in actuating(bench, since)]
    drains = [c for c in commands if str(c).strip() == "3RUN"]
    lights = [
        r.data
        for r in bench.world.wire.entries("enclosure")
        if r.real_t > since and (r.data.get("light") or {}).get("on") is True
    ]
    return [c for c in commands if c not in drains] + lights, drains


@pytest.mark.timeout(180)
async def test_a_finished_experiment_killed_before_its_outcome_is_journaled_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step ran, journaled with what the run measured; the owner dies while its
    station verifies (before the outcome reaches the journal). The resume verifies it on
    the recovering station, from the journal, and records it done: the sensor's
    measurement, told to the optimizer, nothing of the recipe on the wire again."""
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        bench = sim.stations[0]
        lab = sim_lab(sim, tmp_path, monkeypatch)
        produced = sensor_log(bench, monkeypatch)
        held = await kill_owner_at(
            lab, tmp_path, "recovered", "record_outcome", "before", verify=True
        )
        with Journal(lab.store) as j:
            (exp,) = j.experiments("recovered")
            measured = j.measured(exp.id)
            steps = {
                t.step: t.data["data"] for t in j.transitions(exp.id) if t.event == "step_done"
            }
            jpegs = j.outcome_images(exp.id)
            assert j.outcome(exp.id) is None
        last = len(exp.recipe["steps"]) - 1
        assert exp.state == "running" and measured is not None and measured["ok"]
        assert sorted(steps) == list(range(last + 1))  # every step ran and was recorded done
        assert set(jpegs) == {"outcome", "reference"}, sorted(jpegs)
        dead = held[0][1]  # what the dead owner's station was about to add: its verification
        assert set(dead) == {"verification"}, sorted(dead)

        t_resume = time.monotonic()
        summary = await resume_one(lab, "recovered", verify=True)
        recipe_again, drains = after_resume(bench, t_resume)
        assert after_resume(bench, 0.0)[0], "the recipe's commands are not seen on the wire"

    assert summary.counts["done"] == 1 and summary.counts["failed"] == 0, summary
    with Journal(lab.store) as j:
        done = j.experiment(exp.id)
        log = j.transitions(exp.id)
        campaign = j.campaign("recovered")
        events = j.campaign_log("recovered")
        verdicts = j.verdicts("recovered", exp.id)
        left = j.outcome_images(exp.id)
    # the measurement is the one the sensor produced, and the one the steps recorded
    value = done.result["measurements"]["delta_e2000"]
    assert done.state == "done" and done.objective == value, (done.state, done.reason)
    assert value == steps[step_of(exp.recipe, "compute", into="delta_e2000")]["delta_e2000"]
    counts = done.result["measurements"]["counts"]
    assert counts == steps[step_of(exp.recipe, "call", into="counts")]["counts"]
    sensed = produced[counts["seq"]]
    assert (counts["red"], counts["green"], counts["blue"], counts["clear"]) == sensed[:4]
    # verified on the recovering station as the dead owner's station had verified it
    assert done.result["verification"] == dead["verification"]
    assert done.verified is dead["verification"]["verified"]
    assert done.result["recovered_on_resume"] and "recovered on resume" in (done.reason or "")
    with Journal(lab.store) as j:  # and the report says so
        report = read_report_data(j, "recovered")
    assert "recovered on resume" in verification_text(done)
    assert f"recovered {exp.id}" in "".join(safety_html(report))
    states = [t.state for t in log if t.event == "state"]
    assert states == ["proposed", "checked", "queued", "running", "done"], states  # once
    assert [t.event for t in log].count("measured") == 1
    (outcome,) = [t for t in log if t.event == "outcome"]  # journaled by the recovering station
    assert outcome.data["data"]["recovered_on_resume"] is True
    (resumed,) = [t.data for t in events if (t.data or {}).get("resumed")]
    assert resumed["recovered"] == [exp.id], resumed
    assert resumed["interrupted"] == [] and resumed["completed"] == []
    # told to the optimizer like any outcome
    state = campaign.optimizer_state
    assert exp.id in state["told"]
    (told,) = state["optimizer"]["observations"]
    assert told["value"] == value and told["status"] == ("ok" if done.verified else "untrusted")
    # the evidence, the images on disk
    assert len(verdicts) == len(measured["audit"]) > 0
    assert left == {}
    for role, cited in done.result["images"].items():
        assert Path(cited["path"]).read_bytes() == jpegs[role]
    # the station went through its recovery; nothing of the recipe reached the bench again
    recovered = [t for t in events if t.event == "station" and t.t > resumed_t(events)]
    assert [t.data["station_state"] for t in recovered] == ["recovered"], recovered
    assert drains, "the recovery drained nothing"
    assert recipe_again == [], recipe_again


def resumed_t(events: list[Any]) -> float:
    """When the (first) resume was journaled."""
    return next(t.t for t in events if (t.data or {}).get("resumed"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["red dispense", "last step"])
async def test_an_experiment_cut_mid_recipe_by_a_kill_is_closed_failed_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The owner dies with a step acting (its ``step_done`` not journaled): the red dye's
    dispense, or the recipe's last step (every step acted, the last not recorded done).
    The resume closes the experiment failed with the step that was in progress, after the
    station's recovery, and never runs a step of it again."""
    recipe = build_recipe(load_program(EXAMPLE), PARAMS)
    step = (
        step_of(recipe.as_dict(), "call", instrument="red", command="dispense")
        if where == "red dispense"
        else len(recipe.steps) - 1
    )
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        bench = sim.stations[0]
        lab = sim_lab(sim, tmp_path, monkeypatch)
        # a step's done record goes to disk with the next step's start (the last one's alone)
        block, at = ("step_done", step) if where == "last step" else ("step_started", step + 1)
        await kill_owner_at(lab, tmp_path, "cut", block, "before", step=at)
        t_resume = time.monotonic()
        summary = await resume_one(lab, "cut")
        recipe_again, drains = after_resume(bench, t_resume)
        assert after_resume(bench, 0.0)[0], "the recipe's commands are not seen on the wire"
    assert summary.counts["failed"] == 1 and summary.counts["done"] == 0, summary
    with Journal(lab.store) as j:
        (exp,) = j.experiments("cut")
        log = j.transitions(exp.id)
        measured = j.measured(exp.id)
        campaign = j.campaign("cut")
        events = j.campaign_log("cut")
    assert measured is None
    starts = [t for t in log if t.event.startswith("step")]
    assert starts[-1].event == "step_started"
    if where == "last step":
        # the starts of the steps after the last one that waits (the drain: the wait for the
        # pump, the read of what it drained, the light switched off) are queued for the
        # last step's record, which the kill stopped: the journal has the drain in progress
        # (loops/stationwrites.py: a kill loses only such records; nothing of them re-runs)
        drain = step_of(recipe.as_dict(), "call", instrument="waste", command="withdraw")
        assert drain <= starts[-1].step <= step, starts[-1]
        step = starts[-1].step
    assert exp.state == "failed" and f"interrupted at step {step}" in (exp.reason or ""), exp
    (interrupted,) = [t for t in log if t.state == "interrupted"]
    assert f"step {step} was in progress" in interrupted.data["reason"], interrupted.data
    (resumed,) = [t.data for t in events if (t.data or {}).get("resumed")]
    assert resumed["interrupted"] == [exp.id] and resumed["recovered"] == [], resumed
    assert exp.id in campaign.optimizer_state["told"]
    assert drains, "the recovery drained nothing"
    assert recipe_again == [], recipe_again


@pytest.mark.timeout(180)
async def test_a_kill_that_loses_the_record_of_a_step_that_only_made_the_bench_safer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heater switched off is a step the station does not wait for (it only makes the
    bench safer: loops/stationrun.step_waits): its start is on its way to the journal,
    held there, while it acts; the owner dies at the next step that waits for its record.
    The journal shows an earlier step in progress: the resume closes the experiment
    failed with that step, recovers the station through its safe state (where the heater
    is off anyway), and runs nothing of the recipe again."""
    recipe = build_recipe(load_program(EXAMPLE), PARAMS).as_dict()
    off = step_of(recipe, "call", instrument="hotplate", command="set_heater", args={"on": False})
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        bench = sim.stations[0]
        lab = sim_lab(sim, tmp_path, monkeypatch)
        await kill_owner_at(lab, tmp_path, "safer", "step_started", "before", step=off, settle_s=1)
        assert not bench.world.hotplate.heater_enabled  # it acted, its record held
        with Journal(lab.store) as j:
            (exp,) = j.experiments("safer")
            started = [t.step for t in j.transitions(exp.id) if t.event == "step_started"]
        assert started and started[-1] < off, started  # its record never reached the journal
        t_resume = time.monotonic()
        summary = await resume_one(lab, "safer")
        recipe_again, drains = after_resume(bench, t_resume)
    assert summary.counts["failed"] == 1 and summary.counts["done"] == 0, summary
    with Journal(lab.store) as j:
        exp = j.experiment(exp.id)
    assert exp.state == "failed" and f"interrupted at step {started[-1]}" in (exp.reason or "")
    assert drains, "the recovery drained nothing"
    assert recipe_again == [], recipe_again
    assert not bench.world.hotplate.heater_enabled


@pytest.mark.timeout(180)
async def test_the_dye_of_a_dispense_cut_by_a_kill_counts_in_the_restored_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = load_program(EXAMPLE)
    recipe = build_recipe(program, PARAMS)
    red = next(
        i
        for i, s in enumerate(recipe.steps)
        if s.kind == "call"
        and s.params["instrument"] == "red"
        and s.params["command"] == "dispense"
    )
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        lab = sim_lab(sim, tmp_path, monkeypatch)
        pumps = sim.stations[0].world.wire
        ran_before = len([r for r in pumps.entries("pumps") if str(r.data).strip() == "0RUN"])
        # the red pump was told to dispense 0.7 mL; the owner dies before the step is
        # recorded done (the consumption the guard counted is in no journal write yet)
        await kill_owner_at(  # its done record would go with the next step's start
            lab, tmp_path, "cut", "step_started", "before", step=red + 1, dye_per_hour=True
        )
        runs = [r for r in pumps.entries("pumps") if str(r.data).strip() == "0RUN"]
        assert len(runs) == ran_before + 1, "the red pump never ran"
        with Journal(lab.store) as j:
            (exp,) = j.experiments("cut")
            events = [(t.event, t.step) for t in j.transitions(exp.id)]
            reserved = j.consumption("bench-a", reserved=True)
            recorded = j.consumption("bench-a", reserved=False)
        assert events[-1] == ("step_started", red), events
        assert [(r, a) for r, a, _, _ in reserved] == [("vial.added", 0.7), ("red.delivered", 0.7)]
        assert not [row for row in recorded if row[0] == "vial.added"], recorded
        assert [row[0] for row in recorded] == ["experiments"], recorded  # with 'running'

        # a new actor (a resume, a restarted service) counts the 0.7 mL: 1.55 more is refused
        async with await AsyncJournal.open(lab.store) as journal:
            station = new_station(lab, journal, envelope(lab, dye_per_hour=True))
            await station.call(StationActor.start)
            try:
                budgets = await station.call(StationActor.budgets, {"vial.added": 1.55})
                dye = next(b for b in budgets if b["name"] == "dye_ml_per_hour")
                assert dye["used"] == pytest.approx(0.7) and not dye["ok"], dye
                violations = await station.call(StationActor.dry_run, recipe.as_dict())
                assert {v["rule"] for v in violations} == {"budget.dye_ml_per_hour"}, violations
            finally:
                await station.call(StationActor.stop)
