"""The drift verdict: quiet on data like the reference, loud on shifted data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.errors import ClinmlError
from clinml.monitoring import drift
from clinml.spec import UseCaseSpec
from tests.conftest import make_tiny_frame

pytestmark = pytest.mark.slow  # imports Evidently


@pytest.fixture(scope="module")
def reference():
    return make_tiny_frame(n=800, seed=100)


def test_an_unshifted_batch_shows_no_drift(
    tiny_spec: UseCaseSpec, reference, tmp_path: Path
) -> None:
    verdict = drift.run(tiny_spec, reference, make_tiny_frame(n=200, seed=101), tmp_path)
    assert not verdict.drift
    assert verdict.exit_code == 0
    assert verdict.line().startswith("no drift:")
    assert {f.feature for f in verdict.features} == {"heart_rate", "creatinine", "ward"}


# A constant column (every ward "icu") makes Evidently's correlation summary divide by zero.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_a_shifted_batch_shows_drift(tiny_spec: UseCaseSpec, reference, tmp_path: Path) -> None:
    shifted = make_tiny_frame(n=200, seed=102)
    shifted["creatinine"] *= 88.4  # the lab switched to µmol/L (clipped to the allowed max below)
    shifted["creatinine"] = shifted["creatinine"].clip(upper=20)
    shifted["ward"] = "icu"
    verdict = drift.run(tiny_spec, reference, shifted, tmp_path)
    assert verdict.drift
    assert verdict.exit_code == 1
    assert {f.feature for f in verdict.drifted_features} == {"creatinine", "ward"}
    assert verdict.drifted_share == pytest.approx(2 / 3)
    assert verdict.line().startswith(
        "DRIFT: 2 of 3 features drifted (67%), at or above the alert share of 50%"
    )

    written = json.loads((tmp_path / drift.JSON_FILE).read_text())
    assert written["drift"] is True
    assert sorted(written["drifted_features"]) == ["creatinine", "ward"]
    by_name = {f["feature"]: f for f in written["features"]}
    assert (by_name["creatinine"]["method"], by_name["creatinine"]["score_kind"]) == (
        "ks",
        "p_value",
    )
    assert by_name["creatinine"]["score"] < by_name["creatinine"]["threshold"] == 0.05
    assert (by_name["ward"]["method"], by_name["ward"]["score_kind"]) == ("chisquare", "p_value")
    html = (tmp_path / drift.HTML_FILE).read_text()
    assert "<html" in html.lower() and len(html) > 10_000


def test_one_feature_far_past_bonferroni_alerts_below_the_drift_share(
    tiny_spec: UseCaseSpec, reference, tmp_path: Path
) -> None:
    shifted = make_tiny_frame(n=200, seed=103).assign(ward="icu")  # one of three features
    verdict = drift.run(tiny_spec, reference, shifted, tmp_path)
    assert verdict.drifted_share < tiny_spec.monitoring.drift_share
    [ward] = [f for f in verdict.features if f.feature == "ward"]
    assert ward.score < verdict.thresholds["overall_p"] and ward.severity == "high"
    assert verdict.drift and verdict.alerts == ["data_drift", "subgroup_drift"]
    assert verdict.exit_code == 1


def test_bonferroni_thresholds_shrink_with_the_number_of_tests(
    tiny_spec: UseCaseSpec, reference, tmp_path: Path
) -> None:
    verdict = drift.run(tiny_spec, reference, make_tiny_frame(n=200, seed=101), tmp_path)
    alpha, features = tiny_spec.monitoring.family_alpha, len(tiny_spec.features)
    tested = len(verdict.subgroups)
    share = alpha / 2 if tested else alpha
    assert verdict.thresholds["overall_p"] == pytest.approx(share / (features + 1))
    if tested:
        assert verdict.thresholds["subgroup_p"] == pytest.approx(alpha / 2 / (tested * features))
    assert verdict.exit_code == 0 and verdict.alerts == []


def test_a_batch_without_the_features_is_an_error(
    tiny_spec: UseCaseSpec, reference, tmp_path: Path
) -> None:
    with pytest.raises(
        ClinmlError, match="the window lacks 1 of the 3 feature columns: heart_rate"
    ):
        drift.run(tiny_spec, reference, reference.drop(columns=["heart_rate"]), tmp_path)
    with pytest.raises(ClinmlError, match="the window has no records"):
        drift.run(tiny_spec, reference, reference.head(0), tmp_path)


def test_the_verdict_without_reports_matches_the_evidently_reports(
    tiny_spec: UseCaseSpec, reference, tmp_path: Path
) -> None:
    """write=False computes the tests directly; the numbers equal the reports' own."""
    shifted = make_tiny_frame(n=200, seed=104)
    shifted.loc[:20, "creatinine"] = 99.0  # out of the declared range, and drifted
    shifted.loc[:5, "heart_rate"] = None
    with_reports = drift.run(tiny_spec, reference, shifted, tmp_path / "a")
    direct = drift.run(tiny_spec, reference, shifted, tmp_path / "b", write=False)
    assert not (tmp_path / "b").exists()
    assert [(f.feature, f.method, f.drifted, f.severity) for f in direct.features] == [
        (f.feature, f.method, f.drifted, f.severity) for f in with_reports.features
    ]
    for a, b in zip(direct.features, with_reports.features, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-9, abs=1e-12)
    assert direct.quality == with_reports.quality
    assert {q.feature for q in direct.quality} >= {"creatinine"}
    assert direct.alerts == with_reports.alerts


