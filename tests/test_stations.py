"""Station actors on real Ray (the session's ``ray_session``): a StationActor placed by the
``station:bench-a`` resource opens a simulated bench over loopback, dry-runs and runs a
colour-match recipe, journals every step (through a JournalActor) before it acts, and
safe-states the bench on stop; a refused recipe never reaches the wire."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loops.journal import IllegalTransition, Journal
from loops.plan import Recipe, Step
from loops.program import Program, load_program
from loops.raylinks import start_journal_actor, start_station_actor
from loops.recipe import build_recipe
from loops.stations import (
    ClockSpec,
    ScaledClock,
    StationActor,
    StationError,
    StationNotOpen,
)
from safety.envelopeload import REFERENCE_BENCH
from simulators.bench import SimulatedLab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
SPEED = 100.0
PARAMS = {"red_ml": 0.5, "green_ml": 0.1, "blue_ml": 0.6, "temperature_c": 35.0, "hold_s": 30}


@pytest.fixture(scope="module")
def program() -> Program:
    return load_program(EXAMPLE)


@pytest.fixture
async def lab() -> AsyncIterator[SimulatedLab]:
    async with SimulatedLab(speed=SPEED) as lab:
        yield lab


def station_actor(lab: SimulatedLab, *, journal: Any = None, actor_name: str | None = None) -> Any:
    bench = lab.stations[0]
    assert lab.bluez is not None
    return start_station_actor(
        bench.name,
        [s.as_dict() for s in bench.instruments()],
        REFERENCE_BENCH.read_text(encoding="utf-8"),
        clock=ClockSpec.of(bench.world.clock.now, SPEED),
        supervisor_options={"device_time_scale": SPEED, "poll_interval": 0.05, "safe_timeout": 2.0},
        env={"DBUS_SYSTEM_BUS_ADDRESS": lab.bluez.address},
        journal=journal,
        actor_name=actor_name,
    )


async def shutdown(ray: Any, *actors: Any) -> None:
    """Kill the actors and wait until Ray reports them dead (their resources are free again)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    for actor in actors:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                await actor.__ray_ready__.remote()
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, f"{actor} still alive after ray.kill"
            await asyncio.sleep(0.05)


def test_clock_spec_rebuilds_the_simulated_clock() -> None:
    t0 = time.monotonic()
    spec = ClockSpec(50.0, (10.0, t0))
    clock = ScaledClock(spec)
    assert clock.now() == pytest.approx(10.0 + (time.monotonic() - t0) * 50.0, abs=0.05)
    assert clock.real_seconds(100.0) == 2.0
    with pytest.raises(ValueError, match="speed"):
        ClockSpec(0.0, (0.0, t0))
    # the plain class (before ray.remote) refuses to act before start()
    assert StationActor("x", [], "channels: {}\n").name == "x"


@pytest.mark.timeout(60)
async def test_station_actor_runs_a_journaled_experiment(
    ray_session: Any, lab: SimulatedLab, program: Program, tmp_path: Path
) -> None:
    ray = ray_session
    bench = lab.stations[0]
    world = bench.world
    recipe = build_recipe(program, PARAMS)
    path = tmp_path / "journal.sqlite"
    journal = start_journal_actor(path)
    actor = station_actor(lab, journal=journal)
    try:
        await journal.create_campaign.remote("c1", "color-match", program.as_dict())
        eid = await journal.propose.remote("c1", PARAMS, "optimizer", recipe=recipe.as_dict())
        await journal.transition.remote(eid, "checked")
        await journal.transition.remote(eid, "queued", station=bench.name)

        status = await actor.start.remote()
        assert status["open"] and not status["tripped"] and "hotplate" in status["instruments"]
        where = await actor.placement.remote()
        assert where["resources"].get("station:bench-a") == 1.0
        assert where["node_ip"] == "127.0.0.1"
        assert ray.get_actor("station-bench-a") is not None

        assert await actor.dry_run.remote(recipe.as_dict(), "optimizer") == []
        out = await actor.run.remote(eid, recipe.as_dict(), "optimizer")
        assert out["ok"], out
        delta = out["measurements"]["delta_e2000"]
        assert isinstance(delta, float) and math.isfinite(delta)
        assert out["steps"] == len(recipe.steps)
        await journal.finish.remote(eid, out["result"], delta)

        world.advance()
        assert world.hotplate.heater_enabled is False and world.vial.volume_ml < 0.01
        status = await actor.stop.remote()
        assert not status["open"]
        world.advance()
        assert world.hotplate.heater_enabled is False and world.hotplate.stirrer_enabled is False
        assert world.enclosure.light_on is False
        await journal.close.remote()
    finally:
        await shutdown(ray, actor, journal)

    with Journal(path) as j:
        experiment = j.experiment(eid)
        assert experiment.state == "done" and experiment.station == bench.name
        assert experiment.objective == pytest.approx(delta)
        events = [
            (t.event, t.step, t.state) for t in j.transitions(eid) if t.event.startswith("step")
        ]
        expected = [
            (event, i, "running")
            for i in range(len(recipe.steps))
            for event in ("step_started", "step_done")
        ]
        assert events == expected
        started = [t for t in j.transitions(eid) if t.event == "step_started"]
        assert [t.data["step"] for t in started if t.data] == [s.as_dict() for s in recipe.steps]
        states = [t.state for t in j.transitions(eid) if t.event == "state"]
        assert states == ["proposed", "checked", "queued", "running", "done"]


