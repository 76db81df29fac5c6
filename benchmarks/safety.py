"""Cost of the safety layer: guard overhead per command, and trip reaction time.

Run:  python benchmarks/safety.py [--trips 200] [--commands 2000] [--quick]

Everything runs on one simulated reference station (``SimulatedLab(stations=1,
speed=1.0)``: pumps on a pty, hotplate over Modbus TCP, colour sensor over
BLE/D-Bus, enclosure over MQTT, camera over HTTP), opened through
``instruments.connect`` and run behind a :class:`~safety.station.SafeStation`
with the reference envelope (``safety/reference_bench.yaml``: its limits,
rules and budgets, unchanged) and the reference monitors. The supervisor runs
as deployed (every instrument polled every ``--poll-interval`` s, device
watchdog armed and fed) during both parts.

1. Guard overhead, measured side by side in the same run:

   * the pure check, ``station.check(command)`` (no I/O, no audit): for an
     allowed stirrer / light / dispense command and a refused heater command;
   * the whole ``Guard.execute()`` path with a no-I/O driver stand-in (check,
     audit record, lock, commanded-state and ledger update);
   * end to end over the real wire, interleaved in rounds (guarded, raw,
     guarded, raw, ...) so drift on a shared machine hits both sides alike:
     ``Hotplate.set_stirrer(True, rpm)`` (a Modbus write pair, rpm toggling
     300/400) and ``Enclosure.set_light(True, intensity)`` (an MQTT command and
     its ack, intensity toggling 0.3/0.6), through the guarded handle versus
     the same driver call directly. These commands touch no rate limit and no
     budget of the reference envelope, so they stay allowed when repeated.

2. Trip reaction, over ``--trips`` trips at a 1x simulated clock: put the
   world over temperature (liquid 90 degC, plate 95 degC, set under
   ``world.lock``), wait for the ``liquid-overtemp`` trip and its safe-state
   storm, then read from the simulators' wire log (``world.wire``, real
   ``time.monotonic`` times) when each safe-state command reached its device
   (hotplate heater/stirrer enable 0, STP x2 on each of the four pumps, light
   off, colour sensor stop); cool the world down, wait for a cool reading and
   ``reset(who, why)``. Reported separately: detection (injection -> the
   reading that tripped, bounded by the poll interval), reaction (that reading
   -> the last safe-state command on the wire: the goal), and the total.

Goals (issue 3): guard check < 50 us median; reaction p99 < 100 ms (IEC
60204-1's category-0 stop expects power removed within 200 ms; we aim at half
of that in software).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# This file is named like the package it measures. Run as a script, its own directory
# is sys.path[0], and "import safety" would import this file: drop that entry first.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import instruments  # noqa: E402
from benchmarks.stats import med, pct  # noqa: E402
from instruments.registry import driver_class  # noqa: E402
from safety.envelopeload import reference_envelope  # noqa: E402
from safety.guard import Guard  # noqa: E402
from safety.model import AuditTrail, Command, Latch, StationState  # noqa: E402
from safety.station import SafeStation  # noqa: E402
from safety.supervisor import TripReport  # noqa: E402
from simulators.bench import SimulatedBench, SimulatedLab  # noqa: E402
from simulators.world import AMBIENT_C, WireRecord  # noqa: E402

WHO = "benchmark"
CHECK_GOAL_US = 50.0
REACTION_GOAL_MS = 100.0
IEC_CAT0_MS = 200.0
# Over temperature: the liquid trips above 80 degC. With the vial empty the liquid probe
# relaxes to ambient (tau 30 s), so it stays above 80 degC for ~4 s; a trip takes < 0.2 s.
HOT_LIQUID_C = 90.0
HOT_PLATE_C = 95.0
CLEAR_BELOW_C = 75.0  # the liquid-overtemp monitor's hysteresis


@dataclass
class Pair:
    """Guarded and raw timings (seconds) of one command, and wire messages per call."""

    name: str
    guarded: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    wire_guarded: float = 0.0
    wire_raw: float = 0.0


@dataclass
class Trip:
    """One measured trip; times are ``time.monotonic()`` seconds."""

    t_inject: float
    t_sampled: float | None  # the device served the read that returned the hot value
    report: TripReport
    last_wire: float | None
    wire_count: int
    missing: list[str]

    @property
    def detection_s(self) -> float:
        return self.report.t_reading - self.t_inject

    @property
    def evaluation_s(self) -> float:
        return self.report.t_detected - self.report.t_reading

    @property
    def reaction_wire_s(self) -> float | None:
        return None if self.last_wire is None else self.last_wire - self.report.t_reading

    @property
    def total_s(self) -> float | None:
        return None if self.last_wire is None else self.last_wire - self.t_inject


# ------------------------------------------------------------------ station setup
@contextlib.asynccontextmanager
async def simulated_station(
    poll_interval: float,
) -> AsyncIterator[tuple[SimulatedBench, dict[str, Any], SafeStation]]:
    """A 1x simulated station, its open drivers and a started SafeStation over them."""
    async with SimulatedLab(stations=1, speed=1.0) as lab:
        bench = lab.stations[0]
        async with contextlib.AsyncExitStack() as stack:
            drivers: dict[str, Any] = {}
            for spec in bench.instruments():
                d = spec.as_dict()
                drivers[d["name"]] = await stack.enter_async_context(
                    instruments.connect(d["kind"], d["url"], **d["options"])
                )
            station = SafeStation(
                bench.name,
                drivers,
                reference_envelope(),
                clock=bench.world.clock.now,
                supervisor_options={
                    "poll_interval": poll_interval,
                    "device_time_scale": bench.world.clock.speed,
                },
            )
            await station.start()
            try:
                yield bench, drivers, station
            finally:
                bench.world.faults.clear()
                await station.stop()


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.002)


async def settle(station: SafeStation) -> None:
    """Wait until every monitor has a value and the station is not latched."""
    await wait_for(
        lambda: (
            "enclosure.heartbeat_age_s" in station.state.measured
            and "hotplate.liquid_c" in station.state.measured
        ),
        10.0,
        "the first readings of the hotplate and the enclosure",
    )
    await asyncio.sleep(0.3)
    if station.tripped:
        print(f"  (station tripped while starting: {station.latch.trip_record}; resetting)")
        await station.reset(WHO, "benchmark start-up")


# ------------------------------------------------------------------ 1. overhead
async def time_checks(station: SafeStation, command: Command, n: int) -> tuple[list[float], bool]:
    """``n`` timed ``station.check(command)`` calls; returns (seconds each, allowed?).

    Yields to the event loop every 200 calls (outside the timed region) so the
    supervisor's polls and the simulators keep running as they would.
    """
    allowed = station.check(command).allowed
    for _ in range(min(200, n)):  # warm-up
        station.check(command)
    out = []
    perf = time.perf_counter
    for i in range(n):
        if i % 200 == 0:
            await asyncio.sleep(0)
        t0 = perf()
        station.check(command)
        out.append(perf() - t0)
    return out, allowed


class NoIODriver:
    """A stand-in driver of one kind whose every action returns at once (no I/O).

    Only for timing the guard's own ``execute()`` path; never a test double of
    a device (it does not pretend to act).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        cls = driver_class(kind)  # the real driver's declarations: the guard is built from them
        self.commands = cls.commands
        self.safe_state_calls = cls.safe_state_calls

    def __getattr__(self, attr: str) -> Callable[..., Awaitable[None]]:
        async def action(*args: Any, **kwargs: Any) -> None:
            return None

        return action


