"""The training stage: search, fit and evaluate every candidate; register the best.

``fit_candidates`` is the model work on a point-in-time frame, with no tracking:
a patient-disjoint test split (plus an optional temporal holdout of the most recent
months), a grouped cross-validated search per candidate, a refit of the best
configuration on all training rows, an operating threshold chosen by the spec's rule on
out-of-fold predictions, and a clinical evaluation on the held-out rows.

``run`` is the stage: it pulls the frame from Feast (never from the raw file), calls
``fit_candidates``, logs every candidate as an MLflow run (search trials, metrics with
CIs, confusion, calibration, subgroups, plots, the model, a PHI-free drift reference),
registers the candidate with the best cross-validated score as a new model version
tagged with its provenance, points the ``challenger`` alias at it and logs its model
card. Promotion to ``champion`` is a separate, gated step (``training.governance``).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError, SpecError
from clinml.spec import UseCaseSpec
from training import model_io
from training.candidates import build_pipeline, svm_variant
from training.evaluate import Evaluation, choose_threshold, evaluate
from training.search import SearchResult, search
from training.tracking import CHALLENGER, Tracker

if TYPE_CHECKING:
    from feast import FeatureStore

REFERENCE_ARTIFACT = "reference"
REFERENCE_FILE = "reference.parquet"
# Held-out (test split) probabilities: the reference for prediction drift. In-sample
# probabilities of the training rows would be more extreme than any served ones.
PREDICTION_REFERENCE_FILE = "predictions.parquet"
REFERENCE_MAX_ROWS = 50_000
CARD_ARTIFACT = "model_card"
# The model's runtime needs, pinned to what trained it (requirement inference is slow
# and records unrelated packages).
MODEL_REQUIREMENTS = ["mlflow", "scikit-learn", "skops", "pandas", "numpy", "torch"]
PROVENANCE_PACKAGES = [*MODEL_REQUIREMENTS, "feast", "great-expectations", "evidently", "bentoml"]


@dataclass(frozen=True)
class Split:
    """Row indices: training, the patient-disjoint test set, the temporal holdout."""

    train: np.ndarray
    test: np.ndarray
    temporal: np.ndarray
    temporal_start: pd.Timestamp | None = None


@dataclass(frozen=True)
class FittedCandidate:
    name: str
    pipeline: Any = field(repr=False)
    search: SearchResult = field(repr=False)
    threshold: float
    evaluation: Evaluation
    temporal: Evaluation | None
    fit_seconds: float
    test_probability: np.ndarray = field(repr=False)
    train_rows: int = 0

    @property
    def svm_variant(self) -> str | None:
        """For the SVM: the exact kernel or its approximation, by the refit's row count."""
        if self.name != "svm":
            return None
        return svm_variant(self.search.best_params, self.train_rows)


@dataclass(frozen=True)
class Fitted:
    """Every candidate fitted and evaluated on one frame."""

    frame: pd.DataFrame = field(repr=False)
    y: np.ndarray = field(repr=False)
    split: Split
    candidates: list[FittedCandidate]

    @property
    def selected(self) -> FittedCandidate:
        """The candidate with the best cross-validated score (the test set picks nothing)."""
        return max(self.candidates, key=lambda c: c.search.best_score)


@dataclass(frozen=True)
class CandidateResult:
    name: str
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    fit_seconds: float
    model_sha256: str = ""


@dataclass(frozen=True)
class TrainResult:
    model_name: str
    version: str
    selected: CandidateResult
    candidates: list[CandidateResult] = field(default_factory=list)
    train_rows: int = 0
    test_rows: int = 0
    test_patients: int = 0
    temporal_rows: int = 0
    card: dict[str, Any] = field(default_factory=dict, repr=False)


def outcome(frame: pd.DataFrame, spec: UseCaseSpec) -> np.ndarray:
    """1 where the label is the positive class, else 0."""
    return (frame[spec.label.column] == spec.label.positive_class).to_numpy(dtype=int)


