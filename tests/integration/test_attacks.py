"""The red team's findings of issue 19, each reproduced against a real ``bentoml serve``.

One service for the module, on a data directory of its own (so tampering with its audit
trail touches no other test), serving the session's packaged champion, with small
limits so that an attack needs few connections: 16 requests in flight, 4 per key, a 3 s
wait for a body or for headers. Connection counts and durations are bounded to keep CI
time reasonable; ``bench/reliability_bench.py --only slowloris`` runs the full-size
attack (500 connections) and measures what it costs the authenticated callers.

Every wait is for something the server must do, polled up to a generous deadline; no
test asserts on elapsed time.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from clinml.settings import Settings
from tests.integration.served import api_keys, clinml, serve_from_the_session_store
from tests.waiting import wait_for

MAX_IN_FLIGHT, PER_KEY, SLOW_S = 16, 4, 3
WAIT_S = 120.0  # the most any poll waits for the server; it answers far sooner
AUDIT_KEY = "attack-tests-audit-key-0123456789abcdef"


@dataclass
class Served:
    url: str
    port: int
    home: Path
    log_file: Path
    checkpoints: Path
    keys: dict[str, str]
    env: dict[str, str]
    pid: int

    def headers(self, key: str = "app") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def audit_records(self) -> list[dict]:
        path = Settings(home=self.home).paths.request_audit_log
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from clinml.serving.launch import ServiceProcess, free_port

    home = tmp_path_factory.mktemp("attacked-home")
    checkpoints = tmp_path_factory.mktemp("attacked-checkpoints")  # apart from the home
    keys = api_keys(home)
    env = {
        "CLINML_REQUIRE_ONLINE_STORE": "false",  # this home has no online store
        "CLINML_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "CLINML_MAX_IN_FLIGHT_PER_KEY": str(PER_KEY),
        "CLINML_BODY_TIMEOUT_S": str(SLOW_S),
        "CLINML_HEADER_TIMEOUT_S": str(SLOW_S),
        "CLINML_AUDIT_KEY": AUDIT_KEY,
        "CLINML_AUDIT_CHECKPOINT_DIR": str(checkpoints),
        "CLINML_AUDIT_CHECKPOINT_INTERVAL_S": "1",
    }
    port = free_port()
    log_file = home / "serve.log"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        serve_from_the_session_store(patch)
        with ServiceProcess(Settings(home=home), "pathology", port, log_file) as process:
            assert process.pid is not None
            yield Served(process.url, port, home, log_file, checkpoints, keys, env, process.pid)


@pytest.fixture(scope="module")
def record(records) -> dict:
    return records.head(1).to_dict("records")[0]


def _connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=WAIT_S)


def _slow_request(served: Served, path: str, headers: dict[str, str] | None = None):
    """A POST with a JSON content type whose chunked body stops after one byte."""
    conn = _connect(served)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    conn.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
    return conn


def _status_of(conn: socket.socket) -> int:
    """The status of the answer on ``conn`` (waits for it)."""
    data = b""
    while b"\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            raise AssertionError(f"closed without an answer (got {data!r})")
        data += chunk
    return int(data.split(b" ", 2)[1])


def _predicts(served: Served, record: dict, n: int, key: str = "app") -> list[int]:
    with httpx.Client(base_url=served.url, headers=served.headers(key), timeout=WAIT_S) as client:
        return [client.post("/predict", json={"records": [record]}).status_code for _ in range(n)]


# -- 1. slow bodies on open paths made /predict answer 429 ------------------------------------


def test_slow_bodies_without_a_key_hold_no_slot(served: Served, record: dict) -> None:
    """Finding 1: 130 connections sending one byte of a JSON body to /docs.json (or /, or a
    static path) and going silent made /predict answer 429 while /readyz stayed 200."""
    paths = ["/docs.json", "/", "/static_content/index.css", "/predict", "/livez"]
    hostile = [_slow_request(served, paths[i % len(paths)]) for i in range(3 * MAX_IN_FLIGHT)]
    try:
        statuses = {_status_of(conn) for conn in hostile}  # answered at once, body unread
        assert statuses <= {401, 404, 413}, statuses
        assert _predicts(served, record, 2 * MAX_IN_FLIGHT) == [200] * (2 * MAX_IN_FLIGHT)
    finally:
        for conn in hostile:
            conn.close()


def test_a_key_cannot_hold_every_slot_with_slow_bodies(served: Served, record: dict) -> None:
    """Fair sharing: one key's slow requests take at most its share; past it, a fast 429;
    the admitted ones are cut off after the body timeout (408), and another key is
    served throughout."""
    greedy = [
        _slow_request(served, "/explain", served.headers("analyst")) for _ in range(PER_KEY + 3)
    ]
    try:
        wait_for(
            lambda: sum(_readable(conn) for conn in greedy) >= 3,
            "answers to the 3 slow requests over the key's share",
            WAIT_S,
        )
        assert _predicts(served, record, 5) == [200] * 5  # another key, while they wait
        statuses = sorted(_status_of(conn) for conn in greedy)
        assert statuses.count(429) == 3 and statuses.count(408) == PER_KEY, statuses
    finally:
        for conn in greedy:
            conn.close()


def _readable(conn: socket.socket) -> bool:
    import select

    return bool(select.select([conn], [], [], 0)[0])


# -- 3. headers without limit ------------------------------------------------------------------


def _send_header_until_refused(served: Served, path: str, total: int) -> tuple[int, int]:
    """Send a header of ``total`` bytes (never finished); (bytes sent, status)."""
    conn = _connect(served)
    sent = 0
    try:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Filler: ".encode())
        chunk = b"a" * 65536
        while sent < total:
            conn.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed
    try:
        return sent, _status_of(conn)
    finally:
        conn.close()


def test_huge_and_unfinished_headers_are_cut_off(served: Served) -> None:
    """Finding 3: a 50 MB header on /livez got a 200; 8 connections each holding an
    unfinished 40 MB header grew the worker by 330 MB."""
    sent, status = _send_header_until_refused(served, "/livez", 50 << 20)
    assert status == 431
    assert sent < 50 << 20  # refused long before the end
    for _ in range(8):
        sent, status = _send_header_until_refused(served, "/predict", 40 << 20)
        assert status == 431 and sent < 40 << 20


def test_headers_that_never_finish_are_closed_after_the_header_timeout(served: Served) -> None:
    conn = _connect(served)
    try:
        conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert _status_of(conn) == 408
    finally:
        conn.close()


# -- 4. WebSocket paths reached /metrics and disk ----------------------------------------------


def _prometheus_files(served: Served) -> list[Path]:
    found: set[Path] = set()
    for process in [psutil.Process(served.pid), *psutil.Process(served.pid).children(True)]:
        try:
            directory = process.environ().get("PROMETHEUS_MULTIPROC_DIR")
        except psutil.Error:
            continue
        if directory:
            found.update(Path(directory).glob("*.db"))
    return sorted(found)


def test_websocket_paths_reach_no_metric_and_no_file(served: Served) -> None:
    """Finding 4: a handshake to /ws/MRN-CANARY-778899 put the canary into /metrics and the
    Prometheus files; 2,000 such paths grew /metrics tenfold."""
    before = len(httpx.get(f"{served.url}/metrics", timeout=WAIT_S).text)
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as client:
        for i in range(200):
            answer = client.get(f"/ws/MRN-CANARY-{778899 + i}", headers=handshake)
            assert answer.status_code == 400
            assert "CANARY" not in answer.text
    metrics = httpx.get(f"{served.url}/metrics", timeout=WAIT_S).text
    assert "CANARY" not in metrics
    assert len(metrics) < before + 2_000  # at most a refusal counter, not a series per path
    files = _prometheus_files(served)
    assert files
    assert not [f for f in files if b"CANARY" in f.read_bytes()]


# -- 5. the card --------------------------------------------------------------------------------


def test_the_model_card_is_served_with_a_strict_policy(served: Served) -> None:
    """Finding 5: a <script> put in the stored model_card.html was served as text/html
    with no Content-Security-Policy."""
    card = httpx.get(f"{served.url}/model/card", headers=served.headers(), timeout=WAIT_S)
    assert card.status_code == 200
    policy = card.headers["content-security-policy"]
    assert policy.startswith("default-src 'none'") and "script-src" not in policy
    assert card.headers["x-content-type-options"] == "nosniff"


# -- 6 and 9. refusals logged and audited; every endpoint audited -------------------------------


def _audited(served: Served, endpoint: str, outcome: int) -> int:
    return sum(
        record.get("count", 1)
        for record in served.audit_records()
        if record["endpoint"] == endpoint and record["outcome"] == outcome
    )


def test_refused_requests_are_logged_and_audited_in_aggregate(served: Served) -> None:
    """Finding 6: 3,900 refused requests left no line in the service log, though
    docs/security.md said refusals are logged."""
    before = _audited(served, "/predict", 401)
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as client:
        for i in range(300):
            assert client.post("/predict", headers={"X-API-Key": f"wrong-{i}"}).status_code == 401
    wait_for(
        lambda: _audited(served, "/predict", 401) >= before + 300,
        "300 refusals in the audit trail",
        WAIT_S,
    )
    assert _audited(served, "/predict", 401) == before + 300
    lines = re.findall(r"refused (\d+) request\(s\) to /predict with 401", served.log())
    assert lines and sum(map(int, lines)) >= 300
    assert len(lines) < 100  # aggregated: a few lines, not one per request
    assert "wrong-" not in served.log()  # nothing the caller sent


def test_every_endpoint_is_audited(served: Served, record: dict) -> None:
    """Finding 9: GET /model, /model/card, /admin/reload, invalid /explain bodies and
    401/403 refusals were answered without an audit record."""
    wanted = {
        ("/model", 200): lambda c: c.get("/model", headers=served.headers()),
        ("/model/card", 200): lambda c: c.get("/model/card", headers=served.headers()),
        ("/admin/reload", 503): lambda c: c.post("/admin/reload", headers=served.headers("dev")),
        ("/explain", 422): lambda c: c.post(
            "/explain", json={"records": [{"nope": 1}]}, headers=served.headers("analyst")
        ),
        ("/explain", 403): lambda c: c.post("/explain", json={}, headers=served.headers("app")),
        ("other", 404): lambda c: c.get("/no-such-path", headers=served.headers("dev")),
    }
    before = {kind: _audited(served, *kind) for kind in wanted}
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as client:
        for (_, outcome), call in wanted.items():
            assert call(client).status_code == outcome
    for kind in wanted:
        wait_for(
            lambda kind=kind: _audited(served, *kind) == before[kind] + 1,
            f"one audit record of {kind}",
            WAIT_S,
        )


# -- 7. the API docs page -------------------------------------------------------------------------


def test_the_api_docs_page_loads_nothing_from_another_origin(served: Served) -> None:
    """Finding 7: the API docs page loaded Google Tag Manager."""
    page = httpx.get(f"{served.url}/", timeout=WAIT_S)
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert "googletagmanager" not in page.text and not re.search(r"https?://", page.text)
    references = re.findall(r'(?:src|href)="(docs/assets/[^"]+)"', page.text)
    assert references
    for reference in references:
        asset = httpx.get(f"{served.url}/{reference}", timeout=WAIT_S)
        assert asset.status_code == 200 and b"googletagmanager" not in asset.content
    static = httpx.get(f"{served.url}/static_content/swagger-initializer.js", timeout=WAIT_S)
    assert static.status_code == 404


# -- 8. one explain key slowed everyone -----------------------------------------------------------


def test_explain_is_bounded(served: Served, records) -> None:
    """Finding 8: two clients sending /explain with 1,000 records raised a one-record
    /predict's p95 from 10 ms to 1,637 ms."""
    from clinml.settings import Settings

    limit = Settings().max_explain_records
    record = records.head(1).to_dict("records")[0]
    rows = records.head(20).to_dict("records")

    def explain(body: dict) -> httpx.Response:
        return httpx.post(
            f"{served.url}/explain", json=body, headers=served.headers("analyst"), timeout=WAIT_S
        )

    answer = explain({"records": [record] * 1000, "top_k": 5})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "records"]
    schema = httpx.get(f"{served.url}/docs.json", timeout=WAIT_S).json()
    request = schema["components"]["schemas"]["ExplainRequest"]["properties"]["records"]
    assert request["maxItems"] == limit  # the limit is in the schema clients read
    small = explain({"records": rows[:10], "top_k": 5})
    assert small.status_code == 200
    # the largest call allowed is explained in chunks (other requests run in between),
    # and gives what the records give in one call, in order
    largest = explain({"records": (rows * limit)[:limit], "top_k": 5})
    assert largest.status_code == 200
    explained = largest.json()["explanations"]
    assert len(explained) == limit
    for whole, alone in zip(explained[:10], small.json()["explanations"], strict=True):
        assert whole["label"] == alone["label"] and whole["risk_band"] == alone["risk_band"]
        assert whole["probability"] == pytest.approx(alone["probability"], rel=1e-9)
        assert [c["feature"] for c in whole["contributions"]] == [
            c["feature"] for c in alone["contributions"]
        ]