def test_every_missing_column_is_named_not_only_the_first_five(pathology_spec) -> None:
    names = pathology_spec.feature_names
    frame = pd.DataFrame({name: [1.0] for name in names[7:]})
    with pytest.raises(ClinmlError) as raised:
        drift._check_columns(frame, pathology_spec, "the batch")
    message = str(raised.value)
    assert f"lacks 7 of the {len(names)} feature columns" in message
    assert all(name in message for name in names[:7])


def test_the_verdict_line_names_the_per_feature_rule_when_it_fired() -> None:
    """One feature far past the Bonferroni level alerts although the share of drifted
    features is below the share rule: the line must say which rule fired."""
    features = [
        drift.FeatureDrift("creatinine", "ks", 1e-9, "p_value", 0.05, True, "high"),
        *(drift.FeatureDrift(f"f{i}", "ks", 0.6, "p_value", 0.05, False, "none") for i in range(6)),
    ]
    verdict = drift.DriftVerdict(
        usecase="tiny",
        drift=True,
        drifted_share=1 / 7,
        drift_share_threshold=0.5,
        reference_rows=100,
        current_rows=100,
        features=features,
    )
    line = verdict.line()
    assert line.startswith("DRIFT: creatinine beyond the per-feature alert level")
    assert "1 of 7 features drifted (14%); the share rule alerts at 50%" in line


def test_a_column_without_any_value_is_bad_input_or_a_quality_issue(
    tiny_spec: UseCaseSpec, reference, tmp_path: Path
) -> None:
    """It crashed Evidently ("An empty column ... was provided") with a traceback."""
    empty = make_tiny_frame(n=200, seed=103).assign(creatinine=float("nan"))
    with pytest.raises(ClinmlError, match="creatinine column holds no value at all"):
        drift.run(tiny_spec, reference, empty, tmp_path / "required")
    features = [
        c.model_copy(update={"nullable": True}) if c.name == "creatinine" else c
        for c in tiny_spec.features
    ]
    nullable = tiny_spec.model_copy(update={"features": features})
    verdict = drift.run(nullable, reference, empty, tmp_path / "nullable")
    assert "creatinine" not in {f.feature for f in verdict.features}
    assert {f.feature for f in verdict.features} == {"heart_rate", "ward"}
    [issue] = [q for q in verdict.quality if q.feature == "creatinine"]
    assert issue.severity == "high" and "no value at all" in issue.reason
    assert "data_quality" in verdict.alerts


def _monitoring(spec: UseCaseSpec, **changes) -> UseCaseSpec:
    return spec.model_copy(update={"monitoring": spec.monitoring.model_copy(update=changes)})


