"""What an analysis says (:class:`FrameAnalysis`, :class:`Confidence`, :class:`SceneChange`,
:class:`ChangeRegion`), and :func:`analysis_from_dict`, a recorded analysis read back
(the report draws the one verification stored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from instruments.vision._common import Box, Status, VisionError
from instruments.vision._detect import PatchDetection, VialDetection


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Confidence:
    """Confidence 0-1 of each measurement (0 when it was not made)."""

    vial: float = 0.0
    patch: float = 0.0
    fill: float = 0.0
    colour: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"vial": self.vial, "patch": self.patch, "fill": self.fill, "colour": self.colour}


@dataclass(frozen=True)
class ChangeRegion:
    """An area outside the vial that changed versus the reference.

    ``box`` (x, y, w, h) px; ``area_px`` changed pixels; ``mean_change``
    signed mean change relative to the background brightness (negative =
    darker); ``kind``: ``"spill"`` when darker and on the bench surface beside
    the vial's foot (a heuristic), else ``"object"``.
    """

    box: Box
    area_px: int
    mean_change: float
    kind: Literal["spill", "object"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "area_px": self.area_px,
            "mean_change": self.mean_change,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class SceneChange:
    """What changed versus the reference frame.

    ``identical``: bit-identical pixels. ``noise_correlation``: correlation of
    the sensor-noise pattern on the patch (about 0 for two live frames, 1 for
    the same exposure; None if no patch or no noise to compare). ``frozen``:
    identical, or the same noise pattern (a stuck camera or encoder).
    ``shift_px`` (dx, dy): global image displacement (phase correlation);
    ``patch_shift_px`` / ``vial_shift_px``: displacement of the detections
    (None when one side is missing). ``camera_moved``: the patch (or, without
    one, the whole image) moved; ``vial_moved``: the vial moved but the
    camera did not. ``vial_appeared`` / ``vial_disappeared``. ``regions``:
    changed areas outside the vial (spill, object), ``changed_fraction`` their
    share of the image. ``summary``: one human-readable line per finding.
    """

    identical: bool
    frozen: bool
    noise_correlation: float | None
    shift_px: tuple[float, float]
    patch_shift_px: tuple[float, float] | None
    vial_shift_px: tuple[float, float] | None
    camera_moved: bool
    vial_moved: bool
    vial_appeared: bool
    vial_disappeared: bool
    regions: tuple[ChangeRegion, ...]
    changed_fraction: float
    summary: tuple[str, ...]

    @property
    def changed(self) -> bool:
        """Anything to report (frozen, moved, vial appeared/disappeared, changed regions)."""
        return bool(self.summary)

    @property
    def spill(self) -> bool:
        return any(r.kind == "spill" for r in self.regions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "identical": self.identical,
            "frozen": self.frozen,
            "noise_correlation": self.noise_correlation,
            "shift_px": list(self.shift_px),
            "patch_shift_px": list(self.patch_shift_px) if self.patch_shift_px else None,
            "vial_shift_px": list(self.vial_shift_px) if self.vial_shift_px else None,
            "camera_moved": self.camera_moved,
            "vial_moved": self.vial_moved,
            "vial_appeared": self.vial_appeared,
            "vial_disappeared": self.vial_disappeared,
            "spill": self.spill,
            "regions": [r.as_dict() for r in self.regions],
            "changed_fraction": self.changed_fraction,
            "summary": list(self.summary),
        }


@dataclass(frozen=True)
class FrameAnalysis:
    """What one frame shows. See :func:`analyse`.

    ``status`` is ``"ok"`` when the vial and the patch were found, the frame is
    usable (not frozen, patch not over-exposed or too dark) and the fill level
    was measured and calibrated; otherwise ``"cannot_verify"`` and
    ``reasons`` says why, one sentence each. Measurements that could still be
    made are reported (never guessed) with their confidence. ``notes`` are
    observations that do not block verification (a spill, a moved camera, too
    little liquid to measure its colour, ...).

    ``surface_y``: image row of the liquid surface (sub-pixel; the bottom of
    the meniscus, at the middle of the vial). ``surface_px``: its height above
    the vial's bottom edge (px, glass bottom included). ``fill_px``: height of
    the liquid above the inner bottom (px; needs the calibration, which knows
    where 0 mL is). ``fill_ml``: volume from the calibration. ``lab``: the
    liquid's L*a*b* (D65, white = the patch; ``instruments.colour`` convention).
    ``liquid_bgr``: mean raw colour (DN) of ``liquid_box``, the region measured.
    ``white_balanced_rgb``: liquid / patch per channel after the colour
    correction (linear RGB, white = 1).
    """

    width: int
    height: int
    status: Status
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    vial_present: bool
    vial: VialDetection | None
    patch: PatchDetection | None
    surface_y: float | None
    surface_px: float | None
    fill_px: float | None
    fill_ml: float | None
    lab: tuple[float, float, float] | None
    liquid_bgr: tuple[float, float, float] | None
    liquid_box: Box | None
    white_balanced_rgb: tuple[float, float, float] | None
    confidence: Confidence
    change: SceneChange | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (plain lists, floats, strings, None)."""
        return {
            "width": self.width,
            "height": self.height,
            "status": self.status,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "vial_present": self.vial_present,
            "vial": self.vial.as_dict() if self.vial else None,
            "patch": self.patch.as_dict() if self.patch else None,
            "surface_y": self.surface_y,
            "surface_px": self.surface_px,
            "fill_px": self.fill_px,
            "fill_ml": self.fill_ml,
            "lab": list(self.lab) if self.lab else None,
            "liquid_bgr": list(self.liquid_bgr) if self.liquid_bgr else None,
            "liquid_box": list(self.liquid_box) if self.liquid_box else None,
            "white_balanced_rgb": list(self.white_balanced_rgb)
            if self.white_balanced_rgb
            else None,
            "confidence": self.confidence.as_dict(),
            "change": self.change.as_dict() if self.change else None,
        }


