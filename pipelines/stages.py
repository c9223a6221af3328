"""Each stage wired to its collaborators built from settings.

These are what the CLI commands and the demo call: they open the feature store, the
tracker and the data directory from settings, call the stage function, and report
progress. Tests call the stage functions themselves with their own collaborators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from clinml.clock import utc_now
from clinml.errors import ClinmlError, NotReadyError, StoreUnavailable, store_unavailable
from clinml.pipelines.progress import Progress
from clinml.settings import Settings
from clinml.spec import REFERENCE_CANDIDATE, UseCaseSpec
from clinml.tables import read_table

if TYPE_CHECKING:
    from clinml.environment import FeastEnvironment
    from clinml.features.offline import PostgresTables
    from clinml.monitoring.retraining import RetrainingData
    from clinml.training.distributed import RayCluster
    from clinml.training.governance import Decision

log = logging.getLogger(__name__)


@contextmanager
def _stores_answer(then: str) -> Iterator[None]:
    """A store that does not answer, as the one line that names it, then ``then``: what
    stands and what to run once it answers."""
    try:
        yield
    except ClinmlError:
        raise
    except Exception as exc:
        unavailable = store_unavailable(exc)
        if unavailable is None:
            raise
        raise StoreUnavailable(f"{unavailable}; {then}") from exc


def _offline_tables(spec: UseCaseSpec, environment: FeastEnvironment) -> PostgresTables | None:
    """The PostgreSQL offline store's tables of the use case (None: parquet files)."""
    from clinml.features.offline import PostgresTables

    return PostgresTables.for_environment(environment, spec.name)


def ingest(
    spec: UseCaseSpec,
    settings: Settings,
    progress: Progress,
    data: Path | None = None,
    append: bool = False,
    learn_profile: bool = False,
) -> None:
    """Validate and store the batch, then register the Feast definitions.

    Each step is all or nothing (docs/feature-store.md). A run killed between them has
    stored the batch, and the next ingest or materialize registers the definitions
    (which changes nothing unless the spec changed).
    """
    from clinml.features import ingest as ingest_stage
    from clinml.features import store as feature_store

    paths = settings.paths.usecase(spec.name)
    environment = settings.feast_environment
    tables = _offline_tables(spec, environment)
    with progress.step(f"ingest and validate '{spec.name}' (Great Expectations)"):
        frame = None if data is None else read_table(data)
        result = ingest_stage.run(
            spec,
            paths,
            utc_now(),
            settings.pseudonymiser(),
            frame=frame,
            append=append,
            learn_profile=learn_profile,
            report=progress.detail,
            tables=tables,
        )
        progress.detail(f"{result.validation.summary()}; report: {result.report}")
        if result.learned_profile:
            progress.detail(f"reference profile learned from this batch: {paths.quality_profile}")
        progress.detail(
            f"{result.rows} rows ({result.labelled_rows} with a known label), "
            f"{result.patients} patients; {result.added_rows} rows added"
        )
        progress.detail(
            f"dropped identifier columns: {', '.join(result.dropped_identifiers) or 'none'}; "
            f"{spec.entity.key} pseudonymised"
        )
        where = tables.qualified("features") if tables else result.features_file.parent
        progress.detail(f"offline data: {where}")
    with (
        progress.step(f"register Feast definitions (feature service {spec.feature_service})"),
        _stores_answer(
            "the batch is stored; the next ingest or materialize registers the definitions"
        ),
    ):
        store = feature_store.open_store(spec, paths, environment)
        feature_store.apply(store, spec, paths)
        progress.detail(f"Feast repo: {paths.feast_repo}")


