"""serving/overload.py: past ``max_in_flight`` requests (or a key's share), a fast 429;
open paths are never counted or shed."""

from __future__ import annotations

import asyncio
import json

import pytest

from clinml.serving import refusals
from clinml.serving.overload import ShedMiddleware


@pytest.fixture(autouse=True)
def recorder(monkeypatch) -> refusals.Recorder:
    fresh = refusals.Recorder(known_paths={"/predict", "/explain"})
    monkeypatch.setattr(refusals, "RECORDER", fresh)
    return fresh


def _scope(path: str, key_id: str | None = None) -> dict:
    state = {"clinml_key_id": key_id} if key_id else {}
    return {"type": "http", "method": "POST", "path": path, "headers": [], "state": state}


async def _call(app, path: str, key_id: str | None = None) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(_scope(path, key_id), receive, send)
    return sent


def test_requests_past_the_limit_are_refused_at_once_and_counted(recorder) -> None:
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
        recorder.count = lambda endpoint, status: shed.append(endpoint)
        app = ShedMiddleware(slow, max_in_flight=2)
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


def _holding_app():
    """An app whose requests wait for ``release``; ``entered`` counts those admitted."""
    state = {"entered": 0, "release": asyncio.Event()}

    async def slow(scope, receive, send) -> None:
        state["entered"] += 1
        await state["release"].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return slow, state


def test_one_key_cannot_take_every_slot(recorder) -> None:
    """Issue 19: one caller's requests filled the worker's whole budget."""

    async def scenario() -> None:
        slow, state = _holding_app()
        app = ShedMiddleware(slow, max_in_flight=8, max_per_key=2)
        greedy = [asyncio.create_task(_call(app, "/explain", "analyst")) for _ in range(2)]
        await asyncio.sleep(0)
        refused = await _call(app, "/explain", "analyst")
        assert refused[0]["status"] == 429
        assert json.loads(refused[1]["body"]) == {
            "detail": "this API key has 2 requests in flight; retry"
        }
        other = asyncio.create_task(_call(app, "/predict", "app"))  # another key still gets in
        await asyncio.sleep(0)
        assert state["entered"] == 3 and app.per_key == {"analyst": 2, "app": 1}
        state["release"].set()
        await asyncio.gather(*greedy, other)
        assert app.in_flight == 0 and app.per_key == {}
        assert recorder.recorded == 1

    asyncio.run(scenario())


def test_open_paths_are_neither_counted_nor_shed() -> None:
    """Issue 19: requests to open paths (docs, probes) held slots, so callers without a
    key could make /predict answer 429."""

    async def scenario() -> None:
        slow, state = _holding_app()
        app = ShedMiddleware(slow, max_in_flight=1)
        open_requests = [
            asyncio.create_task(_call(app, path))
            for path in ("/docs.json", "/", "/static_content/x.js", "/livez", "/metrics")
        ]
        await asyncio.sleep(0)
        assert state["entered"] == 5 and app.in_flight == 0
        admitted = asyncio.create_task(_call(app, "/predict", "app"))
        await asyncio.sleep(0)
        assert state["entered"] == 6 and app.in_flight == 1
        state["release"].set()
        answers = await asyncio.gather(*open_requests, admitted)
        assert {a[0]["status"] for a in answers} == {200}

    asyncio.run(scenario())
