"""Triplet generation modes (:data:`GENERATION_MODES`) and the pipeline that runs them and writes the output."""
from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...checkpoint import atomic_write_json
from ...config import Config
from ...registry import Registry
from ...search.zones import mid_zone_table
from ..schema import PathLike
from ..triplets import Triplet, TripletSet, load_triplets
from .corpus import CaptionCorpus, read_captions
from .lexicon import Lexicon, _caption_phrase, _masked_keys, _normalise_word, fill_word_template, one_word_difference, swap_word

TextEditor = Callable[[str], Optional[Tuple[str, str]]]
PairDescriber = Callable[[str, str], Optional[str]]

OUTPUT_NAME = "triplets.jsonl"
REPORT_NAME = "make_triplets.json"
#: similarity-pair negatives never include images this close (cosine) to the target
NEAR_DUPLICATE = 0.995

__all__ = [
    "TextEditor",
    "PairDescriber",
    "OUTPUT_NAME",
    "REPORT_NAME",
    "NEAR_DUPLICATE",
    "mid_rank_partners",
    "caption_edit_triplets",
    "caption_pair_triplets",
    "similarity_pair_triplets",
    "editor_triplets",
    "shapes_triplets",
    "TripletGenConfig",
    "GenerationResult",
    "GENERATION_MODES",
    "generate_triplets",
    "make_triplets",
]


# ------------------------------------------------------------------- generators
class Generated(NamedTuple):
    """A generated triplet and the mode that made it."""

    mode: str
    triplet: Triplet


def _bar(items: Iterable[Any], total: int, desc: str, progress: bool) -> Iterable[Any]:
    return tqdm(items, total=total, desc=desc, disable=not progress, leave=False)


def caption_edit_triplets(
    corpus: CaptionCorpus,
    lexicon: Lexicon,
    rng: random.Random,
    edits_per_caption: int = 1,
    progress: bool = False,
    skipped: Optional[Counter] = None,
    negatives: int = 0,
    negative_rng: Optional[random.Random] = None,
) -> List[Triplet]:
    """Caption-edit triplets: one lexicon word swapped per edit; target_caption is the edited caption.

    With `negatives` > 0 each triplet gets up to that many caption negatives: the
    reference caption with other words of the edited word's class in the edited
    slot (never the target's word, the reference's or another word of the caption),
    so a negative differs from the target exactly in what the modification
    specifies. They are drawn from `negative_rng` (default: a fixed-seed stream),
    so the triplets are the same with or without them.
    """
    negative_rng = negative_rng or random.Random("caption-edit:negatives")
    out: List[Triplet] = []
    for item in _bar(corpus.items, len(corpus), "caption edits", progress):
        matches = lexicon.find(item.caption)
        if not matches:
            if skipped is not None:
                skipped["no lexicon word"] += 1
            continue
        present = {m.word for m in matches}
        done = set()
        for match in rng.sample(matches, len(matches)):
            choices = [w for w in lexicon.classes[match.cls] if w not in present]
            if not choices:
                continue
            for new in rng.sample(choices, min(len(choices), edits_per_caption)):
                if len(done) >= edits_per_caption:
                    break
                template = rng.choice(lexicon.templates_for(match.cls))
                others = [w for w in choices if w != new]
                chosen = negative_rng.sample(others, min(negatives, len(others))) if negatives else []
                out.append(Triplet(
                    reference=corpus.image_path(item.image),
                    modification=fill_word_template(template, match.word, new),
                    target_caption=swap_word(item.caption, match, new),
                    kind=match.cls,
                    line=item.line,
                    negatives=tuple(swap_word(item.caption, match, w) for w in chosen),
                ))
                done.add((match.start, new))
            if len(done) >= edits_per_caption:
                break
    return out


def _pair_text(
    lexicon: Lexicon,
    rng: random.Random,
    ref_caption: str,
    tgt_caption: str,
    describer: Optional[PairDescriber],
    diff: Optional[Tuple[str, str, str]],
) -> Optional[Tuple[str, str]]:
    """(modification, kind) for an image pair: the describer, else word templates for a known diff, else caption templates."""
    if describer is not None:
        text = describer(ref_caption, tgt_caption)
        if text is not None and not isinstance(text, str):
            raise TypeError(f"pair describer returned {type(text).__name__}, expected str or None")
        if text is None or not text.strip():
            return None
        return " ".join(text.split()), (diff[0] if diff else "described")
    if diff is not None:
        cls, old, new = diff
        return fill_word_template(rng.choice(lexicon.templates_for(cls)), old, new), cls
    template = rng.choice(lexicon.caption_templates)
    return template.format(reference=_caption_phrase(ref_caption), target=_caption_phrase(tgt_caption)), "similar"


