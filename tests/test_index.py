"""exact_topk, the on-disk EmbeddingIndex, FAISS backends and the index/search CLI functions."""
from __future__ import annotations

import argparse
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from zscir.cli.index import index_add_arguments, index_run, search_add_arguments, search_run
from zscir.search import BACKENDS, EmbeddingIndex, EmbeddingIndexError, exact_topk


def _reference_ranking(scores: torch.Tensor, k: int, banned=()):
    """Full sort by (score desc, index asc): the documented tie rule, computed the slow way."""
    order = sorted((j for j in range(len(scores)) if j not in set(banned)), key=lambda j: (-float(scores[j]), j))
    return order[:k]


# ------------------------------------------------------------------------- exact_topk
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5, 40, 500])
def test_exact_topk_matches_full_sort_with_many_ties(chunk_size, k):
    gen = torch.Generator().manual_seed(k * 1000 + chunk_size)
    gallery = torch.randint(-2, 3, (300, 6), generator=gen).float()  # few distinct scores -> many ties
    queries = torch.randint(-2, 3, (9, 6), generator=gen).float()
    values, indices = exact_topk(queries, gallery, k, chunk_size=chunk_size)
    kk = min(k, 300)
    assert values.shape == (9, kk) and indices.dtype == torch.int64 and values.dtype == torch.float32
    full = queries @ gallery.T
    for q in range(9):
        expected = _reference_ranking(full[q], kk)
        assert indices[q].tolist() == expected
        assert torch.equal(values[q], full[q, expected])


def test_exact_topk_float16_numpy_gallery_is_upcast_per_chunk():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((1000, 32)).astype(np.float16)
    queries = torch.from_numpy(rng.standard_normal((4, 32)).astype(np.float32))
    requested = []

    class Recording:
        """Array-like that records which rows are read."""

        shape, ndim = gallery.shape, 2

        def __getitem__(self, item):
            requested.append((item.start, item.stop))
            return gallery[item]

    values, indices = exact_topk(queries, Recording(), 10, chunk_size=128)
    assert max(stop - start for start, stop in requested) <= 128 and len(requested) == 8
    ref = queries @ torch.from_numpy(gallery.astype(np.float32)).T
    ref_v, ref_i = ref.topk(10, dim=1)
    assert torch.equal(indices, ref_i)
    assert torch.allclose(values, ref_v)


def test_exact_topk_exclude_and_padding():
    gallery = torch.eye(5)
    queries = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6], [1.0, 0.9, 0.8, 0.7, 0.6]])
    values, indices = exact_topk(queries, gallery, 4, chunk_size=2, exclude=[[0, 2], [0, 1, 2, 3]])
    assert indices[0].tolist() == [1, 3, 4, -1]
    assert indices[1].tolist() == [4, -1, -1, -1]
    assert torch.isneginf(values[1, 1:]).all() and values[1, 0] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="exclude has 1 entries"):
        exact_topk(queries, gallery, 2, exclude=[[0]])
    with pytest.raises(IndexError, match=r"exclude\[1\].*index 9"):
        exact_topk(queries, gallery, 2, exclude=[[], [9]])


def test_exact_topk_bad_input():
    g = torch.randn(10, 4)
    q = torch.randn(2, 4)
    assert exact_topk(q, g, 50)[1].shape == (2, 10)  # k clipped to the gallery
    with pytest.raises(ValueError, match="k must be positive"):
        exact_topk(q, g, 0)
    q_nan = q.clone()
    q_nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="query 1"):
        exact_topk(q_nan, g, 3)
    g_inf = g.clone()
    g_inf[7, 0] = float("inf")
    with pytest.raises(ValueError, match="row 7"):
        exact_topk(q, g_inf, 3, chunk_size=4)
    with pytest.raises(ValueError, match="dimension 4 but the gallery has 5"):
        exact_topk(q, torch.randn(10, 5), 3)
    with pytest.raises(ValueError, match="empty"):
        exact_topk(q, torch.randn(0, 4), 3)