def split_frame(frame: pd.DataFrame, spec: UseCaseSpec) -> Split:
    """Temporal holdout (if configured), then a patient-grouped train/test split of the rest."""
    from sklearn.model_selection import GroupShuffleSplit

    pool = np.arange(len(frame))
    temporal = np.array([], dtype=int)
    start = None
    months = spec.training.temporal_holdout_months
    if months:
        times = pd.to_datetime(frame[spec.event_timestamp], utc=True)
        start = times.max() - pd.Timedelta(days=months * 30.4375)
        recent = (times >= start).to_numpy()
        temporal, pool = np.flatnonzero(recent), np.flatnonzero(~recent)
        if len(temporal) == 0 or len(pool) == 0:
            raise SpecError(
                f"training.temporal_holdout_months: {months} months leaves "
                f"{len(pool)} rows to train on and {len(temporal)} to hold out"
            )
    splitter = GroupShuffleSplit(
        n_splits=1, test_size=spec.training.test_size, random_state=spec.training.seed
    )
    train, test = next(splitter.split(pool, groups=frame[spec.entity.key].to_numpy()[pool]))
    return Split(np.sort(pool[train]), np.sort(pool[test]), temporal, start)


def fit_candidates(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    report: Callable[[str], None] = lambda _: None,
    n_boot: int | None = None,
) -> Fitted:
    """Search, refit and evaluate every candidate in the spec on ``frame``.

    Args:
        spec: the use-case spec.
        frame: one row per labelled event: entity key, event timestamp, label, features
            and attributes.
        report: receives progress lines.
        n_boot: bootstrap resamples (default: the spec's).
    """
    from sklearn.utils._param_validation import InvalidParameterError

    features = spec.feature_names
    required = [c.name for c in spec.features if not c.nullable]
    missing = frame[required].isna().any(axis=1)
    if missing.any():
        rows = int(missing.sum())
        raise ClinmlError(
            f"{rows} training events have no feature values at their timestamp; "
            "check that features were ingested and materialized"
        )
    y = outcome(frame, spec)
    split = split_frame(frame, spec)
    for name, rows in (("training", split.train), ("held-out test", split.test)):
        if len(np.unique(y[rows])) < 2:
            raise ClinmlError(f"the {name} split has only one class; use more data or another seed")
    patients = frame[spec.entity.key].to_numpy()
    x_train, y_train = frame.iloc[split.train][features], y[split.train]
    x_test, y_test = frame.iloc[split.test][features], y[split.test]
    attributes = frame[spec.sensitive_attributes]
    report(
        f"{len(split.train):,} training rows, {len(split.test):,} test rows "
        f"({len(np.unique(patients[split.test])):,} patients, none in training)"
        + (f", {len(split.temporal):,} temporal-holdout rows" if len(split.temporal) else "")
    )
    fitted: list[FittedCandidate] = []
    for name in spec.training.candidates:
        result = search(name, spec, x_train, y_train, patients[split.train], report=report)
        started = time.perf_counter()
        pipeline = build_pipeline(name, spec, result.best_params, spec.training.seed, len(x_train))
        try:
            pipeline.fit(x_train, y_train)
        except (InvalidParameterError, TypeError) as exc:
            raise SpecError(f"training.candidates.{name}: {exc}") from None
        fit_seconds = time.perf_counter() - started
        threshold = choose_threshold(spec, result.oof_outcome, result.oof_probability)
        probability = pipeline.predict_proba(x_test)[:, 1]
        evaluation = evaluate(
            spec,
            y_test,
            probability,
            threshold,
            patients[split.test],
            attributes.iloc[split.test],
            n_boot=n_boot,
        )
        temporal = None
        if len(split.temporal):
            x_recent = frame.iloc[split.temporal][features]
            temporal = evaluate(
                spec,
                y[split.temporal],
                pipeline.predict_proba(x_recent)[:, 1],
                threshold,
                patients[split.temporal],
                attributes.iloc[split.temporal],
                n_boot=n_boot,
            )
        fitted.append(
            FittedCandidate(
                name,
                pipeline,
                result,
                threshold,
                evaluation,
                temporal,
                fit_seconds,
                probability,
                train_rows=len(x_train),
            )
        )
        primary = spec.primary_metric
        low, high = evaluation.ci[primary]
        report(
            f"{name:<4} cv {result.scoring}={result.best_score:.3f} | test {primary}="
            f"{evaluation.metrics[primary]:.3f} [{low:.3f}, {high:.3f}] "
            f"ece={evaluation.metrics['ece']:.3f} threshold={threshold:.3f} "
            f"sensitivity={evaluation.metrics['sensitivity']:.3f} "
            + (f"| recent {primary}={temporal.metrics[primary]:.3f} " if temporal else "")
            + f"(search {result.seconds:.0f}s, fit {fit_seconds:.1f}s)"
        )
    return Fitted(frame, y, split, fitted)


