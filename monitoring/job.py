"""The scheduled monitor job: one window of the prediction log, judged and alerted on.

``run`` reads the prediction log for ``[since, until)``, compares it with the champion's
training reference (drift, prediction drift, data quality, subgroup drift:
:mod:`clinml.monitoring.drift`), joins any ground-truth labels that have arrived and judges
performance per window against the spec's floors (:mod:`clinml.monitoring.performance`), turns
what it found into alerts and delivers them (JSON file, webhook, cooldown:
:mod:`clinml.monitoring.alerts`), and adds the snapshots to the Evidently workspace.

Labels arrive late (readmission's 30 days after discharge), so performance looks back
further than drift: it judges the predictions of the last ``label_lookback``, in windows
as long as the drift window.

Exit codes (``MonitorResult.exit_code``): 0 no alert, 1 at least one alert, 2 an error
(raised as :class:`clinml.errors.ClinmlError`, which the CLI turns into 2).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from clinml.errors import ClinmlError
from clinml.monitoring import drift, statistics
from clinml.monitoring.alerts import Alert, AlertSink, Delivery
from clinml.settings import Settings
from clinml.spec import UseCaseSpec

if TYPE_CHECKING:
    from clinml.monitoring.retraining import RetrainingData

log = logging.getLogger(__name__)

VERDICT_FILE = "verdict.json"


class Retrainer(Protocol):
    """What :func:`run` calls on drift to train a challenger on the offline store plus the
    monitored rows whose outcomes are known: the window (``since``, ``until``, the label
    ``lookback``) or the ``batch``, and the monitor run's id. It never promotes.

    The command line hands in ``clinml.pipelines.stages.retrain_on_drift``: retraining wires
    ingest, materialize and train together, which is the pipelines' job, and monitoring
    does not import the layer above it.
    """

    def __call__(
        self,
        spec: UseCaseSpec,
        settings: Settings,
        *,
        since: datetime | None,
        until: datetime | None,
        lookback: timedelta,
        batch: pd.DataFrame | None,
        monitor_run: str,
    ) -> RetrainingData: ...


@dataclass(frozen=True)
class MonitorResult:
    run_id: str
    verdict: drift.DriftVerdict
    performance: list[Any] = field(default_factory=list)  # WindowPerformance
    alerts: list[Alert] = field(default_factory=list)
    delivery: Delivery | None = None
    out_dir: Path | None = None
    retrained_version: str | None = None
    retraining: Any = None  # clinml.monitoring.retraining.RetrainingData: what it trained on
    performance_html: Path | None = None  # performance over time, when windows had labels
    # How many predictions of the label lookback have their outcome yet; None without labels.
    label_coverage: Any = None  # clinml.monitoring.performance.LabelCoverage

    @property
    def exit_code(self) -> int:
        return 1 if self.alerts else 0

    @property
    def verdict_path(self) -> Path | None:
        return self.out_dir / VERDICT_FILE if self.out_dir else None

    def lines(self) -> list[str]:
        """What the CLI prints."""
        lines = [self.verdict.line()]
        if self.verdict.reference_note:
            lines.append(f"compared with the {self.verdict.reference_note}")
        if self.verdict.prediction is not None:
            p = self.verdict.prediction
            lines.append(
                f"prediction drift: {p.method} {p.score_kind} {p.score:.3g} "
                f"({'ALERT' if p.alerts else 'ok'})"
            )
        for issue in self.verdict.quality:
            lines.append(f"data quality: {issue.feature}: {issue.reason} ({issue.severity})")
        for group in self.verdict.subgroups:
            if group.alerts:
                names = ", ".join(f.feature for f in group.drifted if f.alerts)
                lines.append(f"subgroup drift: {group.attribute}={group.group}: {names}")
        for window in self.performance:
            lines.append(_performance_line(window))
        if self.label_coverage is not None:
            lines.append(self.label_coverage.line())
        if self.performance_html is not None:
            lines.append(f"performance over time: {self.performance_html}")
        if self.delivery is not None:
            lines.append(self.delivery.line())
        if self.retrained_version:
            lines.append(
                f"retrained: challenger version {self.retrained_version} registered; "
                f"review it and run `clinml promote` (never automatic)"
            )
            if self.retraining is not None:
                lines.append(f"retrained on {self.retraining.trained_on()}")
        return lines


def _performance_line(window: Any) -> str:
    head = f"performance {window.start:%Y-%m-%d}..{window.end:%Y-%m-%d}: n={window.n}"
    if not window.judged:
        return f"{head} (not judged: too few labels)"
    parts = []
    for name in ("roc_auc", "sensitivity", "ece"):
        value, ci = getattr(window, name), getattr(window, f"{name}_ci")
        if value is not None:
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            parts.append(f"{name} {value:.3f}{interval}")
    flag = f"; BELOW FLOOR: {', '.join(window.below_floor)}" if window.below_floor else ""
    return f"{head}, " + ", ".join(parts) + flag


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"`` or ``"2w"`` as a timedelta."""
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise ClinmlError(f"cannot read the duration {text!r}: use e.g. 7d, 12h, 30m or 2w")
    value = float(text[:-1])
    if value <= 0:
        raise ClinmlError(f"the duration {text!r} must be positive")
    return timedelta(**{units[text[-1]]: value})


