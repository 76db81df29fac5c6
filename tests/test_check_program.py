"""``labbridge check lab.yaml --program program.md``: a program against a lab, no hardware."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "examples" / "lab-hardware.yaml"
PROGRAM = ROOT / "examples" / "color-match" / "program.md"
ASSUME = ["--assume", "enclosure.lid=closed", "--assume", "hotplate.setpoint_c=25"]


def test_the_colour_match_fits_the_reference_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(LAB), "--program", str(PROGRAM), *ASSUME]) == 0
    out = capsys.readouterr().out
    # 32 corners, 8 of them excluded by the program's constraints (too little or too much dye)
    assert "dry run of 25 points (corners and centre the constraints allow): 25 pass" in out


def test_unknown_measured_values_are_named_with_what_to_assume(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", str(LAB), "--program", str(PROGRAM)]) == 0  # refusals: printed
    out = capsys.readouterr().out
    assert "25 refused" in out
    assert "heater-needs-stirring-and-closed-lid cannot be evaluated" in out
    assert "say what to assume, e.g. --assume enclosure.lid=<value>" in out


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = PROGRAM.read_text()
    assert old in text
    path = tmp_path / "program.md"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "  - call: enclosure.set_light\n    args: {on: true, intensity: light_intensity}",
            "  - call: enclosure.set_lamp\n    args: {on: true, intensity: light_intensity}",
            "recipe[2].call: enclosure (enclosure) has no command 'set_lamp' (it declares: ",
        ),
        (
            "args: {volume_ml: red_ml, rate_ml_min: rate_ml_min}",
            "args: {volume_ml: red_ml, speed: rate_ml_min}",
            "recipe[4].args.speed: red.dispense() has no argument 'speed'; it takes dispense(",
        ),
        (
            "args: {volume_ml: red_ml, rate_ml_min: rate_ml_min}",
            "args: {volume_ml: red_ml}",
            "recipe[4].args: red.dispense() needs rate_ml_min (a number > 0 mL/min)",
        ),
        (
            "    args: {timeout: 300, poll_interval: 0.05}",
            "    args: {timeout: -1, poll_interval: 0.05}",
            "recipe[7].args.timeout: timeout must be a number > 0 s, got -1",
        ),
        (
            "  - capture: camera                    # the scene",
            "  - capture: cam                    # the scene",
            "recipe[3].capture: the station has no instrument 'cam'",
        ),
    ],
)
def test_a_recipe_that_does_not_fit_the_station_names_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, problem: str
) -> None:
    path = _broken(tmp_path, old, new)
    assert main(["check", str(LAB), "--program", str(path), *ASSUME]) == 1
    err = capsys.readouterr().err
    assert f"{path}:" in err and problem in err, err


def test_a_bad_assumption_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(LAB), "--program", str(PROGRAM), "--assume", "lid"]) == 1
    err = capsys.readouterr().err
    assert "--assume: 'lid': give CHANNEL=VALUE, e.g. enclosure.lid=closed" in err
    assert "Traceback" not in err


def test_a_recipe_file_s_problems_name_that_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``recipe: steps.yaml``: the station's problems with a step point into the recipe file."""
    text = PROGRAM.read_text()
    head, rest = text.split("recipe:\n", 1)
    steps, tail = rest.split("verification:", 1)
    steps = steps.replace("call: enclosure.set_light", "call: enclosure.set_lamp", 1)
    (tmp_path / "steps.yaml").write_text(steps)
    path = tmp_path / "program.md"
    path.write_text(f"{head}recipe: steps.yaml\nverification:{tail}")
    assert main(["check", str(LAB), "--program", str(path), *ASSUME]) == 1
    err = capsys.readouterr().err
    line = 1 + steps[: steps.index("enclosure.set_lamp")].count("\n")
    assert (
        f"{tmp_path / 'steps.yaml'}:{line}: [2].call: enclosure (enclosure) has no command" in err
    )
