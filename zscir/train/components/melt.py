"""MELT (Modification frEquentation-rarity baLance neTwork, ICASSP 2026) as Stage-II components.

``melt_rarity``       rarity-aware per-sample loss weights (+ text-guided attention pooling)
``inverse_frequency`` the cheap 1/freq(kind)^alpha alternative
``melt_denoise``      diffusion-based similarity denoising as a distillation target

Notation: q_i composed query, t_i target (unit-norm), e_i the frozen CLIP text
feature of the modification text of triplet i.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Config
from ...losses import clamped_scale, duplicate_mask, masked_kl
from .base import STAGE2_COMPONENTS, ComponentContext, Stage2Component, check_option, parse_options

__all__ = [
    "InverseFrequency", "InverseFrequencyOptions", "MeltDenoise", "MeltDenoiseOptions", "MeltRarity", "MeltRarityOptions",
    "RunningMoments", "ScoreDenoiser", "TextGuidedPooling", "content_words", "cosine_alpha_bar", "frequency_keys",
    "inverse_frequency_weights", "mahalanobis_energy", "masked_standardise", "rarity_weights", "score_vectors",
]

class TextGuidedPooling(nn.Module):
    """Attention pooling of patch tokens [B, P, D] with the modification-text feature [B, D] as the query.

    a_p = softmax_p(<W_q e, W_k x_p> / sqrt(k)), pooled = normalise(sum_p a_p W_v x_p);
    W_v starts as the identity so the pooled vector lives in the CLIP embedding space.
    """

    def __init__(self, dim: int, key_dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(dim, key_dim)
        self.key = nn.Linear(dim, key_dim)
        self.value = nn.Linear(dim, dim)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(dim))
            self.value.bias.zero_()
        self.key_dim = key_dim

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(normalised pooled feature [B, D], attention weights [B, P])."""
        logits = torch.einsum("bk,bpk->bp", self.query(text), self.key(patches)) / math.sqrt(self.key_dim)
        attn = logits.softmax(dim=-1)
        pooled = torch.einsum("bp,bpd->bd", attn, self.value(patches))
        return F.normalize(pooled, dim=-1), attn


class RunningMoments(nn.Module):
    """Exponential moving mean and (diagonal) variance of a stream of vectors; the first update initialises them."""

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch [B, dim] into the statistics."""
        x = x.detach().float().reshape(len(x), -1).to(self.mean.device)
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        if int(self.count) == 0:
            self.mean.copy_(mean)
            self.var.copy_(var)
        else:
            m = self.momentum
            self.mean.mul_(1 - m).add_(m * mean)
            self.var.mul_(1 - m).add_(m * var)
        self.count += len(x)

    def standardise(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps), per dimension."""
        return (x - self.mean.to(x.device)) / (self.var.to(x.device) + eps).sqrt()


def mahalanobis_energy(residual: torch.Tensor, moments: RunningMoments) -> torch.Tensor:
    """Diagonal Mahalanobis energy mean_d ((r_d - mu_d)^2 / var_d) of residuals [B, D] under running moments."""
    return moments.standardise(residual.float()).pow(2).mean(dim=-1)


def rarity_weights(z: torch.Tensor, beta: float, max_weight: float = 0.0) -> torch.Tensor:
    """w = 1 + beta * softplus(z), normalised to mean 1 (optionally capped at ``max_weight`` before normalising)."""
    w = 1 + beta * F.softplus(z)
    if max_weight > 0:
        w = w.clamp(max=max_weight)
    return w / w.mean().clamp_min(1e-8)


@dataclasses.dataclass
class MeltRarityOptions(Config):
    """Options of ``melt_rarity``."""

    beta: float = 1.0  # strength of the rarity up-weighting
    momentum: float = 0.05  # EMA rate of the running residual and score statistics
    warmup_steps: int = 10  # weights are 1 until the running statistics have seen this many steps
    key_dim: int = 64  # width of the attention-pooling query/key projections
    align_weight: float = 0.1  # weight of the InfoNCE that trains the attention pooling (pooled <-> text)
    align_temperature: float = 0.07
    max_weight: float = 0.0  # cap on a raw weight before normalising; 0: no cap
    shift_tokens: bool = False  # MELT's corrective token shift: not supported (see MeltRarity)


