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
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Iterator
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

from benchmarks.faultlib import (  # noqa: E402
    Physics,
    actuating,
    alive,
    audit_journal,
    audit_wire,
    budget_check,
    campaign_program,
    colour_benches,
    descendants,
    done_results,
    journal_rows,
    lb_folders,
    ray_actor_processes,
    rows_after,
    vessel_check,
)
from benchmarks.stats import pct  # noqa: E402
from loops.stationlease import LEASE_S, POLL_S  # noqa: E402
from safety.envelopeload import reference_envelope  # noqa: E402

ROOT = Path(_ROOT)
#: after the owner's death its stations stop acting within this (loops/stationlease.py)
FENCING_BOUND_S = LEASE_S + 2 * POLL_S
OPERATOR = "faultbench"


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
    ap.add_argument("--quick", action="store_true", help="CI form: 5 kills, 30 faults, 2 stations")
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
        kills=a.kills if a.kills is not None else (5 if quick else 50),
        faults=a.faults if a.faults is not None else (30 if quick else 1000),
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


# ----------------------------------------------------------------- kill -9
@dataclass
class Kill:
    """One SIGKILL of a campaign's owner and what followed it."""

    command: str  # run | serve | resume
    campaign_id: str
    moment: str  # how the moment was chosen
    t_kill: float  # time.monotonic()
    during_experiment: bool
    actuating_after: int
    last_actuating_s: float  # after the kill; 0 when nothing came
    after_bound: int  # actuating commands later than the fencing bound
    rows_after: int
    rows_after_bound: int
    children_left: int  # of the killed owner, at the end of the window
    actors_left: int  # station/journal actor processes, at the end of the window
    lb_left: int  # new lb-* folders in this run's temp folder

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp), "PYTHONPATH": _ROOT}


def _labbridge(args: list[str], log: Path, tmp: Path, module: str = "bridge.cli") -> Any:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_env(tmp),
            cwd=ROOT,
            start_new_session=True,  # a kill -9 of the owner only, as from another terminal
        )


async def _start_over_mqtt(lab_file: Path, campaign_id: str, program: str) -> dict[str, Any]:
    """``campaigns/start`` to ``labbridge serve`` (retried until the service is online)."""
    from bridge.labconfig import load_lab, mqtt_settings
    from bridge.mqttcli import request

    lab = load_lab(lab_file)
    settings = mqtt_settings(lab)
    deadline = time.monotonic() + 120
    while True:
        reply, _ = await request(
            settings,
            lab.bridge_id,
            "campaigns/start",
            {"id": campaign_id, "program": program},
            timeout=5.0,
        )
        stale = reply is not None and any("not acted on" in e for e in reply.get("errors") or [])
        if reply is not None and not stale:  # a start queued while serve was starting: again
            return reply
        if time.monotonic() > deadline:
            raise RuntimeError("labbridge serve never answered campaigns/start")
        await asyncio.sleep(0.5)


def _campaign_state(store: Path, campaign_id: str) -> str | None:
    from loops.journal import Journal

    if not store.exists():
        return None
    try:
        with Journal(store) as j:
            return j.campaign(campaign_id).state
    except Exception:
        return None


