"""One test per fault a hospital deployment meets, each injected for real where it can be
(a held SQLite lock, a registry that is not there, ``SIGKILL``) and through the one
failing call otherwise (a disk that is full). docs/security.md has the table.

- online store locked or unreachable: ``/readyz`` not ready; ``/predict_patient`` 503
  with a reason, fast; ``/predict`` unaffected; recovery automatic;
- MLflow registry unreachable: the running service keeps serving; ``promote`` and
  ``monitor`` fail with a clear error;
- model artifact tampered: refused at load; the previous model keeps serving;
- prediction-log storage full: predictions continue; drops counted on ``/metrics``;
- audit trail unwritable: fail closed (503) until it is writable again; no record lost;
- SIGKILL mid-load: the service restarts and serves; ``clinml audit verify`` passes.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from clinml.settings import Settings
from tests.integration.served import (
    LogLines,
    api_keys,
    clinml,
    serve_from_the_session_store,
    service_instance,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

EXECUTOR = "clinml.serving.executor:ModelExecutor"  # served on its own, as on a GPU node


def _one_record(records) -> dict:
    return {"records": records.head(1).to_dict("records")}


# -- the online store ---------------------------------------------------------------------


def _online_db(home: Path) -> Path:
    return Settings(home=home).paths.usecase("pathology").root / "feast" / "online.db"


def _known_patient(pipeline, spec) -> str:
    from datetime import UTC, datetime

    import pandas as pd

    from clinml.features.datasets import pathology

    settings, _, _ = pipeline
    stored = set(pd.read_parquet(settings.paths.usecase("pathology").features_file)["patient_id"])
    raw = pathology.load(spec.source.seed, datetime.now(UTC))
    pseudonymiser = settings.pseudonymiser()
    return next(p for p in raw["patient_id"] if pseudonymiser.one(p) in stored)


def test_a_locked_online_store_is_a_fast_503_for_predict_patient_only(
    client, pipeline, home: Path, records, pathology_spec
) -> None:
    """Another process holds an exclusive lock on the SQLite online store (as a writer
    that hangs would)."""
    from clinml.features.online_sqlite import READ_TIMEOUT_S
    from clinml.serving.service import STORE_RETRY_S

    patient = {"patient_ids": [_known_patient(pipeline, pathology_spec)]}
    assert client.post("/predict_patient", json=patient).status_code == 200
    holder = sqlite3.connect(_online_db(home), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        refused = client.post("/predict_patient", json=patient)
        first_answer_s = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.json()["detail"] == "online feature store unavailable: OperationalError"
        # Later requests within STORE_RETRY_S do not touch the store: they are refused
        # at once, and they keep being refused while the lock is held.
        for _ in range(5):
            assert client.post("/predict_patient", json=patient).status_code == 503
        assert client.post("/predict", json=_one_record(records)).status_code == 200
        assert client.get("/readyz").status_code == 503
        print(f"first 503 after {first_answer_s * 1000:.0f} ms (lock held)")
    finally:
        holder.rollback()
        holder.close()
    assert client.get("/readyz").status_code == 200  # clears the hold-off: recovered
    assert client.post("/predict_patient", json=patient).status_code == 200
    assert STORE_RETRY_S <= 1.0 and READ_TIMEOUT_S <= 0.25  # the first 503 waits this long


def test_an_unreachable_online_store_is_a_503_until_it_is_back(
    client, pipeline, home: Path, records, pathology_spec
) -> None:
    """The store's file is gone (its volume unmounted) when the service next opens it."""
    service = service_instance()
    db = _online_db(home)
    away = db.with_name("online.db.away")
    patient = {"patient_ids": [_known_patient(pipeline, pathology_spec)]}
    said = LogLines("bentoml.clinml")
    db.rename(away)
    try:
        assert client.get("/readyz").status_code == 503  # and drops the open reader
        assert client.get("/readyz").status_code == 503
        # the reason is logged once, with what to do, however often the probe asks
        store_down = [line for line in said.lines if "online feature store" in line]
        assert len(store_down) == 1, said.lines
        assert store_down[0].startswith("not ready: ") and "clinml materialize" in store_down[0]
        refused = client.post("/predict_patient", json=patient)
        assert refused.status_code == 503 and "online feature store unavailable" in refused.text
        assert client.post("/predict", json=_one_record(records)).status_code == 200
        assert service._reader is None  # nothing left open on the old file
    finally:
        away.rename(db)
    assert client.get("/readyz").status_code == 200
    said.close()
    assert said.lines[-1] == "ready"
    assert client.post("/predict_patient", json=patient).status_code == 200


# -- the registry -------------------------------------------------------------------------

NOWHERE = "sqlite:////nonexistent/registry/mlflow.db"