def test_a_patients_repeated_rows_are_not_extra_evidence(tiny_spec, tmp_path) -> None:
    """150 patients with 30 encounters each (ward and site repeat on every one): the tests
    count 150 patients, not 4 500 rows, so chance differences between those patients and
    the reference do not alert (they did: chi-square on 4 500 rows)."""
    spec = _monitoring(tiny_spec, categorical_floor=0.001, numeric_floor=0.001)  # tests alone
    reference = make_tiny_frame(n=4000, seed=100)
    patients = make_tiny_frame(n=150, seed=105)
    window = patients.loc[patients.index.repeat(30)].reset_index(drop=True)
    verdict = drift.run(spec, reference, window, tmp_path, write=False)
    assert not verdict.drift and verdict.exit_code == 0, verdict.line()
    assert verdict.window_patients == pytest.approx(150)
    once = drift.run(spec, reference, patients, tmp_path, write=False)
    for repeated, single in zip(verdict.features, once.features, strict=True):
        assert repeated.feature == single.feature
        assert repeated.score == pytest.approx(single.score, rel=0.05, abs=1e-4)


def test_a_change_below_the_floor_never_alerts_however_large_the_window(
    tiny_spec, tmp_path
) -> None:
    """20 000 rows a side: a 0.08 SD move of heart rate and 6 in 100 records moving ward are
    far past Bonferroni but below the floors (0.2 SD, 0.1): reported, never alerted."""
    reference = make_tiny_frame(n=20_000, seed=100)
    window = make_tiny_frame(n=20_000, seed=106)
    window["heart_rate"] += 0.08 * reference["heart_rate"].std()
    moved = window.index[window["ward"] == "medical"][:1200]
    window.loc[moved, "ward"] = "icu"
    verdict = drift.run(tiny_spec, reference, window, tmp_path, write=False, subgroups=False)
    assert not verdict.drift and verdict.exit_code == 0, verdict.line()
    by_name = {f.feature: f for f in verdict.features}
    for name in ("heart_rate", "ward"):
        assert by_name[name].score < verdict.thresholds["overall_p"]  # a p-value alone alerts
        assert by_name[name].effect < by_name[name].floor
        assert by_name[name].severity == "none"
    assert verdict.line().startswith("no drift:")


def test_a_small_quiet_window_is_not_enough_data_but_a_large_change_still_alerts(
    tiny_spec, tmp_path
) -> None:
    spec = _monitoring(tiny_spec, min_patients=None)  # the default: from the floors
    reference = make_tiny_frame(n=2000, seed=100)
    quiet = drift.run(spec, reference, make_tiny_frame(n=120, seed=107), tmp_path, write=False)
    assert quiet.min_patients > 120 and not quiet.enough_data
    assert quiet.exit_code == 0
    assert quiet.line().startswith("not enough data: 120 patients in the window, the drift ")
    shifted = make_tiny_frame(n=120, seed=107).assign(ward="icu")
    loud = drift.run(spec, reference, shifted, tmp_path, write=False)
    assert loud.drift and loud.exit_code == 1 and loud.line().startswith("DRIFT")


def test_a_seasonal_reference_compares_a_winter_window_with_winter(tiny_spec, tmp_path) -> None:
    from datetime import UTC, datetime

    reference = make_tiny_frame(n=6000, seed=100)
    reference[drift.WEEK_COLUMN] = np.resize(np.arange(1, 53), len(reference))
    winter = reference[drift.WEEK_COLUMN].isin([*range(48, 53), *range(1, 10)])
    reference.loc[winter, "heart_rate"] += 15  # winters run faster hearts
    window = make_tiny_frame(n=400, seed=108)
    window["heart_rate"] += 15
    january = (datetime(2026, 1, 12, tzinfo=UTC), datetime(2026, 1, 19, tzinfo=UTC))

    whole, _, note = drift.choose_reference(tiny_spec, reference, january)
    assert len(whole) == len(reference) and note == f"training reference: {len(reference):,} rows"
    assert drift.run(tiny_spec, whole, window, tmp_path, write=False).drift  # winter vs year

    seasonal = _monitoring(tiny_spec, reference="seasonal", season_weeks=2)
    rows, _, note = drift.choose_reference(seasonal, reference, january)
    assert set(rows[drift.WEEK_COLUMN]) == {1, 2, 3, 4, 5, 6}  # weeks 3 and 4, two either side
    assert "weeks 3–4 ±2" in note
    verdict = drift.run(seasonal, rows, window, tmp_path, write=False, reference_note=note)
    assert not verdict.drift, verdict.line()

    # Without weeks (a champion trained before they were recorded), it says so.
    _, _, note = drift.choose_reference(
        seasonal, reference.drop(columns=drift.WEEK_COLUMN), january
    )
    assert "the reference has no weeks" in note


