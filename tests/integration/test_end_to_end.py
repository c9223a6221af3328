"""The whole pipeline in a temporary data directory, then the service and the monitor.

ingest -> validate -> Feast -> train (4 candidates) -> register champion -> BentoML store
-> ``/predict`` through the service's ASGI app, checked against the registered model
loaded from MLflow -> ``clinml monitor`` exit codes -> ``bentoml build``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    """Run ingest, materialize, train and package as `clinml run` does, into ``home``."""
    from pipelines import stages
    from pipelines.progress import Progress

    settings = Settings(home=home)
    lines: list[str] = []
    progress = Progress(total=5, echo=lines.append)
    stages.ingest(pathology_spec, settings, progress)
    stages.materialize(pathology_spec, settings, progress, full=True)
    version = stages.train(pathology_spec, settings, progress)
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
        assert any(line.strip().startswith(candidate) for line in lines), candidate
    assert f"registered as pathology version {version}" in text
    assert version == "1"


def test_every_candidate_is_a_run_and_the_best_is_champion(
    pipeline, pathology_spec: UseCaseSpec
) -> None:
    from training.tracking import Tracker

    settings, version, _ = pipeline
    tracker = Tracker.from_settings(settings)
    client = tracker.client
    experiment = client.get_experiment_by_name("pathology")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["candidate"] for r in runs) == ["gbm", "mlp", "rf", "svm"]
    for run in runs:
        assert {"roc_auc", "accuracy", "precision", "recall", "f1"} <= set(run.data.metrics)
    champion = tracker.version_by_alias("pathology")
    assert str(champion.version) == version
    best = max(runs, key=lambda r: r.data.metrics["roc_auc"])
    assert champion.run_id == best.info.run_id
    assert champion.tags["feature_service"] == "pathology_v1"
    assert champion.tags["spec_sha256"] == pathology_spec.fingerprint()
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
