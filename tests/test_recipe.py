"""Recipes as data: the colour match's plan bound to proposals, the plan's checks, the JSON
round trip, the commands and times a dry run sees, and one recipe run end to end on a
simulated station behind the safety layer."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import layout

from instruments.errors import DeviceAlarm
from loops.plan import Recipe, RecipeError, Step, compile_plan
from loops.program import Program, load_program
from loops.recipe import HoldBroken, build_recipe, dry_run_recipe, ramp_setpoint, run_recipe
from safety import Command, SafetyRefusal, dry_run, open_station, reference_envelope
from safety.effects import effect_of
from safety.yamldoc import ConfigError, YamlDoc
from simulators.bench import SimulatedLab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
PARAMS = {"red_ml": 0.5, "green_ml": 0.0, "blue_ml": 0.7, "temperature_c": 50.0, "hold_s": 120}
#: the reference station's instruments, their declared commands and the envelope's vessels
LAYOUT = layout(reference_envelope())
SPEED = 100.0


@pytest.fixture(scope="module")
def program() -> Program:
    return load_program(EXAMPLE)


def described(recipe: Recipe) -> list[str]:
    return [str(s) for s in recipe.steps]


def flow_s(command: Command) -> float | None:
    return effect_of(command, LAYOUT, {"vial.volume": 0.0}).busy_s


def times_of(recipe: Recipe, start: float, rise: float | None = 10.0) -> list[float]:
    """The dry run's times on the reference layout, the setpoint starting at 25 degC."""
    return [
        t
        for _, t in recipe.timeline(
            "optimizer",
            start,
            flow_s=flow_s,
            rise_per_min=lambda *_: rise,
            from_value=lambda *_: 25.0,
            resolution=lambda i, c, a: LAYOUT.actions(i)[c].params[a].step,
        )
    ]


def test_the_colour_match_plan_binds_a_proposal(program: Program) -> None:
    recipe = build_recipe(program, PARAMS)
    assert recipe.name == "color-match" and recipe.params == PARAMS
    steps = described(recipe)
    assert steps[:5] == [
        "color.measure() -> white",
        "wait until hotplate.plate_c < start_below_c",
        "enclosure.set_light(on=True, intensity=0.6)",
        "capture camera (reference)",  # before anything is poured
        "red.dispense(volume_ml=0.5, rate_ml_min=5)",
    ]
    # green_ml = 0 is under min_dispense_ml: no dispense, no wait, its volume is its else
    assert not [s for s in steps if s.startswith("green.")]
    assert "dispensed_ml.green = 0" in steps
    assert "ramp hotplate.set_heater setpoint_c from 25 to 50 at 10/min" in steps
    hold = next(s for s in recipe.steps if s.kind == "hold")
    assert str(hold).startswith("hold 120 s while hotplate.heater_enabled and ")
    assert hold["instruments"] == ["hotplate"] and hold["every_s"] == 5
    assert hold["inputs"] == {"temperature_c": 50.0, "hold_lag_c": 17.0, "hold_over_c": 5.0}
    assert "waste.withdraw(volume_ml=1.4, rate_ml_min=20)" in steps  # 1.2 mL + 0.2 margin
    wait = recipe.steps[1]
    assert wait["inputs"] == {"start_below_c": 28.0} and wait["instruments"] == ["hotplate"]
    delta = next(s for s in recipe.steps if s.kind == "compute" and s["into"] == "delta_e2000")
    assert delta["inputs"] == {"target_lab": [47.4, 23.3, -19.2]}
    # numpy proposals are accepted and become plain Python numbers
    again = build_recipe(program, {k: np.float64(v) for k, v in PARAMS.items()})
    assert again == recipe and type(again.params["hold_s"]) is int
    text = json.dumps(recipe.as_dict())
    assert Recipe.from_dict(json.loads(text)) == recipe
    with pytest.raises(RecipeError, match="red_ml=1.5 mL is outside"):
        build_recipe(program, PARAMS | {"red_ml": 1.5})
    with pytest.raises(RecipeError, match="hold_s is missing"):
        build_recipe(program, {k: v for k, v in PARAMS.items() if k != "hold_s"})
    with pytest.raises(RecipeError, match="a mapping with a list of 'steps'"):
        Recipe.from_dict({"steps": "dispense"})
    with pytest.raises(RecipeError, match="unknown step kind 'boil'"):
        Recipe.from_dict({"steps": [{"kind": "boil"}]})


