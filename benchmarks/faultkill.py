"""Part 1 of benchmarks/faults.py: kill -9 of campaign owners (``labbridge run``, ``serve``,
``resume`` as subprocesses joining the benchmark's Ray head), observed at the simulators'
wire and in the journal. What is measured: benchmarks/faults.py's docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.faultlib import (
    OPERATOR,
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
from benchmarks.stats import pct
from loops.stationlease import LEASE_S, POLL_S
from safety.envelopeload import reference_envelope

ROOT = Path(__file__).resolve().parents[1]
#: after the owner's death its stations stop acting within this (loops/stationlease.py)
FENCING_BOUND_S = LEASE_S + 2 * POLL_S


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
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}


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
    from bridge.labconfig import load_lab
    from bridge.labmqtt import mqtt_settings
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


async def kill_campaign(s: Any, progress: Any, tmp: Path) -> dict[str, Any]:
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
