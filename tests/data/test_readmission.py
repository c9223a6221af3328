"""The readmission cohort: determinism, realism checks, label consistency, stationarity,
the exactness of ``true_risk``, deaths, missing labs, shifts, Feast PIT."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clinml.features.datasets.readmission import CREATININE_MG_DL_TO_UMOL_L, SITES, Shift, generate
from clinml.spec import load_spec
from tests.conftest import PROJECT_ROOT
from tests.data.point_in_time import assert_point_in_time

END = datetime(2026, 3, 1, tzinfo=UTC)
WINDOW_START = pd.Timestamp(END) - pd.Timedelta(days=24 * 365.25 / 12)
LARGE = 60_000  # patients simulated for the statistical checks: about 120 000 encounters


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return generate(n_patients=6000, seed=3, end=END)


@pytest.fixture(scope="module")
def large() -> pd.DataFrame:
    return generate(n_patients=LARGE, seed=8, end=END)


def quarter(frame: pd.DataFrame) -> pd.Series:
    """Quarter of the 24-month window (0-7) in which each encounter was discharged."""
    days = (frame["event_timestamp"] - WINDOW_START).dt.total_seconds() / 86_400
    return (days // (365.25 / 4)).clip(upper=7).astype(int)


def labelled(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``true_risk`` and the outcome (1 = readmitted) of the rows whose label is known."""
    known = frame[frame["readmitted_30d"].notna()]
    return known["true_risk"].to_numpy(), (known["readmitted_30d"] == "yes").to_numpy(float)


@pytest.fixture(scope="module")
def spec():
    return load_spec(PROJECT_ROOT / "configs" / "readmission.yaml")


def test_same_seed_same_cohort_other_seed_other_cohort() -> None:
    a, b = generate(300, seed=9, end=END), generate(300, seed=9, end=END)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(300, seed=10, end=END)["heart_rate"].equals(a["heart_rate"])


def test_cohort_has_repeated_encounters_and_a_realistic_label_rate(cohort: pd.DataFrame) -> None:
    per_patient = cohort.groupby("patient_id").size()
    # Of the 6000 simulated patients, those arriving in the burn-in whose last encounter
    # came before the window have none in it: about half have one.
    assert 0.4 * 6000 < per_patient.index.size < 0.65 * 6000
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
    """Exactly, once the 365 days lie inside the window; before, burn-in admissions add."""
    full_year = (WINDOW_START + pd.Timedelta(days=365)).to_datetime64()
    sample = cohort[cohort["patient_id"].isin(cohort["patient_id"].unique()[:400])]
    burn_in_counted = 0
    for _, encounters in sample.groupby("patient_id"):
        admits = encounters["admit_time"].sort_values().dt.tz_localize(None).to_numpy()
        in_window = np.array(
            [((admits < a) & (admits >= a - np.timedelta64(365, "D"))).sum() for a in admits]
        )
        got = encounters.sort_values("admit_time")["prior_admissions_365d"].to_numpy()
        late = admits >= full_year
        assert (got[late] == in_window[late]).all()
        assert (got[~late] >= in_window[~late]).all()
        burn_in_counted += int((got[~late] > in_window[~late]).sum())
    assert burn_in_counted > 0  # history starts before the window


def test_true_risk_gives_an_oracle_auroc_no_feature_reaches(cohort: pd.DataFrame) -> None:
    known = cohort[cohort["readmitted_30d"].notna()]
    outcome = known["readmitted_30d"] == "yes"
    oracle = roc_auc_score(outcome, known["true_risk"])
    assert 0.72 < oracle < 0.9
    best_single = max(
        roc_auc_score(outcome, known[c]) for c in ("prior_admissions_365d", "length_of_stay", "age")
    )
    assert best_single < oracle - 0.05


def test_risk_and_history_have_no_trend_over_the_window(large: pd.DataFrame) -> None:
    """New patients and burn-in keep the population near steady state.

    Each quarter holds about 15 000 encounters of 11 000 patients: clustered by patient,
    a quarter's mean true_risk or prior count has a standard error of about 0.9% of
    the mean, so 5% is more than 5 of them, and 6% on a year-on-year ratio about 4.5.
    The window runs March to February, so every fourth quarter is all winter and its
    risk about 5% higher: risk is compared with the same quarter a year later, and with
    the overall mean within 10%. The trend this design removed was 60% in risk and
    several-fold in the prior count.
    """

    def by_quarter(frame: pd.DataFrame) -> pd.DataFrame:
        columns = ["true_risk", "prior_admissions_365d"]
        return frame.groupby(quarter(frame))[columns].mean() / frame[columns].mean()

    means = by_quarter(large)
    assert means.index.tolist() == list(range(8))
    assert (means["prior_admissions_365d"] - 1).abs().max() < 0.05, means
    assert (means["true_risk"] - 1).abs().max() < 0.10, means
    year_on_year = means.iloc[4:].to_numpy() / means.iloc[:4].to_numpy() - 1
    assert np.abs(year_on_year).max() < 0.06, means

    # Without a burn-in, history starts empty at the window's start: the check sees it.
    cold = by_quarter(generate(n_patients=LARGE, seed=8, end=END, burn_in_months=0))
    assert (cold["prior_admissions_365d"] - 1).abs().max() > 0.5


