"""The station supervisor on a simulated station (real drivers over real ptys, sockets and a
broker; observed from the devices' side through ``world.wire``), plus its bounds and latch
semantics with small in-memory ("soft") drivers where a device must misbehave on purpose.

Trips: a stuck heater over 80 degC, a stopped enclosure heartbeat, the lid opened while
heating, a hotplate that stopped answering; reset with hysteresis; the hotplate's own device
watchdog when the supervisor dies; safe state with a dead transport; hung, raising and
cancellation-ignoring safe states.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import instruments
from instruments.driver import Channel, Driver
from instruments.transports.base import Transport
from safety.effects import Layout, initial_commanded
from safety.envelopeload import reference_envelope
from safety.model import AuditTrail, Latch, ResetRecord, ResetRefused, StationState
from safety.monitors import Staleness, Threshold
from safety.supervisor import StationSupervisor
from simulators.bench import SimulatedBench, SimulatedLab

SPEED = 50.0


async def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def sim_station(speed: float = SPEED) -> AsyncIterator[tuple[SimulatedBench, dict[str, Any]]]:
    """A simulated station with every instrument opened through ``instruments.connect``."""
    async with SimulatedLab(stations=1, speed=speed) as lab:
        bench = lab.stations[0]
        async with contextlib.AsyncExitStack() as stack:
            drivers: dict[str, Any] = {}
            for spec in bench.instruments():
                drivers[spec.name] = await stack.enter_async_context(
                    instruments.connect(spec.kind, spec.url, **spec.options)
                )
            try:
                yield bench, drivers
            finally:
                bench.world.faults.clear()  # so the safe state on exit is quick


def supervisor(bench: SimulatedBench, drivers: dict[str, Any], **options: Any) -> StationSupervisor:
    """The reference bench's declared monitors (ages of 2-3 s), a fast poll, bounded waits."""
    name = bench.world.name
    state = StationState()  # seeded like a guard seeds it: every instrument in its safe state
    state.set_commanded(initial_commanded(Layout.of(drivers)))
    kwargs: dict[str, Any] = {
        "latch": Latch(name),
        "state": state,
        "monitors": reference_envelope().build_monitors(),
        "poll_interval": 0.05,
        "safe_timeout": 1.0,
        "read_timeout": 0.3,
        "device_watchdog_s": 30,
        "device_time_scale": bench.world.clock.speed,
        "reassert_interval": 0.5,
    }
    kwargs.update(options)
    return StationSupervisor(name, drivers, **kwargs)


def hotplate_writes(bench: SimulatedBench, since: float = 0.0) -> list[tuple[int, int]]:
    """(register, value) of every FC6 write that reached the hotplate after ``since`` (monotonic)."""
    return [
        (r.data["address"], r.data["values"][0])
        for r in bench.world.wire.entries("hotplate")
        if r.real_t >= since and r.data.get("fc") == 6
    ]


def safe_state_wire(bench: SimulatedBench, since: float) -> dict[str, list[Any]]:
    """The safe-state commands that reached each device after ``since``."""
    wire = bench.world.wire
    return {
        "hotplate": [rw for rw in hotplate_writes(bench, since) if rw in ((2, 0), (3, 0))],
        "pumps": [
            r.data for r in wire.entries("pumps") if r.real_t >= since and r.data.endswith("STP")
        ],
        "enclosure": [
            r.data
            for r in wire.entries("enclosure")
            if r.real_t >= since and r.data.get("light") == {"on": False}
        ],
    }


def last_safe_wire_t(bench: SimulatedBench, since: float) -> float:
    """Monotonic time the last safe-state command of the first trip reached a device."""
    wire = bench.world.wire
    times = []
    hp = [r for r in wire.entries("hotplate") if r.real_t >= since and r.data.get("fc") == 6]
    times += [r.real_t for r in hp if r.data["address"] in (2, 3) and r.data["values"] == [0]][:2]
    stp = [r for r in wire.entries("pumps") if r.real_t >= since and r.data.endswith("STP")]
    times += [r.real_t for r in stp][:8]
    enc = [r for r in wire.entries("enclosure") if r.real_t >= since]
    times += [r.real_t for r in enc if r.data.get("light") == {"on": False}][:1]
    return max(times)


