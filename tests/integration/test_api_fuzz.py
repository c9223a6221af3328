"""Schemathesis against the OpenAPI document of a real `bentoml serve` process.

The ``st run`` command line fuzzes every operation in ``/docs.json`` with requests that
keep the schema and requests that break it, using a key that holds every role, and runs
all of its checks on every answer: no 5xx; status code, content type, headers and body
as documented; a request that breaks the schema refused with a 4xx, and one that keeps
it not refused for its shape.

CI runs ``CLINML_FUZZ_EXAMPLES`` examples per operation (default 40). The release check
runs 500 (docs/security.md has the numbers)::

    CLINML_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/integration/test_api_fuzz.py

The JSON run report is kept at ``$CLINML_HOME/reports/schemathesis``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.integration.served import api_keys, serve_from_the_session_store

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

EXAMPLES = int(os.environ.get("CLINML_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def served(pipeline, home: Path):
    from clinml.serving.launch import ServiceProcess, free_port

    settings, _, _ = pipeline
    api_keys(home)  # the service reads the key file when it starts
    with pytest.MonkeyPatch.context() as patch:
        serve_from_the_session_store(patch)
        log = home / "logs" / "serve-fuzz.log"
        with ServiceProcess(settings, "pathology", free_port(), log) as process:
            yield process


def test_schemathesis_finds_no_failure_in_any_operation(served, home: Path) -> None:
    import httpx

    reports = home / "reports" / "schemathesis"
    key = api_keys(home)["dev"]
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")),
            "run",
            f"{served.url}/docs.json",
            "--header",
            f"Authorization: Bearer {key}",
            "--checks",
            "all",
            "--max-examples",
            str(EXAMPLES),
            "--report",
            "json",
            "--report-json-path",
            str(reports / "run.json"),
            "--no-color",
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert key not in run.stdout + run.stderr  # the CLI filters the header it was given
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    report = json.loads((reports / "run.json").read_text())
    assert report["complete"] and report["failures"] == [] and report["errors"] == []
    document = httpx.get(f"{served.url}/docs.json", timeout=30).json()
    operations = sum(len(item) for item in document["paths"].values())
    assert report["operations"]["tested"] == operations >= 9
    assert report["warnings"]["missing_deserializer"] == []
    assert report["warnings"]["missing_auth"] == []
    # every operation that takes a body got the full count of generated requests
    with_body = [op for item in document["paths"].values() for op in item.values()]
    with_body = [op for op in with_body if "requestBody" in op]
    assert report["test_cases"]["generated"] >= EXAMPLES * len(with_body)
