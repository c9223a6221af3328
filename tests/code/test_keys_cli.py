"""``clinml keys create|list|revoke`` on a temporary data directory, and the running
service's view of the keys file (``LiveKeyStore``): created keys start working and revoked
ones stop without a restart, a broken file keeps the last good keys, and no keys at all
means not ready, said once."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from typer.testing import CliRunner

from clinml.errors import ClinmlError
from clinml.pipelines.keys_cli import keys_app
from clinml.serving.auth import AuthMiddleware
from clinml.serving.keys import (
    KEYS_RECHECK_S,
    AuthConfigError,
    KeyStore,
    LiveKeyStore,
    add_key,
    generate_key,
    hash_secret,
    revoke_key,
    write_dev_key,
)
from clinml.serving.readiness import ReadinessLog


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLINML_HOME", str(tmp_path / "home"))
    for name in ("CLINML_API_KEYS", "CLINML_API_KEYS_FILE", "CLINML_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture
def keys_file(home: Path) -> Path:
    return home / "secrets" / "api_keys.json"


def keys(*args: str):
    return CliRunner().invoke(keys_app, list(args))


def stored(path: Path) -> list[dict]:
    return json.loads(path.read_text())["keys"]


def refused(result, *words: str) -> str:
    """The one-line ClinmlError a command raised (``clinml`` prints it and exits 2)."""
    assert result.exit_code != 0
    assert isinstance(result.exception, ClinmlError), result.output
    message = str(result.exception)
    assert "\n" not in message
    for word in words:
        assert word in message
    return message


# -- clinml keys create ----------------------------------------------------------------------


def test_create_prints_the_secret_once_and_stores_only_its_hash(keys_file: Path) -> None:
    result = keys("create", "--id", "ward-app")
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert secret.startswith("clinml_") and result.stdout == secret + "\n"
    assert secret not in result.stderr  # stdout only: `KEY=$(clinml keys create ...)`
    assert "Authorization: Bearer" in result.stderr and len(result.stderr.splitlines()) == 1
    [entry] = stored(keys_file)
    assert entry["id"] == "ward-app" and entry["roles"] == ["predict"]  # the default role
    assert entry["sha256"] == hash_secret(secret)
    assert secret not in keys_file.read_text()
    assert set(entry) == {"id", "sha256", "roles", "created"}
    assert KeyStore.from_file(keys_file).authenticate(secret).key_id == "ward-app"


def test_the_keys_file_is_readable_by_its_owner_only(keys_file: Path) -> None:
    assert keys("create", "--id", "app").exit_code == 0
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_file.parent.stat().st_mode) == 0o700
    # rewritten atomically: no temporary file left beside it
    assert [p.name for p in keys_file.parent.iterdir()] == ["api_keys.json"]


def test_create_keeps_the_keys_already_there(keys_file: Path) -> None:
    dev = write_dev_key(keys_file)  # `make demo`'s key, written before
    first = keys("create", "--id", "triage", "--role", "predict", "--role", "explain").stdout
    second = keys("create", "--id", "monitor", "--role", "admin").stdout
    store = KeyStore.from_file(keys_file)
    assert store.key_ids == ["dev", "triage", "monitor"]
    assert store.authenticate(dev).key_id == "dev"
    assert store.authenticate(first.strip()).roles == {"predict", "explain"}
    assert store.authenticate(second.strip()).roles == {"admin"}
    assert write_dev_key(keys_file) == dev  # the demo still finds its key


def test_the_demo_key_is_added_beside_keys_created_before(keys_file: Path) -> None:
    mine = keys("create", "--id", "my-app").stdout.strip()
    dev = write_dev_key(keys_file)  # `make demo` after `clinml keys create`
    store = KeyStore.from_file(keys_file)
    assert store.key_ids == ["my-app", "dev"]
    assert store.authenticate(mine).key_id == "my-app"
    assert store.authenticate(dev).key_id == "dev"


def test_a_duplicate_id_is_refused_and_the_file_left_as_it_was(keys_file: Path) -> None:
    assert keys("create", "--id", "app").exit_code == 0
    before = keys_file.read_bytes()
    refused(keys("create", "--id", "app", "--role", "admin"), "'app' exists already", "revoke")
    assert keys_file.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--id", "app", "--role", "superuser"], ["unknown role(s) superuser", "predict"]),
        (["--id", "two words"], ["invalid key id"]),
        (["--id", "evil\nline"], ["invalid key id"]),
        (["--id", ""], ["invalid key id"]),
    ],
)
def test_an_invalid_id_or_role_is_refused(keys_file: Path, args: list[str], words) -> None:
    refused(keys("create", *args), *words)
    assert not keys_file.exists()


# -- clinml keys list ------------------------------------------------------------------------


def test_list_shows_ids_roles_and_times_never_hashes_or_secrets(keys_file: Path) -> None:
    secret = keys("create", "--id", "ward-app", "--role", "predict", "--role", "explain").stdout
    write_dev_key(keys_file.with_name("other.json"))  # another file: not listed
    result = keys("list")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["ID", "ROLES", "CREATED", "SOURCE"]
    assert row.split()[:2] == ["ward-app", "predict,explain"]
    assert row.split()[2] == stored(keys_file)[0]["created"]
    assert secret.strip() not in result.output
    assert stored(keys_file)[0]["sha256"] not in result.output


def test_list_without_keys_says_how_to_make_one(home: Path) -> None:
    result = keys("list")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "clinml keys create --id" in result.stderr


# -- clinml keys revoke ----------------------------------------------------------------------


def test_revoke_removes_the_key_and_keeps_the_others(keys_file: Path) -> None:
    gone = keys("create", "--id", "old-app").stdout.strip()
    kept = keys("create", "--id", "new-app").stdout.strip()
    result = keys("revoke", "old-app")
    assert result.exit_code == 0, result.output
    store = KeyStore.from_file(keys_file)
    assert store.key_ids == ["new-app"]
    assert store.authenticate(gone) is None
    assert store.authenticate(kept).key_id == "new-app"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


def test_revoking_an_unknown_id_is_refused(keys_file: Path) -> None:
    refused(keys("revoke", "nobody"), "no key with id 'nobody'", "clinml keys list")
    assert keys("create", "--id", "app").exit_code == 0
    before = keys_file.read_bytes()
    refused(keys("revoke", "nobody"), "no key with id 'nobody'")
    assert keys_file.read_bytes() == before


# -- keys from CLINML_API_KEYS ---------------------------------------------------------------


@pytest.fixture
def env_key(home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    secret, entry = generate_key("from-env", ["predict"])
    monkeypatch.setenv("CLINML_API_KEYS", json.dumps({"keys": [entry]}))
    return secret


def test_keys_from_the_environment_are_listed_as_read_only(env_key: str) -> None:
    assert keys("create", "--id", "app").exit_code == 0
    rows = keys("list").stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["app", "from-env"]
    assert "CLINML_API_KEYS (read-only)" in rows[1]
    assert hash_secret(env_key) not in "".join(rows)


def test_keys_from_the_environment_cannot_be_revoked_or_shadowed(
    env_key: str, keys_file: Path
) -> None:
    message = refused(keys("revoke", "from-env"), "CLINML_API_KEYS", "cannot edit")
    assert "restart" in message
    refused(keys("create", "--id", "from-env"), "CLINML_API_KEYS", "cannot edit")
    assert not keys_file.exists()


def test_an_invalid_keys_file_is_named_and_left_alone(keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text('{"keys": [{"id": "x"}]}')
    refused(keys("create", "--id", "app"), str(keys_file), "missing field")
    refused(keys("list"), str(keys_file))
    assert keys_file.read_text() == '{"keys": [{"id": "x"}]}'


# -- a running service's keys (LiveKeyStore) -------------------------------------------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += KEYS_RECHECK_S


def test_a_key_created_while_the_service_runs_starts_working(keys_file: Path) -> None:
    old, _ = add_key(keys_file, "old-app", ["predict"])
    clock = Clock()
    live = LiveKeyStore(keys_file, clock=clock)
    new, _ = add_key(keys_file, "new-app", ["predict"])
    assert live.authenticate(new) is None  # not looked at again before the recheck is due
    clock.tick()
    assert live.authenticate(new).key_id == "new-app"
    assert live.authenticate(old).key_id == "old-app"


def test_a_revoked_key_stops_working_while_the_service_runs(keys_file: Path) -> None:
    secret, _ = add_key(keys_file, "app", ["predict"])
    kept, _ = add_key(keys_file, "other", ["predict"])
    clock = Clock()
    live = LiveKeyStore(keys_file, clock=clock)
    assert live.authenticate(secret).key_id == "app"
    revoke_key(keys_file, "app")
    clock.tick()
    assert live.authenticate(secret) is None
    assert live.authenticate(kept).key_id == "other"


def test_the_request_path_does_not_stat_the_file_between_rechecks(
    keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret, _ = add_key(keys_file, "app", ["predict"])
    clock = Clock()
    live = LiveKeyStore(keys_file, clock=clock)
    calls: list[object] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a) or real_stat(*a, **k))
    for _ in range(1000):
        assert live.authenticate(secret) is not None
    assert calls == []
    clock.tick()
    for _ in range(1000):
        live.authenticate(secret)
    assert len(calls) == 1  # one look per recheck interval, whatever the traffic


def test_a_file_broken_during_a_reload_keeps_the_last_good_keys(
    keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret, entry = add_key(keys_file, "app", ["predict"])
    clock = Clock()
    live = LiveKeyStore(keys_file, clock=clock)
    # a half-edited file: a secret pasted where its hash belongs
    keys_file.write_text(json.dumps({"keys": [{**entry, "sha256": secret}]}))
    with caplog.at_level(logging.INFO, logger="bentoml.clinml.auth"):
        for _ in range(3):
            clock.tick()
            assert live.authenticate(secret).key_id == "app"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, caplog.text  # once, not at every check
    assert str(keys_file) in errors[0].getMessage()
    assert secret not in caplog.text and entry["sha256"] not in caplog.text
    # fixed: the file's keys are used again
    keys_file.write_text(json.dumps({"keys": []}))
    clock.tick()
    assert live.authenticate(secret) is None


def test_an_invalid_file_at_start_is_an_error_and_a_missing_one_holds_no_keys(
    keys_file: Path,
) -> None:
    live = LiveKeyStore(keys_file)
    assert len(live) == 0
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("{not json")
    with pytest.raises(AuthConfigError, match="not valid JSON"):
        LiveKeyStore(keys_file)


def test_no_keys_is_not_ready_said_once_until_a_key_exists(
    keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    live = LiveKeyStore(keys_file, clock=clock)
    readiness = ReadinessLog()  # the service's readiness log, which says every reason
    with caplog.at_level(logging.WARNING, logger="bentoml.clinml"):
        for _ in range(5):  # readiness probes
            assert live.ready() is False
            assert readiness.report(live.not_ready_reason()) is False
            clock.tick()
    [line] = caplog.records
    assert "not ready: no API keys" in line.getMessage()
    assert "clinml keys create --id" in line.getMessage()
    assert str(keys_file) in line.getMessage()
    add_key(keys_file, "app", ["predict"])
    clock.tick()
    assert live.ready() is True
    assert readiness.report(live.not_ready_reason()) is True


def test_keys_from_the_environment_alone_are_ready(keys_file: Path) -> None:
    _, entry = generate_key("from-env", ["predict"])
    live = LiveKeyStore(keys_file, json.dumps({"keys": [entry]}))
    assert live.ready() is True


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"key_id": request.state.clinml_key_id})


def test_the_middleware_follows_the_keys_file(keys_file: Path) -> None:
    """create -> 200, revoke -> 401, through AuthMiddleware as the service wires it."""
    clock = Clock()
    live = LiveKeyStore(keys_file, clock=clock)
    app = AuthMiddleware(Starlette(routes=[Route("/predict", _ok)]), live)
    client = TestClient(app)
    secret, _ = add_key(keys_file, "app", ["predict"])
    headers = {"Authorization": f"Bearer {secret}"}
    clock.tick()
    answer = client.get("/predict", headers=headers)
    assert answer.status_code == 200 and answer.json() == {"key_id": "app"}
    revoke_key(keys_file, "app")
    clock.tick()
    assert client.get("/predict", headers=headers).status_code == 401
