"""The safety façade end to end on a simulated station: open_station -> guarded handles only,
refusals never reach the wire, a monitor trip latches and refuses actuation until a reset."""

from __future__ import annotations

import asyncio
import time

import pytest

from safety import (
    Command,
    ResetRefused,
    SafeStation,
    SafetyRefusal,
    StationTripped,
    open_station,
    reference_envelope,
)
from simulators.bench import SimulatedLab

SPEED = 50.0


def sim_station(lab: SimulatedLab, **supervisor: object) -> object:
    bench = lab.stations[0]
    return open_station(
        bench.name,
        [s.as_dict() for s in bench.instruments()],
        reference_envelope(),
        clock=bench.world.clock.now,
        supervisor_options={
            "device_time_scale": SPEED,
            "poll_interval": 0.05,
            "safe_timeout": 2.0,
            **supervisor,
        },
    )


async def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def heater_writes(lab: SimulatedLab) -> list[dict]:
    return [
        e.data
        for e in lab.stations[0].world.wire.entries("hotplate")
        if isinstance(e.data, dict)
        and e.data.get("fc") in (6, 16)
        and e.data.get("address") in (0, 2)
    ]


@pytest.mark.timeout(60)
async def test_handles_are_guarded_and_refusals_never_reach_the_wire() -> None:
    async with SimulatedLab(speed=SPEED) as lab, sim_station(lab) as station:
        assert isinstance(station, SafeStation)
        hotplate = station.handle("hotplate", who="test")
        assert not hasattr(hotplate, "driver") and not hasattr(hotplate, "transport")
        before = len(heater_writes(lab))
        with pytest.raises(SafetyRefusal, match="heater-needs-stirring-and-closed-lid"):
            await hotplate.set_heater(True, 40.0)  # stirrer off
        assert len(heater_writes(lab)) == before
        refused = station.audit.records(allowed=False)
        assert refused and refused[-1].command.who == "test" and refused[-1].rule
        # a recipe that would overfill the vial is caught by the dry run, with its step
        plan = [
            Command("red", "dispense", {"volume_ml": 1.5, "rate_ml_min": 5.0}),
            Command("blue", "dispense", {"volume_ml": 1.5, "rate_ml_min": 5.0}),
        ]
        report = station.dry_run(plan)
        assert not report.ok and report.violations[0].step == 1
        assert report.violations[0].rule == "vial.volume.max"
        with pytest.raises(SafetyRefusal, match="not an allowed command"):
            await station.execute(Command("red", "run", {}))


@pytest.mark.timeout(90)
async def test_overtemperature_trip_latches_until_reset_after_cooling() -> None:
    async with SimulatedLab(speed=SPEED) as lab, sim_station(lab) as station:
        world = lab.stations[0].world
        with world.lock:
            world.vial.species_ml["red"] = 1.0
            world.hotplate.plate_c = 110.0
            world.hotplate.liquid_c = 78.0
        world.faults.inject("stuck-heater", temperature_c=150.0)
        await wait_for(lambda: station.tripped, 20, "the over-temperature trip")
        assert station.latch.trip_record is not None
        assert "liquid-overtemp" in station.latch.trip_record.reason
        # actuation refused while latched; making things safer is still allowed
        with pytest.raises(StationTripped):
            await station.handle("enclosure").set_light(True, 0.5)
        await station.handle("hotplate").set_heater(False)
        with pytest.raises(ResetRefused, match="liquid-overtemp"):
            await station.reset("operator:ada", "checked the bench")
        world.faults.clear("stuck-heater")
        with world.lock:
            world.hotplate.plate_c = world.hotplate.liquid_c = 30.0
        await wait_for(
            lambda: (station.state.view(prefer_measured=True).get("hotplate.liquid_c") or 99) < 75,
            10,
            "a cool reading",
        )
        with pytest.raises(ResetRefused, match="who"):
            await station.reset("", "no name")
        await station.reset("operator:ada", "stuck relay replaced")
        assert not station.tripped
        assert world.hotplate.heater_enabled is False  # nothing resumed by itself
        await station.handle("enclosure").set_light(True, 0.5)
    # leaving open_station put everything in its safe state
    assert world.enclosure.light_on is False


@pytest.mark.timeout(60)
async def test_the_hotplates_device_watchdog_trips_the_station_and_it_can_be_reset() -> None:
    """The station's monitors are its envelope's and its drivers' declared faults (the
    hotplate's watchdog among them, named hotplate.watchdog-tripped). labbridge stalls longer than the hotplate's
    device watchdog (5 device s = 0.1 s at 50x), which switches heating off by itself: the
    station trips on the device's status bit (the experiment's thermal history is no longer
    what was commanded), can be reset once its safe state is commanded, and the next enable
    (which clears the bit on the device) does not trip it again."""
    # fed every 33 ms (the default keeps feeds 0.5 s apart: 75 device s at 50x)
    fast = {"min_feed_interval_s": 0.03}
    async with SimulatedLab(speed=SPEED) as lab, sim_station(lab, **fast) as station:
        world = lab.stations[0].world
        assert station.supervisor.armed_watchdog_s == 5
        declared = [m.name for m in reference_envelope().monitors]
        faults = ["hotplate.watchdog-tripped", "hotplate.over-temperature", "hotplate.probe-fault"]
        pumps = [f"{p}.alarm" for p in ("red", "green", "blue", "waste")]
        names = [m.name for m in station.supervisor.monitors]
        assert names[: len(declared)] == declared
        assert sorted(names[len(declared) :]) == sorted([*faults, *pumps])
        hotplate = station.handle("hotplate", who="test")
        await hotplate.set_stirrer(True, 200)
        await hotplate.set_heater(True, 25.0)  # where the setpoint is (it may rise 10 degC/min)
        await asyncio.sleep(0.3)  # fed every 33 ms: the device watchdog holds
        assert world.snapshot()["hotplate"]["heater_enabled"] is True
        assert not station.tripped, station.supervisor.last_results
        time.sleep(0.5)  # labbridge stalls (the event loop is blocked): 25 device s unfed
        await wait_for(lambda: station.tripped, 5, "the device-watchdog trip")
        record = station.latch.trip_record
        assert record is not None and record.source == "hotplate.watchdog-tripped", record
        assert "hotplate.watchdog_tripped=True" in record.reason
        assert "hotplate.heater=True" in record.reason
        await wait_for(lambda: station.supervisor.trips[0].done, 5, "the safe state")
        snap = world.snapshot()["hotplate"]
        assert snap["watchdog_tripped"] and not snap["heater_enabled"]
        with pytest.raises(StationTripped):
            await hotplate.set_heater(True, 25.0)
        # heater and stirrer are commanded off by the trip: the monitor clears although the
        # device keeps its bit until the next enable
        assert station.state.commanded["hotplate.heater"] is False
        await wait_for(
            lambda: station.supervisor.check()["hotplate.watchdog-tripped"].cleared,
            5,
            "the watchdog monitor to clear",
        )
        assert world.snapshot()["hotplate"]["watchdog_tripped"] is True
        await station.reset("operator:ada", "labbridge stalled; experiment discarded")
        assert not station.tripped
        await hotplate.set_stirrer(True, 200)  # a write of 1 to an enable clears the device bit
        await wait_for(
            lambda: (
                station.state.view(prefer_measured=True).get("hotplate.watchdog_tripped") is False
            ),
            5,
            "a reading with the bit cleared",
        )
        await asyncio.sleep(0.3)
        assert not station.tripped, station.latch.trip_record
        assert len(station.supervisor.trips) == 1
