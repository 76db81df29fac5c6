"""The simulated lab end to end: every instrument of every station through ``instruments.connect``,
and the ``labbridge`` command line (as a subprocess, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import instruments
from bridge.simbench import sim_tour
from simulators.bench import SimulatedLab
from simulators.broker import mosquitto_binary

LABBRIDGE = [sys.executable, "-m", "bridge.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [*LABBRIDGE, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.timeout(90)
async def test_two_stations_every_instrument_answers() -> None:
    async with SimulatedLab(stations=2, speed=50) as lab:
        config = lab.lab_config()
        assert set(config["stations"]) == {"bench-a", "bench-b"}
        seen_urls: set[str] = set()
        for bench in lab.stations:
            specs = {s.name: s for s in bench.instruments()}
            assert set(specs) == {
                "red",
                "green",
                "blue",
                "waste",
                "hotplate",
                "color",
                "enclosure",
                "camera",
            }
            seen_urls.update(s.url for s in specs.values())
            async with instruments.connect(
                "syringe-pump", specs["blue"].url, **specs["blue"].options
            ) as pump:
                await pump.dispense(0.8, 20.0)
                await pump.wait_until_stopped(timeout=10)
                assert (await pump.dispensed())[0] == pytest.approx(0.8)
            async with instruments.connect("hotplate", specs["hotplate"].url) as hp:
                await hp.set_stirrer(True, 250)
                assert (await hp.read())["stirrer_enabled"] is True
            async with instruments.connect("color-sensor", specs["color"].url) as sensor:
                reading = await sensor.measure()
                assert reading.status == "ok"
                assert reading.red < reading.blue  # blue dye in the vial: red absorbed
            async with instruments.connect(
                "enclosure", specs["enclosure"].url, **specs["enclosure"].options
            ) as enc:
                await enc.set_light(True, 0.5)
                assert (await enc.read())["light_on"] is True
            async with instruments.connect("camera", specs["camera"].url) as cam:
                frame = await cam.capture()
                assert frame.image.shape == (480, 640, 3)
            # safe state on exit reached the devices: stirrer off, light off
            assert bench.world.hotplate.stirrer_enabled is False
            assert bench.world.enclosure.light_on is False
        # the blue dye went only into station a's vial when we dispensed there ... and b's into b's
        assert lab.stations[0].world.vial.species_ml["blue"] > 0.4
        assert lab.stations[1].world.vial.species_ml["blue"] > 0.4
        # each station has its own pump line, hotplate, sensor and camera; the enclosures share
        # the broker and are told apart by their id
        assert len(seen_urls) == 2 * 4 + 1
        assert {b.enclosure_id for b in lab.stations} == {"enc-1", "enc-2"}


@pytest.mark.timeout(90)
async def test_sim_tour_on_the_embedded_broker(tmp_path: Path) -> None:
    """The pip-only path of `labbridge sim` (no mosquitto): amqtt broker, MQTT 3.1.1."""
    results = await sim_tour(stations=1, speed=100, out=tmp_path, embedded_broker=True)
    (rec,) = results
    assert rec["station"] == "bench-a"
    assert rec["world"]["vial"]["volume_ml"] == pytest.approx(0.0, abs=0.05)  # drained at the end
    assert rec["hotplate"]["liquid_c"] > 35.0  # it was heated towards 60 degC
    assert (tmp_path / rec["image"]).stat().st_size > 1000
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["colour"]["status"] == "ok"


@pytest.mark.timeout(120)
def test_labbridge_sim_command_runs_end_to_end(tmp_path: Path) -> None:
    if mosquitto_binary() is None and os.environ.get("CI"):
        pytest.fail("mosquitto must be installed in CI (.ci/run installs it)")
    out = tmp_path / "run"
    proc = run_cli("sim", "--speed", "100", "--stations", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "bench-a: colour counts" in proc.stdout and "bench-b: colour counts" in proc.stdout
    assert f"run folder: {out}" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {
        "lab.yaml",
        "results.jsonl",
        "bench-a.jpg",
        "bench-b.jpg",
    }
    assert "10/10" in proc.stderr  # the progress display reached the end
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_cli_rejects_bad_input_with_clear_errors(tmp_path: Path) -> None:
    proc = run_cli("sim", "--fault", "gremlins", "--out", str(tmp_path / "x"), "--speed", "100")
    assert proc.returncode == 1
    assert "unknown fault 'gremlins'" in proc.stderr
    proc = run_cli("sim", "--speed", "-3")
    assert proc.returncode == 2 and "must be > 0" in proc.stderr
    proc = run_cli("probe", "hotplate", "modbus-tcp://127.0.0.1:1?unit=1&timout=2")
    assert proc.returncode == 1 and "unknown option(s): timout" in proc.stderr
    proc = run_cli("probe", "thermocycler", "serial:///dev/null")
    assert proc.returncode == 1 and "no driver registered for kind 'thermocycler'" in proc.stderr


def test_every_command_has_help() -> None:
    for cmd in ([], ["sim"], ["drivers"], ["probe"]):
        proc = run_cli(*cmd, "--help")
        assert proc.returncode == 0 and "usage: labbridge" in proc.stdout
    proc = run_cli("drivers")
    assert proc.stdout.split() == [
        "camera",
        "color-sensor",
        "enclosure",
        "hotplate",
        "syringe-pump",
    ]


@pytest.mark.timeout(60)
async def test_probe_talks_to_a_simulated_hotplate() -> None:
    import asyncio

    async with SimulatedLab(stations=1, speed=10) as lab:
        url = lab.stations[0].hotplate.url
        proc = await asyncio.create_subprocess_exec(
            *LABBRIDGE,
            "probe",
            "hotplate",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["describe"]["kind"] == "hotplate"
    assert result["read"]["plate_c"] == pytest.approx(22.0, abs=2.0)


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids.update(int(k) for k in text)
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.timeout(90)
def test_sigterm_stops_a_keep_running_lab_cleanly(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [*LABBRIDGE, "sim", "--keep-running", "--speed", "100", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "simulated lab running" not in seen:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"sim exited early: {seen}"
            seen += line
            assert time.monotonic() < deadline, seen
        helpers = _children(proc.pid)
        assert helpers, "the simulated lab should run a broker and a dbus-daemon as children"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "safe state" in err
        time.sleep(0.2)
        assert not [pid for pid in helpers if _alive(pid)], "simulator processes outlived the lab"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(90)
def test_sigterm_during_the_experiment_estops_every_station(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [*LABBRIDGE, "sim", "--speed", "10", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "dispensed" not in seen:  # mid-experiment, stations open behind the guard
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"sim exited early: {seen}"
            seen += line
            assert time.monotonic() < deadline, seen
        helpers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "e-stop:" in err and "bench-a" in err
        time.sleep(0.2)
        assert not [pid for pid in helpers if _alive(pid)], "simulator processes outlived the lab"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(60)
def test_helper_processes_die_with_a_killed_lab() -> None:
    """kill -9 of the process running a simulated lab leaves no broker or bus daemon behind."""
    import signal
    import time

    script = (
        "import asyncio\n"
        "from simulators.bench import SimulatedLab\n"
        "async def main():\n"
        "    async with SimulatedLab(speed=10):\n"
        "        print('READY', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        helpers = _children(proc.pid)
        assert helpers  # dbus-daemon, and mosquitto when installed (else the broker is in-process)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 5
        while [pid for pid in helpers if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in helpers if _alive(pid)], "helpers outlived a killed lab"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