# --------------------------------------------------------------------- simulated station
@pytest.mark.timeout(60)
async def test_stuck_heater_trips_safe_states_every_instrument_latches_and_resets_after_cooling() -> (
    None
):
    async with sim_station() as (bench, drivers):
        world = bench.world
        with world.lock:  # liquid in the vial, already warm: the test needs not wait minutes
            world.vial.species_ml["red"] = 1.0
            world.vial.species_ml["blue"] = 1.0
            world.hotplate.plate_c = 110.0
            world.hotplate.liquid_c = 65.0
        audit = AuditTrail()
        sup = supervisor(bench, drivers, audit=audit)
        await drivers["hotplate"].set_stirrer(True, 300)
        await drivers["enclosure"].set_light(True, 0.6)
        await drivers["red"].dispense(0.5, 0.2)  # 150 simulated s: still running at the trip
        async with sup:
            await sup.poll_once()
            assert not sup.latch.tripped
            t_fault = time.monotonic()
            world.faults.inject("stuck-heater", temperature_c=150.0)
            await wait_until(lambda: sup.latch.tripped, 10, "the over-temperature trip")
            await wait_until(lambda: sup.trips and sup.trips[0].done, 5, "the safe state")
            report = sup.trips[0]
            assert report.source == "liquid-overtemp"
            assert report.reason.startswith("liquid-overtemp: hotplate.liquid_c=")
            assert report.reason.endswith(" > 80.0")
            assert sup.latch.trip_record is not None
            assert sup.latch.trip_record.source == "liquid-overtemp"
            assert report.ok and sorted(report.safe) == sorted(drivers)
            # what reached the devices: heater and stirrer enable 0, every pump STP, light off
            wire = safe_state_wire(bench, t_fault)
            assert (2, 0) in wire["hotplate"] and (3, 0) in wire["hotplate"]
            assert {s[0] for s in wire["pumps"]} == {"0", "1", "2", "3"}
            assert wire["enclosure"]
            snap = world.snapshot()
            assert snap["hotplate"]["heater_enabled"] is False
            assert snap["hotplate"]["stirrer_enabled"] is False
            assert snap["pumps"]["red"]["phase"] == "stopped"
            assert snap["enclosure"]["light_on"] is False
            assert sup.state.commanded["hotplate.heater"] is False
            reaction = report.reaction_s
            assert reaction is not None and 0 < reaction < 1.0
            on_wire = last_safe_wire_t(bench, t_fault) - report.t_reading
            print(
                f"trip reaction: {reaction * 1e3:.1f} ms (last safe command on the wire "
                f"{on_wire * 1e3:.1f} ms after the reading)"
            )
            # the relay is stuck: the liquid stays hot, so a reset is refused (and audited)
            with pytest.raises(ResetRefused, match=r"liquid-overtemp: hotplate\.liquid_c=\d"):
                await sup.reset("operator:ada", "looks fine to me")
            assert sup.latch.tripped
            # while latched the safe state is re-asserted
            n_off = len([w for w in hotplate_writes(bench, t_fault) if w == (2, 0)])
            await wait_until(
                lambda: len([w for w in hotplate_writes(bench, t_fault) if w == (2, 0)]) > n_off,
                3,
                "a re-assertion of heater off",
            )
            assert len(sup.reasserts) >= 1
            # the relay is fixed; the liquid must cool below 75 (not just below 80)
            world.faults.clear("stuck-heater")
            refused_between = False
            deadline = time.monotonic() + 20
            while True:
                value = sup.state.view(prefer_measured=True).get("hotplate.liquid_c")
                if value is not None and value < 75.0:
                    break
                if value is not None and 76.0 <= value < 79.0 and not refused_between:
                    with pytest.raises(ResetRefused, match="not yet below 75.0"):
                        await sup.reset("operator:ada", "too early")
                    refused_between = True
                assert time.monotonic() < deadline, "the liquid did not cool below 75 degC"
                await asyncio.sleep(0.01)
            assert refused_between, "never saw the liquid between 75 and 79 degC"
            assert await sup.reset("operator:ada", "stuck relay replaced") is True
            assert not sup.latch.tripped
            last = sup.latch.history[-1]
            assert isinstance(last, ResetRecord)
            assert (last.who, last.why) == ("operator:ada", "stuck relay replaced")
            t_reset = time.monotonic()
            await asyncio.sleep(0.3)
            assert not sup.latch.tripped  # nothing tripped again
            # nothing resumes by itself, and no actuation reached the hotplate since the trip
            assert world.snapshot()["hotplate"]["heater_enabled"] is False
            assert (2, 1) not in hotplate_writes(bench, t_fault)
            assert not [w for w in hotplate_writes(bench, t_reset) if w[0] != 4]
        kinds = [(v.command.action, v.allowed) for v in audit.records()]
        assert kinds[0] == ("trip", True)
        assert ("reset", False) in kinds and kinds[-1] == ("reset", True)
        assert audit.records()[-1].command.who == "operator:ada"
        assert audit.records()[-1].command.params["why"] == "stuck relay replaced"


