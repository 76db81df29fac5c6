"""What the camera says about one experiment, and its calibration, as functions recipes call by name.

:func:`camera_analysis` is registered (entry point ``labbridge.functions``) so a
program's ``verification`` can select it (loops/checks.py)::

    analyses:
      - name: camera
        function: camera_analysis
        args: {image: images.outcome, reference: images.reference, calibration: setup.calibration}

It decodes the outcome frame (JPEG bytes), compares it with the reference
frame of the scene before the experiment acted, and returns plain data:
``fill_ml`` (the liquid's volume from the fitted fill calibration, None if the
frame cannot say), ``lab`` (the liquid's CIELAB, white-balanced on the
reference patch), ``scene_ok`` and ``scene`` (what changed: the camera or the
vessel moved, the vessel is gone, a spill or an object), ``problems`` (why the
frame cannot verify: no vessel, no patch, a frozen camera) and ``analysis``
(the whole :class:`~instruments.vision.FrameAnalysis`, for the report's
overlays). A missing frame or calibration raises ``ValueError``.

:func:`fit_fill_calibration` (registered too) fits the fill-level calibration a
station's set-up recipe keeps: frames of the vessel at known volumes, e.g.::

    - compute: calibration
      function: fit_fill_calibration
      args: {frames: images, volumes_ml: levels_ml}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from instruments.vision import (
    Calibration,
    analyse,
    decode_jpeg,
    fit_calibration,
    prepare_reference,
)

__all__ = ["camera_analysis", "fit_fill_calibration"]


def camera_analysis(
    image: bytes | None,
    reference: bytes | None = None,
    calibration: Calibration | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """See the module docstring. ``calibration``: a :class:`Calibration` or its
    :meth:`~instruments.vision.Calibration.to_dict` (as a set-up recipe keeps it)."""
    if image is None:
        raise ValueError("no camera frame of the outcome (a capture step with as: outcome)")
    if calibration is None:
        raise ValueError("the station's camera is not calibrated (run labbridge setup)")
    if isinstance(calibration, Mapping):
        calibration = Calibration.from_dict(dict(calibration))
    frame = decode_jpeg(image)
    ref = prepare_reference(decode_jpeg(reference)) if reference else None
    result = analyse(frame, calibration, ref)
    scene: list[str] = []
    change = result.change
    if change is not None:
        if change.camera_moved:
            scene.append("the camera moved")
        if change.vial_moved or change.vial_disappeared:
            scene.append("the vessel moved" if change.vial_moved else "the vessel is gone")
        scene += [f"{r.kind} at {list(r.box)} ({r.area_px} px)" for r in change.regions]
    return {
        "fill_ml": result.fill_ml,
        "lab": list(result.lab) if result.lab is not None else None,
        "scene_ok": not scene,
        "scene": scene,
        "problems": list(result.reasons),
        "analysis": result.as_dict(),
    }


def fit_fill_calibration(
    frames: Mapping[str, bytes | None] | Sequence[bytes | None],
    volumes_ml: Sequence[float],
) -> dict[str, Any]:
    """The camera's fill-level calibration from JPEG ``frames`` of the vessel holding
    ``volumes_ml`` (paired in order; a mapping's values in the order the frames were
    taken), as :meth:`~instruments.vision.Calibration.to_dict`. Raises ``ValueError``
    naming the problem: counts that differ, a raw frame, a bad fit."""
    named = list(frames.items()) if isinstance(frames, Mapping) else list(enumerate(frames))
    volumes = [float(v) for v in volumes_ml]
    if len(named) != len(volumes):
        raise ValueError(
            f"{len(named)} frames for {len(volumes)} volumes: take one frame per volume"
        )
    samples = []
    for (name, data), volume in zip(named, volumes, strict=True):
        if not data:
            raise ValueError(f"frame {name!r} is not a JPEG (the camera sends raw frames)")
        samples.append((decode_jpeg(data), volume))
    return fit_calibration(samples).to_dict()
