"""What benchmarks/faults.py observes, from the device side and from the journal.

* :func:`actuating`: the commands that make a simulated colour bench act (a pump RUN, a
  hotplate setpoint or stirrer speed, a heater or stirrer enable, the light on), read from
  the simulators' wire log (``world.wire``) with the real time each arrived;
* :func:`audit_wire`: every command on a station's wire, decoded into the envelope's
  channels and checked with the envelope's own checks (:meth:`ChannelLimit.check
  <safety.envelope.ChannelLimit.check>`, :meth:`Rule.check <safety.envelope.Rule.check>`);
* :class:`Physics`: the bench's own counters sampled while it runs (dye the pumps pushed
  into the vial, the vial's volume, spills), for the budget and the vessel;
* :func:`audit_journal`: the journal's step log (steps started twice, an experiment run
  twice, experiments left open, finished experiments closed without their measurement);
* process and temp-folder accounting (:func:`ray_actor_processes`, :func:`lb_folders`);
* :func:`dump_tasks`: every asyncio task's stack, logged (a run that hangs explains itself:
  SIGUSR1, or a station not back within the recovery timeout).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import io
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from instruments.drivers.pump_wire import RATE_UNITS
from loops.journal import Journal
from loops.program import Program, load_program
from safety.envelope import Envelope
from safety.limits import Violation
from simulators.bench import PUMP_ADDRESSES, SimulatedBench, SimulatedLab

log = logging.getLogger(__name__)

DYE = ("red", "green", "blue")
FLUID_OF = {address: fluid for fluid, address in PUMP_ADDRESSES.items()}
TERMINAL = ("done", "failed", "rejected", "cancelled")
#: who the benchmark's operator actions (resets, resumes) are recorded as
OPERATOR = "faultbench"


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"


def campaign_program(experiments: int, path: Path = EXAMPLE) -> Program:
    """The colour-match program at ``path`` (default the example): random proposals, no stop
    rule but ``experiments``, no time budget."""
    base = load_program(path)
    return dataclasses.replace(
        base,
        strategy="random",
        initial_points=min(base.initial_points, max(1, experiments // 2)),
        budget=dataclasses.replace(base.budget, experiments=experiments, hours=None),
        stop=dataclasses.replace(base.stop, target=None, no_improvement=None),
    )


def colour_benches(lab: SimulatedLab) -> list[SimulatedBench]:
    """The colour bench's stations of a running simulated lab."""
    benches = [b for b in lab.stations if isinstance(b, SimulatedBench)]
    if len(benches) != len(lab.stations):
        raise ValueError("benchmarks/faults.py runs on the colour bench only")
    return benches


# --------------------------------------------------------------------- the wire
def _hotplate_writes(data: Any) -> dict[int, int]:
    """A hotplate wire record -> {holding register: value written} (empty for a read)."""
    if not isinstance(data, dict) or data.get("fc") not in (6, 16):
        return {}
    start, values = data.get("address"), list(data.get("values") or [])
    if not isinstance(start, int):
        return {}
    return {start + i: int(v) for i, v in enumerate(values)}


def _pump_command(text: Any) -> tuple[int, str, str] | None:
    """``"0RAT5.0MM"`` -> ``(0, "RAT", "5.0MM")``; None when it is not an addressed command."""
    line = str(text).strip()
    digits = len(line) - len(line.lstrip("0123456789"))
    if digits == 0 or len(line) < digits + 3:
        return None
    return int(line[:digits]), line[digits : digits + 3].upper(), line[digits + 3 :]


def actuating(
    bench: SimulatedBench, since: float, until: float = math.inf
) -> list[tuple[float, str, Any]]:
    """``(time.monotonic, device, command)`` of every command that made the bench act and
    arrived in ``(since, until]``: a pump RUN, a hotplate setpoint or stirrer speed, a
    heater or stirrer enable, the enclosure's light switched on."""
    out: list[tuple[float, str, Any]] = []
    wire = bench.world.wire
    for r in wire.entries("pumps"):
        cmd = _pump_command(r.data)
        if since < r.real_t <= until and not r.note and cmd is not None and cmd[1] == "RUN":
            out.append((r.real_t, "pumps", r.data))
    for r in wire.entries("hotplate"):
        writes = _hotplate_writes(r.data)
        if not since < r.real_t <= until or not writes:
            continue
        if 0 in writes or 1 in writes or writes.get(2) == 1 or writes.get(3) == 1:
            out.append((r.real_t, "hotplate", writes))
    for r in wire.entries("enclosure"):
        light = r.data.get("light") if isinstance(r.data, dict) else None
        if since < r.real_t <= until and isinstance(light, dict) and light.get("on"):
            out.append((r.real_t, "enclosure", r.data))
    return sorted(out, key=lambda e: e[0])


