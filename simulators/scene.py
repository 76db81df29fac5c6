"""The station as the camera sees it: a vectorised NumPy renderer with ground truth.

Scene (reference layout at 640x480, scaled uniformly and centred for other
sizes, e.g. 1280x720 is scale 1.5 with a 160 px margin left and right):

* uniform grey background, reflectance ``BACKGROUND_REFLECTANCE`` (0.42);
* a white reference patch, reflectance ``PATCH_REFLECTANCE`` (0.90), top left;
* a glass vial standing in the middle: walls, a rim, a bottom, a specular
  highlight stripe down the left inner wall. Inner geometry is a flat-bottomed
  cylinder seen side on, so the liquid height is linear in volume:
  ``px_per_ml = 100 * scale`` and 3.0 mL (the capacity) is ``300 * scale`` px
  above the inner bottom;
* the liquid: transmitted white light, reflectance ``PATCH_REFLECTANCE *
  transmission`` per channel, so that liquid / patch = transmission after
  white balance; a concave meniscus (the surface climbs ``5 * scale`` px at the
  walls) with a darker band (``MENISCUS_DARKENING``) just under the surface;
  the surface is anti-aliased, so the fill level is sub-pixel accurate;
* spilled liquid (``spilled_ml > 0``): a darker, dye-tinted elliptical puddle
  right of the vial; its area grows with the spilled volume;
* every pixel is ``reflectance * lighting_gain * 255`` plus Gaussian sensor
  noise (``noise_sigma`` DN), clipped to uint8, BGR channel order.

:meth:`SceneRenderer.render` returns the image and a ground-truth dict (all
boxes ``(x, y, w, h)`` in pixels, colours pre-noise in DN 0-255) so the vision
code can be tested against known truth.

Cost: about 1 ms per 640x480 frame (the masks are precomputed per size; the
noise is a window into a precomputed bank of Gaussian samples at a random
offset, i.i.d. within a frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

REF_W, REF_H = 640, 480
VIAL_CAPACITY_ML = 3.0
BACKGROUND_REFLECTANCE = 0.42
PATCH_REFLECTANCE = 0.90
GLASS_REFLECTANCE = 0.62
GLASS_EDGE_REFLECTANCE = 0.18
AIR_IN_VIAL_FACTOR = 0.93  # background seen through empty glass
HIGHLIGHT_REFLECTANCE = 0.95
HIGHLIGHT_MIX = 0.45
MENISCUS_DARKENING = 0.65
WET_DARKENING = 0.62

# Reference layout at 640x480 (x, y, w, h); see the module docstring.
_PATCH = (40, 40, 80, 80)
_VIAL_X0, _VIAL_X1 = 270, 370  # outer walls
_VIAL_TOP, _VIAL_BOTTOM = 90, 435  # open top (rim), outer bottom
_WALL = 6
_RIM = (264, 84, 112, 10)
_FULL_PX = 300.0  # capacity height above the inner bottom
_MENISCUS_PX = 5.0
_MENISCUS_BAND_PX = 3.0
_HIGHLIGHT_X = (282, 286)
_PUDDLE_CY = 448.0
_PUDDLE_A_PER_SQRT_ML = 70.0
_PUDDLE_A_MAX = 120.0
_PUDDLE_ASPECT = 0.22


@dataclass(frozen=True)
class SceneInputs:
    """What the renderer needs from the world (one instant)."""

    sim_t: float = 0.0
    vial_present: bool = True
    volume_ml: float = 0.0
    spilled_ml: float = 0.0
    transmission: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R, G, B
    lighting_gain: float = 0.8

    @classmethod
    def from_world(cls, world: Any) -> SceneInputs:
        """Read a :class:`~simulators.world.StationWorld` (advances it). Honours ``vial-missing``."""
        snap = world.snapshot()
        vial = snap["vial"]
        missing = world.faults.active("vial-missing") is not None
        return cls(
            sim_t=float(snap["sim_t"]),
            vial_present=bool(vial["present"]) and not missing,
            volume_ml=float(vial["volume_ml"]),
            spilled_ml=float(vial["spilled_ml"]),
            transmission=tuple(float(t) for t in snap["transmission"]),  # type: ignore[arg-type]
            lighting_gain=float(snap["lighting_gain"]),
        )


@dataclass(frozen=True)
class SceneGeometry:
    """Pixel geometry of the scene at one image size (all ints are pixel indices)."""

    width: int
    height: int
    scale: float
    ox: int
    oy: int

    @classmethod
    def for_size(cls, width: int, height: int) -> SceneGeometry:
        if width < 64 or height < 48:
            raise ValueError(f"image size {width}x{height} is too small (min 64x48)")
        scale = min(width / REF_W, height / REF_H)
        ox = int(round((width - REF_W * scale) / 2))
        oy = int(round((height - REF_H * scale) / 2))
        return cls(width, height, scale, ox, oy)

    def x(self, ref: float) -> int:
        return self.ox + int(round(ref * self.scale))

    def y(self, ref: float) -> int:
        return self.oy + int(round(ref * self.scale))

    def box(self, ref: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        x0, y0 = self.x(ref[0]), self.y(ref[1])
        return (x0, y0, self.x(ref[0] + ref[2]) - x0, self.y(ref[1] + ref[3]) - y0)

    @property
    def patch_box(self) -> tuple[int, int, int, int]:
        return self.box(_PATCH)

    @property
    def vial_box(self) -> tuple[int, int, int, int]:
        """Outer box of the vial including the rim."""
        x0, y0 = self.x(_RIM[0]), self.y(_RIM[1])
        return (x0, y0, self.x(_RIM[0] + _RIM[2]) - x0, self.y(_VIAL_BOTTOM) - y0)

    @property
    def inner_x(self) -> tuple[int, int]:
        """First and one-past-last column of the vial's inside."""
        return self.x(_VIAL_X0 + _WALL), self.x(_VIAL_X1 - _WALL)

    @property
    def inner_top(self) -> int:
        return self.y(_VIAL_TOP)

    @property
    def inner_bottom(self) -> int:
        """Row index of the inner bottom (the first row of the bottom wall)."""
        return self.y(_VIAL_BOTTOM - _WALL)

    @property
    def px_per_ml(self) -> float:
        return _FULL_PX * self.scale / VIAL_CAPACITY_ML

    @property
    def meniscus_px(self) -> float:
        return _MENISCUS_PX * self.scale

    @property
    def meniscus_band_px(self) -> float:
        return _MENISCUS_BAND_PX * self.scale


