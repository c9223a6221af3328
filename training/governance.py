"""Model governance: the promotion gate, promote, rollback, and the audit trail.

Training only ever creates a ``challenger``. ``promote`` scores the challenger and an
incumbent (the current ``champion``; without one, the logistic-regression reference
fitted beside the challenger) on today's labelled data and gates the challenger on
evidence, never on point estimates (docs/training.md, "Promotion gate"):

- **Comparison rows.** Every version records what it was trained on
  (:class:`~clinml.training.assignment.TrainingRecord`: its hash assignment of test patients
  and its training window). The two models are compared only on rows *neither* was
  trained on: both models' test patients and everything after the later training
  window. The gate says how many rows that is.
- **primary_metric**: a paired, patient-level bootstrap of (challenger - incumbent) on
  those rows; the challenger passes when the lower 95% bound is above
  ``-promotion.max_metric_drop`` (non-inferiority). Too few positives or negatives, or an
  interval too wide to decide, is refused *as underpowered*, and the detail says so.
- **subgroup_discrimination / subgroup_sensitivity / subgroup_calibration**: the same
  paired comparison within every evaluated group of the sensitive attributes (and their
  pairwise intersections), for the primary metric and for the sensitivity at each
  model's operating point, plus the challenger's observed/expected ratio in the group.
  A group whose whole interval shows a loss beyond its margin (or an O/E outside its
  band) fails; one whose interval cannot decide is listed as inconclusive, not refused
  on noise.
- **operating_point**: the challenger's threshold rule (sensitivity target or alert
  budget) on its unseen test rows and on the rows after its training window: refused
  when the interval shows the rule is missed.
- **calibration**: refused when the expected calibration error on the challenger's
  unseen rows is above ``max_ece`` (or above what a perfectly calibrated model would show
  there by chance, when that is larger) *and* the observed/expected or slope interval
  excludes 1, so the miscalibration is shown, not noise.
- **data_validation**: the latest data-validation run passed.

On a pass (or ``force`` with a reason) the previous champion keeps the alias
``previous_champion`` and ``champion`` moves to the challenger. Every decision, moves
and refusals alike (a refusal records the version it would have moved to), is appended
to the hash-chained audit log (:mod:`clinml.audit`) *before* the registry changes, so
no alias ever moves unrecorded: if the log cannot be written, nothing moves.
``rollback`` points ``champion`` back at ``previous_champion`` and walks the audit trail
to restore the one before it.

``shadow_start`` points the alias ``shadow`` at a version (the challenger by default) that
the service then scores beside the champion on live traffic, off the response path, and
``shadow_stop`` removes it (docs/serving.md, "Shadow"); both are audited the same way. A
version never shadows itself: promoting (or rolling back to) the shadowed version also
removes ``shadow``, and records that.

``canary_start`` points the alias ``canary`` at a version with a share of the requests
(the version's tag ``clinml.canary_percent``), which the service answers with that version
instead of the champion; ``canary_stop`` removes it, and ``canary_rollback`` is the
service's automatic rollback when the canary leaves its band (docs/serving.md, "Canary").
All three are audited; promoting (or rolling back to) the canary version ends the canary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.audit import AuditLog
from clinml.errors import ClinmlError, NotReadyError
from clinml.spec import REFERENCE_CANDIDATE, UseCaseSpec
from clinml.training import metrics as m
from clinml.training.assignment import TAG as RECORD_TAG
from clinml.training.assignment import TrainingRecord, utc_instant, utc_instants
from clinml.training.evaluate import Evaluation, evaluate, rule_holds, rule_refuted
from clinml.training.tracking import (
    CANARY,
    CANARY_MAX_PERCENT,
    CANARY_PERCENT_TAG,
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    SHADOW,
    Tracker,
    canary_percent,
)
from clinml.training.train import REFERENCE_RUN_TAG, REFERENCE_SHA_TAG, outcome

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

PROMOTE = "promote"
FORCED_PROMOTE = "forced-promote"
REFUSED = "promote-refused"
ROLLBACK = "rollback"
SHADOW_START = "shadow-start"
SHADOW_STOP = "shadow-stop"
CANARY_START = "canary-start"
CANARY_STOP = "canary-stop"
CANARY_ROLLBACK = "canary-rollback"
LEVEL = 0.95

# Verdicts of a non-inferiority comparison (see non_inferiority).
NON_INFERIOR = "non-inferior"
INFERIOR = "inferior"
UNDERPOWERED = "underpowered"
NOT_SHOWN = "not shown non-inferior"


class PromotionRefused(ClinmlError):
    """The challenger failed the gate; the message lists every reason."""

    def __init__(self, message: str, decision: Decision):
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class Evidence:
    """Evidence from outside today's retrospective rows that the gate adds to its checks,
    e.g. the shadow report's paired comparison on live requests (``promote --evidence
    shadow``, built in :mod:`clinml.pipelines.stages`).

    Attributes:
        kind: what it is (``shadow``), named in the audit record.
        version: the model version it is about; it must be the challenger's.
        checks: the checks it adds; each must pass, as the gate's own.
        record: what the audit record keeps of it (counts, window, interval; no PHI).
    """

    kind: str
    version: str
    checks: list[Check]
    record: dict[str, Any]


@dataclass(frozen=True)
class ValidationStatus:
    passed: bool | None
    where: Path | None

    @classmethod
    def latest(cls, reports: Path) -> ValidationStatus:
        """The newest data-validation run under ``reports`` (None when there is none)."""
        runs = sorted(p for p in reports.glob("*/summary.json")) if reports.is_dir() else []
        if not runs:
            return cls(None, None)
        summary = json.loads(runs[-1].read_text())
        return cls(bool(summary.get("success")), runs[-1].parent)


@dataclass(frozen=True)
class CurrentData:
    """Today's labelled events (features, attributes, outcome), as the gate sees them."""

    frame: pd.DataFrame = field(repr=False)
    y: np.ndarray = field(repr=False)

    @classmethod
    def from_frame(cls, spec: UseCaseSpec, frame: pd.DataFrame) -> CurrentData:
        frame = frame.reset_index(drop=True)
        return cls(frame, outcome(frame, spec))

    def patients(self, spec: UseCaseSpec) -> np.ndarray:
        return self.frame[spec.entity.key].to_numpy()

    def times(self, spec: UseCaseSpec) -> pd.Series:
        return self.frame[spec.event_timestamp]


