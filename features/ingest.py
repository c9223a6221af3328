"""Ingestion: raw data in, validated, pseudonymised, identifier-free parquet out.

``run`` is the whole stage:

1. load the raw frame (a built-in loader or CSV/Parquet) and normalise declared types;
2. add the entity key or timestamp if the spec says the data has none (docs/byod.md);
3. pass the quality gate (the spec's limits and, once learned, the reference profile:
   ``features.profile``); a failing batch raises before anything is written, leaving
   a report under ``reports/validation/``. The first accepted batch becomes the
   reference profile (or any batch, with ``learn_profile=True``);
4. drop the identifier (PHI) columns and pseudonymise the entity key (keyed hash);
5. write, under the use case's ``offline/`` directory:

   - ``features.parquet``: entity key, event timestamp, features and attributes (the
     Feast offline source);
   - ``labels.parquet``: entity key, event timestamp, label (and when it became known)
     for the rows whose label is known: the training events.

With ``append=True`` the batch is added to what is stored: rows whose (entity,
timestamp) is already stored are not added again, and a label that has become known
fills in a stored unknown one. Otherwise the batch replaces what is stored. Files are
replaced atomically, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from clinml.errors import NotReadyError, SpecError
from clinml.pseudonym import Pseudonymiser, pseudonymise_column
from clinml.settings import UseCasePaths
from clinml.spec import UseCaseSpec
from clinml.tables import read_table
from features.profile import QualityProfile, learn
from features.validate import ValidationReport, require_valid, write_report


@dataclass(frozen=True)
class IngestResult:
    rows: int
    patients: int
    added_rows: int
    labelled_rows: int
    dropped_identifiers: list[str]
    features_file: Path
    labels_file: Path
    validation: ValidationReport
    report: Path
    learned_profile: bool


def load_raw(spec: UseCaseSpec, now: datetime) -> pd.DataFrame:
    """The raw frame named by ``spec.source``, with declared types normalised.

    Raises:
        SpecError: the loader is unknown, rejects its options, or the file is unreadable.
    """
    from features.datasets import LOADERS

    source = spec.source
    if source.loader is not None:
        if source.loader not in LOADERS:
            known = ", ".join(sorted(LOADERS))
            raise SpecError(f"source.loader: unknown loader '{source.loader}' (known: {known})")
        try:
            frame = LOADERS[source.loader](source.seed, now, **source.options)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"source.options: {exc}") from None
    else:
        assert source.path is not None
        frame = read_table(source.path)
    return normalise_types(frame, spec)


def normalise_types(frame: pd.DataFrame, spec: UseCaseSpec) -> pd.DataFrame:
    """Give text-like columns string values and parse timestamps as UTC.

    Nothing is imputed: an unparseable timestamp becomes NaT and fails the not-null check.
    """
    frame = frame.copy()
    text_columns = [spec.entity.key, spec.label.column]
    text_columns += [c.name for c in spec.columns if not c.is_numeric]
    for column in text_columns:
        if column in frame.columns:
            values = frame[column]
            frame[column] = values.where(values.isna(), values.astype(str)).astype(object)
    for column in spec.columns:
        # true/false columns declared as int flags arrive as bool from many exports.
        present = column.type == "int" and column.name in frame.columns
        if present and pd.api.types.is_bool_dtype(frame[column.name]):
            frame[column.name] = frame[column.name].astype("int64")
    for column in (spec.event_timestamp, spec.label.known_at):
        if column is not None and column in frame.columns:
            frame[column] = pd.to_datetime(frame[column], utc=True, errors="coerce")
    return frame


def add_generated_columns(frame: pd.DataFrame, spec: UseCaseSpec, now: datetime) -> pd.DataFrame:
    """Derive the entity key and/or the timestamp where the spec says the data has none.

    - ``entity.generated``: each row's key is a hash of its declared columns plus its
      occurrence number among identical rows, so re-ingesting the same file gives the
      same keys. Every row is then its own patient.
    - ``event_timestamp_generated``: every row is stamped with ``now``.
    """
    frame = frame.copy()
    if spec.entity.generated:
        declared = [c.name for c in spec.columns if c.name in frame.columns]
        content = pd.util.hash_pandas_object(frame[declared], index=False).astype("uint64")
        occurrence = frame.groupby(content.to_numpy()).cumcount().to_numpy()
        frame[spec.entity.key] = [
            f"row_{h:016x}_{k}" for h, k in zip(content, occurrence, strict=True)
        ]
    if spec.event_timestamp_generated:
        frame[spec.event_timestamp] = pd.Timestamp(now).tz_convert("UTC")
    return frame


def prepare_batch(
    spec: UseCaseSpec, now: datetime, frame: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The batch the gate sees: ``frame`` (or ``spec.source``) typed, ids/times generated."""
    raw = load_raw(spec, now) if frame is None else normalise_types(frame, spec)
    return add_generated_columns(raw, spec, now)


