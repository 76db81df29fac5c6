"""Experiments are data: a :class:`Recipe` is a list of :class:`Step` built from the parameters.

A recipe can be shown (``str(recipe)``), journaled and replayed
(:meth:`Recipe.as_dict` / :meth:`Recipe.from_dict`, plain JSON), dry-run by the
safety layer (:meth:`Recipe.commands`, :meth:`Recipe.command_times`,
:func:`dry_run_recipe`) and run on a station (:func:`run_recipe`), which acts
only through the station's guarded handles.

Steps (``kind``: parameters, SI-ish units), on the reference station's
instruments (pumps ``red``/``green``/``blue``/``waste``, ``hotplate``, colour
sensor ``color``, ``enclosure``, ``camera``):

================  ==============================================================
``light``         ``intensity`` (0-1): enclosure LED on (for the camera)
``dispense``      ``fluid``, ``volume_ml``, ``rate_ml_min``: start a dye pump (returns
                  when the pump has started; several dispenses run together)
``wait_pumps``    ``fluids`` (list), ``timeout_s`` (optional): poll the pumps until
                  they stopped; reads what each one reports having infused
``stir``          ``rpm``: stirrer on
``heat``          ``setpoint_c``, ``from_c`` and ``rise_per_min`` (optional): heater on,
                  the setpoint ramped to ``setpoint_c`` (from ``from_c`` at
                  ``rise_per_min`` if given) never faster than the envelope allows
                  (:func:`ramp_setpoint`)
``hold``          ``seconds``: wait
``cool``          ``below_c``, ``timeout_s`` (optional): wait until the hotplate's
                  plate is below ``below_c`` (a hot plate left by the previous
                  experiment would change this one's colour)
``calibrate``     ``integration_ms`` (optional): read the colour sensor through the
                  empty vial: the white reference for ``measure``
``measure``       ``target_lab`` ([L, a, b], optional), ``white`` ([r, g, b] counts,
                  optional: else the last ``calibrate``), ``integration_ms``
                  (optional): colour-sensor counts -> Lab -> CIEDE2000 to the target;
                  also reads the hotplate (liquid temperature)
``capture``       ``timeout_s``, ``role`` (optional): one camera frame; its JPEG bytes are
                  kept: ``role="reference"`` the scene before the experiment acts,
                  else its outcome (what verification compares)
``heater_off``    heater off (always allowed: makes the station safer)
``stirrer_off``   stirrer off
``drain``         ``volume_ml``, ``rate_ml_min``, ``timeout_s`` (optional): the waste
                  pump empties the vial; waits until it stopped
``light_off``     enclosure LED off
================  ==============================================================

Durations and timeouts (``hold``, ``timeout_s``, the ramp's pace) are in the
seconds of the ``clock_sleep`` the runner is given: simulated seconds on a
simulated bench (the campaign passes the simulated clock's sleep),
``asyncio.sleep`` on real hardware.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instruments.colour import counts_to_lab, delta_e2000
from instruments.errors import DeviceAlarm
from loops.program import Program
from safety import Command, DryRunReport, SafeStation

__all__ = [
    "COLOR_MATCH",
    "INSTRUMENTS",
    "MeasurementError",
    "RECIPES",
    "Recipe",
    "RecipeBuilder",
    "RecipeError",
    "Result",
    "STEP_KINDS",
    "Step",
    "build_recipe",
    "dry_run_recipe",
    "ramp_setpoint",
    "run_recipe",
]

#: instrument names on the reference station (DESIGN.md "The reference bench")
INSTRUMENTS = {
    "hotplate": "hotplate",
    "sensor": "color",
    "enclosure": "enclosure",
    "camera": "camera",
    "waste": "waste",
}
DYES = ("red", "green", "blue")
#: below this a dispense is skipped (the pump's volume format has 4 significant digits)
MIN_DISPENSE_ML = 0.001
#: the colour sensor looks through the vial's lower window: it needs this much liquid
MIN_MEASURE_ML = 0.3
#: what a capture is for: the scene before the experiment acts, or its outcome
CAPTURE_ROLES = ("reference", "outcome")

StepCallback = Callable[[int, "Step", str, dict[str, Any]], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


class RecipeError(ValueError):
    """A malformed step or recipe (bad kind, missing or invalid parameter)."""


class MeasurementError(RuntimeError):
    """A measurement that cannot be used (sensor saturated or dark, no white reference)."""


# ----------------------------------------------------------------------- steps
# kind -> parameter -> (type, required); types: number positive nonneg int str bool
# lab counts fluids
STEP_KINDS: dict[str, dict[str, tuple[str, bool]]] = {
    "light": {"intensity": ("unit", True)},
    "dispense": {
        "fluid": ("str", True),
        "volume_ml": ("positive", True),
        "rate_ml_min": ("positive", True),
    },
    "wait_pumps": {"fluids": ("fluids", True), "timeout_s": ("positive", False)},
    "stir": {"rpm": ("int", True)},
    "heat": {
        "setpoint_c": ("number", True),
        "from_c": ("number", False),
        "rise_per_min": ("positive", False),
    },
    "hold": {"seconds": ("nonneg", True)},
    "cool": {"below_c": ("number", True), "timeout_s": ("positive", False)},
    "calibrate": {"integration_ms": ("int", False)},
    "measure": {
        "target_lab": ("lab", False),
        "white": ("counts", False),
        "integration_ms": ("int", False),
    },
    "capture": {"timeout_s": ("positive", False), "role": ("role", False)},
    "heater_off": {},
    "stirrer_off": {},
    "drain": {
        "volume_ml": ("positive", True),
        "rate_ml_min": ("positive", True),
        "timeout_s": ("positive", False),
    },
    "light_off": {},
}


def _num(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _normalise(kind: str, name: str, typ: str, value: Any) -> Any:
    """Check one step parameter; returns it as plain Python data (tuples for sequences)."""
    where = f"{kind}.{name}"
    if value is None:
        return None
    if typ in ("number", "positive", "nonneg", "unit"):
        ok = _num(value)
        if ok and typ == "positive":
            ok = value > 0
        if ok and typ == "nonneg":
            ok = value >= 0
        if ok and typ == "unit":
            ok = 0 <= value <= 1
        want = {"number": "a number", "positive": "a number > 0", "nonneg": "a number >= 0"}
        if not ok:
            raise RecipeError(f"{where} must be {want.get(typ, 'a number in 0-1')}, got {value!r}")
        return float(value)
    if typ == "int":
        if isinstance(value, bool) or not _num(value) or value != round(value) or value <= 0:
            raise RecipeError(f"{where} must be an integer > 0, got {value!r}")
        return int(value)
    if typ == "str":
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{where} must be a name, got {value!r}")
        return value
    if typ == "role":
        if value not in CAPTURE_ROLES:
            raise RecipeError(f"{where} must be one of {', '.join(CAPTURE_ROLES)}, got {value!r}")
        return value
    if typ == "fluids":
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise RecipeError(f"{where} must be a non-empty list of pump names, got {value!r}")
        if not all(isinstance(v, str) and v for v in value):
            raise RecipeError(f"{where} must be a list of pump names, got {value!r}")
        return tuple(value)
    if typ in ("lab", "counts"):
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
            raise RecipeError(f"{where} must be 3 numbers, got {value!r}")
        if not all(_num(v) for v in value):
            raise RecipeError(f"{where} must be 3 finite numbers, got {value!r}")
        if typ == "counts" and min(value) <= 0:
            raise RecipeError(f"{where} (white reference counts) must be > 0, got {value!r}")
        return tuple(float(v) for v in value)
    raise AssertionError(typ)  # pragma: no cover


@dataclass(frozen=True)
class Step:
    """One step of a recipe: ``kind`` (see :data:`STEP_KINDS`) and its parameters.

    Parameters are validated on construction (:class:`RecipeError` names the
    step and the parameter); sequences are stored as tuples, numbers as
    Python floats/ints, absent optional parameters are omitted.
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = STEP_KINDS.get(self.kind)
        if spec is None:
            raise RecipeError(f"unknown step kind {self.kind!r} (known: {', '.join(STEP_KINDS)})")
        if not isinstance(self.params, Mapping):
            raise RecipeError(f"{self.kind}: params must be a mapping, got {self.params!r}")
        for key in self.params:
            if key not in spec:
                raise RecipeError(
                    f"{self.kind} has no parameter {key!r} (has: {', '.join(spec) or 'none'})"
                )
        clean: dict[str, Any] = {}
        for name, (typ, required) in spec.items():
            value = self.params.get(name)
            if value is None:
                if required:
                    raise RecipeError(f"{self.kind} needs {name}")
                continue
            clean[name] = _normalise(self.kind, name, typ, value)
        object.__setattr__(self, "params", clean)

    @classmethod
    def of(cls, kind: str, **params: Any) -> Step:
        """``Step.of("dispense", fluid="red", volume_ml=0.4, rate_ml_min=5.0)``."""
        return cls(kind, params)

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)

    def as_dict(self) -> dict[str, Any]:
        """``{"kind": ..., <params>}`` with lists for sequences (JSON-able)."""
        out: dict[str, Any] = {"kind": self.kind}
        for k, v in self.params.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        if not isinstance(data, Mapping) or "kind" not in data:
            raise RecipeError(f"a step is a mapping with a 'kind', got {data!r}")
        return cls(str(data["kind"]), {k: v for k, v in data.items() if k != "kind"})

    def __str__(self) -> str:
        p = self.params
        k = self.kind
        if k == "dispense":
            return f"dispense {p['fluid']} {p['volume_ml']:.4g} mL at {p['rate_ml_min']:g} mL/min"
        if k == "wait_pumps":
            return f"wait for {', '.join(p['fluids'])}"
        if k == "light":
            return f"light on at {p['intensity']:g}"
        if k == "stir":
            return f"stir at {p['rpm']} rpm"
        if k == "heat":
            ramp = ""
            if p.get("from_c") is not None and p.get("rise_per_min") is not None:
                ramp = f" from {p['from_c']:g} degC at {p['rise_per_min']:g} degC/min"
            return f"heat to {p['setpoint_c']:g} degC{ramp}"
        if k == "hold":
            return f"hold {p['seconds']:g} s"
        if k == "cool":
            return f"wait for the plate to cool below {p['below_c']:g} degC"
        if k == "measure":
            target = p.get("target_lab")
            return "measure colour" + (
                f" (target Lab {', '.join(f'{v:g}' for v in target)})" if target else ""
            )
        if k == "drain":
            return f"drain {p['volume_ml']:.4g} mL at {p['rate_ml_min']:g} mL/min"
        return k.replace("_", " ")