def signature(spec: UseCaseSpec) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    kinds = {"float": "double", "int": "long", "category": "string"}
    inputs = Schema(
        [ColSpec(kinds[c.type], c.name, required=not c.nullable) for c in spec.features]
    )
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "probability")]))


def data_fingerprint(frame: pd.DataFrame, spec: UseCaseSpec) -> str:
    """SHA-256 over the training frame's keys, timestamps, labels, features and attributes."""
    columns = [
        spec.entity.key,
        spec.event_timestamp,
        spec.label.column,
        *(c.name for c in spec.columns),
    ]
    hashed = pd.util.hash_pandas_object(frame[columns], index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def git_commit() -> str:
    """The source commit, ``-dirty`` if it has uncommitted changes, or ``unknown``."""
    from clinml.settings import PROJECT_ROOT

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = installed_version(name)
        except PackageNotFoundError:
            continue
    return out


def _requirements() -> list[str]:
    return [f"{name}=={installed_version(name)}" for name in MODEL_REQUIREMENTS]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def _log_candidate(
    spec: UseCaseSpec,
    fitted: Fitted,
    candidate: FittedCandidate,
    experiment_id: str,
    fingerprint: str,
    workdir: Path,
) -> CandidateResult:
    import mlflow

    from training.metrics import plot_curves

    frame, split = fitted.frame, fitted.split
    result = candidate.search
    manifest = {
        "usecase": spec.name,
        "candidate": candidate.name,
        "features": spec.feature_names,
        "positive_class": spec.label.positive_class,
        "negative_class": spec.label.negative_class,
        "operating_threshold": candidate.threshold,
        "feature_service": spec.feature_service,
    }
    out = workdir / candidate.name
    out.mkdir()
    train_rows = frame.iloc[split.train].assign(outcome=fitted.y[split.train])
    if len(train_rows) > REFERENCE_MAX_ROWS:  # sample before predicting, not after
        train_rows = train_rows.sample(REFERENCE_MAX_ROWS, random_state=spec.training.seed)
    reference = train_rows[
        [*spec.feature_names, *(a.name for a in spec.attributes), "outcome"]
    ].assign(probability=candidate.pipeline.predict_proba(train_rows[spec.feature_names])[:, 1])
    with mlflow.start_run(experiment_id=experiment_id, run_name=candidate.name) as active:
        mlflow.set_tags(
            {
                "clinml.usecase": spec.name,
                "clinml.candidate": candidate.name,
                "clinml.feature_service": spec.feature_service,
                "clinml.spec_sha256": spec.fingerprint(),
                "clinml.data_fingerprint": fingerprint,
            }
        )
        params = {f"hp.{k}": v for k, v in result.best_params.items()}
        mlflow.log_params({"candidate": candidate.name, **params})
        mlflow.log_params(
            {
                "train_rows": len(split.train),
                "test_rows": len(split.test),
                "temporal_rows": len(split.temporal),
                "search_rows": result.search_rows,
                "search_trials": len(result.trials),
                "search_scoring": result.scoring,
                "cv_folds": spec.training.search.cv_folds,
                "class_weight": spec.training.class_weight,
                "threshold_rule": spec.evaluation.threshold_rule,
            }
        )
        if candidate.svm_variant:  # the scale choice is part of what was trained
            mlflow.log_param("svm_variant", candidate.svm_variant)
        mlflow.log_metrics(
            {
                **candidate.evaluation.flat(),
                **(candidate.temporal.flat("temporal_") if candidate.temporal else {}),
                f"cv_{result.scoring}": result.best_score,
                "fit_seconds": candidate.fit_seconds,
                "search_seconds": result.seconds,
            }
        )
        report = {
            "evaluation": candidate.evaluation.to_dict(spec.primary_metric),
            "temporal_holdout": (
                candidate.temporal.to_dict(spec.primary_metric) if candidate.temporal else None
            ),
        }
        (out / "evaluation.json").write_text(json.dumps(_json_safe(report), indent=2))
        candidate.evaluation.subgroups.to_csv(out / "subgroups.csv", index=False)
        candidate.evaluation.calibration.to_csv(out / "calibration.csv", index=False)
        result.trials_frame().to_csv(out / "search_trials.csv", index=False)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        plots = plot_curves(
            {candidate.name: (fitted.y[split.test], candidate.test_probability)},
            out / "plots",
            n_bins=spec.evaluation.calibration_bins,
        )
        mlflow.log_artifacts(str(next(iter(plots.values())).parent), artifact_path="plots")
        model_dir = model_io.save(candidate.pipeline, out / "model", manifest)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("mlflow_entry.py")),
            artifacts={"model": str(model_dir)},
            signature=signature(spec),
            input_example=frame.iloc[split.test][spec.feature_names].head(3),
            pip_requirements=_requirements(),
        )
        reference_file = out / REFERENCE_FILE
        reference.to_parquet(reference_file, index=False)
        mlflow.log_artifact(str(reference_file), artifact_path=REFERENCE_ARTIFACT)
        held_out = out / PREDICTION_REFERENCE_FILE
        pd.DataFrame(
            {"probability": candidate.test_probability, "outcome": fitted.y[split.test]}
        ).to_parquet(held_out, index=False)
        mlflow.log_artifact(str(held_out), artifact_path=REFERENCE_ARTIFACT)
    return CandidateResult(
        candidate.name,
        active.info.run_id,
        info.model_uri,
        candidate.evaluation.flat(),
        candidate.fit_seconds,
        model_io.sha256_of(model_dir / model_io.MODEL_FILE),
    )


