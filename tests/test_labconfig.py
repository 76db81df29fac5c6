"""lab.yaml: a valid file loads; every mistake names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.labconfig import LabConfigError, load_lab
from safety.envelope import REFERENCE_BENCH, EnvelopeError

GOOD = """\
bridge_id: bench-lab
store: data/labbridge.db
ray:
  address: null
simulated:
  speed: 100
  sim_at_real: [1.5, 200.25]
env:
  DBUS_SYSTEM_BUS_ADDRESS: unix:path=/tmp/bus
stations:
  bench-a:
    envelope: reference
    supervisor: {poll_interval: 0.1, device_time_scale: 100}
    instruments:
      - {name: red, kind: syringe-pump, url: "serial:///dev/ttyUSB0?baudrate=9600", options: {address: 0}}
      - {name: hotplate, kind: hotplate, url: "modbus-tcp://127.0.0.1:5020?unit=1"}
    env: {EXTRA: "1"}
"""


def test_a_valid_lab_loads(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD)
    lab = load_lab(path)
    assert lab.bridge_id == "bench-lab"
    assert lab.store == tmp_path / "data" / "labbridge.db"  # relative to the file
    assert lab.simulated and lab.speed == 100.0 and lab.sim_at_real == (1.5, 200.25)
    assert lab.ray_address is None
    st = lab.stations["bench-a"]
    assert [i["name"] for i in st.instruments] == ["red", "hotplate"]
    assert st.instruments[0] == {
        "name": "red",
        "kind": "syringe-pump",
        "url": "serial:///dev/ttyUSB0?baudrate=9600",
        "options": {"address": 0},
    }
    assert st.envelope_text == REFERENCE_BENCH.read_text(encoding="utf-8")
    assert st.env == {"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/tmp/bus", "EXTRA": "1"}
    assert st.supervisor == {"poll_interval": 0.1, "device_time_scale": 100}


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "problem"),
    [
        ("stations:\n", "statons:\n", 10, "statons", "unknown field 'statons'"),
        (
            'url: "modbus-tcp://127.0.0.1:5020?unit=1"',
            'url: "127.0.0.1:5020"',
            16,
            "stations.bench-a.instruments[1].url",
            "not a transport URL",
        ),
        (
            "name: hotplate,",
            "name: red,",
            16,
            "stations.bench-a.instruments[1].name",
            "duplicate instrument name 'red'",
        ),
        (
            "{poll_interval: 0.1,",
            "{poll_interval: -1,",
            13,
            "stations.bench-a.supervisor.poll_interval",
            "must be a number > 0",
        ),
        (
            "{poll_interval: 0.1,",
            "{poll_intervall: 0.1,",
            13,
            "stations.bench-a.supervisor.poll_intervall",
            "unknown field",
        ),
        ("  speed: 100\n", "  speed: fast\n", 6, "simulated.speed", "must be a number > 0"),
        ("[1.5, 200.25]", "[1.5]", 7, "simulated.sim_at_real", "[simulated seconds, monotonic"),
        ("kind: hotplate, ", "", 16, "stations.bench-a.instruments[1]", "missing field 'kind'"),
        (
            "envelope: reference",
            "envelope: nowhere.yaml",
            12,
            "stations.bench-a.envelope",
            "cannot read envelope",
        ),
        ("bridge_id: bench-lab", "bridge_id: bench lab", 1, "bridge_id", "is not a name"),
    ],
)
def test_mistakes_name_file_line_and_field(
    tmp_path: Path, old: str, new: str, line: int, field: str, problem: str
) -> None:
    assert old in GOOD
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(LabConfigError) as err:
        load_lab(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: {field}: "), msg
    assert problem in msg, msg


def test_an_envelope_error_names_the_envelope_file(tmp_path: Path) -> None:
    (tmp_path / "env.yaml").write_text("channels:\n  hotplate.setpoint_c: {min: 0, max: hot}\n")
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD.replace("envelope: reference", "envelope: env.yaml"))
    with pytest.raises(EnvelopeError, match=r"env\.yaml:2: channels\.hotplate\.setpoint_c\.max"):
        load_lab(path)


def test_no_stations_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(LabConfigError, match="missing field 'stations'"):
        load_lab("bridge_id: x\n", source="inline")
    with pytest.raises(LabConfigError, match=r"nope\.yaml: cannot read"):
        load_lab(tmp_path / "nope.yaml")
    with pytest.raises(LabConfigError, match=r"inline:2: not valid YAML"):
        load_lab("stations: [\n", source="inline")


def test_the_hardware_template_is_a_valid_lab() -> None:
    import safety

    lab = load_lab(Path(__file__).resolve().parents[1] / "examples" / "lab-hardware.yaml")
    st = lab.stations["bench-a"]
    assert [i["name"] for i in st.instruments] == [
        "red",
        "green",
        "blue",
        "waste",
        "hotplate",
        "color",
        "enclosure",
        "camera",
    ]
    assert {i["kind"] for i in st.instruments} <= set(safety.available_drivers())
    assert not lab.simulated and lab.ray_address is None
    assert st.verification is not None  # a station with a camera verifies by default
    assert st.verification.calibration_path == lab.store.parent / "calibration" / "bench-a.yaml"
    assert st.verification.max_disagreements == 3


def test_verification_options(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD)
    assert load_lab(path).stations["bench-a"].verification is None  # no camera: nothing to verify
    with_camera = GOOD.replace(
        '    env: {EXTRA: "1"}\n',
        '      - {name: camera, kind: camera, url: "camera://0"}\n'
        '    env: {EXTRA: "1"}\n'
        "    verification: {calibration: cal/a.yaml, max_disagreements: 5}\n",
    )
    path.write_text(with_camera)
    v = load_lab(path).stations["bench-a"].verification
    assert v is not None and v.calibration_path == tmp_path / "cal" / "a.yaml"
    assert v.max_disagreements == 5
    assert v.calibration() is None  # not made yet
    v.save({"format": "labbridge.vision.calibration/1"})
    assert v.calibration() == {"format": "labbridge.vision.calibration/1"}
    path.write_text(with_camera.replace("max_disagreements: 5", "max_disagreements: 0"))
    with pytest.raises(
        LabConfigError, match=r"verification\.max_disagreements: must be an integer"
    ):
        load_lab(path)
    path.write_text(
        GOOD.replace(
            '    env: {EXTRA: "1"}\n', '    env: {EXTRA: "1"}\n    verification: {enabled: true}\n'
        )
    )
    with pytest.raises(LabConfigError, match="verification needs a camera"):
        load_lab(path)


def test_check_finds_what_the_format_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main

    template = Path(__file__).resolve().parents[1] / "examples" / "lab-hardware.yaml"
    assert load_lab(template).check() == []
    assert main(["check", str(template)]) == 0
    out = capsys.readouterr().out
    assert "station bench-a: 8 instruments: red (syringe-pump), green (syringe-pump)" in out
    assert "camera verification: NOT CALIBRATED" in out and f"{template}: OK" in out
    # every actuated channel and how the envelope bounds it, from the drivers' declarations
    assert "hotplate.setpoint_c: >= 0, <= 80, rises <= 10/min degC  [hotplate.set_heater()" in out
    assert (
        "vial.volume: <= 2.8 mL  [red.dispense(), green.dispense(), blue.dispense(), "
        "waste.withdraw()]" in out
    )
    assert "color.continuous: NOT BOUNDED: its commands are refused" in out
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD)  # two instruments: the reference envelope names the others
    [problem] = load_lab(path).check()
    assert "unknown instrument 'enclosure'" in problem and "(station bench-a)" in problem

    bad = (
        GOOD.replace("?unit=1", "?unitt=1")
        .replace("kind: syringe-pump", "kind: syringe-pmup")
        .replace("envelope: reference", "envelope: own.yaml")
    )
    (tmp_path / "own.yaml").write_text(
        "channels:\n  stirrer.rpm: {min: 0, max: 1000}\n"  # no instrument 'stirrer' here
    )
    path.write_text(bad)
    problems = load_lab(path).check()
    assert len(problems) == 3, problems
    assert "own.yaml" in problems[0] and "unknown instrument 'stirrer'" in problems[0]
    assert problems[1].startswith(f"{path}:15: stations.bench-a.instruments[0]: ")
    assert "no driver registered for kind 'syringe-pmup'" in problems[1]
    assert problems[2].startswith(f"{path}:16: stations.bench-a.instruments[1]: ")
    assert "unknown option(s): unitt" in problems[2]
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "unitt" in err


def test_check_validates_the_mqtt_block(tmp_path: Path) -> None:
    template = Path(__file__).resolve().parents[1] / "examples" / "lab-hardware.yaml"
    text = template.read_text()
    assert "password_env: LABBRIDGE_MQTT_PASSWORD" in text
    path = tmp_path / "lab.yaml"
    path.write_text(text.replace("password_env: LABBRIDGE_MQTT_PASSWORD", "password: hunter2"))
    [problem] = load_lab(path).check()
    assert problem.startswith(f"{path}:") and "mqtt.password" in problem
    assert "never inline" in problem
    path.write_text(text.replace("mqtt://labbridge@", "http://labbridge@"))
    [problem] = load_lab(path).check()
    assert "mqtt.url" in problem, problem
