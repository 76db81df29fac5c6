"""Reliability at scale (issue 12): kill -9 of campaign owners, and injected faults.

Run:  python benchmarks/faults.py [--quick] [--kills 50] [--faults 1000] [--seed 0]
                                 [--out benchmarks/results] [--only kills|faults]

Both parts run on the colour bench's simulators (``simulators.bench.SimulatedLab``: pumps on
a pty, hotplate over Modbus TCP, colour sensor over BLE/D-Bus, enclosure over MQTT, camera
over HTTP) in this process, with one local, loopback-only Ray head started here once
(token authentication on, as labbridge always runs it: ``loops.raylinks.init_ray``). The
program is the colour-match example with random proposals and no stop rule but its
experiment budget. What reached the benches is read from the simulators' wire log
(``world.wire``, real ``time.monotonic`` arrival times), the bench's own counters are
sampled every 50 ms (dye pushed, vial volume, spills), and the journal is read with
``loops.journal.Journal``. Every figure is from this run; nothing is estimated.

1. **Kill -9 campaign** (``--kills``): ``labbridge run``, ``labbridge serve`` (a campaign
   started over MQTT) and ``labbridge resume`` run as subprocesses that join the Ray head
   with ``--ray-address``; their station and journal actors are Ray workers, separate
   processes from the owner. Each is sent SIGKILL at a random moment (seeded): either a
   random number (1-40) of the campaign's journal rows after it started, or 0.5-8 s after
   it started (start-up, set-up, a resume's recovery). After each kill nothing else drives
   the bench for the fencing bound (``loops.stationlease``: ``LEASE_S + 2 * POLL_S``) plus
   ``--settle`` seconds; then ``labbridge resume`` carries the campaign on, and is killed in
   its turn. Measured per kill: the last actuating command on the wire after it (pump RUN,
   hotplate setpoint / stirrer speed / enables, light on), journal rows written after it
   and after the bound, the killed owner's child processes and the station/journal actor
   processes still alive at the end of the window, ``lb-*`` temp folders left (in a temp
   folder of this run's own, ``TMPDIR`` for everything it starts). At the end: every result
   seen ``done`` before a kill is still ``done`` with the same objective; no experiment ran
   twice and no step started twice (the step log); no experiment left open; no experiment
   that ran every step was closed without its measurement; the dye the pumps pushed versus
   the durable consumption ledger (``Journal.consumption``) and the most dye pushed in any
   budget window against the envelope's budget; every command on the wire against the
   envelope (below).

2. **Fault campaign** (``--faults``): one campaign per station (``--stations``, default 3)
   at ``--fault-speed`` x, run by :class:`~loops.campaign.CampaignRunner` in this process on
   Ray station actors. Per station a seeded RNG waits a random gap, injects the next fault
   kind (every kind of ``simulators.benchworld.Faults.KNOWN`` that the colour bench has, with
   random parameters, plus ``actor-kill``: ``ray.kill`` of the station actor), clears it
   after a random time, then recovers the station as an operator would: a station whose
   campaign stopped (it tripped, or its actor died: a new actor is started from lab.yaml) is
   reset once its monitors have cleared and the campaign is resumed (``prepare(resume=True)``:
   safe state, reset, drain, interrupted experiments closed, never re-run). Per kind:
   faults injected, experiments affected (running on the station, or any station for
   ``broker-restart``, while the fault was active), their outcome, experiments lost (not
   closed at the end, or a result changed), steps run twice, unsafe commands on the wire,
   and the recovery time (injection -> the next experiment running on the station, from
   the journal; median / p99).

Unsafe commands: every command that reached a station's pumps, hotplate or enclosure is
decoded into the envelope's channels and checked with the envelope's own checks
(``ChannelLimit.check`` for min / max / allowed values, every rule on the state the wire
built); commands that only switch something off are not checked (the guard lets safer
commands through), rates of change are not (transport jitter at a high simulated speed).

Writes ``<out>/faults.json`` (``--quick``: a folder under the temp dir unless ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's directory is sys.path[0]: benchmarks/safety.py would then
# shadow the safety package. Drop it and import the benchmark helpers from the repo root.
_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.faultinject import KINDS, fault_campaign, fault_table  # noqa: E402
from benchmarks.faultkill import kill_campaign, kill_table  # noqa: E402
from benchmarks.faultlib import dump_tasks  # noqa: E402


# ------------------------------------------------------------------- settings
@dataclass
class Settings:
    kills: int = 50
    faults: int = 1000
    seed: int = 0
    speed: float = 500.0  # the kill campaign's bench
    fault_speed: float = 500.0
    stations: int = 3  # the fault campaign's
    experiments: int = 4  # per kill campaign
    kills_per_campaign: int = 3  # then it runs to its end (a new campaign: run and serve in turn)
    settle_s: float = 1.5  # after the fencing bound, before the resume starts
    out: Path = Path(_HERE) / "results"
    only: str | None = None
    quick: bool = False
    progress: bool = True


def parse_args(argv: list[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI form: 3 kills (one each of run, serve, resume), 15 faults (one of each kind), "
        "2 stations",
    )
    ap.add_argument("--kills", type=int, default=None, help="SIGKILLs of run/serve/resume (50)")
    ap.add_argument("--faults", type=int, default=None, help="injected faults (1000)")
    ap.add_argument("--stations", type=int, default=None, help="fault campaign stations (3)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed of kill moments and faults (0)")
    ap.add_argument("--speed", type=float, default=500.0, help="kill campaign bench speed (500)")
    ap.add_argument("--fault-speed", type=float, default=500.0, help="fault bench speed (500)")
    ap.add_argument(
        "--experiments", type=int, default=None, help="budget of each kill campaign (4)"
    )
    ap.add_argument(
        "--kills-per-campaign", type=int, default=None, help="then it runs to its end (3)"
    )
    ap.add_argument(
        "--settle", type=float, default=1.5, help="s watched after the fencing bound (1.5)"
    )
    ap.add_argument("--only", choices=("kills", "faults"), default=None, help="one part only")
    ap.add_argument("--out", type=Path, default=None, help="results folder (benchmarks/results)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines")
    a = ap.parse_args(argv)
    quick = a.quick
    return Settings(
        kills=a.kills if a.kills is not None else (3 if quick else 50),
        faults=a.faults if a.faults is not None else (len(KINDS) if quick else 1000),
        seed=a.seed,
        speed=a.speed,
        fault_speed=a.fault_speed,
        stations=a.stations if a.stations is not None else (2 if quick else 3),
        experiments=a.experiments or (3 if quick else 4),
        kills_per_campaign=a.kills_per_campaign or (2 if quick else 3),
        settle_s=a.settle,
        out=a.out
        or (Path(tempfile.gettempdir()) / "faultbench" if quick else Path(_HERE) / "results"),
        only=a.only,
        quick=quick,
        progress=not a.no_progress,
    )


class Progress:
    """Progress lines on stderr (long runs), with the time since the start."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- main
