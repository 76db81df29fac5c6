"""Recipes are data: steps over a station's instruments, compiled once into a :class:`Plan`.

A program's ``recipe:`` is a list of steps (YAML), each one mapping whose key
names its kind. Values in ``args``, ``hold``, ``to``... are YAML literals or,
when they are strings, expressions in the envelope's rule language
(:mod:`safety.expr`: ``red_ml + green_ml``, ``'closed'`` for a text) over the
program's ``parameters`` and ``fixed`` values; ``wait`` conditions are
expressions over the instruments' readings, ``compute`` arguments over the
measurements taken so far::

    - call: enclosure.set_light            # a declared command of an instrument
      args: {on: true, intensity: light_intensity}
    - call: doser.dispense
      args: {volume_ml: dose_ml, rate_ml_min: rate_ml_min}
      when: dose_ml >= 0.001                 # over parameters/fixed: skipped otherwise
    - call: doser.wait_until_stopped          # a call's result can go into a measurement
      args: {timeout: 120}
    - read: {added_ml.doser: doser.infused_ml}   # measurement <- instrument.reading key
      when: dose_ml >= 0.001
      else: 0.0                              # the measurement when the step is skipped
    - wait: hotplate.plate_c < start_below_c    # poll the readings until it holds
      every: 5
      timeout: 1800
    - ramp: hotplate.set_heater              # raise one argument at a pace, never faster
      set: setpoint_c                        #   than the envelope allows
      to: temperature_c
      from: ramp_from_c
      per_min: ramp_c_per_min
      args: {on: true}
    - hold: hold_s                           # seconds of the station's clock
      while: hotplate.heater_enabled and hotplate.liquid_c > temperature_c - 15
      every: 5                               # checked on fresh readings every 5 s (default 1)
    - call: probe.measure
      into: reading
    - capture: camera                        # one frame; its JPEG is kept with the result
      as: outcome                            # its name: outcome (default), reference, any
    - compute: off_target                    # a registered function (loops/functions.py)
      function: off_target                   #   or an expression: {compute: x, expr: a - b}
      args: {value: reading.ph, target: target_ph}

A capture's frame goes into the result by its name (``as``; ``outcome`` is
the one a campaign verifies and shows, ``reference`` the scene before) and
its SHA-256 into the measurement ``image_sha256`` (the outcome) or
``<name>_sha256``. A later ``compute`` may use the frames themselves:
``images.<name>`` (JPEG bytes) or ``images`` (all of them, name -> bytes, in
the order they were taken), e.g. to fit a camera calibration in a set-up
recipe.

A ``hold`` with ``while`` holds for the conditions it is there for: the
condition (over the instruments' readings, read afresh, and the parameters
and fixed values, like a ``wait``'s) is checked when the hold starts, every
``every`` seconds of it and when it ends; the first time it does not hold
(false, or a reading it names missing) the step fails with
:class:`~loops.recipe.HoldBroken` naming the condition and the values that
broke it, so the experiment fails there and is never a result. The hold
ends by the station's clock, so the reads' own time is part of it.

Every step may have ``when`` (a condition over parameters and fixed values:
the step is left out of the bound recipe when false; a step that produces a
measurement may give ``else``, the measurement's value then) and ``doc``.
Measurement names are identifiers joined by dots (``added_ml.doser``):
dotted names nest in the result (``{"added_ml": {"doser": ...}}``) and are
used flat in expressions. Loops are not part of the language: no recipe
needed one yet (a fixed list of pumps is written out; a titration would need
one, and a ``repeat`` step would then earn its place).

:func:`compile_plan` checks the steps once (shapes, expressions parse, every
name is a parameter, a fixed value or an earlier measurement, functions are
registered) with errors that name the file, the line and the field.
:meth:`Plan.bind` turns one proposal's inputs into a :class:`Recipe` (:mod:`loops.steps`) of
concrete steps: plain JSON data that the dry run (:meth:`Recipe.commands`,
:meth:`Recipe.timeline`), the runner (loops/recipe.py), the journal and any
fast model consume: one interpretation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loops.steps import (
    CAPTURE_ROLES,
    STEP_KINDS,
    Recipe,
    RecipeError,
    Step,
    flatten,
    image_digest_name,
    plain,
)
from safety.expr import EvaluationError, Expression, RuleSyntaxError, parse
from safety.limits import is_number
from safety.yamldoc import YamlDoc

__all__ = [
    "CAPTURE_ROLES",
    "STEP_KINDS",
    "Plan",
    "Recipe",
    "RecipeError",
    "Step",
    "compile_fixed",
    "compile_plan",
    "flatten",
    "image_digest_name",
    "parse_at",
    "plain",
]

_WORD = r"[A-Za-z_][A-Za-z0-9_]*"
_TARGET_RE = re.compile(rf"({_WORD})\.({_WORD})")
_MEASURE_RE = re.compile(rf"{_WORD}(?:\.{_WORD})*")
COMMON = ("when", "else", "doc")
MAX_STEPS = 500


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class _Value:
    """A literal, or an expression (parsed once) evaluated when the recipe is bound."""

    literal: Any = None
    expr: Expression | None = None

    def names(self) -> set[str]:
        return self.expr.names() if self.expr is not None else set()

    def value(self, inputs: Mapping[str, Any], where: str) -> Any:
        if self.expr is None:
            return self.literal
        try:
            return plain(self.expr.evaluate(inputs))
        except EvaluationError as exc:
            raise RecipeError(f"{where}: {self.expr.text}: {exc}") from None


@dataclass(frozen=True)
class _PlanStep:
    index: int
    kind: str
    fields: Mapping[str, Any]  # constant data of the step (instrument, command, into...)
    values: Mapping[str, _Value]  # bound from the inputs (args.<name>, seconds, to...)
    when: Expression | None = None
    otherwise: Any = None
    has_else: bool = False
    produces: tuple[str, ...] = ()
    line: int | None = None  # in the program file


@dataclass(frozen=True)
class Plan:
    """A compiled recipe: checked once, bound per proposal (:meth:`bind`)."""

    name: str
    steps: tuple[_PlanStep, ...]
    #: every measurement the recipe can produce (``into``, ``read``, ``compute``), in order
    measures: tuple[str, ...]
    #: every input name (parameter or fixed) the steps use
    uses: frozenset[str]
    #: instrument -> the commands the steps call on it
    calls: Mapping[str, frozenset[str]]

    def bind(self, inputs: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> Recipe:
        """The concrete recipe for ``inputs`` (parameters + fixed values); ``params`` are
        recorded with it (default: ``inputs``). Raises :class:`RecipeError` naming the step."""
        steps: list[Step] = []
        for ps in self.steps:
            where = f"recipe step {ps.index} ({ps.kind})"
            if ps.when is not None:
                try:
                    keep = ps.when.evaluate(inputs)
                except EvaluationError as exc:
                    raise RecipeError(f"{where}: when {ps.when.text}: {exc}") from None
                if keep is not True:
                    if ps.has_else:
                        for name in ps.produces:
                            steps.append(Step("value", {"into": name, "value": ps.otherwise}))
                    continue
            data = dict(ps.fields)
            if "_inputs" in data:  # the constants a run-time expression uses, recorded with it
                data["inputs"] = {n: plain(inputs[n]) for n in data.pop("_inputs")}
            args: dict[str, Any] = {}
            for key, val in ps.values.items():
                value = val.value(inputs, f"{where} {key}")
                if key.startswith("args."):
                    args[key[5:]] = value
                else:
                    data[key] = value
            if ps.kind in ("call", "ramp"):
                data["args"] = args
            for key in ("seconds", "to", "from", "per_min", "every_s", "timeout_s", "step_s"):
                value = data.get(key)
                if (
                    key in data
                    and value is not None
                    and not (is_number(value) and math.isfinite(value))
                ):
                    raise RecipeError(f"{where}: {key} must be a finite number, got {value!r}")
            if ps.kind == "hold" and data["seconds"] < 0:
                raise RecipeError(f"{where}: hold must be >= 0 s, got {data['seconds']!r}")
            if ps.kind == "hold" and "every_s" in data and not data["every_s"] > 0:
                raise RecipeError(f"{where}: every must be > 0 s, got {data['every_s']!r}")
            steps.append(Step(ps.kind, data))
        return Recipe(tuple(steps), dict(inputs if params is None else params), self.name)


_RESERVED = frozenset({"and", "or", "not", "in", "true", "false", "True", "False"})


def compile_fixed(
    spec: Any,
    *,
    doc: YamlDoc,
    path: tuple[Any, ...] = ("fixed",),
    taken: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """A ``fixed:`` section (the constants a recipe's expressions use): identifier ->
    number, string, boolean or a list of them; ``taken``: names it may not reuse (the
    parameters). Errors name the file, line and field."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise doc.error(f"must be a mapping (name -> value), got {type(spec).__name__}", path)
    out: dict[str, Any] = {}
    for key, value in spec.items():
        kpath = (*path, key)
        if not isinstance(key, str) or not re.fullmatch(_WORD, key) or key in _RESERVED:
            raise doc.error(f"names are identifiers, got {key!r}", kpath)
        if key in taken:
            raise doc.error(f"'{key}' is a parameter; it cannot also be fixed", kpath)
        ok = value is None or isinstance(value, str | bool) or is_number(value)
        if isinstance(value, list):
            ok = all(is_number(v) or isinstance(v, str | bool) for v in value)
        if not ok or (is_number(value) and not math.isfinite(value)):
            raise doc.error(
                f"must be a number, string, boolean or a list of them, got {value!r}", kpath
            )
        out[key] = plain(value)
    return out


def parse_at(text: str, path: tuple[Any, ...], doc: YamlDoc, *, boolean: bool) -> Expression:
    """``text`` parsed as an expression of the rule language, a syntax error reported at its
    place in the YAML file (file:line: field)."""
    line, column, indent = doc.scalars.get(path, (doc.line(path) or 1, 1, 0))
    try:
        return parse(
            text, source=doc.source, line=line, column=column, indent=indent, boolean=boolean
        )
    except RuleSyntaxError as exc:
        raise doc.error(f'{exc.problem} in "{text}"', path) from None


def _value(raw: Any, path: tuple[Any, ...], doc: YamlDoc) -> _Value:
    if isinstance(raw, str):
        return _Value(expr=parse_at(raw, path, doc, boolean=False))
    if raw is None or isinstance(raw, bool) or (is_number(raw) and math.isfinite(raw)):
        return _Value(literal=plain(raw))
    if isinstance(raw, list) and all(
        isinstance(v, bool | str) or (is_number(v) and math.isfinite(v)) for v in raw
    ):
        return _Value(literal=plain(raw))
    raise doc.error(
        f"must be a number, true/false, a list of them, or an expression (a string), got {raw!r}",
        path,
    )


def _condition(
    text: Any,
    where: tuple[Any, ...],
    fields: dict[str, Any],
    doc: YamlDoc,
    known_inputs: set[str],
    used: set[str],
    what: str,
) -> None:
    """A ``wait``'s or a hold's ``while`` condition: over readings (``<instrument>.<key>``,
    at least one) and inputs; into ``fields`` (condition, its inputs, the instruments to read)."""
    if not isinstance(text, str):
        raise doc.error(f"must be a condition (a string), got {text!r}", where)
    cond = parse_at(text, where, doc, boolean=True)
    readings = {n for n in cond.names() if "." in n}
    for n in sorted(cond.names() - readings):
        if n not in known_inputs:
            known = ", ".join(sorted(known_inputs)) or "none"
            raise doc.error(
                f"unknown name '{n}' (a parameter or fixed value; known: {known})", where
            )
    if not readings:
        raise doc.error(f"{what} needs a reading (<instrument>.<key>) in its condition", where)
    used.update(cond.names() - readings)
    fields["condition"] = text
    fields["_inputs"] = sorted(cond.names() - readings)
    fields["instruments"] = sorted({n.split(".", 1)[0] for n in readings})


def _target(raw: Any, path: tuple[Any, ...], doc: YamlDoc) -> tuple[str, str]:
    m = _TARGET_RE.fullmatch(raw) if isinstance(raw, str) else None
    if m is None:
        raise doc.error(f"must be <instrument>.<command>, got {raw!r}", path)
    return m.group(1), m.group(2)


def _measure_name(raw: Any, path: tuple[Any, ...], doc: YamlDoc) -> str:
    if not isinstance(raw, str) or not _MEASURE_RE.fullmatch(raw):
        raise doc.error(f"a measurement name is identifiers joined by dots, got {raw!r}", path)
    return raw


def compile_plan(
    spec: Any,
    *,
    inputs: Sequence[str],
    doc: YamlDoc,
    path: tuple[Any, ...] = ("recipe",),
    functions: Mapping[str, Any] | None = None,
    name: str = "",
) -> Plan:
    """Check ``spec`` (the steps) once and compile it (see the module docstring).

    ``inputs``: the parameter and fixed names the expressions may use;
    ``functions``: the registered compute functions (default: loops/functions.py's).
    Raises :class:`~safety.yamldoc.ConfigError` naming file, line and field.
    """
    if functions is None:
        from loops.functions import registry

        functions = registry()
    if not isinstance(spec, list) or not spec:
        raise doc.error("a recipe is a non-empty list of steps", path)
    if len(spec) > MAX_STEPS:
        raise doc.error(f"{len(spec)} steps: a recipe has at most {MAX_STEPS}", path)
    known_inputs = set(inputs)
    measured: list[str] = []
    captured: list[str] = []
    used: set[str] = set()
    calls: dict[str, set[str]] = {}
    steps: list[_PlanStep] = []

    def need(names: set[str], allowed: set[str], where: tuple[Any, ...], what: str) -> None:
        for n in sorted(names):
            if n not in allowed:
                raise doc.error(
                    f"unknown name '{n}' ({what}; known: {', '.join(sorted(allowed)) or 'none'})",
                    where,
                )

    for i, raw in enumerate(spec):
        at = (*path, i)
        if not isinstance(raw, Mapping):
            raise doc.error(f"a step is a mapping like {{call: ...}}, got {raw!r}", at)
        kinds = [k for k in raw if k in STEP_KINDS]
        if len(kinds) != 1:
            raise doc.error(
                f"a step has exactly one of {', '.join(STEP_KINDS)} (got {', '.join(map(str, raw))})",
                at,
            )
        kind = kinds[0]
        allowed = (kind, *STEP_KINDS[kind], *COMMON)
        for key in raw:
            if key not in allowed:
                raise doc.error(
                    f"unknown key '{key}' (a {kind} step takes: {', '.join(allowed)})", (*at, key)
                )
        fields: dict[str, Any] = {}
        values: dict[str, _Value] = {}
        produces: list[str] = []
        bind_names: set[str] = set()

        def bound(
            key: str | tuple[Any, ...],
            raw_value: Any,
            into: str,
            at: tuple[Any, ...] = at,
            values: dict[str, _Value] = values,
            names: set[str] = bind_names,
        ) -> None:
            where = (*at, *(key if isinstance(key, tuple) else (key,)))
            v = _value(raw_value, where, doc)
            need(v.names(), known_inputs, where, "a parameter or fixed value")
            names.update(v.names())
            values[into] = v

        if kind in ("call", "ramp"):
            instrument, command = _target(raw[kind], (*at, kind), doc)
            fields.update(instrument=instrument, command=command)
            calls.setdefault(instrument, set()).add(command)
            args = raw.get("args") or {}
            if not isinstance(args, Mapping):
                raise doc.error("must be a mapping of argument -> value", (*at, "args"))
            for arg, val in args.items():
                if not isinstance(arg, str) or not re.fullmatch(_WORD, arg):
                    raise doc.error(
                        f"an argument name is an identifier, got {arg!r}", (*at, "args")
                    )
                bound(("args", arg), val, f"args.{arg}")
        if kind == "call" and raw.get("into") is not None:
            fields["into"] = _measure_name(raw["into"], (*at, "into"), doc)
            produces.append(fields["into"])
        elif kind == "wait":
            _condition(raw["wait"], (*at, "wait"), fields, doc, known_inputs, used, "a wait")
            bound("every", raw.get("every", 1.0), "every_s")
            bound("timeout", raw.get("timeout", 3600.0), "timeout_s")
        elif kind == "hold":
            bound("hold", raw["hold"], "seconds")
            if raw.get("while") is not None:
                _condition(
                    raw["while"], (*at, "while"), fields, doc, known_inputs, used, "a hold's while"
                )
                bound("every", raw.get("every", 1.0), "every_s")
            elif raw.get("every") is not None:
                raise doc.error(
                    "every is how often a hold's while is checked: give while", (*at, "every")
                )
        elif kind == "ramp":
            if not isinstance(raw.get("set"), str) or not re.fullmatch(_WORD, raw["set"]):
                raise doc.error(
                    "names the argument the ramp raises (e.g. setpoint_c)", (*at, "set")
                )
            if raw["set"] in (raw.get("args") or {}):
                raise doc.error(
                    f"'{raw['set']}' is the ramped argument, not a fixed one", (*at, "args")
                )
            fields["set"] = raw["set"]
            if "to" not in raw:
                raise doc.error("missing 'to' (the value the ramp ends at)", at)
            bound("to", raw["to"], "to")
            for key, into in (("from", "from"), ("per_min", "per_min"), ("step_s", "step_s")):
                bound(key, raw.get(key), into)
        elif kind == "read":
            spec_read = raw["read"]
            if not isinstance(spec_read, Mapping) or not spec_read:
                raise doc.error(
                    "must be a mapping measurement -> <instrument>.<key>", (*at, "read")
                )
            sources: dict[str, str] = {}
            for m, src in spec_read.items():
                mname = _measure_name(m, (*at, "read", m), doc)
                inst, key = _target(src, (*at, "read", m), doc)
                sources[mname] = f"{inst}.{key}"
                produces.append(mname)
            fields["values"] = sources
        elif kind == "capture":
            if not isinstance(raw["capture"], str) or not re.fullmatch(_WORD, raw["capture"]):
                raise doc.error("names the camera instrument", (*at, "capture"))
            role = raw.get("as", "outcome")
            if not isinstance(role, str) or not re.fullmatch(_WORD, role):
                raise doc.error(
                    f"names the image (an identifier, e.g. outcome), got {role!r}", (*at, "as")
                )
            if role in captured:
                raise doc.error(
                    f"a second capture named {role!r} (give each its own 'as')", (*at, "as")
                )
            captured.append(role)
            fields.update(instrument=raw["capture"], role=role)
            bound("timeout", raw.get("timeout"), "timeout")
            produces.append(image_digest_name(role))
        elif kind == "compute":
            fields["into"] = _measure_name(raw["compute"], (*at, "compute"), doc)
            has_fn, has_expr = raw.get("function") is not None, raw.get("expr") is not None
            if has_fn == has_expr:
                raise doc.error("give function (a registered one) or expr, not both", at)
            before = set(measured) | known_inputs
            if captured:  # the frames taken so far, as JPEG bytes: one by name, or all in order
                before |= {"images", *(f"images.{c}" for c in captured)}
            if has_expr:
                if not isinstance(raw["expr"], str):
                    raise doc.error("must be an expression (a string)", (*at, "expr"))
                e = parse_at(raw["expr"], (*at, "expr"), doc, boolean=False)
                need(e.names(), before, (*at, "expr"), "an input or an earlier measurement")
                used.update(e.names() & known_inputs)
                fields["expr"] = raw["expr"]
                fields["_inputs"] = sorted(e.names() & known_inputs)
            else:
                fn = raw["function"]
                if fn not in functions:
                    raise doc.error(
                        f"unknown function {fn!r} (registered: {', '.join(sorted(functions))})",
                        (*at, "function"),
                    )
                fields["function"] = fn
                args = raw.get("args") or {}
                if not isinstance(args, Mapping):
                    raise doc.error("must be a mapping of argument -> expression", (*at, "args"))
                texts: dict[str, str] = {}
                for arg, text in args.items():
                    if not isinstance(text, str):
                        raise doc.error("must be an expression (a string)", (*at, "args", arg))
                    e = parse_at(text, (*at, "args", arg), doc, boolean=False)
                    need(
                        e.names(), before, (*at, "args", arg), "an input or an earlier measurement"
                    )
                    used.update(e.names() & known_inputs)
                    texts[str(arg)] = text
                    fields.setdefault("_inputs", [])
                    fields["_inputs"] = sorted(set(fields["_inputs"]) | (e.names() & known_inputs))
                fields["args"] = texts
            produces.append(fields["into"])
        need(bind_names, known_inputs, at, "a parameter or fixed value")
        used.update(bind_names)
        when = None
        if raw.get("when") is not None:
            if not isinstance(raw["when"], str):
                raise doc.error("must be a condition (a string)", (*at, "when"))
            when = parse_at(raw["when"], (*at, "when"), doc, boolean=True)
            need(when.names(), known_inputs, (*at, "when"), "a parameter or fixed value")
            used.update(when.names())
        has_else = "else" in raw
        if has_else and (when is None or not produces):
            raise doc.error(
                "else needs a when and a step that produces a measurement", (*at, "else")
            )
        otherwise = _value(raw.get("else"), (*at, "else"), doc).literal if has_else else None
        if has_else and isinstance(raw.get("else"), str):
            raise doc.error("else is a value (a number, true/false or a list)", (*at, "else"))
        if raw.get("doc") is not None and not isinstance(raw["doc"], str):
            raise doc.error("must be a text", (*at, "doc"))
        for m in produces:
            if m not in measured:
                measured.append(m)
        steps.append(
            _PlanStep(
                i, kind, fields, values, when, otherwise, has_else, tuple(produces), doc.line(at)
            )
        )
    return Plan(
        name,
        tuple(steps),
        tuple(measured),
        frozenset(used),
        {k: frozenset(v) for k, v in calls.items()},
    )