def test_an_unreachable_registry_stops_promote_and_monitor_but_not_serving(
    client, pipeline, home: Path, records, pathology_spec
) -> None:
    import pandas as pd

    from clinml.features.datasets.batches import sample_batch

    settings, _, _ = pipeline
    mlflow_dir = home / "mlflow"
    away = home / "mlflow.away"
    paths = settings.paths.usecase("pathology")
    features, labels = pd.read_parquet(paths.features_file), pd.read_parquet(paths.labels_file)
    batch = home / "registry-down-batch.parquet"
    sample_batch(features, labels, pathology_spec, 120, seed=3).to_parquet(batch)

    mlflow_dir.rename(away)  # the running service's registry is gone too
    try:
        for _ in range(3):
            assert client.post("/predict", json=_one_record(records)).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/model").status_code == 200
        for args in (("promote", "pathology"), ("monitor", "pathology", "--batch", str(batch))):
            for uri in (None, NOWHERE):  # the default registry, gone; a configured one
                env = {"CLINML_TRACKING_URI": uri} if uri else {}
                result = clinml(home, *args, env=env)
                assert result.returncode == 2, (args, uri, result.stdout, result.stderr)
                assert "Traceback" not in result.stderr
                assert "registry" in result.stderr.lower(), result.stderr
    finally:
        shutil.rmtree(mlflow_dir, ignore_errors=True)  # anything recreated while it was away
        away.rename(mlflow_dir)
    assert client.post("/admin/reload").status_code == 200


