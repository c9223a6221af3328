"""Drift and data quality: a window of records against the champion's training reference.

``run`` returns a :class:`DriftVerdict` and, unless ``write=False``, draws Evidently 0.7
reports of the same window:

- **data drift** per feature: a patient-clustered test and an effect size
  (:mod:`clinml.monitoring.statistics`) against the feature's floor (``spec.monitoring``);
- **prediction drift**: served probabilities against the champion's *held-out*
  probabilities (in-sample ones would be more extreme than any served ones);
- **data quality**: missing values and values outside the spec's range or category list;
- **subgroup drift**: the same feature tests within each group of each sensitive
  attribute present in the data, computed by slicing both frames here (not with
  Evidently's ``GroupBy``).

Alerting is built so that an unshifted window rarely alarms at any size. A feature is
*drifted* when its change is at least its floor and its p-value below
``column_threshold``; that is reported, but what alerts is a drifted feature whose
p-value is also below a Bonferroni threshold: ``family_alpha`` is split in half between
the overall tests (features and the prediction) and the subgroup tests, and each half is
divided by its number of tests, so the chance of any false alarm in a window is at most
``family_alpha``. The dataset-level rule (a share of drifted features at or above
``drift_share``) also alerts. A quiet window with fewer patients than the tests need
(:func:`min_patients`) is "not enough data", not "no drift". :func:`choose_reference`
picks the part of the reference a window meets (season, population).

A value outside the spec's declared categories or range (a name typed into a category,
a phone number into a numeric field) is counted as a quality problem but never shown:
it is masked before any report, snapshot or verdict sees the window (``_masked``).

Outputs, in the output directory: ``drift.html`` (features and quality),
``prediction_drift.html``, ``drift.json`` (the verdict). ``add_to_workspace`` adds the
snapshots to an Evidently local workspace, so ``evidently ui`` shows the history.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError
from clinml.monitoring import statistics
from clinml.spec import UseCaseSpec
from clinml.training.reference import CLUSTER_COLUMN, WEEK_COLUMN

HTML_FILE = "drift.html"
PREDICTION_HTML_FILE = "prediction_drift.html"
JSON_FILE = "drift.json"
# A nullable feature's missing share may exceed the reference's by this much.
MISSING_MARGIN = 0.05
# A quality problem touching more than this share of rows is severe.
SEVERE_SHARE = 0.01
# What reports show in place of a value that is not one of a column's declared categories.
UNDECLARED = "(undeclared value)"


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    method: str  # "ks" or "chisquare", patient-clustered (clinml.monitoring.statistics)
    score: float  # the p-value
    score_kind: str  # "p_value"
    threshold: float  # column_threshold
    drifted: bool  # at least the floor, and p below column_threshold (reported)
    severity: str = "none"  # "high" alerts (p below Bonferroni too); "medium" = drifted
    effect: float = float("nan")  # Wasserstein distance in SDs, or total variation
    effect_kind: str = ""
    floor: float = float("nan")

    @property
    def alerts(self) -> bool:
        return self.severity == "high"


@dataclass(frozen=True)
class QualityIssue:
    feature: str
    missing: int
    missing_share: float
    reference_missing_share: float
    out_of_range: int
    out_of_range_share: float
    severity: str
    reason: str


@dataclass(frozen=True)
class SubgroupDrift:
    attribute: str
    group: str
    rows: int
    reference_rows: int
    drifted: list[FeatureDrift]  # only the features that crossed the threshold

    @property
    def alerts(self) -> bool:
        return any(f.alerts for f in self.drifted)


@dataclass(frozen=True)
class DriftVerdict:
    usecase: str
    drift: bool  # the data-drift alert: share rule, or any feature at high severity
    drifted_share: float
    drift_share_threshold: float
    reference_rows: int
    current_rows: int
    features: list[FeatureDrift] = field(default_factory=list)
    prediction: FeatureDrift | None = None
    quality: list[QualityIssue] = field(default_factory=list)
    subgroups: list[SubgroupDrift] = field(default_factory=list)
    skipped_subgroups: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    # Patients (effective, clinml.monitoring.statistics.effective_size) in the window, and the
    # number the drift tests need; below it the verdict is "not enough data".
    window_patients: float = 0.0
    min_patients: int = 0
    reference_note: str = ""
    created_at: str = ""
    window_start: str | None = None
    window_end: str | None = None
    model_version: str | None = None
    html_path: str = ""
    prediction_html_path: str = ""
    json_path: str = ""
    # The Evidently snapshots behind the verdict (for the workspace); not serialised.
    snapshots: list[Any] = field(default_factory=list, repr=False, compare=False)

    @property
    def drifted_features(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.drifted]

    @property
    def enough_data(self) -> bool:
        """Whether a quiet verdict means anything: the window holds the patients the tests
        need to find a change past the floors. A change found in a smaller window still
        alerts (the evidence is there); only its absence says nothing."""
        return self.window_patients >= self.min_patients

    @property
    def prediction_drift(self) -> bool:
        return self.prediction is not None and self.prediction.alerts

    @property
    def quality_alert(self) -> bool:
        return any(q.severity in {"high", "medium"} for q in self.quality)

    @property
    def subgroup_alert(self) -> bool:
        return any(s.alerts for s in self.subgroups)

    @property
    def alerts(self) -> list[str]:
        """The kinds of alert this window raises."""
        kinds = {
            "data_drift": self.drift,
            "prediction_drift": self.prediction_drift,
            "data_quality": self.quality_alert,
            "subgroup_drift": self.subgroup_alert,
        }
        return [kind for kind, raised in kinds.items() if raised]

    @property
    def exit_code(self) -> int:
        return 1 if self.alerts else 0

    def line(self) -> str:
        """The one-line verdict the CLI prints, naming the rule that fired."""
        n, total = len(self.drifted_features), len(self.features)
        extra = [kind.replace("_", " ") for kind in self.alerts if kind != "data_drift"]
        also = f"; also {', '.join(extra)}" if extra else ""
        if not self.drift and not self.enough_data:
            return (
                f"not enough data: {self.window_patients:,.0f} patients in the window, the "
                f"drift tests need {self.min_patients:,} to find a change past their floors; "
                f"lengthen the window (data quality was checked){also}"
            )
        head = "DRIFT" if self.drift else "no drift"
        worst = ", ".join(f.feature for f in self.drifted_features[:3])
        tail = f" (e.g. {worst})" if worst else ""
        share = f"{n} of {total} features drifted ({self.drifted_share:.0%})"
        significant = [f.feature for f in self.features if f.alerts]
        if self.drifted_share >= self.drift_share_threshold:
            text = f"{head}: {share}, at or above the alert share of "
            text += f"{self.drift_share_threshold:.0%}{tail}"
        elif significant:
            # The per-feature rule: a p-value below the Bonferroni level (or a distance
            # past twice its threshold), however few features moved.
            text = (
                f"{head}: {', '.join(significant[:3])} beyond the per-feature alert level "
                f"({share}; the share rule alerts at {self.drift_share_threshold:.0%})"
            )
        else:
            text = f"{head}: {share}; alert at {self.drift_share_threshold:.0%}{tail}"
        return text + also

    def to_dict(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "snapshots"}
        return {
            **{k: _plain(v) for k, v in plain.items()},
            "alerts": self.alerts,
            "drifted_features": [f.feature for f in self.drifted_features],
            "enough_data": self.enough_data,
        }


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def _judged(
    feature: str,
    found: statistics.Comparison,
    floor: float,
    threshold: float,
    alert_p: float,
) -> FeatureDrift:
    """One feature's result with its severity. Nothing below the floor drifts, however
    small its p-value; at or above it, "high" (alerts) below the Bonferroni p-value
    ``alert_p``, "medium" (reported) below ``threshold``."""
    large = found.effect >= floor
    drifted = large and found.p_value < threshold
    significant = large and found.p_value < alert_p
    return FeatureDrift(
        feature=feature,
        method=found.test,
        score=found.p_value,
        score_kind="p_value",
        threshold=threshold,
        drifted=drifted,
        severity="high" if significant else ("medium" if drifted else "none"),
        effect=found.effect,
        effect_kind=found.effect_kind,
        floor=floor,
    )


def _severity_order(column: FeatureDrift) -> tuple[bool, float, float, str]:
    """Drifted first, largest change relative to its floor first, then by name."""
    return (not column.drifted, -column.effect / column.floor, column.score, column.feature)


def _check_columns(frame: pd.DataFrame, spec: UseCaseSpec, what: str) -> None:
    missing = [c for c in spec.feature_names if c not in frame.columns]
    if missing:
        raise ClinmlError(
            f"{what} lacks {len(missing)} of the {len(spec.feature_names)} feature columns: "
            + ", ".join(missing)
        )


def _definition(spec: UseCaseSpec, columns: list[str]) -> Any:
    from evidently import DataDefinition

    numeric = {c.name for c in spec.features if c.is_numeric} | {"probability"}
    return DataDefinition(
        numerical_columns=[c for c in columns if c in numeric],
        categorical_columns=[c for c in columns if c not in numeric],
    )


def _run_report(
    spec: UseCaseSpec,
    metrics: list[Any],
    current: pd.DataFrame,
    reference: pd.DataFrame,
    columns: list[str],
    timestamp: datetime | None = None,
    tags: list[str] | None = None,
) -> Any:
    from evidently import Dataset, Report

    definition = _definition(spec, columns)
    with warnings.catch_warnings():
        # chi-square with a category absent from the reference divides by zero: p = 0
        warnings.simplefilter("ignore", RuntimeWarning)
        now, before = (
            Dataset.from_pandas(frame[columns].reset_index(drop=True), data_definition=definition)
            for frame in (current, reference)
        )
        return Report(metrics, include_tests=True).run(
            now,
            before,
            timestamp=timestamp,
            tags=tags,
        )


def _drift_preset(spec: UseCaseSpec, columns: list[str]) -> Any:
    from evidently.presets import DataDriftPreset

    monitoring = spec.monitoring
    return DataDriftPreset(
        columns=columns,
        drift_share=monitoring.drift_share,
        num_method=monitoring.numeric_method,
        cat_method=monitoring.categorical_method,
        threshold=monitoring.column_threshold,
    )


def _quality_metrics(spec: UseCaseSpec) -> list[Any]:
    from evidently.metrics import MissingValueCount, OutListValueCount, OutRangeValueCount

    metrics: list[Any] = []
    for column in spec.features:
        metrics.append(MissingValueCount(column=column.name))
        if column.type == "category":
            metrics.append(OutListValueCount(column=column.name, values=list(column.categories)))
        elif column.min is not None or column.max is not None:
            low = column.min if column.min is not None else float("-inf")
            high = column.max if column.max is not None else float("inf")
            metrics.append(OutRangeValueCount(column=column.name, left=low, right=high))
    return metrics


def _evidently_counts(result: dict[str, Any]) -> dict[str, dict[str, tuple[int, float]]]:
    """Missing and out-of-range (count, share) per column, from a report's metrics."""
    counts: dict[str, dict[str, tuple[int, float]]] = {}
    for metric in result["metrics"]:
        config, kind = metric["config"], metric["config"]["type"].rsplit(":", 1)[-1]
        if kind in {"MissingValueCount", "OutRangeValueCount", "OutListValueCount"}:
            value = metric["value"]
            key = "missing" if kind == "MissingValueCount" else "out_of_range"
            counts.setdefault(config["column"], {})[key] = (
                int(value["count"]),
                float(value["share"]),
            )
    return counts


