"""benchmarks/scale.py's results: one campaign's record (:class:`Run`), where its stack time
goes (:func:`where`), and the tables printed (per run, where the time goes, and the medians
over seeds when several seeds ran)."""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.stats import med, pct

__all__ = [
    "GOALS",
    "PARTS",
    "WHERE",
    "Run",
    "ms",
    "ratios",
    "seeds_table",
    "table",
    "where",
    "where_table",
]

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
    seed: int = 1  # the program's seed


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


def where_table(runs: list[Run]) -> str:
    """Where the stack time goes, per K: each part's median and p99 (ms, wall), its CPU
    median (ms) where it has one, and how many calls per experiment."""
    lines = [
        "Where the stack time goes (per done experiment; wall ms median / p99, CPU ms median "
        "where CPU-bound, calls per experiment):",
        "",
        "| stations | seed | " + " | ".join(WHERE) + " | idle (journal) | driver CPU ms/exp |",
        "|" + "---|" * (len(WHERE) + 4),
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
            f"| {r.stations} | {r.seed} | "
            + " | ".join(cells)
            + f" | {ms(r.stack_s)} / {ms(r.stack_s, 0.99)} | {r.driver_cpu_s * 1000:.0f} |"
        )
    lines += ["", *(f"- {name}: {what}" for name, what in WHERE.items())]
    return "\n".join(lines)


def ms(values: Sequence[float], q: float | None = None) -> str:
    v = med(values) if q is None else pct(values, q)
    return "-" if math.isnan(v) else f"{v * 1000:.0f}"


def _base(run: Run, runs: Sequence[Run]) -> Run:
    """The 1-station run of ``run``'s seed (what its ratios are to)."""
    return next((r for r in runs if r.seed == run.seed and r.stations == 1), runs[0])


def ratios(run: Run, base: Run) -> tuple[float, float, float]:
    """``run`` against ``base`` (the same seed's 1 station): the speed-up to the target, the
    experiments ratio (both to the end when it was not reached) and measured / model."""
    t_base = base.to_target_s if base.to_target_s is not None else base.wall_s
    t_here = run.to_target_s if run.to_target_s is not None else run.wall_s
    n_base = base.to_target_n or base.experiments
    n_here = run.to_target_n or run.experiments
    speed = t_base / t_here if t_here else math.nan
    more = n_here / n_base if n_base else math.nan
    model = t_here / run.model_s if run.model_s else math.nan
    return speed, more, model


def _goal(stations: int, speed: float, more: float, stack_ms: float, model: float) -> str:
    goal = ""
    if stations in GOALS:
        ok = speed >= GOALS[stations] and (stations != 4 or more <= GOAL_EXPERIMENTS_X)
        extra = f", <= {GOAL_EXPERIMENTS_X}x exps" if stations == 4 else ""
        goal = f">= {GOALS[stations]}x{extra}: {'met' if ok else 'missed'}"
    if stations == 1:
        goal = f"stack < {GOAL_STACK_MS:g} ms: {'met' if stack_ms < GOAL_STACK_MS else 'missed'}"
    if math.isfinite(model):
        ok = model <= GOAL_MODEL_X
        goal += f"{'; ' if goal else ''}<= {GOAL_MODEL_X:g}x model: {'met' if ok else 'missed'}"
    return goal


def table(runs: list[Run], args: argparse.Namespace) -> str:
    seeds = sorted({r.seed for r in runs})
    lines = [
        f"benchmarks/scale.py: colour match, bayes, target ΔE {args.target}, budget "
        f"{args.budget}, seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}, "
        f"{args.speed:g}x, two Ray nodes, "
        f"{'' if args.claim_ahead else 'no '}claim ahead, staleness limits "
        f"{'as in the envelope' if args.staleness is None else f'{args.staleness:g} s'} "
        f"(load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} "
        "cores)",
        "",
        "| stations | seed | end | wall s | to target s | speed-up | exps | to target n "
        "| exps vs 1 | stack ms med | p99 | claim | check | dispatch | steps | finish "
        "| events/s | model s | vs model | goal |",
        "|" + "---|" * 20,
    ]
    for r in runs:
        speed, more, model = ratios(r, _base(r, runs))
        goal = (
            "no result (below)"
            if r.state == "error"
            else _goal(r.stations, speed, more, med(r.stack_s) * 1000, model)
        )
        lines.append(
            f"| {r.stations} | {r.seed} | {r.state} | {r.wall_s:.1f} | "
            f"{'-' if r.to_target_s is None else f'{r.to_target_s:.1f}'} | {speed:.2f}x | "
            f"{r.experiments} | {'-' if r.to_target_n is None else r.to_target_n} | {more:.2f}x | "
            f"{ms(r.stack_s)} | {ms(r.stack_s, 0.99)} | "
            + " | ".join(ms(r.parts[p]) for p in PARTS)
            + f" | {r.events / r.wall_s if r.wall_s else math.nan:.1f} | {r.model_s:.1f} | "
            f"{model:.2f}x | {goal} |"
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


def seeds_table(runs: list[Run]) -> str:
    """Per station count, the medians over the seeds of each seed's ratios to its own 1-station
    run (speed-up, experiments, measured / model) and of the runs' median stack times; the
    goals judged on those medians. Empty with fewer than two seeds."""
    seeds = sorted({r.seed for r in runs})
    if len(seeds) < 2:
        return ""
    lines = [
        f"Medians over {len(seeds)} seeds (each seed's ratios to its own 1-station run; a run "
        "that ended in an error is left out and counted):",
        "",
        "| stations | runs | speed-up | per-seed range | exps vs 1 | stack ms med | vs model "
        "| goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted({r.stations for r in runs}):
        ok_runs = [r for r in runs if r.stations == k and r.state != "error"]
        errors = sum(1 for r in runs if r.stations == k and r.state == "error")
        got = [ratios(r, _base(r, runs)) for r in ok_runs]
        if not got:
            lines.append(f"| {k} | 0 ({errors} errors) | - | - | - | - | - | - |")
            continue
        speed = statistics.median(g[0] for g in got)
        more = statistics.median(g[1] for g in got)
        model = statistics.median(g[2] for g in got)
        stack = statistics.median(med(r.stack_s) * 1000 for r in ok_runs)
        lo, hi = min(g[0] for g in got), max(g[0] for g in got)
        lines.append(
            f"| {k} | {len(ok_runs)}{f' ({errors} errors)' if errors else ''} | {speed:.2f}x | "
            f"{lo:.2f}-{hi:.2f}x | {more:.2f}x | {stack:.0f} | {model:.2f}x | "
            f"{_goal(k, speed, more, stack, model)} |"
        )
    return "\n".join(lines)
