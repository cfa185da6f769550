"""Cost curves of a growing gallery: build time, query latency, memory and recall for exact, IVF and IVF-PQ + re-rank.

At each gallery size (default 10k, 100k, 1M vectors of dim 512) the benchmark
writes a synthetic gallery into an :class:`~zscir.search.EmbeddingIndex`
(float16 store, the same code path as ``zscir index``) and measures, for

* ``exact``: chunked exact top-k over the memory-mapped float16 store;
* ``ivf``: FAISS IVF-Flat (nlist = ``--nlist-per-sqrt`` x sqrt(n), nprobe ``--ivf-nprobe``);
* ``ivfpq ... +rerank``: FAISS IVF-PQ variants (``--pq``; default 32 8-bit codes with the
  inverted lists memory-mapped from disk, and 64 4-bit fast-scan codes in memory:
  40 bytes per vector each), the top ``--rerank-factor`` x k candidates
  re-ranked exactly from the float16 store,

the build time (writing the store for ``exact``), the latency of single queries
(p50 / p95 over ``--latency-queries`` queries, one ``search_arrays`` call each),
recall@k against the exact top-k (over ``--queries`` queries), memory per vector
and the peak resident memory the phase added. One row measures encoding
throughput (images/s of ``zscir index`` with the tiny CLIP architecture, 1 and 2
processes under torchrun), where the gallery size does not matter.

The synthetic gallery is a Gaussian mixture on the unit sphere (``--per-cluster``
points per cluster, per-dimension noise ``--noise``; the generator of
``bench_index.py``), not uniform noise: neighbours of a query are members of its
cluster with close scores, so recall means something. Queries are perturbed
gallery items. Writes JSON (after every size, so a stopped run keeps what it
measured) and a log-log PNG; growth exponents are least-squares slopes of
log(cost) against log(n).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --out .bench/scale.json --plot docs/scale.png
    python benchmarks/bench_scale.py --sizes 10000,100000 --encode-images 0     # quick, no encoding row

The CPU may be shared with other work: timings are wall-clock and noisy.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from bench_index import PeakRSS, make_gallery, make_queries, recall_at_k
from zscir.checkpoint import atomic_write_json
from zscir.search import EmbeddingIndex, exact_topk



def latency_ms(search: Callable[[torch.Tensor], Any], queries: torch.Tensor, count: int) -> Dict[str, float]:
    """p50 / p95 / mean milliseconds of single-query searches (after one warm-up)."""
    search(queries[:1])
    times = []
    for i in range(min(count, len(queries))):
        start = time.perf_counter()
        search(queries[i:i + 1])
        times.append(1000 * (time.perf_counter() - start))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "mean_ms": float(np.mean(times)), "latency_queries": len(times)}


def batch_qps(search: Callable[[torch.Tensor], Any], queries: torch.Tensor) -> float:
    """Queries per second when all queries go in one call (after a warm-up call)."""
    search(queries[:2])
    start = time.perf_counter()
    search(queries)
    return len(queries) / (time.perf_counter() - start)


def growth_exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) against log(x) (None with fewer than two positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_size(n: int, args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Every method at gallery size `n`; returns the rows and the data's description."""
    k = args.k
    t0 = time.perf_counter()
    gallery = make_gallery(n, args.dim, max(1, n // args.per_cluster), args.noise, args.seed)
    queries = make_queries(gallery, args.queries, args.query_noise, args.seed)
    gen_s = time.perf_counter() - t0
    truth = exact_topk(queries, gallery, k)[1].numpy()
    print(f"\nn={n:,}: gallery generated in {gen_s:.1f}s ({max(1, n // args.per_cluster)} clusters); "
          f"{args.queries} queries, top-{k}")
    folder = work / f"index-{n}"
    rows: List[Dict[str, Any]] = []

    # exact: build = writing the float16 store (what `zscir index` does after encoding)
    gc.collect()
    with PeakRSS() as mem:
        start = time.perf_counter()
        index = EmbeddingIndex.create(folder, args.dim, model_key="synthetic")
        for s in range(0, n, 65536):
            index.add(range(s, min(n, s + 65536)), gallery[s:s + 65536])
        build_s = time.perf_counter() - start
    index = EmbeddingIndex.open(folder)
    del gallery
    gc.collect()
    with PeakRSS() as search_mem:
        lat = latency_ms(lambda q: index.search_arrays(q, k), queries, args.exact_latency_queries)
        qps = batch_qps(lambda q: index.search_arrays(q, k), queries)
    rows.append({"method": "exact", "n": n, "build_s": build_s, **lat, "batch_qps": qps, "recall": 1.0,
                 "bytes_per_vector": 2.0 * args.dim, "store_bytes_per_vector": 2.0 * args.dim,
                 "build_peak_extra_mb": (mem.peak - mem.baseline) / 2**20,
                 "search_peak_extra_mb": (search_mem.peak - search_mem.baseline) / 2**20,
                 "setting": "float16 store, memory-mapped"})
    _report(rows[-1])

    nlist = max(16, int(round(args.nlist_per_sqrt * math.sqrt(n))))
    # IVF-Flat: float32 vectors in the lists
    with PeakRSS() as mem:
        start = time.perf_counter()
        backend = index.build_backend("ivf", nlist=nlist)
        build_s = time.perf_counter() - start
    _, found = index.search_arrays(queries, k, backend="ivf", nprobe=args.ivf_nprobe)
    ivf = lambda q: index.search_arrays(q, k, backend="ivf", nprobe=args.ivf_nprobe)  # noqa: E731
    lat, qps = latency_ms(ivf, queries, args.latency_queries), batch_qps(ivf, queries)
    info = index.meta["backends"]["ivf"]
    rows.append({"method": "ivf", "n": n, "build_s": build_s, **lat, "batch_qps": qps,
                 "recall": recall_at_k(found.numpy(), truth),
                 "bytes_per_vector": backend.bytes_per_vector(), "file_bytes_per_vector": info["file_bytes"] / n,
                 "build_peak_extra_mb": (mem.peak - mem.baseline) / 2**20,
                 "setting": f"nlist {nlist}, nprobe {args.ivf_nprobe}"})
    _report(rows[-1])
    del backend
    index = EmbeddingIndex.open(folder)  # drop the IVF structure from memory
    gc.collect()

    # IVF-PQ variants, candidates re-ranked exactly from the float16 store
    rerank = args.rerank_factor * k
    for label, spec in args.pq:
        params = {"nlist": nlist, **spec}
        with PeakRSS() as mem:
            start = time.perf_counter()
            backend = index.build_backend("ivfpq", **params)
            build_s = time.perf_counter() - start
        bpv = backend.bytes_per_vector()
        del backend
        index = EmbeddingIndex.open(folder)
        gc.collect()
        before = _rss_mb()
        _, found = index.search_arrays(queries, k, backend="ivfpq", nprobe=args.pq_nprobe, rerank=rerank)
        loaded_mb = _rss_mb() - before
        pq = lambda q: index.search_arrays(q, k, backend="ivfpq", nprobe=args.pq_nprobe, rerank=rerank)  # noqa: E731
        lat, qps = latency_ms(pq, queries, args.latency_queries), batch_qps(pq, queries)
        info = index.meta["backends"]["ivfpq"]
        rows.append({"method": label, "n": n, "build_s": build_s, **lat, "batch_qps": qps,
                     "recall": recall_at_k(found.numpy(), truth), "bytes_per_vector": bpv,
                     "file_bytes_per_vector": info["file_bytes"] / n, "rss_after_searches_mb": loaded_mb,
                     "build_peak_extra_mb": (mem.peak - mem.baseline) / 2**20, "params": info["params"],
                     "setting": f"nlist {nlist}, nprobe {args.pq_nprobe}, re-rank {rerank}"
                                + (", lists memory-mapped" if spec.get("mmap") else "")})
        _report(rows[-1])
        index = EmbeddingIndex.open(folder)
        gc.collect()
    for row in rows:
        row["speedup_p50"] = rows[0]["p50_ms"] / row["p50_ms"]
        row["speedup_batch"] = row["batch_qps"] / rows[0]["batch_qps"]
    shutil.rmtree(folder)
    return {"n": n, "clusters": max(1, n // args.per_cluster), "generate_s": gen_s, "rows": rows}


def _report(row: Dict[str, Any]) -> None:
    print(f"  {row['method']:<30} build {row['build_s']:7.1f}s  p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms"
          f"  batch {row['batch_qps']:8.1f} q/s  recall@50 {row['recall']:.4f}  {row['bytes_per_vector']:.0f} B/vector"
          f"  ({row['setting']})")


def encode_throughput(args: argparse.Namespace, work: Path) -> List[Dict[str, Any]]:
    """images/s of `zscir index` with the tiny CLIP architecture (random weights), 1 and 2 processes."""
    from PIL import Image

    from zscir.composer import Composer

    folder = work / "images"
    rng = np.random.default_rng(0)
    for i in range(args.encode_images):
        path = folder / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(path)
    torch.manual_seed(0)
    Composer.from_clip("zscir-tiny").save_pretrained(work / "model")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = []
    for processes in args.encode_processes:
        launch = [sys.executable, "-m", "zscir"] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "zscir"]
        index = work / f"encoded-{processes}"
        cmd = launch + ["index", str(folder), "--model", str(work / "model"), "--index", str(index), "--no-progress",
                        "--batch-size", "64"]
        timings = []
        for _ in range(2):  # the second run embeds nothing: start-up, listing, loading the model
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            timings.append(time.perf_counter() - start)
        encode_s = timings[0] - timings[1]
        row = {"method": "encode (zscir index, tiny CLIP)", "processes": processes, "images": args.encode_images,
               "wall_s": timings[0], "startup_s": timings[1], "encode_s": encode_s,
               "images_per_s": args.encode_images / encode_s}
        out.append(row)
        print(f"  encode, {processes} process(es): {row['images_per_s']:.0f} images/s "
              f"({args.encode_images} images in {encode_s:.1f}s after {timings[1]:.1f}s start-up)")
        shutil.rmtree(index)
    return out


def methods(sizes: List[Dict[str, Any]]) -> List[str]:
    """The methods measured, in order."""
    return list(dict.fromkeys(r["method"] for s in sizes for r in s["rows"]))


def exponents(sizes: List[Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Growth exponents of each method's costs against n."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for method in methods(sizes):
        rows = [r for s in sizes for r in s["rows"] if r["method"] == method]
        ns = [r["n"] for r in rows]
        out[method] = {name: growth_exponent(ns, [r.get(name) for r in rows])
                       for name in ("build_s", "p50_ms", "p95_ms", "batch_qps", "build_peak_extra_mb")}
    return out


def plot(results: Dict[str, Any], out: Path) -> None:
    """Log-log PNG: build time, p50 latency, and memory per vector against the gallery size."""
    from zscir.viz import save_loglog

    names = methods(results["sizes"])

    def series(key: str) -> Dict[str, List[tuple]]:
        return {m: [(r["n"], r.get(key)) for s in results["sizes"] for r in s["rows"] if r["method"] == m]
                for m in names}

    memory = {m: [(r["n"], r["n"] * r["bytes_per_vector"] / 2**20) for s in results["sizes"] for r in s["rows"]
                  if r["method"] == m] for m in names}
    save_loglog(out, {"build time (s)": series("build_s"), "single-query latency p50 (ms)": series("p50_ms"),
                      "batched queries per second": series("batch_qps"), "vectors in memory (MiB)": memory},
                xlabel="gallery size (vectors)",
                title=f"zscir gallery search cost, dim {results['config']['dim']}, top-{results['config']['k']}")


def _pq_variant(text: str) -> tuple:
    """("ivfpq <label>", params) from "m=32,mmap=1"."""
    params = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        params[key.strip()] = int(value)
    codes = f"PQ{params.get('m')}x{4 if params.get('fastscan') else params.get('nbits', 8)}"
    label = " ".join(["ivfpq", "OPQ" if params.get("opq") else "", codes + ("fs" if params.get("fastscan") else ""),
                      "mmap" if params.get("mmap") else "in RAM"]).replace("  ", " ")
    return label + " +rerank", params


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--queries", type=int, default=200, help="queries for recall@k against the exact top-k")
    p.add_argument("--latency-queries", type=int, default=100, help="single-query searches timed per method")
    p.add_argument("--exact-latency-queries", type=int, default=20,
                   help="single-query exact searches timed (each reads the whole store: ~1 s at 1M)")
    p.add_argument("--per-cluster", type=int, default=1000, help="gallery points per mixture component")
    p.add_argument("--noise", type=float, default=0.08)
    p.add_argument("--query-noise", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nlist-per-sqrt", type=float, default=1.0, help="IVF lists = this x sqrt(n)")
    p.add_argument("--ivf-nprobe", type=int, default=8)
    p.add_argument("--pq", action="append", metavar="KEY=VALUE,...",
                   help="an IVF-PQ variant's build parameters (repeatable; default: m=32,mmap=1 and m=64,fastscan=1), "
                        "e.g. m=48,opq=1,mmap=1")
    p.add_argument("--pq-nprobe", type=int, default=16)
    p.add_argument("--rerank-factor", type=int, default=20, help="candidates re-ranked exactly = this x k")
    p.add_argument("--encode-images", type=int, default=2000, help="images for the encoding row (0: skip it)")
    p.add_argument("--encode-processes", default="1,2")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=".bench/scale.json")
    p.add_argument("--plot", default=".bench/scale.png")
    args = p.parse_args(argv)
    args.encode_processes = [int(v) for v in args.encode_processes.split(",") if v]
    args.pq = [_pq_variant(v) for v in (args.pq or ["m=32,mmap=1", "m=64,fastscan=1"])]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zscir-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "workdir")},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "sizes": [], "encode": [],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.encode_images:
            print(f"encoding throughput ({args.encode_images} images of 96x96)")
            results["encode"] = encode_throughput(args, work)
            atomic_write_json(args.out, results)
        for n in (int(v) for v in args.sizes.split(",") if v):
            results["sizes"].append(run_size(n, args, work))
            results["growth_exponents"] = exponents(results["sizes"])
            results["machine"]["load_average_at_end"] = os.getloadavg()
            atomic_write_json(args.out, results)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\ngrowth exponents (slope of log cost against log n):")
    for method, exps in results.get("growth_exponents", {}).items():
        print(f"  {method:<14} " + "  ".join(f"{k} {v:.2f}" for k, v in exps.items() if v is not None))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
