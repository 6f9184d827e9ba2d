"""Statistics shared by the benchmark drivers (``overhead.py``, ``language.py``).

Workers return raw nanoseconds of N interleaved (baseline, trace) pairs; here they become medians
with bootstrap 95% confidence intervals, resampling whole pairs so that the drift both sides of a
pair share cancels. Main venv only (numpy).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RESAMPLES = 2000


def bootstrap_ci(diffs: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% CI of the median of ``diffs``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    meds = np.median(diffs[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_pairs(
    base: np.ndarray,
    trace: np.ndarray,
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """95% CI of ``stat(base[idx], trace[idx])`` over pair resamples (``stat`` works row-wise)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(resamples, len(base)))
    vals = stat(base[idx], trace[idx])
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def ratio_of_medians(base: np.ndarray, trace: np.ndarray) -> np.ndarray:
    return np.median(trace, axis=-1) / np.median(base, axis=-1)


def summarize(entry: dict, scale: float = 1e3) -> dict:
    """Raw ns pairs -> medians (in ns / ``scale``: µs by default), overhead CI, time ratio CI.

    ``overhead`` is the median of per-pair differences (trace - baseline); ``ratio`` is
    median(trace) / median(baseline), e.g. an early-stopped trace over a full forward.
    """
    if "error" in entry:
        return {"error": entry["error"]}
    base = np.asarray(entry["plain_ns"], dtype=np.float64) / scale
    trace = np.asarray(entry["trace_ns"], dtype=np.float64) / scale
    diffs = trace - base
    med = float(np.median(diffs))
    base_med = float(np.median(base))
    return {
        "overhead": med,
        "overhead_ci95": list(bootstrap_ci(diffs)),
        "baseline": base_med,
        "trace": float(np.median(trace)),
        "overhead_ratio": med / base_med,
        "ratio": float(np.median(trace)) / base_med,
        "ratio_ci95": list(bootstrap_pairs(base, trace, ratio_of_medians)),
        "pairs": len(diffs),
        "baseline_kind": entry.get("baseline", "forward"),
        "check": entry.get("check", ""),
    }
