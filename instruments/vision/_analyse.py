"""One frame to measurements: the liquid surface (fill level) and the liquid's colour
under it, with the vial, the patch and the scene change, in :func:`analyse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from instruments.colour import linear_to_lab
from instruments.vision._calibration import Calibration, ColourCorrection
from instruments.vision._change import Reference, _compare, prepare_reference
from instruments.vision._common import (
    AIR_NEUTRAL,
    AIR_RATIO,
    CHROMA_TOLERANCE,
    DEFAULT_NOISE_DN,
    MOVED_FRACTION,
    PATCH_MIN_LEVEL,
    PATCH_SATURATED_FRACTION,
    VIAL_HEIGHT_TOLERANCE,
    Box,
    Status,
    _check_frame,
)
from instruments.vision._detect import (
    VialDetection,
    _detect_patch,
    _detect_vial,
    _hist_percentiles,
    _longest_run,
    _Views,
)
from instruments.vision._results import Confidence, FrameAnalysis


# -------------------------------------------------------------- fill / colour
@dataclass
class _Surface:
    y: float  # image row (sub-pixel)
    contrast: float  # air vs below, DN (max over channels)
    tolerance: float  # DN
    spread: float  # disagreement between the left and right halves, px


def _profile(frame: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    sub = frame[rows[0] : rows[1], cols[0] : cols[1]]
    return cv2.reduce(sub, 1, cv2.REDUCE_AVG, dtype=cv2.CV_32F).reshape(-1, 3)


def _background_bgr(v: _Views, vial: VialDetection) -> np.ndarray | None:
    w, h = vial.width, vial.height
    y0, y1 = int(vial.top_y + 0.3 * h), int(vial.top_y + 0.6 * h)
    strips = []
    for x0, x1 in (
        (vial.left_x - 0.35 * w, vial.left_x - 0.15 * w),
        (vial.right_x + 0.15 * w, vial.right_x + 0.35 * w),
    ):
        a, b = max(0, int(x0)), min(v.width, int(x1))
        if b - a >= 2:
            strips.append(v.frame[y0:y1, a:b].reshape(-1, 3))
    if not strips:
        return None
    return np.median(np.concatenate(strips), axis=0).astype(np.float64)


def _area_edge(p: np.ndarray, start: int, stop: int, a: np.ndarray, b: np.ndarray) -> float:
    """Sub-pixel position of a step from colour ``a`` to ``b`` within rows [start, stop)."""
    d = b - a
    dd = float(d @ d)
    if dd <= 0:
        return float(start)
    f = np.clip(((p[start:stop] - a) @ d) / dd, 0.0, 1.0)
    return float(start + np.sum(1.0 - f))


def _find_surface(
    v: _Views, vial: VialDetection, bg: np.ndarray, tol: float
) -> tuple[_Surface | None, np.ndarray, int, str]:
    """The liquid surface (or the inner bottom of an empty vial). Returns the row profile too."""
    c0, c1 = vial.central_columns()
    r0, r1 = int(round(vial.top_y)), int(round(vial.bottom_y)) + 1
    p = _profile(v.frame, (r0, r1), (c0, c1)).astype(np.float64)
    n = p.shape[0]
    ratio = p / np.maximum(bg, 1.0)
    air = np.all((ratio >= AIR_RATIO[0]) & (ratio <= AIR_RATIO[1]), axis=1) & (
        ratio.max(axis=1) - ratio.min(axis=1) <= AIR_NEUTRAL
    )
    m = max(3, int(round(0.02 * n)))
    # First run of m air-like rows (skips the rim).
    run = np.convolve(air.astype(np.int32), np.ones(m, dtype=np.int32), mode="valid")
    starts = np.flatnonzero(run == m)
    if starts.size == 0:
        return None, p, r0, "no air seen inside the vial (full to the rim, or its inside is hidden)"
    a0 = int(starts[0])
    a_col = np.median(p[a0 : a0 + m], axis=0)
    # Leaving the air colour: in brightness by more than tol, or in hue by more than
    # 3 tol (JPEG's subsampled chroma rings for a block or two around a strong colour edge).
    d = p - a_col
    luma = d.mean(axis=1)
    off = (np.abs(luma) > tol) | np.any(np.abs(d - luma[:, None]) > CHROMA_TOLERANCE * tol, axis=1)
    off[: a0 + m] = False
    two = off[:-1] & off[1:]
    hits = np.flatnonzero(two)
    if hits.size == 0:
        return None, p, r0, "the inside of the vial looks like air down to its bottom edge"
    a1 = int(hits[0])
    if a1 + 2 >= n:
        return None, p, r0, "no liquid surface or glass bottom found above the vial's bottom edge"
    b_col = p[min(n - 1, a1 + 2)]
    start, stop = max(a0, a1 - 2), a1 + 2
    y = _area_edge(p, start, stop, a_col, b_col)
    # Left and right halves separately: their disagreement lowers the confidence.
    mid = (c0 + c1) // 2
    halves = []
    for cols in ((c0, mid), (mid, c1)):
        ph = _profile(v.frame, (r0 + start, r0 + stop + 1), cols).astype(np.float64)
        halves.append(_area_edge(ph, 0, stop - start, a_col, b_col) + start)
    contrast = float(np.max(np.abs(b_col - a_col)))
    surf = _Surface(r0 + y, contrast, tol, abs(halves[0] - halves[1]))
    return surf, p, r0, ""


def _liquid_rows(
    p: np.ndarray, r0: int, first: int, last: int, tol: float
) -> tuple[int, int] | None:
    """The stable liquid rows between ``first`` and ``last`` (image rows, inclusive)."""
    lo, hi = first - r0, last - r0 + 1
    if hi - lo < 3:
        return None
    seg = p[lo:hi]
    med = np.median(seg, axis=0)
    keep = np.all(np.abs(seg - med) <= tol, axis=1)
    s, e = _longest_run(keep, max_gap=0)
    s, e = s + 1, e - 1  # trim a row at each end (JPEG chroma blur)
    if e - s < 3:
        return None
    return (r0 + lo + s, r0 + lo + e)


# ------------------------------------------------------------------ analyse
def analyse(
    frame: np.ndarray,
    calibration: Calibration | None = None,
    reference: Reference | np.ndarray | None = None,
) -> FrameAnalysis:
    """Everything the camera can say about one frame. See :class:`FrameAnalysis`.

    ``frame``: BGR ``uint8`` ``(height, width, 3)`` (``Frame.image``, or
    :func:`decode_jpeg` of ``Frame.encoded``). ``calibration``: needed for
    ``fill_ml`` (without it, status is ``"cannot_verify"``; ``lab`` uses no
    colour correction). ``reference``: a frame (or :func:`prepare_reference`
    of one, cheaper when comparing many) to detect scene changes against, of
    the same size. Raises :class:`VisionError` only for unusable input (wrong
    type, dtype, shape, size); everything about the scene is in the result.
    """
    v = _Views(_check_frame(frame))
    if reference is not None and not isinstance(reference, Reference):
        reference = prepare_reference(reference)
    reasons: list[str] = []
    notes: list[str] = []
    vial = _detect_vial(v)
    patch = _detect_patch(v, vial)
    cal = calibration
    colour = cal.colour if cal is not None else ColourCorrection()

    change = _compare(v, vial, patch, reference) if reference is not None else None
    if change is not None:
        if change.frozen:
            reasons.append(change.summary[0])
        notes.extend(s for s in change.summary if not s.startswith("frozen camera"))

    if vial is None:
        reasons.append(
            "no vial found: no pair of long vertical dark edges (glass walls) in the image"
        )
    if patch is None:
        reasons.append(
            "no reference patch found: no bright, square, uniform region outside the vial "
            "(white balance impossible)"
        )
    elif patch.saturated:
        reasons.append(
            "reference patch over-exposed (pixels at 255): white balance impossible; "
            "lower the light or the exposure"
        )
    elif patch.level < PATCH_MIN_LEVEL:
        reasons.append(f"image too dark (reference patch at {patch.level:.0f} DN)")
    if cal is None:
        reasons.append("no calibration: the fill level cannot be converted to mL")
    elif cal.geometry is not None:
        geo = cal.geometry
        if vial is not None:
            ratio = (vial.height / v.height) / geo.vial_height
            if abs(ratio - 1.0) > VIAL_HEIGHT_TOLERANCE:
                notes.append(
                    f"the vial's height in the image differs by {ratio - 1.0:+.0%} from the "
                    "calibration's (camera moved or zoomed? recalibrate)"
                )
        if patch is not None and geo.patch_centre is not None:
            dx = patch.centre[0] - geo.patch_centre[0] * v.width
            dy = patch.centre[1] - geo.patch_centre[1] * v.height
            if math.hypot(dx, dy) > max(3.0, MOVED_FRACTION * v.width):
                notes.append(
                    f"the camera moved since calibration: the patch is ({dx:+.0f}, {dy:+.0f}) px "
                    "from where it was"
                )

    surface_y = surface_px = fill_px = fill_ml = None
    lab = liquid_bgr = wb = None
    liquid_box: Box | None = None
    c_fill = c_colour = 0.0
    if vial is not None:
        if patch is not None and patch.noise > 0:
            noise = patch.noise
            level = patch.level
        else:  # no patch: assume a typical sensor noise, take the median as the level
            noise = DEFAULT_NOISE_DN
            level = _hist_percentiles(v.gray, (0.5,))[0]
        c0, c1 = vial.central_columns()
        tol = max(5.0 * noise / math.sqrt(max(1, c1 - c0)), 0.025 * level, 2.0)
        bg = _background_bgr(v, vial)
        surf = None
        why = "no background beside the vial to tell air from liquid"
        p = np.zeros((0, 3))
        r0 = 0
        if bg is not None:
            surf, p, r0, why = _find_surface(v, vial, bg, tol)
        if surf is None:
            reasons.append(f"fill level not measured: {why}")
        else:
            surface_y = surf.y
            surface_px = vial.bottom_y - surf.y
            h = surface_px / vial.height
            snr = surf.contrast / surf.tolerance
            c_fill = min(1.0, max(0.0, (snr - 1.0) / 2.0)) * max(0.0, 1.0 - surf.spread / 3.0)
            if cal is not None and cal.geometry is not None:
                ratio = (vial.height / v.height) / cal.geometry.vial_height
                c_fill *= max(0.0, 1.0 - max(0.0, abs(ratio - 1.0) - VIAL_HEIGHT_TOLERANCE) * 10)
            inner_bottom = vial.bottom_y - 1.0
            if cal is not None:
                h0 = cal.fill.zero_height
                fill_px = (h - h0) * vial.height
                fill_ml = max(0.0, cal.fill.volume_ml(h)) if h > h0 else 0.0
                inner_bottom = vial.bottom_y - h0 * vial.height
            # Liquid colour: the stable rows under the meniscus band, above the glass bottom.
            enough = fill_ml is None or fill_ml >= (cal.min_liquid_ml if cal else 0.0)
            rows = (
                _liquid_rows(
                    p, r0, int(math.ceil(surf.y)) + 1, int(math.floor(inner_bottom)) - 1, tol
                )
                if enough
                else None
            )
            if rows is None:
                notes.append("too little liquid to measure its colour")
            else:
                y0, y1 = rows
                liquid_box = (c0, y0, c1 - c0, y1 - y0)
                block = v.frame[y0:y1, c0:c1]
                mean = cv2.mean(block)[:3]
                liquid_bgr = (float(mean[0]), float(mean[1]), float(mean[2]))
                clipped = float(np.count_nonzero(block >= 254)) / block.size
                if clipped > PATCH_SATURATED_FRACTION:
                    reasons.append(
                        "liquid over-exposed (pixels at 255): its colour cannot be measured"
                    )
                elif patch is not None and not patch.saturated and patch.level >= PATCH_MIN_LEVEL:
                    wb = colour.apply(colour.white_balance(liquid_bgr, patch.bgr))
                    lab = linear_to_lab(tuple(max(0.0, c) for c in wb))
                    c_colour = min(1.0, (y1 - y0) / 10.0) * patch.confidence
    status: Status = "ok" if not reasons else "cannot_verify"
    conf = Confidence(
        vial=vial.confidence if vial else 0.0,
        patch=patch.confidence if patch else 0.0,
        fill=round(c_fill, 3),
        colour=round(c_colour, 3),
    )
    return FrameAnalysis(
        v.width,
        v.height,
        status,
        tuple(reasons),
        tuple(notes),
        vial is not None,
        vial,
        patch,
        surface_y,
        surface_px,
        fill_px,
        fill_ml,
        lab,
        liquid_bgr,
        liquid_box,
        wb,
        conf,
        change,
    )
