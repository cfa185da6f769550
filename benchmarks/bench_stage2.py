"""Stage II on the shapes world, chosen on VALIDATION: one row per setting, plus baselines, oracle rows and step cost.

Trains (or reuses) one Stage-I model exactly as ``zscir demo`` does (seed 0), then
Stage II once per row on synthetic triplets in the *training* phrasing family,
and scores every row on the *validation* split (1,000 queries in the held-out
phrasing family, scenes disjoint from the test split the README reports).
Each row also reports R@10 on validation queries in the *training* phrasing
(how much of the gap is phrasing). Finished rows are kept in ``rows.jsonl``,
so the script resumes and new rows can be added later.

    python benchmarks/bench_stage2.py [--rows default,...] [--split val] [--step-cost] [--out .bench/stage2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from _timing import seconds_per_call
from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.demo import PRESETS, stage1_variants
from zscir.eval.shapes_eval import ShapesBenchmark, composer_encoder, image_only, image_plus_text, text_only
from zscir.shapes import ShapesWorld, ShapesWorldConfig
from zscir.train.clip_pretrain import pretrained_tiny_clip
from zscir.train.engine import TrainConfig
from zscir.train.features import TripletFeatures, shapes_features, shapes_triplet_features
from zscir.train.stage1 import Stage1Config, train_stage1
from zscir.train.stage2 import Stage2Config, Stage2Task, prepare_stage2, train_stage2

DEMO = PRESETS["default"]


@dataclasses.dataclass
class Row:
    """One Stage-II setting: triplet data and overrides of Stage2Config (dotted keys reach nested configs)."""

    triplets: int = DEMO.num_triplets
    negatives: int = DEMO.triplet_negatives  # sibling negatives per triplet (+ the reference)
    reference_negative: bool = True  # keep the reference among the explicit negatives
    noise: float = 0.0  # share of training texts replaced by another triplet's text
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)


ROWS: Dict[str, Row] = {
    "default": Row(),
    "2k triplets": Row(triplets=2_000),
    "10k triplets": Row(triplets=10_000),
    "explicit negatives (siblings + reference)": Row(negatives=3, overrides={"components": ("explicit", "query_negative")}),
    "explicit negatives (siblings only)": Row(negatives=3, reference_negative=False,
                                              overrides={"components": ("explicit", "query_negative")}),
    "explicit negatives only": Row(negatives=3, overrides={"components": ("explicit",)}),
    "no hard negatives": Row(overrides={"components": ()}),
    "query negative on every row": Row(overrides={"query_negative_fraction": 1.0}),
    "logit scale 50": Row(overrides={"init_scale": 50.0}),
    "train phi too": Row(overrides={"train_phi": True}),
    "LoRA rank 64": Row(overrides={"adapters.rank": 64, "adapters.alpha": 64.0}),
    "bottleneck rank 64": Row(overrides={"adapters.kind": "bottleneck", "adapters.rank": 64}),
    "lr 1e-2": Row(overrides={"train.lr": 1e-2}),
    "image residual": Row(overrides={"image_residual": True}),
    "3x steps": Row(overrides={"train.steps": 900, "train.warmup_steps": 90}),
    "30% noisy texts": Row(noise=0.3),
}


def with_overrides(cfg: Any, overrides: Dict[str, Any]) -> Any:
    """A copy of a (nested) config dataclass with dotted-key overrides applied."""
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        value = with_overrides(getattr(cfg, head), {rest: value}) if rest else value
        cfg = dataclasses.replace(cfg, **{head: value})
    return cfg


def corrupt(edits: List[Any], fraction: float, seed: int = 0) -> List[Any]:
    """Replace a fraction of the training texts with other triplets' texts (wrong modifications)."""
    import random

    rng = random.Random(seed)
    edits = list(edits)
    idx = rng.sample(range(len(edits)), int(fraction * len(edits)))
    texts = [edits[rng.randrange(len(edits))].text for _ in idx]
    for i, t in zip(idx, texts):
        e = edits[i]
        edits[i] = dataclasses.replace(e, texts={**e.texts, e.family: t})
    return edits


def stage1_model(clip_dir: Path, world: ShapesWorld, folder: Path) -> Path:
    """The demo's zscir Stage-I model for seed 0 (trained once, then reused from `folder`)."""
    if (folder / "config.json").is_file():
        return folder
    phi, loss, concept_weight = stage1_variants(DEMO)["zscir Stage I"]
    torch.manual_seed(DEMO.seed)
    comp = Composer.from_clip(str(clip_dir), phi=phi)
    feats = shapes_features(comp, world.scenes(DEMO.stage1_images, stream="stage1"), 64)
    cfg = Stage1Config(phi=comp.phi.config, loss=loss, concept_weight=concept_weight,
                       train=TrainConfig(steps=DEMO.stage1_steps, batch_size=128, lr=5e-4, warmup_steps=20, seed=DEMO.seed))
    comp, _ = train_stage1(comp, feats, cfg, concepts=world.concept_phrases(), progress=False)
    comp.save_pretrained(folder)
    return folder


def triplet_features(composer: Composer, world: ShapesWorld, row: Row) -> TripletFeatures:
    """Frozen features of the row's triplets (negatives as the row asks)."""
    edits = world.make_triplets(row.triplets, family="train", negatives=row.negatives)
    if row.noise:
        edits = corrupt(edits, row.noise)
    feats = shapes_triplet_features(composer, edits, 64)
    if feats.negative_valid is not None and not row.reference_negative:
        feats.negative_valid[:, 0] = False  # slot 0 holds the reference
    return feats


