"""Published composed-retrieval training ideas as pluggable Stage-II components.

Every class here is a :class:`~zscir.train.stage2.Stage2Component` registered in
``STAGE2_COMPONENTS`` (all off by default; switch one on by naming it in
``Stage2Config.components`` and give options in
``Stage2Config.component_options[name]``, a dict checked strictly).

Notation: q_i composed query, t_i target, r_i reference (all unit-norm), e_i the
frozen CLIP text feature of the modification text of triplet i, s(a, b) = <a, b>.

MELT (Modification frEquentation-rarity baLance neTwork, ICASSP 2026)
    ``melt_rarity``      rarity-aware per-sample loss weights (+ text-guided attention pooling)
    ``inverse_frequency`` the cheap 1/freq(kind)^alpha alternative
    ``melt_denoise``     diffusion-based similarity denoising as a distillation target
SPN (Feng et al., "Scaling Positives and Negatives", ACM MM 2024)
    positives: :mod:`zscir.data.triplet_gen` (``similarity-pair`` mode);
    ``bank``             negatives from a static, deduplicated image bank (the second
                         stage itself is :mod:`zscir.train.bank`)
DQE-CIR (distinctive query embeddings, 2026)
    ``dqe_mid_zone``     target-relative mid-zone negative sampling
    ``dqe_pairwise``     pairwise -log sigmoid((s_t - s_n) / tau) objective
    ``dqe_attributes``   attribute-aware sub-queries with text-predicted weights + margin loss

All components are *training-time* objectives: the deployed query is always the
Composer's own composed embedding, so models train with any combination and save
and load exactly like plain Stage II. Learned heads that only shape the training
signal (the attention pooling of ``melt_rarity``, the denoiser of
``melt_denoise``, the attribute maps of ``dqe_attributes``) are checkpointed with
the training state but are not part of the saved Composer.

Per-sample tensors a component needs in its loss are put into ``out`` inside
``forward`` (so they are all-gathered across processes); the loss side only
reads ``out``, never the (local) ``batch``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from .stage2 import STAGE2_COMPONENTS, Stage2Component

# ----------------------------------------------------------------------------- shared helpers

_TEXT_FEATURES: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def parse_options(cls: type, name: str, options: Dict[str, Any]) -> Any:
    """A component's options dataclass from its ``component_options`` dict (unknown keys name the component)."""
    if not isinstance(options, dict):
        raise ConfigError(f"component_options[{name!r}]: expected a dict of options, got {type(options).__name__}")
    try:
        return cls.from_dict(dict(options), source=f"component_options[{name!r}]")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # bad values surface from the options' __post_init__ checks
        raise ConfigError(f"component_options[{name!r}]: {err}") from None


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"component_options[{name!r}]: {message}")


@torch.no_grad()
def modification_text_features(task: Any, batch_size: int = 512) -> torch.Tensor:
    """Normalised CLIP text features [N, D] of every triplet's modification text, computed once per task.

    Computed on first use, i.e. before the first optimiser step, when the
    adapters are still zero (bottleneck, LoRA): this is the frozen CLIP text
    feature. (On a composer whose adapters were already trained, e.g. in the
    bank stage, it is the adapted text encoder's feature at the start of the run.)
    """
    feats = _TEXT_FEATURES.get(task)
    if feats is None:
        backbone = task.composer.backbone
        texts = list(task.triplets.modifications)
        was = backbone.training
        backbone.eval()
        parts = [backbone.encode_text([t or " " for t in texts[s: s + batch_size]], normalize=True).float()
                 for s in range(0, len(texts), batch_size)]
        backbone.train(was)
        feats = torch.cat(parts) if parts else torch.empty(0, backbone.embed_dim)
        _TEXT_FEATURES[task] = feats
    return feats


def text_feature_state(task: Any, owner: Stage2Component) -> Dict[str, torch.Tensor]:
    """The cached modification-text features as checkpoint tensors, from the first component that uses them.

    A resumed run must not re-encode them with the by-then trained adapters;
    one copy is saved however many components share the cache.
    """
    first = next((c for c in task.components if getattr(c, "uses_text_features", False)), None)
    feats = _TEXT_FEATURES.get(task)
    return {} if feats is None or first is not owner else {"text_features": feats}


