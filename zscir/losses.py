"""Losses of every stage, as plain functions on L2-normalised features.

Notation: q_i are query-side features (image, pseudo sentence or composed
query), t_j target-side features (caption, image or target image), all
unit-norm; s_ij = scale * <q_i, t_j>; CE is cross-entropy; B is the batch size.

clip_contrastive(q, t, scale)
    The symmetric InfoNCE of CLIP: mean over i of CE(softmax_j s_ij, one-hot i)
    and over j of CE(softmax_i s_ij, one-hot j), averaged. Used to pretrain the
    tiny CLIP and as the *hard* baseline of Stage I.

soft_contrastive(q, t, scale, ref, tau_target)
    Soft text alignment, part 1. The target of row i is not one-hot but
    p_i = softmax_j(<r_i, r_j> / tau_target), where r are the frozen CLIP image
    features of the batch. Loss = mean_i KL-free cross-entropy
    -sum_j p_ij log softmax_j(s_ij), plus the same for columns (symmetric).
    Near-duplicate images share probability mass, so their pseudo sentences are
    not pushed apart. tau_target -> 0 recovers the hard loss.

soft_cross_entropy(logits, row_targets, col_targets)
    The symmetric soft cross-entropy behind soft_contrastive, for any targets:
    0.5 * (mean_i -sum_j P_ij log softmax_j(s_ij)
           + mean_j -sum_i C_ji log softmax_i(s_ij)),
    with P row-stochastic over images j and C row-stochastic over queries i.

caption_targets(captions, images, tau, has_caption)
    Soft text alignment with captions. With c_i a frozen CLIP text feature of
    one of image i's captions and v_j the frozen image features,
    A_ij = <c_i, v_j> / tau; the row target is P_ij = softmax_j(A_ij) (which
    images image i's caption fits) and the column target
    C_ji = softmax_i(A_ij) (which captions fit image j). An image whose caption
    also fits image j is not pushed away from j. Rows without a caption are
    left out of the column softmax and get no row target (callers fall back to
    the image-image target there).

text_alignment(q, captions, scale, tau, has_caption)
    Pseudo sentences against the batch's captions in text space: row i scores
    s_ij = scale * <q_i, c_j>, target softmax_j(<c_i, c_j> / tau) (identical or
    near-identical captions share mass), averaged over rows with a caption.

concept_alignment(q, img, concepts, tau)
    Soft text alignment, part 2. Given K concept-phrase text features c_k
    (frozen), the image's distribution over concepts is
    P_i = softmax_k(<img_i, c_k> / tau) and the pseudo sentence's is
    Q_i = softmax_k(<q_i, c_k> / tau). Loss = mean_i KL(P_i || Q_i). It ties
    the pseudo token to real words: the pseudo sentence must "read" like the
    words the image is close to.

info_nce_with_negatives(q, t, extra_neg, scale, mask)
    Stage II composing loss: row i scores its target t_i against all in-batch
    targets t_j (j != i are negatives) plus per-row extra negatives
    extra_neg[i, m] (reference image, query-side negatives, mined gallery
    images), CE with the positive at column i. Entries where mask is True (near
    duplicates of the target) are removed from the softmax.

target_to_query_info_nce(q, q_neg, t, scale, mask, rows)
    Stage II ``query_negative``: target t_i against all in-batch queries q_j
    plus q'_i (the same reference with another triplet's modification), CE with
    the positive at column i, on the rows that have a q'_i.

bank_info_nce(q, t, r, bank, scale, dup_threshold)
    SPN bank: CE of [s(q_i, t_i), s(q_i, b_j) for every bank row j] with label
    0; bank rows that duplicate t_i or r_i are masked.

pairwise_logistic_loss(pos, neg, tau, valid)
    DQE-CIR pairwise objective: mean of -log sigmoid((s_t - s_n) / tau) over
    valid (row, negative) pairs, i.e. a 2-way softmax CE per pair.

margin_loss(pos, neg, margin, valid)
    Hinge: mean over rows of sum_n relu(margin - (pos_i - neg_in)) over valid n.

masked_kl(teacher, student, valid)
    Mean over rows of KL(softmax(teacher) || softmax(student)) over valid
    entries (MELT's denoised-score distillation).

Helpers shared by every stage: :func:`clamped_scale` (the learnable logit
scale exp(log_scale), clamped at 100 as in CLIP) and :func:`duplicate_mask`
(which in-batch targets count as the same image).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "bank_info_nce", "caption_targets", "clamped_scale", "clip_contrastive", "concept_alignment", "duplicate_mask",
    "info_nce_with_negatives", "margin_loss", "masked_kl", "pairwise_logistic_loss", "soft_contrastive",
    "soft_cross_entropy", "soft_targets", "target_to_query_info_nce", "text_alignment",
]

MAX_SCALE = 100.0  # CLIP's cap on the learnable logit scale


def clamped_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The logit scale exp(log_scale), clamped at :data:`MAX_SCALE`."""
    return log_scale.exp().clamp(max=MAX_SCALE)


