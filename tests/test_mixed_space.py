"""Categorical and ordinal parameters: the optimizer's space (one-hot / index grid, JSON
state), program.md's declarations and their one-line errors, constraints and recipes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loops.optimizer import (
    BayesOptimizer,
    GridSearch,
    ParamSpace,
    RandomSearch,
    optimizer_from_state,
)
from loops.program import ProgramError, load_program
from loops.recipe import build_recipe

SPACE = {
    "x": (0.0, 1.0, float),
    "n": (1, 5, int),
    "cat": ("categorical", ["a", "b", "c"]),
    "lvl": ("ordinal", [0.5, 1, 2]),
}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match-pareto" / "program.md"


def test_a_categorical_is_one_hot_and_an_ordinal_an_index_on_the_unit_grid() -> None:
    space = ParamSpace.of(SPACE)
    assert len(space) == 6 and space.names == list(SPACE)  # x, n, 3 one-hot, lvl
    p = space.validate({"x": 0.3, "n": 2.0, "cat": "b", "lvl": 1.0})
    assert p == {"x": 0.3, "n": 2, "cat": "b", "lvl": 1} and isinstance(p["lvl"], int)
    assert space.to_unit(p).tolist() == pytest.approx([0.3, 0.25, 0.0, 1.0, 0.0, 0.5])
    assert space.from_unit(space.to_unit(p)) == p
    snapped = space.round_unit(np.array([[0.51, 0.3, 0.2, 0.7, 0.1, 0.8]]))
    assert snapped.tolist() == [pytest.approx([0.51, 0.25, 0.0, 1.0, 0.0, 1.0])]
    assert space.from_unit(snapped[0])["cat"] == "b" and space.from_unit(snapped[0])["lvl"] == 2
    assert dict(zip(space.names, space.key(p), strict=True)) == p  # the key gives the point back
    assert json.loads(json.dumps(space.spec())) == {
        "x": [0.0, 1.0, "float"],
        "n": [1, 5, "int"],
        "cat": ["categorical", ["a", "b", "c"]],
        "lvl": ["ordinal", [0.5, 1, 2]],
    }
    assert ParamSpace.of(space.spec()).spec() == space.spec()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"c": ("categorical", ["a"])},
            "space.c: a categorical parameter needs at least 2 choices",
        ),
        ({"c": ("categorical", ["a", "a"])}, "space.c: choice 'a' is listed twice"),
        ({"c": ("ordinal", "abc")}, "space.c: a ordinal parameter needs a list of choices"),
        ({"c": ("categorical", ["a", True])}, "space.c: a choice is a string or a number"),
    ],
)
def test_bad_choices_are_refused_naming_the_parameter(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParamSpace.of(spec)


def test_a_value_that_is_no_choice_is_refused_by_name() -> None:
    space = ParamSpace.of(SPACE)
    with pytest.raises(ValueError, match=r"params.cat: 'd' is not one of 'a', 'b', 'c'"):
        space.validate({"x": 0.3, "n": 2, "cat": "d", "lvl": 1})
    with pytest.raises(ValueError, match=r"params.lvl: 3 is not one of 0.5, 1, 2"):
        space.validate({"x": 0.3, "n": 2, "cat": "a", "lvl": 3})


def test_every_strategy_proposes_choices_and_restores_from_json() -> None:
    def f(p: dict) -> float:
        return (p["x"] - 0.7) ** 2 + (0.0 if p["cat"] == "c" else 1.0) + float(p["lvl"])

    opt = BayesOptimizer(SPACE, seed=1, initial_points=4)
    for _ in range(10):
        q = opt.ask()
        opt.tell(q.id, f(q.params))
    assert {o.params["cat"] for o in opt.observations()} <= {"a", "b", "c"}
    state = json.loads(json.dumps(opt.state()))
    again = optimizer_from_state(ParamSpace.of(SPACE).spec(), state)
    assert again.ask() == opt.ask()
    best = opt.best()
    assert best is not None and best[0]["cat"] == "c"  # the model found the category that matters
    grid = GridSearch({"x": (0.0, 1.0, float), "cat": ("categorical", ["a", "b", "c"])}, 2)
    assert [grid.ask().params["cat"] for _ in range(6)] == ["a", "b", "c"] * 2
    rnd = RandomSearch(SPACE, 3)
    assert rnd.ask().params["cat"] in ("a", "b", "c")


def _program(parameters: str, constraints: str = "[]", when: str = "heating != 'none'") -> str:
    return f"""---
