"""Device-side trips are seen (issue 12): the faults drivers declare trip the station.

Every fault a bundled driver declares (instruments/declare.py ``Fault``) becomes a monitor
``<instrument>.<fault>`` of the station supervisor without a word in the envelope
(safety/devicefaults.py); an envelope may only disable or narrow one, with a reason. Each
fault kind is injected into the simulators, and the trip is observed from the devices' side:
the simulators' wire log shows the safe-state commands going out after the injection and no
actuating command after them. The trip latency printed is real seconds from the injection to
the first safe-state command on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from bridge.simbench import bench_data
from instruments.declare import DeclarationError, Fault
from instruments.driver import Channel, Driver
from instruments.drivers.balance import Balance
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.ph_meter import PhMeter
from instruments.drivers.syringe_pump import SyringePump
from instruments.errors import DeviceError
from instruments.transports.base import Transport
from safety import SafeStation, StationTripped, load_envelope, open_station, reference_envelope
from safety.devicefaults import declared_faults, fault_monitors, qualify
from safety.envelope import EnvelopeError
from safety.expr import RuleSyntaxError
from safety.model import Latch, ResetRefused, StationState
from safety.supervisor import StationSupervisor
from simulators.bench import SimulatedBench, SimulatedLab

SPEED = 50.0
BUFFER = bench_data("buffer")
PUMPS = ("red", "green", "blue", "waste")


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------- declarations
def test_the_bundled_drivers_declare_their_faults_and_each_becomes_a_monitor() -> None:
    drivers = {"hotplate": Hotplate, "red": SyringePump, "ph": PhMeter, "balance": Balance}
    declared = declared_faults(drivers)
    assert list(declared) == [
        "hotplate.watchdog-tripped",
        "hotplate.over-temperature",
        "hotplate.probe-fault",
        "red.alarm",
        "ph.not-immersed",
        "balance.overload",
        "balance.underload",
    ]
    assert declared["hotplate.watchdog-tripped"].when.text == (
        "hotplate.watchdog_tripped and (hotplate.heater or hotplate.stirrer)"
    )
    monitors, disabled = fault_monitors(drivers)
    assert disabled == {}
    by_name = {m.name: m for m in monitors}
    assert by_name["red.alarm"].channels == ("red.alarmed", "red.alarm")  # its code is shown
    assert by_name["hotplate.watchdog-tripped"].confirm  # type: ignore[attr-defined]
    assert not by_name["hotplate.probe-fault"].confirm  # type: ignore[attr-defined]
    # every driver's faults are in its describe(), for the API and the docs
    assert set(Hotplate.faults) == {"watchdog-tripped", "over-temperature", "probe-fault"}


def test_a_fault_declaration_that_cannot_work_fails_with_its_driver_and_name() -> None:
    with pytest.raises(DeclarationError, match="needs a doc"):
        Fault("alarmed", "")
    with pytest.raises(DeclarationError, match="show names the driver's own channels"):
        Fault("alarmed", "an alarm", show=("pump.code",))

    def driver_with(faults: Any) -> type[Driver]:
        class Thing(Driver):
            kind = "thing"

            @property
            def channels(self) -> Mapping[str, Channel]:
                return {}

            async def read(self) -> dict[str, Any]:
                return {}

            async def safe_state(self) -> None:
                return None

        Thing.faults = faults  # checked as when the class is made
        return type("Thing2", (Thing,), {"faults": faults})

    with pytest.raises(DeclarationError, match=r"Thing2.faults: a fault name is lower-case"):
        driver_with({"Over_Temp": Fault("hot", "too hot")})
    with pytest.raises(DeclarationError, match=r"Thing2.faults\['hot'\] must be a Fault"):
        driver_with({"hot": "too hot"})
    thing = driver_with({"hot": Fault("temp.c > 3", "too hot")})
    with pytest.raises(DeclarationError, match=r"Thing2.faults\['hot'\]: names temp.c"):
        declared_faults({"oven": thing})
    broken = driver_with({"hot": Fault("temp_c >", "too hot")})
    with pytest.raises(DeclarationError, match=r"Thing2.faults\['hot'\]"):
        declared_faults({"oven": broken})
    with pytest.raises(DeclarationError, match="names b.c"):
        qualify("a and not b.c", "x", source="s")
    assert qualify("a and (b or c > 3)", "oven", source="s").text == (
        "oven.a and (oven.b or oven.c > 3)"
    )


ENVELOPE = """\
channels: {}
monitors:
  - name: liquid-hot
    kind: threshold
    channel: hotplate.liquid_c
    trip_above: 80
  - name: hotplate.probe-fault
    disabled: no liquid probe fitted on this bench
  - name: red.alarm
    while: hotplate.stirrer
    doc: only while stirring (a test of narrowing)
