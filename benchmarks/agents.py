"""Agents over MCP (issue 14): tool-call latency next to the Python API, and the e-stop while
an agent floods proposals.

Run:  python benchmarks/agents.py [--calls 200] [--estops 30] [--speed 1000]
      python benchmarks/agents.py --quick          # a smoke run (tests/test_benchmark_agents.py)

One simulated reference station (``SimulatedLab(stations=1)``) opened by a
:class:`~bridge.service.LabService` on local, loopback Ray (warm), served by the MQTT API
(:class:`~bridge.mqttapi.MqttApi`, mosquitto with passwords) and the MCP server over
streamable HTTP (:func:`~bridge.mcpserver.mcp_http`, 127.0.0.1; its transport in a
process of its own, :mod:`bridge.mcpproc`), as ``labbridge serve --mcp-http`` does. The
simulated bench runs in this process, beside the service (its wire log is the clock). The agent ``bench`` has a quota with every limit set (high enough never
to refuse), so every proposal pays for the whole quota check (the journal's counts).

1. Tool-call latency: ``dry_run`` and ``propose`` on a paused campaign through an MCP
   client of the official SDK over HTTP (in this process), next to the same calls on the
   Python API (``LabService.dry_run``, ``LabService.propose`` as ``agent:bench``),
   interleaved (HTTP, Python, HTTP, Python, ...); then the same calls over stdio:
   ``labbridge mcp`` as a subprocess that opens the lab itself (so only after the first
   part closed it; the same station, journal and Ray). The proposal is one the safety
   layer refuses (the whole path: quota, journal, constraints, the station's dry run, the
   rejection journaled; nothing queued, so every call does the same work).
2. E-stop: from just before an ``estop`` PUBLISH to the last of the station's safe-state
   commands as the simulators' wire logs record their arrival (benchmarks/api.py's
   :func:`~benchmarks.api.run_estops`, and next to it ``LabService.estop`` called
   directly), quiet and while an agent floods proposals from another process: the agent
   ``flood`` at its quota's rate (the default: 20 tool calls/s, bursts of 40; past it
   "busy") and the agent ``flood-open`` with no rate limit to speak of (every proposal
   reaches the campaign: quota check, journal, the station's dry run). Each flooder keeps
   ``--flood-concurrency`` proposals in flight. The control: the same e-stops while a
   process that sends nothing keeps one core busy (a flooding client on this machine takes
   one: what part of a slow-down is the machine's, not the service's); the flooding
   client and the burner are held to the same one core (``sched_setaffinity``), so the
   flood's figure over the control's is what the service pays. Before each e-stop
   a paused campaign is running (an e-stop aborts it; the next is started after the
   reset). The ratio to quiet of the medians is the figure: goal unchanged within noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

# benchmarks/safety.py is named like the package: run as a script, this directory is
# sys.path[0] and "import safety" (through bridge) would import that file. Drop the entry.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import httpx2  # noqa: E402
import ray  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from benchmarks.api import EXAMPLE, Requester, run_estops  # noqa: E402
from benchmarks.apireport import EStopRun, ms  # noqa: E402
from benchmarks.stats import med, pct  # noqa: E402
from bridge.agentcli import TOKEN_ENV  # noqa: E402
from bridge.labconfig import load_lab  # noqa: E402
from bridge.mcpserver import HttpBind, mcp_http  # noqa: E402
from bridge.mqttapi import MqttApi, mqtt_settings  # noqa: E402
from bridge.service import LabService  # noqa: E402
from bridge.simbench import sim_lab_yaml  # noqa: E402
from loops.program import load_program  # noqa: E402
from simulators.bench import SimulatedLab  # noqa: E402
from simulators.broker import MosquittoBroker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: a point the safety layer refuses: 3.6 mL > the vial's 2.8 (:func:`program` has no cap)
OVERFILL = {"red_ml": 1.2, "green_ml": 1.2, "blue_ml": 1.2, "temperature_c": 40.0, "hold_s": 60}
GOOD = {"red_ml": 0.7, "green_ml": 0.1, "blue_ml": 0.75, "temperature_c": 40.0, "hold_s": 60}
UNLIMITED = (
    "proposals_per_hour: 1000000, experiments_per_day: 1000000, "
    "budgets: {dye_ml_per_day: 1000000}, tool_calls_per_s: 1000000, tool_call_burst: 1000000"
)
AGENTS = f"""
agents:
  bench: {{read: "*", propose: "*", start: "*", control: "*", stations: "*",
           quota: {{{UNLIMITED}}}}}
  flood: {{read: "*", propose: "*", stations: "*"}}
  flood-open: {{read: "*", propose: "*", stations: "*",
                quota: {{tool_calls_per_s: 1000000, tool_call_burst: 1000000}}}}
