"""How well the monitor itself works: false alarms and detection on the readmission generator.

The monitor is judged the way it runs: :func:`monitoring.drift.run` on windows of a
realistic size against a training reference, and
:func:`monitoring.performance.performance_by_window` on the same windows once their
labels are known. Only the data changes between conditions:

- ``none``: fresh patients from the same generator (a new seed per window);
- ``site mix``: the patient share per site changes (a referral pattern moves);
- ``lab units``: creatinine is reported in µmol/L instead of mg/dL;
- ``case mix``: a winter surge, with more COPD, older patients and higher acuity;
- ``label rate``: the odds of readmission double with the same features (for example a
  change in discharge practice), which only labelled performance can see.

The model is a histogram gradient-boosting classifier fitted here on the reference
cohort's training patients, standing in for the champion: what is evaluated is the
monitor's statistics, not the model. ``tests/model/test_monitor_power.py`` asserts the
rates; ``bench/monitor_eval.py`` writes the table in docs/monitoring.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clinml.spec import UseCaseSpec

NOW = datetime(2026, 11, 1, tzinfo=UTC)
REFERENCE_SEED = 2024
REFERENCE_PATIENTS = 20_000
# A week of discharges at the four hospitals of the synthetic health system.
WINDOW_ROWS = 1_000
WINDOW = timedelta(days=7)
SHIFTS: dict[str, dict[str, Any]] = {
    "none": {},
    "site mix": {"site_weights": (0.10, 0.15, 0.25, 0.50)},
    "lab units": {"creatinine_unit": "umol/L"},
    "case mix": {"winter_case_mix": 1.0},
    "label rate": {"label_odds_ratio": 2.0},
}
DRIFT_KINDS = ("data_drift", "prediction_drift", "data_quality", "subgroup_drift")


@dataclass(frozen=True)
class WindowOutcome:
    shift: str
    seed: int
    rows: int
    drift_alerts: list[str]  # kinds among DRIFT_KINDS
    performance_alert: bool
    judged: bool
    roc_auc: float | None
    sensitivity: float | None
    ece: float | None


@dataclass
class Reference:
    """The stand-in champion: the model, its training snapshot, its held-out answers."""

    model: Any
    features: pd.DataFrame  # training rows: features + in-sample probability
    held_out: pd.DataFrame  # test patients: probability + outcome
    threshold: float


def _frame(cohort: pd.DataFrame, spec: UseCaseSpec) -> pd.DataFrame:
    x = cohort[spec.feature_names].copy()
    for column in spec.features:
        if column.type == "category":
            x[column.name] = pd.Categorical(x[column.name], categories=column.categories)
    return x


def _cohort(spec: UseCaseSpec, seed: int, n_patients: int, **shift: Any) -> pd.DataFrame:
    from features.datasets import readmission

    cohort = readmission.load(seed=seed, now=NOW, n_patients=n_patients, months=24, **shift)
    return cohort.assign(outcome=(cohort[spec.label.column] == spec.label.positive_class) * 1)


def fit_reference(spec: UseCaseSpec) -> Reference:
    """Fit the stand-in model on 80% of a reference cohort's patients."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    cohort = _cohort(spec, REFERENCE_SEED, REFERENCE_PATIENTS)
    patients = cohort["patient_id"].unique()
    rng = np.random.default_rng(REFERENCE_SEED)
    test_patients = set(rng.choice(patients, size=len(patients) // 5, replace=False))
    is_test = cohort["patient_id"].isin(test_patients).to_numpy()
    train, test = cohort[~is_test], cohort[is_test]
    model = HistGradientBoostingClassifier(
        categorical_features="from_dtype", max_iter=200, learning_rate=0.05, random_state=0
    ).fit(_frame(train, spec), train["outcome"])
    held_out = pd.DataFrame(
        {"probability": model.predict_proba(_frame(test, spec))[:, 1], "outcome": test["outcome"]}
    )
    rule = spec.evaluation
    if rule.max_alerts_per_100 is not None:
        threshold = float(np.quantile(held_out["probability"], 1 - rule.max_alerts_per_100 / 100))
    else:
        threshold = float(rule.operating_threshold or 0.5)
    features = train[spec.feature_names].assign(
        probability=model.predict_proba(_frame(train, spec))[:, 1]
    )
    return Reference(model, features.reset_index(drop=True), held_out, threshold)


def window(spec: UseCaseSpec, reference: Reference, shift: str, seed: int) -> pd.DataFrame:
    """One window as the prediction log would hold it, with the outcomes that arrive."""
    # Encounters drawn uniformly, as discharges arrive, from a cohort much larger than the
    # window, so a week holds few repeat patients (as a real week's discharges do).
    cohort = _cohort(spec, seed, n_patients=WINDOW_ROWS * 10, **SHIFTS[shift])
    rows = cohort.sample(n=WINDOW_ROWS, random_state=seed).reset_index(drop=True)
    probability = reference.model.predict_proba(_frame(rows, spec))[:, 1]
    positive, negative = spec.label.positive_class, spec.label.negative_class
    rng = np.random.default_rng(seed)
    offsets = pd.to_timedelta(rng.uniform(0, WINDOW.total_seconds(), len(rows)), unit="s")
    return rows[spec.feature_names].assign(
        time=pd.Timestamp(NOW - WINDOW) + offsets,
        request_id=[f"r{seed}-{i}" for i in range(len(rows))],
        model_version="1",
        patient=rows["patient_id"].astype(str),
        probability=probability,
        label=np.where(probability >= reference.threshold, positive, negative),
        outcome=rows["outcome"].to_numpy(),
    )


def judge(
    spec: UseCaseSpec, reference: Reference, shift: str, seed: int, out_dir: Path
) -> WindowOutcome:
    from monitoring import drift, performance

    current = window(spec, reference, shift, seed)
    verdict = drift.run(
        spec,
        reference.features,
        current,
        out_dir,
        now=NOW,
        prediction_reference=reference.held_out,
        window=(NOW - WINDOW, NOW),
        write=False,
    )
    [measured] = performance.performance_by_window(
        spec, current, WINDOW, NOW - WINDOW, NOW, n_boot=0, seed=seed
    )
    return WindowOutcome(
        shift=shift,
        seed=seed,
        rows=len(current),
        drift_alerts=[k for k in verdict.alerts if k in DRIFT_KINDS],
        performance_alert=measured.judged and bool(measured.below_floor),
        judged=measured.judged,
        roc_auc=measured.roc_auc,
        sensitivity=measured.sensitivity,
        ece=measured.ece,
    )


def evaluate(
    spec: UseCaseSpec,
    windows: int,
    out_dir: Path,
    shifts: tuple[str, ...] = tuple(SHIFTS),
    echo: Callable[[str], None] = lambda _: None,
) -> list[WindowOutcome]:
    """``windows`` seeded windows per shift, each judged by the monitor."""
    reference = fit_reference(spec)
    outcomes = []
    for shift in shifts:
        for i in range(windows):
            outcomes.append(judge(spec, reference, shift, seed=10_000 + i, out_dir=out_dir))
        done = [o for o in outcomes if o.shift == shift]
        drifted = sum(bool(o.drift_alerts) for o in done)
        flagged = sum(o.performance_alert for o in done)
        echo(f"{shift}: {drifted}/{len(done)} drift alerts, {flagged}/{len(done)} performance")
    return outcomes


def summarise(outcomes: list[WindowOutcome]) -> pd.DataFrame:
    """One row per shift: windows, drift and performance alert rates, by kind."""
    rows = []
    for shift in dict.fromkeys(o.shift for o in outcomes):
        done = [o for o in outcomes if o.shift == shift]
        n = len(done)
        row: dict[str, Any] = {
            "shift": shift,
            "windows": n,
            "drift alert rate": sum(bool(o.drift_alerts) for o in done) / n,
            "performance alert rate": sum(o.performance_alert for o in done) / n,
            "any alert rate": sum(bool(o.drift_alerts) or o.performance_alert for o in done) / n,
        }
        for kind in DRIFT_KINDS:
            row[kind] = sum(kind in o.drift_alerts for o in done) / n
        row["median AUROC"] = float(np.median([o.roc_auc for o in done if o.roc_auc is not None]))
        row["median ECE"] = float(np.median([o.ece for o in done if o.ece is not None]))
        rows.append(row)
    return pd.DataFrame(rows)
