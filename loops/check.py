"""A program checked against a lab's station without touching hardware (``labbridge check
lab.yaml --program program.md``).

Two parts, each problem naming the program's file, line and field:

* **the recipe against the station**: every instrument a step names is one of the
  station's; every command it calls is one its driver declares, with the arguments that
  command takes (none unknown, none required missing) and literal values of the type and
  within the range the device accepts; a capture names an instrument that captures; every
  reading a ``wait``, a hold's ``while`` or a ``read`` names (``hotplate.plate_c``) is a
  key that instrument's ``read()`` returns, as its driver declares its channels (a
  channel only its commands set, ``hotplate.heater``, is not: the recipe sees readings);
* **the dry run of proposals** at the corners and the centre of the parameter space
  (those the program's constraints allow), each checked step by step against the
  station's envelope exactly as a campaign would, from the station's safe state plus what
  ``assume`` says about measured values (the lid, the plate temperature): each point
  passes or is refused with the named rules.

A station's set-up recipes (lab.yaml ``setup:``) get the first part (:func:`check_setup`,
run by ``labbridge check lab.yaml``), each problem naming the set-up file, or lab.yaml for
an inline one, with its line and field.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loops.plan import RecipeError
from loops.program import Program
from loops.recipe import build_recipe, recipe_times
from loops.setup import SetupRecipe
from safety import dry_run
from safety.effects import initial_commanded
from safety.expr import parse

__all__ = ["MAX_CORNERS", "PointCheck", "ProgramCheck", "check_program", "check_setup"]

#: corners dry-run at most (a space of more than 6 parameters gets its first 64 corners)
MAX_CORNERS = 64


@dataclass(frozen=True)
class PointCheck:
    """One proposal dry-run: ``label`` (corner or centre), its parameters, the refusals."""

    label: str
    params: Mapping[str, Any]
    reasons: tuple[str, ...] = ()
    infeasible: bool = False  # the program's own constraints exclude it (not dry-run)
    #: channels a rule needed that the dry run does not know (measured on the bench)
    unknown: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.reasons


@dataclass
class ProgramCheck:
    """The outcome for one station: ``problems`` (the recipe does not fit the station) and
    ``points`` (the dry runs)."""

    station: str
    problems: list[str] = field(default_factory=list)
    points: list[PointCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


#: names a step's place (``file:line: field``) given the step and the field in it (``.call``)
Where = Callable[[Any, str], str]


def _program_where(program: Program) -> Where:
    def where(step: Any, what: str) -> str:
        line = f":{step.line}" if step.line else ""
        if program.recipe_file is not None:  # the steps are a file of their own
            return f"{program.recipe_file}{line}: [{step.index}]{what}"
        return f"{program.source}{line}: recipe[{step.index}]{what}"

    return where


def _step_readings(step: Any) -> Iterable[tuple[str, str]]:
    """(``instrument.key``, field) of every reading a step names."""
    f = step.fields
    if step.kind in ("wait", "hold") and f.get("condition"):
        what = ".wait" if step.kind == "wait" else ".while"
        names = parse(f["condition"]).names_in_order()
        return [(n, what) for n in dict.fromkeys(names) if "." in n]
    if step.kind == "read":
        return [(src, f".read.{m}") for m, src in f["values"].items()]
    return []


def _unknown_reading(layout: Any, instrument: str, key: str) -> str | None:
    """Why ``instrument.key`` is not a reading of the instrument (None: it is, or its
    driver declares no channels to check it against)."""
    readings = layout.readings.get(instrument)
    if readings is None or key in readings:
        return None
    kind = layout.kinds[instrument]
    returns = ", ".join(sorted(readings)) or "nothing"
    close = [r for r in sorted(readings) if r.startswith(f"{key}_")]  # heater: heater_enabled
    close = close or difflib.get_close_matches(key, sorted(readings), n=1)
    hint = f" (did you mean {' or '.join(f'{instrument}.{c}' for c in close)}?)" if close else ""
    channel = f"{instrument}.{key}"
    what = (
        f"a channel {instrument}'s commands set"
        if key in layout.commanded(instrument)
        else "the guard's own count of a flow it sent"
        if channel in layout.flowing_channels()
        else ""
    )
    if what:  # the guard knows it (envelope rules may name it); the recipe does not see it
        return (
            f"{channel} is {what}, not a reading: a recipe sees what {instrument}.read() "
            f"returns{hint}; {instrument} ({kind}) reads: {returns}"
        )
    return f"{instrument} ({kind}) has no reading {key!r}{hint}; it reads: {returns}"


def _check_readings(steps: Iterable[Any], layout: Any, where: Where) -> list[str]:
    """Every reading the ``steps`` name is one their instrument's ``read()`` returns."""
    problems: list[str] = []
    for step in steps:
        for name, what in _step_readings(step):
            instrument, _, key = name.partition(".")
            if instrument not in layout.kinds:
                continue  # named by _check_steps
            problem = _unknown_reading(layout, instrument, key)
            if problem is not None:
                problems.append(f"{where(step, what)}: {problem}")
    return problems


