"""Stage-II components (MELT, SPN bank, DQE-CIR) and the kNN re-ranker on the shapes world, against plain Stage II.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_components.py [--out .bench/components.json]
      [--triplets 2000 --steps 150 --queries 1000 --seeds 1 --stage1 DIR]

Setup: the cached tiny CLIP ("fast"), a small Stage-I model (as tests/conftest.py
trains it, or ``--stage1 DIR``), training triplets with the long-tail kind
distribution ``LONG_TAIL_WEIGHTS`` (colour 40%, shape 18%, add/remove 12%,
size/move 4%, the 15 combined kinds 0.67% each), held-out "eval" phrasing.
Each row trains Stage II from the same Stage-I model with plain Stage II's
components ("reference", "query_negative") plus the row's own. The best
combination is chosen on a *validation* benchmark (another stream) — every
single component whose validation mean-over-kinds R@10 beats plain's joins
(of the two weighting schemes only the better one) — and all rows are reported
on the test benchmark. Re-ranker rows re-order each query's top-50.

Columns: R@1, R@10, mean R@10 over kinds, R@10 of the frequent kinds (>= 10%
of training triplets) and of the rare ones (size, move and every combined
kind), per-kind R@10, and the training cost per step relative to plain Stage II
(CPU seconds of this process, so other jobs on a shared machine matter less;
wall seconds are in the JSON). Diagnostics show what the weighting and
attribute components learned per kind. A separate table measures the SPN bank
term for a 50k-image bank at 128-d and 768-d.

Defaults (about 10 minutes on 2 CPU cores): 2,000 triplets, bottleneck adapters
in the last 4 text blocks (rank 32), 120 steps of batch 128 at lr 1.5e-3, 1,000
test and 500 validation queries, one seed. Scale up with --steps, --triplets,
--queries and --seeds (rows are then averaged over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="No pretrained weights loaded")

PLAIN = ("reference", "query_negative")
SINGLE_ROWS: Dict[str, Tuple[Tuple[str, ...], Dict[str, Any]]] = {
    "melt_rarity": (("melt_rarity",), {}),
    "inverse_frequency": (("inverse_frequency",), {}),
    "melt_denoise": (("melt_denoise",), {}),
    "bank (SPN)": (("bank",), {"bank": {"negatives": 1024}}),
    "dqe_mid_zone": (("dqe_mid_zone",), {}),
    "dqe_pairwise": (("dqe_pairwise",), {}),
    "dqe_attributes": (("dqe_attributes",), {}),
}
WEIGHTINGS = ("melt_rarity", "inverse_frequency")  # combine at most one of these
RERANK_K = 50
VAL_NOISE = 1.0  # validation mean-R@10 gain (points) above which a component counts as clearly better


def frequent_kinds(threshold: float = 0.10) -> List[str]:
    """Kinds that make up at least `threshold` of the long-tail training distribution."""
    from zscir.shapes import LONG_TAIL_WEIGHTS

    total = sum(LONG_TAIL_WEIGHTS.values())
    return [k for k, w in LONG_TAIL_WEIGHTS.items() if w / total >= threshold]


def stage1_model(tiny_clip: Path, world: Any, folder: Path, progress: bool) -> Path:
    """Train (once; reused from `folder`) the small Stage-I model the tests use."""
    from zscir.composer import Composer
    from zscir.models.phi import PhiConfig
    from zscir.train.engine import TrainConfig
    from zscir.train.features import shapes_features
    from zscir.train.stage1 import Stage1Config, train_stage1

    model = folder / "model"
    stamp = folder / "clip.txt"
    if (model / "config.json").is_file() and stamp.is_file() and stamp.read_text() == str(tiny_clip):
        return model
    composer = Composer.from_clip(str(tiny_clip), phi=PhiConfig(num_tokens=2, vsi_layers=1, vsi_mode="add"))
    feats = shapes_features(composer, world.scenes(3000, stream="stage1-bench"), world.config.image_size)
    cfg = Stage1Config(phi=composer.phi.config, concept_weight=0.5,
                       train=TrainConfig(steps=120, batch_size=64, lr=1e-3, warmup_steps=10, log_every=10))
    composer, _ = train_stage1(composer, feats, cfg, concepts=world.concept_phrases(), progress=progress)
    composer.save_pretrained(model)
    stamp.write_text(str(tiny_clip))
    return model


def score_rankings(bench: Any, rankings: Sequence[Sequence[int]]) -> Dict[str, Any]:
    """R@1/R@10, per-kind R@10 and group means of given rankings on a ShapesBenchmark."""
    from zscir.eval.metrics import recall_at_ks

    overall = recall_at_ks(rankings, bench.positives, (1, 10))
    per_kind: Dict[str, float] = {}
    for kind in sorted(set(bench.kinds)):
        rows = [i for i, k in enumerate(bench.kinds) if k == kind]
        per_kind[kind] = recall_at_ks([rankings[i] for i in rows], [bench.positives[i] for i in rows], (10,))[10]
    frequent = set(frequent_kinds())
    return {
        "R@1": overall[1], "R@10": overall[10],
        "mean_R@10_over_kinds": float(np.mean(list(per_kind.values()))),
        "frequent_R@10": float(np.mean([v for k, v in per_kind.items() if k in frequent])),
        "rare_R@10": float(np.mean([v for k, v in per_kind.items() if k not in frequent])),
        "per_kind_R@10": per_kind,
    }


def evaluate(bench: Any, composer: Any, rerank: bool = False) -> Dict[str, Any]:
    """Score a composer on a benchmark, optionally with the kNN re-ranker over the top-RERANK_K."""
    from zscir.eval.shapes_eval import composer_encoder
    from zscir.search import exact_topk
    from zscir.search import rerank_search

    queries = bench.query_embeddings(composer_encoder(composer))
    if rerank:
        _, top = rerank_search(queries, bench.gallery, RERANK_K)
    else:
        _, top = exact_topk(queries, bench.gallery, RERANK_K)
    return score_rankings(bench, top.tolist())


def train_row(stage1: Path, triplets: Any, corpus: Any, components: Tuple[str, ...], options: Dict[str, Any],
              args: argparse.Namespace, seed: int, steps: Optional[int] = None) -> Dict[str, Any]:
    """Train Stage II from the Stage-I model (train_stage2's steps, keeping the task for diagnostics).

    Returns composer, task, CPU seconds per step (process time: robust to other
    jobs on a shared machine), wall seconds per step and the last logs.
    """
    from zscir.composer import Composer
    from zscir.models.adapters import AdapterConfig
    from zscir.train.engine import TrainConfig, Trainer
    from zscir.train.stage2 import Stage2Config, Stage2Task, prepare_stage2

    steps = steps or args.steps
    composer = Composer.from_pretrained(stage1)
    cfg = Stage2Config(adapters=AdapterConfig(kind="bottleneck", num_layers=args.layers, rank=32), components=components,
                       component_options=options, query_negative_fraction=1.0,
                       train=TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
                                         log_every=10, seed=seed))
    torch.manual_seed(seed)
    prepare_stage2(composer, cfg.adapters)
    task = Stage2Task(composer, triplets, cfg, corpus)
    trainer = Trainer(task, cfg.train, progress=args.progress, desc="stage II " + "+".join(components))
    cpu, wall = time.process_time(), time.perf_counter()
    result = trainer.train()
    cpu, wall = (time.process_time() - cpu) / steps, (time.perf_counter() - wall) / steps
    for p in composer.parameters():
        p.requires_grad_(False)
    composer.eval()
    return {"composer": composer, "task": task, "cpu_per_step": cpu, "wall_per_step": wall,
            "last_logs": result.history[-1]}


def diagnostics(task: Any) -> Dict[str, Any]:
    """What the weighting / attribute components learned, per modification kind of the training triplets."""
    from zscir.train.components import AttributeQueries, MeltRarity, attribute_weights_by_kind

    out: Dict[str, Any] = {}
    kinds = task.triplets.kinds
    frequent = set(frequent_kinds())
    for comp in task.components:
        if isinstance(comp, MeltRarity):
            w = comp.triplet_weights()
            by_kind = {k: float(w[[i for i, x in enumerate(kinds) if x == k]].mean()) for k in sorted(set(kinds))}
            out["melt_weight_by_kind"] = by_kind
            out["melt_weight_frequent"] = float(w[[i for i, k in enumerate(kinds) if k in frequent]].mean())
            out["melt_weight_rare"] = float(w[[i for i, k in enumerate(kinds) if k not in frequent]].mean())
        if isinstance(comp, AttributeQueries):
            single = [k for k in ("color", "shape", "size", "move", "add", "remove") if k in set(kinds)]
            table = attribute_weights_by_kind(task, kinds)
            out["dqe_attribute_weights_by_kind"] = {k: table[k] for k in single}
    return out


def bank_cost(sizes: Sequence[int] = (50_000,), dims: Sequence[int] = (128, 768), batch: int = 128,
              sampled: int = 4096, repeats: int = 3) -> List[Dict[str, Any]]:
    """Time and memory of the SPN bank term (forward + backward) next to the in-batch InfoNCE, random features."""
    from zscir.losses import bank_info_nce, info_nce_with_negatives

    rows = []
    g = torch.Generator().manual_seed(0)
    for m in sizes:
        for d in dims:
            bank = F.normalize(torch.randn(m, d, generator=g), dim=-1)
            t = F.normalize(torch.randn(batch, d, generator=g), dim=-1)
            ref = F.normalize(torch.randn(batch, d, generator=g), dim=-1)
            base_q = F.normalize(torch.randn(batch, d, generator=g), dim=-1)

            def timed(fn) -> float:
                best = float("inf")
                for _ in range(repeats):
                    q = base_q.clone().requires_grad_(True)
                    start = time.perf_counter()
                    fn(q).backward()
                    best = min(best, time.perf_counter() - start)
                return best

            in_batch = timed(lambda q: info_nce_with_negatives(q, t, 20.0))
            full = timed(lambda q: bank_info_nce(q, t, ref, bank, 20.0, 0.98))
            sub = bank[:sampled]
            part = timed(lambda q: bank_info_nce(q, t, ref, sub, 20.0, 0.98))
            # logits [B, M+1] float32: forward values, softmax, gradient, plus two bool masks
            logits_mb = batch * (m + 1) * 4 * 3 / 2**20 + batch * m * 2 / 2**20
            rows.append({"bank": m, "dim": d, "batch": batch, "bank_MiB": m * d * 4 / 2**20,
                         "step_logits_MiB": logits_mb, "in_batch_ms": in_batch * 1e3, "full_bank_ms": full * 1e3,
                         f"sampled_{sampled}_ms": part * 1e3})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".bench/components.json", help="JSON output path")
    parser.add_argument("--stage1", type=Path, default=None, help="Stage-I model folder (default: train a small one)")
    parser.add_argument("--work", type=Path, default=Path(".bench/components-work"), help="folder for the Stage-I model")
    parser.add_argument("--triplets", type=int, default=2000, help="training triplets")
    parser.add_argument("--steps", type=int, default=120, help="Stage-II steps per row")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--layers", type=int, default=4, help="text blocks with bottleneck adapters (rank 32)")
    parser.add_argument("--queries", type=int, default=1000, help="test queries (validation: half)")
    parser.add_argument("--corpus", type=int, default=3000, help="extra scenes in the corpus (bank / mid-zone candidates)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per row (results averaged)")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the single-component rows")
    parser.add_argument("--combo", default=None, help="fixed best-combination components (skips the validation choice)")
    parser.add_argument("--no-bank-cost", action="store_true", help="skip the 50k-bank cost table")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args(argv)

    from zscir.shapes import LONG_TAIL_WEIGHTS, ShapesWorld, ShapesWorldConfig
    from zscir.eval.shapes_eval import ShapesBenchmark
    from zscir.models.backbone import load_backbone
    from zscir.composer import Composer
    from zscir.train.bank import build_bank, triplet_bank_parts
    from zscir.train.clip_pretrain import pretrained_tiny_clip
    from zscir.train.features import shapes_features, shapes_triplet_features

    t0 = time.perf_counter()
    world = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64))
    tiny, _ = pretrained_tiny_clip("fast", progress=args.progress)
    stage1 = args.stage1 or stage1_model(tiny, world, args.work / "stage1", args.progress)
    backbone = load_backbone(str(tiny))
    test = ShapesBenchmark(backbone, world, n_queries=args.queries, family="eval", stream="eval")
    val = ShapesBenchmark(backbone, world, n_queries=args.queries // 2, family="eval", stream="components-val")
    base = Composer.from_pretrained(stage1)
    edits = world.make_triplets(args.triplets, family="train", kind_weights=LONG_TAIL_WEIGHTS, stream="components-train")
    triplets = shapes_triplet_features(base, edits, world.config.image_size)
    extra = shapes_features(base, world.scenes(args.corpus, stream="components-corpus"), world.config.image_size)
    corpus = build_bank([(torch.as_tensor(extra.pooled), [f"c{i}" for i in range(args.corpus)])]
                        + triplet_bank_parts(triplets), 0.98)
    counts = {k: sum(e.kind == k for e in edits) for k in sorted({e.kind for e in edits})}
    stage1_scores = evaluate(test, base)
    print(f"Stage I only: R@10 {stage1_scores['R@10']:.1f}, mean/kinds {stage1_scores['mean_R@10_over_kinds']:.1f}")
    print(f"setup {time.perf_counter() - t0:.0f}s: {len(triplets)} triplets, corpus/bank {len(corpus.ids)} images, "
          f"test {len(test)} / val {len(val)} queries; training kinds {counts}", flush=True)

    wanted = list(SINGLE_ROWS) if args.rows is None else [r for r in args.rows.split(",") if r]
    unknown = [r for r in wanted if r not in SINGLE_ROWS]
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; choose from {list(SINGLE_ROWS)}")

    rows: List[Dict[str, Any]] = []
    models: Dict[str, List[Any]] = {}

    def run_row(name: str, comps: Tuple[str, ...], options: Dict[str, Any]) -> Dict[str, Any]:
        tests, vals, runs = [], [], []
        models[name] = []
        for seed in range(args.seeds):
            run = train_row(stage1, triplets, corpus, PLAIN + comps, options, args, seed)
            models[name].append(run["composer"])
            tests.append(evaluate(test, run["composer"]))
            vals.append(evaluate(val, run["composer"]))
            runs.append(run)
        row = {"row": name, "components": list(PLAIN + comps), "options": options, **average(tests),
               "val_mean_R@10_over_kinds": float(np.mean([v["mean_R@10_over_kinds"] for v in vals])),
               "sec_per_step": float(np.mean([r["cpu_per_step"] for r in runs])),
               "wall_sec_per_step": float(np.mean([r["wall_per_step"] for r in runs])),
               "last_logs": runs[-1]["last_logs"], "diagnostics": diagnostics(runs[-1]["task"])}
        rows.append(row)
        print(f"  {name:<28} R@10 {row['R@10']:5.1f}  mean/kinds {row['mean_R@10_over_kinds']:5.1f}  "
              f"rare {row['rare_R@10']:5.1f}  val {row['val_mean_R@10_over_kinds']:5.1f}  "
              f"{row['sec_per_step']:.3f} CPU-s/step ({time.perf_counter() - t0:.0f}s)", flush=True)
        return row

    train_row(stage1, triplets, corpus, PLAIN, {}, args, 0, steps=3)  # warm caches so the first timed row is fair
    plain = run_row("plain Stage II", (), {})
    singles = {name: run_row(f"+ {name}", *SINGLE_ROWS[name]) for name in wanted}

    def combination(names: Sequence[str]) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
        comps: Tuple[str, ...] = ()
        opts: Dict[str, Any] = {}
        for n in names:
            c, o = SINGLE_ROWS.get(n, ((n,), {}))
            comps += c
            opts.update(o)
        return comps, opts

    def label(names: Sequence[str]) -> str:
        return "best combination: " + (" + ".join(names) if names else "(none beat plain on validation)")

    if args.combo is not None:
        candidates = [[c for c in args.combo.split(",") if c]]
    else:
        # validation gains over plain; at most one of the two weighting schemes (the better)
        gain = {n: r["val_mean_R@10_over_kinds"] - plain["val_mean_R@10_over_kinds"] for n, r in singles.items()}
        weighting = sorted((n for n in gain if n in WEIGHTINGS), key=lambda n: -gain[n])[1:]
        positive = [n for n in singles if gain[n] > 0 and n not in weighting]
        strong = [n for n in positive if gain[n] >= VAL_NOISE]
        candidates = [positive] + ([strong] if strong != positive else [])
    trained: List[Dict[str, Any]] = []
    new_rows: List[int] = []  # ids of combination rows trained here (not copies of single rows)
    for names in candidates:
        if len(names) == 1 and f"+ {names[0]}" in models:  # a single component: its row already exists
            row = dict(next(r for r in rows if r["row"] == f"+ {names[0]}"), row=label(names))
            models[row["row"]] = models[f"+ {names[0]}"]
        elif not names:
            row = dict(plain, row=label(names))
            models[row["row"]] = models["plain Stage II"]
        else:
            row = run_row(label(names), *combination(names))
            rows.remove(row)
            new_rows.append(id(row))
        trained.append(row)
    best = max(trained, key=lambda r: r["val_mean_R@10_over_kinds"])
    best["selected_on_validation_from"] = [r["row"] for r in trained]
    for r in trained:
        if r is not best and id(r) in new_rows:
            r["row"] = r["row"].replace("best combination:", "combination (not selected on validation):")
            rows.append(r)
    rows.append(best)
    for name, source in (("plain + kNN re-ranker", "plain Stage II"), (best["row"] + " + kNN re-ranker", best["row"])):
        results = [evaluate(test, m, rerank=True) for m in models[source]]
        rows.append({"row": name, "components": next(r["components"] for r in rows if r["row"] == source),
                     **average(results), "rerank": {"k": RERANK_K, "config": "RerankConfig() defaults"},
                     "sec_per_step": next(r["sec_per_step"] for r in rows if r["row"] == source)})
    for r in rows:
        r["cost_ratio"] = r["sec_per_step"] / plain["sec_per_step"]

    rare = [k for k in plain["per_kind_R@10"] if k not in frequent_kinds()]
    melt = singles.get("melt_rarity")
    checks = {
        "best_beats_plain_on_mean_R@10_over_kinds": best["mean_R@10_over_kinds"] > plain["mean_R@10_over_kinds"],
        "best_minus_plain_mean_R@10_over_kinds": best["mean_R@10_over_kinds"] - plain["mean_R@10_over_kinds"],
    }
    if melt is not None:
        diag = melt["diagnostics"]
        checks["melt_weight_rare_over_frequent"] = diag["melt_weight_rare"] / diag["melt_weight_frequent"]
        checks["melt_rarity_raises_rare_R@10"] = melt["rare_R@10"] > plain["rare_R@10"]
        checks["melt_rarity_minus_plain_rare_R@10"] = melt["rare_R@10"] - plain["rare_R@10"]
        checks["melt_rarity_minus_plain_per_rare_kind"] = {
            k: melt["per_kind_R@10"][k] - plain["per_kind_R@10"][k] for k in rare}

    bank_rows = [] if args.no_bank_cost else bank_cost()
    print_table(rows, bank_rows, checks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "components", "python": sys.version.split()[0], "machine": platform.machine(),
        "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "training_kind_counts": counts, "frequent_kinds": frequent_kinds(), "rows": rows, "checks": checks,
        "stage1_only": stage1_scores, "bank_cost": bank_rows, "total_seconds": time.perf_counter() - t0,
    }
    from zscir.checkpoint import atomic_write_json

    atomic_write_json(out, payload)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")
    return 0


def average(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean of score dicts over seeds (per-kind dicts averaged per kind)."""
    out: Dict[str, Any] = {}
    for key in results[0]:
        if isinstance(results[0][key], dict):
            out[key] = {k: float(np.mean([r[key][k] for r in results])) for k in results[0][key]}
        else:
            out[key] = float(np.mean([r[key] for r in results]))
    return out


def print_table(rows: Sequence[Dict[str, Any]], bank_rows: Sequence[Dict[str, Any]], checks: Dict[str, Any]) -> None:
    """The results table, the per-kind table, the bank cost table and the checks."""
    width = max(len(r["row"]) for r in rows)
    print(f"\n{'row':<{width}}  {'R@1':>5}  {'R@10':>5}  {'mean/kinds':>10}  {'frequent':>8}  {'rare':>5}  {'cost':>5}")
    for r in rows:
        print(f"{r['row']:<{width}}  {r['R@1']:5.1f}  {r['R@10']:5.1f}  {r['mean_R@10_over_kinds']:10.1f}  "
              f"{r['frequent_R@10']:8.1f}  {r['rare_R@10']:5.1f}  {r['cost_ratio']:5.2f}x")
    kinds = list(rows[0]["per_kind_R@10"])
    print("\nR@10 per modification kind (columns: rows in the order above)")
    print(f"{'kind':<14}" + "".join(f"{i:>6}" for i in range(len(rows))))
    for k in kinds:
        print(f"{k:<14}" + "".join(f"{r['per_kind_R@10'][k]:6.1f}" for r in rows))
    if bank_rows:
        print("\nSPN bank term, batch 128 (forward + backward, best of 3)")
        for b in bank_rows:
            sampled = next(k for k in b if k.startswith("sampled_"))
            print(f"  bank {b['bank']:,} x {b['dim']}-d: bank {b['bank_MiB']:.0f} MiB, logits {b['step_logits_MiB']:.0f} MiB/step; "
                  f"in-batch {b['in_batch_ms']:.1f} ms, full bank {b['full_bank_ms']:.1f} ms, "
                  f"{sampled.replace('_ms', '')} {b[sampled]:.1f} ms")
    print("\nchecks:", json.dumps(checks, indent=1))
    for r in rows:
        if r.get("diagnostics"):
            print(f"diagnostics of {r['row']}:", json.dumps(r["diagnostics"], indent=None))


if __name__ == "__main__":
    raise SystemExit(main())