def reference_profile(paths: UseCasePaths) -> QualityProfile | None:
    """The stored reference profile, if a batch has been accepted before."""
    path = paths.quality_profile
    return QualityProfile.load(path) if path.is_file() else None


def _write_atomically(frame: pd.DataFrame, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _merge(
    stored: pd.DataFrame, batch: pd.DataFrame, keys: list[str], prefer_new: bool
) -> pd.DataFrame:
    """Union of two frames keyed by ``keys``; on a clash keep the stored or the new row."""
    combined = pd.concat([stored, batch] if not prefer_new else [batch, stored], ignore_index=True)
    combined = combined.drop_duplicates(subset=keys, keep="first")
    return combined.sort_values(keys[1]).reset_index(drop=True)


def run(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime,
    pseudonymiser: Pseudonymiser,
    frame: pd.DataFrame | None = None,
    append: bool = False,
    learn_profile: bool = False,
    report: Callable[[str], None] = lambda _: None,
) -> IngestResult:
    """Validate a batch and write the offline parquet files.

    Args:
        spec: the use-case spec.
        paths: where this use case's files live.
        now: the clock: passed to loaders, stamps generated timestamps.
        pseudonymiser: the keyed hash applied to the entity key.
        frame: a raw batch to ingest instead of ``spec.source`` (tests, backfills).
        append: add to the stored data instead of replacing it.
        learn_profile: make this batch the reference profile (after the spec's checks).
        report: receives a line as each phase (load, gate, write) finishes.

    Returns:
        Counts and the paths written.

    Raises:
        DataValidationError: the batch failed the gate; nothing was written.
    """
    started = time.perf_counter()

    def phase(text: str) -> None:
        report(f"{text} ({time.perf_counter() - started:.1f}s)")

    raw = prepare_batch(spec, now, frame)
    phase(f"loaded {len(raw):,} rows")
    profile = None if learn_profile else reference_profile(paths)
    report_dir = paths.validation_run(now)
    validation = require_valid(raw, spec, profile, report_dir)
    report_file = write_report(validation, spec, report_dir)[1]
    phase("quality gate passed")

    dropped = [c for c in spec.identifier_columns if c in raw.columns]
    key, ts, label = spec.entity.key, spec.event_timestamp, spec.label.column
    clean = raw.drop(columns=dropped)
    clean[key] = pseudonymise_column(clean[key], pseudonymiser)
    features = clean[[key, ts, *(c.name for c in spec.columns)]].sort_values(ts, kind="stable")
    label_columns = [key, ts, label, *([spec.label.known_at] if spec.label.known_at else [])]
    labels = clean.loc[clean[label].notna(), label_columns].sort_values(ts, kind="stable")

    added = len(features)
    if append and paths.features_file.is_file():
        stored_features = pd.read_parquet(paths.features_file)
        before = len(stored_features)
        features = _merge(stored_features, features, [key, ts], prefer_new=False)
        added = len(features) - before
        if paths.labels_file.is_file():
            labels = _merge(pd.read_parquet(paths.labels_file), labels, [key, ts], prefer_new=True)
    _write_atomically(features.reset_index(drop=True), paths.features_file)
    _write_atomically(labels.reset_index(drop=True), paths.labels_file)
    if profile is None:
        learn(raw, spec, now).save(paths.quality_profile)
    phase(f"wrote {len(features):,} feature rows and {len(labels):,} labels")
    return IngestResult(
        rows=len(clean),
        patients=int(clean[key].nunique()),
        added_rows=added,
        labelled_rows=int(np.count_nonzero(clean[label].notna())),
        dropped_identifiers=dropped,
        features_file=paths.features_file,
        labels_file=paths.labels_file,
        validation=validation,
        report=report_file,
        learned_profile=profile is None,
    )


def read_labels(
    spec: UseCaseSpec, paths: UseCasePaths, now: datetime | None = None
) -> pd.DataFrame:
    """The training events: entity, timestamp and label, for labels known by ``now``."""
    if not paths.labels_file.is_file():
        raise NotReadyError(
            f"no ingested data for '{spec.name}': run `clinml ingest {spec.name}` first"
        )
    labels = pd.read_parquet(paths.labels_file)
    if spec.label.known_at is not None and now is not None:
        labels = labels[labels[spec.label.known_at] <= pd.Timestamp(now)]
    return labels[[spec.entity.key, spec.event_timestamp, spec.label.column]].reset_index(drop=True)
