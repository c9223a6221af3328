"""Ingestion: raw data in, validated identifier-free parquet out.

``run`` is the whole stage: load the raw frame (built-in loader or CSV/Parquet), normalise
the declared types, pass the quality gate, drop the PHI identifier columns, and write two
files under the use case's ``offline/`` directory:

- ``features.parquet``: entity key, event timestamp, features and attributes (the Feast
  offline source);
- ``labels.parquet``: entity key, event timestamp and label (the training events).

A batch that fails the gate raises before anything is written; the files are replaced
atomically, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from clinml.errors import NotReadyError, SpecError
from clinml.settings import UseCasePaths
from clinml.spec import UseCaseSpec
from clinml.tables import read_table
from features.validate import ValidationReport, require_valid


@dataclass(frozen=True)
class IngestResult:
    rows: int
    patients: int
    dropped_identifiers: list[str]
    features_file: Path
    labels_file: Path
    validation: ValidationReport


def load_raw(spec: UseCaseSpec, now: datetime) -> pd.DataFrame:
    """The raw frame named by ``spec.source``, with declared types normalised.

    Raises:
        SpecError: the loader is unknown or the file cannot be read.
    """
    from features.datasets import LOADERS

    source = spec.source
    if source.loader is not None:
        if source.loader not in LOADERS:
            known = ", ".join(sorted(LOADERS))
            raise SpecError(f"source.loader: unknown loader '{source.loader}' (known: {known})")
        frame = LOADERS[source.loader](source.seed, now)
    else:
        assert source.path is not None
        frame = read_table(source.path)
    return normalise_types(frame, spec)


def normalise_types(frame: pd.DataFrame, spec: UseCaseSpec) -> pd.DataFrame:
    """Give text-like columns string values and parse the timestamp as UTC.

    Nothing is imputed: an unparseable timestamp becomes NaT and fails the not-null check.
    """
    frame = frame.copy()
    text_columns = [spec.entity.key, spec.label.column]
    text_columns += [c.name for c in spec.columns if not c.is_numeric]
    for column in text_columns:
        if column in frame.columns:
            values = frame[column]
            frame[column] = values.where(values.isna(), values.astype(str)).astype(object)
    ts = spec.event_timestamp
    if ts in frame.columns:
        frame[ts] = pd.to_datetime(frame[ts], utc=True, errors="coerce")
    return frame


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


def run(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime,
    frame: pd.DataFrame | None = None,
) -> IngestResult:
    """Validate a batch and write the offline parquet files.

    Args:
        spec: the use-case spec.
        paths: where this use case's files live.
        now: the clock, passed to loaders that synthesise timestamps.
        frame: a raw batch to ingest instead of ``spec.source`` (tests, backfills).

    Returns:
        Counts and the paths written.

    Raises:
        DataValidationError: the batch failed the gate; nothing was written.
    """
    raw = load_raw(spec, now) if frame is None else normalise_types(frame, spec)
    report = require_valid(raw, spec)
    dropped = [c for c in spec.identifier_columns if c in raw.columns]
    clean = raw.drop(columns=dropped)
    key, ts = spec.entity.key, spec.event_timestamp
    features = clean[[key, ts, *(c.name for c in spec.columns)]]
    labels = clean[[key, ts, spec.label.column]]
    _write_atomically(features, paths.features_file)
    _write_atomically(labels, paths.labels_file)
    return IngestResult(
        rows=len(clean),
        patients=int(clean[key].nunique()),
        dropped_identifiers=dropped,
        features_file=paths.features_file,
        labels_file=paths.labels_file,
        validation=report,
    )


def read_labels(spec: UseCaseSpec, paths: UseCasePaths) -> pd.DataFrame:
    """The training events (entity, timestamp, label) written by ``run``."""

    if not paths.labels_file.is_file():
        raise NotReadyError(
            f"no ingested data for '{spec.name}': run `clinml ingest {spec.name}` first"
        )
    return pd.read_parquet(paths.labels_file)
