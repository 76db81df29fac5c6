"""Verification as data: the checks a program declares, run after each experiment.

An experiment's result is only as good as the evidence that it happened as
reported: a clogged pump acknowledges and delivers less, a sensor reads a
bubble. A program says how its results are verified, in its front matter::

    verification:
      analyses:                    # computed once per experiment, before the checks
        - name: camera
          function: camera_analysis            # a registered function (loops/functions.py)
          args: {image: images.outcome, reference: images.reference, calibration: setup.calibration}
      checks:
        - name: fill level                     # two measurements agree within a tolerance
          expr: camera.fill_ml - total_ml
          within: 0.15
        - name: probe steady                   # a function of measurements, bounded
          function: maximum
          args: {values: ph_drift}
          max: 0.05
        - name: scene                          # a condition holds
          expect: camera.scene_ok
          explain: camera.scene                # shown when it fails

Names in ``args``, ``expr`` and ``expect`` are the experiment's measurements
(dotted names as the recipe wrote them), its parameters and fixed values, the
analyses' results (``camera.fill_ml``), ``images.<name>`` (the JPEG bytes of
the recipe's captures: ``images.outcome``, ``images.reference``..., None
without one) and ``setup.<name>`` (what the station's set-up recipes kept,
e.g. ``setup.calibration``: a camera calibration; None when not set up).
A check passes when its value is within ``min``/``max``, within ``±within``,
or (``expect``) true. An analysis that raises, or returns a mapping whose
``problems`` list is not empty, and a check that cannot be evaluated (a name
that is not there, a value that is None) make the result unverified with
"cannot verify" reasons, never silently verified.

The outcome (:class:`Verification`) is ``verified`` True (every check passed),
False (with every reason) or None (the station does not verify, or the
program declares no checks). An unverified result is kept with its reasons
and images, reported, and told to the optimizer as ``untrusted``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loops import functions as registry
from loops.plan import flatten, parse_at, plain
from safety.expr import EvaluationError, parse
from safety.yamldoc import YamlDoc

__all__ = [
    "CONTEXT_PREFIXES",
    "Verification",
    "checks_scope",
    "compile_verification",
    "run_checks",
    "verification_reads",
    "verify_scope",
]

#: what the station provides to analyses and checks besides the measurements and inputs:
#: ``images.<capture>`` and ``setup.<kept value>``
CONTEXT_PREFIXES = frozenset({"images", "setup"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .:-]*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LIMITS = ("min", "max", "within")


@dataclass(frozen=True)
class Verification:
    """One experiment's verification: ``verified`` (True/False/None), the reasons it is not,
    each check's numbers, and the analyses' results (JSON-able, for the store and MQTT)."""

    verified: bool | None
    reasons: tuple[str, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] | None = None

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "reasons": list(self.reasons),
            "checks": dict(self.checks),
            "analysis": self.analysis,
        }


def _text(spec: Mapping[str, Any], key: str, path: tuple[Any, ...], doc: YamlDoc) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise doc.error("must be a text", (*path, key))
    return value


def _names_ok(
    text: str,
    path: tuple[Any, ...],
    doc: YamlDoc,
    known: set[str],
    prefixes: set[str],
    *,
    boolean: bool,
) -> None:
    for name in sorted(parse_at(text, path, doc, boolean=boolean).names()):
        if name in known or name.split(".", 1)[0] in prefixes | CONTEXT_PREFIXES:
            continue
        if any(name.startswith(m + ".") for m in known):
            continue  # a key of a measurement that is a mapping (reading.ph)
        raise doc.error(
            f"unknown name '{name}' (a measurement, an input, an analysis, "
            "images.<capture> or setup.<kept value>)",
            path,
        )


def _call(
    spec: Mapping[str, Any],
    at: tuple[Any, ...],
    doc: YamlDoc,
    known: set[str],
    analyses: set[str],
) -> dict[str, Any]:
    """A registered ``function`` and its ``args`` (expressions over the known names)."""
    fn = _text(spec, "function", at, doc)
    if fn not in registry.registry():
        raise doc.error(
            f"unknown function {fn!r} (registered: {', '.join(sorted(registry.registry()))})",
            (*at, "function"),
        )
    args = spec.get("args") or {}
    if not isinstance(args, Mapping):
        raise doc.error("must be a mapping of argument -> expression", (*at, "args"))
    for arg, text in args.items():
        if not isinstance(text, str):
            raise doc.error("must be an expression (a string)", (*at, "args", arg))
        _names_ok(text, (*at, "args", arg), doc, known, analyses, boolean=False)
    return {"function": fn, "args": {str(k): v for k, v in args.items()}}


def compile_verification(
    spec: Any,
    *,
    measures: Sequence[str],
    inputs: Sequence[str],
    doc: YamlDoc,
    path: tuple[Any, ...] = ("verification",),
) -> dict[str, Any]:
    """Check a program's ``verification`` section once (file:line:field errors) and return it
    as plain data (``{"analyses": [...], "checks": [...]}``) for the recipes that carry it."""
    if spec is None:
        return {"analyses": [], "checks": []}
    if not isinstance(spec, Mapping):
        raise doc.error("a mapping with analyses and checks", path)
    for key in spec:
        if key not in ("analyses", "checks"):
            raise doc.error(f"unknown key '{key}' (known: analyses, checks)", (*path, key))
    known = set(measures) | set(inputs)
    analyses: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, a in enumerate(spec.get("analyses") or []):
        at = (*path, "analyses", i)
        if not isinstance(a, Mapping):
            raise doc.error("an analysis is {name, function, args}", at)
        for key in a:
            if key not in ("name", "function", "args", "doc"):
                raise doc.error(
                    f"unknown key '{key}' (known: name, function, args, doc)", (*at, key)
                )
        name = _text(a, "name", at, doc)
        if not _WORD.fullmatch(name) or name in names:
            raise doc.error(f"an analysis name is a new identifier, got {name!r}", (*at, "name"))
        call = _call(a, at, doc, known, names)
        names.add(name)
        analyses.append({"name": name, **call})
    checks: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, c in enumerate(spec.get("checks") or []):
        at = (*path, "checks", i)
        if not isinstance(c, Mapping):
            raise doc.error("a check is {name, expr|function|expect, min|max|within}", at)
        allowed = ("name", "expr", "function", "args", "expect", "explain", "doc", *LIMITS)
        for key in c:
            if key not in allowed:
                raise doc.error(f"unknown key '{key}' (known: {', '.join(allowed)})", (*at, key))
        name = _text(c, "name", at, doc)
        if not _NAME.fullmatch(name) or name in seen:
            raise doc.error(f"a check name is a new short text, got {name!r}", (*at, "name"))
        seen.add(name)
        forms = [k for k in ("expr", "function", "expect") if c.get(k) is not None]
        if len(forms) != 1:
            raise doc.error("give exactly one of expr, function, expect", at)
        out: dict[str, Any] = {"name": name}
        if forms[0] == "expect":
            out["expect"] = _text(c, "expect", at, doc)
            _names_ok(out["expect"], (*at, "expect"), doc, known, names, boolean=True)
            if any(c.get(k) is not None for k in LIMITS):
                raise doc.error("an expect check takes no min, max or within", at)
        else:
            if forms[0] == "expr":
                out["expr"] = _text(c, "expr", at, doc)
                _names_ok(out["expr"], (*at, "expr"), doc, known, names, boolean=False)
            else:
                out.update(_call(c, at, doc, known, names))
            limits = {k: c[k] for k in LIMITS if c.get(k) is not None}
            if not limits:
                raise doc.error("give min, max or within (the tolerance)", at)
            for k, v in limits.items():
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise doc.error(f"must be a number, got {v!r}", (*at, k))
                if k == "within" and v < 0:
                    raise doc.error(f"must be >= 0, got {v!r}", (*at, k))
            out.update({k: float(v) for k, v in limits.items()})
        if c.get("explain") is not None:
            out["explain"] = _text(c, "explain", at, doc)
            _names_ok(out["explain"], (*at, "explain"), doc, known, names, boolean=False)
        checks.append(out)
    return {"analyses": analyses, "checks": checks}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    return repr(value)


def run_checks(
    verification: Mapping[str, Any],
    *,
    measurements: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None,
    images: Mapping[str, bytes | None] | None = None,
    setup: Mapping[str, Any] | None = None,
) -> Verification:
    """Run a recipe's analyses and checks (:func:`compile_verification`'s data) on one
    experiment's result; see the module docstring. Never raises for a bad result."""
    if not verification.get("checks"):
        return Verification(None)
    return verify_scope(verification, checks_scope(measurements, inputs, images, setup))


