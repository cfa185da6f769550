"""Generate synthetic (reference, modification, target) triplets for Stage II (``zscir make-triplets``).

Input is an image-caption corpus: ``captions.jsonl`` with one
``{"image": "relative/path.jpg", "caption": "a red car on a street"}`` per line
(an image may have several captions) plus an image root (default: the file's
folder). Modes, registered in :data:`GENERATION_MODES`:

``caption-edit``
    Swap one attribute word of a caption with another word of the same lexicon
    class (colours, materials, counts, sizes, objects; :class:`Lexicon`, default
    ``zscir/assets/lexicon.json``). The triplet is (image, templated modification
    such as "change red to blue", ``target_caption`` = the edited caption).
    Words match on word boundaries, case-insensitively; captions without a
    lexicon word are skipped.
``caption-pair``
    Pair two *images* whose captions differ by exactly one lexicon word ("a red
    car on a street" / "a blue car on a street"). Captions are indexed by their
    text with that word masked, so pairs are found in about linear time.
``similarity-pair``
    SPN's recipe (Feng et al., "Improving Composed Image Retrieval via
    Contrastive Learning with Scaling Positives and Negatives", ACM MM 2024):
    positives are built from image pairs plus templates; in the paper an MLLM
    captions the images and an LLM writes the modification. Here, for every
    image the other images are ranked by cosine similarity of *given* image
    embeddings (one row per image of :meth:`CaptionCorpus.images`, computed by
    the caller with any model) and targets are drawn from the mid-rank window
    ``[lo, hi)`` (rank 0 = the nearest other image): near-duplicates are
    skipped, unrelated images too. The modification comes from a
    :data:`PairDescriber` if one is given, else from the word templates when the
    two captions differ by one lexicon word, else from caption templates such
    as "{target} instead of {reference}".
``llm-edit``
    A user-supplied :data:`TextEditor` rewrites each caption.
``shapes``
    The built-in shapes world (:mod:`zscir.data.shapes`), training phrasing
    family only; images are rendered into the output folder.

Hooks for users with an LLM or MLLM (plain callables, so any client works)::

    TextEditor   = Callable[[str], Optional[tuple[str, str]]]
        # reference caption -> (modification text, target caption), or None to skip
    PairDescriber = Callable[[str, str], Optional[str]]
        # (reference caption, target caption) -> modification text, or None to skip the pair

On the command line they are given as ``module:function`` import paths
(``--text-editor mypkg.llm:edit``). The output folder gets ``triplets.jsonl``
(read by :func:`zscir.data.triplets.load_triplets`; image paths relative to the
folder) and ``make_triplets.json`` (settings and counts). Output is
deterministic for a given ``--seed``; identical (reference, modification,
target) rows are dropped, and ``--max`` keeps a seeded random subset.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import random
import re
import string
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_json
from ..config import Config
from ..registry import Registry
from .generic import FileChecker
from .triplets import Triplet, TripletFileError, TripletSet, load_triplets

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
TextEditor = Callable[[str], Optional[Tuple[str, str]]]
PairDescriber = Callable[[str, str], Optional[str]]

DEFAULT_LEXICON = Path(__file__).resolve().parents[1] / "assets" / "lexicon.json"
OUTPUT_NAME = "triplets.jsonl"
REPORT_NAME = "make_triplets.json"
#: placeholders a word template may use ({a_new} = "an apple", "a dog")
WORD_PLACEHOLDERS = frozenset({"old", "new", "a_old", "a_new"})
CAPTION_PLACEHOLDERS = frozenset({"reference", "target"})

__all__ = [
    "TextEditor",
    "PairDescriber",
    "LexiconError",
    "Lexicon",
    "WordMatch",
    "CaptionedImage",
    "CaptionCorpus",
    "read_captions",
    "swap_word",
    "fill_word_template",
    "one_word_difference",
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
    "add_arguments",
    "run",
]


# ---------------------------------------------------------------------- lexicon
class LexiconError(ValueError):
    """A lexicon file is malformed; the message lists every problem."""


class WordMatch(NamedTuple):
    """One lexicon word found in a caption: character span, the text as written, its class and canonical word."""

    start: int
    end: int
    text: str
    word: str
    cls: str


def _normalise_word(text: str) -> str:
    return " ".join(text.lower().split())


def _article(word: str) -> str:
    """'an' before a vowel letter, else 'a' (a spelling rule of thumb, good enough for templates)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _placeholders(template: str) -> List[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise LexiconError(f"template {template!r} is not a valid format string ({err})") from None


class Lexicon:
    """Word classes for attribute swaps, with modification templates per class."""

    def __init__(
        self,
        classes: Mapping[str, Sequence[str]],
        templates: Mapping[str, Sequence[str]],
        caption_templates: Sequence[str],
        source: str = "<lexicon>",
    ) -> None:
        problems: List[str] = []
        self.source = source
        self.classes: Dict[str, Tuple[str, ...]] = {}
        self._class_of: Dict[str, str] = {}
        for cls, words in classes.items():
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
                problems.append(f"class {cls!r}: expected a list of strings")
                continue
            clean = []
            for w in words:
                norm = _normalise_word(w)
                if not norm:
                    problems.append(f"class {cls!r}: empty word")
                elif norm in self._class_of:
                    where = self._class_of[norm]
                    problems.append(f"class {cls!r}: word {norm!r} is already in class {where!r}" if where != cls
                                    else f"class {cls!r}: word {norm!r} is listed twice")
                else:
                    self._class_of[norm] = cls
                    clean.append(norm)
            if len(clean) < 2:
                problems.append(f"class {cls!r}: needs at least 2 words to swap between, has {len(clean)}")
            self.classes[cls] = tuple(clean)
        if not self.classes:
            problems.append("no word classes")
        self.templates: Dict[str, Tuple[str, ...]] = {}
        for key, items in templates.items():
            if key != "default" and key not in self.classes:
                problems.append(f"templates for unknown class {key!r}; classes: {sorted(self.classes)} (or 'default')")
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) for t in items):
                problems.append(f"templates {key!r}: expected a non-empty list of strings")
                continue
            for t in items:
                problems.extend(f"templates {key!r}: {p}" for p in self._template_problems(t, WORD_PLACEHOLDERS, ("new", "a_new")))
            self.templates[key] = tuple(items)
        for cls in self.classes:
            if cls not in self.templates and "default" not in self.templates:
                problems.append(f"class {cls!r} has no templates and there is no 'default' list")
        if not isinstance(caption_templates, (list, tuple)) or not caption_templates:
            problems.append("caption_templates: expected a non-empty list of strings")
            caption_templates = ()
        for t in caption_templates:
            problems.extend(f"caption_templates: {p}" for p in self._template_problems(t, CAPTION_PLACEHOLDERS, ("target",)))
        self.caption_templates: Tuple[str, ...] = tuple(caption_templates)
        if problems:
            raise LexiconError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        # longest phrases first, so "light blue" wins over "blue"; hyphens count as part of a word
        words = sorted(self._class_of, key=lambda w: (-len(w), w))
        body = "|".join(r"\s+".join(re.escape(part) for part in w.split()) for w in words)
        self._pattern = re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)

    @staticmethod
    def _template_problems(template: Any, allowed: frozenset, needs: Tuple[str, ...]) -> List[str]:
        if not isinstance(template, str):
            return [f"template {template!r} is not a string"]
        try:
            names = _placeholders(template)
        except LexiconError as err:
            return [str(err)]
        out = []
        unknown = sorted(set(names) - allowed)
        if unknown:
            out.append(f"template {template!r} uses unknown placeholder(s) {unknown}; allowed: {sorted(allowed)}")
        if not set(names) & set(needs):
            out.append(f"template {template!r} must mention " + " or ".join("{" + n + "}" for n in needs))
        return out

    @classmethod
    def load(cls, path: Optional[PathLike] = None) -> "Lexicon":
        """Read a lexicon JSON file (default: the shipped one); missing template sections come from the default."""
        path = Path(path) if path is not None else DEFAULT_LEXICON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"lexicon file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LexiconError(f"{path}: invalid JSON ({err})") from None
        allowed = {"classes", "templates", "caption_templates"}
        if not isinstance(data, dict):
            raise LexiconError(f"{path}: expected a JSON object with keys {sorted(allowed)}")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise LexiconError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if not isinstance(data.get("classes"), dict):
            raise LexiconError(f"{path}: 'classes' must be an object mapping class names to word lists")
        default: Dict[str, Any] = {}
        if path != DEFAULT_LEXICON and ("templates" not in data or "caption_templates" not in data):
            default = json.loads(DEFAULT_LEXICON.read_text(encoding="utf-8"))
        templates = data.get("templates", default.get("templates", {}))
        if not isinstance(templates, dict):
            raise LexiconError(f"{path}: 'templates' must be an object mapping class names (or 'default') to lists")
        if "templates" not in data:  # borrowed templates: keep only those for classes this lexicon has
            templates = {k: v for k, v in templates.items() if k == "default" or k in data["classes"]}
        captions = data.get("caption_templates", default.get("caption_templates", []))
        return cls(data["classes"], templates, captions, source=str(path))

    def class_of(self, word: str) -> Optional[str]:
        """The class of a word or phrase (any case), or None."""
        return self._class_of.get(_normalise_word(word))

    def find(self, text: str) -> List[WordMatch]:
        """Every lexicon word in `text` (whole words, case-insensitive, longest phrase first, no overlaps)."""
        out = []
        for m in self._pattern.finditer(text):
            word = _normalise_word(m.group(0))
            out.append(WordMatch(m.start(), m.end(), m.group(0), word, self._class_of[word]))
        return out

    def templates_for(self, cls: str) -> Tuple[str, ...]:
        """Modification templates of a class (the 'default' list when it has none)."""
        return self.templates.get(cls) or self.templates["default"]


