"""The monitor's own error rates on the readmission generator (bench/monitor_evaluation.py),
a small version of bench/monitor_eval.py: weeks of 2 000 discharges.

100 windows without a shift (25 of each realistic kind: consecutive weeks, winter weeks
against the year and against the same weeks, one hospital's service) may raise at most 9
alerts: a monitor that alarms 5% of the time does so with probability 0.97, one that alarms
15% of the time with probability 0.05, so the test tells the two apart. Each shift at the
size docs/monitoring.md calls clinically meaningful must be found in at least 23 of 25
windows, and a change in the label rate, which no feature shows, by labelled performance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import monitor_evaluation as evaluation
from clinml.spec import load_spec

pytestmark = pytest.mark.slow
WINDOWS = 25
SIZE = 2_000


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[evaluation.WindowOutcome]:
    spec = load_spec("readmission")
    meaningful = {shift: (dose,) for shift, dose in evaluation.MEANINGFUL.items()}
    return evaluation.evaluate(
        spec,
        WINDOWS,
        tmp_path_factory.mktemp("monitor-eval"),
        sizes=(SIZE,),
        dose_sizes=(SIZE,),
        shifts={**meaningful, "label rate": (1.0,)},
    )


def test_unshifted_windows_rarely_alarm(outcomes) -> None:
    quiet = [o for o in outcomes if o.dose == 0]
    assert len(quiet) == WINDOWS * len(evaluation.QUIET)
    alarmed = [(o.condition, o.features) for o in quiet if o.alarmed]
    assert len(alarmed) <= 9, alarmed
    assert all(o.enough_data for o in quiet)  # 2 000 discharges are enough patients


@pytest.mark.parametrize("shift", list(evaluation.MEANINGFUL))
def test_each_meaningful_shift_is_detected(outcomes, shift: str) -> None:
    found = [o.alarmed for o in outcomes if o.condition == shift]
    assert len(found) == WINDOWS
    assert sum(found) >= 23


def test_lab_units_are_a_data_quality_alert(outcomes) -> None:
    found = [o for o in outcomes if o.condition == "lab units"]
    assert sum("data_quality" in o.drift_alerts for o in found) >= 23  # µmol/L exceeds the range


def test_a_label_rate_shift_is_caught_by_performance_monitoring(outcomes) -> None:
    shifted = [o for o in outcomes if o.condition == "label rate"]
    assert sum(o.performance_alert for o in shifted) >= 23
    quiet = [o for o in outcomes if o.condition == "consecutive"]
    assert sum(o.performance_alert for o in quiet) <= 2


def test_the_evaluation_writes_nothing(tmp_path: Path) -> None:
    """judge() computes without writing reports (write=False)."""
    spec = load_spec("readmission")
    reference = evaluation.fit_reference(spec)
    year = evaluation._second_year(evaluation.system(spec, 1))
    current = evaluation.window(spec, reference, year, "consecutive", 0.0, 500, seed=1)
    evaluation.judge(spec, reference, current, "consecutive", 0.0, 500, 1, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()
