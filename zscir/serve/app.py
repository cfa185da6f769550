"""The HTTP face of :class:`~zscir.serve.service.SearchService`: a FastAPI app with a JSON API and the search page.

Routes (schemas at ``/openapi.json``; ``/docs`` renders them when a browser can reach Swagger UI's CDN):

* ``GET /`` the page (its script and style are package data under ``zscir/serve/static``: no CDN, no web fonts);
* ``POST /api/search`` a composed query (a gallery id or an uploaded image in base64, a text, k, exclude flag);
* ``GET /api/images/{id}`` a gallery image by id (``?size=N`` for a thumbnail), never by path;
* ``GET /api/gallery`` pages of gallery ids, filtered by file name or ranked by a description;
* ``GET /api/examples`` ready-made queries (from a generic CIR ``queries.jsonl``), ``GET /api/health`` facts.

Every refused request gets a 4xx JSON body ``{"error": "<field>: <what is wrong>", "field": ...}``.
"""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..composer import Composer
from ..data.images import ImageLoadError, load_image
from ..search import EmbeddingIndex
from .service import (Example, Hit, SearchService, ServeError, ServeLimits, TooLarge, UnknownImage,
                      decode_base64_image)

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The page may load only what this server sends: a missing asset shows up as an error, never as a CDN fetch.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
GalleryId = Union[StrictStr, StrictInt]


# ------------------------------------------------------------------ schemas
class SearchRequest(BaseModel):
    """A composed query: exactly one reference (gallery id or uploaded image) and a modification text."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"reference_id": "images/0001.png", "text": "make the circle red", "k": 10, "exclude_reference": True}]})

    reference_id: Optional[GalleryId] = Field(None, description="a gallery id (as listed by /api/gallery)")
    reference_image: Optional[StrictStr] = Field(
        None, description="an uploaded reference instead: the image file in base64, or a data: URL "
                          "(size limit: limits.max_upload_bytes of /api/health)")
    text: StrictStr = Field(..., description="the modification text (not empty; limits.max_text_chars)")
    k: StrictInt = Field(10, description="number of results, 1..limits.max_k")
    exclude_reference: StrictBool = Field(True, description="leave the reference itself out of the results")


class ResultItem(BaseModel):
    """One ranked gallery image."""

    rank: int
    id: GalleryId
    name: str = Field(..., description="the image's file name")
    score: float = Field(..., description="similarity to the query (cosine for a cosine index)")
    url: str = Field(..., description="GET it for the image; add ?size=N for a thumbnail")


class ReferenceInfo(BaseModel):
    """The query's reference: a gallery item, or an upload (id and url null)."""

    id: Optional[GalleryId] = None
    url: Optional[str] = None
    uploaded: bool = False


class SearchResponse(BaseModel):
    """The top-k gallery images of a query, best first."""

    results: List[ResultItem]
    k: int
    text: str = Field(..., description="the modification text as used (stripped)")
    reference: ReferenceInfo
    excluded: List[GalleryId] = Field(..., description="gallery ids left out of the ranking")
    took_ms: float = Field(..., description="encoding + search time on the server, in milliseconds (of the batch "
                                            "this query ran in; waiting for earlier queries not counted)")
    batch: int = Field(1, description="queries encoded and searched together with this one (1 on an idle server)")
    gallery_size: int
    link: Optional[str] = Field(None, description="page URL that runs this query again (gallery references only)")


class GalleryItem(BaseModel):
    """A gallery image (with its score when ranked by a description)."""

    id: GalleryId
    name: str
    url: str
    score: Optional[float] = None


class GalleryPage(BaseModel):
    """One page of the gallery."""

    total: int = Field(..., description="items matching (all items when browsing without a filter)")
    offset: int
    items: List[GalleryItem]


class ExampleItem(BaseModel):
    """A ready-made query with its known targets."""

    reference: GalleryItem
    text: str
    targets: List[GalleryId]


class Health(BaseModel):
    """What the service runs: model, index, limits."""

    status: str
    version: str
    uptime_s: float
    model: Dict[str, Any]
    index: Dict[str, Any]
    examples: int
    limits: Dict[str, int]


class ErrorBody(BaseModel):
    """Why a request was refused."""

    error: str
    field: Optional[str] = None


ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 413, 422)}


