"""Frozen CLIP features that training reads: containers and the helpers that encode them.

Stage I trains on a :class:`FeatureSource` (pooled + patch features of
unlabeled images), Stage II on :class:`TripletFeatures` (reference, target,
texts of a triplet set), mining and the SPN bank on a :class:`Corpus`. All are
computed once with the frozen backbone; the on-disk cache of folder images is
:class:`zscir.data.features.FeatureCache`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..composer import Composer
from ..data.images import ImageLoadError
from ..precision import autocast, resolve_precision

logger = logging.getLogger(__name__)
#: Explicit negatives at least this close (cosine) to their target count as the target (masked).
NEGATIVE_DUP_THRESHOLD = 0.995
#: Undecodable negative images named in the warning of :func:`encode_triplets`.
FAILED_NEGATIVES_LOGGED = 5

__all__ = [
    "CaptionFeatures", "Corpus", "FeatureSource", "TripletFeatures", "caption_features", "check_patch_tokens",
    "corpus_features", "encode_triplets", "mask_false_negatives", "shapes_features",
    "shapes_triplet_features", "text_features",
]


class FeatureSource:
    """Cached image features addressable by index: pooled [N, D] and optional patches [N, P, D]."""

    def __init__(self, pooled: Any, patches: Any = None, indices: Optional[np.ndarray] = None) -> None:
        self.pooled, self.patches = pooled, patches
        self.indices = np.arange(len(pooled)) if indices is None else np.asarray(indices)
        if len(self.indices) == 0:
            raise ValueError("the image corpus is empty (no valid image features)")

    @classmethod
    def from_cache(cls, cache: Any) -> "FeatureSource":
        """Valid rows of a :class:`zscir.data.features.FeatureCache`."""
        return cls(cache.pooled, cache.patches, cache.valid_indices())

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, idx: Sequence[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Float32 pooled and patch features of the given rows."""
        rows = np.sort(self.indices[np.asarray(idx)])  # sorted reads are faster on memmaps
        order = np.argsort(np.argsort(self.indices[np.asarray(idx)]))
        pooled = torch.as_tensor(np.asarray(self.pooled[rows]), dtype=torch.float32)[order]
        patches = None
        if self.patches is not None:
            patches = torch.as_tensor(np.asarray(self.patches[rows]), dtype=torch.float32)[order]
        return pooled, patches