@pytest.mark.parametrize(
    ("steps", "field", "words"),
    [
        ([{"hold": 5, "else": 1}], "recipe[0].else", "else needs a when"),
        ([{"wait": "x > 1"}], "recipe[0].wait", "needs a reading"),
        ([{"compute": "y", "expr": "x", "function": "mean"}], "recipe[0]", "not both"),
        ([{"capture": "camera", "as": "the scene"}], "recipe[0].as", "an identifier"),
        (
            [{"capture": "camera", "as": "a"}, {"capture": "camera", "as": "a"}],
            "recipe[1].as",
            "a second capture named 'a'",
        ),
        ([{"compute": "y", "expr": "images"}], "recipe[0].expr", "unknown name 'images'"),
        ([{"read": {"a": "hotplate"}}], "recipe[0].read.a", "<instrument>.<command>"),
        ([{"compute": "y", "expr": "z + 1"}], "recipe[0].expr", "unknown name 'z'"),
        ([{"call": "a.b", "args": {"v": [1, {"x": 2}]}}], "recipe[0].args.v", "must be a number"),
        ([{"call": "a.b", "into": "1x"}], "recipe[0].into", "identifiers joined by dots"),
        ([{"ramp": "h.set", "set": "sp"}], "recipe[0]", "missing 'to'"),
        ([{"hold": 1, "colour": "red"}], "recipe[0].colour", "unknown key 'colour'"),
        ([{"hold": 1, "every": 2}], "recipe[0].every", "give while"),
        ([{"hold": 1, "while": "x > 1"}], "recipe[0].while", "needs a reading"),
        ([{"hold": 1, "while": "probe.ok and y"}], "recipe[0].while", "unknown name 'y'"),
        ([{"hold": 1, "while": 3}], "recipe[0].while", "must be a condition"),
        ([{"hold": 1, "while": "probe.t + 1"}], "recipe[0].while", "must be a condition"),
        ([], "recipe", "non-empty list"),
    ],
)
def test_the_plan_names_the_step_and_field_of_a_mistake(
    steps: list[Any], field: str, words: str
) -> None:
    doc = YamlDoc("p.md", error_cls=ConfigError)
    with pytest.raises(ConfigError) as info:
        compile_plan(steps, inputs=["x"], doc=doc)
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)


def test_bind_evaluates_expressions_and_conditions() -> None:
    doc = YamlDoc("p.md", error_cls=ConfigError)
    plan = compile_plan(
        [
            {"call": "pump.dispense", "args": {"volume_ml": "a + b", "rate_ml_min": 2}},
            {"hold": "a * 60", "when": "b > 0"},
            {"read": {"seen.x": "probe.x"}, "when": "b > 0", "else": -1.0},
            {"compute": "total", "function": "total", "args": {"values": "seen.x"}},
        ],
        inputs=["a", "b"],
        doc=doc,
        name="demo",
    )
    assert plan.measures == ("seen.x", "total") and plan.uses == {"a", "b"}
    assert dict(plan.calls) == {"pump": {"dispense"}}
    r = plan.bind({"a": 0.25, "b": 0.5})
    assert described(r) == [
        "pump.dispense(volume_ml=0.75, rate_ml_min=2)",
        "hold 15 s",
        "read seen.x <- probe.x",
        "compute total = total(values)",
    ]
    skipped = plan.bind({"a": 0.25, "b": 0.0})
    assert described(skipped)[1:] == ["seen.x = -1", "compute total = total(values)"]
    with pytest.raises(RecipeError, match=r"recipe step 1 \(hold\): hold must be >= 0 s"):
        plan.bind({"a": -1.0, "b": 1.0})
    with pytest.raises(RecipeError, match="unknown name 'b'"):
        plan.bind({"a": 1.0})


