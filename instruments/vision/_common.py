"""Vision's common ground: its errors, the image types, the detector tunables, frame checks
and JPEG decoding (:func:`decode_jpeg`), and the sRGB helpers the colour code shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import cv2
import numpy as np

from instruments.errors import InstrumentError

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