@dataclass(frozen=True)
class Unsafe:
    """A command that reached a device although the envelope forbids what it set."""

    station: str
    real_t: float
    device: str
    command: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "station": self.station,
            "real_t": self.real_t,
            "device": self.device,
            "command": repr(self.command),
            "reason": self.reason,
        }


def _decode(device: str, data: Any, state: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """One wire record -> (the envelope channels it sets, whether it only makes things safer:
    switches something off or stops a pump, as the guard's ``safer_when`` commands)."""
    if device == "pumps":
        cmd = _pump_command(data)
        if cmd is None or cmd[0] not in FLUID_OF:
            return {}, False
        address, verb, param = cmd
        if verb == "STP":
            return {}, True
        if verb == "RAT" and param:
            unit = param[-2:].upper()
            try:
                value = float(param[:-2]) * RATE_UNITS[unit]
            except (KeyError, ValueError):
                return {}, False
            return {f"{FLUID_OF[address]}.rate_ml_min": value}, False
        return {}, False
    if device == "hotplate":
        writes = _hotplate_writes(data)
        updates: dict[str, Any] = {}
        if 0 in writes:
            raw = writes[0]
            updates["hotplate.setpoint_c"] = (raw - 0x10000 if raw >= 0x8000 else raw) / 10.0
        if 1 in writes:
            updates["hotplate.stirrer_setpoint_rpm"] = writes[1]
        if 2 in writes:
            updates["hotplate.heater"] = writes[2] == 1
        if 3 in writes:
            updates["hotplate.stirrer"] = writes[3] == 1
        if 1 in writes or 3 in writes:
            on = updates.get("hotplate.stirrer", state.get("hotplate.stirrer", False))
            rpm = updates.get(
                "hotplate.stirrer_setpoint_rpm", state.get("hotplate.stirrer_setpoint_rpm", 0)
            )
            updates["hotplate.stirrer_rpm"] = rpm if on else 0
        safer = bool(writes) and set(writes) <= {2, 3} and all(v == 0 for v in writes.values())
        return updates, safer
    if device == "enclosure" and isinstance(data, dict) and isinstance(data.get("light"), dict):
        light = data["light"]
        updates = {"enclosure.light": bool(light.get("on"))}
        if "intensity" in light:
            updates["enclosure.intensity"] = light["intensity"]
        return updates, not light.get("on")
    return {}, False


def audit_wire(
    bench: SimulatedBench, envelope: Envelope, since: float = 0.0
) -> tuple[list[Unsafe], int]:
    """Every command that reached ``bench``'s pumps, hotplate and enclosure after ``since``
    (``time.monotonic``), checked against ``envelope`` with its own checks: each channel the
    command sets against its limits (min, max, allowed values) and, after it, every rule on
    the state the wire has built (a command that only switches something off is not
    checked, as the guard lets safer commands through). Rates of change are not checked
    here: at a high simulated speed a few ms of transport jitter are minutes of bench time.
    Returns the unsafe commands and the number of commands checked."""
    records = sorted(
        (r for d in ("pumps", "hotplate", "enclosure") for r in bench.world.wire.entries(d)),
        key=lambda r: r.real_t,
    )
    state: dict[str, Any] = {
        "hotplate.heater": False,
        "hotplate.stirrer": False,
        "hotplate.stirrer_rpm": 0,
        "hotplate.stirrer_setpoint_rpm": 0,
        "enclosure.light": False,
        "enclosure.lid": bench.world.enclosure.lid,  # a sensor here: the simulated lid stays
    }
    rules = [r for r in envelope.rules if set(r.expr.names_in_order()) <= set(envelope.channels)]
    unsafe: list[Unsafe] = []
    checked = 0
    for r in records:
        if r.note or r.real_t <= since:  # undecodable / not answered / malformed: not acted on
            continue
        updates, safer = _decode(r.device, r.data, state)
        if not updates:
            continue
        found: list[Violation] = []
        if not safer:
            checked += 1
            for name, value in updates.items():
                limit = envelope.channels.get(name)
                if limit is not None:
                    plain = replace(limit, max_rise_per_min=None, max_rate_per_min=None)
                    found += plain.check(value, state.get(name), None, 0.0, 0.0)
        state.update(updates)
        if not safer:
            found += [v for v in (rule.check(state) for rule in rules) if v is not None]
        unsafe += [Unsafe(bench.name, r.real_t, r.device, r.data, v.reason) for v in found]
    return unsafe, checked


# -------------------------------------------------------------------- physics
@dataclass
class Series:
    """One station's sampled physics: sim time, real time, dye delivered into the vial (mL,
    cumulative: the dye pumps' ``delivered_to_vial_ml``, spills included), the vial's volume
    and what spilled."""

    sim_t: list[float] = field(default_factory=list)
    real_t: list[float] = field(default_factory=list)
    wall_t: list[float] = field(default_factory=list)
    dye_ml: list[float] = field(default_factory=list)
    vial_ml: list[float] = field(default_factory=list)
    spilled_ml: list[float] = field(default_factory=list)

    def dye_between(self, wall_from: float, wall_to: float = math.inf) -> float:
        """Dye pushed between two wall-clock times (nearest samples)."""
        if not self.wall_t:
            return 0.0
        i = max(0, bisect.bisect_left(self.wall_t, wall_from) - 1)
        j = min(len(self.wall_t) - 1, bisect.bisect_right(self.wall_t, wall_to) - 1)
        return max(0.0, self.dye_ml[j] - self.dye_ml[i]) if j >= i else 0.0

    def max_dye_in_window(self, window_s: float) -> float:
        """The most dye pushed within any ``window_s`` of the bench's clock (each window from
        the first sample at or after its start: exact to one sampling interval)."""
        best = 0.0
        for j, t in enumerate(self.sim_t):
            i = bisect.bisect_left(self.sim_t, t - window_s)
            best = max(best, self.dye_ml[j] - self.dye_ml[i])
        return best


class Physics:
    """Samples each station's world every ``every_s`` real seconds while running (a task)."""

    def __init__(self, benches: Iterable[SimulatedBench], every_s: float = 0.05) -> None:
        self.benches = list(benches)
        self.every_s = every_s
        self.series = {b.name: Series() for b in self.benches}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        for bench in self.benches:
            world, s = bench.world, self.series[bench.name]
            world.advance()
            with world.lock:
                dye = sum(p.delivered_to_vial_ml for p in world.pumps.values() if p.fluid in DYE)
                s.sim_t.append(world.clock.now())
                s.real_t.append(time.monotonic())
                s.wall_t.append(time.time())
                s.dye_ml.append(dye)
                s.vial_ml.append(world.vial.volume_ml)
                s.spilled_ml.append(world.vial.spilled_ml)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    async def __aenter__(self) -> Physics:
        self._task = asyncio.create_task(self._run(), name="faults-physics")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample()


def budget_check(
    series: Series, envelope: Envelope, store: Path, station: str, since_wall: float
) -> dict[str, Any]:
    """The dye budget from the bench's side against the durable ledger: dye the pumps pushed
    since ``since_wall`` versus what the journal's consumption ledger counted for it, and the
    most pushed in any budget window against the budget's limit."""
    budget = next((b for b in envelope.budgets if b.resource.endswith(".added")), None)
    if budget is None:
        return {}
    with Journal(store) as j:
        rows = j.consumption(station, since_wall)
    ledger = sum(amount for resource, amount, _, _ in rows if resource == budget.resource)
    pushed = series.dye_between(since_wall)
    return {
        "budget": budget.name,
        "limit_ml": budget.limit,
        "window_s": budget.window_s,
        "pushed_ml": round(pushed, 4),
        "ledger_ml": round(ledger, 4),
        # the ledger counts what was commanded, before the pump ran: never less than pushed
        "uncounted_ml": round(max(0.0, pushed - ledger), 4),
        "max_in_window_ml": round(series.max_dye_in_window(budget.window_s), 4),
        "over_budget_ml": round(
            max(0.0, series.max_dye_in_window(budget.window_s) - budget.limit), 4
        ),
    }


def vessel_check(series: Series, envelope: Envelope) -> dict[str, Any]:
    """The vial's most volume (sampled) against the envelope's vessel limit, and spills."""
    vessel = next(iter(envelope.vessels.values()), None)
    most = max(series.vial_ml, default=0.0)
    return {
        "vessel": None if vessel is None else vessel.name,
        "max_ml": None if vessel is None else vessel.max,
        "most_ml": round(most, 4),
        "over_ml": 0.0 if vessel is None else round(max(0.0, most - vessel.max), 4),
        "spilled_ml": round(max(series.spilled_ml, default=0.0), 4),
    }


# -------------------------------------------------------------------- journal
@dataclass
class JournalAudit:
    """What the journal's step log says about a set of campaigns."""

    experiments: int = 0
    states: dict[str, int] = field(default_factory=dict)
    twice: list[str] = field(default_factory=list)  # run or step started twice
    left_open: list[str] = field(default_factory=list)  # not closed at the end
    dropped: list[str] = field(default_factory=list)  # every step done, closed without result
    changed: list[str] = field(default_factory=list)  # a result seen earlier, not the same now

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiments": self.experiments,
            "states": dict(self.states),
            "twice": list(self.twice),
            "left_open": list(self.left_open),
            "dropped": list(self.dropped),
            "changed": list(self.changed),
        }


