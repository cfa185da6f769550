"""The embedding store: named arrays, ids, transactions that meta.json commits, skipped items, preallocated .npy arrays."""
import json

import numpy as np
import pytest

from zscir.search.store import ArraySpec, EmbeddingStore, StoreError


def _two_arrays(capacity=None):
    suffix = ".npy" if capacity else ".f16"
    return {"vec": ArraySpec("vec" + suffix, "float16", (3,), capacity=capacity),
            "grid": ArraySpec("grid" + suffix, "float16", (2, 3), capacity=capacity)}


def test_rows_ids_and_skipped_round_trip(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _two_arrays(), meta={"owner": "test"})
    store.add(["a", 7], {"vec": np.ones((2, 3)), "grid": np.zeros((2, 2, 3))},
              skipped=[{"id": "broken", "reason": "cannot decode", "path": "x/broken.png"}])
    again = EmbeddingStore.open(tmp_path / "s")
    assert len(again) == 2 and again.ids == ["a", 7] and again.row_of(7) == 1 and again.meta["owner"] == "test"
    assert again.array("vec").dtype == np.float16 and again.array("grid").shape == (2, 2, 3)
    assert again.skipped == [{"id": "broken", "reason": "cannot decode", "path": "x/broken.png"}]
    again.add(["broken"], {"vec": np.full((1, 3), 2.0), "grid": np.zeros((1, 2, 3))})  # a retried item succeeds
    assert EmbeddingStore.open(tmp_path / "s").skipped == []
    with pytest.raises(ValueError, match="already in the store"):
        again.add(["a"], {"vec": np.ones((1, 3)), "grid": np.zeros((1, 2, 3))})
    with pytest.raises(ValueError, match="every array"):
        again.add(["b"], {"vec": np.ones((1, 3))})
    with pytest.raises(ValueError, match="store's own"):
        again.set_meta(count=5)


def test_a_failed_transaction_commits_nothing(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _two_arrays())
    with pytest.raises(KeyboardInterrupt):
        with store.append() as txn:
            txn.write({"vec": np.ones((4, 3)), "grid": np.ones((4, 2, 3))}, ids=list("abcd"))
            raise KeyboardInterrupt
    assert len(EmbeddingStore.open(tmp_path / "s")) == 0
    with store.append() as txn:  # the next append overwrites what the failed one left behind
        txn.write({"vec": np.full((1, 3), 3.0), "grid": np.ones((1, 2, 3))}, ids=["z"])
        txn.write({"vec": np.full((1, 3), 4.0), "grid": np.ones((1, 2, 3))}, ids=["y"])
    reopened = EmbeddingStore.open(tmp_path / "s")
    assert reopened.ids == ["z", "y"] and reopened.array("vec")[:, 0].tolist() == [3.0, 4.0]
    assert (tmp_path / "s" / "vec.f16").stat().st_size == 2 * 3 * 2


def test_another_writer_is_detected(tmp_path):
    first = EmbeddingStore.create(tmp_path / "s", _two_arrays())
    second = EmbeddingStore.open(tmp_path / "s")
    second.add(["x"], {"vec": np.ones((1, 3)), "grid": np.ones((1, 2, 3))})
    with pytest.raises(StoreError, match="changed by another writer"):
        first.add(["y"], {"vec": np.ones((1, 3)), "grid": np.ones((1, 2, 3))})


def test_preallocated_npy_arrays_with_positional_ids(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _two_arrays(capacity=5), positional_ids=True)
    assert not (tmp_path / "s" / "ids.jsonl").exists()
    store.add(None, {"vec": np.arange(6).reshape(2, 3), "grid": np.ones((2, 2, 3))})
    with store.append() as txn:
        txn.write({"vec": np.full((3, 3), 9.0), "grid": np.zeros((3, 2, 3))})
        txn.skip(4, "unreadable")
    done = EmbeddingStore.open(tmp_path / "s")
    assert len(done) == 5 and done.ids == [0, 1, 2, 3, 4] and 4 in done and 5 not in done
    # the files stay ordinary .npy arrays
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "vec.npy"), done.array("vec"))
    with pytest.raises(ValueError, match="holds 5 rows"):
        done.add(None, {"vec": np.ones((1, 3)), "grid": np.ones((1, 2, 3))})
    with pytest.raises(ValueError, match="numbers its rows"):
        done.add(["q"], {"vec": np.ones((0, 3)), "grid": np.ones((0, 2, 3))})
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["skipped"] == [{"id": 4, "reason": "unreadable"}]


def test_truncated_files_are_reported(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _two_arrays())
    store.add(["a", "b"], {"vec": np.ones((2, 3)), "grid": np.ones((2, 2, 3))})
    with open(tmp_path / "s" / "grid.f16", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(StoreError, match="shorter than the 2 rows"):
        EmbeddingStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="no store"):
        EmbeddingStore.open(tmp_path / "none")


def test_write_at_fills_preallocated_rows_that_commit_count_commits(tmp_path):
    store = EmbeddingStore.create(tmp_path / "s", _two_arrays(capacity=6), positional_ids=True)
    with store.write_at(3) as txn:  # a later part first: rows 3-5
        txn.write({"vec": np.full((3, 3), 5.0), "grid": np.zeros((3, 2, 3))})
    assert len(EmbeddingStore.open(tmp_path / "s")) == 0  # written, not committed
    with store.write_at(0) as txn:
        txn.write({"vec": np.full((3, 3), 1.0), "grid": np.zeros((3, 2, 3))})
    store.commit_count(3, skipped=[{"id": 1, "reason": "unreadable"}])
    store.commit_count(6)
    done = EmbeddingStore.open(tmp_path / "s")
    assert done.array("vec")[:, 0].tolist() == [1, 1, 1, 5, 5, 5] and done.skipped == [{"id": 1, "reason": "unreadable"}]
    with pytest.raises(ValueError, match="cannot commit 7 rows"):
        done.commit_count(7)
    with pytest.raises(ValueError, match="holds 6 rows"):
        with done.write_at(5) as txn:
            txn.write({"vec": np.ones((2, 3)), "grid": np.zeros((2, 2, 3))})
    growing = EmbeddingStore.create(tmp_path / "g", _two_arrays())
    with pytest.raises(StoreError, match="write_at needs preallocated arrays"):
        with growing.write_at(0):
            pass


def test_extend_appends_another_store_once(tmp_path):
    a = EmbeddingStore.create(tmp_path / "a", _two_arrays())
    a.add(["x"], {"vec": np.ones((1, 3)), "grid": np.zeros((1, 2, 3))})
    b = EmbeddingStore.create(tmp_path / "b", _two_arrays())
    b.add(["y", "z"], {"vec": np.arange(6).reshape(2, 3), "grid": np.ones((2, 2, 3))},
          skipped=[{"id": "bad", "reason": "cannot decode"}])
    assert a.extend(b, rows_per_write=1) == 2
    assert a.extend(b) == 0  # again after an interrupted merge: nothing twice
    merged = EmbeddingStore.open(tmp_path / "a")
    assert merged.ids == ["x", "y", "z"] and merged.array("vec")[2].tolist() == [3, 4, 5]
    assert merged.skipped == [{"id": "bad", "reason": "cannot decode"}]
    other = EmbeddingStore.create(tmp_path / "c", {"vec": ArraySpec("vec.f16", "float16", (4,))})
    with pytest.raises(StoreError, match="cannot be merged"):
        a.extend(other)
