"""The buffer-formulation objective on the simulator's chemistry, without the wire.

:class:`BufferObjective` turns a proposal of ``examples/buffer/program.md``
(``acid_ml``, ``base_ml``) into the recipe the campaign would run
(:func:`loops.recipe.build_recipe`: the program's plan bound to the proposal
and its ``fixed`` values) and runs THAT recipe with the campaign's own runner
on a :class:`BufferModel`: the buffer bench's instruments as in-memory handles
acting directly on a fresh :class:`simulators.buffer_world.BufferWorld` (the
phosphate chemistry of :mod:`simulators.phosphate`, mixing, the pH electrode,
the balance) on a manual clock. No pty, Modbus or guard (every command is
assumed allowed) and no real sleeping: one experiment is ~0.2 s of CPU
instead of ~10 minutes of bench time. The program's verification
(:func:`loops.checks.run_checks`: gravimetric, pH steady, stable flag) runs on
the result as the station would run it.

The handles (:mod:`benchmarks.bench_model` for the pumps and the hotplate):

* ``ph``: the bundled driver itself (:class:`instruments.drivers.ph_meter.PhMeter`)
  over an in-memory register bus (:class:`UnitBus`) into the transmitter
  simulator's register logic (:class:`simulators.ph_meter.PhTransmitterSim`
  without a wire): ``read``, ``status``, ``set_compensation`` and
  ``set_damping`` are the driver's, the pH conversion, damping, stability flag
  and calibration fit the simulator's. Only ``calibrate`` is the model's: the
  driver's (write holding 10, poll it until 0) on bench time (it polls every
  ``poll_interval`` bench seconds; the driver sleeps real seconds).
* ``balance``: ``tare``, ``weight`` (the next stable weight, :class:`Weighing`
  as the driver returns it), ``weight_now`` and ``read`` on the world's
  :meth:`~simulators.buffer_world.BufferWorld.balance_reading` (load, noise,
  drift, settling) with the balance simulator's stability wait (polls every
  0.1 s for at most 3 s, then "not executable", as ``S``/``T`` answer ``I``)
  and its 0.1 mg resolution; errors are the driver's
  (:class:`~instruments.errors.BalanceNotExecutable`, ...).

Set-up (``examples/buffer/setup.yaml``, ``every: campaign``): run ONCE per
objective, i.e. per campaign (the benchmark builds one objective per run), on
its own fresh world: water covers the probe, compensation automatic, damping
2 s, two-point calibration 7.00 / 4.01, drain, tare. What it leaves on the
station (the transmitter's settings and calibration, the balance's tare) is
carried into every experiment's fresh world (:class:`StationState`); what it
keeps (``calibration_due``, ``beaker_g``) is the checks' ``setup.*``. Running
it per experiment would give the same calibration (the electrode has no random
parameters) at twice the CPU.

Bench time. :attr:`BufferResult.duration_s` is the simulated time from the
recipe's first to its last step (dispense at 20-30 mL/min, 60 s of mixing,
the stable wait, 10 s, settling, weighing, drain); the set-up is not counted
(once per campaign). Each experiment starts from a fresh world: an empty,
dry beaker at ambient temperature, the probe at the pH-7 storage potential.

Differences from the full stack: no wire latencies; a pump's wait polls every
bench second; noise streams differ; and the electrode's slow drift (0.5 mV/h,
~0.01 pH per hour) starts again at every experiment instead of accumulating
over the campaign since its calibration (on the full stack a campaign of 5
bench hours ends ~0.04 pH off; here every experiment is as if calibrated
minutes before).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from benchmarks.bench_model import ManualClock, WorldModel, run_model_recipe
from instruments.drivers.balance import Weighing
from instruments.drivers.ph_meter import BUFFERS, HR_CALIBRATE, PhMeter
from instruments.errors import (
    BalanceNotExecutable,
    BalanceOverload,
    BalanceUnderload,
    CalibrationError,
    DeviceError,
    ModbusExceptionError,
    ProbeNotImmersedError,
)
from loops.checks import run_checks
from loops.plan import Recipe
from loops.program import Program, load_program
from loops.recipe import MeasurementError, build_recipe
from loops.setup import SetupRecipe, load_setup
from simulators.balance import POLL_S as BALANCE_POLL_S
from simulators.balance import STABLE_TIMEOUT_S, TARE_MIN_G, weight_text
from simulators.buffer_world import BalanceReading, BufferWorld
from simulators.ph_meter import Calibration, PhTransmitterSim
from simulators.rs485 import RS485Line

__all__ = [
    "DEFAULT_PROGRAM",
    "DEFAULT_SETUP",
    "SORENSEN_POINT",
    "BufferModel",
    "BufferObjective",
    "BufferResult",
    "StationState",
    "UnitBus",
]

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "buffer"
#: the buffer campaign this objective reads (target, constraints, fixed inputs, checks)
DEFAULT_PROGRAM = _EXAMPLE / "program.md"
#: its station's set-up (pH calibration, tare), run once per campaign
DEFAULT_SETUP = _EXAMPLE / "setup.yaml"
#: Sørensen's phosphate table: 19 mL 0.2 M NaH2PO4 + 81 mL 0.2 M Na2HPO4 made up to 200 mL
#: (0.1 M) is pH 7.4 at 25 degC; at the program's 60 mL total, 0.3 x that
SORENSEN_POINT: dict[str, float] = {"acid_ml": 5.7, "base_ml": 24.3}


class UnitBus:
    """An in-memory Modbus register bus into one simulated unit's register logic (no wire):
    what :class:`PhMeter` needs of its transport (``instruments.drivers.registers.RegisterBus``).
    An exception code from the unit raises :class:`ModbusExceptionError` as the transport does."""

    def __init__(self, unit: PhTransmitterSim, url: str = "model://ph") -> None:
        self.unit, self.url = unit, url

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _span(self, registers: Sequence[int], address: int, count: int, fc: int) -> list[int]:
        if address < 0 or count < 1 or address + count > len(registers):
            raise ModbusExceptionError(self.url, fc, address, 2)  # illegal data address
        return list(registers[address : address + count])

    async def read_input_registers(
        self, address: int, count: int = 1, *, unit: int | None = None, timeout: float | None = None
    ) -> list[int]:
        return self._span(self.unit.input_registers(), address, count, 4)

    async def read_holding_registers(
        self, address: int, count: int = 1, *, unit: int | None = None, timeout: float | None = None
    ) -> list[int]:
        return self._span(self.unit.holding_registers(), address, count, 3)

    async def write_register(
        self, address: int, value: int, *, unit: int | None = None, timeout: float | None = None
    ) -> None:
        self._check(self.unit.write(address, [int(value)]), 6, address)

    async def write_registers(
        self,
        address: int,
        values: Sequence[int],
        *,
        unit: int | None = None,
        timeout: float | None = None,
    ) -> None:
        self._check(self.unit.write(address, [int(v) for v in values]), 16, address)

    def _check(self, code: Any, fc: int, address: int) -> None:
        if code is not None:
            raise ModbusExceptionError(self.url, fc, address, int(code))


@dataclass
class StationState:
    """What stays on the station between experiments: the transmitter's settings and
    calibration, and the balance's zero and tare (what the set-up leaves behind)."""

    compensation: int = 1
    manual_t10: int = 250
    damping_s: int = 0
    calibration: Calibration = field(default_factory=Calibration)
    zero_g: float = 0.0
    tare_g: float = 0.0