@dataclass(frozen=True)
class Contender:
    """One model as the gate sees it: its probabilities on today's rows, its threshold,
    and what it was trained on.

    Attributes:
        role: ``challenger``, ``champion`` or ``reference``.
        version: the registered version (None for an unregistered reference).
        probability: the positive-class probability of every row of today's data.
        threshold: its operating threshold.
        record: what it was trained on; None for a version registered before records
            existed, which then counts as trained on everything up to ``registered``.
        registered: when the version was registered (used only without a record).
    """

    role: str
    version: str | None
    probability: np.ndarray = field(repr=False)
    threshold: float
    record: TrainingRecord | None = None
    registered: pd.Timestamp | None = None

    def trained(self, patients: np.ndarray, times: pd.Series) -> np.ndarray:
        """Rows of today's data this model may have been trained on."""
        return self.training(patients, times)[0]

    def training(self, patients: np.ndarray, times: pd.Series) -> tuple[np.ndarray, str]:
        """:meth:`trained`'s rows, and how they were found, in words."""
        if self.record is None:
            if self.registered is None:
                rows = np.ones(len(patients), dtype=bool)
            else:
                rows = utc_instants(times) <= utc_instant(self.registered)
            when = f"{self.registered:%Y-%m-%d %H:%M} UTC" if self.registered else "ever"
            note = f"{self.role}: no training record; every row up to {when} counts as trained"
            return rows, note
        rows, rebuilt = self.record.training_rows(patients, times)
        if rebuilt:
            note = (
                f"{self.role}: its {self.record.patients:,} training patients rebuilt exactly "
                "from today's data"
            )
        else:
            note = (
                f"{self.role}: today's data does not rebuild its recorded training patients; "
                f"every row up to {self.record.window_end:%Y-%m-%d} counts as trained"
            )
        return rows, note


@dataclass(frozen=True)
class GroupResult:
    """One subgroup on the comparison rows: the challenger against the incumbent."""

    attribute: str
    group: str
    rows: int
    positives: int
    evaluated: bool
    comparison: m.PairedComparison | None = field(default=None, repr=False)
    verdicts: dict[str, str] = field(default_factory=dict)

    def to_dict(self, metric: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attribute": self.attribute,
            "group": self.group,
            "rows": self.rows,
            "positives": self.positives,
            "evaluated": self.evaluated,
            **self.verdicts,
        }
        if self.comparison is not None:
            c = self.comparison
            for name in dict.fromkeys((metric, "sensitivity", "observed_expected")):
                out[f"{name}"] = c.new[name]
                out[f"{name}_ci"] = list(c.new_ci[name])
                out[f"incumbent_{name}"] = c.reference[name]
                out[f"difference_{name}"] = c.difference[name]
                out[f"difference_{name}_ci"] = list(c.difference_ci[name])
        return out


