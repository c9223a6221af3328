"""The whole pipeline in a temporary data directory, then the service and the monitor.

ingest -> validate -> Feast -> train (4 candidates) -> register the challenger -> gated
promotion -> BentoML store -> ``/predict`` through the service's ASGI app, checked against
the registered model loaded from MLflow -> ``clinml monitor`` exit codes -> ``bentoml
build`` -> a second training, a refused and a forced promotion, rollback, and the
``clinml models`` views of all of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.settings import Settings
from clinml.spec import UseCaseSpec
from tests.conftest import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clinml-home")


@pytest.fixture(scope="module")
def pipeline(home: Path, pathology_spec: UseCaseSpec):
    """Run ingest, materialize, train, promote and package as `clinml run` does."""
    from pipelines import stages
    from pipelines.progress import Progress

    settings = Settings(home=home, actor="e2e-test")
    lines: list[str] = []
    progress = Progress(total=6, echo=lines.append)
    stages.ingest(pathology_spec, settings, progress)
    stages.materialize(pathology_spec, settings, progress, full=True)
    version = stages.train(pathology_spec, settings, progress)
    stages.promote(pathology_spec, settings, progress)
    stages.package(pathology_spec, settings, progress)
    return settings, version, lines


@pytest.fixture(scope="module")
def client(pipeline, home: Path):
    """The service's ASGI app (built once: BentoML's metrics registry is global)."""
    from starlette.testclient import TestClient

    os.environ["CLINML_HOME"] = str(home)
    os.environ["CLINML_USECASE"] = "pathology"
    from serving.service import ClinicalService

    with TestClient(ClinicalService.to_asgi()) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def records(pipeline, pathology_spec: UseCaseSpec) -> pd.DataFrame:
    settings, _, _ = pipeline
    features = pd.read_parquet(settings.paths.usecase("pathology").features_file)
    return (
        features[pathology_spec.feature_names].sample(n=25, random_state=4).reset_index(drop=True)
    )


def test_pipeline_reports_every_stage(pipeline) -> None:
    _, version, lines = pipeline
    text = "\n".join(lines)
    assert "137 checks (spec) passed on 569 rows" in text
    assert "reference profile learned from this batch" in text
    assert "dropped identifier columns: mrn; patient_id pseudonymised" in text
    assert "full load of" in text and "newest of 569 entities written" in text
    for candidate in ("svm", "rf", "gbm", "mlp"):
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
    from training.tracking import Tracker

    settings, version, _ = pipeline
    tracker = Tracker.from_settings(settings)
    client = tracker.client
    experiment = client.get_experiment_by_name("pathology")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["candidate"] for r in runs) == ["gbm", "mlp", "rf", "svm"]
    from training.metrics import METRICS

    for run in runs:
        metrics = run.data.metrics
        for name in METRICS:  # every metric with its bootstrap CI
            assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
        assert {"tn", "fp", "fn", "tp", "operating_threshold", "cv_roc_auc"} <= set(metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert artifacts == {"plots/roc.png", "plots/precision_recall.png", "plots/calibration.png"}
        evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert (
            "evaluation/subgroups.csv" in evaluation
            and "evaluation/search_trials.csv" in evaluation
        )
    champion = tracker.version_by_alias("pathology")
    assert str(champion.version) == version
    # Selection is by cross-validated score: the test split chooses nothing.
    best = max(runs, key=lambda r: r.data.metrics["cv_roc_auc"])
    assert champion.run_id == best.info.run_id
    tags = champion.tags
    assert tags["feature_service"] == "pathology_v1" and tags["feature_service_version"] == "1"
    assert tags["spec_sha256"] == pathology_spec.fingerprint()
    assert len(tags["data_fingerprint"]) == 64 and tags["git_commit"]
    assert json.loads(tags["packages"])["scikit-learn"] == "1.9.1"
    if best.data.params["candidate"] == "svm":
        assert best.data.params["svm_variant"] == "rbf_kernel"  # 426 rows: exact kernel
    # The champion's model has a signature and an input example.
    from mlflow.models import get_model_info

    info = get_model_info("models:/pathology@champion")
    assert [c.name for c in info.signature.inputs.inputs] == pathology_spec.feature_names
    assert info.saved_input_example_info is not None
    # The drift reference is stored with the run and holds no patient ids or dates.
    from training.train import load_reference

    reference = load_reference(tracker, "pathology")
    assert "patient_id" not in reference.columns and "event_timestamp" not in reference.columns
    assert set(pathology_spec.feature_names) <= set(reference.columns)


def test_predict_matches_the_registered_model(client, pipeline, records: pd.DataFrame) -> None:
    import mlflow.pyfunc

    from training.tracking import Tracker

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
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-9)  # same values, same order
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
    assert response.status_code == 400
    assert "123456" not in response.text and "SECRET" not in response.text
    located = {tuple(d["loc"]) for d in response.json()["detail"]}
    assert located == {("records", 0, "mean_radius"), ("records", 0, "worst_area")}

    missing = records.iloc[0].to_dict()
    del missing["mean_area"]
    response = client.post("/predict", json={"records": [missing]})
    assert response.status_code == 400
    assert response.json()["detail"][0]["loc"] == ["records", 0, "mean_area"]

    response = client.post(
        "/predict", content=b'{"records": [SECRET', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "SECRET" not in response.text


def test_health_and_openapi(client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    schema = client.get("/docs.json").json()
    assert "/predict" in schema["paths"]
    docs_page = client.get("/")
    assert docs_page.status_code == 200 and "swagger" in docs_page.text.lower()


def test_monitor_cli_exit_codes(pipeline, home: Path, pathology_spec: UseCaseSpec) -> None:
    from features.datasets.batches import sample_batch

    settings, _, _ = pipeline
    paths = settings.paths.usecase("pathology")
    features, labels = pd.read_parquet(paths.features_file), pd.read_parquet(paths.labels_file)
    batches = {
        "unshifted": sample_batch(features, labels, pathology_spec, 150, seed=1),
        "shifted": sample_batch(features, labels, pathology_spec, 150, seed=2, positive_share=0.9),
    }
    clinml = Path(sys.executable).parent / "clinml"
    codes = {}
    for name, batch in batches.items():
        batch_file = home / f"{name}.parquet"
        batch.to_parquet(batch_file)
        result = subprocess.run(
            [
                str(clinml),
                "monitor",
                "pathology",
                "--batch",
                str(batch_file),
                "--out",
                str(home / name),
            ],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            env={**os.environ, "CLINML_HOME": str(home)},
            timeout=300,
        )
        assert "Traceback" not in result.stderr, result.stderr
        codes[name] = result.returncode
        verdict = json.loads((home / name / "drift.json").read_text())
        assert (home / name / "drift.html").is_file()
        assert result.stdout.splitlines()[0].startswith("DRIFT" if verdict["drift"] else "no drift")
    assert codes == {"unshifted": 0, "shifted": 1}


def test_bentoml_build_succeeds_offline(pipeline) -> None:
    """The bento holds the service code, the spec and a reference to the imported champion."""
    import bentoml
    import yaml

    from serving.package import build_bento

    tag = build_bento(PROJECT_ROOT)
    bento = bentoml.get(tag)
    manifest = yaml.safe_load(Path(bento.path_of("bento.yaml")).read_text())
    [service] = manifest["services"]
    assert [m["tag"].split(":")[0] for m in service["models"]] == ["pathology"]
    assert Path(bento.path_of("src/configs/pathology.yaml")).is_file()
    assert Path(bento.path_of("src/serving/service.py")).is_file()
    assert not list(Path(bento.path_of("src")).rglob("*.parquet"))  # no data in the bento


def _clinml(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    clinml = Path(sys.executable).parent / "clinml"
    return subprocess.run(
        [str(clinml), *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "CLINML_HOME": str(home), "CLINML_ACTOR": "e2e-cli"},
        timeout=600,
    )


def test_governance_refuse_force_rollback_and_history(
    pipeline, home: Path, pathology_spec: UseCaseSpec
) -> None:
    """A second training, a refused then forced promotion, a rollback, all audited."""
    from clinml.audit import AuditLog
    from pipelines import stages
    from pipelines.progress import Progress
    from training.governance import FORCED_PROMOTE, PROMOTE, REFUSED, ROLLBACK, PromotionRefused
    from training.tracking import Tracker

    settings, _, _ = pipeline
    tracker = Tracker.from_settings(settings)
    quiet = Progress(total=1, echo=lambda _: None)
    assert stages.train(pathology_spec, settings, quiet) == "2"
    assert str(tracker.version_by_alias("pathology", "challenger").version) == "2"

    # A batch that fails data validation arrives: the gate now refuses, names why, and
    # nothing moves.
    from features.datasets import pathology

    bad = pathology.load(pathology_spec.source.seed, datetime.now(UTC)).head(100)
    bad["mean_radius"] = 900.0  # far outside the spec's range
    bad_file = home / "bad-batch.csv"
    bad.to_csv(bad_file, index=False)
    checked = _clinml(home, "validate", "pathology", "--data", str(bad_file))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    with pytest.raises(PromotionRefused, match="latest validation run FAILED"):
        stages.promote(pathology_spec, settings, quiet)
    assert str(tracker.version_by_alias("pathology").version) == "1"

    refused = _clinml(home, "promote", str(PROJECT_ROOT / "configs" / "pathology.yaml"), "--force")
    assert refused.returncode == 2 and "--force needs --reason" in refused.stderr

    decision = stages.promote(
        pathology_spec, settings, quiet, force=True, reason="CAB-1234 approved"
    )
    assert decision.action == FORCED_PROMOTE and not decision.passed
    assert str(tracker.version_by_alias("pathology").version) == "2"
    assert str(tracker.version_by_alias("pathology", "previous_champion").version) == "1"

    rolled = _clinml(home, "rollback", "pathology", "--reason", "alerts doubled on ward 7")
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

    history = _clinml(home, "models", "history", "pathology")
    assert history.returncode == 0, history.stderr
    assert "forced-promote" in history.stdout and "CAB-1234 approved" in history.stdout
    assert "chain verified" in history.stdout

    listing = _clinml(home, "models", "list", "pathology")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "champion" in rows["1"] and "previous_champion" not in rows["1"]

    shown = _clinml(home, "models", "show", "pathology", "2")
    assert shown.returncode == 0 and "data_fingerprint" in shown.stdout and "[" in shown.stdout

    card = _clinml(home, "models", "card", "pathology", "champion")
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

    nothing = _clinml(home, "rollback", "pathology")
    assert nothing.returncode == 2 and "no previous champion" in nothing.stderr
