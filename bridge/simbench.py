"""The simulated-bench entry point: the one runtime module allowed to import ``simulators``.

``labbridge sim`` starts a simulated lab on loopback and runs one experiment
on each station behind the safety layer (every command through the guard,
the recipe dry-run first, the station supervised by monitors), over the real
drivers and wire protocols: light on, dispense red/green/blue, stir, heat as
fast as the envelope's setpoint rise limit allows, hold, measure the colour,
take a picture, drain, safe state. It writes a run folder with the readings
(JSON lines) and the camera frames.

Until the closed loop (issue 4) lands this is one fixed experiment, not an
optimised campaign.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bridge.labconfig import LabConfig, load_lab
from loops.recipe import ramp_setpoint
from safety import (
    Command,
    EStop,
    SafeStation,
    SafetyError,
    install_signal_handlers,
    open_station,
    reference_envelope,
)
from simulators.bench import SimulatedBench, SimulatedLab

log = logging.getLogger(__name__)


@dataclass
class TourRecipe:
    """The fixed demo experiment, in SI-ish units."""

    red_ml: float = 0.6
    green_ml: float = 0.3
    blue_ml: float = 0.5
    rate_ml_min: float = 10.0
    temperature_c: float = 60.0
    stirrer_rpm: int = 300
    hold_s: float = 120.0
    drain_rate_ml_min: float = 20.0


class Progress:
    """A one-line progress bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:5.1f}s {what}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def open_sim_station(bench: SimulatedBench, speed: float) -> Any:
    """``open_station`` for a simulated bench: the guard on the simulated clock, the
    device watchdog paced for it, the reference envelope and monitors."""
    return open_station(
        bench.name,
        [spec.as_dict() for spec in bench.instruments()],
        reference_envelope(),
        clock=bench.world.clock.now,
        supervisor_options={"device_time_scale": speed, "poll_interval": 0.1},
    )


async def run_experiment(
    bench: SimulatedBench, station: SafeStation, recipe: TourRecipe, out: Path, progress: Progress
) -> dict[str, Any]:
    """One experiment on one station through the safety layer; returns the result record."""
    clock = bench.world.clock
    who = "labbridge-sim"
    progress.step(
        f"{bench.name}: {len(station.instruments)} instruments connected behind the guard"
    )
    h = {name: station.handle(name, who=who) for name in station.instruments}
    await station.guard.begin_experiment(who=who)
    await h["enclosure"].set_light(True, 0.8)
    dispense = {"red": recipe.red_ml, "green": recipe.green_ml, "blue": recipe.blue_ml}
    plan = [
        Command(f, "dispense", {"volume_ml": v, "rate_ml_min": recipe.rate_ml_min}, who)
        for f, v in dispense.items()
    ]
    report = station.dry_run(plan)
    if not report.ok:
        raise SafetyError("; ".join(f"step {v.step}: {v.reason}" for v in report.violations))
    for fluid, volume in dispense.items():
        await h[fluid].dispense(volume, recipe.rate_ml_min)
    timeout = clock.real_seconds(60.0 * max(dispense.values()) / recipe.rate_ml_min + 30.0) + 5.0
    for fluid in dispense:
        await h[fluid].wait_until_stopped(timeout=timeout)
    progress.step(f"{bench.name}: dispensed {sum(dispense.values()):.2f} mL")
    await h["hotplate"].set_stirrer(True, recipe.stirrer_rpm)
    await ramp_setpoint(station, recipe.temperature_c, who=who, clock_sleep=clock.sleep)
    await clock.sleep(recipe.hold_s)
    plate = await h["hotplate"].read()
    progress.step(f"{bench.name}: held {recipe.hold_s:.0f} s, liquid {plate['liquid_c']:.1f} degC")
    colour = await h["color"].measure()
    frame = await h["camera"].capture()
    image_path = _save_frame(frame, out / bench.name)
    progress.step(f"{bench.name}: colour r={colour.red} g={colour.green} b={colour.blue}")
    await h["hotplate"].set_heater(False)
    await h["hotplate"].set_stirrer(False)
    total = sum(dispense.values()) + 0.2
    await h["waste"].withdraw(total, recipe.drain_rate_ml_min)
    await h["waste"].wait_until_stopped(
        timeout=clock.real_seconds(60.0 * total / recipe.drain_rate_ml_min + 30.0) + 5.0
    )
    progress.step(f"{bench.name}: drained, safe state")
    record = {
        "station": bench.name,
        "recipe": recipe.__dict__,
        "hotplate": plate,
        "colour": {
            "red": colour.red,
            "green": colour.green,
            "blue": colour.blue,
            "clear": colour.clear,
            "status": colour.status,
        },
        "image": image_path.name,
        "safety": {
            "verdicts": len(station.audit.records()),
            "refused": len(station.audit.records(allowed=False)),
            "tripped": station.tripped,
        },
        "world": _jsonable(bench.world.snapshot()),
    }
    return record


def _save_frame(frame: Any, stem: Path) -> Path:
    """Keep the frame as the camera sent it (JPEG bytes), else the raw pixels (.npy)."""
    if getattr(frame, "encoded", None):
        path = stem.with_suffix(".jpg")
        path.write_bytes(frame.encoded)
    else:
        path = stem.with_suffix(".npy")
        np.save(path, frame.image)
    return path