@pytest.mark.timeout(60)
async def test_heartbeat_stop_trips_on_staleness_and_reset_waits_for_heartbeats() -> None:
    async with sim_station() as (bench, drivers):
        sup = supervisor(bench, drivers)
        async with sup:
            await wait_until(lambda: sup.last_results, 2, "a first evaluation")
            # heartbeats seen (every 0.5 s real): then they stop, and their age grows
            await wait_until(lambda: drivers["enclosure"].heartbeats > 0, 5, "a heartbeat")
            assert not sup.latch.tripped, sup.last_results
            bench.world.faults.inject("heartbeat-stop", device="enclosure")
            await wait_until(lambda: sup.latch.tripped, 6, "the heartbeat trip")  # 2 s limit
            record = sup.latch.trip_record
            assert record is not None and record.source == "enclosure-heartbeat-stale"
            assert "enclosure.heartbeat_age_s is" in record.reason
            await wait_until(lambda: sup.trips[0].done, 3, "the safe state")
            with pytest.raises(ResetRefused, match="enclosure-heartbeat-stale"):
                await sup.reset("operator:bo", "checked the enclosure")
            bench.world.faults.clear("heartbeat-stop")
            await wait_until(
                lambda: sup.check()["enclosure-heartbeat-stale"].cleared, 3, "fresh heartbeats"
            )
            assert await sup.reset("operator:bo", "enclosure firmware restarted")
            assert not sup.latch.tripped


@pytest.mark.timeout(60)
async def test_a_reset_right_after_opening_waits_for_the_first_heartbeat_within_its_grace() -> None:
    """A station just opened (a resume's new actor) has seen no heartbeat yet: its monitor
    is in its grace period, neither tripped nor cleared. A reset then waits for the first
    heartbeat (the device sends one every 0.5 s real) instead of being refused for it."""
    async with sim_station() as (bench, drivers):
        bench.world.faults.inject("heartbeat-stop", device="enclosure")
        spec = next(s for s in bench.instruments() if s.name == "enclosure")
        async with instruments.connect(spec.kind, spec.url, **spec.options) as fresh:
            sup = supervisor(bench, {**drivers, "enclosure": fresh})
            async with sup:
                await sup.trip("operator stop before the check", who="operator:bo")
                assert sup.latch.tripped and fresh.heartbeats == 0
                waiting = sup.check()["enclosure-heartbeat-stale"]
                assert not waiting.tripped and not waiting.cleared and waiting.grace_left_s > 0
                loop = asyncio.get_running_loop()
                loop.call_later(0.3, bench.world.faults.clear, "heartbeat-stop")
                assert await sup.reset("operator:bo", "bench checked after the restart")
                assert fresh.heartbeats > 0 and not sup.latch.tripped


