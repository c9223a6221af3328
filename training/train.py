"""The training stage: candidates on a point-in-time frame, logged and registered in MLflow.

``run`` pulls the training frame from Feast (never from the raw file), splits it by
patient so no patient is on both sides, trains every candidate in the spec, logs each as
an MLflow run (parameters, held-out metrics, the model with a signature and an input
example, and a PHI-free reference snapshot for drift monitoring), registers the best by
the spec's primary metric as a new version of the model named after the use case, and
points the ``champion`` alias at it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError, SpecError
from clinml.spec import UseCaseSpec
from features.store import training_frame
from training import model_io
from training.candidates import build_pipeline, svm_variant
from training.evaluate import evaluate
from training.tracking import CHAMPION, Tracker

if TYPE_CHECKING:
    from feast import FeatureStore

REFERENCE_ARTIFACT = "reference"
REFERENCE_FILE = "reference.parquet"
# The model's runtime needs, pinned to what trained it (requirement inference is slow
# and records unrelated packages).
MODEL_REQUIREMENTS = ["mlflow", "scikit-learn", "skops", "pandas", "numpy", "torch"]


@dataclass(frozen=True)
class CandidateResult:
    name: str
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    fit_seconds: float


@dataclass(frozen=True)
class TrainResult:
    model_name: str
    version: str
    champion: CandidateResult
    candidates: list[CandidateResult] = field(default_factory=list)
    train_rows: int = 0
    test_rows: int = 0
    test_patients: int = 0


def patient_split(frame: pd.DataFrame, spec: UseCaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a train/test split with every patient on exactly one side."""
    from sklearn.model_selection import GroupShuffleSplit

    splitter = GroupShuffleSplit(
        n_splits=1, test_size=spec.training.test_size, random_state=spec.training.seed
    )
    train, test = next(splitter.split(frame, groups=frame[spec.entity.key]))
    return train, test


def outcome(frame: pd.DataFrame, spec: UseCaseSpec) -> np.ndarray:
    """1 where the label is the positive class, else 0."""
    return (frame[spec.label.column] == spec.label.positive_class).to_numpy(dtype=int)


def signature(spec: UseCaseSpec) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    kinds = {"float": "double", "int": "long", "category": "string"}
    inputs = Schema([ColSpec(kinds[c.type], c.name) for c in spec.features])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "probability")]))


def _requirements() -> list[str]:
    return [f"{name}=={installed_version(name)}" for name in MODEL_REQUIREMENTS]


def _fit(
    name: str, spec: UseCaseSpec, params: dict[str, Any], x: pd.DataFrame, y: np.ndarray
) -> Any:
    from sklearn.utils._param_validation import InvalidParameterError

    pipeline = build_pipeline(name, spec, params, spec.training.seed, n_rows=len(x))
    try:
        return pipeline.fit(x, y)
    except InvalidParameterError as exc:
        raise SpecError(f"training.candidates.{name}: {exc}") from None


