"""Scale-out on two Ray nodes: K stations vs 1, and the stack's own time per experiment.

    python -m benchmarks.scale            # stations 1, 2, 4, 8, 16 (minutes to an hour here)
    python -m benchmarks.scale --quick    # CI smoke: stations 1 and 2, a few experiments

A real two-node cluster (benchmarks/twonode.py: the head, and a bench node in its own
network namespace, ``ray start`` with token authentication) with half the simulated
benches on each node. For each station count K the colour-match campaign (bayes,
``--target`` on ΔE2000, at most ``--budget`` experiments) runs in this process as
``labbridge run --lab`` would (:func:`bridge.campaigns.run_campaign`: joins the cluster
from the head's side), on K benches spread over both nodes, with a fresh journal.

Printed per K: wall-clock to the target (or to the end) and experiments to it, each vs 1
station; the bench-time model's time to the target and the measured/model ratio (goal:
within 15 % at 500x; :func:`bench_model`); the stack's time per experiment (median, p99)
and where it goes.

**The stack time of an experiment** is the time its station's bench is idle on its
account: from the moment the station was free (its previous experiment journaled done,
or the campaign's start) to this experiment journaled done, minus the bench's own time
(each step's duration as the station measured it on the bench's clock: the simulated
physics and the instruments' I/O over their wires). Work done for it while the station
still ran the previous experiment (the proposal claimed ahead: :mod:`loops.campaignahead`)
costs the bench nothing and is not in it. From the journal's timestamps, its parts:

- ``claim``: from the station free to the proposal journaled: waiting for the campaign's
  lock, the optimizer's ask, a journal write (0 when it was claimed ahead);
- ``check``: proposal -> checked: the dry run on the station (a Ray round trip) and the
  program's constraints, a journal write;
- ``dispatch``: checked -> running: ``queued`` journaled, the run's Ray call to the station
  actor, ``running`` journaled there;
- ``steps``: running -> the last step's record, minus the bench's time (each step's
  duration as the station measured it on the bench's clock): each step that can change
  the bench journaled before it acts (a Ray call to the journal actor, an fsync'ed
  transaction; a step's end goes with the next step's start, the records of steps that
  only look or make safer with the next that waits: :mod:`loops.stationwrites`), the
  lease check, the step's dispatch in the actor;
- ``finish``: last step done -> done: what is left of verification (camera vs
  instruments; it starts once what it reads is measured: :mod:`loops.stationverify`),
  the outcome journaled, the Ray return, the evidence and result with the optimizer's
  tell journaled.

Where it goes, from the per-experiment timers (:mod:`loops.stacktime`; the campaign's
``finished`` events carry them): the optimizer's ask and tell, the dry runs and
verification (CPU time on their threads, besides wall: on this loaded machine the wall
time of CPU work mostly measures the other processes), the journal transactions waited
for (count and wall), the Ray round trips to the station actor, the station's own
dispatching, the campaign's rest, and what overlapped the bench (:data:`WHERE`); also the
driver process's CPU time per experiment and the load average. Also printed: journal
events per second over the run (every transition journaled / wall-clock), and what the
journal actor sustains on its own (:func:`journal_burst`). Goals (issue
17) printed beside: 4 stations >= 3.6x faster to target with <= 1.2x the experiments, 16
stations >= 10x, stack time < 50 ms per experiment at 1 station.

The envelope is the reference bench's with its heartbeat and reading staleness limits
at ``--staleness`` s (default 10, not 2-3): on a loaded machine a simulator starved of CPU
misses a 2 s heartbeat and trips its station, which is not what this measures.

Last, what the optimizer alone allows each station count (``--model-seeds`` seeds of
:mod:`benchmarks.scalemodel`: the same campaign on the bench-time model, the stack free):
with K proposals in flight the optimizer needs more experiments to the target, which caps
the speed-up before any stack time counts.

This machine has 2 cores shared with everything else: 16 simulated benches (each a
pymodbus server, a pty, a BLE peripheral on a D-Bus, an MQTT client, an MJPEG camera
encoding frames), two Ray nodes, 16 station actors and the driver compete for them, so
the stack's and the simulators' CPU time, not the benches' simulated time, limits the
speed-up here; the table prints the load average so the reader can judge.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Run as a script, this file's directory is sys.path[0]: benchmarks/safety.py would then
# shadow the safety package. Drop it and import the benchmark helpers from the repo root.
_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.scalemodel import model_rows, model_table  # noqa: E402
from benchmarks.stats import med, pct  # noqa: E402
from benchmarks.twonode import TwoNodeCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"
GOALS = {4: 3.6, 16: 10.0}
GOAL_EXPERIMENTS_X = 1.2
GOAL_STACK_MS = 50.0
GOAL_MODEL_X = 1.15  # measured time to target within 15% of the bench-time model's
PARTS = ("claim", "check", "dispatch", "steps", "finish")


@dataclass
class Run:
    """One campaign at K stations."""

    stations: int
    state: str
    reason: str
    wall_s: float  # campaign start -> end (real)
    to_target_s: float | None  # campaign start -> the first result at the target (real)
    experiments: int
    to_target_n: int | None
    events: int  # journal transitions of the campaign
    stack_s: list[float] = field(default_factory=list)  # per done experiment
    idle_by_id: dict[str, float] = field(default_factory=dict)  # the same, by experiment
    parts: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PARTS})
    by_station: dict[str, int] = field(default_factory=dict)
    # per done experiment: the stack timers' parts (loops.stacktime) as the campaign's
    # ``finished`` event carries them, and the driver's CPU seconds per experiment
    stacks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    driver_cpu_s: float = math.nan
    # the bench-time model (:func:`bench_model`): to the target (or the end) with no stack
    model_s: float = math.nan


def bench_model(
    benches: Sequence[tuple[str, float, float | None]], k: int, target: float | None
) -> float:
    """The time to the target if the stack cost nothing: this run's own experiments (``(id,
    bench s, objective)`` in the order they were proposed, done and failed ones), each
    taking its bench time only (its steps' durations), on K stations in parallel, each
    started on the first station free; until the first that reaches ``target`` is done (the
    last done when none does). Same experiments, same order: the ratio measured / model
    is what the stack costs, not what the optimizer does."""
    free = [0.0] * max(1, k)
    ends: list[tuple[float, float | None]] = []
    for _eid, bench, value in benches:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += bench
        ends.append((free[i], value))
    if not ends:
        return math.nan
    hits = [t for t, v in ends if target is not None and v is not None and v <= target]
    return min(hits) if hits else max(t for t, _ in ends)


#: the stack's parts (:func:`where`): what each is made of
WHERE = {
    "ask": "the optimizer's ask (CPU on its thread)",
    "tell": "the optimizer's tell (CPU)",
    "dry run": "the safety layer's dry run on the station (CPU; once at the check, again "
    "at the run's start)",
    "verify": "verification: camera vs instruments (CPU on its thread), what of it is left "
    "when the run ends (it starts once what it reads is measured: loops/stationverify.py)",
    "journal": "journal transactions waited for, each a Ray call to the journal actor and "
    "an fsync'ed commit (campaign's and station's; count = transactions waited for per "
    "experiment; a wait for records sent earlier without waiting is in the wall time)",
    "ray": "Ray round trips campaign <-> station actor (check and run calls, minus what "
    "the station did inside them)",
    "station": "the station's own time in the run beyond bench, journal, dry run, verify: "
    "dispatching steps, lease checks, the guard's checks",
    "campaign": "the rest of the idle time: the campaign's lock, bookkeeping, the event "
    "loop (idle time minus the parts above)",
    "overlapped": "not idle time: the next proposal claimed while the station ran (ask, "
    "journal, the check's dry run and Ray call; CPU: the ask's; loops/campaignahead.py) and "
    "the journal records of steps that only look or make safer, sent while the bench works, "
    "not waited for (loops/stationwrites.py), and verification started while it works",
}


def where(stack: dict[str, dict[str, float]], idle_s: float) -> dict[str, tuple[float, float, int]]:
    """One experiment's stack time in the parts of :data:`WHERE`: name -> (wall s, CPU s,
    count); ``idle_s``: its stack time from the journal (:func:`analyse`)."""

    def get(name: str) -> tuple[float, float, int]:
        p = stack.get(name) or {}
        return float(p.get("wall_s", 0.0)), float(p.get("cpu_s", 0.0)), int(p.get("count", 0))

    def total(prefix: str) -> tuple[float, float, int]:
        parts = [get(n) for n in stack if n.startswith(prefix)]
        return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))

    out = {
        "ask": get("ask"),
        "tell": get("tell"),
        "verify": get("station:verify"),
    }
    dry = get("station:dry_run")  # the run's own dry run; the check's costs the same
    out["dry run"] = (2 * dry[0], 2 * dry[1], 2 * dry[2])
    jc, js = total("journal."), total("station:journal.")
    out["journal"] = (jc[0] + js[0], 0.0, jc[2] + js[2])
    run_call, check_call = get("station.run"), get("station.dry_run")
    run_inside = get("station:run")
    ray = max(0.0, run_call[0] - run_inside[0]) + max(0.0, check_call[0] - dry[0])
    out["ray"] = (ray, 0.0, run_call[2] + check_call[2])
    bench = get("station:bench")
    station = run_inside[0] - bench[0] - js[0] - dry[0] - out["verify"][0]
    out["station"] = (max(0.0, station), 0.0, 0)
    known = sum(v[0] for v in out.values())  # the parts on the bench's critical path
    out["campaign"] = (max(0.0, idle_s - known), 0.0, 0)
    # claimed while the previous experiment ran (loops.campaignahead), and the journal
    # records of steps that only look, not waited for, verification that overlapped the
    # bench (loops.stationwrites, loops.stationverify)
    ahead, behind = total("ahead:"), total("station:behind:")
    out["overlapped"] = (ahead[0] + behind[0], get("ahead:ask")[1], ahead[2] + behind[2])
    return out


def split(names_head: Sequence[str], names_bench: Sequence[str], k: int) -> list[str]:
    """K stations alternating between the nodes (1: the head's first)."""
    pairs = itertools.zip_longest(names_head, names_bench)
    return [n for pair in pairs for n in pair if n is not None][:k]


def program_text(budget: int, target: float | None, seed: int) -> str:
    text = EXAMPLE.read_text()
    target_text = "null" if target is None else f"{target:g}"
    for old, new in (
        ("budget: {experiments: 60, hours: 12}", f"budget: {{experiments: {budget}}}"),
        ("  target: 2.0 ", f"  target: {target_text} "),
        ("  no_improvement: 20", "  no_improvement: null"),
        ("seed: 1", f"seed: {seed}"),
        ("initial_points: 8", f"initial_points: {min(8, budget)}"),
    ):
        if old not in text:
            raise RuntimeError(f"examples/color-match/program.md changed: no {old!r} in it")
        text = text.replace(old, new)
    return text


def analyse(
    store: Path, campaign: str, target: float | None, k: int, summary: Any, speed: float
) -> Run:
    """The journal's view of one campaign (module docstring: the parts of the stack time)."""
    from loops.journal import Journal

    j = Journal(store)
    try:
        log = j.campaign_log(campaign)
        exps = j.experiments(campaign)
        trans = {e.id: j.transitions(e.id) for e in exps}
    finally:
        j.close()
    start = next(r.t for r in log if r.event == "campaign" and r.state == "running")
    end = log[-1].t
    last_free: dict[str, float] = {}
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    stack: list[float] = []
    idle_by_id: dict[str, float] = {}
    finished = sorted((e for e in exps if e.state in ("done", "failed")), key=lambda e: e.updated)
    ends: list[tuple[float, str, float | None]] = []
    benches: list[tuple[str, float, float | None]] = []  # the model's: run order, bench s
    for e in sorted(exps, key=lambda e: e.created):
        rows = trans[e.id]
        at = {(r.event, r.state): r.t for r in rows}
        if e.station is not None and e.state in ("done", "failed"):
            spent = sum(
                float((r.data or {}).get("data", {}).get("duration_s") or 0)
                for r in rows
                if r.event == "step_done"
            )
            value = e.objective if e.state == "done" else None
            benches.append((e.id, spent / speed, value))
        if e.state != "done" or e.station is None:
            continue
        proposed = at.get(("state", "proposed"))
        checked = at.get(("state", "checked"))
        running = at.get(("state", "running"))
        done = at.get(("state", "done"))
        if None in (proposed, checked, running, done):
            continue
        assert proposed and checked and running and done
        dones = [r for r in rows if r.event == "step_done"]
        if not dones:
            continue
        # the bench's own time: each step's duration as the station measured it (simulated
        # seconds on a simulated bench), not the journal's timestamps around it
        bench = sum(float((r.data or {}).get("data", {}).get("duration_s") or 0) for r in dones)
        bench /= speed
        # from the moment the station was free (its previous experiment done, or the
        # campaign's start): what was claimed ahead while it ran costs the bench nothing
        free = max(last_free.get(e.station, start), start)
        proposed, checked, running = (max(free, t) for t in (proposed, checked, running))
        parts["claim"].append(proposed - free)
        parts["check"].append(checked - proposed)
        parts["dispatch"].append(running - checked)
        parts["steps"].append(max(0.0, dones[-1].t - running - bench))
        parts["finish"].append(done - dones[-1].t)
        stack.append(done - free - bench)
        idle_by_id[e.id] = stack[-1]
        last_free[e.station] = done
        ends.append((done, e.id, e.objective))
    to_t = to_n = None
    if target is not None:
        order = {e.id: i + 1 for i, e in enumerate(finished)}
        for t_done, eid, value in sorted(ends):
            if value is not None and value <= target:
                to_t, to_n = t_done - start, order[eid]
                break
    counts = summary.counts
    model = bench_model(benches, k, target)
    return Run(
        model_s=model,
        stations=k,
        state=summary.state,
        reason=summary.reason,
        wall_s=end - start,
        to_target_s=to_t,
        experiments=int(counts["run"]),
        to_target_n=to_n,
        events=len(log),
        stack_s=stack,
        idle_by_id=idle_by_id,
        parts=parts,
        by_station={n: int(s["experiments"]) for n, s in summary.stations.items()},
    )


async def one(
    cluster: TwoNodeCluster, names: list[str], args: argparse.Namespace, work: Path
) -> Run:
    from bridge.campaigns import run_campaign
    from bridge.labconfig import load_lab
    from loops.campaign import CampaignRunner
    from loops.program import load_program

    k = len(names)
    store = work / f"k{k}" / "journal.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(cluster.lab_yaml(store))
    config["stations"] = {n: config["stations"][n] for n in names}
    if args.staleness is not None:  # a starved simulator's heartbeat is not what is measured
        from safety.envelopeload import REFERENCE_BENCH

        text, n = re.subn(
            r"max_age_s: \d+(?:\.\d+)?\n",
            f"max_age_s: {args.staleness:g}\n",
            REFERENCE_BENCH.read_text(),
        )
        if not n:
            raise RuntimeError(f"{REFERENCE_BENCH} has no max_age_s any more")
        envelope = store.parent / "envelope.yaml"
        envelope.write_text(text)
        for station in config["stations"].values():
            station["envelope"] = str(envelope)
    lab_path = store.parent / "lab.yaml"
    lab_path.write_text(yaml.safe_dump(config, sort_keys=False))
    prog_path = store.parent / "program.md"
    prog_path.write_text(program_text(args.budget, args.target, args.seed))
    lab = load_lab(lab_path)
    program = load_program(prog_path)
    campaign = f"scale-k{k}"
    stacks: dict[str, dict[str, dict[str, float]]] = {}

    def on_event(event: Mapping[str, Any]) -> None:
        if event.get("event") == "finished" and event.get("stack"):
            stacks[str(event["experiment_id"])] = dict(event["stack"])

    cpu0 = time.process_time()

    def on_runner(runner: CampaignRunner) -> None:
        runner.claim_ahead = args.claim_ahead

    summary = await run_campaign(
        program, lab, campaign_id=campaign, on_event=on_event, on_runner=on_runner
    )
    cpu = time.process_time() - cpu0
    run = analyse(store, campaign, args.target, k, summary, args.speed)
    run.stacks = {eid: stacks[eid] for eid in run.idle_by_id if eid in stacks}
    run.driver_cpu_s = cpu / max(1, run.experiments)
    return run


def where_table(runs: list[Run]) -> str:
    """Where the stack time goes, per K: each part's median and p99 (ms, wall), its CPU
    median (ms) where it has one, and how many calls per experiment."""
    lines = [
        "Where the stack time goes (per done experiment; wall ms median / p99, CPU ms median "
        "where CPU-bound, calls per experiment):",
        "",
        "| stations | " + " | ".join(WHERE) + " | idle (journal) | driver CPU ms/exp |",
        "|" + "---|" * (len(WHERE) + 3),
    ]
    for r in runs:
        rows = [where(st, r.idle_by_id[eid]) for eid, st in r.stacks.items()]
        if not rows:
            continue
        cells = []
        for name in WHERE:
            wall = [row[name][0] for row in rows]
            cpu = [row[name][1] for row in rows]
            count = [row[name][2] for row in rows]
            cell = f"{ms(wall)} / {ms(wall, 0.99)}"
            if any(cpu):
                cell += f" (CPU {ms(cpu)})"
            if any(count):
                cell += f" x{med(count):g}"
            cells.append(cell)
        lines.append(
            f"| {r.stations} | "
            + " | ".join(cells)
            + f" | {ms(r.stack_s)} / {ms(r.stack_s, 0.99)} | {r.driver_cpu_s * 1000:.0f} |"
        )
    lines += ["", *(f"- {name}: {what}" for name, what in WHERE.items())]
    return "\n".join(lines)


def ms(values: Sequence[float], q: float | None = None) -> str:
    v = med(values) if q is None else pct(values, q)
    return "-" if math.isnan(v) else f"{v * 1000:.0f}"


def table(runs: list[Run], args: argparse.Namespace) -> str:
    base = runs[0]
    lines = [
        f"benchmarks/scale.py: colour match, bayes, target ΔE {args.target}, budget "
        f"{args.budget}, seed {args.seed}, {args.speed:g}x, two Ray nodes, "
        f"{'' if args.claim_ahead else 'no '}claim ahead, staleness limits "
        f"{'as in the envelope' if args.staleness is None else f'{args.staleness:g} s'} "
        f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} "
        "cores)",
        "",
        "| stations | end | wall s | to target s | speed-up | exps | to target n | exps vs 1 "
        "| stack ms med | p99 | claim | check | dispatch | steps | finish | events/s "
        "| model s | vs model | goal |",
        "|" + "---|" * 19,
    ]
    for r in runs:
        t_base = base.to_target_s if base.to_target_s is not None else base.wall_s
        t_here = r.to_target_s if r.to_target_s is not None else r.wall_s
        n_base = base.to_target_n or base.experiments
        n_here = r.to_target_n or r.experiments
        speed = t_base / t_here if t_here else math.nan
        more = n_here / n_base if n_base else math.nan
        goal = ""
        if r.state == "error":
            goal = "no result (below)"
        elif r.stations in GOALS:
            ok = speed >= GOALS[r.stations] and (r.stations != 4 or more <= GOAL_EXPERIMENTS_X)
            extra = f", <= {GOAL_EXPERIMENTS_X}x exps" if r.stations == 4 else ""
            goal = f">= {GOALS[r.stations]}x{extra}: {'met' if ok else 'missed'}"
        if r.stations == 1 and r.state != "error":
            stack = med(r.stack_s) * 1000
            goal = f"stack < {GOAL_STACK_MS:g} ms: {'met' if stack < GOAL_STACK_MS else 'missed'}"
        if r.state != "error" and r.model_s:
            ok = t_here / r.model_s <= GOAL_MODEL_X
            goal += f"{'; ' if goal else ''}<= {GOAL_MODEL_X:g}x model: {'met' if ok else 'missed'}"
        lines.append(
            f"| {r.stations} | {r.state} | {r.wall_s:.1f} | "
            f"{'-' if r.to_target_s is None else f'{r.to_target_s:.1f}'} | {speed:.2f}x | "
            f"{r.experiments} | {'-' if r.to_target_n is None else r.to_target_n} | {more:.2f}x | "
            f"{ms(r.stack_s)} | {ms(r.stack_s, 0.99)} | "
            + " | ".join(ms(r.parts[p]) for p in PARTS)
            + f" | {r.events / r.wall_s if r.wall_s else math.nan:.1f} | {r.model_s:.1f} | "
            f"{t_here / r.model_s if r.model_s else math.nan:.2f}x | {goal} |"
        )
    lines += [
        "",
        "Speed-up and 'exps vs 1' are to the target (to the end when a run did not reach it). "
        "Stack ms: an experiment's time minus its steps' time; its parts are medians (ms) "
        "of: claim (lock, ask, journal), check (dry run on the station), dispatch (queued, "
        "the Ray call, running), steps (journaling each step, beyond the bench's own time), "
        "finish (verification, outcome, tell). Model s: the bench-time model's time to the "
        "target (the same experiments, in the same order, each its bench time only, on K "
        "stations in parallel: what the stack costs, not the optimizer); vs model: measured "
        "to target (or to the end) / model.",
    ]
    return "\n".join(lines)


