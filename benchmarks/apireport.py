"""benchmarks/api.py's measurements and their report: what an e-stop, a start and a run
measured (:class:`EStopRun`, :class:`Start`, :class:`Results`), the summary the results file
holds (:func:`summarize`) and the printed report (:func:`report`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from benchmarks.stats import med, pct

ESTOP_GOAL_MS = 50.0
SAFE_WIRE_EXPECTED = {"hotplate": 2, "pumps": 8, "enclosure": 1, "color": 1}


def ms(x: float) -> str:
    return f"{x * 1e3:9.1f}"


#: the hops of one e-stop, in order, as ms after the requester's PUBLISH (``EStopRun.hops``)
HOPS = {
    "rx": "the service's MQTT client received it (paho's network thread)",
    "handler": "the service's e-stop handler ran (its task on the event loop)",
    "trip": "the station actor's trip began (Ray call arrived)",
    "trip_done": "the actor's last safe-state action returned",
    "wire_first": "first safe-state command on the simulated wire",
    "wire_last": "last safe-state command on the simulated wire",
    "ray_back": "the actor's trip report was back in the service",
    "reply": "the MQTT reply reached the requester",
}


@dataclasses.dataclass
class Start:
    via: str
    campaign_id: str
    t_wall: float  # time.time() just before the request
    t_mono: float
    reply_s: float | None = None
    running_s: float | None = None
    result_latency_s: float | None = None


@dataclasses.dataclass
class EStopRun:
    case: str  # quiet, flood, storm
    via: str
    wire_s: float | None  # e-stop -> last safe-state command on the wire
    reply_s: float | None
    commands: int
    missing: list[str]
    failed: list[str] = dataclasses.field(default_factory=list)  # instruments not safe in time
    hops: dict[str, float] = dataclasses.field(default_factory=dict)  # HOPS: ms after t0
    gc_ms: float = 0.0  # garbage collection in this process between t0 and the last command
    gc_gen: int = -1  # the oldest generation collected then (-1: none)
    seq: int = 0  # its place in the run's order of e-stops (warm-ups included)
    last_device: str = ""  # whose safe-state command came last on the wire
    actor_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # per instrument
    # ms the threads of this process / of the station actor's waited, runnable, for a CPU
    # between the PUBLISH and the reply (summed over threads: a measure of CPU starvation)
    runq_ms: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Results:
    starts: list[Start]
    estops: list[EStopRun]
    api_rate: float
    raw_rate: float
    setup_s: float
    loaded: dict[str, tuple[list[EStopRun], int, float]] = dataclasses.field(default_factory=dict)
    mosquitto: str = ""


def spread(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, p99 and max of ``values`` (seconds) in ms."""
    return {
        "n": len(values),
        **{f"p{q}": round(pct(values, q / 100) * 1e3, 3) for q in (50, 95, 99)},
        "max": round(max(values) * 1e3, 3) if values else math.nan,
    }


def estop_cases(r: Results) -> dict[str, list[EStopRun]]:
    return {"quiet": r.estops, **{name: runs for name, (runs, _, _) in r.loaded.items()}}


def summarize(args: argparse.Namespace, r: Results, elapsed: float) -> dict[str, Any]:
    """What the results file's ``summary`` holds: every figure of the printed report."""
    mq = [s for s in r.starts if s.via == "mqtt"]
    di = [s for s in r.starts if s.via == "direct"]
    estops: dict[str, Any] = {}
    for case, runs in estop_cases(r).items():
        estops[case] = {}
        for via in ("mqtt", "direct"):
            mine = [e for e in runs if e.via == via]
            estops[case][via] = {
                "wire": spread([e.wire_s for e in mine if e.wire_s is not None]),
                "reply": spread([e.reply_s for e in mine if e.reply_s is not None]),
                "incomplete": sum(1 for e in mine if e.missing),
                "failed": sum(1 for e in mine if e.failed),
            }
        if case in r.loaded:
            _, sent, took = r.loaded[case]
            estops[case]["load_msgs_per_s"] = round(sent / took, 2) if took else None
    goal = {case: estops[case]["mqtt"]["wire"]["p99"] for case in estops}
    lat = [s.result_latency_s for s in r.starts if s.result_latency_s is not None]
    return {
        "run_s": round(elapsed, 1),
        "setup_s": round(r.setup_s, 1),
        "mosquitto": r.mosquitto,
        "start_running": {
            "mqtt": spread([s.running_s for s in mq if s.running_s is not None]),
            "direct": spread([s.running_s for s in di if s.running_s is not None]),
        },
        "start_reply": spread([s.reply_s for s in mq if s.reply_s is not None]),
        "estop": estops,
        "estop_goal_ms": ESTOP_GOAL_MS,
        "estop_goal_p99_ms": goal,
        "estop_goal_met": all(v < ESTOP_GOAL_MS for v in goal.values()),
        "result_latency": spread(lat),
        "results_per_s": {"api": round(r.api_rate), "raw": round(r.raw_rate)},
    }


