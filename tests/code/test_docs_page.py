"""clinml's API docs page (serving/docs_page.py): only same-origin files, under a strict CSP.

The middleware wraps a stand-in for BentoML's app that serves BentoML's real docs page (the
one that loads Google Tag Manager) at ``/`` and its assets at ``/static_content``, so the
tests show that page can no longer get out.
"""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient

from clinml.serving import docs_page
from clinml.serving.docs_page import CSP, DocsPage, DocsPageError, load_assets, swagger_ui_dist

TRACKERS = ("googletagmanager", "google-analytics", "gtag(", "GTM-")


def _bentoml_like_app() -> Starlette:
    """BentoML's routes for its docs page, serving BentoML's own files."""
    import _bentoml_impl.server

    page = Path(_bentoml_impl.server.__file__).parent / "main-openapi.html"

    async def index(_request):
        return FileResponse(page)

    async def other(request):
        return JSONResponse({"inner": request.url.path})

    return Starlette(
        routes=[
            Route("/", index),
            Mount("/static_content", StaticFiles(directory=swagger_ui_dist())),
            Route("/{path:path}", other, methods=["GET", "HEAD", "POST"]),
        ]
    )


@pytest.fixture(scope="module")
def middleware() -> DocsPage:
    return DocsPage(_bentoml_like_app())


@pytest.fixture(scope="module")
def client(middleware: DocsPage) -> TestClient:
    return TestClient(middleware)