def _direct_counts(
    spec: UseCaseSpec, current: pd.DataFrame
) -> dict[str, dict[str, tuple[int, float]]]:
    """The same counts as the Evidently quality metrics, computed with pandas."""
    rows = max(len(current), 1)
    counts: dict[str, dict[str, tuple[int, float]]] = {}
    for column in spec.features:
        values = current[column.name]
        missing = int(values.isna().sum())
        present = values.dropna()
        if column.type == "category":
            out = int((~present.astype(str).isin([str(c) for c in column.categories])).sum())
        else:
            numbers = pd.to_numeric(present, errors="coerce")
            low = column.min if column.min is not None else float("-inf")
            high = column.max if column.max is not None else float("inf")
            out = int(((numbers < low) | (numbers > high) | numbers.isna()).sum())
        counts[column.name] = {
            "missing": (missing, missing / rows),
            "out_of_range": (out, out / rows),
        }
    return counts


SEVERITY_RANK = {"none": 0, "low": 1, "medium": 2, "high": 3}


def _worse(a: str, b: str) -> str:
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b


def _quality(
    spec: UseCaseSpec,
    counts: dict[str, dict[str, tuple[int, float]]],
    reference: pd.DataFrame,
) -> list[QualityIssue]:
    issues = []
    for column in spec.features:
        missing, missing_share = counts.get(column.name, {}).get("missing", (0, 0.0))
        out, out_share = counts.get(column.name, {}).get("out_of_range", (0, 0.0))
        reference_share = float(reference[column.name].isna().mean())
        reasons, severity = [], "none"
        if out:
            reasons.append(f"{out} values outside the declared range or categories")
            severity = _worse(severity, "high" if out_share > SEVERE_SHARE else "medium")
        if missing and not column.nullable:
            reasons.append(f"{missing} missing values in a feature that may not be null")
            severity = _worse(severity, "high" if missing_share > SEVERE_SHARE else "medium")
        elif missing and missing_share >= 1.0:
            reasons.append(
                f"no value at all in the window ({reference_share:.1%} missing in the "
                "reference); left out of the drift tests"
            )
            severity = "high"
        elif missing_share > reference_share + MISSING_MARGIN:
            reasons.append(
                f"missing share {missing_share:.1%} vs {reference_share:.1%} in the reference"
            )
            severity = _worse(severity, "medium")
        if reasons:
            issues.append(
                QualityIssue(
                    feature=column.name,
                    missing=missing,
                    missing_share=missing_share,
                    reference_missing_share=reference_share,
                    out_of_range=out,
                    out_of_range_share=out_share,
                    severity=severity,
                    reason="; ".join(reasons),
                )
            )
    return issues


