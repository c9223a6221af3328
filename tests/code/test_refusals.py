"""serving/refusals.py: refused requests counted at once, logged and audited once per
window per kind, with nothing the caller sent (issue 19, finding 6)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.testclient import TestClient

from clinml.serving import refusals
from clinml.serving.auth import AuthMiddleware, BodyLimitMiddleware
from clinml.serving.keys import KeyStore, generate_key


@pytest.fixture
def recorder(monkeypatch) -> refusals.Recorder:
    fresh = refusals.Recorder(window_s=3600, known_paths={"/predict"})
    monkeypatch.setattr(refusals, "RECORDER", fresh)
    return fresh


def test_a_flood_is_one_line_and_one_audit_record_per_kind(recorder, caplog) -> None:
    audited: list[tuple] = []
    counted: list[tuple] = []
    recorder.sink = lambda *kind: audited.append(kind)
    recorder.count = lambda *kind: counted.append(kind)
    for i in range(1000):
        refusals.record("/predict", 401, None, "missing or invalid API key")
        refusals.record(f"/patients/MRN-{i}", 401, None, "missing or invalid API key")
    refusals.record("/predict", 403, "app", "API key 'app' lacks the 'explain' role")
    with caplog.at_level(logging.INFO, logger="bentoml.clinml.refusals"):
        recorder.flush()
    assert len(counted) == 2001  # /metrics counts every one at once
    assert sorted(audited) == [
        ("/predict", 401, None, 1000),
        ("/predict", 403, "app", 1),
        ("other", 401, None, 1000),
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "refused 1000 request(s) to /predict with 401 (missing or invalid API key)" in lines
    assert not any("MRN" in line for line in lines)  # the caller's path never appears
    recorder.flush()
    assert len(audited) == 3  # nothing twice


def test_the_window_is_flushed_by_the_event_loop(monkeypatch) -> None:
    recorder = refusals.Recorder(window_s=0.01)
    audited: list[tuple] = []
    recorder.sink = lambda *kind: audited.append(kind)

    async def scenario() -> None:
        recorder.record("/predict", 429, "app", "over capacity")
        for _ in range(1000):  # the flush is due 10 ms later; wait for it, not for a time
            if audited:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert audited == [("other", 429, "app", 1)]


def test_a_failing_sink_does_not_fail_the_refusal(recorder, caplog) -> None:
    def broken(*kind) -> None:
        raise OSError("disk full")

    recorder.sink = broken
    refusals.record("/predict", 401, None, "missing or invalid API key")
    with caplog.at_level(logging.ERROR, logger="bentoml.clinml.refusals"):
        recorder.flush()
    assert "could not audit refused requests" in caplog.text


def _echo_app():
    async def app(scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    return app


def test_open_paths_refuse_a_body_without_reading_it(recorder) -> None:
    """Finding 1: a one-byte chunked body sent to /docs.json held a slot while the
    service waited for the rest."""
    read: list[bool] = []

    async def never(scope, receive, send) -> None:  # would wait forever for a body
        read.append(True)
        await asyncio.Event().wait()

    app = AuthMiddleware(never, KeyStore([generate_key("app", ["predict"])[1]]))
    client = TestClient(app)
    for path in ("/docs.json", "/", "/static_content/app.js", "/livez"):
        answer = client.post(path, content=b"{", headers={"content-type": "application/json"})
        assert answer.status_code == 413
        assert answer.json() == {"detail": "this path takes no request body"}
    assert read == []
    assert recorder.recorded == 4


def test_a_body_that_does_not_arrive_in_time_is_408(recorder) -> None:
    async def trickle() -> dict:
        await asyncio.sleep(3600)  # a client that went silent after its headers
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    limited = BodyLimitMiddleware(_echo_app(), 1000, timeout_s=0.05)
    scope = {
        "type": "http",
        "path": "/predict",
        "headers": [(b"transfer-encoding", b"chunked")],
        "state": {"clinml_key_id": "app"},
    }
    asyncio.run(limited(scope, trickle, send))
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert recorder.recorded == 1
