"""Load test of `zscir serve`: a bounded number of requests at fixed concurrency against a local server.

The server is the real command (``python -m zscir serve``) in a subprocess, on a free 127.0.0.1 port, over an
index of ``--n`` rows: a small real shapes-world gallery (whose images are served) plus synthetic random unit
vectors, so every query scans the whole index. Client threads (``http.client``, one keep-alive connection each)
send a mix of requests, each drawn at random with a fixed seed:

* ``search``  POST /api/search with a gallery reference and an example's modification text, k 10;
* ``upload``  POST /api/search with an uploaded reference (a base64 PNG from the gallery);
* ``image``   GET /api/images/{id} of a gallery image.

Reported: throughput, latency p50 / p95 / p99 per kind and overall, the server's own encode+search time (of the
batch each query ran in: queries waiting while the model is busy are encoded and searched together), and the
error count (any status other than 200, or a failed connection; it must be 0). Requests only go to 127.0.0.1.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --model zscir-demo/model      # 100k rows, 2,000 x 16
    python benchmarks/bench_serve.py --n 20000 --requests 500 --out .bench/serve-small.json

Without ``--model`` the cached 'fast' tiny CLIP with an untrained phi encodes the queries (same cost as a trained
model of that size; the rankings mean nothing). The CPU may be shared with other work: timings are wall-clock.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from zscir.checkpoint import atomic_write_json
from zscir.composer import Composer
from zscir.search import IMAGE_ROOT_FILE, INDEX_META, EmbeddingIndex
from zscir.serve import index_folder, load_examples, shapes_gallery

HOST = "127.0.0.1"
KINDS = {"search": 0.75, "upload": 0.05, "image": 0.20}


def build_index(composer: Composer, gallery: Path, n: int, folder: Path, seed: int) -> EmbeddingIndex:
    """The real gallery's embeddings plus synthetic random unit rows up to `n` rows in all (reused when built before)."""
    real = index_folder(composer, gallery, index_dir=folder / "real", cache_dir=folder / "cache", progress=False)
    if (folder / "index" / INDEX_META).is_file():
        built = EmbeddingIndex.open(folder / "index")
        if len(built) == n and built.model_key == real.model_key and built.ids[:len(real)] == real.ids:
            return built
        shutil.rmtree(folder / "index")
    index = EmbeddingIndex.create(folder / "index", real.dim, real.model_key)
    index.add(real.ids, np.asarray(real.embeddings, dtype=np.float32))
    rng = np.random.default_rng(seed)
    for start in range(len(real), n, 50_000):
        m = min(50_000, n - start)
        rows = rng.standard_normal((m, real.dim)).astype(np.float32)
        index.add([f"synthetic/{i:07d}.png" for i in range(start, start + m)], rows)
    (folder / "index" / IMAGE_ROOT_FILE).write_text(str(gallery.resolve()) + "\n")
    return index


