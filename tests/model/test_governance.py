"""The promotion gate: the stable test assignment, comparison rows, the paired
non-inferiority rule, subgroups, the operating point, and the audit-trail helpers.

The gate's checks run on real models trained on the readmission generator: a
same-configuration retrain on grown data must pass, a challenger made worse must be
refused, a harm confined to one subgroup must be named, and too few comparison rows must
be refused *as underpowered*.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.audit import AuditLog
from clinml.spec import UseCaseSpec, load_spec
from clinml.training.assignment import PatientAssignment, TrainingRecord
from clinml.training.governance import (
    FORCED_PROMOTE,
    INFERIOR,
    NON_INFERIOR,
    NOT_SHOWN,
    PROMOTE,
    UNDERPOWERED,
    Contender,
    CurrentData,
    ValidationStatus,
    assess,
    champion_before,
    history,
    non_inferiority,
)
from clinml.training.train import fit_candidate, outcome, split_frame, training_record
from tests.conftest import NOW, PROJECT_ROOT, make_tiny_frame

PASSED = ValidationStatus(True, Path("/reports/validation/run"))


def by_name(checks) -> dict[str, bool]:
    return {c.name: c.passed for c in checks}


def detail(checks, name: str) -> str:
    return next(c.detail for c in checks if c.name == name)


# --- the non-inferiority rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ci", "verdict"),
    [
        ((-0.015, 0.010), NON_INFERIOR),  # the whole interval above -0.02
        ((-0.060, -0.030), INFERIOR),  # the whole interval below -0.02
        ((-0.030, 0.000), NOT_SHOWN),  # precise enough, and straddling the margin
        ((-0.090, 0.050), UNDERPOWERED),  # wider than the margin on each side
        ((float("nan"), float("nan")), UNDERPOWERED),
    ],
)
def test_non_inferiority_is_decided_on_the_interval(ci, verdict) -> None:
    assert non_inferiority(ci, 0.02) == verdict


# --- the stable test assignment ----------------------------------------------------------------


def test_adding_patients_never_moves_anyone_into_or_out_of_the_test_set(
    tiny_spec: UseCaseSpec,
) -> None:
    frame = make_tiny_frame(n=400, seed=1)
    first = split_frame(frame, tiny_spec)
    tested = set(frame.iloc[first.test]["patient_id"])
    trained = set(frame.iloc[first.train]["patient_id"])
    grown = frame
    for step in range(1, 6):
        newcomers = make_tiny_frame(n=150, seed=100 + step)
        newcomers["patient_id"] = [f"N{step}-{i}" for i in range(len(newcomers))]
        # New patients, and new encounters of patients already known.
        returning = frame.sample(60, random_state=step).assign(
            event_timestamp=lambda f, s=step: f["event_timestamp"] + timedelta(days=s)
        )
        grown = pd.concat([grown, newcomers, returning], ignore_index=True)
        shuffled = grown.sample(frac=1.0, random_state=step)
        split = split_frame(shuffled, tiny_spec)
        now_tested = set(shuffled.iloc[split.test]["patient_id"])
        now_trained = set(shuffled.iloc[split.train]["patient_id"])
        assert tested <= now_tested and not tested & now_trained, step
        assert trained <= now_trained and not trained & now_tested, step
    share = len(now_tested) / (len(now_tested) + len(now_trained))
    assert abs(share - tiny_spec.training.test_size) < 0.05


def test_the_assignment_is_a_keyed_hash_of_the_patient() -> None:
    ids = np.array([f"P{i}" for i in range(20_000)], dtype=object)
    first, other_salt = PatientAssignment("a", 0.2), PatientAssignment("b", 0.2)
    assert abs(first.is_test(ids).mean() - 0.2) < 0.01
    # The same patient, the same answer, whatever the order or company.
    np.testing.assert_array_equal(first.is_test(ids[::-1]), first.is_test(ids)[::-1])
    np.testing.assert_array_equal(first.is_test(ids[:10]), first.is_test(ids)[:10])
    # A different salt draws a different (independent) test set.
    overlap = (first.is_test(ids) & other_salt.is_test(ids)).mean()
    assert abs(overlap - 0.04) < 0.01


def test_a_training_record_rebuilds_its_patients_or_counts_the_whole_window() -> None:
    frame = make_tiny_frame(n=300, seed=4)
    assignment = PatientAssignment("s", 0.3)
    patients, times = frame["patient_id"].to_numpy(), frame["event_timestamp"]
    train = ~assignment.is_test(patients)
    record = TrainingRecord.of(assignment, patients[train], times[train])
    assert TrainingRecord.from_json(record.to_json()) == record
    assert record.rebuilt(patients, times)
    np.testing.assert_array_equal(record.trained(patients, times), train)
    # A training row that is gone today: the record no longer rebuilds, so every row of
    # its window counts as trained (the comparison loses rows, never gains unfair ones).
    dropped = np.flatnonzero(train)[0]
    keep = np.ones(len(frame), dtype=bool)
    keep[dropped] = False
    later = record.trained(patients[keep], times[keep])
    assert not record.rebuilt(patients[keep], times[keep]) and later.all()


def test_a_version_without_a_record_counts_as_trained_until_registered() -> None:
    times = pd.Series(pd.date_range("2025-01-01", periods=10, freq="D", tz="UTC"))
    legacy = Contender("champion", "1", np.zeros(10), 0.5, record=None, registered=times.iloc[5])
    np.testing.assert_array_equal(legacy.trained(np.arange(10), times), np.arange(10) <= 5)


def test_the_temporal_holdout_starts_a_label_horizon_after_training() -> None:
    spec = load_spec(PROJECT_ROOT / "configs" / "readmission.yaml")
    from clinml.features.datasets import readmission

    frame = readmission.load(spec.source.seed, NOW, n_patients=3000)
    frame = frame[frame[spec.label.column].notna()].reset_index(drop=True)
    split = split_frame(frame, spec)
    times = pd.to_datetime(frame[spec.event_timestamp], utc=True)
    gap = times.iloc[split.temporal].min() - times.iloc[split.train].max()
    assert gap >= pd.Timedelta(days=spec.label.horizon_days) > pd.Timedelta(0)
    assert len(split.gap) > 0
    assert not set(split.gap) & (set(split.train) | set(split.test) | set(split.temporal))


# --- the gate on real models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_spec() -> UseCaseSpec:
    """The readmission spec with one gradient-boosting configuration, fitted as given."""
    spec = load_spec(PROJECT_ROOT / "configs" / "readmission.yaml")
    training = spec.training.model_copy(
        update={
            "search": spec.training.search.model_copy(update={"n_iter": 1}),
            "candidates": {
                "gbm": spec.training.candidates["gbm"].model_copy(
                    update={"params": {"max_iter": 120, "learning_rate": 0.08}, "search": {}}
                )
            },
        }
    )
    evaluation = spec.evaluation.model_copy(update={"bootstrap": 300})
    return spec.model_copy(update={"training": training, "evaluation": evaluation})


def _known(cohort: pd.DataFrame, spec: UseCaseSpec, at: pd.Timestamp) -> pd.DataFrame:
    """The labelled events a team would have at ``at``."""
    known = cohort[spec.label.known_at].notna() & (cohort[spec.label.known_at] <= at)
    return cohort[known & cohort[spec.label.column].notna()].reset_index(drop=True)


def _train(spec: UseCaseSpec, frame: pd.DataFrame, role: str):
    split = split_frame(frame, spec)
    y = outcome(frame, spec)
    fitted = fit_candidate(spec, frame, y, split, "gbm", n_boot=50)
    return fitted, training_record(frame, spec, split)


def _contender(role: str, fitted, record, data: CurrentData, spec, frame=None) -> Contender:
    features = (data.frame if frame is None else frame)[spec.feature_names]
    probability = fitted.pipeline.predict_proba(features)[:, 1]
    return Contender(role, None, probability, fitted.threshold, record)


# Autumn: the months compared hold no winter. The generator's winter case mix is sicker, so
# a winter holdout raises every model's alert rate whatever it was trained on (the gate
# then refuses on the operating point: test_a_missed_operating_point_is_refused).
TODAY = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def grown(gate_spec: UseCaseSpec):
    """A champion trained six months ago, its same-configuration retrain on today's (grown)
    data, and today's data."""
    from clinml.features.datasets import readmission

    cohort = readmission.load(gate_spec.source.seed, TODAY, n_patients=10_000)
    today = pd.Timestamp(TODAY)
    early = _known(cohort, gate_spec, today - pd.Timedelta(days=182))
    late = _known(cohort, gate_spec, today)
    champion = _train(gate_spec, early, "champion")
    challenger = _train(gate_spec, late, "challenger")
    data = CurrentData.from_frame(gate_spec, late)
    return data, champion, challenger, len(early)


