"""Summary statistics the benchmark scripts print: a nearest-rank percentile and a median."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["med", "pct"]


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def med(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan
