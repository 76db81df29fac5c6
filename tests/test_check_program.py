"""``labbridge check lab.yaml --program program.md``: a program against a lab, no hardware."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.cli import main
from bridge.simbench import sim_lab_yaml
from simulators.bench import SimulatedLab

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


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    ("old", "new", "at", "problem"),
    [
        (
            "  - wait: hotplate.plate_c < start_below_c",
            "  - wait: hotplate.plate_cc < start_below_c",
            "- wait: hotplate.plate_cc",
            "recipe[1].wait: hotplate (hotplate) has no reading 'plate_cc' (did you mean "
            "hotplate.plate_c?); it reads: heater_enabled, heating, liquid_c, max_c, ",
        ),
        (
            "  - read: {liquid_c: hotplate.liquid_c, plate_c: hotplate.plate_c}",
            "  - read: {liquid_c: hotplate.liquid_cc, plate_c: hotplate.plate_c}",
            "- read: {liquid_c: hotplate.liquid_cc",
            "recipe[17].read.liquid_c: hotplate (hotplate) has no reading 'liquid_cc' (did you "
            "mean hotplate.liquid_c?)",
        ),
        (
            "      hotplate.heater_enabled and hotplate.stirrer_enabled",
            "      hotplate.heater and hotplate.stirrer_enabled",
            "- hold: hold_s",
            "recipe[15].while: hotplate.heater is a channel hotplate's commands set, not a "
            "reading: a recipe sees what hotplate.read() returns (did you mean "
            "hotplate.heater_enabled?); ",
        ),
        (
            "  - wait: hotplate.plate_c < start_below_c",
            "  - wait: not red.flowing and hotplate.plate_c < start_below_c",
            "- wait: not red.flowing",
            "recipe[1].wait: red.flowing is the guard's own count of a flow it sent, not a "
            "reading: a recipe sees what red.read() returns (did you mean red.moving?)",
        ),
        (
            "  - read: {drained_ml: waste.withdrawn_ml}",
            "  - read: {drained_ml: waste.withdrawn}",
            "- read: {drained_ml: waste.withdrawn}",
            "recipe[25].read.drained_ml: waste (syringe-pump) has no reading 'withdrawn' (did "
            "you mean waste.withdrawn_ml?); it reads: alarm, alarmed, direction, infused_ml, "
            "moving, rate_ml_min, status, volume_ml, withdrawn_ml",
        ),
    ],
)
def test_a_reading_the_instrument_does_not_return_names_file_line_and_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    old: str,
    new: str,
    at: str,
    problem: str,
) -> None:
    path = _broken(tmp_path, old, new)
    assert main(["check", str(LAB), "--program", str(path), *ASSUME]) == 1
    captured = capsys.readouterr()
    assert f"{path}:{_line_of(path, at)}: {problem}" in captured.err, captured.err
    assert "dry run" not in captured.out  # the recipe does not fit: nothing is dry-run


def test_a_when_naming_a_reading_is_refused_where_it_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step's when is over parameters and fixed values (decided when the recipe is bound):
    a reading there is an unknown name, at its own line."""
    old = "  - read: {drained_ml: waste.withdrawn_ml}\n"
    path = _broken(tmp_path, old, old + "    when: waste.withdrawn_mll > 0\n")
    assert main(["check", str(LAB), "--program", str(path), *ASSUME]) == 1
    err = capsys.readouterr().err
    line = _line_of(path, "when: waste.withdrawn_mll")
    assert f"{path}:{line}: recipe[25].when: unknown name 'waste.withdrawn_mll'" in err, err


@pytest.mark.parametrize(
    "program",
    [
        ROOT / "loops" / "programs" / "color-match.md",
        ROOT / "examples" / "color-match-pareto" / "program.md",
    ],
)
def test_the_bundled_colour_programs_check_ok(
    program: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(LAB), "--program", str(program), *ASSUME]) == 0
    assert f"{LAB}: OK" in capsys.readouterr().out


@pytest.mark.timeout(60)
async def test_the_buffer_program_checks_ok_on_the_buffer_bench(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with SimulatedLab(stations=1, bench="buffer") as sim:
        lab = tmp_path / "lab.yaml"
        lab.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        program = ROOT / "examples" / "buffer" / "program.md"
        assert main(["check", str(lab), "--program", str(program)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "program buffer-ph on station bench-a: dry run of " in out and f"{lab}: OK" in out


@pytest.mark.timeout(60)
async def test_the_simulated_reference_lab_and_its_set_up_check_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The colour bench's lab (``setup: [reference]``): its set-up steps fit the station."""
    async with SimulatedLab(stations=2) as sim:
        lab = tmp_path / "lab.yaml"
        lab.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        assert main(["check", str(lab)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "set-up camera-calibration (once)" in out and f"{lab}: OK" in out


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


INLINE_SETUP = """    setup:
      - name: lamp
        recipe:
          - call: enclosure.set_light
            args: {on: true, intensity: 0.5}
          - call: enclosure.set_lamp
            args: {on: false}
"""


def _lab_with_setup(tmp_path: Path, setup: str) -> Path:
    text = LAB.read_text()
    assert "    setup: [reference]" in text
    lab = tmp_path / "lab.yaml"
    lab.write_text(text.replace("    setup: [reference]", setup.rstrip("\n"), 1))
    return lab


def test_a_set_up_step_that_does_not_fit_the_station_names_the_lab_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An inline set-up recipe (lab.yaml ``setup:``) is checked against its station like a
    program's recipe: a misspelled command is one line at its place in lab.yaml."""
    lab = _lab_with_setup(tmp_path, INLINE_SETUP)
    assert main(["check", str(lab)]) == 1
    err = capsys.readouterr().err
    line = _line_of(lab, "call: enclosure.set_lamp")
    assert (
        f"{lab}:{line}: stations.bench-a.setup[0].recipe[1].call: enclosure (enclosure) has no "
        "command 'set_lamp' (it declares: " in err
    ), err
    assert f"{lab}: 1 problem(s)" in err and err.count("set_lamp") == 1, err


def test_a_set_up_file_s_misspelled_reading_names_that_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A set-up recipe file (relative to the lab file): its problems point into it."""
    text = (ROOT / "loops" / "programs" / "reference-setup.yaml").read_text()
    old = "  - call: waste.wait_until_stopped\n    args: {timeout: 300, poll_interval: 0.05}\n"
    assert old in text
    setup = tmp_path / "reference-setup.yaml"
    setup.write_text(text.replace(old, old + "  - wait: hotplate.plate_cc < 30\n", 1))
    lab = _lab_with_setup(tmp_path, "    setup: [reference-setup.yaml]")
    assert main(["check", str(lab)]) == 1
    err = capsys.readouterr().err
    line = _line_of(setup, "wait: hotplate.plate_cc")
    assert (
        f"{setup}:{line}: recipe[19].wait: hotplate (hotplate) has no reading 'plate_cc' "
        "(did you mean hotplate.plate_c?)" in err
    ), err
    assert f"{lab}: 1 problem(s)" in err, err
