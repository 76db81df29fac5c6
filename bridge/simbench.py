"""The simulated-bench entry point: the one runtime module allowed to import ``simulators``.

``labbridge sim`` starts a simulated lab on loopback and runs one experiment
on each station through the real drivers over the real wire protocols:
light on, dispense red/green/blue, stir and heat, hold, measure the colour,
take a picture, drain, safe state. It writes a run folder with the readings
(JSON lines) and the camera frames.

Until the safety layer (issue 3) and the closed loop (issue 4) land, this is a
fixed experiment, not an optimised campaign; the drivers are used directly.
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

import instruments
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


@contextlib.asynccontextmanager
async def station_instruments(bench: SimulatedBench) -> AsyncIterator[dict[str, Any]]:
    """Connect every instrument of a station through ``instruments.connect`` (safe state on exit)."""
    async with contextlib.AsyncExitStack() as stack:
        handles: dict[str, Any] = {}
        for spec in bench.instruments():
            handles[spec.name] = await stack.enter_async_context(
                instruments.connect(spec.kind, spec.url, **spec.options)
            )
        yield handles


async def run_experiment(
    bench: SimulatedBench, recipe: TourRecipe, out: Path, progress: Progress
) -> dict[str, Any]:
    """One experiment on one station; returns the result record (also appended to results.jsonl)."""
    clock = bench.world.clock
    async with station_instruments(bench) as inst:
        progress.step(f"{bench.name}: connected {len(inst)} instruments")
        await inst["enclosure"].set_light(True, 0.8)
        dispense = {"red": recipe.red_ml, "green": recipe.green_ml, "blue": recipe.blue_ml}
        await asyncio.gather(
            *(inst[f].dispense(v, recipe.rate_ml_min) for f, v in dispense.items() if v > 0)
        )
        timeout = (
            clock.real_seconds(60.0 * max(dispense.values()) / recipe.rate_ml_min + 30.0) + 5.0
        )
        await asyncio.gather(*(inst[f].wait_until_stopped(timeout=timeout) for f in dispense))
        progress.step(f"{bench.name}: dispensed {sum(dispense.values()):.2f} mL")
        await inst["hotplate"].set_stirrer(True, recipe.stirrer_rpm)
        await inst["hotplate"].set_heater(True, recipe.temperature_c)
        await clock.sleep(recipe.hold_s)
        plate = await inst["hotplate"].read()
        progress.step(
            f"{bench.name}: held {recipe.hold_s:.0f} s, liquid {plate['liquid_c']:.1f} degC"
        )
        colour = await inst["color"].measure()
        frame = await inst["camera"].capture()
        image_path = _save_frame(frame, out / bench.name)
        progress.step(f"{bench.name}: colour r={colour.red} g={colour.green} b={colour.blue}")
        await inst["hotplate"].set_heater(False)
        await inst["hotplate"].set_stirrer(False)
        total = sum(dispense.values())
        await inst["waste"].withdraw(total + 0.2, 30.0)
        await inst["waste"].wait_until_stopped(
            timeout=clock.real_seconds(60.0 * (total + 0.2) / 30.0 + 30.0) + 5.0
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


def _cancel_on_sigterm() -> None:
    task = asyncio.current_task()
    if task is None:
        return
    with contextlib.suppress(
        NotImplementedError, RuntimeError, ValueError
    ):  # not main thread / Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


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

    SIGTERM (like Ctrl-C/SIGINT, which asyncio already handles) cancels the run:
    every instrument is put in its safe state and every simulator is stopped.
    """
    _cancel_on_sigterm()
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
        (out / "lab.json").write_text(json.dumps(lab.lab_config(), indent=2))
        if fault:
            for bench in lab.stations:
                bench.inject_fault(fault)
        results = await asyncio.gather(
            *(run_experiment(bench, recipe, out, progress) for bench in lab.stations)
        )
        with (out / "results.jsonl").open("a") as fh:
            for rec in results:
                fh.write(json.dumps(rec) + "\n")
        if keep_running:
            print(
                f"simulated lab running; lab config in {out / 'lab.json'}; to reach the BLE sensors "
                f"from another process: export DBUS_SYSTEM_BUS_ADDRESS={lab.bluez.address if lab.bluez else ''}"
                "; Ctrl-C to stop",
                file=sys.stderr,
            )
            await asyncio.Event().wait()
    return list(results)
