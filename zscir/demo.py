"""The whole TSCIR pipeline, offline, on the built-in shapes world (``zscir demo``, flags in zscir/cli/demo.py).

1. generate the shapes world; pretrain (or reuse the cached) tiny CLIP;
2. Stage I on unlabeled world images: zscir (multi-token phi with visual
   semantic injection + soft text alignment) and the Pic2Word-style and
   SEARLE-style single-token baselines;
3. a small synthetic triplet set in the *training* phrasing family; Stage II
   (composing adapters with hard negatives);
4. zero-shot evaluation on held-out triplets in the *held-out* phrasing family.

Writes ``results.json``, the trained model folder (``model/``, loadable with
``Composer.from_pretrained``), ``examples.png`` (queries and their top 5) and
``training_curves.png``. Finished parts are kept in the output folder, so a
run that was interrupted (Ctrl-C) continues where it stopped. ``--overwrite``
replaces another run's folder by removing only the entries the demo writes
(listed in its ``demo_run.json``); a folder with other files is refused.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .checkpoint import atomic_write_json
from .composer import Composer
from .config import Config
from .models.phi import PhiConfig
from .runs import RunFolder
from .train.engine import TrainConfig

logger = logging.getLogger(__name__)
RUN_FILE = "demo_run.json"
ORACLE_ROWS = ("target caption (oracle)", "reference caption + text")  # from ShapesBenchmark.oracle_rows


@dataclasses.dataclass
class DemoConfig(Config):
    """Sizes of one demo run (``--fast`` shrinks them)."""

    seed: int = 0  # Stage I images, triplets, Stage I and II training
    clip_seed: int = 0  # the tiny CLIP (cached per preset and seed)
    eval_seed: int = 0  # the world the test queries come from (fixed, so seeds compare on the same queries)
    clip_preset: str = "default"
    stage1_images: int = 10_000
    stage1_steps: int = 250
    num_triplets: int = 20_000  # validation R@10: 2k 55.0, 10k 58.6 (300 steps); 20k + 600 steps 67.3 (with the defaults)
    triplet_negatives: int = 0  # sibling hard negatives per triplet (used when Stage II's components ask for them)
    stage2_steps: int = 600
    eval_queries: int = 1_000
    num_tokens: int = 4
    stage1_captions: int = 3  # world captions per Stage-I image for zscir's Stage I (0: image-only soft targets)


PRESETS = {
    "default": DemoConfig(),
    "fast": DemoConfig(clip_preset="quick", stage1_images=5_000, stage1_steps=100, num_triplets=1_000,
                       stage2_steps=150, eval_queries=500),
}


STAGE1_NAMES = ("Pic2Word-style", "SEARLE-style", "zscir Stage I")


def stage1_configs(cfg: DemoConfig) -> Dict[str, Any]:
    """The Stage-I rows of the table: name -> Stage1Config (zscir's reads captions when `cfg.stage1_captions`)."""
    from .train.stage1 import CAPTION_DEFAULTS, Stage1Config

    train = TrainConfig(steps=cfg.stage1_steps, batch_size=128, lr=5e-4, warmup_steps=20, seed=cfg.seed,
                        save_every=100, log_every=10)
    with_captions = CAPTION_DEFAULTS if cfg.stage1_captions else {}
    return {
        "Pic2Word-style": Stage1Config(phi=PhiConfig(num_tokens=1, use_vsi=False, dropout=0.1), loss="hard",
                                       concept_weight=0.0, train=train),
        "SEARLE-style": Stage1Config(phi=PhiConfig(num_tokens=1, use_vsi=False, dropout=0.5), loss="hard",
                                     concept_weight=0.0, train=train),
        "zscir Stage I": Stage1Config(phi=PhiConfig(num_tokens=cfg.num_tokens, use_vsi=True), loss="soft",
                                      concept_weight=1.0, train=train, **with_captions),  # + 2 VSI tokens
    }


def stage2_config(cfg: DemoConfig) -> Any:
    """The demo's Stage-II config: the library default with the demo's step budget and seed."""
    from .train.stage2 import Stage2Config

    s2 = Stage2Config()
    return dataclasses.replace(s2, train=dataclasses.replace(s2.train, steps=cfg.stage2_steps, seed=cfg.seed,
                                                             warmup_steps=max(1, cfg.stage2_steps // 10),
                                                             save_every=100, log_every=10))


def describe_stage1(cfg: DemoConfig) -> str:
    """One line on what zscir's Stage I of this demo is (printed under the table)."""
    s1 = stage1_configs(cfg)["zscir Stage I"]
    phi = s1.phi
    targets = {"image": "image-image similarity", "caption": "caption fit",
               "both": "image similarity + caption fit"}[s1.targets]
    words = (f"zscir Stage I: {phi.num_tokens} global + {phi.vsi_tokens if phi.use_vsi else 0} VSI tokens, soft "
             f"targets from {targets}")
    if cfg.stage1_captions and s1.targets != "image":
        pooled = "the mean of" if s1.caption_pooling == "mean" else "one of"
        words += f" ({pooled} {cfg.stage1_captions} world captions per image)"
    if s1.text_weight:
        words += f", text term x{s1.text_weight:g}"
    return words + " (chosen on validation, docs/results.md)"


def demo_settings(cfg: DemoConfig) -> Dict[str, Any]:
    """What makes two demo runs the same run: the sizes and every training config (so new defaults never reuse
    a model trained with old ones)."""
    return {"demo": cfg.to_dict(), "stage1": {n: c.to_dict() for n, c in stage1_configs(cfg).items()},
            "stage2": stage2_config(cfg).to_dict()}


def stage1_folder(name: str) -> str:
    """The folder (in the demo's output folder) of the Stage-I variant `name`."""
    return "stage1_" + name.lower().replace(" ", "_").replace("-", "_")


#: The entries a demo run writes in its folder: all that --overwrite may remove.
DEMO_OUTPUTS: Tuple[str, ...] = (*(stage1_folder(n) for n in STAGE1_NAMES), "stage2", "model",
                                 "results.json", "examples.png", "training_curves.png")


class OutputFolder:
    """The demo's output folder: continues a run with the same settings, replaces another only with `overwrite`
    (removing only what the demo wrote: a folder with other files is refused); reports disk errors clearly."""

    def __init__(self, path: Path, settings: Dict[str, Any], overwrite: bool) -> None:
        self.path = path
        try:
            RunFolder(path, "demo", settings, DEMO_OUTPUTS, run_file=RUN_FILE).open(resume=None, overwrite=overwrite)
        except FileExistsError:
            raise
        except OSError as err:
            raise disk_error(err, path) from None

    def __truediv__(self, name: str) -> Path:
        return self.path / name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def disk_error(err: OSError, path: Path) -> OSError:
    """A clearer error for a full disk or an unwritable output folder `path` (other errors unchanged)."""
    if err.errno == errno.ENOSPC:
        return OSError(f"the disk holding {path} is full; free some space or choose another --out")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OSError(f"cannot write to {path} (read-only or no permission); choose another --out")
    return err


def _has_state(run: Path) -> bool:
    """Whether an interrupted training left a checkpoint in `run` (the demo then continues it)."""
    return (run / "state" / "state.json").is_file()


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def run_demo(out: Path, cfg: DemoConfig, overwrite: bool = False, progress: bool = True,
             cache_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Run (or continue) the demo in `out`; return the results dict that is also written to results.json."""
    from .shapes import ShapesWorld, ShapesWorldConfig
    from .eval.shapes_eval import (ShapesBenchmark, composer_encoder, image_only, image_plus_text,
                                   inversion_recall, text_only)
    from .train.clip_pretrain import pretrained_tiny_clip
    from .train.features import caption_features, shapes_features, shapes_triplet_features
    from .train.stage1 import needs_captions, train_stage1
    from .train.stage2 import train_stage2

    start = time.time()
    torch.manual_seed(cfg.seed)
    folder = OutputFolder(out, demo_settings(cfg), overwrite)
    timings: Dict[str, float] = {}

    _stage("tiny CLIP (shapes world)")
    t = time.time()
    clip_dir, clip_report = pretrained_tiny_clip(cfg.clip_preset, cache_dir=cache_dir, progress=progress,
                                                 seed=cfg.clip_seed)
    timings["tiny_clip"] = time.time() - t
    ev = clip_report["heldout_text_to_image"]
    print(f"tiny CLIP {clip_dir}\n  held-out text->image R@1 {ev['R@1']:.3f}  R@5 {ev['R@5']:.3f} "
          f"(trained in {clip_report['train_seconds']:.0f}s; this run {timings['tiny_clip']:.0f}s)")

    world = ShapesWorld(ShapesWorldConfig(seed=cfg.seed, image_size=64))  # training data
    eval_world = ShapesWorld(ShapesWorldConfig(seed=cfg.eval_seed, image_size=64))
    base = Composer.from_clip(str(clip_dir))
    bb = base.backbone

    _stage("Stage I (mapping) on world images (and their captions)")
    t = time.time()
    features = captions = None  # encoded only if some variant still has to be trained
    stage1: Dict[str, Composer] = {}
    curves: Dict[str, List[Dict[str, float]]] = {}
    for name, s1 in stage1_configs(cfg).items():
        run = folder / stage1_folder(name)
        if (run / "model" / "config.json").is_file():
            stage1[name] = Composer.from_pretrained(run / "model")
            curves[name] = _read_json(run / "history.json") or []
            print(f"  {name}: reusing {run / 'model'}")
            continue
        if features is None:
            scenes = world.scenes(cfg.stage1_images, stream="stage1")
            features = shapes_features(base, scenes, 64, progress=progress)
        if captions is None and needs_captions(s1):
            captions = caption_features(bb, world.captions_of(scenes, cfg.stage1_captions), progress=progress)
        torch.manual_seed(cfg.seed)
        comp = Composer.from_clip(str(clip_dir), phi=s1.phi)
        s1 = dataclasses.replace(s1, phi=comp.phi.config)
        comp, result = train_stage1(comp, features, s1, output_dir=run, concepts=world.concept_phrases(),
                                    resume=_has_state(run), progress=progress, captions=captions)
        atomic_write_json(run / "history.json", result.history)
        stage1[name] = comp
        curves[name] = result.history
    timings["stage1"] = time.time() - t

    _stage("synthetic triplets (training phrasing) and Stage II (composing)")
    t = time.time()
    edits = world.make_triplets(cfg.num_triplets, family="train", negatives=cfg.triplet_negatives)
    final_dir = folder / "model"
    if (final_dir / "config.json").is_file():
        stage2 = Composer.from_pretrained(final_dir)
        curves["zscir Stage II"] = _read_json(folder / "stage2" / "history.json") or []
        print(f"  reusing {final_dir}")
    else:
        comp = Composer.from_pretrained(folder / stage1_folder("zscir Stage I") / "model")
        trip = shapes_triplet_features(comp, edits, 64)
        stage2, result = train_stage2(comp, trip, stage2_config(cfg), output_dir=folder / "stage2",
                                       resume=_has_state(folder / "stage2"), progress=progress)
        atomic_write_json(folder / "stage2" / "history.json", result.history)
        stage2.save_pretrained(final_dir)
        curves["zscir Stage II"] = result.history
    timings["stage2"] = time.time() - t

    _stage("zero-shot evaluation (held-out phrasing family)")
    t = time.time()
    bench = ShapesBenchmark(bb, eval_world, n_queries=cfg.eval_queries, split="test")
    rows: Dict[str, Dict[str, Any]] = {}
    methods: Dict[str, Callable] = {
        "image only": image_only(bb),
        "text only": text_only(bb),
        "image + text sum": image_plus_text(bb),
    }
    methods.update({name: composer_encoder(c) for name, c in stage1.items()})
    methods["zscir Stage II"] = composer_encoder(stage2)
    for name, fn in methods.items():
        rows[name] = bench.evaluate(fn)
    rows.update(bench.oracle_rows())  # text ceilings of the same frozen CLIP
    inversion = {name: inversion_recall(c, c.backbone, eval_world, n_images=min(1000, cfg.eval_queries))
                 for name, c in stage1.items()}
    timings["evaluation"] = time.time() - t
    table = format_table(rows)
    print(table)
    print(describe_stage1(cfg))

    _write_figures(folder, bench, stage2, curves)
    results = {
        "config": cfg.to_dict(),
        "stage1": describe_stage1(cfg),
        "tiny_clip": {"folder": str(clip_dir), "heldout_text_to_image": ev, "train_seconds": clip_report["train_seconds"]},
        "composed_retrieval": rows,
        "inversion_R@1": {k: v["R@1"] for k, v in inversion.items()},
        "eval_queries": len(bench),
        "gallery_size": len(bench.gallery),
        "timings_seconds": {**timings, "total": time.time() - start},
        "model": str(final_dir),
    }
    atomic_write_json(folder / "results.json", results)
    print(f"\nwrote {folder / 'results.json'}, {final_dir}, examples.png, training_curves.png "
          f"({results['timings_seconds']['total']:.0f}s)")
    return results


def format_table(rows: Dict[str, Dict[str, Any]]) -> str:
    """A fixed-width table of R@K and mean R@10 over modification kinds (oracle rows under a rule)."""
    cols = ["R@1", "R@5", "R@10", "R@50", "mean_R@10_over_kinds"]
    width = max([20] + [len(name) + 2 for name in rows])
    head = f"{'method':<{width}}" + "".join(f"{c.replace('mean_R@10_over_kinds', 'mR@10 kinds'):>12}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        if name == ORACLE_ROWS[0]:
            lines.append(f"{'-- text ceilings (oracle captions, frozen CLIP text encoder)':-<{len(head)}}")
        lines.append(f"{name:<{width}}" + "".join(f"{r[c]:>12.1f}" for c in cols))
    return "\n".join(lines)


def _write_figures(folder: OutputFolder, bench: Any, composer: Composer, curves: Dict[str, List[Dict[str, float]]]) -> None:
    """examples.png (reference, text, top 5 with the target marked) and training_curves.png."""
    from .shapes import render
    from .eval.shapes_eval import composer_encoder
    from .viz import GridRow, save_retrieval_grid, save_training_curves

    try:
        top = bench.rankings(composer_encoder(composer), k=5)
        rows = []
        for qi in list(range(0, len(bench), max(1, len(bench) // 6)))[:6]:
            q = bench.eval_set.queries[qi]
            positives = set(bench.positives[qi])
            results = [(render(bench.eval_set.gallery[g], 128), "", g in positives) for g in top[qi].tolist()]
            rows.append(GridRow(render(bench.eval_set.gallery[q.reference_index], 128), q.text, results))
        save_retrieval_grid(folder / "examples.png", rows)
        save_training_curves(folder / "training_curves.png", curves)
    except ImportError as err:
        logger.warning("%s; skipping the PNG figures", err)
