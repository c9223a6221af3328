"""The whole pipeline in a temporary data directory, then the service and the monitor.

ingest -> validate -> Feast -> train (4 candidates) -> register the challenger -> gated
promotion -> BentoML store -> ``/predict`` through the service's ASGI app, checked against
the registered model loaded from MLflow -> ``clinml monitor`` exit codes -> ``bentoml
build`` -> a second training, a refused and a forced promotion, rollback, and the
``clinml models`` views of all of it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.settings import Settings
from clinml.spec import UseCaseSpec
from tests.conftest import PROJECT_ROOT
from tests.integration.served import (
    api_keys,
    clinml,
    serve_from_the_session_store,
    service_instance,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_pipeline_reports_every_stage(pipeline) -> None:
    _, version, lines = pipeline
    text = "\n".join(lines)
    assert "137 checks (spec) passed on 569 rows" in text
    assert "reference profile learned from this batch" in text
    assert "dropped identifier columns: mrn; patient_id pseudonymised" in text
    assert "full load of" in text and "newest of 569 entities written" in text
    for candidate in ("svm", "rf", "gbm", "mlp", "logreg"):
        assert any(line.strip().startswith(f"{candidate} ") for line in lines), candidate
        assert any(line.strip().startswith(f"{candidate} [1/") for line in lines), candidate
    assert (
        f"= pathology version {version}" in text
        and "registered pathology version 1 as 'challenger'" in text
    )
    assert (
        "pass  data_validation" in text
        and "promote: champion -> version 1 (first champion)" in text
    )
    assert version == "1"


def test_every_candidate_is_a_run_and_the_selected_one_is_champion(
    pipeline, pathology_spec: UseCaseSpec
) -> None:
    from clinml.training.tracking import Tracker

    settings, version, _ = pipeline
    tracker = Tracker.from_settings(settings)
    client = tracker.client
    experiment = client.get_experiment_by_name("pathology")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.data.params["candidate"] for r in runs)
    assert names == ["gbm", "logreg", "mlp", "rf", "svm"]  # the reference is always fitted
    from clinml.training.metrics import METRICS

    for run in runs:
        metrics = run.data.metrics
        for name in METRICS:  # every metric with its bootstrap CI
            assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
        assert {"tn", "fp", "fn", "tp", "operating_threshold", "cv_roc_auc"} <= set(metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert artifacts == {
            "plots/roc.png",
            "plots/precision_recall.png",
            "plots/calibration.png",
            "plots/smoothed_calibration.png",
            "plots/decision_curve.png",
        }
        # (The slope is left out where a model separates the 143 test cases perfectly.)
        assert {"calibration_intercept", "observed_expected"} <= set(metrics)
        assert run.data.params["search_trials_failed"] == "0"
        evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert (
            "evaluation/subgroups.csv" in evaluation
            and "evaluation/search_trials.csv" in evaluation
        )
    champion = tracker.version_by_alias("pathology")
    assert str(champion.version) == version
    # Selection is by cross-validated score and the parsimony rule: the test split chooses
    # nothing. The reference wins unless the best other candidate is clearly better.
    by_candidate = {r.data.params["candidate"]: r for r in runs}
    best = max(
        (r for name, r in by_candidate.items() if name != "logreg"),
        key=lambda r: r.data.metrics["cv_roc_auc"],
    )
    assert champion.run_id in {best.info.run_id, by_candidate["logreg"].info.run_id}
    tags = champion.tags
    assert tags["reference_run_id"] == by_candidate["logreg"].info.run_id
    from clinml.training.assignment import TrainingRecord

    record = TrainingRecord.from_json(tags["training_record"])
    assert record.fraction == pathology_spec.training.test_size and record.salt == "pathology"
    assert record.rows == int(champion_run_param(client, champion.run_id, "train_rows"))
    assert tags["feature_service"] == "pathology_v1" and tags["feature_service_version"] == "1"
    assert tags["spec_sha256"] == pathology_spec.fingerprint()
    assert len(tags["data_fingerprint"]) == 64 and tags["git_commit"]
    assert json.loads(tags["packages"])["scikit-learn"] == "1.9.1"
    if by_candidate["svm"].data.params["candidate"] == "svm":
        assert by_candidate["svm"].data.params["svm_variant"] == "rbf_kernel"  # exact kernel
    # The champion's model has a signature and an input example.
    from mlflow.models import get_model_info

    info = get_model_info("models:/pathology@champion")
    assert [c.name for c in info.signature.inputs.inputs] == pathology_spec.feature_names
    assert info.saved_input_example_info is not None
    # The drift reference is stored with the run and holds no patient ids or dates.
    from clinml.training.train import load_reference

    reference = load_reference(tracker, "pathology")
    assert "patient_id" not in reference.columns and "event_timestamp" not in reference.columns
    assert set(pathology_spec.feature_names) <= set(reference.columns)


def champion_run_param(client, run_id: str, name: str) -> str:
    return client.get_run(run_id).data.params[name]


def test_predict_matches_the_registered_model(client, pipeline, records: pd.DataFrame) -> None:
    import mlflow.pyfunc

    from clinml.training.tracking import Tracker

    settings, version, _ = pipeline
    response = client.post("/predict", json={"records": records.to_dict("records")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "pathology", "version": version, "alias": "champion"}
    assert len(body["request_id"]) == 32
    served = np.array([p["probability"] for p in body["predictions"]])

    Tracker.from_settings(settings).activate()
    registered = mlflow.pyfunc.load_model("models:/pathology@champion")
    expected = registered.predict(records)["probability"].to_numpy()
    # The service runs the compiled fast path; the registry model is scikit-learn's.
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)  # same values, same order
    threshold = body["operating_threshold"]
    labels = [p["label"] for p in body["predictions"]]
    assert labels == ["malignant" if p >= threshold else "benign" for p in expected]
    assert {"malignant", "benign"} == set(labels)  # the sample holds both classes


def test_bad_input_gets_a_4xx_naming_the_field_without_echoing_it(
    client, records: pd.DataFrame
) -> None:
    record = records.iloc[0].to_dict()
    record["mean_radius"] = 123456.789
    record["worst_area"] = "SECRET-VALUE"
    response = client.post("/predict", json={"records": [record]})
    assert response.status_code == 422
    assert "123456" not in response.text and "SECRET" not in response.text
    located = {tuple(d["loc"]) for d in response.json()["detail"]}
    assert located == {("body", "records", 0, "mean_radius"), ("body", "records", 0, "worst_area")}

    missing = records.iloc[0].to_dict()
    del missing["mean_area"]
    response = client.post("/predict", json={"records": [missing]})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "records", 0, "mean_area"]

    response = client.post(
        "/predict", content=b'{"records": [SECRET', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "SECRET" not in response.text


def test_health_and_openapi(client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    schema = client.get("/docs.json").json()
    assert "/predict" in schema["paths"]
    docs_page = client.get("/")
    assert docs_page.status_code == 200 and "swagger" in docs_page.text.lower()


def test_monitor_cli_exit_codes(pipeline, home: Path, pathology_spec: UseCaseSpec) -> None:
    from clinml.features.datasets.batches import sample_batch

    settings, _, _ = pipeline
    paths = settings.paths.usecase("pathology")
    features, labels = pd.read_parquet(paths.features_file), pd.read_parquet(paths.labels_file)
    batches = {
        "unshifted": sample_batch(features, labels, pathology_spec, 150, seed=1),
        "shifted": sample_batch(features, labels, pathology_spec, 150, seed=2, positive_share=0.9),
    }
    codes = {}
    for name, batch in batches.items():
        batch_file = home / f"{name}.parquet"
        batch.to_parquet(batch_file)
        result = clinml(
            home, "monitor", "pathology", "--batch", str(batch_file), "--out", str(home / name)
        )
        assert "Traceback" not in result.stderr, result.stderr
        codes[name] = result.returncode
        verdict = json.loads((home / name / "drift.json").read_text())
        assert (home / name / "drift.html").is_file()
        assert result.stdout.splitlines()[0].startswith("DRIFT" if verdict["drift"] else "no drift")
    assert codes == {"unshifted": 0, "shifted": 1}

    # A feature column with no value at all is bad input, not an alert: exit 2, one line
    # naming the column (it was a traceback and exit 1, the alert code).
    empty = batches["unshifted"].assign(mean_radius=float("nan"))
    empty.to_parquet(home / "empty-column.parquet")
    result = clinml(home, "monitor", "pathology", "--batch", str(home / "empty-column.parquet"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "mean_radius column holds no value at all" in result.stderr


def test_bentoml_build_succeeds_offline(pipeline) -> None:
    """The bento holds the service code, the spec and a reference to the imported champion."""
    import bentoml
    import yaml

    from clinml.serving.package import build_bento

    tag = build_bento(PROJECT_ROOT)
    bento = bentoml.get(tag)
    manifest = yaml.safe_load(Path(bento.path_of("bento.yaml")).read_text())
    [service] = manifest["services"]
    assert [m["tag"].split(":")[0] for m in service["models"]] == ["pathology"]
    assert Path(bento.path_of("src/configs/pathology.yaml")).is_file()
    assert Path(bento.path_of("src/serving/service.py")).is_file()
    assert not list(Path(bento.path_of("src")).rglob("*.parquet"))  # no data in the bento


def test_governance_refuse_force_rollback_and_history(
    pipeline, home: Path, pathology_spec: UseCaseSpec
) -> None:
    """A second training, a refused then forced promotion, a rollback, all audited."""
    from clinml.audit import AuditLog
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.governance import (
        FORCED_PROMOTE,
        PROMOTE,
        REFUSED,
        ROLLBACK,
        PromotionRefused,
    )
    from clinml.training.model_io import ModelLoadError
    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    tracker = Tracker.from_settings(settings)
    quiet = Progress(total=1, echo=lambda _: None)
    assert stages.train(pathology_spec, settings, quiet) == "2"
    challenger = tracker.version_by_alias("pathology", "challenger")
    assert str(challenger.version) == "2"

    # The gate scores models only after checking them against the hash recorded at
    # registration: a rewritten model file is refused before it is opened.
    logged_model = challenger.source.removeprefix("models:/")
    [model_file] = Path(settings.mlflow_artifact_root).rglob(f"{logged_model}/**/model.skops")
    original = model_file.read_bytes()
    model_file.write_bytes(original + b"\0")
    try:
        with pytest.raises(ModelLoadError, match="recorded at registration"):
            stages.promote(pathology_spec, settings, quiet)
    finally:
        model_file.write_bytes(original)
    assert str(tracker.version_by_alias("pathology").version) == "1"

    # A batch that fails data validation arrives: the gate now refuses, names why, and
    # nothing moves.
    from clinml.features.datasets import pathology

    bad = pathology.load(pathology_spec.source.seed, datetime.now(UTC)).head(100)
    bad["mean_radius"] = 900.0  # far outside the spec's range
    bad_file = home / "bad-batch.csv"
    bad.to_csv(bad_file, index=False)
    checked = clinml(home, "validate", "pathology", "--data", str(bad_file))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    with pytest.raises(PromotionRefused, match="latest validation run FAILED"):
        stages.promote(pathology_spec, settings, quiet)
    assert str(tracker.version_by_alias("pathology").version) == "1"

    refused = clinml(home, "promote", str(PROJECT_ROOT / "configs" / "pathology.yaml"), "--force")
    assert refused.returncode == 2 and "--force needs --reason" in refused.stderr

    decision = stages.promote(
        pathology_spec, settings, quiet, force=True, reason="CAB-1234 approved"
    )
    assert decision.action == FORCED_PROMOTE and not decision.passed
    assert str(tracker.version_by_alias("pathology").version) == "2"
    assert str(tracker.version_by_alias("pathology", "previous_champion").version) == "1"

    rolled = clinml(home, "rollback", "pathology", "--reason", "alerts doubled on ward 7")
    assert rolled.returncode == 0, rolled.stderr
    assert "champion: version 2 -> version 1" in rolled.stdout
    assert str(tracker.version_by_alias("pathology").version) == "1"

    log = AuditLog(settings.audit_log_path)
    assert log.verify() == 4
    records = log.records()
    assert [r["action"] for r in records] == [PROMOTE, REFUSED, FORCED_PROMOTE, ROLLBACK]
    assert [(r["from_version"], r["to_version"]) for r in records] == [
        (None, "1"),
        ("1", "2"),
        ("1", "2"),
        ("2", "1"),
    ]
    assert [r["actor"] for r in records] == ["e2e-test", "e2e-test", "e2e-test", "e2e-cli"]
    assert records[2]["reason"] == "CAB-1234 approved"
    assert {g["check"]: g["passed"] for g in records[2]["gate"]}["data_validation"] is False
    assert set(records[1]["metrics"]) == {"challenger", "champion"}

    history = clinml(home, "models", "history", "pathology")
    assert history.returncode == 0, history.stderr
    assert "forced-promote" in history.stdout and "CAB-1234 approved" in history.stdout
    assert "chain verified" in history.stdout

    listing = clinml(home, "models", "list", "pathology")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "champion" in rows["1"] and "previous_champion" not in rows["1"]

    shown = clinml(home, "models", "show", "pathology", "2")
    assert shown.returncode == 0 and "data_fingerprint" in shown.stdout and "[" in shown.stdout

    card = clinml(home, "models", "card", "pathology", "champion")
    assert card.returncode == 0, card.stderr
    html = Path(card.stdout.split("card: ", 1)[1].splitlines()[0])
    page = html.read_text()
    assert "Intended use" in page and "Subgroups" in page
    payload = json.loads((html.parent / "model_card.json").read_text())
    assert payload["model"]["version"] == "1"
    assert payload["use_case"]["intended_use"] == pathology_spec.intended_use
    assert payload["evaluation"]["subgroups"] and payload["evaluation"]["calibration"]
    text = page + json.dumps(payload)
    features = pd.read_parquet(settings.paths.usecase("pathology").features_file)
    assert not any(pid in text for pid in features["patient_id"].head(50))  # no patient ids

    nothing = clinml(home, "rollback", "pathology")
    assert nothing.returncode == 2 and "no previous champion" in nothing.stderr


# -- the serving endpoints (same app: BentoML builds one per session) -------------------


def test_auth_matrix(client, keys: dict[str, str], records: pd.DataFrame) -> None:
    body = {"records": records.head(2).to_dict("records")}
    anonymous = {"Authorization": ""}
    assert client.post("/predict", json=body, headers=anonymous).status_code == 401
    wrong = {"Authorization": "", "X-API-Key": "wrong"}
    assert client.post("/predict", json=body, headers=wrong).status_code == 401
    matrix = {
        ("app", "/predict"): 200,
        ("app", "/explain"): 403,
        ("analyst", "/predict"): 403,
        ("analyst", "/explain"): 200,
        ("dev", "/explain"): 200,
        ("app", "/admin/reload"): 403,
    }
    for (key_id, path), expected in matrix.items():
        response = client.post(
            path, json=body, headers={"Authorization": "", "X-API-Key": keys[key_id]}
        )
        assert response.status_code == expected, (key_id, path, response.text)
        assert keys[key_id] not in response.text
    for open_path in ("/livez", "/readyz", "/docs.json", "/metrics"):
        assert client.get(open_path, headers=anonymous).status_code == 200, open_path


def test_predict_answers_carry_band_version_and_request_id(client, records) -> None:
    response = client.post("/predict", json={"records": records.head(5).to_dict("records")})
    body = response.json()
    assert response.status_code == 200
    for prediction in body["predictions"]:
        expected = "high" if prediction["probability"] >= body["operating_threshold"] else None
        assert prediction["risk_band"] in {"low", "elevated", "high"}
        assert expected is None or prediction["risk_band"] == expected
    assert body["model"]["version"] and len(body["request_id"]) == 32


def test_limits(client, records: pd.DataFrame) -> None:
    from clinml.settings import Settings as S

    too_many = records.head(1).to_dict("records") * (S().max_records_per_request + 1)
    response = client.post("/predict", json={"records": too_many})
    assert response.status_code in (413, 422)
    huge = b'{"records": [' + b" " * (S().max_body_bytes + 10) + b"]}"
    response = client.post("/predict", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.post("/predict", json={"records": []}).status_code == 422
    # the prediction endpoints are answered ahead of FastAPI, for POST only
    assert client.get("/predict").status_code == 405
    assert client.put("/predict_patient", json={"patient_ids": ["x"]}).status_code == 405


def test_model_and_card(client) -> None:
    info = client.get("/model").json()
    assert info["name"] == "pathology" and info["alias"] == "champion"
    assert info["feature_service"] == "pathology_v1" and info["trained_at"]
    assert 0 < info["operating_threshold"] < 1
    assert info["metrics"]["roc_auc"]["ci_low"] <= info["metrics"]["roc_auc"]["value"]
    assert info["model_card"] == "/model/card" and info["execution"] == "compiled fast path"
    card = client.get("/model/card")
    assert card.status_code == 200 and "Intended use" in card.text
    paths = client.get("/docs.json").json()["paths"]
    assert {"/predict", "/predict_patient", "/explain", "/model", "/admin/reload"} <= set(paths)


def test_explain_names_input_features(client, records: pd.DataFrame, pathology_spec) -> None:
    response = client.post(
        "/explain", json={"records": records.head(3).to_dict("records"), "top_k": 4}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"]
    for explanation in body["explanations"]:
        names = [c["feature"] for c in explanation["contributions"]]
        assert len(names) == 4 and set(names) <= set(pathology_spec.feature_names)
        sizes = [abs(c["contribution"]) for c in explanation["contributions"]]
        assert sizes == sorted(sizes, reverse=True)


def test_predict_patient_reads_the_online_store(client, pipeline, pathology_spec) -> None:
    from clinml.features.datasets import pathology

    settings, _, _ = pipeline
    raw = pathology.load(pathology_spec.source.seed, datetime.now(UTC))
    stored = set(pd.read_parquet(settings.paths.usecase("pathology").features_file)["patient_id"])
    pseudonymiser = settings.pseudonymiser()
    patients = [p for p in raw["patient_id"].head(20) if pseudonymiser.one(p) in stored]
    assert len(patients) >= 3
    response = client.post("/predict_patient", json={"patient_ids": patients[:3]})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3

    from clinml.serving.service import UNKNOWN

    unknown = client.post("/predict_patient", json={"patient_ids": [patients[0], "NOBODY-42"]})
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == [
        {"loc": ["patient_ids", 1], "msg": UNKNOWN, "type": "not_found"}  # only the unknown one
    ]
    assert "NOBODY" not in unknown.text and patients[0] not in unknown.text

    # the store holds each feature's newest value: asked for an earlier time, it has none
    past = client.post(
        "/predict_patient", json={"patient_ids": patients[:1], "as_of": "1990-01-01T00:00:00Z"}
    )
    assert past.status_code == 422
    assert {p["type"] for p in past.json()["detail"]} == {"recorded_after_as_of"}


def test_missing_features_of_a_known_patient_are_a_422_even_beside_an_unknown_one(
    client, monkeypatch
) -> None:
    """The store holds a row for the first patient, with one null (as a partly
    materialized store would), and nothing for the second."""
    service = service_instance()

    class Partial:
        def read(self, ids):
            return [{"mean_radius": (None, datetime.now(UTC))}, None]

        def close(self) -> None:
            pass

    monkeypatch.setattr(service, "_reader", Partial())
    response = client.post("/predict_patient", json={"patient_ids": ["P-1", "P-2"]})
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert {p["type"] for p in problems if p["loc"][1] == 0} == {"missing"}
    assert [p["type"] for p in problems if p["loc"][1] == 1] == ["not_found"]


def test_every_request_is_in_the_audit_trail(client, home: Path) -> None:
    from clinml.audit import AuditLog

    response = client.post("/predict_patient", json={"patient_ids": ["NOBODY-43"]})
    request_log = Settings(home=home).paths.request_audit_log
    wait_for(
        lambda: (
            request_log.is_file()
            and "NOBODY" not in request_log.read_text()
            and any(r["outcome"] == 404 for r in AuditLog(request_log).records())
        ),
        "the 404 in the audit trail",
    )
    assert service_instance().audit.flush(10)  # nothing still on its way to the file
    records = AuditLog(request_log).records()
    assert AuditLog(request_log).verify() == len(records) > 0
    assert any(r["endpoint"] == "/predict_patient" and r["outcome"] == 404 for r in records)
    assert {"request_id", "key_id", "model_version", "latency_ms"} <= set(records[-1])
    assert "NOBODY-43" not in request_log.read_text()
    assert response.status_code == 404


def test_metrics_count_predictions_errors_and_the_model_version(client, records) -> None:
    client.post("/predict", json={"records": records.head(2).to_dict("records")})
    client.post("/predict", json={"records": [{"mean_radius": "x"}]})
    client.post("/predict", json={"records": []}, headers={"Authorization": ""})
    text = client.get("/metrics").text
    assert 'clinml_errors_total{endpoint="/predict",kind="auth"}' in text
    assert 'clinml_predictions_total{endpoint="/predict",label=' in text
    assert 'clinml_errors_total{endpoint="/predict",kind="invalid_input"}' in text
    assert "clinml_request_duration_seconds_bucket" in text
    assert 'clinml_model_info{alias="champion",name="pathology",version=' in text

    # a path the service does not serve is caller-chosen text: never a metric label
    assert client.get("/patients/MRN-00424242").status_code == 404
    assert "MRN-00424242" not in client.get("/metrics").text


def test_champion_switch_under_concurrent_requests_fails_none(
    client, pipeline, records: pd.DataFrame
) -> None:
    """Runs after the governance test, which registered version 2."""
    from concurrent.futures import ThreadPoolExecutor

    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    tracker = Tracker.from_settings(settings)
    before = client.get("/model").json()["version"]
    target = "2" if before != "2" else "1"
    tracker.client.set_registered_model_alias("pathology", "champion", target)
    body = {"records": records.head(3).to_dict("records")}

    def call(_: int) -> tuple[int, str]:
        response = client.post("/predict", json=body)
        return response.status_code, response.json()["model"]["version"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        running = [pool.submit(call, i) for i in range(60)]
        reloaded = client.post("/admin/reload")
        results = [f.result() for f in running]
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json() == {"previous_version": before, "version": target, "changed": True}
    assert all(status == 200 for status, _ in results)
    assert {version for _, version in results} <= {before, target}
    assert client.post("/predict", json=body).json()["model"]["version"] == target
    assert client.get("/model").json()["version"] == target


def test_the_bento_model_serves_under_bentoml_serve_without_the_registry(
    pipeline, home: Path, records: pd.DataFrame, monkeypatch
) -> None:
    """A real `bentoml serve` process, its registry URI pointing nowhere."""
    import httpx

    from clinml.serving.launch import ServiceProcess, free_port

    settings, _, _ = pipeline
    monkeypatch.setenv("CLINML_TRACKING_URI", "sqlite:////nonexistent/registry/mlflow.db")
    serve_from_the_session_store(monkeypatch)
    key = api_keys(home)["app"]
    port = free_port()
    with ServiceProcess(settings, "pathology", port, home / "logs" / "serve-test.log") as served:
        body = {"records": records.head(2).to_dict("records")}
        assert httpx.post(f"{served.url}/predict", json=body, timeout=30).status_code == 401
        answer = httpx.post(
            f"{served.url}/predict", json=body, headers={"X-API-Key": key}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
        assert httpx.get(f"{served.url}/readyz", timeout=10).status_code == 200
    log = (home / "logs" / "serve-test.log").read_text()
    assert key not in log
    for value in records.head(2)["mean_radius"]:
        assert repr(value) not in log  # no raw feature values in the service log


def test_split_execution_batches_in_order_and_switches_champion_under_load(
    pipeline, home: Path, records: pd.DataFrame, monkeypatch
) -> None:
    """`CLINML_EXECUTION=split` under a real `bentoml serve`: the API calls a separate
    model-execution service through bentoml.depends, which batches concurrent requests.
    Batched answers equal one-at-a-time answers, record for record, and a champion
    switch under load fails nothing and labels every answer with its own version's
    threshold."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from clinml.serving.launch import ServiceProcess, free_port
    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    tracker = Tracker.from_settings(settings)
    monkeypatch.setenv("CLINML_EXECUTION", "split")
    monkeypatch.setenv("CLINML_BATCHING", "true")
    # Correctness, not load shedding: a busy CI machine must not shed calls past 2 s.
    monkeypatch.setenv("CLINML_MAX_BATCH_LATENCY_MS", "30000")
    serve_from_the_session_store(monkeypatch)
    headers = {"Authorization": f"Bearer {api_keys(home)['dev']}"}
    bodies = [{"records": records.iloc[i : i + 1 + i % 3].to_dict("records")} for i in range(20)]
    champion = tracker.version_by_alias("pathology").version
    log_file = home / "logs" / "serve-split.log"
    with (
        ServiceProcess(settings, "pathology", free_port(), log_file) as served,
        httpx.Client(base_url=served.url, headers=headers, timeout=60) as http,
    ):
        info = http.get("/model").json()
        assert info["execution_service"] == "split" and info["device"] == "cpu"
        before = info["version"]
        alone = [http.post("/predict", json=body).json() for body in bodies]

        def call(i: int) -> dict:
            response = http.post("/predict", json=bodies[i % len(bodies)])
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(max_workers=16) as pool:
            together = list(pool.map(call, range(80)))
        for i, answer in enumerate(together):
            got, expected = answer["predictions"], alone[i % len(bodies)]["predictions"]
            # order kept in batches; a batch's matrix products may round in the last bits
            assert [p["probability"] for p in got] == pytest.approx(
                [p["probability"] for p in expected], rel=0, abs=1e-12
            )
            assert [(p["label"], p["risk_band"]) for p in got] == [
                (p["label"], p["risk_band"]) for p in expected
            ]

        target = "2" if before != "2" else "1"
        thresholds = {
            v: float(tracker.client.get_model_version("pathology", v).tags["operating_threshold"])
            for v in (before, target)
        }
        tracker.client.set_registered_model_alias("pathology", "champion", target)
        try:
            with ThreadPoolExecutor(max_workers=16) as pool:
                running = [pool.submit(call, i) for i in range(120)]
                reloaded = http.post("/admin/reload")
                answers = [f.result() for f in running]
        finally:
            tracker.client.set_registered_model_alias("pathology", "champion", champion)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["version"] == target
        for answer in answers:
            version = answer["model"]["version"]
            assert version in {before, target}
            assert answer["operating_threshold"] == pytest.approx(thresholds[version])
        assert http.post("/predict", json=bodies[0]).json()["model"]["version"] == target
        metrics = http.get("/metrics").text
    assert 'clinml_model_info{alias="champion",name="pathology",version="' + target in metrics
    log = log_file.read_text()
    assert "CUDA is not available, falling back to the CPU" in log
    assert "clinml-model" in log  # the model-execution service ran as its own service


