"""clinml.serving.timeouts: BentoML's request timeout, with its timer cancelled once the answer
starts (BentoML 1.4's leaves one per request on the event loop for the whole timeout)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from clinml.serving import framework
from clinml.serving.timeouts import TimeoutMiddleware

traffic = framework.traffic_module()
UPSTREAM = traffic.TimeoutMiddleware  # as imported, before any install()


def _lingering(loop: asyncio.AbstractEventLoop) -> int:
    """Timers on the loop that are neither cancelled nor due."""
    now = loop.time()
    return sum(1 for t in loop._scheduled if not t.cancelled() and t.when() > now)  # type: ignore[attr-defined]


async def _call(app: Any, path: str = "/") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return sent


async def fast(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def slow(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(5)


async def slow_after_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": b"late but whole"})


async def own_timeout(scope: Scope, receive: Receive, send: Send) -> None:
    raise TimeoutError("the app's own")


def test_answered_requests_leave_no_timer_behind() -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ours, upstream = TimeoutMiddleware(fast, 30), UPSTREAM(fast, 30)
        for _ in range(200):
            assert (await _call(ours))[0]["status"] == 200
        left_by_ours = _lingering(loop)
        for _ in range(200):
            assert (await _call(upstream))[0]["status"] == 200
        return left_by_ours, _lingering(loop) - left_by_ours

    ours, upstream = asyncio.run(main())
    assert ours == 0
    # BentoML's own leaves one per request: if this fails, upstream fixed it and
    # clinml.serving.timeouts can go.
    assert upstream == 200


def test_no_answer_within_the_timeout_is_a_504() -> None:
    sent = asyncio.run(_call(TimeoutMiddleware(slow, 0.05)))
    assert sent[0]["status"] == 504
    assert b"Not able to process the request in 0.05 seconds" in sent[1]["body"]


def test_an_answer_that_has_started_may_finish_after_the_timeout() -> None:
    sent = asyncio.run(_call(TimeoutMiddleware(slow_after_start, 0.05)))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"late but whole"


def test_the_apps_own_timeout_error_is_not_a_504() -> None:
    with pytest.raises(TimeoutError, match="the app's own"):
        asyncio.run(_call(TimeoutMiddleware(own_timeout, 30)))


def test_install_makes_bentoml_build_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traffic, "TimeoutMiddleware", UPSTREAM)
    framework.install_timeout_middleware()
    base = framework.base_app_factory()

    class Factory(base):  # type: ignore[misc, valid-type]
        name = "test"

    built = [m.cls for m in Factory(timeout=30).middlewares]
    assert TimeoutMiddleware in built and UPSTREAM not in built