def _match_case(like: str, word: str) -> str:
    """`word` with the capitalisation of `like` (ALL CAPS, Capitalised or as-is)."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_word(caption: str, match: WordMatch, new: str) -> str:
    """`caption` with the matched word replaced by `new` (capitalisation kept)."""
    return caption[: match.start] + _match_case(match.text, new) + caption[match.end :]


def fill_word_template(template: str, old: str, new: str) -> str:
    """Fill a word template's {old}/{new}/{a_old}/{a_new} placeholders."""
    return template.format(old=old, new=new, a_old=f"{_article(old)} {old}", a_new=f"{_article(new)} {new}")


def _caption_phrase(caption: str) -> str:
    """A caption as a phrase inside a sentence: no final period, lower-case first letter unless an acronym."""
    text = " ".join(caption.split()).rstrip(" .")
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


def _masked_keys(lexicon: Lexicon, caption: str) -> Dict[Tuple[str, str, str], str]:
    """For each lexicon word in a caption: (class, text before, text after) -> the word; the index key for pairing."""
    lowered = caption.lower()
    keys: Dict[Tuple[str, str, str], str] = {}
    for m in lexicon.find(caption):
        key = (m.cls, _normalise_word(lowered[: m.start]), _normalise_word(lowered[m.end :]))
        keys[key] = m.word
    return keys


