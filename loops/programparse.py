"""The fields of a program's front matter, checked one by one, and the :class:`Program` they
make (:func:`build_program`); :mod:`loops.program` reads the file and documents the fields.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

from loops.approval import parse_approval
from loops.checks import compile_verification
from loops.optcost import CostSpec, cost_spec_problem
from loops.optregistry import STRATEGY_NAMES
from loops.optspace import CHOICE_KINDS, choice_index, parse_choices
from loops.plan import Plan, compile_fixed, compile_plan, plain
from loops.programmodel import (
    Budget,
    Constraint,
    Objective,
    Parameter,
    Program,
    ProgramError,
    StopRules,
    finite,
    is_number,
    plain_number,
    show_value,
)
from safety.expr import Compare, Expression, ListLit, Member, Name, Num, RuleSyntaxError, Str, parse
from safety.yamldoc import YamlDoc, field_path

TOP_KEYS = (
    "name",
    "parameters",
    "constraints",
    "objective",
    "objectives",
    "budget",
    "stop",
    "strategy",
    "initial_points",
    "stations",
    "seed",
    "recipe",
    "fixed",
    "verification",
    "approval",
    "prior",
    "feasibility",
    "cost",
)
REQUIRED_KEYS = ("name", "parameters", "budget", "recipe")  # and objective or objectives
PARAMETER_KEYS = ("type", "low", "high", "unit", "doc")
CHOICE_KEYS = ("type", "choices", "unit", "doc")
PARAMETER_TYPES = ("float", "int", *CHOICE_KINDS)
OBJECTIVE_KEYS = ("measure", "direction")
OBJECTIVES_KEYS = ("measure", "direction", "threshold")
DIRECTIONS = ("minimize", "maximize")
BUDGET_KEYS = ("experiments", "hours")
STOP_KEYS = ("target", "no_improvement", "at_thresholds")
#: ``feasibility:``: learned from refusals, failures and unverified results, or declared only
FEASIBILITY = ("learned", "declared")
#: ``cost:`` as a mapping (or just the ``of``: ``cost: duration``)
COST_KEYS = ("of", "power")
_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEASURE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_RESERVED = {"and", "or", "not", "in", "true", "false", "True", "False"}


def _no_huge_integers(data: Any, doc: YamlDoc) -> None:
    """Refuse an integer too large for a float anywhere in the spec (JSON and YAML allow
    10**400; every check that compares it with a float would raise OverflowError)."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
        elif is_number(value) and isinstance(value, numbers.Integral) and not finite(value):
            raise doc.error(f"must be a number (finite), got {show_value(value)}", path)


# ----------------------------------------------------------------- validation
def _no_unknown(
    spec: Mapping[Any, Any], allowed: Sequence[str], path: tuple[Any, ...], doc: YamlDoc
) -> None:
    for key in spec:
        if key not in allowed:
            raise doc.error(f"unknown key '{key}' (known: {', '.join(allowed)})", (*path, key))