@pytest.mark.slow
def test_a_same_configuration_retrain_on_grown_data_passes(gate_spec, grown) -> None:
    data, champion, challenger, early_rows = grown
    assert len(data.y) > early_rows * 1.1  # the data did grow
    old = _contender("champion", *champion, data, gate_spec)
    new = _contender("challenger", *challenger, data, gate_spec)
    assessment = assess(gate_spec, data, new, old, PASSED)
    failed = [f"{c.name}: {c.detail}" for c in assessment.checks if not c.passed]
    assert assessment.passed, failed
    primary = detail(assessment.checks, "primary_metric")
    assert "non-inferior" in primary and "neither was trained on" in primary
    # Compared only on rows neither model was trained on, and the gate says how many.
    patients, times = data.patients(gate_spec), data.times(gate_spec)
    unseen = ~old.trained(patients, times) & ~new.trained(patients, times)
    assert assessment.comparison is not None
    assert assessment.comparison.rows == assessment.comparison_rows == int(unseen.sum())
    assert f"{assessment.comparison.rows:,} rows" in primary
    assert any("rebuilt exactly" in note for note in assessment.notes)


@pytest.mark.slow
def test_a_challenger_made_worse_is_refused(gate_spec, grown) -> None:
    data, champion, challenger, _ = grown
    old = _contender("champion", *champion, data, gate_spec)
    rng = np.random.default_rng(0)
    permuted = data.frame.assign(
        prior_admissions_365d=rng.permutation(data.frame["prior_admissions_365d"].to_numpy()),
        discharge_disposition=rng.permutation(data.frame["discharge_disposition"].to_numpy()),
    )
    worse = _contender("challenger", *challenger, data, gate_spec, frame=permuted)
    assessment = assess(gate_spec, data, worse, old, PASSED)
    assert by_name(assessment.checks)["primary_metric"] is False
    assert INFERIOR in detail(assessment.checks, "primary_metric")