@dataclass(frozen=True)
class Assessment:
    """Everything the gate measured, and its checks."""

    checks: list[Check]
    incumbent_role: str | None
    comparison_rows: int
    comparison: m.PairedComparison | None = field(default=None, repr=False)
    groups: list[GroupResult] = field(default_factory=list, repr=False)
    operating: dict[str, Evaluation] = field(default_factory=dict, repr=False)
    unseen: Evaluation | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on a challenger, and what happened to the aliases."""

    model: str
    challenger: str
    champion: str | None
    checks: list[Check]
    action: str
    reason: str | None = None
    assessment: Assessment | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


# --------------------------------------------------------------------------- the gate


def non_inferiority(ci: tuple[float, float], margin: float) -> str:
    """The verdict of a difference's interval against a non-inferiority margin.

    ``non-inferior`` when the whole interval lies above ``-margin``; ``inferior`` when it
    lies wholly below; otherwise ``underpowered`` when the interval is wider than the
    margin on either side of its centre (these rows cannot decide it), else ``not shown
    non-inferior`` (precise enough, and straddling the margin).
    """
    low, high = ci
    if math.isnan(low) or math.isnan(high):
        return UNDERPOWERED
    if low > -margin:
        return NON_INFERIOR
    if high < -margin:
        return INFERIOR
    return UNDERPOWERED if (high - low) / 2 > margin else NOT_SHOWN


def _interval(ci: tuple[float, float], scale: float = 1.0, digits: int = 4) -> str:
    low, high = ci
    return f"[{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"


def _enough_events(y: np.ndarray, minimum: int) -> bool:
    positives = int(y.sum())
    return positives >= minimum and len(y) - positives >= minimum


def _primary_check(
    spec: UseCaseSpec,
    comparison: m.PairedComparison | None,
    role: str | None,
    rows: int,
    positives: int,
    why_none: str,
    legacy: bool = False,
) -> Check:
    metric = spec.primary_metric
    rules = spec.promotion
    if role is None:
        return Check("primary_metric", True, f"no comparison: {why_none}")
    minimum = rules.min_comparison_events
    if comparison is None:
        return Check(
            "primary_metric",
            False,
            f"underpowered: {rows:,} rows ({positives:,} positives) that neither the challenger "
            f"nor the {role} was trained on; at least {minimum} positives and {minimum} "
            "negatives are needed to compare them. Wait for more labelled data, or retrain "
            "the challenger on the same data as the incumbent"
            + (
                f" (the {role} has no training record: registered before clinml kept one, it "
                "counts as trained on every row up to its registration)"
                if legacy
                else ""
            ),
        )
    difference = comparison.difference[metric]
    ci = comparison.difference_ci[metric]
    verdict = non_inferiority(ci, rules.max_metric_drop)
    detail = (
        f"{metric} challenger {comparison.new[metric]:.4f} vs {role} "
        f"{comparison.reference[metric]:.4f} on {comparison.rows:,} rows "
        f"({comparison.patients:,} patients, {comparison.positives:,} positives) neither was "
        f"trained on: difference {difference:+.4f}, 95% CI {_interval(ci)}; {verdict} "
        f"(margin -{rules.max_metric_drop:g} on the lower bound)"
    )
    if verdict == UNDERPOWERED:
        detail += "; these rows are too few to decide: wait for more labelled data"
    return Check("primary_metric", verdict == NON_INFERIOR, detail)


def _subgroup_results(
    spec: UseCaseSpec,
    data: CurrentData,
    rows: np.ndarray,
    challenger: Contender,
    incumbent: Contender | None,
    n_boot: int,
) -> list[GroupResult]:
    """Every group of the sensitive attributes on ``rows``, compared within the group."""
    if not spec.sensitive_attributes:
        return []
    settings, rules = spec.evaluation, spec.promotion
    frame = data.frame.iloc[rows]
    y = data.y[rows]
    patients = frame[spec.entity.key].to_numpy()
    new = challenger.probability[rows]
    # Without an incumbent the challenger is compared with itself: only its own
    # observed/expected ratio is judged.
    old = incumbent.probability[rows] if incumbent is not None else new
    old_threshold = incumbent.threshold if incumbent is not None else challenger.threshold
    results = []
    for attribute, group, positions in m.subgroups(
        frame[spec.sensitive_attributes], spec.sensitive_attributes
    ):
        y_g = y[positions]
        evaluated = len(positions) >= settings.min_group_size and _enough_events(
            y_g, settings.min_group_events
        )
        if not evaluated:
            results.append(GroupResult(attribute, group, len(positions), int(y_g.sum()), False))
            continue
        comparison = m.paired_bootstrap(
            y_g,
            new[positions],
            old[positions],
            challenger.threshold,
            old_threshold,
            groups=patients[positions],
            n_boot=n_boot,
            level=LEVEL,
            seed=spec.training.seed,
            n_bins=settings.calibration_bins,
        )
        verdicts = {}
        if incumbent is not None:
            verdicts["discrimination"] = non_inferiority(
                comparison.difference_ci[spec.primary_metric], rules.max_subgroup_drop
            )
            verdicts["sensitivity"] = non_inferiority(
                comparison.difference_ci["sensitivity"], rules.max_subgroup_sensitivity_drop
            )
        low_band, high_band = rules.subgroup_observed_expected
        low, high = comparison.new_ci["observed_expected"]
        outside = high < low_band or low > high_band
        verdicts["calibration"] = "outside band" if outside else "within band"
        results.append(
            GroupResult(
                attribute, group, len(positions), int(y_g.sum()), True, comparison, verdicts
            )
        )
    return results


def _subgroup_checks(spec: UseCaseSpec, groups: list[GroupResult], role: str | None) -> list[Check]:
    rules = spec.promotion
    settings = spec.evaluation
    evaluated = [g for g in groups if g.evaluated]
    size = (
        f"groups of >= {settings.min_group_size} rows and >= {settings.min_group_events} "
        f"positives and negatives: {len(evaluated)} of {len(groups)}"
    )
    if not evaluated:
        nothing = f"no subgroup large enough to evaluate ({size})"
        return [Check("subgroup_calibration", True, nothing)]
    checks = []
    compared = [
        ("subgroup_discrimination", "discrimination", spec.primary_metric, rules.max_subgroup_drop),
        (
            "subgroup_sensitivity",
            "sensitivity",
            "sensitivity",
            rules.max_subgroup_sensitivity_drop,
        ),
    ]
    for name, key, metric, margin in compared:
        if role is None:
            continue
        # A group fails only on shown harm: its whole interval below -margin. Requiring
        # each of a dozen smaller groups to prove non-inferiority on its own would refuse
        # sound models on chance alone (docs/training.md, "Subgroups").
        failed = [g for g in evaluated if g.verdicts[key] == INFERIOR]
        unclear = [g for g in evaluated if g.verdicts[key] in (UNDERPOWERED, NOT_SHOWN)]
        worst = min(
            evaluated,
            key=lambda g: _lower(g.comparison.difference_ci[metric]),  # type: ignore[union-attr]
        )
        assert worst.comparison is not None
        parts = [
            f"{metric} challenger - {role} within each group; lowest bound in "
            f"{worst.attribute}={worst.group}: {worst.comparison.difference[metric]:+.4f} "
            f"{_interval(worst.comparison.difference_ci[metric])} (margin -{margin:g}; {size})"
        ]
        if failed:
            parts.append(
                "shown worse in "
                + ", ".join(
                    f"{g.attribute}={g.group} {_interval(g.comparison.difference_ci[metric])}"  # type: ignore[union-attr]
                    for g in failed
                )
            )
        if unclear:
            parts.append(
                f"not shown non-inferior, nor worse (inconclusive) in {len(unclear)}: "
                + ", ".join(f"{g.attribute}={g.group}" for g in unclear)
            )
        checks.append(Check(name, not failed, "; ".join(parts)))
    low_band, high_band = rules.subgroup_observed_expected
    outside = [g for g in evaluated if g.verdicts["calibration"] == "outside band"]
    furthest = max(
        evaluated,
        key=lambda g: abs(math.log(max(g.comparison.new["observed_expected"], 1e-9))),  # type: ignore[union-attr]
    )
    assert furthest.comparison is not None
    detail = (
        f"observed/expected within each group; furthest from 1 in "
        f"{furthest.attribute}={furthest.group}: "
        f"{furthest.comparison.new['observed_expected']:.3f} "
        f"[{furthest.comparison.new_ci['observed_expected'][0]:.3f}, "
        f"{furthest.comparison.new_ci['observed_expected'][1]:.3f}] "
        f"(band {low_band:g}-{high_band:g}; {size})"
    )
    if outside:
        detail += "; shown outside the band in " + ", ".join(
            f"{g.attribute}={g.group}" for g in outside
        )
    checks.append(Check("subgroup_calibration", not outside, detail))
    return checks


def _lower(ci: tuple[float, float]) -> float:
    return ci[0] if not math.isnan(ci[0]) else math.inf


def _operating_check(spec: UseCaseSpec, parts: dict[str, Evaluation]) -> Check:
    rule = spec.evaluation
    if rule.min_sensitivity is None and rule.max_alerts_per_100 is None:
        return Check("operating_point", True, f"fixed threshold: {rule.threshold_rule}")
    minimum = spec.promotion.min_comparison_events
    lines, missed = [], []
    for name, evaluation in parts.items():
        _, text = rule_holds(spec, evaluation)
        if evaluation.positives < minimum and rule.min_sensitivity is not None:
            lines.append(f"{name}: {evaluation.positives} positives, too few to judge")
            continue
        shown_missed = rule_refuted(spec, evaluation)
        lines.append(f"{name}: {text}" + (" MISSED" if shown_missed else ""))
        if shown_missed:
            missed.append(name)
    if not lines:
        return Check("operating_point", True, "no unseen rows to check the rule on")
    detail = f"rule '{rule.threshold_rule}' (refused when the interval excludes it): " + "; ".join(
        lines
    )
    return Check("operating_point", not missed, detail)


def _calibration_check(spec: UseCaseSpec, unseen: Evaluation | None) -> Check:
    """ECE above its limit *and* confirmed by an interval: O/E or slope excludes 1.

    The ECE of a perfectly calibrated model exceeds its chance level on one test set in
    twenty, so on its own it would refuse sound models on noise; the calibration
    intercept (as O/E) and slope, with their cluster-robust intervals, say whether the
    miscalibration is real.
    """
    rules = spec.promotion
    if unseen is None:
        return Check("calibration", False, "no rows the challenger was not trained on")
    ece = unseen.metrics["ece"]
    chance = unseen.ece_by_chance
    limit = max(rules.max_ece, chance) if math.isfinite(chance) else rules.max_ece
    fit = unseen.calibration_fit
    excluded = []
    for key, label in (("observed_expected", "O/E"), ("slope", "slope")):
        low, high = fit.get(f"{key}_low", math.nan), fit.get(f"{key}_high", math.nan)
        if math.isfinite(low) and math.isfinite(high) and (low > 1 or high < 1):
            excluded.append(label)

    def shown(key: str) -> str:
        value = fit.get(key, math.nan)
        if not math.isfinite(value):  # e.g. the slope of perfectly separated rows
            return "not estimable"
        low, high = fit.get(f"{key}_low", math.nan), fit.get(f"{key}_high", math.nan)
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"

    over = ece > limit
    detail = (
        f"expected calibration error {ece:.4f} (limit {rules.max_ece:g}; chance alone reaches "
        f"{chance:.4f} on {unseen.rows:,} rows); observed/expected {shown('observed_expected')}"
        f", slope {shown('slope')}"
    )
    if over and excluded:
        detail += f"; miscalibration confirmed: the {' and '.join(excluded)} interval excludes 1"
    elif over:
        detail += "; the ECE is above its limit but no interval excludes 1 (not shown)"
    return Check("calibration", not (over and excluded), detail)


def _validation_check(spec: UseCaseSpec, validation: ValidationStatus) -> list[Check]:
    if not spec.promotion.require_valid_data:
        return []
    if validation.passed is None:
        return [Check("data_validation", False, "no data-validation run on record")]
    state = "passed" if validation.passed else "FAILED"
    return [
        Check(
            "data_validation",
            validation.passed,
            f"latest validation run {state} ({validation.where})",
        )
    ]


def assess(
    spec: UseCaseSpec,
    data: CurrentData,
    challenger: Contender,
    incumbent: Contender | None,
    validation: ValidationStatus,
    why_no_incumbent: str = "no champion",
    n_boot: int | None = None,
) -> Assessment:
    """Run every check of the gate on today's data.

    Args:
        spec: the use-case spec (rules, margins, attributes).
        data: today's labelled events.
        challenger: the model asking for promotion.
        incumbent: what it must not be worse than (the champion, else the reference);
            None when there is nothing to compare with (the reason in ``why_no_incumbent``).
        validation: the latest data-validation run.
        n_boot: bootstrap resamples (default: the spec's).
    """
    n_boot = spec.evaluation.bootstrap if n_boot is None else n_boot
    patients, times = data.patients(spec), data.times(spec)
    seen, note = challenger.training(patients, times)
    unseen_by_challenger = ~seen
    notes = [note]
    comparable = unseen_by_challenger.copy()
    if incumbent is not None:
        seen, note = incumbent.training(patients, times)
        comparable &= ~seen
        notes.append(note)
    rows = np.flatnonzero(comparable)
    role = incumbent.role if incumbent is not None else None
    comparison = None
    y_rows = data.y[rows]
    if incumbent is not None and _enough_events(y_rows, spec.promotion.min_comparison_events):
        comparison = m.paired_bootstrap(
            y_rows,
            challenger.probability[rows],
            incumbent.probability[rows],
            challenger.threshold,
            incumbent.threshold,
            groups=patients[rows],
            n_boot=n_boot,
            level=LEVEL,
            seed=spec.training.seed,
            n_bins=spec.evaluation.calibration_bins,
        )
    legacy = incumbent is not None and incumbent.record is None
    checks = [
        _primary_check(
            spec, comparison, role, len(rows), int(y_rows.sum()), why_no_incumbent, legacy
        )
    ]
    groups = _subgroup_results(spec, data, rows, challenger, incumbent, n_boot)
    checks += _subgroup_checks(spec, groups, role)

    operating: dict[str, Evaluation] = {}
    unseen_rows = np.flatnonzero(unseen_by_challenger)
    if challenger.record is not None:
        later = utc_instants(times) > utc_instant(challenger.record.window_end)
        parts = {
            "test rows": np.flatnonzero(unseen_by_challenger & ~later),
            "rows after its training window": np.flatnonzero(unseen_by_challenger & later),
        }
    else:
        parts = {"unseen rows": unseen_rows}
    for name, part in parts.items():
        if len(part) and len(np.unique(data.y[part])) == 2:
            operating[name] = _evaluate_rows(spec, data, part, challenger, n_boot)
    checks.append(_operating_check(spec, operating))
    unseen = None
    if len(unseen_rows) and len(np.unique(data.y[unseen_rows])) == 2:
        unseen = _evaluate_rows(spec, data, unseen_rows, challenger, n_boot)
    checks.append(_calibration_check(spec, unseen))
    checks += _validation_check(spec, validation)
    return Assessment(
        checks=checks,
        incumbent_role=role,
        comparison_rows=len(rows),
        comparison=comparison,
        groups=groups,
        operating=operating,
        unseen=unseen,
        notes=notes,
    )


def _evaluate_rows(
    spec: UseCaseSpec, data: CurrentData, rows: np.ndarray, model: Contender, n_boot: int
) -> Evaluation:
    frame = data.frame.iloc[rows]
    return evaluate(
        spec,
        data.y[rows],
        model.probability[rows],
        model.threshold,
        frame[spec.entity.key].to_numpy(),
        frame[spec.sensitive_attributes],
        n_boot=n_boot,
        subgroups=False,
    )


# --------------------------------------------------------------------------- the registry


def threshold_of(version: ModelVersion, default: float = 0.5) -> float:
    raw = (version.tags or {}).get("operating_threshold")
    return float(raw) if raw is not None else default


def record_of(version: ModelVersion) -> TrainingRecord | None:
    """The version's training record, or None for a version registered before records."""
    raw = (version.tags or {}).get(RECORD_TAG)
    return TrainingRecord.from_json(raw) if raw else None


def _predict(
    model_uri: str,
    expected_sha256: str | None,
    tracker: Tracker,
    spec: UseCaseSpec,
    frame: pd.DataFrame,
) -> np.ndarray:
    """A logged model's probabilities on ``frame``, its file checked against the hash
    recorded at registration before it is opened (as serving does).

    Raises:
        ModelLoadError: no hash was recorded, or the file's hash differs from it.
    """
    import tempfile

    from mlflow.artifacts import download_artifacts

    from clinml.training import model_io
    from clinml.training.pyfunc import ARTIFACT_KEY

    if not expected_sha256:
        raise model_io.ModelLoadError(
            f"{model_uri}: no model hash was recorded at registration; refusing to score a "
            "model that cannot be checked"
        )
    # models:/ URIs resolve through MLflow's global registry URI: point it at this tracker
    # (otherwise another registry's model of the same name and version could be scored).
    tracker.activate()
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=tracker.uri)
        model = model_io.load(Path(local) / "artifacts" / ARTIFACT_KEY, expected_sha256)
        return model.predict_proba(frame)