def _draw_from_buckets(rng: random.Random, sizes: List[int], skip: Tuple[int, ...]) -> Optional[Tuple[int, int]]:
    """(bucket, position) uniform over the entries of the buckets not in `skip`; None when they are empty."""
    total = sum(size for b, size in enumerate(sizes) if b not in skip)
    if total <= 0:
        return None
    r = rng.randrange(total)
    for b, size in enumerate(sizes):
        if b in skip:
            continue
        if r < size:
            return b, r
        r -= size
    raise AssertionError("unreachable: r < total")


def caption_pair_triplets(
    corpus: CaptionCorpus,
    lexicon: Lexicon,
    rng: random.Random,
    pairs_per_image: int = 1,
    describer: Optional[PairDescriber] = None,
    progress: bool = False,
    skipped: Optional[Counter] = None,
    negatives: int = 0,
    negative_rng: Optional[random.Random] = None,
) -> List[Triplet]:
    """Image-pair triplets from captions that differ by exactly one lexicon word (index by masked caption).

    With `negatives` > 0 each triplet gets up to that many image negatives: images
    whose caption is the same but for a *third* word in the edited slot ("a green
    car on a street" for red -> blue), never the reference or target image nor an
    image also captioned with the target's word. Drawn from `negative_rng`
    (default: a fixed-seed stream), so the triplets are the same with or without them.
    """
    negative_rng = negative_rng or random.Random("caption-pair:negatives")
    # key (class, text before, text after) -> word -> captions with that word there
    index: Dict[Tuple[str, str, str], Dict[str, List[int]]] = defaultdict(lambda: defaultdict(list))
    for i, item in enumerate(_bar(corpus.items, len(corpus), "indexing captions", progress)):
        for key, word in _masked_keys(lexicon, item.caption).items():
            index[key][word].append(i)
    out: List[Triplet] = []
    groups = [(k, v) for k, v in index.items() if len(v) >= 2]
    for key, buckets in _bar(groups, len(groups), "caption pairs", progress):
        words = sorted(buckets)
        sizes = [len(buckets[w]) for w in words]
        images_of = {w: {corpus.items[i].image for i in buckets[w]} for w in words} if negatives else {}
        for w_pos, word in enumerate(words):
            for i in buckets[word]:
                ref = corpus.items[i]
                partners = set()
                for _ in range(4 * pairs_per_image):  # a few tries: a partner may show the same image
                    if len(partners) >= pairs_per_image:
                        break
                    # uniform over captions with a different word in this slot (the group has >= 2 words)
                    v_pos, r = _draw_from_buckets(rng, sizes, (w_pos,))
                    j = buckets[words[v_pos]][r]
                    tgt = corpus.items[j]
                    if tgt.image == ref.image or j in partners:
                        continue
                    partners.add(j)
                    made = _pair_text(lexicon, rng, ref.caption, tgt.caption, describer, (key[0], word, words[v_pos]))
                    if made is None:
                        if skipped is not None:
                            skipped["describer declined"] += 1
                        continue
                    text, kind = made
                    chosen: List[str] = []
                    for _ in range(4 * negatives):  # a few tries: a draw may repeat an image or show ref/target
                        if len(chosen) >= negatives:
                            break
                        drawn = _draw_from_buckets(negative_rng, sizes, (w_pos, v_pos))
                        if drawn is None:
                            break
                        image = corpus.items[buckets[words[drawn[0]]][drawn[1]]].image
                        if image not in (ref.image, tgt.image) and image not in images_of[words[v_pos]] \
                                and image not in chosen:
                            chosen.append(image)
                    out.append(Triplet(
                        reference=corpus.image_path(ref.image),
                        modification=text,
                        target=corpus.image_path(tgt.image),
                        target_caption=tgt.caption,
                        kind=kind,
                        line=ref.line,
                        negatives=tuple(corpus.image_path(image) for image in chosen),
                    ))
    return out


