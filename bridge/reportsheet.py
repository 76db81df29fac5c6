"""The camera contact sheet of a campaign report: which experiments it shows
(:func:`select_tiles`) and the sheet itself (:func:`render_contact_sheet`: every
outcome frame with the camera's measured overlays and a caption).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bridge.reportdata import (
    ReportData,
    fmt_num,
    is_trusted,
    proposer_kind,
    verification_text,
)
from instruments import vision
from loops.journal import Experiment
from loops.setup import SetupStore

__all__ = ["Tile", "image_file", "overlay_frame", "render_contact_sheet", "select_tiles"]


def select_tiles(
    experiments: Sequence[Experiment],
    has_image: Callable[[Experiment], bool],
    *,
    minimize: bool = True,
    best_tiles: int = 24,
    max_tiles: int = 60,
) -> tuple[list[Experiment], str]:
    """Which experiments the contact sheet shows, in seq order, and a sentence that says so.

    Every experiment with an outcome image when there are at most ``max_tiles``;
    otherwise the ``best_tiles`` best trusted results plus the unverified and
    failed ones (in seq order) up to ``max_tiles`` in all.
    """
    if best_tiles < 0 or max_tiles < 1:
        raise ValueError(
            f"best_tiles must be >= 0 and max_tiles >= 1, got {best_tiles}, {max_tiles}"
        )
    candidates = [e for e in experiments if has_image(e)]
    if len(candidates) <= max_tiles:
        return candidates, f"all {len(candidates)} experiments with a camera image"
    trusted = [e for e in candidates if is_trusted(e)]
    problems = [e for e in candidates if not is_trusted(e) and e.state in ("done", "failed")]
    sign = 1.0 if minimize else -1.0
    ranked = sorted(trusted, key=lambda e: (sign * float(e.objective or 0.0), e.seq))
    best = ranked[: min(best_tiles, max_tiles)]
    room = max_tiles - len(best)
    shown_problems = problems[:room]
    chosen = sorted(best + shown_problems, key=lambda e: e.seq)
    text = (
        f"{len(chosen)} of {len(candidates)} experiments with a camera image (cap {max_tiles}): "
        f"the {len(best)} best trusted results and "
        + (
            f"all {len(problems)} unverified or failed ones"
            if len(shown_problems) == len(problems)
            else f"the first {len(shown_problems)} of {len(problems)} unverified or failed ones"
        )
    )
    return chosen, text


def _placeholder(width: int = 640, height: int = 480) -> np.ndarray:
    """A striped grey frame for an experiment whose image is missing (its caption says why)."""
    img = np.full((height, width, 3), 70, np.uint8)
    img[::16, :] = 90
    return img


def _image_path(data: ReportData, info: Mapping[str, Any]) -> Path | None:
    """The stored path, else ``images/<sha256>.jpg`` next to the journal (a moved run folder)."""
    stored = Path(str(info.get("path", "")))
    if stored.is_file():
        return stored
    fallback = data.journal_path.parent / "images" / f"{info.get('sha256')}.jpg"
    return fallback if fallback.is_file() else None


def _load_frame(data: ReportData, info: Mapping[str, Any] | None) -> tuple[np.ndarray | None, str]:
    if info is None:
        return None, "no image"
    path = _image_path(data, info)
    if path is None:
        return None, f"image file missing ({info.get('path')})"
    try:
        return vision.decode_jpeg(path.read_bytes()), ""
    except (OSError, vision.VisionError) as exc:
        return None, f"image unreadable: {exc}"


def _analysis(
    data: ReportData, e: Experiment, frame: np.ndarray
) -> tuple[vision.FrameAnalysis, str]:
    """The analysis the verification recorded (exactly as measured); else analyse the frame
    again with the station's calibration from the run folder when there is one."""
    result = e.result if isinstance(e.result, Mapping) else {}
    verification = result.get("verification")
    recorded = verification.get("analysis") if isinstance(verification, Mapping) else None
    if isinstance(recorded, Mapping) and "width" not in recorded:  # the analyses by name:
        found = [a.get("analysis") for a in recorded.values() if isinstance(a, Mapping)]
        recorded = next((a for a in found if isinstance(a, Mapping)), None)  # the camera's
    if isinstance(recorded, Mapping):
        try:
            analysis = vision.analysis_from_dict(recorded)
            if (analysis.width, analysis.height) == (frame.shape[1], frame.shape[0]):
                return analysis, "recorded"
        except vision.VisionError:
            pass  # recorded by another version: analyse again
    calibration = None
    cal_path = data.stations_with_calibration.get(e.station or "")
    if cal_path is not None:
        try:  # the camera calibration the station's set-up kept, if it kept one
            kept = SetupStore(cal_path).values().get("calibration")
            calibration = vision.Calibration.from_dict(kept) if isinstance(kept, dict) else None
        except Exception:
            calibration = None
    reference = None
    ref_info = data.images.get(e.id, {}).get("reference")
    if ref_info is not None:
        ref, _ = _load_frame(data, ref_info)
        if ref is not None and ref.shape == frame.shape:
            reference = ref
    return vision.analyse(frame, calibration, reference), "re-analysed"


