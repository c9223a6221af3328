"""clinml's API docs page: Swagger UI on ``/docs.json``, from this origin only.

BentoML's own docs page (``GET /``, ``main-openapi.html``) loads Google Tag Manager, on the
origin where users paste API keys into "Authorize". ``DocsPage`` is an ASGI middleware that
answers the docs paths itself, so that page is never served:

- ``GET``/``HEAD`` ``/`` and ``/docs``: clinml's page, Swagger UI pointed at ``docs.json``;
- ``/docs/assets/<name>``: a fixed allow-list of files: Swagger UI's bundle and stylesheet
  (the copies BentoML ships, read once at start-up) and the page's own initializer and
  stylesheet (below). Any other name, ``..`` included, answers 404;
- ``/static_content`` and everything under it: 404. That is where BentoML serves the
  assets of its page; clinml's page does not use them.

Every path is otherwise passed to the wrapped app untouched. The page and its assets carry a
Content-Security-Policy that lets them load, run and fetch nothing from another origin and
allows no inline script or style (``CSP`` below), with ``X-Content-Type-Options: nosniff``
and ``Referrer-Policy: no-referrer``. Asset URLs carry a fingerprint of their content
(``?v=``), so they are cached for a year and a new BentoML release is fetched afresh.

Nothing on these paths reads a request body: one that declares a body (``Content-Length``
above 0, or any ``Transfer-Encoding``) is answered 413 from its headers alone, and reported
to :mod:`clinml.serving.refusals` like every other refusal. Install it outermost, outside
``AuthMiddleware``, since the page and its assets carry no data and need no key::

    ClinicalService.add_asgi_middleware(DocsPage)

The Swagger UI files live in a private BentoML folder, found by
``clinml.serving.framework.swagger_ui_folder``; ``swagger_ui_dist`` raises ``DocsPageError``
naming the missing file when a BentoML release moves them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from clinml.errors import ClinmlError
from clinml.serving import framework
from clinml.serving.asgi import ASGIApp, Receive, Scope, Send, send_json
from clinml.serving.auth import NO_BODY, has_body, refuse

PAGE_PATHS = frozenset({"/", "/docs"})
ASSET_PREFIX = "/docs/assets/"
# BentoML's own docs assets, mounted by BentoML at /static_content.
BENTOML_STATIC = "/static_content"

# Swagger UI needs nothing more: its stylesheet's images are data: URLs, its bundle sets
# styles through the DOM (not inline <style>), and "Try it out" calls this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode("ascii")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors, for browsers that predate it
)
IMMUTABLE = b"public, max-age=31536000, immutable"

# The page's own initializer. Relative URLs, so the page also works behind a path prefix.
# persistAuthorization=false keeps a pasted key in memory only (never localStorage);
# validatorUrl=null stops Swagger UI from sending the document to validator.swagger.io.
INITIALIZER_JS = """\
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  window.ui = SwaggerUIBundle({
    url: "docs.json",
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    deepLinking: true,
    persistAuthorization: false,
    validatorUrl: null,
  });
});
"""
PAGE_CSS = """\
body { margin: 0; background: #fafafa; }
"""
_PAGE_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clinml API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{swagger-ui.css}">
<link rel="stylesheet" href="{clinml-docs.css}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{swagger-ui-bundle.js}"></script>
<script src="{clinml-docs.js}"></script>
</body>
</html>
"""
# The Swagger UI files this page uses, by the name they are served under.
SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8"}


class DocsPageError(ClinmlError):
    """The Swagger UI files the docs page serves cannot be found or read."""


def swagger_ui_dist() -> Path:
    """The folder holding the Swagger UI files that BentoML ships.

    Raises:
        DocsPageError: BentoML is not installed, or the folder lacks one of
            ``SWAGGER_UI_FILES`` (a BentoML release moved them: find the new folder, or take
            the files from another package).
    """
    try:
        folder = framework.swagger_ui_folder()
    except ImportError:
        raise DocsPageError(
            "the API docs page needs BentoML's Swagger UI files: install bentoml"
        ) from None
    for name in SWAGGER_UI_FILES:
        if not (folder / name).is_file():
            raise DocsPageError(
                f"the API docs page cannot find {name} in {folder}: this BentoML release "
                "keeps its Swagger UI files elsewhere; point "
                "clinml.serving.framework.swagger_ui_folder at them"
            )
    return folder


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: bytes
    version: str  # a fingerprint of the body, the ``?v=`` of its URL


def _asset(name: str, body: bytes) -> Asset:
    return Asset(body, _TYPES[Path(name).suffix], hashlib.sha256(body).hexdigest()[:16])


def load_assets(dist: Path | None = None) -> dict[str, Asset]:
    """The files served under ``ASSET_PREFIX``, by name: Swagger UI's and the page's own.

    Args:
        dist: the folder holding ``SWAGGER_UI_FILES`` (default: ``swagger_ui_dist()``).

    Raises:
        DocsPageError: a file cannot be read.
    """
    dist = swagger_ui_dist() if dist is None else Path(dist)
    assets = {
        "clinml-docs.js": _asset("clinml-docs.js", INITIALIZER_JS.encode("utf-8")),
        "clinml-docs.css": _asset("clinml-docs.css", PAGE_CSS.encode("utf-8")),
    }
    for name in SWAGGER_UI_FILES:
        try:
            assets[name] = _asset(name, (dist / name).read_bytes())
        except OSError as exc:
            raise DocsPageError(
                f"the API docs page cannot read {dist / name}: {exc.strerror}"
            ) from exc
    return assets


def render_page(assets: Mapping[str, Asset]) -> bytes:
    """The page's HTML, each asset referenced by its relative, fingerprinted URL."""
    html = _PAGE_TEMPLATE
    for name, asset in assets.items():
        html = html.replace("{" + name + "}", f"docs/assets/{name}?v={asset.version}")
    return html.encode("utf-8")


class DocsPage:
    """Serve clinml's API docs page and its assets; pass every other path to ``app``.

    Args:
        app: the ASGI application behind the page.
        assets: the files to serve (default: ``load_assets()``, read once, here).

    Raises:
        DocsPageError: the Swagger UI files cannot be found or read.
    """

    def __init__(self, app: ASGIApp, assets: Mapping[str, Asset] | None = None) -> None:
        self.app = app
        self.assets = dict(load_assets() if assets is None else assets)
        self.page = render_page(self.assets)

    def owns(self, path: str) -> bool:
        """Whether this middleware answers ``path`` itself."""
        return (
            path in PAGE_PATHS
            or path.startswith(ASSET_PREFIX)
            or path == BENTOML_STATIC
            or path.startswith(BENTOML_STATIC + "/")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.owns(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if has_body(scope):
            await refuse(scope, send, 413, NO_BODY)
            return
        path = scope["path"]
        if path.startswith(ASSET_PREFIX):
            asset = self.assets.get(path[len(ASSET_PREFIX) :])
            if asset is None:
                await send_json(send, 404, {"detail": "not found"})
                return
            body, content_type = asset.body, asset.content_type
            # Only the current fingerprint may be cached for good: an old or missing one
            # must not pin this content under a URL that later names something else.
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            current = query.get("v") == [asset.version]
            cache = IMMUTABLE if current else b"no-cache"
        elif path in PAGE_PATHS:
            body, content_type, cache = self.page, b"text/html; charset=utf-8", b"no-cache"
        else:  # BentoML's static_content: its page is never served, nor its assets
            await send_json(send, 404, {"detail": "not found"})
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await send_json(send, 405, {"detail": "method not allowed"}, [(b"allow", b"GET, HEAD")])
            return
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", cache),
            *_SECURITY_HEADERS,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
