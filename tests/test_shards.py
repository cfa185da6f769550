"""Sharded encoding: `zscir index`, the evaluation gallery and the Stage-I feature cache encoded by several
processes (threads here; tests/_ddp_shards.py runs real torchrun processes) equal one process, in the same order;
each part resumes by itself; shards of other settings and corrupt shards are one clear error."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_shards import run_ranks, thread_workers
from test_index import FakeComposer, _cli
from zscir.cli.index import _image_list, index_add_arguments, index_run
from zscir.search import EmbeddingIndex, EmbeddingIndexError
from zscir.search.shards import ShardedRun, Workers, items_digest, part_bounds


@pytest.fixture(autouse=True)
def threads_as_processes(monkeypatch):
    for module in ("zscir.cli.index", "zscir.data.features", "zscir.eval.encode", "zscir.eval.evaluate"):
        monkeypatch.setattr(f"{module}.current_workers", thread_workers)


def test_parts_cover_the_items_in_order():
    for count in (0, 1, 7, 100):
        for parts in (1, 2, 3, 8):
            bounds = [part_bounds(count, p, parts) for p in range(parts)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert items_digest(["a", 1]) != items_digest([1, "a"])
    assert not ShardedRun(Path("/nonexistent/shards"), {}, Workers()).active  # one process, no plan: direct path


# ------------------------------------------------------------------------------------------- zscir index
@pytest.fixture
def composer(monkeypatch):
    import sys
    import types

    module = types.ModuleType("zscir.composer")
    module.Composer = FakeComposer
    monkeypatch.setitem(sys.modules, "zscir.composer", module)
    FakeComposer.cache_key = "fake-composer-1"
    yield FakeComposer
    FakeComposer.cache_key = "fake-composer-1"


def _gallery(folder: Path, n: int = 23, broken=(5, 17)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        p = folder / ("sub" if i % 3 == 0 else "") / f"g{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        if i in broken:
            p.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
        else:
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(p)
    return folder


def _index(gallery: Path, idx: Path, *extra: str) -> int:
    argv = [str(gallery), "--model", "M", "--index", str(idx), "--batch-size", "3", "--commit-every", "4",
            "--no-progress", *extra]
    return _cli(index_add_arguments, index_run, argv)


def _same_index(a: Path, b: Path) -> None:
    x, y = EmbeddingIndex.open(a), EmbeddingIndex.open(b)
    assert x.ids == y.ids
    np.testing.assert_array_equal(np.asarray(x.embeddings), np.asarray(y.embeddings))
    assert sorted(s["id"] for s in x.skipped) == sorted(s["id"] for s in y.skipped)
    assert x.meta["model_key"] == y.meta["model_key"] and x.metric == y.metric


def test_two_processes_index_like_one(tmp_path, composer):
    gallery = _gallery(tmp_path / "g")
    assert _index(gallery, tmp_path / "one") == 0
    assert run_ranks(lambda rank: _index(gallery, tmp_path / "two")) == [0, 0]
    _same_index(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / "shards").exists()
    assert [s["id"] for s in EmbeddingIndex.open(tmp_path / "two").skipped] == ["g05.png", "g17.png"]
    assert run_ranks(lambda rank: _index(gallery, tmp_path / "two")) == [0, 0]  # only the 2 broken ones to retry
    _same_index(tmp_path / "one", tmp_path / "two")
    # three processes, then new images: only those are embedded, appended in order
    assert run_ranks(lambda rank: _index(gallery, tmp_path / "three"), world=3) == [0, 0, 0]
    _same_index(tmp_path / "one", tmp_path / "three")
    for i in (30, 31, 32):
        Image.new("RGB", (9, 9), (i, 2 * i, 3 * i)).save(gallery / f"new{i}.png")
    assert _index(gallery, tmp_path / "one") == 0
    assert run_ranks(lambda rank: _index(gallery, tmp_path / "two")) == [0, 0]
    _same_index(tmp_path / "one", tmp_path / "two")


def test_nothing_left_to_index_with_two_processes(tmp_path, composer, capsys):
    gallery = _gallery(tmp_path / "g", n=6, broken=())
    assert run_ranks(lambda rank: _index(gallery, tmp_path / "idx")) == [0, 0]
    assert run_ranks(lambda rank: _index(gallery, tmp_path / "idx")) == [0, 0]
    assert "6 already indexed, 0 to embed" in capsys.readouterr().out
    assert len(EmbeddingIndex.open(tmp_path / "idx")) == 6


class _Kill(Exception):
    """A simulated kill of one process."""


_ENCODE = FakeComposer.encode_images


def _killing(monkeypatch, rank: int, after: int, calls: dict) -> None:
    """Make `rank`'s FakeComposer die after `after` encode calls; count every rank's encoded images."""
    original = _ENCODE

    def encode(self, images):
        me = thread_workers().rank
        calls[me] = calls.get(me, 0) + 1
        calls[f"images{me}"] = calls.get(f"images{me}", 0) + len(images)
        if me == rank and calls[me] > after:
            raise _Kill()
        return original(self, images)

    monkeypatch.setattr(FakeComposer, "encode_images", encode)


@pytest.mark.parametrize("resume_world", [2, 1])
def test_a_killed_run_resumes_each_part_where_it_stopped(tmp_path, composer, monkeypatch, resume_world):
    gallery = _gallery(tmp_path / "g", n=40, broken=(3,))
    _index(gallery, tmp_path / "one")
    calls: dict = {}
    _killing(monkeypatch, rank=1, after=3, calls=calls)
    with pytest.raises(_Kill):
        run_ranks(lambda rank: _index(gallery, tmp_path / "two"))
    assert not (tmp_path / "two" / "meta.json").exists()  # nothing merged: the parts wait in shards/
    part1 = EmbeddingIndex.open(tmp_path / "two" / "shards" / "00001-of-00002")
    assert len(part1) == 6  # batches of 3, committed once 4 rows wait: after batch 2; batch 3 was lost in the kill
    assert (tmp_path / "two" / "shards" / "00000-of-00002.done.json").is_file()

    calls.clear()
    _killing(monkeypatch, rank=-1, after=0, calls=calls)
    if resume_world == 2:
        run_ranks(lambda rank: _index(gallery, tmp_path / "two"))
    else:
        _index(gallery, tmp_path / "two")
    embedded = sum(v for k, v in calls.items() if str(k).startswith("images"))
    order = _image_list(str(gallery), None)[1]
    rest = [i for i in order[20:] if i not in part1 and i != "sub/g03.png"]  # g03 cannot be read
    assert embedded == len(rest) == 13  # part 0 was done; part 1 continued after its committed rows
    _same_index(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two" / "shards").exists()


def test_an_interrupted_merge_completes_in_order(tmp_path, composer, monkeypatch):
    gallery = _gallery(tmp_path / "g")
    _index(gallery, tmp_path / "one")
    import zscir.cli.index as cli_index

    original = cli_index._merge_part
    merged = []

    def dies_after_one(*args):
        if merged:
            raise _Kill()
        original(*args)
        merged.append(args[3])

    monkeypatch.setattr(cli_index, "_merge_part", dies_after_one)
    with pytest.raises(_Kill):
        run_ranks(lambda rank: _index(gallery, tmp_path / "two"))
    assert len(EmbeddingIndex.open(tmp_path / "two")) > 0  # part 0 merged
    monkeypatch.setattr(cli_index, "_merge_part", original)
    run_ranks(lambda rank: _index(gallery, tmp_path / "two"))
    _same_index(tmp_path / "one", tmp_path / "two")


def test_parts_of_a_changed_gallery_are_merged_then_the_rest_planned(tmp_path, composer, monkeypatch):
    gallery = _gallery(tmp_path / "g", n=30, broken=())
    _killing(monkeypatch, rank=1, after=1, calls={})
    with pytest.raises(_Kill):
        run_ranks(lambda rank: _index(gallery, tmp_path / "two"))
    _killing(monkeypatch, rank=-1, after=0, calls={})
    Image.new("RGB", (9, 9), "red").save(gallery / "late.png")
    run_ranks(lambda rank: _index(gallery, tmp_path / "two"))
    _index(gallery, tmp_path / "one")
    one, two = EmbeddingIndex.open(tmp_path / "one"), EmbeddingIndex.open(tmp_path / "two")
    assert sorted(one.ids) == sorted(two.ids) and len(two) == 31
    rows = [one.row_of(i) for i in two.ids]
    np.testing.assert_array_equal(np.asarray(one.embeddings)[rows], np.asarray(two.embeddings))


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("change", ["model", "precision", "corrupt", "plan"])
def test_shards_of_other_settings_or_corrupt_ones_are_refused(tmp_path, composer, monkeypatch, change):
    gallery = _gallery(tmp_path / "g", n=12, broken=())
    idx = tmp_path / "idx"
    _index(gallery, idx)  # an index with rows already
    before = _snapshot(idx)
    for i in range(24):
        Image.new("RGB", (9, 9), (i, 50, 90)).save(gallery / f"more{i:02d}.png")
    _killing(monkeypatch, rank=1, after=2, calls={})  # 6 rows of part 1 committed
    with pytest.raises(_Kill):
        run_ranks(lambda rank: _index(gallery, idx))
    _killing(monkeypatch, rank=-1, after=0, calls={})
    shard = idx / "shards" / "00001-of-00002"
    plan_file = idx / "shards" / "plan.json"
    plan = json.loads(plan_file.read_text())
    if change == "model":  # as if the interrupted run had used another model
        plan["fields"]["model_key"] = "another-model"
        match = "model_key='another-model', this run uses model_key='fake-composer-1'"
    elif change == "precision":
        plan["fields"]["precision"] = "bf16"
        match = "precision='bf16', this run uses precision='no'"
    plan_file.write_text(json.dumps(plan))
    if change == "corrupt":
        with open(shard / "embeddings.f16", "r+b") as fh:
            fh.truncate(10)
        match = "corrupt shard .*00001-of-00002.*shorter than"
    elif change == "plan":
        plan_file.write_text("{not json")
        match = "plan.json: unreadable"
    for world in (2, 1):
        with pytest.raises(EmbeddingIndexError, match=match):
            run_ranks(lambda rank: _index(gallery, idx), world=world)
    assert _snapshot(idx) == before  # nothing already indexed is lost or changed
    shutil.rmtree(idx / "shards")  # what the message says to do
    run_ranks(lambda rank: _index(gallery, idx))
    assert len(EmbeddingIndex.open(idx)) == 36


def test_a_process_that_sees_other_images_is_refused(tmp_path, composer):
    gallery = _gallery(tmp_path / "g", n=8, broken=())
    other = _gallery(tmp_path / "h", n=9, broken=())
    with pytest.raises(EmbeddingIndexError, match="another list of 9 items"):
        run_ranks(lambda rank: _index(gallery if rank == 0 else other, tmp_path / "idx"))


# ------------------------------------------------------------------------------------- feature cache
@pytest.fixture(scope="module")
def backbone():
    from zscir.models.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("zscir-micro")


def _own(bb):
    """A copy of the backbone for one thread (encode_image toggles state on the model: processes never share it)."""
    import copy

    return copy.deepcopy(bb)


def test_feature_cache_built_by_two_processes_equals_one(tmp_path, backbone, monkeypatch):
    from test_features import Wrapped, _corpus
    from zscir.data.features import FeatureCache, FeatureCacheError

    paths = _corpus(tmp_path / "imgs", n=21, bad=(2, 13, 20))
    kwargs = dict(patch_grid=2, batch_size=3, chunk_size=4, progress=False)
    one = FeatureCache.build(backbone, paths, tmp_path / "one", **kwargs)
    # rank 1 dies after 2 batches (one chunk of 4 committed to its progress, rows written in place)
    flaky = {0: Wrapped(_own(backbone)), 1: Wrapped(_own(backbone), fail_after=2)}
    with pytest.raises(KeyboardInterrupt):
        run_ranks(lambda rank: FeatureCache.build(flaky[rank], paths, tmp_path / "two", **kwargs))
    with pytest.raises(FeatureCacheError, match="incomplete"):
        FeatureCache.open(next((tmp_path / "two").iterdir()))
    counting = {0: Wrapped(_own(backbone)), 1: Wrapped(_own(backbone))}
    two = run_ranks(lambda rank: FeatureCache.build(counting[rank], paths, tmp_path / "two", **kwargs))[0]
    assert counting[0].calls == 0  # part 0 was finished
    # part 1 (rows 10-20, chunks of 4 from row 10) died in the chunk at row 14 and resumed there: batches 14-16, 17
    # and 18-19 (20 cannot be read)
    assert counting[1].calls == 3
    assert two.folder.name == one.folder.name and not (two.folder / "shards").exists()
    np.testing.assert_array_equal(np.asarray(two.valid), np.asarray(one.valid))
    np.testing.assert_allclose(np.asarray(two.pooled, np.float32), np.asarray(one.pooled, np.float32), atol=2e-3)
    np.testing.assert_allclose(np.asarray(two.patches, np.float32), np.asarray(one.patches, np.float32), atol=2e-3)
    assert sorted(f["index"] for f in two.failures) == [2, 13, 20] == sorted(f["index"] for f in one.failures)
    again = run_ranks(lambda rank: FeatureCache.build(counting[rank], paths, tmp_path / "two", **kwargs))
    assert counting[1].calls == 3 and again[1].folder == two.folder  # reused by every process


def test_feature_cache_part_with_a_corrupt_progress_record_is_refused(tmp_path, backbone):
    from test_features import Wrapped, _corpus
    from zscir.data.features import FeatureCache, FeatureCacheError

    paths = _corpus(tmp_path / "imgs", n=16, bad=())
    flaky = {0: Wrapped(_own(backbone)), 1: Wrapped(_own(backbone), fail_after=2)}  # dies in its third chunk of 3
    kwargs = dict(patch_grid=2, batch_size=3, chunk_size=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_ranks(lambda rank: FeatureCache.build(flaky[rank], paths, tmp_path / "c", **kwargs))
    folder = next((tmp_path / "c").iterdir())
    (folder / "shards" / "00001-of-00002" / "progress.json").write_text("[1, 2")
    with pytest.raises(FeatureCacheError, match="corrupt shard .*unreadable progress record"):
        run_ranks(lambda rank: FeatureCache.build(flaky[rank].bb, paths, tmp_path / "c", **kwargs))


# ------------------------------------------------------------------------------------ evaluation gallery
class _Model:
    """A retrieval model whose image embedding is the image's mean colour and size (deterministic)."""

    cache_key = "colour-model"
    device = "cpu"

    def __init__(self, fail_rank=None, after=0):
        self.fail_rank, self.after, self.calls = fail_rank, after, 0
        self.lock = threading.Lock()

    def encode_images(self, images):
        with self.lock:
            self.calls += len(images)
        if thread_workers().rank == self.fail_rank:
            self.after -= 1
            if self.after < 0:
                raise _Kill()
        rows = [np.r_[np.asarray(im, np.float32).mean(axis=(0, 1)), im.size, 1.0] for im in images]
        return torch.tensor(np.stack(rows), dtype=torch.float32)

    def encode_query(self, images, texts):
        return self.encode_images(images)


