"""Performance monitoring: ground-truth outcomes joined to the prediction log, judged per window.

Outcomes arrive long after a prediction (a readmission is known 30 days after discharge),
so performance is monitored in three steps:

1. ``ingest_labels`` validates a batch of outcomes, pseudonymises its patient ids with the
   same keyed hash the service applies, and writes it as one new parquet file under the
   use case's ``labels`` directory. Raw ids are never stored; errors name columns, counts
   and row numbers, never values.
2. ``join_labels`` attaches each label to the prediction it is about: by ``request_id``
   when the label names a single-record request, otherwise the patient's latest
   prediction at or before the label's time, within a horizon.
3. ``performance_by_window`` computes, per time window of predictions, AUROC, the served
   operating point's sensitivity and alert rate, and calibration (ECE, observed/expected
   ratio, calibration slope), each with a 95% interval, and checks them against the spec's
   ``clinml.monitoring.performance`` floors. :mod:`clinml.monitoring.performance_report` draws them.

Usage::

    paths = settings.paths.usecase(spec.name)
    ingest_labels(spec, settings, outcomes)               # e.g. a nightly EHR extract
    labels = read_labels(paths.labels)
    predictions = read_predictions(paths.predictions, since - timedelta(days=90), until)
    labelled = join_labels(predictions, labels, horizon_days=90)
    labelled.attrs[JOIN_REPORT]                           # a JoinReport: what matched
    windows = performance_by_window(spec, labelled, timedelta(days=7), since, until)
    print(summary_line(windows))
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.atomic import replacing
from clinml.clock import utc_now
from clinml.errors import DataValidationError
from clinml.pseudonym import pseudonymise_column
from clinml.spec import UseCaseSpec
from clinml.training.calibration import calibration_summary
from clinml.training.metrics import (
    bootstrap_values,
    design_effect,
    percentile_interval,
    point_metrics,
    recentred_interval,
    wilson_interval,
)

if TYPE_CHECKING:
    from clinml.settings import Settings

# The stored label columns, in order. ``patient`` is the pseudonym, never the raw id.
LABEL_COLUMNS = ("patient", "request_id", "outcome", "time", "ingested_at")
# The columns a label batch may have; ``patient_id`` holds raw ids (pseudonymised here).
_REQUIRED_INPUT = ("outcome", "time")
_ID_INPUT = ("patient_id", "request_id")
# Key of the JoinReport in the DataFrame that join_labels returns (``frame.attrs``).
JOIN_REPORT = "join_report"
# Row numbers listed in a validation message at most; the count is always complete.
_ROWS_LISTED = 10
# Text accepted as an outcome besides the spec's class names (compared in lower case).
_GENERIC_OUTCOMES = {"1": 1, "0": 0, "true": 1, "false": 0}
_UTC_NS = "datetime64[ns, UTC]"


# ---------------------------------------------------------------------------------------------
# Label ingestion
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelIngest:
    """What one ``ingest_labels`` call stored.

    Attributes:
        rows: label rows written (duplicates excluded).
        by_patient: of them, rows that carry a (pseudonymised) patient.
        by_request: of them, rows that carry a request id (a row may carry both).
        duplicates_skipped: rows not written because an identical label (patient,
            request id, time, outcome) was already stored or came earlier in the batch.
        path: the parquet file written; None when every row was a duplicate.
    """

    rows: int
    by_patient: int
    by_request: int
    duplicates_skipped: int
    path: Path | None


def _rows_phrase(positions: np.ndarray) -> str:
    """``"3 rows have"``/``"(rows 4, 9, 12)"`` parts for 1-based data-row numbers."""
    numbers = [str(int(i) + 1) for i in positions[:_ROWS_LISTED]]
    more = len(positions) - len(numbers)
    listed = ", ".join(numbers) + (f" and {more} more" if more else "")
    return f"row{'s' if len(positions) > 1 else ''} {listed}"


def _problem(positions: np.ndarray, what: str) -> str:
    count = len(positions)
    verb = "rows have" if count > 1 else "row has"
    return f"{count} {verb} {what} ({_rows_phrase(positions)})"


def _outcome_code(value: Any, classes: dict[str, int]) -> int | None:
    """0/1 for one outcome value, None when it is not a recognised outcome."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value) if value in (0, 1) else None
    if isinstance(value, float | np.floating):
        return int(value) if value in (0.0, 1.0) else None
    if isinstance(value, str):
        text = value.strip()
        if text in classes:
            return classes[text]
        return _GENERIC_OUTCOMES.get(text.lower())
    return None


