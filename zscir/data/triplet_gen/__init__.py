"""Generate synthetic (reference, modification, target) triplets for Stage II (``zscir make-triplets``).

Input is an image-caption corpus: ``captions.jsonl`` with one
``{"image": "relative/path.jpg", "caption": "a red car on a street"}`` per line
(an image may have several captions) plus an image root (default: the file's
folder; :mod:`.corpus`). Modes, registered in :data:`GENERATION_MODES` (:mod:`.modes`):

``caption-edit``
    Swap one attribute word of a caption with another word of the same lexicon
    class (colours, materials, counts, sizes, objects; :class:`Lexicon` in :mod:`.lexicon`, default
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
    The built-in shapes world (:mod:`zscir.shapes`), training phrasing
    family only; images are rendered into the output folder.

Hard negatives (``--negatives K``, default 3; 0 = none) are written as each
row's ``negatives`` list, of the same type as the target: caption-edit gives
the reference caption with other words of the edited class in the edited slot
(captions); caption-pair gives images whose caption has a third word in that
slot; similarity-pair gives images in DQE-CIR's target-relative band
``lo <= s(r, c) - s(r, t) <= hi`` (``--negative-band``, the reference standing
in for the query; never the reference, the target or a near duplicate of it);
shapes gives the reference and K sibling edits; llm-edit gives none. They come
from their own random streams, so the triplets do not depend on K.

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
from .corpus import CaptionCorpus, CaptionedImage, read_captions
from .lexicon import DEFAULT_LEXICON, Lexicon, LexiconError, WordMatch, fill_word_template, one_word_difference, swap_word
from .modes import (
    GENERATION_MODES,
    OUTPUT_NAME,
    REPORT_NAME,
    NEAR_DUPLICATE,
    GenerationResult,
    PairDescriber,
    TextEditor,
    TripletGenConfig,
    caption_edit_triplets,
    caption_pair_triplets,
    editor_triplets,
    generate_triplets,
    make_triplets,
    mid_rank_partners,
    shapes_triplets,
    similarity_pair_triplets,
)

__all__ = [
    "TextEditor",
    "PairDescriber",
    "DEFAULT_LEXICON",
    "OUTPUT_NAME",
    "REPORT_NAME",
    "NEAR_DUPLICATE",
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
]
