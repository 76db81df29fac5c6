"""Station set-up as data: the recipes a station runs before its experiments.

A calibration, priming the lines, a white reference, zeroing a scale: work
a station does before (or between) campaigns, through its guard like any
experiment, written in the same recipe language (:mod:`loops.plan`). A lab
config lists each station's set-up recipes (``setup:``, files or inline); a
set-up recipe is a mapping::

    name: camera-calibration
    doc: the camera's fill-level calibration, from frames at known volumes
    every: once              # once (default): until labbridge setup runs it again;
                             #   campaign: before every campaign on the station
    fixed: {levels_ml: [0.0, 0.5, 1.0], step_ml: 0.5}
    recipe:
      - capture: camera
        as: level_0
      - call: pump.dispense
        args: {volume_ml: step_ml, rate_ml_min: 5}
      # ...
      - compute: calibration
        function: fit_fill_calibration
        args: {frames: images, volumes_ml: levels_ml}
    keep: [calibration]      # measurements later checks use, as setup.calibration

What a set-up keeps is saved per station (:class:`SetupStore`, a YAML file
next to the lab config) with when and by whom each recipe last ran, and given
to the station's verification (``setup.<name>`` in a program's checks).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loops.plan import Plan, Recipe, RecipeError, compile_fixed, compile_plan, plain
from safety.yamldoc import ConfigError, YamlDoc, field_path, load_yaml_file

__all__ = ["EVERY", "REFERENCE_SETUP", "SetupRecipe", "SetupStore", "compile_setup", "load_setup"]

#: the reference bench's set-up (its camera's fill-level calibration)
REFERENCE_SETUP = Path(__file__).with_name("programs") / "reference-setup.yaml"

#: when a set-up recipe runs: once (until run again by hand), or before every campaign
EVERY = ("once", "campaign")
_KEYS = ("name", "doc", "every", "fixed", "recipe", "keep")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class SetupRecipe:
    """One compiled set-up recipe: its ``name``, the bound ``recipe`` (plain data, like an
    experiment's), the measurements it ``keep``s and when it runs (``every``). ``plan`` is
    the compiled recipe (each step's line in ``source``) and ``at`` the set-up recipe's
    place in that file, for ``labbridge check`` to name a step (:meth:`where`)."""

    name: str
    recipe: Recipe
    keep: tuple[str, ...] = ()
    every: str = "once"
    doc: str = ""
    source: str = ""
    plan: Plan | None = field(default=None, repr=False, compare=False)
    at: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def where(self, step: Any, what: str = "") -> str:
        """``file:line: field`` of one of :attr:`plan`'s steps (``what``: the field in it,
        e.g. ``.call``), e.g. ``lab.yaml:12: stations.bench-a.setup[0].recipe[2].call``."""
        line = f":{step.line}" if step.line else ""
        return f"{self.source}{line}: {field_path((*self.at, 'recipe', step.index))}{what}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recipe": self.recipe.as_dict(),
            "keep": list(self.keep),
            "every": self.every,
            "doc": self.doc,
            "source": self.source,
        }


def compile_setup(
    spec: Any,
    *,
    doc: YamlDoc,
    path: tuple[Any, ...] = (),
    functions: Mapping[str, Any] | None = None,
) -> SetupRecipe:
    """Check a set-up recipe's mapping (see the module docstring) and bind it to its fixed
    values. Errors name the file, line and field (:class:`~safety.yamldoc.ConfigError`)."""
    if not isinstance(spec, Mapping):
        raise doc.error(f"a set-up recipe is a mapping with {', '.join(_KEYS)}", path)
    for key in spec:
        if key not in _KEYS:
            raise doc.error(f"unknown key '{key}' (known: {', '.join(_KEYS)})", (*path, key))
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise doc.error(
            f"a set-up recipe's name (letters, digits, _ . -), got {name!r}", (*path, "name")
        )
    every = spec.get("every", "once")
    if every not in EVERY:
        raise doc.error(f"must be one of {', '.join(EVERY)}, got {every!r}", (*path, "every"))
    text = spec.get("doc", "")
    if not isinstance(text, str):
        raise doc.error("must be a text", (*path, "doc"))
    fixed = compile_fixed(spec.get("fixed"), doc=doc, path=(*path, "fixed"))
    if "recipe" not in spec:
        raise doc.error("missing 'recipe' (the steps)", path)
    plan = compile_plan(
        spec["recipe"],
        inputs=list(fixed),
        doc=doc,
        path=(*path, "recipe"),
        functions=functions,
        name=name,
    )
    for key in fixed:
        if key not in plan.uses:
            raise doc.error(f"'{key}' is used by no step (a typo?)", (*path, "fixed", key))
    keep = spec.get("keep") or []
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise doc.error("must be a list of measurement names", (*path, "keep"))
    for i, k in enumerate(keep):
        if k not in plan.measures:
            raise doc.error(
                f"the recipe does not measure {k!r} (it measures: {', '.join(plan.measures) or 'nothing'})",
                (*path, "keep", i),
            )
    try:
        recipe = plan.bind(fixed)
    except RecipeError as exc:
        raise doc.error(str(exc), (*path, "recipe")) from None
    return SetupRecipe(name, recipe, tuple(keep), every, text, doc.source, plan, tuple(path))


def load_setup(file: str | Path, *, functions: Mapping[str, Any] | None = None) -> SetupRecipe:
    """Read and compile a set-up recipe file (YAML)."""
    data, doc = load_yaml_file(file)
    return compile_setup(data, doc=doc, functions=functions)


class SetupStore:
    """What a station's set-up recipes kept and when each last ran, in one YAML file.

    ``{"ran": {name: {"at": ISO time, "who": ...}}, "values": {kept name: value}}``;
    written atomically (a crash leaves the old file or the new one, never half)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"ran": {}, "values": {}}
        try:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"cannot read the set-up results: {exc}", source=str(self.path)
            ) from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("ran", {}), dict)
            or not isinstance(data.get("values", {}), dict)
        ):
            raise ConfigError(
                "not a set-up results file (labbridge setup writes it; delete it to set up again)",
                source=str(self.path),
            )
        return {"ran": dict(data.get("ran") or {}), "values": dict(data.get("values") or {})}

    def values(self) -> dict[str, Any]:
        return self.load()["values"]

    def pending(self, recipes: Sequence[SetupRecipe]) -> list[SetupRecipe]:
        """The recipes a campaign must run first: every ``campaign`` one, and each ``once``
        one that has not run (or whose kept values are missing)."""
        data = self.load()
        return [
            r
            for r in recipes
            if r.every == "campaign"
            or r.name not in data["ran"]
            or any(k not in data["values"] for k in r.keep)
        ]

    def record(self, recipe: SetupRecipe, kept: Mapping[str, Any], *, who: str) -> None:
        data = self.load()
        data["ran"][recipe.name] = {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "who": who,
        }
        data["values"].update(plain(dict(kept)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