# ------------------------------------------------------------------ middleware
class _BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 before they are read whole (Content-Length or streamed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"body: the request is over the limit of {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, {"error": message, "field": "body"})
            return
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> Dict[str, Any]:
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    raise TooLarge(message)
            return msg

        async def guarded_send(msg: Dict[str, Any]) -> None:
            if state["over"]:
                return  # whatever the app answered to the cut-off body is replaced by the 413 below
            state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except TooLarge:
            pass
        if state["over"] and not state["started"]:
            await _send_json(send, 413, {"error": message, "field": "body"})


async def _send_json(send: Any, status: int, body: Dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


# ------------------------------------------------------------------ the app
def _validation_error(err: RequestValidationError) -> JSONResponse:
    """One clear message for FastAPI's validation errors (400 for unreadable JSON, 422 otherwise)."""
    errors = err.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error") or e.get("msg")
            return JSONResponse({"error": f"body: malformed JSON ({detail})", "field": "body"}, status_code=400)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or "body"
    msg = str(first.get("msg", "invalid"))
    if field == "body" and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        msg = "expected a JSON object like {\"reference_id\": ..., \"text\": ..., \"k\": 10}"
    elif first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return JSONResponse({"error": f"{field}: {msg}", "field": field,
                         "details": [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg"))} for e in errors[:10]]},
                        status_code=422)


def _file_name(item: Any) -> str:
    return str(item).rsplit("/", 1)[-1]


def build_app(service: SearchService, title: str = "zscir: composed image retrieval") -> FastAPI:
    """The FastAPI app over a ready :class:`SearchService` (routes in the module docstring)."""
    app = FastAPI(title=title, version=__version__,
                  description="Zero-shot composed image retrieval: a reference image plus a modification text "
                              "ranks the gallery. Every refused request gets a 4xx with `{\"error\": ...}`.")
    app.state.service = service

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def image_url(request: Request, item: Any) -> str:
        return f"{base(request)}/api/images/{quote(str(item), safe='/')}"

    def gallery_item(request: Request, item: Any, score: Optional[float] = None) -> GalleryItem:
        return GalleryItem(id=item, name=_file_name(item), url=image_url(request, item), score=score)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse({"error": err.message, "field": err.field}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail), "field": None}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health", response_model=Health, summary="model and index facts")
    def health() -> Dict[str, Any]:
        return {**service.health(), "version": __version__}

    @app.post("/api/search", response_model=SearchResponse, responses=ERRORS, summary="a composed query")
    def search(body: SearchRequest, request: Request) -> SearchResponse:
        image = None
        if body.reference_image is not None:
            image = decode_base64_image(body.reference_image, service.limits.max_upload_bytes)
        result = service.search(body.text, body.k, reference_id=body.reference_id, reference_image=image,
                                exclude_reference=body.exclude_reference)
        ref = result.reference_id
        link = None
        if ref is not None:
            params = {"ref": str(ref), "text": result.text, "k": result.k, "exclude": int(body.exclude_reference)}
            link = f"{base(request)}/?{urlencode(params, quote_via=quote)}"
        return SearchResponse(
            results=[ResultItem(rank=h.rank, id=h.id, name=_file_name(h.id), score=h.score,
                                url=image_url(request, h.id)) for h in result.hits],
            k=result.k, text=result.text, excluded=result.excluded, took_ms=round(result.took_ms, 3), batch=result.batch,
            reference=ReferenceInfo(id=ref, url=image_url(request, ref) if ref is not None else None,
                                    uploaded=ref is None),
            gallery_size=len(service.index), link=link)

    @app.get("/api/images/{image_id:path}", responses={404: {"model": ErrorBody}, 200: {"content": {"image/*": {}}}},
             summary="a gallery image by id")
    def image(image_id: str, size: Optional[int] = Query(None, ge=16, le=1024,
                                                         description="longest side of a thumbnail")) -> Response:
        path = service.image_path(image_id)
        headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if size is not None:
            try:
                im = load_image(path, max_pixels=16_000_000)
            except ImageLoadError as err:
                raise UnknownImage(f"the gallery image {image_id!r} cannot be read: {err.reason}", "id") from None
            if max(im.size) > size:
                im.thumbnail((size, size))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                return Response(buf.getvalue(), media_type="image/jpeg", headers=headers)
        return FileResponse(path, media_type=service.image_type(path), headers=headers)

    @app.get("/api/gallery", response_model=GalleryPage, responses=ERRORS, summary="browse or search the gallery")
    def gallery(request: Request,
                offset: int = Query(0, ge=0, description="first item (browsing and name filter)"),
                limit: int = Query(60, ge=1, description="items per page (at most limits.max_page)"),
                name: str = Query("", max_length=300, description="keep ids containing this (case-insensitive)"),
                text: str = Query("", max_length=2000,
                                  description="rank the gallery by this description instead (frozen CLIP text)"),
                ) -> GalleryPage:
        if text.strip():
            if name.strip() or offset:
                raise ServeError("give either text (a description) or name/offset (browsing), not both", "text")
            hits: List[Hit] = service.describe(text, limit)
            return GalleryPage(total=len(hits), offset=0, items=[gallery_item(request, h.id, h.score) for h in hits])
        page_ = service.browse(offset, limit, name)
        return GalleryPage(total=page_["total"], offset=offset, items=[gallery_item(request, i) for i in page_["ids"]])

    @app.get("/api/examples", response_model=List[ExampleItem], summary="ready-made queries with known targets")
    def examples(request: Request, limit: int = Query(50, ge=1, le=1000)) -> List[ExampleItem]:
        return [ExampleItem(reference=gallery_item(request, e.reference_id), text=e.text, targets=list(e.targets))
                for e in service.examples[:limit]]

    app.add_middleware(_BodyLimit, max_bytes=service.limits.max_body_bytes)
    return app


def create_app(composer: Composer, index: EmbeddingIndex, image_root: Optional[Any] = None,
               limits: Optional[ServeLimits] = None, examples: Optional[Sequence[Example]] = None, **service_kwargs: Any) -> FastAPI:
    """The FastAPI app of ``zscir serve`` for a loaded model and gallery index (keyword arguments: SearchService's)."""
    service = SearchService(composer, index, image_root=image_root, limits=limits, examples=examples, **service_kwargs)
    return build_app(service)


class BackgroundServer:
    """An ASGI app served by uvicorn on a local port in a daemon thread (tests, benchmarks, notebooks).

    ``with BackgroundServer(app) as server: urlopen(server.url + "/api/health")``; port 0 picks a free one.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # bound here, so the port is known and cannot be taken meanwhile
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                    lifespan="off", timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"zscir-serve-{self.port}")

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:53211``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        """Start serving; return once the server accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["BackgroundServer", "PAGE_POLICY", "STATIC_DIR", "SearchRequest", "SearchResponse", "build_app", "create_app"]
