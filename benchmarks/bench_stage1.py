"""Stage I on the shapes world: inversion quality, composition without Stage II, and step cost.

Rows: Pic2Word-style (1 token, MLP, hard contrastive), SEARLE-style (1 token, MLP with
dropout 0.5, hard contrastive, no distillation) and zscir with VSI / soft alignment / both,
plus the image-only, text-only and image+text-sum baselines for composition. zscir rows use
--num-tokens global tokens; VSI adds 2 detail tokens after them (the "added to tokens" row
instead adds the VSI output to each global token, the earlier design).

Columns: inversion R@1/R@5 ("a photo of $" retrieves its own image among 1,000 held-out
images) and composed retrieval ("a photo of $ that {modification}", held-out phrasing
family) R@1/R@10/mean-over-kinds R@10.

Speed: one Stage-I training step on cached features, against a forward+backward of the
bare frozen text encoder on the same batch of prompts (with the pseudo tokens as leaf inputs).

    python benchmarks/bench_stage1.py [--steps 400] [--images 20000] [--clip-preset fast] [--out .bench/stage1.json]
    python benchmarks/bench_stage1.py --caption-cost   # train-stage1 steps with captions vs without (10k pairs)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _timing import seconds_per_call
from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.shapes import ShapesWorld, ShapesWorldConfig
from zscir.eval.shapes_eval import (ShapesBenchmark, composer_encoder, image_only, image_plus_text,
                                    inversion_recall, text_only)
from zscir.models.phi import PhiConfig
from zscir.train.clip_pretrain import pretrained_tiny_clip
from zscir.train.engine import TrainConfig
from zscir.train.features import caption_features, shapes_features
from zscir.train.stage1 import Stage1Config, Stage1Task, train_stage1

VARIANTS = {
    "Pic2Word-style": (dict(num_tokens=1, use_vsi=False, dropout=0.1), "hard", 0.0),
    "SEARLE-style": (dict(num_tokens=1, use_vsi=False, dropout=0.5), "hard", 0.0),
    "zscir VSI only (hard)": (dict(use_vsi=True), "hard", 0.0),
    "zscir soft only (no VSI)": (dict(use_vsi=False), "soft", 1.0),
    "zscir VSI + soft": (dict(use_vsi=True), "soft", 1.0),
    "zscir VSI added to tokens + soft": (dict(use_vsi=True, vsi_mode="add"), "soft", 1.0),
}


def step_cost(composer: Composer, features, cfg: Stage1Config, repeats: int = 10) -> dict:
    """Seconds per Stage-I step vs forward+backward of the bare text encoder on the same prompts."""
    task = Stage1Task(composer, features, cfg)
    opt = torch.optim.AdamW([p for p in task.module.parameters() if p.requires_grad], lr=1e-4)
    batch = task.make_batch(torch.arange(cfg.train.batch_size), 0)
    bb = composer.backbone

    def full_step():
        out = task.module(batch)
        loss, _ = task.loss(out, batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def bare_text():
        with torch.no_grad():
            tokens = composer.phi(batch["pooled"], batch["patches"])
        tokens.requires_grad_(True)
        bb.encode_with_pseudo_tokens(batch["prompts"], tokens, normalize=True).sum().backward()

    times = seconds_per_call({"stage1_step": full_step, "text_encoder_fwd_bwd": bare_text}, repeats)
    times["ratio"] = times["stage1_step"] / times["text_encoder_fwd_bwd"]
    return times


def caption_step_cost(clip_dir: Path, world: ShapesWorld, images: int = 10_000, per_image: int = 1, steps: int = 40,
                      repeats: int = 3) -> dict:
    """Seconds per train-stage1 step (whole engine step: batch, forward, backward, optimizer) on `images`
    image-caption pairs, image-only targets against caption targets (+ image mix + text term); interleaved runs."""
    scenes = world.scenes(images, stream="stage1")
    comp = Composer.from_clip(str(clip_dir), phi=PhiConfig())
    feats = shapes_features(comp, scenes, 64)
    start = time.perf_counter()
    caps = caption_features(comp.backbone, world.captions_of(scenes, per_image))
    encode_seconds = time.perf_counter() - start
    settings = {"image-only targets": {}, "image + caption targets": {"targets": "both"},
                "image + caption targets + text term": {"targets": "both", "text_weight": 1.0}}
    samples = {name: [] for name in settings}
    for _ in range(repeats):
        for name, extra in settings.items():
            torch.manual_seed(0)
            c = Composer.from_clip(str(clip_dir), phi=PhiConfig())
            cfg = Stage1Config(phi=c.phi.config, train=TrainConfig(steps=steps, batch_size=128, lr=5e-4,
                                                                   warmup_steps=5), **extra)
            t = time.perf_counter()
            train_stage1(c, feats, cfg, concepts=world.concept_phrases(), progress=False,
                         captions=caps if extra else None)
            samples[name].append((time.perf_counter() - t) / steps)
    per_step = {name: statistics.median(v) for name, v in samples.items()}
    base = per_step["image-only targets"]
    return {"images": images, "captions": len(caps.texts), "caption_encode_seconds": encode_seconds,
            "seconds_per_step": per_step, "ratio": {name: v / base for name, v in per_step.items()}}


def main() -> None:
    """Train every variant, print the table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip-preset", default="default")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path(".bench/stage1.json"))
    ap.add_argument("--caption-cost", action="store_true",
                    help="only time train-stage1 steps with and without captions (10,000 image-caption pairs)")
    args = ap.parse_args()
    if args.caption_cost:
        clip_dir, _ = pretrained_tiny_clip(args.clip_preset)
        cost = caption_step_cost(clip_dir, ShapesWorld(ShapesWorldConfig(seed=0)), images=args.images)
        print(f"{cost['images']} images, {cost['captions']} captions (encoded once in "
              f"{cost['caption_encode_seconds']:.1f}s)")
        for name, sec in cost["seconds_per_step"].items():
            print(f"{name:<40}{sec * 1e3:>9.1f} ms/step{cost['ratio'][name]:>8.2f}x")
        atomic_write_json(args.out.with_name("stage1_caption_cost.json"), cost)
        return
    clip_dir, clip_report = pretrained_tiny_clip(args.clip_preset)
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    base = Composer.from_clip(str(clip_dir))
    bb = base.backbone
    bench = ShapesBenchmark(bb, world, n_queries=args.queries)
    features = shapes_features(base, world.scenes(args.images, stream="stage1"), 64)
    rows = {}
    for name, fn in (("image only", image_only(bb)), ("text only", text_only(bb)), ("image + text sum", image_plus_text(bb))):
        rows[name] = {"composed": bench.evaluate(fn)}
    cost = None
    for name in args.variants.split(","):
        phi_kw, loss, cw = VARIANTS[name]
        phi_kw = {"num_tokens": args.num_tokens, **phi_kw}
        torch.manual_seed(0)
        comp = Composer.from_clip(str(clip_dir), phi=PhiConfig(**phi_kw))
        cfg = Stage1Config(phi=comp.phi.config, loss=loss, concept_weight=cw,
                           train=TrainConfig(steps=args.steps, batch_size=128, lr=5e-4, warmup_steps=20))
        t = time.time()
        comp, _ = train_stage1(comp, features, cfg, concepts=world.concept_phrases(), progress=False)
        rows[name] = {"train_seconds": time.time() - t,
                      "inversion": inversion_recall(comp, bb, world, n_images=1000),
                      "composed": bench.evaluate(composer_encoder(comp))}
        if name == "zscir VSI + soft":
            cost = step_cost(comp, features, cfg)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "composed"}), flush=True)
    print(f"\ntiny CLIP ({args.clip_preset}): held-out text->image R@1 {clip_report['heldout_text_to_image']['R@1']:.3f}")
    print(f"{'method':<34}{'inv R@1':>9}{'inv R@5':>9}{'R@1':>8}{'R@10':>8}{'mR@10':>8}")
    for name, r in rows.items():
        inv = r.get("inversion", {})
        c = r["composed"]
        print(f"{name:<34}{inv.get('R@1', float('nan')):>9.1f}{inv.get('R@5', float('nan')):>9.1f}"
              f"{c['R@1']:>8.1f}{c['R@10']:>8.1f}{c['mean_R@10_over_kinds']:>8.1f}")
    if cost:
        print(f"\nstage-I step {cost['stage1_step'] * 1e3:.1f} ms vs bare text encoder fwd+bwd "
              f"{cost['text_encoder_fwd_bwd'] * 1e3:.1f} ms: ratio {cost['ratio']:.2f} (target <= 1.3)")
    atomic_write_json(args.out, {"rows": rows, "step_cost": cost, "args": vars(args) | {"out": str(args.out)}})


if __name__ == "__main__":
    main()
