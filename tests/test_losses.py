"""Losses of every stage (zscir.losses) on constructed inputs."""
import pytest
import torch
import torch.nn.functional as F

from zscir.losses import (bank_info_nce, clamped_scale, clip_contrastive, concept_alignment, duplicate_mask,
                          info_nce_with_negatives, margin_loss, masked_kl, pairwise_logistic_loss, soft_contrastive,
                          soft_targets, target_to_query_info_nce)

D = 64


# ---------------------------------------------------------------------------------------- Stage I

def test_soft_losses_behave():
    q = F.normalize(torch.randn(8, 16), dim=-1)
    t = F.normalize(torch.randn(8, 16), dim=-1)
    ref = torch.randn(8, 16)
    p = soft_targets(ref, 0.05)
    assert torch.allclose(p.sum(1), torch.ones(8))
    # tiny tau_target -> one-hot targets -> the hard loss
    assert torch.allclose(soft_contrastive(q, t, 10.0, ref, 1e-6), clip_contrastive(q, t, 10.0), atol=1e-5)
    # two identical images share their target mass: the soft loss does not push their rows apart
    ref2 = ref.clone()
    ref2[1] = ref2[0]
    assert soft_targets(ref2, 0.05)[0, 1] > 0.3
    concepts = F.normalize(torch.randn(20, 16), dim=-1)
    assert concept_alignment(t, t, concepts, 0.1).abs() < 1e-6
    assert concept_alignment(q, t, concepts, 0.1) > 0

# ---------------------------------------------------------------------------------------- Stage II

def test_info_nce_masks_duplicates_and_uses_extra_negatives():
    q = F.normalize(torch.randn(4, 8), dim=-1)
    t = q.clone()
    base = info_nce_with_negatives(q, t, 10.0)
    hard = info_nce_with_negatives(q, t, 10.0, extra_neg=q.unsqueeze(1))  # a negative identical to the positive
    assert hard > base
    masked = info_nce_with_negatives(q, t, 10.0, extra_neg=q.unsqueeze(1), extra_mask=torch.ones(4, 1, dtype=torch.bool))
    assert torch.allclose(masked, base)
    dup = torch.ones(4, 4, dtype=torch.bool)  # everything a duplicate: only the positive stays
    assert info_nce_with_negatives(q, t, 10.0, mask=dup).abs() < 1e-6

def test_clamped_scale_caps_at_100_and_keeps_the_gradient_below():
    assert float(clamped_scale(torch.tensor(10.0))) == 100.0
    log_scale = torch.tensor(2.0, requires_grad=True)
    scale = clamped_scale(log_scale)
    scale.backward()
    assert float(scale.detach()) == pytest.approx(float(torch.tensor(2.0).exp()))
    assert float(log_scale.grad) == pytest.approx(float(scale.detach()))


def test_duplicate_mask_by_code_or_cosine_never_the_diagonal():
    t = F.normalize(torch.randn(4, 8), dim=-1)
    t[1] = t[0]  # a near duplicate by feature
    dup = duplicate_mask(t, 0.99)
    assert dup[0, 1] and dup[1, 0] and not dup.diagonal().any() and int(dup.sum()) == 2
    codes = torch.tensor([0, 1, 2, 2])  # rows 2 and 3 share their target id
    dup = duplicate_mask(t, 0.99, codes)
    assert dup[2, 3] and dup[3, 2] and dup[0, 1] and int(dup.sum()) == 4
    assert not duplicate_mask(t, 1.5).any()


def test_target_to_query_info_nce_matches_cross_entropy():
    q, qn, t = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    rows = torch.tensor([0, 3])
    none = torch.zeros(5, 5, dtype=torch.bool)
    loss = target_to_query_info_nce(q, qn, t, 10.0, none, rows)
    manual = torch.stack([F.cross_entropy(10 * torch.cat([q @ t[i], (qn[i] * t[i]).sum().view(1)]).unsqueeze(0),
                                          torch.tensor([i])) for i in rows.tolist()]).mean()
    assert torch.allclose(loss, manual, atol=1e-5)
    mask = torch.ones(5, 5, dtype=torch.bool)  # every other query duplicates the target: only q_i and q'_i stay
    only = target_to_query_info_nce(q, qn, t, 10.0, mask, rows)
    pair = torch.stack([F.cross_entropy(10 * torch.stack([(q[i] * t[i]).sum(), (qn[i] * t[i]).sum()]).unsqueeze(0),
                                        torch.tensor([0])) for i in rows.tolist()]).mean()
    assert torch.allclose(only, pair, atol=1e-5)


