"""The training stage: search, fit and evaluate every candidate; register the best.

``fit_candidates`` is the model work on a point-in-time frame, with no tracking:
a patient-disjoint test split (plus an optional temporal holdout of the most recent
months), a grouped cross-validated search per candidate, a refit of the best
configuration on all training rows, an operating threshold chosen by the spec's rule on
out-of-fold predictions, and a clinical evaluation on the held-out rows. It uses the CPUs
the process is given (``CLINML_TRAIN_THREADS`` overrides; ``clinml.cpus``): the searches'
fits run in that many worker processes, and every process, this one included, runs its
OpenMP, BLAS, torch and joblib pools on one thread (docs/training.md, "CPU use").

``run`` is the stage: it pulls the frame from Feast (never from the raw file), calls
``fit_candidates``, logs every candidate as an MLflow run (search trials, metrics with
CIs, confusion, calibration, subgroups, plots, the model, a PHI-free drift reference),
registers the candidate with the best cross-validated score as a new model version
tagged with its provenance, points the ``challenger`` alias at it and logs its model
card. Promotion to ``champion`` is a separate, gated step (``clinml.training.governance``).
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

from clinml.cpus import limit_threads, training_threads
from clinml.errors import ClinmlError, SpecError
from clinml.spec import REFERENCE_CANDIDATE, UseCaseSpec
from clinml.training import model_io
from clinml.training.assignment import TAG as RECORD_TAG
from clinml.training.assignment import PatientAssignment, TrainingRecord, utc_instant, utc_instants
from clinml.training.candidates import build_pipeline, fit, svm_variant
from clinml.training.distributed import Failed, RayCluster
from clinml.training.evaluate import (
    Evaluation,
    choose_threshold,
    evaluate,
    periods,
    rule_holds,
    rule_metric,
)
from clinml.training.metrics import BudgetWindow
from clinml.training.search import SearchResult, search
from clinml.training.tracking import CHALLENGER, Tracker

if TYPE_CHECKING:
    from feast import FeatureStore

REFERENCE_ARTIFACT = "reference"
REFERENCE_FILE = "reference.parquet"
# Held-out (test split) probabilities: the reference for prediction drift. In-sample
# probabilities of the training rows would be more extreme than any served ones.
PREDICTION_REFERENCE_FILE = "predictions.parquet"
REFERENCE_MAX_ROWS = 50_000
CARD_ARTIFACT = "model_card"
# Model-version tags naming the reference model fitted in the same training run.
REFERENCE_RUN_TAG = "reference_run_id"
REFERENCE_SHA_TAG = "reference_model_sha256"
# The model's runtime needs, pinned to what trained it (requirement inference is slow
# and records unrelated packages).
MODEL_REQUIREMENTS = ["mlflow", "scikit-learn", "skops", "pandas", "numpy", "torch"]
PROVENANCE_PACKAGES = [*MODEL_REQUIREMENTS, "feast", "great-expectations", "evidently", "bentoml"]


@dataclass(frozen=True)
class Split:
    """Row indices: training, the patient-disjoint test set, the temporal holdout.

    ``gap`` holds the events left out between training and the temporal holdout (their
    labels would look into it); ``assignment`` is the hash assignment of test patients.
    """

    train: np.ndarray
    test: np.ndarray
    temporal: np.ndarray
    temporal_start: pd.Timestamp | None = None
    gap: np.ndarray = field(default_factory=lambda: np.array([], dtype=int))
    assignment: PatientAssignment | None = None


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
class Selection:
    """Which candidate is registered, and the paired evidence for it (parsimony rule).

    The logistic-regression reference wins unless the best other candidate (by
    cross-validated score) beats it on the same out-of-fold rows with the lower 95%
    bound of the paired gain above ``training.selection_margin``.
    """

    selected: str
    best_other: str | None
    scoring: str
    gain: float
    gain_ci: tuple[float, float]
    margin: float | None
    rows: int
    patients: int

    @property
    def reason(self) -> str:
        if self.best_other is None:
            return "the reference model is the only candidate"
        gain = (
            f"{self.best_other} - {REFERENCE_CANDIDATE} cross-validated {self.scoring} "
            f"{self.gain:+.4f} [{self.gain_ci[0]:+.4f}, {self.gain_ci[1]:+.4f}] on "
            f"{self.rows:,} out-of-fold rows ({self.patients:,} patients)"
        )
        if self.margin is None:
            return f"{gain}: the parsimony rule is off (training.selection_margin: null)"
        if self.selected == REFERENCE_CANDIDATE:
            return (
                f"{gain}: the lower bound is not above the margin {self.margin:g}, so the "
                "simpler reference model is kept"
            )
        return f"{gain}: the lower bound is above the margin {self.margin:g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "reference": REFERENCE_CANDIDATE,
            "best_other": self.best_other,
            "scoring": self.scoring,
            "gain": self.gain,
            "gain_ci": list(self.gain_ci),
            "margin": self.margin,
            "level": 0.95,
            "rows": self.rows,
            "patients": self.patients,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Fitted:
    """Every candidate fitted and evaluated on one frame."""

    frame: pd.DataFrame = field(repr=False)
    y: np.ndarray = field(repr=False)
    split: Split
    candidates: list[FittedCandidate]
    selection: Selection | None = None

    @property
    def selected(self) -> FittedCandidate:
        """The candidate the parsimony rule chose (the test set picks nothing)."""
        if self.selection is None:
            return max(self.candidates, key=lambda c: c.search.best_score)
        return next(c for c in self.candidates if c.name == self.selection.selected)

    @property
    def reference(self) -> FittedCandidate | None:
        """The logistic-regression reference, if it was fitted."""
        return next((c for c in self.candidates if c.name == REFERENCE_CANDIDATE), None)


def select(spec: UseCaseSpec, candidates: list[FittedCandidate], n_boot: int) -> Selection:
    """The parsimony rule: the reference unless another candidate is clearly better.

    Every candidate's search scores the same out-of-fold rows (one patient sample, one
    set of folds), so the gain is a paired comparison on the same patients.
    """
    from clinml.training.metrics import paired_bootstrap

    reference = next((c for c in candidates if c.name == REFERENCE_CANDIDATE), None)
    others = [c for c in candidates if c.name != REFERENCE_CANDIDATE]
    margin = spec.training.selection_margin
    if reference is None or not others:
        only = (reference or max(others, key=lambda c: c.search.best_score)).name
        return Selection(only, None, "", math.nan, (math.nan, math.nan), margin, 0, 0)
    best = max(others, key=lambda c: c.search.best_score)
    a, b = best.search, reference.search
    if not (
        np.array_equal(a.oof_outcome, b.oof_outcome)
        and np.array_equal(a.oof_patients, b.oof_patients)
    ):
        raise ClinmlError("candidates were searched on different rows; cannot compare them")
    comparison = paired_bootstrap(
        a.oof_outcome,
        a.oof_probability,
        b.oof_probability,
        0.5,
        0.5,
        groups=a.oof_patients,
        n_boot=n_boot,
        seed=spec.training.seed,
    )
    gain_ci = comparison.difference_ci[a.scoring]
    chosen = best.name if margin is None or gain_ci[0] > margin else reference.name
    return Selection(
        chosen,
        best.name,
        a.scoring,
        comparison.difference[a.scoring],
        gain_ci,
        margin,
        comparison.rows,
        comparison.patients,
    )


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
    """Temporal holdout (if configured) after a gap of the label horizon, then test patients
    by the hash assignment (:mod:`clinml.training.assignment`) among the earlier events."""
    assignment = PatientAssignment.from_spec(spec)
    times = utc_instants(frame[spec.event_timestamp])
    pool = np.ones(len(frame), dtype=bool)
    recent = np.zeros(len(frame), dtype=bool)
    start = None
    months = spec.training.temporal_holdout_months
    if months:
        latest = pd.Timestamp(times.max(), tz="UTC")
        start = latest - pd.Timedelta(days=months * 30.4375)
        cutoff = start - pd.Timedelta(days=spec.label.horizon_days)
        recent = times >= utc_instant(start)
        pool = times < utc_instant(cutoff)
        if not recent.any() or not pool.any():
            raise SpecError(
                f"training.temporal_holdout_months: {months} months (and a gap of "
                f"label.horizon_days={spec.label.horizon_days:g}) leave {int(pool.sum())} rows "
                f"to train on and {int(recent.sum())} to hold out"
            )
    tested = assignment.is_test(frame[spec.entity.key].to_numpy())
    return Split(
        train=np.flatnonzero(pool & ~tested),
        test=np.flatnonzero(pool & tested),
        temporal=np.flatnonzero(recent),
        temporal_start=start,
        gap=np.flatnonzero(~pool & ~recent),
        assignment=assignment,
    )


def training_record(frame: pd.DataFrame, spec: UseCaseSpec, split: Split) -> TrainingRecord:
    """What the models fitted on ``split`` were trained on (stored with the version)."""
    assert split.assignment is not None
    rows = frame.iloc[split.train]
    return TrainingRecord.of(
        split.assignment, rows[spec.entity.key].to_numpy(), rows[spec.event_timestamp]
    )


def fit_candidates(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    report: Callable[[str], None] = lambda _: None,
    n_boot: int | None = None,
    threads: int | None = None,
    cluster: RayCluster | None = None,
) -> Fitted:
    """Search, refit and evaluate every candidate in the spec on ``frame``.

    Args:
        spec: the use-case spec.
        frame: one row per labelled event: entity key, event timestamp, label, features
            and attributes.
        report: receives progress lines.
        n_boot: bootstrap resamples (default: the spec's).
        threads: CPUs to use (default: :func:`resolve_threads`).
        cluster: run the searches' fits, the refits and the evaluations as tasks on this
            Ray cluster (:mod:`clinml.training.distributed`); the same results.
    """
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
    report(
        f"{len(split.train):,} training rows, {len(split.test):,} test rows "
        f"({len(np.unique(patients[split.test])):,} patients by the hash assignment, none in "
        "training)"
        + (
            f", {len(split.temporal):,} temporal-holdout rows after a gap of "
            f"{spec.label.horizon_days:g} days ({len(split.gap):,} rows left out)"
            if len(split.temporal)
            else ""
        )
    )
    window = budget_window(frame, split, spec)
    names = list(dict.fromkeys([*spec.training.candidates, REFERENCE_CANDIDATE]))
    threads = resolve_threads(threads)
    report(_cpu_line(threads) if cluster is None else _cluster_line(cluster))
    with limit_threads(_in_process(threads), torch="mlp" in names):
        if cluster is None:
            fitted = [
                fit_candidate(spec, frame, y, split, name, window, n_boot, report, threads)
                for name in names
            ]
        else:
            fitted = _fit_on_cluster(cluster, spec, frame, y, split, names, window, n_boot, report)
        selection = select(spec, fitted, spec.evaluation.bootstrap if n_boot is None else n_boot)
    report(f"selected {selection.selected}: {selection.reason}")
    return Fitted(frame, y, split, fitted, selection)


def fit_candidate(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    y: np.ndarray,
    split: Split,
    name: str,
    window: BudgetWindow | None = None,
    n_boot: int | None = None,
    report: Callable[[str], None] = lambda _: None,
    threads: int | None = None,
) -> FittedCandidate:
    """Search, refit, choose the threshold and evaluate one candidate on a split frame
    (on ``threads`` CPUs; default: :func:`resolve_threads`)."""
    threads = resolve_threads(threads)
    with limit_threads(_in_process(threads), torch=name == "mlp"):
        result = _search(spec, frame, y, split, name, report, threads)
        fitted = _finish(spec, frame, y, split, name, window, n_boot, result)
    report(_candidate_line(spec, fitted))
    return fitted


def _search(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    y: np.ndarray,
    split: Split,
    name: str,
    report: Callable[[str], None],
    threads: int,
    cluster: RayCluster | None = None,
) -> SearchResult:
    """The candidate's cross-validated search on the training rows."""
    patients = frame[spec.entity.key].to_numpy()
    x_train = frame.iloc[split.train][spec.feature_names]
    times = frame.iloc[split.train][spec.event_timestamp].to_numpy()
    return search(
        name,
        spec,
        x_train,
        y[split.train],
        patients[split.train],
        report,
        times=times,
        threads=threads,
        cluster=cluster,
    )


def _finish(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    y: np.ndarray,
    split: Split,
    name: str,
    window: BudgetWindow | None,
    n_boot: int | None,
    result: SearchResult,
) -> FittedCandidate:
    """Refit the search's best configuration on every training row, choose the operating
    threshold on its out-of-fold probabilities, and evaluate on the held-out rows (and the
    temporal holdout)."""
    features = spec.feature_names
    patients = frame[spec.entity.key].to_numpy()
    x_train, y_train = frame.iloc[split.train][features], y[split.train]
    x_test, y_test = frame.iloc[split.test][features], y[split.test]
    attributes = frame[spec.sensitive_attributes]
    started = time.perf_counter()
    pipeline = build_pipeline(name, spec, result.best_params, spec.training.seed, len(x_train))
    try:
        fit(pipeline, x_train, y_train, patients[split.train])
    except TypeError as exc:  # scikit-learn's InvalidParameterError is a TypeError
        raise SpecError(f"training.candidates.{name}: {exc}") from None
    fit_seconds = time.perf_counter() - started
    threshold = choose_threshold(
        spec,
        result.oof_outcome,
        result.oof_probability,
        patients=result.oof_patients,
        window=window,
        times=result.oof_times,
    )
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
    return FittedCandidate(
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


def _finish_task(
    shared: tuple[UseCaseSpec, pd.DataFrame, np.ndarray, Split, BudgetWindow | None, int | None],
    name: str,
    result: SearchResult,
) -> FittedCandidate:
    """:func:`_finish` as a Ray task, the frame and split shared through the object store."""
    spec, frame, y, split, window, n_boot = shared
    return _finish(spec, frame, y, split, name, window, n_boot, result)


def _fit_on_cluster(
    cluster: RayCluster,
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    y: np.ndarray,
    split: Split,
    names: list[str],
    window: BudgetWindow | None,
    n_boot: int | None,
    report: Callable[[str], None],
) -> list[FittedCandidate]:
    """Every candidate on the Ray cluster: the searches one candidate after another, each
    one's fits as tasks side by side; then the refits and evaluations, all at once."""
    results = [_search(spec, frame, y, split, name, report, 1, cluster) for name in names]
    finished = cluster.map(
        _finish_task,
        (spec, frame, y, split, window, n_boot),
        list(zip(names, results, strict=True)),
        torch="mlp" in names,
    )
    fitted = []
    for name, item in zip(names, finished, strict=True):
        if isinstance(item, Failed):
            raise ClinmlError(f"training.candidates.{name}: the refit failed ({item.kind})")
        report(_candidate_line(spec, item))
        fitted.append(item)
    return fitted


def _candidate_line(spec: UseCaseSpec, fitted: FittedCandidate) -> str:
    """The progress line of a fitted candidate."""
    result, evaluation, temporal = fitted.search, fitted.evaluation, fitted.temporal
    primary = spec.primary_metric
    low, high = evaluation.ci[primary]
    return (
        f"{fitted.name:<6} cv {result.scoring}={result.best_score:.3f} | test {primary}="
        f"{evaluation.metrics[primary]:.3f} [{low:.3f}, {high:.3f}] "
        f"ece={evaluation.metrics['ece']:.3f} threshold={fitted.threshold:.3f} "
        f"sensitivity={evaluation.metrics['sensitivity']:.3f} "
        f"alerts/100={100 * evaluation.metrics['alert_rate']:.1f} "
        + (f"| recent {primary}={temporal.metrics[primary]:.3f} " if temporal else "")
        + f"(search {result.seconds:.0f}s, fit {fitted.fit_seconds:.1f}s)"
    )


def resolve_threads(threads: int | None = None) -> int:
    """CPUs training uses: ``threads`` when given, else ``CLINML_TRAIN_THREADS``, else the
    CPUs this process is given (affinity and cgroup quota, :func:`clinml.cpus.usable_cpus`).
    0 means each library's own thread defaults (the behaviour before issue 20)."""
    if threads is None:
        from clinml.settings import Settings

        threads = Settings().train_threads
    return training_threads(threads)


def _in_process(threads: int) -> int:
    """Threads of each pool in the training process: one, or (``threads=0``) no limit.

    The refits and the evaluation run on one thread even when more CPUs are given: an
    OpenMP or BLAS team on busy cores waits at every barrier for a thread the kernel has
    descheduled, and collapses (docs/benchmarks.md, "Training under CPU contention").
    """
    return min(threads, 1)


def _cpu_line(threads: int) -> str:
    """The progress line saying how training uses the CPUs."""
    if threads == 0:
        return "CPUs for training: unlimited (CLINML_TRAIN_THREADS=0: each library's defaults)"
    if threads == 1:
        return "CPUs for training: 1 (every fit in this process, on one thread)"
    return (
        f"CPUs for training: {threads} (search fits in {threads} worker processes, one "
        "thread per process)"
    )


def _cluster_line(cluster: RayCluster) -> str:
    """The progress line saying where training's work runs, on Ray."""
    return (
        f"training on Ray at {cluster.address} ({cluster.cpus} CPUs): search fits, refits and "
        "evaluations as tasks of one CPU each"
    )


def budget_window(frame: pd.DataFrame, split: Split, spec: UseCaseSpec) -> BudgetWindow | None:
    """One ``evaluation.budget_window_days`` period of events, at the training data's rate.

    All patients count (test ones too): the service scores everyone. The rows per patient
    within a period come from cutting the same events into consecutive periods. None when
    the data span less than a day (their rate is unknown).
    """
    rows = np.concatenate([split.train, split.test])
    times = utc_instants(frame.iloc[rows][spec.event_timestamp])
    days = spec.evaluation.budget_window_days
    span_days = (times.max() - times.min()) / np.timedelta64(1, "D")
    if span_days < 1:
        return None
    patients = frame.iloc[rows][spec.entity.key].to_numpy()
    pairs = pd.DataFrame({"period": periods(times, days), "patient": patients})
    per_patient = len(pairs) / len(pairs.drop_duplicates())
    return BudgetWindow(rows=len(rows) / span_days * days, rows_per_patient=per_patient)


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

    from clinml.training.metrics import plot_curves

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
    ].assign(
        probability=candidate.pipeline.predict_proba(train_rows[spec.feature_names])[:, 1],
        **_monitoring_keys(spec, train_rows),
    )
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
                "search_trials_failed": sum(t.failed is not None for t in result.trials),
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
        plot_curves(
            {candidate.name: (fitted.y[split.test], candidate.test_probability)},
            out / "plots",
            n_bins=spec.evaluation.calibration_bins,
        )
        _clinical_plots(spec, fitted, [candidate], out / "plots")
        mlflow.log_artifacts(str(out / "plots"), artifact_path="plots")
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
        test_rows = frame.iloc[split.test]
        pd.DataFrame(
            {
                "probability": candidate.test_probability,
                "outcome": fitted.y[split.test],
                **{a: test_rows[a].to_numpy() for a in spec.sensitive_attributes},
                **_monitoring_keys(spec, test_rows),
            }
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


def _achieved(spec: UseCaseSpec, name: str, evaluation: Evaluation) -> dict[str, Any]:
    """The threshold rule's value on one held-out set, with its interval."""
    holds, text = rule_holds(spec, evaluation)
    metric = rule_metric(spec) or "alert_rate"  # a fixed threshold: what it alerts on
    low, high = evaluation.ci.get(metric, (math.nan, math.nan))
    return {
        "rows": name,
        "metric": metric,
        "value": evaluation.metrics[metric],
        "ci_low": low,
        "ci_high": high,
        "holds": holds,
        "text": text,
    }


def _chosen_on(spec: UseCaseSpec, selected: FittedCandidate) -> str:
    rule = spec.evaluation
    where = f"out-of-fold predictions of {selected.search.search_rows:,} training rows"
    if rule.min_sensitivity is not None:
        return f"{where}, so that the rule holds at its one-sided 95% confidence bound"
    if rule.max_alerts_per_100 is not None:
        return (
            f"{where}, so that the alert rate of a {rule.budget_window_days:g}-day period of "
            "new patients stays within budget with 95% probability"
        )
    return "fixed in the spec"


def _candidate_summary(candidate: FittedCandidate, selected: FittedCandidate) -> dict[str, Any]:
    metrics = candidate.evaluation.metrics
    ci = candidate.evaluation.ci
    fit_summary = candidate.evaluation.calibration_fit
    return {
        "name": candidate.name,
        "reference": candidate.name == REFERENCE_CANDIDATE,
        "selected": candidate is selected,
        "metrics": {
            f"cv_{candidate.search.scoring}": candidate.search.best_score,
            "roc_auc": metrics["roc_auc"],
            "roc_auc_ci_low": ci["roc_auc"][0],
            "roc_auc_ci_high": ci["roc_auc"][1],
            "ece": metrics["ece"],
            "brier": metrics["brier"],
            "observed_expected": metrics["observed_expected"],
            "calibration_intercept": fit_summary.get("intercept", math.nan),
            "calibration_slope": fit_summary.get("slope", math.nan),
        },
    }


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
    achieved = [_achieved(spec, "test", selected.evaluation)]
    if selected.temporal is not None:
        recent = pd.to_datetime(frame.iloc[split.temporal][spec.event_timestamp], utc=True)
        temporal = selected.temporal.to_dict(spec.primary_metric)
        evaluation["temporal_holdout"] = {
            **temporal["metrics"],
            "calibration_fit": temporal["calibration_fit"],
            "window_start": recent.min().isoformat(),
            "window_end": recent.max().isoformat(),
            "rows": len(split.temporal),
        }
        achieved.append(_achieved(spec, "temporal holdout", selected.temporal))
    else:
        evaluation["temporal_holdout"] = None
    rule = spec.evaluation
    operating_point = {
        "rule": rule.threshold_rule,
        "row_noun": rule.row_noun,
        "threshold": selected.threshold,
        "chosen_on": _chosen_on(spec, selected),
        "achieved": achieved,
    }
    too_small = selected.evaluation.subgroups
    limitations = list(spec.limitations)
    if not too_small.empty and (~too_small["evaluated"]).any():
        limitations.append(
            f"{int((~too_small['evaluated']).sum())} subgroup(s) have fewer than "
            f"{spec.evaluation.min_group_size} test rows and were not evaluated."
        )
    limitations.append(
        "Test metrics come from patients held out of training within the same data window"
        + (
            ", and from the most recent months (temporal holdout)"
            if selected.temporal is not None
            else ""
        )
        + "; performance at other sites or in other populations may differ."
    )
    assert split.assignment is not None
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
            "split": {
                "test_assignment": "keyed SHA-256 hash of the pseudonymised patient id",
                "test_fraction": split.assignment.fraction,
                "salt": split.assignment.salt,
                "test_rows": len(split.test),
                "test_patients": int(frame.iloc[split.test][spec.entity.key].nunique()),
                "temporal_holdout_months": spec.training.temporal_holdout_months,
                "temporal_rows": len(split.temporal),
                "gap_days": spec.label.horizon_days if len(split.temporal) else None,
                "gap_rows": len(split.gap),
            },
            "evaluation": evaluation,
            "operating_point": operating_point,
            "selection": fitted.selection.to_dict() if fitted.selection else None,
            "candidates": [_candidate_summary(c, selected) for c in fitted.candidates],
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
    tags: dict[str, str] | None = None,
    cluster: RayCluster | None = None,
) -> TrainResult:
    """Train, evaluate and log every candidate; register the best as the challenger.

    Args:
        spec: the use-case spec.
        store: an applied, populated Feast store.
        tracker: where runs and the registered model go.
        events: entity key, event timestamp and label for each training event.
        report: receives progress lines.
        tags: more tags for the registered version and its run (why it was trained,
            e.g. a retrain on drift and what it was trained on).
        cluster: a Ray cluster to train on (:func:`fit_candidates`).

    Returns:
        Every candidate's run and metrics, and the registered version.
    """
    from clinml.features.store import training_frame

    frame = training_frame(store, spec, events)
    fitted = fit_candidates(spec, frame, report=report, cluster=cluster)
    return register(spec, fitted, tracker, report, tags)


def register(
    spec: UseCaseSpec,
    fitted: Fitted,
    tracker: Tracker,
    report: Callable[[str], None] = lambda _: None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Log every fitted candidate as an MLflow run; register the selected one as challenger.

    ``tags`` are added to the registered version's tags and to its run's."""
    import mlflow

    from clinml.training.card import write_card
    from clinml.training.metrics import plot_curves

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
        version_tags = {
            "candidate": selected.name,
            "feature_service": spec.feature_service,
            "feature_service_version": service_version,
            "data_fingerprint": fingerprint,
            "git_commit": provenance["git_commit"],
            "spec_sha256": provenance["spec_sha256"],
            "packages": json.dumps(provenance["packages"], sort_keys=True),
            "run_id": best.run_id,
            "operating_threshold": repr(selected.threshold),
            "threshold_rule": spec.evaluation.threshold_rule,
            f"test_{spec.primary_metric}": f"{selected.evaluation.metrics[primary]:.4f}",
            "test_ece": f"{selected.evaluation.metrics['ece']:.4f}",
            # What it was trained on: the gate compares versions on rows neither saw.
            RECORD_TAG: training_record(frame, spec, fitted.split).to_json(),
        }
        if fitted.reference is not None:
            reference_run = results[fitted.candidates.index(fitted.reference)]
            version_tags[REFERENCE_RUN_TAG] = reference_run.run_id
            version_tags[REFERENCE_SHA_TAG] = reference_run.model_sha256
        version_tags.update(tags or {})
        # What the service checks at every load (serving/runtime.py), set after the
        # caller's tags so that none of them can replace a hash. The card's hashes follow
        # once the card is written.
        version_tags.update(
            {
                model_io.MODEL_SHA_TAG: best.model_sha256,
                model_io.SERVING_SHA_TAG: model_io.serving_digest(
                    registered_model=spec.name,
                    run_id=best.run_id,
                    candidate=selected.name,
                    operating_threshold=selected.threshold,
                    feature_service=spec.feature_service,
                    features=spec.feature_names,
                ),
                model_io.SPEC_CONTRACT_SHA_TAG: model_io.spec_contract_digest(spec),
            }
        )
        registered = mlflow.register_model(best.model_uri, spec.name, tags=version_tags)
        version = str(registered.version)
        client = tracker.client
        for key, value in (tags or {}).items():
            client.set_tag(best.run_id, key, value)
        card = build_card(
            spec,
            fitted,
            {
                "name": spec.name,
                "version": version,
                "candidate": selected.name,
                "run_id": best.run_id,
                "created": datetime.now(UTC).isoformat(),
            },
            fingerprint,
            provenance,
        )
        test = fitted.split.test
        plot_curves(
            {c.name: (fitted.y[test], c.test_probability) for c in fitted.candidates},
            workdir / "comparison",
            n_bins=spec.evaluation.calibration_bins,
        )
        reference = fitted.reference
        shown = [selected] if reference in (None, selected) else [selected, reference]
        images = _clinical_plots(spec, fitted, shown, workdir / "card_plots")  # type: ignore[list-item]
        _clinical_plots(spec, fitted, fitted.candidates, workdir / "comparison")
        client.log_artifacts(best.run_id, str(workdir / "comparison"), "comparison")
        card_json, card_html = write_card(card, workdir / CARD_ARTIFACT, images=images)
        client.log_artifacts(best.run_id, str(workdir / CARD_ARTIFACT), CARD_ARTIFACT)
        for tag, path in (
            (model_io.CARD_JSON_SHA_TAG, card_json),
            (model_io.CARD_HTML_SHA_TAG, card_html),
        ):
            client.set_model_version_tag(spec.name, version, tag, model_io.sha256_of(path))
        # The challenger is a version whose every recorded hash is set.
        client.set_registered_model_alias(spec.name, CHALLENGER, version)
    report(f"registered {spec.name} version {version} as '{CHALLENGER}' ({selected.name})")
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


def _clinical_plots(
    spec: UseCaseSpec, fitted: Fitted, shown: list[FittedCandidate], out_dir: Path
) -> dict[str, Path]:
    """Smoothed calibration curves and decision curves of ``shown`` on the test rows."""
    from clinml.training.calibration import plot_decision_curve, plot_smoothed_calibration

    out_dir.mkdir(parents=True, exist_ok=True)
    test = fitted.split.test
    curves = {c.name: (fitted.y[test], c.test_probability) for c in shown}
    patients = fitted.frame.iloc[test][spec.entity.key].to_numpy()
    return {
        "smoothed_calibration": plot_smoothed_calibration(
            curves, out_dir / "smoothed_calibration.png", groups=patients
        ),
        "decision_curve": plot_decision_curve(
            curves, {c.name: c.threshold for c in shown}, out_dir / "decision_curve.png"
        ),
    }


def _monitoring_keys(spec: UseCaseSpec, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """What the monitor needs beside the features, and no more: which rows share a
    patient (an arbitrary integer, shuffled, not the pseudonymised id) for its
    patient-clustered tests, and each row's week of the year (no year, no day) for a
    seasonal reference (clinml.monitoring.drift.choose_reference; the columns:
    clinml.training.reference)."""
    from clinml.training.reference import CLUSTER_COLUMN, WEEK_COLUMN

    codes, uniques = pd.factorize(rows[spec.entity.key])
    shuffled = np.random.default_rng(spec.training.seed).permutation(len(uniques))
    weeks = pd.to_datetime(rows[spec.event_timestamp], utc=True).dt.isocalendar().week
    return {CLUSTER_COLUMN: shuffled[codes], WEEK_COLUMN: weeks.to_numpy(dtype=np.int16)}


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
