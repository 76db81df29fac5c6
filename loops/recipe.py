"""Running a bound recipe (loops/plan.py) on a station, through its guarded handles only.

:func:`build_recipe` binds a program's plan to one proposal; :func:`dry_run_recipe`
checks the recipe's commands against the station's envelope at the times they
would be sent (no I/O); :func:`run_recipe` runs its steps. All three read the
same bound :class:`~loops.plan.Recipe`, so the dry run checks what runs.

A ``hold`` with a ``while`` condition checks it on fresh readings at its
start, after every ``every`` seconds and at its end; it ends by the clock
(``clock_now``), so the reads' own time is part of the hold, not added to it.
The first time the condition does not hold the step fails with
:class:`HoldBroken`, naming the condition and the values.

Durations and timeouts (``hold``, ``wait``'s ``every``/``timeout``, the ramp's
pace) are in the seconds of the ``clock_sleep`` the runner is given: simulated
seconds on a simulated bench (the campaign passes the simulated clock's
sleep), ``asyncio.sleep`` on real hardware. Arguments of a command (a pump's
``wait_until_stopped(timeout=...)``) are the driver's: real seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import numbers
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loops import functions
from loops.plan import Recipe, RecipeError, Step, flatten, image_digest_name, plain
from safety import Command, DryRunReport, SafeStation
from safety.effects import CommandRefused, effect_of
from safety.expr import EvaluationError, parse

__all__ = [
    "HoldBroken",
    "MeasurementError",
    "Result",
    "build_recipe",
    "dry_run_recipe",
    "ramp_setpoint",
    "recipe_times",
    "run_recipe",
]

StepCallback = Callable[[int, Step, str, dict[str, Any]], Awaitable[None]]
#: a hold with ``while`` ends when less than this is left (a clock's rounding, not a nap)
HOLD_SLACK_S = 1e-3
Sleep = Callable[[float], Awaitable[None]]


class MeasurementError(RuntimeError):
    """A measurement that cannot be used (a reading that is not there, a function refusing
    its input: a saturated sensor, a missing reference)."""


class HoldBroken(RuntimeError):
    """A hold's ``while`` condition stopped holding (or could not be evaluated on the
    readings): what the hold was for is gone, so the experiment fails at that step."""


def build_recipe(program: Any, params: Mapping[str, Any]) -> Recipe:
    """The recipe for one proposal: the program's plan bound to ``params`` (the campaign's
    parameters) plus its ``fixed`` values.

    Raises :class:`~loops.plan.RecipeError` if ``params`` is not a valid point of the
    space (each problem names its parameter) or an expression of the recipe fails on it.
    The program's ``constraints`` are NOT checked here: call ``program.feasible(params)``.
    """
    problems = program.space.validate_params(params)
    if problems:
        raise RecipeError("; ".join(problems))
    plain = program.space.clip(params)  # valid already: only ints and numpy -> Python
    inputs = {**dict(program.fixed), **plain}
    recipe = program.plan.bind(inputs, plain)
    if not program.verification.get("checks"):
        return recipe
    verification = {**program.verification, "inputs": inputs}
    return Recipe(recipe.steps, recipe.params, recipe.name, verification)


# ---------------------------------------------------------------------- dry run
def _declared(layout: Any, instrument: str, command: str) -> Any:
    """The command's declaration (instruments/declare.py), None without a layout."""
    return layout.actions(instrument).get(command) if layout is not None else None


def _channel_of(layout: Any, instrument: str, command: str, arg: str) -> str | None:
    """The commanded channel (``instrument.channel``) a command's argument sets."""
    spec = _declared(layout, instrument, command)
    channel = spec.channel_of(arg) if spec is not None else None
    return f"{instrument}.{channel}" if channel else None