class _Page(HTMLParser):
    """The page's elements, with each script's inline text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.script_text.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text[-1] += data


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _references(page: _Page) -> list[str]:
    return [
        attrs[name] or ""
        for _, attrs in page.elements
        for name in ("src", "href", "action", "data", "srcset", "poster")
        if name in attrs
    ]


def _call(app: DocsPage, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """Drive ``app`` with a raw ASGI scope (paths as a client could send them, unnormalised).

    Returns (status, headers, body, how many times the app read the request body).
    """
    sent: list[dict[str, Any]] = []
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 5, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    base = {"type": "http", "method": "GET", "headers": [], "query_string": b"", "state": {}}
    asyncio.run(app(base | scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), body, reads


# -- the page --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_page_is_clinml_swagger_ui_under_a_strict_csp(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-cache"
    assert 'id="swagger-ui"' in response.text
    assert not any(tracker in response.text for tracker in TRACKERS)


def test_csp_allows_nothing_from_another_origin_and_no_inline_code() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'"
    assert directives["img-src"] == "'self' data:"
    assert directives["frame-ancestors"] == directives["base-uri"] == "'none'"
    assert "unsafe" not in CSP and "http" not in CSP and "*" not in CSP


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_page_has_no_inline_script_style_or_handler(client: TestClient, path: str) -> None:
    page = _parse(client.get(path).text)
    scripts = [attrs for tag, attrs in page.elements if tag == "script"]
    assert len(scripts) == 2  # Swagger UI's bundle and the page's initializer
    assert all(attrs.get("src") for attrs in scripts)
    assert all(not text.strip() for text in page.script_text)
    for tag, attrs in page.elements:
        assert tag not in ("style", "iframe", "object", "embed", "base", "form")
        assert "style" not in attrs
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_page_references_only_same_origin_assets_that_are_served(
    client: TestClient, path: str
) -> None:
    page_url = f"http://testserver{path}"
    expected = {"script": "text/javascript", "link": "text/css"}
    for tag, attrs in _parse(client.get(path).text).elements:
        reference = attrs.get("src") or attrs.get("href")
        if reference is None:
            continue
        if reference.startswith("data:"):  # the empty favicon: no request at all
            assert tag == "link" and attrs.get("rel") == "icon"
            continue
        assert not urlsplit(reference).scheme and not urlsplit(reference).netloc, reference
        url = urljoin(page_url, reference)
        assert urlsplit(url).netloc == "testserver"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-type"].startswith(expected[tag]), url


def test_page_and_initializer_name_no_other_origin(client: TestClient) -> None:
    html = client.get("/").text
    references = _references(_parse(html))
    initializer = next(r for r in references if "clinml-docs.js" in r)
    script = client.get(urljoin("http://testserver/", initializer)).text
    for text in (html, script):
        assert not re.search(r"https?:|//[a-z]", text, re.IGNORECASE), text
    # Swagger UI's defaults would send the document to validator.swagger.io and keep a
    # pasted key in localStorage: the initializer turns both off.
    assert "validatorUrl: null" in script
    assert "persistAuthorization: false" in script
    assert 'url: "docs.json"' in script


def test_head_answers_the_headers_alone(client: TestClient) -> None:
    get, head = client.get("/docs"), client.head("/docs")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-security-policy"] == CSP


def test_other_methods_on_the_page_answer_405(client: TestClient) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response = client.request(method, "/")
        assert response.status_code == 405, method
        assert response.headers["allow"] == "GET, HEAD"
        assert "googletagmanager" not in response.text


# -- the assets ------------------------------------------------------------------------------


def test_assets_have_their_content_types_and_a_fingerprinted_strong_cache(
    client: TestClient, middleware: DocsPage
) -> None:
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    assert set(middleware.assets) == {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "clinml-docs.js",
        "clinml-docs.css",
    }
    for name, asset in middleware.assets.items():
        response = client.get(f"/docs/assets/{name}", params={"v": asset.version})
        assert response.status_code == 200, name
        assert response.headers["content-type"] == types[Path(name).suffix]
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == asset.body
        # without the current fingerprint the file is still served, but never pinned
        for params in ({}, {"v": "0" * 16}):
            stale = client.get(f"/docs/assets/{name}", params=params)
            assert stale.status_code == 200
            assert stale.headers["cache-control"] == "no-cache"


def test_swagger_ui_files_are_bentomls_and_load_nothing_from_elsewhere(
    middleware: DocsPage,
) -> None:
    dist = swagger_ui_dist()
    for name in docs_page.SWAGGER_UI_FILES:
        assert middleware.assets[name].body == (dist / name).read_bytes()
    for asset in middleware.assets.values():
        text = asset.body.decode("utf-8")
        assert not any(tracker in text for tracker in TRACKERS)
    # The stylesheet's images are all inline data, and it imports nothing.
    css = middleware.assets["swagger-ui.css"].body.decode("utf-8")
    urls = re.findall(r"url\(\s*['\"]?([^'\")]*)", css)
    assert urls and all(url.startswith("data:") for url in urls)
    assert "@import" not in css


def test_unknown_asset_is_404(client: TestClient) -> None:
    for name in ("swagger-initializer.js", "index.css", "swagger-ui-standalone-preset.js", "x"):
        response = client.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
        assert response.json() == {"detail": "not found"}


@pytest.mark.parametrize(
    "path",
    [
        "/docs/assets/../../../etc/passwd",
        "/docs/assets/../assets/swagger-ui.css",
        "/docs/assets/./swagger-ui.css",
        "/docs/assets//swagger-ui.css",
        "/docs/assets/swagger-ui.css/",
        "/docs/assets/%2e%2e/swagger-ui.css",
        "/docs/assets/..%2fswagger-ui.css",
        "/docs/assets/",
        "/docs/assets/../../serving/auth.py",
    ],
)
def test_asset_paths_cannot_be_traversed(middleware: DocsPage, path: str) -> None:
    status, _, body, _ = _call(middleware, {"path": path})
    assert status == 404
    assert b"root:" not in body and b"import" not in body


# -- BentoML's page and everything else ------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/static_content",
        "/static_content/",
        "/static_content/swagger-initializer.js",
        "/static_content/swagger-ui-bundle.js",
        "/static_content/index.css",
        "/static_content/../static_content/index.css",
    ],
)
def test_bentomls_static_content_is_404(middleware: DocsPage, path: str) -> None:
    for method in ("GET", "HEAD", "POST"):
        status, _, body, _ = _call(middleware, {"path": path, "method": method})
        assert status == 404, (method, path)
        assert body == b'{"detail":"not found"}'


def test_bentomls_index_page_is_never_served(middleware: DocsPage) -> None:
    # The stand-in app does serve it: the middleware is what keeps it in.
    inner = TestClient(middleware.app)
    assert "googletagmanager" in inner.get("/").text
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        for path in ("/", "/docs", "/static_content/swagger-initializer.js"):
            status, _, body, _ = _call(middleware, {"path": path, "method": method})
            assert b"googletagmanager" not in body, (method, path)
            assert b"./docs.json" not in body  # BentoML's initializer
            assert status in (200, 404, 405)


@pytest.mark.parametrize(
    "path", ["/docs.json", "/predict", "/docsx", "/docs/", "/docs/other", "/static_contentx"]
)
def test_other_paths_pass_to_the_app(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json() == {"inner": path}


def test_websocket_and_lifespan_scopes_pass_to_the_app() -> None:
    seen: list[str] = []

    async def inner(scope, receive, send) -> None:
        seen.append(scope["type"])

    app = DocsPage(inner, load_assets())

    async def never(*_args: Any) -> Any:
        raise AssertionError("the middleware touched the connection")

    asyncio.run(app({"type": "websocket", "path": "/"}, never, never))
    asyncio.run(app({"type": "lifespan"}, never, never))
    assert seen == ["websocket", "lifespan"]


# -- request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/docs", "/docs/assets/swagger-ui.css", "/static_content/"])
@pytest.mark.parametrize(
    "header",
    [(b"content-length", b"5"), (b"transfer-encoding", b"chunked"), (b"Content-Length", b"x")],
)
def test_a_declared_body_is_refused_without_reading_it(
    middleware: DocsPage, path: str, header: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    from clinml.serving import refusals

    reported: list[tuple[str, int, str | None, str]] = []
    monkeypatch.setattr(refusals, "record", lambda *args: reported.append(args))
    for method in ("GET", "POST"):
        status, headers, body, reads = _call(
            middleware, {"path": path, "method": method, "headers": [header]}
        )
        assert status == 413
        assert body == b'{"detail":"this path takes no request body"}'
        assert headers[b"content-type"] == b"application/json"
        assert reads == 0
    assert reported == [(path, 413, None, "this path takes no request body")] * 2


def test_a_zero_content_length_is_no_body(middleware: DocsPage) -> None:
    status, _, body, reads = _call(
        middleware, {"path": "/", "headers": [(b"content-length", b"0")]}
    )
    assert status == 200 and b"swagger-ui" in body and reads == 0


# -- where the Swagger UI files come from ----------------------------------------------------


def test_bentoml_still_ships_swagger_ui_where_the_page_looks() -> None:
    # Fails with DocsPageError, naming the missing file, when a BentoML release moves them.
    dist = swagger_ui_dist()
    assert all((dist / name).stat().st_size > 0 for name in docs_page.SWAGGER_UI_FILES)


def test_missing_swagger_ui_files_stop_start_up_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DocsPageError, match=r"cannot read .*swagger-ui-bundle\.js"):
        load_assets(tmp_path)

    # A BentoML release whose static folder no longer holds the files.
    monkeypatch.setattr(docs_page.framework, "swagger_ui_folder", lambda: tmp_path)
    with pytest.raises(DocsPageError, match=r"cannot find swagger-ui-bundle\.js"):
        DocsPage(JSONResponse({}))
