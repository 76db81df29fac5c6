"""Part 2 of benchmarks/faults.py: faults injected during campaigns on several stations.

One campaign per station (:class:`~loops.campaign.CampaignRunner` in this process, station
actors in Ray workers, one journal actor). Per station, a seeded RNG waits a random gap,
injects the next fault (the kinds in :data:`KINDS`, in a seeded shuffled cycle shared by
the stations, parameters drawn at random), clears it after a random time and recovers the
station as an operator would (see :meth:`StationFaults.recover`). Attribution is done
afterwards from the journal and the wire (:func:`attribute`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from benchmarks.faultlib import (
    EXAMPLE,
    OPERATOR,
    Physics,
    Unsafe,
    audit_journal,
    audit_wire,
    budget_check,
    campaign_program,
    colour_benches,
    dump_tasks,
    vessel_check,
)
from benchmarks.stats import med, pct
from bridge.campaigns import lab_clock, make_runner, set_up, start_lab_station
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import sim_lab_yaml
from loops.campaign import CampaignRunner
from loops.journal import Journal
from loops.program import Program
from loops.raylinks import start_journal_actor
from safety.envelopeload import reference_envelope
from simulators.bench import SimulatedBench, SimulatedLab
from simulators.benchworld import Faults

#: the colour bench's fault kinds (the buffer bench's own are not injected here), plus the
#: death of the station actor
KINDS = (
    *(
        k
        for k in Faults.KNOWN
        if k not in ("probe-out", "probe-drift", "balance-overload", "balance-vibration")
    ),
    "actor-kill",
)
#: faults whose effect reaches every station (one broker for the lab)
LAB_WIDE = ("broker-restart",)
GAP_S = (0.1, 1.0)  # real seconds between a recovery and the next injection
HOLD_S = (0.2, 1.5)  # real seconds a fault stays injected
RECOVERY_TIMEOUT_S = 180.0
#: narrower than the example's space: shorter experiments, less dye per experiment (the
#: daily dye budget would otherwise rest the stations for most of a long run)
SPACE = {
    "red_ml:        {type: float, low: 0.0, high: 1.2": "red_ml:        {type: float, low: 0.0, high: 0.5",
    "green_ml:      {type: float, low: 0.0, high: 1.2": "green_ml:      {type: float, low: 0.0, high: 0.5",
    "blue_ml:       {type: float, low: 0.0, high: 1.2": "blue_ml:       {type: float, low: 0.0, high: 0.5",
    "temperature_c: {type: float, low: 25, high: 75": "temperature_c: {type: float, low: 25, high: 40",
    "hold_s:        {type: int, low: 30, high: 600": "hold_s:        {type: int, low: 30, high: 120",
}


def fault_program(folder: Path) -> Program:
    """The colour-match example in :data:`SPACE`, random, with a budget it never reaches."""
    text = EXAMPLE.read_text()
    for old, new in SPACE.items():
        assert old in text, f"examples/color-match/program.md changed: {old!r}"
        text = text.replace(old, new)
    path = folder / "program.md"
    path.write_text(text)
    return campaign_program(100_000, path)


def fault_params(kind: str, rng: random.Random) -> dict[str, Any]:
    """Random parameters of one fault of ``kind`` (simulators.benchworld.Faults)."""
    if kind == "garbled-bytes":
        device = rng.choice(["pumps", "hotplate", "color-sensor"])
        return {"device": device, "probability": round(rng.uniform(0.2, 1.0), 2)}
    if kind == "no-reply":
        return {"device": rng.choice(["pumps", "hotplate", "enclosure"])}
    if kind == "modbus-exception":
        return {"device": "hotplate", "code": rng.choice([4, 6])}
    if kind == "dropped-connection":
        return {"device": rng.choice(["pumps", "hotplate", "enclosure", "color-sensor", "camera"])}
    if kind == "broker-restart":
        return {"down_s": round(rng.uniform(0.0, 0.5), 2)}
    if kind == "pump-alarm":
        return {"pump": rng.choice(["red", "green", "blue", "waste"]), "code": rng.choice("SRTE")}
    if kind == "clogged-pump":
        return {
            "pump": rng.choice(["red", "green", "blue"]),
            "factor": round(rng.uniform(0.1, 0.6), 2),
        }
    if kind == "stuck-heater":
        return {"temperature_c": round(rng.uniform(60.0, 120.0), 1)}
    if kind == "heartbeat-stop":
        return {"device": "enclosure"}
    return {}


def kind_cycle(rng: random.Random) -> Iterator[str]:
    """Every kind once per round, in a fresh seeded order each round."""
    while True:
        order = list(KINDS)
        rng.shuffle(order)
        yield from order


@dataclass
class Injected:
    """One injected fault and how the station came back."""

    kind: str
    station: str
    params: dict[str, Any]
    t_inj: float  # time.monotonic()
    t_clr: float
    wall_inj: float
    wall_clr: float
    t_back: float | None = None  # the station ran an experiment again (as polled)
    resets_refused: int = 0  # operator resets refused while a monitor still held
    resumed: int = 0  # campaign resumes it took
    starts_failed: int = 0  # new station actors that could not open the bench (tried again)
    replaced_actor: bool = False


class StationFaults:
    """One station's campaign and its faults (module docstring)."""

    def __init__(
        self,
        lab: LabConfig,
        bench: SimulatedBench,
        journal: Any,
        actor: Any,
        program: Program,
        rng: random.Random,
        kinds: Iterator[str],
    ) -> None:
        self.lab, self.bench, self.name = lab, bench, bench.name
        self.journal, self.actor, self.program = journal, actor, program
        self.rng, self.kinds = rng, kinds
        self.cid = f"faults-{self.name}"
        self.runner: CampaignRunner | None = None
        self.task: asyncio.Task[Any] | None = None
        self.created = False
        self.started_at = 0.0  # time.monotonic() of the last 'started' event
        self.finished: dict[str, float | None] = {}  # results as the runner reported them
        self.injected: list[Injected] = []
        self.errors: list[str] = []

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "started":
            self.started_at = time.monotonic()
        elif kind == "finished":
            self.finished[event["experiment_id"]] = event.get("objective")

    async def start_campaign(self) -> None:
        """Create the campaign, or resume it (safe state, reset, drain; never a re-run)."""
        runner = make_runner(
            self.lab, self.program, self.journal, {self.name: self.actor}, self.cid, self._event
        )
        await runner.prepare(resume=self.created, operator=OPERATOR)
        self.created = True
        self.runner = runner
        self.task = asyncio.create_task(runner.run(), name=f"faults-{self.cid}")

    async def _replace_actor(self) -> None:
        """A new station actor from lab.yaml; one that cannot open its bench (e.g. the broker
        is restarting under another station's fault) is killed, and the error raised."""
        clock, _ = lab_clock(self.lab)
        actor = start_lab_station(self.lab, self.name, self.journal, clock)
        try:
            await asyncio.wait_for(asyncio.wrap_future(actor.start.remote().future()), 120)
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        self.actor = actor

    async def _actor_alive(self) -> bool:
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.actor.status.remote().future()), 30)
            return True
        except ray.exceptions.RayActorError:
            return False

    async def recover(self, f: Injected) -> None:
        """Until the station runs an experiment again: a dead actor is replaced (from
        lab.yaml), a stopped campaign's station is reset by the operator once its monitors
        have cleared (refusals counted) and the campaign resumed (its own recovery: safe
        state, reset, drain)."""
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.task is not None
            if self.task.done():
                with contextlib.suppress(Exception):
                    self.task.result()
                if not await self._actor_alive():
                    try:
                        await self._replace_actor()
                    except Exception:  # as an operator would: look again, start it again
                        f.starts_failed += 1
                        await asyncio.sleep(0.5)
                        continue
                    f.replaced_actor = True
                try:
                    await self.actor.reset.remote(OPERATOR, f"after injected fault {f.kind}")
                except ray.exceptions.RayActorError:
                    continue
                except Exception:  # a monitor still holds (ResetRefused): wait and ask again
                    f.resets_refused += 1
                    await asyncio.sleep(0.2)
                    continue
                try:
                    await self.start_campaign()
                except Exception as exc:  # e.g. the actor died under the resume: look again
                    self.errors.append(f"{f.kind}: resume failed: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.2)
                    continue
                f.resumed += 1
            elif self.started_at > f.t_clr:
                status = await self.actor.status.remote()
                if status.get("busy") and not status.get("tripped"):
                    f.t_back = time.monotonic()
                    return
            await asyncio.sleep(0.05)
        self.errors.append(f"{f.kind} at {f.wall_inj:.1f}: not back within {RECOVERY_TIMEOUT_S} s")
        dump_tasks(f"{self.name}: not back within {RECOVERY_TIMEOUT_S} s after {f.kind}")

    async def run(self, quota: int, progress: Any, counter: list[int], total: int) -> None:
        for attempt in range(3):
            try:
                await self.start_campaign()
                break
            except Exception:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0)
        for _ in range(quota):
            await asyncio.sleep(self.rng.uniform(*GAP_S))
            kind = next(self.kinds)
            params = fault_params(kind, self.rng)
            t_inj, wall_inj = time.monotonic(), time.time()
            if kind == "actor-kill":
                ray.kill(self.actor, no_restart=True)
            else:
                self.bench.inject_fault(kind, **params)
            await asyncio.sleep(self.rng.uniform(*HOLD_S))
            if kind != "actor-kill":
                self.bench.clear_fault(kind)
            f = Injected(kind, self.name, params, t_inj, time.monotonic(), wall_inj, time.time())
            self.injected.append(f)
            await self.recover(f)
            counter[0] += 1
            if counter[0] % 25 == 0 or counter[0] == total:
                progress(f"faults: {counter[0]}/{total} injected and recovered")

    async def stop(self) -> None:
        if self.runner is not None and self.task is not None and not self.task.done():
            self.runner.stop("benchmark over")
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 300)