def test_commands_and_times_for_the_dry_run(program: Program) -> None:
    recipe = build_recipe(program, PARAMS)
    commands = recipe.commands("optimizer")
    actuating = [str(c) for c in commands if not c.action.startswith(("measure", "wait"))]
    assert actuating == [
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
    times = times_of(recipe, 1000.0)
    at = {str(c): t for c, t in zip(commands, times, strict=True)}
    assert times == sorted(times)
    # dispenses start together; waiting for a pump comes after its flow (0.7 mL at 5 mL/min)
    assert at["red.dispense(volume_ml=0.5, rate_ml_min=5.0)"] == 1000.0
    assert at["blue.wait_until_stopped(timeout=300, poll_interval=0.05)"] == pytest.approx(1008.4)
    assert at["hotplate.set_heater(on=True, setpoint_c=25.0)"] == pytest.approx(1008.4)
    end = 1008.4 + 150.0  # 25 degC at 10 degC/min
    assert at["hotplate.set_heater(on=True, setpoint_c=50.0)"] == pytest.approx(end)
    assert at["hotplate.set_heater(on=False)"] == pytest.approx(end + 120.0)  # after the hold
    # the reference envelope: the final setpoint is a 25 degC rise, fine at the ramp's end,
    # refused when the dry run checks every command at one instant
    state = {"hotplate.setpoint_c": 25.0, "enclosure.lid": "closed"}
    report = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0, times=times)
    assert report.ok, str(report)
    at_once = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0)
    assert [v.rule for v in at_once.violations] == ["hotplate.setpoint_c.max_rise_per_min"]
    # a recipe past the vial's capacity is refused at its dispense, whatever the timing
    overfill = Recipe(
        tuple(
            Step("call", {"instrument": p, "command": "dispense", "args": a})
            for p, a in (
                ("red", {"volume_ml": 1.5, "rate_ml_min": 5}),
                ("blue", {"volume_ml": 1.5, "rate_ml_min": 5}),
            )
        )
    )
    report = dry_run(
        overfill.commands("agent:7"),
        reference_envelope(),
        state,
        layout=LAYOUT,
        now=0.0,
        times=times_of(overfill, 0.0),
    )
    assert report.refused_steps == [1] and report.violations[0].rule == "vial.volume.max"
    assert report.violations[0].command.who == "agent:7"


def test_a_wait_on_a_pumps_readings_outlasts_its_flow() -> None:
    doc = YamlDoc("p.md", error_cls=ConfigError)
    plan = compile_plan(
        [
            {"call": "red.dispense", "args": {"volume_ml": 1.0, "rate_ml_min": 6.0}},
            {"wait": "not red.moving", "every": 1},
            {"call": "hotplate.set_stirrer", "args": {"on": True, "rpm": 300}},
        ],
        inputs=[],
        doc=doc,
    )
    times = times_of(plan.bind({}), 0.0)
    assert times == [0.0, pytest.approx(10.0)]  # 1 mL at 6 mL/min


def test_heating_ends_on_the_hotplates_setpoint_grid(program: Program) -> None:
    """The hotplate takes setpoints in 0.1 degC (its declaration's step): an optimizer's
    70.98717... ends the ramp at 71.0 in the dry run as at run time, so the paced ramp is
    not refused at the rise limit by the device's rounding."""
    recipe = build_recipe(program, {**PARAMS, "temperature_c": 70.98717313685637})
    commands = recipe.commands("optimizer")
    state = {"hotplate.setpoint_c": 25.0, "enclosure.lid": "closed"}
    times = times_of(recipe, 1000.0)
    report = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0, times=times)
    assert report.ok, str(report)
    # timed on the unrounded target (no resolution), the rounding pushes it past the limit
    raw = [
        t
        for _, t in recipe.timeline(
            "optimizer", 1000.0, flow_s=flow_s, rise_per_min=lambda *_: 10.0
        )
    ]
    report = dry_run(commands, reference_envelope(), state, layout=LAYOUT, now=1000.0, times=raw)
    assert [v.rule for v in report.violations] == ["hotplate.setpoint_c.max_rise_per_min"]


def sim_station(lab: SimulatedLab) -> Any:
    bench = lab.stations[0]
    return open_station(
        bench.name,
        [s.as_dict() for s in bench.instruments()],
        reference_envelope(),
        clock=bench.world.clock.now,
        supervisor_options={"device_time_scale": SPEED, "poll_interval": 0.05, "safe_timeout": 2.0},
    )