def load_text_feature_state(task: Any, tensors: Dict[str, torch.Tensor]) -> None:
    """Restore :func:`text_feature_state`."""
    if "text_features" in tensors:
        _TEXT_FEATURES[task] = tensors["text_features"].float()


def _global_index(out: Dict[str, torch.Tensor]) -> torch.Tensor:
    return out["index"].long()


def _duplicate_mask(target: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, B] True where target j is a near duplicate of target i (diagonal excluded)."""
    dup = (target @ target.T) >= threshold
    return dup & ~torch.eye(len(target), dtype=torch.bool, device=target.device)


def _find(task: Any, cls: type) -> Optional[Stage2Component]:
    return next((c for c in task.components if isinstance(c, cls)), None)


# ============================================================================ MELT: rarity

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

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = o = parse_options(MeltRarityOptions, self.name, options)
        _check(not o.shift_tokens, self.name,
               "shift_tokens is not supported: Stage2Module has no hook before the text encoder and the Composer "
               "cannot carry the shift to inference")
        _check(0 < o.momentum <= 1, self.name, f"momentum must be in (0, 1], got {o.momentum}")
        _check(o.beta >= 0, self.name, f"beta must be >= 0, got {o.beta}")
        dim = int(task.triplets.target.shape[1])
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
        feats = modification_text_features(self.task)
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
        t = self.task.triplets
        text = modification_text_features(self.task)
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

    def loss(self, out, batch, step, main_logits):
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
            "updates": torch.tensor(self.updates), **text_feature_state(self.task, self),
        }

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state`."""
        load_text_feature_state(self.task, tensors)
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

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = o = parse_options(InverseFrequencyOptions, self.name, options)
        _check(o.alpha >= 0, self.name, f"alpha must be >= 0, got {o.alpha}")
        t = task.triplets
        self.keys = frequency_keys(t.kinds, t.modifications)
        w = inverse_frequency_weights(self.keys, o.alpha)
        if o.max_ratio > 0:
            w = w.clamp(max=float(w.min()) * o.max_ratio)
        self.table = w

    def sample_weights(self, out, batch):
        """Weights of the global batch, mean 1."""
        w = self.table[_global_index(out).cpu()].to(out["query"].device, out["query"].dtype)
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


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)) restricted to valid entries."""
    t_log = F.log_softmax(teacher_logits.masked_fill(~valid, float("-inf")), dim=1)
    s_log = F.log_softmax(student_logits.masked_fill(~valid, float("-inf")), dim=1)
    terms = (t_log.exp() * (t_log - s_log)).masked_fill(~valid, 0.0)
    return terms.sum(1).mean()


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

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = o = parse_options(MeltDenoiseOptions, self.name, options)
        _check(o.length >= 2, self.name, f"length must be >= 2, got {o.length}")
        _check(o.length <= task.cfg.train.batch_size, self.name,
               f"length {o.length} must be <= the batch size {task.cfg.train.batch_size}")
        _check(o.diffusion_steps >= 2 and o.sample_steps >= 1, self.name, "need diffusion_steps >= 2 and sample_steps >= 1")
        _check(0 < o.strength <= 1, self.name, f"strength must be in (0, 1], got {o.strength}")
        self.denoiser = ScoreDenoiser(o.length, o.diffusion_steps, o.hidden)
        self._seed = task.cfg.train.seed * 7907 + 3

    def modules(self) -> Dict[str, nn.Module]:
        """The score denoiser (trained by its diffusion loss)."""
        return {"denoiser": self.denoiser}

    def loss(self, out, batch, step, main_logits):
        """lambda_kd * KL(denoised teacher || student) + lambda_diff * diffusion loss."""
        o = self.opts
        q, t = out["query"], out["target"]
        logits = out["log_scale"].exp().clamp(max=100) * q @ t.T
        length = min(o.length, len(q))
        if length < 2:
            return None, {}
        dup = _duplicate_mask(t, self.task.cfg.dup_threshold)
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


# ============================================================================ SPN: bank

@dataclasses.dataclass
class BankOptions(Config):
    """Options of ``bank``."""

    negatives: int = 0  # bank negatives per step (shared by the batch); 0: the whole bank
    weight: float = 1.0
    dup_threshold: float = -1.0  # cosine at which a bank image counts as the target/reference; <0: Stage2Config's


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


@STAGE2_COMPONENTS.register("bank")
class BankNegatives(Stage2Component):
    """SPN's static negative bank: InfoNCE whose denominator runs over a pre-encoded image bank.

    Paper: Feng et al., "Improving Composed Image Retrieval via Contrastive
    Learning with Scaling Positives and Negatives" (ACM MM 2024), second stage:
    with the image side frozen, every gallery/training image is encoded once
    into a static bank and the query side is fine-tuned with InfoNCE over
    [target, whole bank]. Bank = ``task.corpus`` (normalised, deduplicated by
    :func:`zscir.train.bank.deduplicate`).

    Term = weight * mean_i CE([s_it, s_ij for j in bank or a sample of ``negatives``]),
    scaled by the learnable logit scale, bank entries with cosine >= dup_threshold
    to the target or the reference masked. Where ours differs: the bank term is
    added to (not a replacement of) the in-batch InfoNCE of Stage II, and a
    sampled bank is shared by the whole batch (one index draw per step).
    """

    name = "bank"

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = o = parse_options(BankOptions, self.name, options)
        if task.corpus is None or len(task.corpus.features) == 0:
            raise ValueError("the 'bank' component needs a bank of image features (corpus=Corpus(...))")
        _check(o.negatives >= 0, self.name, f"negatives must be >= 0, got {o.negatives}")
        self.threshold = o.dup_threshold if o.dup_threshold >= 0 else task.cfg.dup_threshold
        self._seed = task.cfg.train.seed * 104729 + 11
        self._device_bank: Optional[torch.Tensor] = None

    def bank_features(self, device: torch.device) -> torch.Tensor:
        """The bank on the training device (moved once)."""
        if self._device_bank is None or self._device_bank.device != device:
            self._device_bank = self.task.corpus.features.to(device)
        return self._device_bank

    def loss(self, out, batch, step, main_logits):
        """weight * InfoNCE over [target, bank]."""
        q = out["query"]
        bank = self.bank_features(q.device)
        if 0 < self.opts.negatives < len(bank):
            g = torch.Generator().manual_seed(self._seed + step)
            bank = bank[torch.randperm(len(bank), generator=g)[: self.opts.negatives].to(q.device)]
        scale = out["log_scale"].exp().clamp(max=100)
        ce = bank_info_nce(q, out["target"], out["reference"], bank, scale, self.threshold)
        return self.opts.weight * ce, {"bank": float(ce.detach())}


# ======================================================================== DQE: mid-zone

@dataclasses.dataclass
class MidZoneOptions(Config):
    """Options of ``dqe_mid_zone``."""

    bounds: str = "value"  # "value": lo/hi are deltas in cosine units; "quantile": per-row quantiles of delta
    lo: float = -0.15  # deltas below: easy negatives (skipped)
    hi: float = -0.01  # deltas above: likely false negatives (skipped)
    per_query: int = 4  # negatives per query and step
    pool: int = 32  # zone members kept per triplet at each refresh
    refresh_every: int = 0  # steps between refreshes with the current model; 0: Stage2Config.refresh_every
    warmup_steps: int = 20  # random negatives before the first refresh
    candidates: str = "auto"  # "corpus", "targets" (the triplets' own targets) or "auto" (corpus if given)

    def __post_init__(self) -> None:
        if self.bounds not in ("value", "quantile"):
            raise ValueError(f"bounds must be 'value' or 'quantile', got {self.bounds!r}")
        if self.candidates not in ("auto", "corpus", "targets"):
            raise ValueError(f"candidates must be 'auto', 'corpus' or 'targets', got {self.candidates!r}")
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) must be <= hi ({self.hi})")
        if self.bounds == "quantile" and not (0 <= self.lo <= 1 and 0 <= self.hi <= 1):
            raise ValueError(f"quantile bounds must be in [0, 1], got lo={self.lo}, hi={self.hi}")
        if self.per_query < 1 or self.pool < 1:
            raise ValueError(f"per_query and pool must be >= 1, got {self.per_query}, {self.pool}")


@torch.no_grad()
def mid_zone_table(queries: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor, lo: float, hi: float,
                   pool: int, bounds: str = "value", dup_threshold: float = 0.98,
                   generator: Optional[torch.Generator] = None, chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``pool`` mid-zone candidates per query; returns (table [N, pool] of indices or -1, zone sizes [N]).

    delta_ij = s(q_i, c_j) - s(q_i, t_i); the zone is lo <= delta <= hi (values,
    or per-row quantiles of delta when ``bounds="quantile"``), never a candidate
    with s(t_i, c_j) >= dup_threshold. A row with an empty zone falls back to its
    highest-delta candidates below the zone (the hardest easy negatives).
    """
    n, m = len(queries), len(candidates)
    pool = min(pool, m)
    table = torch.full((n, pool), -1, dtype=torch.long)
    sizes = torch.zeros(n, dtype=torch.long)
    cand = candidates.float()
    for s in range(0, n, chunk):
        q, t = queries[s: s + chunk].float(), targets[s: s + chunk].float()
        delta = q @ cand.T - (q * t).sum(-1, keepdim=True)
        dup = (t @ cand.T) >= dup_threshold
        if bounds == "quantile":
            d = delta.masked_fill(dup, float("nan"))
            lo_v = torch.nanquantile(d, lo, dim=1, keepdim=True)
            hi_v = torch.nanquantile(d, hi, dim=1, keepdim=True)
        else:
            lo_v = torch.full((len(q), 1), lo)
            hi_v = torch.full((len(q), 1), hi)
        zone = (delta >= lo_v) & (delta <= hi_v) & ~dup
        sizes[s: s + len(q)] = zone.sum(1)
        noise = torch.rand(delta.shape, generator=generator)
        pick = noise.masked_fill(~zone, float("-inf")).topk(pool, dim=1)
        rows = pick.indices.masked_fill(~torch.isfinite(pick.values), -1)
        below = delta.masked_fill(~((delta < lo_v) & ~dup), float("-inf")).topk(pool, dim=1)
        fallback = below.indices.masked_fill(~torch.isfinite(below.values), -1)
        empty = (zone.sum(1) == 0).unsqueeze(1)
        table[s: s + len(q)] = torch.where(empty, fallback, rows)
    return table, sizes


