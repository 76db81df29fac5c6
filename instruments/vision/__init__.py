"""Camera vision: pure functions from a BGR image to verified measurements.

The camera is the station's independent witness: it checks that what the
instruments report (volumes dispensed, colour measured) is what physically
happened. Everything here is a pure function of NumPy arrays (BGR ``uint8``,
``(height, width, 3)``, as :mod:`instruments.transports.camera` delivers them);
OpenCV is used inside, and this package is the only one besides the camera
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

Modules (everything public is re-exported here: import from ``instruments.vision``)
-----------------------------------------------------------------------------------
``_common`` (errors, tunables, frame checks, :func:`decode_jpeg`), ``_detect`` (vial
and patch), ``_calibration`` (the calibration types), ``_results`` (the result types
and :func:`analysis_from_dict`), ``_change`` (scene change against a reference),
``_analyse`` (fill level, colour, :func:`analyse`), ``_fit`` (:func:`fit_calibration`),
``_draw`` (:func:`overlay`, :func:`contact_sheet`, :func:`encode_png`).
"""

from __future__ import annotations

from instruments.vision._analyse import analyse
from instruments.vision._calibration import (
    Calibration,
    CalibrationGeometry,
    ColourCorrection,
    FillCalibration,
)
from instruments.vision._change import Reference, prepare_reference
from instruments.vision._common import (
    CALIBRATION_FORMAT,
    CalibrationError,
    VisionError,
    decode_jpeg,
)
from instruments.vision._detect import PatchDetection, VialDetection, find_patch, find_vial
from instruments.vision._draw import contact_sheet, encode_png, overlay
from instruments.vision._fit import fit_calibration
from instruments.vision._results import (
    ChangeRegion,
    Confidence,
    FrameAnalysis,
    SceneChange,
    analysis_from_dict,
)

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "CalibrationError",
    "CalibrationGeometry",
    "ChangeRegion",
    "ColourCorrection",
    "Confidence",
    "FillCalibration",
    "FrameAnalysis",
    "PatchDetection",
    "Reference",
    "SceneChange",
    "VialDetection",
    "VisionError",
    "analyse",
    "analysis_from_dict",
    "contact_sheet",
    "decode_jpeg",
    "encode_png",
    "find_patch",
    "find_vial",
    "fit_calibration",
    "overlay",
    "prepare_reference",
]