@contextlib.contextmanager
def private_tmp() -> Iterator[Path]:
    """A temp folder of this run's own, as ``TMPDIR`` for everything it starts (Ray too)."""
    path = Path(tempfile.mkdtemp(prefix="lbfaults-", dir="/tmp"))
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        tempfile.tempdir = None


async def run(s: Settings) -> dict[str, Any]:
    import ray

    from loops.raylinks import init_ray

    progress = Progress(s.progress)
    doc: dict[str, Any] = {"settings": {k: str(v) for k, v in dataclasses.asdict(s).items()}}
    with private_tmp() as tmp:
        t0 = time.monotonic()
        # the stack's own log lines (a station out, a retry) go to a file, not over the tables
        logging.basicConfig(
            filename=tmp / "benchmark.log",
            level=logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
        doc["log"] = str(tmp / "benchmark.log")
        # kill -USR1 <pid>: every asyncio task's stack into the log (a hang explains itself)
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGUSR1, dump_tasks, "SIGUSR1 from an operator"
        )
        init_ray(
            stations=[f"bench-{chr(ord('a') + i)}" for i in range(max(3, s.stations))],
            local=True,
            log_to_driver=False,
        )
        progress(f"Ray head up ({time.monotonic() - t0:.1f} s), temp folder {tmp}")
        try:
            parts = [("kills", s.kills, kill_campaign, kill_table)]
            parts.append(("faults", s.faults, fault_campaign, fault_table))
            for name, size, part, table in parts:
                if s.only not in (None, name) or size <= 0:
                    continue
                t = time.monotonic()
                try:
                    doc[name] = await part(s, progress, tmp)
                except Exception:  # said in the results and as a missed goal, not a traceback
                    doc.setdefault("errors", []).append(f"{name}: {traceback.format_exc()}")
                    print(f"{name}: the run failed:\n{traceback.format_exc()}", flush=True)
                    continue
                doc[name]["elapsed_s"] = time.monotonic() - t
                for line in table(doc[name]):
                    print(line, flush=True)
        finally:
            ray.shutdown()
        doc["ray_processes_after_shutdown"] = _leftover_ray(tmp)
        doc["elapsed_s"] = time.monotonic() - t0
    print(
        f"Ray processes of this run still alive after its shutdown: "
        f"{len(doc['ray_processes_after_shutdown'])}; total {doc['elapsed_s']:.0f} s",
        flush=True,
    )
    return doc