def _report_estop(report: Any, main: asyncio.Task[Any]) -> None:
    summary = report.summary() if report is not None else "e-stop failed: see the log"
    print(f"\ne-stop: {summary}", file=sys.stderr)
    main.cancel()


def _cancel_on_signals() -> None:
    """SIGINT/SIGTERM cancel the current task (outside the experiment: set-up, keep-running)."""
    task = asyncio.current_task()
    if task is None:
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not possible off the main thread or on Windows: the default handling stays
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, task.cancel)


def sim_lab_yaml(lab: SimulatedLab, store: Path, *, bridge_id: str = "labbridge-sim") -> str:
    """``lab.yaml`` text for a running simulated lab: its stations' instruments on loopback,
    the reference envelope, its clock (``simulated``) and the BLE bus address (``env``).

    ``labbridge run program.md --lab <it>`` from another process drives the same benches
    (CLOCK_MONOTONIC is system-wide, so ``sim_at_real`` defines the clock there too)."""
    speed = lab.clock.speed
    config = {
        "bridge_id": bridge_id,
        "store": str(store),
        "simulated": {"speed": speed, "sim_at_real": [lab.clock.now(), time.monotonic()]},
        "env": {"DBUS_SYSTEM_BUS_ADDRESS": lab.bluez.address if lab.bluez else ""},
        "stations": {
            bench.name: {
                "envelope": "reference",
                "supervisor": {"device_time_scale": speed, "poll_interval": 0.1},
                "instruments": [spec.as_dict() for spec in bench.instruments()],
            }
            for bench in lab.stations
        },
    }
    header = "# A simulated lab on loopback, written by labbridge (valid while it runs)\n"
    return header + yaml.safe_dump(config, sort_keys=False)


@contextlib.asynccontextmanager
async def simulated_lab(
    *,
    stations: int,
    speed: float,
    out: Path,
    store: Path | None = None,
    broker_url: str | None = None,
    embedded_broker: bool = False,
    fault: str | None = None,
) -> AsyncIterator[LabConfig]:
    """Start a simulated lab on loopback, write ``out/lab.yaml`` for it, yield it loaded.

    ``store``: the journal's path (default ``out/journal.db``). The simulators run
    in this process until the block exits.
    """
    out.mkdir(parents=True, exist_ok=True)
    lab = SimulatedLab(
        stations=stations,
        speed=speed,
        broker_url=broker_url,
        prefer_broker="embedded" if embedded_broker else "mosquitto",
    )
    async with lab:
        if fault:
            for bench in lab.stations:
                bench.inject_fault(fault)
        path = out / "lab.yaml"
        path.write_text(sim_lab_yaml(lab, (store or out / "journal.db").resolve()))
        yield load_lab(path)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=float))


async def sim_tour(
    *,
    stations: int = 1,
    speed: float = 20.0,
    out: Path,
    broker_url: str | None = None,
    embedded_broker: bool = False,
    fault: str | None = None,
    keep_running: bool = False,
) -> list[dict[str, Any]]:
    """Start a simulated lab and run the demo experiment on every station concurrently.

    During the experiment SIGINT/SIGTERM e-stop every station (latched, safe
    state, report printed) and stop the run; before and after it (set-up,
    ``--keep-running``) they cancel the run. Either way every simulator stops.
    """
    _cancel_on_signals()
    out.mkdir(parents=True, exist_ok=True)
    recipe = TourRecipe()
    progress = Progress(total=5 * stations)
    lab = SimulatedLab(
        stations=stations,
        speed=speed,
        broker_url=broker_url,
        prefer_broker="embedded" if embedded_broker else "mosquitto",
    )
    async with lab:
        (out / "lab.yaml").write_text(sim_lab_yaml(lab, (out / "journal.db").resolve()))
        if fault:
            for bench in lab.stations:
                bench.inject_fault(fault)
        async with contextlib.AsyncExitStack() as stack:
            safe = [
                await stack.enter_async_context(open_sim_station(bench, speed))
                for bench in lab.stations
            ]
            # SIGINT/SIGTERM: e-stop every station (latched, safe state), then stop the run.
            main = asyncio.current_task()
            assert main is not None
            handlers = install_signal_handlers(
                asyncio.get_running_loop(),
                EStop({st.name: st.supervisor for st in safe}),
                on_done=lambda report: _report_estop(report, main),
            )
            try:
                results = await asyncio.gather(
                    *(
                        run_experiment(bench, st, recipe, out, progress)
                        for bench, st in zip(lab.stations, safe, strict=True)
                    )
                )
            finally:
                handlers.remove()
                _cancel_on_signals()
        with (out / "results.jsonl").open("a") as fh:
            for rec in results:
                fh.write(json.dumps(rec) + "\n")
        if keep_running:
            print(
                f"simulated lab running; lab config in {out / 'lab.yaml'} (labbridge run PROGRAM "
                f"--lab {out / 'lab.yaml'}); to reach the BLE sensors "
                f"from another process: export DBUS_SYSTEM_BUS_ADDRESS={lab.bluez.address if lab.bluez else ''}"
                "; Ctrl-C to stop",
                file=sys.stderr,
            )
            await asyncio.Event().wait()
    return list(results)