# --------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """An experiment as data: ``steps`` in order, the ``params`` they were built from, and the
    builder's ``name``. Immutable; JSON round trip with :meth:`as_dict`/:meth:`from_dict`."""

    steps: tuple[Step, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        for s in steps:
            if not isinstance(s, Step):
                raise RecipeError(f"recipe steps must be Step objects, got {s!r}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "params", dict(self.params))

    def __len__(self) -> int:
        return len(self.steps)

    def __str__(self) -> str:
        head = f"recipe {self.name}" if self.name else "recipe"
        if self.params:
            head += " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items()) + ")"
        return "\n".join([head, *(f"  {i}. {s}" for i, s in enumerate(self.steps))])

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dict(self.params),
            "steps": [s.as_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping) or not isinstance(data.get("steps"), list):
            raise RecipeError("a recipe is a mapping with a list of 'steps'")
        return cls(
            tuple(Step.from_dict(s) for s in data["steps"]),
            dict(data.get("params") or {}),
            str(data.get("name") or ""),
        )

    def volumes(self) -> dict[str, float]:
        """mL each dye pump is asked to dispense in total."""
        out: dict[str, float] = {}
        for s in self.steps:
            if s.kind == "dispense":
                out[s["fluid"]] = out.get(s["fluid"], 0.0) + s["volume_ml"]
        return out

    def commands(self, who: str) -> list[Command]:
        """The actuating commands, in order, for the safety layer's dry run
        (``station.dry_run(recipe.commands(who))``).

        Reads (wait, measure, capture) are left out. A ``heat`` step gives ONE
        command, its final setpoint; at run time it is a ramp of rising
        setpoints (:func:`ramp_setpoint`), each checked by the guard. Checked
        at one instant, a final setpoint above the envelope's rise limit is
        refused: pass :meth:`command_times` (or use :func:`dry_run_recipe`)
        so the dry run sees when each command would be sent.
        """
        return [c for c, _ in self._timeline(who, 0.0, None, None)]

    def command_times(
        self,
        start: float,
        *,
        rise_per_min: float | None = None,
        from_setpoint_c: float | None = None,
    ) -> list[float]:
        """When each command of :meth:`commands` would be sent, from ``start`` (seconds, the
        guard's clock), for ``station.dry_run(commands, times=...)``.

        An estimate: dispenses start together and last volume/rate, a
        ``wait_pumps`` ends when the last of its pumps is done, a ``heat``
        step's final setpoint is sent after ramping from ``from_setpoint_c`` at
        ``rise_per_min`` degC/min (instantly if either is None), ``hold`` and
        ``drain`` take their time; everything else is instantaneous.
        """
        return [t for _, t in self._timeline("dry-run", start, rise_per_min, from_setpoint_c)]

    def _timeline(
        self, who: str, start: float, rise: float | None, setpoint: float | None
    ) -> list[tuple[Command, float]]:
        out: list[tuple[Command, float]] = []
        t = start
        busy: dict[str, float] = {}
        ins = INSTRUMENTS
        for s in self.steps:
            k, p = s.kind, s.params
            if k == "light":
                out.append(
                    (
                        Command(
                            ins["enclosure"],
                            "set_light",
                            {"on": True, "intensity": p["intensity"]},
                            who,
                        ),
                        t,
                    )
                )
            elif k == "dispense":
                out.append(
                    (
                        Command(
                            p["fluid"],
                            "dispense",
                            {"volume_ml": p["volume_ml"], "rate_ml_min": p["rate_ml_min"]},
                            who,
                        ),
                        t,
                    )
                )
                busy[p["fluid"]] = t + 60.0 * p["volume_ml"] / p["rate_ml_min"]
            elif k == "wait_pumps":
                t = max([t, *(busy.pop(f, t) for f in p["fluids"])])
            elif k == "stir":
                out.append(
                    (Command(ins["hotplate"], "set_stirrer", {"on": True, "rpm": p["rpm"]}, who), t)
                )
            elif k == "heat":
                target = p["setpoint_c"]
                start_c, pace = p.get("from_c"), p.get("rise_per_min")
                heater = ins["hotplate"]
                if start_c is not None and pace is not None and start_c < target:
                    on = {"on": True, "setpoint_c": start_c}
                    out.append((Command(heater, "set_heater", on, who), t))
                    duration = 60.0 * (target - start_c) / pace
                    if rise is not None:
                        duration = max(duration, 60.0 * (target - start_c) / rise)
                    t += duration
                elif rise is not None and setpoint is not None and target > setpoint:
                    t += 60.0 * (target - setpoint) / rise
                setpoint = target
                on = {"on": True, "setpoint_c": target}
                out.append((Command(heater, "set_heater", on, who), t))
            elif k == "hold":
                t += p["seconds"]
            elif k == "heater_off":
                out.append((Command(ins["hotplate"], "set_heater", {"on": False}, who), t))
            elif k == "stirrer_off":
                out.append((Command(ins["hotplate"], "set_stirrer", {"on": False}, who), t))
            elif k == "light_off":
                out.append((Command(ins["enclosure"], "set_light", {"on": False}, who), t))
            elif k == "drain":
                out.append(
                    (
                        Command(
                            ins["waste"],
                            "withdraw",
                            {"volume_ml": p["volume_ml"], "rate_ml_min": p["rate_ml_min"]},
                            who,
                        ),
                        t,
                    )
                )
                t += 60.0 * p["volume_ml"] / p["rate_ml_min"]
        return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


def dry_run_recipe(recipe: Recipe, station: SafeStation, *, who: str, now: float) -> DryRunReport:
    """Dry-run ``recipe`` on ``station`` (no I/O), with each command at the time it would be sent.

    ``now``: the guard's clock now (the simulated clock on a simulated bench).
    The heating ramp is timed with the envelope's ``hotplate.setpoint_c`` rise
    (or rate) limit from the setpoint the station has now.
    """
    limit = station.guard.envelope.channels.get(f"{INSTRUMENTS['hotplate']}.setpoint_c")
    rise = limit.rate if limit is not None else None
    current = station.state.view().get(f"{INSTRUMENTS['hotplate']}.setpoint_c")
    from_c = float(current) if current is not None and _num(current) else None
    times = recipe.command_times(now, rise_per_min=rise, from_setpoint_c=from_c)
    return station.dry_run(recipe.commands(who), times=times)


# --------------------------------------------------------------------- builders
_REQUIRED = object()


@dataclass(frozen=True)
class RecipeBuilder:
    """A named way to turn a campaign's parameters into a :class:`Recipe`.

    ``inputs``: every input the builder reads, with its default (inputs in
    ``required`` have none); a program's ``parameters`` and ``fixed`` must be
    inputs. ``measures``: the measurement names its recipes produce (an
    objective must name one).
    """

    name: str
    build: Callable[[Program, Mapping[str, Any]], Recipe]
    inputs: Mapping[str, Any]
    required: frozenset[str] = frozenset()
    measures: frozenset[str] = frozenset()
    doc: str = ""


def _color_match(program: Program, inputs: Mapping[str, Any]) -> Recipe:
    """The reference bench's colour experiment (see :data:`COLOR_MATCH`)."""
    volumes = {d: float(inputs[f"{d}_ml"]) for d in DYES}
    for dye, v in volumes.items():
        if v < 0:
            raise RecipeError(f"{dye}_ml must be >= 0, got {v!r}")
    dispensed = {d: v for d, v in volumes.items() if v >= MIN_DISPENSE_ML}
    total = sum(dispensed.values())
    if total < MIN_MEASURE_ML:
        raise RecipeError(
            f"{total:.3g} mL of dye in total: the colour sensor needs at least {MIN_MEASURE_ML} mL"
        )
    rate = float(inputs["rate_ml_min"])
    white = inputs.get("white")
    temperature = inputs.get("temperature_c")
    if temperature is not None:  # the hotplate's setpoint resolution (a register in 0.1 degC):
        temperature = round(float(temperature) * 10) / 10  # the ramp and its dry run end here
    steps: list[Step] = []
    if white is None:
        steps.append(Step.of("calibrate", integration_ms=inputs.get("integration_ms")))
    if temperature is not None:
        steps.append(Step.of("cool", below_c=inputs["start_below_c"]))
    steps.append(Step.of("light", intensity=inputs["light_intensity"]))
    steps.append(Step.of("capture", role="reference"))  # the scene before anything is poured
    for dye, v in dispensed.items():
        steps.append(Step.of("dispense", fluid=dye, volume_ml=v, rate_ml_min=rate))
    steps += [
        Step.of("wait_pumps", fluids=list(dispensed)),
        Step.of("stir", rpm=inputs["stir_rpm"]),
    ]
    if temperature is not None:
        steps.append(
            Step.of(
                "heat",
                setpoint_c=temperature,
                from_c=inputs["ramp_from_c"],
                rise_per_min=inputs["ramp_c_per_min"],
            )
        )
    steps += [
        Step.of("hold", seconds=inputs["hold_s"]),
        Step.of(
            "measure",
            target_lab=program.objective.target_lab,
            white=white,
            integration_ms=inputs.get("integration_ms"),
        ),
        Step.of("capture", role="outcome"),
    ]
    if temperature is not None:
        steps.append(Step.of("heater_off"))
    steps += [
        Step.of("stirrer_off"),
        Step.of(
            "drain",
            volume_ml=round(total + float(inputs["drain_margin_ml"]), 4),
            rate_ml_min=inputs["drain_rate_ml_min"],
        ),
        Step.of("light_off"),
    ]
    return Recipe(tuple(steps), name="color-match")


#: Colour matching on the reference bench: calibrate the sensor on the empty vial
#: (unless ``white`` counts are given), wait for the plate to cool below
#: ``start_below_c`` (heated recipes), light on, capture the scene
#: (the reference for verification), dispense the dyes (skipping
#: volumes below 0.001 mL), wait for the pumps, stir, heat (if ``temperature_c``:
#: a ramp from ``ramp_from_c`` at ``ramp_c_per_min``), hold, measure (Lab,
#: CIEDE2000 to the objective's ``target_lab``), capture, heater off, stirrer
#: off, drain everything plus a margin, light off. The cool-down and the paced
#: ramp make every experiment heat along the same profile, whatever the
#: previous one left: the colour depends on the parameters, not on history.
COLOR_MATCH = RecipeBuilder(
    name="color-match",
    build=_color_match,
    inputs={
        "red_ml": _REQUIRED,
        "green_ml": _REQUIRED,
        "blue_ml": _REQUIRED,
        "temperature_c": None,  # None: no heating
        "ramp_from_c": 25.0,  # the heating ramp starts here ...
        "ramp_c_per_min": 10.0,  # ... and rises this fast (never faster than the envelope)
        "start_below_c": 28.0,  # heated recipes wait for the plate to cool below this first
        "hold_s": 60.0,
        "stir_rpm": 300,
        "rate_ml_min": 5.0,
        "drain_rate_ml_min": 20.0,
        "drain_margin_ml": 0.2,
        "light_intensity": 0.6,  # the camera's reference patch saturates above ~0.7 at the brightest ambient light
        "white": None,  # [r, g, b] counts of the empty vial; None: a calibrate step
        "integration_ms": None,  # None: the sensor's default
    },
    required=frozenset({"red_ml", "green_ml", "blue_ml"}),
    measures=frozenset({"delta_e2000", "lab_l", "lab_a", "lab_b", "liquid_c"}),
    doc=_color_match.__doc__ or "",
)

#: The recipe builders by name (``recipe:`` in a program.md). Pass your own to
#: :func:`build_recipe` and :func:`loops.program.load_program` to extend it.
RECIPES: dict[str, RecipeBuilder] = {COLOR_MATCH.name: COLOR_MATCH}


def build_recipe(
    program: Program,
    params: Mapping[str, Any],
    *,
    builders: Mapping[str, RecipeBuilder] | None = None,
) -> Recipe:
    """The recipe for one proposal: ``params`` (the campaign's parameters) plus the program's
    ``fixed`` inputs and the builder's defaults, through the builder ``program.recipe``.

    Raises :class:`RecipeError` if ``params`` is not a valid point of the space
    (each problem names its parameter) or the builder refuses it. The
    program's ``constraints`` are NOT checked here: call
    ``program.feasible(params)`` first.
    """
    table = RECIPES if builders is None else builders
    builder = table.get(program.recipe)
    if builder is None:
        raise RecipeError(f"unknown recipe {program.recipe!r} (known: {', '.join(sorted(table))})")
    problems = program.space.validate_params(params)
    if problems:
        raise RecipeError("; ".join(problems))
    plain = program.space.clip(params)  # valid already: only ints and numpy -> Python
    inputs = {k: v for k, v in builder.inputs.items() if v is not _REQUIRED}
    inputs.update(program.fixed)
    inputs.update(plain)
    missing = sorted(k for k in builder.required if k not in inputs)
    if missing:
        raise RecipeError(f"recipe {builder.name} needs {', '.join(missing)}")
    recipe = builder.build(program, inputs)
    return Recipe(recipe.steps, plain, recipe.name or builder.name)


# ---------------------------------------------------------------------- running
@dataclass
class Result:
    """What :func:`run_recipe` measured.

    ``measurements`` (JSON-able): ``delta_e2000`` (if the measure step had a
    target), ``lab`` [L, a, b] and ``lab_l``/``lab_a``/``lab_b``, ``counts``
    (red, green, blue, clear, status, integration_ms), ``white`` (the counts it
    was normalised by), ``liquid_c``/``plate_c`` (hotplate at the measurement),
    ``dispensed_ml`` (fluid -> mL the pump reports having infused),
    ``drained_ml`` (what the waste pump reports withdrawn), ``image_sha256``
    and ``image_bytes`` (or None), ``reference_sha256``. ``image``: the
    outcome capture's JPEG bytes, ``reference_image`` the reference capture's
    (None if no such capture or the source sends raw frames). ``durations``:
    seconds per step (``clock_now``), ``elapsed_s`` in total.
    """

    measurements: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None
    reference_image: bytes | None = None
    durations: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (the image as its digest and size, not its bytes)."""
        return {
            "measurements": dict(self.measurements),
            "durations": list(self.durations),
            "elapsed_s": self.elapsed_s,
        }


async def ramp_setpoint(
    station: SafeStation,
    target_c: float,
    *,
    who: str,
    clock_sleep: Sleep,
    rise_per_min: float | None = None,
    from_c: float | None = None,
    hotplate: str = INSTRUMENTS["hotplate"],
    step_s: float = 10.0,
    resolution_c: float = 0.1,
    floor_c: float = 20.0,
    timeout_s: float = 3600.0,
) -> float:
    """Heater on, with the setpoint raised to ``target_c`` no faster than the envelope allows.

    Every ``step_s`` (``clock_sleep`` seconds) it asks the guard
    (``station.check``, no I/O) for the highest setpoint it would accept now,
    on a grid of ``resolution_c`` from ``target_c`` down to ``floor_c``
    (bisection: a rise limit accepts every setpoint below an accepted one),
    and sends it if higher than the last one sent.

    With ``rise_per_min`` and ``from_c`` the ramp also keeps its own pace: the
    setpoint starts at ``from_c`` and rises at most ``rise_per_min`` degC/min,
    whatever the guard would allow, so every experiment heats along the same
    profile (without them it is as fast as the envelope allows, which depends
    on when the setpoint last changed).

    When the guard accepts none of the grid, waiting cannot help (a rule
    refuses heating, not the rise limit): the setpoint is sent anyway so the
    guard refuses it with its reason, in the audit trail
    (:class:`~safety.SafetyRefusal`). ``TimeoutError`` after ``timeout_s``.
    Returns the setpoint reached (``target_c``).
    """
    if not (step_s > 0 and resolution_c > 0):
        raise ValueError("step_s and resolution_c must be > 0")
    target_c = round(float(target_c), 6)  # the grid's values are rounded so: "reached" is exact
    handle = station.handle(hotplate, who=who)
    n = max(0, int(math.floor((target_c - floor_c) / resolution_c + 1e-9)))

    def value(i: int) -> float:
        return round(target_c - i * resolution_c, 6)

    def allowed(i: int) -> bool:
        command = Command(hotplate, "set_heater", {"on": True, "setpoint_c": value(i)}, who)
        return station.check(command).allowed

    def highest_allowed(limit: float) -> float | None:
        first = max(0, math.ceil((target_c - limit) / resolution_c - 1e-9))
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

    paced = rise_per_min is not None and from_c is not None
    sent: float | None = None
    elapsed = 0.0
    while True:
        limit = target_c
        if paced:
            assert rise_per_min is not None and from_c is not None
            limit = min(target_c, from_c + rise_per_min * elapsed / 60.0)
        best = highest_allowed(limit)
        if best is None:
            refused = min(limit, target_c)
            await handle.set_heater(True, refused)  # the guard refuses it with its reason
            sent = refused  # (unless it became allowed meanwhile: then it was sent)
        elif sent is None or best > sent:
            await handle.set_heater(True, best)
            sent = best
        if sent == target_c:
            return target_c
        if elapsed >= timeout_s:
            raise TimeoutError(
                f"{station.name}: setpoint ramp to {target_c:g} degC stuck at {sent:g} degC "
                f"after {elapsed:g} s"
            )
        await clock_sleep(step_s)
        elapsed += step_s


class _Run:
    """The state of one :func:`run_recipe`: handles, pumps started, white reference, results."""

    def __init__(self, station: SafeStation, who: str, clock_sleep: Sleep, poll_s: float) -> None:
        self.station = station
        self.who = who
        self.sleep = clock_sleep
        self.poll_s = poll_s
        self.started: dict[str, tuple[float, float]] = {}  # pump -> (volume, rate) not waited yet
        self.white: tuple[float, float, float, int | None] | None = None
        self.result = Result()
        self.m = self.result.measurements
        self.m["dispensed_ml"] = {}
        self.m["image_sha256"] = None
        self.m["image_bytes"] = None

    def h(self, name: str) -> Any:
        return self.station.handle(name, who=self.who)

    async def wait_stopped(self, pump: str, timeout_s: float) -> None:
        """Poll ``pump``'s status every ``poll_s`` until it is not moving (alarm: DeviceAlarm)."""
        handle = self.h(pump)
        waited = 0.0
        while True:
            status = await handle.status()
            value = str(getattr(status, "value", status))
            if value == "alarm":
                try:
                    code = str((await handle.read()).get("alarm") or "?")
                except Exception:  # the alarm is the error to report, not this read
                    code = "?"
                raise DeviceAlarm(pump, code, "pump alarm while waiting for it to stop")
            if not getattr(status, "moving", value in ("infusing", "withdrawing")):
                return
            if waited >= timeout_s:
                raise TimeoutError(f"{pump}: still {value} after {waited:g} s")
            await self.sleep(self.poll_s)
            waited += self.poll_s

    async def step(self, s: Step) -> dict[str, Any]:
        k, p, ins = s.kind, s.params, INSTRUMENTS
        if k == "light":
            await self.h(ins["enclosure"]).set_light(True, p["intensity"])
        elif k == "dispense":
            await self.h(p["fluid"]).dispense(p["volume_ml"], p["rate_ml_min"])
            self.started[p["fluid"]] = (p["volume_ml"], p["rate_ml_min"])
        elif k == "wait_pumps":
            out: dict[str, float] = {}
            for fluid in p["fluids"]:
                volume, rate = self.started.pop(fluid, (0.0, 1.0))
                timeout = p.get("timeout_s") or 1.5 * 60.0 * volume / rate + 30.0
                await self.wait_stopped(fluid, timeout)
                infused, _ = await self.h(fluid).dispensed()
                out[fluid] = float(infused)
            self.m["dispensed_ml"].update(out)
            return {"dispensed_ml": out}
        elif k == "stir":
            await self.h(ins["hotplate"]).set_stirrer(True, p["rpm"])
        elif k == "heat":
            reached = await ramp_setpoint(
                self.station,
                p["setpoint_c"],
                who=self.who,
                clock_sleep=self.sleep,
                rise_per_min=p.get("rise_per_min"),
                from_c=p.get("from_c"),
            )
            return {"setpoint_c": reached}
        elif k == "hold":
            await self.sleep(p["seconds"])
        elif k == "cool":
            return await self.cool(p["below_c"], p.get("timeout_s") or 1800.0)
        elif k == "calibrate":
            reading = await self.h(ins["sensor"]).measure(p.get("integration_ms"))
            if reading.status != "ok":
                raise MeasurementError(
                    f"white reference reading is {reading.status!r} (is the vial empty and clean?)"
                )
            self.white = (
                float(reading.red),
                float(reading.green),
                float(reading.blue),
                reading.integration_ms,
            )
            return {"white": list(self.white[:3]), "integration_ms": reading.integration_ms}
        elif k == "measure":
            return await self.measure(s)
        elif k == "capture":
            frame = await self.h(ins["camera"]).capture(p.get("timeout_s"))
            encoded = getattr(frame, "encoded", None)
            image = bytes(encoded) if encoded else None
            digest = hashlib.sha256(image).hexdigest() if image is not None else None
            size = len(image) if image is not None else None
            if p.get("role") == "reference":
                self.result.reference_image = image
                self.m["reference_sha256"] = digest
                return {"role": "reference", "image_sha256": digest, "image_bytes": size}
            self.result.image = image
            self.m["image_sha256"], self.m["image_bytes"] = digest, size
            return {"role": "outcome", "image_sha256": digest, "image_bytes": size}
        elif k == "heater_off":
            await self.h(ins["hotplate"]).set_heater(False)
        elif k == "stirrer_off":
            await self.h(ins["hotplate"]).set_stirrer(False)
        elif k == "drain":
            waste = ins["waste"]
            await self.h(waste).withdraw(p["volume_ml"], p["rate_ml_min"])
            timeout = p.get("timeout_s") or 1.5 * 60.0 * p["volume_ml"] / p["rate_ml_min"] + 30.0
            await self.wait_stopped(waste, timeout)
            _, withdrawn = await self.h(waste).dispensed()
            self.m["drained_ml"] = float(withdrawn)
            return {"drained_ml": float(withdrawn)}
        elif k == "light_off":
            await self.h(ins["enclosure"]).set_light(False)
        return {}

    async def cool(self, below_c: float, timeout_s: float) -> dict[str, Any]:
        """Poll the hotplate every 5 s until ``plate_c`` is below ``below_c``."""
        hotplate = self.h(INSTRUMENTS["hotplate"])
        waited = 0.0
        while True:
            plate = (await hotplate.read()).get("plate_c")
            if plate is not None and plate < below_c:
                return {"plate_c": plate, "waited_s": waited}
            if waited >= timeout_s:
                raise TimeoutError(
                    f"hotplate still at {plate} degC after {waited:g} s (waiting for < {below_c:g})"
                )
            await self.sleep(5.0)
            waited += 5.0

    async def measure(self, s: Step) -> dict[str, Any]:
        p, ins = s.params, INSTRUMENTS
        reading = await self.h(ins["sensor"]).measure(p.get("integration_ms"))
        plate = await self.h(ins["hotplate"]).read()
        counts = {
            "red": reading.red,
            "green": reading.green,
            "blue": reading.blue,
            "clear": reading.clear,
            "status": reading.status,
            "integration_ms": reading.integration_ms,
        }
        if reading.status != "ok":
            raise MeasurementError(f"colour sensor reading is {reading.status!r}: {counts}")
        if p.get("white") is not None:
            white = tuple(p["white"])
        elif self.white is not None:
            r, g, b, ms = self.white
            scale = 1.0
            if ms and reading.integration_ms and ms != reading.integration_ms:
                scale = reading.integration_ms / ms  # counts are linear in integration time
            white = (r * scale, g * scale, b * scale)
        else:
            raise MeasurementError(
                "measure needs a white reference: a calibrate step before it, or white=[r, g, b]"
            )
        lab = counts_to_lab(reading.red, reading.green, reading.blue, white)
        out: dict[str, Any] = {
            "lab": [round(v, 4) for v in lab],
            "lab_l": lab[0],
            "lab_a": lab[1],
            "lab_b": lab[2],
            "counts": counts,
            "white": list(white),
            "liquid_c": plate.get("liquid_c"),
            "plate_c": plate.get("plate_c"),
        }
        target = p.get("target_lab")
        if target is not None:
            out["delta_e2000"] = delta_e2000(lab, target)
            out["target_lab"] = list(target)
        self.m.update(out)
        return out


async def run_recipe(
    recipe: Recipe,
    station: SafeStation,
    *,
    clock_sleep: Sleep,
    who: str,
    on_step: StepCallback | None = None,
    clock_now: Callable[[], float] = time.monotonic,
    poll_s: float = 1.0,
) -> Result:
    """Run ``recipe``'s steps in order on ``station`` through its guarded handles only.

    ``clock_sleep``: an async sleep in the recipe's seconds (the simulated
    clock's ``sleep`` on a simulated bench, ``asyncio.sleep`` on hardware);
    ``clock_now``: the matching clock for the step durations; ``poll_s``: how
    often a pump's status is polled while waiting for it.

    ``on_step(index, step, "started", {})`` is awaited BEFORE each step acts
    (so a journal has it on disk first) and ``on_step(index, step, "done",
    data)`` after it finished, ``data`` being what the step read (JSON-able:
    volumes, Lab, the image's digest) plus ``duration_s``.

    A :class:`~safety.SafetyRefusal`, an instrument error, a
    :class:`MeasurementError` or a timeout propagates at the step where it
    happened: the caller marks the experiment failed and puts the station in
    its safe state. Nothing is retried here.
    """
    if not poll_s > 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
    run = _Run(station, who, clock_sleep, poll_s)
    t_start = clock_now()
    for index, step in enumerate(recipe.steps):
        if on_step is not None:
            await on_step(index, step, "started", {})
        t0 = clock_now()
        data = await run.step(step)
        duration = clock_now() - t0
        run.result.durations.append(duration)
        if on_step is not None:
            await on_step(index, step, "done", {**data, "duration_s": duration})
    run.result.elapsed_s = clock_now() - t_start
    return run.result