def call(instrument: str, command: str, **args: Any) -> Step:
    """A bound recipe step calling one declared command (loops/plan.py)."""
    return Step("call", {"instrument": instrument, "command": command, "args": args})


@pytest.mark.timeout(60)
async def test_a_refused_recipe_never_reaches_the_wire(ray_session: Any, lab: SimulatedLab) -> None:
    ray = ray_session
    world = lab.stations[0].world
    overfill = Recipe(
        (
            call("red", "dispense", volume_ml=1.5, rate_ml_min=5.0),
            call("blue", "dispense", volume_ml=1.5, rate_ml_min=5.0),
        )
    )
    actor = station_actor(lab, actor_name="station-bench-a-refusals")
    try:
        await actor.start.remote()
        before = len(world.wire.entries("pumps"))
        violations = await actor.dry_run.remote(overfill.as_dict(), "agent:7")
        assert [v["step"] for v in violations] == [1]
        assert violations[0]["rule"] == "vial.volume.max"
        assert violations[0]["command"]["who"] == "agent:7"
        out = await actor.run.remote("c1-0001", overfill.as_dict(), "agent:7")
        assert out["ok"] is False and out["rejected"] is True
        assert out["violations"][0]["rule"] == "vial.volume.max"
        # the supervisor's status polls go on (``0VOL`` queries: the wire is being recorded,
        # so what is absent is absent); no volume set, no RUN
        for _ in range(200):  # one poll after the refusal (bounded: a loaded machine)
            if len(world.wire.entries("pumps")) > before:
                break
            await asyncio.sleep(0.05)
        sent = [str(e.data) for e in world.wire.entries("pumps")[before:]]
        assert sent and not [x for x in sent if re.match(r"^\dRUN|^\dVOL[\d.]", x)], sent
        status = await actor.status.remote()
        assert status["runs"] == 1 and not status["tripped"] and not status["busy"]
        await actor.stop.remote()
    finally:
        await shutdown(ray, actor)
    world.advance()
    assert world.vial.volume_ml < 0.01