def _bgr(rgb: tuple[float, float, float]) -> np.ndarray:
    return np.array([rgb[2], rgb[1], rgb[0]], dtype=np.float32)


class SceneRenderer:
    """Renders :class:`SceneInputs` to a BGR uint8 image plus ground truth. Not thread-safe.

    ``seed`` seeds the renderer's own noise generator (independent of the
    world's, which other simulators draw from on other threads).
    """

    def __init__(
        self, width: int = 640, height: int = 480, *, seed: int = 0, noise_sigma: float = 2.0
    ) -> None:
        self.geometry = g = SceneGeometry.for_size(width, height)
        self.width, self.height = width, height
        self.noise_sigma = float(noise_sigma)
        self._rng = np.random.default_rng(seed)
        n = height * width * 3
        self._noise_len = n
        # Gaussian noise bank (+0.5 so that the final truncation to uint8 rounds).
        self._noise_bank = self._rng.standard_normal(2 * n, dtype=np.float32)
        self._noise_bank *= np.float32(max(0.0, noise_sigma))
        self._noise_bank += np.float32(0.5)
        self._work = np.empty((height, width, 3), dtype=np.float32)
        bg = np.full((height, width, 3), BACKGROUND_REFLECTANCE, dtype=np.float32)
        px, py, pw, ph = g.patch_box
        bg[py : py + ph, px : px + pw] = PATCH_REFLECTANCE
        self._base_no_vial = bg
        self._base_vial = self._draw_vial(bg.copy())
        # The inside of the vial, where liquid may be: a sub-image of rows x cols.
        ix0, ix1 = g.inner_x
        self._rows = np.arange(g.inner_top, g.inner_bottom, dtype=np.float32)[:, None]
        centre = (ix0 + ix1) / 2.0
        half = (ix1 - ix0) / 2.0
        cols = np.arange(ix0, ix1, dtype=np.float32) + 0.5
        self._rise = (g.meniscus_px * (np.abs(cols - centre) / half) ** 4).astype(np.float32)[
            None, :
        ]
        hx0, hx1 = g.x(_HIGHLIGHT_X[0]) - ix0, g.x(_HIGHLIGHT_X[1]) - ix0
        self._highlight_cols = (max(0, hx0), max(hx0 + 1, hx1))

    # ------------------------------------------------------------ static parts
    def _draw_vial(self, img: np.ndarray) -> np.ndarray:
        g = self.geometry
        x0, x1 = g.x(_VIAL_X0), g.x(_VIAL_X1)
        top, bottom = g.y(_VIAL_TOP), g.y(_VIAL_BOTTOM)
        ix0, ix1 = g.inner_x
        ib = g.inner_bottom
        img[top:bottom, x0:x1] = GLASS_REFLECTANCE  # walls and bottom
        img[top:ib, ix0:ix1] = BACKGROUND_REFLECTANCE * AIR_IN_VIAL_FACTOR  # inside: air
        rx, ry, rw, rh = g.box(_RIM)
        img[ry : ry + rh, rx : rx + rw] = GLASS_REFLECTANCE + 0.08
        edge = max(1, int(round(g.scale)))
        for ya, yb, xa, xb in (
            (ry, bottom, x0, x0 + edge),
            (ry, bottom, x1 - edge, x1),
            (bottom - edge, bottom, x0, x1),
            (ry, ry + edge, rx, rx + rw),
        ):
            img[ya:yb, xa:xb] = GLASS_EDGE_REFLECTANCE
        hx0, hx1 = g.x(_HIGHLIGHT_X[0]), g.x(_HIGHLIGHT_X[1])
        region = img[top + 2 * edge : ib - edge, hx0:hx1]
        region[:] = region * (1 - HIGHLIGHT_MIX) + HIGHLIGHT_REFLECTANCE * HIGHLIGHT_MIX
        return img

    # ----------------------------------------------------------------- frame
    def render(self, inputs: SceneInputs) -> tuple[np.ndarray, dict[str, Any]]:
        """One frame: ``(image BGR uint8 HxWx3, truth dict)``. See the module docstring."""
        g = self.geometry
        trans = tuple(min(1.0, max(0.0, float(t))) for t in inputs.transmission)
        liquid_refl = _bgr(trans) * np.float32(PATCH_REFLECTANCE)  # type: ignore[arg-type]
        fill_ml = min(max(0.0, inputs.volume_ml), VIAL_CAPACITY_ML)
        fill_px = fill_ml * g.px_per_ml
        ix0, ix1 = g.inner_x
        ib = g.inner_bottom
        truth: dict[str, Any] = {
            "sim_t": inputs.sim_t,
            "width": self.width,
            "height": self.height,
            "vial_present": inputs.vial_present,
            "volume_ml": inputs.volume_ml,
            "capacity_ml": VIAL_CAPACITY_ML,
            "px_per_ml": g.px_per_ml,
            "vial_box": g.vial_box,
            "vial_inner_box": (ix0, g.inner_top, ix1 - ix0, ib - g.inner_top),
            "inner_bottom_y": ib,
            "patch_box": g.patch_box,
            "patch_reflectance": PATCH_REFLECTANCE,
            "lighting_gain": inputs.lighting_gain,
            "transmission": trans,
            "noise_sigma": self.noise_sigma,
        }
        gain255 = np.float32(inputs.lighting_gain * 255.0)
        truth["patch_bgr"] = tuple(min(255.0, PATCH_REFLECTANCE * float(gain255)) for _ in range(3))
        truth["background_bgr"] = tuple(
            min(255.0, BACKGROUND_REFLECTANCE * float(gain255)) for _ in range(3)
        )
        liquid_bgr = tuple(min(255.0, float(v) * float(gain255)) for v in liquid_refl)
        liquid_drawn = inputs.vial_present and fill_px >= 0.5
        truth.update(
            liquid_visible=liquid_drawn,
            fill_ml=fill_ml if inputs.vial_present else 0.0,
            fill_px=fill_px if inputs.vial_present else 0.0,
            fill_y=(ib - fill_px) if liquid_drawn else None,
            liquid_bgr=liquid_bgr if liquid_drawn else None,
            liquid_rgb=(liquid_bgr[2], liquid_bgr[1], liquid_bgr[0]) if liquid_drawn else None,
            liquid_box=None,
        )

        # In-place on preallocated buffers: fresh 3.7 MB arrays per frame cost page faults.
        img = self._work
        np.copyto(img, self._base_vial if inputs.vial_present else self._base_no_vial)
        if liquid_drawn:
            truth["liquid_box"] = self._draw_liquid(img, fill_px, liquid_refl)
        truth.update(self._draw_spill(img, inputs.spilled_ml, trans))

        np.multiply(img, gain255, out=img)
        off = int(self._rng.integers(0, self._noise_len))
        np.add(img, self._noise_bank[off : off + self._noise_len].reshape(img.shape), out=img)
        np.clip(img, 0.0, 255.0, out=img)
        out = np.empty(img.shape, dtype=np.uint8)
        np.copyto(out, img, casting="unsafe")  # truncation; the bank carries the +0.5 for rounding
        return out, truth

    def _draw_liquid(
        self, img: np.ndarray, fill_px: float, refl: np.ndarray
    ) -> tuple[int, int, int, int]:
        g = self.geometry
        ix0, ix1 = g.inner_x
        top, ib = g.inner_top, g.inner_bottom
        surface = np.float32(ib - fill_px) - self._rise  # (1, cols): row where liquid starts
        depth = (
            self._rows + np.float32(1.0) - surface
        )  # how far below the surface a row's bottom is
        alpha = np.clip(depth, 0.0, 1.0)[..., None]  # anti-aliased coverage
        band = ((depth > 0) & (depth <= np.float32(g.meniscus_band_px + 1.0)))[..., None]
        colour = np.where(band, refl * np.float32(MENISCUS_DARKENING), refl)
        region = img[top:ib, ix0:ix1]
        mixed = region * (1.0 - alpha) + colour * alpha
        h0, h1 = self._highlight_cols
        hl = mixed[:, h0:h1]
        hl_alpha = alpha[:, h0:h1]
        mixed[:, h0:h1] = (
            hl * (1 - HIGHLIGHT_MIX * hl_alpha) + HIGHLIGHT_REFLECTANCE * HIGHLIGHT_MIX * hl_alpha
        )
        region[:] = mixed
        # The clean liquid region: below the meniscus band, inside the walls, right of the highlight.
        y0 = int(math.ceil(ib - fill_px + g.meniscus_band_px + 2))
        x0 = ix0 + h1 + 2
        x1 = ix1 - 2
        return (x0, min(y0, ib), max(0, x1 - x0), max(0, ib - y0))

    def _draw_spill(
        self, img: np.ndarray, spilled_ml: float, trans: tuple[float, ...]
    ) -> dict[str, Any]:
        g = self.geometry
        if spilled_ml <= 0.0:
            return {"spilled_ml": max(0.0, spilled_ml), "spill_visible": False, "spill_box": None}
        a = min(_PUDDLE_A_MAX, max(8.0, _PUDDLE_A_PER_SQRT_ML * math.sqrt(spilled_ml))) * g.scale
        b = a * _PUDDLE_ASPECT
        cx = g.x(_VIAL_X1 + 10) + a
        cy = g.oy + _PUDDLE_CY * g.scale
        x0, x1 = max(0, int(cx - a) - 1), min(self.width, int(cx + a) + 2)
        y0, y1 = max(0, int(cy - b) - 1), min(self.height, int(cy + b) + 2)
        yy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / b
        xx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx) / a
        r = np.sqrt(xx * xx + yy * yy)
        alpha = np.clip((1.0 - r) * np.float32(b / 1.5), 0.0, 1.0)[..., None]
        tint = _bgr(tuple(math.sqrt(t) for t in trans)) * np.float32(WET_DARKENING)  # type: ignore[arg-type]
        region = img[y0:y1, x0:x1]
        region[:] = region * (1.0 - alpha) + region * tint * alpha
        box = (int(cx - a), int(cy - b), int(2 * a) + 1, int(2 * b) + 1)
        return {"spilled_ml": spilled_ml, "spill_visible": True, "spill_box": box}


def render_scene(
    world: Any, *, width: int = 640, height: int = 480, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """One-off convenience: render ``world`` now (builds a renderer; keep one for a stream)."""
    return SceneRenderer(width, height, seed=seed).render(SceneInputs.from_world(world))
