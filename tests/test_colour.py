"""Colour science: CIEDE2000 against the published test data, sRGB <-> Lab, sensor counts -> Lab."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instruments.colour import (
    counts_to_lab,
    delta_e2000,
    lab_to_srgb,
    linear_to_lab,
    srgb_to_lab,
)

# Sharma, Wu & Dalal (2005), Table 1: the 34 CIEDE2000 test pairs
# (L1, a1, b1, L2, a2, b2, dE00), to 4 decimals as published.
SHARMA_2005 = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]


def test_the_table_has_the_34_published_pairs() -> None:
    assert len(SHARMA_2005) == 34


@pytest.mark.parametrize("row", SHARMA_2005, ids=[f"pair{i + 1}" for i in range(34)])
def test_ciede2000_matches_sharma_wu_dalal_to_4_decimals(row: tuple[float, ...]) -> None:
    lab1, lab2, expected = row[:3], row[3:6], row[6]
    assert round(delta_e2000(lab1, lab2), 4) == expected
    assert round(delta_e2000(lab2, lab1), 4) == expected  # symmetric


def test_ciede2000_zero_for_equal_colours_and_rejects_bad_input() -> None:
    assert delta_e2000((50.0, 10.0, -10.0), (50.0, 10.0, -10.0)) == 0.0
    assert delta_e2000((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)) == 0.0
    # parametric factors: a larger kL discounts lightness differences
    assert delta_e2000((50, 0, 0), (60, 0, 0), kL=2.0) < delta_e2000((50, 0, 0), (60, 0, 0))
    with pytest.raises(ValueError, match="3 values"):
        delta_e2000((50.0, 0.0), (50.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="finite"):
        delta_e2000((math.nan, 0.0, 0.0), (50.0, 0.0, 0.0))


def test_srgb_to_lab_reference_colours() -> None:
    assert srgb_to_lab((1.0, 1.0, 1.0)) == pytest.approx((100.0, 0.0, 0.0), abs=1e-9)
    assert srgb_to_lab((0.0, 0.0, 0.0)) == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    # published sRGB primaries and mid grey in CIELAB (D65), to ~0.05
    assert srgb_to_lab((1.0, 0.0, 0.0)) == pytest.approx((53.24, 80.09, 67.20), abs=0.05)
    assert srgb_to_lab((0.0, 1.0, 0.0)) == pytest.approx((87.73, -86.18, 83.18), abs=0.05)
    assert srgb_to_lab((0.0, 0.0, 1.0)) == pytest.approx((32.30, 79.19, -107.86), abs=0.05)
    L, a, b = srgb_to_lab((0.5, 0.5, 0.5))
    assert L == pytest.approx(53.39, abs=0.01) and abs(a) < 1e-9 and abs(b) < 1e-9
    # the dark end uses the linear segments of the sRGB curve and of f(t)
    assert srgb_to_lab((0.01, 0.01, 0.01))[0] == pytest.approx(0.01 / 12.92 * 24389 / 27, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.tuples(*(st.floats(0.0, 1.0) for _ in range(3))))
def test_srgb_lab_round_trip(rgb: tuple[float, float, float]) -> None:
    back = lab_to_srgb(srgb_to_lab(rgb))
    # 1e-6: the two pieces of the sRGB curve differ by ~1e-7 at their knee (0.04045), and
    # matrix round-off can land a value on the other side of it
    assert back == pytest.approx(rgb, abs=1e-6)


def test_lab_to_srgb_out_of_gamut_and_clip() -> None:
    vivid = (50.0, 120.0, 0.0)  # far outside sRGB
    raw = lab_to_srgb(vivid)
    assert min(raw) < 0.0 or max(raw) > 1.0
    clipped = lab_to_srgb(vivid, clip=True)
    assert all(0.0 <= c <= 1.0 for c in clipped)


def test_counts_to_lab_normalises_by_the_white_reference() -> None:
    white = (39000.0, 41000.0, 36000.0)
    assert counts_to_lab(*white, white=white) == pytest.approx((100.0, 0.0, 0.0), abs=1e-9)
    # half the light in every channel: a neutral grey with Y = 0.5
    half = counts_to_lab(white[0] / 2, white[1] / 2, white[2] / 2, white=white)
    assert half == pytest.approx((76.0693, 0.0, 0.0), abs=1e-3)
    # only the ratio to the white matters (same counts at double integration time)
    a = counts_to_lab(12000, 8000, 20000, white=white)
    b = counts_to_lab(24000, 16000, 40000, white=tuple(2 * w for w in white))
    assert a == pytest.approx(b)
    # a purple: red and blue pass, green is absorbed
    L, a_, b_ = counts_to_lab(9000, 3000, 12000, white=white)
    assert a_ > 20 and b_ < -10 and 20 < L < 60
    assert a == pytest.approx(linear_to_lab((12000 / 39000, 8000 / 41000, 20000 / 36000)))
    # dark noise below zero counts as no light
    assert counts_to_lab(-5, 0, 0, white=white)[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="> 0"):
        counts_to_lab(1, 1, 1, white=(0, 1, 1))
    with pytest.raises(ValueError, match="3 values"):
        counts_to_lab(1, 1, 1, white=(1, 1))