@STAGE2_COMPONENTS.register("melt_rarity")
class MeltRarity(Stage2Component):
    """MELT's rarity-aware re-weighting of the composing loss.

    Paper: "MELT: Modification frEquentation-rarity baLance neTwork" (ICASSP 2026):
    rare modifications are under-fitted because frequent ones dominate the
    gradient; MELT scores how unusual each modification is relative to its
    reference image and up-weights rare ones.

    Per triplet i (e_i = frozen CLIP text feature of the modification, X_i = the
    reference's projected patch tokens):
        p_i  = AttnPool(query = e_i, keys/values = X_i)            (learned W_q, W_k, W_v)
        r_i  = e_i - p_i                                           (what the text asks beyond the image)
        E_i  = mean_d (r_id - mu_d)^2 / var_d                      (Mahalanobis energy, running EMA mean/var)
        u_i  = E_i * (1 - sigmoid(cos(e_i, p_i)))
        z_i  = (u_i - m_u) / sqrt(v_u)                             (running EMA mean/var of u)
        w_i  = 1 + beta * softplus(z_i), normalised to mean 1 over the batch
    and the InfoNCE rows are weighted by w (weights are detached).

    Where ours differs: the covariance is *diagonal* (not full or low-rank), so
    E is a per-dimension standardised energy; the attention pooling is trained
    by a small auxiliary InfoNCE aligning p_i with e_i (``align_weight``),
    because the weights are detached and give it no gradient; the statistics
    are updated on the global batch after the weights are computed. MELT's
    corrective shift of the pseudo tokens (``shift_tokens``) is not supported:
    Stage2Module encodes the query before components run and the Composer has
    no slot to carry a text-dependent token shift to inference, so training
    with it would create a train/test mismatch. Without patch tokens (phi
    without VSI) the reference's pooled feature is the only "patch".
    """

    name = "melt_rarity"
    uses_text_features = True

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(MeltRarityOptions, self.name, options)
        check_option(not o.shift_tokens, self.name,
               "shift_tokens is not supported: Stage2Module has no hook before the text encoder and the Composer "
               "cannot carry the shift to inference")
        check_option(0 < o.momentum <= 1, self.name, f"momentum must be in (0, 1], got {o.momentum}")
        check_option(o.beta >= 0, self.name, f"beta must be >= 0, got {o.beta}")
        dim = int(ctx.triplets.target.shape[1])
        self.pool = TextGuidedPooling(dim, o.key_dim)
        self.residual_moments = RunningMoments(dim, o.momentum)
        self.score_moments = RunningMoments(1, o.momentum)
        self.updates = 0
        self.last: Dict[str, float] = {}

    def modules(self) -> Dict[str, nn.Module]:
        """The attention pooling (its running statistics are buffers inside the component state)."""
        return {"pool": self.pool}

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach the cached modification-text features of the batch."""
        feats = self.ctx.text_features()
        batch["melt_text"] = feats[indices.cpu()].to(batch["target"].device)

    def forward(self, module: nn.Module, batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Attention-pool the reference patches with the text feature as query."""
        text = batch["melt_text"]
        patches = batch["ref_patches"] if batch["ref_patches"] is not None else batch["ref_pooled"].unsqueeze(1)
        pooled, _ = self.pool(text, patches.to(text.dtype))
        out["melt_text"] = text
        out["melt_pooled"] = pooled

    @torch.no_grad()
    def rarity_scores(self, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """u = E(r) * (1 - sigmoid(cos(e, p))) under the current running statistics."""
        residual = text.float() - pooled.float()
        energy = mahalanobis_energy(residual, self.residual_moments)
        return energy * (1 - torch.sigmoid(F.cosine_similarity(text.float(), pooled.float(), dim=-1)))

    def sample_weights(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Rarity weights of the (global) batch; updates the running statistics."""
        text, pooled = out["melt_text"].detach().float(), out["melt_pooled"].detach().float()
        with torch.no_grad():
            first = self.updates == 0
            residual = text - pooled
            if first:  # the first batch initialises the statistics it is scored against
                self.residual_moments.update(residual)
            u = self.rarity_scores(text, pooled)
            if first:
                self.score_moments.update(u.unsqueeze(1))
            z = self.score_moments.standardise(u.unsqueeze(1)).squeeze(1)
            w = rarity_weights(z, self.opts.beta, self.opts.max_weight)
            if not first:
                self.residual_moments.update(residual)
                self.score_moments.update(u.unsqueeze(1))
            self.updates += 1
            self.last = {"melt_weight_max": float(w.max()), "melt_z_mean": float(z.mean())}
        if self.updates <= self.opts.warmup_steps:
            return None
        return w.to(out["query"].dtype)

    @torch.no_grad()
    def triplet_weights(self, batch_size: int = 256) -> torch.Tensor:
        """Un-normalised weights 1 + beta * softplus(z) of every triplet under the current pooling and statistics."""
        t = self.ctx.triplets
        text = self.ctx.text_features()
        device = next(self.pool.parameters()).device
        was = self.pool.training
        self.pool.eval()
        out = []
        for s in range(0, len(t), batch_size):
            e = text[s: s + batch_size].to(device)
            x = t.ref_patches[s: s + batch_size] if t.ref_patches is not None else t.ref_pooled[s: s + batch_size].unsqueeze(1)
            pooled, _ = self.pool(e, x.to(device, e.dtype))
            z = self.score_moments.standardise(self.rarity_scores(e, pooled).unsqueeze(1)).squeeze(1)
            out.append((1 + self.opts.beta * F.softplus(z)).cpu())
        self.pool.train(was)
        return torch.cat(out) if out else torch.empty(0)

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """Auxiliary InfoNCE that trains the attention pooling (pooled feature <-> its modification text)."""
        logs = dict(self.last)
        if self.opts.align_weight <= 0:
            return None, logs
        logits = out["melt_pooled"] @ out["melt_text"].T.to(out["melt_pooled"].dtype) / self.opts.align_temperature
        ce = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
        logs["melt_align"] = float(ce.detach())
        return self.opts.align_weight * ce, logs

    def state(self) -> Dict[str, torch.Tensor]:
        """Running statistics (so a resumed run weights the same way)."""
        return {
            "residual_mean": self.residual_moments.mean, "residual_var": self.residual_moments.var,
            "residual_count": self.residual_moments.count, "score_mean": self.score_moments.mean,
            "score_var": self.score_moments.var, "score_count": self.score_moments.count,
            "updates": torch.tensor(self.updates),
        }

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state`."""
        if "updates" not in tensors:
            return
        for prefix, moments in (("residual", self.residual_moments), ("score", self.score_moments)):
            moments.mean.copy_(tensors[f"{prefix}_mean"])
            moments.var.copy_(tensors[f"{prefix}_var"])
            moments.count.copy_(tensors[f"{prefix}_count"])
        self.updates = int(tensors["updates"])


# ===================================================================== MELT: inverse frequency

_STOPWORDS = frozenset(
    "a an the it its it's is are be to of in on at by for with and or but that this these those them they "
    "make change turn put move let have has from into onto so as than then there their one ones some any all "
    "should would could can please instead also more less very now just same image photo picture show shows "
    "i want like looks look".split()
)
_WORD = re.compile(r"[a-z]+")


def content_words(text: str) -> List[str]:
    """Lower-case alphabetic words of a text that are not stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 1]


def frequency_keys(kinds: Sequence[str], texts: Sequence[str]) -> List[str]:
    """The key each triplet is counted under: its kind, or (no kind) the rarest content word of its text."""
    doc_freq: Counter = Counter()
    for t in texts:
        doc_freq.update(set(content_words(t)))
    keys = []
    for kind, text in zip(kinds, texts):
        if kind:
            keys.append(f"kind:{kind}")
            continue
        words = content_words(text)
        keys.append(f"word:{min(words, key=lambda w: (doc_freq[w], w))}" if words else "word:")
    return keys


def inverse_frequency_weights(keys: Sequence[str], alpha: float) -> torch.Tensor:
    """Per-item weights freq(key)^-alpha (not normalised)."""
    freq = Counter(keys)
    return torch.tensor([freq[k] ** (-alpha) for k in keys], dtype=torch.float32)


@dataclasses.dataclass
class InverseFrequencyOptions(Config):
    """Options of ``inverse_frequency``."""

    alpha: float = 0.5  # 1: full inverse frequency; 0: uniform
    max_ratio: float = 0.0  # cap on a weight relative to the most frequent key's weight; 0: no cap


@STAGE2_COMPONENTS.register("inverse_frequency")
class InverseFrequency(Stage2Component):
    """Per-sample loss weights proportional to 1 / freq(kind)^alpha (MELT's cheap baseline).

    w_i = freq(k_i)^-alpha / mean over the batch, where k_i is the triplet's kind
    (counted over the whole triplet set) or, for triplets without a kind, the
    rarest content word of the modification text (by document frequency).
    Where ours differs: MELT re-balances by a learned rarity score
    (``melt_rarity``); this is the label-count heuristic it is compared with.
    """

    name = "inverse_frequency"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(InverseFrequencyOptions, self.name, options)
        check_option(o.alpha >= 0, self.name, f"alpha must be >= 0, got {o.alpha}")
        t = ctx.triplets
        self.keys = frequency_keys(t.kinds, t.modifications)
        w = inverse_frequency_weights(self.keys, o.alpha)
        if o.max_ratio > 0:
            w = w.clamp(max=float(w.min()) * o.max_ratio)
        self.table = w

    def sample_weights(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Weights of the global batch, mean 1."""
        w = self.table[out["index"].long().cpu()].to(out["query"].device, out["query"].dtype)
        return w / w.mean().clamp_min(1e-8)


# ======================================================================= MELT: denoising

def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal fractions alpha_bar(t), t = 0..steps, of the cosine schedule (alpha_bar(0) = 1)."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f / f[0]).clamp(min=1e-5, max=1.0).float()


class ScoreDenoiser(nn.Module):
    """MLP that predicts the clean score vector x0 [B, L] from a noised one x_t and the step t."""

    def __init__(self, length: int, steps: int, hidden: int = 128, time_dim: int = 16) -> None:
        super().__init__()
        self.length, self.steps, self.time_dim = length, steps, time_dim
        self.net = nn.Sequential(
            nn.Linear(length + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, length)
        )
        self.register_buffer("alpha_bar", cosine_alpha_bar(steps), persistent=False)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding [B, time_dim] of integer steps t [B]."""
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / max(1, half - 1))
        angle = t.float().unsqueeze(1) / self.steps * 1000.0 * freqs
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted x0 (the residual form x_t + net(...) keeps small-t predictions near the input)."""
        return x_t + self.net(torch.cat([x_t, self.time_embedding(t)], dim=1))

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x0) = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
        ab = self.alpha_bar.to(x0.device)[t].unsqueeze(1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def diffusion_loss(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x0-prediction loss: MSE between the denoised prediction and x0, t ~ U{1..T}, eps ~ N(0, I)."""
        t = torch.randint(1, self.steps + 1, (len(x0),), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        return F.mse_loss(self(self.noise(x0, t, eps), t), x0)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, start: int, sample_steps: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise x to step ``start`` and run the deterministic DDIM reverse process in ``sample_steps`` jumps to 0."""
        start = max(1, min(self.steps, start))
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        ts = torch.linspace(start, 0, sample_steps + 1).round().long().tolist()
        x_t = self.noise(x, torch.full((len(x),), start, device=x.device, dtype=torch.long), eps)
        ab = self.alpha_bar.to(x.device)
        x0 = x_t
        for t, t_next in zip(ts[:-1], ts[1:]):
            if t == t_next:
                continue
            x0 = self(x_t, torch.full((len(x),), t, device=x.device, dtype=torch.long))
            eps_hat = (x_t - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt().clamp_min(1e-6)
            x_t = ab[t_next].sqrt() * x0 + (1 - ab[t_next]).sqrt() * eps_hat
        return x0


def score_vectors(logits: torch.Tensor, mask: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: [positive (diagonal), top-(length-1) negatives by score]; returns (scores, columns, valid) [B, length].

    ``mask`` [B, B] marks columns that are not negatives (near duplicates); they
    are ranked last and reported invalid.
    """
    b = logits.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    banned = mask | eye
    ranked = logits.detach().masked_fill(banned, float("-inf"))
    top = ranked.topk(length - 1, dim=1)
    cols = torch.cat([torch.arange(b, device=logits.device).unsqueeze(1), top.indices], dim=1)
    valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=logits.device), torch.isfinite(top.values)], dim=1)
    return logits.gather(1, cols), cols, valid


def masked_standardise(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-standardise x over its valid entries; invalid entries take the row's valid minimum. Returns (z, mean, std)."""
    n = valid.sum(1, keepdim=True).clamp_min(1)
    xv = x.masked_fill(~valid, 0.0)
    mean = xv.sum(1, keepdim=True) / n
    var = ((x - mean).masked_fill(~valid, 0.0) ** 2).sum(1, keepdim=True) / n
    std = var.sqrt() + eps
    z = (x - mean) / std
    low = z.masked_fill(~valid, float("inf")).min(1, keepdim=True).values
    return torch.where(valid, z, low), mean, std


@dataclasses.dataclass
class MeltDenoiseOptions(Config):
    """Options of ``melt_denoise``."""

    length: int = 16  # L: the positive + the top L-1 in-batch negatives
    diffusion_steps: int = 20  # T of the cosine schedule
    sample_steps: int = 4  # DDIM jumps of the reverse process
    strength: float = 0.5  # the current scores are noised to step round(strength * T) before denoising
    sharpen: float = 2.0  # teacher x0 = standardised scores + sharpen * one-hot(positive)
    lambda_kd: float = 0.3  # weight of KL(softmax(denoised) || softmax(student))
    lambda_diff: float = 0.1  # weight of the denoiser's own diffusion loss
    kd_temperature: float = 1.0
    kd_start: int = 20  # distil only after the denoiser has trained this many steps
    hidden: int = 128


@STAGE2_COMPONENTS.register("melt_denoise")
class MeltDenoise(Stage2Component):
    """MELT's diffusion-based similarity denoising, used as a self-distillation target.

    Paper: MELT (ICASSP 2026) denoises the query's similarity scores with a
    diffusion model so that hard negatives that score too close to the target
    are suppressed, then trains with contrastive + lambda_kd * KD + lambda_diff * diffusion
    (defaults 0.3 and 0.1 as in MELT).

    Here, per row i of the global batch: v_i = [s_ii, top-(L-1) s_ij, j != i] of
    the scaled student logits (negatives sorted by score); x_i = row-standardised
    v_i (detached). Teacher clean sample x0_i = x_i + sharpen * onehot(0).
    Diffusion: cosine schedule with T steps, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps;
    the denoiser (MLP over [x_t, time embedding]) predicts **x0** (not eps),
    loss_diff = ||f(x_t, t) - x0||^2. Soft target: noise the *current* x_i to
    step round(strength * T), run DDIM (deterministic) in ``sample_steps`` jumps
    to get x^_i, de-standardise to logits, p_i = softmax(x^_i / T_kd).
    loss_kd = KL(p_i || softmax(v_i / T_kd)) (gradient into the student only).
    Term added = lambda_kd * loss_kd + lambda_diff * loss_diff (the main InfoNCE is
    the contrastive part). Where ours differs: MELT denoises at retrieval time
    too; here it is a training-time target only (the re-ranker of
    :mod:`zscir.search.rerank` is our inference-time denoiser); negatives are in-batch
    targets, not the gallery.
    """

    name = "melt_denoise"

    def __init__(self, ctx: ComponentContext, options: Dict[str, Any]) -> None:
        super().__init__(ctx, options)
        self.opts = o = parse_options(MeltDenoiseOptions, self.name, options)
        check_option(o.length >= 2, self.name, f"length must be >= 2, got {o.length}")
        check_option(o.length <= ctx.cfg.train.batch_size, self.name,
               f"length {o.length} must be <= the batch size {ctx.cfg.train.batch_size}")
        check_option(o.diffusion_steps >= 2 and o.sample_steps >= 1, self.name, "need diffusion_steps >= 2 and sample_steps >= 1")
        check_option(0 < o.strength <= 1, self.name, f"strength must be in (0, 1], got {o.strength}")
        self.denoiser = ScoreDenoiser(o.length, o.diffusion_steps, o.hidden)
        self._seed = ctx.cfg.train.seed * 7907 + 3

    def modules(self) -> Dict[str, nn.Module]:
        """The score denoiser (trained by its diffusion loss)."""
        return {"denoiser": self.denoiser}

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """lambda_kd * KL(denoised teacher || student) + lambda_diff * diffusion loss."""
        o = self.opts
        q, t = out["query"], out["target"]
        logits = clamped_scale(out["log_scale"]) * q @ t.T
        length = min(o.length, len(q))
        if length < 2:
            return None, {}
        dup = duplicate_mask(t, self.ctx.cfg.dup_threshold, out["target_code"])
        student, _, valid = score_vectors(logits, dup, length)
        if length < o.length:  # a short last batch: pad to the denoiser's width with invalid slots
            pad = o.length - length
            student = torch.cat([student, student[:, -1:].expand(-1, pad)], dim=1)
            valid = torch.cat([valid, torch.zeros(len(q), pad, dtype=torch.bool, device=q.device)], dim=1)
        x, mean, std = masked_standardise(student.detach().float(), valid)
        x0 = x.clone()
        x0[:, 0] += o.sharpen
        g = torch.Generator().manual_seed(self._seed + step)
        diff = self.denoiser.diffusion_loss(x0, g)
        logs = {"melt_diffusion": float(diff.detach())}
        total = o.lambda_diff * diff
        if step >= o.kd_start and o.lambda_kd > 0:
            was = self.denoiser.training
            self.denoiser.eval()
            denoised = self.denoiser.sample(x, round(o.strength * o.diffusion_steps), o.sample_steps, g)
            self.denoiser.train(was)
            teacher = (denoised * std + mean) / o.kd_temperature
            kd = masked_kl(teacher, student.float() / o.kd_temperature, valid)
            logs["melt_kd"] = float(kd.detach())
            total = total + o.lambda_kd * kd
        return total, logs