def _mapping(value: Any, path: tuple[Any, ...], doc: YamlDoc, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise doc.error(f"must be a mapping ({what}), got {type(value).__name__}", path)
    return value


def _number(value: Any, path: tuple[Any, ...], doc: YamlDoc) -> float:
    if not finite(value):
        raise doc.error(f"must be a number (finite), got {show_value(value)}", path)
    return plain_number(value)


def _integer(value: Any, path: tuple[Any, ...], doc: YamlDoc, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise doc.error(f"must be an integer, got {value!r}", path)
    if minimum is not None and value < minimum:
        raise doc.error(f"must be >= {minimum}, got {value!r}", path)
    return int(value)


def _string(value: Any, path: tuple[Any, ...], doc: YamlDoc, choices: Sequence[str] = ()) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(f"must be a non-empty string, got {value!r}", path)
    if choices and value not in choices:
        raise doc.error(f"must be one of {', '.join(choices)}, got {value!r}", path)
    return value


def _cost(value: Any, plan: Any, doc: YamlDoc) -> CostSpec | None:
    """``cost:``: ``duration``, a consumed channel (``<pump>.delivered``), or ``{of, power}``."""
    if value is None:
        return None
    path: tuple[Any, ...] = ("cost",)
    power = 1.0
    of = value
    if isinstance(value, Mapping):
        _no_unknown(value, COST_KEYS, path, doc)
        if "of" not in value:
            raise doc.error(
                "needs of: duration or a consumed channel (e.g. <pump>.delivered)", path
            )
        of = value["of"]
        if value.get("power") is not None:
            power = _number(value["power"], (*path, "power"), doc)
            if not 0.0 < power <= 4.0:
                raise doc.error(f"must be > 0 and <= 4, got {power!r}", (*path, "power"))
        path = (*path, "of")
    called = sorted({s.fields["instrument"] for s in plan.steps if s.kind in ("call", "ramp")})
    problem = cost_spec_problem(of, called)
    if problem is not None:
        raise doc.error(problem, path)
    return CostSpec(str(of), power)


def _prior(value: Any, doc: YamlDoc) -> tuple[str, ...]:
    """``prior:``: a campaign id, or a list of them, whose results start this campaign."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not ids:
        raise doc.error("a campaign id or a list of campaign ids, got an empty list", ("prior",))
    out = [_string(v, ("prior",), doc) for v in ids]
    if len(set(out)) != len(out):
        raise doc.error(f"a campaign is named twice in {out}", ("prior",))
    return tuple(out)


def _parameter(name: Any, spec: Any, doc: YamlDoc) -> Parameter:
    path: tuple[Any, ...] = ("parameters", name)
    if not isinstance(name, str) or not _IDENT_RE.fullmatch(name) or name in _RESERVED:
        raise doc.error(
            f"parameter names are identifiers (letters, digits, _; not a keyword), got {name!r}",
            path,
        )
    spec = _mapping(spec, path, doc, "{type, low, high, unit} or {type, choices}")
    if "type" not in spec:
        _no_unknown(spec, (*PARAMETER_KEYS, "choices"), path, doc)
        raise doc.error("missing 'type'", path)
    kind = _string(spec["type"], (*path, "type"), doc, PARAMETER_TYPES)
    unit = spec.get("unit", "")
    docstr = spec.get("doc", "")
    for key, v in (("unit", unit), ("doc", docstr)):
        if not isinstance(v, str):
            raise doc.error(f"must be a string, got {v!r}", (*path, key))
    if kind in CHOICE_KINDS:
        for key in ("low", "high"):
            if key in spec:
                raise doc.error(
                    f"a {kind} parameter takes 'choices' (a list), not low/high", (*path, key)
                )
        _no_unknown(spec, CHOICE_KEYS, path, doc)
        if "choices" not in spec:
            raise doc.error(f"missing 'choices' (a {kind} parameter's values, a list)", path)
        try:
            choices = parse_choices(kind, spec["choices"])
        except ValueError as exc:
            raise doc.error(str(exc), (*path, "choices")) from None
        return Parameter(name, kind, 0, len(choices) - 1, unit, docstr, choices)
    if "choices" in spec:
        raise doc.error(
            f"'choices' is for categorical/ordinal parameters; a {kind} one takes low and high",
            (*path, "choices"),
        )
    _no_unknown(spec, PARAMETER_KEYS, path, doc)
    for key in ("low", "high"):
        if key not in spec:
            raise doc.error(f"missing '{key}'", path)
    low = _number(spec["low"], (*path, "low"), doc)
    high = _number(spec["high"], (*path, "high"), doc)
    if kind == "int":
        for key, v in (("low", low), ("high", high)):
            if float(v) != round(float(v)):
                raise doc.error(f"an int parameter needs integer bounds, got {v!r}", (*path, key))
        low, high = int(low), int(high)
    else:
        low, high = float(low), float(high)
    if not low < high:
        raise doc.error(f"low {low!r} must be < high {high!r}", (*path, "low"))
    return Parameter(name, kind, low, high, unit, docstr)


def _constraint(i: int, text: Any, known: set[str], doc: YamlDoc) -> Constraint:
    path: tuple[Any, ...] = ("constraints", i)
    if not isinstance(text, str) or not text.strip():
        raise doc.error(f"a constraint is a rule (a string), got {text!r}", path)
    line, column, _ = doc.scalars.get(path, (doc.line(path) or 1, 1, 0))
    has_lines = path in doc.scalars
    try:
        expr = parse(text, source=doc.source, line=line, column=column)
    except RuleSyntaxError as exc:
        raise ProgramError(
            f'{exc.problem} in rule "{text}" (column {exc.column})',
            source=doc.source,
            line=exc.line if has_lines else None,
            field=field_path(path),
        ) from None
    for n in sorted(expr.names()):
        if n not in known:
            raise doc.error(
                f"unknown name '{n}' in \"{text}\" (known: {', '.join(sorted(known))})", path
            )
    return Constraint(text, expr, doc.line(path))


def _objective(
    spec: Any, doc: YamlDoc, path: tuple[Any, ...] = ("objective",), keys: Sequence[str] = ()
) -> Objective:
    keys = keys or OBJECTIVE_KEYS
    spec = _mapping(spec, path, doc, "{" + ", ".join(keys) + "}")
    if "threshold" in spec and "threshold" not in keys:
        raise doc.error(
            "a single objective has no threshold: stop when it is reached with stop.target",
            (*path, "threshold"),
        )
    _no_unknown(spec, keys, path, doc)
    if "measure" not in spec:
        raise doc.error("missing 'measure'", path)
    measure = _string(spec["measure"], (*path, "measure"), doc)
    if not _MEASURE_RE.fullmatch(measure):
        raise doc.error(
            f"a measurement name is identifiers joined by dots, got {measure!r}", (*path, "measure")
        )
    direction = _string(spec.get("direction", "minimize"), (*path, "direction"), doc, DIRECTIONS)
    threshold = None
    if spec.get("threshold") is not None:
        threshold = float(_number(spec["threshold"], (*path, "threshold"), doc))
    return Objective(measure, direction, threshold)


def _objectives(data: Mapping[str, Any], doc: YamlDoc) -> tuple[Objective, ...]:
    """``objective`` (one) or ``objectives`` (a list of two or more, distinct measures)."""
    if data.get("objective") is not None and data.get("objectives") is not None:
        raise doc.error(
            "give 'objective' (one) or 'objectives' (a list of several), not both", ("objectives",)
        )
    if data.get("objectives") is None:
        if data.get("objective") is None:
            raise doc.error("missing required field 'objective' (or 'objectives')", ())
        return (_objective(data["objective"], doc),)
    raw = data["objectives"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise doc.error(
            "a list of two or more {measure, direction, threshold?} (one objective: use "
            f"'objective'), got {raw!r}",
            ("objectives",),
        )
    out = tuple(_objective(o, doc, ("objectives", i), OBJECTIVES_KEYS) for i, o in enumerate(raw))
    seen: set[str] = set()
    for i, o in enumerate(out):
        if o.measure in seen:
            raise doc.error(f"{o.measure!r} is already an objective", ("objectives", i, "measure"))
        seen.add(o.measure)
    return out


def _budget(spec: Any, doc: YamlDoc) -> Budget:
    path: tuple[Any, ...] = ("budget",)
    spec = _mapping(spec, path, doc, "{experiments, hours}")
    _no_unknown(spec, BUDGET_KEYS, path, doc)
    experiments = hours = None
    if spec.get("experiments") is not None:
        experiments = _integer(spec["experiments"], (*path, "experiments"), doc, minimum=1)
    if spec.get("hours") is not None:
        hours = float(_number(spec["hours"], (*path, "hours"), doc))
        if hours <= 0:
            raise doc.error(f"must be > 0, got {hours!r}", (*path, "hours"))
    if experiments is None and hours is None:
        raise doc.error("give experiments and/or hours (a campaign needs a limit)", path)
    return Budget(experiments, hours)


def _stop(spec: Any, doc: YamlDoc, objectives: Sequence[Objective]) -> StopRules:
    path: tuple[Any, ...] = ("stop",)
    if spec is None:
        return StopRules()
    spec = _mapping(spec, path, doc, "{" + ", ".join(STOP_KEYS) + "}")
    _no_unknown(spec, STOP_KEYS, path, doc)
    target = None
    if spec.get("target") is not None:
        if len(objectives) > 1:
            raise doc.error(
                "several objectives have no single target: give each a threshold and "
                "stop: {at_thresholds: true}",
                (*path, "target"),
            )
        target = float(_number(spec["target"], (*path, "target"), doc))
    patience = None
    if spec.get("no_improvement") is not None:
        patience = _integer(spec["no_improvement"], (*path, "no_improvement"), doc, minimum=1)
    at_thresholds = spec.get("at_thresholds", False)
    if not isinstance(at_thresholds, bool):
        raise doc.error(f"must be true or false, got {at_thresholds!r}", (*path, "at_thresholds"))
    if at_thresholds and (len(objectives) < 2 or any(o.threshold is None for o in objectives)):
        raise doc.error(
            "at_thresholds needs several objectives, each with a threshold "
            "(one objective: use target)",
            (*path, "at_thresholds"),
        )
    return StopRules(target, patience, at_thresholds)


def _fixed(spec: Any, params: set[str], doc: YamlDoc) -> dict[str, Any]:
    return compile_fixed(spec, doc=doc, taken=params)


def _plan(
    spec: Any,
    params: Sequence[str],
    fixed: Mapping[str, Any],
    constraints: Sequence[Constraint],
    objectives: Sequence[Objective],
    name: str,
    doc: YamlDoc,
    functions: Mapping[str, Any] | None,
) -> Plan:
    """Compile the recipe and check it against the rest: every parameter and fixed value is
    used (by the recipe or a constraint), the objective is one of its measurements."""
    plan = compile_plan(spec, inputs=[*params, *fixed], doc=doc, functions=functions, name=name)
    in_constraints = set().union(*(c.expression.names() for c in constraints))
    for p in params:
        if p not in plan.uses:
            raise doc.error(
                f"parameter '{p}' is not used by the recipe: the optimizer would search it "
                f"for nothing (use it in a step, or remove it)",
                ("parameters", p),
            )
    for key in fixed:
        if key not in plan.uses and key not in in_constraints:
            raise doc.error(
                f"'{key}' is used by no step and no constraint (a typo?)", ("fixed", key)
            )
    for i, o in enumerate(objectives):
        if o.measure not in plan.measures:
            raise doc.error(
                f"the recipe does not measure {o.measure!r} (it measures: "
                f"{', '.join(plan.measures) or 'nothing'})",
                ("objectives", i, "measure") if len(objectives) > 1 else ("objective", "measure"),
            )
    return plan


def _unknown_choice(expr: Expression, parameters: Sequence[Parameter]) -> str | None:
    """A comparison of a categorical/ordinal parameter with a literal that is none of its
    choices (``mode == 'hott'``: always false, a typo), as a message; None if there is none."""
    choices = {p.name: p.choices for p in parameters if p.choices}
    if not choices:
        return None
    for node in expr.ast.walk():
        pairs: list[tuple[Any, Any]] = []
        if isinstance(node, Compare):
            for op, a, b in zip(node.ops, node.operands, node.operands[1:], strict=False):
                if op in ("==", "!="):
                    pairs += [(a, b), (b, a)]
        elif isinstance(node, Member) and isinstance(node.items, ListLit):
            pairs += [(node.value, item) for item in node.items.items]
        for name, lit in pairs:
            if (
                isinstance(name, Name)
                and name.name in choices
                and isinstance(lit, Str | Num)
                and choice_index(choices[name.name], lit.value) is None
            ):
                listed = ", ".join(repr(c) for c in choices[name.name])
                return (
                    f'{lit.value!r} is not a choice of {name.name} in "{expr.text}" '
                    f"(choices: {listed})"
                )
    return None


def _check_choices(
    parameters: Sequence[Parameter], constraints: Sequence[Constraint], plan: Plan, doc: YamlDoc
) -> None:
    """Every literal a constraint or a recipe step compares a choice parameter with is one
    of its choices."""
    for i, c in enumerate(constraints):
        problem = _unknown_choice(c.expression, parameters)
        if problem:
            raise doc.error(problem, ("constraints", i))
    for step in plan.steps:
        exprs = [("when", step.when)] + [(k, v.expr) for k, v in step.values.items()]
        for key, expr in exprs:
            problem = _unknown_choice(expr, parameters) if expr is not None else None
            if problem:
                raise doc.error(problem, ("recipe", step.index, *key.split(".")))


def build_program(
    data: Any, doc: YamlDoc, body: str, functions: Mapping[str, Any] | None
) -> Program:
    """The :class:`Program` of a front matter given as plain data (``doc`` notes where each
    field came from: its errors name the line); ``body``: the Markdown after it."""
    _no_huge_integers(data, doc)
    if not isinstance(data, Mapping):
        raise doc.error(f"the front matter is a mapping with {', '.join(REQUIRED_KEYS)}, ...", ())
    _no_unknown(data, TOP_KEYS, (), doc)
    for key in REQUIRED_KEYS:
        if data.get(key) is None:
            raise doc.error(f"missing required field '{key}'", ())
    name = _string(data["name"], ("name",), doc)
    if not _SLUG_RE.fullmatch(name):
        raise doc.error(f"a name is a slug (letters, digits, _.-), got {name!r}", ("name",))
    pspec = _mapping(data["parameters"], ("parameters",), doc, "name -> {type, low, high}")
    if not pspec:
        raise doc.error("needs at least one parameter", ("parameters",))
    parameters = tuple(_parameter(k, v, doc) for k, v in pspec.items())
    pnames = {p.name for p in parameters}
    fixed = _fixed(data.get("fixed"), pnames, doc)
    raw_constraints = data.get("constraints") or []
    if not isinstance(raw_constraints, list):
        raise doc.error("must be a list of rules", ("constraints",))
    known = pnames | {k for k, v in fixed.items() if is_number(v) or isinstance(v, bool | str)}
    constraints = tuple(_constraint(i, t, known, doc) for i, t in enumerate(raw_constraints))
    objectives = _objectives(data, doc)
    budget = _budget(data["budget"], doc)
    stop = _stop(data.get("stop"), doc, objectives)
    strategy = _string(data.get("strategy", "bayes"), ("strategy",), doc, STRATEGY_NAMES)
    prior = _prior(data.get("prior"), doc)
    feasibility = _string(data.get("feasibility", "learned"), ("feasibility",), doc, FEASIBILITY)
    if data.get("initial_points") is not None:
        initial = _integer(data["initial_points"], ("initial_points",), doc, minimum=0)
        if budget.experiments is not None and initial > budget.experiments:
            raise doc.error(
                f"{initial} initial points exceed budget.experiments {budget.experiments}",
                ("initial_points",),
            )
    elif prior:
        initial = 0  # the prior campaigns' results are the design
    else:
        initial = max(4, 2 * len(parameters))
        if budget.experiments is not None:
            initial = min(initial, budget.experiments)
    stations = _integer(data.get("stations", 1), ("stations",), doc, minimum=1)
    seed = _integer(data.get("seed", 0), ("seed",), doc)
    plan = _plan(
        data["recipe"],
        [p.name for p in parameters],
        fixed,
        constraints,
        objectives,
        name,
        doc,
        functions,
    )
    _check_choices(parameters, constraints, plan, doc)
    cost = _cost(data.get("cost"), plan, doc)
    verification = compile_verification(
        data.get("verification"),
        measures=plan.measures,
        inputs=[*(p.name for p in parameters), *fixed],
        doc=doc,
    )
    approval = parse_approval(
        data.get("approval"),
        doc,
        ("approval",),
        where="program.md approval",
        known=sorted(known),
        campaign=True,
    )
    return Program(
        name=name,
        parameters=parameters,
        objective=objectives[0],
        objectives=objectives if len(objectives) > 1 else (),
        budget=budget,
        recipe=plain(data["recipe"]),
        plan=plan,
        verification=verification,
        constraints=constraints,
        stop=stop,
        strategy=strategy,
        initial_points=initial,
        stations=stations,
        seed=seed,
        fixed=fixed,
        body=body,
        source=doc.source,
        approval=approval,
        prior=prior,
        feasibility=feasibility,
        cost=cost,
    )
