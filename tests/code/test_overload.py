"""serving/overload.py: past ``max_in_flight`` requests, a fast 429; probes never shed."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.overload import ShedMiddleware


def _scope(path: str) -> dict:
    return {"type": "http", "method": "POST", "path": path, "headers": []}


async def _call(app, path: str) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(_scope(path), receive, send)
    return sent


def test_requests_past_the_limit_are_refused_at_once_and_counted() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        entered = 0

        async def slow(scope, receive, send) -> None:
            nonlocal entered
            entered += 1
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        shed: list[str] = []
        app = ShedMiddleware(slow, max_in_flight=2, on_shed=shed.append)
        held = [asyncio.create_task(_call(app, "/predict")) for _ in range(2)]
        await asyncio.sleep(0)
        assert entered == 2 and app.in_flight == 2

        refused = await _call(app, "/predict")  # answered without waiting for the others
        assert refused[0]["status"] == 429
        assert (b"retry-after", b"1") in refused[0]["headers"]
        assert json.loads(refused[1]["body"]) == {
            "detail": "over capacity (2 requests in flight); retry"
        }
        assert shed == ["/predict"] and entered == 2

        probe = asyncio.create_task(_call(app, "/readyz"))  # probes pass, whatever the load
        await asyncio.sleep(0)
        assert entered == 3

        release.set()
        answers = await asyncio.gather(*held, probe)
        assert [a[0]["status"] for a in answers] == [200, 200, 200]
        assert app.in_flight == 0
        assert (await _call(app, "/predict"))[0]["status"] == 200

    asyncio.run(scenario())


def test_a_failing_request_frees_its_place() -> None:
    async def broken(scope, receive, send) -> None:
        raise RuntimeError("boom")

    app = ShedMiddleware(broken, max_in_flight=1)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            asyncio.run(_call(app, "/predict"))
    assert app.in_flight == 0


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ShedMiddleware(lambda *a: None, max_in_flight=0)