def _drift_alerts(verdict: drift.DriftVerdict, base: dict[str, Any]) -> list[Alert]:
    alerts = []
    if verdict.drift:
        significant = [f for f in verdict.features if f.alerts] or verdict.drifted_features
        names = sorted(f.feature for f in significant)
        alerts.append(
            Alert(
                **base,
                kind="data_drift",
                severity="high" if any(f.alerts for f in significant) else "medium",
                summary=verdict.line(),
                key="data_drift:" + ",".join(names),
                details={
                    "drifted_share": verdict.drifted_share,
                    "features": [
                        {"feature": f.feature, "method": f.method, "score": f.score,
                         "score_kind": f.score_kind, "severity": f.severity}
                        for f in significant
                    ],
                },
            )
        )  # fmt: skip
    if verdict.prediction_drift and verdict.prediction is not None:
        p = verdict.prediction
        alerts.append(
            Alert(
                **base,
                kind="prediction_drift",
                severity="high",
                summary=f"predictions drifted ({p.method} {p.score_kind} {p.score:.3g})",
                key="prediction_drift",
                details={"method": p.method, "score": p.score, "score_kind": p.score_kind},
            )
        )
    problems = [q for q in verdict.quality if q.severity in {"high", "medium"}]
    if problems:
        alerts.append(
            Alert(
                **base,
                kind="data_quality",
                severity="high" if any(q.severity == "high" for q in problems) else "medium",
                summary="data quality: " + "; ".join(f"{q.feature}: {q.reason}" for q in problems),
                key="data_quality:" + ",".join(sorted(q.feature for q in problems)),
                details={
                    "features": [
                        {"feature": q.feature, "missing": q.missing, "out_of_range": q.out_of_range,
                         "severity": q.severity}
                        for q in problems
                    ]
                },
            )
        )  # fmt: skip
    groups = [g for g in verdict.subgroups if g.alerts]
    if groups:
        labels = [f"{g.attribute}={g.group}" for g in groups]
        # The key names the features too: a later shift in other features of the same
        # groups is a new alert, not one muted by the cooldown.
        keyed = [
            f"{label}[{','.join(sorted(f.feature for f in g.drifted if f.alerts))}]"
            for label, g in zip(labels, groups, strict=True)
        ]
        alerts.append(
            Alert(
                **base,
                kind="subgroup_drift",
                severity="high",
                summary="drift within subgroups: " + ", ".join(labels),
                key="subgroup_drift:" + ",".join(sorted(keyed)),
                details={
                    "groups": [
                        {"group": label, "features": [f.feature for f in g.drifted if f.alerts]}
                        for label, g in zip(labels, groups, strict=True)
                    ]
                },
            )
        )
    return alerts