@STAGE2_COMPONENTS.register("dqe_mid_zone")
class MidZoneNegatives(Stage2Component):
    """DQE-CIR's target-relative negative sampling from a "mid zone".

    Paper: DQE-CIR (distinctive query embeddings, 2026): negatives chosen by
    absolute rank are often false negatives (images as good as the target) or
    trivial; DQE-CIR selects them *relative to the target's score*.
    For triplet i and candidate image c: delta = s(q_i, c) - s(q_i, t_i). Easy
    negatives (delta < lo) teach nothing; likely false negatives (delta > hi,
    near or above 0: the model already ranks them like the target) are skipped;
    near duplicates of the target (cosine >= dup_threshold) never count. Every
    ``refresh_every`` steps all queries are re-encoded with the current model
    (``task.encode_all_queries()``) and up to ``pool`` zone members per triplet
    are kept; each step samples ``per_query`` of them per row as extra negatives
    of the main InfoNCE. For the first ``warmup_steps`` the negatives are random
    candidates. Candidates: the corpus if given, else the triplets' own targets.
    Where ours differs: the zone is refreshed periodically, not every step, and
    an empty zone falls back to the hardest easy negatives.
    """

    name = "dqe_mid_zone"

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = o = parse_options(MidZoneOptions, self.name, options)
        use_corpus = o.candidates == "corpus" or (o.candidates == "auto" and task.corpus is not None)
        if use_corpus and task.corpus is None:
            raise ValueError("dqe_mid_zone: candidates='corpus' needs a corpus (corpus=Corpus(...))")
        self.candidates = (task.corpus.features if use_corpus else task.triplets.target).float()
        self.refresh_every = o.refresh_every or task.cfg.refresh_every
        self.table: Optional[torch.Tensor] = None
        self.zone_size = 0.0
        self._seed = task.cfg.train.seed * 6151 + 5

    def refresh(self, step: int) -> None:
        """Re-encode every query and re-sample each triplet's mid-zone pool."""
        queries = self.task.encode_all_queries().float().cpu()
        g = torch.Generator().manual_seed(self._seed + step)
        table, sizes = mid_zone_table(queries, self.task.triplets.target.float(), self.candidates, self.opts.lo,
                                      self.opts.hi, self.opts.pool, self.opts.bounds, self.task.cfg.dup_threshold, g)
        self.table = table
        self.zone_size = float(sizes.float().mean())

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach [B, per_query, D] negatives (random during warm-up) and their invalid mask."""
        step = batch["step"]
        k = self.opts.per_query
        g = torch.Generator().manual_seed(self._seed * 3 + step)
        if step < self.opts.warmup_steps:
            chosen = torch.randint(0, len(self.candidates), (len(indices), k), generator=g)
        else:
            if self.table is None:
                self.refresh(step)
            pool = self.table[indices.cpu()]
            # sample among each row's valid entries
            counts = (pool >= 0).sum(1, keepdim=True).clamp_min(1)
            pick = (torch.rand(len(indices), k, generator=g) * counts).long()
            chosen = torch.gather(pool, 1, pick)
        invalid = chosen < 0
        feats = self.candidates[chosen.clamp_min(0)]
        target = self.task.triplets.target[indices.cpu()].float()
        invalid |= torch.einsum("bd,bkd->bk", target, feats) >= self.task.cfg.dup_threshold
        dev = batch["target"].device
        batch["dqe_neg"] = feats.to(dev)
        batch["dqe_neg_invalid"] = invalid.to(dev)

    def forward(self, module, batch, out):
        """Pass the negatives through (gathered with the batch)."""
        out["dqe_neg"] = batch["dqe_neg"]
        out["dqe_neg_invalid"] = batch["dqe_neg_invalid"]

    def extra_negatives(self, out, batch):
        """The sampled mid-zone negatives."""
        return out["dqe_neg"].to(out["query"].dtype), out["dqe_neg_invalid"]

    def loss(self, out, batch, step, main_logits):
        """No extra term; logs the mean zone size."""
        return None, {"dqe_zone_size": self.zone_size}

    def on_step_end(self, step: int) -> None:
        """Refresh every ``refresh_every`` steps after the warm-up."""
        w = self.opts.warmup_steps
        if step >= w and (step - w) % self.refresh_every == 0:
            self.refresh(step)

    def state(self) -> Dict[str, torch.Tensor]:
        """The current pool table."""
        return {} if self.table is None else {"table": self.table}

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore the pool table."""
        if "table" in tensors:
            self.table = tensors["table"]


