"""pH of sodium phosphate solutions: a full charge balance with activity corrections.

Pure functions, no state: the buffer bench's world (:mod:`simulators.buffer_world`)
and any model of the experiment call :func:`solve_ph`.

Model
-----
* Phosphoric acid, thermodynamic constants at 25 degC: pKa1 2.148, pKa2 7.198,
  pKa3 12.35, each linear in temperature with dpKa/dT +0.0044, -0.0028 and
  -0.026 per K (Goldberg et al., J. Phys. Chem. Ref. Data 31 (2002) 231; the
  usual buffer-table values: the phosphate buffer's pH falls ~0.003 per K).
* Water: pKw(T) = 4470.99 / T - 6.0875 + 0.01706 T (T in K; Harned & Owen),
  14.00 at 25 degC, 13.26 at 50 degC.
* Activities: Davies, log10 gamma_z = -A(T) z^2 (sqrt(I) / (1 + sqrt(I)) - 0.3 I)
  with A(T) = 0.4918 + 6.6098e-4 t + 5.0231e-6 t^2 (t in degC; 0.509 at 25 degC).
  Davies is good to I ~ 0.5 M; the bench's stocks (0.2 M) reach I = 0.6 for
  the undiluted dibasic stock, where it is approximate.
* The pH is -log10 of the hydrogen ion's activity (what a glass electrode
  measures). Unknown: a_H. Charge balance
  ``[H+] + [Na+] = [OH-] + [H2PO4-] + 2 [HPO4 2-] + 3 [PO4 3-]``
  with the concentration ratios from the thermodynamic constants and the
  activity coefficients, e.g. ``[HPO4 2-]/[H2PO4-] = Ka2 g1 / (a_H g2)``. The
  balance is monotonic in pH: solved by a bracketed root find
  (``scipy.optimize.brentq``, on pH in [-2, 16]) at fixed ionic strength,
  iterated with the ionic strength of the solution found until it stops
  changing (fixed point; a few iterations).

Check values (25 degC): pure 0.2 M NaH2PO4 4.43; equimolar 0.025 M + 0.025 M
(I = 0.1 M) 6.88 (pKa2 - 3 x Davies term); water 7.00; 0.2 M Na2HPO4 9.24.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.optimize import brentq

PKA_25 = (2.148, 7.198, 12.35)
DPKA_DT = (0.0044, -0.0028, -0.026)  # per K
PH_BRACKET = (-2.0, 16.0)
_LN10 = math.log(10.0)


def pka(temperature_c: float) -> tuple[float, float, float]:
    """Thermodynamic pKa1..3 of phosphoric acid at ``temperature_c``."""
    dt = temperature_c - 25.0
    return (
        PKA_25[0] + DPKA_DT[0] * dt,
        PKA_25[1] + DPKA_DT[1] * dt,
        PKA_25[2] + DPKA_DT[2] * dt,
    )


def pkw(temperature_c: float) -> float:
    """pKw of water at ``temperature_c`` (Harned & Owen)."""
    t = temperature_c + 273.15
    return 4470.99 / t - 6.0875 + 0.01706 * t


def davies_a(temperature_c: float) -> float:
    """The Debye-Hueckel A parameter of water (mol^-1/2 L^1/2)."""
    t = temperature_c
    return 0.4918 + 6.6098e-4 * t + 5.0231e-6 * t * t


def log_gamma(charge: int, ionic_strength: float, temperature_c: float) -> float:
    """log10 of an ion's activity coefficient (Davies)."""
    root = math.sqrt(max(0.0, ionic_strength))
    return -davies_a(temperature_c) * charge * charge * (root / (1.0 + root) - 0.3 * ionic_strength)


@dataclass(frozen=True)
class Speciation:
    """A solved solution: pH (activity scale), ionic strength (M), concentrations (M)."""

    ph: float
    ionic_strength: float
    h3po4: float
    h2po4: float
    hpo4: float
    po4: float
    h: float
    oh: float


def _speciate(
    ph: float,
    phosphate: float,
    sodium: float,
    consts: tuple[float, float, float, float],
    gammas: tuple[float, float, float],
) -> tuple[float, tuple[float, ...]]:
    """(charge imbalance in M, (H3PO4, H2PO4-, HPO4 2-, PO4 3-, H+, OH-)) at ``ph``.

    ``consts`` = (Ka1, Ka2, Ka3, Kw), ``gammas`` = activity coefficients of charge 1, 2, 3.
    """
    k1, k2, k3, kw = consts
    g1, g2, g3 = gammas
    a_h = 10.0 ** (-ph)
    r1 = k1 / (a_h * g1)
    r2 = k2 * g1 / (a_h * g2)
    r3 = k3 * g2 / (a_h * g3)
    w2 = r1 * r2
    w3 = w2 * r3
    scale = phosphate / (1.0 + r1 + w2 + w3)
    c0, c1, c2, c3 = scale, r1 * scale, w2 * scale, w3 * scale
    h = a_h / g1
    oh = kw / (a_h * g1)
    imbalance = h + sodium - oh - c1 - 2.0 * c2 - 3.0 * c3
    return imbalance, (c0, c1, c2, c3, h, oh)


def solve_ph(phosphate_m: float, sodium_m: float, temperature_c: float = 25.0) -> Speciation:
    """The pH of a solution of ``phosphate_m`` total phosphate and ``sodium_m`` sodium (mol/L).

    Raises ValueError for negative concentrations or a temperature outside 0-100 degC.
    """
    if phosphate_m < 0 or sodium_m < 0:
        raise ValueError(f"concentrations must be >= 0, got P={phosphate_m}, Na={sodium_m}")
    if not 0.0 <= temperature_c <= 100.0:
        raise ValueError(f"temperature {temperature_c} degC is outside 0-100 degC")
    p1, p2, p3 = pka(temperature_c)
    consts = (10.0**-p1, 10.0**-p2, 10.0**-p3, 10.0 ** -pkw(temperature_c))
    ionic = 0.5 * (sodium_m + phosphate_m)  # first guess: monovalent ions only
    ph = 7.0
    species: tuple[float, ...] = ()
    for _ in range(50):
        gammas = (
            10.0 ** log_gamma(1, ionic, temperature_c),
            10.0 ** log_gamma(2, ionic, temperature_c),
            10.0 ** log_gamma(3, ionic, temperature_c),
        )

        def imbalance(x: float, g: tuple[float, float, float] = gammas) -> float:
            return _speciate(x, phosphate_m, sodium_m, consts, g)[0]

        ph = float(brentq(imbalance, *PH_BRACKET, xtol=1e-10))
        _, species = _speciate(ph, phosphate_m, sodium_m, consts, gammas)
        c0, c1, c2, c3, h, oh = species
        new_ionic = 0.5 * (sodium_m + h + oh + c1 + 4.0 * c2 + 9.0 * c3)
        converged = abs(new_ionic - ionic) <= 1e-12 + 1e-9 * ionic
        ionic = new_ionic
        if converged:
            break
    c0, c1, c2, c3, h, oh = species
    return Speciation(ph, ionic, c0, c1, c2, c3, h, oh)


def nernst_mv(temperature_c: float) -> float:
    """The ideal Nernst slope, mV per pH unit, at ``temperature_c`` (59.16 at 25 degC)."""
    return 1000.0 * 8.314462618 * (temperature_c + 273.15) * _LN10 / 96485.33212


__all__ = [
    "DPKA_DT",
    "PKA_25",
    "Speciation",
    "davies_a",
    "log_gamma",
    "nernst_mv",
    "pka",
    "pkw",
    "solve_ph",
]