def materialize(
    spec: UseCaseSpec, settings: Settings, progress: Progress, full: bool = False
) -> None:
    """Load the newest offline values into the online store (incremental by default).

    All or nothing: a run that fails or is killed leaves the online store as it was
    (``clinml.features.online_sqlite.bulk_materialize``).
    """
    from clinml.features import store as feature_store
    from clinml.features.ingest import has_data

    paths = settings.paths.usecase(spec.name)
    environment = settings.feast_environment
    if not has_data(paths, _offline_tables(spec, environment)):
        raise NotReadyError(
            f"no ingested data for '{spec.name}': run `clinml ingest {spec.name}` first"
        )
    online = environment.online_type
    with (
        progress.step(f"materialize features into the online store ({online})"),
        _stores_answer("run the command again once it answers"),
    ):
        store = feature_store.open_store(spec, paths, environment)
        feature_store.apply(store, spec, paths)
        with progress.bar("entities written") as bar:
            result = feature_store.materialize(store, spec, utc_now(), full=full, progress=bar)
        window = f"{result.start:%Y-%m-%d %H:%M} to {result.end:%Y-%m-%d %H:%M} UTC"
        if result.entities_written < 0:  # Feast's own materialize does not count
            progress.detail(f"{result.mode} load of {window} (by Feast into {online})")
        else:
            progress.detail(
                f"{result.mode} load of {window}: {result.rows_read:,} offline rows, newest "
                f"of {result.entities_written:,} entities written"
            )


def train(
    spec: UseCaseSpec,
    settings: Settings,
    progress: Progress,
    tags: dict[str, str] | None = None,
) -> str:
    """Search, train and evaluate every candidate; register the best as the challenger
    (``tags``: more MLflow tags for it, e.g. why it was trained)."""
    from clinml.features import store as feature_store
    from clinml.features.ingest import read_labels
    from clinml.training import train as train_stage
    from clinml.training.tracking import Tracker

    paths = settings.paths.usecase(spec.name)
    others = [name for name in spec.training.candidates if name != REFERENCE_CANDIDATE]
    with progress.step(
        f"train {len(others)} candidates and the logistic-regression reference: grouped-CV "
        "search, refit, clinical evaluation, selection (MLflow runs)"
    ):
        environment = settings.feast_environment
        events = read_labels(spec, paths, utc_now(), _offline_tables(spec, environment))
        store = feature_store.open_store(spec, paths, environment)
        tracker = Tracker.from_settings(settings, create=True)  # the first run creates it
        with training_cluster(settings) as cluster:
            result = train_stage.run(
                spec, store, tracker, events, report=progress.detail, tags=tags, cluster=cluster
            )
        metrics = result.selected.metrics
        primary = spec.primary_metric
        progress.detail(
            f"challenger: {result.selected.name} = {result.model_name} version {result.version}"
            f" ({primary} {metrics[primary]:.3f} "
            f"[{metrics.get(primary + '_ci_low', float('nan')):.3f}, "
            f"{metrics.get(primary + '_ci_high', float('nan')):.3f}] on {result.test_rows:,} "
            f"held-out rows of {result.test_patients:,} patients)"
        )
    return result.version


@contextmanager
def training_cluster(settings: Settings) -> Iterator[RayCluster | None]:
    """The Ray cluster training runs on (``CLINML_RAY_ADDRESS``), connected for the
    block; None without one (training runs in-process)."""
    if not settings.ray_address:
        yield None
        return
    from clinml.training.distributed import RayCluster

    with RayCluster.connect(settings.ray_address) as cluster:
        yield cluster


# The steps of ``retrain``: gather, store, materialize, train.
RETRAIN_STEPS = 4


