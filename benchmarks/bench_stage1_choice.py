"""Stage I chosen on VALIDATION after the default Stage II: soft-target source, concepts and token count.

Each row trains Stage I exactly as ``zscir demo`` does (10,000 stage-1 images of
the training world, 250 steps), with the row's changes to the Stage-I config
(where its soft targets come from: images, the world's captions, or both; the
concept list; the number of global and VSI tokens), then the *default* Stage II
(20,000 triplets, 600 steps), and scores composed retrieval on the *validation*
split (1,000 queries, held-out phrasing family, scenes disjoint from the test
split the README reports). Stage I alone is scored too. Every row runs for each
seed in ``--seeds`` (the seed moves the Stage-I images, triplets and both
trainings; the tiny CLIP and the queries stay fixed); the table gives mean ±
std. Finished (row, seed) pairs are kept in ``rows_<split>.jsonl``, so the
script resumes and rows can be added later.

    python benchmarks/bench_stage1_choice.py [--rows all] [--seeds 0,1,2] [--split val] [--out .bench/stage1_choice]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.data.captions import mine_concepts
from zscir.demo import PRESETS, stage1_configs, stage2_config
from zscir.eval.shapes_eval import ShapesBenchmark, composer_encoder
from zscir.shapes import ShapesWorld, ShapesWorldConfig
from zscir.train.clip_pretrain import pretrained_tiny_clip
from zscir.train.features import caption_features, shapes_features, shapes_triplet_features
from zscir.train.stage1 import Stage1Config, train_stage1
from zscir.train.stage2 import train_stage2

DEMO = PRESETS["default"]
BEFORE = dataclasses.replace(DEMO, stage1_captions=0)  # the rows' starting point: image-only soft targets


@dataclasses.dataclass
class Row:
    """One Stage-I setting: captions per image (0: unlabeled), concept list, and Stage1Config overrides (dotted keys)."""

    captions: int = 0  # captions per stage-1 image drawn from the world's caption distribution
    concepts: str = "world"  # "world" (the shipped shapes list), "mined" (from the row's captions), "none"
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _tokens(n: int, vsi: bool = True) -> Dict[str, Any]:
    return {"phi.num_tokens": n, "phi.use_vsi": vsi}


ROWS: Dict[str, Row] = {
    "image targets, 4 + 2 VSI tokens (before)": Row(),
    "caption targets": Row(captions=3, overrides={"targets": "caption"}),
    "image + caption targets": Row(captions=3, overrides={"targets": "both"}),
    "image targets + caption text term": Row(captions=3, overrides={"text_weight": 1.0}),
    "image + caption targets + text term": Row(captions=3, overrides={"targets": "both", "text_weight": 1.0}),
    "caption targets (mean), mined concepts": Row(captions=3, concepts="mined",
                                                   overrides={"targets": "caption", "caption_pooling": "mean"}),
    "caption targets, mean of captions": Row(captions=3, overrides={"targets": "caption", "caption_pooling": "mean"}),
    "image + caption targets, mean of captions": Row(captions=3, overrides={"targets": "both",
                                                                           "caption_pooling": "mean"}),
    "1 token + 2 VSI": Row(overrides=_tokens(1)),
    "1 token + 2 VSI, caption targets (mean)": Row(captions=3, overrides={
        **_tokens(1), "targets": "caption", "caption_pooling": "mean"}),
    "2 tokens + 2 VSI": Row(overrides=_tokens(2)),
    "1 token, no VSI": Row(overrides=_tokens(1, False)),
    "2 tokens, no VSI": Row(overrides=_tokens(2, False)),
    "4 tokens, no VSI": Row(overrides=_tokens(4, False)),
}


def stage1_config(row: Row, seed: int) -> Stage1Config:
    """The demo's zscir Stage-I config with the row's overrides."""
    cfg = stage1_configs(dataclasses.replace(BEFORE, seed=seed))["zscir Stage I"]
    cfg = dataclasses.replace(cfg, concept_weight=cfg.concept_weight if row.concepts != "none" else 0.0,
                              train=dataclasses.replace(cfg.train, save_every=0, log_every=10))
    return cfg.with_overrides(row.overrides)


def run_row(row: Row, seed: int, clip_dir: Path, bench: ShapesBenchmark) -> Dict[str, Any]:
    """Stage I with the row's settings, the default Stage II, both scored on `bench`."""
    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=64))
    cfg = stage1_config(row, seed)
    torch.manual_seed(seed)
    comp = Composer.from_clip(str(clip_dir), phi=cfg.phi)
    scenes = world.scenes(DEMO.stage1_images, stream="stage1")
    features = shapes_features(comp, scenes, 64)
    captions = caption_features(comp.backbone, world.captions_of(scenes, row.captions)) if row.captions else None
    concepts = {"world": world.concept_phrases(), "none": None,
                "mined": mine_concepts(captions.texts) if captions is not None else None}[row.concepts]
    start = time.time()
    comp, s1_result = train_stage1(comp, features, cfg, concepts=concepts, captions=captions, progress=False)
    s1_seconds = time.time() - start
    stage1_alone = bench.evaluate(composer_encoder(comp))
    edits = world.make_triplets(DEMO.num_triplets, family="train", negatives=DEMO.triplet_negatives)
    trip = shapes_triplet_features(comp, edits, 64)
    start = time.time()
    comp, _ = train_stage2(comp, trip, stage2_config(dataclasses.replace(DEMO, seed=seed)), progress=False)
    return {"stage1_seconds": s1_seconds, "stage2_seconds": time.time() - start,
            "stage1_final_log": s1_result.history[-1] if s1_result.history else None,
            "stage1_alone": stage1_alone, "composed": bench.evaluate(composer_encoder(comp))}


