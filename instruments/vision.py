"""Camera vision: pure functions from a BGR image to verified measurements.

The camera is the station's independent witness: it checks that what the
instruments report (volumes dispensed, colour measured) is what physically
happened. Everything here is a pure function of NumPy arrays (BGR ``uint8``,
``(height, width, 3)``, as :mod:`instruments.transports.camera` delivers them);
OpenCV is used inside, and this is the only module besides the camera
transport allowed to import it (layers above decode JPEG through
:func:`decode_jpeg`). Nothing depends on a particular image size or on pixel
coordinates of the simulator: the vial and the reference patch are *detected*
in every frame, and pixel-to-mL is *calibrated* from frames of known volume.

Entry points
------------
* :func:`decode_jpeg` -- JPEG bytes (e.g. ``Frame.encoded``) -> BGR image.
* :func:`analyse` -- one frame -> :class:`FrameAnalysis`: vial present, fill
  level (px and mL), liquid colour (CIELAB), scene change versus a reference
  frame, a confidence per measurement, and ``status`` ``"ok"`` or
  ``"cannot_verify"`` with the reasons.
* :func:`prepare_reference` -- analyse a reference frame once, compare many.
* :func:`overlay` -- draw the measurements on a copy of the frame (contact sheet).
* :func:`fit_calibration` -- frames of known fill volume (and optionally of
  known liquid colour) -> :class:`Calibration` (``to_dict``/``from_dict`` for
  the station config).

How it measures (see docs/vision.md for the details and the limits)
-------------------------------------------------------------------
* **Vial**: the two longest vertical *dark lines* of similar extent (the
  glass walls' edges seen side on), found as narrow valleys of the column
  profile and confirmed row by row; their common extent is the vial's height
  (rim top to bottom edge).
* **Reference patch**: the brightest large, square, uniform blob outside the
  vial. Its mean colour is the white of the white balance (dividing by it
  cancels the lighting gain and its drift).
* **Fill level**: the row profile of the middle 40 % of the vial (away from
  the walls, the highlight stripe and the meniscus' climb at the walls): the
  first stable run below the rim that looks like the background seen through
  glass is air; the liquid surface (the bottom of the concave meniscus, where
  it is read) is where the profile leaves the air colour, located to a
  fraction of a pixel by the area under the transition. Its height is
  expressed as a fraction of the vial's height (independent of resolution and
  zoom) and turned into mL by a :class:`FillCalibration`.
* **Colour**: the mean of the stable liquid rows under the meniscus band and
  above the glass bottom, divided channel by channel by the patch colour
  (white balance), corrected by a :class:`ColourCorrection`, converted to
  CIELAB with exactly the convention of ``instruments.colour`` (linear sRGB, the
  IEC 61966-2-1 matrix, D65 white as that matrix's row sums, so a liquid as
  bright as the patch in every channel is ``L=100, a=b=0``). That is the
  convention of the colour sensor's ``counts_to_lab`` (counts divided by a
  white reference, treated as linear sRGB), so the camera's Lab and the
  sensor's Lab are comparable with CIEDE2000. ``response="linear"`` takes
  pixel values as linear in light (the simulator, raw/linear cameras);
  ``response="srgb"`` first undoes the sRGB transfer curve (most webcams).
* **Scene change** (with a reference frame): bit-identical frame or the same
  sensor-noise pattern on the patch (frozen camera); displacement of the
  patch, the vial or the whole image (phase correlation; camera moved, vial
  moved); areas outside the vial that changed by more than
  ``CHANGE_THRESHOLD`` of the background brightness after cancelling the
  lighting gain (spill, object), as boxes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from instruments.colour import delta_e2000, lab_to_linear, linear_to_lab
from instruments.errors import InstrumentError

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "CalibrationError",
    "ChangeRegion",
    "ColourCorrection",
    "Confidence",
    "FillCalibration",
    "FrameAnalysis",
    "PatchDetection",
    "Reference",
    "SceneChange",
    "CalibrationGeometry",
    "VialDetection",
    "VisionError",
    "analyse",
    "decode_jpeg",
    "find_patch",
    "find_vial",
    "fit_calibration",
    "overlay",
    "prepare_reference",
]

Box = tuple[int, int, int, int]  # x, y, w, h in pixels
Response = Literal["linear", "srgb"]
Status = Literal["ok", "cannot_verify"]

CALIBRATION_FORMAT = "labbridge.vision.calibration/1"
MIN_WIDTH, MIN_HEIGHT = 64, 48

# Detector tunables. These describe what a vial / patch / change looks like in
# relative terms (fractions of the image or of the vial), not where things are.
WALL_MIN_RUN = 0.25  # a vial wall edge spans at least this fraction of the image height
WALL_VALLEY = 0.2  # a wall edge pixel is this much darker than both its neighbours (relative)
VIAL_WIDTH_RANGE = (0.03, 0.6)  # vial outer width as a fraction of the image width
CENTRAL_FRACTION = 0.4  # the middle part of the vial's width used for fill and colour
AIR_RATIO = (0.6, 1.15)  # air in the vial: the background through glass, per channel ratio
AIR_NEUTRAL = 0.12  # ... with channel ratios within this spread (no tint)
CHROMA_TOLERANCE = 3.0  # hue changes count from this many times the brightness tolerance
PATCH_MIN_AREA = 0.001  # reference patch: at least this fraction of the image area
PATCH_MAX_ASPECT = 1.35  # ... square within this aspect ratio
PATCH_MIN_FILL = 0.85  # ... filling its bounding box
PATCH_MAX_CV = 0.08  # ... uniform: std / mean of its inner part
PATCH_SATURATED_FRACTION = 0.01  # more inner pixels than this at 254+ = over-exposed
PATCH_MIN_LEVEL = 25.0  # a patch darker than this (DN) is too dark to white-balance on
CHANGE_THRESHOLD = 0.15  # relative brightness change that counts as "changed"
CHANGE_MIN_AREA = 0.0004  # changed regions smaller than this fraction of the image are ignored
FROZEN_NOISE_CORRELATION = 0.4  # same noise pattern on the patch above this = frozen camera
FROZEN_SAME_PIXELS = 0.995  # ... or this fraction of the pixels bit-identical (e.g. a time stamp)
NOISE_FLOOR = 0.15  # band-passed noise below this (DN rms) is too little to compare
DEFAULT_NOISE_DN = 2.0  # sensor noise assumed when there is no patch to measure it on
MOVED_FRACTION = 0.006  # a displacement above this fraction of the width (min 3 px) = moved
# The vial's height differing from the calibration's by more: a note, lower fill confidence.
VIAL_HEIGHT_TOLERANCE = 0.03


# ---------------------------------------------------------------------- errors
class VisionError(InstrumentError, ValueError):
    """Input the vision code cannot work with (wrong type, dtype, shape, not a JPEG, ...)."""


class CalibrationError(VisionError):
    """A calibration could not be fitted (too few usable frames, a bad fit) or loaded."""


# ------------------------------------------------------------- colour science
# instruments.colour: linear sRGB (IEC 61966-2-1) -> XYZ with the D65 white as the
# matrix's row sums -> CIE 1976 L*a*b*, and CIEDE2000 (the colour sensor's Lab uses
# the same functions, so the camera's and the sensor's colours compare directly).


def _three(values: Sequence[float] | np.ndarray, what: str) -> tuple[float, float, float]:
    try:
        seq = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise VisionError(f"{what} must be 3 numbers, got {values!r}") from exc
    if len(seq) != 3 or not all(math.isfinite(v) for v in seq):
        raise VisionError(f"{what} must be 3 finite numbers, got {values!r}")
    return (seq[0], seq[1], seq[2])


def _srgb_decode(v: np.ndarray) -> np.ndarray:
    """sRGB transfer curve, encoded 0-1 -> linear 0-1."""
    v = np.clip(v, 0.0, None)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


# --------------------------------------------------------------- input checks
def decode_jpeg(data: bytes | bytearray | memoryview) -> np.ndarray:
    """JPEG bytes -> BGR ``uint8`` image ``(height, width, 3)``.

    Raises :class:`VisionError` naming the problem for empty input, bytes that
    are not a JPEG (no start-of-image marker), a truncated JPEG (no
    end-of-image marker: libjpeg would silently fill the missing part with
    grey) or data OpenCV cannot decode.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise VisionError(f"decode_jpeg needs bytes, got {type(data).__name__}")
    raw = bytes(data)
    if not raw:
        raise VisionError("decode_jpeg: empty input (0 bytes)")
    if raw[:2] != b"\xff\xd8":
        raise VisionError(
            f"decode_jpeg: not a JPEG ({len(raw)} bytes starting {raw[:8]!r}; "
            "a JPEG starts with the SOI marker FF D8)"
        )
    if not raw.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9"):
        raise VisionError(
            f"decode_jpeg: truncated or corrupt JPEG ({len(raw)} bytes, no end-of-image marker FF D9)"
        )
    image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise VisionError(f"decode_jpeg: corrupt JPEG ({len(raw)} bytes) could not be decoded")
    return np.asarray(image, dtype=np.uint8)


