"""Throughput of the shapes world: rendering, captions and triplets on one CPU core.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_shapes.py [--out .bench/shapes.json] [--seconds 1.0]
Prints a table and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from zscir.shapes import ShapesWorld, caption, render, render_array


def throughput(work: Callable[[], int], min_seconds: float) -> float:
    """Items per second of `work` (which returns how many items it made), repeated for at least `min_seconds`."""
    work()  # warm caches (shape masks) so the timing is the steady state
    done, start = 0, time.perf_counter()
    while True:
        done += work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def run_benchmarks(min_seconds: float, batch: int) -> List[Dict[str, object]]:
    """Measure every case and return one row per case."""
    world = ShapesWorld(seed=0)
    scenes = world.scenes(batch, stream="bench")
    rng = world.rng("bench-text")
    rows: List[Dict[str, object]] = []

    def render_single(size: int) -> Callable[[], int]:
        def work() -> int:
            for s in scenes:
                render(s, size)
            return len(scenes)

        return work

    def render_batched(size: int) -> Callable[[], int]:
        def work() -> int:
            render_array(scenes, size)
            return len(scenes)

        return work

    for size in (64, 128):
        rows.append({"case": f"render single (PIL) {size}px", "unit": "images/s", "rate": throughput(render_single(size), min_seconds)})
        rows.append({"case": f"render_array batch={batch} {size}px", "unit": "images/s", "rate": throughput(render_batched(size), min_seconds)})

    def captions() -> int:
        for s in scenes:
            caption(s, rng)
        return len(scenes)

    def triplets() -> int:
        return len(world.make_triplets(batch, stream=f"bench-{time.perf_counter_ns()}"))

    rows.append({"case": "caption()", "unit": "captions/s", "rate": throughput(captions, min_seconds)})
    rows.append({"case": "make_triplets (uniform kinds)", "unit": "triplets/s", "rate": throughput(triplets, min_seconds)})
    return rows


def main(argv: List[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".bench/shapes.json", help="JSON output path")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timing per case")
    parser.add_argument("--batch", type=int, default=256, help="scenes per batch")
    args = parser.parse_args(argv)
    rows = run_benchmarks(args.seconds, args.batch)
    width = max(len(str(r["case"])) for r in rows)
    print(f"{'case':<{width}}  {'rate':>12}  unit")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['rate']:>12,.0f}  {r['unit']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "shapes",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "results": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
