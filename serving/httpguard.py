"""Limits on what a connection may send before the service knows who is calling.

Everything below runs before any ASGI middleware, so before the API key is checked: the
HTTP parser reads the request line and headers into memory, and uvicorn (which BentoML
runs) puts no bound on their size or on how long they take to arrive. Before this
module an oversized header on ``/livez`` was answered 200, a few connections holding
unfinished large headers grew the worker by hundreds of MB (the measurement:
docs/benchmarks.md, "Attacks without a key"), and a handshake to ``/ws/<text>`` put
``<text>`` into BentoML's request metrics and the Prometheus files (issue 19).

:class:`GuardedHttpToolsProtocol` is uvicorn's httptools protocol with four limits:

- **header size**: the request line and headers together at most ``max_header_bytes``
  (``CLINML_MAX_HEADER_BYTES``, 32 KiB); more is answered 431 and the connection closed.
  Unfinished headers are measured as they arrive, so what the parser holds stops at the
  limit plus one read (at most 256 KiB with uvloop) instead of growing;
- **header count**: at most ``max_headers`` fields (``CLINML_MAX_HEADERS``, 100), 431;
- **header time**: from a connection's first byte (or a kept-alive connection's next
  request) the headers must be complete within ``header_timeout_s``
  (``CLINML_HEADER_TIMEOUT_S``, 10 s), else 408 and the connection is closed; a
  connection that sends nothing at all is closed after the same time;
- **no upgrades**: a request asking to switch protocols (a WebSocket handshake, ``h2c``)
  is answered 400 from its headers, before a scope exists, so no middleware, metric or
  log sees its path. clinml serves no WebSocket.

Refusals are counted and logged without anything the caller sent
(:mod:`clinml.serving.refusals`). :func:`install` makes uvicorn use the class; it must run in
the worker process before the server starts (the service module calls it at import).
The same limits belong at the ingress too (docs/deployment.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from clinml.serving import refusals

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header size, count and time limits and no
    protocol upgrades (see the module docstring). The limits are class attributes set
    by :func:`install`."""

    max_header_bytes = 32_768
    max_headers = 100
    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ws_protocol_class = None  # never switch protocols
        self._in_headers = True  # reading a request line and headers
        self._header_bytes = 0
        self._header_size = 0  # the request line and headers, as parsed
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._answered = False
        self._header_timer: asyncio.TimerHandle | None = None

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that sends nothing is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered and closing: read nothing more
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self._in_headers:  # the next request on a kept-alive connection
            self._start_headers()
        super().data_received(data)
        if self._refusal is None and self._in_headers:
            # Still no end of headers: what the parser holds grows by this chunk. A chunk
            # that completes the headers is measured exactly instead (on_headers_complete),
            # so a large body arriving with its headers is never mistaken for them.
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refusal = (431, "request headers larger than the limit")
        if self._refusal is not None:
            self._answer_refusal()

    def _start_headers(self) -> None:
        self._in_headers = True
        self._header_bytes = 0
        self._header_size = 0
        self._header_count = 0
        self._arm_header_timer()

    # -- parser callbacks ----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_size += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.max_headers:
            self._refusal = (431, "too many request header fields")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        if self._refusal is None and self._header_size > self.max_header_bytes:
            self._refusal = (431, "request headers larger than the limit")
        if self._refusal is None and self.parser.should_upgrade():
            self._refusal = (400, "protocol upgrades (WebSocket) are not served")
        if self._refusal is not None:
            return  # no scope, no app: data_received answers once the parser returns
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is None:
            super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's warning suggests installing a WebSocket library; the upgrade was
        refused on purpose and is logged as a refusal instead."""

    # -- refusing ------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and self._refusal is None and not self.transport.is_closing():
            if self._header_bytes == 0:
                # Nothing was sent: close quietly, as for an idle kept-alive connection.
                self.transport.close()
                return
            self._refuse(408, f"request headers not complete within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        self._refusal = (status, detail)
        self._answer_refusal()

    def _answer_refusal(self) -> None:
        assert self._refusal is not None
        if self._answered:
            return
        self._answered = True
        status, detail = self._refusal
        self._cancel_header_timer()
        refusals.record("(headers)" if status != 400 else "(upgrade)", status, None, detail)
        if self.transport.is_closing():
            return
        body = b'{"detail":"' + detail.encode("ascii") + b'"}'
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def install(max_header_bytes: int, max_headers: int, header_timeout_s: float) -> None:
    """Make uvicorn serve HTTP/1.1 with :class:`GuardedHttpToolsProtocol`.

    BentoML builds ``uvicorn.Config`` without an ``http`` option, so uvicorn resolves
    ``"auto"`` through its ``HTTP_PROTOCOLS`` table when the server starts; pointing that
    entry (and ``"httptools"``) here is enough. ``tests/integration/test_attacks.py``
    checks against a real ``bentoml serve`` that the limits hold.
    """
    from uvicorn import config

    GuardedHttpToolsProtocol.max_header_bytes = max_header_bytes
    GuardedHttpToolsProtocol.max_headers = max_headers
    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    target = f"{__name__}:{GuardedHttpToolsProtocol.__name__}"
    config.HTTP_PROTOCOLS["auto"] = target
    config.HTTP_PROTOCOLS["httptools"] = target