def recipe_times(
    recipe: Recipe,
    *,
    layout: Any,
    envelope: Any,
    view: Mapping[str, Any],
    who: str,
    now: float,
) -> list[tuple[Command, float]]:
    """Each command of ``recipe`` with the time it would be sent, from the station's
    ``layout`` (its drivers' declarations: how long a flow keeps a pump busy, a setpoint's
    resolution), its ``envelope`` (a ramp's rise limit) and its state ``view`` (where a
    ramp starts). No I/O."""

    def flow_s(command: Command) -> float | None:
        try:
            return effect_of(command, layout, view).busy_s
        except CommandRefused:
            return None  # the dry run says why

    def rise(instrument: str, command: str, arg: str) -> float | None:
        name = _channel_of(layout, instrument, command, arg)
        limit = envelope.channels.get(name) if name else None
        return limit.rate if limit is not None else None

    def current(instrument: str, command: str, arg: str) -> float | None:
        name = _channel_of(layout, instrument, command, arg)
        value: Any = view.get(name) if name else None
        return float(value) if _num(value) else None

    def step(instrument: str, command: str, arg: str) -> float | None:
        spec = _declared(layout, instrument, command)
        param = spec.params.get(arg) if spec is not None else None
        return param.step if param is not None else None

    return recipe.timeline(
        who, now, flow_s=flow_s, rise_per_min=rise, from_value=current, resolution=step
    )


def dry_run_recipe(
    recipe: Recipe,
    station: SafeStation,
    *,
    who: str,
    now: float,
    after: DryRunReport | None = None,
) -> DryRunReport:
    """Dry-run ``recipe`` on ``station`` (no I/O), each command at the time it would be sent
    (:func:`recipe_times`); ``now``: the guard's clock now (the simulated clock on a
    simulated bench). ``after``: the dry run of the experiment under way on the station:
    ``recipe`` is checked from the state that one is predicted to leave, when it ends."""
    guard = station.guard
    view = station.state.view()
    state: dict[str, Any] | None = None
    if after is not None:
        state = dict(after.final_state)
        view = {**view, **state}
        now = max(now, after.until if after.until is not None else now)
    timeline = recipe_times(
        recipe,
        layout=guard.layout,
        envelope=guard.envelope,
        view=view,
        who=who,
        now=now,
    )
    return station.dry_run(
        [c for c, _ in timeline],
        times=[t for _, t in timeline],
        after=state,
        at=now if after is not None else None,
    )