@dataclass
class JournalBurst:
    """The journal actor on its own: one writer's round trip, and what concurrent writers get."""

    round_trip_ms: list[float]
    commit_ms: float  # median of the journal's own transactions (BEGIN .. fsync'ed COMMIT)
    writers: int
    events: int
    events_per_s: float


async def journal_burst(path: Path, writers: int = 16, each: int = 50) -> JournalBurst:
    """Station events (one fsync'ed transaction each) written through a journal actor on
    the head: ``each`` one after the other from one writer (the round trip), then from
    ``writers`` concurrent writers (what the journal sustains)."""
    from loops.journal import Journal
    from loops.raylinks import RayJournal, start_journal_actor

    actor = start_journal_actor(path)
    link = RayJournal(actor)
    try:
        await link.call(Journal.create_campaign, "burst", "burst", {"name": "burst"})
        trips = []
        for i in range(each):
            t0 = time.perf_counter()
            await link.call(Journal.station_event, "burst", "bench-a", "running", f"trip {i}")
            trips.append(time.perf_counter() - t0)
        commits = await link.call(Journal.commit_stats)

        async def writer(n: int) -> None:
            for i in range(each):
                await link.call(Journal.station_event, "burst", f"w{n}", "running", f"{i}")

        t0 = time.perf_counter()
        await asyncio.gather(*(writer(n) for n in range(writers)))
        elapsed = time.perf_counter() - t0
    finally:
        await actor.close.remote()
        import ray

        ray.kill(actor, no_restart=True)
    return JournalBurst(
        [t * 1000 for t in trips],
        float(commits["median_ms"]),
        writers,
        writers * each,
        writers * each / elapsed,
    )