"""


def program(budget: int) -> str:
    """The colour-match example with a budget, no target and no cap on the total volume
    (its floor stays): the safety layer is what refuses an overfill."""
    base = load_program(EXAMPLE)
    return dataclasses.replace(
        base,
        constraints=tuple(c for c in base.constraints if ">=" in c.text),
        budget=dataclasses.replace(base.budget, experiments=budget),
        stop=dataclasses.replace(base.stop, target=None, no_improvement=None),
        initial_points=1,
    ).to_markdown()


# ------------------------------------------------------------- part 1: tool calls
@dataclasses.dataclass
class Calls:
    """Seconds per call, by tool (``dry_run``, ``propose``) and way (stdio, HTTP, Python)."""

    times: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)

    def add(self, tool: str, via: str, seconds: float) -> None:
        self.times.setdefault((tool, via), []).append(seconds)

    def get(self, tool: str, via: str) -> list[float]:
        return self.times.get((tool, via), [])


async def mcp_call(agent: Client, tool: str, **args: Any) -> dict[str, Any]:
    res = await agent.call_tool(tool, args)
    if res.is_error:
        raise RuntimeError(f"{tool} refused: {res.content[0].text}")  # type: ignore[union-attr]
    return res.structured_content or {}


async def time_mcp(agent: Client, cid: str, calls: Calls, via: str, n: int) -> None:
    """``n`` dry runs and ``n`` proposals over one MCP session (after 5 warm-ups of each)."""
    for i in range(n + 5):
        t0 = time.perf_counter()
        await mcp_call(agent, "dry_run", campaign_id=cid, params=GOOD)
        t1 = time.perf_counter()
        receipt = await mcp_call(agent, "propose", campaign_id=cid, params=OVERFILL)
        t2 = time.perf_counter()
        if receipt.get("accepted"):
            raise RuntimeError(f"the refused point was accepted: {receipt}")
        if i >= 5:
            calls.add("dry_run", via, t1 - t0)
            calls.add("propose", via, t2 - t1)


async def time_http_and_python(service: LabService, url: str, token: str, n: int) -> Calls:
    """HTTP and the Python API, interleaved, on a paused campaign."""
    cid = f"calls-{secrets.token_hex(3)}"
    await paused_campaign(service, cid)
    calls = Calls()
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=60) as agent,
    ):
        for i in range(n + 5):
            t0 = time.perf_counter()
            await mcp_call(agent, "dry_run", campaign_id=cid, params=GOOD)
            t1 = time.perf_counter()
            await service.dry_run(cid, GOOD, "agent:bench")
            t2 = time.perf_counter()
            await mcp_call(agent, "propose", campaign_id=cid, params=OVERFILL)
            t3 = time.perf_counter()
            receipt = await service.propose(cid, OVERFILL, "agent:bench")
            t4 = time.perf_counter()
            if receipt.accepted:
                raise RuntimeError(f"the refused point was accepted: {receipt}")
            if i >= 5:
                calls.add("dry_run", "HTTP", t1 - t0)
                calls.add("dry_run", "Python", t2 - t1)
                calls.add("propose", "HTTP", t3 - t2)
                calls.add("propose", "Python", t4 - t3)
    await service.control(cid, "stop", who="benchmark")
    await service.wait_campaign(cid)  # the station is free for the next part
    return calls


async def time_stdio(lab_path: Path, token: str, gcs: str, n: int, calls: Calls) -> None:
    """``labbridge mcp`` over stdio: it opens the lab; start a campaign, pause it once its
    optimizer's first experiment ended, then time the calls."""
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "bridge.agentcli", "mcp", "--lab", str(lab_path), "--ray-address", gcs],
        env={**os.environ, TOKEN_ENV: token},
        cwd=ROOT,
    )
    cid = f"stdio-{secrets.token_hex(3)}"
    async with Client(server, read_timeout_seconds=120) as agent:
        await mcp_call(agent, "start_campaign", campaign_id=cid, program=program(1000))
        await mcp_call(agent, "control", campaign_id=cid, action="pause", reason="benchmark")
        for _ in range(1200):  # its optimizer's first experiment ends (a pause lets it)
            if not (await mcp_call(agent, "campaign", campaign_id=cid))["progress"]["in_flight"]:
                break
            await asyncio.sleep(0.05)
        await time_mcp(agent, cid, calls, "stdio", n)


