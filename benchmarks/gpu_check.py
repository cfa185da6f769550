"""GPU check: feature caching, Stage I, Stage II (bf16) and a full CIRR val evaluation with ViT-L/14, offline.

Needs one CUDA GPU, torch + open_clip, and nothing from the network: the CLIP is open_clip's
``ViT-L-14`` with random weights (``pretrained=None``), the images are shapes-world scenes
upsampled to random sizes and written to disk as JPEG/PNG, and the CIRR val evaluation reads
the real annotation files (``--annotations``) with one of those images linked under every
image name the split lists. Measured, each with its wall time and peak GPU memory:

* writing the images (processes in parallel),
* the Stage-I feature cache (``FeatureCache.build`` with DataLoader workers): images/s,
* Stage I (``train_stage1``, bf16) and Stage II (``train_stage2``, bf16) on those features and on
  shapes-world triplets of those images (``load_triplets`` + ``encode_triplets``): steps/s,
* ``zscir.eval.evaluate`` on CIRR val (4,181 queries, 2,297 images): seconds.

Prints one table and writes JSON (``--out``). Exit codes: 0 all ran; 1 a phase failed (the others
still ran where they could); 2 no CUDA device (without ``--smoke``); 3 the CIRR annotations were not
found (checked first, before any GPU time is spent; ``--skip-eval`` runs the rest without them).

    python benchmarks/gpu_check.py --annotations /data/cir-annotations     # or $ZSCIR_ANNOTATIONS
    python benchmarks/gpu_check.py --smoke --annotations DIR                # tiny CLIP, a few images, 2 steps (CPU)

The annotation folder holds ``cirr/captions/cap.rc2.val.json`` and ``cirr/image_splits/split.rc2.val.json``
(the ``cirr`` folder itself is accepted too).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA, EXIT_NO_ANNOTATIONS = 0, 1, 2, 3
BUDGET_S = 300.0
CAPTIONS = Path("captions") / "cap.rc2.val.json"
SPLIT = Path("image_splits") / "split.rc2.val.json"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each phase runs."""

    model: str
    images: int
    min_side: int
    max_side: int
    triplets: int
    steps: int
    stage1_batch: int
    stage2_batch: int
    cache_batch: int
    eval_batch: int
    workers: int
    cirr_queries: int  # 0: the whole val split


PRESETS: Dict[str, Sizes] = {
    # one modern GPU, under 5 minutes
    "full": Sizes(model="ViT-L-14", images=3000, min_side=200, max_side=800, triplets=1000, steps=50,
                  stage1_batch=256, stage2_batch=128, cache_batch=256, eval_batch=256,
                  workers=min(8, os.cpu_count() or 1), cirr_queries=0),
    # the same code paths at tiny size, on the CPU in seconds (tests/test_gpu_check.py)
    "smoke": Sizes(model="zscir-tiny", images=24, min_side=40, max_side=120, triplets=12, steps=2,
                   stage1_batch=8, stage2_batch=8, cache_batch=8, eval_batch=16, workers=1, cirr_queries=8),
}


# ----------------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; a size flag left out takes the preset's value."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CLIP, a few images, 2 steps each (runs on the CPU)")
    ap.add_argument("--annotations", default=None,
                    help="folder with cirr/captions + cirr/image_splits (default: $ZSCIR_ANNOTATIONS, then "
                         "shared/data/cir-annotations in or beside the checkout)")
    ap.add_argument("--skip-eval", action="store_true", help="run without the CIRR evaluation (no annotations)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="results JSON (default: gpu_check.json)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for images and caches (default: a temp folder, removed at the end)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda; --smoke: cuda if present, else cpu)")
    ap.add_argument("--model", default=None, help="open_clip model name (default ViT-L-14; --smoke: zscir-tiny)")
    ap.add_argument("--pretrained", default=None, help="local weight file (default: random init, no download)")
    for field in dataclasses.fields(Sizes):
        if field.name != "model":
            ap.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=None)
    return ap.parse_args(argv)


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    """The preset of the mode with the flags given on the command line applied."""
    base = PRESETS["smoke" if args.smoke else "full"]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None}
    sizes = dataclasses.replace(base, **given)
    low = [f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(sizes).items()
           if isinstance(v, int) and v < (0 if k == "cirr_queries" else 1)]
    if low:
        raise SystemExit(f"gpu_check: sizes must be >= 1 (--cirr-queries >= 0), got {', '.join(low)}")
    if not 24 <= sizes.min_side <= sizes.max_side:
        raise SystemExit(f"gpu_check: need 24 <= --min-side <= --max-side, got {sizes.min_side}, {sizes.max_side}")
    if sizes.images < 2 or not 1 <= sizes.triplets <= sizes.images // 2:
        raise SystemExit(f"gpu_check: need --images >= 2 and 1 <= --triplets <= images / 2, "
                         f"got {sizes.images}, {sizes.triplets}")
    return sizes