def test_a_population_restricts_the_reference_to_the_hospital_served(tiny_spec, tmp_path) -> None:
    reference = make_tiny_frame(n=4000, seed=100)
    north = reference["site"] == "north"
    reference.loc[north, "ward"] = np.where(np.arange(north.sum()) % 4 == 0, "medical", "icu")
    window = make_tiny_frame(n=600, seed=109).assign(site="north")
    window["ward"] = np.where(np.arange(len(window)) % 4 == 0, "medical", "icu")

    assert drift.run(tiny_spec, reference, window, tmp_path, write=False).drift
    served = _monitoring(tiny_spec, population={"site": ["north"]})
    rows, _, note = drift.choose_reference(served, reference)
    assert (rows["site"] == "north").all() and "site in north" in note
    verdict = drift.run(served, rows, window, tmp_path, write=False)
    assert not verdict.drift, verdict.line()


def test_a_rolling_reference_is_the_prediction_log_before_the_window(tiny_spec, tmp_path) -> None:
    from datetime import UTC, datetime, timedelta

    from clinml.monitoring.job import _reference
    from clinml.serving.requestlog import PredictionLog

    rolling = _monitoring(tiny_spec, reference="rolling", rolling_days=28)
    training = make_tiny_frame(n=2000, seed=100)
    since = datetime(2026, 11, 1, tzinfo=UTC)
    window = (since, since + timedelta(days=7))

    # An empty log: the training rows, and the run says why.
    rows, _, note = _reference(rolling, training, None, tmp_path / "log", window, "1")
    assert len(rows) == len(training)
    assert "fewer than the 50 a rolling reference needs" in note

    before = make_tiny_frame(n=300, seed=110)
    logged = before[["heart_rate", "creatinine", "ward"]].assign(
        heart_rate=before["heart_rate"] + 15,  # the service's recent weeks, not training's
        time=[since - timedelta(hours=2 * i + 1) for i in range(len(before))],
        request_id=[f"r{i}" for i in range(len(before))],
        model_version="1",
        patient=[f"ps_{i:04d}" for i in range(len(before))],
        probability=0.3,
        label="no",
    )
    log = PredictionLog(tmp_path / "log")
    log.record(logged.to_dict("records"))
    log.close()
    rows, held, note = _reference(rolling, training, None, tmp_path / "log", window, "1")
    assert len(rows) == len(logged) and note.startswith("prediction log of 2026-10-04..")
    assert held is not None and len(held) == len(logged)

    current = make_tiny_frame(n=300, seed=111)
    current["heart_rate"] += 15
    assert drift.run(tiny_spec, training, current, tmp_path, write=False).drift
    assert not drift.run(rolling, rows, current, tmp_path, write=False).drift


def test_a_batch_is_placed_in_time_by_its_own_timestamps(tiny_spec) -> None:
    """A --batch file has no --since/--until: a seasonal reference takes its weeks from the
    records' own times (it fell back to the whole year)."""
    from clinml.monitoring.job import _batch_span

    batch = make_tiny_frame(n=50, seed=112)
    start, end = _batch_span(tiny_spec, batch)
    assert (start, end) == (batch["event_timestamp"].min(), batch["event_timestamp"].max())
    assert _batch_span(tiny_spec, batch.drop(columns="event_timestamp")) == (None, None)