def retrain(
    spec: UseCaseSpec,
    settings: Settings,
    progress: Progress,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    lookback: timedelta = timedelta(days=90),
    batch: pd.DataFrame | None = None,
    reason: str = "drift",
    monitor_run: str | None = None,
) -> RetrainingData:
    """Train a challenger on the offline store plus the monitored rows whose outcomes are
    known: a window's labelled predictions (``since``, ``until``, ``lookback``) or a
    ``batch``'s labelled rows (``clinml.monitoring.retraining``). Never promotes.

    The spec's source is not read again: a built-in loader would only regenerate the data
    it seeded, and new source data arrives by ``clinml ingest --append`` (docs/monitoring.md).
    """
    from clinml.features import ingest as ingest_stage
    from clinml.features.ingest import read_labels
    from clinml.monitoring import retraining

    paths = settings.paths.usecase(spec.name)
    tables = _offline_tables(spec, settings.feast_environment)
    with progress.step("gather the monitored rows whose outcomes are known"):
        if batch is not None:
            rows = retraining.batch_rows(spec, settings, batch, utc_now())
        elif since is not None and until is not None:
            rows = retraining.window_rows(spec, settings, since, until, lookback, tables)
        else:
            raise ClinmlError("retraining needs the monitored window or batch")
        progress.detail(rows.line())
    with progress.step("add them to the offline store (the spec's checks; stored rows stay)"):
        before = read_labels(spec, paths, utc_now(), tables)
        added_rows = 0
        if rows.usable:
            added_rows = ingest_stage.append_monitored(
                spec,
                paths,
                utc_now(),
                settings.pseudonymiser(),
                rows.frame,
                keys_pseudonymised=rows.keys_pseudonymised,
                report=progress.detail,
                tables=tables,
            ).added_rows
        after = read_labels(spec, paths, utc_now(), tables)
        data = retraining.describe(spec, rows, before, after, added_rows, reason, monitor_run)
        progress.detail(data.line())
    materialize(spec, settings, progress)
    version = train(spec, settings, progress, tags=data.tags())
    return replace(data, version=version)


def retrain_on_drift(
    spec: UseCaseSpec,
    settings: Settings,
    *,
    since: datetime | None,
    until: datetime | None,
    lookback: timedelta,
    batch: pd.DataFrame | None,
    monitor_run: str,
    echo: Callable[[str], None] | None = None,
) -> RetrainingData:
    """The monitor's retrain on drift (``clinml.monitoring.job.Retrainer``): :func:`retrain`,
    its progress through ``echo`` (the command line's output; the log without one).
    Never promotes.

    Returns:
        What it trained on, and the version.
    """
    say = echo or log.info
    say(
        "drift found: training a challenger on the offline store and the monitored rows "
        "whose outcomes are known (it is never promoted automatically)"
    )
    progress = Progress(total=RETRAIN_STEPS, echo=say, interactive=None if echo else False)
    return retrain(
        spec,
        settings,
        progress,
        since=since,
        until=until,
        lookback=lookback,
        batch=batch,
        reason="drift",
        monitor_run=monitor_run,
    )


def promote(
    spec: UseCaseSpec,
    settings: Settings,
    progress: Progress,
    force: bool = False,
    reason: str | None = None,
    evidence: Any = None,
) -> Decision:
    """Gate the challenger against the champion (or the reference) on rows neither was trained
    on; move the alias on a pass. ``evidence`` (``governance.Evidence``, e.g.
    :func:`shadow_evidence`) adds its checks to the gate's."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.features import store as feature_store
    from clinml.features.ingest import read_labels
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    paths = settings.paths.usecase(spec.name)
    tracker = Tracker.from_settings(settings)
    with progress.step(f"promotion gate for {spec.name} (challenger vs champion)"):
        tracker.version_by_alias(spec.name, governance.CHALLENGER)  # fail fast, before Feast
        environment = settings.feast_environment
        store = feature_store.open_store(spec, paths, environment)
        events = read_labels(spec, paths, utc_now(), _offline_tables(spec, environment))
        frame = feature_store.training_frame(store, spec, events)
        data = governance.CurrentData.from_frame(spec, frame)
        progress.detail(
            f"today's labelled data: {len(data.y):,} rows; the models are compared on the "
            "rows neither was trained on"
        )
        try:
            decision = governance.promote(
                spec,
                tracker,
                AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings)),
                data,
                governance.ValidationStatus.latest(paths.validation_reports),
                settings.actor_name,
                force=force,
                reason=reason,
                evidence=evidence,
            )
        except governance.PromotionRefused as refused:
            _report_checks(refused.decision, progress)
            raise
        _report_checks(decision, progress)
        moved = f"from version {decision.champion}" if decision.champion else "(first champion)"
        progress.detail(
            f"{decision.action}: champion -> version {decision.challenger} {moved}; "
            f"recorded in {settings.audit_log_path}"
        )
    return decision


def _report_checks(decision: Decision, progress: Progress) -> None:
    if decision.assessment is not None:
        for note in decision.assessment.notes:
            progress.detail(note)
    for check in decision.checks:
        progress.detail(f"{'pass' if check.passed else 'FAIL'}  {check.name}: {check.detail}")


def rollback(
    spec: UseCaseSpec, settings: Settings, progress: Progress, reason: str | None = None
) -> tuple[str, str]:
    """Point ``champion`` back at the previous champion."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    with progress.step(f"roll back the {spec.name} champion"):
        moved = governance.rollback(
            spec,
            Tracker.from_settings(settings),
            AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings)),
            settings.actor_name,
            reason,
        )
        progress.detail(f"champion: version {moved[0]} -> version {moved[1]}")
    return moved