@pytest.mark.parametrize("cache", [True, False])
def test_gallery_encoded_by_two_processes_equals_one(tmp_path, cache, monkeypatch):
    import zscir.eval.encode as encode
    from zscir.eval.encode import encode_gallery

    monkeypatch.setattr(encode, "_COMMIT_ROWS", 2)  # shard rows are committed every 2 images
    gallery = _gallery(tmp_path / "g", n=17, broken=(4,))
    paths = sorted(gallery.rglob("*.png"))
    paths.append(paths[0])  # a gallery may list an image twice
    ids = [f"id{i}" for i in range(len(paths))]
    cache_dir = (tmp_path / "cache") if cache else None
    one, failed_one = encode_gallery(_Model(), ids, paths, batch_size=4, progress=False)
    assert list(failed_one) == [ids[paths.index(gallery / "g04.png")]]
    model = _Model()
    if cache:  # rank 1 dies in its second batch; its first 2 rows stay in its shard
        with pytest.raises(_Kill):
            run_ranks(lambda rank: encode_gallery(_Model(fail_rank=1, after=1), ids, paths, batch_size=2,
                                                  cache_dir=cache_dir, progress=False))
    results = run_ranks(lambda rank: encode_gallery(model, ids, paths, batch_size=2, cache_dir=cache_dir,
                                                    progress=False))
    for feats, failed in results:
        assert torch.equal(torch.isnan(feats), torch.isnan(one))
        assert torch.allclose(torch.nan_to_num(feats), torch.nan_to_num(one))
        assert failed == failed_one
    if cache:
        unique = list(dict.fromkeys(paths))
        loadable_part1 = [p for p in unique[8:] if p.name != "g04.png"]
        assert model.calls == len(loadable_part1) - 2  # part 0 done, part 1 resumed after its 2 committed rows
        again = _Model()
        feats, failed = encode_gallery(again, ids, paths, cache_dir=cache_dir, progress=False)
        assert again.calls == 0 and failed == failed_one  # only the broken image is tried (and fails) again
        assert torch.allclose(torch.nan_to_num(feats), torch.nan_to_num(one))