@pytest.mark.slow
def test_a_harm_confined_to_one_subgroup_is_named(gate_spec, grown) -> None:
    data, champion, challenger, _ = grown
    old = _contender("champion", *champion, data, gate_spec)
    new = _contender("challenger", *challenger, data, gate_spec)
    # The challenger loses its ranking for one site only: shuffled risks within hosp_d.
    harmed = new.probability.copy()
    site = (data.frame["site"] == "hosp_d").to_numpy()
    harmed[site] = np.random.default_rng(1).permutation(harmed[site])
    worse = Contender("challenger", None, harmed, new.threshold, new.record)
    assessment = assess(gate_spec, data, worse, old, PASSED)
    checks = by_name(assessment.checks)
    assert checks["subgroup_discrimination"] is False
    assert "site=hosp_d" in detail(assessment.checks, "subgroup_discrimination")
    refused_in = {
        f"{g.attribute}={g.group}"
        for g in assessment.groups
        if g.evaluated and g.verdicts["discrimination"] == INFERIOR
    }
    # Refused where the harm is; a group it dilutes into (sex=M holds hosp_d's men) may be
    # inconclusive, but is not called worse.
    assert "site=hosp_d" in refused_in and all("hosp_d" in name for name in refused_in)


@pytest.mark.slow
def test_too_few_comparison_rows_are_refused_as_underpowered(gate_spec, grown) -> None:
    data, champion, challenger, _ = grown
    few = CurrentData.from_frame(gate_spec, data.frame.sample(200, random_state=3))
    old = _contender("champion", *champion, few, gate_spec)
    new = _contender("challenger", *challenger, few, gate_spec)
    assessment = assess(gate_spec, few, new, old, PASSED)
    assert by_name(assessment.checks)["primary_metric"] is False
    assert "underpowered" in detail(assessment.checks, "primary_metric")


