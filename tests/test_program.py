"""Campaign specs (program.md): loading, validation with file:line:field errors, the space helpers,
constraints, stop rules, and the example campaign."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from loops.program import Program, ProgramError, load_program, split_front_matter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"

# line numbers below count from this text's first line ("---" is line 1)
BASE = """---
name: demo
parameters:
  red_ml:   {type: float, low: 0.0, high: 1.2, unit: mL}
  green_ml: {type: float, low: 0.0, high: 1.2, unit: mL}
  blue_ml:  {type: float, low: 0.0, high: 1.2, unit: mL}
  temperature_c: {type: float, low: 25, high: 75, unit: degC}
  hold_s:   {type: int, low: 30, high: 600, unit: s}
constraints:
  - red_ml + green_ml + blue_ml >= 0.6
  - red_ml + green_ml + blue_ml <= 2.6
objective:
  measure: delta_e2000
  direction: minimize
budget: {experiments: 60, hours: 4}
stop:
  target: 2.0
  no_improvement: 20
strategy: bayes
initial_points: 8
stations: 2
seed: 1
fixed: {target_lab: [45.0, 20.0, -15.0], rate: 5.0}
recipe:
  - call: red.dispense
    args: {volume_ml: red_ml, rate_ml_min: rate}
  - call: green.dispense
    args: {volume_ml: green_ml, rate_ml_min: rate}
  - call: blue.dispense
    args: {volume_ml: blue_ml, rate_ml_min: rate}
  - ramp: hotplate.set_heater
    set: setpoint_c
    to: temperature_c
    args: {on: true}
  - hold: hold_s
  - call: color.measure
    into: counts
  - compute: lab
    function: reading_to_lab
    args: {counts: counts, white: counts}
  - compute: delta_e2000
    function: delta_e2000
    args: {lab1: lab, lab2: target_lab}
---
# Demo

