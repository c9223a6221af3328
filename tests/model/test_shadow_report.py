"""The shadow report: a shadow version's answers paired with the champion's on the same
requests, its agreement, alert rates, score distributions and the gate's paired
comparison on the labelled ones.

The log is made the way the service writes it: each request's champion rows in record
order, and the shadow's rows for the same request (same request id, ``shadow`` true);
some requests have no shadow rows, as when the shadow queue drops them under load.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.errors import ClinmlError
from clinml.monitoring.shadow_report import (
    SMALL_CELL,
    clustered_mean_interval,
    ks_distance,
    pair_answers,
    shadow_report,
)
from clinml.spec import UseCaseSpec

START = datetime(2026, 11, 2, tzinfo=UTC)
END = START + timedelta(days=7)
THRESHOLDS = {"3": 0.3, "4": 0.3}


def _log(
    p_champion: np.ndarray,
    p_shadow: np.ndarray,
    records_per_request: int = 1,
    dropped_every: int = 0,
    patients: int | None = None,
) -> pd.DataFrame:
    """Champion rows (version 3) and shadow rows (version 4) as the service logs them."""
    n = len(p_champion)
    request = np.arange(n) // records_per_request
    patient = [f"ps_{i % (patients or n)}" for i in range(n)]
    time = pd.Timestamp(START) + pd.to_timedelta(np.linspace(0, 6.9 * 86400, n), unit="s")

    def rows(p: np.ndarray, version: str, shadow: bool) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "time": time,
                "request_id": [f"req-{r}" for r in request],
                "model_version": version,
                "patient": patient,
                "probability": p,
                "label": np.where(p >= THRESHOLDS[version], "yes", "no"),
                "shadow": shadow,
            }
        )

    served, mirrored = rows(p_champion, "3", False), rows(p_shadow, "4", True)
    if dropped_every:
        mirrored = mirrored[request % dropped_every != 0]
    # Shadow rows are written later, by another thread: after the champion's.
    return pd.concat([served, mirrored], ignore_index=True)


def _labels(log: pd.DataFrame, outcome: np.ndarray) -> pd.DataFrame:
    served = log[~log["shadow"]]
    return pd.DataFrame(
        {
            "patient": served["patient"].to_numpy(),
            "request_id": served["request_id"].to_numpy(),
            "outcome": outcome,
            "time": served["time"] + timedelta(days=1),
        }
    )


def _report(spec: UseCaseSpec, log: pd.DataFrame, labels: pd.DataFrame | None = None, **kw):
    return shadow_report(
        spec, log, labels, START, END, champion="3", shadow="4", thresholds=THRESHOLDS, **kw
    )


def test_records_are_paired_within_their_request_in_order() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    log = _log(p, p + 0.01, records_per_request=3, dropped_every=2)
    pairs, champion_rows = pair_answers(log, "3", "4")
    assert champion_rows == 6
    assert pairs["request_id"].tolist() == ["req-1"] * 3  # req-0's shadow rows were dropped
    assert np.allclose(pairs["p_shadow"] - pairs["p_champion"], 0.01)
    other = log.assign(model_version=np.where(log["shadow"], "5", "3"))
    assert pair_answers(other, "3", "4")[0].empty  # another shadow version: nothing paired


def test_an_identical_shadow_agrees_everywhere(tiny_spec: UseCaseSpec) -> None:
    rng = np.random.default_rng(1)
    p = rng.beta(2, 5, 2000)
    outcome = (rng.random(2000) < p).astype(int)
    log = _log(p, p.copy(), patients=700)
    report = _report(tiny_spec, log, _labels(log, outcome), n_boot=200)
    assert (report.paired, report.champion_rows, report.patients) == (2000, 2000, 700)
    assert report.agreement == 1.0 and report.shadow_only == report.champion_only == 0
    assert report.alert_rate_difference == 0.0 and report.ks_distance == 0.0
    assert report.comparison is not None and report.comparison.difference == 0.0
    assert report.comparison.verdict == "non-inferior"
    assert report.comparison.labelled == 2000


def test_a_worse_shadow_is_shown_inferior_and_its_extra_alerts_counted(
    tiny_spec: UseCaseSpec,
) -> None:
    rng = np.random.default_rng(2)
    p = rng.beta(2, 5, 4000)
    outcome = (rng.random(4000) < p).astype(int)
    noisy = np.clip(p + rng.normal(0.1, 0.25, 4000), 0, 1)  # ranks worse, alerts more
    log = _log(p, noisy, dropped_every=4)
    report = _report(tiny_spec, log, _labels(log, outcome), n_boot=200)
    assert report.paired == 3000 and report.coverage == pytest.approx(0.75)
    assert report.shadow_only > report.champion_only
    low, high = report.alert_rate_difference_ci
    assert 0 < low < report.alert_rate_difference < high
    assert report.ks_distance > 0.1
    assert report.comparison is not None and report.comparison.difference < -0.05
    assert report.comparison.verdict == "inferior"
    assert report.comparison.labelled == 3000  # only the paired requests are compared


def test_too_few_labelled_outcomes_give_no_comparison_and_say_why(tiny_spec) -> None:
    p = np.linspace(0.05, 0.95, 200)
    log = _log(p, p)
    outcome = np.zeros(200, dtype=int)
    outcome[:3] = 1
    report = _report(tiny_spec, log, _labels(log, outcome))
    assert report.comparison is None
    assert "200 labelled requests with 3 positives" in report.why_no_comparison
    assert "labelled comparison: none (200 labelled" in report.lines()[-1]
    assert _report(tiny_spec, log).why_no_comparison == "no outcomes stored"


def test_a_window_without_shadow_answers_is_a_clear_error(tiny_spec) -> None:
    p = np.linspace(0.05, 0.95, 20)
    served_only = _log(p, p).query("not shadow")
    with pytest.raises(ClinmlError, match="is the shadow on"):
        _report(tiny_spec, served_only)


def test_the_clustered_interval_is_the_usual_one_for_one_row_per_patient_and_wider_for_repeats():
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 1.0, 400)
    low, high = clustered_mean_interval(values, np.arange(400))
    se = values.std(ddof=1) / math.sqrt(400)
    assert (high - low) / 2 == pytest.approx(1.959964 * se, rel=1e-6)
    repeated = np.repeat(values[:100], 4)  # each patient's four rows identical
    low4, high4 = clustered_mean_interval(repeated, np.repeat(np.arange(100), 4))
    naive = repeated.std(ddof=1) / math.sqrt(400)
    assert (high4 - low4) / 2 > 1.8 * 1.959964 * naive  # about twice: 100 patients, not 400


def test_ks_distance() -> None:
    assert ks_distance(np.array([0.1, 0.2]), np.array([0.1, 0.2])) == 0.0
    assert ks_distance(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0


def test_the_report_files_hold_aggregates_only(tiny_spec, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    p = rng.beta(2, 5, 600)
    log = _log(p, np.clip(p * 1.1, 0, 1))
    log.loc[0, "probability"] = 0.987654  # a lone record in its histogram cell
    report = _report(tiny_spec, log)
    data, page = report.write(tmp_path / "shadow")
    document = json.loads(data.read_text())
    assert document["paired"] == 600 and document["comparison"] is None
    counts = np.array(document["histogram"]["counts"])
    assert counts.sum() < 600 and ((counts == 0) | (counts >= SMALL_CELL)).all()
    text = page.read_text()
    assert "<script" not in text and "req-1" not in text and "ps_1" not in text
    assert "0.987654" not in text and "data:image/png;base64," in text