def _performance_alerts(windows: list[Any], base: dict[str, Any]) -> list[Alert]:
    """One alert for every judged window below a floor, keyed by the floors crossed, so
    a persisting shortfall is one alert per cooldown, not one per window or run."""
    below = [w for w in windows if w.judged and w.below_floor]
    if not below:
        return []
    metrics = sorted({reason.split()[0] for w in below for reason in w.below_floor})
    return [
        Alert(
            **{
                **base,
                "window_start": below[0].start.isoformat(),
                "window_end": below[-1].end.isoformat(),
            },
            kind="performance",
            severity="high",
            summary="; ".join(_performance_line(w) for w in below),
            key="performance:" + ",".join(metrics),
            details={
                "windows": [
                    {
                        "start": w.start.isoformat(),
                        "n": w.n,
                        "positives": w.positives,
                        "roc_auc": w.roc_auc,
                        "sensitivity": w.sensitivity,
                        "ece": w.ece,
                        "below_floor": list(w.below_floor),
                    }
                    for w in below
                ]
            },
        )
    ]


def _prediction_reference(tracker: Any, name: str) -> pd.DataFrame | None:
    from clinml.training.train import PREDICTION_REFERENCE_FILE, load_reference

    try:
        return load_reference(tracker, name, file=PREDICTION_REFERENCE_FILE)
    except Exception:  # an older version without held-out predictions
        log.warning("the champion has no held-out predictions; prediction drift uses the "
                    "training rows' in-sample probabilities")  # fmt: skip
        return None


def run(
    spec: UseCaseSpec,
    settings: Settings,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    batch: pd.DataFrame | None = None,
    out_dir: Path | None = None,
    label_lookback: timedelta = timedelta(days=90),
    subgroups: bool = True,
    retrain_on_drift: Retrainer | None = None,
    now: datetime | None = None,
    deliver: bool = True,
) -> MonitorResult:
    """Judge one window (or an explicit ``batch``) and deliver the alerts it raises.

    With ``retrain_on_drift`` (the command line's ``--retrain-on-drift`` passes
    ``clinml.pipelines.stages.retrain_on_drift``), data or prediction drift trains a challenger
    after the verdict is written.

    Raises:
        ClinmlError: no champion, no predictions in the window, or a bad window.
    """
    from clinml.predictionlog import read_predictions
    from clinml.training.tracking import Tracker
    from clinml.training.train import load_reference

    now = now or datetime.now(UTC)
    tracker = Tracker.from_settings(settings)
    paths = settings.paths.usecase(spec.name)
    champion = tracker.version_by_alias(spec.name).version
    if batch is None:
        if since is None or until is None:
            raise ClinmlError("give a window (--window, or --since and --until) or a --batch")
        if since >= until:
            raise ClinmlError("the window's start must be before its end")
        current = read_predictions(paths.predictions, since, until)
        if current.empty:
            raise ClinmlError(
                f"no predictions logged for {spec.name} between {since:%Y-%m-%d %H:%M} and "
                f"{until:%Y-%m-%d %H:%M} UTC: is the service running and logging?"
            )
    else:
        current = batch
    run_id = f"{(until or now):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    target = out_dir or paths.monitor_run(run_id)
    reference, held_out, reference_note = _reference(
        spec,
        load_reference(tracker, spec.name),
        _prediction_reference(tracker, spec.name),
        paths.predictions,
        (since, until) if batch is None else _batch_span(spec, batch),
        str(champion),
    )
    log.info("compared with the %s", reference_note)
    scored = current
    if "model_version" in current.columns:  # prediction drift: the champion's own answers
        scored = current[current["model_version"].astype(str) == str(champion)]
    log.info("monitoring %d rows of %s against version %s", len(current), spec.name, champion)
    verdict = drift.run(
        spec,
        reference,
        current,
        target,
        now=now,
        prediction_reference=held_out,
        prediction_current=scored if "probability" in scored.columns else None,
        window=(since, until),
        model_version=str(champion),
        subgroups=subgroups,
        reference_note=reference_note,
    )
    windows, labelled, coverage = (
        _performance(spec, settings, since, until, label_lookback)
        if batch is None
        else ([], None, None)
    )
    base = {
        "usecase": spec.name,
        "model_version": str(champion),
        "window_start": since.isoformat() if since else None,
        "window_end": until.isoformat() if until else None,
    }
    alerts = _drift_alerts(verdict, base) + _performance_alerts(windows, base)
    delivery = AlertSink.from_settings(settings, spec.name).deliver(alerts, run_id) if (
        deliver and alerts
    ) else None  # fmt: skip
    _add_to_workspace(settings, spec, verdict)
    performance_html = _performance_report(spec, settings, windows, labelled, target, str(champion))
    result = MonitorResult(
        run_id,
        verdict,
        windows,
        alerts,
        delivery,
        target,
        performance_html=performance_html,
        label_coverage=coverage,
    )
    _write(result)  # before retraining: the verdict stands if the retraining fails
    if retrain_on_drift is not None and (verdict.drift or verdict.prediction_drift):
        retraining = retrain_on_drift(
            spec,
            settings,
            since=since,
            until=until,
            lookback=label_lookback,
            batch=batch,
            monitor_run=run_id,
        )
        result = replace(result, retrained_version=retraining.version, retraining=retraining)
        _write(result)
    return result