class BufferModel(WorldModel):
    """The buffer bench's instruments over one :class:`BufferWorld`: the shared pumps
    (``acid``, ``base``, ``water``, ``waste``) and hotplate, the pH transmitter through its
    driver (``ph``) and the balance (``balance``). See the module docstring.

    ``state``: the station as an earlier run left it (default: factory settings, no tare).
    """

    def __init__(
        self, world: BufferWorld, clock: ManualClock, state: StationState | None = None
    ) -> None:
        kinds = {
            **{f: "pump" for f in ("acid", "base", "water", "waste")},
            "hotplate": "hotplate",
            "ph": "ph",
            "balance": "balance",
        }
        super().__init__(world, clock, kinds)
        self.world: BufferWorld = world
        state = state or StationState()
        self.transmitter = PhTransmitterSim(world, RS485Line(world.wire))
        self.transmitter.compensation = state.compensation
        self.transmitter.manual_t10 = state.manual_t10
        self.transmitter.damping_s = state.damping_s
        self.transmitter.calibration = copy.deepcopy(state.calibration)
        self.bus = UnitBus(self.transmitter)
        self.ph = PhMeter(self.bus, name="ph")  # type: ignore[arg-type]
        self.zero_g, self.tare_g = state.zero_g, state.tare_g
        #: the chemistry's own pH of the well-mixed liquid when ``ph.read()`` last answered
        self.true_ph: float | None = None

    def state(self) -> StationState:
        """The station as it is now (to carry into the next experiment's world)."""
        t = self.transmitter
        return StationState(
            t.compensation,
            t.manual_t10,
            t.damping_s,
            copy.deepcopy(t.calibration),
            self.zero_g,
            self.tare_g,
        )

    # pH transmitter: the driver, over the register logic
    async def _ph_read(self, name: str) -> dict[str, Any]:
        reading = await self.ph.read()
        self.true_ph = self.world.mixed_ph()
        return reading

    async def _ph_status(self, name: str) -> Any:
        return await self.ph.status()

    async def _ph_set_compensation(
        self, name: str, mode: str, temperature_c: float | None = None
    ) -> None:
        await self.ph.set_compensation(mode, temperature_c)

    async def _ph_set_damping(self, name: str, seconds: int) -> None:
        await self.ph.set_damping(seconds)

    async def _ph_calibrate(
        self, name: str, buffer_ph: float, timeout: float | None = None
    ) -> None:
        """The driver's calibrate on bench time (see the module docstring)."""
        code = next((c for b, c in BUFFERS.items() if abs(b - buffer_ph) < 1e-9), None)
        if code is None:
            raise ValueError(f"buffer pH {buffer_ph!r} is not one of {sorted(BUFFERS)}")
        limit = self.ph.calibration_timeout if timeout is None else float(timeout)
        if (await self.ph.status()).not_immersed:
            raise ProbeNotImmersedError(self.ph.name)
        await self.bus.write_register(HR_CALIBRATE, code)
        waited = 0.0
        while (await self.bus.read_holding_registers(HR_CALIBRATE))[0] != 0:
            if waited >= limit:
                raise CalibrationError(
                    self.ph.name,
                    f"calibration at pH {buffer_ph:.2f} did not finish within {limit:g} s",
                    buffer_ph,
                )
            self.clock.advance(self.ph.poll_interval)
            waited += self.ph.poll_interval

    # balance: the world's weighing cell with the balance simulator's stability wait
    async def _stable_reading(self, command: str) -> BalanceReading:
        waited = 0.0
        while True:
            reading = self.world.balance_reading()
            if reading.overload:
                raise BalanceOverload("balance", command, f"{command} +")
            if reading.underload:
                raise BalanceUnderload("balance", command, f"{command} -")
            if reading.stable:
                return reading
            if waited >= STABLE_TIMEOUT_S:
                raise BalanceNotExecutable("balance", command, f"{command} I")
            self.clock.advance(BALANCE_POLL_S)
            waited += BALANCE_POLL_S

    def _weighing(self, reading: BalanceReading) -> Weighing:
        text = weight_text(reading.gross_g - self.zero_g - self.tare_g)
        status = "S" if reading.stable else "D"
        return Weighing(float(text), "g", reading.stable, f"S {status} {text} g")

    async def _balance_tare(self, name: str) -> float:
        reading = await self._stable_reading("T")
        weight = reading.gross_g - self.zero_g
        if weight < TARE_MIN_G:
            raise BalanceUnderload("balance", "T", "T -")
        self.tare_g = weight
        return float(weight_text(weight))

    async def _balance_weight(self, name: str) -> Weighing:
        return self._weighing(await self._stable_reading("S"))

    async def _balance_weight_now(self, name: str) -> Weighing:
        return self._weighing(self.world.balance_reading())

    async def _balance_read(self, name: str) -> dict[str, Any]:
        now = self._weighing(self.world.balance_reading())
        tare_g = float(weight_text(self.tare_g))
        return {"weight_g": now.value, "stable": now.stable, "tare_g": tare_g, "tared": tare_g != 0}


