"""serving/httpguard.py against a real uvicorn server on loopback: header size, count and
time limits, and no protocol upgrades (issue 19, findings 3 and 4).

Each test speaks raw HTTP over a socket, as an attacker would. Waits are for the
server's answer, with a generous socket timeout; nothing asserts on elapsed time.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import uvicorn

from clinml.serving import refusals
from clinml.serving.httpguard import GuardedHttpToolsProtocol
from tests.waiting import wait_for

MAX_HEADER_BYTES = 4_096
HEADER_TIMEOUT_S = 0.5
WAIT_S = 60.0  # for an answer: a busy machine may be slow, never this slow


class App:
    """Records the scopes it is called with; answers 200 with the body's length."""

    def __init__(self) -> None:
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.scopes.append(scope)
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = str(size).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, App]]:
    GuardedHttpToolsProtocol.max_header_bytes = MAX_HEADER_BYTES
    GuardedHttpToolsProtocol.max_headers = 20
    GuardedHttpToolsProtocol.header_timeout_s = HEADER_TIMEOUT_S
    app = App()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol, log_level="warning"
    )
    served = uvicorn.Server(config)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    wait_for(lambda: served.started, "the test server to start", WAIT_S)
    yield port, app
    served.should_exit = True
    thread.join(WAIT_S)


@pytest.fixture(autouse=True)
def recorder(monkeypatch) -> refusals.Recorder:
    fresh = refusals.Recorder()
    monkeypatch.setattr(refusals, "RECORDER", fresh)
    return fresh


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    return conn


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_an_oversized_header_is_431_before_it_is_all_read(server) -> None:
    """Issue 19: a 50 MB header on /livez was answered 200; unfinished 40 MB headers
    grew the worker by hundreds of MB."""
    port, app = server
    before = len(app.scopes)
    with _connect(port) as conn:
        conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 4_000_000:  # the server must answer long before this is sent
                conn.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server: the refusal was sent first
        response = _read_all(conn)
    assert _status(response) == 431
    assert sent < 4_000_000
    assert len(app.scopes) == before  # never reached the app


def test_a_complete_header_over_the_limit_is_431(server) -> None:
    port, _ = server
    with _connect(port) as conn:
        conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert _status(_read_all(conn)) == 431


def test_too_many_header_fields_is_431(server) -> None:
    port, _ = server
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(25))
    with _connect(port) as conn:
        conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert _status(_read_all(conn)) == 431


def test_headers_that_trickle_in_are_cut_off_with_408(server, recorder) -> None:
    port, app = server
    before = len(app.scopes)
    with _connect(port) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        response = _read_all(conn)
    assert _status(response) == 408
    assert len(app.scopes) == before
    assert recorder.recorded == 1


def test_a_connection_that_sends_nothing_is_closed(server) -> None:
    port, _ = server
    with _connect(port) as conn:
        assert _read_all(conn) == b""  # closed by the server, not by the socket timeout


def test_a_websocket_handshake_is_refused_before_the_app_sees_its_path(server) -> None:
    """Issue 19: a handshake to /ws/MRN-CANARY-778899 put the text into /metrics."""
    port, app = server
    handshake = (
        b"GET /ws/MRN-CANARY-778899 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with _connect(port) as conn:
        conn.sendall(handshake)
        response = _read_all(conn)
    assert _status(response) == 400
    assert b"CANARY" not in response
    assert all("CANARY" not in scope.get("path", "") for scope in app.scopes)


def test_a_large_body_sent_with_its_headers_is_not_mistaken_for_headers(server) -> None:
    port, _ = server
    body = b"x" * 300_000
    request = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with _connect(port) as conn:
        conn.sendall(request + body)
        head = conn.recv(65536)
    assert _status(head) == 200
    assert head.endswith(b"300000")


def test_kept_alive_connections_get_the_limits_on_every_request(server) -> None:
    port, _ = server
    with _connect(port) as conn:
        for _ in range(3):
            conn.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(conn.recv(65536)) == 200
        conn.sendall(b"GET /livez HTTP/1.1\r\n")  # the next one trickles
        assert _status(_read_all(conn)) == 408