def find_cirr_annotations(given: Optional[str]) -> Tuple[Optional[Path], List[Path]]:
    """The CIRR annotation folder (holding captions/ and image_splits/) and the places looked at."""
    if given:
        candidates = [Path(given)]  # an explicit folder is the only one looked at
    else:
        env = os.environ.get("ZSCIR_ANNOTATIONS")
        candidates = ([Path(env)] if env else []) + [REPO / "shared" / "data" / "cir-annotations",
                                                      REPO.parent / "shared" / "data" / "cir-annotations"]
    looked = []
    for base in candidates:
        for folder in (base / "cirr", base):
            looked.append(folder)
            if (folder / CAPTIONS).is_file() and (folder / SPLIT).is_file():
                return folder, looked
    return None, looked


# ------------------------------------------------------------------------------------------- images
_NOISE: List[Any] = []  # one noise tile per process, cropped at a different place for each image


def _noise(width: int, height: int, seed: int) -> Any:
    """A width x height crop of this process's uint8 noise tile, values 0..24 (fresh noise per image is slow)."""
    import numpy as np
    from PIL import Image

    if not _NOISE or _NOISE[0].width < 2 * width or _NOISE[0].height < 2 * height:
        side = max(2048, 2 * width, 2 * height)
        _NOISE[:] = [Image.fromarray(np.random.default_rng(0).integers(0, 25, (side, side, 3), dtype=np.uint8))]
    tile = _NOISE[0]
    x, y = seed * 7919 % (tile.width - width), seed * 104729 % (tile.height - height)
    return tile.crop((x, y, x + width, y + height))