def test_new_patients_arrive_throughout_the_window(large: pd.DataFrame) -> None:
    """First admissions arrive at a constant rate over the 48-month burn-in and the window.

    A patient's first-ever admission has no prior admission; a burn-in patient's first
    encounter in the window almost always has one (it follows an earlier one within a
    year). So first encounters with none count the arrivals: LARGE * 3 / 72 a quarter,
    give or take the binomial 2%.
    """
    first = large.sort_values("admit_time").drop_duplicates("patient_id")
    arrivals = first[first["prior_admissions_365d"] == 0]
    per_quarter = arrivals.groupby(quarter(arrivals)).size()
    expected = LARGE * 3 / (48 + 24)
    assert per_quarter.index.tolist() == list(range(8))
    assert per_quarter.between(0.9 * expected, 1.1 * expected).all(), per_quarter


def test_true_risk_is_the_probability_of_a_readmission_label(large: pd.DataFrame) -> None:
    """Observed readmissions match the summed true_risk, overall and within tenths of it.

    Each label is a Bernoulli draw with probability true_risk given everything before it,
    so observed minus expected has variance sum(p (1 - p)) even though a patient's
    encounters depend on each other: 4 standard errors.
    """
    risk, outcome = labelled(large)
    tenth = pd.qcut(risk, 10, labels=False)
    for rows in [np.ones_like(outcome, dtype=bool)] + [tenth == k for k in range(10)]:
        p, y = risk[rows], outcome[rows]
        standard_error = np.sqrt((p * (1 - p)).sum())
        assert abs(y.sum() - p.sum()) < 4 * standard_error, (p.mean(), y.mean())


def test_some_patients_die_and_then_have_no_encounters(large: pd.DataFrame) -> None:
    known = large["readmitted_30d"].notna()
    assert (large["died_30d"].notna() == known).all()
    died = large["died_30d"] == "yes"
    assert 0.02 < died[known].mean() < 0.05
    assert died.sum() > 1000
    assert (large.loc[died, "readmitted_30d"] == "no").all()  # death comes first
    ordered = large.sort_values(["patient_id", "admit_time"])
    followed = ordered.groupby("patient_id")["admit_time"].shift(-1).notna()
    assert not (followed & (ordered["died_30d"] == "yes")).any()  # the last encounter


def test_labs_go_missing_at_documented_rates_without_changing_the_risk(
    large: pd.DataFrame,
) -> None:
    missing = large[["glucose", "wbc", "haemoglobin"]].isna().mean()
    assert 0.13 < missing["glucose"] < 0.17, missing
    assert 0.065 < missing["wbc"] < 0.095, missing
    assert 0.035 < missing["haemoglobin"] < 0.065, missing
    nullable = ["glucose", "wbc", "haemoglobin", "readmitted_30d", "died_30d"]
    assert large.drop(columns=nullable).notna().all().all()
    # Missing at random on the conditions: diabetics' glucose is nearly always measured.
    by_diabetes = large["glucose"].isna().groupby(large["diabetes"]).mean()
    assert by_diabetes[1] < 0.5 * by_diabetes[0]

    # The same cohort with every lab measured: identical but for the hidden values, so
    # the risk used the true values whether or not they were reported.
    measured = generate(n_patients=3000, seed=8, end=END, shift=Shift(missing_lab_odds_ratio=0.0))
    default = generate(n_patients=3000, seed=8, end=END)
    labs = ["glucose", "wbc", "haemoglobin"]
    assert measured[labs].notna().all().all()
    pd.testing.assert_frame_equal(measured.drop(columns=labs), default.drop(columns=labs))
    observed = default[labs].notna()
    assert ((default[labs] == measured[labs]) | ~observed).all().all()
    assert (~observed).sum().sum() > 0


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
    with pytest.raises(ValueError, match="missing_lab_odds_ratio"):
        Shift(missing_lab_odds_ratio=-1.0)


@pytest.mark.slow
def test_point_in_time_features_never_leak_from_later_encounters(spec, tmp_path: Path) -> None:
    """An encounter sees its own values at discharge and, one second before, the previous
    encounter's (if it is within the spec's TTL), else nothing."""
    raw = generate(n_patients=150, seed=12, end=END)
    assert_point_in_time(
        spec,
        raw,
        END,
        tmp_path,
        exact=("prior_admissions_365d", "heart_rate", "creatinine", "length_of_stay", "site"),
        carried="prior_admissions_365d",
    )
