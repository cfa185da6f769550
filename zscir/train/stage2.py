"""Stage II — composing: adapters in the text encoder, trained on a small synthetic triplet set.

The query of triplet i is q_i = text_encoder("a photo of $ that {modification_i}")
with ``$`` = phi(reference_i) (phi frozen by default); its target t_i is the
frozen CLIP image feature of the target image, or the CLIP text feature of
``target_caption`` for text-only triplets. The loss is InfoNCE of q_i against
in-batch targets plus *hard negatives*, each a switchable, weighted component
(``STAGE2_COMPONENTS``):

* ``explicit`` (off by default): the hard negatives the triplets carry (``negatives``: sibling
  edits of the same reference, caption-edit alternatives, mid-zone images), in the denominator.
* ``reference`` (off by default): the reference image itself is a negative (the query must move
  away from "just the reference").
* ``query_negative`` (off by default): q'_i = the same reference with another triplet's
  modification; target-to-query InfoNCE, where t_i must prefer q_i over q'_i
  and over the other in-batch queries (the text must matter).
* ``mined``: top-ranked non-targets for each query among cached corpus image
  features, re-mined with the current model every ``refresh_every`` steps.
* ``text_augment`` (on by default): word dropout and clause reordering of the modification text.

Entries that are near duplicates of the target (same target id, or cosine >=
``dup_threshold`` between frozen target features) are masked, never used as
negatives. The built-in negatives and other published ideas (MELT, SPN,
DQE-CIR) are components (:mod:`zscir.train.components`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..composer import Composer
from ..config import Config
from ..losses import clamped_scale, duplicate_mask, info_nce_with_negatives
from ..models.adapters import AdapterConfig, count_trainable
from .components import STAGE2_COMPONENTS, ComponentContext, Stage2Component
from .engine import TrainConfig, Trainer, TrainTask
from .features import Corpus, TripletFeatures, check_patch_tokens

if TYPE_CHECKING:
    from ..data.triplets import TripletSet

logger = logging.getLogger(__name__)

__all__ = ["Stage2Config", "Stage2Module", "Stage2Task", "fit_to_context", "prepare_stage2", "train_stage2"]


@dataclasses.dataclass
class Stage2Config(Config):
    """Stage-II adapters, negatives and optimisation (defaults chosen on the shapes world's validation split)."""

    # LoRA rank 64 (alpha 64) over rank 16: +1.9 R@10 on validation (benchmarks/bench_stage2.py, docs/results.md)
    adapters: AdapterConfig = dataclasses.field(default_factory=lambda: AdapterConfig(rank=64, alpha=64.0))
    image_residual: bool = False  # learn w in normalise(composed + w * reference image); w starts at 0
    train_phi: bool = True  # phi trains with the adapters: +1.3 R@10 on validation
    init_scale: float = 1 / 0.05
    learnable_scale: bool = True
    dup_threshold: float = 0.995  # cosine between frozen targets above which they count as the same image
    # On validation every hard negative cost R@10: image-side ones (the reference, the triplets' own sibling
    # negatives in or beside the denominator, mined corpus images) and, at 20k triplets x 600 steps, the
    # query-side negative too (69.4 without, 67.3 with; and a 1.44x step instead of 1.16x). Text augmentation
    # (the held-out phrasing gap) paid. Every negative stays one name away in `components`.
    components: Tuple[str, ...] = ("text_augment",)
    query_negative_weight: float = 0.5
    query_negative_fraction: float = 0.25  # share of rows that get a query-side negative (each costs a text pass)
    mined_per_query: int = 4
    mined_pool: int = 20  # sample the negatives from the top-`mined_pool` non-targets
    refresh_every: int = 50
    component_options: Dict[str, Any] = dataclasses.field(default_factory=dict)  # options of plug-in components
    train: TrainConfig = dataclasses.field(
        # 600 steps on 20k triplets over 300 on 10k: +4.4 R@10 on validation (more data and steps keep paying)
        default_factory=lambda: TrainConfig(steps=600, batch_size=128, lr=3e-3, weight_decay=0.01, warmup_steps=60)
    )


class Stage2Module(nn.Module):
    """Composer (adapters trainable) + component modules: batch -> per-sample features."""

    def __init__(self, composer: Composer, cfg: Stage2Config, extra: Dict[str, nn.Module]) -> None:
        super().__init__()
        self.composer = composer
        self.extra = nn.ModuleDict(extra)
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.init_scale)), requires_grad=cfg.learnable_scale)
        self.components: List[Stage2Component] = []

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Query features (and query-side negatives when asked) of one batch."""
        c = self.composer
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in c.phi.parameters())):
            tokens = c.phi(batch["ref_pooled"], batch["ref_patches"])
        out: Dict[str, torch.Tensor] = {"tokens": tokens}
        out["query"] = c.compose_tokens(tokens, batch["ref_pooled"], batch["modifications"])
        if batch.get("neg_modifications") is not None:
            # rows without a negative stay zero and are masked out (keeps per-row shapes for the all-gather)
            rows = batch["neg_rows"]
            out["has_query_neg"] = torch.zeros(len(tokens), device=tokens.device).index_fill(0, rows, 1.0)  # float: all-gathers on gloo
            out["query_neg"] = tokens.new_zeros(len(tokens), c.backbone.embed_dim)
            if len(rows):
                neg = c.compose_tokens(tokens[rows], batch["ref_pooled"][rows], batch["neg_modifications"])
                out["query_neg"] = out["query_neg"].index_put((rows,), neg.to(out["query_neg"].dtype))
        out["target"] = batch["target"]
        out["target_code"] = batch["target_code"]
        out["reference"] = F.normalize(batch["ref_pooled"], dim=-1)
        out["index"] = batch["index"]
        out["log_scale"] = self.log_scale
        for comp in self.components:
            comp.forward(self, batch, out)
        return out


class Stage2Task(TrainTask):
    """Composing loss with pluggable hard negatives and components."""

    def __init__(self, composer: Composer, triplets: TripletFeatures, cfg: Stage2Config,
                 corpus: Optional[Corpus] = None) -> None:
        self.cfg, self.triplets, self.corpus = cfg, triplets, corpus
        if composer.config.adapters is None:
            raise ValueError("stage II needs a Composer with adapters (use prepare_stage2)")
        check_patch_tokens(composer, triplets.ref_patches, "the triplets' reference features")
        for p in composer.phi.parameters():
            p.requires_grad_(cfg.train_phi)
        if cfg.image_residual:
            composer.enable_image_residual()
            composer.residual_weight.requires_grad_(True)
        self.context = ComponentContext(cfg, triplets, corpus, composer, self.encode_all_queries)
        self.components: List[Stage2Component] = []
        for name in cfg.components:
            cls = STAGE2_COMPONENTS.get(name)
            self.components.append(cls(self.context, dict(cfg.component_options.get(name, {}))))
        extra: Dict[str, nn.Module] = {}
        for comp in self.components:
            extra.update({f"{comp.name}_{k}": m for k, m in comp.modules().items()})
        self.module = Stage2Module(composer, cfg, extra)
        self.module.components = self.components
        self.composer = composer
        self.codes = triplets.target_codes()

    def num_examples(self) -> int:
        """Number of triplets."""
        return len(self.triplets)

    def wants_query_negatives(self) -> bool:
        """Whether any component needs query-side negatives."""
        return any(c.needs_query_negatives for c in self.components)

    def make_batch(self, indices: torch.Tensor, step: int) -> Dict[str, Any]:
        """Features and texts of the indexed triplets (+ derangement for query-side negatives)."""
        t = self.triplets
        idx = indices.tolist()
        dev = self.composer.device
        batch: Dict[str, Any] = {
            "index": indices.to(dev),
            "ref_pooled": t.ref_pooled[indices].to(dev),
            "ref_patches": None if t.ref_patches is None else t.ref_patches[indices].to(dev),
            "target": t.target[indices].to(dev),
            "target_code": self.codes[indices].to(dev),
            "modifications": [t.modifications[i] for i in idx],
            "kinds": [t.kinds[i] for i in idx],
            "step": step,
        }
        if self.wants_query_negatives():
            # drawn per triplet (not per batch position), so N processes pick what 1 process picks
            g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + step)
            other = torch.randint(0, len(t), (len(t),), generator=g)[indices].tolist()
            chosen = torch.rand(len(t), generator=g)[indices] < self.cfg.query_negative_fraction
            rows = chosen.nonzero().squeeze(1).tolist()
            batch["neg_rows"] = torch.tensor(rows, dtype=torch.long, device=dev)
            # another triplet's modification, avoiding identical texts
            batch["neg_modifications"] = [
                t.modifications[other[r]] if t.modifications[other[r]] != t.modifications[idx[r]]
                else t.modifications[(other[r] + 1) % len(t)]
                for r in rows
            ]
        for comp in self.components:
            comp.prepare_batch(batch, indices)
        return batch

    def loss(self, out: Dict[str, torch.Tensor], batch: Any, step: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """InfoNCE over in-batch targets + component negatives, weights and extra terms."""
        scale = clamped_scale(out["log_scale"])
        q, t = out["query"], out["target"]
        dup = self.duplicates(out)
        negs, masks = [], []
        for comp in self.components:
            extra = comp.extra_negatives(out, batch)
            if extra is not None:
                negs.append(extra[0])
                masks.append(extra[1])
        extra_neg = torch.cat(negs, dim=1) if negs else None
        extra_mask = torch.cat(masks, dim=1) if masks else None
        weights = None
        for comp in self.components:
            w = comp.sample_weights(out, batch)
            if w is not None:
                weights = w if weights is None else weights * w
        main = info_nce_with_negatives(q, t, scale, extra_neg, dup, extra_mask, weights)
        logs = {"infonce": float(main.detach()), "scale": float(scale.detach())}
        with torch.no_grad():
            logits = scale * q @ t.T
        total = main
        for comp in self.components:
            term, clog = comp.loss(out, batch, step, logits)
            if term is not None:
                total = total + term
            logs.update(clog)
        return total, logs

    def duplicates(self, out: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, B] True where two targets are the same image (same id, or cosine >= dup_threshold); diagonal False."""
        return duplicate_mask(out["target"], self.cfg.dup_threshold, out["target_code"])

    def on_step_end(self, step: int, module: nn.Module) -> None:
        """Run component hooks (e.g. re-mining)."""
        for comp in self.components:
            comp.on_step_end(step)

    def _text_feature_owner(self) -> Optional[Stage2Component]:
        # the shared text features are saved once, under the first component that reads them
        return next((c for c in self.components if c.uses_text_features), None)

    def extra_state(self) -> Dict[str, torch.Tensor]:
        """Checkpointed component state (and the text features cached at step 0, not re-encoded on resume)."""
        out = {}
        owner, feats = self._text_feature_owner(), self.context.cached_text_features()
        for comp in self.components:
            state = comp.state()
            if comp is owner and feats is not None:
                state = {**state, "text_features": feats}
            out.update({f"{comp.name}.{k}": v for k, v in state.items()})
        return out

    def load_extra_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore component state."""
        for comp in self.components:
            prefix = f"{comp.name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if "text_features" in state:
                self.context.set_text_features(state.pop("text_features"))
            comp.load(state)

    @torch.no_grad()
    def encode_all_queries(self, batch_size: int = 256) -> torch.Tensor:
        """Current query embeddings of every triplet (for mining)."""
        c = self.composer
        was = self.module.training
        self.module.eval()
        t = self.triplets
        out = []
        for s in range(0, len(t), batch_size):
            sl = slice(s, s + batch_size)
            out.append(c.compose_features(t.ref_pooled[sl].to(c.device),
                                          None if t.ref_patches is None else t.ref_patches[sl].to(c.device),
                                          t.modifications[sl]))
        self.module.train(was)
        return torch.cat(out)


def prepare_stage2(composer: Composer, adapters: AdapterConfig) -> Composer:
    """A copy-free upgrade: insert composing adapters into a Stage-I composer (in place) and return it."""
    composer.add_adapters(adapters)
    return composer


def train_stage2(composer: Composer, triplets: TripletFeatures, cfg: Stage2Config, corpus: Optional[Corpus] = None,
                 output_dir: Optional[Path] = None, resume: bool = False, progress: bool = True) -> Tuple[Composer, Any]:
    """Insert adapters (if missing) and train them on the triplets; save ``output_dir/model``."""
    if composer.config.adapters is None:
        torch.manual_seed(cfg.train.seed)  # adapter initialisation does not depend on what ran before
        prepare_stage2(composer, cfg.adapters)
    task = Stage2Task(composer, triplets, cfg, corpus)
    logger.info("stage II trainable parameters: %d", count_trainable(task.module))
    trainer = Trainer(task, cfg.train, output_dir=output_dir, progress=progress, desc="stage II (composing)")
    result = trainer.train(resume=resume)
    for p in composer.parameters():
        p.requires_grad_(False)
    composer.config.stage = "stage2"
    composer.eval()
    if output_dir is not None and trainer.accelerator.is_main_process:
        composer.save_pretrained(Path(output_dir) / "model")
    return composer, result


def fit_to_context(composer: Composer, triplets: "TripletSet") -> "TripletSet":
    """The triplet set with modification texts shortened to fit the text tower once placed in the query prompt."""
    cfg = composer.config
    prompt = cfg.query_prompt.replace("{modification}", "").replace(cfg.placeholder, "")
    overhead = len(composer.backbone.tokenizer([prompt])[0].nonzero()) + composer.phi.config.total_tokens
    return triplets.truncate_to_context(composer.backbone.tokenizer, composer.backbone.context_length, overhead)