def _check_frame(frame: Any, what: str = "frame") -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise VisionError(
            f"{what} must be a NumPy BGR image (height, width, 3) of uint8, got {type(frame).__name__}"
        )
    if frame.dtype != np.uint8:
        raise VisionError(f"{what} must be uint8 BGR, got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise VisionError(
            f"{what} must have shape (height, width, 3) (BGR colour), got shape {frame.shape}"
        )
    h, w = int(frame.shape[0]), int(frame.shape[1])
    if w < MIN_WIDTH or h < MIN_HEIGHT:
        raise VisionError(f"{what} is {w}x{h}: too small (at least {MIN_WIDTH}x{MIN_HEIGHT})")
    return np.ascontiguousarray(frame)


# ----------------------------------------------------------------- detections
@dataclass(frozen=True)
class VialDetection:
    """The vial as found: its walls' outer edge lines and its vertical extent.

    ``left_x``/``right_x``: columns of the left / right wall edge lines;
    ``top_y``: first row of the rim's top; ``bottom_y``: last row of the bottom
    edge. ``box`` is ``(x, y, w, h)`` from them. ``confidence`` 0-1: edge
    contrast and how well the two walls agree.
    """

    left_x: float
    right_x: float
    top_y: float
    bottom_y: float
    confidence: float

    @property
    def width(self) -> float:
        return self.right_x - self.left_x

    @property
    def height(self) -> float:
        return self.bottom_y - self.top_y

    @property
    def box(self) -> Box:
        x0, y0 = int(math.floor(self.left_x)), int(math.floor(self.top_y))
        return (
            x0,
            y0,
            int(math.ceil(self.right_x)) - x0 + 1,
            int(math.ceil(self.bottom_y)) - y0 + 1,
        )

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.left_x + self.right_x) / 2.0, (self.top_y + self.bottom_y) / 2.0)

    def central_columns(self) -> tuple[int, int]:
        """First and one-past-last column of the middle part used for fill and colour."""
        margin = (1.0 - CENTRAL_FRACTION) / 2.0 * self.width
        return int(round(self.left_x + margin)), int(round(self.right_x - margin)) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "left_x": self.left_x,
            "right_x": self.right_x,
            "top_y": self.top_y,
            "bottom_y": self.bottom_y,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class PatchDetection:
    """The white reference patch: ``box`` (x, y, w, h), the ``inner`` box measured
    (the middle 60 %), its mean colour ``bgr`` (DN), ``noise`` (std of its gray
    level, DN), ``saturated`` (over-exposed: white balance impossible),
    ``confidence`` 0-1."""

    box: Box
    inner: Box
    bgr: tuple[float, float, float]
    noise: float
    saturated: bool
    confidence: float

    @property
    def level(self) -> float:
        """Gray level of the patch (mean of B, G, R), DN."""
        return sum(self.bgr) / 3.0

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return (x + w / 2.0, y + h / 2.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "bgr": list(self.bgr),
            "noise": self.noise,
            "saturated": self.saturated,
            "confidence": self.confidence,
        }


