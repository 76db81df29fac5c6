"""What a labbridge process leaves in the temp folder, and cleaning up after one that was killed.

A process that runs a campaign, a simulated lab or the service claims a **run folder**
(:func:`run_folder`): ``<tmp>/lb-run-<pid>-XXXXXX/`` holding

* ``owner.lock``: a ``flock`` the process holds while it lives (the kernel drops it when
  the process dies, ``kill -9`` included; the descriptor is not inherited by children);
* ``owner.json``: the process's pid, its start time and command line, written once the
  lock is held;
* ``processes.json``: the processes it started that may outlive it (a local Ray's:
  measured, after a ``kill -9`` of the driver Ray's ``DashboardAgent`` and
  ``RuntimeEnvAgent`` stay up, ignoring SIGTERM), each as pid and start time
  (:func:`note_children`, called by ``init_ray`` after it starts a local Ray);
* every temp folder the process makes (``tempfile.tempdir`` points into the run folder
  while it is claimed: the simulators' ``lb-ble-*``, ``lb-mosquitto-*`` ...).

A normal exit removes the folder. :func:`clean_leftovers`, run when the next such
process starts, handles the folders of processes that died: a folder whose lock can be
taken and that has its ``owner.json`` is provably a dead process's; the processes it
noted that still run (same pid AND same start time: never a reused pid) are ended,
with their children (SIGTERM, then SIGKILL after a grace period), and the folder is
removed. Nothing else is touched: a live process's folder is locked, a folder being
created has no ``owner.json`` yet, Ray processes of other clusters were never noted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

__all__ = [
    "RUN_PREFIX",
    "RunFolder",
    "clean_leftovers",
    "current",
    "note_children",
    "run_folder",
    "system_temp",
]

RUN_PREFIX = "lb-run-"
#: how long a noted process gets to end after SIGTERM before SIGKILL (seconds)
GRACE_S = 2.0

_original_tempdir: str | None = None  # tempfile.tempdir before a run folder took it
_current: RunFolder | None = None


@dataclass
class RunFolder:
    """This process's run folder (module docstring); ``fd``: its held ``owner.lock``."""

    path: Path
    fd: int

    def note(self, processes: Iterable[psutil.Process]) -> int:
        """Add ``processes`` to ``processes.json`` (pid and start time); returns how many
        are noted in all."""
        target = self.path / "processes.json"
        known = _read_json(target) or []
        seen = {(p["pid"], p["create_time"]) for p in known}
        for proc in processes:
            try:
                entry = {"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()}
            except psutil.Error:
                continue  # already gone
            if (entry["pid"], entry["create_time"]) not in seen:
                known.append(entry)
                seen.add((entry["pid"], entry["create_time"]))
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        tmp.replace(target)
        return len(known)


def system_temp() -> Path:
    """The system's temp folder (the one before this process's run folder took over)."""
    return Path(_original_tempdir or tempfile.gettempdir())


def current() -> RunFolder | None:
    """This process's run folder, if it claimed one."""
    return _current


def note_children() -> int:
    """Note every process this process started (children, recursively) in its run folder,
    so that a next start ends them if this process is killed; returns how many are noted
    (0 without a run folder)."""
    folder = _current
    if folder is None:
        return 0
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    return folder.note(children)


@contextlib.contextmanager
def run_folder() -> Iterator[RunFolder]:
    """Claim this process's run folder (module docstring) and point ``tempfile`` into it;
    on the way out (not after a kill) restore ``tempfile`` and remove the folder.
    Re-entrant: an inner claim yields the outer folder."""
    global _current, _original_tempdir
    if _current is not None:
        yield _current
        return
    base = Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=base))
    fd = os.open(path / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)  # not inherited
    fcntl.flock(fd, fcntl.LOCK_EX)
    me = psutil.Process()
    owner = {"pid": me.pid, "create_time": me.create_time(), "argv": sys.argv, "t": time.time()}
    (path / "owner.json").write_text(json.dumps(owner), encoding="utf-8")
    folder = RunFolder(path, fd)
    _original_tempdir, _current = tempfile.tempdir, folder
    tempfile.tempdir = str(path)
    try:
        yield folder
    finally:
        tempfile.tempdir, _current = _original_tempdir, None
        _original_tempdir = None
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def clean_leftovers(base: Path | None = None, *, grace_s: float = GRACE_S) -> list[str]:
    """End what killed labbridge processes left behind (module docstring): for every run
    folder under ``base`` (default the system temp folder) whose owner is dead, its noted
    processes still running and the folder itself. Returns one line per thing done."""
    done: list[str] = []
    root = base or system_temp()
    mine = _current.path if _current is not None else None
    for path in sorted(root.glob(f"{RUN_PREFIX}*")):
        if path == mine or not path.is_dir() or not (path / "owner.json").exists():
            continue
        try:
            fd = os.open(path / "owner.lock", os.O_RDWR)
        except OSError:
            continue  # not ours to judge (no lock file: not a run folder as made here)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            owner = _read_json(path / "owner.json")
            if owner is None:
                continue  # another start cleaned it up meanwhile
            ended = _end(_read_json(path / "processes.json") or [], grace_s)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        what = f"removed {path} (left by pid {owner.get('pid', '?')}, which is gone)"
        if ended:
            what += f"; ended the processes it left running: {', '.join(ended)}"
        log.warning("%s", what)
        done.append(what)
    return done


def _end(noted: list[dict[str, Any]], grace_s: float) -> list[str]:
    """End every noted process still running as itself (pid and start time), with its
    children; returns them as ``name (pid)``."""
    targets: dict[int, psutil.Process] = {}
    for entry in noted:
        try:
            proc = psutil.Process(int(entry["pid"]))
            if abs(proc.create_time() - float(entry["create_time"])) > 0.01:
                continue  # the pid was reused by another process
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            targets[proc.pid] = proc
            for child in proc.children(recursive=True):
                targets.setdefault(child.pid, child)
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    names: list[str] = []
    for proc in targets.values():
        with contextlib.suppress(psutil.Error):
            names.append(f"{proc.name()} ({proc.pid})")
            proc.terminate()
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return names


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