def _check_steps(steps: Iterable[Any], layout: Any, where: Where) -> list[str]:
    """Every instrument, command and argument the ``steps`` name is the station's."""
    problems: list[str] = []
    known = sorted(layout.kinds)
    for step in steps:
        f = step.fields
        names: list[tuple[str, str]] = []
        if step.kind in ("call", "ramp", "capture"):
            names.append((f["instrument"], "." + step.kind))
        elif step.kind in ("wait", "hold"):  # the instruments a condition reads
            names += [(n, f".{step.kind}") for n in f.get("instruments", ())]
        elif step.kind == "read":
            names += [(src.split(".", 1)[0], f".read.{m}") for m, src in f["values"].items()]
        missing = [(n, w) for n, w in names if n not in layout.kinds]
        for name, what in missing:
            problems.append(
                f"{where(step, what)}: the station has no instrument '{name}' "
                f"(it has: {', '.join(known)})"
            )
        if missing:
            continue
        if step.kind == "capture":
            if "capture" not in layout.actions(f["instrument"]):
                problems.append(
                    f"{where(step, '.capture')}: {f['instrument']} "
                    f"({layout.kinds[f['instrument']]}) does not capture images"
                )
            continue
        if step.kind not in ("call", "ramp"):
            continue
        instrument, command = f["instrument"], f["command"]
        spec = layout.actions(instrument).get(command)
        if spec is None:
            problems.append(
                f"{where(step, '.' + step.kind)}: {instrument} "
                f"({layout.kinds[instrument]}) has no command {command!r} (it declares: "
                f"{', '.join(sorted(layout.actions(instrument))) or 'none'})"
            )
            continue
        given = {k[5:] for k in step.values if k.startswith("args.")}
        if step.kind == "ramp":
            given.add(f["set"])
        for arg in sorted(given - set(spec.params)):
            problems.append(
                f"{where(step, '.args.' + arg)}: {instrument}.{command}() has no "
                f"argument {arg!r}; it takes {spec.signature()}"
            )
        for arg in sorted(n for n, p in spec.params.items() if not p.optional and n not in given):
            problems.append(
                f"{where(step, '.args')}: {instrument}.{command}() needs {arg} "
                f"({spec.params[arg].describe()})"
            )
        for key, value in step.values.items():
            name = key[5:]
            if not key.startswith("args.") or name not in spec.params or value.expr is not None:
                continue
            try:
                spec.params[name].check(value.literal)
            except ValueError as exc:
                problems.append(f"{where(step, '.args.' + name)}: {name} {exc}")
    return problems


def _check_recipe(steps: Sequence[Any], layout: Any, where: Where) -> list[str]:
    """The recipe's ``steps`` against the station: instruments, commands, arguments
    (:func:`_check_steps`), then readings (:func:`_check_readings`)."""
    return _check_steps(steps, layout, where) + _check_readings(steps, layout, where)


def check_setup(recipes: Sequence[SetupRecipe], layout: Any) -> list[str]:
    """A station's set-up recipes against its ``layout``: the same instrument, command,
    argument and reading checks as a program's recipe (no dry run: a set-up recipe has no
    parameter space), each problem naming the set-up file (or lab.yaml), line and field."""
    problems: list[str] = []
    for recipe in recipes:
        if recipe.plan is None:  # built by hand, not compiled: no steps to name
            continue
        problems += _check_recipe(recipe.plan.steps, layout, recipe.where)
    return problems


def _points(program: Program) -> list[tuple[str, dict[str, Any]]]:
    params = program.parameters
    out: list[tuple[str, dict[str, Any]]] = []
    for corner in itertools.islice(itertools.product((0, 1), repeat=len(params)), MAX_CORNERS):
        point = {p.name: p.extremes()[c] for p, c in zip(params, corner, strict=True)}
        out.append(("corner", program.space.clip(point)))
    centre = {p.name: p.middle() for p in params}
    out.append(("centre", program.space.clip(centre)))
    return out


def check_program(
    program: Program,
    station: str,
    layout: Any,
    envelope: Any,
    *,
    assume: Mapping[str, Any] | None = None,
) -> ProgramCheck:
    """Check ``program`` against one station (its ``layout`` and ``envelope``): see the
    module docstring. Nothing is connected; the envelope's ledger is not touched."""
    result = ProgramCheck(
        station, _check_recipe(program.plan.steps, layout, _program_where(program))
    )
    if result.problems:
        return result
    view: dict[str, Any] = {**initial_commanded(layout), **dict(assume or {})}
    for label, params in _points(program):
        ok, reasons = program.feasible(params)
        if not ok:
            result.points.append(PointCheck(label, params, tuple(reasons), infeasible=True))
            continue
        try:
            recipe = build_recipe(program, params)
        except RecipeError as exc:
            result.points.append(PointCheck(label, params, (f"recipe: {exc}",)))
            continue
        timeline = recipe_times(
            recipe, layout=layout, envelope=envelope, view=view, who="check", now=0.0
        )
        report = dry_run(
            [c for c, _ in timeline],
            envelope,
            view,
            layout=layout,
            now=0.0,
            times=[t for _, t in timeline],
            ledger=envelope.ledger.copy(),
        )
        refusals = tuple(str(v) for v in report.violations)
        unknown = sorted({n for v in report.violations for n, x in v.values.items() if x is None})
        result.points.append(PointCheck(label, params, refusals, unknown=tuple(unknown)))
    return result
