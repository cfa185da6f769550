"""How much the demo's headline numbers move across seeds: the whole chain after the tiny CLIP, 3 times.

Each seed reruns ``zscir demo``'s chain (Stage I images and training, synthetic
triplets, Stage II) with the same cached tiny CLIP and the same test queries
(``DemoConfig.clip_seed`` and ``eval_seed`` fixed), then reports every table row
as mean +- sample std over the seeds on the *test* split. A seed's finished
folder is reused, so an interrupted run continues.

    python benchmarks/bench_seeds.py [--seeds 0,1,2] [--fast] [--out .bench/seeds]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Dict, List

from zscir.checkpoint import atomic_write_json
from zscir.demo import PRESETS, run_demo

COLS = ("R@1", "R@5", "R@10", "R@50", "mean_R@10_over_kinds")


def summarise(per_seed: List[Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Row -> column -> {mean, std, min, max} over the seeds' composed-retrieval tables."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for row in per_seed[0]:
        out[row] = {}
        for col in COLS:
            values = [table[row][col] for table in per_seed]
            out[row][col] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                             "min": min(values), "max": max(values)}
    return out


def format_summary(summary: Dict[str, Dict[str, Dict[str, float]]], n: int) -> str:
    """Markdown table of mean +- std per row and column."""
    head = "| method (test split, mean ± std over %d seeds) | " % n + " | ".join(
        c.replace("mean_R@10_over_kinds", "mR@10 kinds") for c in COLS) + " |"
    lines = [head, "|" + "---|" * (len(COLS) + 1)]
    for row, cols in summary.items():
        lines.append(f"| {row} | " + " | ".join(f"{cols[c]['mean']:.1f} ± {cols[c]['std']:.1f}" for c in COLS) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run the chain for every seed, print the mean +- std table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fast", action="store_true", help="the --fast demo preset")
    ap.add_argument("--out", type=Path, default=Path(".bench/seeds"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = PRESETS["fast" if args.fast else "default"]
    tables, timings = [], []
    for seed in seeds:
        cfg = dataclasses.replace(base, seed=seed)
        result = run_demo(args.out / f"seed{seed}", cfg, overwrite=False, progress=False)
        tables.append(result["composed_retrieval"])
        timings.append(result["timings_seconds"])
    summary = summarise(tables)
    table = format_summary(summary, len(seeds))
    print(table)
    report = {"seeds": seeds, "preset": "fast" if args.fast else "default", "config": base.to_dict(),
              "summary": summary, "per_seed": dict(zip(map(str, seeds), tables)), "timings_seconds": timings,
              "markdown": table}
    atomic_write_json(args.out / "seeds.json", report)
    print(f"wrote {args.out / 'seeds.json'}")


if __name__ == "__main__":
    main()
