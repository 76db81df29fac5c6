"""The colour-match objective on the simulator's physics, without the wire.

:class:`ColourMatchObjective` turns a proposal of ``examples/color-match/program.md``
(``red_ml``, ``green_ml``, ``blue_ml``, ``temperature_c``, ``hold_s``) into the
recipe the campaign would run (:func:`loops.recipe.build_recipe`, the program's
``fixed`` inputs included) and executes that recipe's steps directly on a
fresh :class:`simulators.world.StationWorld` driven by a manual clock: no
pty, Modbus, BLE, MQTT or camera, no guard, and no real-time sleeping, so one
experiment takes ~10 ms of CPU instead of minutes of (simulated) bench time.

Each step advances the world the way the stack would
(:func:`loops.recipe.run_recipe` and :func:`loops.recipe.ramp_setpoint`):

* ``calibrate``/``measure``: the colour sensor integrates (100 ms by default)
  and returns counts with noise; ``measure`` normalises them by the
  ``calibrate`` counts of the empty vial (:func:`instruments.colour.counts_to_lab`)
  and takes ΔE00 to the program's ``target_lab``;
* ``dispense`` starts a pump, ``wait_pumps``/``drain`` poll every second until
  it stops (the runner's ``poll_s``);
* ``heat``: heater on at ``from_c``, then every 10 s the setpoint rises to the
  highest 0.1 °C step not above ``from_c + rise_per_min * elapsed`` (the
  runner's ramp), until it reaches ``setpoint_c``;
* ``hold`` waits; ``cool`` polls the plate every 5 s until it is below
  ``below_c``.

Bench time. An experiment's :attr:`ColourResult.duration_s` is the simulated
time from its first to its last step plus the cool-down the station's next
experiment waits for (its ``cool`` step), i.e. how long the experiment keeps
one station busy. Each experiment gets a fresh world (empty vial, plate at
ambient), which is what the ``cool`` step and the paced ramp are there to make
true on a real station.

Differences from the full stack (why a point's ΔE00 here and through the wire
differ by a few tenths): wire latencies (ms) are not simulated, and the sensor
noise comes from a different random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from instruments.colour import counts_to_lab, delta_e2000
from loops.program import Program, load_program
from loops.recipe import Recipe, Step, build_recipe
from simulators.clock import SimClock
from simulators.world import StationWorld

__all__ = [
    "DEFAULT_PROGRAM",
    "REFERENCE_POINT",
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
POLL_S = 1.0  # run_recipe's default pump polling period
RAMP_STEP_S = 10.0  # ramp_setpoint's default step
RAMP_RESOLUTION_C = 0.1  # ramp_setpoint's setpoint grid
COOL_POLL_S = 5.0  # the recipe runner's cool-step polling period
WAIT_LIMIT_S = 24 * 3600.0  # a step that has not finished after a simulated day is a bug


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
        target = self.program.objective.target_lab
        if target is None:
            raise ValueError(
                f"{self.program.source}: objective.target_lab is missing; the colour-match "
                "objective needs a target colour"
            )
        self.target_lab: tuple[float, float, float] = target
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
        return run_on_world(self.recipe(params), self.target_lab, seed=seed)


def _wait(world: StationWorld, clock: ManualClock, period: float, done: Callable[[], bool]) -> None:
    """Poll ``done`` every ``period`` simulated seconds (the runner's polling loops)."""
    waited = 0.0
    world.advance()
    while not done():
        if waited >= WAIT_LIMIT_S:
            raise TimeoutError(f"condition not reached after {waited:g} simulated s")
        clock.advance(period)
        world.advance()
        waited += period


def _plate_below(world: StationWorld, below_c: float) -> Callable[[], bool]:
    return lambda: world.hotplate.plate_c < below_c


def _pumps_stopped(world: StationWorld, fluids: list[str]) -> Callable[[], bool]:
    return lambda: all(world.pump_by_fluid(f).phase == "stopped" for f in fluids)


def _pump_run(world: StationWorld, fluid: str, volume_ml: float, rate: float, inf: bool) -> None:
    with world.lock:
        pump = world.pump_by_fluid(fluid)
        # the driver sends at most 4 significant digits
        pump.volume_ml = float(f"{volume_ml:.4g}")
        pump.rate_ml_min = float(f"{rate:.4g}")
        pump.direction = "INF" if inf else "WDR"
        pump.remaining_ml = pump.volume_ml
        pump.phase = "running"


def _ramp(world: StationWorld, clock: ManualClock, step: Step) -> None:
    """:func:`loops.recipe.ramp_setpoint`'s paced profile, the guard assumed to allow it."""
    target = round(float(step["setpoint_c"]), 6)  # as the runner: its grid is rounded so
    from_c, pace = step.get("from_c"), step.get("rise_per_min")
    hp = world.hotplate
    elapsed = 0.0
    sent: float | None = None
    while True:
        limit = target
        if from_c is not None and pace is not None:
            limit = min(target, from_c + pace * elapsed / 60.0)
        first = max(0, math.ceil((target - limit) / RAMP_RESOLUTION_C - 1e-9))
        best = round(target - first * RAMP_RESOLUTION_C, 6)
        if sent is None or best > sent:
            world.advance()
            with world.lock:
                hp.setpoint_c = best
                hp.heater_enabled = True
            sent = best
        if sent == target:
            return
        clock.advance(RAMP_STEP_S)
        elapsed += RAMP_STEP_S


def _sensor(world: StationWorld, clock: ManualClock, integration_ms: int | None) -> tuple[int, ...]:
    ms = int(integration_ms or SENSOR_DEFAULT_MS)
    clock.advance(ms / 1000.0)  # the sensor integrates, then notifies
    return world.sensor_counts(ms)


def run_on_world(
    recipe: Recipe, target_lab: tuple[float, float, float], *, seed: int = 0
) -> ColourResult:
    """Execute a colour-match ``recipe`` on a fresh world; see the module docstring."""
    clock = ManualClock()
    world = StationWorld("bench-model", clock=clock, seed=seed)
    hp = world.hotplate
    white: tuple[float, float, float] | None = None
    lab: tuple[float, float, float] | None = None
    delta: float | None = None
    status: Literal["ok", "failed"] = "ok"
    liquid_c = math.nan
    cool_below: float | None = None
    steps_s: dict[str, float] = {}
    for step in recipe.steps:
        t0 = clock.now()
        k = step.kind
        if k == "calibrate":
            r, g, b, _, st = _sensor(world, clock, step.get("integration_ms"))
            if st != 0:
                raise RuntimeError(f"white reference reading has status {st} (empty vial?)")
            white = (float(r), float(g), float(b))
        elif k == "cool":
            below = float(step["below_c"])
            cool_below = below
            _wait(world, clock, COOL_POLL_S, _plate_below(world, below))
        elif k == "dispense":
            _pump_run(world, step["fluid"], step["volume_ml"], step["rate_ml_min"], True)
        elif k == "wait_pumps":
            _wait(world, clock, POLL_S, _pumps_stopped(world, list(step["fluids"])))
        elif k == "stir":
            world.advance()
            with world.lock:
                hp.stirrer_setpoint_rpm = int(step["rpm"])
                hp.stirrer_enabled = True
        elif k == "heat":
            _ramp(world, clock, step)
        elif k == "hold":
            clock.advance(float(step["seconds"]))
        elif k == "measure":
            r, g, b, _, st = _sensor(world, clock, step.get("integration_ms"))
            liquid_c = hp.liquid_c
            ref = step.get("white") or white
            if ref is None:
                raise RuntimeError("measure without a white reference (no calibrate step)")
            if st != 0:
                status = "failed"  # saturated or dark: MeasurementError in the runner
            else:
                lab = counts_to_lab(r, g, b, ref)
                target = step.get("target_lab") or target_lab
                delta = delta_e2000(lab, target)
        elif k in ("heater_off", "stirrer_off"):
            world.advance()
            with world.lock:
                if k == "heater_off":
                    hp.heater_enabled = False
                else:
                    hp.stirrer_enabled = False
        elif k == "drain":
            _pump_run(world, "waste", step["volume_ml"], step["rate_ml_min"], False)
            _wait(world, clock, POLL_S, _pumps_stopped(world, ["waste"]))
        elif k in ("light", "light_off", "capture"):
            pass  # no effect on the colour or the time (ms on the wire)
        else:
            raise ValueError(f"the colour model cannot run step kind {k!r}")
        steps_s[k] = steps_s.get(k, 0.0) + clock.now() - t0
    if cool_below is not None:  # the next experiment's cool step: this one's plate cools down
        t0 = clock.now()
        _wait(world, clock, COOL_POLL_S, _plate_below(world, cool_below))
        steps_s["cool"] = steps_s.get("cool", 0.0) + clock.now() - t0
    return ColourResult(delta, lab, clock.now(), status, liquid_c, steps_s)