def shadow_start(
    spec: UseCaseSpec,
    settings: Settings,
    progress: Progress,
    version: str | None = None,
    reason: str | None = None,
) -> str:
    """Point ``shadow`` at ``version`` (default: the challenger); returns the version."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    with progress.step(f"shadow a {spec.name} version beside the champion"):
        before, shadowed = governance.shadow_start(
            spec,
            Tracker.from_settings(settings),
            AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings)),
            settings.actor_name,
            version,
            reason,
        )
        replacing = f", replacing version {before}" if before else ""
        progress.detail(
            f"shadow: version {shadowed}{replacing}; recorded in {settings.audit_log_path}. "
            "A service with inline execution scores it beside the champion, never answering "
            "with it, from its next alias check (CLINML_RELOAD_INTERVAL_S) or POST /admin/reload"
        )
    return shadowed


def shadow_stop(
    spec: UseCaseSpec, settings: Settings, progress: Progress, reason: str | None = None
) -> str:
    """Remove the ``shadow`` alias; returns the version it named."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    with progress.step(f"stop the {spec.name} shadow"):
        stopped = governance.shadow_stop(
            spec,
            Tracker.from_settings(settings),
            AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings)),
            settings.actor_name,
            reason,
        )
        progress.detail(f"shadow: version {stopped} stopped; recorded in {settings.audit_log_path}")
    return stopped


def canary_start(
    spec: UseCaseSpec,
    settings: Settings,
    progress: Progress,
    percent: float,
    version: str | None = None,
    reason: str | None = None,
) -> str:
    """Point ``canary`` at ``version`` (default: the challenger) with ``percent`` of the
    requests; returns the version."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    with progress.step(f"route {percent:g}% of {spec.name} requests to a canary version"):
        before, canary = governance.canary_start(
            spec,
            Tracker.from_settings(settings),
            AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings)),
            settings.actor_name,
            percent,
            version,
            reason,
        )
        replacing = f", replacing version {before}" if before and before != canary else ""
        progress.detail(
            f"canary: version {canary} answers {percent:g}% of requests{replacing}; recorded "
            f"in {settings.audit_log_path}. A service with inline execution routes to it from "
            "its next alias check (CLINML_RELOAD_INTERVAL_S) or POST /admin/reload"
        )
    return canary


def canary_stop(
    spec: UseCaseSpec, settings: Settings, progress: Progress, reason: str | None = None
) -> str:
    """Remove the ``canary`` alias; returns the version it named."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    with progress.step(f"stop the {spec.name} canary"):
        stopped = governance.canary_stop(
            spec,
            Tracker.from_settings(settings),
            AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings)),
            settings.actor_name,
            reason,
        )
        progress.detail(f"canary: version {stopped} stopped; recorded in {settings.audit_log_path}")
    return stopped