@pytest.mark.slow
def test_a_champion_without_a_training_record_is_compared_only_after_its_registration(
    gate_spec, grown
) -> None:
    data, champion, challenger, _ = grown
    old = _contender("champion", *champion, data, gate_spec)
    # Registered before clinml kept training records, at the end of today's data.
    legacy = Contender(
        "champion", "1", old.probability, old.threshold, None, data.times(gate_spec).max()
    )
    new = _contender("challenger", *challenger, data, gate_spec)
    assessment = assess(gate_spec, data, new, legacy, PASSED)
    assert assessment.comparison_rows == 0
    primary = detail(assessment.checks, "primary_metric")
    assert "underpowered" in primary and "no training record" in primary
    assert any("no training record" in note for note in assessment.notes)


@pytest.mark.slow
def test_a_missed_operating_point_is_refused(gate_spec, grown) -> None:
    data, _, challenger, _ = grown
    fitted, record = challenger
    # A threshold far below the chosen one alerts on far more than 15 in 100.
    eager = Contender(
        "challenger",
        None,
        fitted.pipeline.predict_proba(data.frame[gate_spec.feature_names])[:, 1],
        fitted.threshold / 3,
        record,
    )
    assessment = assess(gate_spec, data, eager, None, PASSED)
    assert by_name(assessment.checks)["operating_point"] is False
    assert "MISSED" in detail(assessment.checks, "operating_point")
    at_threshold = Contender("challenger", None, eager.probability, fitted.threshold, record)
    kept = assess(gate_spec, data, at_threshold, None, PASSED)
    assert by_name(kept.checks)["operating_point"] is True


def test_the_calibration_limit_widens_to_the_chance_level_of_a_small_set(
    tiny_spec: UseCaseSpec,
) -> None:
    from clinml.training.evaluate import evaluate
    from clinml.training.governance import _calibration_check

    rng = np.random.default_rng(5)
    p = rng.uniform(0.05, 0.6, 120)
    y = (rng.random(120) < p).astype(int)
    small = evaluate(
        tiny_spec,
        y,
        p,
        0.3,
        np.arange(120),
        pd.DataFrame(index=range(120)),
        n_boot=100,
        subgroups=False,
    )
    strict = tiny_spec.model_copy(
        update={"promotion": tiny_spec.promotion.model_copy(update={"max_ece": 0.01})}
    )
    check = _calibration_check(strict, small)
    # A perfectly calibrated model on 120 rows: its ECE is noise, so the chance level rules.
    assert small.metrics["ece"] > 0.01 and check.passed, check.detail
    assert "chance alone reaches" in check.detail and "observed/expected" in check.detail

    # Risks systematically too low: the ECE is above its limit and the O/E interval
    # confirms it.
    truth = rng.uniform(0.05, 0.6, 3_000)
    outcome = (rng.random(3_000) < truth).astype(int)
    low = evaluate(
        tiny_spec,
        outcome,
        truth * 0.6,
        0.3,
        np.arange(3_000),
        pd.DataFrame(index=range(3_000)),
        n_boot=100,
        subgroups=False,
    )
    refused = _calibration_check(tiny_spec, low)
    assert not refused.passed and "confirmed: the O/E" in refused.detail


# --- records and the audit trail ---------------------------------------------------------------


def test_latest_validation_run_is_the_newest_directory(tmp_path: Path) -> None:
    for name, success in (("20260101T000000000000Z", False), ("20260301T000000000000Z", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"success": success}))
    status = ValidationStatus.latest(tmp_path)
    assert status.passed is True and status.where == tmp_path / "20260301T000000000000Z"
    assert ValidationStatus.latest(tmp_path / "missing") == ValidationStatus(None, None)


def test_rollback_target_comes_from_the_audit_trail(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append({"action": PROMOTE, "model": "m", "from_version": None, "to_version": "1"})
    log.append({"action": PROMOTE, "model": "m", "from_version": "1", "to_version": "2"})
    log.append({"action": PROMOTE, "model": "other", "from_version": "7", "to_version": "3"})
    log.append({"action": FORCED_PROMOTE, "model": "m", "from_version": "2", "to_version": "3"})
    assert champion_before(log, "m", "3") == "2"
    assert champion_before(log, "m", "2") == "1"
    assert champion_before(log, "m", "1") is None
    assert [r["to_version"] for r in history(log, "m")] == ["1", "2", "3"]