def patient_codes(spec: UseCaseSpec, frame: pd.DataFrame) -> np.ndarray:
    """Which rows belong to one patient: the reference's ``_cluster``, the prediction
    log's pseudonymised ``patient`` or the entity key, whichever the frame has; without
    any, every row is a patient of its own."""
    for column in (CLUSTER_COLUMN, "patient", spec.entity.key):
        if column in frame.columns:
            return statistics.cluster_codes(frame, column)
    return statistics.cluster_codes(frame, None)


def floor_of(spec: UseCaseSpec, name: str) -> float:
    """The effect-size floor of a feature (or of ``probability``)."""
    monitoring = spec.monitoring
    if name == "probability":
        return monitoring.prediction_floor or monitoring.numeric_floor
    column = next(c for c in spec.features if c.name == name)
    if column.drift_floor is not None:
        return column.drift_floor
    return monitoring.numeric_floor if column.is_numeric else monitoring.categorical_floor


def min_patients(spec: UseCaseSpec, alert_p: float | None = None) -> int:
    """The patients a window needs: the spec's ``min_patients``, or enough to find a
    change 1.5 times every feature's floor with 95% power at ``alert_p`` (default: the
    overall Bonferroni level with every feature tested, half of ``family_alpha`` over the
    features and the prediction). At 1.5 times the floor both halves of the rule (the
    estimate past the floor, the p-value past Bonferroni) need about the same sample, so
    the rule's power there is about 95%."""
    if spec.monitoring.min_patients is not None:
        return spec.monitoring.min_patients
    if alert_p is None:
        alert_p = spec.monitoring.family_alpha / 2 / (len(spec.features) + 1)
    return max(
        statistics.required_patients(1.5 * floor_of(spec, c.name), not c.is_numeric, alert_p)
        for c in spec.features
    )


