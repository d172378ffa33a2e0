"""Small, dependency-free statistics: percentiles, per-run spread, ratios.

Percentiles use linear interpolation between closest ranks (numpy's default), so p99 of 20 samples is
a value between the two largest rather than simply the largest; with few samples the report shows
``n`` next to every percentile so nobody over-reads a p99.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, min, p50, p95, p99, max of raw samples (pooled over runs)."""
    if not values:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "min": float(min(values)),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": float(max(values)),
    }


def spread(per_run: Sequence[float]) -> dict[str, float | int | None]:
    """Median of per-run values with their min/max and interquartile range (run-to-run spread)."""
    vals = [v for v in per_run if v is not None and not math.isnan(v)]
    if not vals:
        return {"runs": 0, "median": None, "min": None, "max": None, "iqr": None}
    return {
        "runs": len(vals),
        "median": float(statistics.median(vals)),
        "min": float(min(vals)),
        "max": float(max(vals)),
        "iqr": (percentile(vals, 75) or 0.0) - (percentile(vals, 25) or 0.0),
    }


def ratio(b: float | None, a: float | None) -> float | None:
    """B/A, or None when undefined (missing value or A == 0)."""
    if a is None or b is None or a == 0:
        return None
    return b / a
