"""Clinical evaluation of one model on one set of held-out rows.

An :class:`Evaluation` is what training logs for every candidate, what the model card
shows and what the promotion gate checks: the metrics with patient-level bootstrap 95%
CIs, the confusion matrix at the operating threshold, calibration as TRIPOD+AI asks for
it (intercept, slope and observed/expected ratio with intervals, a smoothed calibration
curve, the binned table), the decision curve around the operating threshold, and the
subgroup table for the spec's sensitive attributes (and their pairwise intersections).
The arithmetic lives in :mod:`clinml.training.metrics` and :mod:`clinml.training.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from clinml.spec import UseCaseSpec
from clinml.training import metrics as m


@dataclass(frozen=True)
class Evaluation:
    """Everything measured about one model on one held-out set."""

    threshold: float
    rule: str
    rows: int
    patients: int
    positives: int
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    confusion: dict[str, int]
    calibration: pd.DataFrame = field(repr=False)
    subgroups: pd.DataFrame = field(repr=False)
    n_boot: int = 0
    ece_by_chance: float = math.nan
    # Intercept, slope and O/E with cluster-robust intervals (CalibrationSummary.to_dict()).
    calibration_fit: dict[str, Any] = field(default_factory=dict)
    smoothed_calibration: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    decision_curve: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def alerts_per_100(self) -> float:
        alerts = self.confusion["tp"] + self.confusion["fp"]
        return 100.0 * alerts / self.rows if self.rows else math.nan

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Metrics, CI bounds, threshold and confusion counts as MLflow metric names."""
        out: dict[str, float] = {}
        for name, value in self.metrics.items():
            out[f"{prefix}{name}"] = value
            low, high = self.ci.get(name, (math.nan, math.nan))
            out[f"{prefix}{name}_ci_low"] = low
            out[f"{prefix}{name}_ci_high"] = high
        out[f"{prefix}operating_threshold"] = self.threshold
        out[f"{prefix}alerts_per_100"] = self.alerts_per_100
        out[f"{prefix}ece_by_chance"] = self.ece_by_chance
        for name in ("intercept", "slope"):
            if name in self.calibration_fit:
                out[f"{prefix}calibration_{name}"] = self.calibration_fit[name]
                out[f"{prefix}calibration_{name}_ci_low"] = self.calibration_fit[f"{name}_low"]
                out[f"{prefix}calibration_{name}_ci_high"] = self.calibration_fit[f"{name}_high"]
        out.update({f"{prefix}{k}": float(v) for k, v in self.confusion.items()})
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def to_dict(self, primary_metric: str) -> dict[str, Any]:
        """The JSON form used by the model card and the evaluation artifact."""
        return {
            "test_rows": self.rows,
            "test_patients": self.patients,
            "positives": self.positives,
            "bootstrap": {"n_boot": self.n_boot, "level": 0.95, "unit": "patient"},
            "primary_metric": primary_metric,
            "metrics": {
                name: {
                    "value": value,
                    "ci_low": self.ci.get(name, (math.nan, math.nan))[0],
                    "ci_high": self.ci.get(name, (math.nan, math.nan))[1],
                }
                for name, value in self.metrics.items()
            },
            "operating_point": {
                "threshold": self.threshold,
                "rule": self.rule,
                "confusion": dict(self.confusion),
                "alerts_per_100": self.alerts_per_100,
            },
            "calibration": self.calibration.to_dict(orient="records"),
            "calibration_fit": dict(self.calibration_fit),
            "smoothed_calibration": self.smoothed_calibration.to_dict(orient="records"),
            "decision_curve": self.decision_curve.to_dict(orient="records"),
            "ece_by_chance": self.ece_by_chance,
            "subgroups": self.subgroups.to_dict(orient="records"),
        }


# The operating threshold must meet its rule at this one-sided confidence bound.
THRESHOLD_CONFIDENCE = 0.95


def choose_threshold(
    spec: UseCaseSpec,
    y: np.ndarray,
    probability: np.ndarray,
    patients: np.ndarray | None = None,
    window: m.BudgetWindow | None = None,
    times: np.ndarray | None = None,
) -> float:
    """The operating threshold by the spec's rule, from out-of-fold predictions.

    The rule holds at a one-sided 95% bound (:func:`clinml.training.metrics.choose_threshold`);
    an alert budget also allows for the chance variation of one
    ``evaluation.budget_window_days`` period of new rows (``window``) and, with the rows'
    event ``times``, for the variation between such periods seen in the data (seasons).
    """
    rule = spec.evaluation
    if rule.min_sensitivity is not None:
        return m.choose_threshold(
            y,
            probability,
            min_sensitivity=rule.min_sensitivity,
            groups=patients,
            confidence=THRESHOLD_CONFIDENCE,
        )
    if rule.max_alerts_per_100 is not None:
        return m.choose_threshold(
            y,
            probability,
            max_alerts_per_100=rule.max_alerts_per_100,
            groups=patients,
            confidence=THRESHOLD_CONFIDENCE,
            window=window,
            periods=None if times is None else periods(times, rule.budget_window_days),
        )
    return rule.operating_threshold if rule.operating_threshold is not None else 0.5