# ---------------------------------------------------------------------- running
@dataclass
class Result:
    """What :func:`run_recipe` measured.

    ``measurements`` (JSON-able): every ``into`` / ``read`` / ``compute`` of the
    recipe (dotted names nested: ``added_ml.acid`` -> ``{"added_ml":
    {"acid": ...}}``), plus ``image_sha256``/``image_bytes`` of the outcome capture
    (None if none) and ``<name>_sha256`` of every other capture. ``images``: each
    capture's JPEG bytes by its name (None if the source sends raw frames);
    :attr:`image` is the outcome's, :attr:`reference_image` the reference's.
    ``durations``: seconds per step (``clock_now``), ``elapsed_s`` from the start to the
    end of the last step.
    """

    measurements: dict[str, Any] = field(default_factory=dict)
    images: dict[str, bytes | None] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def image(self) -> bytes | None:
        return self.images.get("outcome")

    @property
    def reference_image(self) -> bytes | None:
        return self.images.get("reference")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (the images as their digests in ``measurements``, not their bytes)."""
        return {
            "measurements": dict(self.measurements),
            "durations": list(self.durations),
            "elapsed_s": self.elapsed_s,
        }


def _num(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


async def ramp_setpoint(
    station: SafeStation,
    instrument: str,
    command: str,
    arg: str,
    target: float,
    *,
    who: str,
    clock_sleep: Sleep,
    args: Mapping[str, Any] | None = None,
    per_min: float | None = None,
    start: float | None = None,
    step_s: float = 10.0,
    resolution: float | None = None,
    floor: float | None = None,
    timeout_s: float = 3600.0,
) -> float:
    """Send ``instrument.command(**args, arg=value)`` with ``value`` raised to ``target`` no
    faster than the envelope allows (a heater's setpoint, a pump's rate).

    Every ``step_s`` (``clock_sleep`` seconds) it asks the guard (``station.check``,
    no I/O) for the highest value it would accept now, on a grid of ``resolution``
    (default: the argument's declared step, else 0.1) from ``target`` down to
    ``floor`` (default: ``start``, else the argument's declared minimum, else the
    value the station has now), by bisection (a rise limit accepts every value below
    an accepted one), and sends it if higher than the last one sent.

    With ``per_min`` and ``start`` the ramp also keeps its own pace: the value starts
    at ``start`` and rises at most ``per_min`` per minute, whatever the guard would
    allow, so every experiment follows the same profile.

    When the guard accepts none of the grid, waiting cannot help (a rule refuses the
    command, not the rise limit): the value is sent anyway so that the guard refuses it
    with its reason, in the audit trail (:class:`~safety.SafetyRefusal`).
    ``TimeoutError`` after ``timeout_s``. Returns the value reached (``target``).
    """
    layout = getattr(getattr(station, "guard", None), "layout", None)  # None: not declared
    spec = _declared(layout, instrument, command)
    param = spec.params.get(arg) if spec is not None else None
    if resolution is None:
        resolution = getattr(param, "step", None) or 0.1
    if not (step_s > 0 and resolution > 0):
        raise ValueError("step_s and resolution must be > 0")
    target = round(round(float(target) / resolution) * resolution, 9)
    if floor is None:
        floor = start
    declared_min: Any = getattr(param, "min", None)
    if floor is None and declared_min is not None:
        floor = float(declared_min)
    if floor is None:
        channel = _channel_of(layout, instrument, command, arg)
        state = getattr(station, "state", None)
        now_value: Any = state.view().get(channel) if channel and state is not None else None
        floor = float(now_value) if _num(now_value) else target
    fixed = dict(args or {})
    handle = station.handle(instrument, who=who)
    call = getattr(handle, command)
    n = max(0, int(math.floor((target - floor) / resolution + 1e-9)))

    def value(i: int) -> float:
        return round(target - i * resolution, 9)

    def allowed(i: int) -> bool:
        c = Command(instrument, command, {**fixed, arg: value(i)}, who)
        return station.check(c).allowed

    def highest_allowed(limit: float) -> float | None:
        first = max(0, math.ceil((target - limit) / resolution - 1e-9))
        if first > n:
            return None
        if allowed(first):
            return value(first)
        if not allowed(n):
            return None
        lo, hi = first, n  # lo refused, hi allowed
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if allowed(mid):
                hi = mid
            else:
                lo = mid
        return value(hi)

    paced = per_min is not None and start is not None
    sent: float | None = None
    elapsed = 0.0
    while True:
        limit = target
        if paced:
            assert per_min is not None and start is not None
            limit = min(target, start + per_min * elapsed / 60.0)
        best = highest_allowed(limit)
        if best is None:
            refused = min(limit, target)
            await call(**fixed, **{arg: refused})  # the guard refuses it with its reason
            sent = refused  # (unless it became allowed meanwhile: then it was sent)
        elif sent is None or best > sent:
            await call(**fixed, **{arg: best})
            sent = best
        if sent == target:
            return target
        if elapsed >= timeout_s:
            raise TimeoutError(
                f"{station.name}: ramp of {instrument}.{command} {arg} to {target:g} stuck at "
                f"{sent:g} after {elapsed:g} s"
            )
        await clock_sleep(step_s)
        elapsed += step_s


class _Run:
    """The state of one :func:`run_recipe`: measurements (nested and flat), images."""

    def __init__(
        self,
        station: SafeStation,
        who: str,
        clock_sleep: Sleep,
        clock_now: Callable[[], float],
        result: Result | None = None,
    ) -> None:
        self.station = station
        self.who = who
        self.sleep = clock_sleep
        self.now = clock_now
        self.result = Result() if result is None else result
        self.m = self.result.measurements
        self.m["image_sha256"] = None
        self.m["image_bytes"] = None
        #: every measurement by its dotted name, nested values' leaves included
        self.flat: dict[str, Any] = {}

    def h(self, name: str) -> Any:
        return self.station.handle(name, who=self.who)

    def put(self, name: str, value: Any) -> None:
        parts = name.split(".")
        node = self.m
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
            self.flat[".".join(parts[: i + 1])] = child
        node[parts[-1]] = value
        flatten(name, value, self.flat)

    def evaluate(self, text: str, inputs: Mapping[str, Any], where: str) -> Any:
        images = self.result.images
        scope = {**inputs, **self.flat, "images": dict(images)}
        scope.update({f"images.{name}": data for name, data in images.items()})
        try:
            return parse(text, boolean=False).evaluate(scope)
        except EvaluationError as exc:
            raise MeasurementError(f"{where}: {text}: {exc}") from None

    async def step(self, s: Step) -> dict[str, Any]:
        p, k = s.params, s.kind
        if k == "call":
            result = await getattr(self.h(p["instrument"]), p["command"])(**p.get("args", {}))
            if p.get("into"):
                self.put(p["into"], plain(result))
                return {p["into"]: self.m_value(p["into"])}
            return {}
        if k == "wait":
            return await self.wait(s)
        if k == "hold":
            return await self.hold(p)
        if k == "ramp":
            reached = await ramp_setpoint(
                self.station,
                p["instrument"],
                p["command"],
                p["set"],
                p["to"],
                who=self.who,
                clock_sleep=self.sleep,
                args=p.get("args"),
                per_min=p.get("per_min"),
                start=p.get("from"),
                step_s=p.get("step_s") or 10.0,
            )
            return {p["set"]: reached}
        if k == "read":
            return await self.read(p["values"])
        if k == "capture":
            return await self.capture(p)
        if k == "compute":
            return await self.compute(p)
        self.put(p["into"], p["value"])  # "value": a skipped step's else
        return {p["into"]: p["value"]}

    def m_value(self, name: str) -> Any:
        return self.flat.get(name)

    async def read(self, values: Mapping[str, str]) -> dict[str, Any]:
        readings: dict[str, Mapping[str, Any]] = {}
        out: dict[str, Any] = {}
        for name, source in values.items():
            instrument, key = source.split(".", 1)
            if instrument not in readings:
                readings[instrument] = await self.h(instrument).read()
            reading = readings[instrument]
            if key not in reading:
                raise MeasurementError(
                    f"{instrument}.read() has no {key!r} (it has: {', '.join(sorted(reading))})"
                )
            self.put(name, plain(reading[key]))
            out[name] = self.flat[name]
        return out

    async def readings(self, instruments: list[str], inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``inputs`` and a fresh ``read()`` of each instrument (``<instrument>.<key>``)."""
        state = dict(inputs)
        for instrument in instruments:
            reading = await self.h(instrument).read()
            state.update({f"{instrument}.{k}": plain(v) for k, v in reading.items()})
        return state

    async def hold(self, p: Mapping[str, Any]) -> dict[str, Any]:
        """Hold ``seconds`` (by the recipe's clock); with a ``while`` condition, check it at the
        start, after every nap of ``every`` seconds and at the end (module docstring):
        :class:`HoldBroken` the first time it does not hold."""
        seconds = float(p["seconds"])
        if not p.get("condition"):
            await self.sleep(seconds)
            return {}
        condition = parse(p["condition"])
        every = float(p["every_s"])
        checks = 0

        async def check(when: str) -> dict[str, Any]:
            nonlocal checks
            state = await self.readings(p["instruments"], p.get("inputs", {}))
            used = {n: state.get(n) for n in condition.names_in_order()}
            try:
                holds, problem = condition.evaluate(state), ""
            except EvaluationError as exc:
                holds, problem = None, f" (cannot be evaluated: {exc})"
            if holds is not True:
                shown = ", ".join(f"{n}={v!r}" for n, v in used.items())
                raise HoldBroken(
                    f"hold {seconds:g} s while {p['condition']}: it no longer holds {when}"
                    f"{problem}: {shown}"
                )
            checks += 1
            return used

        end = self.now() + seconds  # the reads' own time is part of the hold, not added to it
        await check("at its start")
        while (left := end - self.now()) > HOLD_SLACK_S:
            await self.sleep(min(every, left))
            if end - self.now() > HOLD_SLACK_S:
                await check(f"at check {checks + 1} ({seconds - (end - self.now()):.3g} s into it)")
        used = await check(f"at its end ({seconds:g} s)")
        return {"checks": checks, **used}

    async def wait(self, s: Step) -> dict[str, Any]:
        p = s.params
        condition = parse(p["condition"])
        inputs = p.get("inputs", {})
        every, timeout = float(p["every_s"]), float(p["timeout_s"])
        waited = 0.0
        while True:
            state = await self.readings(p["instruments"], inputs)
            try:
                done = condition.evaluate(state)
            except EvaluationError as exc:
                done = None  # a reading not there yet (a sensor warming up): keep waiting
                last_error = str(exc)
            else:
                last_error = ""
            if done is True:
                used = {n: state.get(n) for n in sorted(condition.names()) if "." in n}
                return {"waited_s": waited, **used}
            if waited >= timeout:
                used = {n: state.get(n) for n in sorted(condition.names()) if n in state}
                detail = f" ({last_error})" if last_error else ""
                raise TimeoutError(
                    f"waited {waited:g} s for {p['condition']}{detail}; "
                    + ", ".join(f"{n}={v!r}" for n, v in used.items())
                )
            await self.sleep(every)
            waited += every

    async def capture(self, p: Mapping[str, Any]) -> dict[str, Any]:
        frame = await self.h(p["instrument"]).capture(p.get("timeout"))
        encoded = getattr(frame, "encoded", None)
        image = bytes(encoded) if encoded else None
        digest = hashlib.sha256(image).hexdigest() if image is not None else None
        size = len(image) if image is not None else None
        role = p["role"]
        self.result.images[role] = image
        self.put(image_digest_name(role), digest)
        if role == "outcome":
            self.put("image_bytes", size)
        return {"role": role, "image_sha256": digest, "image_bytes": size}

    async def compute(self, p: Mapping[str, Any]) -> dict[str, Any]:
        """An expression (cheap: on the loop) or a function, on a worker thread: an image
        analysis or a fit must not hold up the loop the station's monitors poll on."""
        where = f"compute {p['into']}"
        inputs = p.get("inputs", {})
        if p.get("expr"):
            value = self.evaluate(p["expr"], inputs, where)
        else:
            args = {a: self.evaluate(t, inputs, where) for a, t in p.get("args", {}).items()}
            try:
                value = await asyncio.to_thread(functions.call, p["function"], args)
            except (ValueError, ArithmeticError, TypeError) as exc:
                raise MeasurementError(f"{where}: {p['function']}: {exc}") from None
        self.put(p["into"], plain(value))
        return {p["into"]: self.flat[p["into"]]}


async def run_recipe(
    recipe: Recipe,
    station: SafeStation,
    *,
    clock_sleep: Sleep,
    who: str,
    on_step: StepCallback | None = None,
    clock_now: Callable[[], float] = time.monotonic,
    result: Result | None = None,
) -> Result:
    """Run ``recipe``'s steps in order on ``station`` through its guarded handles only.

    ``clock_sleep``: an async sleep in the recipe's seconds (the simulated clock's
    ``sleep`` on a simulated bench, ``asyncio.sleep`` on hardware); ``clock_now``: the
    clock it sleeps on (the step durations, and when a hold with ``while`` ends).

    ``on_step(index, step, "started", {})`` is awaited BEFORE each step acts (so a
    journal has it on disk first) and ``on_step(index, step, "done", data)`` after it
    finished, ``data`` being what the step read (JSON-able) plus ``duration_s``.

    ``result``: the (empty) :class:`Result` to fill and return (default: a new one), for
    a caller whose ``on_step`` needs what the run measured so far: when the last step's
    ``"done"`` is awaited, it holds the run's whole result (measurements, images,
    durations, ``elapsed_s``), so a journal can keep it with that step's record.

    A :class:`~safety.SafetyRefusal`, an instrument error, a :class:`MeasurementError`
    or a timeout propagates at the step where it happened: the caller marks the
    experiment failed and puts the station in its safe state. Nothing is retried here.
    """
    run = _Run(station, who, clock_sleep, clock_now, result)
    t_start = clock_now()
    for index, step in enumerate(recipe.steps):
        if on_step is not None:
            await on_step(index, step, "started", {})
        t0 = clock_now()
        data = await run.step(step)
        t1 = clock_now()
        run.result.durations.append(t1 - t0)
        run.result.elapsed_s = t1 - t_start  # to the end of the last step
        if on_step is not None:
            await on_step(index, step, "done", {**plain(data), "duration_s": t1 - t0})
    return run.result
