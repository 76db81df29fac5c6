"""E-stop: every station at once, bounded when a driver hangs, idempotent, and from SIGTERM /
SIGINT. Simulated stations (real drivers over ptys, sockets, a broker) where the devices
matter; in-memory ("soft") drivers where only the bookkeeping does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import instruments
from instruments.driver import Channel, Driver
from instruments.transports.base import Transport
from safety.effects import Layout, initial_commanded
from safety.envelopeload import reference_envelope
from safety.estop import EStop, EStopReport, install_signal_handlers
from safety.model import Latch, StationState
from safety.supervisor import StationSupervisor
from simulators.bench import SimulatedBench, SimulatedLab

ROOT = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def sim_stations(
    n: int, speed: float = 20.0
) -> AsyncIterator[list[tuple[SimulatedBench, dict[str, Any]]]]:
    """``n`` simulated stations, every instrument opened through ``instruments.connect``."""
    async with SimulatedLab(stations=n, speed=speed) as lab:
        async with contextlib.AsyncExitStack() as stack:
            out = []
            for bench in lab.stations:
                drivers: dict[str, Any] = {}
                for spec in bench.instruments():
                    drivers[spec.name] = await stack.enter_async_context(
                        instruments.connect(spec.kind, spec.url, **spec.options)
                    )
                out.append((bench, drivers))
            try:
                yield out
            finally:
                for bench, _ in out:
                    bench.world.faults.clear()  # so the safe state on exit is quick


def make_supervisor(
    name: str, drivers: Mapping[str, Driver], speed: float = 1.0, **options: Any
) -> StationSupervisor:
    state = StationState()  # seeded like a guard seeds it: every instrument in its safe state
    state.set_commanded(initial_commanded(Layout.of(drivers)))
    kwargs: dict[str, Any] = {
        "latch": Latch(name),
        "state": state,
        "monitors": reference_envelope().build_monitors(),
        "poll_interval": 0.05,
        "safe_timeout": 0.5,
        "read_timeout": 0.3,
        "device_watchdog_s": 60,
        "device_time_scale": speed,
        "reassert_interval": None,
    }
    kwargs.update(options)
    return StationSupervisor(name, drivers, **kwargs)


def stp_count(bench: SimulatedBench, since: float) -> int:
    return len(
        [
            r
            for r in bench.world.wire.entries("pumps")
            if r.real_t >= since and r.data.endswith("STP") and not r.note
        ]
    )


@pytest.mark.timeout(60)
async def test_estop_every_station_while_one_station_s_pumps_hang() -> None:
    async with sim_stations(2) as stations:
        (a, a_drivers), (b, b_drivers) = stations
        sups = [
            make_supervisor(a.name, a_drivers, speed=20.0),
            make_supervisor(b.name, b_drivers, speed=20.0),
        ]
        for _, drivers in stations:
            await drivers["hotplate"].set_stirrer(True, 200)
            await drivers["enclosure"].set_light(True, 0.7)
            await drivers["blue"].dispense(1.0, 0.5)  # 120 simulated s: running at the e-stop
        estop = EStop(sups)
        for sup in sups:
            await sup.start()
        try:
            a.world.faults.inject("no-reply", device="pumps")  # station a's pump line hangs
            t0 = time.monotonic()
            report = await estop.estop("operator pressed the big red button", who="operator:eve")
            elapsed = time.monotonic() - t0
            assert elapsed < 0.5 + 0.3, report.summary()
            assert set(report.stations) == {a.name, b.name}
            assert not report.ok and not report.errors
            pumps = ["blue", "green", "red", "waste"]
            assert {k: sorted(v) for k, v in report.failed.items()} == {a.name: pumps}
            ra, rb = report.stations[a.name], report.stations[b.name]
            assert all(ra.outcomes[p].timed_out for p in pumps)
            assert sorted(ra.safe) == ["camera", "color", "enclosure", "hotplate"]
            assert sorted(rb.safe) == sorted(b_drivers) and rb.ok
            assert "red: safe_state() timed out after 0.5 s" in report.summary()
            # from the devices' side: station a's heater/stirrer and light are off anyway,
            # station b's pumps got their STP and stopped
            for bench in (a, b):
                snap = bench.world.snapshot()
                assert not snap["hotplate"]["stirrer_enabled"]
                assert not snap["enclosure"]["light_on"]
            assert b.world.snapshot()["pumps"]["blue"]["phase"] == "stopped"
            assert stp_count(b, t0) == 8
            assert a.world.snapshot()["pumps"]["blue"]["phase"] == "running"  # it never heard
            for sup in sups:
                record = sup.latch.trip_record
                assert record is not None and record.source == "estop"
                assert "e-stop by operator:eve" in record.reason
            assert estop.tripped
            # idempotent: a second e-stop returns at once and sends nothing
            n_b = stp_count(b, t0)
            t1 = time.monotonic()
            again = await estop.estop("pressed again", who="operator:eve")
            assert time.monotonic() - t1 < 0.05
            assert again.already_tripped and again.ok
            assert "already tripped" in again.summary()
            assert stp_count(b, t0) == n_b
            assert len(estop.history) == 2
        finally:
            for sup in sups:
                await sup.stop()


class HangingSafeState(Driver):
    """Wraps a real driver; its ``safe_state()`` never returns (a driver stuck in a call)."""

    def __init__(self, inner: Driver) -> None:
        super().__init__(inner.transport, name=f"hanging {inner.name}")
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]

    @property
    def channels(self) -> Mapping[str, Channel]:
        return self.inner.channels

    async def read(self) -> dict[str, Any]:
        return await self.inner.read()

    async def safe_state(self) -> None:
        await asyncio.sleep(3600)


@pytest.mark.timeout(60)
async def test_estop_with_a_driver_whose_safe_state_hangs_still_safe_states_the_others() -> None:
    async with sim_stations(1) as [(bench, drivers)]:
        await drivers["hotplate"].set_stirrer(True, 300)
        await drivers["enclosure"].set_light(True, 0.5)
        wrapped = dict(drivers, hotplate=HangingSafeState(drivers["hotplate"]))
        sup = make_supervisor(bench.name, wrapped, speed=20.0, safe_timeout=0.3)
        estop = EStop([sup])
        t0 = time.monotonic()
        report = await estop.estop("test")
        assert time.monotonic() - t0 < 0.3 + 0.2
        station = report.stations[bench.name]
        assert station.failed == ["hotplate"] and station.outcomes["hotplate"].timed_out
        assert sorted(station.safe) == sorted(set(drivers) - {"hotplate"})
        assert bench.world.snapshot()["enclosure"]["light_on"] is False
        assert bench.world.snapshot()["hotplate"]["stirrer_enabled"] is True  # it hung
        await sup.stop()


class _NullTransport(Transport):
    schemes = ("null",)

    async def _open(self) -> None:
        pass

    async def _close(self) -> None:
        pass


class SoftDevice(Driver):
    """In memory: counts safe-state calls; ``delay`` s per safe state."""

    kind = "soft"

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(_NullTransport(f"null://{name}"), name=name)
        self.delay = delay
        self.safe_calls = 0

    @property
    def channels(self) -> Mapping[str, Channel]:
        return {}

    async def read(self) -> dict[str, Any]:
        return {"value": 1.0}

    async def safe_state(self) -> None:
        self.safe_calls += 1
        await asyncio.sleep(self.delay)


def soft_station(name: str, n: int = 2, delay: float = 0.05) -> StationSupervisor:
    devices = {f"d{i}": SoftDevice(f"{name}-d{i}", delay) for i in range(n)}
    return make_supervisor(name, devices, monitors=[], safe_timeout=0.5)


async def test_concurrent_estops_run_one_safe_state_and_a_reset_station_trips_again() -> None:
    s1, s2 = soft_station("s1"), soft_station("s2")
    estop = EStop({"s1": s1, "s2": s2})
    first, second = await asyncio.gather(estop.estop("one"), estop.estop("two", who="api"))
    assert not first.already_tripped and first.ok
    assert second.already_tripped and second.ok
    for sup in (s1, s2):
        assert [d.safe_calls for d in sup.drivers.values()] == [1, 1]  # type: ignore[attr-defined]
        assert len(sup.trips) == 1
    assert await s1.reset("operator:fay", "checked")
    third = await estop.estop("three")
    assert not third.stations["s1"].already_tripped  # s1 was reset: tripped again
    assert third.stations["s2"].already_tripped
    assert not third.already_tripped
    assert third.as_dict()["stations"]["s1"]["safe"] == ["d0", "d1"]
    with pytest.raises(ValueError, match="given twice"):
        EStop([s1, s1])


async def test_sigterm_runs_the_estop_once_and_the_previous_handlers_come_back() -> None:
    sup = soft_station("sig", delay=0.0)
    estop = EStop([sup])
    loop = asyncio.get_running_loop()
    before_term = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    done: list[EStopReport | None] = []
    handlers = install_signal_handlers(loop, estop, on_done=done.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2
        while handlers.task is None:  # the signal arrives through the loop's wakeup fd
            assert time.monotonic() < deadline, "SIGTERM did not reach the handler"
            await asyncio.sleep(0.01)
        report = await handlers.wait()
        assert report is not None and done == [report]
        assert report.reason == "signal SIGTERM" and report.who == "signal"
        assert sup.latch.tripped and "signal SIGTERM" in sup.latch.trip_record.reason  # type: ignore[union-attr]
        os.kill(os.getpid(), signal.SIGINT)  # a second signal: logged, not run again
        await asyncio.sleep(0.05)
        assert len(estop.history) == 1 and handlers.fired == "SIGTERM"
    finally:
        handlers.remove()
        handlers.remove()  # idempotent
    assert signal.getsignal(signal.SIGTERM) == before_term
    assert signal.getsignal(signal.SIGINT) == before_int


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, {tests!r})
    from test_estop import soft_station
    from safety.estop import EStop, install_signal_handlers

    async def main():
        sup = soft_station("child", delay=0.01)
        stopped = asyncio.Event()
        reports = []
        def on_done(report):
            reports.append(report)
            stopped.set()
        handlers = install_signal_handlers(asyncio.get_running_loop(), EStop([sup]), on_done)
        print("ready", flush=True)
        await asyncio.wait_for(stopped.wait(), 20)
        handlers.remove()
        print(json.dumps(reports[0].as_dict()), flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
def test_sigint_in_a_subprocess_safe_states_and_lets_the_application_exit() -> None:
    code = CHILD.format(tests=str(ROOT / "tests"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + (proc.stderr.read() if proc.stderr else "")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["reason"] == "signal SIGINT" and report["ok"]
    assert report["stations"]["child"]["safe"] == ["d0", "d1"]
