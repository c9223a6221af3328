"""The monitor's own error rates on the readmission generator (monitoring/evaluation.py).

20 seeded windows of 1 000 discharges per condition: without a shift at most 10% of
windows may alarm; each injected shift must be detected in at least 95% of windows; a
shift in the label rate must be caught by performance monitoring once labels arrive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clinml.spec import load_spec
from monitoring import evaluation

pytestmark = pytest.mark.slow
WINDOWS = 20


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory):
    spec = load_spec("readmission")
    outcomes = evaluation.evaluate(spec, WINDOWS, tmp_path_factory.mktemp("monitor-eval"))
    return evaluation.summarise(outcomes).set_index("shift")


def test_unshifted_windows_rarely_alarm(summary) -> None:
    assert summary.loc["none", "windows"] == WINDOWS
    assert summary.loc["none", "any alert rate"] <= 0.10


@pytest.mark.parametrize("shift", ["site mix", "lab units", "case mix"])
def test_each_injected_shift_is_detected(summary, shift: str) -> None:
    assert summary.loc[shift, "drift alert rate"] >= 0.95


def test_lab_units_are_also_a_data_quality_alert(summary) -> None:
    assert summary.loc["lab units", "data_quality"] >= 0.95  # µmol/L values exceed the range


def test_a_label_rate_shift_is_caught_by_performance_monitoring(summary) -> None:
    assert summary.loc["label rate", "performance alert rate"] >= 0.95
    assert summary.loc["none", "performance alert rate"] <= 0.10


def test_the_evaluation_writes_nothing(tmp_path: Path) -> None:
    """judge() computes without writing reports (write=False)."""
    spec = load_spec("readmission")
    reference = evaluation.fit_reference(spec)
    evaluation.judge(spec, reference, "none", seed=1, out_dir=tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
