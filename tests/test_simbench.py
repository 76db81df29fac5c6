"""The simulated lab end to end: every instrument of every station through ``instruments.connect``,
and the ``labbridge`` command line (as a subprocess, as a user runs it)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_campaign_cli import running_step

import instruments
from bridge.labconfig import load_lab
from bridge.simbench import sim_campaign
from loops.journal import Journal
from loops.program import Program, builtin_program, load_program
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


def small_program(budget: int = 2) -> Program:
    base = load_program(builtin_program("color-match"))
    return dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=budget),
        stop=dataclasses.replace(base.stop, target=None),
        initial_points=min(2, budget),
    )


@pytest.mark.timeout(120)
async def test_sim_campaign_on_the_embedded_broker(ray_session: Any, tmp_path: Path) -> None:
    """The pip-only path of `labbridge sim` (no mosquitto): amqtt broker, MQTT 3.1.1."""
    summary = await sim_campaign(
        small_program(),
        campaign_id="emb",
        out=tmp_path / "emb",
        speed=500,
        embedded_broker=True,
        progress=False,
    )
    assert summary.state == "done" and summary.counts["done"] == 2, summary
    lab = load_lab(tmp_path / "emb" / "lab.yaml")
    assert lab.simulated and lab.speed == 500
    j = Journal(tmp_path / "emb" / "journal.db")
    try:
        exps = j.experiments("emb")
    finally:
        j.close()
    assert [e.verified for e in exps] == [True, True]  # calibrated and verified by the camera
    assert all(Path(e.result["images"]["outcome"]["path"]).exists() for e in exps)


@pytest.mark.timeout(180)
def test_labbridge_sim_command_runs_a_campaign_to_its_target(
    ray_session: Any, tmp_path: Path
) -> None:
    if mosquitto_binary() is None and os.environ.get("CI"):
        pytest.fail("mosquitto must be installed in CI (.ci/run installs it)")
    out = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address
    proc = run_cli(
        "sim",
        "--speed",
        "500",
        "--stations",
        "2",
        "--out",
        str(out),
        "--ray-address",
        address,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    assert "campaign run: done: target reached: delta_e2000=" in proc.stdout, proc.stdout
    assert f"run folder: {out}" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {
        "lab.yaml",
        "journal.db",
        "images",
        "setup",
        "report",
    }
    assert f"report: {out / 'report' / 'report.html'}" in proc.stdout
    html = (out / "report" / "report.html").read_text()
    assert "target reached" in html and "contact-sheet.png" in html
    assert "exp" in proc.stderr  # the progress bar
    j = Journal(out / "journal.db")
    try:
        exps = j.experiments("run")
    finally:
        j.close()
    assert {e.station for e in exps if e.station} == {"bench-a", "bench-b"}
    assert min(e.objective for e in exps if e.state == "done" and e.verified) <= 2.0


def test_cli_rejects_bad_input_with_clear_errors(tmp_path: Path) -> None:
    proc = run_cli("sim", "--fault", "gremlins", "--out", str(tmp_path / "x"), "--speed", "100")
    assert proc.returncode == 1
    assert "unknown fault 'gremlins' (known: clogged-pump, " in proc.stderr
    proc = run_cli("sim", "--campaign", str(tmp_path / "nope.md"), "--out", str(tmp_path / "y"))
    assert proc.returncode == 1 and "nope.md" in proc.stderr
    proc = run_cli("sim", "--speed", "-3")
    assert proc.returncode == 2 and "must be > 0" in proc.stderr
    proc = run_cli("probe", "hotplate", "modbus-tcp://127.0.0.1:1?unit=1&timout=2")
    assert proc.returncode == 1 and "unknown option(s): timout" in proc.stderr
    proc = run_cli("probe", "thermocycler", "serial:///dev/null")
    assert proc.returncode == 1 and "no driver registered for kind 'thermocycler'" in proc.stderr


def test_every_command_has_help() -> None:
    for cmd in ([], ["sim"], ["run"], ["resume"], ["setup"], ["check"], ["drivers"], ["probe"]):
        proc = run_cli(*cmd, "--help")
        assert proc.returncode == 0 and "usage: labbridge" in proc.stdout
    proc = run_cli("drivers")
    assert proc.stdout.split() == [
        "balance",
        "camera",
        "color-sensor",
        "enclosure",
        "hotplate",
        "ph-meter",
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


def _read_until(proc: subprocess.Popen[str], marker: str, seen: str, deadline: float) -> str:
    """Read the process's stderr lines (appended to ``seen``) until ``marker`` shows."""
    assert proc.stderr is not None
    while marker not in seen:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, f"sim exited early: {seen}"
        seen += line
        assert time.monotonic() < deadline, seen
    return seen


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


@pytest.mark.timeout(150)
def test_sigterm_stops_a_keep_running_lab_cleanly(ray_session: Any, tmp_path: Path) -> None:
    prog = tmp_path / "small.md"
    prog.write_text(small_program(1).to_markdown())
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            *LABBRIDGE,
            "sim",
            "--keep-running",
            "--speed",
            "500",
            "--campaign",
            str(prog),
            "--out",
            str(tmp_path / "run"),
            "--ray-address",
            address,
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        seen = _read_until(proc, "simulated lab serving its MQTT campaign API", "", deadline)
        seen = _read_until(proc, "Ctrl-C to stop", seen, deadline)
        assert "its stations are held by this service" in seen
        assert "labbridge run PROGRAM --lab" not in seen  # that route cannot work: ports held
        url = seen.split("MQTT campaign API on ", 1)[1].split()[0]
        # the line is printed once the API is subscribed: an e-stop right after it is acted on
        estop = run_cli(
            "estop", "--broker", url, "--bridge-id", "labbridge-sim", "--reason", "at once"
        )
        assert estop.returncode == 0 and "bench-a: tripped" in estop.stdout, estop
        status = run_cli("status", "--broker", url, "--bridge-id", "labbridge-sim", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["status"]["state"] == "online", status.stdout
        helpers = _children(proc.pid)
        assert helpers, "the simulated lab should run a broker and a dbus-daemon as children"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopping the simulated lab" in err and "campaign run: done" in out
        time.sleep(0.2)
        assert not [pid for pid in helpers if _alive(pid)], "simulator processes outlived the lab"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(150)
def test_sigterm_during_the_campaign_safe_states_every_station(
    ray_session: Any, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            *LABBRIDGE,
            "sim",
            "--speed",
            "100",
            "--stations",
            "2",
            "--out",
            str(out),
            "--ray-address",
            address,
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        # mid-experiment: a step after the first of a running experiment has started
        while (at := running_step(out / "journal.db", "run")) is None or at[1] < 1:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no experiment started"
            time.sleep(0.05)
        helpers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        assert "SIGTERM: stopping campaign run: every station to its safe state" in err
        assert "campaign run: aborted: aborted: SIGTERM received" in stdout
        assert f"labbridge resume run --runs {tmp_path}" in stdout
        j = Journal(out / "journal.db")
        try:
            stopped = j.experiment(at[0])
        finally:
            j.close()
        assert stopped.state == "failed" and "SIGTERM" in (stopped.reason or "")
        time.sleep(0.2)
        assert not [pid for pid in helpers if _alive(pid)], "simulator processes outlived the lab"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(60)
def test_helper_processes_die_with_a_killed_lab() -> None:
    """kill -9 of the process running a simulated lab leaves no broker or bus daemon behind."""
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