def contender(
    spec: UseCaseSpec, tracker: Tracker, version: ModelVersion, role: str, data: CurrentData
) -> Contender:
    """A registered version, scored on today's data."""
    tags = version.tags or {}
    return Contender(
        role=role,
        version=str(version.version),
        probability=_predict(
            f"models:/{version.name}/{version.version}",
            tags.get("model_sha256"),
            tracker,
            spec,
            data.frame,
        ),
        threshold=threshold_of(version),
        record=record_of(version),
        registered=pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC"),
    )


def reference_contender(
    spec: UseCaseSpec, tracker: Tracker, challenger: ModelVersion, data: CurrentData
) -> tuple[Contender | None, str]:
    """The logistic-regression reference fitted beside the challenger, or why there is none."""
    tags = challenger.tags or {}
    if tags.get("candidate") == REFERENCE_CANDIDATE:
        return None, "no champion, and the challenger is the reference model itself"
    run_id = tags.get(REFERENCE_RUN_TAG)
    if not run_id:
        return None, "no champion, and the challenger has no reference model on record"
    run = tracker.client.get_run(run_id)
    threshold = float(run.data.metrics.get("operating_threshold", 0.5))
    return (
        Contender(
            role="reference",
            version=None,
            probability=_predict(
                f"runs:/{run_id}/model", tags.get(REFERENCE_SHA_TAG), tracker, spec, data.frame
            ),
            threshold=threshold,
            record=record_of(challenger),
        ),
        "",
    )