# ======================================================================== DQE: pairwise

def pairwise_logistic_loss(pos: torch.Tensor, neg: torch.Tensor, tau: float,
                           valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of -log sigmoid((s_t - s_n) / tau) = KL([1, 0] || softmax([s_t, s_n] / tau)) over valid (row, negative) pairs.

    ``pos`` [B], ``neg`` [B, M]; ``valid`` [B, M] selects the pairs that count.
    """
    terms = F.softplus(-(pos.unsqueeze(1) - neg) / tau)
    if valid is None:
        return terms.mean()
    return (terms * valid).sum() / valid.sum().clamp_min(1)


@dataclasses.dataclass
class PairwiseOptions(Config):
    """Options of ``dqe_pairwise``."""

    tau: float = 0.05
    weight: float = 1.0
    negatives: str = "auto"  # "mid_zone", "in_batch" (hardest in-batch targets) or "auto" (mid-zone if on, else in-batch)
    in_batch_k: int = 1  # hardest in-batch negatives per row

    def __post_init__(self) -> None:
        if self.negatives not in ("auto", "mid_zone", "in_batch"):
            raise ValueError(f"negatives must be 'auto', 'mid_zone' or 'in_batch', got {self.negatives!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


@STAGE2_COMPONENTS.register("dqe_pairwise")
class PairwiseObjective(Stage2Component):
    """DQE-CIR's pairwise objective: each negative is compared with the target alone.

    loss = weight * mean over (i, n) of -log sigmoid((s(q_i, t_i) - s(q_i, n)) / tau),
    which equals KL([1, 0] || softmax([s_t, s_n] / tau)), the 2-way softmax CE.
    Unlike InfoNCE, a hard negative's gradient is not diluted by the many easy
    ones. Negatives: the ``dqe_mid_zone`` samples (when that component is on) or
    the ``in_batch_k`` hardest in-batch targets (near duplicates excluded).
    Combined with the main InfoNCE through ``weight``.
    """

    name = "dqe_pairwise"

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = parse_options(PairwiseOptions, self.name, options)
        if self.opts.negatives == "mid_zone" and "dqe_mid_zone" not in task.cfg.components:
            raise ValueError("dqe_pairwise: negatives='mid_zone' needs the 'dqe_mid_zone' component")

    def loss(self, out, batch, step, main_logits):
        """weight * pairwise logistic loss."""
        q, t = out["query"], out["target"]
        pos = (q * t).sum(-1)
        use_zone = "dqe_neg" in out and self.opts.negatives in ("auto", "mid_zone")
        if use_zone:
            neg = torch.einsum("bd,bkd->bk", q, out["dqe_neg"].to(q.dtype))
            valid = ~out["dqe_neg_invalid"]
        else:
            sims = q @ t.T
            banned = _duplicate_mask(t, self.task.cfg.dup_threshold) | torch.eye(len(q), dtype=torch.bool, device=q.device)
            k = min(self.opts.in_batch_k, len(q) - 1)
            if k < 1:
                return None, {}
            top = sims.masked_fill(banned, float("-inf")).topk(k, dim=1)
            valid = torch.isfinite(top.values)
            neg = sims.gather(1, top.indices)
        term = pairwise_logistic_loss(pos, neg.masked_fill(~valid, 0.0), self.opts.tau, valid)
        return self.opts.weight * term, {"dqe_pairwise": float(term.detach())}


# ====================================================================== DQE: attributes

class AttributeQueryHead(nn.Module):
    """Attribute sub-queries q_a = normalise(q + U_a V_a q), mixed by weights softmax(W e + b) from the text feature."""

    def __init__(self, dim: int, num_attributes: int, rank: int = 16) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(num_attributes, dim, rank) / math.sqrt(dim))
        self.up = nn.Parameter(torch.zeros(num_attributes, rank, dim))
        self.weights = nn.Linear(dim, num_attributes)

    def forward(self, query: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sub-queries [B, A, D], attribute weights [B, A], combined query [B, D]); all queries unit-norm."""
        delta = torch.einsum("bd,adr,are->bae", query, self.down, self.up)
        sub = F.normalize(query.unsqueeze(1) + delta, dim=-1)
        w = self.weights(text.to(query.dtype)).softmax(dim=-1)
        combined = F.normalize((w.unsqueeze(-1) * sub).sum(1), dim=-1)
        return sub, w, combined


@dataclasses.dataclass
class AttributeOptions(Config):
    """Options of ``dqe_attributes``."""

    attributes: Tuple[str, ...] = ("color", "shape", "size", "position")
    prompt: str = "the {attribute} changes"  # text whose CLIP feature initialises each attribute's weight row
    prompt_temperature: float = 0.1
    rank: int = 16
    margin: float = 0.1
    weight: float = 0.5
    hard_negatives: int = 3  # hardest in-batch targets used by the margin loss (besides the reference)

    def __post_init__(self) -> None:
        self.attributes = tuple(self.attributes)
        if len(self.attributes) < 2 or len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes must be at least two distinct names, got {list(self.attributes)}")
        if "{attribute}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{attribute}}', got {self.prompt!r}")