# --------------------------------------------------------------------- EmbeddingIndex
def _clustered(n: int, dim: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_create_add_open_search_round_trip(tmp_path):
    emb = _clustered(50, 16)
    index = EmbeddingIndex.create(tmp_path / "idx", dim=16, model_key="model-a")
    index.add([f"img{i}" for i in range(30)], emb[:30] * 3.0)  # cosine metric: stored normalised
    index.add(list(range(30, 50)), torch.from_numpy(emb[30:]))  # ids may be ints
    reopened = EmbeddingIndex.open(tmp_path / "idx", model_key="model-a")
    assert len(reopened) == 50 and reopened.ids[:2] == ["img0", "img1"] and reopened.ids[30] == 30
    assert reopened.embeddings.dtype == np.float16 and reopened.embeddings.shape == (50, 16)
    np.testing.assert_allclose(reopened.embeddings[:].astype(np.float32), emb, atol=2e-3)

    queries = emb[[3, 40]] + 0.01
    hits = reopened.search(queries, k=5)
    s, r = exact_topk(torch.from_numpy(queries / np.linalg.norm(queries, axis=1, keepdims=True)), reopened.embeddings, 5)
    assert [h[0] for h in hits[0]] == [reopened.ids[j] for j in r[0].tolist()]
    assert hits[0][0][0] == "img3" and hits[1][0][0] == 40
    assert hits[0][0][1] == pytest.approx(float(s[0, 0]))
    excluded = reopened.search(queries[:1], k=3, exclude_ids=[["img3"]])
    assert "img3" not in [i for i, _ in excluded[0]] and len(excluded[0]) == 3


def test_add_errors_name_the_ids(tmp_path):
    index = EmbeddingIndex.create(tmp_path / "idx", dim=4, model_key="m")
    index.add(["a", "b"], np.eye(4)[:2])
    with pytest.raises(ValueError, match=r"already in the index.*'a'"):
        index.add(["c", "a"], np.eye(4)[:2])
    with pytest.raises(ValueError, match=r"duplicate ids within the batch: \['x'\]"):
        index.add(["x", "x"], np.eye(4)[:2])
    bad = np.eye(4)[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf for id\(s\) \['q'\]"):
        index.add(["p", "q", "r"], bad)
    with pytest.raises(ValueError, match=r"zero embeddings.*\['z'\]"):
        index.add(["z"], np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"must be \[n, 4\]"):
        index.add(["w"], np.ones((1, 5)))
    with pytest.raises(TypeError, match=r"ids\[0\]"):
        index.add([1.5], np.ones((1, 4)))
    assert len(index) == 2 and len(EmbeddingIndex.open(tmp_path / "idx")) == 2  # failed adds left nothing behind
    with pytest.raises(EmbeddingIndexError, match="already holds an index"):
        EmbeddingIndex.create(tmp_path / "idx", dim=4, model_key="m")
    with pytest.raises(EmbeddingIndexError, match="built with model 'm', not 'other'"):
        EmbeddingIndex.open(tmp_path / "idx", model_key="other")
    with pytest.raises(EmbeddingIndexError, match="no index"):
        EmbeddingIndex.open(tmp_path / "none")


def test_interrupted_add_is_ignored_and_repaired(tmp_path):
    index = EmbeddingIndex.create(tmp_path / "idx", dim=4, model_key="m")
    index.add(["a", "b"], np.eye(4)[:2])
    # an add that died after appending data but before committing meta.json
    with open(tmp_path / "idx" / "embeddings.f16", "ab") as fh:
        fh.write(np.ones((3, 4), dtype=np.float16).tobytes()[:13])
    with open(tmp_path / "idx" / "ids.jsonl", "ab") as fh:
        fh.write(b'"half-writ')
    again = EmbeddingIndex.open(tmp_path / "idx")
    assert again.ids == ["a", "b"]
    again.add(["c"], np.eye(4)[2:3])
    final = EmbeddingIndex.open(tmp_path / "idx")
    assert final.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(final.embeddings[:].astype(np.float32), np.eye(4)[:3])
    assert final.search(np.eye(4)[2:3], k=1)[0][0][0] == "c"


def test_index_written_before_the_store_loads_and_grows(tmp_path):
    """The files `zscir index` wrote before the EmbeddingStore: meta.json without a layout, raw float16 rows."""
    folder = tmp_path / "old"
    folder.mkdir()
    rows = np.array([[1, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 0, 1]], dtype="<f2")
    (folder / "embeddings.f16").write_bytes(rows.tobytes())
    (folder / "ids.jsonl").write_bytes(b'"a"\n"b"\n3\n')
    (folder / "meta.json").write_text(json.dumps({
        "backends": {}, "count": 3, "dim": 4, "dtype": "float16", "format_version": 1, "ids_bytes": 10,
        "metric": "cosine", "model_key": "m"}, indent=2))
    index = EmbeddingIndex.open(folder, model_key="m")
    assert index.ids == ["a", "b", 3] and index.embeddings.shape == (3, 4) and index.skipped == []
    assert index.search(np.array([[0, 1.0, 1.0, 0]]), k=2)[0][0][0] == "b"
    index.add(["new"], np.array([[1.0, 1.0, 0, 0]]), skipped=[{"id": "bad.png", "reason": "cannot decode"}])
    again = EmbeddingIndex.open(folder)
    assert again.ids == ["a", "b", 3, "new"] and again.skipped == [{"id": "bad.png", "reason": "cannot decode"}]
    np.testing.assert_array_equal(again.embeddings[:3], rows)


def test_inner_product_metric_keeps_norms(tmp_path):
    index = EmbeddingIndex.create(tmp_path / "idx", dim=2, model_key="m", metric="ip")
    index.add(["small", "big"], np.array([[1.0, 0.0], [0.0, 3.0]]))
    hits = index.search(np.array([[1.0, 1.0]]), k=2)[0]
    assert hits == [("big", 3.0), ("small", 1.0)]


# ---------------------------------------------------------------------- FAISS backends
faiss = pytest.importorskip("faiss")


def test_backend_registry_lists_all():
    assert set(BACKENDS.names()) == {"exact", "flat", "ivf", "hnsw", "pq", "ivfpq"}


def _searched_index(folder, n: int, dim: int, seed: int, n_queries: int):
    """An index of n clustered rows, queries near its first rows, and their exact top-10 rows."""
    emb = _clustered(n, dim, seed=seed)
    index = EmbeddingIndex.create(folder, dim=dim, model_key="m")
    index.add(list(range(n)), emb)
    noise = np.random.default_rng(seed + 1).standard_normal((n_queries, dim)).astype(np.float32)
    queries = emb[:n_queries] + 0.05 * noise
    return emb, index, queries, index.search_arrays(queries, 10)[1]


def test_faiss_backends_agree_with_exact(tmp_path):
    emb, index, queries, exact_rows = _searched_index(tmp_path / "idx", 2000, 32, seed=1, n_queries=20)

    index.build_backend("flat")
    _, flat_rows = index.search_arrays(queries, 10, backend="flat")
    assert (flat_rows == exact_rows).float().mean() > 0.98  # float16-rounded ties may swap

    ivf = index.build_backend("ivf", nlist=16)
    assert ivf.params["nlist"] == 16
    _, ivf_all = index.search_arrays(queries, 10, backend="ivf", nprobe=16)  # every list scanned: exact
    assert _recall(ivf_all, exact_rows) > 0.98
    _, ivf_few = index.search_arrays(queries, 10, backend="ivf", nprobe=1)
    assert _recall(ivf_few, exact_rows) <= _recall(ivf_all, exact_rows)

    index.build_backend("hnsw", M=16)
    _, hnsw_rows = index.search_arrays(queries, 10, backend="hnsw", efSearch=200)
    assert _recall(hnsw_rows, exact_rows) > 0.9

    for name in ("pq", "ivfpq"):
        index.build_backend(name, **({"nlist": 16} if name == "ivfpq" else {}))
        _, rows = index.search_arrays(queries, 10, backend=name, rerank=0)  # the codes' own order
        assert rows.shape == (20, 10) and (rows >= 0).all()
        assert _recall(rows, exact_rows) > 0.3  # lossy codes, but far above chance (10/2000)
        scores, reranked = index.search_arrays(queries, 10, backend=name)  # re-ranked exactly by default
        assert _recall(reranked, exact_rows) > _recall(rows, exact_rows)
        exact_of = torch.einsum("qd,qkd->qk", index._queries(queries), torch.from_numpy(
            np.asarray(index.embeddings, np.float32))[reranked])
        assert torch.allclose(scores, exact_of, atol=1e-5)

    with pytest.raises(ValueError, match="no search parameter 'nprobe'"):
        index.search_arrays(queries, 10, backend="hnsw", nprobe=4)
    with pytest.raises(KeyError, match="unknown index backend 'annoy'"):
        index.search_arrays(queries, 10, backend="annoy")

    # exact re-rank of the approximate candidates recovers the exact order (scores from the stored rows)
    _, refined = index.search_arrays(queries, 10, backend="pq", rerank=200)
    assert _recall(refined, exact_rows) > _recall(rows, exact_rows)
    exact_scores, _ = index.search_arrays(queries, 10)
    scores, _ = index.search_arrays(queries, 10, backend="flat", rerank=10)
    assert torch.allclose(scores, exact_scores, atol=1e-6)
    with pytest.raises(ValueError, match="takes no search parameters"):
        index.search_arrays(queries, 10, rerank=50)


def test_compressed_ivfpq_with_opq_memory_mapped_and_re_ranked(tmp_path):
    emb, index, queries, exact_rows = _searched_index(tmp_path / "idx", 3000, 48, seed=4, n_queries=30)
    with pytest.raises(ValueError, match="must divide the dimension 48"):
        index.build_backend("ivfpq", nlist=16, m=10)
    # OPQ: 10 sub-vectors of 4 of 40 rotated dims, 4-bit codes (16 centroids each: quick to train)
    built = index.build_backend("ivfpq", nlist=16, m=10, nbits=4, opq=1, mmap=1)
    assert built.bytes_per_vector() == 5 + 8  # 10 x 4 bits of code + the list entry's id
    info = json.loads((tmp_path / "idx" / "meta.json").read_text())["backends"]["ivfpq"]
    assert info["bytes_per_vector"] == 13 and info["file_bytes"] == (tmp_path / "idx" / "ivfpq.faiss").stat().st_size

    reopened = EmbeddingIndex.open(tmp_path / "idx")
    scores, rows = reopened.search_arrays(queries, 10, backend="ivfpq", nprobe=16, rerank=300)
    engine = reopened._backends["ivfpq"]
    assert engine.mapped and type(faiss.extract_index_ivf(engine.faiss_index).invlists).__name__ != "ArrayInvertedLists"
    assert "OnDisk" in faiss.downcast_InvertedLists(faiss.extract_index_ivf(engine.faiss_index).invlists).__class__.__name__
    assert _recall(rows, exact_rows) > 0.95  # 300 re-ranked candidates of 3000 (4-bit codes are coarse)
    in_memory = EmbeddingIndex.open(tmp_path / "idx")
    in_memory.meta["backends"]["ivfpq"]["params"]["mmap"] = 0
    assert torch.equal(in_memory.search_arrays(queries, 10, backend="ivfpq", nprobe=16, rerank=300)[1], rows)

    # rows added later: the mapped lists are read-only, so the structure is read into memory to catch up
    reopened.add([3000], emb[:1] * -1)
    assert reopened.search(-emb[:1], k=1, backend="ivfpq")[0][0][0] == 3000
    assert not reopened._backends["ivfpq"].mapped
    assert reopened.sync_backends() == ["ivfpq"]
    assert EmbeddingIndex.open(tmp_path / "idx").search(-emb[:1], k=1, backend="ivfpq")[0][0][0] == 3000
    with pytest.raises(ValueError, match="cannot be memory-mapped"):
        index.build_backend("hnsw", mmap=1)
    fresh = EmbeddingIndex.open(tmp_path / "idx")
    with pytest.raises(ValueError, match="fast-scan lists cannot be memory-mapped"):
        fresh.build_backend("ivfpq", nlist=16, m=12, fastscan=1, mmap=1)
    fast = fresh.build_backend("ivfpq", nlist=16, m=12, fastscan=1)  # 12 x 4-bit codes, SIMD scan
    assert fast.bytes_per_vector() == 6 + 8 and fast.params["nbits"] == 4
    _, rows = EmbeddingIndex.open(tmp_path / "idx").search_arrays(queries, 10, backend="ivfpq", nprobe=16, rerank=300)
    assert _recall(rows, exact_rows[:, :10]) > 0.95


def test_exact_rerank_scores_every_candidate_exactly():
    from zscir.search import exact_rerank

    emb = _clustered(500, 16, seed=6).astype(np.float16)
    q = torch.from_numpy(_clustered(9, 16, seed=7))
    rng = np.random.default_rng(8)
    cand = np.stack([rng.permutation(500)[:40] for _ in range(9)])  # distinct candidates, as FAISS returns them
    cand[:, -5:] = -1  # fewer than C found
    cand[3] = -1
    scores, rows = exact_rerank(q, emb, cand, 10)
    full = q @ torch.from_numpy(emb.astype(np.float32)).T
    for i in range(9):
        pool = sorted({int(c) for c in cand[i] if c >= 0}, key=lambda c: (-float(full[i, c]), c))[:10]
        assert rows[i][rows[i] >= 0].tolist() == pool
        assert torch.allclose(scores[i][: len(pool)], full[i, pool])
    assert rows[3].tolist() == [-1] * 10 and torch.isneginf(scores[3]).all()


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def test_faiss_backend_saved_reloaded_and_caught_up(tmp_path):
    emb = _clustered(600, 16, seed=3)
    index = EmbeddingIndex.create(tmp_path / "idx", dim=16, model_key="m")
    index.add([f"i{j}" for j in range(500)], emb[:500])
    index.build_backend("hnsw", M=8)
    assert (tmp_path / "idx" / "hnsw.faiss").is_file()
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["backends"]["hnsw"]["count"] == 500

    later = EmbeddingIndex.open(tmp_path / "idx")
    later.add([f"i{j}" for j in range(500, 600)], emb[500:])
    hits = later.search(emb[550:551], k=1, backend="hnsw")  # a row added after the build is found
    assert hits[0][0][0] == "i550"
    assert later.sync_backends() == ["hnsw"]
    assert json.loads((tmp_path / "idx" / "meta.json").read_text())["backends"]["hnsw"]["count"] == 600
    reloaded = EmbeddingIndex.open(tmp_path / "idx")
    assert reloaded.search(emb[590:591], k=3, backend="hnsw", exclude_ids=[["i590"]])[0][0][0] != "i590"
    with pytest.raises(EmbeddingIndexError, match="no 'ivf' backend"):
        reloaded.search(emb[:1], k=1, backend="ivf")


def test_missing_faiss_gives_install_hint(tmp_path, monkeypatch):
    index = EmbeddingIndex.create(tmp_path / "idx", dim=4, model_key="m")
    index.add(["a"], np.eye(4)[:1])
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install zscir\[faiss\]"):
        index.build_backend("flat")
    assert index.search(np.eye(4)[:1], k=1)[0][0][0] == "a"  # exact search needs no FAISS


# ------------------------------------------------------------------------------- CLI
class FakeComposer:
    """Deterministic stand-in for zscir.composer.Composer: an image embeds as its 4x4 grey thumbnail."""

    cache_key = "fake-composer-1"
    loaded_from = []

    @classmethod
    def from_pretrained(cls, folder, device="cpu"):
        cls.loaded_from.append(folder)
        return cls()

    def encode_images(self, images):
        arr = np.stack([np.asarray(im.convert("L").resize((4, 4)), dtype=np.float32).ravel() + 1.0 for im in images])
        x = torch.from_numpy(arr)
        return x / x.norm(dim=1, keepdim=True)

    def encode_query(self, images, texts):
        assert len(images) == len(texts)
        return self.encode_images(images)


@pytest.fixture
def fake_composer(monkeypatch):
    module = types.ModuleType("zscir.composer")
    module.Composer = FakeComposer
    monkeypatch.setitem(sys.modules, "zscir.composer", module)
    return FakeComposer


def _cli(add_arguments, run, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _random_gallery(gallery, n: int, seed: int):
    """n random 16x16 PNGs, every other one in a subfolder."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = gallery / ("sub" if i % 2 else "") / f"g{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
    return rng


def test_index_and_search_commands(tmp_path, fake_composer, capsys):
    gallery = tmp_path / "gallery"
    _random_gallery(gallery, 12, seed=0)
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    idx = tmp_path / "index"
    argv = [str(gallery), "--model", "MODEL", "--index", str(idx), "--batch-size", "5", "--commit-every", "4", "--no-progress"]
    assert _cli(index_add_arguments, index_run, argv) == 0
    index = EmbeddingIndex.open(idx, model_key="fake-composer-1")
    assert len(index) == 12 and "sub/g01.png" in index and "g00.png" in index
    assert "broken.jpg" in (idx / "bad_images.log").read_text()
    assert [s["id"] for s in index.skipped] == ["broken.jpg"]  # recorded in the index too, and retried next time

    # a second run finds everything indexed and adds nothing; --backend builds a FAISS structure
    assert _cli(index_add_arguments, index_run, argv + ["--backend", "flat"]) == 0
    assert "12 already indexed, 1 to embed" in capsys.readouterr().out  # the broken file is retried
    assert set(EmbeddingIndex.open(idx).meta["backends"]) == {"flat"}
    assert [s["id"] for s in EmbeddingIndex.open(idx).skipped] == ["broken.jpg"]

    query_img = gallery / "sub" / "g05.png"
    search_argv = [str(idx), "--model", "MODEL", "--image", str(query_img), "--text", "make it red", "-k", "3", "--json"]
    assert _cli(search_add_arguments, search_run, search_argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2, 3]
    assert results[0]["id"] == "sub/g05.png" and results[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert _cli(search_add_arguments, search_run, search_argv + ["--exclude", "sub/g05.png", "--backend", "flat"]) == 0
    assert "sub/g05.png" not in [r["id"] for r in json.loads(capsys.readouterr().out)]
    assert _cli(search_add_arguments, search_run, search_argv + ["--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 0  # result images found through image_root.txt

    fake_composer.cache_key = "another-model"
    try:
        with pytest.raises(EmbeddingIndexError, match="another-model"):
            _cli(search_add_arguments, search_run, search_argv)
    finally:
        fake_composer.cache_key = "fake-composer-1"


def test_index_command_from_file_list(tmp_path, fake_composer):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 200, 30) if name == "a.png" else (90, 9, 9)).save(imgs / name)
    lst = tmp_path / "list.txt"
    lst.write_text("# gallery\nimgs/a.png\nimgs/b.png\n")
    idx = tmp_path / "index"
    assert _cli(index_add_arguments, index_run, [str(lst), "--model", "M", "--index", str(idx), "--no-progress"]) == 0
    assert EmbeddingIndex.open(idx).ids == ["imgs/a.png", "imgs/b.png"]
    with pytest.raises(ValueError, match="--backend-param expects KEY=VALUE"):
        _cli(index_add_arguments, index_run, [str(lst), "--model", "M", "--index", str(idx), "--backend-param", "nlist"])


def test_export_parquet_read_back_with_datasets_finds_the_same_neighbours(tmp_path, fake_composer):
    from datasets import Dataset

    from zscir.search.export import read_parquet_info

    gallery = tmp_path / "gallery"
    rng = _random_gallery(gallery, 30, seed=1)
    out = tmp_path / "export" / "gallery.parquet"
    out.parent.mkdir()
    argv = [str(gallery), "--model", "M", "--index", str(tmp_path / "idx"), "--no-progress", "--export", str(out)]
    assert _cli(index_add_arguments, index_run, argv) == 0
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert read_parquet_info(out) == {"model_key": "fake-composer-1", "metric": "cosine", "dim": 16, "count": 30,
                                      "source_dtype": "float16"}
    ds = Dataset.from_parquet(str(out), cache_dir=str(tmp_path / "hf-cache"))
    assert ds["id"] == index.ids
    np.testing.assert_array_equal(np.asarray(ds["embedding"], np.float32), np.asarray(index.embeddings, np.float32))
    ds.add_faiss_index(column="embedding", metric_type=faiss.METRIC_INNER_PRODUCT)
    queries = rng.standard_normal((6, 16)).astype(np.float32) + np.asarray(index.embeddings[:6], np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, found = ds.get_nearest_examples_batch("embedding", queries, k=5)
    hits = index.search(queries, 5)
    assert [f["id"] for f in found] == [[i for i, _ in h] for h in hits]
    np.testing.assert_allclose(np.asarray(scores), [[s for _, s in h] for h in hits], atol=1e-5)


def test_export_to_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from zscir.search.export import export_parquet

    index = EmbeddingIndex.create(tmp_path / "idx", dim=8, model_key="m")
    index.add([f"i{j}" for j in range(300)], _clustered(300, 8))
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}
    calls = []

    def full(self, table, *args, **kwargs):
        calls.append(len(table))
        if len(calls) > 1:  # the second row group finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, table, *args, **kwargs)

    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(EmbeddingIndexError, match=r"gallery.parquet failed: no space left on the device; nothing"):
        export_parquet(index, tmp_path / "gallery.parquet", rows_per_group=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no partial file, no temporary left
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()} == before
    monkeypatch.setattr(pq.ParquetWriter, "write_table", original)
    with pytest.raises(EmbeddingIndexError, match="folder .* does not exist"):
        export_parquet(index, tmp_path / "missing" / "x.parquet")
    mixed = EmbeddingIndex.create(tmp_path / "mixed", dim=8, model_key="m")
    mixed.add(["a", 1], _clustered(2, 8))
    with pytest.raises(EmbeddingIndexError, match="mixes string and integer ids"):
        export_parquet(mixed, tmp_path / "mixed.parquet")