async def time_guard_path(kinds: dict[str, str], n: int) -> list[float]:
    """``Guard.execute(set_stirrer)`` with no-I/O drivers: the guard's own cost per command."""
    guard = Guard(
        "no-io",
        {name: NoIODriver(kind) for name, kind in kinds.items()},
        reference_envelope(),
        latch=Latch("no-io"),
        audit=AuditTrail(),
        state=StationState(),
    )
    commands = [
        Command("hotplate", "set_stirrer", {"on": True, "rpm": rpm}, WHO) for rpm in (300, 400)
    ]
    for i in range(min(200, n)):
        await guard.execute(commands[i % 2])
    out = []
    perf = time.perf_counter
    for i in range(n):
        t0 = perf()
        await guard.execute(commands[i % 2])
        out.append(perf() - t0)
    return out


async def interleaved(
    pair: Pair,
    guarded: Callable[[int], Awaitable[None]],
    raw: Callable[[int], Awaitable[None]],
    wire: Callable[[], int],
    n: int,
    rounds: int,
) -> Pair:
    """``n`` calls per side in ``rounds`` alternating blocks, after a warm-up of each."""
    per = max(1, n // rounds)
    warm = min(50, per)
    for i in range(warm):
        await guarded(i)
        await raw(i)
    perf = time.perf_counter
    wire_g = wire_r = 0
    for _ in range(rounds):
        for side, op, out in (("g", guarded, pair.guarded), ("r", raw, pair.raw)):
            w0 = wire()
            for i in range(per):
                t0 = perf()
                await op(i)
                out.append(perf() - t0)
            if side == "g":
                wire_g += wire() - w0
            else:
                wire_r += wire() - w0
    pair.wire_guarded = wire_g / max(1, len(pair.guarded))
    pair.wire_raw = wire_r / max(1, len(pair.raw))
    return pair


def actuations(bench: SimulatedBench, device: str) -> Callable[[], int]:
    """How many commands (not reads, not watchdog feeds) reached ``device`` so far."""

    def count() -> int:
        entries = bench.world.wire.entries(device)
        if device == "hotplate":
            return sum(
                1
                for r in entries
                if isinstance(r.data, dict)
                and r.data.get("fc") in (6, 16)
                and r.data["address"] != 4
            )
        return sum(1 for r in entries if isinstance(r.data, dict) and "light" in r.data)

    return count


async def bench_overhead(
    bench: SimulatedBench,
    drivers: dict[str, Any],
    station: SafeStation,
    *,
    commands: int,
    checks: int,
    rounds: int,
) -> tuple[dict[str, tuple[list[float], bool]], list[float], list[Pair]]:
    checked = {
        "hotplate.set_stirrer(True, 300)": Command(
            "hotplate", "set_stirrer", {"on": True, "rpm": 300}, WHO
        ),
        "enclosure.set_light(True, 0.5)": Command(
            "enclosure", "set_light", {"on": True, "intensity": 0.5}, WHO
        ),
        "red.dispense(0.4, 5.0)": Command(
            "red", "dispense", {"volume_ml": 0.4, "rate_ml_min": 5.0}, WHO
        ),
        "hotplate.set_heater(True, 60.0)": Command(
            "hotplate", "set_heater", {"on": True, "setpoint_c": 60.0}, WHO
        ),
    }
    check_times = {label: await time_checks(station, cmd, checks) for label, cmd in checked.items()}
    guard_path = await time_guard_path(station.instruments, max(1000, checks // 4))

    hotplate = station.handle("hotplate", who=WHO)
    enclosure = station.handle("enclosure", who=WHO)
    raw_hp, raw_enc = drivers["hotplate"], drivers["enclosure"]
    rpm = (300, 400)
    light = (0.3, 0.6)

    async def g_stir(i: int) -> None:
        await hotplate.set_stirrer(True, rpm[i % 2])

    async def r_stir(i: int) -> None:
        await raw_hp.set_stirrer(True, rpm[i % 2])

    async def g_light(i: int) -> None:
        await enclosure.set_light(True, light[i % 2])

    async def r_light(i: int) -> None:
        await raw_enc.set_light(True, light[i % 2])

    pairs = [
        await interleaved(
            Pair("Hotplate.set_stirrer(True, rpm) Modbus"),
            g_stir,
            r_stir,
            actuations(bench, "hotplate"),
            commands,
            rounds,
        ),
        await interleaved(
            Pair("Enclosure.set_light(True, x) MQTT+ack"),
            g_light,
            r_light,
            actuations(bench, "enclosure"),
            commands,
            rounds,
        ),
    ]
    # back to the safe side, through the guard (safer commands)
    await hotplate.set_stirrer(False)
    await enclosure.set_light(False)
    return check_times, guard_path, pairs


# ------------------------------------------------------------- 2. trip reaction
SAFE_WIRE_EXPECTED = {"hotplate": 2, "pumps": 8, "enclosure": 1, "color": 1}


def safe_state_wire(bench: SimulatedBench, since: float, until: float) -> dict[str, list[float]]:
    """Arrival times of the safe-state commands of one storm, per device, in [since, until]."""

    def window(device: str) -> list[WireRecord]:
        return [r for r in bench.world.wire.entries(device) if since <= r.real_t <= until]

    hp = [
        r.real_t
        for r in window("hotplate")
        if r.data.get("fc") == 6 and r.data["address"] in (2, 3) and r.data["values"] == [0]
    ]
    pumps = [r.real_t for r in window("pumps") if str(r.data).endswith("STP")]
    enc = [
        r.real_t
        for r in window("enclosure")
        if isinstance(r.data, dict) and r.data.get("light") == {"on": False}
    ]
    color = [
        r.real_t
        for r in window("color-sensor")
        if isinstance(r.data, bytes | bytearray) and r.data[:1] == b"\x03"
    ]
    return {"hotplate": hp, "pumps": pumps, "enclosure": enc, "color": color}


def first_hot_read(bench: SimulatedBench, since: float) -> float | None:
    """When the hotplate served the first input-register read (temperatures) after ``since``."""
    for r in bench.world.wire.entries("hotplate"):
        if r.real_t >= since and isinstance(r.data, dict) and r.data.get("fc") == 4:
            return r.real_t
    return None


def heat(bench: SimulatedBench) -> float:
    world = bench.world
    with world.lock:
        world.advance()
        world.hotplate.plate_c = HOT_PLATE_C
        world.hotplate.liquid_c = HOT_LIQUID_C
        return time.monotonic()


def cool(bench: SimulatedBench) -> float:
    world = bench.world
    with world.lock:
        world.advance()
        world.hotplate.plate_c = AMBIENT_C
        world.hotplate.liquid_c = AMBIENT_C
        return time.monotonic()


async def one_trip(
    bench: SimulatedBench, station: SafeStation, i: int, poll_interval: float
) -> tuple[Trip | None, str | None]:
    """Heat, wait for the trip and its storm, read the wire, cool, reset. (trip, other-trip)."""
    sup = station.supervisor
    n_before = len(sup.trips)
    t_inject = heat(bench)
    await wait_for(
        lambda: len(sup.trips) > n_before and sup.trips[-1].done,
        5.0 + poll_interval,
        f"trip {i}",
    )
    report = sup.trips[-1]
    other = None if report.source == "liquid-overtemp" else f"{report.source}: {report.reason}"
    await asyncio.sleep(0.05)  # every ack is in; nothing of this storm still to arrive
    assert report.t_done is not None
    wire = safe_state_wire(bench, report.t_detected, report.t_done + 0.02)
    missing = [
        f"{dev} {len(times)}/{n}"
        for dev, n in SAFE_WIRE_EXPECTED.items()
        if len(times := wire[dev]) < n
    ]
    arrivals = [t for dev, times in wire.items() for t in times[: SAFE_WIRE_EXPECTED[dev]]]
    trip = Trip(
        t_inject=t_inject,
        t_sampled=first_hot_read(bench, t_inject),
        report=report,
        last_wire=max(arrivals) if arrivals else None,
        wire_count=len(arrivals),
        missing=missing,
    )
    t_cool = cool(bench)

    def cooled() -> bool:
        entry = station.state.measured.get("hotplate.liquid_c")
        return entry is not None and entry[1] > t_cool and entry[0] < CLEAR_BELOW_C

    await wait_for(cooled, 5.0, f"a cool reading after trip {i}")
    await station.reset(WHO, f"trip {i}: simulated over-temperature cleared (world cooled)")
    return (trip if other is None else None), other


async def bench_trips(
    bench: SimulatedBench, station: SafeStation, *, trips: int, poll_interval: float, seed: int
) -> tuple[list[Trip], list[str]]:
    rng = random.Random(seed)
    measured: list[Trip] = []
    others: list[str] = []
    step = max(1, trips // 10)
    while len(measured) < trips:
        # a random phase against the poll loop, so detection samples the whole poll interval
        await asyncio.sleep(0.05 + rng.uniform(0.0, poll_interval))
        if station.tripped:  # tripped by something else between trips: note it and reset
            record = station.latch.trip_record
            others.append(f"{record.source}: {record.reason}" if record else "unknown")
            cool(bench)
            await asyncio.sleep(poll_interval * 2)
            await station.reset(WHO, "an unexpected trip between measured trips")
            continue
        trip, other = await one_trip(bench, station, len(measured) + len(others), poll_interval)
        if other is not None:
            others.append(other)
            if len(others) > max(10, trips // 5):
                raise RuntimeError(f"too many unexpected trips: {others[-3:]}")
        if trip is not None:
            measured.append(trip)
            if len(measured) % step == 0:
                print(f"  {len(measured)}/{trips} trips", file=sys.stderr, flush=True)
    return measured, others


# ------------------------------------------------------------------------ report
def us(x: float) -> str:
    return f"{x * 1e6:9.1f}"


def ms(x: float) -> str:
    return f"{x * 1e3:8.2f}"


def print_report(args: argparse.Namespace, results: Results, *, elapsed: float) -> bool:
    """Print the tables; True if both goals of the issue are met."""
    check_times, guard_path, pairs = results.check_times, results.guard_path, results.pairs
    trips, others = results.trips, results.others
    print()
    print("labbridge safety layer benchmark (issue 3)")
    print(
        f"simulated reference station at 1x; reference envelope unchanged (limits, rules, budgets;"
        f" the commands timed touch no rate limit or budget); supervisor polling every "
        f"{args.poll_interval:g} s during both parts"
    )
    print()
    print(f"1a. guard check, no I/O: station.check(command), {args.checks} calls each (us)")
    print(f"    {'command':<44} {'verdict':>8} {'median':>9} {'p99':>9}")
    for label, (times, allowed) in check_times.items():
        verdict = "allowed" if allowed else "refused"
        print(f"    {label:<44} {verdict:>8} {us(med(times))} {us(pct(times, 0.99))}")
    print(
        f"    {'Guard.execute(set_stirrer), no-I/O driver':<44} {'allowed':>8} "
        f"{us(med(guard_path))} {us(pct(guard_path, 0.99))}"
    )
    print(
        f"    (the last row: the guard's whole per-command path without a wire: check, audit"
        f" record, lock,\n     commanded-state and ledger update; {len(guard_path)} calls)"
    )
    print()
    n = args.commands
    print(
        f"1b. end to end over the real wire, guarded vs raw driver, interleaved in {args.rounds} "
        f"rounds, {n} calls per side (us)"
    )
    print(
        f"    {'command':<40} {'guarded':>9} {'raw':>9} {'overhead':>9} {'ratio':>6}"
        f" {'g p99':>9} {'raw p99':>9} {'wire/call g,raw':>16}"
    )
    for p in pairs:
        gm, rm = med(p.guarded), med(p.raw)
        print(
            f"    {p.name:<40} {us(gm)} {us(rm)} {us(gm - rm)} {gm / rm:5.2f}x"
            f" {us(pct(p.guarded, 0.99))} {us(pct(p.raw, 0.99))}"
            f" {p.wire_guarded:7.2f},{p.wire_raw:5.2f}"
        )
    print("    (medians; overhead = guarded median - raw median; wire = commands that reached the")
    print("     device per call, from the simulator's wire log: the guard adds none)")
    print()

    reactions = [t.reaction_wire_s for t in trips if t.reaction_wire_s is not None]
    totals = [t.total_s for t in trips if t.total_s is not None]
    detection = [t.detection_s for t in trips]
    sampled = [t.t_sampled - t.t_inject for t in trips if t.t_sampled is not None]
    read_lat = [t.report.t_reading - t.t_sampled for t in trips if t.t_sampled is not None]
    evaluation = [t.evaluation_s for t in trips]
    storm = [(t.report.reaction_s or 0.0) for t in trips]
    print(
        f"2. trip reaction: {len(trips)} liquid-overtemp trips at 1x (ms; times from "
        "time.monotonic and the simulators' wire log)"
    )
    print(f"    {'interval':<58} {'median':>8} {'p99':>8} {'max':>8}")
    rows = [
        ("injection -> device serves the read (poll phase)", sampled),
        ("device serves the read -> reading in labbridge", read_lat),
        ("detection: injection -> tripping reading", detection),
        ("reading -> latched (monitor evaluation)", evaluation),
        ("reaction: reading -> last safe-state command on the wire", reactions),
        ("reading -> last safe-state action acknowledged (TripReport)", storm),
        ("total: injection -> last safe-state command on the wire", totals),
    ]
    for label, values in rows:
        print(
            f"    {label:<58} {ms(med(values))} {ms(pct(values, 0.99))} {ms(max(values, default=math.nan))}"
        )
    per_dev: dict[str, list[float]] = {}
    for t in trips:
        for name, outcome in t.report.outcomes.items():
            per_dev.setdefault(name, []).append(outcome.elapsed_s)
    slowest = sorted(per_dev.items(), key=lambda kv: -med(kv[1]))[:4]
    print(
        "    safe_state() per instrument, median ms: "
        + ", ".join(f"{name} {med(v) * 1e3:.1f}" for name, v in slowest)
    )
    incomplete = [t for t in trips if t.missing]
    print(
        f"    safe-state commands seen on the wire per trip: {med([t.wire_count for t in trips]):.0f}"
        f" (expected {sum(SAFE_WIRE_EXPECTED.values())}: hotplate 2, pumps 8, enclosure 1, "
        f"colour 1); trips with some missing: {len(incomplete)}"
    )
    failed = [t for t in trips if not t.report.ok]
    if failed:
        print(
            f"    trips whose safe state failed somewhere: {len(failed)}: {failed[0].report.summary()}"
        )
    if others:
        print(f"    other trips during the run (not counted): {len(others)}, e.g. {others[0]}")
    print()

    check_med = max(med(times) for times, _ in check_times.values())
    react_p99 = pct(reactions, 0.99)
    total_p99 = pct(totals, 0.99)
    goals = [
        (
            "guard check, median (worst command above)",
            f"< {CHECK_GOAL_US:g} us",
            f"{check_med * 1e6:.1f} us",
            check_med * 1e6 < CHECK_GOAL_US,
        ),
        (
            "trip reaction p99 (reading -> last wire cmd)",
            f"< {REACTION_GOAL_MS:g} ms",
            f"{react_p99 * 1e3:.1f} ms",
            react_p99 * 1e3 < REACTION_GOAL_MS,
        ),
        (
            "(info) total p99 incl. detection, IEC cat-0",
            f"< {IEC_CAT0_MS:g} ms",
            f"{total_p99 * 1e3:.1f} ms",
            total_p99 * 1e3 < IEC_CAT0_MS,
        ),
    ]
    print(f"{'goal':<46} {'target':>10} {'measured':>11}  met?")
    for label, target, measured, met in goals:
        print(f"{label:<46} {target:>10} {measured:>11}  {'yes' if met else 'NO'}")
    print(f"\n(run took {elapsed:.0f} s)")
    return all(met for *_, met in goals[:2])


# -------------------------------------------------------------------------- main
@dataclass
class Results:
    check_times: dict[str, tuple[list[float], bool]]
    guard_path: list[float]
    pairs: list[Pair]
    trips: list[Trip]
    others: list[str]


async def main_async(args: argparse.Namespace) -> Results:
    async with simulated_station(args.poll_interval) as (bench, drivers, station):
        await settle(station)
        print("1. guard overhead ...", file=sys.stderr, flush=True)
        check_times, guard_path, pairs = await bench_overhead(
            bench,
            drivers,
            station,
            commands=args.commands,
            checks=args.checks,
            rounds=args.rounds,
        )
        if station.tripped:
            await station.reset(WHO, "before the trip benchmark")
        print(f"2. {args.trips} trips ...", file=sys.stderr, flush=True)
        trips, others = await bench_trips(
            bench, station, trips=args.trips, poll_interval=args.poll_interval, seed=args.seed
        )
        return Results(check_times, guard_path, pairs, trips, others)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=200, help="trips to measure (default 200)")
    parser.add_argument(
        "--commands", type=int, default=2000, help="end-to-end calls per side (default 2000)"
    )
    parser.add_argument(
        "--checks", type=int, default=20000, help="pure checks per command (default 20000)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument(
        "--poll-interval", type=float, default=0.1, help="supervisor poll interval, s (default 0.1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the trip phases")
    parser.add_argument(
        "--quick", action="store_true", help="a ~15 s smoke run (30 trips, 300 calls, 5000 checks)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the safety layer's logs")
    args = parser.parse_args()
    if args.quick:
        args.trips, args.commands, args.checks, args.rounds = 30, 300, 5000, 5
    if args.trips < 1 or args.commands < 1 or args.checks < 1 or args.rounds < 1:
        parser.error("--trips, --commands, --checks and --rounds must be >= 1")
    # every trip logs an error by design; keep the table readable unless asked
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        logging.getLogger("safety").setLevel(logging.CRITICAL)
        logging.getLogger("bleak").setLevel(logging.ERROR)  # "no bluetoothctl": a stand-in BlueZ
    t0 = time.monotonic()
    results = asyncio.run(main_async(args))
    print_report(args, results, elapsed=time.monotonic() - t0)
    leftover = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if leftover:
        print(f"warning: threads still alive after the run: {leftover}", file=sys.stderr)


if __name__ == "__main__":
    main()