class _Views:
    """One frame and the derived images every step needs (computed once)."""

    def __init__(self, frame: np.ndarray) -> None:
        self.frame = frame
        self.height, self.width = int(frame.shape[0]), int(frame.shape[1])
        self.gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        self.half = cv2.resize(
            self.gray, (self.width // 2, self.height // 2), interpolation=cv2.INTER_AREA
        )
        self.scale = min(self.width / 640.0, self.height / 480.0)
        self.k = max(2, int(round(3.0 * self.scale)))  # half-width of the line detector


def _hist_percentiles(img: np.ndarray, qs: Sequence[float]) -> list[float]:
    hist = cv2.calcHist([img], [0], None, [256], [0, 256]).ravel()
    cdf = np.cumsum(hist)
    total = float(cdf[-1])
    return [float(np.searchsorted(cdf, q * total)) for q in qs]


def _longest_run(mask: np.ndarray, max_gap: int) -> tuple[int, int]:
    """Longest run of True in a 1-D mask, bridging gaps up to ``max_gap``: (start, stop)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return (0, 0)
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.concatenate(([0], breaks + 1))
    stops = np.concatenate((breaks, [idx.size - 1]))
    lengths = idx[stops] - idx[starts]
    best = int(np.argmax(lengths))
    return int(idx[starts[best]]), int(idx[stops[best]]) + 1


def _blobs(mask: np.ndarray, min_area: float) -> list[tuple[int, int, int, int, int, np.ndarray]]:
    """Connected blobs of a binary mask: (x, y, w, h, pixel count, their mask within the box).

    Outer contours (``cv2.findContours``), not ``connectedComponentsWithStats``: on
    these sparse masks it is ~30x faster (0.01 ms versus 0.4 ms at 320x240, one core).
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if w * h < min_area:
            continue
        filled = np.zeros((h, w), np.uint8)
        cv2.drawContours(filled, [c - np.array([x, y], dtype=c.dtype)], -1, 255, -1)
        sel = (filled > 0) & (mask[y : y + h, x : x + w] > 0)
        area = int(np.count_nonzero(sel))
        if area >= min_area:
            out.append((x, y, w, h, area, sel))
    return out


@dataclass
class _Wall:
    x: int
    top: int
    bottom: int
    contrast: float


def _find_walls(v: _Views) -> list[_Wall]:
    gray, k, h, w = v.gray, v.k, v.height, v.width
    col = cv2.reduce(gray, 0, cv2.REDUCE_AVG, dtype=cv2.CV_32F).ravel()
    sides = np.minimum(col[: w - 2 * k], col[2 * k :])
    valley = np.zeros(w, dtype=np.float32)
    valley[k : w - k] = (sides - col[k : w - k]) / np.maximum(sides, 1.0)
    # Candidates: local maxima of the valley depth (non-maximum suppression over +-k).
    dil = cv2.dilate(valley.reshape(1, -1), np.ones((1, 2 * k + 1), np.uint8)).ravel()
    cand = np.flatnonzero((valley >= dil) & (valley > 0.04))
    cand = cand[np.argsort(valley[cand])[::-1][:14]]
    walls: list[_Wall] = []
    min_run = int(WALL_MIN_RUN * h)
    for c in sorted(int(c) for c in cand):
        lo, hi = max(k, c - 1), min(w - k, c + 2)
        cols = gray[:, lo - k : hi + k].astype(np.int16)
        best = None
        for j in range(hi - lo):
            centre = cols[:, j + k]
            s = np.minimum(cols[:, j], cols[:, j + 2 * k])
            depth = s - centre
            mask = (depth > WALL_VALLEY * s) & (depth >= 6)
            top, bottom = _longest_run(mask, max_gap=max(2, h // 100))
            if bottom - top >= min_run and (best is None or bottom - top > best.bottom - best.top):
                rel = float(np.mean(depth[top:bottom] / np.maximum(s[top:bottom], 1)))
                best = _Wall(lo + j, top, bottom - 1, rel)
        if best is not None:
            walls.append(best)
    # Merge walls closer than k (a 2-px line seen from two columns): keep the longer.
    merged: list[_Wall] = []
    for wall in walls:
        if merged and wall.x - merged[-1].x <= k:
            if wall.bottom - wall.top > merged[-1].bottom - merged[-1].top:
                merged[-1] = wall
        else:
            merged.append(wall)
    return merged


def _detect_vial(v: _Views) -> VialDetection | None:
    walls = _find_walls(v)
    best: tuple[float, _Wall, _Wall] | None = None
    for i, a in enumerate(walls):
        for b in walls[i + 1 :]:
            width = b.x - a.x
            if not VIAL_WIDTH_RANGE[0] * v.width <= width <= VIAL_WIDTH_RANGE[1] * v.width:
                continue
            ha, hb = a.bottom - a.top, b.bottom - b.top
            mismatch = abs(a.top - b.top) + abs(a.bottom - b.bottom)
            if mismatch > 0.1 * max(ha, hb):
                continue
            score = min(ha, hb) * (1.0 - mismatch / max(ha, hb))
            if best is None or score > best[0]:
                best = (score, a, b)
    if best is None:
        return None
    _, a, b = best
    top = (a.top + b.top) / 2.0
    bottom = (a.bottom + b.bottom) / 2.0
    height = bottom - top
    c_contrast = min(1.0, min(a.contrast, b.contrast) / 0.3)
    mismatch = abs(a.top - b.top) + abs(a.bottom - b.bottom)
    c_sym = max(0.0, 1.0 - max(0.0, mismatch - 2.0) / (0.04 * height))
    return VialDetection(float(a.x), float(b.x), top, bottom, round(c_contrast * c_sym, 3))


def _detect_patch(v: _Views, vial: VialDetection | None) -> PatchDetection | None:
    half = v.half
    bg, top = _hist_percentiles(half, (0.5, 0.999))
    if top - bg < max(10.0, 0.25 * bg):
        return None
    thr = bg + 0.55 * (top - bg)
    _, mask = cv2.threshold(half, thr, 255, cv2.THRESH_BINARY)
    hh, hw = half.shape
    min_area = PATCH_MIN_AREA * hh * hw
    vial_box = None
    if vial is not None:
        x, y, w, h = vial.box
        pad = 0.15 * w
        vial_box = ((x - pad) / 2.0, (y - pad) / 2.0, (x + w + pad) / 2.0, (y + h + pad) / 2.0)
    best: tuple[float, PatchDetection] | None = None
    for x, y, w, h, area, _ in _blobs(mask, min_area):
        if max(w, h) > PATCH_MAX_ASPECT * min(w, h):
            continue
        if area < PATCH_MIN_FILL * w * h:
            continue
        if vial_box is not None and not (
            x + w < vial_box[0] or x > vial_box[2] or y + h < vial_box[1] or y > vial_box[3]
        ):
            continue
        box = (2 * x, 2 * y, 2 * w, 2 * h)
        inner = (
            box[0] + int(0.2 * box[2]),
            box[1] + int(0.2 * box[3]),
            max(2, int(0.6 * box[2])),
            max(2, int(0.6 * box[3])),
        )
        ix, iy, iw, ih = inner
        pix = v.frame[iy : iy + ih, ix : ix + iw]
        g = v.gray[iy : iy + ih, ix : ix + iw]
        mean_g, std_g = cv2.meanStdDev(g)
        level, noise = float(mean_g[0, 0]), float(std_g[0, 0])
        cv = noise / max(level, 1.0)
        if cv > PATCH_MAX_CV:
            continue
        bgr = cv2.mean(pix)[:3]
        sat = float(np.count_nonzero(pix.max(axis=2) >= 254)) / float(iw * ih)
        saturated = sat > PATCH_SATURATED_FRACTION
        squareness = 1.0 - (max(w, h) / min(w, h) - 1.0) / (PATCH_MAX_ASPECT - 1.0)
        uniformity = 1.0 - cv / PATCH_MAX_CV
        conf = 0.0 if saturated else max(0.0, min(1.0, 0.5 + 0.5 * squareness)) * uniformity
        det = PatchDetection(
            box, inner, (float(bgr[0]), float(bgr[1]), float(bgr[2])), noise, saturated, conf
        )
        score = level * area  # the brightest, then the largest
        if best is None or score > best[0]:
            best = (score, det)
    return None if best is None else best[1]


def find_vial(frame: np.ndarray) -> VialDetection | None:
    """Find the vial in a BGR frame; None when there is none (see the module docstring)."""
    return _detect_vial(_Views(_check_frame(frame)))


def find_patch(frame: np.ndarray, vial: VialDetection | None = None) -> PatchDetection | None:
    """Find the white reference patch (outside ``vial`` when given); None when there is none."""
    v = _Views(_check_frame(frame))
    return _detect_patch(v, vial if vial is not None else _detect_vial(v))


# -------------------------------------------------------------- calibrations
@dataclass(frozen=True)
class FillCalibration:
    """Liquid surface height -> volume (mL).

    The height ``h`` is the liquid surface's height above the vial's bottom
    edge as a fraction of the vial's height (rim top to bottom edge), so one
    calibration serves any resolution and survives a small change of zoom.
    ``coefficients`` of the polynomial ``mL = c0 + c1*h + c2*h**2 ...``
    (lowest order first), fitted by least squares to ``heights``/``volumes``;
    ``residuals_ml`` = measured - known volume per sample. The glass bottom's
    thickness is in the intercept: ``zero_height`` is where the polynomial
    gives 0 mL (the inner bottom).
    """

    coefficients: tuple[float, ...]
    heights: tuple[float, ...] = ()
    volumes: tuple[float, ...] = ()
    residuals_ml: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= len(self.coefficients) <= 4:
            raise CalibrationError(
                f"fill calibration needs 2-4 coefficients (degree 1-3), got {len(self.coefficients)}"
            )
        if not all(math.isfinite(c) for c in self.coefficients):
            raise CalibrationError(
                f"fill calibration coefficients must be finite: {self.coefficients}"
            )
        if self.slope(self.zero_height) <= 0:
            raise CalibrationError(
                "fill calibration must increase with the liquid height "
                f"(coefficients {self.coefficients})"
            )

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    @property
    def rms_ml(self) -> float:
        r = self.residuals_ml
        return math.sqrt(sum(x * x for x in r) / len(r)) if r else 0.0

    @property
    def max_abs_ml(self) -> float:
        return max((abs(x) for x in self.residuals_ml), default=0.0)

    def volume_ml(self, height: float) -> float:
        """Volume (mL) at a surface height (fraction of the vial height)."""
        return float(sum(c * height**i for i, c in enumerate(self.coefficients)))

    def slope(self, height: float) -> float:
        return float(sum(i * c * height ** (i - 1) for i, c in enumerate(self.coefficients) if i))

    @property
    def zero_height(self) -> float:
        """Height (fraction of the vial) where the calibration gives 0 mL: the inner bottom."""
        c = self.coefficients
        h = -c[0] / c[1] if c[1] else 0.0
        for _ in range(20):  # Newton from the linear guess (exact for degree 1)
            s = float(sum(i * ci * h ** (i - 1) for i, ci in enumerate(c) if i))
            if s == 0:
                break
            step = self.volume_ml(h) / s
            h -= step
            if abs(step) < 1e-12:
                break
        return h

    @classmethod
    def fit(
        cls, heights: Sequence[float], volumes: Sequence[float], degree: int = 1
    ) -> FillCalibration:
        """Least-squares fit; :class:`CalibrationError` on too few or degenerate samples."""
        if not 1 <= degree <= 3:
            raise CalibrationError(f"fill calibration degree must be 1, 2 or 3, got {degree}")
        hs = np.asarray(heights, dtype=np.float64)
        vs = np.asarray(volumes, dtype=np.float64)
        if hs.shape != vs.shape or hs.ndim != 1:
            raise CalibrationError(
                f"fill calibration needs as many heights as volumes, got {hs.shape} and {vs.shape}"
            )
        need = degree + 2
        if hs.size < need:
            raise CalibrationError(
                f"fill calibration of degree {degree} needs at least {need} usable frames "
                f"(one more than the coefficients, for a residual), got {hs.size}"
            )
        if np.unique(np.round(vs, 6)).size < degree + 1:
            raise CalibrationError(
                f"fill calibration of degree {degree} needs at least {degree + 1} different "
                f"volumes, got {sorted(set(vs.tolist()))}"
            )
        if not (np.all(np.isfinite(hs)) and np.all(np.isfinite(vs))):
            raise CalibrationError("fill calibration samples must be finite numbers")
        coeffs = np.polynomial.polynomial.polyfit(hs, vs, degree)
        resid = np.polynomial.polynomial.polyval(hs, coeffs) - vs
        return cls(
            tuple(float(c) for c in coeffs),
            tuple(float(h) for h in hs),
            tuple(float(x) for x in vs),
            tuple(float(r) for r in resid),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "polynomial",
            "input": "surface height above the vial's bottom edge / vial height",
            "coefficients": list(self.coefficients),
            "heights": list(self.heights),
            "volumes_ml": list(self.volumes),
            "residuals_ml": list(self.residuals_ml),
            "rms_ml": self.rms_ml,
            "max_abs_ml": self.max_abs_ml,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FillCalibration:
        return cls(
            _floats(data, "coefficients", "fill"),
            _floats(data, "heights", "fill", required=False),
            _floats(data, "volumes_ml", "fill", required=False),
            _floats(data, "residuals_ml", "fill", required=False),
        )


@dataclass(frozen=True)
class ColourCorrection:
    """White-balanced camera RGB -> linear sRGB, applied before the conversion to Lab.

    ``response``: ``"linear"`` (pixel values proportional to light, as the
    simulator renders) or ``"srgb"`` (gamma-encoded, most webcams: decoded
    before the white balance). ``matrix`` (3x3, rows R, G, B of the output)
    multiplies the white-balanced (R, G, B) ratios; identity by default;
    ``model`` says how it was fitted (``"identity"``, ``"gains"`` = diagonal,
    ``"matrix"`` = full 3x3). ``residuals`` are CIEDE2000 per fitted sample.
    """

    matrix: tuple[tuple[float, float, float], ...] = (
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
    )
    response: Response = "linear"
    model: str = "identity"
    residuals: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (3, 3) or not np.all(np.isfinite(m)):
            raise CalibrationError(
                f"colour correction matrix must be 3x3 finite numbers, got {self.matrix!r}"
            )
        if abs(float(np.linalg.det(m))) < 1e-6:
            raise CalibrationError(f"colour correction matrix is singular: {self.matrix!r}")
        if self.response not in ("linear", "srgb"):
            raise CalibrationError(
                f"colour response must be 'linear' or 'srgb', got {self.response!r}"
            )

    def white_balance(
        self, liquid_bgr: Sequence[float], patch_bgr: Sequence[float]
    ) -> tuple[float, float, float]:
        """Mean liquid colour / patch colour per channel (after undoing the response): R, G, B."""
        lq = np.array([liquid_bgr[2], liquid_bgr[1], liquid_bgr[0]], dtype=np.float64) / 255.0
        pt = np.array([patch_bgr[2], patch_bgr[1], patch_bgr[0]], dtype=np.float64) / 255.0
        if self.response == "srgb":
            lq, pt = _srgb_decode(lq), _srgb_decode(pt)
        ratio = lq / np.maximum(pt, 1e-6)
        return (float(ratio[0]), float(ratio[1]), float(ratio[2]))

    def apply(self, rgb: Sequence[float]) -> tuple[float, float, float]:
        out = np.asarray(self.matrix, dtype=np.float64) @ np.asarray(rgb, dtype=np.float64)
        return (float(out[0]), float(out[1]), float(out[2]))

    def lab(
        self, liquid_bgr: Sequence[float], patch_bgr: Sequence[float]
    ) -> tuple[float, float, float]:
        """White balance, correct, convert: the liquid's L*a*b* (D65, instruments.colour convention)."""
        rgb = self.apply(self.white_balance(liquid_bgr, patch_bgr))
        return linear_to_lab(tuple(max(0.0, c) for c in rgb))

    @classmethod
    def fit(
        cls,
        measured_rgb: Sequence[Sequence[float]],
        target_lab: Sequence[Sequence[float]],
        *,
        model: Literal["gains", "matrix"] = "gains",
        response: Response = "linear",
    ) -> ColourCorrection:
        """Fit from white-balanced camera RGB (see :meth:`white_balance`) and known Labs.

        ``gains`` (per channel, needs >= 2 samples) or ``matrix`` (3x3, needs
        >= 4 samples of different colours). Least squares in linear RGB.
        """
        m = np.asarray(measured_rgb, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != 3 or len(target_lab) != m.shape[0]:
            raise CalibrationError(
                f"colour correction needs N measured RGB triples and N target Labs, "
                f"got {m.shape} and {len(target_lab)}"
            )
        t = np.array([lab_to_linear(lab) for lab in target_lab], dtype=np.float64)
        n = m.shape[0]
        if model == "gains":
            if n < 2:
                raise CalibrationError(f"colour gains need at least 2 colour samples, got {n}")
            denom = np.sum(m * m, axis=0)
            if np.any(denom <= 1e-9):
                raise CalibrationError("colour gains: a channel is zero in every sample")
            matrix = np.diag(np.sum(m * t, axis=0) / denom)
        elif model == "matrix":
            if n < 4:
                raise CalibrationError(
                    f"a 3x3 colour matrix needs at least 4 colour samples, got {n}"
                )
            if np.linalg.matrix_rank(m, tol=1e-3) < 3:
                raise CalibrationError(
                    "a 3x3 colour matrix needs samples of at least 3 independent colours"
                )
            sol, *_ = np.linalg.lstsq(m, t, rcond=None)
            matrix = sol.T
        else:
            raise CalibrationError(f"colour model must be 'gains' or 'matrix', got {model!r}")
        tmp = cls(tuple((float(r[0]), float(r[1]), float(r[2])) for r in matrix), response, model)
        resid = tuple(
            delta_e2000(linear_to_lab([max(0.0, c) for c in tmp.apply(mi)]), lab)
            for mi, lab in zip(m, target_lab, strict=True)
        )
        return cls(tmp.matrix, response, model, resid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "response": self.response,
            "matrix": [list(r) for r in self.matrix],
            "residuals_de2000": list(self.residuals),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColourCorrection:
        rows = data.get("matrix")
        if not isinstance(rows, list) or len(rows) != 3:
            raise CalibrationError(f"colour.matrix must be a 3x3 list, got {rows!r}")
        matrix = tuple(_floats({"row": r}, "row", "colour.matrix") for r in rows)
        if any(len(r) != 3 for r in matrix):
            raise CalibrationError(f"colour.matrix must be a 3x3 list, got {rows!r}")
        response = data.get("response", "linear")
        return cls(
            tuple((r[0], r[1], r[2]) for r in matrix),
            response,
            str(data.get("model", "matrix")),
            _floats(data, "residuals_de2000", "colour", required=False),
        )


@dataclass(frozen=True)
class CalibrationGeometry:
    """Where the vial and the patch were at calibration, as fractions of the image size."""

    vial_centre: tuple[float, float]
    vial_height: float  # fraction of the image height
    patch_centre: tuple[float, float] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vial_centre": list(self.vial_centre),
            "vial_height": self.vial_height,
            "patch_centre": list(self.patch_centre) if self.patch_centre else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationGeometry:
        vc = _floats(data, "vial_centre", "geometry")
        pc = data.get("patch_centre")
        pcf = _floats(data, "patch_centre", "geometry") if pc is not None else None
        if len(vc) != 2 or (pcf is not None and len(pcf) != 2):
            raise CalibrationError("geometry centres must be [x, y] pairs")
        vh = data.get("vial_height")
        if not isinstance(vh, int | float) or not 0 < vh <= 1:
            raise CalibrationError(f"geometry.vial_height must be in (0, 1], got {vh!r}")
        return cls((vc[0], vc[1]), float(vh), (pcf[0], pcf[1]) if pcf else None)


@dataclass(frozen=True)
class Calibration:
    """Everything :func:`analyse` needs to turn pixels into mL and Lab for one station camera.

    ``min_liquid_ml``: below this volume there is too little liquid to measure
    its colour (``lab`` is None, not an error).
    """

    fill: FillCalibration
    colour: ColourCorrection = field(default_factory=ColourCorrection)
    geometry: CalibrationGeometry | None = None
    min_liquid_ml: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able (plain lists, floats, strings)."""
        return {
            "format": CALIBRATION_FORMAT,
            "fill": self.fill.to_dict(),
            "colour": self.colour.to_dict(),
            "geometry": self.geometry.to_dict() if self.geometry else None,
            "min_liquid_ml": self.min_liquid_ml,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; :class:`CalibrationError` naming the field on bad data."""
        if not isinstance(data, Mapping):
            raise CalibrationError(f"a calibration is a mapping, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != CALIBRATION_FORMAT:
            raise CalibrationError(
                f"calibration format {fmt!r} is not {CALIBRATION_FORMAT!r} (field 'format')"
            )
        fill = data.get("fill")
        if not isinstance(fill, Mapping):
            raise CalibrationError("calibration field 'fill' is missing or not a mapping")
        colour = data.get("colour", {})
        if not isinstance(colour, Mapping):
            raise CalibrationError("calibration field 'colour' is not a mapping")
        geometry = data.get("geometry")
        if geometry is not None and not isinstance(geometry, Mapping):
            raise CalibrationError("calibration field 'geometry' is not a mapping")
        mlm = data.get("min_liquid_ml", 0.1)
        if not isinstance(mlm, int | float) or mlm < 0:
            raise CalibrationError(f"calibration field 'min_liquid_ml' must be >= 0, got {mlm!r}")
        return cls(
            FillCalibration.from_dict(fill),
            ColourCorrection.from_dict(colour) if colour else ColourCorrection(),
            CalibrationGeometry.from_dict(geometry) if geometry is not None else None,
            float(mlm),
        )


def _floats(
    data: Mapping[str, Any], key: str, where: str, *, required: bool = True
) -> tuple[float, ...]:
    value = data.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list | tuple) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value
    ):
        raise CalibrationError(
            f"calibration field '{where}.{key}' must be a list of numbers, got {value!r}"
        )
    return tuple(float(x) for x in value)


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


# ------------------------------------------------------------- calibration
def fit_calibration(
    samples: Sequence[tuple[np.ndarray, float]],
    *,
    colour_samples: Sequence[tuple[np.ndarray, Sequence[float]]] = (),
    degree: int = 1,
    colour_model: Literal["gains", "matrix"] = "gains",
    response: Response = "linear",
    max_residual_ml: float = 0.1,
    min_liquid_ml: float = 0.1,
) -> Calibration:
    """Fit a :class:`Calibration` from frames of known fill volume (mL).

    ``samples``: ``(frame, volume_ml)`` pairs, e.g. an empty vial and several
    known dispensed volumes up to the capacity; each frame must show the vial
    (and should show the patch). ``colour_samples``: optional ``(frame,
    known_lab)`` pairs (liquids of known colour, Lab D65 as ``instruments.colour``)
    to fit the :class:`ColourCorrection` (``colour_model``); without them the
    correction is the identity with the given ``response``.

    Raises :class:`CalibrationError` naming the frames: too few usable frames
    (at least ``degree + 2``, of ``degree + 1`` different volumes), or a bad
    fit (a residual above ``max_residual_ml``).
    """
    if not samples:
        raise CalibrationError("fit_calibration needs (frame, volume_ml) samples, got none")
    heights: list[float] = []
    volumes: list[float] = []
    used: list[int] = []
    problems: list[str] = []
    vial_heights: list[float] = []
    vial_centres: list[tuple[float, float]] = []
    patch_centres: list[tuple[float, float]] = []
    for i, sample in enumerate(samples):
        try:
            frame, volume = sample
            volume = float(volume)
        except (TypeError, ValueError) as exc:
            raise CalibrationError(
                f"sample {i} must be (frame, volume_ml), got {sample!r}"
            ) from exc
        if not math.isfinite(volume) or volume < 0:
            raise CalibrationError(f"sample {i}: volume {volume!r} mL must be a finite number >= 0")
        a = analyse(frame)
        if a.surface_px is None or a.vial is None:
            problems.append(f"frame {i} ({volume} mL): {'; '.join(a.reasons) or 'unusable'}")
            continue
        heights.append(a.surface_px / a.vial.height)
        volumes.append(volume)
        used.append(i)
        vial_heights.append(a.vial.height / a.height)
        vial_centres.append((a.vial.centre[0] / a.width, a.vial.centre[1] / a.height))
        if a.patch is not None:
            patch_centres.append((a.patch.centre[0] / a.width, a.patch.centre[1] / a.height))
    need = degree + 2
    if len(heights) < need:
        detail = "; ".join(problems) if problems else "every frame was usable"
        raise CalibrationError(
            f"too few usable calibration frames: {len(heights)} of {len(samples)} usable, "
            f"need at least {need} for degree {degree} ({detail})"
        )
    fill = FillCalibration.fit(heights, volumes, degree)
    worst = int(np.argmax(np.abs(fill.residuals_ml)))
    if abs(fill.residuals_ml[worst]) > max_residual_ml:
        raise CalibrationError(
            f"bad fill calibration fit: frame {used[worst]} ({volumes[worst]} mL) is "
            f"{fill.residuals_ml[worst]:+.3f} mL off the fitted curve (limit {max_residual_ml} mL; "
            f"rms {fill.rms_ml:.3f} mL over {len(used)} frames): check the volumes and the frames"
        )
    geometry = CalibrationGeometry(
        (
            float(np.median([c[0] for c in vial_centres])),
            float(np.median([c[1] for c in vial_centres])),
        ),
        float(np.median(vial_heights)),
        (
            float(np.median([c[0] for c in patch_centres])),
            float(np.median([c[1] for c in patch_centres])),
        )
        if patch_centres
        else None,
    )
    colour = ColourCorrection(response=response)
    if colour_samples:
        base = Calibration(fill, colour, geometry, min_liquid_ml)
        measured: list[tuple[float, float, float]] = []
        targets: list[Sequence[float]] = []
        bad: list[str] = []
        for i, csample in enumerate(colour_samples):
            try:
                cframe, clab = csample
                target = _three(clab, f"colour sample {i} Lab")
            except (TypeError, ValueError) as exc:
                raise CalibrationError(
                    f"colour sample {i} must be (frame, (L, a, b)), got {csample!r}"
                ) from exc
            a = analyse(cframe, base)
            if a.liquid_bgr is None or a.patch is None or a.white_balanced_rgb is None:
                bad.append(
                    f"colour frame {i}: {'; '.join(a.reasons + a.notes) or 'no liquid colour'}"
                )
                continue
            measured.append(colour.white_balance(a.liquid_bgr, a.patch.bgr))
            targets.append(target)
        try:
            colour = ColourCorrection.fit(measured, targets, model=colour_model, response=response)
        except CalibrationError as exc:
            raise CalibrationError(f"{exc} ({'; '.join(bad)})" if bad else str(exc)) from exc
    return Calibration(fill, colour, geometry, min_liquid_ml)


# ------------------------------------------------------------------ overlay
def overlay(frame: np.ndarray, analysis: FrameAnalysis) -> np.ndarray:
    """A copy of ``frame`` with the analysis drawn on it (for a report's contact sheet).

    Green: the vial; cyan: the patch; red line: the liquid surface; yellow:
    the region whose colour was measured, with a swatch of the white-balanced
    colour and its Lab; magenta: changed regions; the status and fill on top.
    """
    img = _check_frame(frame).copy()
    h, w = img.shape[:2]
    t = max(1, int(round(min(w / 640.0, h / 480.0))))
    fs = 0.45 * t
    if analysis.vial is not None:
        x, y, bw, bh = analysis.vial.box
        cv2.rectangle(img, (x, y), (x + bw, y + bh), (0, 200, 0), t)
        if analysis.surface_y is not None:
            sy = int(round(analysis.surface_y))
            cv2.line(img, (x - 6 * t, sy), (x + bw + 6 * t, sy), (0, 0, 255), t)
            label = (
                f"{analysis.fill_ml:.2f} mL"
                if analysis.fill_ml is not None
                else f"{analysis.surface_px:.0f} px"
            )
            cv2.putText(
                img,
                label,
                (x + bw + 8 * t, sy + 4 * t),
                cv2.FONT_HERSHEY_SIMPLEX,
                fs,
                (0, 0, 255),
                t,
                cv2.LINE_AA,
            )
    if analysis.patch is not None:
        x, y, bw, bh = analysis.patch.box
        cv2.rectangle(img, (x, y), (x + bw, y + bh), (255, 255, 0), t)
    if analysis.liquid_box is not None:
        x, y, bw, bh = analysis.liquid_box
        cv2.rectangle(img, (x, y), (x + bw, y + bh), (0, 255, 255), t)
    if analysis.change is not None:
        for r in analysis.change.regions:
            x, y, bw, bh = r.box
            cv2.rectangle(img, (x, y), (x + bw, y + bh), (255, 0, 255), t)
    if analysis.lab is not None and analysis.white_balanced_rgb is not None:
        rgb = [min(1.0, max(0.0, c)) for c in analysis.white_balanced_rgb]
        level = analysis.patch.level / 255.0 if analysis.patch is not None else 1.0
        swatch = tuple(int(round(255 * min(1.0, c * level))) for c in (rgb[2], rgb[1], rgb[0]))
        s = 24 * t
        x0, y0 = w - s - 8 * t, 8 * t
        cv2.rectangle(img, (x0, y0), (x0 + s, y0 + s), swatch, -1)
        cv2.rectangle(img, (x0, y0), (x0 + s, y0 + s), (255, 255, 255), 1)
        L, a, b = analysis.lab
        cv2.putText(
            img,
            f"Lab {L:.0f} {a:+.0f} {b:+.0f}",
            (x0 - 150 * t, y0 + 16 * t),
            cv2.FONT_HERSHEY_SIMPLEX,
            fs,
            (255, 255, 255),
            t,
            cv2.LINE_AA,
        )
    colour = (0, 200, 0) if analysis.ok else (0, 0, 255)
    text = (
        "OK"
        if analysis.ok
        else "CANNOT VERIFY: " + (analysis.reasons[0] if analysis.reasons else "")
    )
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, t)
    if tw > w - 16 * t:  # shrink a long reason to fit the width rather than cut it
        fs *= (w - 16 * t) / tw
    cv2.putText(
        img, text, (8 * t, h - 10 * t), cv2.FONT_HERSHEY_SIMPLEX, fs, colour, t, cv2.LINE_AA
    )
    return img


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


def encode_png(image: np.ndarray, *, compression: int = 3) -> bytes:
    """A BGR (or gray) ``uint8`` image -> PNG bytes (``compression`` 0-9: zlib level)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise VisionError(
            "encode_png needs a uint8 image, got "
            + (f"dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__)
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise VisionError(
            f"encode_png: image shape {image.shape} is not (h, w), (h, w, 3) or (h, w, 4)"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise VisionError(f"encode_png: empty image, shape {image.shape}")
    if not 0 <= compression <= 9:
        raise VisionError(f"encode_png: compression must be 0-9, got {compression}")
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise VisionError(f"encode_png: OpenCV could not encode an image of shape {image.shape}")
    return bytes(buf.tobytes())


_SHEET_FONT = cv2.FONT_HERSHEY_SIMPLEX
# OpenCV's Hershey fonts draw ASCII only (anything else comes out as "?")
_ASCII = str.maketrans(
    {"Δ": "d", "°": "deg", "µ": "u", "–": "-", "—": "-", "≤": "<=", "≥": ">=", "…": "..."}
    | {"×": "x", "’": "'", "‘": "'", "“": '"', "”": '"', "±": "+-", "²": "^2"}
)


def _ascii(text: str) -> str:
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")


def _wrap(text: str, width_px: int, scale: float, thickness: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width_px`` (OpenCV's Hershey font metrics)."""

    def fits(s: str) -> bool:
        return cv2.getTextSize(s, _SHEET_FONT, scale, thickness)[0][0] <= width_px

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:  # a word longer than the line: cut it
            cut = len(word) - 1
            while cut > 1 and not fits(word[:cut]):
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


def contact_sheet(
    frames: Sequence[np.ndarray],
    captions: Sequence[Sequence[str]] | None = None,
    *,
    columns: int = 4,
    tile_width: int = 320,
    caption_lines: int = 4,
    colours: Sequence[tuple[int, int, int]] | None = None,
    background: tuple[int, int, int] = (40, 40, 40),
    gap: int = 6,
) -> np.ndarray:
    """Tile ``frames`` (BGR ``uint8``, e.g. :func:`overlay` outputs) into one BGR image.

    Tile ``i`` is at row ``i // columns``, column ``i % columns``: the frame
    scaled to ``tile_width`` (aspect kept; every tile is as tall as the tallest
    scaled frame, shorter frames are centred), with ``captions[i]`` under it
    (one entry per line, each word-wrapped to the tile's width; at most
    ``caption_lines`` lines, the last cut with ``...`` when there is more;
    ``°``, ``Δ``, ``≤`` ... spelt in ASCII, which is all OpenCV's fonts draw) in
    ``colours[i]`` (BGR; default light grey). ``gap`` pixels of ``background``
    separate the tiles and surround the sheet, so the sheet is
    ``gap + rows * (tile_height + gap)`` by ``gap + columns' * (tile_width + gap)``
    pixels, ``columns' = min(columns, len(frames))``.
    """
    if not frames:
        raise VisionError("contact_sheet needs at least one frame")
    if captions is not None and len(captions) != len(frames):
        raise VisionError(f"contact_sheet: {len(frames)} frames but {len(captions)} captions")
    if colours is not None and len(colours) != len(frames):
        raise VisionError(f"contact_sheet: {len(frames)} frames but {len(colours)} caption colours")
    if columns < 1 or tile_width < 32 or caption_lines < 0 or gap < 0:
        raise VisionError(
            f"contact_sheet: columns >= 1, tile_width >= 32, caption_lines >= 0, gap >= 0 needed "
            f"(got {columns}, {tile_width}, {caption_lines}, {gap})"
        )
    checked = [_check_frame(f, f"frame {i}") for i, f in enumerate(frames)]
    scaled: list[np.ndarray] = []
    for f in checked:
        h, w = f.shape[:2]
        new_h = max(1, int(round(h * tile_width / w)))
        interp = cv2.INTER_AREA if tile_width < w else cv2.INTER_LINEAR
        scaled.append(cv2.resize(f, (tile_width, new_h), interpolation=interp))
    image_h = max(s.shape[0] for s in scaled)
    scale = max(0.3, 0.4 * tile_width / 320.0)
    thick = 1
    (_, text_h), base = cv2.getTextSize("Ag", _SHEET_FONT, scale, thick)
    line_h = text_h + base + 4
    texts: list[list[str]] = []
    for i in range(len(frames)):
        lines: list[str] = []
        for entry in captions[i] if captions is not None else ():
            lines += _wrap(_ascii(str(entry)), tile_width - 8, scale, thick) or [""]
        if caption_lines and len(lines) > caption_lines:
            lines = lines[:caption_lines]
            last = lines[-1]
            while (
                last
                and cv2.getTextSize(last + "...", _SHEET_FONT, scale, thick)[0][0] > tile_width - 8
            ):
                last = last[:-1]
            lines[-1] = last + "..."
        texts.append(lines[:caption_lines] if caption_lines else [])
    caption_h = (max(len(t) for t in texts) * line_h + 6) if any(texts) else 0
    tile_h = image_h + caption_h
    cols = min(columns, len(frames))
    rows = (len(frames) + columns - 1) // columns
    sheet = np.empty((gap + rows * (tile_h + gap), gap + cols * (tile_width + gap), 3), np.uint8)
    sheet[:] = background
    for i, (img, lines) in enumerate(zip(scaled, texts, strict=True)):
        r, c = divmod(i, columns)
        x0, y0 = gap + c * (tile_width + gap), gap + r * (tile_h + gap)
        top = y0 + (image_h - img.shape[0]) // 2
        sheet[top : top + img.shape[0], x0 : x0 + tile_width] = img
        colour = colours[i] if colours is not None else (220, 220, 220)
        for k, line in enumerate(lines):
            y = y0 + image_h + 4 + (k + 1) * line_h - base - 2
            cv2.putText(sheet, line, (x0 + 4, y), _SHEET_FONT, scale, colour, thick, cv2.LINE_AA)
    return sheet


__all__ += ["analysis_from_dict", "contact_sheet", "encode_png"]
