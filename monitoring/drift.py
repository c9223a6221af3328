"""Data drift: a batch of records against the champion's training reference.

``run`` builds an Evidently 0.7 report with the drift preset over the model's features
(the spec picks the statistical test and thresholds), writes ``drift.html`` and
``drift.json`` into the output directory, and returns a :class:`DriftVerdict`. The
reference is the PHI-free snapshot stored with the model version at training time
(``training.train.load_reference``).

Exit codes used by ``clinml monitor``: 0 no drift, 1 drift, 2 error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from clinml.errors import ClinmlError
from clinml.spec import UseCaseSpec

HTML_FILE = "drift.html"
JSON_FILE = "drift.json"
# Tests whose score is a p-value (drift when below the threshold); the others give a
# distance (drift when above it). Evidently names auto-chosen tests "... p_value".
P_VALUE_METHODS = {"ks", "chisquare", "z", "anderson"}


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    method: str
    score: float
    score_kind: str  # "p_value" or "distance"
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftVerdict:
    usecase: str
    drift: bool
    drifted_share: float
    drift_share_threshold: float
    reference_rows: int
    current_rows: int
    features: list[FeatureDrift] = field(default_factory=list)
    created_at: str = ""
    html_path: str = ""
    json_path: str = ""

    @property
    def drifted_features(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.drifted]

    @property
    def exit_code(self) -> int:
        return 1 if self.drift else 0

    def line(self) -> str:
        """The one-line verdict the CLI prints."""
        n, total = len(self.drifted_features), len(self.features)
        head = "DRIFT" if self.drift else "no drift"
        worst = ", ".join(f.feature for f in self.drifted_features[:3])
        tail = f" (e.g. {worst})" if worst else ""
        return (
            f"{head}: {n} of {total} features drifted ({self.drifted_share:.0%}; "
            f"alert at {self.drift_share_threshold:.0%}){tail}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted_features": [f.feature for f in self.drifted_features]}


def _score_kind(method: str) -> str:
    return "p_value" if method in P_VALUE_METHODS or "p_value" in method else "distance"


def _severity(column: FeatureDrift) -> tuple[bool, float, str]:
    """Drifted first, most severe first (low p-values, large distances), then by name."""
    score = column.score if column.score_kind == "p_value" else -column.score
    return (not column.drifted, score, column.feature)


def _check_columns(frame: pd.DataFrame, spec: UseCaseSpec, what: str) -> None:
    missing = [c for c in spec.feature_names if c not in frame.columns]
    if missing:
        raise ClinmlError(f"{what} lacks feature columns: {', '.join(missing[:5])}")


def run(
    spec: UseCaseSpec,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: Path,
    now: datetime | None = None,
) -> DriftVerdict:
    """Compare ``current`` with ``reference`` on the spec's features.

    Args:
        spec: supplies the features, tests and thresholds (``spec.monitoring``).
        reference: the training reference (features, possibly more columns).
        current: the batch to check; needs every feature column.
        out_dir: where ``drift.html`` and ``drift.json`` are written (created).
        now: the clock, for the verdict's timestamp.

    Returns:
        The verdict; ``drift`` is true when the drifted share reaches the threshold.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    _check_columns(reference, spec, "the reference")
    _check_columns(current, spec, "the batch")
    if len(current) == 0:
        raise ClinmlError("the batch is empty")
    features = spec.feature_names
    definition = DataDefinition(
        numerical_columns=[c.name for c in spec.features if c.is_numeric],
        categorical_columns=[c.name for c in spec.features if not c.is_numeric],
    )
    monitoring = spec.monitoring
    preset = DataDriftPreset(
        columns=features,
        drift_share=monitoring.drift_share,
        num_method=monitoring.numeric_method,
        cat_method=monitoring.categorical_method,
        threshold=monitoring.column_threshold,
    )
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(current[features].reset_index(drop=True), data_definition=definition),
        Dataset.from_pandas(reference[features].reset_index(drop=True), data_definition=definition),
    )
    result = snapshot.dict()
    status_by_metric = {
        t["metric_config"]["metric_id"]: t["status"]
        for t in result["tests"]
        if "metric_config" in t
    }
    columns: list[FeatureDrift] = []
    share = 0.0
    for metric in result["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            columns.append(
                FeatureDrift(
                    feature=config["column"],
                    method=config["method"],
                    score=float(metric["value"]),
                    score_kind=_score_kind(config["method"]),
                    threshold=float(config["threshold"]),
                    drifted=status_by_metric.get(metric["id"]) == "FAIL",
                )
            )
        elif config["type"].endswith(":DriftedColumnsCount"):
            share = float(metric["value"]["share"])

    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / HTML_FILE, out_dir / JSON_FILE
    snapshot.save_html(str(html_path))
    verdict = DriftVerdict(
        usecase=spec.name,
        drift=share >= monitoring.drift_share,
        drifted_share=share,
        drift_share_threshold=monitoring.drift_share,
        reference_rows=len(reference),
        current_rows=len(current),
        features=sorted(columns, key=_severity),
        created_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        html_path=str(html_path),
        json_path=str(json_path),
    )
    json_path.write_text(json.dumps(verdict.to_dict(), indent=2))
    return verdict