def test_audit_verify_cli(pipeline, home: Path) -> None:
    result = clinml(home, "audit", "verify")
    assert result.returncode == 0, result.stderr
    assert "model registry" in result.stdout and "chain intact" in result.stdout


def test_monitor_window_labels_and_webhook_alerts(client, pipeline, home: Path, records) -> None:
    """`clinml monitor --window` on the prediction log the service wrote, performance from
    labels ingested by request id, and alerts to a real local webhook, deduplicated."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from clinml.predictionlog import read_predictions

    settings, _, _ = pipeline
    answers = [
        client.post("/predict", json={"records": [row]}).json()
        for row in records.to_dict("records")
    ]
    paths = settings.paths.usecase("pathology")
    wait_for(  # the log is written in batches
        # Nothing written yet reads as a frame without columns.
        lambda: (
            set(a["request_id"] for a in answers)
            <= set(read_predictions(paths.predictions).get("request_id", ()))
        ),
        "every answer in the prediction log",
        every_s=0.2,
    )
    outcomes = pd.DataFrame(
        {
            "request_id": [a["request_id"] for a in answers],
            "outcome": [1 if a["predictions"][0]["label"] == "malignant" else 0 for a in answers],
            "time": datetime.now(UTC).isoformat(),
        }
    )
    outcomes.to_csv(home / "outcomes.csv", index=False)
    ingested = clinml(home, "labels", "ingest", "pathology", str(home / "outcomes.csv"))
    assert ingested.returncode == 0, ingested.stderr
    assert f"{len(answers)} outcomes stored" in ingested.stdout

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"CLINML_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/hook?token=T0KEN"}
    try:
        first = clinml(home, "monitor", "pathology", "--window", "1d", env=env)
        again = clinml(home, "monitor", "pathology", "--window", "1d", env=env)
    finally:
        server.shutdown()
    assert first.returncode in (0, 1), first.stderr
    verdict_path = Path(first.stdout.strip().splitlines()[-1].removeprefix("verdict: "))
    verdict = json.loads(verdict_path.read_text())
    assert verdict["exit_code"] == first.returncode
    assert verdict["drift"]["current_rows"] >= len(answers)
    assert {f["feature"] for f in verdict["drift"]["features"]} == set(records.columns)
    assert (verdict_path.parent / "drift.html").is_file()
    assert (paths.evidently_workspace).is_dir()
    # The labelled window is drawn: performance.html beside the verdict, named on stdout.
    assert verdict["performance"] and verdict["performance_html"]
    report = Path(verdict["performance_html"])
    assert report == verdict_path.parent / "performance.html" and report.is_file()
    assert f"performance over time: {report}" in first.stdout
    if first.returncode == 1:  # alerts went to the webhook once, then the cooldown held
        assert len(received) == 1 and received[0]["alerts"]
        assert "suppressed by cooldown" in again.stdout and again.returncode == 1
    assert "T0KEN" not in first.stdout + first.stderr
    empty = clinml(home, "monitor", "pathology", "--since", "2001-01-01", "--until", "2001-01-08")
    assert empty.returncode == 2 and "no predictions logged" in empty.stderr


def test_retrain_on_drift_registers_a_challenger_and_never_promotes(
    pipeline, home: Path, pathology_spec: UseCaseSpec
) -> None:
    from clinml.features.datasets.batches import sample_batch
    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    paths = settings.paths.usecase("pathology")
    features, labels = pd.read_parquet(paths.features_file), pd.read_parquet(paths.labels_file)
    shifted = sample_batch(features, labels, pathology_spec, 150, seed=2, positive_share=0.9)
    shifted.to_parquet(home / "retrain-shifted.parquet")
    tracker = Tracker.from_settings(settings)
    champion = tracker.version_by_alias("pathology").version
    before = {v.version for v in tracker.client.search_model_versions("name='pathology'")}
    result = clinml(
        home,
        "monitor",
        "pathology",
        "--batch",
        str(home / "retrain-shifted.parquet"),
        "--retrain-on-drift",
        "--no-subgroups",
    )
    assert result.returncode == 1, result.stderr
    after = {v.version for v in tracker.client.search_model_versions("name='pathology'")}
    [new] = after - before
    assert f"retrained: challenger version {new} registered" in result.stdout
    assert tracker.version_by_alias("pathology", "challenger").version == new
    assert tracker.version_by_alias("pathology").version == champion  # never promoted
