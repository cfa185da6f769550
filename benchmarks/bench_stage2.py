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
import torch.nn.functional as F

from _timing import seconds_per_call
from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.demo import PRESETS, stage1_configs
from zscir.eval.shapes_eval import ShapesBenchmark, composer_encoder, image_only, image_plus_text, text_only
from zscir.shapes import ShapesWorld, ShapesWorldConfig
from zscir.train.clip_pretrain import pretrained_tiny_clip
from zscir.train.features import Corpus, TripletFeatures, caption_features, shapes_features, shapes_triplet_features
from zscir.train.stage1 import needs_captions, train_stage1
from zscir.train.stage2 import Stage2Config, Stage2Task, prepare_stage2, train_stage2

DEMO = PRESETS["default"]


@dataclasses.dataclass
class Row:
    """One Stage-II setting: triplet data, Stage-I tokens, corpus and overrides of Stage2Config (dotted keys)."""

    triplets: int = DEMO.num_triplets
    negatives: int = DEMO.triplet_negatives  # sibling negatives per triplet (+ the reference)
    reference_negative: bool = True  # keep the reference among the explicit negatives
    noise: float = 0.0  # share of training texts replaced by another triplet's text
    stage1_tokens: int = DEMO.num_tokens  # global tokens of the Stage-I model (+ 2 VSI tokens)
    corpus: int = 0  # scenes whose features form the mined/bank corpus
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)


# The defaults before this table: LoRA rank 16, phi frozen, query-side negative only, 300 steps (2k triplets).
BEFORE = {"adapters.rank": 16, "adapters.alpha": 16.0, "train_phi": False, "components": ("query_negative",),
          "train.steps": 300, "train.warmup_steps": 30}
EXPLICIT = ("query_negative", "explicit")
CHOSEN_10K = {**BEFORE, "adapters.rank": 64, "adapters.alpha": 64.0, "train_phi": True,
              "components": ("query_negative", "text_augment")}


def _before(**changes: Any) -> Dict[str, Any]:
    return {**BEFORE, **changes}


ROWS: Dict[str, Row] = {
    "default (20k triplets, 600 steps)": Row(),
    "default + query-side negative": Row(overrides={"components": ("query_negative", "text_augment")}),
    "before: 2k triplets": Row(triplets=2_000, overrides=BEFORE),
    "2k + explicit negatives (siblings + reference)": Row(triplets=2_000, negatives=3, overrides=_before(components=EXPLICIT)),
    "2k + explicit negatives (siblings only)": Row(triplets=2_000, negatives=3, reference_negative=False,
                                                  overrides=_before(components=EXPLICIT)),
    "2k + explicit negatives, no query negative": Row(triplets=2_000, negatives=3, overrides=_before(components=("explicit",))),
    "before: 10k triplets": Row(triplets=10_000, overrides=BEFORE),
    "10k + logit scale 50": Row(triplets=10_000, overrides=_before(init_scale=50.0)),
    "10k + phi trained": Row(triplets=10_000, overrides=_before(train_phi=True)),
    "10k + LoRA rank 64": Row(triplets=10_000, overrides=_before(**{"adapters.rank": 64, "adapters.alpha": 64.0})),
    "10k + explicit negatives (siblings only)": Row(triplets=10_000, negatives=3, reference_negative=False,
                                                   overrides=_before(components=EXPLICIT)),
    "10k + explicit negatives as a separate term (w 0.25)": Row(
        triplets=10_000, negatives=3, overrides=_before(components=EXPLICIT, component_options={
            "explicit": {"in_denominator": False, "weight": 0.25}})),
    "10k + mined corpus negatives": Row(triplets=10_000, corpus=10_000,
                                        overrides=_before(components=("query_negative", "mined"))),
    "10k + 3x steps": Row(triplets=10_000, overrides=_before(**{"train.steps": 900, "train.warmup_steps": 90})),
    "10k + lr 1e-2": Row(triplets=10_000, overrides=_before(**{"train.lr": 1e-2})),
    "10k + batch 256": Row(triplets=10_000, overrides=_before(**{"train.batch_size": 256})),
    "10k + image residual": Row(triplets=10_000, overrides=_before(image_residual=True)),
    "10k + text augment": Row(triplets=10_000, overrides=_before(components=("query_negative", "text_augment"))),
    "10k + text augment (word dropout 0.3)": Row(triplets=10_000, overrides=_before(
        components=("query_negative", "text_augment"), component_options={"text_augment": {"word_dropout": 0.3}})),
    "10k + text augment + text preserve": Row(triplets=10_000, overrides=_before(
        components=("query_negative", "text_augment", "text_preserve"))),
    "10k, Stage I with 1 token (+2 VSI)": Row(triplets=10_000, stage1_tokens=1, overrides=BEFORE),
    "10k, Stage I with 2 tokens (+2 VSI)": Row(triplets=10_000, stage1_tokens=2, overrides=BEFORE),
    "10k + rank 64 + phi + text augment": Row(triplets=10_000, overrides=CHOSEN_10K),
    "10k + rank 64 + phi + text augment, Stage I 8 tokens": Row(triplets=10_000, stage1_tokens=8, overrides=CHOSEN_10K),
    "30% noisy texts (default settings)": Row(noise=0.3),
}


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