async def fault_campaign(s: Any, progress: Any, tmp: Path) -> dict[str, Any]:
    """Part 2 (benchmarks/faults.py's docstring)."""
    rng = random.Random(s.seed + 1)
    envelope = reference_envelope()
    work = tmp / "faults"
    work.mkdir()
    store = work / "journal.db"
    program = fault_program(work)
    kinds = kind_cycle(random.Random(s.seed + 2))
    t_wall0 = time.time()
    async with SimulatedLab(stations=s.stations, speed=s.fault_speed, seed=s.seed) as sim:
        benches = colour_benches(sim)
        (work / "lab.yaml").write_text(sim_lab_yaml(sim, store, bridge_id="faultbench-faults"))
        lab = load_lab(work / "lab.yaml")
        journal = start_journal_actor(lab.store)
        clock, _ = lab_clock(lab)
        actors = {b.name: start_lab_station(lab, b.name, journal, clock) for b in benches}
        await asyncio.gather(*(a.start.remote() for a in actors.values()))
        for attempt in range(3):  # a set-up step lost on a loaded machine: reset, again
            try:
                await set_up(lab, actors, who="faultbench:setup")
                break
            except Exception:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0)
                for a in actors.values():
                    with contextlib.suppress(Exception):
                        await a.reset.remote(OPERATOR, "set-up failed: trying again")
        runs = [
            StationFaults(
                lab, b, journal, actors[b.name], program, random.Random(rng.random()), kinds
            )
            for b in benches
        ]
        quotas = [s.faults // len(runs) + (i < s.faults % len(runs)) for i in range(len(runs))]
        counter = [0]
        progress(f"faults: {s.faults} on {len(runs)} stations at {s.fault_speed:g}x")
        try:
            async with Physics(benches) as physics:
                await asyncio.gather(
                    *(
                        r.run(q, progress, counter, s.faults)
                        for r, q in zip(runs, quotas, strict=True)
                    )
                )
                await asyncio.gather(*(r.stop() for r in runs))
        finally:
            for r in runs:
                with contextlib.suppress(Exception):
                    await r.actor.stop.remote()
                ray.kill(r.actor, no_restart=True)
            with contextlib.suppress(Exception):
                await journal.close.remote()
            ray.kill(journal, no_restart=True)
        wire = {b.name: audit_wire(b, envelope) for b in benches}
        budgets = {
            b.name: budget_check(physics.series[b.name], envelope, store, b.name, t_wall0)
            for b in benches
        }
        vessels = {b.name: vessel_check(physics.series[b.name], envelope) for b in benches}
    seen: dict[str, float | None] = {}
    for r in runs:
        seen.update(r.finished)
    audit = audit_journal(store, [r.cid for r in runs], seen)
    injected = [f for r in runs for f in r.injected]
    unsafe = [u for found, _ in wire.values() for u in found]
    per_kind = attribute(store, [r.cid for r in runs], injected, unsafe, audit)
    return {
        "stations": [r.name for r in runs],
        "speed": s.fault_speed,
        "injected": len(injected),
        "per_kind": per_kind,
        "journal": audit.as_dict(),
        "wire_checked": sum(n for _, n in wire.values()),
        "unsafe": [u.as_dict() for u in unsafe],
        "budget": budgets,
        "vessel": vessels,
        "unrecovered": sum(f.t_back is None for f in injected),
        "errors": [e for r in runs for e in r.errors],
        "faults": [asdict(f) for f in injected],
    }


def _intervals(store: Path, campaign_ids: list[str]) -> list[dict[str, Any]]:
    """Each experiment's station, state, 'running' time and closing time (wall clock)."""
    out = []
    with Journal(store) as j:
        for cid in campaign_ids:
            for e in j.experiments(cid):
                log = j.transitions(e.id)
                running = next((t.t for t in log if t.state == "running"), None)
                end = next(
                    (
                        t.t
                        for t in reversed(log)
                        if t.state in ("done", "failed", "cancelled", "rejected")
                    ),
                    None,
                )
                cancelled = next((t.t for t in log if t.state == "cancelled"), None)
                out.append(
                    {
                        "id": e.id,
                        "station": e.station,
                        "state": e.state,
                        "trusted": e.trusted,
                        "running": running,
                        "end": end,
                        "cancelled": cancelled,
                    }
                )
    return out


def attribute(
    store: Path,
    campaign_ids: list[str],
    injected: list[Injected],
    unsafe: list[Unsafe],
    audit: Any,
) -> dict[str, dict[str, Any]]:
    """Per fault kind: injected, experiments affected and their outcome, lost, run twice,
    unsafe commands, recovery times (injection -> the next 'running' on the station)."""
    exps = _intervals(store, campaign_ids)
    bad = {x.split(":", 1)[0] for x in audit.left_open + audit.changed + audit.dropped}
    twice = {x.split(":", 1)[0] for x in audit.twice}
    out: dict[str, dict[str, Any]] = {}
    for f in injected:
        k = out.setdefault(
            f.kind,
            {
                "injected": 0,
                "affected": set(),
                "outcomes": {},
                "lost": set(),
                "twice": set(),
                "unsafe": 0,
                "recovery_s": [],
                "resets_refused": 0,
                "resumes": 0,
                "starts_failed": 0,
            },
        )
        k["injected"] += 1
        k["resets_refused"] += f.resets_refused
        k["resumes"] += f.resumed
        k["starts_failed"] += f.starts_failed
        t_back_wall = f.wall_inj + ((f.t_back or f.t_clr) - f.t_inj)
        for e in exps:
            if f.kind not in LAB_WIDE and e["station"] != f.station:
                continue
            ran = (
                e["running"] is not None
                and e["running"] <= f.wall_clr
                and (e["end"] is None or e["end"] >= f.wall_inj)
            )
            refused = e["cancelled"] is not None and f.wall_inj <= e["cancelled"] <= t_back_wall
            if ran or refused:
                k["affected"].add(e["id"])
        nxt = [
            e["running"]
            for e in exps
            if e["station"] == f.station and e["running"] and e["running"] > f.wall_clr
        ]
        if nxt:
            k["recovery_s"].append(min(nxt) - f.wall_inj)
        k["unsafe"] += sum(
            1
            for u in unsafe
            if (f.kind in LAB_WIDE or u.station == f.station)
            and f.t_inj <= u.real_t <= (f.t_back or f.t_clr)
        )
    by_id = {e["id"]: e for e in exps}
    for k in out.values():
        for eid in k["affected"]:
            e = by_id[eid]
            what = e["state"] if e["state"] != "done" else ("done" if e["trusted"] else "untrusted")
            k["outcomes"][what] = k["outcomes"].get(what, 0) + 1
        k["lost"] = len(k["affected"] & bad)
        k["twice"] = len(k["affected"] & twice)
        rec = k.pop("recovery_s")
        k["recovery_median_s"] = med(rec)
        k["recovery_p99_s"] = pct(rec, 0.99)
        k["recovered"] = len(rec)
        k["affected"] = len(k["affected"])
    return dict(sorted(out.items()))


def fault_table(r: dict[str, Any]) -> list[str]:
    j = r["journal"]
    lines = [
        f"Fault campaign: {r['injected']} faults on {len(r['stations'])} stations at "
        f"{r['speed']:g}x, one campaign per station; {j['experiments']} experiments "
        + "("
        + ", ".join(f"{n} {s}" for s, n in sorted(j["states"].items()))
        + ")",
        f"  {'kind':<19}{'faults':>7}{'affected':>9}{'lost':>6}{'twice':>6}{'unsafe':>7}"
        f"{'rec p50 s':>10}{'rec p99 s':>10}  outcomes of the affected",
    ]
    for kind, k in r["per_kind"].items():
        outcomes = ", ".join(f"{n} {s}" for s, n in sorted(k["outcomes"].items())) or "-"
        lines.append(
            f"  {kind:<19}{k['injected']:>7}{k['affected']:>9}{k['lost']:>6}{k['twice']:>6}"
            f"{k['unsafe']:>7}{k['recovery_median_s']:>10.2f}{k['recovery_p99_s']:>10.2f}  {outcomes}"
        )
    lines.append(
        f"  whole run: experiments lost {len(j['changed']) + len(j['left_open'])} "
        f"(finished, closed without their measurement: {len(j['dropped'])}), run twice "
        f"{len(j['twice'])}, unsafe commands {len(r['unsafe'])} of {r['wire_checked']} checked, "
        f"faults the station never came back from {r['unrecovered']}"
    )
    tried = sum(k.get("starts_failed", 0) for k in r["per_kind"].values())
    lines.append(
        f"  recovery as an operator: resets refused while a monitor held "
        f"{sum(k['resets_refused'] for k in r['per_kind'].values())}, campaign resumes "
        f"{sum(k['resumes'] for k in r['per_kind'].values())}, new station actors that could "
        f"not open the bench (started again) {tried}; harness errors {len(r['errors'])}"
        + (f" (first: {r['errors'][0]})" if r["errors"] else "")
    )
    for name, b in r["budget"].items():
        v = r["vessel"][name]
        if b:
            lines.append(
                f"  {name}: dye {b['pushed_ml']:.1f} mL delivered, ledger {b['ledger_ml']:.1f} mL; "
                f"most in one day {b['max_in_window_ml']:.1f} of {b['limit_ml']:g} mL; vial most "
                f"{v['most_ml']:.2f} mL of {v['max_ml']}, spilled {v['spilled_ml']:.2f} mL"
            )
    return lines