@dataclass(frozen=True)
class BufferResult:
    """One simulated experiment.

    ``status``: ``"ok"``; ``"untrusted"`` when the program's verification failed
    (``reasons``; the campaign keeps the value but does not trust it); ``"failed"``
    when an instrument or a measurement failed (``error``). ``ph_error`` (the
    objective) is None unless the recipe measured it; ``ph`` the transmitter's last
    reading, ``true_ph`` the chemistry's own pH of the well-mixed liquid at that moment
    (:meth:`BufferWorld.mixed_ph`); ``duration_s``: bench seconds of the recipe;
    ``steps_s``: seconds per step kind.
    """

    ph_error: float | None
    ph: float | None
    true_ph: float | None
    duration_s: float
    status: Literal["ok", "untrusted", "failed"]
    measurements: dict[str, Any] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    error: str | None = None
    steps_s: dict[str, float] = field(default_factory=dict)


class BufferObjective:
    """|pH - target| and the bench time of one experiment, on the simulator's chemistry.

    ``program``: a loaded :class:`~loops.program.Program` or a path to a ``program.md``
    (default: the buffer example); ``setup``: its station's set-up recipe (a path or a
    compiled :class:`~loops.setup.SetupRecipe`), run once when the objective is made
    (``setup_seed``: its noise stream). Call it with a proposal and a seed (the
    experiment's noise stream); ``faults``: simulator faults injected into that
    experiment's world (name -> parameters, e.g. ``{"clogged-pump": {"pump": "acid"}}``).
    """

    def __init__(
        self,
        program: Program | str | Path = DEFAULT_PROGRAM,
        setup: SetupRecipe | str | Path = DEFAULT_SETUP,
        *,
        setup_seed: int = 0,
    ) -> None:
        self.program = program if isinstance(program, Program) else load_program(Path(program))
        if self.program.objective.measure not in self.program.plan.measures:
            raise ValueError(f"{self.program.source}: the recipe does not measure the objective")
        if self.program.stop.target is None:
            raise ValueError(f"{self.program.source}: stop.target is missing")
        self.target: float = self.program.stop.target
        self.setup = setup if isinstance(setup, SetupRecipe) else load_setup(Path(setup))
        self.station, self.kept, self.setup_steps_s = asyncio.run(self._run_setup(setup_seed))

    async def _run_setup(self, seed: int) -> tuple[StationState, dict[str, Any], dict[str, float]]:
        clock = ManualClock()
        model = BufferModel(BufferWorld("buffer-setup", clock=clock, seed=seed), clock)
        run = await run_model_recipe(self.setup.recipe, model, who="model:setup")
        kept = {k: run.result.measurements.get(k) for k in self.setup.keep}
        return model.state(), kept, run.steps_s

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

    def __call__(
        self,
        params: Mapping[str, Any],
        seed: int = 0,
        *,
        faults: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> BufferResult:
        recipe = self.recipe(params)
        return asyncio.run(self._run(recipe, seed, faults or {}))

    async def _run(
        self, recipe: Recipe, seed: int, faults: Mapping[str, Mapping[str, Any]]
    ) -> BufferResult:
        clock = ManualClock()
        world = BufferWorld("buffer-model", clock=clock, seed=seed)
        for name, fault in faults.items():
            world.faults.inject(name, **dict(fault))
        model = BufferModel(world, clock, self.station)
        steps_s: dict[str, float] = {}
        try:
            run = await run_model_recipe(recipe, model, steps_s=steps_s)
        except (DeviceError, MeasurementError, TimeoutError) as exc:
            return BufferResult(
                None,
                None,
                model.true_ph,
                clock.now(),
                "failed",
                error=f"{type(exc).__name__}: {exc}",
                steps_s=steps_s,
            )
        m = run.result.measurements
        checks = recipe.verification
        verdict = run_checks(
            checks, measurements=m, inputs=checks.get("inputs") or {}, setup=self.kept
        )
        status: Literal["ok", "untrusted"] = "untrusted" if verdict.verified is False else "ok"
        value = m.get(self.program.objective.measure)
        return BufferResult(
            None if value is None else float(value),
            None if m.get("ph") is None else float(m["ph"]),
            model.true_ph,
            clock.now(),
            status,
            dict(m),
            verdict.reasons,
            None,
            steps_s,
        )
