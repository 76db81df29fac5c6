"""lab.yaml: a valid file loads; every mistake names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.labconfig import LabConfigError, load_lab
from safety.envelope import EnvelopeError
from safety.envelopeload import REFERENCE_BENCH
from safety.yamldoc import ConfigError

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
        ("  address: null\n", "  lease_s: 1\n", 4, "ray.lease_s", "must be 2 to 300 seconds"),
        ("  address: null\n", "  lease_s: soon\n", 4, "ray.lease_s", "must be a number > 0"),
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
    assert st.verification is not None  # on by default: the program's checks run
    assert st.verification.max_disagreements == 3
    assert [r.name for r in st.setup] == ["camera-calibration"]  # setup: [reference]
    assert st.setup_store is not None
    assert st.setup_store.path == lab.store.parent / "setup" / "bench-a.yaml"


def test_verification_options(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD)
    assert load_lab(path).stations["bench-a"].verification is not None  # on by default
    path.write_text(GOOD + "    verification: {max_disagreements: 5}\n")
    v = load_lab(path).stations["bench-a"].verification
    assert v is not None and v.max_disagreements == 5
    path.write_text(GOOD + "    verification: {enabled: false}\n")
    assert load_lab(path).stations["bench-a"].verification is None
    path.write_text(GOOD + "    verification: {max_disagreements: 0}\n")
    with pytest.raises(
        LabConfigError, match=r"verification\.max_disagreements: must be an integer"
    ):
        load_lab(path)
    path.write_text(GOOD + "    verification: {calibration: cal/a.yaml}\n")
    with pytest.raises(LabConfigError, match=r"lab.yaml:18: .*verification.calibration is gone"):
        load_lab(path)


SETUP = """    setup:
      - name: prime
        every: campaign
        fixed: {volume_ml: 0.2}
        recipe:
          - call: red.dispense
            args: {volume_ml: volume_ml, rate_ml_min: 5}
          - compute: primed_ml
            expr: volume_ml
        keep: [primed_ml]
"""


def test_set_up_recipes_inline_or_in_files(tmp_path: Path) -> None:
    from loops.setup import SetupStore

    path = tmp_path / "lab.yaml"
    path.write_text(GOOD + SETUP)
    st = load_lab(path).stations["bench-a"]
    (prime,) = st.setup
    assert (prime.name, prime.every, prime.keep) == ("prime", "campaign", ("primed_ml",))
    assert str(prime.recipe.steps[0]) == "red.dispense(volume_ml=0.2, rate_ml_min=5)"
    store = st.setup_store
    assert store is not None and store.path == tmp_path / "setup" / "bench-a.yaml"
    assert store.pending(st.setup) == [prime]  # never ran
    store.record(prime, {"primed_ml": 0.2}, who="ada")
    assert SetupStore(store.path).values() == {"primed_ml": 0.2}
    assert SetupStore(store.path).load()["ran"]["prime"]["who"] == "ada"
    assert store.pending(st.setup) == [prime]  # every: campaign -> before each campaign
    once = SETUP.replace("every: campaign", "every: once")
    path.write_text(GOOD + once)
    st = load_lab(path).stations["bench-a"]
    assert st.setup_store is not None and st.setup_store.pending(st.setup) == []  # ran once
    # a file, relative to the lab file, with its own file:line errors
    (tmp_path / "prime.yaml").write_text(
        "name: prime\n"
        "fixed: {volume_ml: 0.2}\n"
        "recipe:\n"
        "  - call: red.dispense\n"
        "    args: {volume_ml: volume_ml, rate_ml_min: 5}\n"
        "  - compute: primed_ml\n"
        "    expr: volume_ml\n"
        "keep: [primed_ml]\n"
    )
    path.write_text(GOOD + "    setup: [prime.yaml]\n    setup_file: state/a.yaml\n")
    st = load_lab(path).stations["bench-a"]
    assert [r.name for r in st.setup] == ["prime"] and st.setup[0].source == str(
        tmp_path / "prime.yaml"
    )
    assert st.setup_store is not None and st.setup_store.path == tmp_path / "state" / "a.yaml"
    (tmp_path / "prime.yaml").write_text(
        (tmp_path / "prime.yaml").read_text().replace("primed_ml]", "primed]")
    )
    with pytest.raises(
        ConfigError, match=r"prime.yaml:8: keep\[0\]: the recipe does not measure 'primed'"
    ):
        load_lab(path)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            ("every: campaign", "every: daily"),
            r"lab.yaml:20: stations.bench-a.setup\[0\].every: must be one of once, campaign",
        ),
        (
            ("volume_ml: 0.2}", "volume_ml: 0.2, spare: 1}"),
            r"setup\[0\].fixed.spare: 'spare' is used by no step",
        ),
        (("call: red.dispense", "call: red dispense"), r"setup\[0\].recipe\[0\].call"),
        (
            ("keep: [primed_ml]", "keep: [nope]"),
            r"setup\[0\].keep\[0\]: the recipe does not measure 'nope'",
        ),
        (
            ("- name: prime", "- name: prime\n        when: x"),
            r"setup\[0\].when: unknown key 'when'",
        ),
    ],
)
def test_set_up_mistakes_name_file_line_and_field(
    tmp_path: Path, change: tuple[str, str], words: str
) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(GOOD + SETUP.replace(*change))
    with pytest.raises(LabConfigError, match=words):
        load_lab(path)
    path.write_text(GOOD + "    setup: [missing.yaml]\n")
    with pytest.raises(LabConfigError, match=r"setup\[0\]: no set-up recipe file"):
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
    assert "set-up camera-calibration (once): NOT RUN: labbridge setup" in out
    assert f"{template}: OK" in out
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


def test_the_api_rate_limit_and_queue_come_from_lab_yaml(tmp_path: Path) -> None:
    from bridge.labmqtt import mqtt_settings

    path = tmp_path / "lab.yaml"

    def settings(extra: str) -> Any:
        path.write_text(GOOD + "mqtt:\n  url: mqtt://svc@broker.lab\n" + extra)
        return mqtt_settings(load_lab(path))

    s = settings("")
    assert (s.request_rate, s.request_burst, s.queue_size) == (20.0, 40, 64)
    s = settings("  request_rate: 2\n  request_burst: 5\n  queue_size: 8\n")
    assert (s.request_rate, s.request_burst, s.queue_size) == (2.0, 5, 8)
    with pytest.raises(LabConfigError, match=r"mqtt.request_rate: must be a number in"):
        settings("  request_rate: 0\n")