def checks_scope(
    measurements: Mapping[str, Any],
    inputs: Mapping[str, Any] | None = None,
    images: Mapping[str, bytes | None] | None = None,
    setup: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The names analyses and checks read (:func:`run_checks`), flat: dotted name -> value."""
    scope: dict[str, Any] = dict(inputs or {})
    for name, value in measurements.items():
        flatten(name, value, scope)
    for role in ("outcome", "reference"):  # None when the recipe took no such frame
        scope[f"images.{role}"] = None
    for role, data in (images or {}).items():
        scope[f"images.{role}"] = data
    for name, value in (setup or {}).items():
        flatten(f"setup.{name}", value, scope)
    return scope


def verification_reads(verification: Mapping[str, Any]) -> frozenset[str]:
    """The names of :func:`checks_scope` that ``verification``'s analyses and checks read
    (the analyses' own results left out): its outcome is a function of their values."""
    texts: list[str] = []
    for a in verification.get("analyses") or []:
        texts += a.get("args", {}).values()
    for c in verification.get("checks") or []:
        texts += [c[k] for k in ("expect", "expr", "explain") if c.get(k)]
        texts += c.get("args", {}).values()
    names: set[str] = set().union(*(parse(t, boolean=False).names() for t in texts))
    made = {a["name"] for a in verification.get("analyses") or []}
    return frozenset(n for n in names if n not in made and n.split(".", 1)[0] not in made)


def verify_scope(verification: Mapping[str, Any], scope: dict[str, Any]) -> Verification:
    """:func:`run_checks` on a :func:`checks_scope` (which it adds the analyses' results to)."""
    checks = list(verification.get("checks") or [])
    if not checks:
        return Verification(None)
    reasons: list[str] = []
    analysis: dict[str, Any] = {}

    parsed: dict[str, Any] = {}

    def expression(text: str) -> Any:  # each text parsed once per run
        if text not in parsed:
            parsed[text] = parse(text, boolean=False)
        return parsed[text]

    def value_of(text: str) -> Any:
        return expression(text).evaluate(scope)

    for a in verification.get("analyses") or []:
        name = a["name"]
        try:
            args = {k: value_of(t) for k, t in a.get("args", {}).items()}
            result = registry.call(a["function"], args)
        except (EvaluationError, ValueError, ArithmeticError, TypeError) as exc:
            hint = (
                " (the station's set-up has not kept it: run labbridge setup)"
                if "'setup." in str(exc)
                else ""
            )
            reasons.append(f"cannot verify: {name}: {exc}{hint}")
            continue
        flatten(name, result, scope)
        analysis[name] = plain(result)
        if isinstance(result, Mapping):
            reasons += [f"cannot verify: {p}" for p in result.get("problems") or []]
    results: dict[str, Any] = {}
    for c in checks:
        name = c["name"]
        text = c.get("expect") or c.get("expr") or ""
        texts = [text] if text else list(c["args"].values())
        names = set().union(*(expression(t).names() for t in texts))
        shown = {
            n: plain(scope[n])
            for n in sorted(names)
            if n in scope and n.split(".", 1)[0] not in CONTEXT_PREFIXES
        }
        try:
            if "function" in c:
                args = {k: value_of(t) for k, t in c["args"].items()}
                value = registry.call(c["function"], args)
            else:
                value = value_of(text)
        except (EvaluationError, ValueError, ArithmeticError, TypeError) as exc:
            reasons.append(f"cannot verify {name}: {exc}")
            results[name] = {"ok": None, "values": shown}
            continue
        if "expect" in c:
            ok = value is True
            limit = "true"
        else:
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
            ):
                reasons.append(f"cannot verify {name}: its value is {value!r}, not a number")
                results[name] = {"ok": None, "values": shown}
                continue
            lo, hi, within = c.get("min"), c.get("max"), c.get("within")
            ok = (
                (lo is None or value >= lo)
                and (hi is None or value <= hi)
                and (within is None or abs(value) <= within)
            )
            limit = " and ".join(
                part
                for part in (
                    f">= {lo:g}" if lo is not None else "",
                    f"<= {hi:g}" if hi is not None else "",
                    f"within ±{within:g}" if within is not None else "",
                )
                if part
            )
        results[name] = {
            "value": plain(value),
            "ok": ok,
            **{k: c[k] for k in LIMITS if k in c},
            "values": shown,
        }
        if not ok:
            detail = ", ".join(f"{n}={_fmt(v)}" for n, v in shown.items())
            what = f"{_fmt(value)}, not {limit}" if "expect" not in c else "not true"
            extra = ""
            if c.get("explain"):
                try:
                    extra = f": {_fmt(plain(value_of(c['explain'])))}"
                except EvaluationError:
                    extra = ""
            reasons.append(f"{name}: {text or c.get('function')} = {what}{extra} ({detail})")
    return Verification(not reasons, tuple(reasons), results, analysis or None)