def mid_rank_partners(
    embeddings: torch.Tensor, lo: int, hi: int, chunk_size: Optional[int] = None, progress: bool = False
) -> List[List[int]]:
    """For each row, the other rows at cosine-similarity ranks [lo, hi) (rank 0 = most similar other row).

    Similarities are computed in row chunks (default: about 64 M entries each), so
    memory stays bounded; time is quadratic in the number of images.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D tensor [num_images, dim], got shape {tuple(embeddings.shape)}")
    if not 0 <= lo < hi:
        raise ValueError(f"rank window [lo, hi) must satisfy 0 <= lo < hi, got [{lo}, {hi})")
    if not torch.isfinite(embeddings).all():
        bad = int((~torch.isfinite(embeddings)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"embeddings row {bad} holds NaN or infinite values")
    n = embeddings.shape[0]
    feats = F.normalize(embeddings.float(), dim=-1)
    k = min(hi, n - 1)
    chunk_size = chunk_size or max(1, min(4096, (1 << 26) // max(n, 1)))
    out: List[List[int]] = []
    starts = range(0, n, chunk_size)
    for start in _bar(starts, len(starts), "similarity ranks", progress):
        block = feats[start : start + chunk_size] @ feats.T
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = float("-inf")  # an image is not its own partner
        if k <= lo:
            out.extend([] for _ in range(block.shape[0]))
            continue
        ranked = block.topk(k, dim=1).indices
        out.extend(r[lo:k].tolist() for r in ranked)
    return out


def similarity_pair_triplets(
    corpus: CaptionCorpus,
    embeddings: torch.Tensor,
    lexicon: Lexicon,
    rng: random.Random,
    window: Tuple[int, int] = (5, 50),
    pairs_per_image: int = 1,
    describer: Optional[PairDescriber] = None,
    progress: bool = False,
    skipped: Optional[Counter] = None,
    negatives: int = 0,
    negative_rng: Optional[random.Random] = None,
    negative_band: Tuple[float, float] = (-0.05, 0.05),
    dup_threshold: float = NEAR_DUPLICATE,
) -> List[Triplet]:
    """SPN-style image pairs: targets drawn from each image's mid-rank similarity window.

    With `negatives` > 0 each triplet gets up to that many target-relative
    mid-zone image negatives (DQE-CIR's rule, the reference standing in for the
    query): images c with lo <= s(r, c) - s(r, t) <= hi for ``negative_band =
    (lo, hi)``, never the reference, the target or a near duplicate of the target
    (cosine >= `dup_threshold`); fewer when the band holds fewer. Drawn from
    `negative_rng` (default: a fixed-seed stream), so the triplets are the same
    with or without them.
    """
    images = corpus.images()
    if embeddings.ndim != 2 or embeddings.shape[0] != len(images):
        raise ValueError(
            f"embeddings have shape {tuple(embeddings.shape)} but {corpus.source} lists {len(images)} distinct images; "
            "pass one row per image, in order of first appearance"
        )
    partners = mid_rank_partners(embeddings, *window, progress=progress)
    out: List[Triplet] = []
    pairs: List[Tuple[int, int]] = []
    for i, image in enumerate(_bar(images, len(images), "similarity pairs", progress)):
        candidates = partners[i]
        if not candidates:
            if skipped is not None:
                skipped["empty rank window"] += 1
            continue
        ref_caption = corpus.first_caption(image)
        for j in rng.sample(candidates, min(pairs_per_image, len(candidates))):
            tgt_caption = corpus.first_caption(images[j])
            diff = one_word_difference(lexicon, ref_caption, tgt_caption)
            made = _pair_text(lexicon, rng, ref_caption, tgt_caption, describer, diff)
            if made is None:
                if skipped is not None:
                    skipped["describer declined"] += 1
                continue
            text, kind = made
            pairs.append((i, j))
            out.append(Triplet(
                reference=corpus.image_path(image),
                modification=text,
                target=corpus.image_path(images[j]),
                target_caption=tgt_caption,
                kind=kind,
                line=corpus.first_line(image),
            ))
    if negatives and pairs:
        rng_neg = negative_rng or random.Random("similarity-pair:negatives")
        table = _mid_zone_negatives(embeddings, pairs, negatives, negative_band, dup_threshold, rng_neg)
        out = [dataclasses.replace(t, negatives=tuple(corpus.image_path(images[k]) for k in row if k >= 0))
               for t, row in zip(out, table.tolist())]
    return out


def _mid_zone_negatives(embeddings: torch.Tensor, pairs: List[Tuple[int, int]], k: int, band: Tuple[float, float],
                        dup_threshold: float, rng: random.Random) -> torch.Tensor:
    """[len(pairs), k] row indices (-1 = none) in the target-relative band of each (reference, target) pair."""
    feats = F.normalize(embeddings.float(), dim=-1)
    ref = torch.tensor([i for i, _ in pairs])
    tgt = torch.tensor([j for _, j in pairs])
    chunk = max(1, min(1024, (1 << 24) // max(len(feats), 1)))  # bounded memory: ~16 M similarities per chunk
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    table, _ = mid_zone_table(feats[ref], feats[tgt], feats, band[0], band[1], k, dup_threshold=dup_threshold,
                              generator=generator, chunk=chunk, exclude=torch.stack([ref, tgt], 1), fallback=False)
    return table


def editor_triplets(
    corpus: CaptionCorpus,
    editor: TextEditor,
    progress: bool = False,
    skipped: Optional[Counter] = None,
) -> List[Triplet]:
    """Triplets written by a user's :data:`TextEditor` (an LLM): one call per caption.

    No negatives: what the editor changed is not known, so there is no rule for a
    caption that differs from its target in exactly that.
    """
    out: List[Triplet] = []
    for item in _bar(corpus.items, len(corpus), "text editor", progress):
        result = editor(item.caption)
        if result is None:
            if skipped is not None:
                skipped["editor declined"] += 1
            continue
        if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(x, str) for x in result)):
            raise TypeError(
                f"text editor returned {result!r} for {corpus.source}:{item.line}; expected (modification, target_caption) or None"
            )
        modification, target_caption = (" ".join(x.split()) for x in result)
        if not modification or not target_caption or _normalise_word(target_caption) == _normalise_word(item.caption):
            if skipped is not None:
                skipped["editor output unusable"] += 1
            continue
        out.append(Triplet(
            reference=corpus.image_path(item.image),
            modification=modification,
            target_caption=target_caption,
            kind="llm",
            line=item.line,
        ))
    return out


def shapes_triplets(
    n: int,
    folder: PathLike,
    seed: int = 0,
    long_tail: bool = False,
    image_size: int = 64,
    progress: bool = False,
    negatives: int = 0,
) -> List[Triplet]:
    """Shapes-world triplets (training phrasing family) rendered into `folder`, as absolute-path triplets.

    With `negatives` > 0 each triplet lists image negatives: its reference, then up
    to `negatives` sibling edits of it (:meth:`ShapesWorld.make_triplets`); the
    triplets are the same with or without them.
    """
    from ...shapes import LONG_TAIL_WEIGHTS, ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=image_size))
    edits = world.make_triplets(n, family="train", kind_weights=LONG_TAIL_WEIGHTS if long_tail else None,
                                progress=progress, negatives=negatives)
    folder = Path(folder)
    world.export_triplets(edits, folder, progress=progress)
    exported = load_triplets(folder / OUTPUT_NAME)
    absolute = lambda ref: os.path.abspath(exported.image_path(ref))  # noqa: E731
    return [dataclasses.replace(t, reference=absolute(t.reference), target=absolute(t.target) if t.target else None,
                                negatives=tuple(absolute(n) for n in t.negatives))
            for t in exported]


# ------------------------------------------------------------------- pipeline
@dataclasses.dataclass
class TripletGenConfig(Config):
    """Settings of ``zscir make-triplets``."""

    captions: Optional[str] = None
    image_root: Optional[str] = None
    lexicon: Optional[str] = None
    modes: Tuple[str, ...] = ()  # empty: every mode whose input is available
    seed: int = 0
    max_triplets: Optional[int] = None
    edits_per_caption: int = 1
    pairs_per_image: int = 1
    window_lo: int = 5
    window_hi: int = 50
    shapes: int = 0
    long_tail: bool = False
    shapes_image_size: int = 64
    check_images: bool = True
    negatives: int = 3  # hard negatives per triplet in the modes that make them; 0: none
    negative_lo: float = -0.05  # similarity-pair negatives: band of s(r, c) - s(r, t)
    negative_hi: float = 0.05
    split: Optional[str] = None  # the split of a caption data set (--split)
    columns: Dict[str, str] = dataclasses.field(default_factory=dict)  # caption data set: field -> column


@dataclasses.dataclass
class GenContext:
    """Everything a generation mode may need."""

    config: TripletGenConfig
    out_dir: Path
    corpus: Optional[CaptionCorpus]
    lexicon: Lexicon
    embeddings: Optional[torch.Tensor]
    text_editor: Optional[TextEditor]
    pair_describer: Optional[PairDescriber]
    progress: bool

    def rng(self, mode: str) -> random.Random:
        """An independent deterministic stream per mode (string seeds are hashed stably by `random`)."""
        return random.Random(f"make-triplets:{self.config.seed}:{mode}")

    def negative_rng(self, mode: str) -> random.Random:
        """The mode's stream for negatives, apart from :meth:`rng` so triplets do not depend on --negatives."""
        return self.rng(f"{mode}/negatives")

    def need_corpus(self, mode: str) -> CaptionCorpus:
        """The caption corpus, or a clear error naming the mode that needs it."""
        if self.corpus is None:
            raise ValueError(f"mode {mode!r} needs a caption corpus (--captions captions.jsonl)")
        return self.corpus


