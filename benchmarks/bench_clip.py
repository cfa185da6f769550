"""Tiny-CLIP pretraining throughput (images/s) and model size, with shapes-world generation speed.

    python benchmarks/bench_clip.py [--steps 20] [--batch-size 256] [--out .bench/clip.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zscir.checkpoint import atomic_write_json
from zscir.shapes import ShapesWorld, ShapesWorldConfig, caption, render_array
from zscir.models.backbone import load_backbone
from zscir.train.clip_pretrain import ClipPretrainTask, ShapesCaptionSource
from zscir.train.engine import TrainConfig, Trainer


def main() -> None:
    """Measure and print one table; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zscir-tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(".bench/clip.json"))
    args = ap.parse_args()
    world = ShapesWorld(ShapesWorldConfig(seed=0))
    scenes = world.scenes(5000, stream="bench")
    t = time.perf_counter()
    render_array(scenes, 64)
    render_rate = len(scenes) / (time.perf_counter() - t)
    import random

    rng = random.Random(0)
    t = time.perf_counter()
    for s in scenes:
        caption(s, rng)
    caption_rate = len(scenes) / (time.perf_counter() - t)

    torch.manual_seed(0)
    bb = load_backbone(args.model, freeze=False)
    params = sum(p.numel() for p in bb.model.parameters())
    table = bb.model.token_embedding.weight.numel() if hasattr(bb.model, "token_embedding") else 0
    task = ClipPretrainTask(bb, ShapesCaptionSource(0, 20000, bb.image_size))
    cfg = TrainConfig(steps=args.steps + 3, batch_size=args.batch_size, log_every=1)
    trainer = Trainer(task, cfg, progress=False, desc="bench")
    trainer.cfg = TrainConfig(steps=3, batch_size=args.batch_size, log_every=1)  # warm-up steps
    trainer.train()
    trainer.cfg = cfg
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    rate = args.steps * args.batch_size / seconds
    result = {
        "model": args.model, "params": params, "params_without_token_table": params - table,
        "batch_size": args.batch_size, "seconds_per_step": seconds / args.steps, "train_images_per_s": rate,
        "render_images_per_s": render_rate, "captions_per_s": caption_rate, "threads": torch.get_num_threads(),
    }
    print(f"{'model':<14}{'params':>12}{'w/o tokens':>12}{'s/step':>9}{'train img/s':>13}{'render img/s':>14}{'captions/s':>12}")
    print(f"{args.model:<14}{params / 1e6:>11.2f}M{(params - table) / 1e6:>11.2f}M{seconds / args.steps:>9.2f}"
          f"{rate:>13.0f}{render_rate:>14.0f}{caption_rate:>12.0f}")
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
