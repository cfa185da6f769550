"""Gallery search benchmark: exact chunked top-k vs FAISS IVF / HNSW on a clustered float16 gallery.

The gallery is synthetic but clustered like real embeddings: ``--clusters`` Gaussian
centres on the unit sphere plus per-dimension noise, L2-normalised, float16.
Queries are perturbed gallery items. For the exact search we report throughput
(queries/s) and peak memory: the process's peak resident memory during the search
minus what it held before, plus the gallery's own bytes, as a multiple of the
gallery's bytes (target < 2x). For FAISS we report build time, throughput,
speed-up over exact and recall@k against the exact top-k.

    OMP_NUM_THREADS=2 python benchmarks/bench_index.py              # 1M x 512, 1000 queries, top-50
    python benchmarks/bench_index.py --n 100000 --out .bench/index-100k.json

The CPU may be shared with other work: timings are wall-clock and noisy.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from zscir.checkpoint import atomic_write_json
from zscir.search import HNSWBackend, IVFBackend, exact_topk


def make_gallery(n: int, dim: int, clusters: int, noise: float, seed: int, chunk: int = 65536) -> np.ndarray:
    """A clustered, L2-normalised float16 gallery [n, dim], generated chunk by chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_queries(gallery: np.ndarray, count: int, noise: float, seed: int) -> torch.Tensor:
    """Perturbed copies of random gallery items, L2-normalised float32 [count, dim]."""
    rng = np.random.default_rng(seed + 1)
    base = gallery[rng.choice(len(gallery), size=count, replace=False)].astype(np.float32)
    q = base + noise * rng.standard_normal(base.shape).astype(np.float32)
    return torch.from_numpy(q / np.linalg.norm(q, axis=1, keepdims=True))


