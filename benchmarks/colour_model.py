"""The colour-match objective on the simulator's physics, without the wire.

:class:`ColourMatchObjective` turns a proposal of ``examples/color-match/program.md``
(``red_ml``, ``green_ml``, ``blue_ml``, ``temperature_c``, ``hold_s``) into the
recipe the campaign would run (:func:`loops.recipe.build_recipe`: the program's
plan bound to the proposal and its ``fixed`` values) and runs THAT recipe with
the campaign's own runner (:func:`loops.recipe.run_recipe`, its ramp, waits and
compute functions included) on a :class:`BenchModel`: the reference bench's
instruments as in-memory handles acting directly on a fresh
:class:`simulators.world.StationWorld` driven by a manual clock. No pty,
Modbus, BLE, MQTT or camera, no guard (every command is assumed allowed) and
no real-time sleeping, so one experiment takes milliseconds of CPU instead of
minutes of (simulated) bench time, and there is no second copy of the
experiment to keep in step with the program.

What the handles do: the pumps and the hotplate are the shared ones of
:mod:`benchmarks.bench_model` (see there); the colour sensor's ``measure``
integrates (100 ms by default) and returns counts with noise; light and camera
have no effect on the colour or the time (a capture has no image here).

Bench time. An experiment's :attr:`ColourResult.duration_s` is the simulated
time from its first to its last step plus the recipe's ``wait`` steps once
more (the cool-down the station's next experiment waits for), i.e. how long
the experiment keeps one station busy. Each experiment gets a fresh world
(empty vial, plate at ambient), which is what the cool-down and the paced
ramp are there to make true on a real station.

Differences from the full stack (why a point's ΔE00 here and through the wire
differ by a few tenths): wire latencies (ms) are not simulated, a pump's wait
polls every bench second, and the sensor noise comes from a different random
stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from benchmarks.bench_model import ManualClock, WorldModel, run_model_recipe
from loops.plan import Recipe
from loops.program import Program, load_program
from loops.recipe import MeasurementError, build_recipe
from simulators.world import StationWorld

__all__ = [
    "DEFAULT_PROGRAM",
    "REFERENCE_POINT",
    "BenchModel",
    "ColourMatchObjective",
    "ColourResult",
    "ManualClock",
]

#: the colour-match campaign this objective reads (target, constraints, fixed inputs)
DEFAULT_PROGRAM = Path(__file__).resolve().parents[1] / "examples" / "color-match" / "program.md"
#: the point whose colour program.md's ``target_lab`` was measured at through the whole stack
REFERENCE_POINT: dict[str, float | int] = {
    "red_ml": 0.70,
    "green_ml": 0.10,
    "blue_ml": 0.75,
    "temperature_c": 50.0,
    "hold_s": 120,
}

SENSOR_DEFAULT_MS = 100  # the colour-sensor driver's default integration time
SENSOR_STATUS = {0: "ok", 1: "saturated", 2: "dark"}


@dataclass(frozen=True)
class ColourResult:
    """One simulated experiment.

    ``status``: ``"ok"``, or ``"failed"`` when the colour sensor read
    saturated/dark (the runner raises :class:`~loops.recipe.MeasurementError`
    there and the campaign tells the optimizer ``failed``); ``delta_e`` is then
    None. ``duration_s``: bench seconds the experiment keeps its station busy,
    cool-down for the next one included; ``steps_s``: seconds per step kind.
    """

    delta_e: float | None
    lab: tuple[float, float, float] | None
    duration_s: float
    status: Literal["ok", "failed"]
    liquid_c: float
    steps_s: dict[str, float] = field(default_factory=dict)


class ColourMatchObjective:
    """ΔE00 to the program's target and the bench time of one experiment, on the physics.

    ``program``: a loaded :class:`~loops.program.Program` or a path to a
    ``program.md`` (default: the colour-match example). Call it with a proposal
    and a seed (the sensor-noise stream of that experiment).
    """

    def __init__(self, program: Program | str | Path = DEFAULT_PROGRAM) -> None:
        self.program = program if isinstance(program, Program) else load_program(Path(program))
        if self.program.objective.measure not in self.program.plan.measures:
            raise ValueError(f"{self.program.source}: the recipe does not measure the objective")
        if self.program.stop.target is None:
            raise ValueError(f"{self.program.source}: stop.target is missing")
        self.target: float = self.program.stop.target

    @property
    def space(self) -> dict[str, tuple[float, float, str]]:
        """The optimizer's space spec: ``{name: (low, high, "float"|"int")}``."""
        return {p.name: (p.low, p.high, p.type) for p in self.program.parameters}

    def feasible(self, params: Mapping[str, Any]) -> bool:
        """The program's constraints (``Program.feasible``), as the optimizer's ``constraints=``."""
        return self.program.feasible(params)[0]

    def recipe(self, params: Mapping[str, Any]) -> Recipe:
        """The recipe the campaign would run for ``params`` (RecipeError names a bad parameter)."""
        ok, reasons = self.program.feasible(params)
        if not ok:
            raise ValueError(f"infeasible proposal {dict(params)}: {'; '.join(reasons)}")
        return build_recipe(self.program, params)

    def __call__(self, params: Mapping[str, Any], seed: int = 0) -> ColourResult:
        recipe = self.recipe(params)
        return asyncio.run(run_on_world(recipe, self.program.objective.measure, seed=seed))


