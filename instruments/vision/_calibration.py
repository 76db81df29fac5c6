"""The calibrations: pixels to mL (:class:`FillCalibration`), camera colour to CIELAB
(:class:`ColourCorrection`), the vial's geometry at calibration time, and the
:class:`Calibration` that holds them (``to_dict``/``from_dict`` for the station config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from instruments.colour import delta_e2000, lab_to_linear, linear_to_lab
from instruments.vision._common import CALIBRATION_FORMAT, CalibrationError, Response, _srgb_decode


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