def _write_one(job: Tuple[str, Any, int, int, int]) -> int:
    """Upsample one rendered scene to its size, add sensor-like noise to JPEGs, write it; returns bytes written."""
    from PIL import Image, ImageChops

    path, pixels, width, height, seed = job
    image = Image.fromarray(pixels, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)
    if path.endswith(".png"):
        image.save(path, format="PNG", compress_level=1)
    else:
        noisy = ImageChops.add(image, _noise(width, height, seed), scale=1.0, offset=-12)  # +-12, clipped
        noisy.save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def write_images(sizes: Sizes, folder: Path, processes: int) -> Tuple[List[Path], List[Any], int]:
    """Shapes-world edits as images 2k (reference), 2k + 1 (target), random sizes, every third a PNG; + bytes."""
    import numpy as np

    from zscir.shapes import ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64))
    edits = world.make_triplets((sizes.images + 1) // 2, family="train", stream="gpu-check")
    scenes = [s for e in edits for s in (e.source, e.target)][: sizes.images]
    pixels = world.render_array(scenes)
    rng = np.random.default_rng(0)
    sides = rng.integers(sizes.min_side, sizes.max_side + 1, (len(scenes), 2))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.{'png' if i % 3 == 2 else 'jpg'}" for i in range(len(scenes))]
    jobs = [(str(p), pixels[i], int(sides[i, 0]), int(sides[i, 1]), i) for i, p in enumerate(paths)]
    if processes > 1:
        # fork: the workers only use numpy and PIL, and need not re-import this script
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(processes) as pool:
            written = sum(pool.imap_unordered(_write_one, jobs, chunksize=16))
    else:
        written = sum(map(_write_one, jobs))
    return paths, edits[: sizes.triplets], written


def write_triplets(edits: Sequence[Any], paths: Sequence[Path], out: Path) -> Path:
    """A triplet JSONL over the written images (reference 2k, target 2k + 1), as `zscir train-stage2` reads it."""
    lines = [json.dumps({"reference": paths[2 * k].name, "modification": e.text, "target": paths[2 * k + 1].name,
                         "kind": e.kind}) for k, e in enumerate(edits)]
    out.write_text("".join(line + "\n" for line in lines))
    return out


def prepare_cirr(annotations: Path, root: Path, images: Sequence[Path], max_queries: int) -> Dict[str, int]:
    """A CIRR val root: the annotations (first `max_queries` queries, 0 = all), a linked image per listed name."""
    rows = json.loads((annotations / CAPTIONS).read_text())
    split = json.loads((annotations / SPLIT).read_text())
    if max_queries and max_queries < len(rows):
        rows = rows[:max_queries]
        needed = set()
        for row in rows:
            needed.update([row["reference"], row.get("target_hard", row["reference"])], row["img_set"]["members"])
        split = {name: rel for name, rel in split.items() if name in needed}
    for rel_file, data in ((CAPTIONS, rows), (SPLIT, split)):
        (root / rel_file).parent.mkdir(parents=True, exist_ok=True)
        (root / rel_file).write_text(json.dumps(data))
    made = set()
    for i, rel in enumerate(split.values()):
        target = root / "img_raw" / rel
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        source = images[i % len(images)]
        try:
            os.link(source, target)  # much faster than writing thousands of files; PIL reads by content, not suffix
        except OSError:
            shutil.copyfile(source, target)
    return {"queries": len(rows), "images": len(split)}


# -------------------------------------------------------------------------------------------- phases
class Report:
    """Phase results in run order; a phase that raises is recorded and the run goes on."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.phases: Dict[str, Dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Time `fn` (device synchronised), record its peak GPU memory and what it returns; None if it failed."""
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            out = fn()
            if cuda:
                torch.cuda.synchronize()
        except Exception as err:  # one phase failing must not cost the measurements of the others
            traceback.print_exc()
            self.phases[name] = {"error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - start}
            print(f"gpu_check: phase {name!r} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return None
        out["seconds"] = time.perf_counter() - start
        if cuda:
            out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        self.phases[name] = out
        return out

    def skip(self, name: str, reason: str) -> None:
        """Record a phase that did not run."""
        self.phases[name] = {"skipped": reason}

    @property
    def failed(self) -> List[str]:
        """Names of the phases that raised."""
        return [n for n, p in self.phases.items() if "error" in p]


@contextlib.contextmanager
def step_clock(*task_classes: type) -> Iterator[List[float]]:
    """Times after each optimiser step of these TrainTask classes (their on_step_end hook wrapped, restored after)."""
    import torch

    stamps: List[float] = []
    own = {cls: cls.__dict__.get("on_step_end") for cls in task_classes}
    for cls in task_classes:
        inner = cls.on_step_end

        def hook(self: Any, step: int, module: Any, _inner: Callable[..., None] = inner) -> None:
            _inner(self, step, module)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done
            stamps.append(time.perf_counter())

        cls.on_step_end = hook
    try:
        yield stamps
    finally:
        for cls, method in own.items():
            if method is None:
                del cls.on_step_end
            else:
                cls.on_step_end = method


def _training(result: Any, stamps: Sequence[float], steps: int, batch: int) -> Dict[str, Any]:
    """Step rates of a training run: over all steps, and after the first (kernel selection, allocations)."""
    import torch

    out = {"steps": steps, "batch": batch, "precision": "bf16" if torch.cuda.is_available() else "fp32 (CPU)",
           "train_loop_s": result.seconds, "steps_per_s": steps / result.seconds,
           "losses": [round(h["loss"], 4) for h in result.history]}
    if len(stamps) >= 2:
        out["steady_steps_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        out["first_step_s"] = result.seconds - (stamps[-1] - stamps[0])
    return out


def run_check(args: argparse.Namespace, sizes: Sizes, device: str, workdir: Path,
              annotations: Optional[Path]) -> Report:
    """Run every phase in `workdir` (the CIRR evaluation only with `annotations`)."""
    started = time.perf_counter()
    from zscir.composer import Composer
    from zscir.data.features import FeatureCache
    from zscir.data.triplets import load_triplets
    from zscir.eval.evaluate import evaluate
    from zscir.models.phi import PhiConfig
    from zscir.train.engine import TrainConfig
    from zscir.train.features import FeatureSource, encode_triplets
    from zscir.train.stage1 import Stage1Config, Stage1Task, train_stage1
    from zscir.train.stage2 import Stage2Config, Stage2Task, fit_to_context, train_stage2

    report = Report(device)
    report.phases["import_zscir"] = {"seconds": time.perf_counter() - started}
    state: Dict[str, Any] = {}

    def images() -> Dict[str, Any]:
        processes = (os.cpu_count() or 1) if sizes.workers > 1 else 1  # one worker (smoke): in this process
        paths, edits, written = write_images(sizes, workdir / "images", processes)
        state.update(paths=paths, edits=edits)
        return {"images": len(paths), "sides": [sizes.min_side, sizes.max_side], "megabytes": written / 1e6,
                "processes": processes, "formats": "2/3 JPEG (q90, noise), 1/3 PNG"}

    def model() -> Dict[str, Any]:
        state["composer"] = Composer.from_clip(sizes.model, args.pretrained, phi=PhiConfig(), device=device)
        bb = state["composer"].backbone
        return {"model": sizes.model, "pretrained": args.pretrained or "random init",
                "params_m": sum(p.numel() for p in bb.model.parameters()) / 1e6, "embed_dim": bb.embed_dim}

    def cache() -> Dict[str, Any]:
        built = FeatureCache.build(state["composer"].backbone, state["paths"], workdir / "features", patch_grid=4,
                                   batch_size=sizes.cache_batch, num_workers=sizes.workers, progress=False)
        state["features"] = FeatureSource.from_cache(built)
        return {"images": len(built), "valid": int(built.valid.sum()), "batch": sizes.cache_batch,
                "workers": sizes.workers, "patch_grid": list(built.patch_grid),
                "model_dtype": str(next(state["composer"].backbone.parameters()).dtype)}

    def train_config(batch: int, lr: float) -> TrainConfig:
        return TrainConfig(steps=sizes.steps, batch_size=batch, lr=lr, warmup_steps=min(5, sizes.steps),
                           mixed_precision="bf16", log_every=max(1, sizes.steps // 5))

    def stage1() -> Dict[str, Any]:
        composer = state["composer"]
        cfg = Stage1Config(phi=composer.phi.config, train=train_config(sizes.stage1_batch, 5e-4))
        with step_clock(Stage1Task) as stamps:
            _, result = train_stage1(composer, state["features"], cfg, progress=False)
        return _training(result, stamps, sizes.steps, sizes.stage1_batch)

    def triplet_features() -> Dict[str, Any]:
        composer = state["composer"]
        jsonl = write_triplets(state["edits"], state["paths"], workdir / "triplets.jsonl")
        triplets = fit_to_context(composer, load_triplets(jsonl, image_root=workdir / "images"))
        state["triplets"] = encode_triplets(composer, triplets, batch_size=sizes.eval_batch, progress=False)
        return {"triplets": len(triplets), "images_encoded": 2 * len(triplets)}

    def stage2() -> Dict[str, Any]:
        cfg = Stage2Config(train=train_config(sizes.stage2_batch, 3e-3))
        with step_clock(Stage2Task) as stamps:
            _, result = train_stage2(state["composer"], state["triplets"], cfg, progress=False)
        return {**_training(result, stamps, sizes.steps, sizes.stage2_batch),
                "adapters": dataclasses.asdict(cfg.adapters), "components": list(cfg.components)}

    def cirr_eval() -> Dict[str, Any]:
        counts = prepare_cirr(annotations, workdir / "cirr", state["paths"], sizes.cirr_queries)
        start = time.perf_counter()
        results = evaluate(state["composer"], "cirr", "val", root=workdir / "cirr", batch_size=sizes.eval_batch,
                           num_workers=sizes.workers, use_cache=False, progress=False, print_results=False)
        return {"queries": results["num_queries"], "gallery": sum(results["gallery_sizes"].values()),
                "listed": counts, "evaluate_s": time.perf_counter() - start, "queries_skipped": results["num_skipped"],
                "metrics": dict(results["metrics"]), "annotations": str(annotations)}

    report.run("write_images", images)
    if "paths" not in state:
        return report
    report.run("load_model", model)
    if "composer" not in state:
        return report
    report.run("feature_cache", cache)
    if "features" in state:
        report.run("stage1", stage1)
    else:
        report.skip("stage1", "no feature cache")
    report.run("triplet_features", triplet_features)
    if "triplets" in state:
        report.run("stage2", stage2)
    else:
        report.skip("stage2", "no triplet features")
    if annotations is None:
        report.skip("cirr_val_eval", "--skip-eval")
    else:
        report.run("cirr_val_eval", cirr_eval)
    return report


# --------------------------------------------------------------------------------------------- output
def _per_s(count: float, seconds: float, unit: str) -> str:
    """`count / seconds` with a sensible number of digits."""
    rate = count / seconds
    return f"{rate:.0f} {unit}/s" if rate >= 10 else f"{rate:.2f} {unit}/s"


def _step_rate(p: Dict[str, Any]) -> str:
    """Steps/s after the first step, and what the first step took."""
    if "steady_steps_per_s" not in p:
        return f"{p['steps_per_s']:.2f} steps/s"
    return f"{p['steady_steps_per_s']:.2f} steps/s (step 1: {p['first_step_s']:.1f} s)"


def _rate(name: str, p: Dict[str, Any]) -> str:
    """The phase's throughput as text."""
    rates = {
        "write_images": lambda: _per_s(p["images"], p["seconds"], "img"),
        "feature_cache": lambda: _per_s(p["images"], p["seconds"], "img"),
        "stage1": lambda: _step_rate(p),
        "triplet_features": lambda: _per_s(p["triplets"], p["seconds"], "triplets"),
        "stage2": lambda: _step_rate(p),
        "cirr_val_eval": lambda: _per_s(p["queries"] + p["gallery"], p["evaluate_s"], "img"),
    }
    return rates[name]() if name in rates else "-"


def _what(name: str, p: Dict[str, Any]) -> str:
    """The phase's size as text."""
    sizes = {
        "import_zscir": lambda: "zscir, open_clip, accelerate",
        "write_images": lambda: f"{p['images']} JPEG/PNG {p['sides'][0]}-{p['sides'][1]} px",
        "load_model": lambda: f"{p['model']} {p['pretrained']} ({p['params_m']:.0f}M)",
        "feature_cache": lambda: f"{p['images']} images, {p['workers']} workers",
        "stage1": lambda: f"{p['steps']} steps x {p['batch']}, {p['precision']}",
        "triplet_features": lambda: f"{p['triplets']} triplets",
        "stage2": lambda: f"{p['steps']} steps x {p['batch']}, {p['precision']}",
        "cirr_val_eval": lambda: f"{p['queries']} queries, {p['gallery']} images",
    }
    return sizes[name]() if name in sizes else ""


def format_table(report: Report, total_s: float) -> str:
    """One text table of every phase."""
    rows = [("phase", "size", "seconds", "rate", "peak GPU GiB")]
    for name, p in report.phases.items():
        if "skipped" in p:
            rows.append((name, f"skipped: {p['skipped']}", "-", "-", "-"))
        elif "error" in p:
            rows.append((name, f"FAILED: {p['error']}"[:60], f"{p['seconds']:.1f}", "-", "-"))
        else:
            peak = f"{p['peak_gpu_gib']:.2f}" if "peak_gpu_gib" in p else "-"
            rows.append((name, _what(name, p), f"{p['seconds']:.1f}", _rate(name, p), peak))
    rows.append(("total", f"budget {BUDGET_S:.0f} s", f"{total_s:.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment(device: str) -> Dict[str, Any]:
    """Versions and the device the check ran on."""
    import open_clip
    import torch

    env: Dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "open_clip": open_clip.__version__, "device": device, "cuda": torch.version.cuda,
                           "cpu_count": os.cpu_count(),
                           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check for CUDA, run the phases, print the table, write the JSON; returns the exit code."""
    args = parse_args(argv)
    sizes = resolve_sizes(args)
    sizes = dataclasses.replace(sizes, model=args.model or sizes.model)
    # never reach the network: set before torch / open_clip / huggingface_hub are imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or use --smoke for the tiny CPU version", file=sys.stderr)
        return EXIT_NO_CUDA
    annotations = None
    if not args.skip_eval:
        annotations, looked = find_cirr_annotations(args.annotations)
        if annotations is None:
            print(f"gpu_check: CIRR annotations NOT FOUND (no {CAPTIONS} + {SPLIT} in "
                  f"{', '.join(map(str, looked))}); pass --annotations DIR (the folder holding cirr/), or --skip-eval",
                  file=sys.stderr)
            return EXIT_NO_ANNOTATIONS
    device = args.device or ("cuda" if torch.cuda.is_available() or not args.smoke else "cpu")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the checkout's zscir, also when it is not installed
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zscir-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        report = run_check(args, sizes, device, workdir, annotations)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - started
    code = EXIT_FAILED if report.failed else EXIT_OK
    record = {"mode": "smoke" if args.smoke else "full", "sizes": dataclasses.asdict(sizes),
              "environment": environment(device), "phases": report.phases, "total_s": total,
              "within_budget": total <= BUDGET_S, "failed": report.failed, "exit_code": code,
              "annotations": str(annotations) if annotations else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    env = record["environment"]
    print(f"zscir GPU check ({record['mode']}): {env.get('gpu', device)}, torch {env['torch']}, "
          f"open_clip {env['open_clip']}, {sizes.model} ({args.pretrained or 'random init'})")
    print(format_table(report, total))
    print(f"results: {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
