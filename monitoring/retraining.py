"""What a retrain on drift learns from: the monitored rows whose outcomes are known.

``clinml monitor --retrain-on-drift`` trains a challenger on everything already in the
offline store plus the rows the monitor was reacting to, where their outcomes have
arrived:

- for a window of the prediction log (:func:`window_rows`): its predictions over the
  label lookback up to the window's end, joined to the stored outcomes the way
  performance monitoring joins them (:func:`clinml.monitoring.performance.join_labels`);
- for a ``--batch`` (:func:`batch_rows`): its rows that carry the label column, read as
  an ingest batch reads them (raw patient ids, pseudonymised here).

Both return rows in the offline store's layout: the pseudonymised patient as the entity
key, the prediction's time as the event timestamp, the outcome as the label (and, where
the spec has ``label.known_at``, the time the outcome became known), the logged features,
and attributes the log does not carry (the service takes features only) from the
patient's stored row at or before that time. They count what they leave out and why: a
prediction whose outcome is not known yet, one without a patient (a ``/predict`` request
by features names none, so its row cannot join a patient's history), one without a value
a stored row needs.

:class:`RetrainingData` says what the retrain trained on, for the command line, the
monitor's verdict and the challenger's MLflow tags (:data:`TAG_PREFIX`).
``clinml.pipelines.stages.retrain`` wires the steps: these rows into the offline store
(``clinml.features.ingest.append_monitored``), materialize, train.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.pseudonym import pseudonymise_column
from clinml.spec import UseCaseSpec

if TYPE_CHECKING:
    from clinml.features.offline import PostgresTables
    from clinml.settings import Settings

# Model-version and run tags of a retrained challenger start with this.
TAG_PREFIX = "clinml.retrain_"
NO_OUTCOME = "without a known outcome"
NO_PATIENT = "without a patient id"
REPEATED = "repeating a patient and time"


@dataclass(frozen=True)
class MonitoredRows:
    """The monitored rows a retrain can learn from, and what was left out.

    Attributes:
        source: what was looked at, in words (the window of predictions, or the batch).
        frame: the usable rows, in the offline store's layout (see the module doc).
        looked_at: monitored rows looked at.
        skipped: rows left out, by reason.
        keys_pseudonymised: the entity key column holds pseudonyms (absent when the
            spec generates keys).
    """

    source: str
    frame: pd.DataFrame = field(repr=False)
    looked_at: int
    skipped: dict[str, int] = field(default_factory=dict)
    keys_pseudonymised: bool = True

    @property
    def usable(self) -> int:
        return len(self.frame)

    def line(self) -> str:
        skipped = "".join(f", {n:,} {why}" for why, n in self.skipped.items())
        return f"{self.looked_at:,} rows of {self.source}: {self.usable:,} labelled{skipped}"


def window_rows(
    spec: UseCaseSpec,
    settings: Settings,
    since: datetime,
    until: datetime,
    lookback: timedelta,
    tables: PostgresTables | None = None,
) -> MonitoredRows:
    """The labelled predictions of the label lookback up to ``until`` (as performance
    monitoring judges them: ``lookback`` or the window, whichever is longer)."""
    from clinml.monitoring import performance
    from clinml.predictionlog import read_predictions

    paths = settings.paths.usecase(spec.name)
    start = until - max(lookback, until - since)
    source = f"the predictions of {start:%Y-%m-%d %H:%M}..{until:%Y-%m-%d %H:%M} UTC"
    predictions = read_predictions(paths.predictions, start, until)
    if predictions.empty:
        return MonitoredRows(source, _layout(spec, pd.DataFrame()), 0)
    labels = performance.read_labels(paths.labels)
    labelled = (
        predictions.iloc[:0] if labels.empty else performance.join_labels(predictions, labels)
    )
    skipped = {NO_OUTCOME: len(predictions) - len(labelled)}
    if not spec.entity.generated:
        anonymous = labelled["patient"].isna().to_numpy()
        skipped[NO_PATIENT] = int(anonymous.sum())
        labelled = labelled[~anonymous]
    frame = pd.DataFrame(index=labelled.index)
    if not spec.entity.generated:
        frame[spec.entity.key] = labelled["patient"].astype(object)
    frame[spec.event_timestamp] = pd.to_datetime(labelled["time"], utc=True)
    classes = np.array([spec.label.negative_class, spec.label.positive_class], dtype=object)
    frame[spec.label.column] = classes[labelled["outcome"].to_numpy(dtype=int)]
    if spec.label.known_at is not None:
        frame[spec.label.known_at] = pd.to_datetime(labelled["label_time"], utc=True)
    for column in spec.columns:
        if column.name in labelled.columns:
            frame[column.name] = labelled[column.name]
    frame, more = _complete(spec, frame, tables, settings)
    return MonitoredRows(source, frame, len(predictions), _counted({**skipped, **more}))


def batch_rows(
    spec: UseCaseSpec, settings: Settings, batch: pd.DataFrame, now: datetime
) -> MonitoredRows:
    """The rows of a ``--batch`` that carry an outcome: the label column, the entity key
    (raw ids, as in any ingest batch) and the event timestamp (unless the spec generates
    them). An outcome without ``label.known_at`` counts as known ``now``."""
    key, ts, label = spec.entity.key, spec.event_timestamp, spec.label.column
    source = "the batch"
    if label not in batch.columns:
        return MonitoredRows(
            source, _layout(spec, batch.iloc[:0]), len(batch), {NO_OUTCOME: len(batch)}
        )
    known = batch[batch[label].notna()]
    skipped = {NO_OUTCOME: len(batch) - len(known)}
    if not spec.entity.generated and key not in known.columns:
        skipped[f"{NO_PATIENT} (no {key} column)"] = len(known)
        known = known.iloc[:0]
    if not spec.event_timestamp_generated and ts not in known.columns:
        skipped[f"without an event time (no {ts} column)"] = len(known)
        known = known.iloc[:0]
    frame = known[[c for c in _columns(spec) if c in known.columns]].copy()
    if not spec.entity.generated:
        ids = frame[key]
        frame[key] = pseudonymise_column(
            ids.where(ids.isna(), ids.astype(str)), settings.pseudonymiser()
        )
        anonymous = frame[key].isna().to_numpy()
        skipped[NO_PATIENT] = int(anonymous.sum())
        frame = frame[~anonymous]
    if ts in frame.columns:
        frame[ts] = pd.to_datetime(frame[ts], utc=True, errors="coerce")
    if spec.label.known_at is not None and spec.label.known_at not in frame.columns:
        frame[spec.label.known_at] = pd.Timestamp(now).tz_convert("UTC")
    frame, more = _complete(spec, frame, None, settings)
    return MonitoredRows(source, frame, len(batch), _counted({**skipped, **more}))


def _columns(spec: UseCaseSpec) -> list[str]:
    """The offline store's layout: key, timestamp, label (and known-at), features, attributes."""
    known_at = [spec.label.known_at] if spec.label.known_at else []
    key = [] if spec.entity.generated else [spec.entity.key]
    return [
        *key,
        spec.event_timestamp,
        spec.label.column,
        *known_at,
        *(c.name for c in spec.columns),
    ]


