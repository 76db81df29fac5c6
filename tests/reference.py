"""The reference bench's instruments as the safety layer sees them without hardware: each
instrument's driver class (its declared commands), and the layout a dry run checks against;
what reached a simulated reference bench, read from its wire log."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.campaigns import lab_clock
from bridge.labconfig import LabConfig, load_lab
from bridge.simbench import sim_lab_yaml
from instruments.drivers.camera import Camera
from instruments.drivers.color_sensor import ColorSensor
from instruments.drivers.enclosure import Enclosure
from instruments.drivers.hotplate import Hotplate
from instruments.drivers.syringe_pump import SyringePump
from loops.journal import AsyncJournal, Journal
from loops.stations import LocalStation, StationActor
from safety.effects import Layout
from safety.envelope import Envelope
from simulators.bench import SimulatedBench, SimulatedLab

#: instrument name -> driver class, as on the reference bench
DRIVERS: dict[str, Any] = {
    "red": SyringePump,
    "green": SyringePump,
    "blue": SyringePump,
    "waste": SyringePump,
    "hotplate": Hotplate,
    "color": ColorSensor,
    "enclosure": Enclosure,
    "camera": Camera,
}


def layout(env: Envelope, drivers: dict[str, Any] = DRIVERS) -> Layout:
    """The station's layout from the driver classes' declarations and the envelope's vessels."""
    return Layout.of(drivers, env.vessels)


def relaxed_staleness(envelope_text: str) -> str:
    """An envelope's text with every staleness/heartbeat limit at 10 s (for tests where a
    monitor tripping on a starved poll of a loaded 2-core machine is not what is tested)."""
    text, n = re.subn(r"max_age_s: \d+(?:\.\d+)?\n", "max_age_s: 10\n", envelope_text)
    assert n, "the envelope has no max_age_s to relax"
    return text


def actuating(bench: SimulatedBench, since: float) -> list[tuple[float, Any]]:
    """(monotonic time, command) of every actuating command that reached the bench after
    ``since``: a pump RUN (``"<address>RUN"``), a hotplate setpoint or stirrer speed, a
    heater/stirrer enable (``(register, values)``)."""
    out: list[tuple[float, Any]] = []
    for r in bench.world.wire.entries("pumps"):
        if r.real_t > since and not r.note and str(r.data).strip().endswith("RUN"):
            out.append((r.real_t, r.data))
    for r in bench.world.wire.entries("hotplate"):
        data = r.data if isinstance(r.data, dict) else {}
        if r.real_t <= since or data.get("fc") not in (6, 16):
            continue
        address, values = data.get("address"), list(data.get("values") or [])
        if address in (0, 1) or (address in (2, 3) and 1 in values):
            out.append((r.real_t, (address, values)))
    return sorted(out, key=lambda e: e[0])


@dataclass
class LocalBench:
    """One simulated colour bench, its lab config, the journal and the station actor, all in
    this process (no Ray): :func:`local_bench`."""

    sim: SimulatedLab
    lab: LabConfig
    journal: AsyncJournal
    station: LocalStation
    now: Any  # the lab's clock (lab_clock)


@contextlib.asynccontextmanager
async def local_bench(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    speed: float = 500.0,
    relaxed: bool = False,
    stopped: dict[str, Any] | None = None,
) -> AsyncIterator[LocalBench]:
    """A started station actor on a simulated colour bench, with verification off;
    ``relaxed``: staleness limits of 10 s (:func:`relaxed_staleness`); ``stopped``: filled
    with the station's status once it has stopped, on the way out."""
    async with SimulatedLab(stations=1, speed=speed) as sim:
        path = tmp_path / "lab.yaml"
        path.write_text(sim_lab_yaml(sim, tmp_path / "journal.db"))
        lab = load_lab(path)
        clock, now = lab_clock(lab)
        st = lab.stations["bench-a"]
        for key, value in st.env.items():  # what a station's own process would get
            monkeypatch.setenv(key, value)
        async with await AsyncJournal.open(lab.store) as journal:
            actor = StationActor(
                "bench-a",
                list(st.instruments),
                relaxed_staleness(st.envelope_text) if relaxed else st.envelope_text,
                clock=clock,
                supervisor_options=st.supervisor,
                journal=journal,
                verification={"enabled": False},
            )
            station = LocalStation(actor)
            assert (await station.call(StationActor.start))["open"]
            try:
                yield LocalBench(sim, lab, journal, station, now)
            finally:
                status = await station.call(StationActor.stop)
                if stopped is not None:
                    stopped.update(status)


class ObservedJournal:
    """The journal link of a station actor, observed: when each budget write with a
    reservation was made (``time.monotonic``, what it reserved). The writes go through to
    the real journal."""

    def __init__(self, link: AsyncJournal) -> None:
        self.link = link
        self.reservations: list[tuple[float, list[Any]]] = []

    async def call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        out = await self.link.call(method, *args, **kwargs)
        if method is Journal.record_consumption and kwargs.get("reserve"):
            self.reservations.append((time.monotonic(), list(kwargs["reserve"])))
        return out