class PeakRSS:
    """Peak resident memory (bytes) of this process over a block: kernel VmHWM reset, or polling as a fallback."""

    def __enter__(self) -> "PeakRSS":
        self.baseline = _rss()
        self._use_hwm = _reset_hwm()
        self._stop = threading.Event()
        self.peak = self.baseline
        if not self._use_hwm:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self._use_hwm:
            self.peak = max(self.baseline, _status_kb("VmHWM") * 1024)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss() -> int:
    return _status_kb("VmRSS") * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak-RSS counter (Linux >= 4.0)
        return _status_kb("VmHWM") * 1024 <= _rss() * 1.05 + (1 << 20)
    except OSError:
        return False


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k that the approximate top-k recovers."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def _timed_search(backend: Any, queries: np.ndarray, k: int, **params: Any) -> Dict[str, Any]:
    backend.search(queries[:10], k, **params)  # warm-up
    t0 = time.perf_counter()
    _, rows = backend.search(queries, k, **params)
    return {"seconds": time.perf_counter() - t0, "rows": rows}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark; returns the results dict."""
    t0 = time.perf_counter()
    gallery = make_gallery(args.n, args.dim, args.clusters, args.noise, args.seed)
    queries = make_queries(gallery, args.queries, args.query_noise, args.seed)
    gen_s = time.perf_counter() - t0
    gallery_bytes = gallery.nbytes
    print(f"gallery {args.n} x {args.dim} float16 ({gallery_bytes / 2**20:.0f} MiB) generated in {gen_s:.1f}s; "
          f"{args.queries} queries, top-{args.k}; torch threads {torch.get_num_threads()}")

    gc.collect()
    exact_topk(queries[:4], gallery[: min(len(gallery), 65536)], args.k)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        exact_scores, exact_rows = exact_topk(queries, gallery, args.k, chunk_size=args.chunk_size)
        exact_s = time.perf_counter() - t0
    extra = mem.peak - mem.baseline
    truth = exact_rows.numpy()
    results: Dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform()},
        "gallery_bytes": gallery_bytes,
        "exact": {
            "seconds": exact_s,
            "queries_per_s": args.queries / exact_s,
            "peak_extra_bytes": extra,
            "peak_over_gallery": (gallery_bytes + extra) / gallery_bytes,
        },
        "faiss": [],
    }
    rows_out: List[Dict[str, Any]] = [
        {"method": "exact (torch, chunked)", "setting": f"chunk={args.chunk_size}", "build_s": 0.0,
         "qps": args.queries / exact_s, "speedup": 1.0, "recall": 1.0}
    ]
    print(f"exact: {exact_s:.2f}s, {args.queries / exact_s:.1f} q/s, peak extra memory {extra / 2**20:.0f} MiB "
          f"-> {(gallery_bytes + extra) / gallery_bytes:.2f}x the gallery")

    q_np = queries.numpy()
    backends = [b for b in args.backends.split(",") if b]
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("faiss is not installed (pip install zscir[faiss]); skipping IVF/HNSW")
        backends = []
    for name in backends:
        if name == "ivf":
            backend = IVFBackend(args.dim, **({"nlist": args.nlist} if args.nlist else {}))
            sweep = [("nprobe", int(v)) for v in args.nprobe.split(",")]
        elif name == "hnsw":
            backend = HNSWBackend(args.dim, M=args.hnsw_m, ef_construction=args.ef_construction)
            sweep = [("efSearch", int(v)) for v in args.ef_search.split(",")]
        else:
            raise SystemExit(f"unknown backend {name!r} (ivf, hnsw)")
        t0 = time.perf_counter()
        backend.build(gallery)
        build_s = time.perf_counter() - t0
        print(f"{name}: built in {build_s:.1f}s ({backend.params})")
        for key, value in sweep:
            timing = _timed_search(backend, q_np, args.k, **{key: value})
            rec = recall_at_k(timing["rows"], truth)
            entry = {"backend": name, "params": dict(backend.params), key: value, "build_s": build_s,
                     "seconds": timing["seconds"], "queries_per_s": args.queries / timing["seconds"],
                     "speedup": exact_s / timing["seconds"], f"recall@{args.k}": rec}
            results["faiss"].append(entry)
            rows_out.append({"method": name, "setting": f"{key}={value}", "build_s": build_s,
                             "qps": entry["queries_per_s"], "speedup": entry["speedup"], "recall": rec})
            print(f"  {key}={value}: {entry['queries_per_s']:.0f} q/s, {entry['speedup']:.1f}x, recall@{args.k} {rec:.4f}")
        del backend
        gc.collect()

    good = [r for r in results["faiss"] if r[f"recall@{args.k}"] >= 0.95]
    results["best_faiss_at_recall_0.95"] = max(good, key=lambda r: r["speedup"]) if good else None
    print()
    print(f"{'method':<24}{'setting':<16}{'build s':>9}{'queries/s':>12}{'speed-up':>10}{f'recall@{args.k}':>11}")
    for r in rows_out:
        print(f"{r['method']:<24}{r['setting']:<16}{r['build_s']:>9.1f}{r['qps']:>12.1f}{r['speedup']:>9.1f}x{r['recall']:>11.4f}")
    print(f"\nexact peak memory: gallery {gallery_bytes / 2**20:.0f} MiB + {extra / 2**20:.0f} MiB during search "
          f"= {results['exact']['peak_over_gallery']:.2f}x the gallery (target < 2x)")
    best = results["best_faiss_at_recall_0.95"]
    if best:
        setting = {k: v for k, v in best.items() if k in ("nprobe", "efSearch")}
        print(f"fastest FAISS setting with recall@{args.k} >= 0.95: {best['backend']} {setting} "
              f"-> {best['speedup']:.1f}x faster than exact (goal >= 10x)")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.08, help="per-dimension noise around a cluster centre")
    p.add_argument("--query-noise", type=float, default=0.02, help="per-dimension noise of queries around gallery items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=65536, help="exact search gallery chunk")
    p.add_argument("--backends", default="ivf,hnsw", help="comma-separated: ivf, hnsw ('' for exact only)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0: the library default ~4 sqrt(n))")
    p.add_argument("--nprobe", default="4,8,16,32,64")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", default="32,64,128,256")
    p.add_argument("--out", default=".bench/index.json")
    args = p.parse_args(argv)
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