@dataclass(frozen=True)
class Tile:
    experiment: Experiment
    caption: tuple[str, ...]
    colour: tuple[int, int, int]
    source: str


def _caption(data: ReportData, e: Experiment) -> tuple[tuple[str, ...], tuple[int, int, int]]:
    who = "" if proposer_kind(e.proposer) == "optimizer" else f" | {e.proposer}"
    first = f"{e.id} | {e.station or '-'}{who}"
    value = f"{data.measure} = {fmt_num(e.objective)}" if e.objective is not None else "no result"
    if e.state == "done" and e.verified is True:
        return (first, value, "verified"), (90, 210, 90)
    if e.state == "done" and e.verified is None:
        return (first, value, "not checked (verification off)"), (200, 200, 200)
    return (first, value, verification_text(e)), (80, 80, 255)


def render_contact_sheet(
    data: ReportData, chosen: Sequence[Experiment], columns: int, tile_width: int
) -> tuple[bytes, list[Tile]]:
    """The contact sheet of ``chosen`` as PNG bytes, and its tiles (in order)."""
    frames: list[np.ndarray] = []
    tiles: list[Tile] = []
    for e in chosen:
        frame, problem = _load_frame(data, data.images.get(e.id, {}).get("outcome"))
        caption, colour = _caption(data, e)
        if frame is None:
            frames.append(_placeholder())
            tiles.append(Tile(e, (*caption[:2], problem), (80, 80, 255), problem))
            continue
        analysis, source = _analysis(data, e, frame)
        frames.append(vision.overlay(frame, analysis))
        tiles.append(Tile(e, caption, colour, source))
    sheet = vision.contact_sheet(
        frames,
        [t.caption for t in tiles],
        colours=[t.colour for t in tiles],
        columns=columns,
        tile_width=tile_width,
    )
    return vision.encode_png(sheet), tiles


def overlay_frame(data: ReportData, e: Experiment) -> tuple[bytes | None, str]:
    """``e``'s outcome frame with the camera's measured overlays, as on its contact-sheet tile
    (the recorded analysis, else analysed again), as PNG bytes; or None and why not."""
    frame, problem = _load_frame(data, data.images.get(e.id, {}).get("outcome"))
    if frame is None:
        return None, problem
    analysis, source = _analysis(data, e, frame)
    return vision.encode_png(vision.overlay(frame, analysis)), source


def image_file(data: ReportData, experiment_id: str, role: str) -> Path | None:
    """The stored JPEG of one of an experiment's frames (``reference``, ``outcome``), or None."""
    info = data.images.get(experiment_id, {}).get(role)
    return None if info is None else _image_path(data, info)
