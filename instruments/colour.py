"""Colour science for colour campaigns: sRGB <-> CIELAB (D65) and the CIEDE2000 difference.

Pure functions over floats (``math`` only; no OpenCV), one colour at a time.

* :func:`srgb_to_lab` / :func:`lab_to_srgb`: IEC 61966-2-1 sRGB (gamma-encoded,
  0-1) <-> CIE 1976 L*a*b* with the D65 white of the sRGB matrix (so sRGB white
  ``(1, 1, 1)`` is exactly ``L=100, a=b=0``). :func:`linear_to_lab` /
  :func:`lab_to_linear` skip the sRGB transfer curve.
* :func:`delta_e2000`: CIEDE2000 as written out by Sharma, Wu & Dalal,
  "The CIEDE2000 color-difference formula: implementation notes,
  supplementary test data, and mathematical observations", Color Res. Appl.
  30(1), 2005, eqs. (1)-(22), including their notes on hue angles of neutral
  colours (``h' = 0`` when ``a' = b = 0``) and on the mean hue across 0/360.
* :func:`counts_to_lab`: colour-sensor counts -> Lab. Each count is divided by
  the count of a white reference (the sensor looking through an empty vial, at
  the same integration time), giving a *linear* transmittance per channel,
  which is then treated as linear sRGB. That is an assumption: the sensor's
  red/green/blue filters are not the sRGB primaries and the LED is not D65, so
  the Lab values are device-referred (consistent from run to run on one
  sensor, comparable to a target measured on the same kind of sensor), not
  colorimetrically exact. A characterisation matrix would fix that; the
  campaign only needs a consistent, perceptually spaced scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "D65_WHITE_XYZ",
    "counts_to_lab",
    "delta_e2000",
    "lab_to_linear",
    "lab_to_srgb",
    "lab_to_xyz",
    "linear_to_lab",
    "srgb_to_lab",
    "xyz_to_lab",
]

#: linear sRGB -> CIE XYZ (IEC 61966-2-1, D65), rows X, Y, Z
_RGB_TO_XYZ = (
    (0.4124, 0.3576, 0.1805),
    (0.2126, 0.7152, 0.0722),
    (0.0193, 0.1192, 0.9505),
)
#: D65 white as the sRGB matrix defines it (its row sums): sRGB white maps to L=100, a=b=0
D65_WHITE_XYZ = tuple(sum(row) for row in _RGB_TO_XYZ)


def _inverse3(m: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, float, float], ...]:
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return (
        ((e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det),
        ((f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det),
        ((d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det),
    )


_XYZ_TO_RGB = _inverse3(_RGB_TO_XYZ)
#: the knee of the sRGB curve on the linear side (0.0031308 rounded; exact here so that
#: encoding inverts decoding at 0.04045)
_LINEAR_KNEE = 0.04045 / 12.92
_EPS = (6.0 / 29.0) ** 3  # 0.008856...
_KAPPA = 3.0 * (6.0 / 29.0) ** 2  # slope of the linear segment of f^-1


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"{what} needs 3 values, got {len(values)}")
    out = (float(values[0]), float(values[1]), float(values[2]))
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite numbers, got {tuple(values)!r}")
    return out


def _mul(
    m: tuple[tuple[float, ...], ...], v: tuple[float, float, float]
) -> tuple[float, float, float]:
    return (
        m[0][0] * v[0] + m[0][1] * v[1] + m[0][2] * v[2],
        m[1][0] * v[0] + m[1][1] * v[1] + m[1][2] * v[2],
        m[2][0] * v[0] + m[2][1] * v[1] + m[2][2] * v[2],
    )


def _decode(c: float) -> float:
    """sRGB transfer curve, encoded -> linear (odd extension below 0)."""
    s = math.copysign(1.0, c)
    c = abs(c)
    return s * (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)


def _encode(c: float) -> float:
    """sRGB transfer curve, linear -> encoded (odd extension below 0)."""
    s = math.copysign(1.0, c)
    c = abs(c)
    return s * (12.92 * c if c <= _LINEAR_KNEE else 1.055 * c ** (1.0 / 2.4) - 0.055)


def _f(t: float) -> float:
    return t ** (1.0 / 3.0) if t > _EPS else t / _KAPPA + 4.0 / 29.0


def _f_inv(t: float) -> float:
    return t**3 if t > 6.0 / 29.0 else _KAPPA * (t - 4.0 / 29.0)


def xyz_to_lab(
    xyz: Sequence[float], white: Sequence[float] = D65_WHITE_XYZ
) -> tuple[float, float, float]:
    """CIE XYZ (Y of the white = 1) -> L*a*b* relative to ``white``."""
    x, y, z = _triple(xyz, "XYZ")
    xn, yn, zn = _triple(white, "white XYZ")
    fx, fy, fz = _f(x / xn), _f(y / yn), _f(z / zn)
    return (116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz))


def lab_to_xyz(
    lab: Sequence[float], white: Sequence[float] = D65_WHITE_XYZ
) -> tuple[float, float, float]:
    """L*a*b* -> CIE XYZ relative to ``white`` (the inverse of :func:`xyz_to_lab`)."""
    L, a, b = _triple(lab, "Lab")
    xn, yn, zn = _triple(white, "white XYZ")
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    return (xn * _f_inv(fx), yn * _f_inv(fy), zn * _f_inv(fz))


def linear_to_lab(rgb: Sequence[float]) -> tuple[float, float, float]:
    """Linear sRGB (0-1, not gamma-encoded) -> L*a*b* (D65)."""
    return xyz_to_lab(_mul(_RGB_TO_XYZ, _triple(rgb, "linear RGB")))


def lab_to_linear(lab: Sequence[float]) -> tuple[float, float, float]:
    """L*a*b* (D65) -> linear sRGB; values outside 0-1 mean outside the sRGB gamut."""
    return _mul(_XYZ_TO_RGB, lab_to_xyz(lab))


def srgb_to_lab(rgb01: Sequence[float]) -> tuple[float, float, float]:
    """sRGB (gamma-encoded, 0-1 per channel, e.g. ``pixel / 255``) -> L*a*b* (D65)."""
    r, g, b = _triple(rgb01, "sRGB")
    return linear_to_lab((_decode(r), _decode(g), _decode(b)))


def lab_to_srgb(lab: Sequence[float], *, clip: bool = False) -> tuple[float, float, float]:
    """L*a*b* (D65) -> sRGB (gamma-encoded, 0-1). Out-of-gamut colours give values outside
    0-1 unless ``clip`` (then each channel is clipped, which changes the colour)."""
    out = tuple(_encode(c) for c in lab_to_linear(lab))
    if clip:
        out = tuple(min(1.0, max(0.0, c)) for c in out)
    return (out[0], out[1], out[2])


def counts_to_lab(
    red: float, green: float, blue: float, white: Sequence[float]
) -> tuple[float, float, float]:
    """Colour-sensor counts -> L*a*b*, normalised by ``white`` (counts of a white reference).

    ``white``: the (red, green, blue) counts of the white reference at the same
    integration time (the sensor looking through an empty vial). Each channel
    ratio is a linear transmittance, treated as linear sRGB (see the module
    docstring for what that assumes); negative ratios (dark noise) count as 0.
    """
    wr, wg, wb = _triple(white, "white reference counts")
    if min(wr, wg, wb) <= 0:
        raise ValueError(f"white reference counts must be > 0, got {(wr, wg, wb)!r}")
    r, g, b = _triple((red, green, blue), "counts")
    return linear_to_lab((max(0.0, r / wr), max(0.0, g / wg), max(0.0, b / wb)))


def reading_to_lab(counts: Mapping[str, Any], white: Mapping[str, Any]) -> list[float]:
    """A colour-sensor reading -> ``[L, a, b]``, normalised by the white reference reading.

    ``counts`` and ``white`` are readings as a recipe records them (``red``,
    ``green``, ``blue``, ``status``, ``integration_ms``). Counts are linear in
    integration time: a white reference taken at another integration time is
    scaled to the reading's. Raises ``ValueError`` for a reading that is not
    ``ok`` (saturated, dark) or a white reference that is not.
    """
    for what, r in (("reading", counts), ("white reference", white)):
        if r.get("status") != "ok":
            raise ValueError(f"colour sensor {what} is {r.get('status')!r}, not 'ok': {dict(r)}")
    scale = 1.0
    ms, white_ms = counts.get("integration_ms"), white.get("integration_ms")
    if ms and white_ms and ms != white_ms:
        scale = float(ms) / float(white_ms)
    ref = (float(white["red"]) * scale, float(white["green"]) * scale, float(white["blue"]) * scale)
    lab = counts_to_lab(float(counts["red"]), float(counts["green"]), float(counts["blue"]), ref)
    return [round(v, 4) for v in lab]


def _hue(b: float, a: float) -> float:
    """Hue angle in degrees, 0-360; 0 for a neutral colour (Sharma et al., eq. 4)."""
    if a == 0.0 and b == 0.0:
        return 0.0
    h = math.degrees(math.atan2(b, a))
    return h + 360.0 if h < 0.0 else h


def delta_e2000(
    lab1: Sequence[float],
    lab2: Sequence[float],
    *,
    kL: float = 1.0,
    kC: float = 1.0,
    kH: float = 1.0,
) -> float:
    """CIEDE2000 colour difference between two L*a*b* colours (symmetric; 0 for equal colours).

    Follows Sharma, Wu & Dalal (2005), eqs. (1)-(22), with the parametric
    factors ``kL = kC = kH = 1`` by default (reference conditions).
    """
    L1, a1, b1 = _triple(lab1, "Lab")
    L2, a2, b2 = _triple(lab2, "Lab")
    # (2)-(3): a' with the G factor from the mean chroma
    c1 = math.hypot(a1, b1)
    c2 = math.hypot(a2, b2)
    c_bar7 = ((c1 + c2) / 2.0) ** 7
    g = 0.5 * (1.0 - math.sqrt(c_bar7 / (c_bar7 + 25.0**7)))
    a1p, a2p = (1.0 + g) * a1, (1.0 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p, h2p = _hue(b1, a1p), _hue(b2, a2p)
    # (8)-(10): differences
    dLp = L2 - L1
    dCp = c2p - c1p
    cc = c1p * c2p
    if cc == 0.0:
        dhp = 0.0
    else:
        dhp = h2p - h1p
        if dhp > 180.0:
            dhp -= 360.0
        elif dhp < -180.0:
            dhp += 360.0
    dHp = 2.0 * math.sqrt(cc) * math.sin(math.radians(dhp) / 2.0)
    # (12)-(14): means
    Lp_bar = (L1 + L2) / 2.0
    Cp_bar = (c1p + c2p) / 2.0
    if cc == 0.0:
        hp_bar = h1p + h2p
    elif abs(h1p - h2p) <= 180.0:
        hp_bar = (h1p + h2p) / 2.0
    elif h1p + h2p < 360.0:
        hp_bar = (h1p + h2p + 360.0) / 2.0
    else:
        hp_bar = (h1p + h2p - 360.0) / 2.0
    # (15)-(21): weighting functions and the rotation term
    t = (
        1.0
        - 0.17 * math.cos(math.radians(hp_bar - 30.0))
        + 0.24 * math.cos(math.radians(2.0 * hp_bar))
        + 0.32 * math.cos(math.radians(3.0 * hp_bar + 6.0))
        - 0.20 * math.cos(math.radians(4.0 * hp_bar - 63.0))
    )
    d_theta = 30.0 * math.exp(-(((hp_bar - 275.0) / 25.0) ** 2))
    cp_bar7 = Cp_bar**7
    r_c = 2.0 * math.sqrt(cp_bar7 / (cp_bar7 + 25.0**7))
    l50 = (Lp_bar - 50.0) ** 2
    s_l = 1.0 + 0.015 * l50 / math.sqrt(20.0 + l50)
    s_c = 1.0 + 0.045 * Cp_bar
    s_h = 1.0 + 0.015 * Cp_bar * t
    r_t = -math.sin(math.radians(2.0 * d_theta)) * r_c
    # (22)
    tl = dLp / (kL * s_l)
    tc = dCp / (kC * s_c)
    th = dHp / (kH * s_h)
    return math.sqrt(max(0.0, tl * tl + tc * tc + th * th + r_t * tc * th))