# ---------------------------------------------------------------------------- real processes (torchrun)
HERE = Path(__file__).resolve().parent


def _run_helper(out: Path, model: Path, images: Path, processes: int, die_after: int = -1) -> int:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(processes)]
    return subprocess.run(launch + [str(HERE / "_ddp_shards.py"), str(out), str(model), str(images), str(die_after)],
                          env=env, timeout=600, capture_output=True, text=True).returncode


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_and_resume_after_a_kill(tmp_path):
    """torchrun, 2 CPU processes: `zscir index`, the feature cache and the evaluation gallery (cached and gathered)
    equal the 1-process results (same ids in the same order, embeddings equal to float16 precision); process 1
    dies abruptly in a first run and the second run resumes the parts."""
    from safetensors import safe_open

    from zscir.composer import Composer
    from zscir.data.features import FeatureCache

    torch.manual_seed(0)
    Composer.from_clip("zscir-micro").save_pretrained(tmp_path / "model")
    images = _gallery(tmp_path / "images", n=50, broken=(7, 41))
    assert _run_helper(tmp_path / "one", tmp_path / "model", images, 1) == 0
    assert _run_helper(tmp_path / "two", tmp_path / "model", images, 2, die_after=3) != 0  # process 1 killed
    part1 = EmbeddingIndex.open(tmp_path / "two" / "index" / "shards" / "00001-of-00002")
    assert len(part1) == 11  # batches of 4, 3 (g41 is broken), 4: committed once 8 rows waited; batch 4 was lost
    assert _run_helper(tmp_path / "two", tmp_path / "model", images, 2) == 0

    one, two = EmbeddingIndex.open(tmp_path / "one" / "index"), EmbeddingIndex.open(tmp_path / "two" / "index")
    assert one.ids == two.ids and len(one) == 48
    np.testing.assert_allclose(np.asarray(two.embeddings, np.float32), np.asarray(one.embeddings, np.float32),
                               atol=1e-3, rtol=0)  # float16 rows: at most a rounding step apart
    assert [s["id"] for s in one.skipped] == [s["id"] for s in two.skipped]
    f1, f2 = (FeatureCache.open(next((tmp_path / run / "features").iterdir())) for run in ("one", "two"))
    assert f1.folder.name == f2.folder.name and f1.paths == f2.paths
    np.testing.assert_array_equal(np.asarray(f1.valid), np.asarray(f2.valid))
    np.testing.assert_allclose(np.asarray(f2.pooled, np.float32), np.asarray(f1.pooled, np.float32), atol=2e-3)
    np.testing.assert_allclose(np.asarray(f2.patches, np.float32), np.asarray(f1.patches, np.float32), atol=2e-3)
    reference = safe_open(str(tmp_path / "one" / "gallery0.safetensors"), "pt")
    for rank in (0, 1):  # every process gets the whole gallery
        got = safe_open(str(tmp_path / "two" / f"gallery{rank}.safetensors"), "pt")
        assert got.metadata()["failed"] == reference.metadata()["failed"] == "g07.png,g41.png"
        for name in ("cached", "gathered"):
            a, b = reference.get_tensor(name), got.get_tensor(name)
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            assert (torch.nan_to_num(a) - torch.nan_to_num(b)).abs().max() < 1e-4, name
