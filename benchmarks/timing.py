"""Timing helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time


def seconds(fn) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeat: int, warmup: bool = False) -> float:
    """Median seconds over `repeat` calls (after one untimed call if `warmup`)."""
    if warmup:
        fn()
    return statistics.median(seconds(fn) for _ in range(repeat))
