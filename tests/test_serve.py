"""`zscir serve`: the JSON API in-process (FastAPI TestClient) on a random tiny model and a small shapes gallery.

Searches are checked against the model and index used directly; every kind of bad input gets a 4xx with a
clear message and the server keeps answering; nothing outside the index can be read through /api/images.
"""
import base64
import configparser
import http.client
import io
import json
import re
import socket
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="zscir[serve] (FastAPI) is not installed")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from zscir import Composer  # noqa: E402
from zscir.data.images import load_image  # noqa: E402
from zscir.models.phi import PhiConfig  # noqa: E402
from zscir.search import EmbeddingIndex  # noqa: E402
from zscir.serve import (BackgroundServer, SearchService, ServeLimits, create_app, index_folder,  # noqa: E402
                         load_examples, shapes_gallery)
from zscir.serve.app import PAGE_POLICY, STATIC_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the same scene but the circle is red"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, composer, index, gallery folder) for a random tiny composer over a 6-query shapes gallery."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("serve")
    composer = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=2, vsi_layers=1))
    gallery = shapes_gallery(6, folder=tmp / "shapes", progress=False)
    index = index_folder(composer, gallery, index_dir=tmp / "index", cache_dir=tmp / "cache", progress=False)
    client = TestClient(create_app(composer, index, limits=ServeLimits(max_k=40, max_text_chars=200)))
    return client, composer, index, gallery


def _direct(composer, index, gallery, image, text, k, exclude=None):
    """The ranking computed without the service."""
    q = composer.encode_query([image], [text])
    return index.search(q, k, exclude_ids=[exclude] if exclude else None)[0]


def _search(client, **body):
    return client.post("/api/search", json=body)


def test_health_reports_model_and_index(served):
    client, composer, index, _ = served
    body = client.get("/api/health").json()
    assert body["status"] == "ok"
    assert body["index"]["count"] == len(index) and body["index"]["dim"] == index.dim == body["model"]["embed_dim"]
    assert body["model"]["cache_key"] == composer.cache_key and body["model"]["backbone"] == "zscir-tiny"
    assert body["limits"]["max_k"] == 40 and body["examples"] == 6


