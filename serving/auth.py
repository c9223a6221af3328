"""The ASGI middleware that checks API keys and caps request bodies.

Every path that is not open needs a key holding the role ``clinml.serving.routes`` gives it; the
keys themselves (store, hashing, the keys file) are :mod:`clinml.serving.keys`::

    keystore = KeyStore.load(settings.api_keys_path, os.environ.get("CLINML_API_KEYS"))
    app = AuthMiddleware(JsonOnlyMiddleware(BodyLimitMiddleware(app, 1 << 20)), keystore)

Put ``AuthMiddleware`` outside the others (as above) so that a caller without a key is
turned away from the headers alone, before the service looks at, waits for or buffers
any of its body; open paths (probes, docs, metrics) take no body at all.

Nothing here logs or returns a secret, and a rejected request is answered without echoing
anything it sent. Refusals are reported to :mod:`clinml.serving.refusals` (counted, and logged
and audited in aggregate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from clinml.serving import routes
from clinml.serving.asgi import ASGIApp, Receive, Scope, Send, send_json
from clinml.serving.keys import ROLES, ApiKey, AuthConfigError


class Authenticator(Protocol):
    """What the middleware needs of a key store (``KeyStore``, ``LiveKeyStore``,
    ``KeysOnFirstUse``)."""

    def authenticate(self, presented: str) -> ApiKey | None: ...


def _presented_secret(scope: Scope) -> str | None:
    """The secret from ``Authorization: Bearer <secret>`` or ``X-API-Key: <secret>``."""
    bearer = api_key = None
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a ``Content-Length`` other than 0, or any
    ``Transfer-Encoding``), judged from the headers alone."""
    for name, value in scope.get("headers") or ():
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class AuthMiddleware:
    """Require an API key holding the right role on every path that is not open; answer
    a request to an open path that carries a body with 413, without reading it.

    Args:
        app: the ASGI application to protect.
        keystore: the known keys (a ``LiveKeyStore`` follows changes to the keys file).
        rules: path -> the role it needs (default: ``clinml.serving.routes.rules()``); an
            entry ending in "/" holds everything under it. A path that is neither in
            ``rules`` nor exempt needs ``admin``, so a new endpoint is closed until someone
            opens it.
        exempt: paths served without a key (default: the table's, ``clinml.serving.routes``); an
            entry ending in "/" (other than "/") exempts everything under it.
        protect_metrics: require a key for ``/metrics`` too (role from ``rules``, else
            ``admin``).
        usecase: the served use case: the route table's rows for its Open Inference
            Protocol paths count too (``clinml.serving.routes.protocol_routes``).

    Every refusal is answered from the headers alone, so a caller without a key holds
    no body buffer, no slot and no worker, and is reported to
    :mod:`clinml.serving.refusals` (counted, logged and audited in aggregate).

    On success the key's id is put in ``scope["state"]["clinml_key_id"]`` (``request.state
    .clinml_key_id`` in Starlette) for the audit trail and the per-key limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        keystore: Authenticator,
        rules: Mapping[str, str] | None = None,
        exempt: Iterable[str] | None = None,
        protect_metrics: bool = False,
        usecase: str | None = None,
    ) -> None:
        self.app = app
        self.keystore = keystore
        self.rules = dict(routes.rules(protect_metrics, usecase) if rules is None else rules)
        bad = sorted({role for role in self.rules.values() if role not in ROLES})
        if bad:
            raise AuthConfigError(f"auth rules name unknown role(s) {', '.join(bad)}")
        self.open_paths = routes.open_paths(protect_metrics, exempt, usecase)

    def is_exempt(self, path: str) -> bool:
        return path in self.open_paths

    def required_role(self, path: str) -> str:
        return routes.role_of(path, self.rules)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in self.open_paths:
            if scope["type"] == "http" and has_body(scope):
                await refuse(scope, send, 413, NO_BODY)
                return
            await self.app(scope, receive, send)
            return
        role = self.required_role(path)
        presented = _presented_secret(scope)
        key = self.keystore.authenticate(presented) if presented else None
        if key is None:
            await refuse(scope, send, 401, "missing or invalid API key")
            return
        if role not in key.roles:
            detail = f"API key '{key.key_id}' lacks the '{role}' role"
            await refuse(scope, send, 403, detail, key.key_id)
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["clinml_key_id"] = key.key_id
        await self.app(scope, receive, send)


NO_BODY = "this path takes no request body"


def key_id_of(scope: Scope) -> str | None:
    """The id of the key that authenticated the request, if any."""
    state = scope.get("state")
    return state.get("clinml_key_id") if state else None


async def refuse(
    scope: Scope,
    send: Send,
    status: int,
    detail: str,
    key_id: str | None = None,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    field: str = "detail",
) -> None:
    """Report the refusal (:mod:`clinml.serving.refusals`) and answer it as ``{field:
    detail}``; ``detail`` is clinml's own text, never anything the caller sent."""
    from clinml.serving import refusals

    refusals.record(scope.get("path", ""), status, key_id, detail)
    if scope["type"] == "websocket":
        # Closing before accepting turns the handshake into an HTTP 403.
        await send({"type": "websocket.close", "code": 1008, "reason": detail})
        return
    headers = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    await send_json(send, status, {field: detail}, [*headers, *extra_headers])


