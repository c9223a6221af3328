"""The production profile against this machine's real PostgreSQL and Redis.

The whole pipeline runs through the ``clinml`` command line, as an operator runs it,
with ``CLINML_PROFILE=production``: ingest into the PostgreSQL offline store, the Feast
SQL registry on PostgreSQL, materialize into Redis, train and register in MLflow on
PostgreSQL, promote, package, then a real ``bentoml serve`` answers ``/predict_patient``
from Redis, and ``clinml monitor`` reads what it logged. Then two trainings register at
the same time, and a promotion happens while requests are being served.

Every run has its own database and Feast project prefix (so its Redis keys), removed
afterwards. Without the services the module skips, unless CLINML_REQUIRE_SERVICES=1
(``.ci/run``), when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from clinml.spec import UseCaseSpec
from tests.conftest import PROJECT_ROOT
from tests.integration.served import api_keys
from tests.services import (
    database_exists,
    delete_redis_keys,
    production_env,
    redis_keys,
    require_services,
    scratch_database,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _clinml(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "clinml"), *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        timeout=2400,  # a deadline for a busy machine, not a speed check
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


class Deployment:
    """One production-profile installation on a scratch database and project prefix."""

    def __init__(self, root: Path, database: str, prefix: str):
        self.home = root / "home"
        self.database, self.prefix = database, prefix
        self.env = {**production_env(self.home, database, prefix), "CLINML_ACTOR": "prod-test"}
        self.outputs: dict[str, str] = {}

    def run(self, *args: str) -> str:
        return _ok(_clinml(self.env, *args))

    def settings(self):
        from clinml.settings import Settings

        with pytest.MonkeyPatch.context() as patch:
            for name, value in self.env.items():
                patch.setenv(name, value)
            return Settings()

    def tracker(self):
        from clinml.training.tracking import Tracker

        return Tracker.from_settings(self.settings())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    require_services()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    with scratch_database() as database:
        deployed = Deployment(tmp_path_factory.mktemp("production"), database, prefix)
        try:
            for stage in ("ingest", "materialize", "train", "promote", "package"):
                deployed.outputs[stage] = deployed.run(stage, "pathology")
            yield deployed
        finally:
            delete_redis_keys(prefix)
    assert not database_exists(database)
    assert not redis_keys(prefix)


@pytest.fixture(scope="module")
def served(deployment: Deployment):
    """`bentoml serve` in the production profile, polling the registry every second."""
    from clinml.serving.launch import ServiceProcess, free_port

    keys = api_keys(deployment.home)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**deployment.env, "CLINML_RELOAD_INTERVAL_S": "1"}.items():
            patch.setenv(name, value)
        patch.setenv("BENTOML_HOME", str(deployment.home / "bentoml"))
        settings = deployment.settings()
        log = deployment.home / "logs" / "serve-production.log"
        with ServiceProcess(settings, "pathology", free_port(), log) as process:
            yield process, keys
        deployment.outputs["serve_log"] = log.read_text()


@pytest.fixture(scope="module")
def raw_ids(pathology_spec: UseCaseSpec) -> list[str]:
    from clinml.features.ingest import load_raw

    frame = load_raw(pathology_spec, datetime.now(UTC))
    return frame[pathology_spec.entity.key].astype(str).head(40).tolist()


def test_every_stage_writes_to_the_shared_stores_and_none_to_local_files(
    deployment: Deployment, pathology_spec: UseCaseSpec
) -> None:
    import psycopg

    from clinml.features.offline import PostgresTables

    settings = deployment.settings()
    tables = PostgresTables.for_environment(settings.feast_environment, "pathology")
    assert tables is not None
    features, labels = tables.read("features"), tables.read("labels")
    assert features is not None and labels is not None
    assert len(features) == 569 and len(labels) == 569
    assert "mrn" not in features.columns  # the identifier column is dropped at ingestion
    assert features[pathology_spec.entity.key].str.startswith("ps_").all()
    assert str(features[pathology_spec.event_timestamp].dt.tz) == "UTC"
    assert "committed to" in deployment.outputs["ingest"]

    # Feast's SQL registry holds the project's definitions, in the same database.
    project = f"{deployment.prefix}_pathology"
    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname=deployment.database
    ) as connection:
        views = connection.execute(
            "SELECT feature_view_name FROM feature_views WHERE project_id = %s", (project,)
        ).fetchall()
        versions = connection.execute(
            "SELECT name, version FROM model_versions ORDER BY version"
        ).fetchall()
    assert views == [("pathology_features",)]
    assert versions == [("pathology", 1)]  # MLflow's registry is in PostgreSQL too

    # Materialize wrote one Redis hash per patient, under this run's project only.
    assert len(redis_keys(deployment.prefix)) == features[pathology_spec.entity.key].nunique()
    assert "into the online store (redis)" in deployment.outputs["materialize"]

    assert str(deployment.tracker().version_by_alias("pathology").version) == "1"
    artifacts = Path(deployment.env["CLINML_ARTIFACT_ROOT"])
    assert any(artifacts.rglob("MLmodel"))  # the configured artifact location
    local_stores = [
        p.name
        for p in deployment.home.rglob("*")
        if p.name in {"mlflow.db", "online.db", "registry.db"}
    ]
    assert local_stores == []


def test_the_redis_reader_agrees_with_feast_online_api(
    deployment: Deployment, pathology_spec: UseCaseSpec
) -> None:
    from clinml.features import store as feature_store
    from clinml.features.offline import PostgresTables
    from clinml.features.online_feast import FeastOnlineReader, online_reader

    settings = deployment.settings()
    paths = settings.paths.usecase("pathology")
    store = feature_store.open_store(pathology_spec, paths, settings.feast_environment)
    reader = online_reader(store, pathology_spec)
    assert isinstance(reader, FeastOnlineReader)
    tables = PostgresTables.for_environment(settings.feast_environment, "pathology")
    ids = [*tables.read("features")[pathology_spec.entity.key].head(20).tolist(), "nobody"]
    ours = reader.read(ids)
    feasts = feature_store._read_with_feast(store, pathology_spec, ids)
    assert ours == feasts
    assert reader.read(ids) == ours  # a second read is the same read
    assert reader.features == list(pathology_spec.feature_names)  # Feast appends to its list
    assert ours[-1] is None and all(row is not None for row in ours[:-1])
    reader.ping()


def test_predict_patient_is_answered_from_redis(served, raw_ids: list[str]) -> None:
    process, keys = served
    headers = {"Authorization": f"Bearer {keys['dev']}"}
    answer = httpx.post(
        f"{process.url}/predict_patient",
        json={"patient_ids": raw_ids[:5]},
        headers=headers,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == {"name": "pathology", "version": "1", "alias": "champion"}
    assert len(body["predictions"]) == 5
    assert all(0.0 <= p["probability"] <= 1.0 for p in body["predictions"])
    unknown = httpx.post(
        f"{process.url}/predict_patient",
        json={"patient_ids": ["NOBODY-1"]},
        headers=headers,
        timeout=30,
    )
    assert unknown.status_code == 404, unknown.text


def test_monitor_reads_what_the_production_service_logged(
    deployment: Deployment, served, raw_ids: list[str]
) -> None:
    from clinml.predictionlog import read_predictions

    process, keys = served
    headers = {"Authorization": f"Bearer {keys['dev']}"}
    for start in range(0, 40, 4):
        answer = httpx.post(
            f"{process.url}/predict_patient",
            json={"patient_ids": raw_ids[start : start + 4]},
            headers=headers,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    predictions = deployment.settings().paths.usecase("pathology").predictions
    wait_for(  # the log is written in batches
        lambda: predictions.is_dir() and len(read_predictions(predictions)) >= 40,
        "40 rows in the prediction log",
        every_s=0.5,
    )
    result = _clinml(deployment.env, "monitor", "pathology", "--window", "1d", "--no-subgroups")
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: an alert
    verdict = json.loads(
        Path(result.stdout.strip().splitlines()[-1].removeprefix("verdict: ")).read_text()
    )
    assert verdict["drift"]["current_rows"] >= 40


def test_two_trainings_at_once_both_register(deployment: Deployment) -> None:
    """Two `clinml train` processes register against the same PostgreSQL registry."""
    tracker = deployment.tracker()
    before = {str(v.version) for v in tracker.client.search_model_versions("name='pathology'")}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _clinml(deployment.env, "train", "pathology"), [1, 2]))
    for result in results:
        _ok(result)
    after = {str(v.version) for v in tracker.client.search_model_versions("name='pathology'")}
    new = after - before
    assert len(new) == 2, (before, after)  # no version lost, none overwritten
    said = {
        line.split("registered pathology version ")[1].split()[0]
        for r in results
        for line in r.stdout.splitlines()
        if "registered pathology version" in line
    }
    assert said == new  # each training reports the version it got
    runs = {tracker.client.get_model_version("pathology", v).run_id for v in new}
    assert len(runs) == 2  # two distinct MLflow runs behind them


def test_a_promotion_under_load_drops_no_request_and_is_audited(
    deployment: Deployment, served, raw_ids: list[str]
) -> None:
    from clinml.audit import AuditLog

    process, keys = served
    tracker = deployment.tracker()
    before = str(tracker.version_by_alias("pathology").version)
    challenger = str(tracker.version_by_alias("pathology", "challenger").version)
    assert challenger != before
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {keys['app']}"}) as http:
            i = 0
            while not stop.is_set():
                response = http.post(
                    f"{process.url}/predict_patient",
                    json={"patient_ids": [raw_ids[i % len(raw_ids)]]},
                    timeout=30,
                )
                version = (
                    response.json()["model"]["version"] if response.status_code == 200 else None
                )
                answers.append((response.status_code, version))
                i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        promoted = _clinml(
            deployment.env, "promote", "pathology", "--force", "--reason", "CAB-9 load test"
        )
        _ok(promoted)
        wait_for(  # the service polls the registry every second
            lambda: any(v == challenger for _, v in answers),
            f"an answer from the promoted version {challenger}",
            60,
            every_s=0.5,
        )
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    statuses = {status for status, _ in answers}
    assert statuses == {200}, [a for a in answers if a[0] != 200][:5]
    versions = [v for _, v in answers]
    assert set(versions) == {before, challenger}
    switched = versions.index(challenger)
    assert set(versions[switched:]) <= {before, challenger}
    assert str(tracker.version_by_alias("pathology").version) == challenger
    assert str(tracker.version_by_alias("pathology", "previous_champion").version) == before

    settings = deployment.settings()
    registry_log = AuditLog(settings.audit_log_path)
    assert registry_log.verify() == 2
    moves = [(r["action"], r["from_version"], r["to_version"]) for r in registry_log.records()]
    assert moves[0][1:] == (None, "1")
    assert moves[1][1:] == (before, challenger)
    # Every answer the load received is in the request audit trail, with its version,
    # once the service has stopped (it writes the trail on shutdown).
    process.stop()
    trail = AuditLog(settings.paths.request_audit_log)
    records = trail.records()
    assert trail.verify() == len(records)
    served_versions = [
        r["model_version"]
        for r in records
        if r["endpoint"] == "/predict_patient" and r["outcome"] == 200
    ]
    assert served_versions.count(challenger) >= versions.count(challenger)
    assert len(served_versions) >= len(answers)


def test_the_production_profile_refuses_the_development_key_and_auth_off(
    deployment: Deployment,
) -> None:
    from clinml.pseudonym import DEVELOPMENT_KEY

    for change, message in (
        ({"CLINML_PSEUDONYM_KEY": DEVELOPMENT_KEY}, "public development key"),
        ({"CLINML_AUTH": "false"}, "API keys cannot be turned off"),
    ):
        env = {**deployment.env, **change}
        refused = _clinml(env, "serve", "pathology", "--port", "1")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "CLINML_PROFILE=production refuses to start" in refused.stderr
        assert message in refused.stderr
        # `bentoml serve` of the service module directly refuses as well.
        direct = subprocess.run(
            [sys.executable, "-c", "import clinml.serving.service"],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            timeout=300,
        )
        assert direct.returncode != 0 and message in direct.stderr
