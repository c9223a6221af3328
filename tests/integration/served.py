"""What the integration tests share about the service: API keys, the live service
instance, `bentoml serve` children that use the tests' BentoML store, and the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


class LogLines(logging.Handler):
    """The messages of one logger (INFO and up), while attached. Unlike pytest's caplog
    it sees the logger whatever an earlier module's logging set-up did to it (a full run
    configures BentoML's logging, which stops the records reaching caplog)."""

    def __init__(self, name: str = "bentoml.clinml") -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)
        self._before = (self.logger.level, self.logger.disabled)
        self.logger.setLevel(logging.INFO)
        self.logger.disabled = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.level, self.logger.disabled = self._before
        super().close()


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


def http_status(url: str) -> int | None:
    """``GET url``'s status code; None while nothing answers."""
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


@contextmanager
def clinml_serve(home: Path, spec_file: Path | str, env: dict[str, str]) -> Iterator[str]:
    """A real ``clinml serve`` of ``spec_file`` on the data directory ``home`` (with
    ``env`` added to this environment), from ready until the block ends; yields its URL.
    Then SIGTERM, as a service manager stops it: the server and its workers all go,
    and the port is free again."""
    import psutil

    from clinml.serving.launch import free_port, port_is_free
    from tests.waiting import wait_for

    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "clinml"), "serve", str(spec_file), "--port", str(port)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "CLINML_HOME": str(home), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: http_status(f"{url}/readyz") == 200 or process.poll() is not None,
            "clinml serve to become ready",
            300,
            every_s=0.5,
        )
        assert process.poll() is None, f"clinml serve exited with {process.returncode}"
        yield url
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers, "clinml serve started no server"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        _, left = psutil.wait_procs(workers, timeout=60)
        assert not left, [p.cmdline()[:4] for p in left]
        assert port_is_free("127.0.0.1", port)
    finally:
        if process.poll() is None:
            process.kill()


def reduced_spec(
    home: Path, usecase: str, n_patients: int, bootstrap: int = 200
) -> tuple[dict, Path]:
    """A reduced copy of the shipped spec of ``usecase``, kept under its name in
    ``home/configs``: ``n_patients`` generated, boosting alone (and the reference), two
    search configurations, ``bootstrap`` resamples. Returns (the spec as a dict, its file):
    a test that changes the dict writes the file again."""
    import yaml

    raw = yaml.safe_load((PROJECT_ROOT / "configs" / f"{usecase}.yaml").read_text())
    raw["source"]["options"]["n_patients"] = n_patients
    training = raw["training"]
    training["candidates"] = {"gbm": training["candidates"]["gbm"]}
    training["search"]["n_iter"] = 2
    raw["evaluation"]["bootstrap"] = bootstrap
    spec_file = home / "configs" / f"{usecase}.yaml"
    spec_file.parent.mkdir(parents=True)
    spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw, spec_file


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