def _id_text(value: Any) -> str | None:
    """An id as the text the service sees; "" for a missing id, None for an unusable one.

    Text is kept exactly (the service hashes ids as sent). Whole numbers become their
    digits, so ``12345`` and ``12345.0`` (a CSV id column with gaps reads as float)
    both give ``"12345"``; other types cannot be an id.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return "" if not value.strip() else value
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else None
    return None


def _map_distinct(values: pd.Series, convert: Any) -> np.ndarray:
    """``convert`` applied to each distinct value once; nulls give ``convert(None)``."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    mapped = np.array([convert(v) for v in uniques] + [convert(None)], dtype=object)
    return mapped[codes]  # code -1 picks the trailing convert(None)


def _validated(spec: UseCaseSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """The batch as raw ``patient_id``/``request_id`` text (or None), 0/1 ``outcome`` and
    UTC ``time``; raises on any bad row, naming counts and row numbers, never values."""
    if not isinstance(frame, pd.DataFrame):
        raise DataValidationError(
            f"labels must be a table (DataFrame), not {type(frame).__name__}", []
        )
    expected = f"{', '.join(_REQUIRED_INPUT)} and at least one of {' or '.join(_ID_INPUT)}"
    columns = [str(c) for c in frame.columns]
    problems = []
    missing = [c for c in _REQUIRED_INPUT if c not in columns]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)}")
    if not any(c in columns for c in _ID_INPUT):
        problems.append(f"no {' or '.join(_ID_INPUT)} column")
    # Unexpected columns are given by position, not name: in a file without a header
    # row, the "names" are the first row's values.
    unknown = [i for i, c in enumerate(columns) if c not in (*_REQUIRED_INPUT, *_ID_INPUT)]
    if unknown:
        where = ", ".join(str(i + 1) for i in unknown[:_ROWS_LISTED])
        more = f" and {len(unknown) - _ROWS_LISTED} more" if len(unknown) > _ROWS_LISTED else ""
        plural = "s" if len(unknown) > 1 else ""
        problems.append(f"{len(unknown)} unexpected column{plural} (column{plural} {where}{more})")
    if len(set(columns)) != len(columns):
        problems.append("a column name appears twice")
    if not problems and frame.empty:
        problems.append("no rows")
    if problems:
        raise DataValidationError(
            f"labels not ingested: {'; '.join(problems)}. A label file has {expected}; "
            "nothing was written.",
            problems,
        )

    rows = len(frame)
    positive, negative = spec.label.positive_class, spec.label.negative_class
    classes = {positive: 1, negative: 0}
    outcome = _map_distinct(frame["outcome"], lambda v: _outcome_code(v, classes))
    time = pd.to_datetime(frame["time"], utc=True, errors="coerce", format="ISO8601")
    ids = {}
    for column in _ID_INPUT:
        ids[column] = (
            _map_distinct(frame[column], _id_text)
            if column in frame.columns
            else np.full(rows, "", dtype=object)
        )

    problems = []
    bad = np.flatnonzero(pd.isna(outcome))
    if len(bad):
        problems.append(
            _problem(
                bad,
                f"an outcome that is neither '{positive}' nor '{negative}' (nor 1/0 or true/false)",
            )
        )
    bad = np.flatnonzero(time.isna().to_numpy())
    if len(bad):
        problems.append(_problem(bad, "a time that is missing or not an ISO 8601 date and time"))
    for column in _ID_INPUT:
        bad = np.flatnonzero(pd.isna(ids[column]))
        if len(bad):
            problems.append(_problem(bad, f"a {column} that is neither text nor a whole number"))
    neither = np.flatnonzero((ids["patient_id"] == "") & (ids["request_id"] == ""))
    if len(neither):
        problems.append(_problem(neither, "neither a patient_id nor a request_id"))
    if problems:
        raise DataValidationError(
            f"labels not ingested: {'; '.join(problems)}. Rows are numbered from 1, "
            "after the header; nothing was written.",
            problems,
        )
    return pd.DataFrame(
        {
            "patient_id": [v or None for v in ids["patient_id"]],
            "request_id": [v or None for v in ids["request_id"]],
            "outcome": outcome.astype("int64"),
            "time": time.astype(_UTC_NS).reset_index(drop=True),
        }
    )