def run(
    spec: UseCaseSpec,
    store: FeatureStore,
    tracker: Tracker,
    events: pd.DataFrame,
    report: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Train, evaluate, log and register every candidate in the spec.

    Args:
        spec: the use-case spec.
        store: an applied, populated Feast store.
        tracker: where runs and the registered model go.
        events: entity key, event timestamp and label for each training event.
        report: receives one progress line per candidate.

    Returns:
        Every candidate's run and metrics, and the registered champion version.
    """
    import mlflow

    frame = training_frame(store, spec, events)
    missing = frame[spec.feature_names].isna().any(axis=1)
    if missing.any():
        raise ClinmlError(
            f"{int(missing.sum())} training events have no feature values at their timestamp; "
            "check that features were ingested and applied"
        )
    y = outcome(frame, spec)
    train_idx, test_idx = patient_split(frame, spec)
    x_train, x_test = frame.iloc[train_idx], frame.iloc[test_idx]
    y_train, y_test = y[train_idx], y[test_idx]
    if len(np.unique(y_test)) < 2:
        raise ClinmlError("the held-out split has only one class; use more data or another seed")

    tracker.activate()
    experiment_id = tracker.experiment_id(spec.name)
    threshold = spec.evaluation.operating_threshold
    results: list[CandidateResult] = []
    for name, params in spec.training.candidates.items():
        started = time.perf_counter()
        pipeline = _fit(name, spec, params, x_train[spec.feature_names], y_train)
        fit_seconds = time.perf_counter() - started
        probability = pipeline.predict_proba(x_test[spec.feature_names])[:, 1]
        metrics = evaluate(y_test, probability, threshold)
        manifest = {
            "usecase": spec.name,
            "candidate": name,
            "features": spec.feature_names,
            "positive_class": spec.label.positive_class,
            "negative_class": spec.label.negative_class,
            "operating_threshold": threshold,
            "feature_service": spec.feature_service,
        }
        reference = x_train[[*spec.feature_names, *(a.name for a in spec.attributes)]].assign(
            outcome=y_train, probability=pipeline.predict_proba(x_train[spec.feature_names])[:, 1]
        )
        with (
            mlflow.start_run(experiment_id=experiment_id, run_name=name) as active,
            tempfile.TemporaryDirectory() as tmp,
        ):
            mlflow.set_tags(
                {
                    "clinml.usecase": spec.name,
                    "clinml.candidate": name,
                    "clinml.feature_service": spec.feature_service,
                    "clinml.spec_sha256": spec.fingerprint(),
                }
            )
            mlflow.log_params({"candidate": name, **{f"hp.{k}": v for k, v in params.items()}})
            mlflow.log_params({"train_rows": len(train_idx), "test_rows": len(test_idx)})
            if name == "svm":  # the scale choice is part of what was trained
                mlflow.log_param("svm_variant", svm_variant(params, len(train_idx)))
            mlflow.log_metrics({**metrics, "fit_seconds": fit_seconds})
            model_dir = model_io.save(pipeline, Path(tmp) / "model", manifest)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("mlflow_entry.py")),
                artifacts={"model": str(model_dir)},
                signature=signature(spec),
                input_example=x_test[spec.feature_names].head(3),
                pip_requirements=_requirements(),
            )
            reference_file = Path(tmp) / REFERENCE_FILE
            reference.to_parquet(reference_file, index=False)
            mlflow.log_artifact(str(reference_file), artifact_path=REFERENCE_ARTIFACT)
        result = CandidateResult(name, active.info.run_id, info.model_uri, metrics, fit_seconds)
        results.append(result)
        report(
            f"{name:<4} {spec.primary_metric}={metrics[spec.primary_metric]:.3f} "
            f"accuracy={metrics['accuracy']:.3f} recall={metrics['recall']:.3f} "
            f"({fit_seconds:.1f}s)"
        )

    best = max(results, key=lambda r: r.metrics[spec.primary_metric])
    tags = {
        "candidate": best.name,
        "feature_service": spec.feature_service,
        "spec_sha256": spec.fingerprint(),
        "run_id": best.run_id,
        "operating_threshold": str(threshold),
        f"test_{spec.primary_metric}": f"{best.metrics[spec.primary_metric]:.4f}",
    }
    registered = mlflow.register_model(best.model_uri, spec.name, tags=tags)
    tracker.client.set_registered_model_alias(spec.name, CHAMPION, registered.version)
    return TrainResult(
        model_name=spec.name,
        version=str(registered.version),
        champion=best,
        candidates=results,
        train_rows=len(train_idx),
        test_rows=len(test_idx),
        test_patients=int(frame.iloc[test_idx][spec.entity.key].nunique()),
    )


def load_reference(tracker: Tracker, model_name: str, alias: str = CHAMPION) -> pd.DataFrame:
    """The PHI-free training snapshot stored with the run behind a model alias."""
    from mlflow.artifacts import download_artifacts

    version = tracker.version_by_alias(model_name, alias)
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(
            run_id=version.run_id,
            artifact_path=f"{REFERENCE_ARTIFACT}/{REFERENCE_FILE}",
            dst_path=tmp,
            tracking_uri=tracker.uri,
        )
        return pd.read_parquet(local)