async def paused_campaign(service: LabService, cid: str) -> None:
    """A running campaign whose optimizer claims nothing: paused before its workers run. A
    station a monitor tripped meanwhile (a starved machine: a stale reading) is reset."""
    for _ in range(5):
        started = await service.start_campaign(cid, program(1000), who="benchmark")
        if started.accepted:
            await service.control(cid, "pause", who="benchmark")
            return
        if not any("is tripped" in e for e in started.errors):
            break
        print(f"  note: {'; '.join(started.errors)}: reset", file=sys.stderr)
        await service.reset("benchmark", "a monitor tripped the idle station")
        await asyncio.sleep(1.0)
    raise RuntimeError(f"campaign {cid} not started: {started.errors}")


# ------------------------------------------------------------------ part 2: flood
_FLOOD_SCRIPT = """
import asyncio, json, signal, sys, time
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
url, token, target, concurrency, good, bad = sys.argv[1:7]
params = [json.loads(good), json.loads(bad)]
counts = {}

def kind(res):
    if not res.is_error:
        return "accepted" if (res.structured_content or {}).get("accepted") else "refused (safety)"
    text = res.content[0].text
    for word, name in (("busy:", "busy (rate)"), ("quota of", "refused (quota)"),
                       ("not accepting", "campaign closed"), ("no campaign", "campaign closed")):
        if word in text:
            return name
    return "other: " + text[:80]

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    headers = {"Authorization": "Bearer " + token}
    async with httpx2.AsyncClient(headers=headers) as http, Client(
        streamable_http_client(url, http_client=http), read_timeout_seconds=60
    ) as agent:
        print("ready", flush=True)
        t0 = time.monotonic()

        async def worker(i):
            n = i
            while not stop.is_set():
                with open(target) as f:
                    cid = f.read().strip()
                n += 1
                try:
                    res = await agent.call_tool("propose", {"campaign_id": cid, "params": params[n % 2]})
                    k = kind(res)
                except Exception as exc:  # HTTP 429: refused unread (it ignores "busy")
                    k = "HTTP 429 (unread)" if "error response" in str(exc) else "error: " + str(exc)[:60]
                counts[k] = counts.get(k, 0) + 1

        await asyncio.gather(*(worker(i) for i in range(int(concurrency))))
        print(json.dumps({"elapsed": time.monotonic() - t0, "counts": counts}), flush=True)

asyncio.run(main())
"""