def periods(times: np.ndarray, days: float) -> np.ndarray:
    """Each time's consecutive ``days``-long period, counted from the earliest."""
    from clinml.training.assignment import utc_instants

    instants = utc_instants(times)
    return ((instants - instants.min()) / np.timedelta64(1, "D") // days).astype(np.int64)


def rule_metric(spec: UseCaseSpec) -> str | None:
    """The metric the threshold rule is about: ``sensitivity``, ``alert_rate`` or None
    (a fixed threshold)."""
    rule = spec.evaluation
    if rule.min_sensitivity is not None:
        return "sensitivity"
    return "alert_rate" if rule.max_alerts_per_100 is not None else None


def rule_refuted(spec: UseCaseSpec, evaluation: Evaluation) -> bool:
    """Whether the interval excludes the rule: the sensitivity's upper bound below its
    target, or the alert rate's lower bound above the budget (what the gate refuses on)."""
    rule = spec.evaluation
    if rule.min_sensitivity is not None:
        return evaluation.ci["sensitivity"][1] < rule.min_sensitivity
    if rule.max_alerts_per_100 is not None:
        return 100 * evaluation.ci["alert_rate"][0] > rule.max_alerts_per_100
    return False


def rule_holds(spec: UseCaseSpec, evaluation: Evaluation) -> tuple[bool | None, str]:
    """Whether the threshold rule is met on these rows, at the point estimate, and the value
    with its interval in words. ``None`` for a fixed threshold (no rule to meet). (The
    promotion gate refuses only when the interval excludes the rule.)"""
    rule = spec.evaluation
    if rule.min_sensitivity is not None:
        value = evaluation.metrics["sensitivity"]
        low, high = evaluation.ci.get("sensitivity", (math.nan, math.nan))
        text = (
            f"sensitivity {value:.3f} [{low:.3f}, {high:.3f}] vs target "
            f"{rule.min_sensitivity:g} on {evaluation.positives:,} positives"
        )
        return value >= rule.min_sensitivity, text
    if rule.max_alerts_per_100 is not None:
        value = 100 * evaluation.metrics["alert_rate"]
        low, high = (100 * v for v in evaluation.ci.get("alert_rate", (math.nan, math.nan)))
        text = (
            f"{value:.1f} [{low:.1f}, {high:.1f}] alerts per 100 {rule.row_noun} vs budget "
            f"{rule.max_alerts_per_100:g} on {evaluation.rows:,} rows"
        )
        return value <= rule.max_alerts_per_100, text
    return None, f"fixed threshold {evaluation.threshold:g}"


def evaluate(
    spec: UseCaseSpec,
    y: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    patients: np.ndarray,
    attributes: pd.DataFrame,
    n_boot: int | None = None,
    subgroups: bool = True,
) -> Evaluation:
    """Evaluate positive-class probabilities against 0/1 outcomes.

    Args:
        spec: supplies the sensitive attributes, bootstrap size, bins and group size.
        y: 1 for the positive class, 0 otherwise.
        probability: predicted probability of the positive class.
        threshold: the operating threshold (probabilities at or above it alert).
        patients: each row's patient; the bootstrap resamples patients, not rows.
        attributes: each row's sensitive attributes (columns may be a superset).
        n_boot: bootstrap resamples (default: the spec's).
        subgroups: also fill the subgroup table.
    """
    from clinml.training import calibration as c

    y = np.asarray(y).astype(int)
    probability = np.asarray(probability, dtype=float)
    settings = spec.evaluation
    n_boot = settings.bootstrap if n_boot is None else n_boot
    bins = settings.calibration_bins
    table = (
        m.subgroup_table(
            attributes.reset_index(drop=True),
            y,
            probability,
            threshold,
            spec.sensitive_attributes,
            min_size=settings.min_group_size,
            metrics=tuple(
                dict.fromkeys(
                    (
                        spec.primary_metric,
                        "sensitivity",
                        "specificity",
                        "alert_rate",
                        "observed_expected",
                        "ece",
                    )
                )
            ),
        )
        if spec.sensitive_attributes and subgroups
        else pd.DataFrame()
    )
    prevalence = float(y.mean()) if len(y) else math.nan
    # The decision curve is drawn around the threshold; one that silences everybody (an
    # alert budget below one patient) or a one-class set still gets a readable grid.
    around = min(max(float(threshold), 0.001), 0.99)
    event_rate = prevalence if 0 < prevalence < 1 else None
    return Evaluation(
        threshold=float(threshold),
        rule=settings.threshold_rule,
        rows=len(y),
        patients=int(pd.Series(patients).nunique()),
        positives=int(y.sum()),
        metrics=m.point_metrics(y, probability, threshold, n_bins=bins),
        ci=m.bootstrap_ci(
            y,
            probability,
            threshold,
            groups=patients,
            n_boot=n_boot,
            seed=spec.training.seed,
            n_bins=bins,
        ),
        confusion=m.confusion(y, probability, threshold),
        calibration=m.calibration_table(y, probability, n_bins=bins),
        subgroups=table,
        n_boot=n_boot,
        ece_by_chance=m.ece_by_chance(probability, n_bins=bins, seed=spec.training.seed),
        calibration_fit=c.calibration_summary(y, probability, groups=patients).to_dict(),
        smoothed_calibration=c.smoothed_calibration(y, probability, groups=patients),
        decision_curve=c.decision_curve(y, probability, c.decision_thresholds(around, event_rate)),
    )
