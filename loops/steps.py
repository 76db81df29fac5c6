"""A bound recipe as plain data: the concrete :class:`Step` and :class:`Recipe` of one experiment.

:meth:`loops.plan.Plan.bind` produces them from a compiled recipe (the language
is described in :mod:`loops.plan`); the dry run (:meth:`Recipe.commands`,
:meth:`Recipe.timeline`), the runner (loops/recipe.py), the station actor, the
journal and any fast model consume them. JSON round trip with ``as_dict`` /
``from_dict``; measurement names are dotted (:func:`flatten`).
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from safety import Command

__all__ = [
    "CAPTURE_ROLES",
    "STEP_KINDS",
    "Recipe",
    "RecipeError",
    "Step",
    "flatten",
    "image_digest_name",
    "plain",
]

#: the capture names campaigns know: the scene before the experiment acts, and its outcome
#: (the verified frame); a recipe may name other captures as it likes
CAPTURE_ROLES = ("reference", "outcome")
#: step kind -> the keys it takes (besides when / else / doc)
STEP_KINDS: dict[str, tuple[str, ...]] = {
    "call": ("args", "into"),
    "wait": ("every", "timeout"),
    "hold": ("while", "every"),
    "ramp": ("set", "to", "from", "per_min", "args", "step_s"),
    "read": (),
    "capture": ("as", "timeout"),
    "compute": ("function", "args", "expr"),
}


class RecipeError(ValueError):
    """A proposal the recipe cannot be bound to (an expression that fails on its values)."""


def plain(value: Any) -> Any:
    """JSON-able plain data, for what a program says and what a driver returns: mappings and
    dataclasses as dicts, sequences as lists, enums as their value, numbers as int/float
    (numpy's too), bytes as their size (images are kept by hash, not in the data); anything
    else as its text."""
    if value is None or isinstance(value, bool | str | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [plain(v) for v in value]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


# ------------------------------------------------------------------ concrete steps
@dataclass(frozen=True)
class Step:
    """One bound step: ``kind`` and its plain-data ``params`` (see the module docstring).

    ``call``: instrument, command, args, into; ``wait``: condition, every_s,
    timeout_s; ``hold``: seconds, and with ``while``: condition, every_s,
    instruments (read to check it), inputs; ``ramp``: instrument, command, set, to, from,
    per_min, args, step_s; ``read``: values (measurement -> instrument.key);
    ``capture``: instrument, role, timeout; ``compute``: into, function or
    expr, args; ``value``: into, value (a skipped step's ``else``).
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **plain(dict(self.params))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Step:
        if not isinstance(data, Mapping) or not isinstance(data.get("kind"), str):
            raise RecipeError(f"a step is a mapping with a 'kind', got {data!r}")
        if data["kind"] not in (*STEP_KINDS, "value"):
            raise RecipeError(f"unknown step kind {data['kind']!r}")
        return cls(data["kind"], {k: v for k, v in data.items() if k != "kind"})

    def __str__(self) -> str:
        p, k = self.params, self.kind
        if k == "call":
            args = ", ".join(f"{a}={_fmt(v)}" for a, v in p.get("args", {}).items())
            into = f" -> {p['into']}" if p.get("into") else ""
            return f"{p['instrument']}.{p['command']}({args}){into}"
        if k == "wait":
            return f"wait until {p['condition']}"
        if k == "hold":
            held = f" while {p['condition']}" if p.get("condition") else ""
            return f"hold {p['seconds']:g} s{held}"
        if k == "ramp":
            pace = f" at {p['per_min']:g}/min" if p.get("per_min") is not None else ""
            start = f" from {p['from']:g}" if p.get("from") is not None else ""
            return f"ramp {p['instrument']}.{p['command']} {p['set']}{start} to {p['to']:g}{pace}"
        if k == "read":
            return "read " + ", ".join(f"{m} <- {src}" for m, src in p["values"].items())
        if k == "capture":
            return f"capture {p['instrument']} ({p['role']})"
        if k == "compute":
            what = p.get("expr") or f"{p['function']}({', '.join(p.get('args', {}))})"
            return f"compute {p['into']} = {what}"
        return f"{p['into']} = {_fmt(p['value'])}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


@dataclass(frozen=True)
class Recipe:
    """One experiment as data: the bound ``steps``, the ``params`` they were bound from, the
    plan's ``name``. JSON round trip with :meth:`as_dict` / :meth:`from_dict`."""

    steps: tuple[Step, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    #: the program's analyses and checks (loops/checks.py) with the inputs they may use
    verification: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "verification", dict(self.verification))

    def __len__(self) -> int:
        return len(self.steps)

    def __str__(self) -> str:
        head = f"recipe {self.name}" if self.name else "recipe"
        if self.params:
            head += " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items()) + ")"
        return "\n".join([head, *(f"  {i}. {s}" for i, s in enumerate(self.steps))])

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "params": plain(dict(self.params)),
            "steps": [s.as_dict() for s in self.steps],
        }
        if self.verification:
            out["verification"] = plain(dict(self.verification))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping) or not isinstance(data.get("steps"), list):
            raise RecipeError("a recipe is a mapping with a list of 'steps'")
        verification = data.get("verification") or {}
        if not isinstance(verification, Mapping):
            raise RecipeError("a recipe's verification is a mapping")
        return cls(
            tuple(Step.from_dict(s) for s in data["steps"]),
            dict(data.get("params") or {}),
            str(data.get("name") or ""),
            dict(verification),
        )

    def commands(self, who: str) -> list[Command]:
        """The commands the recipe sends, in order, for the safety layer's dry run: every
        ``call`` (reads included: the dry run passes them) and a ``ramp``'s first and last
        setpoint (at run time each setpoint between is checked by the guard as it is sent)."""
        return [c for c, _ in self.timeline(who, 0.0)]

    def timeline(
        self,
        who: str,
        start: float,
        *,
        flow_s: Callable[[Command], float | None] | None = None,
        rise_per_min: Callable[[str, str, str], float | None] | None = None,
        from_value: Callable[[str, str, str], float | None] | None = None,
        resolution: Callable[[str, str, str], float | None] | None = None,
    ) -> list[tuple[Command, float]]:
        """Each command with the time it would be sent (seconds from ``start``, the guard's
        clock), estimated from the steps: ``hold`` and a ramp take their time; a flow keeps
        its instrument busy for ``flow_s(command)`` seconds (the station's declarations) and
        the next call to that instrument or ``wait`` on its readings (a wait for it, a read
        of what it moved) comes after it; other waits and reads are instantaneous. ``rise_per_min(instrument, command, arg)``:
        the envelope's limit on that setpoint's rise, ``from_value``: its current value (a
        ramp without ``from`` starts there), ``resolution``: the device's step for it (a
        ramp ends on that grid, as it does at run time)."""
        out: list[tuple[Command, float]] = []
        t = start
        busy: dict[str, float] = {}
        for s in self.steps:
            p = s.params
            if s.kind == "call":
                name = p["instrument"]
                t = max(t, busy.pop(name, t))
                command = Command(name, p["command"], dict(p.get("args", {})), who)
                out.append((command, t))
                seconds = flow_s(command) if flow_s is not None else None
                if seconds:
                    busy[name] = t + seconds
            elif s.kind == "wait":  # waiting on an instrument's readings outlasts its flow
                t = max([t, *(busy.pop(n, t) for n in p.get("instruments", ()))])
            elif s.kind == "hold":
                t += float(p["seconds"])
            elif s.kind == "ramp":
                name, cmd, arg = p["instrument"], p["command"], p["set"]
                t = max(t, busy.pop(name, t))
                target = float(p["to"])
                grid = resolution(name, cmd, arg) if resolution is not None else None
                if grid:
                    target = round(round(target / grid) * grid, 9)
                first = p.get("from")
                if first is None and from_value is not None:
                    first = from_value(name, cmd, arg)
                limit = rise_per_min(name, cmd, arg) if rise_per_min is not None else None
                pace = p.get("per_min")
                args = dict(p.get("args", {}))
                if p.get("from") is not None and float(p["from"]) < target:
                    out.append((Command(name, cmd, {**args, arg: float(p["from"])}, who), t))
                if first is not None and float(first) < target:
                    rates = [r for r in (pace, limit) if r]
                    if rates:
                        t += 60.0 * (target - float(first)) / min(rates)
                out.append((Command(name, cmd, {**args, arg: target}, who), t))
        return out


def image_digest_name(role: str) -> str:
    """The measurement holding a capture's SHA-256: ``image_sha256`` for the outcome,
    ``<name>_sha256`` for any other."""
    return "image_sha256" if role == "outcome" else f"{role}_sha256"


def flatten(name: str, value: Any, out: dict[str, Any]) -> None:
    """``out[name] = value`` and, for a mapping, each of its keys as ``name.key`` (nested):
    the dotted names a recipe's expressions and a program's checks use for measurements."""
    out[name] = value
    if isinstance(value, Mapping):
        for k, v in value.items():
            flatten(f"{name}.{k}", v, out)