ModeFunction = Callable[[GenContext, Counter], List[Triplet]]
GENERATION_MODES: Registry[ModeFunction] = Registry("triplet generation mode")


@GENERATION_MODES.register("caption-edit")
def _mode_caption_edit(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    return caption_edit_triplets(ctx.need_corpus("caption-edit"), ctx.lexicon, ctx.rng("caption-edit"),
                                 ctx.config.edits_per_caption, ctx.progress, skipped,
                                 ctx.config.negatives, ctx.negative_rng("caption-edit"))


@GENERATION_MODES.register("caption-pair")
def _mode_caption_pair(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    return caption_pair_triplets(ctx.need_corpus("caption-pair"), ctx.lexicon, ctx.rng("caption-pair"),
                                 ctx.config.pairs_per_image, ctx.pair_describer, ctx.progress, skipped,
                                 ctx.config.negatives, ctx.negative_rng("caption-pair"))


@GENERATION_MODES.register("similarity-pair")
def _mode_similarity_pair(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    if ctx.embeddings is None:
        raise ValueError("mode 'similarity-pair' needs image embeddings (--embeddings FILE.safetensors)")
    return similarity_pair_triplets(
        ctx.need_corpus("similarity-pair"), ctx.embeddings, ctx.lexicon, ctx.rng("similarity-pair"),
        (ctx.config.window_lo, ctx.config.window_hi), ctx.config.pairs_per_image, ctx.pair_describer,
        ctx.progress, skipped, ctx.config.negatives, ctx.negative_rng("similarity-pair"),
        (ctx.config.negative_lo, ctx.config.negative_hi),
    )


@GENERATION_MODES.register("llm-edit")
def _mode_llm_edit(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    if ctx.text_editor is None:
        raise ValueError("mode 'llm-edit' needs a text editor callable (--text-editor module:function)")
    return editor_triplets(ctx.need_corpus("llm-edit"), ctx.text_editor, ctx.progress, skipped)


@GENERATION_MODES.register("shapes")
def _mode_shapes(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    if ctx.config.shapes <= 0:
        raise ValueError("mode 'shapes' needs a positive number of triplets (--shapes N)")
    return shapes_triplets(ctx.config.shapes, ctx.out_dir, ctx.config.seed, ctx.config.long_tail,
                           ctx.config.shapes_image_size, ctx.progress, ctx.config.negatives)


def _default_modes(ctx: GenContext) -> List[str]:
    """The modes whose inputs are present, in registry-independent fixed order."""
    modes = []
    if ctx.corpus is not None:
        modes += ["caption-edit", "caption-pair"]
        if ctx.embeddings is not None:
            modes.append("similarity-pair")
        if ctx.text_editor is not None:
            modes.append("llm-edit")
    if ctx.config.shapes > 0:
        modes.append("shapes")
    return modes


@dataclasses.dataclass
class GenerationResult:
    """Generated triplets and per-mode counts (kept triplets by kind, skipped inputs by reason, negatives)."""

    triplets: TripletSet
    counts: Dict[str, Dict[str, int]]
    skipped: Dict[str, Dict[str, int]]
    duplicates: int
    dropped_by_max: int
    negatives: Dict[str, int] = dataclasses.field(default_factory=dict)  # hard negatives of the kept triplets per mode

    def summary(self) -> str:
        """A small table of counts per mode and kind."""
        lines = [f"{'mode':<16} {'kind':<12} {'triplets':>8}"]
        for mode, kinds in self.counts.items():
            for kind, n in sorted(kinds.items()):
                lines.append(f"{mode:<16} {kind:<12} {n:>8}")
            lines.append(f"{mode:<16} {'(all)':<12} {sum(kinds.values()):>8}")
            if self.negatives.get(mode):
                lines.append(f"{mode:<16} {'negatives':<12} {self.negatives[mode]:>8}")
            for reason, n in sorted(self.skipped.get(mode, {}).items()):
                lines.append(f"{mode:<16} skipped: {reason} ({n})")
        lines.append(f"total {len(self.triplets)} triplets with {sum(self.negatives.values())} negative(s); "
                     f"{self.duplicates} duplicate(s) dropped; {self.dropped_by_max} dropped by --max")
        return "\n".join(lines)


def generate_triplets(
    config: TripletGenConfig,
    out_dir: PathLike,
    embeddings: Optional[torch.Tensor] = None,
    text_editor: Optional[TextEditor] = None,
    pair_describer: Optional[PairDescriber] = None,
    progress: bool = True,
) -> GenerationResult:
    """Run the configured modes, drop duplicates, apply the --max cap; paths in the result are absolute.

    The shapes mode renders its images into `out_dir`; the other modes only read the corpus.
    """
    if config.captions is None and config.shapes <= 0:
        raise ValueError("nothing to generate from: give a caption corpus (--captions) and/or --shapes N")
    if config.long_tail and config.shapes <= 0:
        raise ValueError("--long-tail only applies to shapes-world triplets (--shapes N)")
    for name in ("edits_per_caption", "pairs_per_image"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_triplets is not None and config.max_triplets < 1:
        raise ValueError(f"max_triplets must be >= 1, got {config.max_triplets}")
    if config.negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {config.negatives}")
    if config.negative_lo > config.negative_hi:
        raise ValueError(f"negative_lo ({config.negative_lo}) must be <= negative_hi ({config.negative_hi})")
    corpus = read_captions(config.captions, config.image_root, config.check_images, split=config.split,
                           columns=config.columns) if config.captions else None
    ctx = GenContext(config, Path(out_dir), corpus, Lexicon.load(config.lexicon), embeddings,
                     text_editor, pair_describer, progress)
    modes = list(config.modes) or _default_modes(ctx)
    for mode in modes:
        GENERATION_MODES.get(mode)  # unknown names fail before any work
    generated: List[Generated] = []
    skipped: Dict[str, Counter] = {}
    for mode in modes:
        skipped[mode] = Counter()
        generated += [Generated(mode, t) for t in GENERATION_MODES.get(mode)(ctx, skipped[mode])]
    seen = set()
    unique: List[Generated] = []
    for g in generated:
        t = g.triplet
        key = (t.reference, t.modification, t.target if t.target is not None else ("caption", t.target_caption))
        if key not in seen:
            seen.add(key)
            unique.append(g)
    duplicates = len(generated) - len(unique)
    dropped = 0
    if config.max_triplets is not None and len(unique) > config.max_triplets:
        keep = sorted(random.Random(f"make-triplets:{config.seed}:max").sample(range(len(unique)), config.max_triplets))
        dropped = len(unique) - len(keep)
        unique = [unique[i] for i in keep]
    numbers: Counter = Counter()
    rows = []
    counts: Dict[str, Counter] = {mode: Counter() for mode in modes}
    negatives: Counter = Counter({mode: 0 for mode in modes})
    for g in unique:
        numbers[g.mode] += 1
        rows.append(dataclasses.replace(g.triplet, id=f"{g.mode}-{numbers[g.mode]:06d}"))
        counts[g.mode][g.triplet.kind or "-"] += 1
        negatives[g.mode] += len(g.triplet.negatives)
    triplets = TripletSet(rows, None, source="make-triplets")
    return GenerationResult(
        triplets,
        {m: dict(c) for m, c in counts.items()},
        {m: dict(c) for m, c in skipped.items() if c},
        duplicates,
        dropped,
        dict(negatives),
    )


def make_triplets(
    config: TripletGenConfig,
    out_dir: PathLike,
    embeddings: Optional[torch.Tensor] = None,
    text_editor: Optional[TextEditor] = None,
    pair_describer: Optional[PairDescriber] = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate triplets and write ``out_dir/triplets.jsonl`` (paths relative to it) and ``make_triplets.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = generate_triplets(config, out_dir, embeddings, text_editor, pair_describer, progress)
    if not len(result.triplets):
        raise ValueError(f"no triplets were generated; counts: {result.summary()}")
    result.triplets.to_jsonl(out_dir / OUTPUT_NAME)
    atomic_write_json(out_dir / REPORT_NAME, {
        "config": config.to_dict(),
        "counts": result.counts,
        "skipped": result.skipped,
        "duplicates": result.duplicates,
        "dropped_by_max": result.dropped_by_max,
        "negatives": result.negatives,
        "total": len(result.triplets),
    })
    return result