def step_cost(composer: Composer, trip: TripletFeatures, cfg: Stage2Config, repeats: int = 5) -> Dict[str, Any]:
    """Seconds per Stage-II step vs forward+backward of the adapted text encoder on the same prompts."""
    task = Stage2Task(composer, trip, cfg)
    opt = torch.optim.AdamW([p for p in task.module.parameters() if p.requires_grad], lr=1e-5)
    batch = task.make_batch(torch.arange(cfg.train.batch_size), 0)

    def full_step() -> None:
        out = task.module(batch)
        loss, _ = task.loss(out, batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def text_only_step() -> None:
        with torch.no_grad():
            tokens = composer.phi(batch["ref_pooled"], batch["ref_patches"])
        prompts = composer.query_prompts(batch["modifications"])
        composer.backbone.encode_with_pseudo_tokens(prompts, tokens, normalize=True).sum().backward()
        opt.zero_grad()

    times: Dict[str, Any] = seconds_per_call({"stage2_step": full_step, "text_encoder_fwd_bwd": text_only_step}, repeats)
    times["ratio"] = times["stage2_step"] / times["text_encoder_fwd_bwd"]
    return times


def summary(result: Dict[str, Any]) -> Dict[str, float]:
    """The columns of the printed table."""
    return {k: round(result[k], 1) for k in ("R@1", "R@5", "R@10", "R@50", "mean_R@10_over_kinds")}


def main() -> None:
    """Run the missing rows, print the validation table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="default", help=f"comma-separated rows out of: {', '.join(ROWS)}; or 'all'")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--step-cost", action="store_true", help="also time a default Stage-II step")
    ap.add_argument("--out", type=Path, default=Path(".bench/stage2"))
    args = ap.parse_args()
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    clip_dir, _ = pretrained_tiny_clip(DEMO.clip_preset, seed=DEMO.clip_seed)
    world = ShapesWorld(ShapesWorldConfig(seed=DEMO.seed))
    eval_world = ShapesWorld(ShapesWorldConfig(seed=DEMO.eval_seed))
    s1_dir = stage1_model(clip_dir, world, args.out / "stage1")
    s1 = Composer.from_pretrained(s1_dir)
    bb = s1.backbone
    bench = ShapesBenchmark(bb, eval_world, n_queries=args.queries, split=args.split)
    bench_train_phrasing = ShapesBenchmark(bb, eval_world, n_queries=args.queries // 2, split=args.split, family="train")
    done_file = args.out / f"rows_{args.split}.jsonl"
    done = {}
    if done_file.is_file():
        done = {r["name"]: r for r in map(json.loads, done_file.read_text().splitlines())}
    baselines = {"image only": bench.evaluate(image_only(bb)), "text only": bench.evaluate(text_only(bb)),
                 "image + text sum": bench.evaluate(image_plus_text(bb)), "Stage I alone": bench.evaluate(composer_encoder(s1)),
                 **bench.oracle_rows()}
    cost: Optional[Dict[str, Any]] = None
    for name in names:
        row = ROWS[name]
        if name in done and done[name]["row"] == json.loads(json.dumps(dataclasses.asdict(row))):
            continue
        comp = Composer.from_pretrained(s1_dir)
        cfg = with_overrides(Stage2Config(), row.overrides)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=DEMO.seed))
        trip = triplet_features(comp, world, row)
        start = time.time()
        comp, result = train_stage2(comp, trip, cfg, progress=False)
        seconds = time.time() - start
        record = {"name": name, "row": dataclasses.asdict(row), "train_seconds": seconds,
                  "final_log": result.history[-1] if result.history else None,
                  "composed": bench.evaluate(composer_encoder(comp)),
                  "training_phrasing_R@10": bench_train_phrasing.evaluate(composer_encoder(comp))["R@10"]}
        done[name] = json.loads(json.dumps(record))
        with done_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(name, summary(record["composed"]), f"({seconds:.0f}s)", flush=True)
    if args.step_cost:
        comp = Composer.from_pretrained(s1_dir)
        cfg = Stage2Config()
        prepare_stage2(comp, cfg.adapters)
        cost = step_cost(comp, triplet_features(comp, world, dataclasses.replace(ROWS["default"], triplets=512)), cfg)
    head = f"{'method (' + args.split + ' split)':<44}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'R@50':>7}{'mR@10':>7}{'train-phr R@10':>16}{'s':>6}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, res in baselines.items():
        s = summary(res)
        print(f"{name:<44}" + "".join(f"{v:>7.1f}" for v in s.values()))
    for name in [n for n in ROWS if n in done]:
        r = done[name]
        s = summary(r["composed"])
        print(f"{name:<44}" + "".join(f"{v:>7.1f}" for v in s.values())
              + f"{r['training_phrasing_R@10']:>16.1f}{r['train_seconds']:>6.0f}")
    if cost:
        print(f"\nstage-II step {cost['stage2_step'] * 1e3:.1f} ms vs adapted text encoder fwd+bwd "
              f"{cost['text_encoder_fwd_bwd'] * 1e3:.1f} ms: ratio {cost['ratio']:.2f}")
    atomic_write_json(args.out / f"stage2_{args.split}.json",
                      {"split": args.split, "baselines": baselines, "rows": done, "step_cost": cost})


if __name__ == "__main__":
    main()
