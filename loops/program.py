"""Campaign specs: a ``program.md`` is YAML front matter for the machine and Markdown for people.

::

    ---
    name: neutralise
    parameters:                      # the search space
      solvent_ml:  {type: float, low: 0.0, high: 1.2, unit: mL}
      reagent_ml:  {type: float, low: 0.0, high: 1.2, unit: mL}
      hold_s:   {type: int, low: 30, high: 600, unit: s}
    constraints:                     # optional; the safety layer's rule language
      - solvent_ml + reagent_ml <= 2.0
    objective:
      measure: off_target            # a measurement the recipe produces
      direction: minimize            # minimize | maximize
    budget: {experiments: 60, hours: 4}
    stop: {target: 0.05, no_improvement: 20}
    strategy: bayes                  # bayes | random | grid
    initial_points: 8
    stations: 1
    seed: 1
    fixed: {stir_rpm: 300, target_ph: 7.0}  # constants of the experiment
    recipe:                          # the experiment's steps (loops/plan.py)
      - call: hotplate.set_stirrer
        args: {on: true, rpm: stir_rpm}
      - ...
    ---
    # Markdown body: what the experiment is, for people and agents

Fields (every one is validated; an unknown key is an error, so a typo never
passes silently; errors read ``<file>:<line>: <field>: <problem>``):

``name`` (required)
    a slug (letters, digits, ``_.-``).
``parameters`` (required)
    name -> ``{type: float|int, low, high, unit?, doc?}``; names are
    identifiers usable in constraints; ``int`` bounds are integers;
    ``low < high``. Or ``{type: categorical|ordinal, choices: [...], unit?,
    doc?}``: one of two or more distinct strings/numbers (an ordinal's in
    order); a constraint or recipe expression that compares one with a value
    that is none of its choices is an error (docs/optimizer.md).
``constraints``
    a list of rules in the safety layer's expression language
    (:mod:`safety.expr`) over the parameter (and ``fixed``) names; a proposal
    that breaks one is infeasible before any dry run.
``objective`` (required, or ``objectives``)
    ``measure``: the name of a measurement the recipe produces;
    ``direction``: ``minimize``/``maximize``.
``objectives``
    instead of ``objective``: a list of two or more ``{measure, direction,
    threshold?}`` (distinct measures); the optimizer proposes along their
    Pareto front (:mod:`loops.optmulti`).
``budget`` (required, at least one limit)
    ``experiments`` (int >= 1): experiments run on a station;
    ``hours`` (> 0): of the campaign's clock (simulated hours on a simulated
    bench).
``stop``
    ``target``: stop when the objective reaches it (``<=`` when minimising,
    ``>=`` when maximising); ``no_improvement`` (int >= 1): stop after that
    many experiments in a row without a better value (several objectives:
    without a new point on the Pareto front); ``at_thresholds`` (several
    objectives, each with a threshold; no ``target`` then): stop when one
    result meets every threshold.
``strategy``
    ``bayes`` (default), ``random`` or ``grid``.
``initial_points``
    space-filling points before the model is used (default ``max(4, 2 x
    dimensions)``, capped by the experiment budget); at most
    ``budget.experiments``.
``stations`` (default 1), ``seed`` (default 0): integers.
``recipe`` (required)
    the experiment as a list of steps over the station's instruments
    (:mod:`loops.plan`), compiled once; every parameter must be used by it,
    the objective's ``measure`` must be one of its measurements. Or the name of
    a YAML file that holds that list (``recipe: steps.yaml``, relative to the
    program's file; read only when the program is loaded from its file): its
    errors name that file's lines, and the loaded program carries the steps
    themselves (:meth:`Program.to_markdown`, what the journal keeps).
``verification``
    how each result is verified (:mod:`loops.checks`): ``analyses`` (registered
    functions computed once, e.g. the camera's) and ``checks`` (two
    measurements agree within a tolerance, a function of them is bounded, a
    condition holds); a result that fails one is kept as unverified.
``fixed``
    constants of the experiment (name -> number, string, boolean or list),
    used by the recipe's expressions and the constraints; names must not
    clash with parameters, and each must be used somewhere.
``approval``
    when an agent's proposal waits for a human before it may run: ``auto``
    (default), ``human``, or ``{human_when: <rule>, trusted: [...], expires: 2h,
    max_awaiting: 16}`` (:mod:`loops.approval`); the rule's names are the
    parameters, the fixed values, ``agent`` and ``trusted``.

:func:`load_program` reads a file, Markdown text, or the front matter as a
mapping (the MQTT API sends a JSON object). Compute functions are the
registered ones (:mod:`loops.functions`) unless others are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loops.programmodel import (
    Budget,
    Constraint,
    Objective,
    Parameter,
    Program,
    ProgramError,
    Space,
    StopRules,
)
from loops.programparse import build_program
from safety.yamldoc import YamlDoc, compose_yaml, load_yaml_file

__all__ = [
    "PROGRAMS_DIR",
    "Budget",
    "Constraint",
    "Objective",
    "Parameter",
    "Program",
    "ProgramError",
    "Space",
    "StopRules",
    "builtin_program",
    "load_program",
]


def _compose(text: str, doc: YamlDoc) -> Any:
    """Front-matter YAML -> plain data, noting the line of every key and item in ``doc``."""
    return compose_yaml(text, doc, what="front matter is ", key_types=(str,))


#: the programs that ship with labbridge (``labbridge sim`` runs the reference bench's)
PROGRAMS_DIR = Path(__file__).with_name("programs")


def builtin_program(name: str) -> Path:
    """The path of a program that ships with labbridge (``loops/programs/<name>.md``)."""
    path = PROGRAMS_DIR / f"{name}.md"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROGRAMS_DIR.glob("*.md")))
        raise ProgramError(f"no built-in program {name!r} (known: {known})", source=str(path))
    return path


def split_front_matter(text: str, source: str = "<program>") -> tuple[str, str]:
    """``program.md`` text -> (front matter YAML, Markdown body). The file must start with a
    ``---`` line; the front matter ends at the next ``---`` (or ``...``) line."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise ProgramError(
            "a program.md starts with YAML front matter: a '---' line, the fields, a '---' line",
            source=source,
            line=1,
        )
    for i in range(1, len(lines)):
        if lines[i].rstrip("\r\n").rstrip() in ("---", "..."):
            front = "".join(lines[1:i])
            body = "".join(lines[i + 1 :])
            return front, body
    raise ProgramError(
        "the front matter is not closed: no '---' line after the fields", source=source, line=1
    )


