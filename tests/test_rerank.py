"""Inference re-ranker: kNN-graph diffusion of top-K scores demotes isolated high-scoring distractors."""
import pytest
import torch
import torch.nn.functional as F

from zscir.search import exact_topk
from zscir.search.rerank import RerankConfig, knn_affinity, rerank, rerank_search


def clustered_candidates(seed=0):
    """A tight cluster of 4 good candidates, an isolated distractor scored highest, and 5 low-scoring others."""
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(32, generator=g), dim=0)
    cluster = F.normalize(centre + 0.15 * torch.randn(4, 32, generator=g), dim=-1)
    others = F.normalize(torch.randn(6, 32, generator=g), dim=-1)  # [0] is the distractor
    feats = torch.cat([others[:1], cluster, others[1:]])
    scores = torch.tensor([0.85, 0.80, 0.75, 0.74, 0.70, 0.30, 0.28, 0.25, 0.22, 0.20])
    return scores, feats


def test_isolated_distractor_is_demoted_below_the_cluster():
    scores, feats = clustered_candidates()
    assert int(scores.argmax()) == 0
    order, new = rerank(scores, feats, k_nn=3, alpha=0.5, iterations=10)
    assert order[0].item() == 1  # the best cluster member now leads
    assert order.tolist().index(0) >= 4  # the distractor fell behind the whole cluster
    assert torch.all(new[:-1] >= new[1:])  # returned best first


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_demotion_holds_for_other_random_layouts(seed):
    scores, feats = clustered_candidates(seed)
    order, _ = rerank(scores, feats)  # default settings
    assert order.tolist().index(0) > order.tolist().index(1)


def test_no_diffusion_keeps_the_original_order():
    scores, feats = clustered_candidates()
    for kwargs in ({"alpha": 0.0}, {"iterations": 0}):
        order, new = rerank(scores, feats, **kwargs)
        assert order.tolist() == list(range(10)) and torch.allclose(new, scores)


def test_affinity_rows_are_stochastic_knn_without_self_loops():
    feats = F.normalize(torch.randn(2, 7, 16), dim=-1)
    w = knn_affinity(feats, k_nn=3)
    assert torch.allclose(w.sum(-1), torch.ones(2, 7))
    assert torch.all(w.diagonal(dim1=1, dim2=2) == 0)
    assert torch.all((w > 0).sum(-1) <= 3)


def test_padding_stays_last_and_lends_no_score():
    scores, feats = clustered_candidates()
    scores = scores.clone()
    scores[-2:] = float("-inf")
    order, new = rerank(scores.unsqueeze(0), feats.unsqueeze(0))
    assert set(order[0, -2:].tolist()) == {8, 9} and torch.isinf(new[0, -2:]).all()
    assert torch.isfinite(new[0, :-2]).all()


def test_rerank_search_permutes_the_exact_top_k():
    g = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    queries = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    scores, idx = rerank_search(queries, gallery, 20, RerankConfig(alpha=0.4))
    _, exact = exact_topk(queries, gallery, 20)
    assert idx.shape == (5, 20)
    for a, b in zip(idx.tolist(), exact.tolist()):
        assert sorted(a) == sorted(b)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_bad_shapes_and_settings_are_reported():
    with pytest.raises(ValueError, match="candidate_features"):
        rerank(torch.zeros(2, 5), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="alpha"):
        RerankConfig(alpha=1.0)
    with pytest.raises(ValueError, match="k_nn"):
        rerank(torch.zeros(5), torch.zeros(5, 8), k_nn=0)
