"""Recipes as data: the color-match builder, steps, JSON round trip, the commands a dry run sees,
and one recipe run end to end on a simulated station behind the safety layer."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from instruments.errors import DeviceAlarm
from instruments.registry import driver_class
from loops.program import Program, load_program
from loops.recipe import (
    COLOR_MATCH,
    RECIPES,
    Recipe,
    RecipeBuilder,
    RecipeError,
    Step,
    build_recipe,
    dry_run_recipe,
    ramp_setpoint,
    run_recipe,
)
from safety import Command, SafetyRefusal, dry_run, open_station, reference_envelope
from safety.effects import Layout
from simulators.bench import SimulatedLab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
PARAMS = {"red_ml": 0.5, "green_ml": 0.0, "blue_ml": 0.7, "temperature_c": 50.0, "hold_s": 120}
#: the reference station's instruments, as the dry run needs them
KINDS = {
    "red": "syringe-pump",
    "green": "syringe-pump",
    "blue": "syringe-pump",
    "waste": "syringe-pump",
    "hotplate": "hotplate",
    "color": "color-sensor",
    "enclosure": "enclosure",
    "camera": "camera",
}
#: ... their declared commands (instruments/declare.py) and the envelope's vessels
LAYOUT = Layout.of({n: driver_class(k) for n, k in KINDS.items()}, reference_envelope().vessels)
SPEED = 100.0


@pytest.fixture(scope="module")
def program() -> Program:
    return load_program(EXAMPLE)


def kinds(recipe: Recipe) -> list[str]:
    return [s.kind for s in recipe.steps]


def test_color_match_builder(program: Program) -> None:
    recipe = build_recipe(program, PARAMS)
    assert recipe.name == "color-match" and recipe.params == PARAMS
    assert kinds(recipe) == [
        "calibrate",
        "cool",
        "light",
        "capture",  # the reference frame, before anything is poured
        "dispense",
        "dispense",  # green_ml = 0: no dispense
        "wait_pumps",
        "stir",
        "heat",
        "hold",
        "measure",
        "capture",
        "heater_off",
        "stirrer_off",
        "drain",
        "light_off",
    ]
    steps = recipe.steps
    assert recipe.volumes() == {"red": 0.5, "blue": 0.7}
    assert steps[3].params == {"role": "reference"}
    assert steps[4].params == {"fluid": "red", "volume_ml": 0.5, "rate_ml_min": 5.0}
    assert steps[6]["fluids"] == ("red", "blue")
    assert steps[7]["rpm"] == 300
    assert steps[8].params == {"setpoint_c": 50.0, "from_c": 25.0, "rise_per_min": 10.0}
    assert steps[9]["seconds"] == 120.0
    assert steps[10]["target_lab"] == program.objective.target_lab
    assert steps[11].params == {"role": "outcome"}
    assert steps[14].params == {"volume_ml": 1.4, "rate_ml_min": 20.0}  # 1.2 mL + 0.2 margin
    text = str(recipe)
    assert "dispense red 0.5 mL at 5 mL/min" in text and "heat to 50 degC from 25 degC" in text


def test_builder_options_and_refusals(program: Program) -> None:
    # numpy proposals are accepted and become plain Python numbers
    proposal = {k: np.float64(v) for k, v in PARAMS.items()}
    recipe = build_recipe(program, proposal)
    assert recipe.params == PARAMS and type(recipe.params["hold_s"]) is int
    json.dumps(recipe.as_dict())
    # a white reference given: no calibrate step; no temperature: no cool/heat/heater_off
    data = program.as_dict()
    data["parameters"].pop("temperature_c")
    data["fixed"] = dict(data["fixed"], white=[38000, 41000, 36000])
    unheated = load_program(data)
    recipe = build_recipe(unheated, {k: v for k, v in PARAMS.items() if k != "temperature_c"})
    assert kinds(recipe)[0] == "light"
    assert not {"calibrate", "cool", "heat", "heater_off"} & set(kinds(recipe))
    measure = recipe.steps[kinds(recipe).index("measure")]
    assert measure["white"] == (38000.0, 41000.0, 36000.0)
    with pytest.raises(RecipeError, match="red_ml=1.5 mL is outside"):
        build_recipe(program, PARAMS | {"red_ml": 1.5})
    with pytest.raises(RecipeError, match="hold_s is missing"):
        build_recipe(program, {k: v for k, v in PARAMS.items() if k != "hold_s"})
    with pytest.raises(RecipeError, match="at least 0.3 mL"):
        build_recipe(program, PARAMS | {"red_ml": 0.1, "blue_ml": 0.1})
    # builders are passed in, not only looked up in the module's table
    echo = RecipeBuilder(
        "echo",
        lambda prog, inputs: Recipe((Step.of("hold", seconds=inputs["red_ml"]),)),
        inputs={name: None for name in program.space.names} | dict(COLOR_MATCH.inputs),
        measures=frozenset({"delta_e2000"}),
    )
    table = {**RECIPES, "echo": echo}
    custom = load_program(program.as_dict() | {"recipe": "echo"}, recipes=table)
    assert kinds(build_recipe(custom, PARAMS, builders=table)) == ["hold"]
    with pytest.raises(RecipeError, match="unknown recipe 'echo'"):
        build_recipe(custom, PARAMS)


def test_steps_validate_their_parameters() -> None:
    assert Step.of("heat", setpoint_c=np.float64(40)).params == {"setpoint_c": 40.0}
    with pytest.raises(RecipeError, match="unknown step kind 'boil'"):
        Step.of("boil")
    with pytest.raises(RecipeError, match="dispense has no parameter 'volume'"):
        Step.of("dispense", fluid="red", volume=1.0, rate_ml_min=5)
    with pytest.raises(RecipeError, match="dispense needs volume_ml"):
        Step.of("dispense", fluid="red", rate_ml_min=5)
    with pytest.raises(RecipeError, match=r"dispense.volume_ml must be a number > 0"):
        Step.of("dispense", fluid="red", volume_ml=0.0, rate_ml_min=5)
    with pytest.raises(RecipeError, match=r"stir.rpm must be an integer"):
        Step.of("stir", rpm=250.5)
    with pytest.raises(RecipeError, match=r"light.intensity must be a number in 0-1"):
        Step.of("light", intensity=1.5)
    with pytest.raises(RecipeError, match=r"measure.target_lab must be 3"):
        Step.of("measure", target_lab=[50, 0])
    with pytest.raises(RecipeError, match=r"white reference counts\) must be > 0"):
        Step.of("measure", white=[0, 1, 1])
    with pytest.raises(RecipeError, match=r"wait_pumps.fluids must be a non-empty list"):
        Step.of("wait_pumps", fluids="red")
    with pytest.raises(RecipeError, match="a mapping with a list of 'steps'"):
        Recipe.from_dict({"steps": "dispense"})


def test_json_round_trip(program: Program) -> None:
    recipe = build_recipe(program, PARAMS)
    text = json.dumps(recipe.as_dict())
    again = Recipe.from_dict(json.loads(text))
    assert again == recipe
    assert again.as_dict() == recipe.as_dict()
    assert json.loads(text)["steps"][6] == {"kind": "wait_pumps", "fluids": ["red", "blue"]}


def test_commands_for_the_dry_run(program: Program) -> None:
    recipe = build_recipe(program, PARAMS)
    commands = recipe.commands("optimizer")
    assert [str(c) for c in commands] == [
        "enclosure.set_light(on=True, intensity=0.6)",
        "red.dispense(volume_ml=0.5, rate_ml_min=5.0)",
        "blue.dispense(volume_ml=0.7, rate_ml_min=5.0)",
        "hotplate.set_stirrer(on=True, rpm=300)",
        "hotplate.set_heater(on=True, setpoint_c=25.0)",  # the ramp starts here ...
        "hotplate.set_heater(on=True, setpoint_c=50.0)",  # ... and ends at the setpoint
        "hotplate.set_heater(on=False)",
        "hotplate.set_stirrer(on=False)",
        "waste.withdraw(volume_ml=1.4, rate_ml_min=20.0)",
        "enclosure.set_light(on=False)",
    ]
    assert {c.who for c in commands} == {"optimizer"}
    times = recipe.command_times(1000.0, rise_per_min=10.0)
    assert len(times) == len(commands) and times == sorted(times)
    # dispenses start together; the ramp waits for the slower pump (0.7 mL at 5 mL/min = 8.4 s)
    assert times[1] == times[2] == 1000.0
    assert times[4] == pytest.approx(1008.4)
    assert times[5] == pytest.approx(1008.4 + 150.0)  # 25 degC at 10 degC/min
    assert times[6] == pytest.approx(1008.4 + 150.0 + 120.0)  # after the hold
    # the reference envelope: the final setpoint is a 25 degC rise, fine at the ramp's end,
    # refused when the dry run checks every command at one instant
    state = {"hotplate.setpoint_c": 25.0, "enclosure.lid": "closed"}
    report = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0, times=times)
    assert report.ok, str(report)
    at_once = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0)
    assert at_once.refused_steps == [5]
    assert at_once.violations[0].rule == "hotplate.setpoint_c.max_rise_per_min"
    # a recipe past the vial's capacity is refused at its dispense, whatever the timing
    overfill = Recipe(
        (
            Step.of("dispense", fluid="red", volume_ml=1.5, rate_ml_min=5),
            Step.of("dispense", fluid="blue", volume_ml=1.5, rate_ml_min=5),
        )
    )
    report = dry_run(
        overfill.commands("agent:7"),
        reference_envelope(),
        state,
        layout=LAYOUT,
        now=0.0,
        times=overfill.command_times(0.0),
    )
    assert report.refused_steps == [1] and report.violations[0].rule == "vial.volume.max"
    assert report.violations[0].command.who == "agent:7"


def sim_station(lab: SimulatedLab) -> Any:
    bench = lab.stations[0]
    return open_station(
        bench.name,
        [s.as_dict() for s in bench.instruments()],
        reference_envelope(),
        clock=bench.world.clock.now,
        supervisor_options={"device_time_scale": SPEED, "poll_interval": 0.05, "safe_timeout": 2.0},
    )


@pytest.mark.timeout(90)
async def test_run_recipe_on_a_simulated_station(program: Program) -> None:
    params = {"red_ml": 0.5, "green_ml": 0.1, "blue_ml": 0.6, "temperature_c": 35.0, "hold_s": 30}
    recipe = build_recipe(program, params)
    async with SimulatedLab(speed=SPEED) as lab, sim_station(lab) as station:
        bench = lab.stations[0]
        clock = bench.world.clock
        report = dry_run_recipe(recipe, station, who="optimizer", now=clock.now())
        assert report.ok, str(report)
        events: list[tuple[int, str, str, int]] = []

        async def on_step(index: int, step: Step, phase: str, data: dict[str, Any]) -> None:
            json.dumps(data)  # what a journal writes
            events.append((index, step.kind, phase, len(station.audit.records())))

        t0 = time.monotonic()
        result = await run_recipe(
            recipe,
            station,
            clock_sleep=clock.sleep,
            who="optimizer",
            on_step=on_step,
            clock_now=clock.now,
        )
        real_s = time.monotonic() - t0

        # on_step: before and after every step, in order
        expected = [
            (i, s.kind, phase) for i, s in enumerate(recipe.steps) for phase in ("started", "done")
        ]
        assert [e[:3] for e in events] == expected
        # "started" came before the step acted: the red dispense reached the guard after it
        records = station.audit.records()
        red = next(i for i, v in enumerate(records) if str(v.command).startswith("red.dispense"))
        started = next(e[3] for e in events if e[:3] == (4, "dispense", "started"))
        done = next(e[3] for e in events if e[:3] == (4, "dispense", "done"))
        assert started <= red < done
        assert not station.audit.records(allowed=False)
        assert {v.command.who for v in records} == {"optimizer"}

        m = result.measurements
        assert isinstance(m["delta_e2000"], float) and math.isfinite(m["delta_e2000"])
        assert m["target_lab"] == list(program.objective.target_lab or ())
        assert len(m["lab"]) == 3 and 0 < m["lab_l"] < 100
        assert m["counts"]["status"] == "ok" and m["counts"]["red"] < m["white"][0]
        for fluid, volume in recipe.volumes().items():
            assert m["dispensed_ml"][fluid] == pytest.approx(volume, abs=1e-3)
        assert set(m["dispensed_ml"]) == {"red", "green", "blue"}
        assert m["liquid_c"] is not None and m["liquid_c"] > 28.0  # heated towards 35 degC
        assert m["drained_ml"] == pytest.approx(1.4, abs=1e-3)
        assert result.image is not None and result.image[:2] == b"\xff\xd8"  # a JPEG
        assert m["image_bytes"] == len(result.image)
        assert result.reference_image is not None and result.reference_image[:2] == b"\xff\xd8"
        assert m["reference_sha256"] != m["image_sha256"]  # the scene before and after
        json.dumps(result.as_dict())
        assert len(result.durations) == len(recipe.steps)
        ramp = result.durations[kinds(recipe).index("heat")]
        assert ramp >= 55.0  # 10 degC at 10 degC/min, in simulated seconds
        assert result.elapsed_s >= 30.0 + 55.0 and real_s < 30.0
        # the vial was drained, the heater and stirrer are off
        world = bench.world
        world.advance()
        assert world.vial.volume_ml < 0.01
        assert world.hotplate.heater_enabled is False and world.hotplate.stirrer_enabled is False

        # a heat the envelope refuses (lid open) propagates as a refusal, after "started"
        bench.enclosure.set_lid("open")
        deadline = time.monotonic() + 10
        while station.state.view(prefer_measured=True).get("enclosure.lid") != "open":
            assert time.monotonic() < deadline, "the open lid was never read"
            await asyncio.sleep(0.02)
        events.clear()
        refused = Recipe((Step.of("stir", rpm=300), Step.of("heat", setpoint_c=40.0)))
        with pytest.raises(SafetyRefusal, match="heater-needs-stirring-and-closed-lid"):
            await run_recipe(
                refused, station, clock_sleep=clock.sleep, who="agent:7", on_step=on_step
            )
        assert [e[:3] for e in events] == [
            (0, "stir", "started"),
            (0, "stir", "done"),
            (1, "heat", "started"),
        ]
        assert station.audit.records(allowed=False)[-1].command == Command(
            "hotplate", "set_heater", {"on": True, "setpoint_c": 40.0}, "agent:7"
        )
        assert world.hotplate.heater_enabled is False

        # a pump that alarms while the recipe waits for it: the alarm propagates with its code
        async def stall_red(index: int, step: Step, phase: str, data: dict[str, Any]) -> None:
            if step.kind == "wait_pumps" and phase == "started":
                bench.inject_fault("pump-alarm", pump="red", code="S")

        stalls = Recipe(
            (
                Step.of("dispense", fluid="red", volume_ml=0.3, rate_ml_min=1.0),
                Step.of("wait_pumps", fluids=["red"]),
            )
        )
        with pytest.raises(DeviceAlarm) as alarm:
            await run_recipe(stalls, station, clock_sleep=clock.sleep, who="t", on_step=stall_red)
        assert alarm.value.code == "S"
        bench.clear_fault("pump-alarm")


def test_heating_ends_on_the_hotplates_setpoint_grid(program: Program) -> None:
    """The hotplate takes setpoints in 0.1 degC: an optimizer's 70.98717... becomes 71.0, so
    the ramp ends exactly at its last step and the dry run's paced ramp is not refused at
    the rise limit by the device's rounding."""
    params = {**PARAMS, "temperature_c": 70.98717313685637}
    recipe = build_recipe(program, params)
    heat = next(s for s in recipe.steps if s.kind == "heat")
    assert heat["setpoint_c"] == 71.0
    state = {"hotplate.setpoint_c": 25.0, "enclosure.lid": "closed"}
    times = recipe.command_times(1000.0, rise_per_min=10.0)
    commands = recipe.commands("optimizer")
    report = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0, times=times)
    assert report.ok, str(report)
    # the unrounded setpoint, ramped at exactly the rise limit, is what the device rounding refuses
    raw = Recipe(
        tuple(
            Step.of("heat", setpoint_c=params["temperature_c"], from_c=25.0, rise_per_min=10.0)
            if s.kind == "heat"
            else s
            for s in recipe.steps
        )
    )
    report = dry_run(
        raw.commands("optimizer"),
        reference_envelope(),
        state,
        layout=LAYOUT,
        now=1000.0,
        times=raw.command_times(1000.0, rise_per_min=10.0),
    )
    assert [v.rule for v in report.violations] == ["hotplate.setpoint_c.max_rise_per_min"]


async def test_a_ramp_to_an_unrounded_target_finishes() -> None:
    """ramp_setpoint compares the setpoint it sent with its target on the same 1e-6 grid."""
    sent: list[float] = []

    class Handle:
        async def set_heater(self, on: bool, setpoint_c: float) -> None:
            sent.append(setpoint_c)

    class Station:  # the guard accepts everything: only the ramp's own logic is under test
        name = "bench-x"

        def handle(self, name: str, who: str) -> Handle:
            return Handle()

        def check(self, command: Command) -> Any:
            return type("Verdict", (), {"allowed": True})()

    async def no_sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    reached = await ramp_setpoint(
        Station(),  # type: ignore[arg-type]
        54.24873508375164,
        who="optimizer",
        clock_sleep=no_sleep,
        timeout_s=60.0,
    )
    assert reached == pytest.approx(54.248735) and sent == [reached]