@pytest.mark.timeout(60)
async def test_a_failed_run_trips_the_station_and_is_never_retried(
    ray_session: Any, lab: SimulatedLab, tmp_path: Path
) -> None:
    ray = ray_session
    bench = lab.stations[0]
    world = bench.world
    recipe = Recipe(
        (
            call("hotplate", "set_stirrer", on=True, rpm=300),
            call("red", "dispense", volume_ml=0.3, rate_ml_min=1.0),
            call("red", "wait_until_stopped", timeout=60.0, poll_interval=0.05),
            call("hotplate", "set_stirrer", on=False),
        )
    )
    path = tmp_path / "journal.sqlite"
    journal = start_journal_actor(path)
    actor = station_actor(lab, journal=journal, actor_name="station-bench-a-failures")
    try:
        await journal.create_campaign.remote("c2", "failures", {"name": "failures"})
        eid = await journal.propose.remote("c2", {"x": 1}, "agent:7", recipe=recipe.as_dict())
        await journal.transition.remote(eid, "checked")
        await journal.transition.remote(eid, "queued", station=bench.name)
        await actor.start.remote()
        # the red pump stalls as it starts (on_run: an alarm the pump had already would trip
        # the station on its declared red.alarm fault before the experiment began)
        bench.inject_fault("pump-alarm", pump="red", code="S", on_run=True)
        out = await actor.run.remote(eid, recipe.as_dict(), "agent:7")
        assert out["ok"] is False and out["rejected"] is False, out
        assert out["step"] == 1 and out["step_done"] is False  # the red dispense
        assert out["error_type"] == "DeviceAlarm" and "stalled" in out["error"]
        assert out["trip"] is not None and out["trip"]["station"] == bench.name
        status = await actor.status.remote()
        assert status["tripped"] and not status["busy"]
        world.advance()
        assert world.hotplate.stirrer_enabled is False  # the trip safe-stated the bench
        # latched: a second run is refused by the guard before any step acts
        bench.clear_fault("pump-alarm")
        again = await actor.run.remote(eid, recipe.as_dict(), "agent:7")
        assert again["ok"] is False and again["refused"] is True and "latched" in again["error"]
        await journal.fail.remote(eid, out["error"])
        with pytest.raises(IllegalTransition, match="can only start while running"):
            await journal.step_started.remote(eid, 9)  # journal errors cross Ray with their type
        await actor.reset.remote("operator:ada", "pump checked")
        assert not (await actor.status.remote())["tripped"]
        await actor.stop.remote()
        await journal.close.remote()
    finally:
        await shutdown(ray, actor, journal)
    with Journal(path) as j:
        steps = [(t.event, t.step) for t in j.transitions(eid) if t.event.startswith("step")]
        assert steps[-1] == ("step_started", out["step"])  # started, never done, never re-run
        assert len([s for s in steps if s[0] == "step_started"]) == out["step"] + 1
        assert j.experiment(eid).state == "failed"