@dataclasses.dataclass
class CaptionFeatures:
    """Frozen, normalised text features of each image's captions: image row r owns ``features[offsets[r]:offsets[r+1]]``.

    Rows are the image rows of the :class:`FeatureSource` they go with (its cache rows, before skipping failed
    images); an image without a caption owns an empty range.
    """

    features: torch.Tensor  # [M, D] float32, unit norm
    offsets: torch.Tensor  # [N + 1] long
    texts: List[str]  # the M captions, image by image

    def __post_init__(self) -> None:
        if len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.features) or len(self.texts) != len(self.features):
            raise ValueError(f"caption features: offsets end at {int(self.offsets[-1]) if len(self.offsets) else None}, "
                             f"but there are {len(self.features)} features and {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Captions per image row: of every row [N], or of `rows` [B] (without touching the others)."""
        if rows is None:
            return self.offsets[1:] - self.offsets[:-1]
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return self.offsets[rows + 1] - self.offsets[rows]

    def means(self) -> torch.Tensor:
        """Each image's normalised mean caption feature [N, D] (zeros for images without captions)."""
        counts = self.counts()
        owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
        sums = torch.zeros(len(counts), self.features.shape[1]).index_add_(0, owner, self.features.float())
        return F.normalize(sums, dim=-1)

    def sample(self, rows: Sequence[int], generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """One caption feature per image row, drawn uniformly among its captions [B, D], and which rows have one [B]."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        start, count = self.offsets[rows], self.counts(rows)
        has = count > 0
        draw = (torch.rand(len(rows), generator=generator) * count).long()
        pick = start + torch.minimum(draw, (count - 1).clamp(min=0))
        feats = torch.zeros(len(rows), self.features.shape[1])
        feats[has] = self.features[pick[has]]
        return feats, has


@torch.no_grad()
def caption_features(backbone: Any, captions: Sequence[Sequence[str]], batch_size: int = 512, progress: bool = False,
                     report: Any = None) -> CaptionFeatures:
    """Frozen text features of each image's captions (each distinct text encoded once).

    Captions that fill the whole context (the tokenizer truncated them) are counted in `report.truncated`
    (a :class:`zscir.data.captions.CaptionReport`) when one is given.
    """
    texts = [t for caps in captions for t in caps]
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    table = text_features(backbone, unique, batch_size, progress=progress, report=report).cpu()
    index = torch.tensor([where[t] for t in texts], dtype=torch.long)
    offsets = torch.zeros(len(captions) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(c) for c in captions], dtype=torch.long), 0)
    return CaptionFeatures(table[index] if len(texts) else table, offsets, texts)


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
    negatives: Optional[torch.Tensor] = None  # [N, K, D] normalised explicit hard negatives (padded)
    negative_valid: Optional[torch.Tensor] = None  # [N, K] bool: False for padding and masked false negatives

    def __len__(self) -> int:
        return len(self.modifications)

    def target_codes(self) -> torch.Tensor:
        """An integer per triplet, equal for triplets that share the same target image/caption."""
        codes: Dict[str, int] = {}
        return torch.tensor([codes.setdefault(t, len(codes)) for t in self.target_ids], dtype=torch.long)


def mask_false_negatives(target: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor,
                         threshold: float) -> Tuple[torch.Tensor, int]:
    """`valid` [N, K] with negatives whose cosine to their target [N, D] is >= `threshold` masked; and how many were."""
    close = torch.einsum("nd,nkd->nk", F.normalize(target.float(), dim=-1), F.normalize(negatives.float(), dim=-1)) >= threshold
    masked = close & valid
    return valid & ~close, int(masked.sum())


@dataclasses.dataclass
class Corpus:
    """Cached, normalised image features of a gallery/training corpus (for mining and bank negatives)."""

    features: torch.Tensor  # [M, D]
    ids: List[str]


def check_patch_tokens(composer: Composer, patches: Any, what: str) -> None:
    """Error before training when cached patch tokens [N, P, D] are not the P tokens per image phi's VSI reads."""
    expected = composer.phi.patch_count
    if not composer.phi.config.use_vsi or patches is None or expected is None or patches.shape[1] == expected:
        return
    g = composer.phi.config.patch_grid
    raise ValueError(
        f"{what} hold {patches.shape[1]} patch tokens per image, but phi reads {expected} "
        f"(phi.patch_grid={g}{' = the full grid' if g == 0 else f', {g}x{g}'}): encode them with the same grid "
        f"(FeatureCache.build(patch_grid={g or None}), Composer.image_features)"
    )


@torch.no_grad()
def shapes_features(composer: Composer, scenes: Sequence[Any], image_size: int, batch_size: int = 256,
                    progress: bool = False, precision: str = "no") -> FeatureSource:
    """In-memory float32 features of shapes-world scenes (rendered on the fly, encoded under `precision`).

    Patches are pooled to phi's grid.
    """
    from tqdm.auto import tqdm

    from ..shapes import render_array

    bb = composer.backbone
    pooled, patches = [], []
    for s in tqdm(range(0, len(scenes), batch_size), desc="encode images", disable=not progress):
        with autocast(precision, bb.device):
            p, pt = composer.pixel_features(bb.pixels_from_uint8(render_array(scenes[s: s + batch_size], image_size)),
                                            with_patches=True)
        pooled.append(p.float())
        patches.append(pt.float())
    return FeatureSource(torch.cat(pooled).numpy(), torch.cat(patches).numpy())


@torch.no_grad()
def shapes_triplet_features(composer: Composer, edits: Sequence[Any], image_size: int = 64,
                            batch_size: int = 256, dup_threshold: float = 0.995) -> TripletFeatures:
    """Frozen features of shapes-world edits (scenes rendered in memory; reference patches pooled to phi's grid).

    Edits that carry hard negatives (``ShapesWorld.make_triplets(negatives=K)``) give
    ``negatives`` [N, K+1, D]; negatives within `dup_threshold` cosine of their target are masked.
    """
    from ..shapes import render_array

    bb = composer.backbone

    def encode(scenes: Sequence[Any]) -> torch.Tensor:
        return F.normalize(bb.encode_image(bb.pixels_from_uint8(render_array(scenes, image_size)), with_patches=False).pooled, dim=-1)

    refs, patches, targets = [], [], []
    for s in range(0, len(edits), batch_size):
        chunk = edits[s: s + batch_size]
        p, pt = composer.pixel_features(bb.pixels_from_uint8(render_array([e.source for e in chunk], image_size)),
                                        with_patches=True)
        refs.append(p)
        patches.append(pt)
        targets.append(encode([e.target for e in chunk]))
    feats = TripletFeatures(torch.cat(refs), torch.cat(patches), torch.cat(targets), [e.text for e in edits],
                            [e.kind for e in edits], [e.source.key for e in edits], [e.target.key for e in edits])
    k = max((len(e.negatives) for e in edits), default=0)
    if k == 0:
        return feats
    flat = [(i, j, scene) for i, e in enumerate(edits) for j, scene in enumerate(e.negatives)]
    negatives = torch.zeros(len(edits), k, bb.embed_dim)
    valid = torch.zeros(len(edits), k, dtype=torch.bool)
    for s in range(0, len(flat), batch_size):
        chunk = flat[s: s + batch_size]
        rows, cols = torch.tensor([c[0] for c in chunk]), torch.tensor([c[1] for c in chunk])
        negatives[rows, cols] = encode([c[2] for c in chunk]).float()
        valid[rows, cols] = True
    valid, _ = mask_false_negatives(feats.target, negatives, valid, dup_threshold)
    return dataclasses.replace(feats, negatives=negatives, negative_valid=valid)


@torch.no_grad()
def encode_triplets(composer: Composer, triplets: Any, batch_size: int = 64, progress: bool = True,
                    precision: str = "no", dup_threshold: float = NEGATIVE_DUP_THRESHOLD) -> TripletFeatures:
    """Frozen float32 features of a :class:`zscir.data.triplets.TripletSet` (images loaded robustly; encoded under `precision`).

    Explicit negatives become ``negatives`` [N, K, D] (padded) with ``negative_valid``
    [N, K]: False for padding, undecodable images (reported) and negatives whose
    cosine to their target is >= `dup_threshold` (counted in a warning). A set
    without negatives keeps both None.
    """
    precision = resolve_precision(precision, composer.device)
    if precision == "no":
        feats = _encode_triplets(composer, triplets, batch_size, progress)
    else:
        with autocast(precision, composer.device):
            feats = _encode_triplets(composer, triplets, batch_size, progress)
        # float32 from here on; unit vectors normalised again in float32 (half-precision normalisation is off by ~1e-3)
        feats = dataclasses.replace(
            feats, ref_pooled=feats.ref_pooled.float(), target=F.normalize(feats.target.float(), dim=-1),
            ref_patches=None if feats.ref_patches is None else feats.ref_patches.float(),
            negatives=None if feats.negatives is None else F.normalize(feats.negatives.float(), dim=-1),
        )
    if feats.negatives is None:
        return feats
    valid, masked = mask_false_negatives(feats.target, feats.negatives, feats.negative_valid, dup_threshold)
    if masked:
        logger.warning("masked %d near-duplicate negative(s) of %d (cosine to the target >= %g)",
                       masked, int(feats.negative_valid.sum()), dup_threshold)
    return dataclasses.replace(feats, negative_valid=valid)


@torch.no_grad()
def _encode_triplets(composer: Composer, triplets: Any, batch_size: int, progress: bool) -> TripletFeatures:
    """:func:`encode_triplets` in the caller's precision."""
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
            tgt[img_rows] = composer.encode_images(imgs).cpu().float()
        if txt_rows:
            tgt[txt_rows] = composer.encode_texts([chunk[i].target_caption for i in txt_rows]).cpu().float()
        targets.append(tgt)
    negatives, negative_valid = _encode_negatives(composer, triplets, rows, batch_size, progress)
    return TripletFeatures(
        torch.cat(refs).cpu(), torch.cat(patches).cpu() if patches else None, torch.cat(targets),
        [r.modification for r in rows], [r.kind or "" for r in rows], [str(r.reference) for r in rows],
        [str(r.target or r.target_caption) for r in rows], negatives, negative_valid,
    )


def _encode_negatives(composer: Composer, triplets: Any, rows: Sequence[Any], batch_size: int,
                      progress: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Normalised negatives [N, K, D] (images like targets, captions with frozen text) and validity [N, K]; None without any."""
    from tqdm.auto import tqdm

    k = max((len(r.negatives) for r in rows), default=0)
    if k == 0:
        return None, None
    # each distinct image / caption is encoded once (shapes negatives repeat the reference, for one)
    images = list(dict.fromkeys(n for r in rows if r.target for n in r.negatives))
    captions = list(dict.fromkeys(n for r in rows if not r.target for n in r.negatives))
    encoded: Dict[Tuple[bool, str], torch.Tensor] = {}
    failed: List[str] = []
    for s in tqdm(range(0, len(images), batch_size), desc="encode negative images", disable=not progress):
        loaded = []
        for ref in images[s: s + batch_size]:
            try:
                loaded.append((ref, triplets.open_image(ref)))
            except (ImageLoadError, KeyError) as err:  # a bad negative is masked, not a crash
                failed.append(str(err))
        if loaded:
            feats = composer.encode_images([img for _, img in loaded]).cpu().float()
            encoded.update({(True, ref): f for (ref, _), f in zip(loaded, feats)})
    for s in tqdm(range(0, len(captions), batch_size), desc="encode negative captions", disable=not progress):
        chunk = captions[s: s + batch_size]
        encoded.update({(False, c): f for c, f in zip(chunk, composer.encode_texts(chunk).cpu().float())})
    if failed:
        logger.warning("%d negative image(s) could not be decoded and are masked: %s", len(failed),
                       "; ".join(failed[:FAILED_NEGATIVES_LOGGED]))
    negatives = torch.zeros(len(rows), k, composer.backbone.embed_dim)
    valid = torch.zeros(len(rows), k, dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, n in enumerate(r.negatives):
            feat = encoded.get((bool(r.target), n))
            if feat is not None:
                negatives[i, j], valid[i, j] = feat, True
    return negatives, valid


def corpus_features(composer: Composer, folder: Any, cache_dir: Path, progress: bool = True,
                    precision: str = "no") -> Tuple[torch.Tensor, List[str]]:
    """Normalised pooled features and names of every decodable image of a corpus (cached on disk; encoded under
    `precision`): a folder (searched recursively), a list of paths or an ImageSource (e.g. a data set column)."""
    from ..data.features import FeatureCache
    from ..data.images import list_images

    paths = list_images(folder) if isinstance(folder, (str, os.PathLike)) else folder
    if not len(paths):
        raise ValueError(f"--corpus {folder}: no images found")
    cache = FeatureCache.build(composer.backbone, paths, cache_dir, with_patches=False, progress=progress,
                               precision=precision)
    valid = cache.valid_indices()
    feats = torch.from_numpy(cache.pooled[valid].astype("float32"))
    return F.normalize(feats, dim=-1), [cache.paths[i] for i in valid.tolist()]


@torch.no_grad()
def text_features(backbone: Any, texts: Sequence[str], batch_size: int = 512, progress: bool = False,
                  report: Any = None) -> torch.Tensor:
    """Normalised float32 text features [N, D] of ``texts`` with the backbone in eval mode (empty texts as " ").

    Texts that fill the whole context (the tokenizer truncated them) are counted in `report.truncated`
    (a :class:`zscir.data.captions.CaptionReport`) when one is given.
    """
    from tqdm.auto import tqdm

    texts = [t or " " for t in texts]
    was = backbone.training
    backbone.eval()
    parts = []
    for s in tqdm(range(0, len(texts), batch_size), desc="encode texts", disable=not progress):
        ids = backbone.tokenize(texts[s: s + batch_size])
        if report is not None:
            for j in torch.nonzero(ids[:, -1] != 0).flatten().tolist():
                report.note("truncated", repr(texts[s + j][:40] + "..."))
        parts.append(backbone.encode_text(ids, normalize=True).float())
    backbone.train(was)
    return torch.cat(parts) if parts else torch.empty(0, backbone.embed_dim)
