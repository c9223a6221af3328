"""The monitor's own error rates on the no-show generator (bench/monitor_evaluation.py), a
small version of ``bench/monitor_eval.py --usecase noshow``: weeks of 2 500 appointments.

60 windows without a shift (15 of each kind: consecutive weeks, winter weeks against the
year and against the same weeks, one clinic's service) may raise at most 6 alerts: a
monitor that alarms 5% of the time does so with probability 0.97, one that alarms 20% of
the time with probability 0.03 (15%: 0.19, so the test tells 5% from 20%, not from 15%).
Each shift at the size docs/monitoring.md calls clinically meaningful must be found in at
least 13 of 15 windows (a monitor that finds 95% passes with probability 0.96, one that
finds 70% with probability 0.13), and a hard winter, which no feature shows, by labelled
performance in as many.

To keep the fixture under four minutes, five windows share each generated system (three
systems per condition): windows of one system share its patients, so they are less
independent than the binomial figures assume. The test says nothing about a day's list
(500 rows: docs/monitoring.md shows those alarm on the weekday mix) or about smaller
shifts than the meaningful ones; the dose-response curves are the bench's.
"""

from __future__ import annotations

import pytest

from bench import monitor_evaluation as evaluation
from clinml.spec import load_spec

pytestmark = pytest.mark.slow
COHORT = evaluation.NOSHOW
WINDOWS = 15
SIZE = 2_500


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[evaluation.WindowOutcome]:
    meaningful = {shift: (dose,) for shift, dose in COHORT.meaningful.items()}
    return evaluation.evaluate(
        load_spec(COHORT.name),
        WINDOWS,
        tmp_path_factory.mktemp("monitor-eval-noshow"),
        sizes=(SIZE,),
        dose_sizes=(SIZE,),
        shifts={**meaningful, **{shift: (1.0,) for shift in COHORT.unseen}},
        windows_per_system=5,
    )


def test_unshifted_weeks_rarely_alarm(outcomes) -> None:
    quiet = [o for o in outcomes if o.dose == 0]
    assert len(quiet) == WINDOWS * len(COHORT.quiet)
    alarmed = [(o.condition, o.features) for o in quiet if o.alarmed]
    assert len(alarmed) <= 6, alarmed
    assert all(o.enough_data for o in quiet)  # a week of appointments is enough patients


@pytest.mark.parametrize("shift", list(COHORT.meaningful))
def test_each_meaningful_shift_is_detected(outcomes, shift: str) -> None:
    found = [o.alarmed for o in outcomes if o.condition == shift]
    assert len(found) == WINDOWS
    assert sum(found) >= 13


def test_a_hard_winter_is_caught_by_performance_monitoring(outcomes) -> None:
    [unseen] = COHORT.unseen
    shifted = [o for o in outcomes if o.condition == unseen]
    assert all(o.judged for o in shifted)  # a week holds more than min_labels outcomes
    assert sum(o.performance_alert for o in shifted) >= 13
    quiet = [o for o in outcomes if o.condition == evaluation.CONSECUTIVE]
    assert sum(o.performance_alert for o in quiet) <= 2