def _index(recipe: Recipe, text: str) -> int:
    return next(i for i, s in enumerate(recipe.steps) if str(s).startswith(text))


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
        i = _index(recipe, "red.dispense")
        started = next(e[3] for e in events if e[:3] == (i, "call", "started"))
        done = next(e[3] for e in events if e[:3] == (i, "call", "done"))
        assert started <= red < done
        assert not station.audit.records(allowed=False)
        assert {v.command.who for v in records} == {"optimizer"}

        m = result.measurements
        assert isinstance(m["delta_e2000"], float) and math.isfinite(m["delta_e2000"])
        assert len(m["lab"]) == 3 and 0 < m["lab"][0] < 100
        assert m["counts"]["status"] == "ok" and m["counts"]["red"] < m["white"]["red"]
        for fluid in ("red", "green", "blue"):
            assert m["dispensed_ml"][fluid] == pytest.approx(params[f"{fluid}_ml"], abs=1e-3)
        assert m["liquid_c"] is not None and m["liquid_c"] > 24.0  # heated from 22 degC towards 35
        assert m["drained_ml"] == pytest.approx(1.4, abs=1e-3)
        assert result.image is not None and result.image[:2] == b"\xff\xd8"  # a JPEG
        assert m["image_bytes"] == len(result.image)
        assert result.reference_image is not None and result.reference_image[:2] == b"\xff\xd8"
        assert m["reference_sha256"] != m["image_sha256"]  # the scene before and after
        json.dumps(result.as_dict())
        assert len(result.durations) == len(recipe.steps)
        ramp = result.durations[_index(recipe, "ramp hotplate")]
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
        stir = {
            "instrument": "hotplate",
            "command": "set_stirrer",
            "args": {"on": True, "rpm": 300},
        }
        heat = {
            "instrument": "hotplate",
            "command": "set_heater",
            "set": "setpoint_c",
            "to": 40.0,
            "args": {"on": True},
        }
        refused = Recipe((Step("call", stir), Step("ramp", heat)))
        with pytest.raises(SafetyRefusal, match="heater-needs-stirring-and-closed-lid"):
            await run_recipe(
                refused, station, clock_sleep=clock.sleep, who="agent:7", on_step=on_step
            )
        assert [e[:3] for e in events] == [
            (0, "call", "started"),
            (0, "call", "done"),
            (1, "ramp", "started"),
        ]
        assert station.audit.records(allowed=False)[-1].command == Command(
            "hotplate", "set_heater", {"on": True, "setpoint_c": 40.0}, "agent:7"
        )
        assert world.hotplate.heater_enabled is False

        # a pump that alarms while the recipe waits for it: the alarm propagates with its code
        async def stall_red(index: int, step: Step, phase: str, data: dict[str, Any]) -> None:
            if step.get("command") == "wait_until_stopped" and phase == "started":
                bench.inject_fault("pump-alarm", pump="red", code="S")

        dispense = {"volume_ml": 0.3, "rate_ml_min": 1.0}
        stalls = Recipe(
            (
                Step("call", {"instrument": "red", "command": "dispense", "args": dispense}),
                Step("call", {"instrument": "red", "command": "wait_until_stopped", "args": {}}),
            )
        )
        with pytest.raises(DeviceAlarm) as alarm:
            await run_recipe(stalls, station, clock_sleep=clock.sleep, who="t", on_step=stall_red)
        assert alarm.value.code == "S"
        bench.clear_fault("pump-alarm")


