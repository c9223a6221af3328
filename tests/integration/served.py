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


def registry_aliases(tracker, model: str) -> dict[str, str]:
    """Alias -> version number of ``model`` in the registry."""
    return {
        alias: str(number)
        for alias, number in (tracker.client.get_registered_model(model).aliases or {}).items()
    }


def restore_aliases(tracker, model: str, aliases: dict[str, str]) -> None:
    """Put ``model``'s aliases back as ``aliases`` (a module that moves them leaves the
    registry as it found it)."""
    now = registry_aliases(tracker, model)
    for alias in set(now) - set(aliases):
        tracker.client.delete_registered_model_alias(model, alias)
    for alias, number in aliases.items():
        if now.get(alias) != number:
            tracker.client.set_registered_model_alias(model, alias, number)


def second_version(pipeline, client, spec, alias: str) -> tuple:
    """(tracker, champion, candidate, aliases found) for a module that needs a version
    other than the champion: the session's challenger, trained when there is none. The
    alias the module moves (``alias``) must not be set yet; the service serves the
    registry's champion (an earlier module may have moved it)."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    tracker = Tracker.from_settings(settings)
    found = registry_aliases(tracker, spec.name)
    assert alias not in found
    champion = found["champion"]
    if found.get("challenger") in (None, champion):
        stages.train(spec, settings, Progress(total=1, echo=lambda _: None))
    candidate = registry_aliases(tracker, spec.name)["challenger"]
    assert candidate != champion
    assert client.post("/admin/reload").json()["version"] == champion
    return tracker, champion, candidate, found