def duplicate_mask(target: torch.Tensor, threshold: float, codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, B] True where target j is the same image as target i: same code, or cosine >= threshold (diagonal False)."""
    dup = (target @ target.T) >= threshold
    if codes is not None:
        dup = (codes[:, None] == codes[None, :]) | dup
    return dup & ~torch.eye(len(target), dtype=torch.bool, device=target.device)


def clip_contrastive(q: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE with one-hot targets (CLIP's loss)."""
    logits = scale * q @ t.T
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def soft_targets(ref: torch.Tensor, tau_target: float) -> torch.Tensor:
    """Row-stochastic soft targets softmax(<r_i, r_j> / tau_target) from frozen reference features."""
    ref = F.normalize(ref.float(), dim=-1)
    return F.softmax(ref @ ref.T / tau_target, dim=-1)


def soft_cross_entropy(logits: torch.Tensor, row_targets: torch.Tensor, col_targets: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of logits [B, B] against row targets [B, B] and column targets (as rows) [B, B]."""
    row = -(row_targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    col = -(col_targets.to(logits.dtype) * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (row + col)


def soft_contrastive(
    q: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float, ref: torch.Tensor, tau_target: float
) -> torch.Tensor:
    """Symmetric contrastive loss whose targets are softened by frozen image-image similarity."""
    p = soft_targets(ref, tau_target)
    return soft_cross_entropy(scale * q @ t.T, p, p.T)


def caption_targets(captions: torch.Tensor, images: torch.Tensor, tau: float,
                    has_caption: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row targets softmax_j(<c_i, v_j>/tau) and column targets softmax_i(<c_i, v_j>/tau) over captioned rows i.

    Rows of captionless images are all zero in the row targets and excluded from the column targets; a column
    targets row is all zero when no image of the batch has a caption.
    """
    a = F.normalize(captions.float(), dim=-1) @ F.normalize(images.float(), dim=-1).T / tau
    has = has_caption.to(a.device)
    rows = torch.where(has[:, None], F.softmax(a, dim=1), torch.zeros_like(a))
    if not bool(has.any()):
        return rows, torch.zeros_like(a)
    cols = F.softmax(a.masked_fill(~has[:, None], float("-inf")), dim=0).T
    return rows, cols


def text_alignment(q: torch.Tensor, captions: torch.Tensor, scale: torch.Tensor | float, tau: float,
                   has_caption: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of pseudo sentences against the batch's captions (targets: caption-caption similarity)."""
    has = has_caption.to(q.device)
    if not bool(has.any()):
        return q.sum() * 0.0
    c = F.normalize(captions.float(), dim=-1)[has]
    logits = scale * q[has] @ c.T.to(q.dtype)
    p = F.softmax(c @ c.T / tau, dim=1).to(logits.dtype)
    return -(p * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def concept_alignment(q: torch.Tensor, img: torch.Tensor, concepts: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(P_image || Q_pseudo) between distributions over concept-phrase features."""
    p_log = F.log_softmax(img @ concepts.T / tau, dim=-1)
    q_log = F.log_softmax(q @ concepts.T / tau, dim=-1)
    return F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")


def info_nce_with_negatives(
    q: torch.Tensor,
    t: torch.Tensor,
    scale: torch.Tensor | float,
    extra_neg: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    extra_mask: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """InfoNCE of queries against in-batch targets plus per-row extra negatives [B, M, D].

    ``mask`` [B, B] and ``extra_mask`` [B, M] mark entries to drop from the
    softmax (near duplicates of the target); the diagonal is never dropped.
    ``weights`` [B] re-weights the per-row losses (mean-normalised).
    """
    logits = scale * q @ t.T
    b = q.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=q.device)
    if mask is not None:
        logits = logits.masked_fill(mask & ~eye, float("-inf"))
    if extra_neg is not None and extra_neg.numel():
        extra = scale * torch.einsum("bd,bmd->bm", q, extra_neg)
        if extra_mask is not None:
            extra = extra.masked_fill(extra_mask, float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    per_row = F.cross_entropy(logits, torch.arange(b, device=q.device), reduction="none")
    if weights is not None:
        return (per_row * weights).sum() / weights.sum().clamp_min(1e-8)
    return per_row.mean()


def target_to_query_info_nce(q: torch.Tensor, q_neg: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float,
                             mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """CE of t_i over [all in-batch queries, its query negative q'_i] with the positive q_i, on ``rows``.

    ``mask`` [B, B] marks queries whose target duplicates t_i (dropped; the diagonal never is).
    """
    logits = scale * t @ q.T
    eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
    logits = logits.masked_fill(mask & ~eye, float("-inf"))
    neg = scale * (t * q_neg).sum(-1, keepdim=True)
    return F.cross_entropy(torch.cat([logits, neg], dim=1)[rows], rows)


def bank_info_nce(query: torch.Tensor, target: torch.Tensor, reference: Optional[torch.Tensor], bank: torch.Tensor,
                  scale: torch.Tensor | float, dup_threshold: float) -> torch.Tensor:
    """Mean CE of [s(q_i, t_i), s(q_i, bank_j) for all j] with label 0; bank rows duplicating t_i or r_i are masked.

    Memory is O(B * M) (logits), never O(B * M * D).
    """
    pos = (query * target).sum(-1, keepdim=True)
    bank = bank.to(query.dtype)
    neg = query @ bank.T
    with torch.no_grad():
        drop = (target.to(bank.dtype) @ bank.T) >= dup_threshold
        if reference is not None:
            drop |= (reference.to(bank.dtype) @ bank.T) >= dup_threshold
    # mask after scaling: a -inf times a learnable scale would give a NaN gradient for the scale
    logits = torch.cat([scale * pos, (scale * neg).masked_fill(drop, float("-inf"))], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def pairwise_logistic_loss(pos: torch.Tensor, neg: torch.Tensor, tau: float,
                           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of -log sigmoid((s_t - s_n) / tau) = KL([1, 0] || softmax([s_t, s_n] / tau)) over valid (row, negative) pairs.

    ``pos`` [B], ``neg`` [B, M]; ``valid`` [B, M] selects the pairs that count.
    """
    terms = F.softplus(-(pos.unsqueeze(1) - neg) / tau)
    if valid is None:
        return terms.mean()
    return (terms * valid).sum() / valid.sum().clamp_min(1)


def margin_loss(pos: torch.Tensor, neg: torch.Tensor, margin: float, valid: torch.Tensor) -> torch.Tensor:
    """Mean over rows of sum_n relu(margin - (pos_i - neg_in)) over valid negatives; ``pos`` [B, 1], ``neg`` [B, M]."""
    return (F.relu(margin - (pos - neg)) * valid).sum(1).mean()


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)) restricted to valid entries."""
    t_log = F.log_softmax(teacher_logits.masked_fill(~valid, float("-inf")), dim=1)
    s_log = F.log_softmax(student_logits.masked_fill(~valid, float("-inf")), dim=1)
    terms = (t_log.exp() * (t_log - s_log)).masked_fill(~valid, 0.0)
    return terms.sum(1).mean()
