"""Drawing: a frame with its analysis on it (:func:`overlay`), captioned frames tiled into
a contact sheet (:func:`contact_sheet`), PNG encoding (:func:`encode_png`), so layers
above (which must not import cv2) build a report's sheet through pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from instruments.vision._common import VisionError, _check_frame
from instruments.vision._results import FrameAnalysis


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