@pytest.mark.timeout(60)
async def test_lid_opened_while_heating_trips_then_commanded_heater_trips_again() -> None:
    async with sim_station() as (bench, drivers):
        sup = supervisor(bench, drivers)
        await drivers["hotplate"].set_stirrer(True, 200)
        await drivers["hotplate"].set_heater(True, 50.0)
        async with sup:
            await wait_until(
                lambda: sup.state.view().get("hotplate.heating") is True, 2, "heating reported"
            )
            # a healthy station first: the enclosure's heartbeat seen (every 0.5 s real)
            await wait_until(lambda: drivers["enclosure"].heartbeats > 0, 3, "a heartbeat")
            assert not sup.latch.tripped
            t0 = time.monotonic()
            bench.enclosure.set_lid("open")
            await wait_until(lambda: sup.latch.tripped, 3, "the lid interlock")
            record = sup.latch.trip_record
            assert record is not None and record.source == "lid-open-while-heating"
            assert "enclosure.lid='open'" in record.reason
            await wait_until(lambda: sup.trips[0].done, 3, "the safe state")
            assert (2, 0) in hotplate_writes(bench, t0)
            # heating stopped, so the condition has cleared although the lid is still open
            await wait_until(
                lambda: sup.check()["lid-open-while-heating"].cleared, 3, "heating to stop"
            )
            assert await sup.reset("operator:cy", "lid opened by mistake, heater off")
            # the guard records a heater command as commanded state: with the lid open, trip
            sup.state.set_commanded({"hotplate.heater": True})
            await wait_until(lambda: sup.latch.tripped, 2, "the commanded-heater interlock")
            assert "hotplate.heater=True" in sup.latch.trip_record.reason  # type: ignore[union-attr]
            assert len(sup.trips) == 2


@pytest.mark.timeout(60)
async def test_hotplate_device_watchdog_is_armed_fed_and_fails_safe_when_the_supervisor_dies() -> (
    None
):
    async with sim_station() as (bench, drivers):
        world = bench.world
        # 10 device s asked; at speed 50 that would be fed every 67 ms real: the supervisor
        # arms 75 device s (1.5 s real), fed every 0.5 s real while we live (feeds asked at
        # least 0.5 s apart, half the default: this test is about the mechanism)
        sup = supervisor(bench, drivers, device_watchdog_s=10, min_feed_interval_s=0.5)
        assert sup.armed_watchdog_s == 75 and sup.feed_interval_s == pytest.approx(0.5)
        await sup.start()
        try:
            assert (4, 75) in hotplate_writes(bench)
            assert world.snapshot()["hotplate"] and world.hotplate.watchdog_s == 75
            assert sup.watchdog_armed == {"hotplate": True}
            await drivers["hotplate"].set_stirrer(True, 200)
            await drivers["hotplate"].set_heater(True, 40.0)
            t_on = time.monotonic()
            await asyncio.sleep(2.0)  # longer than the armed timeout: fed meanwhile
            snap = world.snapshot()["hotplate"]
            assert snap["heater_enabled"] and snap["stirrer_enabled"]
            assert not snap["watchdog_tripped"]
            assert len([w for w in hotplate_writes(bench, t_on) if w == (4, 75)]) >= 3
            assert not sup.latch.tripped
            # labbridge "dies": its tasks stop without stop() and without any safe state
            for task in sup.tasks:
                task.cancel()
            await asyncio.gather(*sup.tasks, return_exceptions=True)
            t_dead = time.monotonic()
            await wait_until(
                lambda: not world.snapshot()["hotplate"]["heater_enabled"], 3, "the device watchdog"
            )
            off_after = time.monotonic() - t_dead
            snap = world.snapshot()["hotplate"]
            assert not snap["stirrer_enabled"] and snap["watchdog_tripped"]
            assert not [w for w in hotplate_writes(bench, t_dead) if w[0] in (2, 3)]
            assert off_after < 1.5 + 0.3  # the armed timeout, plus the simulator's tick
        finally:
            await sup.stop()
            await sup.stop()  # idempotent


