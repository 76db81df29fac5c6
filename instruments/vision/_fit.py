"""Fitting a :class:`~instruments.vision.Calibration` from frames of known fill volume (and
of known liquid colour): :func:`fit_calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from instruments.vision._analyse import analyse
from instruments.vision._calibration import (
    Calibration,
    CalibrationGeometry,
    ColourCorrection,
    FillCalibration,
)
from instruments.vision._common import CalibrationError, Response, _three


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