def _layout(spec: UseCaseSpec, frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: frame[c] if c in frame.columns else [] for c in _columns(spec)})


def _counted(skipped: dict[str, int]) -> dict[str, int]:
    return {why: n for why, n in skipped.items() if n}


def _complete(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    tables: PostgresTables | None,
    settings: Settings,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Fill the columns the rows lack from the patient's stored row at or before each
    row's time, give int columns their type, and leave out rows that still lack a value
    the spec requires, and repeats of a (patient, time)."""
    key, ts = spec.entity.key, spec.event_timestamp
    skipped: dict[str, int] = {}
    absent = [c.name for c in spec.columns if c.name not in frame.columns]
    if absent and not frame.empty and key in frame.columns and ts in frame.columns:
        frame = _from_history(spec, frame, absent, tables, settings)
    frame = frame.reindex(columns=[c for c in _columns(spec) if c in frame.columns or c in absent])
    required = [c.name for c in spec.columns if not c.nullable]
    if key in frame.columns:
        required.append(key)
    if ts in frame.columns:
        required.append(ts)
    incomplete = frame[required].isna()
    if incomplete.to_numpy().any():
        names = ", ".join(c for c in required if incomplete[c].any())
        skipped[f"without a value of {names}"] = int(incomplete.any(axis=1).sum())
        frame = frame[~incomplete.any(axis=1).to_numpy()]
    for column in spec.columns:
        if column.type == "int" and column.name in frame.columns:
            values = pd.to_numeric(frame[column.name], errors="coerce")
            whole = values.dropna()
            if (whole == np.round(whole)).all():
                frame[column.name] = values.astype("Int64" if values.isna().any() else "int64")
    if key in frame.columns and ts in frame.columns:
        repeated = frame.duplicated([key, ts], keep="first").to_numpy()
        skipped[REPEATED] = int(repeated.sum())
        frame = frame[~repeated]
    return frame.reset_index(drop=True), _counted(skipped)


def _from_history(
    spec: UseCaseSpec,
    frame: pd.DataFrame,
    columns: list[str],
    tables: PostgresTables | None,
    settings: Settings,
) -> pd.DataFrame:
    """``columns`` of each row's patient from their newest stored row at or before the
    row's time (null where the patient has none)."""
    from clinml.features.ingest import read_features

    key, ts = spec.entity.key, spec.event_timestamp
    stored = read_features(spec, settings.paths.usecase(spec.name), tables)
    history = stored[[key, ts, *columns]].copy()
    history[ts] = pd.to_datetime(history[ts], utc=True).astype("datetime64[ns, UTC]")
    history[key] = history[key].astype(object)
    out = frame.copy()
    stamps = pd.to_datetime(out[ts], utc=True).astype("datetime64[ns, UTC]")
    known = (out[key].notna() & stamps.notna()).to_numpy()
    rows = pd.DataFrame(
        {key: out.loc[known, key].astype(object), ts: stamps[known], "_row": np.flatnonzero(known)}
    )
    joined = pd.merge_asof(
        rows.sort_values(ts, kind="stable"),
        history.dropna(subset=[ts]).sort_values(ts, kind="stable"),
        on=ts,
        by=key,
        direction="backward",
    )
    for column in columns:
        values = np.full(len(out), None, dtype=object)
        values[joined["_row"].to_numpy()] = joined[column].to_numpy(dtype=object)
        out[column] = pd.Series(values, index=out.index).infer_objects()
    return out


@dataclass(frozen=True)
class RetrainingData:
    """What a retrain on drift trained on.

    Attributes:
        reason: why it retrained (``drift``).
        source: the monitored rows looked at, in words.
        events: labelled events offered to training (known by the time it ran).
        stored: of them, events the offline store held before the retrain.
        added: labelled monitored rows added to the offline store.
        already_stored: usable monitored rows the offline store already held (a window
            a previous retrain used).
        skipped: monitored rows left out, by reason.
        latest: the newest training event's time.
        monitor_run: the monitor run that retrained.
        version: the challenger version registered.
    """

    reason: str
    source: str
    events: int
    stored: int
    added: int
    already_stored: int
    skipped: dict[str, int]
    latest: datetime | None
    monitor_run: str | None = None
    version: str | None = None

    def trained_on(self) -> str:
        up_to = f" up to {self.latest:%Y-%m-%d}" if self.latest is not None else ""
        again = f", {self.already_stored:,} already stored" if self.already_stored else ""
        text = (
            f"{self.events:,} labelled events{up_to} ({self.stored:,} from the offline store, "
            f"{self.added:,} labelled rows of {self.source}{again})"
        )
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n:,} {why}" for why, n in self.skipped.items())
        return text

    def line(self) -> str:
        return f"retraining on {self.trained_on()}"

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["latest"] = self.latest.isoformat() if self.latest is not None else None
        document["summary"] = self.trained_on()
        return document

    def tags(self) -> dict[str, str]:
        """MLflow tags of the challenger (model version and run)."""
        tags = {
            "reason": self.reason,
            "source": self.source,
            "events": str(self.events),
            "events_stored": str(self.stored),
            "events_added": str(self.added),
            "already_stored": str(self.already_stored),
            "skipped": json.dumps(self.skipped, sort_keys=True),
            "latest_event": self.latest.isoformat() if self.latest is not None else "",
            "summary": self.trained_on(),
        }
        if self.monitor_run:
            tags["monitor_run"] = self.monitor_run
        return {TAG_PREFIX + name: value for name, value in tags.items()}


def describe(
    spec: UseCaseSpec,
    rows: MonitoredRows,
    before: pd.DataFrame,
    after: pd.DataFrame,
    added_rows: int,
    reason: str,
    monitor_run: str | None = None,
) -> RetrainingData:
    """What the retrain trains on: the training events ``before`` and ``after`` the
    monitored rows were added (``clinml.features.ingest.read_labels``), and how many of the
    usable rows the store added (``added_rows``)."""
    stamps = pd.to_datetime(after[spec.event_timestamp], utc=True)
    return RetrainingData(
        reason=reason,
        source=rows.source,
        events=len(after),
        stored=len(before),
        added=len(after) - len(before),
        already_stored=rows.usable - added_rows,
        skipped=dict(rows.skipped),
        latest=stamps.max().to_pydatetime() if len(stamps) else None,
        monitor_run=monitor_run,
    )