def stage1_model(clip_dir: Path, world: ShapesWorld, folder: Path, tokens: int = DEMO.num_tokens) -> Path:
    """The demo's zscir Stage-I model for seed 0 with `tokens` global tokens (trained once, then reused from `folder`)."""
    if (folder / "config.json").is_file():
        return folder
    cfg = stage1_configs(dataclasses.replace(DEMO, num_tokens=tokens))["zscir Stage I"]
    torch.manual_seed(DEMO.seed)
    comp = Composer.from_clip(str(clip_dir), phi=cfg.phi)
    scenes = world.scenes(DEMO.stage1_images, stream="stage1")
    feats = shapes_features(comp, scenes, 64)
    captions = caption_features(comp.backbone, world.captions_of(scenes, DEMO.stage1_captions)) \
        if needs_captions(cfg) else None
    comp, _ = train_stage1(comp, feats, cfg, concepts=world.concept_phrases(), progress=False, captions=captions)
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
    ap.add_argument("--rows", default=next(iter(ROWS)), help=f"semicolon-separated rows out of: {'; '.join(ROWS)}; or 'all', or 'none'".replace("%", "%%"))
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--step-cost", action="store_true", help="also time a default Stage-II step")
    ap.add_argument("--out", type=Path, default=Path(".bench/stage2"))
    args = ap.parse_args()
    special = {"all": list(ROWS), "none": []}
    names = special[args.rows] if args.rows in special else [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    clip_dir, _ = pretrained_tiny_clip(DEMO.clip_preset, seed=DEMO.clip_seed)
    world = ShapesWorld(ShapesWorldConfig(seed=DEMO.seed))
    eval_world = ShapesWorld(ShapesWorldConfig(seed=DEMO.eval_seed))
    s1_dir = stage1_model(clip_dir, world, args.out / "stage1")
    s1 = Composer.from_pretrained(s1_dir)
    corpora: Dict[int, Corpus] = {}
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
        row_s1 = s1_dir if row.stage1_tokens == DEMO.num_tokens else stage1_model(
            clip_dir, world, args.out / f"stage1_{row.stage1_tokens}tok", row.stage1_tokens)
        comp = Composer.from_pretrained(row_s1)
        cfg = Stage2Config().with_overrides(row.overrides)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=DEMO.seed))
        trip = triplet_features(comp, world, row)
        if row.corpus and row.corpus not in corpora:
            feats = shapes_features(comp, world.scenes(row.corpus, stream="stage1"), 64)
            corpora[row.corpus] = Corpus(F.normalize(torch.as_tensor(feats.pooled), dim=-1), [str(i) for i in range(row.corpus)])
        start = time.time()
        comp, result = train_stage2(comp, trip, cfg, corpus=corpora.get(row.corpus), progress=False)
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
        cost = step_cost(comp, triplet_features(comp, world, dataclasses.replace(next(iter(ROWS.values())), triplets=512)), cfg)
    head = f"{'method (' + args.split + ' split)':<56}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'R@50':>7}{'mR@10':>7}{'train-phr R@10':>16}{'s':>6}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, res in baselines.items():
        s = summary(res)
        print(f"{name:<56}" + "".join(f"{v:>7.1f}" for v in s.values()))
    for name in [n for n in ROWS if n in done]:
        r = done[name]
        s = summary(r["composed"])
        print(f"{name:<56}" + "".join(f"{v:>7.1f}" for v in s.values())
              + f"{r['training_phrasing_R@10']:>16.1f}{r['train_seconds']:>6.0f}")
    if cost:
        print(f"\nstage-II step {cost['stage2_step'] * 1e3:.1f} ms vs adapted text encoder fwd+bwd "
              f"{cost['text_encoder_fwd_bwd'] * 1e3:.1f} ms: ratio {cost['ratio']:.2f}")
    atomic_write_json(args.out / f"stage2_{args.split}.json",
                      {"split": args.split, "baselines": baselines, "rows": done, "step_cost": cost})


if __name__ == "__main__":
    main()
