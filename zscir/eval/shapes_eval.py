"""Zero-shot composed retrieval on the built-in shapes world (held-out phrasing family).

One :class:`ShapesBenchmark` renders an evaluation set once (queries, a gallery
of targets, references, sibling hard negatives and random scenes), caches the
frozen CLIP features, and scores any query encoder against it:
Recall@{1,5,10,50} (a hit is any gallery image with the target's content),
Recall@10 per modification kind and its mean over kinds. The baselines every
table compares against (image only, text only, image + text sum) and the text
ceilings (:meth:`ShapesBenchmark.oracle_rows`) are here too.

Two splits with the same protocol and disjoint random streams: ``val`` is where
defaults and ablations are chosen, ``test`` (the demo's table) is reported once.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..search.exact import exact_topk
from .metrics import recall_at_ks

QueryEncoder = Callable[[torch.Tensor, Optional[torch.Tensor], List[str]], torch.Tensor]
KS = (1, 5, 10, 50)
SPLIT_STREAMS = {"test": "eval", "val": "val"}  # the test stream keeps its historical name: same queries as before


class ShapesBenchmark:
    """A rendered shapes-world evaluation set with cached CLIP features."""

    def __init__(self, backbone, world, n_queries: int = 1000, family: str = "eval", stream: Optional[str] = None,
                 n_random: Optional[int] = None, kind_weights: Optional[Mapping[str, float]] = None,
                 batch_size: int = 256, split: str = "test") -> None:
        from ..shapes import render_array

        if split not in SPLIT_STREAMS:
            raise ValueError(f"ShapesBenchmark: split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
        stream = stream or SPLIT_STREAMS[split]
        self.backbone, self.world, self.split = backbone, world, split
        self.eval_set = world.make_eval_set(n_queries, n_random=n_random, family=family, stream=stream,
                                            kind_weights=kind_weights)
        gallery = list(self.eval_set.gallery)
        pooled, patches = [], []
        with torch.no_grad():
            for s in range(0, len(gallery), batch_size):
                px = backbone.pixels_from_uint8(render_array(gallery[s: s + batch_size], world.config.image_size))
                f = backbone.encode_image(px)
                pooled.append(f.pooled)
                patches.append(f.patches)
        self.gallery_pooled = torch.cat(pooled)
        self.gallery_patches = torch.cat(patches)
        self.gallery = F.normalize(self.gallery_pooled, dim=-1)
        q = self.eval_set.queries
        self.ref_index = torch.tensor([x.reference_index for x in q])
        self.texts = [x.text for x in q]
        self.kinds = [x.kind for x in q]
        self.positives = [self.eval_set.positives(i) for i in range(len(q))]

    def __len__(self) -> int:
        return len(self.texts)

    @torch.no_grad()
    def query_embeddings(self, encode: QueryEncoder, batch_size: int = 256) -> torch.Tensor:
        """Normalised query embeddings from an encoder of (ref pooled, ref full-grid patches, texts)."""
        out = []
        for s in range(0, len(self), batch_size):
            idx = self.ref_index[s: s + batch_size]
            out.append(encode(self.gallery_pooled[idx], self.gallery_patches[idx], self.texts[s: s + batch_size]))
        return F.normalize(torch.cat(out).float(), dim=-1)

    def score(self, queries: torch.Tensor) -> Dict[str, float]:
        """Recall@K overall, Recall@10 per kind, and mean Recall@10 over kinds (percent)."""
        _, top = exact_topk(queries, self.gallery, max(KS))
        rankings = top.tolist()
        overall = recall_at_ks(rankings, self.positives, KS)
        result = {f"R@{k}": v for k, v in overall.items()}
        per_kind: Dict[str, float] = {}
        for kind in sorted(set(self.kinds)):
            rows = [i for i, k in enumerate(self.kinds) if k == kind]
            per_kind[kind] = recall_at_ks([rankings[i] for i in rows], [self.positives[i] for i in rows], (10,))[10]
        result["mean_R@10_over_kinds"] = float(np.mean(list(per_kind.values())))
        result["per_kind_R@10"] = per_kind
        return result

    def evaluate(self, encode: QueryEncoder) -> Dict[str, float]:
        """Score a query encoder."""
        return self.score(self.query_embeddings(encode))

    def rankings(self, encode: QueryEncoder, k: int = 5) -> torch.Tensor:
        """Top-k gallery indices per query."""
        return exact_topk(self.query_embeddings(encode), self.gallery, k)[1]

    @torch.no_grad()
    def evaluate_texts(self, texts: Sequence[str], batch_size: int = 256) -> Dict[str, float]:
        """Score queries given as one text per query, encoded by the frozen text encoder."""
        feats = [self.backbone.encode_text(list(texts[s: s + batch_size]), normalize=True)
                 for s in range(0, len(texts), batch_size)]
        return self.score(F.normalize(torch.cat(feats).float(), dim=-1))

    def oracle_rows(self) -> Dict[str, Dict[str, float]]:
        """Text ceilings: the target's complete caption, and the reference's caption followed by the modification."""
        from ..shapes import full_caption

        gallery = self.eval_set.gallery
        queries = self.eval_set.queries
        target = [full_caption(q.edit.target) for q in queries]
        ref_plus = [f"{full_caption(gallery[q.reference_index])}, {q.text}" for q in queries]
        return {"target caption (oracle)": self.evaluate_texts(target),
                "reference caption + text": self.evaluate_texts(ref_plus)}


def image_only(backbone) -> QueryEncoder:
    """Query = the reference image feature."""
    return lambda pooled, patches, texts: pooled


def text_only(backbone, template: str = "{}") -> QueryEncoder:
    """Query = the CLIP text feature of the modification text."""
    return lambda pooled, patches, texts: backbone.encode_text([template.format(t) for t in texts], normalize=True)


def image_plus_text(backbone) -> QueryEncoder:
    """Query = normalised image feature + normalised text feature."""
    return lambda pooled, patches, texts: (F.normalize(pooled, dim=-1)
                                           + backbone.encode_text(list(texts), normalize=True))


def composer_encoder(composer) -> QueryEncoder:
    """Query = the Composer's composed embedding (prompt from its config; full-grid patches pooled to phi's grid)."""
    return lambda pooled, patches, texts: composer.compose_features(pooled, composer.phi_patches(patches), list(texts))


@torch.no_grad()
def inversion_recall(composer, backbone, world, n_images: int = 1000, stream: str = "inversion",
                     prompt: str = "a photo of $") -> Dict[str, float]:
    """R@1/R@5 of "a photo of $" retrieving its own image among `n_images` held-out images."""
    from ..shapes import render_array

    scenes = world.scenes(n_images, stream=stream)
    pooled, patches = composer.pixel_features(backbone.pixels_from_uint8(render_array(scenes, world.config.image_size)),
                                              with_patches=True)
    img = F.normalize(pooled, dim=-1)
    outs = []
    for s in range(0, n_images, 250):
        tokens = composer.phi(pooled[s: s + 250], patches[s: s + 250])
        outs.append(backbone.encode_with_pseudo_tokens(prompt, tokens, composer.config.placeholder, normalize=True))
    q = torch.cat(outs)
    _, top = exact_topk(q, img, 5)
    keys = [sc.key for sc in scenes]
    truth = [[j for j in range(n_images) if keys[j] == keys[i]] for i in range(n_images)]
    r = recall_at_ks(top.tolist(), truth, (1, 5))
    return {"R@1": r[1], "R@5": r[5]}
