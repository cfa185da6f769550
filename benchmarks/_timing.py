"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def seconds_per_call(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds per call of each function (calls interleaved, after one warm-up call each)."""
    for fn in fns.values():
        fn()
    samples: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved, so a burst of load on a shared machine hits every function alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}