def build_card(
    spec: UseCaseSpec,
    fitted: Fitted,
    model: dict[str, Any],
    fingerprint: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The model card of the selected candidate, as JSON-ready data."""
    frame, split, selected = fitted.frame, fitted.split, fitted.selected
    train = frame.iloc[split.train]
    times = pd.to_datetime(train[spec.event_timestamp], utc=True)
    evaluation = selected.evaluation.to_dict(spec.primary_metric)
    if selected.temporal is not None:
        recent = pd.to_datetime(frame.iloc[split.temporal][spec.event_timestamp], utc=True)
        evaluation["temporal_holdout"] = {
            **selected.temporal.to_dict(spec.primary_metric)["metrics"],
            "window_start": recent.min().isoformat(),
            "window_end": recent.max().isoformat(),
            "rows": len(split.temporal),
        }
    else:
        evaluation["temporal_holdout"] = None
    too_small = selected.evaluation.subgroups
    limitations = list(spec.limitations)
    if not too_small.empty and (~too_small["evaluated"]).any():
        limitations.append(
            f"{int((~too_small['evaluated']).sum())} subgroup(s) have fewer than "
            f"{spec.evaluation.min_group_size} test rows and were not evaluated."
        )
    limitations.append(
        "Metrics come from a patient-disjoint split of the same data window; performance on "
        "later data, other sites or other populations may differ."
    )
    label = f"{spec.label.column} = {spec.label.positive_class}"
    return _json_safe(
        {
            "model": model,
            "use_case": {
                "name": spec.name,
                "description": spec.description,
                "intended_use": spec.intended_use,
                "out_of_scope_use": list(spec.out_of_scope_use),
                "label": label,
            },
            "training_data": {
                "window_start": times.min().isoformat(),
                "window_end": times.max().isoformat(),
                "rows": len(split.train),
                "patients": int(train[spec.entity.key].nunique()),
                "positives": int(fitted.y[split.train].sum()),
                "feature_service": spec.feature_service,
                "data_fingerprint": fingerprint,
                "features": spec.feature_names,
            },
            "evaluation": evaluation,
            "candidates": [
                {
                    "name": c.name,
                    "metrics": {
                        f"cv_{c.search.scoring}": c.search.best_score,
                        **{k: c.evaluation.metrics[k] for k in ("roc_auc", "ece", "brier")},
                    },
                    "selected": c is selected,
                }
                for c in fitted.candidates
            ],
            "limitations": limitations,
            "provenance": provenance,
        }
    )


def run(
    spec: UseCaseSpec,
    store: FeatureStore,
    tracker: Tracker,
    events: pd.DataFrame,
    report: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Train, evaluate and log every candidate; register the best as the challenger.

    Args:
        spec: the use-case spec.
        store: an applied, populated Feast store.
        tracker: where runs and the registered model go.
        events: entity key, event timestamp and label for each training event.
        report: receives progress lines.

    Returns:
        Every candidate's run and metrics, and the registered version.
    """
    from features.store import training_frame

    frame = training_frame(store, spec, events)
    return register(spec, fit_candidates(spec, frame, report=report), tracker, report)


def register(
    spec: UseCaseSpec,
    fitted: Fitted,
    tracker: Tracker,
    report: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Log every fitted candidate as an MLflow run; register the selected one as challenger."""
    import mlflow

    from training.card import write_card
    from training.metrics import plot_curves

    frame = fitted.frame
    fingerprint = data_fingerprint(frame, spec)
    tracker.activate()
    experiment_id = tracker.experiment_id(spec.name)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = [
            _log_candidate(spec, fitted, c, experiment_id, fingerprint, workdir)
            for c in fitted.candidates
        ]
        best = results[fitted.candidates.index(fitted.selected)]
        selected = fitted.selected
        provenance = {
            "git_commit": git_commit(),
            "spec_sha256": spec.fingerprint(),
            "packages": package_versions(),
        }
        service_version = spec.feature_service.rsplit("_v", 1)[1]
        primary = spec.primary_metric
        tags = {
            "candidate": selected.name,
            "feature_service": spec.feature_service,
            "feature_service_version": service_version,
            "data_fingerprint": fingerprint,
            "git_commit": provenance["git_commit"],
            "spec_sha256": provenance["spec_sha256"],
            "packages": json.dumps(provenance["packages"], sort_keys=True),
            "run_id": best.run_id,
            # Serving refuses a model file whose hash differs from this one.
            "model_sha256": best.model_sha256,
            "operating_threshold": repr(selected.threshold),
            "threshold_rule": spec.evaluation.threshold_rule,
            f"test_{spec.primary_metric}": f"{selected.evaluation.metrics[primary]:.4f}",
            "test_ece": f"{selected.evaluation.metrics['ece']:.4f}",
        }
        registered = mlflow.register_model(best.model_uri, spec.name, tags=tags)
        version = str(registered.version)
        client = tracker.client
        client.set_registered_model_alias(spec.name, CHALLENGER, version)
        card = build_card(
            spec,
            fitted,
            {
                "name": spec.name,
                "version": version,
                "candidate": selected.name,
                "run_id": best.run_id,
                "created": datetime.now(UTC).isoformat(),
                "aliases": [CHALLENGER],
            },
            fingerprint,
            provenance,
        )
        write_card(card, workdir / CARD_ARTIFACT)
        client.log_artifacts(best.run_id, str(workdir / CARD_ARTIFACT), CARD_ARTIFACT)
        comparison = plot_curves(
            {c.name: (fitted.y[fitted.split.test], c.test_probability) for c in fitted.candidates},
            workdir / "comparison",
            n_bins=spec.evaluation.calibration_bins,
        )
        client.log_artifacts(best.run_id, str(next(iter(comparison.values())).parent), "comparison")
    report(
        f"selected {selected.name} (best cv {selected.search.scoring}); registered "
        f"{spec.name} version {version} as '{CHALLENGER}'"
    )
    split = fitted.split
    return TrainResult(
        model_name=spec.name,
        version=version,
        selected=best,
        candidates=results,
        train_rows=len(split.train),
        test_rows=len(split.test),
        test_patients=int(frame.iloc[split.test][spec.entity.key].nunique()),
        temporal_rows=len(split.temporal),
        card=card,
    )


def load_reference(
    tracker: Tracker, model_name: str, alias: str = "champion", file: str = REFERENCE_FILE
) -> pd.DataFrame:
    """The PHI-free training snapshot stored with the run behind a model alias (or, with
    ``file=PREDICTION_REFERENCE_FILE``, its held-out probabilities and outcomes)."""
    from mlflow.artifacts import download_artifacts

    version = tracker.version_by_alias(model_name, alias)
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(
            run_id=version.run_id,
            artifact_path=f"{REFERENCE_ARTIFACT}/{file}",
            dst_path=tmp,
            tracking_uri=tracker.uri,
        )
        return pd.read_parquet(local)