COLS = ("R@1", "R@5", "R@10", "R@50", "mean_R@10_over_kinds")


def mean_std(values: List[float]) -> str:
    """'mean ± std' (std 0 for one value)."""
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def main() -> None:
    """Run the missing (row, seed) pairs, print the mean ± std table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help=f"semicolon-separated rows out of: {'; '.join(ROWS)}; or 'all'")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(".bench/stage1_choice"))
    args = ap.parse_args()
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    clip_dir, _ = pretrained_tiny_clip(DEMO.clip_preset, seed=DEMO.clip_seed)
    eval_world = ShapesWorld(ShapesWorldConfig(seed=DEMO.eval_seed))
    bench = ShapesBenchmark(Composer.from_clip(str(clip_dir)).backbone, eval_world, n_queries=args.queries,
                            split=args.split)
    done_file = args.out / f"rows_{args.split}.jsonl"

    def load_done() -> Dict[tuple, Dict[str, Any]]:
        if not done_file.is_file():
            return {}
        return {(r["name"], r["seed"]): r for r in map(json.loads, done_file.read_text().splitlines())}

    done = load_done()
    for name in names:
        row = json.loads(json.dumps(dataclasses.asdict(ROWS[name])))
        for seed in seeds:
            if (name, seed) in done and done[(name, seed)]["row"] == row:
                continue
            record = {"name": name, "seed": seed, "row": row, **run_row(ROWS[name], seed, clip_dir, bench)}
            with done_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(name, seed, {k: round(record["composed"][k], 1) for k in COLS}, flush=True)
    done = load_done()  # also the rows that other processes finished
    head = f"| Stage I setting ({args.split}, after the default Stage II) | seeds | " + " | ".join(
        c.replace("mean_R@10_over_kinds", "mR@10 kinds") for c in COLS) + " | Stage I alone R@10 |"
    lines = [head, "|" + "---|" * (len(COLS) + 3)]
    table: Dict[str, Any] = {}
    for name in ROWS:
        recs = [done[(name, s)] for s in seeds if (name, s) in done]
        if not recs:
            continue
        table[name] = {"seeds": [r["seed"] for r in recs],
                       **{c: [r["composed"][c] for r in recs] for c in COLS},
                       "stage1_alone_R@10": [r["stage1_alone"]["R@10"] for r in recs]}
        lines.append(f"| {name} | {len(recs)} | " + " | ".join(mean_std(table[name][c]) for c in COLS)
                     + f" | {mean_std(table[name]['stage1_alone_R@10'])} |")
    print("\n".join(lines))
    atomic_write_json(args.out / f"stage1_choice_{args.split}.json",
                      {"split": args.split, "seeds": seeds, "rows": table, "markdown": "\n".join(lines)})


if __name__ == "__main__":
    main()
