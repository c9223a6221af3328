"""Load shedding: past a number of requests in flight, answer 429 without reading the request.

A worker that accepts every request it is sent, past what it can answer, only makes each
one wait longer: every caller's latency grows with the queue until callers with a
deadline time out. Shedding bounds the requests in flight and refuses the rest with a
429, so such callers get an answer or a refusal instead of a timeout. The refusal is
fast for small requests; behind admitted large ones it waits for their work on the same
event loop. docs/benchmarks.md ("Reliability") has the measurements
(``bench/reliability_bench.py --only overload``).

BentoML has the same idea (``traffic.max_concurrency``), but answers in its own error
shape and counts nothing; this one answers like every other clinml error, with
``Retry-After``, and reports each refusal.

    app = ShedMiddleware(app, max_in_flight=128, on_shed=count)
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import send_json

# Probes and scrapes are never shed: an overloaded service is alive and must say so.
EXEMPT = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


class ShedMiddleware:
    """Answer 429 with ``Retry-After: 1`` to a request that arrives while
    ``max_in_flight`` others are being answered.

    Args:
        app: the ASGI app.
        max_in_flight: requests answered at once by this worker (one event loop, so a
            plain counter is exact).
        on_shed: called with the path of each refused request (the service counts them
            on ``/metrics``); it must be quick and must not raise.
    """

    def __init__(
        self, app: ASGIApp, max_in_flight: int, on_shed: Callable[[str], None] | None = None
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._on_shed = on_shed
        self._detail = {"detail": f"over capacity ({max_in_flight} requests in flight); retry"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            if self._on_shed is not None:
                self._on_shed(scope["path"])
            await send_json(send, 429, self._detail, [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
