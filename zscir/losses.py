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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def clip_contrastive(q: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE with one-hot targets (CLIP's loss)."""
    logits = scale * q @ t.T
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def soft_targets(ref: torch.Tensor, tau_target: float) -> torch.Tensor:
    """Row-stochastic soft targets softmax(<r_i, r_j> / tau_target) from frozen reference features."""
    ref = F.normalize(ref.float(), dim=-1)
    return F.softmax(ref @ ref.T / tau_target, dim=-1)


def soft_contrastive(
    q: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float, ref: torch.Tensor, tau_target: float
) -> torch.Tensor:
    """Symmetric contrastive loss whose targets are softened by frozen image-image similarity."""
    logits = scale * q @ t.T
    p = soft_targets(ref, tau_target).to(logits.dtype)
    row = -(p * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    col = -(p.T * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (row + col)


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