def _label_keys(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    """(patient, request_id, time in ns, outcome) per row: what makes a label a duplicate.

    A missing id is None however it arrived (a fresh batch without patient ids holds NaN,
    a stored one None), so the same label never looks new twice.
    """
    times = frame["time"].astype(_UTC_NS).array.asi8

    def ids(column: str) -> list[Any]:
        values = frame[column].astype(object)
        return values.where(values.notna(), None).tolist()

    return list(
        zip(
            ids("patient"),
            ids("request_id"),
            times.tolist(),
            frame["outcome"].astype("int64").tolist(),
            strict=True,
        )
    )


def _write_parquet(frame: pd.DataFrame, target: Path) -> None:
    """Write ``frame`` to ``target`` atomically: a hidden temporary file, then a rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("patient", pa.string()),
            ("request_id", pa.string()),
            ("outcome", pa.int64()),
            ("time", pa.timestamp("ns", tz="UTC")),
            ("ingested_at", pa.timestamp("ns", tz="UTC")),
        ]
    )
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target) as tmp:  # read_labels skips names starting with "."
        pq.write_table(table, tmp)


def ingest_labels(
    spec: UseCaseSpec,
    settings: Settings,
    frame: pd.DataFrame,
    *,
    now: datetime | None = None,
) -> LabelIngest:
    """Validate, pseudonymise and store a batch of ground-truth outcomes.

    Args:
        spec: the use case; its label classes say which outcome values are valid.
        settings: where the labels go (``paths.usecase(spec.name).labels``) and the key
            that pseudonymises patient ids.
        frame: one row per outcome: ``outcome`` (the spec's positive or negative class
            name, 1/0 or true/false), ``time`` (when the outcome became known; ISO 8601
            text or datetimes, naive meaning UTC), and ``patient_id`` (the raw id, as the
            service is sent it) and/or ``request_id`` (the service's id for the request
            the outcome is about); each row needs at least one of the two.
        now: the ingestion time recorded with each row (default: the current time).

    Returns:
        What was written; rows identical to a stored label are skipped, not duplicated.

    Raises:
        DataValidationError: a column is missing or unexpected, or a row is bad. The
            message names the problem, the number of rows and their row numbers, never a
            submitted value; nothing is written.
    """
    batch = _validated(spec, frame)
    ingested_at = (now or utc_now()).astimezone(UTC)
    # The raw ids are replaced before anything is compared or written. (pseudonymise_column
    # fails on a column without any id, hence the guard.)
    raw_ids = batch.pop("patient_id")
    pseudonyms = (
        pseudonymise_column(raw_ids, settings.pseudonymiser())
        if raw_ids.notna().any()
        else pd.Series(None, index=raw_ids.index, dtype=object)
    )
    del raw_ids
    batch.insert(0, "patient", pseudonyms)

    directory = settings.paths.usecase(spec.name).labels
    seen = set(_label_keys(read_labels(directory)))
    keep = []
    for key in _label_keys(batch):
        keep.append(key not in seen)
        seen.add(key)
    new = batch[np.array(keep, dtype=bool)].reset_index(drop=True)
    new["ingested_at"] = pd.Timestamp(ingested_at).as_unit("ns")
    duplicates = len(batch) - len(new)
    if new.empty:
        return LabelIngest(0, 0, 0, duplicates, None)
    name = f"labels-{ingested_at:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}.parquet"
    path = directory / name
    _write_parquet(new[list(LABEL_COLUMNS)], path)
    return LabelIngest(
        rows=len(new),
        by_patient=int(new["patient"].notna().sum()),
        by_request=int(new["request_id"].notna().sum()),
        duplicates_skipped=duplicates,
        path=path,
    )


def read_labels(directory: Path) -> pd.DataFrame:
    """Every stored label, in the order ingested.

    Args:
        directory: the use case's labels directory (``paths.usecase(name).labels``).

    Returns:
        Columns :data:`LABEL_COLUMNS`: ``patient`` (pseudonym or None), ``request_id`` (or
        None), ``outcome`` (0/1), ``time`` and ``ingested_at`` (UTC). Empty, with those
        columns, when nothing has been ingested.
    """
    import pyarrow.parquet as pq

    directory = Path(directory)
    files = sorted(directory.glob("labels-*.parquet")) if directory.is_dir() else []
    frames = [pq.read_table(file).to_pandas() for file in files]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        empty = {c: pd.Series(dtype=object) for c in ("patient", "request_id")}
        empty["outcome"] = pd.Series(dtype="int64")
        empty.update({c: pd.Series(dtype=_UTC_NS) for c in ("time", "ingested_at")})
        return pd.DataFrame(empty, columns=list(LABEL_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)[list(LABEL_COLUMNS)]
    for column in ("patient", "request_id"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    frame["outcome"] = frame["outcome"].astype("int64")
    for column in ("time", "ingested_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True).astype(_UTC_NS)
    return frame


# ---------------------------------------------------------------------------------------------
# Joining labels to predictions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinReport:
    """How the labels met the predictions; every count is of labels.

    ``join_labels`` puts one in the returned frame's ``attrs[JOIN_REPORT]``.

    Attributes:
        labels: labels offered.
        by_request: labels that labelled a prediction through their request id.
        by_patient: labels that labelled a prediction through their patient and time.
        request_not_found: labels whose request id is in no prediction.
        request_multi_row: labels whose request had several records, so the request id
            does not say which prediction the outcome is about.
        patient_not_found: labels (without a request id) with no prediction of their
            patient at or before the label's time within the horizon.
        superseded: labels that found a prediction another, earlier label had labelled.
    """

    labels: int
    by_request: int
    by_patient: int
    request_not_found: int
    request_multi_row: int
    patient_not_found: int
    superseded: int

    @property
    def matched(self) -> int:
        """Labels that labelled a prediction (one prediction each)."""
        return self.by_request + self.by_patient

    @property
    def unmatched(self) -> int:
        """Labels that labelled nothing, for whatever reason."""
        return self.labels - self.matched

    def __str__(self) -> str:
        return (
            f"{self.matched} of {self.labels} labels matched a prediction ({self.by_request} "
            f"by request id, {self.by_patient} by patient); unmatched: {self.request_not_found} "
            f"unknown request, {self.request_multi_row} multi-record request, "
            f"{self.patient_not_found} no prediction of the patient within the horizon, "
            f"{self.superseded} for an already labelled prediction"
        )


def _utc_ns(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True).astype(_UTC_NS)


def join_labels(
    predictions: pd.DataFrame, labels: pd.DataFrame, horizon_days: float = 90
) -> pd.DataFrame:
    """The predictions that have a ground-truth outcome, with that outcome.

    Matching rules:

    - A label with a ``request_id`` is matched by it alone: to the prediction of that
      request when the request had exactly one record. A multi-record request cannot say
      which of its predictions the outcome is about, so such a label stays unmatched.
    - A label with only a ``patient`` is matched to that patient's latest prediction at or
      before the label's ``time`` and no more than ``horizon_days`` before it.
    - A prediction matched by several labels keeps the first: the earliest label ``time``,
      then a request-id match before a patient match, then the labels' order.

    Args:
        predictions: the prediction log (``clinml.predictionlog.read_predictions``).
        labels: the stored labels (``read_labels``).
        horizon_days: how long after a prediction an outcome may still be attributed to
            it by patient.

    Returns:
        The matched predictions, by prediction ``time``: their columns plus ``outcome``
        (0/1), ``label_time`` (when the outcome became known) and ``matched_by``
        (``"request"`` or ``"patient"``). ``attrs[JOIN_REPORT]`` holds the
        :class:`JoinReport` of the counts.

    Raises:
        ValueError: a label has neither a patient nor a request id, or an input lacks a
            column the join needs (a bug upstream: ``ingest_labels`` never stores one).
    """
    if horizon_days <= 0:
        raise ValueError(f"horizon_days must be positive; got {horizon_days}")
    missing = [c for c in ("patient", "request_id", "outcome", "time") if c not in labels]
    if missing:
        raise ValueError(f"labels lack the column(s) {', '.join(missing)}; use read_labels")
    labels = labels.reset_index(drop=True)
    has_request = labels["request_id"].notna().to_numpy()
    has_patient = labels["patient"].notna().to_numpy()
    if (~has_request & ~has_patient).any():
        raise ValueError("a label has neither a patient nor a request id")
    clash = {"outcome", "label_time", "matched_by"} & set(predictions.columns)
    if clash:
        raise ValueError(f"predictions already have the column(s) {', '.join(sorted(clash))}")

    if predictions.empty:
        predictions = pd.DataFrame(columns=["time", "request_id", "patient"])
    missing = [c for c in ("time", "request_id", "patient") if c not in predictions]
    if missing:
        raise ValueError(f"predictions lack the column(s) {', '.join(missing)}")
    preds = predictions.reset_index(drop=True)
    preds_time = _utc_ns(preds["time"])
    label_time = _utc_ns(labels["time"])

    # By request id: only requests with exactly one record say which prediction it was.
    sizes = preds["request_id"].value_counts(dropna=True)
    by_request = labels.index[has_request]
    size = labels.loc[by_request, "request_id"].map(sizes).fillna(0).to_numpy()
    request_not_found = int((size == 0).sum())
    request_multi_row = int((size > 1).sum())
    single = by_request[size == 1]
    position = pd.Series(preds.index, index=preds["request_id"]).loc[
        ~preds["request_id"].duplicated(keep=False).to_numpy()
    ]
    request_rows = labels.loc[single, "request_id"].map(position)

    # By patient: the latest prediction at or before the label, within the horizon.
    left = pd.DataFrame(
        {
            "time": label_time[~has_request & has_patient],
            "patient": labels.loc[~has_request & has_patient, "patient"].astype(object),
            "label": labels.index[~has_request & has_patient],
        }
    ).sort_values("time", kind="stable")
    known = preds["patient"].notna().to_numpy()
    right = pd.DataFrame(
        {
            "time": preds_time[known],
            "patient": preds.loc[known, "patient"].astype(object),
            "row": preds.index[known].to_numpy(dtype="float64"),
        }
    ).sort_values("time", kind="stable")
    asof = pd.merge_asof(
        left,
        right,
        on="time",
        by="patient",
        direction="backward",
        tolerance=pd.Timedelta(days=horizon_days),
        allow_exact_matches=True,
    )
    patient_hits = asof[asof["row"].notna()]
    patient_not_found = len(asof) - len(patient_hits)

    candidates = pd.concat(
        [
            pd.DataFrame({"label": single, "row": request_rows.to_numpy(dtype="int64"), "via": 0}),
            pd.DataFrame(
                {
                    "label": patient_hits["label"].to_numpy(dtype="int64"),
                    "row": patient_hits["row"].to_numpy(dtype="int64"),
                    "via": 1,
                }
            ),
        ],
        ignore_index=True,
    )
    candidates["label_time"] = label_time.iloc[candidates["label"].to_numpy()].array
    candidates = candidates.sort_values(["label_time", "via", "label"], kind="stable")
    winners = candidates.drop_duplicates("row", keep="first")

    out = preds.loc[winners["row"].to_numpy()].copy()
    out["outcome"] = labels.loc[winners["label"].to_numpy(), "outcome"].astype("int64").to_numpy()
    out["label_time"] = winners["label_time"].array
    out["matched_by"] = np.where(winners["via"].to_numpy() == 0, "request", "patient")
    out["_time"] = preds_time.loc[out.index].array
    out = out.sort_values("_time", kind="stable").drop(columns="_time").reset_index(drop=True)
    out.attrs[JOIN_REPORT] = JoinReport(
        labels=len(labels),
        by_request=int((winners["via"] == 0).sum()),
        by_patient=int((winners["via"] == 1).sum()),
        request_not_found=request_not_found,
        request_multi_row=request_multi_row,
        patient_not_found=patient_not_found,
        superseded=len(candidates) - len(winners),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Performance per window
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPerformance:
    """Performance on the labelled predictions made in ``[start, end)``.

    A metric is None where it is undefined (AUROC needs both classes, sensitivity a
    positive); an interval is None where it could not be estimated. The bootstrap intervals
    (AUROC, sensitivity, ECE) resample patients and are None when ``n_boot`` is 0; the
    others are closed-form and always computed.

    Attributes:
        n: labelled predictions in the window.
        positives: of them, outcomes of the positive class.
        roc_auc, roc_auc_ci: AUROC and its 95% percentile-bootstrap interval.
        sensitivity, sensitivity_ci: at the operating threshold the model served with,
            i.e. from the logged ``label``.
        ece, ece_ci: expected calibration error (``evaluation.calibration_bins`` bins), as
            measured in the window (the value ``max_ece`` judges), and a 95% interval for
            the ECE that windows of this many labels from the same patients would show
            (:func:`clinml.training.metrics.recentred_interval`). ECE is biased upwards on small
            samples; the interval says how far chance alone moves it, and always contains
            the estimate.
        judged: there were at least ``min_labels`` labelled predictions and both classes,
            so the window is checked against the floors.
        below_floor: one line per floor the point estimate breaks, e.g.
            ``"ece 0.081 > 0.05"``; always empty when the window is not judged.
        observed_expected, observed_expected_ci: outcomes observed over outcomes the model
            predicted (the sum of its probabilities); 1 is ideal, above 1 the model
            under-predicts risk. Patient-cluster-robust interval
            (:func:`clinml.training.calibration.calibration_summary`).
        calibration_slope, calibration_slope_ci: ``b`` in ``logit P(y=1) = a + b logit(p)``;
            1 is ideal, below 1 the risks are too extreme. Cluster-robust interval.
        alert_rate, alert_rate_ci: share of the window's labelled predictions at or above
            the operating threshold (the served label is the positive class), with a Wilson
            interval on the patient-effective number of rows.
        calibration_notes: why O/E or the slope is missing (one class, separation), else "".
    """

    start: datetime
    end: datetime
    n: int
    positives: int
    roc_auc: float | None
    roc_auc_ci: tuple[float, float] | None
    sensitivity: float | None
    sensitivity_ci: tuple[float, float] | None
    ece: float | None
    ece_ci: tuple[float, float] | None
    judged: bool
    below_floor: list[str] = field(default_factory=list)
    observed_expected: float | None = None
    observed_expected_ci: tuple[float, float] | None = None
    calibration_slope: float | None = None
    calibration_slope_ci: tuple[float, float] | None = None
    alert_rate: float | None = None
    alert_rate_ci: tuple[float, float] | None = None
    calibration_notes: str = ""


def _value(number: float) -> float | None:
    return None if math.isnan(number) else float(number)


def _interval(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    if bounds is None or any(math.isnan(b) for b in bounds):
        return None
    return (float(bounds[0]), float(bounds[1]))


def _aware(name: str, when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"{name} needs a time zone (use UTC)")
    return when.astimezone(UTC)


def _patient_units(rows: pd.DataFrame) -> np.ndarray:
    """Each row's patient as a code ``0..k-1``: the unit the bootstrap resamples (all of a
    patient's rows together) and the intervals cluster on. A row without a patient (or a
    log without patients) is its own unit."""
    n = len(rows)
    if "patient" not in rows:
        return np.arange(n)
    codes, uniques = pd.factorize(rows["patient"].astype(object), use_na_sentinel=True)
    missing = codes < 0
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return codes.astype(np.intp)


def _window(
    spec: UseCaseSpec,
    rows: pd.DataFrame,
    start: datetime,
    end: datetime,
    n_boot: int,
    seed: int,
) -> WindowPerformance:
    n = len(rows)
    if n == 0:
        return WindowPerformance(start, end, 0, 0, None, None, None, None, None, None, False, [])
    bins = spec.evaluation.calibration_bins
    y = rows["outcome"].to_numpy(dtype="int64")
    p = rows["probability"].to_numpy(dtype=float)
    # The decision the service made: its logged label, at the threshold it served with.
    alerted = (rows["label"] == spec.label.positive_class).to_numpy(dtype=float)
    positives = int(y.sum())
    both = 0 < positives < n
    scores = point_metrics(y, p, 0.5, n_bins=bins)
    decisions = point_metrics(y, alerted, 0.5, n_bins=bins)
    roc_auc = _value(scores["roc_auc"]) if both else None
    sensitivity = _value(decisions["sensitivity"]) if positives else None
    ece = _value(scores["ece"])

    groups = _patient_units(rows)
    intervals: dict[str, tuple[float, float] | None] = dict.fromkeys(
        ("roc_auc", "sensitivity", "ece")
    )
    if n_boot > 0 and n > 1:
        # Both calls draw the same resamples (same units, same seed).
        on_scores = bootstrap_values(
            y, p, 0.5, groups=groups, n_boot=n_boot, seed=seed, n_bins=bins
        )
        on_decisions = bootstrap_values(
            y, alerted, 0.5, groups=groups, n_boot=n_boot, seed=seed, n_bins=bins
        )
        if both:
            intervals["roc_auc"] = _interval(percentile_interval(on_scores["roc_auc"]))
        if positives:
            intervals["sensitivity"] = _interval(percentile_interval(on_decisions["sensitivity"]))
        if ece is not None:
            # ECE's resamples sit above it (see recentred_interval): not a percentile interval.
            intervals["ece"] = _interval(recentred_interval(on_scores["ece"], ece, lowest=0.0))

    calibration = calibration_summary(y, p, groups=groups)
    alert_rate = float(alerted.mean())
    effective = n / design_effect(alerted, groups)

    floors = spec.monitoring.performance
    judged = n >= floors.min_labels and both
    below: list[str] = []
    if judged:
        if floors.min_roc_auc is not None and roc_auc is not None and roc_auc < floors.min_roc_auc:
            below.append(f"roc_auc {roc_auc:.3f} < {floors.min_roc_auc:g}")
        low_sensitivity = floors.min_sensitivity is not None and sensitivity is not None
        if low_sensitivity and sensitivity < floors.min_sensitivity:
            below.append(f"sensitivity {sensitivity:.3f} < {floors.min_sensitivity:g}")
        if floors.max_ece is not None and ece is not None and ece > floors.max_ece:
            below.append(f"ece {ece:.3f} > {floors.max_ece:g}")
    return WindowPerformance(
        start=start,
        end=end,
        n=n,
        positives=positives,
        roc_auc=roc_auc,
        roc_auc_ci=intervals["roc_auc"],
        sensitivity=sensitivity,
        sensitivity_ci=intervals["sensitivity"],
        ece=ece,
        ece_ci=intervals["ece"],
        judged=judged,
        below_floor=below,
        observed_expected=_value(calibration.observed_expected),
        observed_expected_ci=_interval(calibration.observed_expected_interval),
        calibration_slope=_value(calibration.slope),
        calibration_slope_ci=_interval(calibration.slope_interval),
        alert_rate=alert_rate,
        alert_rate_ci=_interval(wilson_interval(alert_rate, effective)),
        calibration_notes=calibration.notes,
    )


def performance_by_window(
    spec: UseCaseSpec,
    labelled: pd.DataFrame,
    period: timedelta,
    since: datetime,
    until: datetime,
    n_boot: int = 500,
    seed: int = 0,
) -> list[WindowPerformance]:
    """Performance of the labelled predictions per consecutive window of prediction time.

    Args:
        spec: the use case: positive class, calibration bins and ``clinml.monitoring.performance``
            floors (a floor that is None is not checked).
        labelled: ``join_labels`` output: ``time``, ``probability``, ``label`` (the class
            served), ``outcome`` (0/1) and, optionally, ``patient``.
        period: the length of a window.
        since, until: aware datetimes; windows are ``[since, since + period)``, ... and
            the last one ends at ``until`` (so it may be shorter).
        n_boot: bootstrap resamples per window for the 95% intervals; 0 skips them.
        seed: seed of the bootstrap; equal inputs and seed give equal intervals.

    Returns:
        One :class:`WindowPerformance` per window, oldest first, including empty ones.

    Raises:
        ValueError: a bound has no time zone, ``since`` is not before ``until``, the
            period is not positive, or ``labelled`` lacks a column.
    """
    since, until = _aware("since", since), _aware("until", until)
    if since >= until:
        raise ValueError("since must be before until")
    if period <= timedelta(0):
        raise ValueError("period must be positive")
    if n_boot < 0:
        raise ValueError(f"n_boot must be 0 or more; got {n_boot}")
    if labelled.empty:
        labelled = pd.DataFrame(columns=["time", "probability", "label", "outcome"])
    missing = [c for c in ("time", "probability", "label", "outcome") if c not in labelled]
    if missing:
        raise ValueError(f"labelled lacks the column(s) {', '.join(missing)}; use join_labels")
    times = _utc_ns(labelled["time"])
    windows = []
    start = since
    while start < until:
        end = min(start + period, until)
        inside = ((times >= start) & (times < end)).to_numpy()
        windows.append(_window(spec, labelled[inside], start, end, n_boot, seed))
        start = end
    return windows


def _moment(when: datetime) -> str:
    return f"{when:%Y-%m-%d}" if when.time() == datetime.min.time() else f"{when:%Y-%m-%d %H:%M}"


@dataclass(frozen=True)
class LabelCoverage:
    """How many of the predictions performance looked back over have their outcome yet.

    A window with no labelled prediction is not judged and not reported, so without this a
    week whose outcomes are still coming (a 30-day label delay) looks like a week without
    traffic.

    Attributes:
        since, until: the predictions looked at (the label lookback).
        predictions: predictions made in it.
        labelled: those with an outcome joined.
        within_delay: those made in the last ``delay_days`` before ``until``, whose
            outcome may not be known yet.
        delay_days: the spec's ``label.horizon_days``: how long after a prediction its
            outcome is known.
    """

    since: datetime
    until: datetime
    predictions: int
    labelled: int
    within_delay: int
    delay_days: float

    def line(self) -> str:
        text = (
            f"outcomes: {self.labelled:,} of {self.predictions:,} predictions since "
            f"{_moment(self.since)} have one"
        )
        if self.delay_days > 0:
            text += (
                f"; {self.within_delay:,} were made in the last {self.delay_days:g} days "
                "(the label delay) and may not have one yet"
            )
        return text


def label_coverage(
    spec: UseCaseSpec,
    predictions: pd.DataFrame,
    labelled: pd.DataFrame,
    since: datetime,
    until: datetime,
) -> LabelCoverage:
    """Counts of ``predictions`` (the log, ``since <= time < until``), of those in
    ``labelled`` (``join_labels`` output), and of those within the label delay."""
    delay = spec.label.horizon_days
    times = _utc_ns(predictions["time"]) if len(predictions) else pd.Series([], dtype=_UTC_NS)
    recent = until - timedelta(days=delay)
    return LabelCoverage(
        since=since,
        until=until,
        predictions=len(predictions),
        labelled=len(labelled),
        within_delay=int((times >= recent).sum()) if delay > 0 else 0,
        delay_days=delay,
    )


def summary_line(windows: list[WindowPerformance]) -> str:
    """One line for logs and alerts, e.g. ``performance 2026-05-04..2026-06-01, 4 windows:
    3 judged, 1 not judged (too few labels or one class); below a floor: 2026-05-25
    (ece 0.151 > 0.05)``."""
    if not windows:
        return "performance: no windows"
    judged = [w for w in windows if w.judged]
    flagged = [w for w in judged if w.below_floor]
    head = (
        f"performance {_moment(windows[0].start)}..{_moment(windows[-1].end)}, "
        f"{len(windows)} window{'s' if len(windows) != 1 else ''}: {len(judged)} judged"
    )
    if len(judged) < len(windows):
        head += f", {len(windows) - len(judged)} not judged (too few labels or one class)"
    if not judged:
        return head
    if not flagged:
        return f"{head}; every judged window meets its floors"
    details = "; ".join(f"{_moment(w.start)} ({', '.join(w.below_floor)})" for w in flagged)
    return f"{head}; below a floor: {details}"
