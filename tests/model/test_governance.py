"""The promotion gate's checks, on hand-made evaluations, and the audit-trail helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from clinml.audit import AuditLog
from clinml.spec import UseCaseSpec
from training.evaluate import Evaluation
from training.governance import (
    FORCED_PROMOTE,
    PROMOTE,
    ValidationStatus,
    champion_before,
    gate,
    history,
)


def evaluation(roc_auc: float, ece: float, worst_gap: float | None = None) -> Evaluation:
    rows = []
    if worst_gap is not None:
        rows = [
            {
                "attribute": "site",
                "group": "north",
                "n": 400,
                "evaluated": True,
                "roc_auc": roc_auc + worst_gap,
                "gap_roc_auc": worst_gap,
            },
            {
                "attribute": "site",
                "group": "south",
                "n": 400,
                "evaluated": True,
                "roc_auc": roc_auc + 0.01,
                "gap_roc_auc": 0.01,
            },
            # Too small to evaluate: its (terrible) gap must not count.
            {
                "attribute": "site",
                "group": "east",
                "n": 5,
                "evaluated": False,
                "roc_auc": math.nan,
                "gap_roc_auc": math.nan,
            },
        ]
    return Evaluation(
        threshold=0.3,
        rule="fixed",
        rows=800,
        patients=700,
        positives=100,
        metrics={"roc_auc": roc_auc, "ece": ece, "sensitivity": 0.8},
        ci={"roc_auc": (roc_auc - 0.02, roc_auc + 0.02)},
        confusion={"tn": 600, "fp": 100, "fn": 20, "tp": 80},
        calibration=pd.DataFrame(),
        subgroups=pd.DataFrame(rows),
    )


PASSED = ValidationStatus(True, Path("/reports/validation/run"))


@pytest.fixture
def spec(tiny_spec: UseCaseSpec) -> UseCaseSpec:
    promotion = tiny_spec.promotion.model_copy(
        update={"max_metric_drop": 0.01, "max_subgroup_gap": 0.05, "max_ece": 0.05}
    )
    return tiny_spec.model_copy(update={"promotion": promotion})


def by_name(checks) -> dict[str, bool]:
    return {c.name: c.passed for c in checks}


def test_a_good_challenger_passes_every_check(spec: UseCaseSpec) -> None:
    checks = gate(spec, evaluation(0.80, 0.02, -0.03), evaluation(0.80, 0.02), PASSED)
    assert by_name(checks) == {
        "primary_metric": True,
        "subgroup_gap": True,
        "calibration": True,
        "data_validation": True,
    }


def test_the_metric_may_drop_by_the_margin_but_not_more(spec: UseCaseSpec) -> None:
    champion = evaluation(0.80, 0.02)
    within = gate(spec, evaluation(0.7905, 0.02, -0.01), champion, PASSED)
    beyond = gate(spec, evaluation(0.7850, 0.02, -0.01), champion, PASSED)
    assert by_name(within)["primary_metric"] is True
    assert by_name(beyond)["primary_metric"] is False
    detail = next(c.detail for c in beyond if c.name == "primary_metric")
    assert "0.7850 vs champion 0.8000" in detail and "-0.0150" in detail


def test_every_failing_check_is_reported_not_just_the_first(spec: UseCaseSpec) -> None:
    failed = ValidationStatus(False, Path("/reports/validation/bad"))
    checks = gate(spec, evaluation(0.70, 0.09, -0.08), evaluation(0.80, 0.02), failed)
    assert by_name(checks) == {
        "primary_metric": False,
        "subgroup_gap": False,
        "calibration": False,
        "data_validation": False,
    }
    gap = next(c.detail for c in checks if c.name == "subgroup_gap")
    assert "site=north" in gap and "-0.0800" in gap  # the evaluated group, not the tiny one


def test_without_a_champion_only_the_absolute_checks_apply(spec: UseCaseSpec) -> None:
    checks = gate(spec, evaluation(0.60, 0.01), None, ValidationStatus(None, None))
    assert by_name(checks)["primary_metric"] is True
    assert by_name(checks)["data_validation"] is False  # no validation on record


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


def test_calibration_limit_widens_to_the_chance_level_of_a_small_test_set(
    spec: UseCaseSpec,
) -> None:
    from dataclasses import replace

    noisy = replace(evaluation(0.80, 0.07, -0.01), ece_by_chance=0.08)
    precise = replace(evaluation(0.80, 0.07, -0.01), ece_by_chance=0.01)
    assert by_name(gate(spec, noisy, None, PASSED))["calibration"] is True
    assert by_name(gate(spec, precise, None, PASSED))["calibration"] is False
