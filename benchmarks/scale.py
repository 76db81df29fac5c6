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
from dataclasses import dataclass
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
from benchmarks.scaletables import (  # noqa: E402
    PARTS,
    Run,
    seeds_table,
    table,
    where_table,
)
from benchmarks.stats import med, pct  # noqa: E402
from benchmarks.twonode import TwoNodeCluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "color-match" / "program.md"


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
    cluster: TwoNodeCluster, names: list[str], args: argparse.Namespace, work: Path, seed: int
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
    prog_path.write_text(program_text(args.budget, args.target, seed))
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
    run.seed = seed
    run.stacks = {eid: stacks[eid] for eid in run.idle_by_id if eid in stacks}
    run.driver_cpu_s = cpu / max(1, run.experiments)
    return run


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
    """Each seed, each K on a cluster of its own with K benches (idle simulated benches cost
    CPU too)."""
    runs: list[Run] = []
    burst: JournalBurst | None = None
    saved = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    for key in saved:  # this process joins as a driver of these clusters only
        del os.environ[key]
    try:
        for seed, k in itertools.product(args.seeds, sorted(args.stations)):
            heads = math.ceil(k / 2)
            with TwoNodeCluster(
                heads, k - heads, speed=args.speed, camera_fps=args.camera_fps
            ) as c:
                print(
                    f"K={k}, seed {seed}: two Ray nodes up: head {c.nodes['head'].ip} "
                    f"({', '.join(c.nodes['head'].stations)}), bench node {c.nodes['bench'].ip} "
                    f"({', '.join(c.nodes['bench'].stations) or 'no bench'})"
                    + (f"; no namespace: {c.netns_skipped}" if c.netns_skipped else ""),
                    file=sys.stderr,
                )
                names = split(c.nodes["head"].stations, c.nodes["bench"].stations, k)
                t0 = time.monotonic()
                try:
                    run = await one(c, names, args, c.dir / "runs", seed)
                    if burst is None:
                        burst = await journal_burst(c.dir / "runs" / "burst.db")
                except Exception as exc:  # the row says why (a starved simulator, say)
                    run = Run(
                        k, "error", f"{type(exc).__name__}: {exc}", math.nan, None, 0, None, 0
                    )
                    run.seed = seed
                finally:
                    import ray

                    ray.shutdown()  # the next K joins another cluster, with its own token
                    for key in [k for k in os.environ if k.startswith("RAY_")]:
                        del os.environ[key]
                print(
                    f"K={k}, seed {seed}: {run.state} ({run.reason}) in {time.monotonic() - t0:.0f} s real, "
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
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1],
        help="the program's seeds: every station count runs with each; with several, the "
        "medians over them are printed too (default 1)",
    )
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
    if summary := seeds_table(runs):
        print()
        print(summary)
    print()
    print(where_table(runs))
    for r in runs:
        if r.state == "error":
            print(f"K={r.stations}, seed {r.seed}: no result: {r.reason}")
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