@STAGE2_COMPONENTS.register("dqe_attributes")
class AttributeQueries(Stage2Component):
    """DQE-CIR's learnable attribute weights over attribute-aware sub-queries, with an attribute margin loss.

    Paper: DQE-CIR (2026) makes the query distinctive along the attributes the
    modification is about: sub-queries per attribute, weighted by what the text
    mentions.

    Our choice: sub-query q_a = normalise(q + U_a V_a q) with a learned low-rank
    per-attribute map (U_a zero-initialised, so q_a = q at the start), *not* a
    re-encoding of "a photo of $ that {modification}, the {attribute} matters"
    (which costs one extra text-encoder pass per attribute and step). Weights
    w = softmax(W e + b) from the frozen modification-text feature e; row a of W
    is initialised to CLIP("the {attribute} changes") / prompt_temperature, so a
    text mentioning colours starts with a high colour weight. Combined query
    c = normalise(sum_a w_a q_a). Loss (times ``weight``):
        InfoNCE of c over in-batch targets + the reference,
      + mean_i sum_n relu(margin - (s(c, t_i) - s(c, n))) over n = the reference
        and the ``hard_negatives`` hardest in-batch targets (duplicates excluded).
    Gradients flow through q into the adapters; the head itself is training-time
    only (the deployed query is q), see the module docstring.
    """

    name = "dqe_attributes"
    uses_text_features = True

    def __init__(self, task: Any, options: Dict[str, Any]) -> None:
        super().__init__(task, options)
        self.opts = o = parse_options(AttributeOptions, self.name, options)
        dim = int(task.triplets.target.shape[1])
        self.head = AttributeQueryHead(dim, len(o.attributes), o.rank)

    def modules(self) -> Dict[str, nn.Module]:
        """The attribute head."""
        return {"head": self.head}

    @torch.no_grad()
    def init_weights_from_prompts(self) -> None:
        """Weight rows = CLIP text features of the attribute prompts / temperature (done before step 0)."""
        prompts = [self.opts.prompt.format(attribute=a) for a in self.opts.attributes]
        feats = self.task.composer.backbone.encode_text(prompts, normalize=True).float()
        self.head.weights.weight.copy_(feats / self.opts.prompt_temperature)
        self.head.weights.bias.zero_()

    def prepare_batch(self, batch: Dict[str, Any], indices: torch.Tensor) -> None:
        """Attach the cached modification-text features (initialising the weight head before the first step)."""
        if batch["step"] == 0:
            self.init_weights_from_prompts()
        batch["dqe_text"] = modification_text_features(self.task)[indices.cpu()].to(batch["target"].device)

    def forward(self, module, batch, out):
        """Attribute sub-queries, weights and the combined query."""
        _, w, combined = self.head(out["query"], batch["dqe_text"])
        out["dqe_attr_weights"] = w
        out["dqe_combined"] = combined

    def loss(self, out, batch, step, main_logits):
        """weight * (InfoNCE of the combined query + attribute margin loss)."""
        o = self.opts
        c, t, ref = out["dqe_combined"], out["target"], out["reference"].to(out["dqe_combined"].dtype)
        scale = out["log_scale"].exp().clamp(max=100)
        dup = _duplicate_mask(t, self.task.cfg.dup_threshold)
        ref_dup = (ref * t).sum(-1, keepdim=True) >= self.task.cfg.dup_threshold
        sims = c @ t.T
        ref_sim = (c * ref).sum(-1, keepdim=True)
        logits = torch.cat([(scale * sims).masked_fill(dup, float("-inf")),
                            (scale * ref_sim).masked_fill(ref_dup, float("-inf"))], 1)  # mask after scaling (NaN grads)
        nce = F.cross_entropy(logits, torch.arange(len(c), device=c.device))
        pos = sims.diagonal().unsqueeze(1)
        eye = torch.eye(len(c), dtype=torch.bool, device=c.device)
        k = min(o.hard_negatives, len(c) - 1)
        negs, valid = [ref_sim], [~ref_dup]
        if k > 0:
            top = sims.masked_fill(dup | eye, float("-inf")).topk(k, dim=1)
            negs.append(sims.gather(1, top.indices))
            valid.append(torch.isfinite(top.values))
        neg, ok = torch.cat(negs, 1), torch.cat(valid, 1)
        hinge = (F.relu(o.margin - (pos - neg)) * ok).sum(1).mean()
        w = out["dqe_attr_weights"].detach()
        entropy = float(-(w * w.clamp_min(1e-8).log()).sum(1).mean())
        return o.weight * (nce + hinge), {"dqe_attr_nce": float(nce.detach()), "dqe_attr_margin": float(hinge.detach()),
                                          "dqe_attr_entropy": entropy}

    def state(self) -> Dict[str, torch.Tensor]:
        """The cached modification-text features (unless another component saves them)."""
        return text_feature_state(self.task, self)

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state`."""
        load_text_feature_state(self.task, tensors)


def attribute_weights_by_kind(task: Any, kinds: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Mean attribute weight per modification kind, from the trained ``dqe_attributes`` head (an interpretability probe)."""
    comp = _find(task, AttributeQueries)
    if comp is None:
        raise ValueError("the task has no 'dqe_attributes' component")
    text = modification_text_features(task)
    with torch.no_grad():
        w = comp.head.weights(text.to(comp.head.weights.weight.device)).softmax(-1).cpu()
    out: Dict[str, Dict[str, float]] = {}
    for kind in sorted(set(kinds)):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        mean = w[rows].mean(0)
        out[kind] = {a: float(v) for a, v in zip(comp.opts.attributes, mean)}
    return out