def _leftover_ray(tmp: Path) -> list[str]:
    """Processes that still name this run's temp folder (Ray's session lives in it)."""
    import psutil

    time.sleep(1.0)
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(tmp) in cmd and p.pid != os.getpid():
            out.append(f"{p.pid}: {cmd[:120]}")
    return out


def invariants(doc: dict[str, Any]) -> list[str]:
    """The goals that this run missed (empty: every goal held)."""
    out: list[str] = [f"the run failed: {e.splitlines()[0]}" for e in doc.get("errors", [])]
    k = doc.get("kills")
    if k:
        after = sum(x["after_bound"] for x in k["kills"])
        if after:
            out.append(f"kills: {after} actuating commands after the fencing bound")
        rows = sum(x["rows_after_bound"] for x in k["kills"])
        if rows:
            out.append(f"kills: {rows} journal rows after the fencing bound")
        j = k["journal"]
        for key, what in (
            ("changed", "results lost"),
            ("dropped", "finished experiments closed without their measurement"),
            ("left_open", "experiments left open"),
            ("twice", "steps or experiments run twice"),
        ):
            if j[key]:
                out.append(f"kills: {len(j[key])} {what}: {j[key][:3]}")
        if k["unsafe"]:
            out.append(f"kills: {len(k['unsafe'])} unsafe commands: {k['unsafe'][:3]}")
        b = k["budget"]
        if b and (b["uncounted_ml"] > 0.01 or b["over_budget_ml"] > 0.01):
            out.append(f"kills: budget not intact: {b}")
    f = doc.get("faults")
    if f:
        j = f["journal"]
        for key, what in (
            ("changed", "results lost"),
            ("dropped", "finished experiments closed without their measurement"),
            ("left_open", "experiments left open"),
            ("twice", "steps or experiments run twice"),
        ):
            if j[key]:
                out.append(f"faults: {len(j[key])} {what}: {j[key][:3]}")
        if f["unsafe"]:
            out.append(f"faults: {len(f['unsafe'])} unsafe commands: {f['unsafe'][:3]}")
        if f["unrecovered"]:
            out.append(f"faults: {f['unrecovered']} faults after which the station never ran again")
    return out


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    doc = asyncio.run(run(s))
    missed = invariants(doc)
    doc["missed"] = missed
    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / "faults.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"results: {path}")
    for m in missed:
        print(f"MISSED: {m}")
    if doc.get("log"):  # the run's temp folder (its logs) is kept only when a goal was missed
        folder = Path(doc["log"]).parent
        if missed:
            print(f"logs: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
