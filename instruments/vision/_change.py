"""Scene change against a reference frame: frozen camera, camera / vial moved, spills and
objects outside the vial (:class:`Reference`, :func:`prepare_reference`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from instruments.vision._common import (
    CHANGE_MIN_AREA,
    CHANGE_THRESHOLD,
    FROZEN_NOISE_CORRELATION,
    FROZEN_SAME_PIXELS,
    MOVED_FRACTION,
    NOISE_FLOOR,
    Box,
    VisionError,
    _check_frame,
)
from instruments.vision._detect import (
    PatchDetection,
    VialDetection,
    _blobs,
    _detect_patch,
    _detect_vial,
    _hist_percentiles,
    _Views,
)
from instruments.vision._results import ChangeRegion, SceneChange


# ------------------------------------------------------------------ change
@dataclass(frozen=True, eq=False)
class Reference:
    """A reference frame prepared once for :func:`analyse` (see :func:`prepare_reference`)."""

    frame: np.ndarray
    vial: VialDetection | None
    patch: PatchDetection | None
    _half_bgr: np.ndarray = field(repr=False)
    _level: float = field(repr=False)
    _small: np.ndarray = field(repr=False)
    _gray: np.ndarray = field(repr=False)
    _half: np.ndarray = field(repr=False)


def _normalised(v: _Views) -> tuple[np.ndarray, float, np.ndarray]:
    """Half-size BGR and its median gray level (the lighting gain cancels in ratios of it),
    and a quarter-size gray copy divided by that level, for phase correlation."""
    (median,) = _hist_percentiles(v.half, (0.5,))
    level = max(median, 1.0)
    half_bgr = cv2.resize(v.frame, (v.half.shape[1], v.half.shape[0]), interpolation=cv2.INTER_AREA)
    small = cv2.resize(
        v.half, (v.half.shape[1] // 2, v.half.shape[0] // 2), interpolation=cv2.INTER_AREA
    )
    return half_bgr, level, small.astype(np.float32) * np.float32(1.0 / level)


_WINDOWS: dict[tuple[int, int], np.ndarray] = {}


def _hanning(shape: tuple[int, int]) -> np.ndarray:
    win = _WINDOWS.get(shape)
    if win is None:
        win = cv2.createHanningWindow((shape[1], shape[0]), cv2.CV_32F)
        _WINDOWS[shape] = win
    return win


def prepare_reference(frame: np.ndarray) -> Reference:
    """Analyse a reference frame once (detections, normalised copies) for :func:`analyse`."""
    v = _Views(_check_frame(frame, "reference frame"))
    vial = _detect_vial(v)
    patch = _detect_patch(v, vial)
    half_bgr, level, small = _normalised(v)
    return Reference(
        v.frame.copy(), vial, patch, half_bgr, level, small, v.gray.copy(), v.half.copy()
    )


def _noise_correlation(a: np.ndarray, b: np.ndarray, box: Box) -> float | None:
    """Correlation of the band-passed sensor noise of two gray images over a flat ``box``."""
    x, y, w, h = box
    if w < 16 or h < 16:
        return None
    pa = a[y : y + h, x : x + w].astype(np.float32)
    pb = b[y : y + h, x : x + w].astype(np.float32)
    ra = (cv2.blur(pa, (3, 3)) - cv2.blur(pa, (9, 9)))[4:-4, 4:-4]
    rb = (cv2.blur(pb, (3, 3)) - cv2.blur(pb, (9, 9)))[4:-4, 4:-4]
    ea, eb = float(np.sum(ra * ra)), float(np.sum(rb * rb))
    floor = NOISE_FLOOR**2 * ra.size
    if ea < floor or eb < floor:  # no sensor noise left to compare (noise-free or smoothed by JPEG)
        return None
    return float(np.sum(ra * rb)) / math.sqrt(ea * eb)


def _shift(
    a: tuple[float, float] | None, b: tuple[float, float] | None
) -> tuple[float, float] | None:
    if a is None or b is None:
        return None
    return (b[0] - a[0], b[1] - a[1])


def _compare(
    v: _Views,
    vial: VialDetection | None,
    patch: PatchDetection | None,
    ref: Reference,
) -> SceneChange:
    summary: list[str] = []
    if ref.frame.shape != v.frame.shape:
        raise VisionError(
            f"reference frame is {ref.frame.shape[1]}x{ref.frame.shape[0]}, the frame is "
            f"{v.width}x{v.height}: compare frames of the same size"
        )
    half_bgr, level, small = _normalised(v)
    # Cheap first: frames that differ almost always differ in their half-size gray copy.
    identical = bool(np.array_equal(v.half, ref._half)) and bool(np.array_equal(v.frame, ref.frame))
    corr = None
    box = ref.patch.inner if ref.patch is not None else None
    if box is not None:
        corr = _noise_correlation(v.gray, ref._gray, box)
    same = 1.0
    if not identical:
        same = 1.0 - cv2.countNonZero(cv2.absdiff(v.gray, ref._gray)) / float(v.gray.size)
    frozen = (
        identical
        or same >= FROZEN_SAME_PIXELS
        or (corr is not None and corr > FROZEN_NOISE_CORRELATION)
    )
    if identical:
        summary.append("frozen camera: the frame is bit-identical to the reference")
    elif same >= FROZEN_SAME_PIXELS:
        summary.append(f"frozen camera: {same:.1%} of the pixels are identical to the reference")
    elif frozen:
        summary.append(
            f"frozen camera: same sensor-noise pattern as the reference (correlation {corr:.2f})"
        )
    (dx, dy), _ = cv2.phaseCorrelate(ref._small, small, _hanning(small.shape[:2]))
    shift = (float(dx) * v.width / small.shape[1], float(dy) * v.height / small.shape[0])
    patch_shift = _shift(ref.patch.centre if ref.patch else None, patch.centre if patch else None)
    vial_shift = _shift(ref.vial.centre if ref.vial else None, vial.centre if vial else None)
    tol = max(3.0, MOVED_FRACTION * v.width)
    camera_moved = (
        math.hypot(*patch_shift) > tol if patch_shift is not None else math.hypot(*shift) > tol
    )
    vial_moved = not camera_moved and vial_shift is not None and math.hypot(*vial_shift) > tol
    if camera_moved:
        d = patch_shift if patch_shift is not None else shift
        summary.append(f"camera moved: the scene shifted by ({d[0]:+.1f}, {d[1]:+.1f}) px")
    if vial_moved and vial_shift is not None:
        summary.append(
            f"vial moved by ({vial_shift[0]:+.1f}, {vial_shift[1]:+.1f}) px (the camera did not)"
        )
    appeared = ref.vial is None and vial is not None
    disappeared = ref.vial is not None and vial is None
    if appeared:
        summary.append("a vial appeared (none in the reference)")
    if disappeared:
        summary.append("the vial is gone (it was in the reference)")

    regions: list[ChangeRegion] = []
    fraction = 0.0
    if not camera_moved and not identical:
        # The reference scaled to this frame's lighting; changed = any channel off by more
        # than CHANGE_THRESHOLD of the background level (uint8 OpenCV ops: ~0.3 ms at 640x480).
        scaled = cv2.convertScaleAbs(ref._half_bgr, alpha=level / ref._level)
        absdiff = cv2.absdiff(half_bgr, scaled)
        thr = CHANGE_THRESHOLD * level
        mask = cv2.bitwise_not(cv2.inRange(absdiff, (0, 0, 0), (thr, thr, thr)))
        hh, hw = mask.shape
        vial_boxes = [d.box for d in (vial, ref.vial) if d is not None]
        for bx, by, bw, bh in vial_boxes:  # the vial's inside is expected to change
            pad = 0.1 * bw
            x0, x1 = max(0, int((bx - pad) / 2)), min(hw, int((bx + bw + pad) / 2) + 1)
            y0, y1 = max(0, int((by - pad) / 2)), min(hh, int((by + bh) / 2) + 2)
            mask[y0:y1, x0:x1] = 0
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        min_area = CHANGE_MIN_AREA * hh * hw
        foot = vial or ref.vial
        blobs = _blobs(mask, min_area) if cv2.countNonZero(mask) else []
        for x, y, w, h, area, sel in blobs:
            cur = v.half[y : y + h, x : x + w][sel].astype(np.float64)
            before = ref._half[y : y + h, x : x + w][sel].astype(np.float64) * (level / ref._level)
            mean_change = float(np.mean(cur - before)) / level  # signed, relative to the bench
            fbox = (2 * x, 2 * y, 2 * w, 2 * h)
            kind: Literal["spill", "object"] = "object"
            if foot is not None and mean_change < 0:
                near_x = (
                    fbox[0] < foot.right_x + 1.5 * foot.width
                    and fbox[0] + fbox[2] > foot.left_x - 1.5 * foot.width
                )
                near_y = abs((fbox[1] + fbox[3] / 2) - foot.bottom_y) < 0.15 * foot.height
                if near_x and near_y:
                    kind = "spill"
            regions.append(ChangeRegion(fbox, 4 * area, mean_change, kind))
            fraction += area / float(hh * hw)
        regions.sort(key=lambda r: -r.area_px)
        for r in regions:
            what = "possible spill" if r.kind == "spill" else "object or change"
            tone = "darker" if r.mean_change < 0 else "brighter"
            summary.append(
                f"{what} outside the vial at {list(r.box)} ({r.area_px} px, {tone} by {abs(r.mean_change):.0%})"
            )
    elif camera_moved:
        summary.append("changed areas not compared: the camera moved")
    return SceneChange(
        identical,
        frozen,
        None if corr is None else round(corr, 4),
        shift,
        patch_shift,
        vial_shift,
        camera_moved,
        vial_moved,
        appeared,
        disappeared,
        tuple(regions),
        fraction,
        tuple(summary),
    )
