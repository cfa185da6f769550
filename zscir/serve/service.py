"""The retrieval service behind ``zscir serve``: one model and one gallery index, loaded once.

:class:`SearchService` checks every input and raises a :class:`ServeError`
carrying the HTTP status and one clear message; it knows nothing about HTTP
frameworks (:mod:`zscir.serve.app` wraps it in FastAPI), so it can be used and
tested on its own. Gallery images are found by id only: a request never names a
file, and an id that is not in the index is unknown.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import mimetypes
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..composer import Composer
from ..data.images import ImageLoadError, load_image
from ..precision import autocast
from ..search import IMAGE_ROOT_FILE, EmbeddingIndex, EmbeddingIndexError
from ..search.store import Id

logger = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]

#: What an image URL may serve: gallery files with these extensions, by content type.
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff",
               ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap",
               ".pbm": "image/x-portable-bitmap"}


class ServeError(Exception):
    """A request the service refuses: an HTTP status and one message naming the field."""

    status = 400

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message, self.field = str(self), field


class InvalidInput(ServeError):
    """A field with a wrong value (empty text, k out of range, an upload that is not an image)."""

    status = 422


class UnknownImage(ServeError):
    """A gallery id that is not in the index (or whose file cannot be read)."""

    status = 404


class TooLarge(ServeError):
    """An upload over the size limit."""

    status = 413


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """Bounds on one request: results, text length, upload size and pixels, gallery page size."""

    max_k: int = 100
    max_text_chars: int = 300
    max_upload_bytes: int = 10 * 1024 * 1024  # the image file itself (base64 in JSON is a third larger)
    max_upload_pixels: int = 40_000_000  # decoded size; larger uploads would cost hundreds of MB
    max_page: int = 200  # gallery items per browse request

    def __post_init__(self) -> None:
        for name in ("max_k", "max_text_chars", "max_upload_bytes", "max_upload_pixels", "max_page"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted: a base64 upload of max_upload_bytes plus room for the other fields."""
        return (self.max_upload_bytes + 2) // 3 * 4 + 64 * 1024


@dataclasses.dataclass(frozen=True)
class Hit:
    """One ranked gallery item."""

    rank: int
    id: Id
    score: float


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The ranked gallery items of one composed query, and what was asked."""

    hits: List[Hit]
    text: str
    k: int
    reference_id: Optional[Id]
    excluded: List[Id]
    took_ms: float  # encoding + search of the batch this query ran in (not the wait before it)
    batch: int = 1  # queries encoded and searched together with this one


@dataclasses.dataclass(frozen=True)
class Example:
    """A ready-made query to try: a gallery reference, a modification text and its known targets."""

    reference_id: Id
    text: str
    targets: Sequence[Id] = ()


def load_examples(folder: PathLike) -> List[Example]:
    """Example queries from a generic CIR folder's ``queries.jsonl`` (none when it has no such file or it is unreadable)."""
    from ..data.benchmarks.generic import load_generic
    from ..data.schema import AnnotationError

    if not (Path(folder) / "queries.jsonl").is_file():
        return []
    try:
        split = load_generic(folder)
    except AnnotationError as err:
        logger.warning("no example queries: %s", err)
        return []
    return [Example(q.reference, q.texts[0], tuple(q.targets)) for q in split.queries]