"""


def test_an_envelope_disables_or_narrows_a_device_fault_with_a_reason() -> None:
    env = load_envelope(ENVELOPE, source="lab.yaml", known=["hotplate", "red"])
    assert [m.name for m in env.monitors] == ["liquid-hot"]
    assert [s.name for s in env.fault_settings] == ["hotplate.probe-fault", "red.alarm"]
    monitors, disabled = fault_monitors(
        {"hotplate": Hotplate, "red": SyringePump}, env.fault_settings
    )
    assert disabled == {"hotplate.probe-fault": "no liquid probe fitted on this bench"}
    by_name = {m.name: m for m in monitors}
    assert "hotplate.probe-fault" not in by_name
    alarm = by_name["red.alarm"]
    state = StationState()
    state.set_measured("red", {"alarmed": True, "alarm": "S"})
    state.set_commanded({"hotplate.stirrer": False})
    assert alarm.evaluate(state.view(), {}).cleared  # narrowed: not while the stirrer is off
    state.set_commanded({"hotplate.stirrer": True})
    r = alarm.evaluate(state.view(), {})
    assert r.tripped and "red.alarm='S'" in r.reason and "hotplate.stirrer=True" in r.reason


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "monitors:\n  - {name: hotplate.probe-fault, off: x}\n",
            "YAML reads the key 'off' as false",
        ),
        (
            "monitors:\n  - {name: hotplate.probe-fault, disabled: x, while: hotplate.heater}\n",
            "not both",
        ),
        ("monitors:\n  - {name: hotplate.probe-fault, disabled: true}\n", "the reason"),
        ("monitors:\n  - {name: hotplate, disabled: x}\n", "'<instrument>.<fault>'"),
        ("monitors:\n  - {name: hotplate.probe-fault, while: x, kindly: 1}\n", "unknown key"),
        ("monitors:\n  - {name: hotplate.probe-fault}\n", "missing 'kind'"),
    ],
)
def test_a_bad_fault_setting_names_the_file_line_and_field(text: str, words: str) -> None:
    with pytest.raises(EnvelopeError, match=re.escape(words)) as info:
        load_envelope(text, source="lab.yaml")
    assert str(info.value).startswith("lab.yaml:2: monitors[0]")


def test_a_setting_of_a_fault_no_driver_declares_names_the_known_ones() -> None:
    text = "monitors:\n  - {name: hotplate.probe-falut, disabled: typo}\n"
    env = load_envelope(text, source="lab.yaml", known=["hotplate", "red"])
    with pytest.raises(EnvelopeError) as info:
        fault_monitors({"hotplate": Hotplate, "red": SyringePump}, env.fault_settings)
    assert str(info.value) == (
        "lab.yaml:2: monitors[0].name: 'hotplate.probe-falut' is not a fault hotplate's driver "
        "declares (known: hotplate.watchdog-tripped, hotplate.over-temperature, "
        "hotplate.probe-fault)"
    )
    with pytest.raises(EnvelopeError, match="unknown instrument 'furnace'"):
        load_envelope("monitors:\n  - {name: furnace.hot, disabled: x}\n", known=["hotplate"])
    with pytest.raises(RuleSyntaxError):
        load_envelope("monitors:\n  - {name: red.alarm, while: 'hotplate.stirrer and'}\n")
    # an envelope monitor may not take the name of a declared fault: it is watched already
    with pytest.raises(ValueError, match="have the name of a fault the drivers declare"):
        StationSupervisor(
            "s",
            {"hotplate": _Soft("hotplate")},
            latch=Latch("s"),
            state=StationState(),
            monitors=[m for m in fault_monitors({"hotplate": _Soft})[0]],
        )


# --------------------------------------------------- a third-party driver's fault, in memory
class _Link(Transport):
    """A transport that is only a URL: the soft probe keeps its state in memory."""

    schemes = ("soft",)

    async def _open(self) -> None:
        return None

    async def _close(self) -> None:
        return None


class _Soft(Driver):
    """A probe whose device flags a value it cannot give (read() raises with the flags)."""

    kind = "soft-probe"
    faults = {
        "dry": Fault("dry", "the probe is dry: no value"),
    }

    def __init__(self, name: str) -> None:
        super().__init__(_Link(f"soft://{name}"), name=name)
        self.dry = False
        self.reads = 0

    @property
    def channels(self) -> Mapping[str, Channel]:
        return {}

    async def read(self) -> dict[str, Any]:
        self.reads += 1
        if self.dry:
            error = DeviceError(self.name, "no value: the probe is dry")
            error.reading = {"value": None, "dry": True}
            raise error
        return {"value": 1.0, "dry": False}

    async def safe_state(self) -> None:
        return None


async def test_a_refused_reading_keeps_its_flags_trips_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe = _Soft("probe")
    sup = StationSupervisor(
        "s",
        {"probe": probe},
        latch=Latch("s"),
        state=StationState(),
        monitors=[],
        poll_interval=0.02,
        reassert_interval=None,
    )
    assert [m.name for m in sup.monitors] == ["probe.dry"]
    caplog.set_level(logging.INFO, logger="safety.supervisor")
    async with sup:
        await sup.poll_once()
        assert not sup.latch.tripped
        probe.dry = True
        await wait_for(lambda: sup.latch.tripped, 5, "the probe.dry trip")
        seen = probe.reads
        await wait_for(lambda: probe.reads >= seen + 3, 5, "three more polls")
        record = sup.latch.trip_record
        assert record is not None and record.source == "probe.dry"
        assert record.reason == "probe.dry: probe.dry=True (the probe is dry: no value)"
        assert sup.state.view(prefer_measured=True)["probe.value"] is None  # never a stale value
        assert sup.read_failures["probe"] == 0 and sup.status()["partial_reads"]
        probe.dry = False
        await wait_for(lambda: not sup.partial_reads, 5, "a whole reading")
        await sup.reset("operator", "probe back in the liquid")
    texts = [r.getMessage() for r in caplog.records if r.name == "safety.supervisor"]
    assert sum("reads without a value" in t for t in texts) == 1  # once, not at every poll
    assert sum("gives a whole reading again" in t for t in texts) == 1
    failed = [r for r in caplog.records if "reading probe failed" in r.getMessage()]
    assert failed == []  # a refusal with the device's flags is no failed read


# ------------------------------------------------------------------ the wire, device side
def hotplate_writes(bench: SimulatedBench, since: float) -> list[tuple[float, int, list[int]]]:
    """(real time, register, values) of every write that reached the hotplate after ``since``."""
    return [
        (r.real_t, r.data["address"], list(r.data["values"]))
        for r in bench.world.wire.entries("hotplate")
        if r.real_t >= since and r.data.get("fc") in (6, 16)
    ]


_PUMP_LINE = re.compile(r"(\d*)([A-Z]{3})(.*)")


def actuating(bench: SimulatedBench, since: float) -> list[str]:
    """Every command after ``since`` that could make a device act: a hotplate write other than
    an enable of 0 or a watchdog feed, a pump RUN or setting, an enclosure light on."""
    out = [
        f"hotplate {reg}={values}"
        for _, reg, values in hotplate_writes(bench, since)
        if not (reg in (2, 3) and values == [0]) and reg != 4
    ]
    for r in bench.world.wire.entries("pumps"):
        m = _PUMP_LINE.fullmatch(str(r.data).replace(" ", "").upper())
        if (
            r.real_t >= since
            and m
            and (m[2] == "RUN" or (m[2] in ("RAT", "VOL", "DIR", "DIA", "CLD") and m[3]))
        ):
            out.append(f"pumps {r.data}")
    for r in bench.world.wire.entries("enclosure"):
        if r.real_t >= since and isinstance(r.data, dict) and (r.data.get("light") or {}).get("on"):
            out.append(f"enclosure {r.data}")
    return out


def safe_state_seen(bench: SimulatedBench, since: float, pumps: tuple[str, ...]) -> float | None:
    """Real time the first safe-state command reached a device after ``since`` once every
    device got its own (hotplate enables 0, STP to every pump), else None."""
    hp = [t for t, reg, values in hotplate_writes(bench, since) if reg in (2, 3) and values == [0]]
    stp = {}
    for r in bench.world.wire.entries("pumps"):
        m = _PUMP_LINE.fullmatch(str(r.data).replace(" ", "").upper())
        if r.real_t >= since and m and m[2] == "STP":
            stp.setdefault(int(m[1] or 0), r.real_t)
    if len(hp) < 2 or len(stp) < len(pumps):
        return None
    return min([*hp, *stp.values()])


@contextlib.asynccontextmanager
async def reference_station(
    speed: float = SPEED,
) -> AsyncIterator[tuple[SimulatedBench, SafeStation]]:
    async with SimulatedLab(speed=speed) as lab:
        bench = lab.stations[0]
        async with open_station(
            bench.name,
            [s.as_dict() for s in bench.instruments()],
            reference_envelope(),
            clock=bench.world.clock.now,
            supervisor_options={
                "device_time_scale": speed,
                "poll_interval": 0.05,
                "safe_timeout": 2.0,
            },
        ) as station:
            try:
                yield bench, station
            finally:
                bench.world.faults.clear()


def _stall_the_watchdog_feeder(station: SafeStation) -> None:
    """labbridge's feeder of the hotplate's device watchdog stops (a stall, a hung task)."""
    _stall_the_watchdog_feeder_of(station.name)


async def _trip_and_check(
    bench: SimulatedBench,
    station: SafeStation,
    inject: Callable[[], None],
    source: str,
    shows: str,
) -> float:
    """Inject, wait for the trip, check it from the wire; returns the latency (real s)."""
    t_inject = time.monotonic()
    inject()
    await wait_for(lambda: station.tripped, 15, f"the {source} trip")
    record = station.latch.trip_record
    assert record is not None and record.source == source, record
    assert shows in record.reason, record.reason
    await wait_for(
        lambda: station.supervisor.trips and station.supervisor.trips[0].done, 5, "safe state"
    )
    await wait_for(
        lambda: safe_state_seen(bench, t_inject, PUMPS) is not None, 5, "safe state on the wire"
    )
    first = safe_state_seen(bench, t_inject, PUMPS)
    assert first is not None
    t_trip = station.supervisor.trips[0].t_detected
    # what the station does now: a command the guard refuses never reaches the wire
    with pytest.raises(StationTripped):
        await station.handle("hotplate", who="test").set_heater(True, 25.0)
    await asyncio.sleep(3 * 0.05 + 0.2)  # a few poll periods and a re-assertion of the safe state
    assert actuating(bench, t_trip) == []
    return first - t_inject


async def _heat(station: SafeStation) -> None:
    hotplate = station.handle("hotplate", who="test")
    await hotplate.set_stirrer(True, 200)
    await hotplate.set_heater(True, 25.0)  # where the setpoint is (it may rise 10 degC/min)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kind",
    ["hotplate-overtemp", "hotplate-probe-fault", "watchdog", "pump-alarm", "stuck-heater"],
)
async def test_each_device_fault_trips_the_station_seen_from_the_wire(kind: str) -> None:
    async with reference_station() as (bench, station):
        world = bench.world
        await _heat(station)
        await station.handle("red", who="test").dispense(0.5, 0.2)  # 150 s: running at the trip
        await asyncio.sleep(0.2)
        assert not station.tripped, station.supervisor.last_results
        if kind == "hotplate-overtemp":  # the device's own over-temperature cut-out fires
            args = (lambda: world.faults.inject("hotplate-overtemp"), "hotplate.over-temperature")
            shows = "hotplate.over_temperature=True, hotplate.heater=True"
        elif kind == "hotplate-probe-fault":  # the liquid probe fails while heating
            args = (lambda: world.faults.inject("hotplate-probe-fault"), "hotplate.probe-fault")
            shows = "hotplate.probe_fault=True, hotplate.heater=True"
        elif kind == "watchdog":  # labbridge stops feeding the device's watchdog
            args = (lambda: _stall_the_watchdog_feeder(station), "hotplate.watchdog-tripped")
            shows = "hotplate.watchdog_tripped=True"
        elif kind == "pump-alarm":  # the red pump stalls mid-dispense
            args = (lambda: world.faults.inject("pump-alarm", pump="red", code="S"), "red.alarm")
            shows = "red.alarmed=True, red.alarm='S'"
        else:  # a stuck heater relay: the liquid goes over 80 degC
            with world.lock:
                world.vial.species_ml["red"] = 1.0
                world.hotplate.plate_c, world.hotplate.liquid_c = 110.0, 78.0
            args = (
                lambda: world.faults.inject("stuck-heater", temperature_c=150.0),
                "liquid-overtemp",
            )
            shows = "hotplate.liquid_c="
        t0 = time.monotonic()
        latency = await _trip_and_check(bench, station, args[0], args[1], shows)
        print(f"{kind}: injection -> first safe-state command on the wire {1e3 * latency:.0f} ms")
        if kind == "watchdog":  # the device fires its watchdog armed_s after the last write
            last = max(t for t, _, _ in hotplate_writes(bench, 0.0) if t < t0 + latency)
            fired = last + station.supervisor.armed_watchdog_s / SPEED
            print(
                f"  device watchdog fired -> safe state on the wire {1e3 * (t0 + latency - fired):.0f} ms"
            )
        if kind == "hotplate-probe-fault":
            # the liquid's temperature is unknown: the over-temperature threshold cannot clear,
            # so the station stays latched until the probe works again
            with pytest.raises(ResetRefused, match="liquid-overtemp"):
                await station.reset("operator:ada", "probe checked")
            world.faults.clear("hotplate-probe-fault")
        if kind == "pump-alarm":
            with pytest.raises(ResetRefused, match=r"red.alarm: red.alarmed=True"):
                await station.reset("operator:ada", "pump checked")
            world.faults.clear("pump-alarm")
        if kind in ("hotplate-overtemp", "watchdog", "pump-alarm", "hotplate-probe-fault"):
            world.faults.clear()
            await station.reset("operator:ada", "device checked; experiment discarded")
            assert not station.tripped


# ------------------------------------------------------------------------- buffer bench
@contextlib.asynccontextmanager
async def buffer_station(speed: float = 200.0) -> AsyncIterator[tuple[SimulatedBench, SafeStation]]:
    envelope = load_envelope(Path(BUFFER.envelope).read_text(), source=BUFFER.envelope)
    async with SimulatedLab(bench="buffer", speed=speed) as lab:
        bench = lab.stations[0]
        async with open_station(
            bench.name,
            [s.as_dict() for s in bench.instruments()],
            envelope,
            clock=bench.world.clock.now,
            supervisor_options={
                "device_time_scale": speed,
                "poll_interval": 0.05,
                "safe_timeout": 2.0,
            },
        ) as station:
            try:
                yield bench, station
            finally:
                bench.world.faults.clear()


@pytest.mark.timeout(60)
async def test_the_ph_probe_out_of_the_liquid_trips_only_while_it_must_be_in_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An empty beaker between experiments leaves the probe in the air: no trip, and one log
    line, not one per poll. While the stirrer turns (>= 20 mL in the beaker, the envelope's
    rule) the probe out of the liquid trips the station (ph.not-immersed, narrowed by the
    buffer envelope's ``while``)."""
    caplog.set_level(logging.INFO)
    async with buffer_station() as (bench, station):
        sup = station.supervisor
        assert "ph.not-immersed" in [m.name for m in sup.monitors]
        await asyncio.sleep(10 * 0.05)  # ten poll periods with an empty beaker
        assert not station.tripped, sup.last_results
        view = station.state.view(prefer_measured=True)
        assert view["ph.not_immersed"] is True and view["ph.ph"] is None
        assert sup.check()["ph.not-immersed"].cleared  # the stirrer is off
        water = station.handle("water", who="test")
        await water.dispense(40.0, 30.0)
        await water.wait_until_stopped(timeout=30.0)
        await wait_for(
            lambda: station.state.view(prefer_measured=True).get("ph.not_immersed") is False,
            10,
            "the probe in the liquid",
        )
        await station.handle("hotplate", who="test").set_stirrer(True, 300)
        await asyncio.sleep(0.2)
        assert not station.tripped, sup.last_results
        latency = await _trip_and_check_buffer(bench, station)
        print(
            f"probe-out: injection -> first safe-state command on the wire {1e3 * latency:.0f} ms"
        )
    lines = [r for r in caplog.records if "ph reads without a value" in r.getMessage()]
    assert 1 <= len(lines) <= 3  # the guard's first read, the supervisor's, the probe-out
    assert all(r.levelno == logging.INFO for r in lines)
    noisy = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "not immersed" in r.getMessage()
    ]
    assert noisy == []


