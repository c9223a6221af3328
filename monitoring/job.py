"""The scheduled monitor job: one window of the prediction log, judged and alerted on.

``run`` reads the prediction log for ``[since, until)``, compares it with the champion's
training reference (drift, prediction drift, data quality, subgroup drift:
:mod:`monitoring.drift`), joins any ground-truth labels that have arrived and judges
performance per window against the spec's floors (:mod:`monitoring.performance`), turns
what it found into alerts and delivers them (JSON file, webhook, cooldown:
:mod:`monitoring.alerts`), and adds the snapshots to the Evidently workspace.

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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from clinml.errors import ClinmlError
from clinml.settings import Settings
from clinml.spec import UseCaseSpec
from monitoring import drift
from monitoring.alerts import Alert, AlertSink, Delivery

log = logging.getLogger(__name__)

VERDICT_FILE = "verdict.json"
# Columns of the prediction log that are not features.
LOG_COLUMNS = ("time", "request_id", "model_version", "patient", "probability", "label")


@dataclass(frozen=True)
class MonitorResult:
    run_id: str
    verdict: drift.DriftVerdict
    performance: list[Any] = field(default_factory=list)  # WindowPerformance
    alerts: list[Alert] = field(default_factory=list)
    delivery: Delivery | None = None
    out_dir: Path | None = None
    retrained_version: str | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.alerts else 0

    @property
    def verdict_path(self) -> Path | None:
        return self.out_dir / VERDICT_FILE if self.out_dir else None

    def lines(self) -> list[str]:
        """What the CLI prints."""
        lines = [self.verdict.line()]
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
        if self.delivery is not None:
            lines.append(self.delivery.line())
        if self.retrained_version:
            lines.append(
                f"retrained: challenger version {self.retrained_version} registered; "
                f"review it and run `clinml promote` (never automatic)"
            )
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
    from training.train import PREDICTION_REFERENCE_FILE, load_reference

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
    retrain_on_drift: bool = False,
    now: datetime | None = None,
    deliver: bool = True,
) -> MonitorResult:
    """Judge one window (or an explicit ``batch``) and deliver the alerts it raises.

    Raises:
        ClinmlError: no champion, no predictions in the window, or a bad window.
    """
    from serving.requestlog import read_predictions
    from training.tracking import Tracker
    from training.train import load_reference

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
    target = out_dir or paths.monitoring / "runs" / run_id
    reference = load_reference(tracker, spec.name)
    held_out = _prediction_reference(tracker, spec.name)
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
    )
    windows = _performance(spec, settings, since, until, label_lookback) if batch is None else []
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
    retrained = None
    if retrain_on_drift and (verdict.drift or verdict.prediction_drift):
        retrained = _retrain(spec, settings)
    result = MonitorResult(run_id, verdict, windows, alerts, delivery, target, retrained)
    _write(result)
    return result


def _performance(
    spec: UseCaseSpec,
    settings: Settings,
    since: datetime | None,
    until: datetime | None,
    lookback: timedelta,
) -> list[Any]:
    from monitoring import performance
    from serving.requestlog import read_predictions

    paths = settings.paths.usecase(spec.name)
    if since is None or until is None or not paths.labels.is_dir():
        return []
    labels = performance.read_labels(paths.labels)
    if labels.empty:
        return []
    start = until - max(lookback, until - since)
    predictions = read_predictions(paths.predictions, start, until)
    if predictions.empty:
        return []
    labelled = performance.join_labels(predictions, labels)
    period = until - since
    return [
        w
        for w in performance.performance_by_window(spec, labelled, period, start, until)
        if w.n > 0
    ]


def _add_to_workspace(settings: Settings, spec: UseCaseSpec, verdict: drift.DriftVerdict) -> None:
    workspace = settings.paths.usecase(spec.name).evidently_workspace
    try:
        drift.add_to_workspace(workspace, f"clinml {spec.name}", verdict.snapshots)
    except Exception as exc:  # the history is a convenience; the verdict stands without it
        log.warning("could not add the snapshots to the Evidently workspace: %s", exc)


def _retrain(spec: UseCaseSpec, settings: Settings) -> str:
    """Ingest fresh data, materialize, train: a new challenger. Never promotes."""
    from pipelines import stages
    from pipelines.progress import Progress

    progress = Progress(total=3, echo=log.info)
    stages.ingest(spec, settings, progress)
    stages.materialize(spec, settings, progress)
    return stages.train(spec, settings, progress)


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
        "retrained_version": result.retrained_version,
    }
    (result.out_dir / VERDICT_FILE).write_text(json.dumps(document, indent=2, default=str))


def _window_dict(window: Any) -> dict[str, Any]:
    return asdict(window) if hasattr(window, "__dataclass_fields__") else dict(window)