def test_margin_loss_counts_only_violations_of_valid_negatives():
    pos = torch.tensor([[0.5], [0.2]])
    neg = torch.tensor([[0.45, 0.1], [0.3, 0.9]])
    valid = torch.tensor([[True, True], [True, False]])
    # row 0: relu(0.1 - 0.05) + relu(0.1 - 0.4) = 0.05; row 1: relu(0.1 + 0.1) = 0.2 (the 0.9 is invalid)
    assert float(margin_loss(pos, neg, 0.1, valid)) == pytest.approx(0.125)


def test_masked_kl_matches_kl_div_and_ignores_invalid_entries():
    t, s = torch.randn(5, 6), torch.randn(5, 6)
    full = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    assert torch.allclose(masked_kl(t, s, torch.ones(5, 6, dtype=torch.bool)), full, atol=1e-6)
    valid = torch.ones(5, 6, dtype=torch.bool)
    valid[:, 4:] = False
    part = F.kl_div(F.log_softmax(s[:, :4], 1), F.log_softmax(t[:, :4], 1), log_target=True, reduction="batchmean")
    assert torch.allclose(masked_kl(t, s, valid), part, atol=1e-6)


def test_bank_info_nce_matches_cross_entropy_and_masks_duplicates():
    q = F.normalize(torch.randn(4, D), dim=-1)
    t = F.normalize(torch.randn(4, D), dim=-1)
    bank = F.normalize(torch.randn(10, D), dim=-1)
    manual = F.cross_entropy(10 * torch.cat([(q * t).sum(-1, keepdim=True), q @ bank.T], 1), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(bank_info_nce(q, t, None, bank, 10.0, 0.98), manual, atol=1e-5)
    ref = F.normalize(torch.randn(4, D), dim=-1)
    with_dups = torch.cat([bank, t, ref])  # every target and reference is in the bank too
    scale = torch.tensor(10.0, requires_grad=True)
    loss = bank_info_nce(q, t, ref, with_dups, scale, 0.98)
    # row i keeps the other rows' targets and references as negatives, never its own
    rows = [F.cross_entropy(10 * torch.cat([(q[i] * t[i]).sum().view(1), bank @ q[i], t[torch.arange(4) != i] @ q[i],
                                            ref[torch.arange(4) != i] @ q[i]]).unsqueeze(0), torch.zeros(1, dtype=torch.long))
            for i in range(4)]
    assert torch.allclose(loss, torch.stack(rows).mean(), atol=1e-5)
    loss.backward()
    assert torch.isfinite(scale.grad)


def test_pairwise_loss_equals_two_way_kl():
    pos, neg, tau = torch.randn(6), torch.randn(6, 3), 0.07
    loss = pairwise_logistic_loss(pos, neg, tau)
    pair = torch.stack([pos.unsqueeze(1).expand(-1, 3), neg], dim=-1) / tau  # [6, 3, 2]
    kl = F.kl_div(F.log_softmax(pair, -1), torch.tensor([1.0, 0.0]).expand_as(pair), reduction="none").sum(-1).mean()
    ce = F.cross_entropy(pair.reshape(-1, 2), torch.zeros(18, dtype=torch.long))
    assert torch.allclose(loss, kl, atol=1e-5) and torch.allclose(loss, ce, atol=1e-5)
    valid = torch.zeros(6, 3, dtype=torch.bool)
    valid[:, 0] = True
    assert torch.allclose(pairwise_logistic_loss(pos, neg, tau, valid), pairwise_logistic_loss(pos, neg[:, :1], tau))