async def _trip_and_check_buffer(bench: SimulatedBench, station: SafeStation) -> float:
    t_inject = time.monotonic()
    bench.world.faults.inject("probe-out")
    await wait_for(lambda: station.tripped, 15, "the ph.not-immersed trip")
    record = station.latch.trip_record
    assert record is not None and record.source == "ph.not-immersed", record
    assert "ph.not_immersed=True, hotplate.stirrer=True" in record.reason
    pumps = ("acid", "base", "water", "waste")
    await wait_for(lambda: safe_state_seen(bench, t_inject, pumps) is not None, 5, "safe state")
    first = safe_state_seen(bench, t_inject, pumps)
    assert first is not None
    t_trip = station.supervisor.trips[0].t_detected
    await asyncio.sleep(0.3)
    assert actuating(bench, t_trip) == []
    assert bench.world.hotplate.stirrer_enabled is False
    return first - t_inject


@pytest.mark.timeout(60)
async def test_an_overloaded_balance_trips_the_station() -> None:
    async with buffer_station() as (bench, station):
        await asyncio.sleep(5 * 0.05)
        assert not station.tripped, station.supervisor.last_results
        t_inject = time.monotonic()
        bench.world.faults.inject("balance-overload", mass_g=250.0)
        await wait_for(lambda: station.tripped, 15, "the balance.overload trip")
        record = station.latch.trip_record
        assert record is not None and record.source == "balance.overload", record
        pumps = ("acid", "base", "water", "waste")
        await wait_for(lambda: safe_state_seen(bench, t_inject, pumps) is not None, 5, "safe state")
        await asyncio.sleep(0.3)
        assert actuating(bench, station.supervisor.trips[0].t_detected) == []
        bench.world.faults.clear("balance-overload")
        await wait_for(lambda: station.supervisor.check()["balance.overload"].cleared, 5, "cleared")
        await station.reset("operator:ada", "load taken off the pan")