async def kill_campaign(s: Settings, progress: Progress, tmp: Path) -> dict[str, Any]:
    """Part 1 (module docstring)."""
    import ray

    from bridge.simbench import sim_lab_yaml
    from simulators.bench import SimulatedLab

    rng = random.Random(s.seed)
    envelope = reference_envelope()
    address = ray.get_runtime_context().gcs_address
    work = tmp / "kills"
    work.mkdir()
    store, lab_file, log = work / "journal.db", work / "lab.yaml", work / "labbridge.log"
    prog = campaign_program(s.experiments)
    prog_file = work / "program.md"
    prog_file.write_text(prog.to_markdown())
    kills: list[Kill] = []
    seen: dict[str, float | None] = {}
    campaigns: list[str] = []
    commands = {"run": 0, "serve": 0, "resume": 0}
    t_start_wall = time.time()
    async with SimulatedLab(stations=1, speed=s.speed, seed=s.seed) as sim:
        (bench,) = colour_benches(sim)
        text = sim_lab_yaml(sim, store, bridge_id="faultbench")
        text += f"mqtt:\n  url: {sim.broker_url}\n  status_interval_s: 0.5\n"
        lab_file.write_text(text)
        common = ["--lab", str(lab_file), "--ray-address", address, "--operator", OPERATOR]
        lb_before = lb_folders(tmp)
        proc: Any = None
        async with Physics([bench]) as physics, _reaped(lambda: proc):
            command = cid = ""
            n = ends = in_campaign = 0
            while True:
                if proc is None:  # a new campaign: by run or by serve, in turn
                    if len(kills) >= s.kills:
                        break
                    n += 1
                    cid = f"k{n:03d}"
                    campaigns.append(cid)
                    command = "run" if n % 2 else "serve"
                    if command == "run":
                        proc = _labbridge(
                            ["run", str(prog_file), "--campaign-id", cid, "--no-progress", *common],
                            log,
                            tmp,
                        )
                    else:
                        proc = _labbridge(["serve", *common], log, tmp, module="bridge.mqttcli")
                        reply = await _start_over_mqtt(lab_file, cid, prog.to_markdown())
                        if not reply.get("accepted"):
                            raise RuntimeError(f"serve refused campaign {cid}: {reply}")
                t_started = time.monotonic()
                base_rows = journal_rows(store, cid)
                by_rows = rng.random() >= 0.25
                target = base_rows + rng.randint(1, 40) if by_rows else 0
                wait_s = rng.uniform(0.5, 8.0)
                moment = f"+{target - base_rows} rows" if by_rows else f"+{wait_s:.1f} s"
                finished = False
                deadline = time.monotonic() + 180
                while True:
                    state = _campaign_state(store, cid)
                    if proc.poll() is not None or (command == "serve" and state == "done"):
                        finished = True
                        break
                    if by_rows and journal_rows(store, cid) >= target:
                        break
                    if not by_rows and time.monotonic() - t_started >= wait_s:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"campaign {cid} made no progress in 180 s; see {log}")
                    await asyncio.sleep(0.05)
                enough = len(kills) >= s.kills or in_campaign >= s.kills_per_campaign
                if finished or enough:  # let it end by itself
                    code = await _finish(proc, command, store, cid)
                    state = _campaign_state(store, cid)
                    if state == "done":
                        proc = None
                        ends = in_campaign = 0
                        continue
                    ends += 1
                    if state is None or ends > 20:
                        tail = log.read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"{command} of {cid} ended ({code}, {state}):\n{tail}")
                    await asyncio.sleep(0.5 * ends)  # a spent budget: its window moves on
                    progress(f"{cid}: {command} ended ({code}, campaign {state}): resuming")
                    proc = _labbridge(["resume", cid, "--no-progress", *common], log, tmp)
                    command = "resume"
                    continue
                # the kill
                kids = descendants(proc.pid)
                seen.update(done_results(store, cid))
                running = _running(store, cid)
                os.kill(proc.pid, signal.SIGKILL)
                t_kill, wall_kill = time.monotonic(), time.time()
                proc.wait()
                commands[command] += 1
                in_campaign += 1
                await asyncio.sleep(FENCING_BOUND_S + s.settle_s)  # nobody drives the bench
                late = actuating(bench, t_kill)
                rows = rows_after(store, cid, wall_kill)
                kill = Kill(
                    command=command,
                    campaign_id=cid,
                    moment=moment,
                    t_kill=t_kill,
                    during_experiment=running,
                    actuating_after=len(late),
                    last_actuating_s=max((t - t_kill for t, _, _ in late), default=0.0),
                    after_bound=sum(t - t_kill > FENCING_BOUND_S for t, _, _ in late),
                    rows_after=len(rows),
                    rows_after_bound=sum(t - wall_kill > FENCING_BOUND_S for t, _, _ in rows),
                    children_left=len(alive(kids)),
                    actors_left=len(ray_actor_processes(os.getpid())),
                    lb_left=len(lb_folders(tmp) - lb_before),
                )
                kills.append(kill)
                progress(
                    f"kill {len(kills)}/{s.kills}: {command} {cid} at {moment}"
                    f"{' (experiment running)' if running else ''}: {kill.actuating_after} "
                    f"actuating after, last {kill.last_actuating_s:.2f} s; {kill.rows_after} "
                    f"journal rows after; {kill.actors_left} actor processes left"
                )
                if _campaign_state(store, cid) is None:  # killed before it was created
                    proc = None
                    in_campaign = 0
                    continue
                proc = _labbridge(["resume", cid, "--no-progress", *common], log, tmp)
                command = "resume"
        series = physics.series[bench.name]
        unsafe, checked = audit_wire(bench, envelope)
        budget = budget_check(series, envelope, store, bench.name, t_start_wall)
        vessel = vessel_check(series, envelope)
        lb_end = len(lb_folders(tmp) - lb_before)
    audit = audit_journal(store, campaigns, seen)
    states = {c: _campaign_state(store, c) for c in campaigns}
    return {
        "fencing_bound_s": FENCING_BOUND_S,
        "lease_s": LEASE_S,
        "poll_s": POLL_S,
        "watched_s": FENCING_BOUND_S + s.settle_s,
        "kills": [k.as_dict() for k in kills],
        "by_command": commands,
        "campaigns": states,
        "results_seen": len(seen),
        "journal": audit.as_dict(),
        "wire_checked": checked,
        "unsafe": [u.as_dict() for u in unsafe],
        "budget": budget,
        "vessel": vessel,
        "lb_left_at_end": lb_end,
        "actors_left_at_end": len(ray_actor_processes(os.getpid())),
        "log": str(log),
    }