@pytest.mark.timeout(90)
async def test_set_up_recipes_run_through_the_guard_and_keep_their_results(
    ray_session: Any, lab: SimulatedLab
) -> None:
    from loops.setup import REFERENCE_SETUP, load_setup
    from safety import SafetyError

    ray = ray_session
    bench = lab.stations[0]
    world = bench.world
    reference = load_setup(REFERENCE_SETUP)
    actor = station_actor(lab, actor_name="station-bench-a-setup")
    try:
        await actor.start.remote()
        # refused by the dry run: nothing reaches the pumps
        overfill = Recipe((call("red", "dispense", volume_ml=5.0, rate_ml_min=5.0),), name="prime")
        before = len(world.wire.entries("pumps"))
        with pytest.raises(SafetyError, match=r"(?s)set-up prime refused: .*vial.volume.max"):
            await actor.run_setup.remote(overfill.as_dict(), [])
        sent = [str(e.data) for e in world.wire.entries("pumps")[before:]]
        assert not [x for x in sent if re.match(r"^\dRUN|^\dVOL[\d.]", x)], sent
        # the reference bench's camera calibration, as data: frames at known volumes, fitted
        kept = await actor.run_setup.remote(reference.recipe.as_dict(), list(reference.keep))
        cal = kept["calibration"]
        assert cal["format"] == "labbridge.vision.calibration/1"
        assert cal["fill"]["volumes_ml"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
        world.advance()
        assert world.vial.volume_ml < 0.01 and not world.enclosure.light_on  # drained, dark
        # a set-up that fails after acting trips the station (safe state) and says where
        broken = Recipe(
            (
                call("enclosure", "set_light", on=True, intensity=0.5),
                Step("capture", {"instrument": "camera", "role": "empty"}),
                Step(
                    "compute",
                    {
                        "into": "calibration",
                        "function": "fit_fill_calibration",
                        "args": {"frames": "images", "volumes_ml": "levels"},
                        "inputs": {"levels": [0.0, 1.0]},
                    },
                ),
            ),
            name="camera-calibration",
        )
        with pytest.raises(
            StationError, match="(?s)set-up camera-calibration failed: .*1 frames for 2 volumes"
        ):
            await actor.run_setup.remote(broken.as_dict(), ["calibration"])
        status = await actor.status.remote()
        assert status["tripped"] and not status["busy"]
        world.advance()
        assert not world.enclosure.light_on  # the trip turned it off
        await actor.stop.remote()
    finally:
        await shutdown(ray, actor)


@pytest.mark.timeout(60)
async def test_a_trip_during_a_wait_stops_the_recipe_there(
    ray_session: Any, lab: SimulatedLab, tmp_path: Path
) -> None:
    """An e-stop (or a campaign abort) while the recipe waits: the recipe stops at once, so
    nothing of it acts again after the operator's reset."""
    ray = ray_session
    bench = lab.stations[0]
    recipe = Recipe(
        (
            call("hotplate", "set_stirrer", on=True, rpm=300),
            Step("hold", {"seconds": 600.0}),  # 6 s real at 100x
            call("red", "dispense", volume_ml=0.3, rate_ml_min=5.0),
            call("red", "wait_until_stopped", timeout=60.0, poll_interval=0.05),
            call("hotplate", "set_stirrer", on=False),
        )
    )
    path = tmp_path / "journal.sqlite"
    journal = start_journal_actor(path)
    actor = station_actor(lab, journal=journal, actor_name="station-bench-a-estop")
    try:
        await journal.create_campaign.remote("c3", "estop", {"name": "estop"})
        eid = await journal.propose.remote("c3", {"x": 1}, "operator:ada", recipe=recipe.as_dict())
        await journal.transition.remote(eid, "checked")
        await journal.transition.remote(eid, "queued", station=bench.name)
        await actor.start.remote()
        run = actor.run.remote(eid, recipe.as_dict(), "operator:ada")
        deadline = time.monotonic() + 20
        while (await journal.experiment.remote(eid)).step != 1:  # holding
            assert time.monotonic() < deadline, "the hold never started"
            await asyncio.sleep(0.02)
        await actor.trip.remote("e-stop pressed", "operator:ada")
        out = await asyncio.wait_for(run, 5)  # not after the remaining hold
        t_trip = time.monotonic()
        assert out["ok"] is False and out["step"] == 1, out
        assert out["error"] == (
            "ExperimentStopped: the station tripped during the experiment: e-stop pressed"
        )
        await actor.reset.remote("operator:ada", "checked the bench")
        await asyncio.sleep(8.0)  # longer than the hold was: a recipe still waiting would act now
        pumps = bench.world.wire.entries("pumps")
        assert pumps, "the pumps' wire log is empty"
        late = [r.data for r in pumps if r.real_t > t_trip and "RUN" in str(r.data)]
        assert late == [], late  # the dispense after the hold never happened
        assert all(p.phase != "running" for p in bench.world.pumps.values())
        await actor.stop.remote()
        await journal.close.remote()
    finally:
        await shutdown(ray, actor, journal)


@pytest.mark.timeout(30)
async def test_an_instrument_that_cannot_open_is_reported_with_its_url(ray_session: Any) -> None:
    ray = ray_session
    url = "serial:///nonexistent/ttyUSB9?baudrate=9600"
    actor = start_station_actor(
        "bench-b",
        [{"name": "red", "kind": "syringe-pump", "url": url, "role": "dye"}],
        REFERENCE_BENCH.read_text(encoding="utf-8"),
    )
    try:
        where = await actor.placement.remote()
        assert where["resources"].get("station:bench-b") == 1.0
        with pytest.raises(Exception, match="ttyUSB9") as err:
            await actor.start.remote()
        # TransportOpenError cannot be unpickled (its constructor takes url, message): it
        # crosses Ray as a StationError with the original type and message
        assert isinstance(err.value, StationError) and "TransportOpenError" in str(err.value)
        assert not (await actor.status.remote())["open"]
        with pytest.raises(StationNotOpen):
            await actor.dry_run.remote({"steps": []})
    finally:
        await shutdown(ray, actor)