def _direct_drifts(
    spec: UseCaseSpec,
    current: pd.DataFrame,
    reference: pd.DataFrame,
    columns: list[str],
    alert_p: float,
) -> tuple[list[FeatureDrift], float]:
    """Per-column drift: the patient-clustered test and effect size of
    :mod:`clinml.monitoring.statistics`, judged against the column's floor."""
    threshold = spec.monitoring.column_threshold
    numeric = {c.name for c in spec.features if c.is_numeric} | {"probability"}
    codes_before, codes_now = patient_codes(spec, reference), patient_codes(spec, current)
    results = []
    for name in columns:
        kept_before, kept_now = reference[name].notna(), current[name].notna()
        before, now = reference[name][kept_before], current[name][kept_now]
        if before.empty or now.empty:
            continue
        sizes = (
            statistics.effective_size(codes_before[kept_before.to_numpy()]),
            statistics.effective_size(codes_now[kept_now.to_numpy()]),
        )
        if name in numeric:
            found = statistics.compare_numeric(before.to_numpy(float), now.to_numpy(float), *sizes)
        else:
            found = statistics.compare_categorical(before, now, *sizes)
        results.append(_judged(name, found, floor_of(spec, name), threshold, alert_p))
    share = sum(r.drifted for r in results) / len(results) if results else 0.0
    return sorted(results, key=_severity_order), share


