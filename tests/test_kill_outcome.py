"""What a kill -9 of the campaign's process cannot take away (issue 12): a finished
experiment's measurement, and the budget use of a step that was acting.

The owner runs in a subprocess with its station and journal in its own process
(:class:`~loops.stations.LocalStation`, :class:`~loops.journal.AsyncJournal`): the
kill takes them all. The simulated bench runs in this process. The owner's journal link
hangs at one chosen write (:data:`OWNER`'s ``Blocking``), which is where the test kills
it: a real ``kill -9`` at that exact moment, not a simulated one.
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

import pytest
from reference import relaxed_staleness

from bridge.campaigns import lab_clock
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import sim_lab_yaml
from loops.campaign import CampaignRunner
from loops.journal import AsyncJournal, Journal
from loops.program import load_program
from loops.recipe import build_recipe
from loops.stations import LocalStation, StationActor
from simulators.bench import SimulatedLab

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
    # The owner's journal link, which never returns from one write (the first call of
    # cfg["block"], at cfg["step"] if given): "before" it reaches the journal, or "after"
    # it committed. The test kills the process there.
    def __init__(self, inner):
        self.inner, self.done = inner, False

    def call(self, fn, *args, **kwargs):
        if fn is TARGET and not self.done and cfg.get("step") in (None, args[1]):
            self.done = True
            return self._hang(fn, args, kwargs)
        return self.inner.call(fn, *args, **kwargs)

    async def _hang(self, fn, args, kwargs):
        if cfg["when"] == "after":
            await self.inner.call(fn, *args, **kwargs)
        print(f"hanging {cfg['when']} {fn.__name__}", flush=True)
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
        for recipe in st.setup if cfg["verify"] else ():  # the camera's calibration
            await actor.run_setup(recipe.recipe.as_dict(), list(recipe.keep))
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
) -> None:
    """Run :data:`OWNER` until it hangs at ``block`` (``when``: before/after the write),
    then ``kill -9`` it; bounded. ``verify``: the station verifies (after its set-up)."""
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
    }
    log = tmp_path / f"{campaign}.log"
    proc = start_owner(cfg, log)
    try:
        deadline = time.monotonic() + 120
        while f"hanging {when} {block}" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def new_station(lab: LabConfig, journal: AsyncJournal, text: str) -> LocalStation:
    """A fresh station actor on the bench, as a resume or a restarted service makes one."""
    st = lab.stations["bench-a"]
    actor = StationActor(
        "bench-a",
        list(st.instruments),
        text,
        clock=lab_clock(lab)[0],
        supervisor_options=st.supervisor,
        journal=journal,
    )
    return LocalStation(actor)


@pytest.mark.timeout(180)
async def test_a_finished_experiment_killed_before_its_result_is_recorded_once_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SimulatedLab(stations=1, speed=SPEED) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        for key, value in lab.stations["bench-a"].env.items():
            monkeypatch.setenv(key, value)
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

        program = load_program(EXAMPLE)
        async with await AsyncJournal.open(lab.store) as journal:
            station = new_station(lab, journal, envelope(lab))
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
                    campaign_id="kept",
                    clock_now=lab_clock(lab)[1],
                    images_dir=images,
                )
                await runner.prepare(resume=True, operator="tester")
                summary = await runner.run()
            finally:
                await station.call(StationActor.stop)
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
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        for key, value in lab.stations["bench-a"].env.items():
            monkeypatch.setenv(key, value)
        pumps = sim.stations[0].world.wire
        ran_before = len([r for r in pumps.entries("pumps") if str(r.data).strip() == "0RUN"])
        # the red pump was told to dispense 0.7 mL; the owner dies before the step is
        # recorded done (the consumption the guard counted is in no journal write yet)
        await kill_owner_at(
            lab, tmp_path, "cut", "step_done", "before", step=red, dye_per_hour=True
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