def shadow_report(
    spec: UseCaseSpec,
    settings: Settings,
    since: datetime,
    until: datetime,
    *,
    version: str | None = None,
    out_dir: Path | None = None,
) -> tuple[Any, Path, Path]:
    """The shadow version against the champion on the window's logged requests
    (:mod:`clinml.monitoring.shadow_report`), written as ``shadow.json`` and ``shadow.html``.

    ``version``: the shadow version to report on; default: the one shadowed now, else the
    newest version with shadow rows in the window.

    Returns:
        The report, and the JSON and HTML paths.

    Raises:
        ClinmlError: no champion, no shadow rows in the window, or no pairs.
    """
    from clinml.monitoring.performance import read_labels as read_outcomes
    from clinml.monitoring.shadow_report import shadow_report as compare
    from clinml.predictionlog import read_predictions
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    paths = settings.paths.usecase(spec.name)
    tracker = Tracker.from_settings(settings)
    champion = str(tracker.version_by_alias(spec.name, governance.CHAMPION).version)
    log = read_predictions(paths.predictions, since, until, shadow=True)
    shadowed = log[log["shadow"]] if "shadow" in log.columns else log.iloc[:0]
    if version is None:
        version = governance.shadow_version(tracker, spec.name)
        if version is None and len(shadowed):
            version = str(max(shadowed["model_version"].astype(str), key=int))
    if version is None or shadowed.empty:
        raise ClinmlError(
            f"no shadow answers logged for {spec.name} between {since:%Y-%m-%d %H:%M} and "
            f"{until:%Y-%m-%d %H:%M} UTC: start one with `clinml shadow start {spec.name}` "
            "and let the service answer requests"
        )
    version = str(governance.resolve(tracker, spec.name, version).version)
    thresholds = {
        number: governance.threshold_of(governance.resolve(tracker, spec.name, number))
        for number in {champion, version}
    }
    labels = read_outcomes(paths.labels) if paths.labels.is_dir() else None
    report = compare(
        spec,
        log,
        labels,
        since,
        until,
        champion=champion,
        shadow=version,
        thresholds=thresholds,
        n_boot=spec.evaluation.bootstrap,
        seed=spec.training.seed,
    )
    target = out_dir or paths.shadow_reports / f"{until:%Y%m%dT%H%M%SZ}-v{version}"
    data, page = report.write(target)
    return report, data, page


def shadow_evidence(spec: UseCaseSpec, settings: Settings, since: datetime, until: datetime) -> Any:
    """The shadow report of the window as evidence for the promotion gate: one check,
    ``live_shadow``, that passes when the shadow version's paired comparison on the
    labelled live requests is non-inferior at ``promotion.max_metric_drop`` (with at least
    ``promotion.min_comparison_events`` positives and negatives)."""
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    challenger = Tracker.from_settings(settings).version_by_alias(spec.name, governance.CHALLENGER)
    report, data, _ = shadow_report(spec, settings, since, until, version=str(challenger.version))
    comparison = report.comparison
    if comparison is None:
        check = governance.Check(
            "live_shadow",
            False,
            f"no paired comparison on live requests {since:%Y-%m-%d}..{until:%Y-%m-%d}: "
            f"{report.why_no_comparison}; wait for more outcomes or a longer shadow",
        )
    else:
        check = governance.Check(
            "live_shadow",
            comparison.verdict == governance.NON_INFERIOR,
            report.lines()[-1].removeprefix("labelled comparison ")
            + f"; window {since:%Y-%m-%d %H:%M}..{until:%Y-%m-%d %H:%M} UTC, "
            f"{report.paired:,} paired answers",
        )
    record: dict[str, Any] = {
        "window": [since.isoformat(), until.isoformat()],
        "paired": report.paired,
        "labelled": report.labelled,
        "report": str(data),
    }
    if comparison is not None:
        record |= {
            "metric": comparison.metric,
            "positives": comparison.positives,
            "patients": comparison.patients,
            "difference": comparison.difference,
            "ci": list(comparison.difference_ci),
            "verdict": comparison.verdict,
        }
    return governance.Evidence("shadow", report.shadow_version, [check], record)


def package(spec: UseCaseSpec, settings: Settings, progress: Progress, build: bool = False) -> None:
    """Import the champion into the BentoML store (and optionally build the bento)."""
    from clinml.serving.package import build_bento, import_champion
    from clinml.training.tracking import Tracker

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
    """Drift of one batch against the champion's training reference (no alerts sent)."""
    from clinml.monitoring import job

    result = job.run(spec, settings, batch=batch, out_dir=out_dir, now=utc_now(), deliver=False)
    verdict = result.verdict
    return MonitorOutcome(verdict.line(), result.exit_code, verdict.html_path, verdict.json_path)