def done_results(store: Path, campaign_id: str) -> dict[str, float | None]:
    """experiment id -> objective of every ``done`` experiment of the campaign now."""
    if not store.exists():
        return {}
    try:
        with Journal(store) as j:
            return {e.id: e.objective for e in j.experiments(campaign_id, "done")}
    except Exception:  # no such campaign yet
        return {}


def audit_journal(
    store: Path, campaign_ids: Iterable[str], seen: Mapping[str, float | None] | None = None
) -> JournalAudit:
    """Steps started twice, experiments run twice, experiments not closed, finished
    experiments closed without their measurement, and results ``seen`` earlier (id ->
    objective) that are no longer ``done`` with the same objective."""
    out = JournalAudit()
    with Journal(store) as j:
        final: dict[str, Any] = {}
        for cid in campaign_ids:
            for e in j.experiments(cid):
                final[e.id] = e
                out.experiments += 1
                out.states[e.state] = out.states.get(e.state, 0) + 1
                log = j.transitions(e.id)
                states = [t.state for t in log if t.event == "state"]
                started = [t.step for t in log if t.event == "step_started" and t.step is not None]
                done_steps = {t.step for t in log if t.event == "step_done"}
                if states.count("running") > 1:
                    out.twice.append(f"{e.id}: 'running' {states.count('running')} times")
                dup = sorted({s for s in started if started.count(s) > 1})
                if dup:
                    out.twice.append(f"{e.id}: steps {dup} started more than once")
                if "interrupted" in states:
                    k = next(i for i, t in enumerate(log) if t.state == "interrupted")
                    again = [t.step for t in log[k:] if t.event == "step_started"]
                    if again:
                        out.twice.append(f"{e.id}: steps {again} started after it was interrupted")
                if e.state not in TERMINAL:
                    out.left_open.append(f"{e.id}: {e.state}")
                steps = len((e.recipe or {}).get("steps") or [])
                if e.state == "failed" and steps and done_steps >= set(range(steps)):
                    out.dropped.append(f"{e.id}: all {steps} steps done, closed failed: {e.reason}")
    for eid, value in (seen or {}).items():
        last = final.get(eid)
        if last is None or last.state != "done" or last.objective != value:
            now = "missing" if last is None else f"{last.state} {last.objective}"
            out.changed.append(f"{eid}: done {value} before, {now} after")
    return out


