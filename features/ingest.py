"""Ingestion: raw data in, validated, pseudonymised, identifier-free offline data out.

``run`` is the whole stage:

1. load the raw frame (a built-in loader or CSV/Parquet) and normalise declared types;
2. add the entity key or timestamp if the spec says the data has none (docs/byod.md);
3. pass the quality gate (the spec's limits and, once learned, the reference profile:
   ``clinml.features.profile``); a failing batch raises before anything is stored, leaving
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
fills in a stored unknown one. Otherwise the batch replaces what is stored.

``append_monitored`` adds rows that clinml itself saw in service, with their outcomes
(the labelled predictions a retrain on drift learns from: ``clinml.monitoring.retraining``):
their patient ids are already pseudonyms and their event time is the prediction's; they
pass the spec's own checks but not the learned profile, which describes the source's
batches (drifted rows are what the retrain is for), teach the profile nothing, and never
replace a stored row of the same (entity, timestamp).

A batch is stored all or nothing. ``offline`` is a symlink to the directory of the
last committed run under ``.ingest/``: a run writes its files (and its report and
profile) into a new directory there and commits by renaming a new link over
``offline``, so a reader sees the previous batch's files or this batch's, never a
mixture, and an ingest that fails or is killed before that rename changes nothing
readers see. After the commit the run's report and profile are moved to where
readers look for them; if the run is killed in between, the next ingest finishes that
move, and it deletes the directories of runs that never committed. Ingests of one use
case take turns (a lock in ``.ingest/``).

With a PostgreSQL offline store (the production profile) the two frames also go to its
tables (``clinml.features.offline``), replaced in one transaction just before the local
commit; they are then what every reader reads. A run killed between the two commits has
stored the batch in PostgreSQL but lost its report (the gate then reads the previous
run's).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from clinml import atomic
from clinml.errors import ClinmlError, DataValidationError, NotReadyError, SpecError
from clinml.features.offline import PostgresTables
from clinml.features.profile import QualityProfile, learn
from clinml.features.validate import ValidationReport, require_valid, write_report
from clinml.pseudonym import PREFIX, Pseudonymiser, pseudonymise_column
from clinml.settings import UseCasePaths
from clinml.spec import UseCaseSpec
from clinml.tables import read_table


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
    from clinml.features.datasets import LOADERS

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


def add_generated_columns(
    frame: pd.DataFrame, spec: UseCaseSpec, now: datetime, keep_timestamps: bool = False
) -> pd.DataFrame:
    """Derive the entity key and/or the timestamp where the spec says the data has none.

    - ``entity.generated``: each row's key is a hash of its declared columns plus its
      occurrence number among identical rows, so re-ingesting the same file gives the
      same keys. Every row is then its own patient.
    - ``event_timestamp_generated``: every row is stamped with ``now`` (with
      ``keep_timestamps``, only when the frame has no timestamp column: monitored rows
      carry the time of their prediction).
    """
    frame = frame.copy()
    if spec.entity.generated:
        declared = [c.name for c in spec.columns if c.name in frame.columns]
        content = pd.util.hash_pandas_object(frame[declared], index=False).astype("uint64")
        occurrence = frame.groupby(content.to_numpy()).cumcount().to_numpy()
        frame[spec.entity.key] = [
            f"row_{h:016x}_{k}" for h, k in zip(content, occurrence, strict=True)
        ]
    given = keep_timestamps and spec.event_timestamp in frame.columns
    if spec.event_timestamp_generated and not given:
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


# Each run stages its files in a directory of its own under ``paths.ingest_runs``; the
# committed run's ``offline/`` is what the ``offline`` link points at. Its ``publish/``
# holds the report and profile until they are moved into place.
def _committed_run(paths: UseCasePaths) -> Path | None:
    """The run directory ``offline`` points at (None before the first commit)."""
    if not paths.offline.is_symlink():
        return None
    return (paths.offline.parent / os.readlink(paths.offline)).parent


def _commit(paths: UseCasePaths, run: Path) -> None:
    """Point ``offline`` at ``run``'s files: the one step that readers see.

    Everything the run wrote is flushed to disk first, so the link never points at
    files a power cut could still lose.
    """
    for directory, _, files in os.walk(run):
        for name in files:
            atomic.sync(Path(directory, name))
        atomic.sync(Path(directory))
    link = run / "offline.link"
    os.symlink(os.path.relpath(run / "offline", paths.root), link)
    os.replace(link, paths.offline)
    atomic.sync(paths.root)


def _publish(paths: UseCasePaths, run: Path) -> None:
    """Move a run's validation report and learned profile to where readers look.

    Each file is moved in one rename, the report's ``summary.json`` (what the
    promotion gate reads) last, so repeating this after a kill finishes the job.
    """
    pending = run / "publish"
    if not pending.is_dir():
        return
    profile = pending / "profile.json"
    if profile.is_file():
        paths.quality_profile.parent.mkdir(parents=True, exist_ok=True)
        os.replace(profile, paths.quality_profile)
        atomic.sync(paths.quality_profile.parent)
    for report in sorted((pending / "validation").glob("*")):
        target = paths.validation_reports / report.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "summary.json"):
            if (report / name).is_file():
                os.replace(report / name, target / name)
        atomic.sync(target)
    shutil.rmtree(pending)


def _recover(paths: UseCasePaths) -> None:
    """Finish what a killed ingest committed, drop what it did not (lock held).

    Also turns an ``offline`` directory written before runs were committed this way
    into a committed run; if that is killed between its two renames, ``offline`` is
    missing and the next call completes it.
    """
    legacy = paths.ingest_runs / "legacy"
    if paths.offline.is_dir() and not paths.offline.is_symlink():
        legacy.mkdir(parents=True, exist_ok=True)
        os.rename(paths.offline, legacy / "offline")
    if not os.path.lexists(paths.offline) and (legacy / "offline").is_dir():
        _commit(paths, legacy)
    committed = _committed_run(paths)
    if committed is not None:
        _publish(paths, committed)
    for run in paths.ingest_runs.iterdir():
        if run.is_dir() and run != committed:
            shutil.rmtree(run)


def _merge(
    stored: pd.DataFrame, batch: pd.DataFrame, keys: list[str], prefer_new: bool
) -> pd.DataFrame:
    """Union of two frames keyed by ``keys``; on a clash keep the stored or the new row."""
    combined = pd.concat([stored, batch] if not prefer_new else [batch, stored], ignore_index=True)
    combined = combined.drop_duplicates(subset=keys, keep="first")
    # Stable, so appending a batch that is already stored changes nothing, not even
    # the order of rows with equal timestamps (a killed ingest is simply run again).
    return combined.sort_values(keys[1], kind="stable").reset_index(drop=True)


def run(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime,
    pseudonymiser: Pseudonymiser,
    frame: pd.DataFrame | None = None,
    append: bool = False,
    learn_profile: bool = False,
    report: Callable[[str], None] = lambda _: None,
    tables: PostgresTables | None = None,
) -> IngestResult:
    """Validate a batch and store it in the offline store, all or nothing.

    Args:
        spec: the use-case spec.
        paths: where this use case's files live.
        now: the clock: passed to loaders, stamps generated timestamps.
        pseudonymiser: the keyed hash applied to the entity key.
        frame: a raw batch to ingest instead of ``spec.source`` (tests, backfills).
        append: add to the stored data instead of replacing it.
        learn_profile: make this batch the reference profile (after the spec's checks).
        report: receives a line as each phase (load, gate, write) finishes.
        tables: the PostgreSQL offline store's tables, when the environment has one
            (``clinml.features.offline``): the batch is committed there, in one transaction,
            before the local files (which then only record which run was last).

    Returns:
        Counts and the paths written.

    Raises:
        DataValidationError: the batch failed the gate; nothing was stored (the
            gate's report is written under ``reports/validation/``).
    """
    phase = _phases(report)
    raw = prepare_batch(spec, now, frame)
    phase(f"loaded {len(raw):,} rows")
    mode = _Mode(append=append, learn_profile=learn_profile)
    return _store(spec, paths, now, pseudonymiser, raw, mode, phase, tables)


def append_monitored(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime,
    pseudonymiser: Pseudonymiser,
    frame: pd.DataFrame,
    keys_pseudonymised: bool = True,
    report: Callable[[str], None] = lambda _: None,
    tables: PostgresTables | None = None,
) -> IngestResult:
    """Add rows seen in service, with their outcomes, to the offline store, all or nothing.

    Rows whose (entity, timestamp) is already stored are left out (the stored row stays
    as it is), so adding the same monitored rows again changes nothing. The rows pass the
    spec's own checks (types, nulls, ranges, categories, label classes, unique
    keys), not the learned profile: that profile describes the source's batches, and
    rows that drifted from it are what a retrain on drift is for. Nothing is learned
    from them.

    Args:
        spec: the use-case spec.
        paths: where this use case's files live.
        now: the clock: names the gate's report (and stamps generated timestamps of rows
            without any).
        pseudonymiser: the keyed hash, for raw ids (``keys_pseudonymised=False``) and for
            keys the spec generates.
        frame: one row per event: entity key, event timestamp, label (and
            ``label.known_at`` when the spec has it), features and attributes.
        keys_pseudonymised: the entity key column already holds pseudonyms (the
            prediction log's ``patient``); otherwise it holds raw ids, hashed here.
        report: receives a line as each phase finishes.
        tables: the PostgreSQL offline store's tables, if any (as for :func:`run`).

    Returns:
        Counts (``added_rows``: rows not stored before) and the paths written.

    Raises:
        DataValidationError: the rows failed the spec's checks; nothing was stored.
        ClinmlError: a key that should be a pseudonym is not one (nothing is stored
            that could be a raw id).
    """
    phase = _phases(report)
    raw = add_generated_columns(normalise_types(frame, spec), spec, now, keep_timestamps=True)
    pseudonymise = spec.entity.generated or not keys_pseudonymised
    if not pseudonymise and spec.entity.key in raw.columns:
        keys = raw[spec.entity.key]
        raw_ids = int((keys.notna() & ~keys.astype(str).str.startswith(PREFIX)).sum())
        if raw_ids:
            raise ClinmlError(
                f"{raw_ids} of {len(raw):,} monitored rows have a {spec.entity.key} that is "
                "not a pseudonym; nothing was stored"
            )
    phase(f"loaded {len(raw):,} monitored rows")
    mode = _Mode(append=True, pseudonymise=pseudonymise, learned_checks=False, keep_stored=True)
    return _store(spec, paths, now, pseudonymiser, raw, mode, phase, tables)


@dataclass(frozen=True)
class _Mode:
    """How a batch is stored: a source batch (``run``) or monitored rows."""

    append: bool
    learn_profile: bool = False
    pseudonymise: bool = True  # False: the key column already holds pseudonyms
    learned_checks: bool = True  # False: the spec's checks only, and nothing is learned
    keep_stored: bool = False  # rows whose (entity, timestamp) is stored are left out


def _phases(report: Callable[[str], None]) -> Callable[[str], None]:
    started = time.perf_counter()

    def phase(text: str) -> None:
        report(f"{text} ({time.perf_counter() - started:.1f}s)")

    return phase


def _store(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime,
    pseudonymiser: Pseudonymiser,
    raw: pd.DataFrame,
    mode: _Mode,
    phase: Callable[[str], None],
    tables: PostgresTables | None,
) -> IngestResult:
    """Gate ``raw`` and commit it (see the module doc), under the use case's lock."""
    with atomic.locked(paths.ingest_runs / "lock"):
        _recover(paths)
        run_dir = paths.ingest_runs / f"run-{uuid.uuid4().hex[:12]}"
        run_dir.mkdir()  # the umask's permissions, as offline/ always had
        try:
            result = _stage(spec, paths, now, pseudonymiser, raw, run_dir, mode, phase, tables)
            if tables is not None:
                tables.replace({"features": result.features, "labels": result.labels})
                phase(f"committed to {tables.qualified('features')} and its labels table")
            _commit(paths, run_dir)
        except BaseException:
            if _committed_run(paths) != run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        _recover(paths)  # publishes this run's report and profile, drops the previous run
    phase(f"wrote {len(result.features):,} feature rows and {len(result.labels):,} labels")
    return result.outcome


@dataclass(frozen=True)
class _Staged:
    outcome: IngestResult
    features: pd.DataFrame  # everything stored once the run commits
    labels: pd.DataFrame


def _stage(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime,
    pseudonymiser: Pseudonymiser,
    raw: pd.DataFrame,
    run_dir: Path,
    mode: _Mode,
    phase: Callable[[str], None],
    tables: PostgresTables | None = None,
) -> _Staged:
    """Gate the batch and write everything it changes into ``run_dir``, and nothing else.

    Raises:
        DataValidationError: the batch failed the gate; its report is published.
    """
    reference = reference_profile(paths) if mode.learned_checks else None
    learning = mode.learned_checks and (mode.learn_profile or reference is None)
    profile = None if learning else reference
    published = paths.validation_run(now)
    staged_report = run_dir / "publish" / "validation" / published.name
    try:
        validation = require_valid(raw, spec, profile, staged_report)
    except DataValidationError as failed:
        # A rejected batch's report is published at once: it says what to fix.
        _publish(paths, run_dir)
        report_file = published / "report.md"
        message = str(failed).replace(str(failed.report), str(report_file))
        raise DataValidationError(message, failed.failures, report=report_file) from None
    write_report(validation, spec, staged_report)
    phase("quality gate passed")

    dropped = [c for c in spec.identifier_columns if c in raw.columns]
    key, ts, label = spec.entity.key, spec.event_timestamp, spec.label.column
    clean = raw.drop(columns=dropped)
    if mode.pseudonymise:
        clean[key] = pseudonymise_column(clean[key], pseudonymiser)
    features = clean[[key, ts, *(c.name for c in spec.columns)]].sort_values(ts, kind="stable")
    label_columns = [key, ts, label, *([spec.label.known_at] if spec.label.known_at else [])]
    labels = clean.loc[clean[label].notna(), label_columns].sort_values(ts, kind="stable")

    added = len(features)
    stored_features = _stored(paths, tables, "features") if mode.append else None
    if stored_features is not None and mode.keep_stored:
        fresh = ~_keys(features, key, ts).isin(_keys(stored_features, key, ts))
        features = features[fresh]
        labels = labels[~_keys(labels, key, ts).isin(_keys(stored_features, key, ts))]
        added = len(features)
    if stored_features is not None:
        before = len(stored_features)
        features = _merge(stored_features, features, [key, ts], prefer_new=False)
        added = len(features) - before
        stored_labels = _stored(paths, tables, "labels")
        if stored_labels is not None:
            labels = _merge(stored_labels, labels, [key, ts], prefer_new=True)
    features, labels = features.reset_index(drop=True), labels.reset_index(drop=True)
    offline = run_dir / "offline"
    offline.mkdir()
    features.to_parquet(offline / paths.features_file.name, index=False)
    labels.to_parquet(offline / paths.labels_file.name, index=False)
    if learning:
        learn(raw, spec, now).save(run_dir / "publish" / "profile.json")
    outcome = IngestResult(
        rows=len(clean),
        patients=int(clean[key].nunique()),
        added_rows=added,
        labelled_rows=int(np.count_nonzero(clean[label].notna())),
        dropped_identifiers=dropped,
        features_file=paths.features_file,
        labels_file=paths.labels_file,
        validation=validation,
        report=published / "report.md",
        learned_profile=learning,
    )
    return _Staged(outcome, features, labels)


def _keys(frame: pd.DataFrame, key: str, ts: str) -> pd.MultiIndex:
    """(entity, timestamp) pairs, comparable whatever the timestamps' unit."""
    stamps = pd.to_datetime(frame[ts], utc=True).astype("datetime64[ns, UTC]")
    return pd.MultiIndex.from_arrays([frame[key].astype(object), stamps])


def _stored(paths: UseCasePaths, tables: PostgresTables | None, which: str) -> pd.DataFrame | None:
    """The stored ``features`` or ``labels`` (None before the first ingest)."""
    if tables is not None:
        return tables.read(which)
    file = paths.features_file if which == "features" else paths.labels_file
    return pd.read_parquet(file) if file.is_file() else None


def read_features(
    spec: UseCaseSpec, paths: UseCasePaths, tables: PostgresTables | None = None
) -> pd.DataFrame:
    """The stored feature rows: entity, timestamp, features and attributes.

    Raises:
        NotReadyError: nothing has been ingested.
    """
    features = _stored(paths, tables, "features")
    if features is None:
        raise NotReadyError(
            f"no ingested data for '{spec.name}': run `clinml ingest {spec.name}` first"
        )
    return features


def has_data(paths: UseCasePaths, tables: PostgresTables | None = None) -> bool:
    """Whether a batch has been ingested (into the tables, when there are some)."""
    return tables.exists("features") if tables is not None else paths.features_file.is_file()


def read_labels(
    spec: UseCaseSpec,
    paths: UseCasePaths,
    now: datetime | None = None,
    tables: PostgresTables | None = None,
) -> pd.DataFrame:
    """The training events: entity, timestamp and label, for labels known by ``now``."""
    labels = _stored(paths, tables, "labels")
    if labels is None:
        raise NotReadyError(
            f"no ingested data for '{spec.name}': run `clinml ingest {spec.name}` first"
        )
    if spec.label.known_at is not None and now is not None:
        labels = labels[labels[spec.label.known_at] <= pd.Timestamp(now)]
    return labels[[spec.entity.key, spec.event_timestamp, spec.label.column]].reset_index(drop=True)
