"""API keys with roles and the ASGI middleware: the whole path x role matrix, both header
styles, exempt paths, constant-work key lookup, config errors, the development key, body
limits, and secrets kept out of responses and logs."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import stat
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from clinml.errors import ClinmlError
from clinml.serving import refusals
from clinml.serving.auth import AuthMiddleware, BodyLimitMiddleware, JsonOnlyMiddleware
from clinml.serving.keys import (
    ROLES,
    ApiKey,
    AuthConfigError,
    KeyStore,
    generate_key,
    hash_secret,
    write_dev_key,
)
from clinml.serving.routes import rules

DEFAULT_RULES = rules()  # the route table's roles, what AuthMiddleware uses by default

PROTECTED = {**DEFAULT_RULES, "/unlisted": "admin"}  # a path no rule names needs admin
EXEMPT = ["/livez", "/readyz", "/healthz", "/", "/docs.json", "/docs", "/openapi.json"]


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    key_id = getattr(request.state, "clinml_key_id", None)
    return JSONResponse({"path": request.url.path, "key_id": key_id, "body_bytes": len(body)})


async def _ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def _inner_app() -> Starlette:
    paths = [*PROTECTED, *EXEMPT, "/metrics", "/static_content/app.js", "/static_content/x"]
    routes = [Route(path, _echo, methods=["GET", "POST"]) for path in paths]
    return Starlette(routes=[*routes, WebSocketRoute("/ws", _ws)])


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    """One secret per single role, plus one key holding every role."""
    return {role: generate_key(f"{role}-app", [role])[0] for role in ROLES}


@pytest.fixture(scope="module")
def keystore(keys: dict[str, str]) -> KeyStore:
    entries = [
        {"id": f"{role}-app", "sha256": hash_secret(secret), "roles": [role]}
        for role, secret in keys.items()
    ]
    return KeyStore(entries)


def _client(keystore: KeyStore, **options) -> TestClient:
    return TestClient(AuthMiddleware(_inner_app(), keystore, DEFAULT_RULES, **options))


# -- keys ------------------------------------------------------------------------------------


def test_generate_key_returns_a_prefixed_secret_and_stores_only_its_hash() -> None:
    secret, entry = generate_key("triage-app", ["predict", "explain"])
    assert secret.startswith("clinml_") and len(secret) == len("clinml_") + 32
    assert set(secret[len("clinml_") :]) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert entry == {
        "id": "triage-app",
        "sha256": hash_secret(secret),
        "roles": ["predict", "explain"],
    }
    assert secret not in json.dumps(entry)
    assert generate_key("triage-app", ["predict"])[0] != secret  # random each time
    key = KeyStore([entry]).authenticate(secret)
    assert key == ApiKey("triage-app", frozenset({"predict", "explain"}))
    with pytest.raises(AuthConfigError, match=r"unknown role\(s\) superuser"):
        generate_key("x", ["superuser"])


def test_admin_implies_no_other_role(keys: dict[str, str], keystore: KeyStore) -> None:
    key = keystore.authenticate(keys["admin"])
    assert key is not None and key.roles == frozenset({"admin"})
    with _client(keystore) as client:
        headers = {"X-API-Key": keys["admin"]}
        assert client.post("/predict", headers=headers).status_code == 403
        assert client.post("/admin/reload", headers=headers).status_code == 200


def test_authenticate_compares_with_every_key_whether_or_not_one_matches(
    keys: dict[str, str], keystore: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, expected in [
        (keys["predict"], "predict-app"),  # the first stored key matches
        (keys["admin"], "admin-app"),  # the last stored key matches
        ("clinml_not-a-key", None),
    ]:
        calls.clear()
        key = keystore.authenticate(presented)
        assert (key.key_id if key else None) == expected
        assert len(calls) == len(keystore) == 3
        # Every comparison is between digests of one length, never the raw secret.
        assert all(len(a) == len(b) == 64 and presented.encode() not in (a, b) for a, b in calls)


# -- the role matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("path", sorted(PROTECTED))
def test_each_role_reaches_exactly_its_paths(
    keys: dict[str, str], keystore: KeyStore, role: str, path: str
) -> None:
    with _client(keystore) as client:
        response = client.post(path, headers={"Authorization": f"Bearer {keys[role]}"})
    if PROTECTED[path] == role:
        assert response.status_code == 200
        assert response.json() == {"path": path, "key_id": f"{role}-app", "body_bytes": 0}
    else:
        assert response.status_code == 403
        assert response.json() == {
            "detail": f"API key '{role}-app' lacks the '{PROTECTED[path]}' role"
        }


@pytest.mark.parametrize(
    "headers",
    [
        lambda s: {"Authorization": f"Bearer {s}"},
        lambda s: {"Authorization": f"bearer   {s}  "},
        lambda s: {"X-API-Key": s},
        lambda s: {"x-api-key": f" {s} "},
        # A non-Bearer Authorization header does not hide a good X-API-Key.
        lambda s: {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": s},
    ],
    ids=["bearer", "bearer-case-space", "x-api-key", "x-api-key-lower", "basic-plus-x-api-key"],
)
def test_both_header_styles_are_accepted(keys: dict[str, str], keystore: KeyStore, headers) -> None:
    with _client(keystore) as client:
        response = client.post("/predict", headers=headers(keys["predict"]))
    assert response.status_code == 200 and response.json()["key_id"] == "predict-app"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer clinml_wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-API-Key": "clinml_wrong"},
        {"X-API-Key": ""},
    ],
    ids=["none", "bad-bearer", "empty-bearer", "basic", "bad-x-api-key", "empty-x-api-key"],
)
@pytest.mark.parametrize("path", sorted(PROTECTED))
def test_a_missing_or_invalid_key_is_401(keystore: KeyStore, headers: dict, path: str) -> None:
    with _client(keystore) as client:
        response = client.post(path, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "missing or invalid API key"}
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_key_whose_secret_differs_by_one_character_is_refused(
    keys: dict[str, str], keystore: KeyStore
) -> None:
    secret = keys["predict"]
    near = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    with _client(keystore) as client:
        assert client.post("/predict", headers={"X-API-Key": near}).status_code == 401


@pytest.mark.parametrize("path", [*EXEMPT, "/metrics", "/static_content/app.js"])
def test_exempt_paths_need_no_key(keystore: KeyStore, path: str) -> None:
    with _client(keystore) as client:
        response = client.get(path)
    assert response.status_code == 200
    assert response.json()["key_id"] is None


def test_exempt_prefixes_do_not_cover_dot_segments_or_look_alike_paths(keystore: KeyStore) -> None:
    auth = AuthMiddleware(_inner_app(), keystore, DEFAULT_RULES)
    assert auth.is_exempt("/static_content/app.js")
    assert not auth.is_exempt("/static_content/../predict")
    assert not auth.is_exempt("/static_contentX")
    assert not auth.is_exempt("/livez/")
    assert not auth.is_exempt("/predict")
    assert auth.required_role("/predict/") == "admin"  # not the rule's path: closed


def test_metrics_can_be_protected(keys: dict[str, str], keystore: KeyStore) -> None:
    with _client(keystore, protect_metrics=True) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": keys["predict"]}).status_code == 403
        response = client.get("/metrics", headers={"X-API-Key": keys["admin"]})
        assert response.status_code == 200 and response.json()["key_id"] == "admin-app"
        assert client.get("/livez").status_code == 200  # the probes stay open
    rules = {**DEFAULT_RULES, "/metrics": "predict"}
    app = AuthMiddleware(_inner_app(), keystore, rules, protect_metrics=True)
    with TestClient(app) as client:
        assert client.get("/metrics", headers={"X-API-Key": keys["predict"]}).status_code == 200


def test_custom_exempt_list_replaces_the_default(keystore: KeyStore) -> None:
    app = AuthMiddleware(_inner_app(), keystore, DEFAULT_RULES, exempt=["/livez"])
    with TestClient(app) as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/docs").status_code == 401
        assert client.get("/metrics").status_code == 401


def test_scope_state_is_created_when_absent(keys: dict[str, str], keystore: KeyStore) -> None:
    seen: dict = {}

    async def app(scope, receive, send) -> None:
        seen.update(scope["state"])
        await PlainTextResponse("ok")(scope, receive, send)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/model",
        "headers": [(b"x-api-key", keys["predict"].encode())],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(AuthMiddleware(app, keystore, DEFAULT_RULES)(scope, receive, send))
    assert seen == {"clinml_key_id": "predict-app"}
    assert sent[0]["status"] == 200


def test_websockets_need_a_key_too(keys: dict[str, str], keystore: KeyStore) -> None:
    with _client(keystore) as client:
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws"):
            pass
        with client.websocket_connect("/ws", headers={"X-API-Key": keys["admin"]}) as ws:
            assert ws.receive_text() == "hello"


def test_rules_naming_an_unknown_role_are_refused(keystore: KeyStore) -> None:
    with pytest.raises(AuthConfigError, match=r"unknown role\(s\) root"):
        AuthMiddleware(_inner_app(), keystore, {"/predict": "root"})


# -- configuration ---------------------------------------------------------------------------


def _entry(key_id: str = "app", roles: list | None = None) -> dict:
    return generate_key(key_id, roles or ["predict"])[1]


def test_keys_load_from_yaml_json_and_the_environment(tmp_path: Path) -> None:
    import yaml

    s1, e1 = generate_key("from-yaml", ["predict"])
    s2, e2 = generate_key("from-json", ["explain"])
    s3, e3 = generate_key("from-env", ["admin", "predict"])
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [e1]}))
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [e2]}))

    assert KeyStore.from_file(tmp_path / "keys.yaml").key_ids == ["from-yaml"]
    assert KeyStore.from_file(tmp_path / "keys.json").key_ids == ["from-json"]
    store = KeyStore.load(tmp_path / "keys.yaml", json.dumps({"keys": [e3]}))
    assert store.key_ids == ["from-yaml", "from-env"]
    assert store.authenticate(s1).key_id == "from-yaml"
    assert store.authenticate(s3).roles == frozenset({"admin", "predict"})
    assert store.authenticate(s2) is None
    assert len(KeyStore.load(None, None)) == 0
    assert KeyStore.load(tmp_path / "keys.json", "  ").key_ids == ["from-json"]
    assert s1 not in repr(store) and e1["sha256"] not in repr(store)


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"keys": [{"id": "a", "sha256": "0" * 64, "roles": ["root"]}]}, r"entry 0 .*unknown role"),
        ({"keys": [_entry("a"), {"id": "b", "sha256": "abc", "roles": ["predict"]}]}, r"entry 1 "),
        ({"keys": [{"id": "b", "sha256": "A" * 64, "roles": ["predict"]}]}, r"entry 0 .*sha256"),
        ({"keys": [_entry("a"), _entry("a")]}, r"entry 1: duplicate key id 'a'"),
        ({"keys": [{"id": "a", "sha256": "0" * 64, "roles": []}]}, r"entry 0 .*non-empty list"),
        ({"keys": [{"id": "", "sha256": "0" * 64, "roles": ["admin"]}]}, r"entry 0: id must"),
        ({"keys": [{"id": "a", "roles": ["admin"]}]}, r"entry 0: missing field\(s\) sha256"),
        ({"keys": ["a"]}, r"entry 0: must be a mapping"),
        ({"keys": {"a": 1}}, r'"keys" must be a list'),
        ({"api_keys": []}, r'one field, "keys"'),
        ([], r'one field, "keys"'),
    ],
)
def test_invalid_key_files_name_the_file_and_the_entry(
    tmp_path: Path, document: object, match: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    with pytest.raises(AuthConfigError, match=match) as caught:
        KeyStore.from_file(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ClinmlError)


def test_a_secret_put_in_the_file_by_mistake_is_refused_without_echoing_it(
    tmp_path: Path,
) -> None:
    secret, entry = generate_key("app", ["predict"])
    path = tmp_path / "keys.yaml"
    path.write_text(json.dumps({"keys": [{**entry, "secret": secret}]}))
    with pytest.raises(AuthConfigError, match=r"entry 0: unknown field\(s\) secret") as caught:
        KeyStore.from_file(path)
    assert secret not in str(caught.value)


def test_unreadable_or_unparsable_sources_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match=r"cannot read API keys file .*missing\.yaml"):
        KeyStore.from_file(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "keys.yaml"
    bad_yaml.write_text("keys: [clinml_secret_value\n  - : :")
    with pytest.raises(AuthConfigError, match=r"keys\.yaml is not valid YAML") as caught:
        KeyStore.from_file(bad_yaml)
    assert "clinml_secret_value" not in str(caught.value)
    bad_json = tmp_path / "keys.json"
    bad_json.write_text('{"keys": [clinml_secret_value')
    with pytest.raises(AuthConfigError, match=r"keys\.json is not valid JSON") as caught:
        KeyStore.from_file(bad_json)
    assert "clinml_secret_value" not in str(caught.value)
    with pytest.raises(AuthConfigError, match=r"CLINML_API_KEYS is not valid JSON") as caught:
        KeyStore.from_env("clinml_secret_value")
    assert "clinml_secret_value" not in str(caught.value)
    with pytest.raises(AuthConfigError, match=r"CLINML_API_KEYS entry 0 .*unknown role"):
        KeyStore.from_env(json.dumps({"keys": [{"id": "a", "sha256": "0" * 64, "roles": ["x"]}]}))


def test_the_same_id_in_the_file_and_the_environment_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [_entry("shared")]}))
    env = json.dumps({"keys": [_entry("shared", ["admin"])]})
    with pytest.raises(AuthConfigError, match=r"'shared' is defined in both .*keys\.json"):
        KeyStore.load(path, env)


def test_write_dev_key_is_idempotent_and_private(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "api_keys.json"
    secret = write_dev_key(path)
    secret_path = path.with_suffix(".secret")
    assert secret.startswith("clinml_")
    for file in (path, secret_path):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert secret not in path.read_text()
    key = KeyStore.from_file(path).authenticate(secret)
    assert key == ApiKey("dev", frozenset(ROLES))

    before = (path.read_bytes(), secret_path.read_bytes())
    assert write_dev_key(path) == secret
    assert (path.read_bytes(), secret_path.read_bytes()) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["api_keys.json", "api_keys.secret"]

    secret_path.write_text("clinml_tampered\n")
    with pytest.raises(AuthConfigError, match=r"does not match the 'dev' key"):
        write_dev_key(path)
    secret_path.unlink()
    with pytest.raises(AuthConfigError, match=r"cannot be read"):
        write_dev_key(path)


# -- body limits -----------------------------------------------------------------------------


def _limited_client(max_bytes: int) -> TestClient:
    return TestClient(BodyLimitMiddleware(_inner_app(), max_bytes))


def test_bodies_up_to_the_limit_reach_the_app_whole() -> None:
    with _limited_client(100) as client:
        assert client.post("/predict", content=b"x" * 100).json()["body_bytes"] == 100
        chunked = client.post("/predict", content=(b"x" * 25 for _ in range(4)))
        assert chunked.json()["body_bytes"] == 100
        assert client.get("/livez").status_code == 200


def test_a_content_length_over_the_limit_is_413() -> None:
    with _limited_client(100) as client:
        response = client.post("/predict", content=b"x" * 101)
    assert response.status_code == 413
    assert response.json() == {"detail": "request body larger than 100 bytes"}


def test_a_chunked_body_over_the_limit_is_413() -> None:
    with _limited_client(100) as client:
        response = client.post("/predict", content=(b"x" * 60 for _ in range(2)))
        assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == {"detail": "request body larger than 100 bytes"}


def _run_asgi(app, headers: list, chunks: list[bytes]) -> tuple[list[dict], int]:
    """Drive ``app`` with a body in ``chunks``; return what it sent and how many chunks
    it read."""
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        read += 1
        return messages[read - 1] if read <= len(messages) else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, read


def test_a_chunked_body_stops_being_read_at_the_limit_and_never_reaches_the_app() -> None:
    called = False

    async def app(scope, receive, send) -> None:
        nonlocal called
        called = True
        await PlainTextResponse("ok")(scope, receive, send)

    limited = BodyLimitMiddleware(app, 100)
    sent, read = _run_asgi(limited, [], [b"x" * 40] * 10)
    assert not called
    assert read == 3  # 40 + 40 + 40 > 100: the rest is never read
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"detail": "request body larger than 100 bytes"}

    # A Content-Length over the limit is answered without reading any of the body.
    sent, read = _run_asgi(limited, [(b"content-length", b"101")], [b"x" * 101])
    assert not called and read == 0 and sent[0]["status"] == 413

    # A Content-Length that understates the body does not get past the limit either.
    sent, _ = _run_asgi(limited, [(b"content-length", b"10")], [b"x" * 60] * 2)
    assert not called and sent[0]["status"] == 413
    sent, _ = _run_asgi(limited, [(b"content-length", b"ten")], [])
    assert not called and sent[0]["status"] == 400

    sent, _ = _run_asgi(limited, [], [b"x" * 50, b"x" * 50])
    assert called and sent[0]["status"] == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "application/python-pickle",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "application/jsonx",
        None,
    ],
)
def test_a_body_that_is_not_declared_json_is_415_before_it_is_read(content_type) -> None:
    called = False

    async def app(scope, receive, send) -> None:
        nonlocal called
        called = True
        await PlainTextResponse("ok")(scope, receive, send)

    guarded = JsonOnlyMiddleware(app)
    headers = [(b"content-length", b"5")]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    sent, read = _run_asgi(guarded, headers, [b"\x80\x04K\x01."])  # a pickle of 1
    assert not called and read == 0
    assert sent[0]["status"] == 415
    assert json.loads(sent[1]["body"]) == {"detail": "the body must be application/json"}


def test_json_bodies_and_requests_without_a_body_pass() -> None:
    with TestClient(JsonOnlyMiddleware(_inner_app())) as client:
        assert client.post("/predict", json={"a": 1}).status_code == 200
        charset = {"content-type": "Application/JSON; charset=utf-8"}
        assert client.post("/predict", content=b"{}", headers=charset).status_code == 200
        assert client.post("/admin/reload").status_code == 200  # no body, no content type
        assert client.get("/livez", headers={"content-type": "text/plain"}).status_code == 200
        chunked = client.post("/predict", content=(b"x" for _ in range(2)))
        assert chunked.status_code == 415  # chunked, undeclared


# -- no secrets in responses or logs ---------------------------------------------------------


def test_no_secret_reaches_a_response_or_a_log_record(
    keys: dict[str, str], keystore: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "clinml_this-is-a-wrong-secret-xyz"
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG), _client(keystore, protect_metrics=True) as client:
        for path in [*PROTECTED, "/metrics", "/livez"]:
            for secret in [*keys.values(), bad]:
                for headers in ({"X-API-Key": secret}, {"Authorization": f"Bearer {secret}"}):
                    response = client.post(path, headers=headers)
                    bodies.append(response.text)
                    bodies.extend(f"{k}: {v}" for k, v in response.headers.items())
        refusals.RECORDER.flush()  # refusals are logged once per window, in aggregate
    logged = "\n".join([record.getMessage() for record in caplog.records] + [caplog.text])
    assert any("lacks the" in record.getMessage() for record in caplog.records)
    assert any("missing or invalid" in record.getMessage() for record in caplog.records)
    for secret in [*keys.values(), bad]:
        assert secret not in logged
        assert all(secret not in body for body in bodies)
        assert hash_secret(secret) not in logged


def test_refusals_are_reported_without_caller_chosen_paths(monkeypatch) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from clinml.serving import refusals
    from clinml.serving.auth import AuthMiddleware
    from clinml.serving.keys import KeyStore, generate_key

    recorder = refusals.Recorder(known_paths={"/predict"})
    monkeypatch.setattr(refusals, "RECORDER", recorder)
    secret, entry = generate_key("app", ["predict"])
    seen: list[tuple[str, int]] = []
    recorder.count = lambda p, s: seen.append((p, s))
    app = Starlette(routes=[Route("/predict", lambda r: PlainTextResponse("ok"), methods=["POST"])])
    guarded = AuthMiddleware(app, KeyStore([entry]), rules={"/predict": "predict"})
    client = TestClient(guarded)
    assert client.post("/predict").status_code == 401
    assert client.post("/explain", headers={"X-API-Key": secret}).status_code == 403
    assert client.post("/patient/MRN-123", headers={"X-API-Key": "bad"}).status_code == 401
    assert client.post("/predict", headers={"X-API-Key": secret}).status_code == 200
    assert seen == [("/predict", 401), ("other", 403), ("other", 401)]