async def test_a_hold_checks_what_it_holds_for_and_fails_naming_the_values() -> None:
    """A hold's while: checked at its start, beside it and at its end, on fresh readings; the
    first reading that breaks it fails the step with the condition and the values."""
    doc = YamlDoc("p.md", error_cls=ConfigError)
    plan = compile_plan(
        [{"hold": 30, "while": "probe.heating and probe.t > low", "every": 5}],
        inputs=["low"],
        doc=doc,
    )
    with pytest.raises(RecipeError, match="every must be > 0"):
        compile_plan(
            [{"hold": 30, "while": "probe.heating", "every": "low"}], inputs=["low"], doc=doc
        ).bind({"low": 0.0})
    recipe = plan.bind({"low": 40.0})
    assert str(recipe.steps[0]) == "hold 30 s while probe.heating and probe.t > low"

    class Probe:
        def __init__(self, readings: list[dict[str, Any]]) -> None:
            self.readings = readings
            self.reads = 0

        async def read(self) -> dict[str, Any]:
            self.reads += 1
            return self.readings[min(self.reads, len(self.readings)) - 1]

    class Station:
        name = "bench-x"

        def __init__(self, probe: Probe) -> None:
            self.probe = probe

        def handle(self, name: str, who: str) -> Probe:
            assert name == "probe"
            return self.probe

    slept: list[float] = []
    clock = [0.0]  # the recipe's clock: it moves only when the recipe sleeps

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds
        await asyncio.sleep(0)

    def now() -> float:
        return clock[0]

    healthy = {"heating": True, "t": 45.0}
    steady = Probe([healthy])
    logged: list[dict[str, Any]] = []

    async def on_step(index: int, step: Step, phase: str, data: dict[str, Any]) -> None:
        if phase == "done":
            logged.append(data)

    await run_recipe(
        recipe,
        Station(steady),
        clock_sleep=sleep,
        clock_now=now,
        who="t",
        on_step=on_step,  # type: ignore[arg-type]
    )
    assert slept == [5.0] * 6 and clock[0] == 30.0  # naps of `every`: the hold lasts 30 s
    (data,) = (
        logged  # what the journal keeps of the hold: how often it was checked, the last values
    )
    assert data["checks"] == steady.reads == 7  # at 0, 5, ... 25 s and at its end
    assert (data["probe.heating"], data["probe.t"], data["low"]) == (True, 45.0, 40.0)

    # the heater goes off after two good readings: the step fails, naming what broke it
    tripped = Probe([healthy, healthy, {"heating": False, "t": 44.0}])
    with pytest.raises(HoldBroken) as broken:
        await run_recipe(recipe, Station(tripped), clock_sleep=sleep, clock_now=now, who="t")  # type: ignore[arg-type]
    assert str(broken.value) == (
        "hold 30 s while probe.heating and probe.t > low: it no longer holds at check 3 "
        "(10 s into it): probe.heating=False, probe.t=44.0, low=40.0"
    )
    # a reading the condition needs is missing: it cannot be said to hold, so it does not
    blind = Probe([healthy, {"heating": True}])
    with pytest.raises(HoldBroken, match=r"cannot be evaluated: unknown name 'probe\.t'"):
        await run_recipe(recipe, Station(blind), clock_sleep=sleep, clock_now=now, who="t")  # type: ignore[arg-type]
    # broken already when it starts: nothing is held
    slept.clear()
    cold = Probe([{"heating": True, "t": 22.0}])
    with pytest.raises(HoldBroken, match="it no longer holds at its start"):
        await run_recipe(recipe, Station(cold), clock_sleep=sleep, clock_now=now, who="t")  # type: ignore[arg-type]
    assert slept == []


async def test_a_ramp_to_an_unrounded_target_finishes() -> None:
    """ramp_setpoint compares the value it sent with its target on the same grid."""
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
        "hotplate",
        "set_heater",
        "setpoint_c",
        54.24873508375164,
        who="optimizer",
        clock_sleep=no_sleep,
        args={"on": True},
        resolution=1e-6,
        floor=20.0,
        timeout_s=60.0,
    )
    assert reached == pytest.approx(54.248735) and sent == [reached]


def test_builtin_functions_check_their_inputs() -> None:
    from loops import functions

    assert functions.call("distance", {"a": 7.1, "b": 7.4}) == pytest.approx(0.3)
    assert functions.call("distance", {"a": [0, 3], "b": [4, 0]}) == 5.0
    assert functions.call("mean", {"values": [1, 2, 3]}) == 2.0
    for bad in ({"a": [1, 2], "b": [1]}, {"a": "x", "b": 1}, {"a": float("nan"), "b": 1}):
        with pytest.raises(ValueError):
            functions.call("distance", bad)