def load_program(
    path_or_text: str | Path | Mapping[str, Any],
    *,
    source: str | None = None,
    body: str | None = None,
    functions: Mapping[str, Any] | None = None,
    files: bool = True,
) -> Program:
    """Load and validate a campaign spec.

    ``path_or_text``: a :class:`~pathlib.Path` (or a one-line ``str`` naming a
    file) is read; any other ``str`` is ``program.md`` text; a mapping is the
    front matter as data (JSON from the MQTT API; errors then carry no line
    numbers), with ``body`` as its Markdown. ``source`` names it in messages
    (default: the path, ``<program>``). ``functions``: the compute functions the
    recipe may name (default: the registered ones, :mod:`loops.functions`).
    ``files=False`` (a program from outside, e.g. the MQTT or MCP API): a ``str`` is always
    text, never a file name on this machine.

    Raises :class:`ProgramError` (a ``ValueError``) naming the file, the line and the field.
    """
    recipe_doc: YamlDoc | None = None
    if (
        files
        and isinstance(path_or_text, str)
        and "\n" not in path_or_text
        and not path_or_text.startswith("---")
    ):
        path_or_text = Path(path_or_text)
    if isinstance(path_or_text, Path):
        name = source or str(path_or_text)
        try:
            text = path_or_text.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProgramError(f"cannot read: {exc.strerror or exc}", source=name) from None
        front, md = split_front_matter(text, name)
        doc = YamlDoc(name, offset=1, error_cls=ProgramError)
        data = _compose(front, doc)
        if isinstance(data, Mapping) and isinstance(data.get("recipe"), str):
            steps, recipe_doc = _recipe_file(data["recipe"], path_or_text, doc)
            data = {**data, "recipe": steps}
    elif isinstance(path_or_text, str):
        name = source or "<program>"
        front, md = split_front_matter(path_or_text, name)
        doc = YamlDoc(name, offset=1, error_cls=ProgramError)
        data = _compose(front, doc)
    elif isinstance(path_or_text, Mapping):
        name = source or "<program>"
        doc = YamlDoc(name, error_cls=ProgramError)
        data, md = path_or_text, body or ""
    else:
        raise TypeError(
            f"a program is a path, program.md text or a mapping, not {type(path_or_text).__name__}"
        )
    if body is not None:
        md = body
    return build_program(data, doc, md, functions, recipe_doc=recipe_doc)


def _recipe_file(name: str, program: Path, doc: YamlDoc) -> tuple[Any, YamlDoc]:
    """``recipe: <file>``: the steps in that YAML file (relative to the program's folder),
    and the document whose errors name its lines."""
    path = Path(name)
    if not path.is_absolute():
        path = program.parent / path
    if not name.strip() or not path.is_file():
        raise doc.error(
            f"no recipe file {str(path)!r} (the steps, or a YAML file of them relative to "
            "this program's folder)",
            ("recipe",),
        )
    return load_yaml_file(path, error_cls=ProgramError)