# ---------------------------------------------------------------------- campaign level
@pytest.mark.timeout(180)
async def test_a_watchdog_trip_mid_hold_never_yields_a_verified_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 12's defect at campaign level: the hotplate's own watchdog switched heating off in
    the middle of a hold (labbridge's feeder stalled) and the results were stored done and
    verified with the liquid 20-50 degC below its setpoint. Now the first experiment runs
    normally (its liquid near the setpoint: that check passes), the second one's hold sees the
    heater go off, the station trips, the experiment fails there, and from the moment the
    device's bit is seen nothing actuating reaches the wire."""
    import dataclasses

    from bridge.campaigns import lab_clock
    from bridge.labconfig import load_lab
    from bridge.simbench import sim_lab_yaml
    from loops.campaign import CampaignRunner
    from loops.journal import AsyncJournal, Journal
    from loops.program import load_program
    from loops.setup import REFERENCE_SETUP, load_setup
    from loops.stations import LocalStation, StationActor

    speed = 200.0
    base = load_program(
        Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
    )
    params = tuple(  # holds longer than the device watchdog (300 device s here): it fires mid-hold
        dataclasses.replace(p, low=420, high=600) if p.name == "hold_s" else p
        for p in base.parameters
    )
    program = dataclasses.replace(
        base,
        parameters=params,
        budget=dataclasses.replace(base.budget, experiments=2),
        stop=dataclasses.replace(base.stop, target=None, no_improvement=None),
        initial_points=2,
    )
    events: list[dict[str, Any]] = []
    async with SimulatedLab(stations=1, speed=speed) as sim:
        bench = sim.stations[0]
        world = bench.world
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        clock, now = lab_clock(lab)
        st = lab.stations["bench-a"]
        for key, value in st.env.items():
            monkeypatch.setenv(key, value)
        seen: dict[str, float] = {}

        def on_event(event: dict[str, Any]) -> None:
            events.append(event)
            if (
                event["event"] == "started"
                and len([e for e in events if e["event"] == "started"]) == 2
            ):
                _stall_the_watchdog_feeder_of("bench-a")  # the second experiment's feeder stalls

        async def watch_the_device() -> None:  # the device's side: when its bit is first seen
            while "bit" not in seen:
                with world.lock:
                    if world.hotplate.watchdog_tripped:
                        seen["bit"] = time.monotonic()
                await asyncio.sleep(0.005)

        async with await AsyncJournal.open(lab.store) as journal:
            actor = StationActor(
                "bench-a",
                list(st.instruments),
                st.envelope_text,
                clock=clock,
                # the watchdog armed as tight as it was when the issue saw it fire mid-hold
                supervisor_options={**st.supervisor, "min_feed_interval_s": 0.5},
                journal=journal,
                verification={"enabled": True},
            )
            station = LocalStation(actor)
            assert (await station.call(StationActor.start))["open"]
            watcher = asyncio.create_task(watch_the_device())
            try:
                setup = load_setup(REFERENCE_SETUP)
                await station.call(StationActor.run_setup, setup.recipe.as_dict(), list(setup.keep))
                runner = CampaignRunner(
                    program,
                    journal,
                    {"bench-a": station},
                    campaign_id="wd",
                    clock_now=now,
                    on_event=on_event,
                )
                summary = await runner.run()
                status = await station.call(StationActor.status)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await station.call(StationActor.stop)
        assert "bit" in seen, "the device's watchdog never fired"
        assert status["tripped"] and status["latched"], status
        assert actuating(bench, seen["bit"]) == []
        safe = [(reg, v) for t, reg, v in hotplate_writes(bench, seen["bit"]) if reg in (2, 3)]
        assert (2, [0]) in safe and (3, [0]) in safe
    assert summary.counts["done"] == 1 and summary.counts["failed"] == 1, summary.counts
    j = Journal(lab.store)
    try:
        first, second = j.experiments("wd")
        assert first.state == "done" and first.result is not None
        liquid = first.result["verification"]["checks"]["liquid at setpoint"]
        assert liquid["ok"] is True, liquid  # a normal run passes the commanded-vs-measured check
        assert second.state == "failed" and second.verified is not True and second.objective is None
        hold = next(i for i, s in enumerate(second.recipe["steps"]) if s["kind"] == "hold")
        assert second.step == hold, (second.step, second.reason)  # it failed in its hold
        assert second.reason is not None and (
            "HoldBroken" in second.reason or "hotplate.watchdog-tripped" in second.reason
        ), second.reason
        print(f"second experiment: {second.reason}")
        assert [e.id for e in j.experiments("wd") if e.state == "done"] == [first.id]
    finally:
        j.close()


def _stall_the_watchdog_feeder_of(station: str) -> None:
    name = f"supervisor-{station}-watchdog-feed-hotplate"
    (feeder,) = [t for t in asyncio.all_tasks() if t.get_name() == name]
    feeder.cancel()


def test_labbridge_check_names_a_fault_setting_no_driver_declares(tmp_path: Path) -> None:
    from bridge.labconfig import load_lab
    from safety.envelopeload import REFERENCE_BENCH

    root = Path(__file__).resolve().parents[1]
    own = tmp_path / "envelope.yaml"
    own.write_text(
        REFERENCE_BENCH.read_text()
        + "  - name: red.alarm\n    disabled: a pump that stalls is fine here\n"
        + "  - name: hotplate.watchdog\n    disabled: typo\n"
    )
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        (root / "examples" / "lab-hardware.yaml")
        .read_text()
        .replace("envelope: reference", f"envelope: {own}")
    )
    (problem,) = load_lab(lab).check()
    assert problem.startswith(f"{own}:")
    assert (
        "monitors[6].name: 'hotplate.watchdog' is not a fault hotplate's driver declares" in problem
    )
    assert (
        "(known: hotplate.watchdog-tripped, hotplate.over-temperature, hotplate.probe-fault)"
        in problem
    )
