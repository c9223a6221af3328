"""BentoML's request timeout, without the timer it leaves behind on every request.

BentoML 1.4's ``TimeoutMiddleware`` (``bentoml._internal.server.http.traffic``) arms
``loop.call_later(timeout, ...)`` for every request and never cancels it, so every
answered request leaves its timer, a future and a bound method on the event loop for
``traffic.timeout`` seconds (30 here). It also runs each request in an extra task.
Under sustained load the worker's memory grows run after run, and p99 with it, because
Python's full garbage collections walk the growing heap of timers while every request
waits (the measurement: docs/benchmarks.md, "What changed for issue 7").

:func:`clinml.serving.framework.configure` makes BentoML build its middleware stack with
:class:`TimeoutMiddleware` below. The contract is the same: a request with no response
started within ``timeout`` seconds is cancelled and answered 504 with BentoML's body;
once the response has started, it may take as long as it takes. The difference is that
the timer is cancelled when the response starts, and the request runs in its own task.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class TimeoutMiddleware:
    """504 when no response has started within ``timeout`` seconds (see module doc)."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)  # the timeout covers the time to the first byte
            await send(message)

        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self.app(scope, receive, _send)
        except TimeoutError:
            if started or not deadline.expired():
                raise  # the app's own TimeoutError, or one after the answer began
            body = {"error": f"Not able to process the request in {self.timeout} seconds"}
            await JSONResponse(body, status_code=504)(scope, receive, send)