async def main_async(args: argparse.Namespace) -> tuple[list[Run], JournalBurst | None]:
    """Each K on a cluster of its own with K benches (idle simulated benches cost CPU too)."""
    runs: list[Run] = []
    burst: JournalBurst | None = None
    saved = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    for key in saved:  # this process joins as a driver of these clusters only
        del os.environ[key]
    try:
        for k in sorted(args.stations):
            heads = math.ceil(k / 2)
            with TwoNodeCluster(
                heads, k - heads, speed=args.speed, camera_fps=args.camera_fps
            ) as c:
                print(
                    f"K={k}: two Ray nodes up: head {c.nodes['head'].ip} "
                    f"({', '.join(c.nodes['head'].stations)}), bench node {c.nodes['bench'].ip} "
                    f"({', '.join(c.nodes['bench'].stations) or 'no bench'})"
                    + (f"; no namespace: {c.netns_skipped}" if c.netns_skipped else ""),
                    file=sys.stderr,
                )
                names = split(c.nodes["head"].stations, c.nodes["bench"].stations, k)
                t0 = time.monotonic()
                try:
                    run = await one(c, names, args, c.dir / "runs")
                    if burst is None:
                        burst = await journal_burst(c.dir / "runs" / "burst.db")
                except Exception as exc:  # the row says why (a starved simulator, say)
                    run = Run(
                        k, "error", f"{type(exc).__name__}: {exc}", math.nan, None, 0, None, 0
                    )
                finally:
                    import ray

                    ray.shutdown()  # the next K joins another cluster, with its own token
                    for key in [k for k in os.environ if k.startswith("RAY_")]:
                        del os.environ[key]
                print(
                    f"K={k}: {run.state} ({run.reason}) in {time.monotonic() - t0:.0f} s real, "
                    f"{run.experiments} experiments {run.by_station}",
                    file=sys.stderr,
                )
                runs.append(run)
    finally:
        os.environ.update(saved)
    return runs, burst


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n")[0]
    )
    p.add_argument("--stations", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--target", type=float, default=4.0, help="ΔE2000 target (default 4)")
    p.add_argument("--budget", type=int, default=40, help="experiments at most (default 40)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--speed", type=float, default=500.0, help="simulated clock (default 500x)")
    p.add_argument("--camera-fps", type=float, default=4.0)
    p.add_argument(
        "--staleness",
        type=float,
        default=10.0,
        help="the envelope's heartbeat/reading staleness limits, s (default 10: a simulator "
        "starved by a loaded machine trips a 2 s limit; 0: the reference envelope's own)",
    )
    p.add_argument(
        "--claim-ahead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="claim each station's next proposal while it runs one (loops/campaignahead.py; "
        "default on)",
    )
    p.add_argument(
        "--model-seeds",
        type=int,
        default=10,
        help="seeds of what the optimizer alone allows each station count, on the bench-time "
        "model (benchmarks/scalemodel.py; about 15 s a seed; 0: not printed; default 10)",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke: stations 1 2, budget 4")
    args = p.parse_args(argv)
    if not args.staleness:
        args.staleness = None
    if args.quick:
        args.stations, args.budget, args.model_seeds = [1, 2], 4, 0
    if args.stations[0] != 1 and 1 not in args.stations:
        args.stations = [1, *args.stations]  # the baseline
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    runs, burst = asyncio.run(main_async(args))
    print(table(runs, args))
    print()
    print(where_table(runs))
    for r in runs:
        if r.state == "error":
            print(f"K={r.stations}: no result: {r.reason}")
    if burst is not None:
        print(
            f"\nThe journal actor alone: one writer's round trip (a Ray call, an fsync'ed SQLite "
            f"transaction) median {med(burst.round_trip_ms):.1f} ms, p99 "
            f"{pct(burst.round_trip_ms, 0.99):.1f} ms, of which the SQLite transaction itself "
            f"{burst.commit_ms:.1f} ms; {burst.writers} concurrent writers: "
            f"{burst.events_per_s:.0f} events/s ({burst.events} events)."
        )
    if args.model_seeds > 0:
        rows = model_rows(args.stations, args.model_seeds, target=args.target, cap=args.budget)
        print()
        print(model_table(rows, target=args.target))


if __name__ == "__main__":
    main()
