"""What the integration tests share about the service: API keys, the live service
instance, `bentoml serve` children that use the tests' BentoML store, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from clinml.settings import Settings
from tests.conftest import PROJECT_ROOT


def api_keys(home: Path) -> dict[str, str]:
    """Secrets of three keys in the service's key file: all roles, predict, explain."""
    from clinml.serving.keys import generate_key, write_dev_key

    path = Settings(home=home).api_keys_path
    secrets = {"dev": write_dev_key(path)}
    stored = json.loads(path.read_text())
    known = {entry["id"] for entry in stored["keys"]}
    for key_id, roles in (("app", ["predict"]), ("analyst", ["explain"])):
        secret_file = path.with_name(f"{key_id}.secret")
        if key_id not in known:
            secret, entry = generate_key(key_id, roles)
            stored["keys"].append(entry)
            secret_file.write_text(secret)
        secrets[key_id] = secret_file.read_text()
    path.write_text(json.dumps(stored))
    return secrets


def service_instance():
    """The ClinicalService object behind the session's ASGI app, for injecting faults."""
    import bentoml

    return bentoml.get_current_service()


def serve_from_the_session_store(monkeypatch) -> None:
    """`bentoml serve` children use the tests' BentoML store (conftest), not
    $CLINML_HOME/bentoml."""
    from clinml.serving import launch

    environment = launch.service_env
    monkeypatch.setattr(
        launch,
        "service_env",
        lambda s, u: {**environment(s, u), "BENTOML_HOME": os.environ["BENTOML_HOME"]},
    )


def clinml(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``clinml ARGS`` on the data directory ``home``, as the actor ``e2e-cli``."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "clinml"), *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "CLINML_HOME": str(home), "CLINML_ACTOR": "e2e-cli", **(env or {})},
        timeout=1800,  # a deadline for a busy machine, not a speed check
    )
