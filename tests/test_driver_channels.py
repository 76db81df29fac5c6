"""Every bundled driver declares the channels it has: each key its ``read()`` returns against
its simulator, each channel its commands set and each channel its faults name
(``Driver.channels``; ``labbridge check --program`` checks recipes' readings against them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

import instruments
from instruments.errors import InstrumentError
from instruments.registry import unopened
from safety.expr import parse
from simulators.bench import SimulatedLab

#: the bundled driver kinds, each on one of the two simulated benches
KINDS = {
    "colour": ("syringe-pump", "hotplate", "color-sensor", "enclosure", "camera"),
    "buffer": ("ph-meter", "balance"),
}


@pytest.fixture(params=sorted(KINDS))
async def bench(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Any]]:
    async with SimulatedLab(stations=1, speed=50.0, bench=request.param) as lab:
        yield request.param, lab.stations[0]


def test_the_bundled_drivers_are_all_here() -> None:
    bundled = {k for kinds in KINDS.values() for k in kinds}
    assert bundled <= set(instruments.available_drivers())
    assert len(bundled) == 7


def _declaration_problems(driver: Any) -> list[str]:
    """Channels a command sets or a fault names that ``channels`` does not declare."""
    declared = driver.channels
    problems = []
    for spec in driver.commands.values():
        problems += [
            f"{spec.name} sets {s.channel!r}, not declared"
            for s in spec.sets
            if s.channel not in declared or not declared[s.channel].settable
        ]
    for name, fault in driver.faults.items():
        names = parse(fault.when).names() | set(fault.show)
        problems += [f"fault {name} names {n!r}, not declared" for n in names - set(declared)]
    for name, ch in declared.items():
        if not ch.settable and not ch.readable:
            problems.append(f"{name} is neither set nor read")
        if ch.name != name or not ch.doc:
            problems.append(f"{name}: Channel({ch.name!r}) without its name or a doc")
    return problems


@pytest.mark.timeout(60)
async def test_read_returns_exactly_the_declared_readable_channels(
    bench: tuple[str, Any],
) -> None:
    name, station = bench
    seen = set()
    for spec in station.instruments():
        if spec.kind in seen:
            continue
        seen.add(spec.kind)
        async with instruments.connect(spec.kind, spec.url, **spec.options) as driver:
            try:
                reading = await driver.read()
            except InstrumentError as exc:  # a flagged value (a probe in no liquid): the rest
                reading = exc.reading
            assert reading, f"{spec.kind}: no reading"
            assert driver.reading_problems(reading) == [], spec.kind
            assert _declaration_problems(driver) == [], spec.kind
            described = driver.describe()["channels"]
            assert {n for n, c in described.items() if c["readable"]} == set(reading)
    assert seen >= set(KINDS[name])


def test_a_read_key_without_its_declaration_is_named() -> None:
    hotplate = unopened("hotplate", "modbus-tcp://127.0.0.1:1502")
    reading = {n: None for n, ch in hotplate.channels.items() if ch.readable}
    problems = hotplate.reading_problems({**reading, "plate_cc": 20.0, "heater": True})
    assert problems[0] == (
        "Hotplate.read() returns 'plate_cc', which channels does not declare "
        "(declare it: Channel('plate_cc', unit, kind, settable=False, doc=...))"
    )
    assert problems[1] == "Hotplate.read() returns 'heater', which channels declares readable=False"
    del reading["liquid_c"]
    assert hotplate.reading_problems(reading) == [
        "Hotplate.read() does not return 'liquid_c', which channels declares readable "
        "(a channel only a command sets: readable=False)"
    ]