class BenchModel(WorldModel):
    """The reference bench's instruments over one :class:`StationWorld` (the shared pumps
    and hotplate of :class:`~benchmarks.bench_model.WorldModel`, plus the colour sensor,
    the enclosure's light and the camera)."""

    def __init__(self, world: StationWorld, clock: ManualClock) -> None:
        kinds = {
            **{f: "pump" for f in ("red", "green", "blue", "waste")},
            "hotplate": "hotplate",
            "color": "sensor",
            "enclosure": "quiet",
            "camera": "quiet",
        }
        super().__init__(world, clock, kinds)
        self.world: StationWorld = world

    # colour sensor
    async def _sensor_measure(self, name: str, integration_ms: int | None = None) -> dict[str, Any]:
        ms = int(integration_ms or SENSOR_DEFAULT_MS)
        self.clock.advance(ms / 1000.0)  # the sensor integrates, then notifies
        r, g, b, c, status = self.world.sensor_counts(ms)
        return {
            "red": r,
            "green": g,
            "blue": b,
            "clear": c,
            "status": SENSOR_STATUS[status],
            "integration_ms": ms,
        }

    # light and camera: no effect on the colour or the bench time here
    async def _quiet_set_light(self, name: str, on: bool, intensity: float | None = None) -> None:
        return None

    async def _quiet_capture(self, name: str, timeout: float | None = None) -> None:
        return None


async def run_on_world(recipe: Recipe, measure: str, *, seed: int = 0) -> ColourResult:
    """Run ``recipe`` with the campaign's runner on a fresh world; see the module docstring."""
    clock = ManualClock()
    world = StationWorld("bench-model", clock=clock, seed=seed)
    model = BenchModel(world, clock)
    steps_s: dict[str, float] = {}
    status: Literal["ok", "failed"] = "ok"
    measurements: dict[str, Any] = {}
    try:
        measurements = (await run_model_recipe(recipe, model, steps_s=steps_s)).result.measurements
    except MeasurementError:
        status = "failed"  # saturated or dark: the campaign tells the optimizer "failed"
    waits = Recipe(tuple(s for s in recipe.steps if s.kind == "wait"))
    if waits.steps:  # what the station's next experiment waits for first (the cool-down)
        t0 = clock.now()
        await run_model_recipe(waits, model)
        steps_s["next experiment's wait"] = clock.now() - t0
    lab = measurements.get("lab")
    return ColourResult(
        measurements.get(measure) if status == "ok" else None,
        (float(lab[0]), float(lab[1]), float(lab[2])) if lab else None,
        clock.now(),
        status,
        float(measurements.get("liquid_c", world.hotplate.liquid_c)),
        steps_s,
    )