# -- 2. the audit trail's tail cut on the running service (last: it breaks the trail) --------------


def test_a_tail_cut_from_the_running_trail_is_detected(served: Served, record: dict) -> None:
    """Finding 2: 10 lines cut from the running service's trail under its lock went
    unnoticed by `clinml audit verify`."""
    import fcntl

    env = {"CLINML_HOME": str(served.home), **served.env}
    assert _predicts(served, record, 30) == [200] * 30
    trail = Settings(home=served.home).paths.request_audit_log
    # a checkpoint that covers those records (written at most a second after them)
    wait_for(
        lambda: _checkpointed(served) >= len(served.audit_records()) - 5,
        "a checkpoint covering the records",
        WAIT_S,
    )
    intact = clinml(served.home, "audit", "verify", env=env)
    assert intact.returncode == 0, intact.stdout + intact.stderr

    with open(trail.with_name(trail.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lines = trail.read_bytes().splitlines(keepends=True)
        trail.write_bytes(b"".join(lines[:-10]))
    cut = clinml(served.home, "audit", "verify", env=env)
    assert cut.returncode == 1, cut.stdout + cut.stderr
    assert "requests" in cut.stdout + cut.stderr


def _checkpointed(served: Served) -> int:
    """The highest record count any checkpoint of the request trail vouches for."""
    counts = [0]
    for path in served.checkpoints.rglob("*"):
        if path.is_file():
            try:
                counts += [int(n) for n in re.findall(rb'"records":\s*(\d+)', path.read_bytes())]
            except OSError:
                continue
    return max(counts)
