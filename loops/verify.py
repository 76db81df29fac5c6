"""Verification: the camera is the independent witness of every experiment's outcome.

After an experiment's measurement the recipe captures the outcome (and, before
anything was poured, a reference of the scene). :func:`verify` compares what
the camera sees (:mod:`instruments.vision`) with what the instruments report:

* **fill level** vs the volume the pumps report having delivered (a clogged
  pump acknowledges and delivers less): ``|camera - pumps| <= fill_ml``;
* **colour**: the camera's CIELAB of the liquid (white-balanced on the
  reference patch) vs the colour sensor's: ``CIEDE2000 <= colour_de2000``;
* **scene** vs the reference frame: a spill or an object in the scene, the
  camera moved, the vial moved or gone, a frozen camera.

The outcome is ``verified`` True (every check agreed), False (a check
disagreed, or the frame cannot verify: no vial, no patch, frozen camera; each
reason says which) or None (verification is off for the station). A result
that is not verified is kept with its reasons and images, reported, and told
to the optimizer as ``untrusted``; the campaign pauses a station after
``max_disagreements`` unverified results in a row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instruments.colour import delta_e2000
from instruments.vision import Calibration, VisionError, analyse, decode_jpeg, prepare_reference

__all__ = ["Tolerances", "Verification", "verify"]


@dataclass(frozen=True)
class Tolerances:
    """How far the camera and the instruments may disagree (the lab config's ``verification``)."""

    fill_ml: float = 0.15  # 5 % of the 3.0 mL vial
    colour_de2000: float = 8.0  # two instruments, two spectra: median 1.9, max 6.3 apart (sim)
    max_disagreements: int = 3  # unverified results in a row before the station is paused

    def __post_init__(self) -> None:
        for name in ("fill_ml", "colour_de2000"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"verification tolerance {name} must be a number > 0, got {value!r}"
                )
        if not isinstance(self.max_disagreements, int) or self.max_disagreements < 1:
            raise ValueError(
                f"max_disagreements must be an integer >= 1, got {self.max_disagreements!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "fill_ml": self.fill_ml,
            "colour_de2000": self.colour_de2000,
            "max_disagreements": self.max_disagreements,
        }


@dataclass(frozen=True)
class Verification:
    """One experiment's verification: ``verified`` (True/False/None), the reasons it is not,
    each check's numbers, and the frame analysis (JSON-able, for the store and MQTT)."""

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


def _expected_ml(measurements: Mapping[str, Any]) -> float | None:
    dispensed = measurements.get("dispensed_ml")
    if not isinstance(dispensed, Mapping) or not dispensed:
        return None
    return float(sum(float(v) for v in dispensed.values()))


def verify(
    outcome_jpeg: bytes | None,
    measurements: Mapping[str, Any],
    calibration: Calibration,
    tolerances: Tolerances,
    *,
    reference_jpeg: bytes | None = None,
) -> Verification:
    """Compare the outcome frame with the instruments' measurements (see the module docstring).

    ``measurements``: the recipe's (``dispensed_ml`` per pump, ``lab`` from the
    colour sensor). ``reference_jpeg``: the scene before the experiment acted.
    """
    if outcome_jpeg is None:
        return Verification(False, ("cannot verify: no camera frame of the outcome",))
    try:
        frame = decode_jpeg(outcome_jpeg)
        reference = prepare_reference(decode_jpeg(reference_jpeg)) if reference_jpeg else None
    except VisionError as exc:
        return Verification(False, (f"cannot verify: {exc}",))
    result = analyse(frame, calibration, reference)
    reasons: list[str] = [f"cannot verify: {r}" for r in result.reasons]
    checks: dict[str, Any] = {}
    expected = _expected_ml(measurements)
    if result.fill_ml is not None and expected is not None:
        diff = result.fill_ml - expected
        ok = abs(diff) <= tolerances.fill_ml
        checks["fill"] = {
            "camera_ml": result.fill_ml,
            "pumps_ml": expected,
            "difference_ml": diff,
            "tolerance_ml": tolerances.fill_ml,
            "ok": ok,
        }
        if not ok:
            reasons.append(
                f"fill level: the camera sees {result.fill_ml:.2f} mL, the pumps report "
                f"{expected:.2f} mL ({diff:+.2f} mL, tolerance {tolerances.fill_ml:g})"
            )
    elif expected is None:
        reasons.append("cannot verify the fill level: the pumps' volumes are not in the result")
    sensor_lab = measurements.get("lab")
    if result.lab is not None and isinstance(sensor_lab, Sequence) and len(sensor_lab) == 3:
        de = delta_e2000(result.lab, [float(v) for v in sensor_lab])
        ok = de <= tolerances.colour_de2000
        checks["colour"] = {
            "camera_lab": list(result.lab),
            "sensor_lab": [float(v) for v in sensor_lab],
            "delta_e2000": de,
            "tolerance": tolerances.colour_de2000,
            "ok": ok,
        }
        if not ok:
            reasons.append(
                f"colour: camera and colour sensor differ by dE00 {de:.1f} "
                f"(tolerance {tolerances.colour_de2000:g})"
            )
    change = result.change
    if change is not None:
        scene_problems = []
        if change.camera_moved:
            scene_problems.append("the camera moved")
        if change.vial_moved or change.vial_disappeared:
            scene_problems.append("the vial moved" if change.vial_moved else "the vial is gone")
        for region in change.regions:
            scene_problems.append(f"{region.kind} at {list(region.box)} ({region.area_px} px)")
        checks["scene"] = {"summary": list(change.summary), "ok": not scene_problems}
        reasons += [f"scene: {p}" for p in scene_problems]
    return Verification(not reasons, tuple(reasons), checks, result.as_dict())