def free_port() -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_server(model: str, index: Path, port: int, log: Path) -> subprocess.Popen:
    """`python -m zscir serve` on 127.0.0.1:port; returns once /api/health answers."""
    cmd = [sys.executable, "-m", "zscir", "serve", "--model", model, "--index", str(index), "--host", HOST,
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer within 300 s; see {log}")


def make_requests(count: int, gallery: Path, seed: int) -> List[Tuple[str, str, str, bytes]]:
    """(kind, method, path, body) for `count` requests, drawn with a fixed seed."""
    rng = random.Random(seed)
    examples = load_examples(gallery)
    uploads = [base64.b64encode((gallery / e.reference_id).read_bytes()).decode() for e in examples[:20]]
    kinds, weights = zip(*KINDS.items())
    out = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        ex = rng.choice(examples)
        if kind == "image":
            out.append((kind, "GET", "/api/images/" + str(rng.choice(ex.targets or (ex.reference_id,))), b""))
            continue
        body: Dict[str, Any] = {"text": ex.text, "k": 10}
        if kind == "upload":
            body["reference_image"] = rng.choice(uploads)
        else:
            body["reference_id"] = ex.reference_id
        out.append((kind, "POST", "/api/search", json.dumps(body).encode()))
    return out


def run_load(port: int, requests: List[Tuple[str, str, str, bytes]], concurrency: int) -> Dict[str, Any]:
    """Send the requests from `concurrency` threads (a shared queue); latencies per kind, server times, errors."""
    lock = threading.Lock()
    queue = list(reversed(requests))
    latencies: Dict[str, List[float]] = {k: [] for k in KINDS}
    server_ms: List[float] = []
    batches: List[int] = []
    errors: List[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        while True:
            with lock:
                if not queue:
                    break
                kind, method, path, body = queue.pop()
            start = time.perf_counter()
            try:
                headers = {"Content-Type": "application/json"} if body else {}
                conn.request(method, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                elapsed = time.perf_counter() - start
                if resp.status != 200:
                    with lock:
                        errors.append(f"{kind} {resp.status}: {data[:200]!r}")
                    continue
                with lock:
                    latencies[kind].append(elapsed)
                    if kind != "image":
                        answer = json.loads(data)
                        server_ms.append(answer["took_ms"])
                        batches.append(answer["batch"])
            except (OSError, http.client.HTTPException) as err:
                with lock:
                    errors.append(f"{kind}: {type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies": latencies, "server_ms": server_ms, "batches": batches, "errors": errors}


def percentiles(values: List[float]) -> Dict[str, float]:
    """p50 / p95 / p99 / max in milliseconds."""
    if not values:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ms = np.asarray(values) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def main() -> None:
    """Build the index, start the server, send the load, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the cached fast tiny CLIP, untrained phi)")
    ap.add_argument("--n", type=int, default=100_000, help="index rows (real gallery + synthetic)")
    ap.add_argument("--gallery-queries", type=int, default=100, help="shapes queries of the real gallery (~5 images each)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the gallery and index (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=Path(".bench/serve.json"))
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="zscir-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from zscir.train.clip_pretrain import pretrained_tiny_clip

        clip_dir, _ = pretrained_tiny_clip("fast", progress=False)
        model = str(work / "model")
        Composer.from_clip(str(clip_dir)).save_pretrained(model)
    composer = Composer.from_pretrained(model)
    gallery = shapes_gallery(args.gallery_queries, folder=work / "shapes", progress=False)
    t = time.perf_counter()
    index = build_index(composer, gallery, args.n, work, args.seed)
    print(f"index: {len(index):,} rows x {index.dim} ({len(load_examples(gallery))} queries' real gallery) "
          f"in {time.perf_counter() - t:.1f}s")
    del composer

    port = free_port()
    load_before = os.getloadavg()
    proc = start_server(model, work / "index", port, work / "server.log")
    try:
        requests = make_requests(args.warmup + args.requests, gallery, args.seed)
        warm = run_load(port, requests[: args.warmup], min(args.concurrency, 4))
        result = run_load(port, requests[args.warmup:], args.concurrency)
        health = json.loads(_get(port, "/api/health"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    load_after = os.getloadavg()

    done = sum(len(v) for v in result["latencies"].values())
    rows = {kind: {"requests": len(v), **percentiles(v)} for kind, v in result["latencies"].items()}
    rows["all"] = {"requests": done, **percentiles([x for v in result["latencies"].values() for x in v])}
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": health["model"], "index": health["index"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "loadavg_before": load_before,
                    "loadavg_after": load_after},
        "wall_s": result["wall_s"], "throughput_rps": done / result["wall_s"],
        "errors": len(result["errors"]) + len(warm["errors"]), "error_samples": (warm["errors"] + result["errors"])[:10],
        "latency": rows, "server_took_ms": percentiles([x / 1000.0 for x in result["server_ms"]]),
        "batch": {"mean": float(np.mean(result["batches"])), "max": int(max(result["batches"]))},
    }
    print(f"\n{args.requests:,} requests, {args.concurrency} concurrent, index {len(index):,} x {index.dim} "
          f"({health['model']['stage']} {health['model']['backbone']}), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"throughput {report['throughput_rps']:.1f} requests/s over {result['wall_s']:.1f}s; errors {report['errors']}")
    print(f"{'kind':<8} {'requests':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, r in rows.items():
        print(f"{kind:<8} {r['requests']:>9} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['max_ms']:>8.1f}")
    s = report["server_took_ms"]
    print(f"server encode+search of a query's batch: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
          f"p99 {s['p99_ms']:.1f} ms; queries per batch: mean {report['batch']['mean']:.1f}, max {report['batch']['max']}")
    if report["errors"]:
        print("ERRORS:", *report["error_samples"], sep="\n  ")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    if report["errors"]:
        sys.exit(1)


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


if __name__ == "__main__":
    main()
