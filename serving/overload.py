"""Load shedding: past a number of requests in flight, answer 429 without reading the request.

A worker that accepts every request it is sent, past what it can answer, only makes each
one wait longer: every caller's latency grows with the queue until callers with a
deadline time out. Shedding bounds the requests in flight and refuses the rest with a
429, so such callers get an answer or a refusal instead of a timeout. The refusal is
fast for small requests; behind admitted large ones it waits for their work on the same
event loop. docs/benchmarks.md ("Reliability") has the measurements
(``bench/reliability_bench.py --only overload``).

Only admitted work counts: the middleware sits inside the key check, so a request
without a valid key never takes a slot, and open paths (probes, docs, metrics) are
neither counted nor shed. Each key may hold at most ``max_per_key`` of the slots, so one
caller cannot starve the others (issue 19: two ``/explain`` clients raised everyone's
p95 a hundredfold).

BentoML has the same idea (``traffic.max_concurrency``), but answers in its own error
shape and counts nothing; this one answers like every other clinml error, with
``Retry-After``, and reports each refusal (:mod:`clinml.serving.refusals`).

    app = ShedMiddleware(app, max_in_flight=128, max_per_key=32)
"""

from __future__ import annotations

from collections.abc import Container

from starlette.types import ASGIApp, Receive, Scope, Send

from clinml.serving import routes
from clinml.serving.auth import key_id_of, refuse


class ShedMiddleware:
    """Answer 429 with ``Retry-After: 1`` to a request that arrives while
    ``max_in_flight`` others are being answered, or while its key has ``max_per_key``
    requests in flight.

    Args:
        app: the ASGI app.
        max_in_flight: requests answered at once by this worker (one event loop, so plain
            counters are exact).
        max_per_key: requests one API key may have in flight; 0 for no per-key limit.
            Requests without a key id (authentication off) share one budget, the whole.
        open_paths: paths never counted or shed (default: ``clinml.serving.routes.unshed()``).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        max_per_key: int = 0,
        open_paths: Container[str] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if max_per_key < 0:
            raise ValueError("max_per_key must be >= 0")
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_per_key = max_per_key
        self.open_paths = routes.unshed() if open_paths is None else open_paths
        self.in_flight = 0
        self.per_key: dict[str, int] = {}
        self._full = f"over capacity ({max_in_flight} requests in flight); retry"
        self._key_full = f"this API key has {max_per_key} requests in flight; retry"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        key_id = key_id_of(scope)
        held = self.per_key.get(key_id, 0) if key_id is not None else 0
        if self.in_flight >= self.max_in_flight:
            await refuse(scope, send, 429, self._full, key_id, [(b"retry-after", b"1")])
            return
        if self.max_per_key and key_id is not None and held >= self.max_per_key:
            await refuse(scope, send, 429, self._key_full, key_id, [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        if key_id is not None:
            self.per_key[key_id] = held + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if key_id is not None:
                left = self.per_key[key_id] - 1
                if left:
                    self.per_key[key_id] = left
                else:
                    del self.per_key[key_id]