def _optional_alias(tracker: Tracker, model: str, alias: str) -> ModelVersion | None:
    try:
        return tracker.version_by_alias(model, alias)
    except NotReadyError:
        return None


def _entry(
    action: str,
    model: str,
    actor: str,
    from_version: str | None,
    to_version: str | None,
    reason: str | None,
    checks: list[Check],
    assessment: Assessment | None,
    metric: str,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "action": action,
        "model": model,
        "actor": actor,
        "from_version": from_version,
        "to_version": to_version,
        "reason": reason,
        "gate": [c.to_dict() for c in checks],
        "metrics": {},
    }
    if assessment is None:
        return entry
    comparison = assessment.comparison
    if comparison is not None and assessment.incumbent_role is not None:
        entry["metrics"] = {
            "challenger": {
                "rows": comparison.rows,
                metric: _finite(comparison.new[metric]),
                "ece": _finite(comparison.new["ece"]),
            },
            assessment.incumbent_role: {
                "rows": comparison.rows,
                metric: _finite(comparison.reference[metric]),
                "ece": _finite(comparison.reference["ece"]),
            },
        }
        low, high = comparison.difference_ci[metric]
        entry["comparison"] = {
            "incumbent": assessment.incumbent_role,
            "rows": comparison.rows,
            "patients": comparison.patients,
            "positives": comparison.positives,
            "difference": _finite(comparison.difference[metric]),
            "ci": [_finite(low), _finite(high)],
            "level": comparison.level,
        }
    elif assessment.unseen is not None:
        unseen = assessment.unseen
        entry["metrics"] = {
            "challenger": {
                "rows": unseen.rows,
                metric: _finite(unseen.metrics[metric]),
                "ece": _finite(unseen.metrics["ece"]),
            }
        }
    entry["comparison_rows"] = assessment.comparison_rows
    entry["provenance"] = list(assessment.notes)
    return entry


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def promote(
    spec: UseCaseSpec,
    tracker: Tracker,
    audit: AuditLog,
    data: CurrentData,
    validation: ValidationStatus,
    actor: str,
    force: bool = False,
    reason: str | None = None,
    evidence: Evidence | None = None,
) -> Decision:
    """Gate the challenger against the champion and move ``champion`` if it passes.

    With ``evidence`` its checks join the gate's and the audit record names it.

    Raises:
        NotReadyError: there is no challenger.
        ClinmlError: ``force`` without a reason, the challenger already is champion, or
            the evidence is about another version.
        PromotionRefused: the gate failed and ``force`` was not given (recorded).
    """
    if force and not (reason and reason.strip()):
        raise ClinmlError("--force needs --reason: say why the gate is being overridden")
    model = spec.name
    challenger_version = tracker.version_by_alias(model, CHALLENGER)
    champion_version = _optional_alias(tracker, model, CHAMPION)
    if champion_version is not None and champion_version.version == challenger_version.version:
        raise ClinmlError(f"{model} version {challenger_version.version} already is the champion")
    if evidence is not None and evidence.version != str(challenger_version.version):
        raise ClinmlError(
            f"the {evidence.kind} evidence is about version {evidence.version}, but the "
            f"challenger is version {challenger_version.version}"
        )
    challenger = contender(spec, tracker, challenger_version, CHALLENGER, data)
    why = ""
    if champion_version is not None:
        incumbent: Contender | None = contender(spec, tracker, champion_version, CHAMPION, data)
    else:
        incumbent, why = reference_contender(spec, tracker, challenger_version, data)
    assessment = assess(spec, data, challenger, incumbent, validation, why_no_incumbent=why)
    checks = [*assessment.checks, *(evidence.checks if evidence is not None else [])]
    passed = all(c.passed for c in checks)
    action = PROMOTE if passed else FORCED_PROMOTE if force else REFUSED
    from_version = str(champion_version.version) if champion_version is not None else None
    to_version = str(challenger_version.version)
    entry = _entry(
        action,
        model,
        actor,
        from_version,
        to_version,
        reason,
        checks,
        assessment,
        spec.primary_metric,
    )
    entry["evidence"] = (
        [{"kind": "retrospective"}]
        if evidence is None
        else [{"kind": "retrospective"}, {"kind": evidence.kind, **evidence.record}]
    )
    audit.append(entry)
    decision = Decision(model, to_version, from_version, checks, action, reason, assessment)
    if action == REFUSED:
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in decision.failures)
        raise PromotionRefused(
            f"{model} version {to_version} was not promoted: {reasons}", decision
        )
    shadowed = _end_shadow_of(tracker, audit, model, to_version, actor, "promoted to champion")
    canaried = _end_canary_of(tracker, audit, model, to_version, actor, "promoted to champion")
    client = tracker.client
    if champion_version is not None:
        client.set_registered_model_alias(model, PREVIOUS_CHAMPION, str(champion_version.version))
    client.set_registered_model_alias(model, CHAMPION, to_version)
    client.delete_registered_model_alias(model, CHALLENGER)
    if shadowed:
        client.delete_registered_model_alias(model, SHADOW)
    if canaried:
        client.delete_registered_model_alias(model, CANARY)
    client.set_model_version_tag(model, to_version, "clinml.promoted_by", actor)
    return decision