Body text.
"""

POINT = {"red_ml": 0.5, "green_ml": 0.1, "blue_ml": 0.6, "temperature_c": 40.0, "hold_s": 60}


def load(text: str = BASE) -> Program:
    return load_program(text, source="demo.md")


def test_example_program_loads() -> None:
    p = load_program(EXAMPLE)
    assert p.name == "color-match" and p.plan.name == "color-match"
    assert {"delta_e2000", "lab", "dispensed_ml.red", "drained_ml"} <= set(p.plan.measures)
    assert p.space.names == ["red_ml", "green_ml", "blue_ml", "temperature_c", "hold_s"]
    assert p.space["hold_s"].type == "int" and p.space["hold_s"].unit == "s"
    assert p.objective.measure == "delta_e2000" and p.objective.minimize
    assert len(p.fixed["target_lab"]) == 3  # the target colour is an ordinary constant
    assert p.stop.target == 2.0 and p.stop.no_improvement == 20
    assert p.budget.experiments == 60 and p.strategy == "bayes" and p.initial_points == 8
    assert p.fixed["stir_rpm"] >= 100  # the envelope heats only while stirring
    assert "# Colour match on the reference bench" in p.body
    assert "Safety facts" in p.body and "labbridge run" in p.body
    assert p.source == str(EXAMPLE)
    # the recipe that produced the target is feasible
    ok, reasons = p.feasible(
        {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 50.0, "hold_s": 120}
    )
    assert ok, reasons


def test_fields_defaults_and_body() -> None:
    p = load()
    assert p.stations == 2 and p.seed == 1 and p.initial_points == 8
    assert p.body.startswith("# Demo") and "Body text." in p.body
    assert [c.text for c in p.constraints] == [
        "red_ml + green_ml + blue_ml >= 0.6",
        "red_ml + green_ml + blue_ml <= 2.6",
    ]
    assert p.constraints[0].line == 10
    minimal = load_program(
        {
            "name": "m",
            "parameters": {"red_ml": {"type": "float", "low": 0, "high": 1}},
            "objective": {"measure": "liquid_c", "direction": "maximize"},
            "budget": {"hours": 1},
            "recipe": [
                {"call": "red.dispense", "args": {"volume_ml": "red_ml", "rate_ml_min": 1.0}},
                {"read": {"liquid_c": "hotplate.liquid_c"}},
            ],
        }
    )
    assert minimal.strategy == "bayes" and minimal.stations == 1 and minimal.seed == 0
    assert minimal.initial_points == 4  # max(4, 2 x 1 dimension)
    assert minimal.stop.target is None and minimal.constraints == () and minimal.body == ""
    assert minimal.budget.experiments is None and minimal.budget.hours == 1.0


def test_dict_and_markdown_round_trips() -> None:
    p = load()
    data = json.loads(json.dumps(p.as_dict()))  # the MQTT API sends JSON
    again = load_program(data, body=p.body, source="mqtt")
    assert again.as_dict() == p.as_dict() and again.body == p.body
    assert again.source == "mqtt"
    text = p.to_markdown()
    assert load_program(text).as_dict() == p.as_dict()
    front, body = split_front_matter(text)
    assert "name: demo" in front and body == p.body


def test_file_and_text_forms(tmp_path: Path) -> None:
    path = tmp_path / "program.md"
    path.write_text(BASE)
    assert load_program(path).source == str(path)
    assert load_program(str(path)).as_dict() == load().as_dict()
    with pytest.raises(ProgramError, match="cannot read"):
        load_program(tmp_path / "missing.md")


# (edit of BASE, line the error must name, field, words in the message)
ERRORS = [
    (("stations: 2", "station: 2"), 21, "station", "unknown key 'station'"),
    (("{type: int, low: 30,", "{type: int, lo: 30,"), 8, "parameters.hold_s.lo", "unknown key"),
    (("high: 600", "high: 600.5"), 8, "parameters.hold_s.high", "integer bounds"),
    (
        ("type: float, low: 25", "type: double, low: 25"),
        7,
        "parameters.temperature_c.type",
        "float, int",
    ),
    (("low: 25, high: 75", "low: 75, high: 25"), 7, "parameters.temperature_c.low", "must be <"),
    (
        ("  - red_ml + green_ml + blue_ml <= 2.6", "  - red_ml + gren_ml <= 2.6"),
        11,
        "constraints[1]",
        "unknown name 'gren_ml'",
    ),
    (
        ("  - red_ml + green_ml + blue_ml <= 2.6", "  - red_ml + (green_ml <= 2.6"),
        11,
        "constraints[1]",
        "expected ')'",
    ),
    (
        ("  - red_ml + green_ml + blue_ml <= 2.6", "  - red_ml + 1"),
        11,
        "constraints[1]",
        "condition",
    ),
    (("direction: minimize", "direction: lower"), 14, "objective.direction", "minimize, maximize"),
    (
        ("measure: delta_e2000", "measure: sharpness"),
        13,
        "objective.measure",
        "does not measure 'sharpness'",
    ),
    (
        ("budget: {experiments: 60, hours: 4}", "budget: {experiments: 0}"),
        15,
        "budget.experiments",
        ">= 1",
    ),
    (("budget: {experiments: 60, hours: 4}", "budget: {}"), 15, "budget", "needs a limit"),
    (("initial_points: 8", "initial_points: 80"), 20, "initial_points", "exceed"),
    (("no_improvement: 20", "no_improvement: 2.5"), 18, "stop.no_improvement", "integer"),
    (("strategy: bayes", "strategy: genetic"), 19, "strategy", "bayes, random, grid"),
    (("rate: 5.0}", "rate: 5.0, spare: 1}"), 23, "fixed.spare", "used by no step"),
    (("rate: 5.0}", "rate: 5.0, red_ml: 0.3}"), 23, "fixed.red_ml", "is a parameter"),
    (("  - hold: hold_s\n", ""), 8, "parameters.hold_s", "is not used by the recipe"),
    (("volume_ml: red_ml,", "volume_ml: red_mll,"), 26, "recipe[0].args.volume_ml", "'red_mll'"),
    (("function: reading_to_lab", "function: to_lab"), 39, "recipe[6].function", "'to_lab'"),
    (("  - hold: hold_s", "  - holdd: hold_s"), 35, "recipe[4]", "exactly one of call, wait"),
    (("call: color.measure", "call: colormeasure"), 36, "recipe[5].call", "<instrument>.<command>"),
    (("args: {lab1: lab,", "args: {lab1: lb,"), 43, "recipe[7].args.lab1", "unknown name 'lb'"),
    (("hold: hold_s", "hold: hold_s +"), 35, "recipe[4].hold", "unexpected end"),
    (("  hold_s:", "  and:"), 8, "parameters.and", "identifiers"),
    (("name: demo", "name: demo campaign"), 2, "name", "slug"),
    (("name: demo\n", ""), None, "", "missing required field 'name'"),
    (("stations: 2", "stations: 2\nstations: 3"), 22, "stations", "duplicate key"),
    (("seed: 1", "seed: [1"), None, "", "not valid YAML"),
]


@pytest.mark.parametrize(
    ("edit", "line", "field", "words"), ERRORS, ids=[e[2] or e[3] for e in ERRORS]
)
def test_errors_name_the_file_line_and_field(
    edit: tuple[str, str], line: int | None, field: str, words: str
) -> None:
    old, new = edit
    assert old in BASE
    with pytest.raises(ProgramError) as info:
        load(BASE.replace(old, new, 1))
    err = info.value
    assert words in str(err)
    assert err.source == "demo.md" and str(err).startswith("demo.md")
    if line is not None:
        assert err.line == line, str(err)
        assert str(err).startswith(f"demo.md:{line}: ")
    if field:
        assert err.field == field, str(err)


def test_front_matter_framing_errors() -> None:
    with pytest.raises(ProgramError, match="demo.md:1: .*starts with YAML front matter"):
        load("# no front matter\n")
    with pytest.raises(ProgramError, match="not closed"):
        load("---\nname: x\n")
    with pytest.raises(ProgramError, match="a mapping"):
        load("---\n- a\n---\n")


def test_errors_from_a_dict_name_the_field() -> None:
    data = load().as_dict()
    data["parameters"]["hold_s"]["low"] = "thirty"
    with pytest.raises(ProgramError) as info:
        load_program(data, source="mqtt:campaign/7")
    assert info.value.line is None and info.value.field == "parameters.hold_s.low"
    assert str(info.value).startswith("mqtt:campaign/7: parameters.hold_s.low: must be a number")


def test_space_helpers() -> None:
    space = load().space
    assert space.dims == 5
    assert space.bounds()["hold_s"] == (30, 600)
    assert space.validate_params(POINT) == []
    problems = space.validate_params(
        {"red_ml": 1.5, "green_ml": math.nan, "temperature_c": 40, "hold_s": 60.5, "colour": 1}
    )
    assert problems == [
        "red_ml=1.5 mL is outside [0.0, 1.2] mL",
        "green_ml must be a finite number, got nan",
        "blue_ml is missing",
        "hold_s must be an integer, got 60.5",
        "colour is not a parameter of this campaign "
        "(parameters: red_ml, green_ml, blue_ml, temperature_c, hold_s)",
    ]
    # numpy values from an optimizer: validated, clipped to Python numbers, ints rounded
    proposal = {k: np.float64(v) for k, v in POINT.items()} | {"hold_s": np.float64(59.6)}
    assert space.validate_params(proposal) == ["hold_s must be an integer, got 59.6"]
    clipped = space.clip(proposal | {"red_ml": np.float64(1.3)})
    assert clipped["red_ml"] == 1.2 and clipped["hold_s"] == 60
    assert type(clipped["hold_s"]) is int and type(clipped["blue_ml"]) is float
    unit = space.to_unit(POINT)
    assert unit[3] == pytest.approx(0.3) and all(0 <= u <= 1 for u in unit)
    assert space.from_unit(unit) == pytest.approx(POINT)
    assert space.from_unit([0, 0, 0, 0, 1]) == {
        "red_ml": 0.0,
        "green_ml": 0.0,
        "blue_ml": 0.0,
        "temperature_c": 25.0,
        "hold_s": 600,
    }
    with pytest.raises(ValueError, match="coordinates"):
        space.from_unit([0.5])


def test_feasible_checks_bounds_then_constraints() -> None:
    p = load()
    assert p.feasible(POINT) == (True, [])
    ok, reasons = p.feasible(POINT | {"red_ml": 0.1, "green_ml": 0.1, "blue_ml": 0.1})
    assert not ok
    assert reasons == [
        "constraint 'red_ml + green_ml + blue_ml >= 0.6' is false "
        "(blue_ml=0.1, green_ml=0.1, red_ml=0.1)"
    ]
    ok, reasons = p.feasible(POINT | {"red_ml": 9.0})
    assert not ok and reasons == ["red_ml=9.0 mL is outside [0.0, 1.2] mL"]
    assert p.feasible({k: np.float64(v) for k, v in POINT.items()})[0]


def test_stop_rules() -> None:
    p = load()  # minimize, target 2.0, no_improvement 20, 60 experiments, 4 h
    assert p.stop_reason([]) is None
    assert p.stop_reason([9.0, 5.0, None, 4.0]) is None
    reason = p.stop_reason([9.0, 1.8])
    assert reason is not None and reason.startswith("target reached")
    assert p.reached(2.0) and not p.reached(2.01) and not p.reached(None)
    reason = p.stop_reason([5.0] * 60)
    assert reason is not None and reason.startswith("experiment budget spent")
    reason = p.stop_reason([5.0], elapsed_s=4 * 3600.0)
    assert reason is not None and reason.startswith("time budget spent")
    stalled = [5.0] + [6.0] * 19 + [None]
    reason = p.stop_reason(stalled)
    assert reason is not None and reason.startswith("no improvement in the last 20")
    assert p.stop_reason(stalled[:-1]) is None
    reason = p.stop_reason([None] * 20)
    assert reason == "no successful experiment in the last 20"
    maximise = load(BASE.replace("direction: minimize", "direction: maximize"))
    assert maximise.objective.better(3.0, 2.0) and maximise.objective.score(3.0) == 3.0
    assert maximise.reached(2.5) and not maximise.reached(1.5)
    assert p.objective.better(2.0, 3.0) and p.objective.score(3.0) == -3.0


def test_huge_integers_are_refused_not_an_overflow_error() -> None:
    """10**400 is valid JSON; ``math.isfinite`` of it raised OverflowError ("internal error")."""
    space = load().space
    huge = json.loads("1" + "0" * 400)
    problems = space.validate_params(POINT | {"red_ml": huge, "hold_s": -huge})
    assert problems == [
        "red_ml must be a finite number, got a huge integer",
        "hold_s must be a finite number, got a huge integer",
    ]
    data = load().as_dict()
    data["parameters"]["hold_s"]["high"] = huge
    with pytest.raises(ProgramError, match=r"parameters.hold_s.high: must be a number \(finite\)"):
        load_program(data, source="mqtt:start")
    data = load().as_dict()
    data["fixed"]["rate"] = [1.0, huge]
    with pytest.raises(ProgramError, match=r"fixed.rate\[1\]: must be a number \(finite\)"):
        load_program(data, source="mqtt:start")


def _with_recipe_file(folder: Path, name: str = "steps/demo.yaml") -> tuple[Path, Path]:
    """BASE as a program file whose recipe is the file ``name`` (relative to it)."""
    head, rest = BASE.split("recipe:\n", 1)
    steps, tail = rest.split("---\n", 1)
    program = folder / "program.md"
    program.write_text(f"{head}recipe: {name}\n---\n{tail}")
    recipe = folder / name
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("# the demo's steps\n" + steps)
    return program, recipe


def test_a_recipe_file_named_by_the_program(tmp_path: Path) -> None:
    program, recipe = _with_recipe_file(tmp_path)
    p = load_program(program)
    inline = load()
    assert p.recipe == inline.recipe and p.as_dict() == inline.as_dict()
    assert [s.kind for s in p.plan.steps] == [s.kind for s in inline.plan.steps]
    assert p.recipe_file == str(recipe) and inline.recipe_file is None
    assert [s.line for s in p.plan.steps][:2] == [2, 4]  # lines of the recipe file (BASE - 23)
    # what the journal keeps carries the steps themselves: it loads without the file
    recipe.unlink()
    again = load_program(p.to_markdown(), source="journal")
    assert again.as_dict() == p.as_dict() and again.recipe_file is None


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "words"),
    [
        ("volume_ml: red_ml,", "volume_ml: red_mll,", 3, "[0].args.volume_ml", "'red_mll'"),
        ("  - hold: hold_s", "  - holdd: hold_s", 12, "[4]", "exactly one of call, wait"),
        ("function: reading_to_lab", "function: to_lab", 16, "[6].function", "'to_lab'"),
        ("  - hold: hold_s", "  - hold: hold_s\n   bad: [", None, "", "not valid YAML"),
    ],
)
def test_errors_in_a_recipe_file_name_its_line_and_field(
    tmp_path: Path, old: str, new: str, line: int | None, field: str, words: str
) -> None:
    program, recipe = _with_recipe_file(tmp_path)
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new, 1))
    with pytest.raises(ProgramError) as info:
        load_program(program)
    err = info.value
    assert err.source == str(recipe) and words in str(err), str(err)
    if line is not None:
        assert str(err).startswith(f"{recipe}:{line}: {field}: "), str(err)


def test_a_recipe_file_that_is_not_there_or_not_steps(tmp_path: Path) -> None:
    program, recipe = _with_recipe_file(tmp_path)
    recipe.unlink()
    with pytest.raises(ProgramError) as info:
        load_program(program)
    assert str(info.value).startswith(f"{program}:24: recipe: no recipe file '{recipe}'")
    recipe.write_text("name: not steps\n")
    with pytest.raises(ProgramError, match="a recipe is a non-empty list of steps") as info:
        load_program(program)
    assert info.value.source == str(recipe)
    # bounded like every YAML input: nested aliases are refused before they expand
    bomb = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    bomb += [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    recipe.write_text("\n".join(bomb) + "\n")
    with pytest.raises(ProgramError, match="too large: more than") as info:
        load_program(program)
    assert info.value.source == str(recipe)


def test_a_recipe_file_is_read_only_for_a_program_file() -> None:
    # text or a mapping (the API's) names no folder: a path there is an error, never read
    text = BASE.split("recipe:\n", 1)[0] + "recipe: /etc/passwd\n---\n"
    with pytest.raises(ProgramError) as info:
        load(text)
    assert str(info.value).startswith("demo.md:24: recipe: a recipe file is read only for")
    data = {**load().as_dict(), "recipe": "steps.yaml"}
    with pytest.raises(ProgramError, match="recipe: a recipe file is read only for"):
        load_program(data, source="mqtt")