@pytest.mark.timeout(60)
async def test_hotplate_that_stops_answering_trips_on_a_stale_reading() -> None:
    async with sim_station() as (bench, drivers):
        sup = supervisor(bench, drivers, safe_timeout=0.5)
        async with sup:
            await wait_until(lambda: "hotplate.plate_c" in sup.state.measured, 2, "a reading")
            bench.world.faults.inject("no-reply", device="hotplate")
            await wait_until(lambda: sup.latch.tripped, 6, "the stale-reading trip")  # 3 s
            assert sup.latch.trip_record.source == "hotplate-reading-stale"  # type: ignore[union-attr]
            await wait_until(lambda: sup.trips[0].done, 3, "the safe state")
            report = sup.trips[0]
            assert report.failed == ["hotplate"] and report.outcomes["hotplate"].timed_out
            assert set(report.safe) == set(drivers) - {"hotplate"}
            assert sup.read_failures["hotplate"] >= 1
            assert "timed out" in sup.last_read_error["hotplate"]
            bench.world.faults.clear("no-reply")
            await wait_until(
                lambda: sup.check()["hotplate-reading-stale"].cleared, 3, "fresh readings"
            )
            assert await sup.reset("operator:di", "hotplate cable reseated")


@pytest.mark.timeout(60)
async def test_safe_state_with_a_dead_transport_is_attempted_reported_and_the_rest_go_safe() -> (
    None
):
    async with sim_station() as (bench, drivers):
        sup = supervisor(bench, drivers, safe_timeout=1.0)
        await drivers["enclosure"].set_light(True, 0.4)
        await bench.hotplate.stop()  # the hotplate is gone: connection refused
        t0 = time.monotonic()
        report = await sup.trip("operator pressed stop", "api")
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0 + 0.5
        assert report.failed == ["hotplate"]
        assert report.outcomes["hotplate"].error
        assert "hotplate" in report.outcomes["hotplate"].error
        assert set(report.safe) == set(drivers) - {"hotplate"}
        assert bench.world.enclosure.light_on is False
        assert len(safe_state_wire(bench, t0)["pumps"]) == 8  # STP twice on each of four
        assert sup.latch.tripped and sup.trips == [report]
        # idempotent: a second trip neither blocks nor storms; force does
        n_stp = len(safe_state_wire(bench, t0)["pumps"])
        t1 = time.monotonic()
        again = await sup.trip("pressed again", "api")
        assert again.already_tripped and time.monotonic() - t1 < 0.05
        assert again.reason == "operator pressed stop"
        assert len(safe_state_wire(bench, t0)["pumps"]) == n_stp
        forced = await sup.trip("make sure", "api", force=True)
        assert not forced.already_tripped
        assert len(safe_state_wire(bench, t0)["pumps"]) == n_stp + 8
        await sup.stop()


# ---------------------------------------------------------------- soft drivers (in memory)
class _NullTransport(Transport):
    """A link to nothing: the soft drivers below keep their state in memory."""

    schemes = ("null",)

    async def _open(self) -> None:
        pass

    async def _close(self) -> None:
        pass