def report(args: argparse.Namespace, r: Results, s: dict[str, Any]) -> str:
    """The printed report of the summary ``s`` of ``r``."""
    out: list[str] = []
    say = out.append
    say("labbridge MQTT campaign API benchmark (issues 5, 13)")
    say(
        f"one simulated reference station at {args.speed:g}x on local Ray (warm), {r.mosquitto} "
        f"with a password on loopback, a paho MQTT v5 requester; set-up {r.setup_s:.1f} s"
    )
    say("")
    mq = [x for x in r.starts if x.via == "mqtt"]
    di = [x for x in r.starts if x.via == "direct"]

    def row(label: str, a: Sequence[float], b: Sequence[float] | None = None) -> None:
        line = f"    {label:<52} {ms(med(a))} {ms(pct(a, 0.99))}"
        if b is not None:
            ratio = med(a) / med(b) if med(b) > 0 else math.nan
            line += f" {ms(med(b))} {ms(pct(b, 0.99))} {ratio:6.2f}x"
        say(line)

    say(
        f"1. campaigns/start -> first experiment running on the station ({len(mq)} + {len(di)} starts, ms)"
    )
    say(
        f"    {'interval':<52} {'MQTT med':>9} {'MQTT p99':>9} {'direct':>9} {'dir p99':>9} {'ratio':>7}"
    )
    row(
        "start -> experiment 'running' (journal)",
        [x.running_s for x in mq if x.running_s is not None],
        [x.running_s for x in di if x.running_s is not None],
    )
    row("start -> reply at the requester", [x.reply_s for x in mq if x.reply_s is not None])
    say("")
    cases = estop_cases(r)
    est = s["estop"]
    say(
        f"2. e-stop -> last safe-state command on the wire (idle station, reset between; "
        f"{args.estops} MQTT + {args.estops} direct per case, interleaved, after {args.warmup} "
        "uncounted warm-ups; ms)"
    )
    for name, (_, sent, took) in r.loaded.items():
        what = (
            f"a flood of malformed requests on campaigns/start ({sent / took:,.0f} msg/s)"
            if name == "flood"
            else f"a {args.storm_mb:g} MB payload storm on campaigns/start ({sent / took:.1f} msg/s)"
        )
        say(f"    {name}: under {what}")
    for key, title in (
        ("wire", "e-stop -> last safe-state command (wire log)"),
        ("reply", "e-stop -> report back (MQTT reply / direct return)"),
    ):
        say(f"    {title}")
        say(
            f"    {'case':<7}{'path':<8}{'n':>5} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"
            f" {'p50/quiet':>10} {'p99/quiet':>10}"
        )
        for case in cases:
            for via in ("mqtt", "direct"):
                x, q = est[case][via][key], est["quiet"][via][key]
                say(
                    f"    {case:<7}{via:<8}{x['n']:>5} {x['p50']:>8.1f} {x['p95']:>8.1f} "
                    f"{x['p99']:>8.1f} {x['max']:>8.1f} {x['p50'] / q['p50']:>9.2f}x "
                    f"{x['p99'] / q['p99']:>9.2f}x"
                )
    every = [e for runs in cases.values() for e in runs]
    counts = [e.commands for e in every]
    incomplete = [e for e in every if e.missing]
    failed = [e for e in every if e.failed]
    say(
        f"    safe-state commands seen per e-stop: {med(counts):.0f} (expected "
        f"{sum(SAFE_WIRE_EXPECTED.values())}: hotplate 2, pumps 8, enclosure 1, colour 1); "
        f"e-stops with some missing: {len(incomplete)}"
        + (f" (e.g. {incomplete[0].missing})" if incomplete else "")
        + f"; e-stops where an instrument did not report safe in time: {len(failed)}"
        + (f" (e.g. {failed[0].failed})" if failed else "")
    )
    say("")
    say("2c. where the time goes, over MQTT: ms after the PUBLISH at each hop (median per case;")
    say(
        "    then the slowest e-stop of each case; gc: this process's garbage collection meanwhile)"
    )
    names = list(HOPS)
    say(f"    {'':<14}" + "".join(f"{h:>11}" for h in names) + f"{'gc ms':>8}  last on the wire")
    for case, runs in cases.items():
        mine = [e for e in runs if e.via == "mqtt"]
        cells = [med([e.hops[h] for e in mine if h in e.hops]) for h in names]
        say(f"    {case + ' p50':<14}" + "".join(f"{c:>11.1f}" for c in cells))
        slow = max(mine, key=lambda e: e.wire_s or 0.0, default=None)
        if slow is not None:
            cells = [slow.hops.get(h, math.nan) for h in names]
            label = f"{case} #{slow.seq}"
            say(
                f"    {label:<14}"
                + "".join(f"{c:>11.1f}" for c in cells)
                + f"{slow.gc_ms:>8.1f}  {slow.last_device}"
                + "".join(f"; {k} waited {v:.0f} ms for a CPU" for k, v in slow.runq_ms.items())
            )
    for h, what in HOPS.items():
        say(f"      {h}: {what}")
    say("")
    lat = [x.result_latency_s for x in r.starts if x.result_latency_s is not None]
    say("3. results")
    say(f"    {'':<52} {'median':>9} {'p99':>9}")
    say(
        f"    {'experiment done (journal) -> result at a subscriber, ms':<52} {ms(med(lat))} {ms(pct(lat, 0.99))}"
    )
    say(
        f"    throughput of {args.results} result messages at a subscriber: API {r.api_rate:,.0f}/s, "
        f"raw paho {r.raw_rate:,.0f}/s ({r.api_rate / r.raw_rate:.2f}x)"
    )
    say("")
    say(f"{'goal':<46} {'target':>10} {'measured':>11}  met?")
    for name, p99 in s["estop_goal_p99_ms"].items():
        label = f"e-stop over MQTT -> last wire cmd, p99, {name}"
        say(
            f"{label:<46} {'< ' + format(ESTOP_GOAL_MS, 'g') + ' ms':>10} "
            f"{p99:>8.1f} ms  {'yes' if p99 < ESTOP_GOAL_MS else 'NO'}"
        )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    say(f"\n(run took {s['run_s']:.0f} s; load average {load} on {os.cpu_count()} CPUs)")
    return "\n".join(out)
