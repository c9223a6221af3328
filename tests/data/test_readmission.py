"""The readmission cohort: determinism, realism checks, label consistency, shifts, Feast PIT."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clinml.settings import Paths
from clinml.spec import load_spec
from features import ingest
from features import store as feature_store
from features.datasets.readmission import CREATININE_MG_DL_TO_UMOL_L, SITES, Shift, generate
from tests.conftest import PROJECT_ROOT, PSEUDONYMISER

END = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return generate(n_patients=6000, seed=3, end=END)


@pytest.fixture(scope="module")
def spec():
    return load_spec(PROJECT_ROOT / "configs" / "readmission.yaml")


def test_same_seed_same_cohort_other_seed_other_cohort() -> None:
    a, b = generate(300, seed=9, end=END), generate(300, seed=9, end=END)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(300, seed=10, end=END)["heart_rate"].equals(a["heart_rate"])


def test_cohort_has_repeated_encounters_and_a_realistic_label_rate(cohort: pd.DataFrame) -> None:
    per_patient = cohort.groupby("patient_id").size()
    assert per_patient.index.size == 6000
    assert (per_patient >= 2).mean() > 0.6  # most patients have several encounters
    known = cohort["readmitted_30d"].notna()
    rate = (cohort.loc[known, "readmitted_30d"] == "yes").mean()
    assert 0.10 <= rate <= 0.20
    span = cohort["event_timestamp"].max() - cohort["admit_time"].min()
    assert timedelta(days=700) < span <= timedelta(days=731)


def test_sites_have_different_case_mixes(cohort: pd.DataFrame) -> None:
    by_site = cohort.groupby("site").agg(
        age=("age", "mean"), copd=("copd", "mean"), dm=("diabetes", "mean")
    )
    assert sorted(by_site.index) == SITES
    assert by_site["age"].idxmax() == "hosp_c" and by_site["age"].idxmin() == "hosp_d"
    assert by_site["copd"].idxmax() == "hosp_c" and by_site["dm"].idxmax() == "hosp_d"


def test_labels_are_known_30_days_after_discharge_and_agree_with_the_history(
    cohort: pd.DataFrame,
) -> None:
    assert (cohort["label_timestamp"] - cohort["event_timestamp"] == timedelta(days=30)).all()
    unknown = cohort["readmitted_30d"].isna()
    assert (unknown == (cohort["label_timestamp"] > pd.Timestamp(END))).all()
    ordered = cohort.sort_values(["patient_id", "admit_time"])
    next_admit = ordered.groupby("patient_id")["admit_time"].shift(-1)
    readmitted_in_data = (next_admit - ordered["event_timestamp"]) <= timedelta(days=30)
    known = ordered["readmitted_30d"].notna()
    said_yes = ordered["readmitted_30d"] == "yes"
    # "no" always means no admission within 30 days; "yes" means one is recorded, or
    # the readmission is still in progress at the end of the window (no discharge yet,
    # so not in the extract).
    assert not (known & ~said_yes & readmitted_in_data).any()
    in_progress = known & said_yes & next_admit.isna()
    assert (known & said_yes & ~readmitted_in_data & ~in_progress).sum() == 0
    assert in_progress.sum() < 0.01 * known.sum()


def test_prior_admissions_count_the_365_days_before_each_admission(cohort: pd.DataFrame) -> None:
    sample = cohort[cohort["patient_id"].isin(cohort["patient_id"].unique()[:400])]
    for _, encounters in sample.groupby("patient_id"):
        admits = encounters["admit_time"].sort_values().to_numpy()
        expected = [
            int(((admits < a) & (admits >= a - np.timedelta64(365, "D"))).sum()) for a in admits
        ]
        got = encounters.sort_values("admit_time")["prior_admissions_365d"].tolist()
        assert got == expected


def test_true_risk_gives_an_oracle_auroc_no_feature_reaches(cohort: pd.DataFrame) -> None:
    known = cohort[cohort["readmitted_30d"].notna()]
    outcome = known["readmitted_30d"] == "yes"
    oracle = roc_auc_score(outcome, known["true_risk"])
    assert 0.72 < oracle < 0.9
    best_single = max(
        roc_auc_score(outcome, known[c]) for c in ("prior_admissions_365d", "length_of_stay", "age")
    )
    assert best_single < oracle - 0.05


def test_shifts_change_what_they_say_and_nothing_else() -> None:
    base = generate(2000, seed=4, end=END)
    umol = generate(2000, seed=4, end=END, shift=Shift(creatinine_unit="umol/L"))
    ratio = umol["creatinine"] / base["creatinine"]
    assert ratio.between(CREATININE_MG_DL_TO_UMOL_L * 0.98, CREATININE_MG_DL_TO_UMOL_L * 1.02).all()
    pd.testing.assert_frame_equal(base.drop(columns="creatinine"), umol.drop(columns="creatinine"))

    sites = generate(2000, seed=4, end=END, shift=Shift(site_weights=(0.05, 0.05, 0.1, 0.8)))
    assert (sites["site"] == "hosp_d").mean() > 0.7 > (base["site"] == "hosp_d").mean()

    winter = generate(2000, seed=4, end=END, shift=Shift(winter_case_mix=1.0))
    assert winter["copd"].mean() > base["copd"].mean() + 0.1
    assert winter["resp_rate"].mean() > base["resp_rate"].mean()

    def rate(frame: pd.DataFrame) -> float:
        return (frame["readmitted_30d"].dropna() == "yes").mean()

    assert (
        rate(generate(2000, seed=4, end=END, shift=Shift(label_odds_ratio=2.5))) > rate(base) + 0.05
    )
    with pytest.raises(ValueError, match="creatinine_unit"):
        Shift(creatinine_unit="mmol/L")


@pytest.mark.slow
def test_point_in_time_features_never_leak_from_later_encounters(spec, tmp_path: Path) -> None:
    """An encounter sees its own values at discharge and the previous encounter's just before."""
    raw = generate(n_patients=150, seed=12, end=END)
    paths = Paths(tmp_path).usecase(spec.name)
    ingest.run(spec, paths, END, PSEUDONYMISER, frame=raw)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)

    pseudonyms = dict(zip(raw["patient_id"], PSEUDONYMISER.many(raw["patient_id"]), strict=True))
    events = pd.DataFrame(
        {
            "patient_id": raw["patient_id"].map(pseudonyms),
            "event_timestamp": raw["event_timestamp"],
            "readmitted_30d": raw["readmitted_30d"],
        }
    )
    at_discharge = feature_store.training_frame(store, spec, events)
    for column in ("prior_admissions_365d", "heart_rate", "creatinine", "length_of_stay", "site"):
        assert (at_discharge[column].to_numpy() == raw[column].to_numpy()).all(), column

    # One second before discharge the encounter is not known yet: the previous one is
    # (if it is within the 14-day TTL), else nothing.
    before = feature_store.training_frame(
        store, spec, events.assign(event_timestamp=events["event_timestamp"] - timedelta(seconds=1))
    )
    ordered = raw.assign(row=range(len(raw))).sort_values(["patient_id", "event_timestamp"])
    previous = ordered.groupby("patient_id")[["event_timestamp", "prior_admissions_365d"]].shift(1)
    previous.index = ordered["row"]
    previous = previous.sort_index()
    within_ttl = (raw["event_timestamp"] - previous["event_timestamp"]) <= timedelta(days=14)
    got = before["prior_admissions_365d"]
    assert (
        got[within_ttl].tolist()
        == previous.loc[within_ttl, "prior_admissions_365d"].astype(int).tolist()
    )
    assert got[~within_ttl].isna().all()
    assert (~within_ttl).sum() > 0 and within_ttl.sum() > 0
