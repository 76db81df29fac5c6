"""Nothing left behind (issue 12): what a killed labbridge process leaves (its local Ray's
processes, its temp folders) is cleaned up when the next one starts, and nothing else is.

The first test kills a real ``labbridge run`` (simulated lab, its own local Ray) with
``kill -9`` and starts another labbridge command; the second checks, on small
processes, that only a dead owner's folder and processes are touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from loops.runfolder import RUN_PREFIX, clean_leftovers, system_temp

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import signal, subprocess, sys, tempfile, time
from loops.runfolder import note_children, run_folder

with run_folder() as folder:
    # a child that ignores SIGTERM, as Ray's agents do after their driver's kill -9
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    note_children()
    made = tempfile.mkdtemp(prefix="lb-ble-")  # a simulator's folder: inside the run folder
    # one write of a whole line: the two holders share the log, and print()'s pieces
    # (unbuffered here) could interleave with the other's
    sys.stdout.write(f"{folder.path} {child.pid} {made}\\n")
    time.sleep(600)
"""


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def gone(pid: int, create_time: float) -> bool:
    """The process ``pid`` started at ``create_time`` no longer runs (a zombie waiting for
    its reaper does not run)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) > 0.01 or (
            proc.status() == psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return True


async def wait_for(what: Any, timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    return found


@pytest.mark.timeout(60)
async def test_only_a_dead_owners_folder_and_processes_are_cleaned(tmp_path: Path) -> None:
    log = tmp_path / "holders.log"
    env = {"TMPDIR": str(tmp_path)}  # their run folders go here, not in the system's
    dead = start(["-c", HOLDER], log, env)
    alive = start(["-c", HOLDER], log, env)
    try:

        def printed() -> list[str] | None:
            lines = [
                ln
                for ln in log.read_text().splitlines()
                if ln.startswith("/") and len(ln.split()) == 3
            ]
            return lines if len(lines) >= 2 else None

        info: dict[int, tuple[Path, int, Path]] = {}
        for line in await wait_for(printed, 30, log):
            folder, child, made = line.split()
            owner = json.loads((Path(folder) / "owner.json").read_text())["pid"]
            info[owner] = (Path(folder), int(child), Path(made))
        dead_folder, dead_child, dead_made = info[dead.pid]
        live_folder, live_child, _ = info[alive.pid]
        assert dead_made.parent == dead_folder  # its temp folders live in its run folder
        child_time = psutil.Process(dead_child).create_time()
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        assert not gone(dead_child, child_time)  # its child outlived it
        done = clean_leftovers(tmp_path, grace_s=0.5)
        assert len(done) == 1 and str(dead_folder) in done[0], done
        assert f"pid {dead.pid}" in done[0] and f"({dead_child})" in done[0], done
        assert not dead_folder.exists()
        assert gone(dead_child, child_time)  # SIGTERM ignored: SIGKILL after the grace
        # the live owner's folder and child are untouched; so is a folder being made
        assert live_folder.is_dir() and psutil.pid_exists(live_child)
        making = tmp_path / f"{RUN_PREFIX}1-making"
        making.mkdir()
        (making / "owner.lock").touch()
        assert clean_leftovers(tmp_path, grace_s=0.5) == []
        assert making.is_dir()
    finally:
        for proc in (dead, alive):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        clean_leftovers(tmp_path, grace_s=0.5)  # the live one's child, now that it is dead
    assert system_temp() != tmp_path


@pytest.mark.timeout(240)
async def test_a_killed_labbridge_run_leaves_nothing_after_the_next_start(tmp_path: Path) -> None:
    log = tmp_path / "labbridge.log"
    runs = tmp_path / "runs"
    env = {"RAY_ADDRESS": ""}  # its own local Ray, whatever the environment says
    run = start(
        [
            "-m",
            "bridge.cli",
            "run",
            str(ROOT / "examples" / "color-match" / "program.md"),
            "--campaign-id",
            "left",
            "--runs",
            str(runs),
            "--no-progress",
        ],
        log,
        env,
    )
    try:

        def noted() -> tuple[Path, list[dict[str, Any]]] | None:
            for folder in system_temp().glob(f"{RUN_PREFIX}{run.pid}-*"):
                procs = folder / "processes.json"
                if procs.exists() and list(folder.glob("lb-*")):
                    return folder, json.loads(procs.read_text())
            return None

        folder, processes = await wait_for(noted, 180, log)
        await wait_for(lambda: (runs / "left" / "journal.db").exists(), 120, log)
        simulators = sorted(p.name.rsplit("-", 1)[0] for p in folder.glob("lb-*"))
        names = sorted({p["name"] for p in processes})
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        await asyncio.sleep(3.0)  # what dies with it has died by now
        left = [p for p in processes if not gone(p["pid"], p["create_time"])]
        print(
            f"killed labbridge run (pid {run.pid}): its run folder held {simulators}; it had "
            f"noted {len(processes)} processes ({', '.join(names)}); {len(left)} outlived it: "
            f"{sorted(p['name'] for p in left)}"
        )
        assert folder.is_dir()
        nxt = start(["-m", "bridge.cli", "resume", "nothing-here", "--runs", str(runs)], log)
        deadline = time.monotonic() + 60
        while nxt.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        text = log.read_text()
        assert f"removed {folder} (left by pid {run.pid}, which is gone)" in text, text[-3000:]
        assert not folder.exists()
        assert [p for p in processes if not gone(p["pid"], p["create_time"])] == []
        assert not list(system_temp().glob(f"{RUN_PREFIX}{nxt.pid}-*"))  # it cleans its own
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        clean_leftovers()