def _batch_span(spec: UseCaseSpec, batch: pd.DataFrame) -> tuple[datetime | None, datetime | None]:
    """When a ``--batch`` file's records happened (its ``time`` or event-timestamp column),
    for a seasonal or rolling reference; unknown without either."""
    for column in ("time", spec.event_timestamp):
        if column in batch.columns:
            when = pd.to_datetime(batch[column], utc=True, errors="coerce").dropna()
            if len(when):
                return when.min().to_pydatetime(), when.max().to_pydatetime()
    return None, None


def _reference(
    spec: UseCaseSpec,
    training: pd.DataFrame,
    held_out: pd.DataFrame | None,
    log_directory: Path,
    window: tuple[datetime | None, datetime | None],
    champion: str,
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """What the window is compared with (``monitoring.reference``): the champion's
    training rows, those of the same season (:func:`clinml.monitoring.drift.choose_reference`),
    or the prediction log of the ``rolling_days`` before the window; the rolling one
    falls back to the training rows, and says so, when the log holds too few patients."""
    from clinml.predictionlog import read_predictions

    monitoring = spec.monitoring
    since = window[0]
    if monitoring.reference != "rolling":
        return drift.choose_reference(spec, training, window, held_out)
    if since is None:
        chosen, held, note = drift.choose_reference(spec, training, window, held_out)
        return chosen, held, f"{note} (a rolling reference needs a window, not a batch)"
    start = since - timedelta(days=monitoring.rolling_days)
    rolling = read_predictions(log_directory, start, since)
    needed = drift.min_patients(spec)
    patients = statistics.effective_size(drift.patient_codes(spec, rolling))
    if rolling.empty or patients < needed:
        chosen, held, note = drift.choose_reference(spec, training, window, held_out)
        return (
            chosen,
            held,
            (
                f"{note} (the {monitoring.rolling_days} days before the window hold "
                f"{patients:,.0f} patients, fewer than the {needed:,} a rolling reference needs)"
            ),
        )
    scored = rolling
    if "model_version" in rolling.columns:
        scored = rolling[rolling["model_version"].astype(str) == champion]
    held = scored if "probability" in scored.columns and len(scored) else held_out
    return (
        rolling,
        held,
        (f"prediction log of {start:%Y-%m-%d}..{since:%Y-%m-%d}: {len(rolling):,} rows"),
    )


def _performance(
    spec: UseCaseSpec,
    settings: Settings,
    since: datetime | None,
    until: datetime | None,
    lookback: timedelta,
) -> tuple[list[Any], pd.DataFrame | None, Any]:
    """The performance windows with labelled predictions, those predictions, and how many
    predictions of the lookback have their outcome yet (a ``LabelCoverage``)."""
    from clinml.monitoring import performance
    from clinml.predictionlog import read_predictions

    paths = settings.paths.usecase(spec.name)
    if since is None or until is None or not paths.labels.is_dir():
        return [], None, None
    labels = performance.read_labels(paths.labels)
    if labels.empty:
        return [], None, None
    start = until - max(lookback, until - since)
    predictions = read_predictions(paths.predictions, start, until)
    if predictions.empty:
        return [], None, None
    labelled = performance.join_labels(predictions, labels)
    coverage = performance.label_coverage(spec, predictions, labelled, start, until)
    period = until - since
    windows = [
        w
        for w in performance.performance_by_window(spec, labelled, period, start, until)
        if w.n > 0
    ]
    return windows, labelled, coverage


def _performance_report(
    spec: UseCaseSpec,
    settings: Settings,
    windows: list[Any],
    labelled: pd.DataFrame | None,
    target: Path,
    champion: str,
) -> Path | None:
    """``performance.html`` in the run's directory, and the windows in the Evidently
    workspace (:mod:`clinml.monitoring.performance_report`). The verdict and its alerts stand
    without either, so a failure is logged, not raised."""
    if not windows:
        return None
    from clinml.monitoring import performance_report

    path = None
    try:
        path = performance_report.write_report(spec, windows, target, model_version=champion)
    except Exception as exc:
        log.warning("could not write the performance report: %s", exc)
    if labelled is not None:
        workspace = settings.paths.usecase(spec.name).evidently_workspace
        try:
            performance_report.add_to_workspace(
                spec, labelled, windows, workspace, model_version=champion
            )
        except Exception as exc:
            log.warning("could not add performance to the Evidently workspace: %s", exc)
    return path


def _add_to_workspace(settings: Settings, spec: UseCaseSpec, verdict: drift.DriftVerdict) -> None:
    workspace = settings.paths.usecase(spec.name).evidently_workspace
    try:
        drift.add_to_workspace(workspace, f"clinml {spec.name}", verdict.snapshots)
    except Exception as exc:  # the history is a convenience; the verdict stands without it
        log.warning("could not add the snapshots to the Evidently workspace: %s", exc)


def _write(result: MonitorResult) -> None:
    if result.out_dir is None:
        return
    result.out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "run_id": result.run_id,
        "exit_code": result.exit_code,
        "alerts": [a.payload() for a in result.alerts],
        "delivery": None
        if result.delivery is None
        else {
            "sent": len(result.delivery.sent),
            "suppressed": len(result.delivery.suppressed),
            "webhook_failures": result.delivery.webhook_failures,
            "alert_file": str(result.delivery.alert_file) if result.delivery.alert_file else None,
        },
        "drift": result.verdict.to_dict(),
        "performance": [_window_dict(w) for w in result.performance],
        "performance_html": str(result.performance_html) if result.performance_html else None,
        "label_coverage": None if result.label_coverage is None else asdict(result.label_coverage),
        "retrained_version": result.retrained_version,
        "retraining": result.retraining.to_dict() if result.retraining is not None else None,
    }
    (result.out_dir / VERDICT_FILE).write_text(json.dumps(document, indent=2, default=str))


def _window_dict(window: Any) -> dict[str, Any]:
    return asdict(window) if hasattr(window, "__dataclass_fields__") else dict(window)
