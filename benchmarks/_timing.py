"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import time
from typing import Callable, Dict


def seconds_per_call(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Mean seconds per call of each function, after one warm-up call."""
    out = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats
    return out