class JsonOnlyMiddleware:
    """Answer 415 to a request that carries a body not declared ``application/json``.

    Every endpoint that takes a body takes JSON; anything else (a pickle, a form, a body
    with no ``Content-Type``) is refused from the headers alone, before any of the body is
    read, so no other parser ever sees it. A request without a body (no
    ``Content-Length``, or 0, and not chunked) passes whatever its headers say.

    Under ``/v2/`` (the Open Inference Protocol, serving/protocol.py) the body is JSON by the
    protocol, and its clients send it undeclared (``tritonclient.http`` sends no
    ``Content-Type``): there a body with no ``Content-Type`` is taken as JSON, one declared
    as anything else is still a 415, and one using the protocol's binary data extension
    (an ``Inference-Header-Content-Length`` header: JSON followed by raw tensor bytes) is a
    400 that says so. Refusals there take the protocol's shape, ``{"error": ...}``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        content_type = _content_type(scope)
        if scope.get("path", "") in PROTOCOL_PATHS:
            if _header(scope, BINARY_HEADER) is not None:
                await refuse(scope, send, 400, BINARY_UNSUPPORTED, key_id_of(scope), field="error")
                return
            if content_type is None or is_json(content_type):
                await self.app(scope, receive, send)
                return
            await refuse(scope, send, 415, PROTOCOL_NOT_JSON, key_id_of(scope), field="error")
            return
        if not is_json(content_type):
            detail = "the body must be application/json"
            await refuse(scope, send, 415, detail, key_id_of(scope))
            return
        await self.app(scope, receive, send)


# The Open Inference Protocol's paths (never across dot segments: "/v2/../predict" is not one).
PROTOCOL_PATHS = routes.PathSet([routes.V2 + "/"])
# What tritonclient sends with binary tensor data: the length of the JSON part of the body.
BINARY_HEADER = b"inference-header-content-length"
BINARY_UNSUPPORTED = (
    "binary tensor data (the binary data extension, an Inference-Header-Content-Length "
    "header) is not supported: send every input's data as JSON (tritonclient: "
    "set_data_from_numpy(..., binary_data=False))"
)
PROTOCOL_NOT_JSON = "the body must be JSON: application/json, or no Content-Type"


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    """The request's header ``wanted`` (lower case; the last one, when it is sent twice)."""
    found = None
    for name, value in scope.get("headers") or ():
        if name.lower() == wanted:
            found = value
    return found


def _content_type(scope: Scope) -> bytes | None:
    """The request's ``Content-Type`` (the last one, when it is sent twice)."""
    return _header(scope, b"content-type")


def is_json(content_type: bytes | None) -> bool:
    """``application/json``, with or without parameters such as ``charset``."""
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class BodyLimitMiddleware:
    """Answer 413 to a request whose body is larger than ``max_bytes``, and 408 to one
    whose body does not arrive in full within ``timeout_s``.

    A ``Content-Length`` above the limit is refused before any of the body is read. Other
    bodies (chunked, or a length that lies) are read into memory up to the limit and
    handed to the app only once complete, so the app never sees a body it would have to
    abandon halfway; the first byte past the limit ends reading and answers 413. A body
    that trickles in is cut off at ``timeout_s`` (``CLINML_BODY_TIMEOUT_S``), so a slow
    sender holds its slot no longer than that; the 408 closes the connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {self.max_bytes} bytes"
        key_id = key_id_of(scope)
        for name, value in scope.get("headers") or ():
            if name.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await refuse(scope, send, 400, "invalid Content-Length header", key_id)
                    return
                if length > self.max_bytes:
                    await refuse(scope, send, 413, too_large, key_id)
                    return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left; there is nobody to answer
                    if message["type"] != "http.request":
                        continue
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await refuse(scope, send, 413, too_large, key_id)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            detail = f"request body not received within {self.timeout_s:g} s"
            await refuse(scope, send, 408, detail, key_id, [(b"connection", b"close")])
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
