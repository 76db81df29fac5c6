"""What the camera says about one experiment, as a function programs' checks call by name.

:func:`camera_analysis` is registered (entry point ``labbridge.functions``) so a
program's ``verification`` can select it (loops/checks.py)::

    analyses:
      - name: camera
        function: camera_analysis
        args: {image: images.outcome, reference: images.reference, calibration: calibration}

It decodes the outcome frame (JPEG bytes), compares it with the reference
frame of the scene before the experiment acted, and returns plain data:
``fill_ml`` (the liquid's volume from the fitted fill calibration, None if the
frame cannot say), ``lab`` (the liquid's CIELAB, white-balanced on the
reference patch), ``scene_ok`` and ``scene`` (what changed: the camera or the
vessel moved, the vessel is gone, a spill or an object), ``problems`` (why the
frame cannot verify: no vessel, no patch, a frozen camera) and ``analysis``
(the whole :class:`~instruments.vision.FrameAnalysis`, for the report's
overlays). A missing frame or calibration raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any

from instruments.vision import Calibration, analyse, decode_jpeg, prepare_reference

__all__ = ["camera_analysis"]


def camera_analysis(
    image: bytes | None,
    reference: bytes | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """See the module docstring."""
    if image is None:
        raise ValueError("no camera frame of the outcome (a capture step with as: outcome)")
    if calibration is None:
        raise ValueError("the station's camera is not calibrated (labbridge calibrate)")
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