name: t
parameters:
{parameters}
constraints: {constraints}
objective: {{measure: seen}}
budget: {{experiments: 5}}
recipe:
  - call: hotplate.set_heater
    args: {{on: true, setpoint_c: 40}}
    when: {when}
  - compute: seen
    expr: dose_ml * 2
---
"""


PARAMS = """  dose_ml: {type: float, low: 0, high: 1}
  heating: {type: categorical, choices: [none, gentle]}"""


def test_program_md_declares_choices_and_uses_them_in_constraints_and_recipes() -> None:
    program = load_program(_program(PARAMS, "[\"heating == 'none' or dose_ml <= 0.5\"]"))
    heating = program.space["heating"]
    assert heating.type == "categorical" and heating.choices == ("none", "gentle")
    assert program.feasible({"dose_ml": 0.8, "heating": "none"}) == (True, [])
    ok, reasons = program.feasible({"dose_ml": 0.8, "heating": "gentle"})
    assert not ok and "heating='gentle'" in reasons[0]
    ok, reasons = program.feasible({"dose_ml": 0.8, "heating": "hot"})
    assert reasons == ["heating='hot' is not one of 'none', 'gentle'"]
    kinds = [s.kind for s in build_recipe(program, {"dose_ml": 0.2, "heating": "gentle"}).steps]
    assert kinds.count("call") == 1
    kinds = [s.kind for s in build_recipe(program, {"dose_ml": 0.2, "heating": "none"}).steps]
    assert kinds.count("call") == 0
    again = load_program(program.to_markdown())  # the front matter round-trips
    assert again.space["heating"].choices == ("none", "gentle")


@pytest.mark.parametrize(
    ("parameters", "constraints", "when", "message"),
    [
        (
            "  dose_ml: {type: float, low: 0, high: 1}\n  heating: {type: categorial, choices: [a, b]}",
            "[]",
            "dose_ml >= 0",
            r"<program>:5: parameters.heating.type: must be one of float, int, categorical, ordinal, got 'categorial'",
        ),
        (
            "  dose_ml: {type: float, low: 0, high: 1}\n  heating: {type: categorical, low: 0, high: 1}",
            "[]",
            "dose_ml >= 0",
            r"parameters.heating.low: a categorical parameter takes 'choices' \(a list\), not low/high",
        ),
        (
            "  dose_ml: {type: float, low: 0, high: 1, choices: [1, 2]}\n  heating: {type: categorical, choices: [a, b]}",
            "[]",
            "dose_ml >= 0",
            r"parameters.dose_ml.choices: 'choices' is for categorical/ordinal parameters",
        ),
        (
            "  dose_ml: {type: float, low: 0, high: 1}\n  heating: {type: ordinal}",
            "[]",
            "dose_ml >= 0",
            r"parameters.heating: missing 'choices'",
        ),
        (
            PARAMS,
            "[\"heating == 'gentel'\"]",
            "heating != 'none'",
            r"constraints\[0\]: 'gentel' is not a choice of heating",
        ),
        (PARAMS, "[]", "heating in ['none', 'strong']", r"'strong' is not a choice of heating"),
    ],
)
def test_a_typo_in_a_choice_declaration_or_use_is_a_one_line_error(
    parameters: str, constraints: str, when: str, message: str
) -> None:
    with pytest.raises(ProgramError, match=message) as info:
        load_program(_program(parameters, constraints, when))
    assert "\n" not in str(info.value)


def test_the_pareto_example_declares_a_categorical_and_an_ordinal() -> None:
    program = load_program(EXAMPLE)
    assert program.space["heating"].choices == ("none", "gentle", "strong")
    assert program.space["hold_s"].type == "ordinal"
    assert ParamSpace.of(program.space).spec()["hold_s"] == ["ordinal", [30, 120, 300]]