def test_an_unwritable_audit_trail_fails_closed_and_loses_no_record(
    client, home: Path, records, monkeypatch
) -> None:
    """Every write of the request audit trail fails (the disk is full) until it does not."""
    from clinml.audit import AuditLog
    from clinml.serving import refusals

    service = service_instance()
    trail = service.audit
    request_log = Settings(home=home).paths.request_audit_log
    body = _one_record(records)

    def disk_full(fd, data, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Refusals of earlier tests are audited in aggregate a few seconds later: write them
    # now, so that no such record meets the full disk before this test's request does.
    refusals.RECORDER.flush()
    assert trail.flush(10)
    monkeypatch.setattr(trail._log, "_write", disk_full)
    answered = client.post("/predict", json=body)  # queued before the write fails
    assert answered.status_code == 200
    wait_for(lambda: not trail.healthy, "the audit trail to report the full disk")
    refused = client.post("/predict", json=body)
    assert refused.status_code == 503 and "audit trail unavailable" in refused.text
    assert "No space left on device" in refused.text
    assert client.get("/readyz").status_code == 503
    monkeypatch.undo()  # space again: the kept batch is written on the next try
    wait_for(lambda: trail.healthy, "the audit trail to recover once there is space")
    assert client.post("/predict", json=body).status_code == 200
    assert client.get("/readyz").status_code == 200
    assert trail.flush(10)
    ids = {r.get("request_id") for r in AuditLog(request_log).records()}
    assert answered.json()["request_id"] in ids  # the answer given while failing is there
    assert AuditLog(request_log).verify() > 0


def test_a_full_prediction_log_disk_drops_rows_counts_them_and_predicts_on(
    client, records, monkeypatch
) -> None:
    service = service_instance()
    log = service.predictions

    def disk_full(day, frame):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def dropped_on_metrics() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("clinml_prediction_log_dropped_rows_total"):
                return float(line.split()[-1])
        return 0.0

    assert log.flush(10)
    before, metric_before = log.dropped, dropped_on_metrics()
    monkeypatch.setattr(log, "_write_partition", disk_full)
    for _ in range(4):
        answer = client.post("/predict", json={"records": records.head(5).to_dict("records")})
        assert answer.status_code == 200
    assert log.flush(10)
    assert log.dropped - before == 20
    assert "No space left on device" in log.last_error
    assert dropped_on_metrics() - metric_before == 20
    assert client.get("/readyz").status_code == 200  # predictions go on: still ready
    monkeypatch.undo()
    written = log.written
    assert client.post("/predict", json=_one_record(records)).status_code == 200
    assert log.flush(10) and log.written == written + 1


def test_a_tampered_model_is_refused_and_the_old_one_keeps_serving(client, pipeline) -> None:
    from urllib.parse import urlparse

    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    tracker = Tracker.from_settings(settings)
    serving = client.get("/model").json()["version"]
    versions = tracker.client.search_model_versions("name='pathology'")
    others = [v for v in versions if v.version != serving]
    if others:
        version = others[0]
    else:  # this module alone: register the serving model's artifacts as another version
        current = tracker.client.get_model_version("pathology", serving)
        version = tracker.client.create_model_version(
            "pathology", current.source, run_id=current.run_id, tags=current.tags
        )
    other = str(version.version)
    logged = tracker.client.get_logged_model(version.source.removeprefix("models:/"))
    artifacts = Path(urlparse(logged.artifact_location).path)
    [model_file] = list(artifacts.rglob("model.skops"))
    original = model_file.read_bytes()
    try:
        model_file.write_bytes(original + b"\0")
        tracker.client.set_registered_model_alias("pathology", "champion", other)
        refused = client.post("/admin/reload")
        assert refused.status_code == 503 and "reload refused" in refused.text
        assert client.get("/model").json()["version"] == serving
    finally:
        model_file.write_bytes(original)
        tracker.client.set_registered_model_alias("pathology", "champion", serving)


def test_a_bento_refused_at_start_is_not_ready_and_says_why(
    pipeline, home: Path, pathology_spec, monkeypatch
) -> None:
    """The red-team finding: `operating_threshold: 0.0001` edited into the stored model's
    model.yaml made every record positive with /readyz 200. Now the model-execution
    service starts without a model, is not ready, and names the refused artifact."""
    import subprocess

    import bentoml
    import httpx
    import yaml

    from clinml.serving import launch
    from clinml.serving.package import import_champion
    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    serve_from_the_session_store(monkeypatch)
    tag = import_champion(pathology_spec, Tracker.from_settings(settings)).tag  # now latest
    process = None
    try:
        model_yaml = Path(bentoml.models.get(tag).path) / "model.yaml"
        info = yaml.safe_load(model_yaml.read_text())
        info["metadata"]["operating_threshold"] = 0.0001
        model_yaml.write_text(yaml.safe_dump(info, sort_keys=False))
        url, log_file = f"http://127.0.0.1:{launch.free_port()}", home / "logs" / "refused.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                launch.serve_command("127.0.0.1", int(url.rsplit(":", 1)[1]), EXECUTOR),
                env=launch.service_env(settings, "pathology"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> int | None:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code
            except httpx.HTTPError:
                return None

        wait_for(
            lambda: "refusing the model at start" in log_file.read_text() and ready(),
            "the service to start and refuse the tampered model",
            180,
            seen=lambda: log_file.read_text()[-2000:],
        )
        assert ready() == 503
        described = httpx.post(f"{url}/describe", json={}, timeout=10).json()
        assert described["loaded"] is False
        assert "serving metadata" in described["last_error"]
        assert "0.0001" not in described["last_error"]
    finally:
        launch.stop_group(process)
        bentoml.models.delete(tag)  # the champion imported by the pipeline is latest again


# -- SIGKILL -------------------------------------------------------------------------------


class Load:
    """Threads posting /predict until stopped; counts answers by status (0: no answer)."""

    def __init__(self, url: str, key: str, body: dict, threads: int = 4):
        self.url, self.headers, self.body = url, {"X-API-Key": key}, body
        self.statuses: dict[int, int] = {}
        self.answered_ids: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                try:
                    answer = http.post(f"{self.url}/predict", json=self.body, headers=self.headers)
                    status = answer.status_code
                except httpx.HTTPError:
                    status = 0
                    time.sleep(0.05)
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == 200:
                        self.answered_ids.append(answer.json()["request_id"])

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def count(self, status: int) -> int:
        with self._lock:
            return self.statuses.get(status, 0)


def test_sigkill_mid_load_restarts_and_the_audit_chains_verify(
    pipeline, home: Path, records, monkeypatch
) -> None:
    """Kill a worker mid-load: BentoML's arbiter starts another. Then kill everything, as a
    node loss would, and start the service again, as its supervisor would."""
    import psutil

    from clinml.audit import AuditLog
    from clinml.serving.launch import ServiceProcess, free_port

    settings, _, _ = pipeline
    serve_from_the_session_store(monkeypatch)
    key = api_keys(home)["app"]
    body = _one_record(records)
    logs = home / "logs"
    answered: list[str] = []
    with ServiceProcess(settings, "pathology", free_port(), logs / "serve-kill-1.log") as served:
        arbiter = psutil.Process(served.pid)
        with Load(served.url, key, body) as load:
            wait_for(lambda: load.count(200) >= 50, "50 answers under load", 300)
            [worker] = [
                child
                for child in arbiter.children(recursive=True)
                if "_bentoml_impl.worker" in " ".join(child.cmdline())
            ]
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            before = load.count(200)
            wait_for(lambda: load.count(200) >= before + 50, "a new worker's answers", 300)
            assert arbiter.is_running()
            # everything, mid-load: BentoML's workers have process groups of their own
            for process in [arbiter, *arbiter.children(recursive=True)]:
                process.send_signal(signal.SIGKILL)
            wait_for(lambda: load.count(0) > 0, "the callers to see the service gone", 120)
        answered += load.answered_ids
    with (
        ServiceProcess(settings, "pathology", free_port(), logs / "serve-kill-2.log") as again,
        Load(again.url, key, body) as load,
    ):
        wait_for(lambda: load.count(200) >= 20, "20 answers from the restarted service", 300)
    assert set(load.statuses) <= {200}  # and then stopped gracefully (SIGTERM)

    verify = clinml(home, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    request_log = Settings(home=home).paths.request_audit_log
    written = {r.get("request_id") for r in AuditLog(request_log).records()}
    assert set(load.answered_ids) <= written  # the shutdown hook wrote every queued record
    lost = len(set(answered) - written)
    print(f"{len(answered)} answers before SIGKILL; {lost} missing from the audit trail")
