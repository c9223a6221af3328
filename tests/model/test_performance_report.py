"""Performance over time: per-window calibration and alert rate, the HTML page, the job's
record of it, and the windows in the Evidently workspace.

The labelled predictions are synthetic: outcomes drawn from the served probabilities
(calibrated), one week at three times the odds (miscalibrated) and one week with too few
labels to be judged.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from clinml.monitoring import job, performance_report
from clinml.monitoring.performance import WindowPerformance, performance_by_window
from clinml.settings import Settings
from clinml.spec import PerformanceFloors, UseCaseSpec

START = datetime(2026, 5, 4, tzinfo=UTC)
WEEK = timedelta(days=7)
WEEKS = 6
THRESHOLD = 0.3
FLOORS = {"min_roc_auc": 0.65, "min_sensitivity": 0.45, "max_ece": 0.05, "min_labels": 200}
BUDGET = 30  # alerts per 100
SHIFTED, FEW = 3, 1  # the week at three times the odds, the week with 120 labels
_PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def spec(tiny_spec: UseCaseSpec) -> UseCaseSpec:
    """The tiny use case with performance floors and an alert budget."""
    monitoring = tiny_spec.monitoring.model_copy(
        update={"performance": PerformanceFloors(**FLOORS)}
    )
    evaluation = tiny_spec.evaluation.model_copy(update={"max_alerts_per_100": BUDGET})
    return tiny_spec.model_copy(update={"monitoring": monitoring, "evaluation": evaluation})


@pytest.fixture(scope="module")
def labelled() -> pd.DataFrame:
    """Six weeks of labelled predictions, patients repeating within a week."""
    rng = np.random.default_rng(3)
    weeks = []
    for week in range(WEEKS):
        n = 120 if week == FEW else 1500
        p = 1 / (1 + np.exp(-rng.normal(-1.2, 1.2, n)))
        odds = 3.0 if week == SHIFTED else 1.0
        shifted = odds * p / (1 - p + odds * p)
        seconds = np.sort(rng.uniform(0, WEEK.total_seconds(), n))
        weeks.append(
            pd.DataFrame(
                {
                    "time": pd.Timestamp(START + week * WEEK) + pd.to_timedelta(seconds, unit="s"),
                    "request_id": [f"req-{week}-{i}" for i in range(n)],
                    "patient": [f"pseudonym-{week}-{i}" for i in rng.integers(0, n // 2, n)],
                    "probability": p,
                    "label": np.where(p >= THRESHOLD, "yes", "no"),
                    "outcome": (rng.random(n) < shifted).astype(int),
                }
            )
        )
    return pd.concat(weeks, ignore_index=True)


@pytest.fixture
def windows(spec: UseCaseSpec, labelled: pd.DataFrame) -> list[WindowPerformance]:
    return performance_by_window(spec, labelled, WEEK, START, START + WEEKS * WEEK, n_boot=100)


def test_each_window_has_calibration_and_alert_rate_with_intervals(windows, labelled):
    assert [w.judged for w in windows] == [i != FEW for i in range(WEEKS)]
    misses = 0
    for i, window in enumerate(windows):
        rows = labelled[(labelled["time"] >= window.start) & (labelled["time"] < window.end)]
        assert window.alert_rate == pytest.approx((rows["label"] == "yes").mean())
        observed_expected = rows["outcome"].sum() / rows["probability"].sum()
        assert window.observed_expected == pytest.approx(observed_expected)
        for name in ("alert_rate", "observed_expected", "calibration_slope", "ece", "roc_auc"):
            low, high = getattr(window, f"{name}_ci")
            assert low <= getattr(window, name) <= high, (i, name)
        if i not in (SHIFTED, FEW):  # calibrated: O/E and slope of 1 are plausible
            for name in ("observed_expected", "calibration_slope"):
                low, high = getattr(window, f"{name}_ci")
                misses += not low < 1 < high
    # Eight 95% intervals on calibrated weeks: one may miss 1 by chance, not more.
    assert misses <= 1
    # Three times the odds: more outcomes than predicted, and the interval says so.
    assert windows[SHIFTED].observed_expected_ci[0] > 1.3
    # The alert rate's interval counts patients, not rows: two rows per patient widen it.
    width = windows[0].alert_rate_ci[1] - windows[0].alert_rate_ci[0]
    assert width > 2 * 1.96 * np.sqrt(0.3 * 0.7 / windows[0].n)


def test_each_figure_draws_its_floor_or_ideal_and_marks_the_windows(spec, windows):
    expected_lines = {
        "roc_auc": {FLOORS["min_roc_auc"]},
        "sensitivity": {FLOORS["min_sensitivity"]},
        "alert_rate": {BUDGET / 100},
        "observed_expected": {1.0},
        "calibration_slope": {1.0},
        "ece": {FLOORS["max_ece"]},
    }
    for key, values in expected_lines.items():
        figure = performance_report.metric_figure(spec, windows, key)
        [ax] = figure.axes
        dashed = {
            round(float(line.get_ydata()[0]), 6)
            for line in ax.get_lines()
            if line.get_linestyle() == "--"
        }
        assert dashed == values, key
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert "judged" in legend and any(t.startswith("not judged") for t in legend), key
        if key == "ece":  # the shifted week is drawn as breaking the ceiling
            assert "broke its floor" in legend
    budget = [
        t.get_text()
        for t in performance_report.metric_figure(spec, windows, "alert_rate")
        .axes[0]
        .get_legend()
        .get_texts()
    ]
    assert f"alert budget {BUDGET} per 100 patients (over 30 days)" in budget


def test_the_report_holds_every_figure_and_the_numbers_and_nothing_of_a_patient(
    spec, windows, labelled, tmp_path
):
    path = performance_report.write_report(spec, windows, tmp_path / "run", model_version="7")

    assert path == tmp_path / "run" / "performance.html"
    text = path.read_text(encoding="utf-8")
    for key in ("roc_auc", "sensitivity", "alert_rate", "observed_expected", "calibration_slope"):
        found = re.search(rf'<figure id="{key}"><img src="data:image/png;base64,([^"]+)"', text)
        assert found is not None, key
        assert base64.b64decode(found.group(1)).startswith(_PNG), key
    assert '<figure id="ece">' in text
    # The floors, in words, and the table: one row per window with the numbers.
    assert "AUROC at least 0.65, sensitivity at least 0.45, ECE at most 0.05" in text
    assert text.count("<tr") == len(windows) + 1
    shifted = windows[SHIFTED]
    low, high = shifted.observed_expected_ci
    assert f"{shifted.observed_expected:.3f} [{low:.3f}, {high:.3f}]" in text
    low, high = shifted.roc_auc_ci
    assert f"{shifted.roc_auc:.3f} [{low:.3f}, {high:.3f}]" in text
    assert f"ece {shifted.ece:.3f} &gt; 0.05" in text
    assert text.count('class="not-judged"') == 1
    assert "model version 7" in text
    # Self-contained: no script, nothing fetched from elsewhere.
    assert "<script" not in text and "http://" not in text and "https://" not in text
    # Aggregates only: no request id or patient pseudonym.
    for value in [*labelled["request_id"].iloc[::97], *labelled["patient"].iloc[::97]]:
        assert value not in text


def test_the_job_writes_and_records_the_report(spec, windows, labelled, tmp_path):
    settings = Settings(home=tmp_path / "home", pseudonym_key="test-key")
    target = tmp_path / "run"

    path = job._performance_report(spec, settings, windows, labelled, target, "7")

    assert path == target / performance_report.REPORT_FILE and path.is_file()
    assert job._performance_report(spec, settings, [], None, tmp_path / "empty", "7") is None
    verdict = job.drift.DriftVerdict(
        usecase=spec.name,
        drift=False,
        drifted_share=0.0,
        drift_share_threshold=0.5,
        reference_rows=100,
        current_rows=100,
    )
    result = job.MonitorResult("run1", verdict, windows, out_dir=target, performance_html=path)
    assert f"performance over time: {path}" in result.lines()
    job._write(result)
    document = json.loads((target / job.VERDICT_FILE).read_text())
    assert document["performance_html"] == str(path)
    recorded = document["performance"][SHIFTED]
    assert recorded["observed_expected"] == pytest.approx(windows[SHIFTED].observed_expected)
    assert recorded["alert_rate_ci"] == pytest.approx(list(windows[SHIFTED].alert_rate_ci))


@pytest.mark.slow
def test_windows_go_to_the_evidently_workspace_once_each(spec, windows, labelled, tmp_path):
    from evidently.ui.workspace import Workspace

    workspace = tmp_path / "evidently"
    added = performance_report.add_to_workspace(spec, labelled, windows, workspace)
    again = performance_report.add_to_workspace(spec, labelled, windows, workspace)

    assert added == again == WEEKS  # every window has both outcomes
    ws = Workspace.create(str(workspace))
    [project] = ws.search_project(performance_report.project_name(spec))
    stored = [ws.get_run(project.id, run) for run in ws.list_runs(project.id)]
    # A window judged again replaces its snapshot rather than adding a second one.
    starts = sorted(s.metadata["window_start"] for s in stored)
    assert starts == [w.start.isoformat() for w in windows]
    assert all(performance_report.SNAPSHOT_TAG in s.tags for s in stored)
    assert len(project.dashboard.model().panels) >= 4
