"""API keys under a real ``bentoml serve``: a service started without any key is not
ready and says why once; keys created and revoked with ``clinml keys`` while it runs take
effect without a restart.

The service gets its own keys file (``CLINML_API_KEYS_FILE``), empty at start, so the
session's keys are untouched. Every wait polls with a generous deadline: nothing here
depends on how fast the machine is.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest
from typer.testing import CliRunner

from clinml.pipelines.keys_cli import keys_app
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

START_DEADLINE_S = 300.0  # a loaded CI machine may take minutes to start the service
CHANGE_DEADLINE_S = 60.0  # the service looks at the keys file about once a second
NOT_READY_LINE = "not ready: no API keys"


@dataclass
class Served:
    url: str
    keys_file: Path
    log_file: Path
    home: Path

    def keys(self, *args: str) -> str:
        """``clinml keys ARGS`` on this service's keys file; its stdout."""
        env = {"CLINML_HOME": str(self.home), "CLINML_API_KEYS_FILE": str(self.keys_file)}
        result = CliRunner().invoke(keys_app, list(args), env={**env, "CLINML_API_KEYS": None})
        assert result.exit_code == 0, (result.output, result.exception)
        return result.stdout

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def status(url: str, path: str, **options) -> int | None:
    try:
        return httpx.request(
            options.pop("method", "GET"), url + path, timeout=30, **options
        ).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def served(pipeline, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``bentoml serve`` with auth on and an empty keys file (none at all, in fact)."""
    from clinml.serving import launch

    settings, _, _ = pipeline
    directory = tmp_path_factory.mktemp("live-keys")
    keys_file = directory / "secrets" / "api_keys.json"
    log_file = directory / "serve.log"
    env = {
        **launch.service_env(settings, "pathology"),
        "BENTOML_HOME": os.environ["BENTOML_HOME"],  # the session's store (conftest)
        "CLINML_API_KEYS_FILE": str(keys_file),
        "CLINML_AUTH": "true",
    }
    env.pop("CLINML_API_KEYS", None)
    port = launch.free_port()
    url = f"http://127.0.0.1:{port}"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            launch.serve_command("127.0.0.1", port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # /livez answers once the worker has started the service; readiness is the test's.
        wait_for(
            lambda: process.poll() is not None or status(url, "/livez") == 200,
            "the service answering /livez",
            START_DEADLINE_S,
        )
        assert process.poll() is None, log_file.read_text(errors="replace")
        yield Served(url, keys_file, log_file, settings.home)
    finally:
        launch.stop_group(process)


def test_without_keys_the_service_is_not_ready_and_says_so_once(served: Served) -> None:
    assert not served.keys_file.exists()
    for _ in range(5):  # probes, as a load balancer sends them
        assert status(served.url, "/readyz") == 503
    wait_for(lambda: NOT_READY_LINE in served.log(), "the not-ready log line", CHANGE_DEADLINE_S)
    for _ in range(5):
        assert status(served.url, "/readyz") == 503
    [line] = [line for line in served.log().splitlines() if NOT_READY_LINE in line]
    assert "clinml keys create --id" in line and str(served.keys_file) in line

    secret = served.keys("create", "--id", "first-app").strip()
    wait_for(
        lambda: status(served.url, "/readyz") == 200, "ready once a key exists", CHANGE_DEADLINE_S
    )
    assert secret not in served.log()
    served.keys("revoke", "first-app")  # none left: not ready again
    wait_for(
        lambda: status(served.url, "/readyz") == 503, "not ready without keys", CHANGE_DEADLINE_S
    )


def test_a_key_created_while_serving_works_and_stops_when_revoked(
    served: Served, records: pd.DataFrame
) -> None:
    body = {"records": records.head(2).to_dict("records")}

    def predict(secret: str) -> int | None:
        headers = {"Authorization": f"Bearer {secret}"}
        return status(served.url, "/predict", method="POST", json=body, headers=headers)

    secret = served.keys("create", "--id", "late-app", "--role", "predict").strip()
    wait_for(lambda: predict(secret) == 200, "/predict answering the new key", CHANGE_DEADLINE_S)
    other = served.keys("create", "--id", "other-app").strip()
    served.keys("revoke", "late-app")
    wait_for(lambda: predict(secret) == 401, "/predict refusing the revoked key", CHANGE_DEADLINE_S)
    assert predict(other) == 200  # the other key is untouched
    log = served.log()
    assert secret not in log and other not in log