def rollback(
    spec: UseCaseSpec, tracker: Tracker, audit: AuditLog, actor: str, reason: str | None = None
) -> tuple[str, str]:
    """Point ``champion`` back at ``previous_champion``; returns (from, to) versions.

    Raises:
        NotReadyError: there is no champion or no previous champion.
    """
    model = spec.name
    current = tracker.version_by_alias(model, CHAMPION)
    previous = _optional_alias(tracker, model, PREVIOUS_CHAMPION)
    if previous is None:
        raise NotReadyError(f"{model} has no previous champion to roll back to")
    from_version, to_version = str(current.version), str(previous.version)
    audit.append(_entry(ROLLBACK, model, actor, from_version, to_version, reason, [], None, ""))
    shadowed = _end_shadow_of(tracker, audit, model, to_version, actor, "rolled back to champion")
    canaried = _end_canary_of(tracker, audit, model, to_version, actor, "rolled back to champion")
    client = tracker.client
    client.set_registered_model_alias(model, CHAMPION, to_version)
    if shadowed:
        client.delete_registered_model_alias(model, SHADOW)
    if canaried:
        client.delete_registered_model_alias(model, CANARY)
    before = champion_before(audit, model, to_version)
    if before is not None and before != to_version:
        client.set_registered_model_alias(model, PREVIOUS_CHAMPION, before)
    else:
        client.delete_registered_model_alias(model, PREVIOUS_CHAMPION)
    return from_version, to_version