# ------------------------------------------------------------------ reports
# For a campaign report's camera contact sheet: draw a *recorded* analysis again
# (the one the verification stored with the result), tile overlaid frames with
# captions, and encode PNGs, so that layers above (which must not import cv2)
# can build the sheet through these pure functions.


def _field(data: Mapping[str, Any], key: str, what: str) -> Any:
    if not isinstance(data, Mapping):
        raise VisionError(f"{what} must be a mapping, got {type(data).__name__}")
    if key not in data:
        raise VisionError(
            f"{what}: missing field {key!r} (got {', '.join(sorted(data)) or 'none'})"
        )
    return data[key]


def _number(data: Mapping[str, Any], key: str, what: str) -> float:
    value = _field(data, key, what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VisionError(f"{what}.{key} must be a number, got {value!r}")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, what: str) -> int:
    value = _field(data, key, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise VisionError(f"{what}.{key} must be an integer, got {value!r}")
    return value


def _flag(data: Mapping[str, Any], key: str, what: str) -> bool:
    value = _field(data, key, what)
    if not isinstance(value, bool):
        raise VisionError(f"{what}.{key} must be true or false, got {value!r}")
    return value


def _region_kind(value: Any) -> Literal["spill", "object"]:
    if value not in ("spill", "object"):
        raise VisionError(
            f"analysis.change.regions[].kind must be 'spill' or 'object', got {value!r}"
        )
    return "spill" if value == "spill" else "object"


def _box(value: Any, what: str) -> Box:
    try:
        x, y, w, h = (int(v) for v in value)
    except (TypeError, ValueError):
        raise VisionError(f"{what} must be a box [x, y, w, h] of integers, got {value!r}") from None
    return (x, y, w, h)


def _opt_floats(value: Any, n: int, what: str) -> Any:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise VisionError(f"{what} must be {n} numbers or null, got {value!r}") from None
    if len(out) != n:
        raise VisionError(f"{what} must be {n} numbers or null, got {len(out)}")
    return out


def _opt_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VisionError(f"{what} must be a number or null, got {value!r}")
    return float(value)


def analysis_from_dict(data: Mapping[str, Any]) -> FrameAnalysis:
    """The :class:`FrameAnalysis` whose :meth:`~FrameAnalysis.as_dict` is ``data``.

    For drawing a recorded analysis again (``overlay(frame, analysis_from_dict(stored))``)
    exactly as it was measured, without the calibration or the reference frame
    it was measured with. ``PatchDetection.inner`` is not in the dict; it is
    derived from the patch's box as the detector does. Raises
    :class:`VisionError` naming the missing or malformed field.
    """
    if not isinstance(data, Mapping):
        raise VisionError(
            f"analysis must be a mapping (FrameAnalysis.as_dict()), got {type(data).__name__}"
        )
    status = _field(data, "status", "analysis")
    if status not in ("ok", "cannot_verify"):
        raise VisionError(f"analysis.status must be 'ok' or 'cannot_verify', got {status!r}")
    vial = None
    vd = _field(data, "vial", "analysis")
    if vd is not None:
        vial = VialDetection(
            left_x=_number(vd, "left_x", "analysis.vial"),
            right_x=_number(vd, "right_x", "analysis.vial"),
            top_y=_number(vd, "top_y", "analysis.vial"),
            bottom_y=_number(vd, "bottom_y", "analysis.vial"),
            confidence=_number(vd, "confidence", "analysis.vial"),
        )
    patch = None
    pd = _field(data, "patch", "analysis")
    if pd is not None:
        box = _box(_field(pd, "box", "analysis.patch"), "analysis.patch.box")
        inner = (
            box[0] + int(0.2 * box[2]),
            box[1] + int(0.2 * box[3]),
            max(2, int(0.6 * box[2])),
            max(2, int(0.6 * box[3])),
        )
        patch = PatchDetection(
            box,
            inner,
            _opt_floats(_field(pd, "bgr", "analysis.patch"), 3, "analysis.patch.bgr"),
            _number(pd, "noise", "analysis.patch"),
            _flag(pd, "saturated", "analysis.patch"),
            _number(pd, "confidence", "analysis.patch"),
        )
    change = None
    cd = _field(data, "change", "analysis")
    if cd is not None:
        regions = tuple(
            ChangeRegion(
                _box(
                    _field(r, "box", "analysis.change.regions[]"), "analysis.change.regions[].box"
                ),
                _integer(r, "area_px", "analysis.change.regions[]"),
                _number(r, "mean_change", "analysis.change.regions[]"),
                _region_kind(_field(r, "kind", "analysis.change.regions[]")),
            )
            for r in _field(cd, "regions", "analysis.change")
        )
        change = SceneChange(
            identical=_flag(cd, "identical", "analysis.change"),
            frozen=_flag(cd, "frozen", "analysis.change"),
            noise_correlation=_opt_float(
                _field(cd, "noise_correlation", "analysis.change"),
                "analysis.change.noise_correlation",
            ),
            shift_px=_opt_floats(
                _field(cd, "shift_px", "analysis.change"), 2, "analysis.change.shift_px"
            ),
            patch_shift_px=_opt_floats(
                _field(cd, "patch_shift_px", "analysis.change"), 2, "analysis.change.patch_shift_px"
            ),
            vial_shift_px=_opt_floats(
                _field(cd, "vial_shift_px", "analysis.change"), 2, "analysis.change.vial_shift_px"
            ),
            camera_moved=_flag(cd, "camera_moved", "analysis.change"),
            vial_moved=_flag(cd, "vial_moved", "analysis.change"),
            vial_appeared=_flag(cd, "vial_appeared", "analysis.change"),
            vial_disappeared=_flag(cd, "vial_disappeared", "analysis.change"),
            regions=regions,
            changed_fraction=_number(cd, "changed_fraction", "analysis.change"),
            summary=tuple(str(s) for s in _field(cd, "summary", "analysis.change")),
        )
    conf = _field(data, "confidence", "analysis")
    liquid_box = _field(data, "liquid_box", "analysis")
    return FrameAnalysis(
        width=_integer(data, "width", "analysis"),
        height=_integer(data, "height", "analysis"),
        status=status,
        reasons=tuple(str(r) for r in _field(data, "reasons", "analysis")),
        notes=tuple(str(n) for n in _field(data, "notes", "analysis")),
        vial_present=_flag(data, "vial_present", "analysis"),
        vial=vial,
        patch=patch,
        surface_y=_opt_float(_field(data, "surface_y", "analysis"), "analysis.surface_y"),
        surface_px=_opt_float(_field(data, "surface_px", "analysis"), "analysis.surface_px"),
        fill_px=_opt_float(_field(data, "fill_px", "analysis"), "analysis.fill_px"),
        fill_ml=_opt_float(_field(data, "fill_ml", "analysis"), "analysis.fill_ml"),
        lab=_opt_floats(_field(data, "lab", "analysis"), 3, "analysis.lab"),
        liquid_bgr=_opt_floats(_field(data, "liquid_bgr", "analysis"), 3, "analysis.liquid_bgr"),
        liquid_box=None if liquid_box is None else _box(liquid_box, "analysis.liquid_box"),
        white_balanced_rgb=_opt_floats(
            _field(data, "white_balanced_rgb", "analysis"), 3, "analysis.white_balanced_rgb"
        ),
        confidence=Confidence(
            vial=_number(conf, "vial", "analysis.confidence"),
            patch=_number(conf, "patch", "analysis.confidence"),
            fill=_number(conf, "fill", "analysis.confidence"),
            colour=_number(conf, "colour", "analysis.confidence"),
        ),
        change=change,
    )