def one_core(pid: int) -> None:
    """Keep process ``pid`` on this machine's last core: the flooding client and the
    control's burner each get the same one core (on a lab's network the agent's client
    runs on a machine of its own; here it shares this one's, no more than the control)."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {(os.cpu_count() or 1) - 1})


class Flood:
    """An agent flooding proposals over MCP HTTP from another process (so that its client
    takes no CPU time from this one's service and simulators; on one core,
    :func:`one_core`): ``concurrency`` proposals in
    flight, to the campaign named in ``target`` (a file, replaced when the campaign
    changes), each a point the station's safety layer refuses (never queued, so every one
    that passes the rate limit takes the whole path: quota, journal, the station's dry
    run)."""

    def __init__(self, url: str, token: str, target: Path, concurrency: int) -> None:
        self.argv = [url, token, str(target), str(concurrency), json.dumps(OVERFILL)]
        self.argv.append(json.dumps(OVERFILL))
        self.counts: dict[str, int] = {}
        self.elapsed = 0.0

    async def __aenter__(self) -> Flood:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _FLOOD_SCRIPT, *self.argv, stdout=asyncio.subprocess.PIPE
        )
        one_core(self.proc.pid)
        assert self.proc.stdout is not None
        if (await self.proc.stdout.readline()).strip() != b"ready":
            self.proc.kill()
            await self.proc.wait()
            raise RuntimeError("the flooding agent did not start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):  # (it failed: its output says why)
            self.proc.terminate()  # its calls in flight are answered, then it reports
        raw, _ = await asyncio.wait_for(self.proc.communicate(), 60)
        out = raw.decode()
        last = out.strip().splitlines()[-1] if out.strip() else "{}"
        got = json.loads(last)
        self.counts, self.elapsed = dict(got.get("counts", {})), float(got.get("elapsed", 0.0))

    @property
    def rate(self) -> float:
        return sum(self.counts.values()) / self.elapsed if self.elapsed else math.nan


class Burner:
    """The control: another process that keeps one core busy and sends nothing, on the core
    a flooding client gets (:func:`one_core`; the benchmark's processes share its cores)."""

    async def __aenter__(self) -> Burner:
        code = "import time\nwhile True:\n    time.perf_counter()\n"
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        one_core(self.proc.pid)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.kill()
        await self.proc.wait()


@dataclasses.dataclass
class EStops:
    quiet: list[EStopRun]
    flooded: dict[str, tuple[list[EStopRun], Flood]]
    burned: list[EStopRun]


async def run_part2(
    service: LabService,
    client: Requester,
    sim: SimulatedLab,
    url: str,
    tokens: dict[str, str],
    folder: Path,
    args: argparse.Namespace,
) -> EStops:
    target = folder / "flood-target"

    async def next_campaign() -> None:
        cid = f"estop-{secrets.token_hex(3)}"
        await paused_campaign(service, cid)
        part = target.with_suffix(".part")
        part.write_text(cid)
        part.replace(target)  # the flooder never reads half a name
        await asyncio.sleep(0.3)  # a flooder is on the new campaign before the next e-stop

    await next_campaign()
    bench = sim.stations[0]
    print(f"2. {args.estops} + {args.estops} e-stops, quiet ...", file=sys.stderr)
    quiet = await run_estops(service, client, bench, args.estops, after_reset=next_campaign)
    print("2b. the same while another process burns a core (the control) ...", file=sys.stderr)
    async with Burner():
        burned = await run_estops(service, client, bench, args.estops, after_reset=next_campaign)
    flooded: dict[str, tuple[list[EStopRun], Flood]] = {}
    for agent in ("flood", "flood-open"):
        print(f"2c. the same while agent {agent} floods proposals ...", file=sys.stderr)
        async with Flood(url, tokens[agent], target, args.flood_concurrency) as flood:
            await asyncio.sleep(0.5)  # the flood is steady before the first e-stop
            runs = await run_estops(service, client, bench, args.estops, after_reset=next_campaign)
        flooded[agent] = (runs, flood)
        await asyncio.sleep(0.5)
    return EStops(quiet, flooded, burned)


# -------------------------------------------------------------------------- main
@dataclasses.dataclass
class Results:
    calls: Calls
    estops: EStops
    setup_s: float


@contextlib.asynccontextmanager
async def served(
    sim: SimulatedLab, broker: MosquittoBroker, folder: Path
) -> AsyncIterator[tuple[Path, LabService, MqttApi, str, dict[str, str]]]:
    """The lab, its MQTT API and its MCP server on one service (``labbridge serve
    --mcp-http``)."""
    path = folder / "lab.yaml"
    text = sim_lab_yaml(sim, folder / "journal.db", bridge_id="bench")
    text += (
        f"mqtt:\n  url: mqtt://labbridge@127.0.0.1:{broker.port}\n"
        "  password_env: LB_BENCH_SERVICE_PASSWORD\n  session_expiry_s: 0\n"
    )
    path.write_text(text + AGENTS)
    lab = load_lab(path)
    store = lab.agents.store()
    tokens = {name: store.issue(name, who="benchmark") for name in lab.agents.agents}
    api = MqttApi(mqtt_settings(lab), lab.bridge_id)
    await api.connect()
    try:
        async with LabService(lab) as service:
            await api.attach(service)
            async with mcp_http(service, HttpBind("127.0.0.1", 0)) as url:
                yield path, service, api, url, tokens
            await api.detach()
    finally:
        await api.close("benchmark over")


async def main_async(args: argparse.Namespace) -> Results:
    password, bench_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    os.environ["LB_BENCH_SERVICE_PASSWORD"] = password
    broker = MosquittoBroker(users={"labbridge": password, "bench": bench_password})
    broker.start()
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lb-bench-agents-") as tmp:
            folder = Path(tmp)
            async with SimulatedLab(stations=1, speed=args.speed) as sim:
                async with served(sim, broker, folder) as (path, service, api, url, tokens):
                    client = Requester(broker, "bench", bench_password, api.root)
                    setup_s = time.monotonic() - t0
                    try:
                        print(
                            f"1. {args.calls} calls x 2 tools, HTTP and Python ...", file=sys.stderr
                        )
                        calls = await time_http_and_python(
                            service, url, tokens["bench"], args.calls
                        )
                        estops = await run_part2(service, client, sim, url, tokens, folder, args)
                    finally:
                        client.close()
                gcs = ray.get_runtime_context().gcs_address
                print(f"1b. {args.calls} calls x 2 tools over stdio ...", file=sys.stderr)
                await time_stdio(path, tokens["bench"], gcs, args.calls, calls)
    finally:
        broker.stop()
        ray.shutdown()
    return Results(calls, estops, setup_s)


def _ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return med(a) / med(b) if med(b) > 0 else math.nan


def report(args: argparse.Namespace, r: Results, elapsed: float) -> None:
    print()
    print("labbridge agents benchmark (issue 14)")
    print(
        f"one simulated reference station at {args.speed:g}x on local Ray (warm); the MQTT API "
        f"(mosquitto, passwords) and the MCP server (HTTP, 127.0.0.1, its own process) on one service; "
        f"set-up {r.setup_s:.1f} s"
    )
    print()
    print(
        f"1. tool-call latency ({args.calls} calls of each, ms; propose: refused by the safety layer)"
    )
    head = f"    {'call':<10}"
    for via in ("stdio", "HTTP", "Python"):
        head += f" {via + ' med':>11} {via + ' p99':>11}"
    print(head + f" {'HTTP/Python':>12} {'stdio/Python':>13}")
    for tool in ("dry_run", "propose"):
        line = f"    {tool:<10}"
        for via in ("stdio", "HTTP", "Python"):
            v = r.calls.get(tool, via)
            line += f" {ms(med(v)):>11} {ms(pct(v, 0.99)):>11}"
        py = r.calls.get(tool, "Python")
        line += f" {_ratio(r.calls.get(tool, 'HTTP'), py):11.2f}x"
        line += f" {_ratio(r.calls.get(tool, 'stdio'), py):12.2f}x"
        print(line)
    print()
    e = r.estops
    print(
        f"2. e-stop -> last safe-state command on the wire ({args.estops} + {args.estops} "
        "e-stops per case, idle station, a paused campaign, ms)"
    )
    print(
        f"    {'case':<44} {'MQTT med':>9} {'MQTT p99':>9} {'direct':>9} {'dir p99':>9} "
        f"{'MQTT vs quiet':>14}"
    )

    def wire(runs: list[EStopRun], via: str) -> list[float]:
        return [x.wire_s for x in runs if x.via == via and x.wire_s is not None]

    quiet_mqtt = wire(e.quiet, "mqtt")

    def row(label: str, runs: list[EStopRun]) -> None:
        m, d = wire(runs, "mqtt"), wire(runs, "direct")
        print(
            f"    {label:<44} {ms(med(m))} {ms(pct(m, 0.99))} {ms(med(d))} {ms(pct(d, 0.99))} "
            f"{_ratio(m, quiet_mqtt):13.2f}x"
        )

    row("quiet", e.quiet)
    row("while a process burns a core (control)", e.burned)
    for agent, (runs, _) in e.flooded.items():
        what = "rate-limited, 20 calls/s" if agent == "flood" else "no rate limit"
        row(f"while agent {agent} floods ({what})", runs)
    for agent, (_, flood) in e.flooded.items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(flood.counts.items()))
        print(f"    {agent}: {flood.rate:,.0f} proposals/s answered ({counts})")
    every = [*e.quiet, *e.burned, *(x for runs, _ in e.flooded.values() for x in runs)]
    missing = [x for x in every if x.missing]
    failed = [x for x in every if x.failed]
    print(
        f"    e-stops with safe-state commands missing on the wire: {len(missing)}"
        + (f" (e.g. {missing[0].missing})" if missing else "")
        + f"; with an instrument not reported safe: {len(failed)}"
    )
    spread = pct(quiet_mqtt, 0.75) / pct(quiet_mqtt, 0.25) if quiet_mqtt else math.nan
    print(
        f"    goal: unchanged within noise (the quiet e-stops' own p75/p25: {spread:.2f}x); "
        f"median ratio to quiet: control {_ratio(wire(e.burned, 'mqtt'), quiet_mqtt):.2f}x, "
        + ", ".join(
            f"{agent} {_ratio(wire(runs, 'mqtt'), quiet_mqtt):.2f}x"
            for agent, (runs, _) in e.flooded.items()
        )
    )
    print(f"\n(run took {elapsed:.0f} s)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per tool and way (200)")
    parser.add_argument("--estops", type=int, default=30, help="e-stops per side and case (30)")
    parser.add_argument("--speed", type=float, default=1000.0, help="simulated clock (1000)")
    parser.add_argument(
        "--flood-concurrency", type=int, default=16, help="proposals in flight per flooder (16)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument("--verbose", action="store_true", help="show the service's logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.estops = 10, 3
    if min(args.calls, args.estops, args.flood_concurrency) < 1 or not args.speed > 0:
        parser.error("--calls, --estops, --flood-concurrency must be >= 1 and --speed > 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:  # every e-stop logs at CRITICAL by design; keep the table readable
        for name in ("bridge", "safety", "loops", "bleak", "mcp", "httpx"):
            logging.getLogger(name).setLevel(
                logging.CRITICAL + 1 if name in ("bridge", "safety", "loops") else logging.ERROR
            )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.monotonic()
    results = asyncio.run(main_async(args))
    report(args, results, time.monotonic() - t0)


if __name__ == "__main__":
    main()