@contextlib.asynccontextmanager
async def _reaped(current: Any) -> AsyncIterator[None]:
    """On the way out (an error too), the owner process still running is stopped."""
    try:
        yield
    finally:
        proc = current()
        if proc is not None and proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _running(store: Path, cid: str) -> bool:
    from loops.journal import Journal

    if not store.exists():
        return False
    try:
        with Journal(store) as j:
            return bool(j.experiments(cid, "running"))
    except Exception:
        return False


async def _finish(proc: Any, command: str, store: Path, cid: str) -> int:
    """Let an owner end by itself (``serve``: SIGTERM once its campaign is done)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        if command == "serve" and _campaign_state(store, cid) in ("done", "stopped"):
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 120)
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{command} of {cid} did not end within 300 s")
        await asyncio.sleep(0.1)
    return int(proc.returncode)


def kill_table(r: dict[str, Any]) -> list[str]:
    kills = r["kills"]
    j = r["journal"]
    lasts = [k["last_actuating_s"] for k in kills]
    worst = max(lasts, default=0.0)
    during = [k for k in kills if k["during_experiment"]]
    lines = [
        f"Kill -9 campaign: {len(kills)} SIGKILLs "
        + ", ".join(f"{n} of {c}" for c, n in r["by_command"].items())
        + f" ({len(during)} during an experiment), {len(r['campaigns'])} campaigns "
        f"of {j['experiments'] and round(j['experiments'] / max(1, len(r['campaigns'])))} "
        f"experiments; station actors in Ray workers, the bench in the benchmark process",
        f"  fencing bound (LEASE_S + 2*POLL_S)         {r['fencing_bound_s']:.2f} s "
        f"(each kill watched {r['watched_s']:.1f} s before the resume)",
        f"  last actuating command after a kill        worst {worst:.2f} s, p50 "
        f"{pct(lasts, 0.5):.2f} s; {sum(k['actuating_after'] > 0 for k in kills)} kills had "
        f"some ({sum(k['actuating_after'] for k in kills)} commands)",
        f"  actuating commands after the bound         {sum(k['after_bound'] for k in kills)}"
        "   (goal 0)",
        f"  journal rows after a kill / after bound    {sum(k['rows_after'] for k in kills)} / "
        f"{sum(k['rows_after_bound'] for k in kills)}   (goal: 0 after the bound)",
        f"  results lost (done before a kill, not after) {len(j['changed'])}   (goal 0; "
        f"{r['results_seen']} results seen before kills)",
        f"  finished, closed without their measurement {len(j['dropped'])}   (goal 0)",
        f"  experiments left open at the end           {len(j['left_open'])}   (goal 0)",
        f"  steps / experiments run twice              {len(j['twice'])}   (goal 0)",
        f"  unsafe commands on the wire                {len(r['unsafe'])} of {r['wire_checked']}"
        " checked   (goal 0)",
    ]
    b, v = r["budget"], r["vessel"]
    if b:
        lines.append(
            f"  dye: pumps pushed {b['pushed_ml']:.2f} mL, ledger {b['ledger_ml']:.2f} mL, "
            f"uncounted {b['uncounted_ml']:.2f} mL (goal 0); most in one {b['budget']} window "
            f"{b['max_in_window_ml']:.2f} of {b['limit_ml']:g} mL (over: {b['over_budget_ml']:.2f})"
        )
    lines.append(
        f"  vial: most {v['most_ml']:.2f} mL of {v['max_ml']} (over {v['over_ml']:.2f}), "
        f"spilled {v['spilled_ml']:.2f} mL"
    )
    lines.append(
        f"  left behind at the end of a kill's window  owner's child processes "
        f"{sum(k['children_left'] for k in kills)}, actor processes "
        f"{sum(k['actors_left'] > 0 for k in kills)} kills ({max((k['actors_left'] for k in kills), default=0)} "
        f"at most), new lb-* folders {max((k['lb_left'] for k in kills), default=0)} at most"
    )
    lines.append(
        f"  at the end: actor processes {r['actors_left_at_end']}, lb-* folders left "
        f"{r['lb_left_at_end']}; campaigns (None: killed before it was created) "
        + ", ".join(
            f"{s}: {sum(1 for x in r['campaigns'].values() if str(x) == s)}"
            for s in sorted(set(map(str, r["campaigns"].values())))
        )
    )
    return lines


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
        init_ray(
            stations=[f"bench-{chr(ord('a') + i)}" for i in range(max(3, s.stations))],
            local=True,
            log_to_driver=False,
        )
        progress(f"Ray head up ({time.monotonic() - t0:.1f} s), temp folder {tmp}")
        try:
            from benchmarks.faultinject import fault_campaign, fault_table

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