class SoftDevice(Driver):
    """An in-memory instrument whose ``safe_state()`` can be made to misbehave.

    ``mode``: ``ok``; ``hang`` (never returns); ``raise``; ``stubborn`` (swallows the first
    cancellation and returns 0.1 s later, as a driver stuck in a blocking call would).
    """

    kind = "soft"

    def __init__(self, name: str, mode: str = "ok", reading: dict[str, Any] | None = None) -> None:
        super().__init__(_NullTransport(f"null://{name}"), name=name)
        self.mode = mode
        self.reading = dict(reading or {"value": 1.0})
        self.read_error: Exception | None = None
        self.safe_calls = 0
        self.safe_done = 0

    @property
    def channels(self) -> dict[str, Channel]:
        return {}

    async def read(self) -> dict[str, Any]:
        if self.read_error is not None:
            raise self.read_error
        return dict(self.reading)

    async def safe_state(self) -> None:
        self.safe_calls += 1
        if self.mode == "hang":
            await asyncio.Event().wait()
        elif self.mode == "raise":
            raise RuntimeError(f"{self.name}: relay welded")
        elif self.mode == "stubborn":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.1)
        self.safe_done += 1


def soft_supervisor(devices: dict[str, SoftDevice], **options: Any) -> StationSupervisor:
    kwargs: dict[str, Any] = {
        "latch": Latch("bench-x"),
        "state": StationState(),
        "monitors": [],
        "poll_interval": 0.02,
        "safe_timeout": 0.2,
        "reassert_interval": None,
    }
    kwargs.update(options)
    return StationSupervisor("bench-x", devices, **kwargs)


async def test_hung_raising_and_stubborn_safe_states_are_bounded_and_reported() -> None:
    devices = {
        "good": SoftDevice("good"),
        "hung": SoftDevice("hung", "hang"),
        "bad": SoftDevice("bad", "raise"),
        "stubborn": SoftDevice("stubborn", "stubborn"),
        "good2": SoftDevice("good2"),
    }
    sup = soft_supervisor(devices)
    t0 = time.monotonic()
    report = await sup.trip("test", "api")
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 0.4
    assert sorted(report.safe) == ["good", "good2"]
    assert sorted(report.failed) == ["bad", "hung", "stubborn"]
    assert report.outcomes["hung"].timed_out and report.outcomes["stubborn"].timed_out
    assert report.outcomes["bad"].error == "bad: relay welded"
    assert "FAILED" in report.summary() and "relay welded" in report.summary()
    assert devices["good"].safe_done == 1
    await sup.stop()  # waits for the stubborn straggler instead of leaking it
    assert devices["stubborn"].safe_done == 1


async def test_reset_semantics_and_a_latch_tripped_by_someone_else() -> None:
    devices = {"a": SoftDevice("a", reading={"temp": 50.0})}
    mon = Threshold("hot", "a.temp", trip_above=80.0, clear_below=75.0)
    sup = soft_supervisor(devices, monitors=[mon], reassert_interval=0.1)
    assert await sup.reset("someone", "nothing to reset") is False
    with pytest.raises(ResetRefused, match="who resets it and why"):
        await sup.reset("", "no name")
    async with sup:
        await asyncio.sleep(0.05)
        assert not sup.latch.tripped
        sup.latch.trip("the guard saw something", "guard")  # not through the supervisor
        await wait_until(lambda: devices["a"].safe_done >= 1, 1, "the safe state")
        assert sup.trips[0].source == "guard"
        await wait_until(lambda: devices["a"].safe_done >= 3, 1, "re-assertions")
        with pytest.raises(ResetRefused, match="who resets it and why"):
            await sup.reset("operator", "  ")
        assert await sup.reset("operator", "guard false alarm")
        n = devices["a"].safe_done
        await asyncio.sleep(0.25)
        assert devices["a"].safe_done == n  # no re-assertion once reset
        devices["a"].reading = {"temp": 85.0}
        await wait_until(lambda: sup.latch.tripped, 1, "the threshold trip")
        devices["a"].reading = {"temp": 78.0}
        await asyncio.sleep(0.05)
        with pytest.raises(ResetRefused, match=r"hot: a\.temp=78\.0 is not yet below 75\.0"):
            await sup.reset("operator", "cooling")
        devices["a"].reading = {"temp": 74.9}
        await wait_until(lambda: sup.check()["hot"].cleared, 1, "cooling below 75")
        assert await sup.reset("operator", "cooled")
    assert not sup.running