def one_word_difference(lexicon: Lexicon, reference: str, target: str) -> Optional[Tuple[str, str, str]]:
    """(class, old word, new word) when two captions differ by exactly one lexicon word of one class, else None."""
    ref_keys = _masked_keys(lexicon, reference)
    for key, new in _masked_keys(lexicon, target).items():
        old = ref_keys.get(key)
        if old is not None and old != new:
            return key[0], old, new
    return None


# ------------------------------------------------------------------------ corpus
@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One caption line: the image (as written in the file), its caption and the line number."""

    image: str
    caption: str
    line: int


class CaptionCorpus:
    """The captions of an image-caption corpus and the folder its image paths are relative to."""

    def __init__(self, items: Sequence[CaptionedImage], root: PathLike, source: str = "<captions>") -> None:
        self.items = list(items)
        self.root = Path(root)
        self.source = source
        self._first: Dict[str, CaptionedImage] = {}
        for item in self.items:
            self._first.setdefault(item.image, item)

    def __len__(self) -> int:
        return len(self.items)

    def images(self) -> List[str]:
        """Distinct images in order of first appearance (the row order of similarity embeddings)."""
        return list(self._first)

    def first_caption(self, image: str) -> str:
        """The first caption listed for `image`."""
        return self._first[image].caption

    def first_line(self, image: str) -> int:
        """The line of the first caption listed for `image`."""
        return self._first[image].line

    def image_path(self, image: str) -> str:
        """The absolute path of an image of the corpus."""
        return os.path.abspath(Path(image) if Path(image).is_absolute() else self.root / image)


def read_captions(path: PathLike, image_root: Optional[PathLike] = None, check_images: bool = True) -> CaptionCorpus:
    """Read ``captions.jsonl`` (``{"image", "caption"}`` per line); every bad line is reported in one error."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"caption file not found: {path}") from None
    problems: List[str] = []
    items: List[CaptionedImage] = []
    checker = FileChecker()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        at = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{at}: not valid UTF-8 ({err.reason})")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"{at}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{at}: expected a JSON object, got {type(row).__name__}")
            continue
        unknown = sorted(set(row) - {"image", "caption"})
        if unknown:
            problems.append(f"{at}: unknown field(s) {unknown}; allowed fields: ['caption', 'image']")
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image.strip():
            problems.append(f"{at}: field 'image' must be a non-empty string, got {image!r}")
            continue
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f"{at}: field 'caption' must be a non-empty string, got {caption!r}")
            continue
        if check_images:
            file = Path(image) if Path(image).is_absolute() else root / image
            if not checker.exists(file):
                problems.append(f"{at}: image not found: {file}")
        items.append(CaptionedImage(image, caption, lineno))
    if not items and not problems:
        problems.append("no captions found")
    if problems:
        raise TripletFileError(str(path), problems)
    return CaptionCorpus(items, root, str(path))


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
) -> List[Triplet]:
    """Caption-edit triplets: one lexicon word swapped per edit; target_caption is the edited caption."""
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
                out.append(Triplet(
                    reference=corpus.image_path(item.image),
                    modification=fill_word_template(template, match.word, new),
                    target_caption=swap_word(item.caption, match, new),
                    kind=match.cls,
                    line=item.line,
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


def caption_pair_triplets(
    corpus: CaptionCorpus,
    lexicon: Lexicon,
    rng: random.Random,
    pairs_per_image: int = 1,
    describer: Optional[PairDescriber] = None,
    progress: bool = False,
    skipped: Optional[Counter] = None,
) -> List[Triplet]:
    """Image-pair triplets from captions that differ by exactly one lexicon word (index by masked caption)."""
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
        total = sum(sizes)
        for w_pos, word in enumerate(words):
            others = total - sizes[w_pos]
            for i in buckets[word]:
                ref = corpus.items[i]
                partners = set()
                for _ in range(4 * pairs_per_image):  # a few tries: a partner may show the same image
                    if len(partners) >= pairs_per_image:
                        break
                    r = rng.randrange(others)  # uniform over captions with a different word in this slot
                    for v_pos, size in enumerate(sizes):
                        if v_pos == w_pos:
                            continue
                        if r < size:
                            j = buckets[words[v_pos]][r]
                            break
                        r -= size
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
                    out.append(Triplet(
                        reference=corpus.image_path(ref.image),
                        modification=text,
                        target=corpus.image_path(tgt.image),
                        target_caption=tgt.caption,
                        kind=kind,
                        line=ref.line,
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
) -> List[Triplet]:
    """SPN-style image pairs: targets drawn from each image's mid-rank similarity window."""
    images = corpus.images()
    if embeddings.ndim != 2 or embeddings.shape[0] != len(images):
        raise ValueError(
            f"embeddings have shape {tuple(embeddings.shape)} but {corpus.source} lists {len(images)} distinct images; "
            "pass one row per image, in order of first appearance"
        )
    partners = mid_rank_partners(embeddings, *window, progress=progress)
    out: List[Triplet] = []
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
            out.append(Triplet(
                reference=corpus.image_path(image),
                modification=text,
                target=corpus.image_path(images[j]),
                target_caption=tgt_caption,
                kind=kind,
                line=corpus.first_line(image),
            ))
    return out


def editor_triplets(
    corpus: CaptionCorpus,
    editor: TextEditor,
    progress: bool = False,
    skipped: Optional[Counter] = None,
) -> List[Triplet]:
    """Triplets written by a user's :data:`TextEditor` (an LLM): one call per caption."""
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
) -> List[Triplet]:
    """Shapes-world triplets (training phrasing family) rendered into `folder`, as absolute-path triplets."""
    from .shapes import LONG_TAIL_WEIGHTS, ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(seed=seed, image_size=image_size))
    edits = world.make_triplets(n, family="train", kind_weights=LONG_TAIL_WEIGHTS if long_tail else None, progress=progress)
    folder = Path(folder)
    world.export_triplets(edits, folder, progress=progress)
    exported = load_triplets(folder / OUTPUT_NAME)
    return [dataclasses.replace(t, reference=os.path.abspath(exported.image_path(t.reference)),
                                target=os.path.abspath(exported.image_path(t.target)) if t.target else None)
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
                                 ctx.config.edits_per_caption, ctx.progress, skipped)


@GENERATION_MODES.register("caption-pair")
def _mode_caption_pair(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    return caption_pair_triplets(ctx.need_corpus("caption-pair"), ctx.lexicon, ctx.rng("caption-pair"),
                                 ctx.config.pairs_per_image, ctx.pair_describer, ctx.progress, skipped)


@GENERATION_MODES.register("similarity-pair")
def _mode_similarity_pair(ctx: GenContext, skipped: Counter) -> List[Triplet]:
    if ctx.embeddings is None:
        raise ValueError("mode 'similarity-pair' needs image embeddings (--embeddings FILE.safetensors)")
    return similarity_pair_triplets(
        ctx.need_corpus("similarity-pair"), ctx.embeddings, ctx.lexicon, ctx.rng("similarity-pair"),
        (ctx.config.window_lo, ctx.config.window_hi), ctx.config.pairs_per_image, ctx.pair_describer,
        ctx.progress, skipped,
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
                           ctx.config.shapes_image_size, ctx.progress)


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
    """Generated triplets and per-mode counts (kept triplets by kind, skipped inputs by reason)."""

    triplets: TripletSet
    counts: Dict[str, Dict[str, int]]
    skipped: Dict[str, Dict[str, int]]
    duplicates: int
    dropped_by_max: int

    def summary(self) -> str:
        """A small table of counts per mode and kind."""
        lines = [f"{'mode':<16} {'kind':<12} {'triplets':>8}"]
        for mode, kinds in self.counts.items():
            for kind, n in sorted(kinds.items()):
                lines.append(f"{mode:<16} {kind:<12} {n:>8}")
            lines.append(f"{mode:<16} {'(all)':<12} {sum(kinds.values()):>8}")
            for reason, n in sorted(self.skipped.get(mode, {}).items()):
                lines.append(f"{mode:<16} skipped: {reason} ({n})")
        lines.append(f"total {len(self.triplets)} triplets; {self.duplicates} duplicate(s) dropped; "
                     f"{self.dropped_by_max} dropped by --max")
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
    corpus = read_captions(config.captions, config.image_root, config.check_images) if config.captions else None
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
    for g in unique:
        numbers[g.mode] += 1
        rows.append(dataclasses.replace(g.triplet, id=f"{g.mode}-{numbers[g.mode]:06d}"))
        counts[g.mode][g.triplet.kind or "-"] += 1
    triplets = TripletSet(rows, None, source="make-triplets")
    return GenerationResult(
        triplets,
        {m: dict(c) for m, c in counts.items()},
        {m: dict(c) for m, c in skipped.items() if c},
        duplicates,
        dropped,
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
        "total": len(result.triplets),
    })
    return result


# ------------------------------------------------------------------------ CLI
def _import_callable(spec: str, what: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (e.g. ``mypkg.llm:edit``) and check that it is callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be given as module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what}: {spec} is not callable")
    return obj


def _load_embeddings(path: PathLike) -> torch.Tensor:
    """The image embeddings in a safetensors file: its 'embeddings' tensor, or its only tensor."""
    from ..checkpoint import load_tensors

    tensors = load_tensors(path)
    if "embeddings" in tensors:
        return tensors["embeddings"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: expected a tensor named 'embeddings' (found {sorted(tensors)})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zscir make-triplets``."""
    parser.add_argument("--out", required=True, help="output folder (gets triplets.jsonl and make_triplets.json)")
    parser.add_argument("--captions", help='image-caption corpus: JSONL with {"image": path, "caption": text} per line')
    parser.add_argument("--image-root", help="folder the corpus image paths are relative to (default: the captions file's folder)")
    parser.add_argument("--modes", default="", help=f"comma-separated modes out of {GENERATION_MODES.names()} "
                        "(default: every mode whose input is given)")
    parser.add_argument("--lexicon", help="word-class lexicon JSON (default: zscir/assets/lexicon.json)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same output)")
    parser.add_argument("--max", type=int, default=None, dest="max_triplets", help="keep at most N triplets (seeded random subset)")
    parser.add_argument("--edits-per-caption", type=int, default=1, help="caption-edit: edits per caption")
    parser.add_argument("--pairs-per-image", type=int, default=1, help="pair modes: targets per reference (caption-pair: per reference caption and lexicon word in it)")
    parser.add_argument("--window", type=int, nargs=2, default=(5, 50), metavar=("LO", "HI"),
                        help="similarity-pair: similarity ranks [LO, HI) to draw targets from (0 = nearest)")
    parser.add_argument("--embeddings", help="similarity-pair: safetensors file with an 'embeddings' tensor "
                        "[num_images, dim], rows in the order images first appear in --captions")
    parser.add_argument("--text-editor", help="llm-edit: module:function taking a caption, returning (modification, target caption) or None")
    parser.add_argument("--pair-describer", help="pair modes: module:function taking (reference caption, target caption), returning a modification or None")
    parser.add_argument("--shapes", type=int, default=0, metavar="N", help="add N shapes-world triplets (training phrasing)")
    parser.add_argument("--long-tail", action="store_true", help="shapes: draw edit kinds with LONG_TAIL_WEIGHTS")
    parser.add_argument("--shapes-image-size", type=int, default=64, help="shapes: image side in pixels")
    parser.add_argument("--no-check-images", action="store_true", help="do not check that corpus image files exist")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Generate a triplet set from the parsed command-line arguments and print counts."""
    config = TripletGenConfig(
        captions=args.captions,
        image_root=args.image_root,
        lexicon=args.lexicon,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        seed=args.seed,
        max_triplets=args.max_triplets,
        edits_per_caption=args.edits_per_caption,
        pairs_per_image=args.pairs_per_image,
        window_lo=args.window[0],
        window_hi=args.window[1],
        shapes=args.shapes,
        long_tail=args.long_tail,
        shapes_image_size=args.shapes_image_size,
        check_images=not args.no_check_images,
    )
    embeddings = _load_embeddings(args.embeddings) if args.embeddings else None
    editor = _import_callable(args.text_editor, "--text-editor") if args.text_editor else None
    describer = _import_callable(args.pair_describer, "--pair-describer") if args.pair_describer else None
    result = make_triplets(config, args.out, embeddings, editor, describer, progress=not args.no_progress)
    print(result.summary())
    print(f"wrote {Path(args.out) / OUTPUT_NAME}")
    return 0
