"""Stage II — composing: adapters in the text encoder, trained on a small synthetic triplet set.

The query of triplet i is q_i = text_encoder("a photo of $ that {modification_i}")
with ``$`` = phi(reference_i) (phi frozen by default); its target t_i is the
frozen CLIP image feature of the target image, or the CLIP text feature of
``target_caption`` for text-only triplets. The loss is InfoNCE of q_i against
in-batch targets plus *hard negatives*, each a switchable, weighted component
(``STAGE2_COMPONENTS``):

* ``reference`` (off by default): the reference image itself is a negative (the query must move
  away from "just the reference").
* ``query_negative``: q'_i = the same reference with another triplet's
  modification; target-to-query InfoNCE, where t_i must prefer q_i over q'_i
  and over the other in-batch queries (the text must matter).
* ``mined``: top-ranked non-targets for each query among cached corpus image
  features, re-mined with the current model every ``refresh_every`` steps.

Entries that are near duplicates of the target (cosine >= ``dup_threshold``
between frozen target features) are masked, never used as negatives.
Other published ideas (MELT, SPN, DQE-CIR) plug in as further components
(:mod:`zscir.train.components`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..composer import Composer
from ..config import Config
from ..losses import info_nce_with_negatives
from ..models.adapters import AdapterConfig, count_trainable
from ..registry import Registry
from .engine import TrainConfig, Trainer, TrainTask, add_train_arguments, train_config_from_args

if TYPE_CHECKING:
    from ..data.triplets import TripletSet

logger = logging.getLogger(__name__)

STAGE2_COMPONENTS: Registry = Registry("stage-2 component")


@dataclasses.dataclass
class Stage2Config(Config):
    """Stage-II adapters, negatives and optimisation."""

    adapters: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    image_residual: bool = False  # learn w in normalise(composed + w * reference image); w starts at 0
    train_phi: bool = False
    init_scale: float = 1 / 0.05
    learnable_scale: bool = True
    dup_threshold: float = 0.995  # cosine between frozen targets above which they count as the same image
    # "reference" is off by default: on the shapes world it cost 8 R@10 (benchmarks/bench_stage2.py),
    # because most targets stay close to their reference and it pushes queries away from them.
    components: Tuple[str, ...] = ("query_negative",)
    query_negative_weight: float = 0.5
    query_negative_fraction: float = 0.25  # share of rows that get a query-side negative (each costs a text pass)
    mined_per_query: int = 4
    mined_pool: int = 20  # sample the negatives from the top-`mined_pool` non-targets
    refresh_every: int = 50
    component_options: Dict[str, Any] = dataclasses.field(default_factory=dict)  # options of plug-in components
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=128, lr=3e-3, weight_decay=0.01, warmup_steps=30)
    )


@dataclasses.dataclass
class TripletFeatures:
    """Frozen features of a triplet set: reference pooled/patches, target embedding, texts and kinds."""

    ref_pooled: torch.Tensor  # [N, D]
    ref_patches: Optional[torch.Tensor]  # [N, P, D]
    target: torch.Tensor  # [N, D] normalised
    modifications: List[str]
    kinds: List[str]
    ref_ids: List[str]
    target_ids: List[str]

    def __len__(self) -> int:
        return len(self.modifications)

    def target_codes(self) -> torch.Tensor:
        """An integer per triplet, equal for triplets that share the same target image/caption."""
        codes: Dict[str, int] = {}
        return torch.tensor([codes.setdefault(t, len(codes)) for t in self.target_ids], dtype=torch.long)


@dataclasses.dataclass
class Corpus:
    """Cached, normalised image features of a gallery/training corpus (for mining and bank negatives)."""

    features: torch.Tensor  # [M, D]
    ids: List[str]


class Stage2Component:
    """A pluggable part of the Stage-II objective (negatives, weights, extra losses)."""

    name = "component"

    def __init__(self, task: "Stage2Task", options: Dict[str, Any]) -> None:
        self.task = task
        self.options = options

    def modules(self) -> Dict[str, nn.Module]:
        """Trainable sub-modules this component adds (trained with the adapters)."""
        return {}

    def forward(self, module: "Stage2Module", batch: Dict[str, Any], out: Dict[str, torch.Tensor]) -> None:
        """Add per-sample outputs to ``out`` inside the module's forward (runs sharded per rank)."""

    def extra_negatives(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Per-row extra negative features [B, M, D] and a drop-mask [B, M], for the main InfoNCE."""
        return None

    def sample_weights(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Per-row loss weights [B] (multiplied together across components)."""
        return None

    def loss(self, out: Dict[str, torch.Tensor], batch: Dict[str, Any], step: int,
             main_logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Dict[str, float]]:
        """An additional loss term (already weighted) and logs."""
        return None, {}

    def on_step_end(self, step: int) -> None:
        """Hook after each optimiser step."""

    def state(self) -> Dict[str, torch.Tensor]:
        """Non-parameter tensors to checkpoint."""
        return {}

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state`."""


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
        for p in composer.phi.parameters():
            p.requires_grad_(cfg.train_phi)
        if cfg.image_residual:
            composer.enable_image_residual()
            composer.residual_weight.requires_grad_(True)
        self.components: List[Stage2Component] = []
        for name in cfg.components:
            cls = STAGE2_COMPONENTS.get(name)
            self.components.append(cls(self, dict(cfg.component_options.get(name, {}))))
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
        return any(getattr(c, "needs_query_negatives", False) for c in self.components)

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
            hook = getattr(comp, "prepare_batch", None)
            if hook:
                hook(batch, indices)
        return batch

    def loss(self, out: Dict[str, torch.Tensor], batch: Any, step: int):
        """InfoNCE over in-batch targets + component negatives, weights and extra terms."""
        scale = out["log_scale"].exp().clamp(max=100)
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
        """[B, B] True where two targets are the same image (same id, or cosine >= dup_threshold)."""
        codes = out["target_code"]
        t = out["target"]
        return (codes[:, None] == codes[None, :]) | ((t @ t.T) >= self.cfg.dup_threshold)

    def on_step_end(self, step: int, module: nn.Module) -> None:
        """Run component hooks (e.g. re-mining)."""
        for comp in self.components:
            comp.on_step_end(step)

    def extra_state(self) -> Dict[str, torch.Tensor]:
        """Checkpointed component state."""
        out = {}
        for comp in self.components:
            out.update({f"{comp.name}.{k}": v for k, v in comp.state().items()})
        return out

    def load_extra_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore component state."""
        for comp in self.components:
            prefix = f"{comp.name}."
            comp.load({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

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


@STAGE2_COMPONENTS.register("reference")
class ReferenceNegative(Stage2Component):
    """The reference image is a negative for its own query (masked when it is a near duplicate of the target)."""

    name = "reference"

    def extra_negatives(self, out, batch):
        """[B, 1, D] reference features."""
        ref = out["reference"]
        dup = (ref * out["target"]).sum(-1, keepdim=True) >= self.task.cfg.dup_threshold
        return ref.unsqueeze(1), dup


@STAGE2_COMPONENTS.register("query_negative")
class QueryNegative(Stage2Component):
    """Target-to-query InfoNCE where the same reference with another modification is a negative query."""

    name = "query_negative"
    needs_query_negatives = True

    def loss(self, out, batch, step, main_logits):
        """Weighted CE of t_i over [q_i, q'_i, other queries], on the rows that have a q'_i."""
        rows = (out["has_query_neg"] > 0).nonzero().squeeze(1) if "query_neg" in out else None
        if rows is None or not len(rows):
            return None, {}
        scale = out["log_scale"].exp().clamp(max=100)
        q, qn, t = out["query"], out["query_neg"], out["target"]
        logits = scale * t @ q.T
        dup = self.task.duplicates(out)
        eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
        logits = logits.masked_fill(dup & ~eye, float("-inf"))
        neg = scale * (t * qn).sum(-1, keepdim=True)
        ce = F.cross_entropy(torch.cat([logits, neg], dim=1)[rows], rows)
        w = self.task.cfg.query_negative_weight
        return w * ce, {"query_negative": float(ce.detach())}


@STAGE2_COMPONENTS.register("mined")
class MinedNegatives(Stage2Component):
    """Top-ranked non-target corpus images for each query, re-mined every ``refresh_every`` steps."""

    name = "mined"

    def __init__(self, task, options):
        super().__init__(task, options)
        if task.corpus is None:
            raise ValueError("the 'mined' component needs a corpus of cached image features (corpus=...)")
        self.table: Optional[torch.Tensor] = None  # [N, pool] corpus indices

    def refresh(self) -> None:
        """Re-rank the corpus for every triplet with the current model."""
        from ..search.exact import exact_topk

        cfg = self.task.cfg
        queries = self.task.encode_all_queries()
        corpus = self.task.corpus.features
        k = min(cfg.mined_pool + 8, len(corpus))
        _, idx = exact_topk(queries, corpus, k)
        tgt = self.task.triplets.target
        # drop near duplicates of the target (false negatives)
        sims = torch.einsum("nd,nkd->nk", tgt, corpus[idx])
        idx = idx.masked_fill(sims >= cfg.dup_threshold, -1)
        table = torch.full((len(idx), cfg.mined_pool), -1, dtype=torch.long)
        for i in range(len(idx)):
            keep = idx[i][idx[i] >= 0][: cfg.mined_pool]
            table[i, : len(keep)] = keep
        self.table = table

    def prepare_batch(self, batch, indices):
        """Attach this batch's mined negatives (sampled from each query's pool)."""
        if self.table is None:
            self.refresh()
        cfg = self.task.cfg
        g = torch.Generator().manual_seed(cfg.train.seed * 31 + batch["step"])
        pool = self.table[indices]
        pick = torch.randint(0, cfg.mined_pool, (len(indices), cfg.mined_per_query), generator=g)
        chosen = torch.gather(pool, 1, pick)
        valid = chosen >= 0
        feats = self.task.corpus.features[chosen.clamp_min(0)]
        batch["mined"] = feats.to(batch["target"].device)
        batch["mined_invalid"] = (~valid).to(batch["target"].device)

    def forward(self, module, batch, out):
        """Pass mined features through (gathered with the batch)."""
        out["mined"] = batch["mined"]
        out["mined_invalid"] = batch["mined_invalid"]

    def extra_negatives(self, out, batch):
        """[B, M, D] mined negatives and their invalid-slot mask."""
        feats = out["mined"]
        return feats, out["mined_invalid"]

    def state(self):
        """The current mined table (so a resumed run uses the same negatives)."""
        return {} if self.table is None else {"table": self.table}

    def load(self, tensors):
        """Restore the mined table."""
        if "table" in tensors:
            self.table = tensors["table"]

    def on_step_end(self, step):
        """Re-mine every refresh_every steps."""
        if step % self.task.cfg.refresh_every == 0:
            self.refresh()


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


@torch.no_grad()
def encode_triplets(composer: Composer, triplets: Any, batch_size: int = 64, progress: bool = True) -> TripletFeatures:
    """Frozen features of a :class:`zscir.data.triplets.TripletSet` (images loaded robustly)."""
    from tqdm.auto import tqdm

    refs, patches, targets = [], [], []
    rows = list(triplets)
    for s in tqdm(range(0, len(rows), batch_size), desc="encode triplets", disable=not progress):
        chunk = rows[s: s + batch_size]
        ref_imgs = [triplets.open_image(r.reference) for r in chunk]
        pooled, pt = composer.image_features(ref_imgs)
        refs.append(pooled)
        if pt is not None:
            patches.append(pt)
        tgt = torch.empty(len(chunk), composer.backbone.embed_dim)
        img_rows = [i for i, r in enumerate(chunk) if r.target]
        txt_rows = [i for i, r in enumerate(chunk) if not r.target]
        if img_rows:
            imgs = [triplets.open_image(chunk[i].target) for i in img_rows]
            tgt[img_rows] = composer.encode_images(imgs).cpu()
        if txt_rows:
            tgt[txt_rows] = composer.encode_texts([chunk[i].target_caption for i in txt_rows]).cpu()
        targets.append(tgt)
    return TripletFeatures(
        torch.cat(refs).cpu(), torch.cat(patches).cpu() if patches else None, torch.cat(targets),
        [r.modification for r in rows], [r.kind or "" for r in rows], [str(r.reference) for r in rows],
        [str(r.target or r.target_caption) for r in rows],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI arguments of ``zscir train-stage2``."""
    parser.add_argument("--model", required=True, type=Path, help="Stage-I model folder")
    parser.add_argument("--triplets", required=True, help="triplets (.jsonl, .csv, or a Hugging Face dataset path)")
    parser.add_argument("--image-root", default=None, help="folder the triplet image paths are relative to")
    parser.add_argument("--device", default=None, help="cuda or cpu for feature encoding (default: cuda when available)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model in OUT/model)")
    parser.add_argument("--config", type=Path, default=None, help="Stage2Config JSON")
    parser.add_argument("--adapter", choices=["bottleneck", "lora", "full"], default=None)
    parser.add_argument("--adapter-layers", type=int, default=None)
    parser.add_argument("--adapter-rank", type=int, default=None)
    parser.add_argument("--components", default=None, help="comma-separated Stage-II components, e.g. reference,query_negative")
    parser.add_argument("--corpus", default=None, help="image folder whose features serve as mined/bank negatives")
    add_train_arguments(parser)


def config_from_args(args: argparse.Namespace) -> Stage2Config:
    """Stage2Config from a JSON file and overrides."""
    cfg = Stage2Config.from_json(args.config) if args.config else Stage2Config()
    train = train_config_from_args(cfg.train, args)
    ad = cfg.adapters
    if args.adapter:
        ad = dataclasses.replace(ad, kind=args.adapter)
    if args.adapter_layers:
        ad = dataclasses.replace(ad, num_layers=args.adapter_layers)
    if args.adapter_rank:
        ad = dataclasses.replace(ad, rank=args.adapter_rank)
    cfg = dataclasses.replace(cfg, train=train, adapters=ad)
    if args.components is not None:
        cfg = dataclasses.replace(cfg, components=tuple(c for c in args.components.split(",") if c))
    return cfg


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zscir train-stage2``."""
    from ..data.triplets import load_triplets

    cfg = config_from_args(args)
    from ..models.backbone import default_device

    composer = Composer.from_pretrained(args.model, device=args.device or default_device())
    triplets = fit_to_context(composer, load_triplets(args.triplets, image_root=args.image_root))
    feats = encode_triplets(composer, triplets, progress=not args.no_progress)
    corpus = None
    if args.corpus:
        from .bank import corpus_features  # cached on disk; corrupt corpus images are logged and skipped

        corpus = Corpus(*corpus_features(composer, args.corpus, args.out / "features", progress=not args.no_progress))
    train_stage2(composer, feats, cfg, corpus=corpus, output_dir=args.out, resume=args.resume,
                 progress=not args.no_progress)
    print(f"stage II model: {args.out / 'model'}")
    return 0


def fit_to_context(composer: Composer, triplets: "TripletSet") -> "TripletSet":
    """The triplet set with modification texts shortened to fit the text tower once placed in the query prompt."""
    cfg = composer.config
    prompt = cfg.query_prompt.replace("{modification}", "").replace(cfg.placeholder, "")
    overhead = len(composer.backbone.tokenizer([prompt])[0].nonzero()) + composer.phi.config.total_tokens
    return triplets.truncate_to_context(composer.backbone.tokenizer, composer.backbone.context_length, overhead)


@torch.no_grad()
def shapes_triplet_features(composer: Composer, edits: Sequence[Any], image_size: int = 64,
                            batch_size: int = 256) -> TripletFeatures:
    """Frozen features of shapes-world edits (reference/target scenes rendered in memory)."""
    from ..shapes import render_array

    bb = composer.backbone
    refs, patches, targets = [], [], []
    for s in range(0, len(edits), batch_size):
        chunk = edits[s: s + batch_size]
        f = bb.encode_image(bb.pixels_from_uint8(render_array([e.source for e in chunk], image_size)))
        refs.append(f.pooled)
        patches.append(f.patches)
        g = bb.encode_image(bb.pixels_from_uint8(render_array([e.target for e in chunk], image_size)), with_patches=False)
        targets.append(F.normalize(g.pooled, dim=-1))
    return TripletFeatures(torch.cat(refs), torch.cat(patches), torch.cat(targets), [e.text for e in edits],
                           [e.kind for e in edits], [e.source.key for e in edits], [e.target.key for e in edits])


from . import components  # noqa: E402,F401  (registers the MELT / SPN / DQE-CIR components)