def _end_shadow_of(
    tracker: Tracker, audit: AuditLog, model: str, version: str, actor: str, why: str
) -> bool:
    """Record the end of the shadow when ``version``, about to become the champion, is the
    shadowed one (a model never shadows itself); the caller removes the alias after its
    own moves. Returns whether it was."""
    shadowed = _optional_alias(tracker, model, SHADOW)
    if shadowed is None or str(shadowed.version) != version:
        return False
    audit.append(_entry(SHADOW_STOP, model, actor, version, None, why, [], None, ""))
    return True


def shadow_version(tracker: Tracker, model: str) -> str | None:
    """The version behind the ``shadow`` alias, or None when nothing is shadowed."""
    shadowed = _optional_alias(tracker, model, SHADOW)
    return None if shadowed is None else str(shadowed.version)


def _version_beside_champion(
    tracker: Tracker, model: str, version: str | None, role: str, wanted: str
) -> str:
    """The version a shadow or a canary (``role``) would run beside the champion:
    ``version`` resolved, or the challenger; never the champion itself.

    Raises:
        NotReadyError: no champion, no challenger (without ``version``), or no such version.
        ClinmlError: the version is the champion.
    """
    champion = _optional_alias(tracker, model, CHAMPION)
    if champion is None:
        raise NotReadyError(
            f"{model} has no champion for a {role} to run beside: promote one first"
        )
    if version is None:
        target = _optional_alias(tracker, model, CHALLENGER)
        if target is None:
            raise NotReadyError(
                f"{model} has no challenger {wanted}: train one (`clinml train {model}`) "
                "or name a version with --version"
            )
    else:
        target = resolve(tracker, model, version)
    to_version = str(target.version)
    if to_version == str(champion.version):
        raise ClinmlError(
            f"{model} version {to_version} is the champion: a {role} must be another version"
        )
    return to_version


def shadow_start(
    spec: UseCaseSpec,
    tracker: Tracker,
    audit: AuditLog,
    actor: str,
    version: str | None = None,
    reason: str | None = None,
) -> tuple[str | None, str]:
    """Point ``shadow`` at ``version`` (a number or an alias; default: the challenger), so
    that the service scores it beside the champion without answering with it. Recorded
    before the alias moves. Returns (the version shadowed before or None, the new one).

    Raises:
        NotReadyError: no champion, no challenger (without ``version``), or no such version.
        ClinmlError: the version is the champion, or is shadowed already.
    """
    model = spec.name
    to_version = _version_beside_champion(tracker, model, version, "shadow", "to shadow")
    current = shadow_version(tracker, model)
    if current == to_version:
        raise ClinmlError(f"{model} version {to_version} is already the shadow")
    audit.append(_entry(SHADOW_START, model, actor, current, to_version, reason, [], None, ""))
    tracker.client.set_registered_model_alias(model, SHADOW, to_version)
    return current, to_version


def shadow_stop(
    spec: UseCaseSpec, tracker: Tracker, audit: AuditLog, actor: str, reason: str | None = None
) -> str:
    """Remove the ``shadow`` alias, recorded before it goes; returns the version it named.

    Raises:
        NotReadyError: nothing is shadowed.
    """
    model = spec.name
    current = shadow_version(tracker, model)
    if current is None:
        raise NotReadyError(f"{model} has no shadow version: there is nothing to stop")
    audit.append(_entry(SHADOW_STOP, model, actor, current, None, reason, [], None, ""))
    tracker.client.delete_registered_model_alias(model, SHADOW)
    return current


def _end_canary_of(
    tracker: Tracker, audit: AuditLog, model: str, version: str, actor: str, why: str
) -> bool:
    """Record the end of the canary when ``version``, about to become the champion, is the
    canary (it then answers everyone); the caller removes the alias after its own moves.
    Returns whether it was."""
    canary = _optional_alias(tracker, model, CANARY)
    if canary is None or str(canary.version) != version:
        return False
    audit.append(_entry(CANARY_STOP, model, actor, version, None, why, [], None, ""))
    return True


