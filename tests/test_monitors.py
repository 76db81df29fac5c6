"""Monitors as pure logic on a StationState: thresholds with hysteresis, staleness and
heartbeat watchdogs, interlocks, missing values, and the reference bench's declared set
(its envelope's monitors plus the faults its hotplate's driver declares)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from instruments.drivers.hotplate import Hotplate
from safety.devicefaults import fault_monitors
from safety.envelopeload import reference_envelope
from safety.model import StationState
from safety.monitors import (
    Heartbeat,
    Interlock,
    Monitor,
    MonitorResult,
    Staleness,
    Threshold,
    evaluate_all,
    measured_ages,
)


def run(monitor: Monitor, state: StationState) -> MonitorResult:
    return evaluate_all([monitor], state)[monitor.name]


def liquid(value: Any) -> StationState:
    state = StationState()
    state.set_measured("hotplate", {"liquid_c": value})
    return state


def test_threshold_hysteresis_trips_above_and_clears_only_below_the_clear_level() -> None:
    mon = Threshold("liquid-overtemp", "hotplate.liquid_c", trip_above=80.0, clear_below=75.0)
    tripped = run(mon, liquid(83.2))
    assert (tripped.tripped, tripped.cleared) == (True, False)
    assert tripped.reason == "liquid-overtemp: hotplate.liquid_c=83.2 > 80.0"
    assert tripped.values == {"hotplate.liquid_c": 83.2}
    assert run(mon, liquid(80.1)).tripped
    at_limit = run(mon, liquid(80.0))  # strict: at the limit is not over it
    assert (at_limit.tripped, at_limit.cleared) == (False, False)
    middle = run(mon, liquid(77.0))
    assert (middle.tripped, middle.cleared) == (False, False)
    assert "hotplate.liquid_c=77.0 is not yet below 75.0" in middle.reason
    assert not run(mon, liquid(75.0)).cleared
    low = run(mon, liquid(74.9))
    assert (low.tripped, low.cleared) == (False, True)


def test_threshold_below_with_its_own_hysteresis_and_both_sides() -> None:
    mon = Threshold("low-pressure", "pump.p_bar", trip_below=1.0, clear_above=1.5)
    state = StationState()
    results = []
    for value in (0.9, 1.2, 1.6):
        state.set_measured("pump", {"p_bar": value})
        r = run(mon, state)
        results.append((r.tripped, r.cleared, r.reason))
    assert [r[:2] for r in results] == [(True, False), (False, False), (False, True)]
    assert results[0][2] == "low-pressure: pump.p_bar=0.9 < 1.0"
    assert "not yet above 1.5" in results[1][2]
    band = Threshold("band", "x.v", trip_above=10, trip_below=0)  # no hysteresis given
    s = StationState()
    for value, expected in ((11, (True, False)), (-1, (True, False)), (10, (False, True))):
        s.set_measured("x", {"v": value})
        r = run(band, s)
        assert (r.tripped, r.cleared) == expected, value


@pytest.mark.parametrize("value", [None, math.nan, "hot", True])
def test_threshold_without_a_number_is_neither_tripped_nor_cleared(value: Any) -> None:
    mon = Threshold("liquid-overtemp", "hotplate.liquid_c", trip_above=80.0, clear_below=75.0)
    r = run(mon, liquid(value))
    assert (r.tripped, r.cleared) == (False, False)
    never = run(mon, StationState())
    assert (never.tripped, never.cleared) == (False, False)
    assert never.reason == "liquid-overtemp: hotplate.liquid_c has no value yet"


def test_threshold_rejects_inconsistent_levels() -> None:
    with pytest.raises(ValueError, match="clear_below 85 is above trip_above 80"):
        Threshold("t", "a.b", trip_above=80, clear_below=85)
    with pytest.raises(ValueError, match="trip_above and/or trip_below"):
        Threshold("t", "a.b")
    with pytest.raises(ValueError, match="clear_above 1 is below trip_below 2"):
        Threshold("t", "a.b", trip_below=2, clear_above=1)
    with pytest.raises(ValueError, match="instrument.channel"):
        Threshold("t", "nodot", trip_above=1)


def test_staleness_trips_on_an_old_reading_and_after_the_grace_without_any() -> None:
    mon = Staleness("hotplate-reading-stale", "hotplate.plate_c", 2.0, grace_s=1.0)
    now = time.monotonic()
    mon.arm(now)
    state = StationState()
    missing = run(mon, state)  # within the grace period: unknown
    assert (missing.tripped, missing.cleared) == (False, False)
    mon.arm(now - 1.5)  # armed 1.5 s ago, grace 1 s, still nothing read
    late = run(mon, state)
    assert (late.tripped, late.cleared) == (True, False)
    assert "no reading of hotplate.plate_c" in late.reason
    state.set_measured("hotplate", {"plate_c": 40.0}, t=now - 2.5)
    old = run(mon, state)
    assert (old.tripped, old.cleared) == (True, False)
    assert old.reason.startswith("hotplate-reading-stale: hotplate.plate_c is 2.5")
    assert "> 2.0 s" in old.reason
    state.set_measured("hotplate", {"plate_c": 40.0})
    fresh = run(mon, state)
    assert (fresh.tripped, fresh.cleared) == (False, True)


def test_staleness_with_a_clear_age_has_hysteresis() -> None:
    mon = Staleness("s", "a.v", 2.0, clear_age_s=0.5)
    state = StationState()
    state.set_measured("a", {"v": 1}, t=time.monotonic() - 1.0)
    r = run(mon, state)
    assert (r.tripped, r.cleared) == (False, False)
    with pytest.raises(ValueError, match="clear_age_s is above max_age_s"):
        Staleness("s", "a.v", 1.0, clear_age_s=2.0)


def test_heartbeat_age_is_the_reported_age_plus_the_age_of_the_reading() -> None:
    mon = Heartbeat("enclosure-heartbeat-stale", "enclosure.heartbeat_age_s", 2.0, grace_s=0.0)
    mon.arm()
    state = StationState()
    state.set_measured("enclosure", {"heartbeat_age_s": 0.3})
    ok = run(mon, state)
    assert (ok.tripped, ok.cleared) == (False, True)
    # the device still said 0.3 s, but that reading is 1.9 s old: 2.2 s in all
    state.set_measured("enclosure", {"heartbeat_age_s": 0.3}, t=time.monotonic() - 1.9)
    stale = run(mon, state)
    assert stale.tripped and "enclosure.heartbeat_age_s is 2.2" in stale.reason
    state.set_measured("enclosure", {"heartbeat_age_s": 2.5})
    assert run(mon, state).tripped
    state.set_measured("enclosure", {"heartbeat_age_s": None})  # never saw one
    none = run(mon, state)
    assert none.tripped and "no heartbeat" in none.reason


def test_interlock_lid_open_while_heating_measured_or_commanded() -> None:
    mon = Interlock(
        "lid-open-while-heating",
        trip_when='(hotplate.heating or hotplate.heater) and enclosure.lid != "closed"',
    )
    assert mon.channels == ("hotplate.heating", "hotplate.heater", "enclosure.lid")
    state = StationState()
    state.set_measured("enclosure", {"lid": "open"})
    state.set_measured("hotplate", {"heating": False})
    state.set_commanded({"hotplate.heater": False})
    idle = run(mon, state)
    assert (idle.tripped, idle.cleared) == (False, True)  # lid open, nothing heats: fine
    state.set_measured("hotplate", {"heating": True})
    hot = run(mon, state)
    assert (hot.tripped, hot.cleared) == (True, False)
    assert hot.reason == (
        "lid-open-while-heating: hotplate.heating=True, hotplate.heater=False, enclosure.lid='open'"
    )
    state.set_measured("hotplate", {"heating": False})
    state.set_commanded({"hotplate.heater": True})  # commanded on, not yet heating
    assert run(mon, state).tripped
    state.set_measured("enclosure", {"lid": "closed"})
    closed = run(mon, state)
    assert (closed.tripped, closed.cleared) == (False, True)
    unknown = StationState()
    unknown.set_measured("hotplate", {"heating": False})
    unknown.set_commanded({"hotplate.heater": True})
    r = run(mon, unknown)  # heater on, lid never reported: unknown, not cleared
    assert (r.tripped, r.cleared) == (False, False)
    assert r.reason == (
        "lid-open-while-heating: unknown (unknown name 'enclosure.lid'): "
        "hotplate.heating=False, hotplate.heater=True, enclosure.lid=None"
    )
    unknown.set_commanded({"hotplate.heater": False})  # nothing heats: the lid is not needed
    assert run(mon, unknown).cleared
    # 1 is not true (the rule language is strict): unknown, neither tripped nor cleared
    odd = StationState()
    odd.set_measured("hotplate", {"heating": 1})
    odd.set_measured("enclosure", {"lid": "open"})
    r = run(mon, odd)
    assert (r.tripped, r.cleared) == (False, False) and "unknown" in r.reason
    # a condition that is not a boolean is unknown too
    bare = Interlock("bare", trip_when="a.flag")
    s = StationState()
    s.set_measured("a", {"flag": None})
    r = run(bare, s)
    assert (r.tripped, r.cleared) == (False, False)
    assert r.reason == "bare: unknown (not true/false: None): a.flag=None"


def test_interlock_without_requirement_and_with_a_callable() -> None:
    offline = Interlock("enclosure-offline", trip_when="enclosure.online == false")
    state = StationState()
    state.set_measured("enclosure", {"online": True})
    assert run(offline, state).cleared
    state.set_measured("enclosure", {"online": False})
    r = run(offline, state)
    assert r.tripped and r.reason == "enclosure-offline: enclosure.online=False"
    state.set_measured("enclosure", {"online": None})  # retained status cleared: unknown
    r = run(offline, state)
    assert (r.tripped, r.cleared) == (False, False)

    def too_full(view: Any) -> str | None:
        total = sum(view.get(f"{d}.volume", 0.0) for d in ("red", "green", "blue"))
        return f"vial holds {total:.2f} mL > 3.0 mL" if total > 3.0 else None

    full = Interlock("vial-overfill", too_full, channels=["red.volume"])
    s = StationState()
    s.set_commanded({"red.volume": 2.0, "blue.volume": 1.5})
    r = run(full, s)
    assert r.tripped and r.reason == "vial-overfill: vial holds 3.50 mL > 3.0 mL"
    s.set_commanded({"blue.volume": 0.5})
    assert run(full, s).cleared
    assert full.instruments == {"red"}
    with pytest.raises(ValueError, match="condition callable or trip_when"):
        Interlock("x")
    with pytest.raises(ValueError, match="condition callable or trip_when"):
        Interlock("x", too_full, trip_when="a.b")
    with pytest.raises(ValueError, match="monitor x:1:"):
        Interlock("x", trip_when="a.b and")  # a rule that does not parse


def test_a_monitor_that_raises_counts_as_tripped() -> None:
    def broken(view: Any) -> str | None:
        raise KeyError("oops")

    r = run(Interlock("broken", broken), StationState())
    assert (r.tripped, r.cleared) == (True, False)
    assert "monitor failed" in r.reason


def reference_monitors() -> list[Monitor]:
    """What a reference-bench supervisor watches on its hotplate and enclosure: the
    envelope's monitors and the hotplate driver's declared faults."""
    envelope = reference_envelope()
    device, off = fault_monitors({"hotplate": Hotplate}, envelope.fault_settings)
    assert off == {}
    return [*envelope.build_monitors(), *device]


def test_reference_bench_monitors_on_a_healthy_then_a_faulty_station() -> None:
    mons = reference_monitors()
    assert [m.name for m in mons] == [
        "liquid-overtemp",
        "hotplate-reading-stale",
        "enclosure-heartbeat-stale",
        "enclosure-offline",
        "lid-open-while-heating",
        "hotplate.watchdog-tripped",
        "hotplate.over-temperature",
        "hotplate.probe-fault",
    ]
    for m in mons:
        m.arm()
    state = StationState()
    state.set_commanded({"hotplate.heater": True, "hotplate.stirrer": True})
    state.set_measured(
        "hotplate",
        {
            "liquid_c": 60.0,
            "plate_c": 70.0,
            "heating": True,
            "heater_enabled": True,
            "watchdog_tripped": False,
            "over_temperature": False,
            "probe_fault": False,
        },
    )
    state.set_measured("enclosure", {"lid": "closed", "online": True, "heartbeat_age_s": 0.2})
    results = evaluate_all(mons, state)
    assert all(r.cleared and not r.tripped for r in results.values()), results
    assert set(measured_ages(state)) >= {"hotplate.liquid_c", "enclosure.lid"}
    state.set_measured("hotplate", {"liquid_c": 81.0, "watchdog_tripped": True})
    state.set_measured("enclosure", {"lid": "open", "online": False, "heartbeat_age_s": 3.0})
    pending = evaluate_all(mons, state)["hotplate.watchdog-tripped"]  # confirm: true
    assert (pending.tripped, pending.cleared) == (False, False)
    assert "waiting for a reading of hotplate.watchdog_tripped" in pending.reason
    time.sleep(0.002)
    state.set_measured("hotplate", {"watchdog_tripped": True})  # the next reading still shows it
    results = evaluate_all(mons, state)
    tripped = {n for n, r in results.items() if r.tripped}
    assert tripped == {
        "liquid-overtemp",
        "enclosure-heartbeat-stale",
        "enclosure-offline",
        "lid-open-while-heating",
        "hotplate.watchdog-tripped",
    }
    assert results["hotplate.watchdog-tripped"].reason == (
        "hotplate.watchdog-tripped: hotplate.watchdog_tripped=True, hotplate.heater=True, "
        f"hotplate.stirrer=True ({Hotplate.faults['watchdog-tripped'].doc})"
    )
    # the hysteresis of the declared threshold: not yet cleared at 77, cleared below 75
    state.set_measured("hotplate", {"liquid_c": 77.0})
    r = evaluate_all(mons, state)["liquid-overtemp"]
    assert (r.tripped, r.cleared) == (False, False)
    state.set_measured("hotplate", {"liquid_c": 74.9})
    assert evaluate_all(mons, state)["liquid-overtemp"].cleared


def test_a_device_watchdog_bit_trips_only_while_heating_or_stirring_is_commanded() -> None:
    """The trip's safe state (heater and stirrer commanded off) clears it, so the station can
    be reset although the device keeps the bit until its next enable; a bit left set by a
    previous run does not trip a station that commands nothing."""
    (mon,) = [m for m in reference_monitors() if m.name.endswith("watchdog-tripped")]
    state = StationState()
    state.set_measured("hotplate", {"watchdog_tripped": True})
    state.set_commanded({"hotplate.heater": False, "hotplate.stirrer": False})
    assert run(mon, state).cleared
    # the stirrer is commanded on (which clears the bit on the device): the reading from
    # before the command does not trip; the next one, showing the bit cleared, clears
    state.set_commanded({"hotplate.stirrer": True})
    for _ in range(3):
        r = run(mon, state)
        assert (r.tripped, r.cleared) == (False, False)
    time.sleep(0.002)
    state.set_measured("hotplate", {"watchdog_tripped": False})
    assert run(mon, state).cleared
    # the device trips while stirring: seen on one reading, confirmed by the next
    state.set_measured("hotplate", {"watchdog_tripped": True})
    assert not run(mon, state).tripped
    time.sleep(0.002)
    state.set_measured("hotplate", {"watchdog_tripped": True})
    r = run(mon, state)
    assert r.tripped and "hotplate.watchdog_tripped=True" in r.reason
    # the trip's safe state commands heater and stirrer off: cleared, though the bit stays
    state.set_commanded({"hotplate.heater": False, "hotplate.stirrer": False})
    assert run(mon, state).cleared


def test_a_confirmed_interlock_over_commanded_values_only_trips_at_once() -> None:
    mon = Interlock("on-twice", trip_when="a.on and b.on", confirm=True)
    state = StationState()
    state.set_commanded({"a.on": True, "b.on": True})
    assert run(mon, state).tripped
    with pytest.raises(ValueError, match="confirm needs trip_when"):
        Interlock("x", lambda view: None, confirm=True)
