"""Retrieval metrics against hand-computed cases (ties, duplicates, short rankings, several ground truths)."""
import numpy as np
import pytest
import torch

from zscir.eval import metrics as M


def test_unique_in_order_keeps_first_positions():
    assert M.unique_in_order(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert M.unique_in_order([3, 3, 3]) == [3]


def test_rank_scores_breaks_ties_by_lower_index():
    scores = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.2, 0.5])
    # 1.0 at indices 1 and 3, then 0.5 at 0, 2, 5 (index order), then 0.2
    assert M.rank_scores(scores).tolist() == [1, 3, 0, 2, 5, 4]
    assert M.rank_scores(scores, k=4).tolist() == [1, 3, 0, 2]
    batch = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.3, 0.3]])
    assert M.rank_scores(batch).tolist() == [[0, 1, 2], [1, 2, 0]]


def test_rank_scores_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        M.rank_scores(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="shape"):
        M.rank_scores(torch.zeros(2, 2, 2))


def test_hit_at_k_counts_a_duplicated_prediction_once():
    # without deduplication "b" would sit at position 4 and miss K=2
    assert M.hit_at_k(["a", "a", "a", "b"], ["b"], 2) == 1.0
    assert M.hit_at_k(["a", "c", "b"], ["b"], 2) == 0.0
    assert M.hit_at_k(["a", "c", "b"], ["x", "b"], 3) == 1.0  # any of several targets


def test_recall_with_fewer_items_than_k():
    # a gallery of 3 items: Recall@50 asks whether the target is anywhere
    assert M.recall_at_ks([["x", "y", "t"]], [["t"]], [1, 50]) == {1: 0.0, 50: 100.0}


def test_mean_recall_in_percent():
    rankings = [["t1", "a", "b"], ["a", "b", "t2"], ["a", "b", "c"]]
    targets = [["t1"], ["t2"], ["t3"]]
    out = M.recall_at_ks(rankings, targets, [1, 3])
    assert out[1] == pytest.approx(100 / 3)
    assert out[3] == pytest.approx(200 / 3)


def test_average_precision_several_ground_truths():
    ranking = ["g1", "x", "g2", "y", "g3"]
    gts = ["g1", "g2", "g3", "g4"]
    # hits at 1, 3, 5 -> precisions 1, 2/3, 3/5; divisor min(4, K)
    assert M.average_precision_at_k(ranking, gts, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert M.average_precision_at_k(ranking, gts, 3) == pytest.approx((1 + 2 / 3) / 3)
    assert M.average_precision_at_k(ranking, gts, 2) == pytest.approx(1 / 2)
    assert M.average_precision_at_k(ranking, ["g1"], 5) == pytest.approx(1.0)


def test_average_precision_duplicates_and_short_rankings():
    # duplicated g1 counts once: deduplicated ranking g1, x, g2 -> (1 + 2/3) / 2
    assert M.average_precision_at_k(["g1", "g1", "x", "g2"], ["g1", "g2"], 3) == pytest.approx((1 + 2 / 3) / 2)
    # gallery of 2 with K=50: the divisor stays min(#gt, K) = 1
    assert M.average_precision_at_k(["x", "g"], ["g"], 50) == pytest.approx(0.5)
    # repeated ground-truth ids are one ground truth
    assert M.average_precision_at_k(["g"], ["g", "g"], 5) == pytest.approx(1.0)


def _official_circo_ap(predictions, gts, k):
    """The CIRCO evaluation formula (numpy, unique predictions), written independently for comparison."""
    labels = np.isin(np.array(predictions), np.array(gts))
    precisions = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
    return float(np.sum(precisions[:k]) / min(len(gts), k))


def test_map_matches_circo_formula_on_random_rankings():
    rng = np.random.default_rng(0)
    rankings, truths = [], []
    for _ in range(30):
        rankings.append(list(rng.permutation(200)[:50]))
        truths.append(list(rng.choice(200, size=int(rng.integers(1, 15)), replace=False)))
    out = M.mean_average_precision_at_ks(rankings, truths, [5, 10, 25, 50])
    for k in (5, 10, 25, 50):
        expected = 100 * np.mean([_official_circo_ap(r, t, k) for r, t in zip(rankings, truths)])
        assert out[k] == pytest.approx(expected)


def test_recall_subset_requires_target_in_its_group():
    out = M.recall_subset_at_ks([["b", "t", "c"], ["t", "a", "b"]], ["t", "t"], [1, 2, 3])
    assert out == {1: 50.0, 2: 100.0, 3: 100.0}
    with pytest.raises(ValueError, match="query #0"):
        M.recall_subset_at_ks([["a", "b"]], ["t"], [1])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="positive"):
        M.hit_at_k(["a"], ["a"], 0)
    with pytest.raises(ValueError, match="2 rankings but 1"):
        M.recall_at_ks([["a"], ["b"]], [["a"]], [1])
    with pytest.raises(ValueError, match="query #1 has no target"):
        M.recall_at_ks([["a"], ["b"]], [["a"], []], [1])
    with pytest.raises(ValueError, match="no ground truth"):
        M.mean_average_precision_at_ks([["a"]], [[]], [5])
    with pytest.raises(ValueError, match="no queries"):
        M.recall_at_ks([], [], [1])