def canary_state(tracker: Tracker, model: str) -> tuple[str, float] | None:
    """(version, percent) of the canary, or None when there is none. A canary version
    without a readable percent tag counts as 0 percent (it answers nobody)."""
    canary = _optional_alias(tracker, model, CANARY)
    if canary is None:
        return None
    return str(canary.version), canary_percent(canary.tags or {})


def canary_start(
    spec: UseCaseSpec,
    tracker: Tracker,
    audit: AuditLog,
    actor: str,
    percent: float,
    version: str | None = None,
    reason: str | None = None,
) -> tuple[str | None, str]:
    """Point ``canary`` at ``version`` (a number or an alias; default: the challenger) with
    ``percent`` of the requests, recorded before the alias moves. The share is a tag on
    the version (``clinml.canary_percent``), written before the alias, so a service that
    sees the alias sees its share. Starting the canary version again changes its share.
    Returns (the canary version before or None, the new one).

    Raises:
        NotReadyError: no champion, no challenger (without ``version``), or no such version.
        ClinmlError: the percent is outside (0, 50], or the version is the champion.
    """
    model = spec.name
    if not 0.0 < percent <= CANARY_MAX_PERCENT:
        raise ClinmlError(
            f"--percent must be above 0 and at most {CANARY_MAX_PERCENT:g}; got {percent:g} "
            "(beyond half, promote the version instead)"
        )
    to_version = _version_beside_champion(tracker, model, version, "canary", "for a canary")
    state = canary_state(tracker, model)
    before = state[0] if state else None
    entry = _entry(CANARY_START, model, actor, before, to_version, reason, [], None, "")
    entry["percent"] = percent
    audit.append(entry)
    client = tracker.client
    client.set_model_version_tag(model, to_version, CANARY_PERCENT_TAG, f"{percent:g}")
    client.set_registered_model_alias(model, CANARY, to_version)
    return before, to_version


def canary_stop(
    spec: UseCaseSpec, tracker: Tracker, audit: AuditLog, actor: str, reason: str | None = None
) -> str:
    """Remove the ``canary`` alias, recorded before it goes; returns the version it named.

    Raises:
        NotReadyError: there is no canary.
    """
    model = spec.name
    current = canary_state(tracker, model)
    if current is None:
        raise NotReadyError(f"{model} has no canary version: there is nothing to stop")
    audit.append(_entry(CANARY_STOP, model, actor, current[0], None, reason, [], None, ""))
    tracker.client.delete_registered_model_alias(model, CANARY)
    return current[0]


def canary_rollback(
    model: str,
    tracker: Tracker,
    audit: AuditLog,
    actor: str,
    version: str,
    reason: str,
    observed: dict[str, Any],
) -> bool:
    """The canary guard's automatic rollback (:mod:`clinml.serving.canary`): a
    ``canary-rollback`` record with the reason and the counts and rates it rests on (no
    PHI), then the ``canary`` alias removed, when it still names ``version`` (another
    worker may have rolled it back, or someone moved it, meanwhile). Returns whether the
    alias was removed by this call."""
    current = canary_state(tracker, model)
    if current is None or current[0] != version:
        return False
    entry = _entry(CANARY_ROLLBACK, model, actor, version, None, reason, [], None, "")
    entry["observed"] = observed
    audit.append(entry)
    tracker.client.delete_registered_model_alias(model, CANARY)
    return True


def champion_before(audit: AuditLog, model: str, version: str) -> str | None:
    """The champion that ``version`` replaced when it was last promoted, per the audit log."""
    for record in reversed(audit.records()):
        if (
            record.get("model") == model
            and record.get("action") in {PROMOTE, FORCED_PROMOTE}
            and record.get("to_version") == version
        ):
            return record.get("from_version")
    return None


def history(audit: AuditLog, model: str) -> list[dict[str, Any]]:
    """Every audit record about ``model``, oldest first."""
    return [r for r in audit.records() if r.get("model") == model]


def resolve(tracker: Tracker, model: str, ref: str) -> ModelVersion:
    """A model version by number (``3``) or alias (``champion``).

    Raises:
        NotReadyError: no such version or alias.
    """
    from mlflow.exceptions import MlflowException

    if not ref.isdigit():
        return tracker.version_by_alias(model, ref)
    try:
        return tracker.client.get_model_version(model, ref)
    except MlflowException as exc:
        if exc.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise
        raise NotReadyError(f"model '{model}' has no version {ref}") from None


def versions(tracker: Tracker, model: str) -> list[ModelVersion]:
    """Every registered version of ``model``, newest first."""
    found = tracker.client.search_model_versions(f"name = '{model}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def aliases(tracker: Tracker, model: str) -> dict[str, list[str]]:
    """Version number -> the aliases pointing at it (version search does not return them)."""
    found: dict[str, list[str]] = {}
    for alias, number in (tracker.client.get_registered_model(model).aliases or {}).items():
        found.setdefault(str(number), []).append(alias)
    return {number: sorted(names) for number, names in found.items()}


def download_card(tracker: Tracker, version: ModelVersion, destination: Path) -> dict[str, Any]:
    """Fetch a version's model card (JSON and HTML) into ``destination``; returns the JSON."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from clinml.training.train import CARD_ARTIFACT

    destination.mkdir(parents=True, exist_ok=True)
    try:
        local = download_artifacts(
            run_id=version.run_id,
            artifact_path=CARD_ARTIFACT,
            dst_path=str(destination),
            tracking_uri=tracker.uri,
        )
    except (MlflowException, OSError):
        raise NotReadyError(
            f"{version.name} version {version.version} has no model card "
            "(it was registered before model cards existed)"
        ) from None
    return json.loads((Path(local) / "model_card.json").read_text())
