"""A built bento, served with `bentoml serve` as docs/deployment.md says (issue 20, item 4):
with CLINML_HOME it serves; without it, it refuses to start in one line instead of staying
not ready with nothing logged, and writes nothing into the bento."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.served import api_keys, clinml

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_built_bento_needs_clinml_home_and_serves_with_it(
    pipeline, home: Path, records, tmp_path: Path
) -> None:
    from clinml.serving.launch import ServiceProcess, free_port

    settings, _, _ = pipeline
    # as a user builds it: `clinml build` (the CLI imports the service to build the bento,
    # which must not happen in this process before the session's service is set up)
    built = clinml(home, "build", "pathology")
    assert built.returncode == 0, built.stdout + built.stderr
    tag = built.stdout.split("bento ", 1)[1].split()[0]
    bentoml_home = settings.paths.bentoml_home
    bento_dir = bentoml_home / "bentos" / Path(*tag.split(":"))
    assert (bento_dir / "bento.yaml").is_file()

    env = {name: value for name, value in os.environ.items() if name != "CLINML_HOME"}
    env["BENTOML_HOME"] = str(bentoml_home)
    refused = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(free_port())],
        cwd=tmp_path,  # a fresh shell somewhere else
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # it exits by itself; a deadline for a busy machine only
    )
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-2000:]
    assert "served without CLINML_HOME" in output, output[-2000:]
    assert "Traceback" not in output
    assert not (bento_dir / "src" / ".clinml").exists()  # nothing written into the bento

    key = api_keys(home)["app"]
    log = home / "logs" / "bento.log"
    with ServiceProcess(settings, "pathology", free_port(), log, target=tag) as served:
        body = {"records": records.head(2).to_dict("records")}
        answer = httpx.post(
            f"{served.url}/predict", json=body, headers={"X-API-Key": key}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
    assert not (bento_dir / "src" / ".clinml").exists()
