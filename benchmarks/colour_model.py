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

What the handles do: a pump's ``dispense``/``withdraw`` starts it (4
significant digits, as the driver sends), ``wait_until_stopped`` polls it every
second of bench time (the real stack's real-time polls are seconds of bench
time at its speeds); the colour sensor's ``measure`` integrates
(100 ms by default) and returns counts with noise; the hotplate's
``set_heater``/``set_stirrer`` set its registers and ``read()`` reports plate
and liquid temperatures; light and camera have no effect on the colour or the
time (a capture has no image here).

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

from loops.plan import Recipe, Step
from loops.program import Program, load_program
from loops.recipe import MeasurementError, build_recipe, run_recipe
from simulators.clock import SimClock
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
POLL_S = 1.0  # a pump's wait polls at least this far apart (bench seconds): the real
#             stack's 0.05 s real-time polls are 5 bench seconds at 100x
SENSOR_STATUS = {0: "ok", 1: "saturated", 2: "dark"}
WAIT_LIMIT_S = 24 * 3600.0  # a wait that has not finished after a simulated day is a bug


class ManualClock(SimClock):
    """A :class:`SimClock` that only moves when told (:meth:`advance`); ``now()`` starts at 0."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self._t = 0.0

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> float:
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r} s")
        self._t += seconds
        return self._t


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


class _Verdict:
    allowed = True


class _Handle:
    """The calls of one instrument, acting on the world (see the module docstring)."""

    def __init__(self, model: BenchModel, name: str) -> None:
        self.model, self.name = model, name

    def __getattr__(self, command: str) -> Any:
        act = getattr(self.model, f"_{self.model.kinds[self.name]}_{command}", None)
        if act is None:
            raise AttributeError(f"the bench model cannot run {self.name}.{command}()")

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await act(self.name, *args, **kwargs)

        return call


class BenchModel:
    """The reference bench's instruments over one :class:`StationWorld`, for
    :func:`loops.recipe.run_recipe`: ``handle(name)`` and ``check(command)`` (always
    allowed) are what the runner uses of a station."""

    name = "bench-model"

    def __init__(self, world: StationWorld, clock: ManualClock) -> None:
        self.world, self.clock = world, clock
        self.kinds = {
            **{f: "pump" for f in ("red", "green", "blue", "waste")},
            "hotplate": "hotplate",
            "color": "sensor",
            "enclosure": "quiet",
            "camera": "quiet",
        }

    def handle(self, name: str, who: str = "model") -> _Handle:
        if name not in self.kinds:
            raise KeyError(f"the bench model has no instrument {name!r}")
        return _Handle(self, name)

    def check(self, command: Any) -> _Verdict:
        return _Verdict()

    async def sleep(self, seconds: float) -> None:
        self.clock.advance(max(0.0, float(seconds)))

    # pumps
    async def _pump_dispense(self, name: str, volume_ml: float, rate_ml_min: float) -> None:
        self._run(name, volume_ml, rate_ml_min, "INF")

    async def _pump_withdraw(self, name: str, volume_ml: float, rate_ml_min: float) -> None:
        self._run(name, volume_ml, rate_ml_min, "WDR")

    def _run(self, name: str, volume_ml: float, rate_ml_min: float, direction: str) -> None:
        world = self.world
        world.advance()
        with world.lock:
            pump = world.pump_by_fluid(name)
            pump.volume_ml = float(f"{volume_ml:.4g}")  # the driver sends 4 digits
            pump.rate_ml_min = float(f"{rate_ml_min:.4g}")
            pump.direction = direction
            pump.remaining_ml = pump.volume_ml
            if direction == "INF":
                pump.dispensed_inf_ml = 0.0
            else:
                pump.dispensed_wdr_ml = 0.0
            pump.phase = "running"

    async def _pump_wait_until_stopped(
        self, name: str, timeout: float = 60.0, poll_interval: float = 0.1
    ) -> str:
        waited = 0.0
        period = max(float(poll_interval), POLL_S)
        self.world.advance()
        while self.world.pump_by_fluid(name).phase == "running":
            if waited >= WAIT_LIMIT_S:
                raise TimeoutError(f"{name} still running after {waited:g} simulated s")
            self.clock.advance(period)
            self.world.advance()
            waited += period
        return "stopped"

    async def _pump_read(self, name: str) -> dict[str, Any]:
        self.world.advance()
        pump = self.world.pump_by_fluid(name)
        return {
            "moving": pump.phase == "running",
            "infused_ml": pump.dispensed_inf_ml,
            "withdrawn_ml": pump.dispensed_wdr_ml,
        }

    # hotplate
    async def _hotplate_set_stirrer(self, name: str, on: bool, rpm: int | None = None) -> None:
        self.world.advance()
        with self.world.lock:
            if rpm is not None:
                self.world.hotplate.stirrer_setpoint_rpm = int(rpm)
            self.world.hotplate.stirrer_enabled = bool(on)

    async def _hotplate_set_heater(
        self, name: str, on: bool, setpoint_c: float | None = None
    ) -> None:
        self.world.advance()
        with self.world.lock:
            if setpoint_c is not None:
                self.world.hotplate.setpoint_c = round(float(setpoint_c), 1)
            self.world.hotplate.heater_enabled = bool(on)

    async def _hotplate_read(self, name: str) -> dict[str, Any]:
        self.world.advance()
        hp = self.world.hotplate
        return {"plate_c": round(hp.plate_c, 1), "liquid_c": round(hp.liquid_c, 1)}

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

    async def on_step(index: int, step: Step, phase: str, data: dict[str, Any]) -> None:
        if phase == "done":
            label = step.kind if step.kind != "call" else f"call {step['command']}"
            steps_s[label] = steps_s.get(label, 0.0) + float(data.get("duration_s", 0.0))

    status: Literal["ok", "failed"] = "ok"
    measurements: dict[str, Any] = {}
    try:
        result = await run_recipe(
            recipe,
            model,  # type: ignore[arg-type]
            clock_sleep=model.sleep,
            who="model",
            on_step=on_step,
            clock_now=clock.now,
        )
        measurements = result.measurements
    except MeasurementError:
        status = "failed"  # saturated or dark: the campaign tells the optimizer "failed"
    waits = Recipe(tuple(s for s in recipe.steps if s.kind == "wait"))
    if waits.steps:  # what the station's next experiment waits for first (the cool-down)
        t0 = clock.now()
        await run_recipe(waits, model, clock_sleep=model.sleep, who="model")  # type: ignore[arg-type]
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