async def test_a_failing_read_is_logged_and_its_channels_age_into_a_staleness_trip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    devices = {"a": SoftDevice("a", reading={"temp": 20.0}), "b": SoftDevice("b")}
    mon = Staleness("a-stale", "a.temp", 0.15)
    sup = soft_supervisor(devices, monitors=[mon], read_timeout=0.05)
    async with sup:
        await asyncio.sleep(0.1)
        assert not sup.latch.tripped
        devices["a"].read_error = ConnectionError("cable pulled")
        await wait_until(lambda: sup.latch.tripped, 1, "the staleness trip")
        assert sup.latch.trip_record.source == "a-stale"  # type: ignore[union-attr]
        assert sup.read_failures["a"] >= 2 and sup.read_failures["b"] == 0
        assert sup.last_read_error["a"] == "cable pulled"
        assert sup.state.age("b.value") is not None and sup.state.age("b.value") < 0.1  # type: ignore[operator]
    warnings = [r for r in caplog.records if "reading a failed" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not on every poll
    status = sup.status()
    assert status["latched"] and status["trip"]["source"] == "a-stale"


def test_constructor_checks() -> None:
    devices = {"a": SoftDevice("a")}
    with pytest.raises(ValueError, match="latch is for station"):
        StationSupervisor(
            "bench-x", devices, latch=Latch("bench-y"), state=StationState(), monitors=[]
        )
    with pytest.raises(ValueError, match="whole seconds"):
        soft_supervisor(devices, device_watchdog_s=2.5)
    with pytest.raises(ValueError, match="unknown instruments"):
        soft_supervisor(devices, poll=["nope"])
    with pytest.raises(ValueError, match="unique"):
        soft_supervisor(
            devices,
            monitors=[Staleness("x", "a.v", 1.0), Staleness("x", "a.w", 1.0)],
        )


async def test_trip_after_a_direct_latch_trip_still_safe_states_once() -> None:
    devices = {"a": SoftDevice("a"), "b": SoftDevice("b")}
    sup = soft_supervisor(devices)
    sup.latch.trip("tripped by the guard while nobody supervised", "guard")
    first = await sup.trip("e-stop", "estop")
    assert not first.already_tripped and first.ok  # nobody had made the station safe yet
    assert first.reason == "e-stop"
    assert [d.safe_calls for d in devices.values()] == [1, 1]
    second = await sup.trip("e-stop again", "estop")
    assert second.already_tripped
    assert second.reason == "tripped by the guard while nobody supervised"
    assert second.outcomes["a"].ok  # the last safe-state outcomes come along
    assert [d.safe_calls for d in devices.values()] == [1, 1]
    await sup.stop()


def test_the_armed_watchdog_timeout_is_one_its_feeds_can_keep() -> None:
    """A real bench arms the configured timeout; a simulated bench running much faster than
    real time arms one whose feeds are at least ``min_feed_interval_s`` real seconds apart
    (issue 12: at 500x a 5 s watchdog needed a feed every 3 ms)."""
    devices = {"a": SoftDevice("a")}
    real = soft_supervisor(devices, device_watchdog_s=5, device_time_scale=1.0)
    assert (real.armed_watchdog_s, real.feed_interval_s) == (5, pytest.approx(5 / 3))
    fast = soft_supervisor(devices, device_watchdog_s=5, device_time_scale=500.0)
    assert fast.armed_watchdog_s == 1500 and fast.feed_interval_s == pytest.approx(1.0)
    tight = soft_supervisor(
        devices, device_watchdog_s=5, device_time_scale=500.0, min_feed_interval_s=0.01
    )
    assert tight.armed_watchdog_s == 15
    assert (
        soft_supervisor(devices, device_watchdog_s=0, device_time_scale=500.0).armed_watchdog_s == 0
    )