def test_search_by_id_matches_the_model_and_excludes_the_reference(served):
    client, composer, index, gallery = served
    ref = index.ids[3]
    resp = _search(client, reference_id=ref, text=TEXT, k=7)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = _direct(composer, index, gallery, load_image(gallery / ref), TEXT, 7, exclude=[ref])
    assert [r["id"] for r in body["results"]] == [i for i, _ in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert [r["rank"] for r in body["results"]] == list(range(1, 8))
    assert ref not in [r["id"] for r in body["results"]] and body["excluded"] == [ref]
    assert body["reference"] == {"id": ref, "url": f"/api/images/{ref}", "uploaded": False}
    assert body["took_ms"] > 0 and body["gallery_size"] == len(index)
    assert body["link"] == f"/?ref={ref.replace('/', '%2F')}&text={TEXT.replace(' ', '%20')}&k=7&exclude=1"

    kept = _search(client, reference_id=ref, text=TEXT, k=len(index), exclude_reference=False).json()
    assert kept["excluded"] == [] and ref in [r["id"] for r in kept["results"]]
    assert len(kept["results"]) == len(index)


def test_result_urls_serve_the_gallery_files(served):
    client, _, index, gallery = served
    body = _search(client, reference_id=index.ids[0], text=TEXT, k=3).json()
    for item in body["results"]:
        resp = client.get(item["url"])
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert resp.content == (gallery / item["id"]).read_bytes()
        assert item["name"] == Path(item["id"]).name
    thumb = client.get(body["results"][0]["url"] + "?size=32")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    assert client.get(body["results"][0]["url"] + "?size=99999").status_code == 422


def test_upload_gives_the_same_ranking_as_the_gallery_image(served):
    client, composer, index, gallery = served
    ref = index.ids[5]
    raw = (gallery / ref).read_bytes()
    by_id = _search(client, reference_id=ref, text=TEXT, k=5, exclude_reference=False).json()
    for encoded in (base64.b64encode(raw).decode(), "data:image/png;base64," + base64.b64encode(raw).decode()):
        up = _search(client, reference_image=encoded, text=TEXT, k=5)
        assert up.status_code == 200, up.text
        body = up.json()
        assert [r["id"] for r in body["results"]] == [r["id"] for r in by_id["results"]]
        assert body["reference"] == {"id": None, "url": None, "uploaded": True}
        assert body["link"] is None and body["excluded"] == []
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert("RGB").resize((640, 480)).save(jpeg, format="JPEG")
    assert _search(client, reference_image=base64.b64encode(jpeg.getvalue()).decode(), text=TEXT, k=2).status_code == 200


def _bad_cases(ref):
    """(request body or raw text, expected status, a fragment of the error) for every kind of bad search input."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    strip = io.BytesIO()
    Image.new("RGB", (1000, 2)).save(strip, format="PNG")
    return [
        ({"reference_id": "images/nope.png", "text": TEXT}, 404, "reference_id: 'images/nope.png' is not in the gallery"),
        ({"reference_id": "../../../etc/passwd", "text": TEXT}, 404, "not in the gallery"),
        ({"reference_id": 7, "text": TEXT}, 404, "reference_id: '7' is not in the gallery"),
        ({"text": TEXT}, 422, "give exactly one of reference_id"),
        ({"reference_id": ref, "reference_image": base64.b64encode(png.getvalue()).decode(), "text": TEXT}, 422,
         "exactly one"),
        ({"reference_image": base64.b64encode(b"%PDF-1.4 not an image").decode(), "text": TEXT}, 422,
         "reference_image: cannot use the upload as an image"),
        ({"reference_image": base64.b64encode(strip.getvalue()).decode(), "text": TEXT}, 422, "aspect ratio"),
        ({"reference_image": "@@not base64@@", "text": TEXT}, 422, "reference_image: not valid base64"),
        ({"reference_image": "", "text": TEXT}, 422, "reference_image: empty upload"),
        ({"reference_image": "data:image/png,abc", "text": TEXT}, 422, "must be base64"),
        ({"reference_id": ref, "text": "   "}, 422, "text: the modification text is empty"),
        ({"reference_id": ref, "text": "x" * 201}, 422, "text: the modification text is 201 characters long, over the limit of 200"),
        ({"reference_id": ref, "text": "a " * 95}, 422, "too long for the model"),
        ({"reference_id": ref}, 422, "text: Field required"),
        ({"reference_id": ref, "text": 5}, 422, "text: Input should be a valid string"),
        ({"reference_id": ref, "text": TEXT, "k": 0}, 422, "k: must be between 1 and 40, got 0"),
        ({"reference_id": ref, "text": TEXT, "k": 41}, 422, "k: must be between 1 and 40, got 41"),
        ({"reference_id": ref, "text": TEXT, "k": -3}, 422, "k: must be between 1 and 40"),
        ({"reference_id": ref, "text": TEXT, "k": "5"}, 422, "k: Input should be a valid integer"),
        ({"reference_id": ref, "text": TEXT, "k": 2.5}, 422, "k: Input should be a valid integer"),
        ({"reference_id": ref, "text": TEXT, "exclude_reference": "no"}, 422, "exclude_reference: Input should be a valid boolean"),
        ({"reference_id": ref, "text": TEXT, "refrence": 1}, 422, "refrence: unknown field"),
        ('{"reference_id": "x", "text": ', 400, "body: malformed JSON"),
        ("not json at all", 400, "body: malformed JSON"),
        ("[1, 2]", 422, "body: expected a JSON object"),
        ("", 422, "body: expected a JSON object"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases("r"))))
def test_bad_search_input_is_a_clear_4xx_and_the_server_keeps_serving(served, case):
    client, _, index, _ = served
    body, status, fragment = _bad_cases(index.ids[0])[case]
    if isinstance(body, str):
        resp = client.post("/api/search", content=body, headers={"content-type": "application/json"})
    else:
        resp = _search(client, **body)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]
    assert client.get("/api/health").status_code == 200
    assert _search(client, reference_id=index.ids[0], text=TEXT, k=2).status_code == 200


def test_form_posts_and_other_methods_are_refused(served):
    client, _, index, _ = served
    form = client.post("/api/search", data={"reference_id": index.ids[0], "text": TEXT})
    assert form.status_code == 422 and "expected a JSON object" in form.json()["error"]
    assert client.get("/api/search").status_code == 405
    assert client.get("/api/nothing").json()["error"] == "Not Found"


def test_huge_uploads_are_refused_with_413(served, tmp_path):
    _, composer, index, gallery = served
    small = TestClient(create_app(composer, index, limits=ServeLimits(max_upload_bytes=1000)))
    big = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(big, format="PNG")
    assert len(big.getvalue()) > 1000
    resp = _search(small, reference_image=base64.b64encode(big.getvalue()).decode(), text=TEXT)
    assert resp.status_code == 413 and "reference_image: the upload is" in resp.json()["error"]
    # a body over the limit is refused from its Content-Length, or while it streams in without one
    huge = json.dumps({"reference_image": "A" * 200_000, "text": TEXT})
    resp = small.post("/api/search", content=huge, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "body: the request is over the limit" in resp.json()["error"]

    def chunks():
        for start in range(0, len(huge), 8192):
            yield huge[start:start + 8192].encode()

    resp = small.post("/api/search", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "over the limit" in resp.json()["error"]
    assert _search(small, reference_id=index.ids[0], text=TEXT, k=1).status_code == 200
    # a small file that decodes to a huge image (a decompression bomb) is refused before decoding
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")
    tight = TestClient(create_app(composer, index, limits=ServeLimits(max_upload_pixels=10_000_000)))
    resp = _search(tight, reference_image=base64.b64encode(bomb.getvalue()).decode(), text=TEXT)
    assert resp.status_code == 422 and "max_decode_pixels" in resp.json()["error"]


TRAVERSALS = [
    "/api/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/api/images/..%2f..%2f..%2fetc%2fpasswd",
    "/api/images/%2Fetc%2Fpasswd",
    "/api/images//etc/passwd",
    "/api/images/images/..%2f..%2f..%2fetc/passwd",
    "/api/images/images/%2e%2e/queries.jsonl",
    "/api/images/queries.jsonl",
    "/api/images/gallery.txt",
    "/api/images/shapes_world.json",
    "/api/images/images",
    "/api/images/%00",
    "/api/images/",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_images_are_served_by_id_only(served, path):
    client, _, _, gallery = served
    resp = client.get(path)
    assert resp.status_code == 404, resp.text
    assert "root:" not in resp.text and resp.headers["content-type"] == "application/json"


def test_files_next_to_the_gallery_are_not_served(served):
    client, _, index, gallery = served
    extra = gallery / "images" / "added-later.png"
    Image.new("RGB", (8, 8), "red").save(extra)
    try:
        resp = client.get("/api/images/images/added-later.png")
        assert resp.status_code == 404 and "is not in the gallery" in resp.json()["error"]
        assert client.get(f"/api/images/{index.ids[0]}").status_code == 200
    finally:
        extra.unlink()


def test_an_id_pointing_outside_the_folder_is_refused(tmp_path):
    """An index whose ids climb out of its image folder (a hand-made index) still serves nothing outside it."""
    composer = Composer.from_clip("zscir-tiny", phi=PhiConfig(num_tokens=1, use_vsi=False))
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (tmp_path / "gallery").mkdir()
    index = EmbeddingIndex.create(tmp_path / "index", composer.backbone.embed_dim, composer.cache_key)
    index.add(["../secret.png"], torch.randn(1, composer.backbone.embed_dim))
    client = TestClient(create_app(composer, index, image_root=tmp_path / "gallery"))
    resp = client.get("/api/images/../secret.png".replace("..", "%2e%2e"))
    assert resp.status_code == 404 and "outside the gallery folder" in resp.json()["error"]


def test_path_traversal_over_a_raw_socket_is_refused(served):
    """Clients normalise '..' away; a raw request line reaches the server as written."""
    client, _, index, _ = served
    with BackgroundServer(client.app) as server:
        for target in ("/api/images/../../../../etc/passwd", "/api/images/images/../../../../etc/passwd",
                       "/api/images/..%2f..%2f..%2f..%2fetc%2fpasswd", "/api/images/images/../queries.jsonl"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 404"), (target, reply[:200])
            assert b"root:" not in reply
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", f"/api/images/{index.ids[0]}")
        assert conn.getresponse().status == 200


def test_concurrent_requests_all_succeed_with_the_same_answer(served):
    client, _, index, _ = served
    with BackgroundServer(client.app) as server:
        body = json.dumps({"reference_id": index.ids[2], "text": TEXT, "k": 5})
        answers, errors = [], []

        def worker():
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            for _ in range(4):
                conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
                (answers if resp.status == 200 else errors).append(data)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and len(answers) == 24
    assert len({tuple(r["id"] for r in a["results"]) for a in answers}) == 1


def test_gallery_browse_filter_and_describe(served):
    client, _, index, _ = served
    page = client.get("/api/gallery?limit=10&offset=5").json()
    assert page["total"] == len(index) and [i["id"] for i in page["items"]] == index.ids[5:15]
    assert page["items"][0]["url"] == f"/api/images/{index.ids[5]}" and page["items"][0]["score"] is None
    name = index.ids[7].split("/")[-1][:6]
    found = client.get(f"/api/gallery?name={name.upper()}").json()
    assert index.ids[7] in [i["id"] for i in found["items"]] and found["total"] == len(found["items"])
    ranked = client.get("/api/gallery?text=a large red circle&limit=5").json()
    assert len(ranked["items"]) == 5
    scores = [i["score"] for i in ranked["items"]]
    assert scores == sorted(scores, reverse=True)
    for query, fragment in (("limit=500", "limit: must be between 1 and 200"), ("offset=-1", "offset"),
                            ("text=red&name=a", "either text"), ("limit=abc", "limit"), ("text=" + "a" * 300, "text")):
        resp = client.get("/api/gallery?" + query)
        assert 400 <= resp.status_code < 500 and fragment in resp.json()["error"], (query, resp.text)


def test_examples_come_from_the_generic_queries(served):
    client, _, index, gallery = served
    examples = client.get("/api/examples").json()
    expected = load_examples(gallery)
    assert [e["text"] for e in examples] == [e.text for e in expected] and len(examples) == 6
    for e in examples:
        assert e["reference"]["id"] in index and all(t in index for t in e["targets"])
    assert load_examples(gallery / "images") == []


def test_page_and_its_assets_are_served_and_offline(served):
    client, _, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == PAGE_POLICY
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(assets) == ["static/app.js", "static/favicon.svg", "static/style.css"]
    for asset in assets:
        assert client.get("/" + asset).status_code == 200
    assert client.get("/favicon.ico").status_code == 200
    for path in STATIC_DIR.iterdir():  # nothing is fetched from the web: no absolute URLs, no @import, no font files
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, never fetched
        assert not re.search(r"https?://|//cdn|@import|url\(", text), path.name


def test_static_files_are_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["zscir"].split(",")]
    for path in STATIC_DIR.iterdir():
        rel = path.relative_to(ROOT / "zscir").as_posix()
        assert any(Path(rel).match(p) for p in patterns), f"{rel} is not in setup.cfg package_data"
    extras = cfg["options.extras_require"]
    for name in ("fastapi", "uvicorn"):
        assert name in extras["serve"] and name in extras["dev"]
    assert "selenium" in extras["dev"] and "httpx" in extras["dev"]


def test_openapi_documents_the_schemas(served):
    client, _, _, _ = served
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/images/{image_id}", "/api/health", "/api/gallery", "/api/examples"} <= set(spec["paths"])
    request = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert {"reference_id", "reference_image", "text", "k", "exclude_reference"} == set(request)
    assert {"results", "took_ms", "link"} <= set(spec["components"]["schemas"]["SearchResponse"]["properties"])
    assert "422" in spec["paths"]["/api/search"]["post"]["responses"]


def test_service_refuses_an_index_of_another_model(served, tmp_path):
    _, composer, index, _ = served
    other = EmbeddingIndex.create(tmp_path / "other", index.dim, "another-model")
    other.add(["a.png"], torch.randn(1, index.dim))
    with pytest.raises(Exception, match="another-model"):
        SearchService(composer, other)


def test_index_folder_reuses_the_index_and_the_gallery_cache(served, tmp_path, monkeypatch):
    _, composer, index, gallery = served
    cache = tmp_path / "cache"
    first = index_folder(composer, gallery, index_dir=tmp_path / "a", cache_dir=cache, progress=False)
    assert first.ids == index.ids

    def no_encoding(*args, **kwargs):
        raise AssertionError("the images were embedded again")

    monkeypatch.setattr(composer, "encode_images", no_encoding)
    again = index_folder(composer, gallery, index_dir=tmp_path / "a", cache_dir=cache, progress=False)
    assert again.ids == first.ids  # the index had every image
    fresh = index_folder(composer, gallery, index_dir=tmp_path / "b", cache_dir=cache, progress=False)
    assert torch.equal(torch.from_numpy(fresh.embeddings[:].copy()), torch.from_numpy(first.embeddings[:].copy()))
    assert (tmp_path / "b" / "image_root.txt").read_text().strip() == str(gallery.resolve())


def test_serve_command_builds_the_gallery_and_starts_uvicorn(served, tmp_path, monkeypatch, capsys):
    import uvicorn

    from zscir.cli.main import main as cli_main

    _, composer, index, gallery = served
    monkeypatch.setenv("ZSCIR_CACHE_DIR", str(tmp_path / "cache"))  # the gallery feature cache, not the user's
    composer.save_pretrained(tmp_path / "model")
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    argv = ["serve", "--model", str(tmp_path / "model"), "--images", str(gallery), "--index", str(tmp_path / "idx"),
            "--port", "8123", "--max-k", "7", "--no-progress"]
    assert cli_main(argv) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert "serving 31 gallery images" in capsys.readouterr().out
    client = TestClient(seen["app"])
    assert client.get("/api/health").json()["limits"]["max_k"] == 7
    assert len(client.get("/api/examples").json()) == 6
    assert _search(client, reference_id=index.ids[0], text=TEXT, k=8).status_code == 422
    # the index written there serves again with --index alone (images found through its image_root.txt)
    assert cli_main(["serve", "--model", str(tmp_path / "model"), "--index", str(tmp_path / "idx")]) == 0
    assert TestClient(seen["app"]).get(f"/api/images/{index.ids[0]}").status_code == 200


@pytest.mark.parametrize("argv, fragment", [
    (["serve", "--model", "M"], "give the gallery"),
    (["serve", "--model", "no-such-folder", "--index", "I"], "not a model folder"),
    (["serve", "--model", "M", "--index", "I", "--port", "70000"], "--port must be in 1..65535"),
])
def test_serve_command_errors_are_one_line(argv, fragment, capsys):
    from zscir.cli.main import main as cli_main

    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_shapes_gallery_is_the_demo_test_set_and_rendered_once(tmp_path):
    from zscir.shapes import ShapesWorld, ShapesWorldConfig

    folder = shapes_gallery(3, folder=tmp_path / "g", progress=False)
    lines = (folder / "queries.jsonl").read_text().splitlines()
    demo_test_set = ShapesWorld(ShapesWorldConfig(seed=0, image_size=64)).make_eval_set(3, family="eval")
    assert [json.loads(line)["modification"] for line in lines] == [q.text for q in demo_test_set.queries]
    stamp = (folder / "queries.jsonl").stat().st_mtime_ns
    assert shapes_gallery(3, folder=tmp_path / "g", progress=False) == folder
    assert (folder / "queries.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="at least one query"):
        shapes_gallery(0, folder=tmp_path / "h")


def _wait_until(condition, what, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_batcher_runs_waiting_items_together_and_isolates_a_failure():
    from zscir.serve.service import _Batcher

    gate, calls, results = threading.Event(), [], {}

    def run(items):
        calls.append(list(items))
        if items == [0]:
            gate.wait(10)
        if "bad" in items:
            raise ValueError("bad item")
        return [i * 10 for i in items]

    batcher = _Batcher(run, max_batch=8)

    def go(item):
        try:
            results[item] = batcher.submit(item)
        except ValueError as err:
            results[item] = str(err)

    first = threading.Thread(target=go, args=(0,))
    first.start()
    _wait_until(lambda: calls == [[0]], "the first batch")
    others = [threading.Thread(target=go, args=(x,)) for x in (1, 2, "bad", 3)]
    for t in others:
        t.start()
    _wait_until(lambda: len(batcher.pending) == 4, "the waiting queries")
    gate.set()
    for t in [first] + others:
        t.join(10)
    assert results == {0: 0, 1: 10, 2: 20, "bad": "bad item", 3: 30}
    assert sorted(map(str, calls[1])) == ["1", "2", "3", "bad"]  # the waiting items ran as one batch ...
    assert sorted(len(c) for c in calls[2:]) == [1, 1, 1, 1]  # ... which failed, so each ran again alone


def test_concurrent_queries_are_batched_with_the_same_answers(served):
    _, composer, index, gallery = served
    service = SearchService(composer, index)
    refs = index.ids[:6]
    alone = {r: service.search(TEXT, 4 + i % 3, reference_id=r) for i, r in enumerate(refs)}
    assert all(a.batch == 1 for a in alone.values())
    together = {}
    service._model_lock.acquire()  # hold the model, so the queries pile up behind the first one
    threads = [threading.Thread(target=lambda r=r, i=i: together.update({r: service.search(TEXT, 4 + i % 3, reference_id=r)}))
               for i, r in enumerate(refs)]
    for t in threads:
        t.start()
    _wait_until(lambda: len(service._batcher.pending) == len(refs) - 1, "the queued queries")
    service._model_lock.release()
    for t in threads:
        t.join(30)
    assert sorted(r.batch for r in together.values()) == [1] + [len(refs) - 1] * (len(refs) - 1)
    for r in refs:
        assert [h.id for h in together[r].hits] == [h.id for h in alone[r].hits]
        assert [h.score for h in together[r].hits] == pytest.approx([h.score for h in alone[r].hits], abs=1e-5)
        assert together[r].excluded == [r] and r not in [h.id for h in together[r].hits]