def decode_base64_image(value: str, max_bytes: int, field: str = "reference_image") -> bytes:
    """Bytes of a base64 image (plain or a ``data:`` URL); InvalidInput or TooLarge naming `field` otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("empty upload: give the image file's bytes in base64 (or a data: URL)", field)
    body = value.strip()
    if body.startswith("data:"):
        head, sep, body = body.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidInput("a data: URL must be base64-encoded (data:image/png;base64,...)", field)
    if len(body) > (max_bytes + 2) // 3 * 4 + 4:
        raise TooLarge(f"the upload is over the limit of {max_bytes} bytes", field)
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("not valid base64", field) from None
    if not data:
        raise InvalidInput("the uploaded file is empty", field)
    if len(data) > max_bytes:
        raise TooLarge(f"the upload is {len(data)} bytes, over the limit of {max_bytes}", field)
    return data


class _Query(NamedTuple):
    image: Any
    text: str
    k: int
    excluded: List[Id]


class _Slot:
    def __init__(self, item: Any) -> None:
        self.item, self.result, self.error, self.done = item, None, None, False


class _Batcher:
    """Runs submitted items in batches: the first caller while idle runs a batch of everything waiting (itself
    included); callers arriving meanwhile wait, and one of them runs the next batch. No timer: an idle service
    adds no delay. A failing batch of several items is retried one by one, so one bad item fails alone."""

    def __init__(self, run: Callable[[Sequence[Any]], List[Any]], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.max_batch = run, max_batch
        self.cond = threading.Condition()
        self.pending: List[_Slot] = []
        self.busy = False

    def submit(self, item: Any) -> Any:
        """Run `item` (in some batch) and return its result, or raise its error."""
        slot = _Slot(item)
        with self.cond:
            self.pending.append(slot)
            while not slot.done:
                if self.busy:
                    self.cond.wait()
                    continue
                self.busy = True
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                self.cond.release()
                try:
                    self._run(batch)
                finally:
                    for other in batch:  # never leave a waiter without an answer
                        if not other.done:
                            other.error, other.done = RuntimeError("the query's batch was interrupted"), True
                    self.cond.acquire()
                    self.busy = False
                    self.cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _run(self, batch: List[_Slot]) -> None:
        try:
            for slot, result in zip(batch, self.run([s.item for s in batch])):
                slot.result = result
        except Exception as err:  # noqa: BLE001 - handed to the caller(s)
            if len(batch) > 1:
                for slot in batch:
                    self._run([slot])
                return
            batch[0].error = err
        for slot in batch:
            slot.done = True


class SearchService:
    """Composed queries (a gallery id or an uploaded image, plus text) against one gallery index, with checked inputs.

    Queries that arrive while the model is busy wait and are then encoded and searched together, up to
    `max_batch` at a time (one pass over the index serves them all); an idle service answers each query at once.
    `image_root` is the folder the index ids are relative to (default: the index's ``image_root.txt``);
    without one, searching works and images are not served. `examples` default to the queries of a generic CIR
    ``queries.jsonl`` in the image folder, if there is one.
    """

    def __init__(self, composer: Composer, index: EmbeddingIndex, image_root: Optional[Union[str, os.PathLike]] = None,
                 limits: Optional[ServeLimits] = None, examples: Optional[Sequence[Example]] = None, precision: str = "no",
                 backend: str = "exact", search_params: Optional[Dict[str, Any]] = None,
                 model_name: Optional[str] = None, max_batch: int = 32) -> None:
        key = getattr(composer, "cache_key", None)
        if key and not index.model_key.startswith("dir:") and index.model_key != key:
            raise EmbeddingIndexError(f"{index.folder} was built with model {index.model_key!r}, but the model is "
                                      f"{key!r}; embeddings of different models are not comparable: rebuild the index")
        if len(index) == 0:
            raise EmbeddingIndexError(f"the index {index.folder} is empty")
        self.composer, self.index = composer, index
        self.limits = limits or ServeLimits()
        self.precision, self.backend, self.search_params = precision, backend, dict(search_params or {})
        self.model_name = model_name
        if image_root is None and (index.folder / IMAGE_ROOT_FILE).is_file():
            image_root = (index.folder / IMAGE_ROOT_FILE).read_text(encoding="utf-8").strip()
        self.image_root = Path(image_root).resolve() if image_root else None
        self.ids: List[Id] = index.ids
        self._names: Optional[List[str]] = None  # lower-case ids for the file-name filter, made on first use
        self._str_ids = {str(i): i for i in self.ids}  # URLs carry ids as text
        if examples is None:
            examples = load_examples(self.image_root) if self.image_root is not None else []
        self.examples = [e for e in examples if e.reference_id in index]
        self._model_lock = threading.Lock()  # one encoding at a time: frozen-text and adapted calls toggle adapters
        self._batcher = _Batcher(self._run_batch, max_batch)
        self.started = time.time()
        self._pseudo_tokens = composer.phi.config.total_tokens

    # ------------------------------------------------------------------ checks
    def lookup(self, image_id: Any, field: str = "id") -> Id:
        """The index id for `image_id` (ids arrive as text); UnknownImage if the gallery has no such item."""
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
            raise InvalidInput(f"expected a gallery id (a string), got {type(image_id).__name__}", field)
        found = self._str_ids.get(str(image_id))
        if found is None:
            shown = str(image_id) if len(str(image_id)) <= 200 else str(image_id)[:200] + "..."
            raise UnknownImage(f"{shown!r} is not in the gallery", field)
        return found

    def check_text(self, text: Any, field: str = "text") -> str:
        """The modification text, stripped; InvalidInput if empty, over-long or too long for the model's context."""
        if not isinstance(text, str):
            raise InvalidInput(f"expected a string, got {type(text).__name__}", field)
        text = text.strip()
        if not text:
            raise InvalidInput("the modification text is empty", field)
        if len(text) > self.limits.max_text_chars:
            raise InvalidInput(f"the modification text is {len(text)} characters long, over the limit of "
                               f"{self.limits.max_text_chars}", field)
        c = self.composer
        ph = c.config.placeholder
        prompt = c.query_prompts([text])[0].replace(ph, " " + " ".join([ph] * self._pseudo_tokens) + " ")
        ids = c.backbone.tokenize([prompt])
        if int(ids[0, -1]) != 0:  # the tokenizer truncated (or exactly filled) the context
            raise InvalidInput(f"the modification text is too long for the model: with the query prompt it takes "
                               f"more than the model's {ids.shape[1]} tokens", field)
        return text

    def check_k(self, k: Any, field: str = "k") -> int:
        """`k` as an int in 1..max_k; InvalidInput otherwise."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidInput(f"expected an integer, got {k!r}", field)
        if not 1 <= k <= self.limits.max_k:
            raise InvalidInput(f"must be between 1 and {self.limits.max_k}, got {k}", field)
        return k

    def decode_upload(self, data: bytes, field: str = "reference_image") -> Any:
        """An uploaded image file's bytes as an RGB image; InvalidInput / TooLarge naming `field` otherwise."""
        if len(data) > self.limits.max_upload_bytes:
            raise TooLarge(f"the upload is {len(data)} bytes, over the limit of {self.limits.max_upload_bytes}", field)
        try:
            return load_image(bytes(data), name=field, max_pixels=4_000_000,
                              max_decode_pixels=self.limits.max_upload_pixels,
                              min_side=int(self.composer.backbone.image_size))
        except ImageLoadError as err:
            raise InvalidInput(f"cannot use the upload as an image: {err.reason}", field) from None

    # ------------------------------------------------------------------ gallery
    def image_path(self, image_id: Any) -> Path:
        """The file of a gallery item (UnknownImage if the id is not in the index or no image folder is known)."""
        item = self.lookup(image_id)
        if self.image_root is None:
            raise UnknownImage("this service has no image folder for its index (give image_root)", "id")
        name = str(item)
        if os.path.isabs(name):  # a file-list index may record absolute paths: served as indexed, nothing else
            path = Path(os.path.normpath(name))
        else:
            path = Path(os.path.normpath(self.image_root / name))
            if os.path.commonpath([str(path), str(self.image_root)]) != str(self.image_root):
                raise UnknownImage(f"{name!r} points outside the gallery folder", "id")
        if path.suffix.lower() not in IMAGE_TYPES:
            raise UnknownImage(f"{name!r} is not an image file", "id")
        if not path.is_file():
            raise UnknownImage(f"the file of gallery item {name!r} is missing", "id")
        return path

    def image_type(self, path: Path) -> str:
        """Content type of a gallery file, by extension."""
        return IMAGE_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def browse(self, offset: int = 0, limit: int = 60, name: str = "") -> Dict[str, Any]:
        """One page of gallery ids in index order, optionally those whose id contains `name` (case-insensitive)."""
        if offset < 0:
            raise InvalidInput(f"must be >= 0, got {offset}", "offset")
        if not 1 <= limit <= self.limits.max_page:
            raise InvalidInput(f"must be between 1 and {self.limits.max_page}, got {limit}", "limit")
        needle = name.strip().lower()
        if needle:
            if self._names is None:
                self._names = [str(i).lower() for i in self.ids]
            rows = [r for r, n in enumerate(self._names) if needle in n]
            return {"total": len(rows), "offset": offset, "ids": [self.ids[r] for r in rows[offset:offset + limit]]}
        return {"total": len(self.ids), "offset": offset, "ids": self.ids[offset:offset + limit]}

    def describe(self, text: Any, k: int = 60) -> List[Hit]:
        """Gallery items ranked by a plain description (frozen CLIP text against the image embeddings)."""
        text = self.check_text(text, "description")
        if not 1 <= k <= self.limits.max_page:
            raise InvalidInput(f"must be between 1 and {self.limits.max_page}, got {k}", "limit")
        with self._model_lock, torch.no_grad(), autocast(self.precision, self.composer.device):
            q = self.composer.encode_texts([text])
        return self._ranked(q, k, None)

    # ------------------------------------------------------------------ search
    def search(self, text: Any, k: Any = 10, reference_id: Any = None, reference_image: Optional[bytes] = None,
               exclude_reference: bool = True) -> SearchResult:
        """Top-k gallery items for a reference (a gallery id, or an uploaded image file's bytes) and a modification."""
        if (reference_id is None) == (reference_image is None):
            raise InvalidInput("give exactly one of reference_id (a gallery id) and reference_image (an uploaded image)",
                               "reference")
        text, k = self.check_text(text), self.check_k(k)
        ref: Optional[Id] = None
        if reference_id is not None:
            ref = self.lookup(reference_id, "reference_id")
            try:
                image = load_image(self.image_path(ref))
            except (UnknownImage, ImageLoadError) as err:
                raise UnknownImage(f"the gallery image {str(ref)!r} cannot be read: {err}", "reference_id") from None
        else:
            image = self.decode_upload(reference_image)  # type: ignore[arg-type]
        excluded = [ref] if ref is not None and exclude_reference else []
        hits, took_ms, batch = self._batcher.submit(_Query(image, text, k, excluded))
        return SearchResult(hits, text, k, ref, excluded, took_ms, batch)

    def _run_batch(self, queries: Sequence["_Query"]) -> List[Tuple[List[Hit], float, int]]:
        """Encode queries together and rank them in one pass over the index (each cut to its own k)."""
        start = time.perf_counter()
        with self._model_lock, torch.no_grad(), autocast(self.precision, self.composer.device):
            emb = self.composer.encode_query([q.image for q in queries], [q.text for q in queries])
        emb = torch.as_tensor(emb).detach().float().cpu()
        exclude = [q.excluded for q in queries] if any(q.excluded for q in queries) else None
        found = self.index.search(emb, max(q.k for q in queries), exclude_ids=exclude, backend=self.backend,
                                  **self.search_params)
        took = (time.perf_counter() - start) * 1000.0
        return [([Hit(rank, item, float(score)) for rank, (item, score) in enumerate(hits[:q.k], start=1)], took,
                 len(queries)) for q, hits in zip(queries, found)]

    def _ranked(self, query: torch.Tensor, k: int, excluded: Optional[List[Id]]) -> List[Hit]:
        query = torch.as_tensor(query).detach().float().cpu()
        found = self.index.search(query, k, exclude_ids=[excluded] if excluded else None, backend=self.backend,
                                  **self.search_params)[0]
        return [Hit(rank, item, float(score)) for rank, (item, score) in enumerate(found, start=1)]

    # ------------------------------------------------------------------ facts
    def health(self) -> Dict[str, Any]:
        """What is served: the model, the index, the limits."""
        c = self.composer
        a = c.config.adapters
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self.started, 1),
            "model": {
                "name": self.model_name, "stage": c.config.stage, "backbone": c.config.backbone.model_name,
                "embed_dim": int(c.backbone.embed_dim), "image_size": int(c.backbone.image_size),
                "pseudo_tokens": self._pseudo_tokens, "adapters": None if a is None else f"{a.kind} x{a.num_layers}",
                "device": str(c.device), "precision": self.precision, "cache_key": c.cache_key,
            },
            "index": {"name": self.index.folder.name, "count": len(self.index), "dim": self.index.dim,
                      "metric": self.index.metric, "backend": self.backend, "images_served": self.image_root is not None},
            "examples": len(self.examples),
            "limits": dataclasses.asdict(self.limits),
        }


__all__ = ["Example", "Hit", "IMAGE_TYPES", "InvalidInput", "SearchResult", "SearchService", "ServeError", "ServeLimits",
           "TooLarge", "UnknownImage", "decode_base64_image", "load_examples"]
