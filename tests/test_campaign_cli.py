"""``labbridge run`` / ``labbridge resume`` as a user runs them (subprocesses, a simulated lab
started by the command itself, joining the session's Ray)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loops.journal import Journal
from loops.program import load_program

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"


async def labbridge(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 120) -> tuple[int, str]:
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.read(), timeout)
    return await proc.wait(), out.decode(errors="replace")


def running_step(store: Path, cid: str) -> tuple[str, int] | None:
    """The experiment running now and the step it started last, if any."""
    if not store.exists():
        return None
    j = Journal(store)
    try:
        for e in j.experiments(cid, "running"):
            if e.step is not None:
                return e.id, e.step
    except Exception:  # the campaign row is not there yet
        return None
    finally:
        j.close()
    return None


@pytest.mark.timeout(240)
async def test_ctrl_c_stops_safely_and_resume_finishes(ray_session: Any, tmp_path: Path) -> None:
    address = ray_session.get_runtime_context().gcs_address
    base = load_program(EXAMPLE)
    program = dataclasses.replace(
        base,
        budget=dataclasses.replace(base.budget, experiments=3),
        stop=dataclasses.replace(base.stop, target=None),
        initial_points=2,
    )
    prog_file = tmp_path / "program.md"
    prog_file.write_text(program.to_markdown())
    common = ("--runs", str(tmp_path / "runs"), "--speed", "500", "--ray-address", address)
    store = tmp_path / "runs" / "sig" / "journal.db"

    proc = await labbridge("run", str(prog_file), "--campaign-id", "sig", "--no-progress", *common)
    deadline = time.monotonic() + 90
    while (at := running_step(store, "sig")) is None or at[1] < 3:
        assert proc.returncode is None, (await finish(proc))[1]
        assert time.monotonic() < deadline, "no experiment reached step 3"
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code, out = await finish(proc)
    assert code == 3, out
    assert "campaign sig: aborted: aborted: SIGINT received" in out, out
    assert "to carry on: labbridge resume sig" in out, out
    j = Journal(store)
    try:
        assert j.campaign("sig").state == "aborted"
        stopped = j.experiment(at[0])
    finally:
        j.close()
    assert stopped.state == "failed", stopped
    assert "SIGINT" in (stopped.reason or ""), stopped.reason

    proc = await labbridge("resume", "sig", *common)
    code, out = await finish(proc)
    assert code == 0, out
    assert "campaign sig: done: experiment budget spent: 3 of 3" in out, out
    report = tmp_path / "runs" / "sig" / "report" / "report.html"  # run and resume write one
    assert f"report: {report}" in out and report.exists(), out
    j = Journal(store)
    try:
        exps = j.experiments("sig")
        again = j.experiment(at[0])
    finally:
        j.close()
    assert again.state == "failed" and again.updated == stopped.updated  # untouched, not re-run
    assert sum(e.state in ("done", "failed") for e in exps) == 3


async def test_resume_without_a_journal_says_where_it_looked(tmp_path: Path) -> None:
    proc = await labbridge("resume", "nothing-here", "--runs", str(tmp_path))
    code, out = await finish(proc, 60)
    assert code == 1
    assert f"no journal {tmp_path / 'nothing-here' / 'journal.db'}" in out, out


async def test_run_with_a_bad_program_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "program.md"
    bad.write_text(EXAMPLE.read_text().replace("direction: minimize", "direction: down"))
    proc = await labbridge("run", str(bad), "--runs", str(tmp_path))
    code, out = await finish(proc, 60)
    assert code == 1
    assert f"{bad}:" in out and "objective.direction" in out, out


@pytest.mark.timeout(180)
async def test_setup_then_a_real_lab_needs_its_set_up(ray_session: Any, tmp_path: Path) -> None:
    import yaml

    from bridge.simbench import sim_lab_yaml
    from simulators.bench import SimulatedLab

    address = ray_session.get_runtime_context().gcs_address
    async with SimulatedLab(stations=1, speed=500) as sim:
        text = sim_lab_yaml(sim, tmp_path / "journal.db")
        real = yaml.safe_load(text)
        del real["simulated"]  # as a bench PC's lab.yaml: no simulated clock, no self-set-up
        lab_file = tmp_path / "lab.yaml"
        lab_file.write_text(yaml.safe_dump(real))
        proc = await labbridge(
            "run", str(EXAMPLE), "--lab", str(lab_file), "--ray-address", address
        )
        code, out = await finish(proc)
        assert code == 1, out
        assert "station bench-a: set-up 'camera-calibration' has not run" in out, out
        assert f"labbridge setup --lab {lab_file}" in out, out

        lab_file.write_text(text)  # the simulated clock again, for the pumps' timing
        proc = await labbridge("setup", "--lab", str(lab_file), "--ray-address", address)
        code, out = await finish(proc)
        assert code == 0, out
        saved = tmp_path / "setup" / "bench-a.yaml"
        assert f"bench-a: camera-calibration done; kept in {saved}" in out, out
        kept = yaml.safe_load(saved.read_text())
        assert kept["ran"]["camera-calibration"]["who"] == "operator:setup"
        data = kept["values"]["calibration"]
        assert data["format"] == "labbridge.vision.calibration/1"
        assert data["fill"]["volumes_ml"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
        assert max(abs(r) for r in data["fill"]["residuals_ml"]) < 0.05
