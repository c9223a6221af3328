"""The monitor's own error rates on the adverse-drug-event generator
(bench/monitor_evaluation.py), a small version of ``bench/monitor_eval.py --usecase ade``:
windows of 2 500 new prescriptions (about eight days, about 90 events).

80 windows without a shift (40 consecutive, 40 of the inpatient service alone) may raise
at most 7 alerts: a monitor that alarms 5% of the time does so with probability 0.95, one
that alarms 15% of the time with probability 0.07. Each shift at the size
docs/monitoring.md calls clinically meaningful must be found in at least 36 of 40 windows
(a monitor that finds 95% passes with probability 0.95, one that finds 80% with
probability 0.08), and doubled odds of an event at the same features, which no feature
shows, by labelled performance in as many.

Five windows share each generated system (eight systems per condition), which keeps the
fixture to about two minutes: windows of one system share its patients, so they are less
independent than the binomial figures assume. The test says nothing about smaller shifts
than the meaningful ones (the bench's dose-response curves) nor about a riskier drug in
one class, which labelled performance rarely sees (docs/monitoring.md).
"""

from __future__ import annotations

import pytest

from bench import monitor_evaluation as evaluation
from clinml.spec import load_spec

pytestmark = pytest.mark.slow
COHORT = evaluation.ADE
WINDOWS = 40
SIZE = 2_500


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[evaluation.WindowOutcome]:
    meaningful = {shift: (dose,) for shift, dose in COHORT.meaningful.items()}
    return evaluation.evaluate(
        load_spec(COHORT.name),
        WINDOWS,
        tmp_path_factory.mktemp("monitor-eval-ade"),
        sizes=(SIZE,),
        dose_sizes=(SIZE,),
        shifts={**meaningful, "label rate": (1.0,)},
        windows_per_system=5,
    )


def test_unshifted_windows_rarely_alarm(outcomes) -> None:
    quiet = [o for o in outcomes if o.dose == 0]
    assert len(quiet) == WINDOWS * len(COHORT.quiet)
    alarmed = [(o.condition, o.features) for o in quiet if o.alarmed]
    assert len(alarmed) <= 7, alarmed
    assert all(o.enough_data for o in quiet)


@pytest.mark.parametrize("shift", list(COHORT.meaningful))
def test_each_meaningful_shift_is_detected(outcomes, shift: str) -> None:
    found = [o.alarmed for o in outcomes if o.condition == shift]
    assert len(found) == WINDOWS
    assert sum(found) >= 36


def test_missing_labs_are_a_data_quality_alert(outcomes) -> None:
    found = [o for o in outcomes if o.condition == "missing labs"]
    assert sum("data_quality" in o.drift_alerts for o in found) >= 36


def test_a_label_rate_shift_is_caught_by_performance_monitoring(outcomes) -> None:
    shifted = [o for o in outcomes if o.condition == "label rate"]
    assert all(o.judged for o in shifted)  # 2 500 labels meet min_labels (2 000)
    assert sum(o.performance_alert for o in shifted) >= 36
    quiet = [o for o in outcomes if o.condition == evaluation.CONSECUTIVE]
    assert sum(o.performance_alert for o in quiet) <= 4