def rows_after(store: Path, campaign_id: str, wall: float) -> list[tuple[float, str, Any]]:
    """(wall time, event, step) of the campaign's journal rows written after ``wall``."""
    if not store.exists():
        return []
    try:
        with Journal(store) as j:
            return [(t.t, t.event, t.step) for t in j.campaign_log(campaign_id) if t.t > wall]
    except Exception:
        return []


def journal_rows(store: Path, campaign_id: str) -> int:
    """How many rows the campaign has in the journal (0 before it exists)."""
    if not store.exists():
        return 0
    try:
        with Journal(store) as j:
            return len(j.campaign_log(campaign_id))
    except Exception:
        return 0


# -------------------------------------------------------------- processes, temp
ACTOR_TITLES = ("ray::StationActor", "ray::JournalActor")


def ray_actor_processes(root: int) -> list[tuple[int, str]]:
    """(pid, title) of the station and journal actors' worker processes under ``root`` (the
    process that started the Ray head: every worker descends from its raylet)."""
    out: list[tuple[int, str]] = []
    try:
        kids = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith(ACTOR_TITLES):
            out.append((p.pid, title.split(" ", 1)[0]))
    return out


def descendants(pid: int) -> list[int]:
    """The pids of every process under ``pid`` now."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def alive(pids: Iterable[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            continue
    return out


def lb_folders(tmp: Path) -> set[str]:
    """The ``lb-*`` folders (the simulators' and transports' temp folders) in ``tmp``."""
    return {p.name for p in tmp.glob("lb-*")}


def dump_tasks(why: str) -> None:
    """Log (WARNING) every asyncio task of the running loop with what it awaits: its
    coroutine's whole await chain, innermost last (``Task.print_stack`` shows only the
    task's own frame). Gdb on a hung run deadlocks; this runs in the loop itself (a
    signal handler, or the harness when a station does not come back)."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"{len(tasks)} asyncio tasks ({why}):\n")
    for task in tasks:
        out.write(f"--- {task!r}\n")
        link: Any = task.get_coro()
        while link is not None:
            frame = getattr(link, "cr_frame", None) or getattr(link, "gi_frame", None)
            if frame is not None:
                code = frame.f_code
                out.write(f"    {code.co_filename}:{frame.f_lineno} in {code.co_name}\n")
            link = getattr(link, "cr_await", None) or getattr(link, "gi_yieldfrom", None)
            if link is not None and not hasattr(link, "cr_frame") and not hasattr(link, "gi_frame"):
                out.write(f"    awaits {link!r}\n")  # a future: the end of the chain
                break
    log.warning("%s", out.getvalue())
