"""What the benchmark's bench models share: a manual clock, handles, pumps and hotplate.

A bench model runs a program's own recipe (:func:`loops.recipe.run_recipe`) on
in-memory instrument handles that act directly on a simulated world
(:class:`simulators.benchworld.BenchWorld`, which both simulated benches derive
from), driven by a :class:`ManualClock`: no wire, no guard (every command is
assumed allowed), no real-time sleeping. :class:`WorldModel` is the part both
benches share (what the station object gives the runner, the syringe pumps and
the hotplate-stirrer); :class:`benchmarks.colour_model.BenchModel` adds the
colour bench's sensor, light and camera, :class:`benchmarks.buffer_model.BufferModel`
the buffer bench's pH transmitter and balance. :func:`run_model_recipe` runs a
recipe on a model and collects the bench time of each step kind.

What the shared handles do: a pump's ``dispense``/``withdraw`` starts it (4
significant digits, as the driver sends), ``wait_until_stopped`` polls it every
second of bench time (:data:`POLL_S`: the real stack's real-time polls are
seconds of bench time at its speeds), ``read()`` reports ``moving``,
``infused_ml`` and ``withdrawn_ml``; the hotplate's ``set_heater`` /
``set_stirrer`` set its registers and ``read()`` reports plate and liquid
temperatures (0.1 degC, as the registers do) and the heater and stirrer enables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loops.plan import Recipe, Step
from loops.recipe import Result, run_recipe
from simulators.benchworld import BenchWorld
from simulators.clock import SimClock

__all__ = [
    "POLL_S",
    "WAIT_LIMIT_S",
    "ManualClock",
    "ModelRun",
    "WorldModel",
    "run_model_recipe",
]

POLL_S = 1.0  # a pump's wait polls at least this far apart (bench seconds): the real
#             stack's 0.05 s real-time polls are 5 bench seconds at 100x
WAIT_LIMIT_S = 24 * 3600.0  # a wait that has not finished after a simulated day is a bug


class ManualClock(SimClock):
    """A :class:`SimClock` that only moves when told (:meth:`advance`); ``now()`` starts at 0.

    Its :meth:`sleep` advances it (the model is the only thing waiting on it), so a
    simulator's own timed wait runs without real sleeping.
    """

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

    async def sleep(self, sim_seconds: float) -> None:
        self.advance(max(0.0, float(sim_seconds)))


class _Verdict:
    allowed = True


class _Handle:
    """The calls of one instrument: ``model._<kind>_<command>(name, ...)``."""

    def __init__(self, model: WorldModel, name: str) -> None:
        self.model, self.name = model, name

    def __getattr__(self, command: str) -> Any:
        act = getattr(self.model, f"_{self.model.kinds[self.name]}_{command}", None)
        if act is None:
            raise AttributeError(f"the bench model cannot run {self.name}.{command}()")

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await act(self.name, *args, **kwargs)

        return call


class WorldModel:
    """A station's instruments over one world, for :func:`loops.recipe.run_recipe`:
    ``handle(name)`` and ``check(command)`` (always allowed) are what the runner uses of
    a station. ``kinds``: instrument name -> kind (the ``_<kind>_<command>`` methods);
    a pump's name is its fluid (``world.pump_by_fluid``)."""

    name = "bench-model"

    def __init__(self, world: BenchWorld, clock: ManualClock, kinds: dict[str, str]) -> None:
        self.world, self.clock, self.kinds = world, clock, dict(kinds)

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
        return {
            "plate_c": round(hp.plate_c, 1),
            "liquid_c": round(hp.liquid_c, 1),
            "heater_enabled": hp.heater_enabled,  # what a hold's while checks
            "stirrer_enabled": hp.stirrer_enabled,
        }


@dataclass
class ModelRun:
    """A recipe run on a model: its result, and bench seconds per step kind
    (``call <command>`` for calls)."""

    result: Result
    steps_s: dict[str, float] = field(default_factory=dict)


async def run_model_recipe(
    recipe: Recipe,
    model: WorldModel,
    *,
    steps_s: dict[str, float] | None = None,
    who: str = "model",
) -> ModelRun:
    """Run ``recipe`` with the campaign's runner on ``model`` (its clock), adding each
    step's bench time to ``steps_s`` (a new dict if None). Errors propagate at their step,
    the step times so far already added."""
    times: dict[str, float] = {} if steps_s is None else steps_s

    async def on_step(index: int, step: Step, phase: str, data: dict[str, Any]) -> None:
        if phase == "done":
            label = step.kind if step.kind != "call" else f"call {step['command']}"
            times[label] = times.get(label, 0.0) + float(data.get("duration_s", 0.0))

    callback: Callable[[int, Step, str, dict[str, Any]], Awaitable[None]] = on_step
    result = await run_recipe(
        recipe,
        model,  # type: ignore[arg-type]
        clock_sleep=model.sleep,
        who=who,
        on_step=callback,
        clock_now=model.clock.now,
    )
    return ModelRun(result, times)