def _masked(spec: UseCaseSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every value outside its column's declared domain replaced, so that
    no report renders it (Evidently's HTML and snapshots show category values and
    histogram edges; subgroup names come from attribute values), while every count stays
    the same: an undeclared category becomes ``UNDECLARED`` (still out of the list), a
    number outside ``[min, max]``, or a value that is no number, becomes the nearest float
    just past the bound it crossed (still out of range, and of the same rank, so rank-based
    tests such as KS are unchanged; with no max declared, a value that is no number
    becomes missing). Missing values stay missing."""

    masked = frame
    for column in spec.columns:
        if column.name not in frame.columns:
            continue
        values = frame[column.name]
        present = values.notna()
        if column.type == "category":
            bad = present & ~values.astype(str).isin([str(c) for c in column.categories or ()])
            replaced = values.astype(object).where(~bad, UNDECLARED) if bad.any() else None
        else:
            numbers = pd.to_numeric(values, errors="coerce")
            low = float(column.min) if column.min is not None else -np.inf
            high = float(column.max) if column.max is not None else np.inf
            above = present & (numbers.isna() | (numbers > high))
            below = present & (numbers < low)
            replaced = None
            if above.any() or below.any():
                replaced = numbers.astype(float)
                replaced[above] = np.nextafter(high, np.inf) if np.isfinite(high) else np.nan
                replaced[below] = np.nextafter(low, -np.inf)
        if replaced is not None:
            if masked is frame:
                masked = frame.copy()
            masked[column.name] = replaced
    return masked


def _subgroup_slices(
    spec: UseCaseSpec, reference: pd.DataFrame, current: pd.DataFrame
) -> tuple[list[tuple[str, str, pd.Series, pd.Series]], list[str]]:
    """(attribute, group, current mask, reference mask) for every group big enough."""
    minimum = spec.evaluation.min_group_size
    slices, skipped = [], []
    for attribute in spec.sensitive_attributes:
        if attribute not in current.columns or attribute not in reference.columns:
            skipped.append(f"{attribute}: not in the data")
            continue
        for group in sorted(current[attribute].dropna().astype(str).unique()):
            now = current[attribute].astype(str) == group
            before = reference[attribute].astype(str) == group
            if int(now.sum()) < minimum or int(before.sum()) < minimum:
                skipped.append(f"{attribute}={group}: fewer than {minimum} rows")
                continue
            slices.append((attribute, group, now, before))
    return slices, skipped


def _testable(spec: UseCaseSpec, reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """The features a drift test can compare: every one with values on both sides.

    A feature without a single value in the window is bad input when the spec does not
    allow it to be missing (an export that lost a column): one clear error. A nullable one
    (a lab nobody ordered this week) is reported by the data-quality check instead, and
    left out of the drift tests, which cannot compare an empty column.

    Raises:
        ClinmlError: a feature that may not be null has no value in the window.
    """
    nullable = {c.name for c in spec.features if c.nullable}
    empty = [name for name in spec.feature_names if current[name].isna().all()]
    required = [name for name in empty if name not in nullable]
    if required:
        raise ClinmlError(
            f"the window's {', '.join(required)} column{'s' if len(required) > 1 else ''} "
            "holds no value at all, and the spec does not allow it to be missing: nothing to "
            "compare; check the file or the export that made it"
        )
    return [
        name
        for name in spec.feature_names
        if name not in empty and not reference[name].isna().all()
    ]


def _within(features: list[str], attribute: str) -> list[str]:
    """The features tested within a group: all but the (constant) attribute itself."""
    return [f for f in features if f != attribute]


def _weeks_between(start: datetime, end: datetime) -> set[int]:
    days = pd.date_range(pd.Timestamp(start).normalize(), pd.Timestamp(end), freq="D")
    return {int(w) for w in days.isocalendar().week} or {int(pd.Timestamp(start).isocalendar()[1])}


def _near(weeks: pd.Series, wanted: set[int], spread: int) -> pd.Series:
    """Rows whose week is within ``spread`` weeks of any wanted week, across new year."""
    values = weeks.to_numpy(dtype=int)
    close = np.zeros(len(values), dtype=bool)
    for week in wanted:
        gap = np.abs(values - week)
        close |= np.minimum(gap, 52 - gap) <= spread
    return pd.Series(close, index=weeks.index)


def choose_reference(
    spec: UseCaseSpec,
    reference: pd.DataFrame,
    window: tuple[datetime | None, datetime | None] = (None, None),
    held_out: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """The part of the champion's reference a window is compared with.

    ``monitoring.population`` keeps the rows of the population the service sees (one
    hospital's service compared with that hospital's training rows). ``monitoring.
    reference: seasonal`` keeps the rows of the window's weeks of the year, and
    ``season_weeks`` either side, so a winter week meets winter, not the year's average.
    Either falls back to the whole reference, and says so, when what it keeps has fewer
    patients than a window needs or the reference predates the columns it needs. (The
    rolling reference is the prediction log's: :func:`clinml.monitoring.job.run` reads it.)

    Returns:
        The reference rows, the held-out rows for prediction drift (restricted the same
        way where they carry the columns), and a note saying what was chosen.
    """
    monitoring = spec.monitoring
    notes = []
    kept, kept_held_out = reference, held_out
    for attribute, values in monitoring.population.items():
        if attribute not in kept.columns:
            notes.append(f"the reference has no {attribute} column: all of it is used")
            continue
        kept = kept[kept[attribute].astype(str).isin(values)]
        if kept_held_out is not None and attribute in kept_held_out.columns:
            kept_held_out = kept_held_out[kept_held_out[attribute].astype(str).isin(values)]
        notes.append(f"{attribute} in {', '.join(values)}")
    if monitoring.reference == "seasonal":
        start, end = window
        if start is None or end is None:
            notes.append("seasonal reference needs a window: the whole year is used")
        elif WEEK_COLUMN not in kept.columns:
            notes.append("the reference has no weeks (trained before they were recorded): "
                         "the whole year is used")  # fmt: skip
        elif (end - start).days >= 182:
            notes.append("the window spans half a year or more: the whole year is used")
        else:
            wanted = _weeks_between(start, end)
            seasonal = kept[_near(kept[WEEK_COLUMN], wanted, monitoring.season_weeks)]
            needed = min_patients(spec)
            patients = statistics.effective_size(patient_codes(spec, seasonal))
            if patients < needed:
                notes.append(
                    f"the same weeks of the year hold {patients:,.0f} patients, fewer than "
                    f"the {needed:,} a comparison needs: the whole year is used"
                )
            else:
                kept = seasonal
                if kept_held_out is not None and WEEK_COLUMN in kept_held_out.columns:
                    near = _near(kept_held_out[WEEK_COLUMN], wanted, monitoring.season_weeks)
                    kept_held_out = kept_held_out[near]
                notes.append(f"weeks {min(wanted)}–{max(wanted)} ±{monitoring.season_weeks}")
    if kept.empty:
        raise ClinmlError(
            "the champion's reference holds no rows of monitoring.population: check the "
            "spec's population against the data the model was trained on"
        )
    what = "training reference" + (f" ({'; '.join(notes)})" if notes else "")
    return kept, kept_held_out, f"{what}: {len(kept):,} rows"


def run(
    spec: UseCaseSpec,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    out_dir: Path,
    now: datetime | None = None,
    *,
    prediction_reference: pd.DataFrame | None = None,
    prediction_current: pd.DataFrame | None = None,
    window: tuple[datetime | None, datetime | None] = (None, None),
    model_version: str | None = None,
    subgroups: bool = True,
    write: bool = True,
    reference_note: str = "",
) -> DriftVerdict:
    """Compare ``current`` with ``reference`` on the spec's features.

    Args:
        spec: supplies the features, tests and thresholds (``spec.monitoring``).
        reference: the training reference (features, possibly more columns).
        current: the window to check; needs every feature column, and ``probability``
            for prediction drift.
        out_dir: where the reports and ``drift.json`` are written (created).
        now: the clock, for the verdict's timestamp.
        prediction_reference: held-out probabilities (column ``probability``); without
            it, the reference's own ``probability`` column is used if present.
        prediction_current: the rows whose probabilities to test (default: ``current``),
            e.g. only those the champion answered.
        window: the window's bounds, recorded in the verdict and the snapshots.
        model_version: recorded in the verdict and the snapshots' tags.
        subgroups: also test drift within each sensitive-attribute group.
        write: write the reports and the verdict (False: compute only, for evaluations).
        reference_note: how the reference was chosen (:func:`choose_reference`), recorded.

    Returns:
        The verdict; ``exit_code`` is 1 when any alert is raised.
    """
    _check_columns(reference, spec, "the reference")
    _check_columns(current, spec, "the window")
    if len(current) == 0:
        raise ClinmlError("the window has no records")
    current = _masked(spec, current)  # values outside the spec's domain are never shown
    features = _testable(spec, reference, current)
    monitoring = spec.monitoring
    alpha = monitoring.family_alpha
    overall_tests = len(features) + 1
    needed = min_patients(spec, (alpha / 2) / overall_tests)
    window_patients = statistics.effective_size(patient_codes(spec, current))
    slices, skipped = _subgroup_slices(spec, reference, current) if subgroups else ([], [])
    subgroup_tests = sum(len(_within(features, attribute)) for attribute, *_ in slices)
    share_each = alpha / 2 if slices else alpha
    thresholds = {
        "family_alpha": alpha,
        "overall_p": share_each / overall_tests,
        "subgroup_p": (alpha / 2) / subgroup_tests if subgroup_tests else 0.0,
        "column_threshold": monitoring.column_threshold,
    }
    stamp = window[1] or now or datetime.now(UTC)
    tags = ["clinml", spec.name] + ([f"version-{model_version}"] if model_version else [])

    method = "ks" if monitoring.numeric_method == "anderson" else monitoring.numeric_method
    held_out = prediction_reference
    if held_out is None and "probability" in reference.columns:
        held_out = reference
    scored = current if prediction_current is None else prediction_current
    predictions = "probability" in scored.columns and len(scored) and held_out is not None
    # The verdict's statistics (clinml.monitoring.statistics); Evidently renders the reports.
    columns, share = _direct_drifts(spec, current, reference, features, thresholds["overall_p"])
    prediction = None
    if predictions:
        found, _ = _direct_drifts(spec, scored, held_out, ["probability"], thresholds["overall_p"])
        prediction = found[0] if found else None
    main, prediction_snapshot = None, None
    if write:  # the Evidently reports: HTML, workspace, and the data-quality counts
        from evidently.metrics import ValueDrift

        main = _run_report(
            spec,
            [_drift_preset(spec, features), *_quality_metrics(spec)],
            current,
            reference,
            spec.feature_names,  # all of them: the quality counts cover untestable ones too
            timestamp=stamp,
            tags=tags,
        )
        quality = _quality(spec, _evidently_counts(main.dict()), reference)
        if predictions:
            limit = monitoring.column_threshold
            test = ValueDrift(column="probability", method=method, threshold=limit)
            prediction_snapshot = _run_report(
                spec,
                [test],
                scored,
                held_out,
                ["probability"],
                timestamp=stamp,
                tags=[*tags, "prediction"],
            )
    else:  # the same counts, without rendering reports
        quality = _quality(spec, _direct_counts(spec, current), reference)

    subgroup_results = []
    for attribute, group, now_mask, before_mask in slices:
        drifted, _ = _direct_drifts(
            spec,
            current[now_mask],
            reference[before_mask],
            _within(features, attribute),
            thresholds["subgroup_p"],
        )
        subgroup_results.append(
            SubgroupDrift(
                attribute=attribute,
                group=group,
                rows=int(now_mask.sum()),
                reference_rows=int(before_mask.sum()),
                drifted=[f for f in drifted if f.drifted],
            )
        )

    out_dir = Path(out_dir)
    html_path, json_path = out_dir / HTML_FILE, out_dir / JSON_FILE
    prediction_html = out_dir / PREDICTION_HTML_FILE
    verdict = DriftVerdict(
        usecase=spec.name,
        drift=share >= monitoring.drift_share or any(c.alerts for c in columns),
        drifted_share=share,
        drift_share_threshold=monitoring.drift_share,
        reference_rows=len(reference),
        current_rows=len(current),
        features=columns,
        prediction=prediction,
        quality=quality,
        subgroups=subgroup_results,
        skipped_subgroups=skipped,
        thresholds=thresholds,
        window_patients=window_patients,
        min_patients=needed,
        reference_note=reference_note,
        created_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        window_start=window[0].isoformat() if window[0] else None,
        window_end=window[1].isoformat() if window[1] else None,
        model_version=model_version,
        html_path=str(html_path) if write else "",
        prediction_html_path=str(prediction_html) if write and prediction_snapshot else "",
        json_path=str(json_path) if write else "",
        snapshots=[s for s in (main, prediction_snapshot) if s is not None],
    )
    if main is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        main.save_html(str(html_path))
        if prediction_snapshot is not None:
            prediction_snapshot.save_html(str(prediction_html))
        json_path.write_text(json.dumps(verdict.to_dict(), indent=2, default=str))
    return verdict


def add_to_workspace(workspace: Path, project_name: str, snapshots: list[Any]) -> str:
    """Add snapshots to the Evidently local workspace at ``workspace`` (created), in the
    project ``project_name`` (created); ``evidently ui --workspace DIR`` shows them.

    Returns:
        The project id.
    """
    from evidently.ui.workspace import Workspace

    workspace.mkdir(parents=True, exist_ok=True)
    ws = Workspace.create(str(workspace))
    found = [p for p in ws.search_project(project_name) if p.name == project_name]
    project = found[0] if found else ws.create_project(project_name)
    for snapshot in snapshots:
        ws.add_run(project.id, snapshot, include_data=False)
    return str(project.id)
