"""Each stage wired to its collaborators built from settings.

These are what the CLI commands and the demo call: they open the feature store, the
tracker and the data directory from settings, call the stage function, and report
progress. Tests call the stage functions themselves with their own collaborators.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from clinml.settings import Settings
from clinml.spec import UseCaseSpec
from clinml.tables import read_table
from pipelines.progress import Progress


def _now() -> datetime:
    return datetime.now(UTC)


def ingest(
    spec: UseCaseSpec, settings: Settings, progress: Progress, data: Path | None = None
) -> None:
    """Validate and write the offline data, then apply and materialize the Feast repo."""
    from features import ingest as ingest_stage
    from features import store as feature_store
    from features.validate import ValidationReport

    paths = settings.paths.usecase(spec.name)
    now = _now()
    with progress.step(f"ingest and validate '{spec.name}' (Great Expectations)"):
        frame = None if data is None else read_table(data)
        result = ingest_stage.run(spec, paths, now, frame=frame)
        report: ValidationReport = result.validation
        progress.detail(f"{report.summary()}")
        progress.detail(
            f"{result.rows} rows, {result.patients} patients; dropped identifier columns: "
            f"{', '.join(result.dropped_identifiers) or 'none'}"
        )
        progress.detail(f"offline data: {result.features_file.parent}")
    with progress.step(f"publish features to Feast (feature service {spec.feature_service})"):
        store = feature_store.open_store(spec, paths)
        feature_store.apply(store, spec, paths)
        stamps = pd.read_parquet(paths.features_file, columns=[spec.event_timestamp])
        start = stamps[spec.event_timestamp].min() - timedelta(seconds=1)
        feature_store.materialize(store, spec, start.to_pydatetime(), now + timedelta(seconds=1))
        progress.detail(f"Feast repo: {paths.feast_repo} (online store: SQLite)")


def train(spec: UseCaseSpec, settings: Settings, progress: Progress) -> str:
    """Train every candidate and register the best as the champion; returns its version."""
    from features import store as feature_store
    from features.ingest import read_labels
    from training import train as train_stage
    from training.tracking import Tracker

    paths = settings.paths.usecase(spec.name)
    with progress.step(f"train {len(spec.training.candidates)} candidates (MLflow runs)"):
        events = read_labels(spec, paths)
        store = feature_store.open_store(spec, paths)
        result = train_stage.run(
            spec, store, Tracker.from_settings(settings), events, report=progress.detail
        )
        progress.detail(
            f"champion: {result.champion.name} registered as {result.model_name} version "
            f"{result.version} ({spec.primary_metric}="
            f"{result.champion.metrics[spec.primary_metric]:.3f} "
            f"on {result.test_rows} held-out patients)"
        )
    return result.version


def package(spec: UseCaseSpec, settings: Settings, progress: Progress, build: bool = False) -> None:
    """Import the champion into the BentoML store (and optionally build the bento)."""
    from serving.package import build_bento, import_champion
    from training.tracking import Tracker

    with progress.step("package the champion for BentoML"):
        packaged = import_champion(spec, Tracker.from_settings(settings))
        progress.detail(
            f"BentoML model {packaged.tag} = {packaged.registered_model} v{packaged.version}"
        )
    if build:
        with progress.step("bentoml build"):
            from clinml.settings import PROJECT_ROOT

            progress.detail(f"bento {build_bento(PROJECT_ROOT)}")


@dataclass(frozen=True)
class MonitorOutcome:
    line: str
    exit_code: int
    html: str
    json: str


def monitor(
    spec: UseCaseSpec, settings: Settings, batch: pd.DataFrame, out_dir: Path | None = None
) -> MonitorOutcome:
    """Drift of a batch against the champion's training reference."""
    from monitoring import drift
    from training.tracking import Tracker
    from training.train import load_reference

    reference = load_reference(Tracker.from_settings(settings), spec.name)
    target = out_dir or settings.paths.usecase(spec.name).reports
    verdict = drift.run(spec, reference, batch, target, now=_now())
    return MonitorOutcome(verdict.line(), verdict.exit_code, verdict.html_path, verdict.json_path)
