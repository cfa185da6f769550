"""The word-class lexicon behind caption-edit and caption-pair triplets, and the word-level edits it allows."""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from ..schema import PathLike

DEFAULT_LEXICON = Path(__file__).resolve().parents[2] / "assets" / "lexicon.json"
#: placeholders a word template may use ({a_new} = "an apple", "a dog")
WORD_PLACEHOLDERS = frozenset({"old", "new", "a_old", "a_new"})
CAPTION_PLACEHOLDERS = frozenset({"reference", "target"})

__all__ = [
    "DEFAULT_LEXICON",
    "LexiconError",
    "Lexicon",
    "WordMatch",
    "swap_word",
    "fill_word_template",
    "one_word_difference",
]


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
