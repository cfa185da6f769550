"""Wall time of a full CIRR val evaluation (4,181 queries, 2,297 images) with a tiny model, on placeholder images.

Reads the real annotation files (`../shared/data/cir-annotations/cirr` or $ZSCIR_ANNOTATIONS),
writes one small PNG per listed image, and times `zscir.eval.evaluate.evaluate` end to end
(image decoding, gallery and query encoding, ranking, metrics), without the gallery cache.

    python benchmarks/bench_eval_cirr.py [--model DIR] [--out .bench/eval_cirr.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.eval.evaluate import evaluate


def main() -> None:
    """Build the placeholder folder, evaluate, print and write the timing."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: untrained zscir-tiny)")
    ap.add_argument("--out", type=Path, default=Path(".bench/eval_cirr.json"))
    args = ap.parse_args()
    ann = Path(os.environ.get("ZSCIR_ANNOTATIONS", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cir-annotations"))
    model = Composer.from_pretrained(args.model) if args.model else Composer.from_clip("zscir-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cirr"
        for sub in ("captions", "image_splits"):
            (root / sub).mkdir(parents=True)
            for f in (ann / "cirr" / sub).glob("*.json"):
                (root / sub / f.name).write_bytes(f.read_bytes())
        rel = json.loads((ann / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
        rng = np.random.default_rng(0)
        for r in rel.values():
            path = root / "img_raw" / r
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        start = time.perf_counter()
        result = evaluate(model, "cirr", split="val", root=root, use_cache=False, progress=False, print_results=False)
        seconds = time.perf_counter() - start
    print(f"CIRR val: {len(rel)} images, full evaluation {seconds:.1f} s (target < 60 s on 2 cores)")
    atomic_write_json(args.out, {"seconds": seconds, "images": len(rel), "metrics": result.get("metrics", result)})


if __name__ == "__main__":
    main()
