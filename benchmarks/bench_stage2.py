"""Stage II on the shapes world: composing adapters vs Stage I and the baselines, ablations, noise, step cost.

Trains one Stage-I model (4 global + 2 VSI tokens, soft alignment), then Stage II on
<= 2,000 synthetic triplets in the *training* phrasing family, and evaluates on held-out
triplets in the *evaluation* phrasing family. Rows: baselines, Stage I alone, Stage II
(default), bottleneck vs LoRA vs full fine-tuning of the last layers, hard negatives off or
with the reference image as an extra negative,
adapter placement/size, and 30% of the training texts replaced by wrong modifications.
Speed: a Stage-II step against a forward+backward of the text encoder (with adapters)
on the same batch of prompts.

    python benchmarks/bench_stage2.py [--rows default,lora,...] [--out .bench/stage2.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from _timing import seconds_per_call
from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.shapes import ShapesWorld, ShapesWorldConfig
from zscir.eval.shapes_eval import ShapesBenchmark, composer_encoder, image_plus_text, image_only, text_only
from zscir.models.adapters import AdapterConfig, count_trainable
from zscir.models.phi import PhiConfig
from zscir.train.clip_pretrain import pretrained_tiny_clip
from zscir.train.engine import TrainConfig
from zscir.train.features import shapes_features, shapes_triplet_features
from zscir.train.stage1 import Stage1Config, train_stage1
from zscir.train.stage2 import Stage2Config, Stage2Task, prepare_stage2, train_stage2

DEFAULT = Stage2Config()
ROWS = {
    "Stage II (default)": {},
    "bottleneck adapters (rank 64)": {"adapters": dataclasses.replace(DEFAULT.adapters, kind="bottleneck", rank=64)},
    "full fine-tuning (last layers)": {"adapters": dataclasses.replace(DEFAULT.adapters, kind="full"),
                                       "train": dataclasses.replace(DEFAULT.train, lr=2e-4)},
    "hard negatives off": {"components": ()},
    "query negative on every row": {"query_negative_fraction": 1.0},
    "+ reference as negative": {"components": ("reference", "query_negative")},
    "adapters in 2 layers": {"adapters": dataclasses.replace(DEFAULT.adapters, num_layers=2)},
    "30% noisy texts": {"noise": 0.3},
}


def with_overrides(base: Stage2Config, row: dict, steps: int) -> Stage2Config:
    """Row config from the defaults, with the step budget applied."""
    kw = {k: v for k, v in row.items() if k != "noise"}
    cfg = dataclasses.replace(base, **kw)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def corrupt(edits, fraction: float, seed: int = 0):
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


def step_cost(composer: Composer, trip, cfg: Stage2Config, repeats: int = 5) -> dict:
    """Seconds per Stage-II step vs forward+backward of the adapted text encoder on the same prompts."""
    task = Stage2Task(composer, trip, cfg)
    opt = torch.optim.AdamW([p for p in task.module.parameters() if p.requires_grad], lr=1e-5)
    batch = task.make_batch(torch.arange(cfg.train.batch_size), 0)

    def full_step():
        out = task.module(batch)
        loss, _ = task.loss(out, batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def text_only_step():
        with torch.no_grad():
            tokens = composer.phi(batch["ref_pooled"], batch["ref_patches"])
        prompts = composer.query_prompts(batch["modifications"])
        composer.backbone.encode_with_pseudo_tokens(prompts, tokens, normalize=True).sum().backward()
        opt.zero_grad()

    times: dict = seconds_per_call({"stage2_step": full_step, "text_encoder_fwd_bwd": text_only_step}, repeats)
    times["ratio"] = times["stage2_step"] / times["text_encoder_fwd_bwd"]
    times["note"] = (f"Stage II also encodes a query-side negative for {cfg.query_negative_fraction:.0%} of the rows "
                     "(an extra text pass on them)")
    return times


def vitl_adapter_parameters(cfg: AdapterConfig) -> int:
    """Trainable parameters of the adapters in a (randomly initialised) ViT-L/14 text tower."""

    c = Composer.from_clip("ViT-L-14", adapters=cfg)
    return count_trainable(c.backbone)


def main() -> None:
    """Train Stage I once, then every Stage-II row; print the table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip-preset", default="default")
    ap.add_argument("--stage1-steps", type=int, default=250)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=DEFAULT.train.steps)
    ap.add_argument("--triplets", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", type=Path, default=Path(".bench/stage2.json"))
    args = ap.parse_args()
    clip_dir, _ = pretrained_tiny_clip(args.clip_preset)
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    torch.manual_seed(0)
    s1 = Composer.from_clip(str(clip_dir), phi=PhiConfig(num_tokens=4))
    feats = shapes_features(s1, world.scenes(args.images, stream="stage1"), 64)
    cfg1 = Stage1Config(phi=s1.phi.config, train=TrainConfig(steps=args.stage1_steps, batch_size=128, lr=5e-4, warmup_steps=20))
    s1, _ = train_stage1(s1, feats, cfg1, concepts=world.concept_phrases(), progress=False)
    s1_dir = args.out.parent / "bench_stage2_stage1"
    s1.save_pretrained(s1_dir)
    bb = s1.backbone
    bench = ShapesBenchmark(bb, world, n_queries=args.queries)
    rows = {name: {"composed": bench.evaluate(fn)} for name, fn in
            (("image only", image_only(bb)), ("text only", text_only(bb)), ("image + text sum", image_plus_text(bb)),
             ("Stage I alone", composer_encoder(s1)))}
    edits = world.make_triplets(args.triplets, family="train")
    cost = None
    for name in args.rows.split(","):
        row = ROWS[name]
        comp = Composer.from_pretrained(s1_dir)
        cfg = with_overrides(DEFAULT, row, args.steps)
        trip = shapes_triplet_features(comp, corrupt(edits, row["noise"]) if row.get("noise") else edits, 64)
        prepare_stage2(comp, cfg.adapters)
        trainable = count_trainable(comp.backbone)
        t = time.time()
        comp, result = train_stage2(comp, trip, cfg, progress=False)
        rows[name] = {"train_seconds": time.time() - t, "trainable_params": trainable,
                      "final_loss": result.history[-1]["loss"], "composed": bench.evaluate(composer_encoder(comp))}
        if name == "Stage II (default)":
            fresh = Composer.from_pretrained(s1_dir)
            prepare_stage2(fresh, cfg.adapters)
            cost = step_cost(fresh, trip, cfg)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "composed"}),
              {k: round(v, 1) for k, v in rows[name]["composed"].items() if k != "per_kind_R@10"}, flush=True)
    print(f"\n{'method':<32}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'R@50':>8}{'mR@10':>8}{'remove R@10':>13}")
    for name, r in rows.items():
        c = r["composed"]
        print(f"{name:<32}{c['R@1']:>8.1f}{c['R@5']:>8.1f}{c['R@10']:>8.1f}{c['R@50']:>8.1f}"
              f"{c['mean_R@10_over_kinds']:>8.1f}{c['per_kind_R@10'].get('remove', float('nan')):>13.1f}")
    if cost:
        print(f"\nstage-II step {cost['stage2_step'] * 1e3:.1f} ms vs adapted text encoder fwd+bwd "
              f"{cost['text_encoder_fwd_bwd'] * 1e3:.1f} ms: ratio {cost['ratio']:.2f} ({cost['note']})")
    vitl = vitl_adapter_parameters(DEFAULT.adapters)
    print(f"trainable adapter parameters ({DEFAULT.adapters.kind}, rank {DEFAULT.adapters.rank}, last "
          f"{DEFAULT.adapters.num_layers} layers): tiny {rows.get('Stage II (default)', {}).get('trainable_params')}, "
          f"ViT-L/14 text tower {vitl}")
    atomic_write_json(args.out, {"rows": rows, "step_cost": cost, "vitl_adapter_parameters": vitl, "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
