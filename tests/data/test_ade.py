"""The ``ade`` pharmacy extract: determinism, size and rates, the spec's ranges, the
point-in-time prior-event count, the exactness of ``true_risk``, the published risk
factors' directions, missing labs, shifts, Feast point in time."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clinml.features.datasets import LOADERS
from clinml.features.datasets.ade import DRUG_CLASSES, SETTINGS, Shift, generate
from clinml.spec import load_spec
from tests.conftest import NOW
from tests.data.point_in_time import assert_point_in_time

END = pd.Timestamp(NOW).normalize()  # the loader ends its extract at the start of NOW's day
WINDOW_START = END - pd.Timedelta(days=24 * 365.25 / 12)
HIGH_RISK = ["anticoagulant", "insulin", "antiplatelet", "oral_hypoglycaemic"]  # Budnitz 2011


@pytest.fixture(scope="module")
def spec():
    return load_spec("ade")


@pytest.fixture(scope="module")
def cohort(spec) -> pd.DataFrame:
    """The spec's own extract (about 120 000 prescriptions; about a second to generate)."""
    return LOADERS["ade"](spec.source.seed, NOW, **spec.source.options)


@pytest.fixture(scope="module")
def labelled(cohort: pd.DataFrame) -> pd.DataFrame:
    return cohort[cohort["ade_30d"].notna()].assign(event=lambda f: f["ade_30d"] == "yes")


def quarter(frame: pd.DataFrame) -> pd.Series:
    """Quarter of the 24-month window (0-7) in which each drug was prescribed."""
    days = (frame["event_timestamp"] - WINDOW_START).dt.total_seconds() / 86_400
    return (days // (365.25 / 4)).clip(upper=7).astype(int)


def test_same_seed_same_extract_other_seed_other_extract() -> None:
    a, b = generate(500, seed=9, end=END), generate(500, seed=9, end=END)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(500, seed=10, end=END)["egfr"].equals(a["egfr"])


def test_the_spec_default_is_a_large_extract_of_repeat_patients_with_a_rare_label(
    cohort: pd.DataFrame, labelled: pd.DataFrame
) -> None:
    assert len(cohort) >= 100_000
    per_patient = cohort.groupby("patient_id").size()
    assert 10_000 < per_patient.size < 30_000
    assert (per_patient >= 2).mean() > 0.7  # most patients have several new prescriptions
    assert 0.02 <= labelled["event"].mean() <= 0.05
    span = cohort["event_timestamp"].max() - cohort["event_timestamp"].min()
    assert timedelta(days=720) < span <= timedelta(days=731)
    # Each patient's prescriptions have distinct times (one Feast row per patient and time).
    assert not cohort.duplicated(["patient_id", "event_timestamp"]).any()


def test_columns_match_the_spec(spec, cohort: pd.DataFrame) -> None:
    """Every feature and attribute within the spec's range or categories, nulls only where
    the spec allows them: the quality gate would otherwise refuse the built-in data."""
    for column in spec.columns:
        values = cohort[column.name]
        assert column.nullable or values.notna().all(), column.name
        present = values.dropna()
        if column.is_numeric:
            assert present.between(column.min, column.max).all(), column.name
        else:
            assert set(present) <= set(column.categories or ()), column.name
            assert set(present) == set(column.categories or ()), column.name  # all occur
    declared = {c.name: c.categories for c in spec.columns}
    assert declared["drug_class"] == DRUG_CLASSES and declared["care_setting"] == SETTINGS
    for name in spec.identifier_columns:
        assert cohort[name].notna().all()


def test_labels_are_known_30_days_after_the_prescription(cohort: pd.DataFrame) -> None:
    assert (cohort["label_timestamp"] - cohort["event_timestamp"] == timedelta(days=30)).all()
    unknown = cohort["ade_30d"].isna()
    assert (unknown == (cohort["label_timestamp"] > END)).all()
    assert 0.02 < unknown.mean() < 0.06  # the last 30 days of a 24-month window


def test_prior_events_count_only_those_known_before_the_prescription(
    cohort: pd.DataFrame,
) -> None:
    """An event is known 30 days after its prescription: the count at a prescription is the
    patient's events whose label became known in the 365 days before it. Exact once that
    year lies inside the window; before, burn-in events add. A count by prescription time
    (ignoring when the event became known) would differ: the check can tell the two apart.
    """
    patients = cohort["patient_id"].drop_duplicates().iloc[:3000]
    rows = cohort[cohort["patient_id"].isin(patients)].reset_index(drop=True)
    rows = rows.assign(row=np.arange(len(rows)))
    earlier = rows[rows["ade_30d"] == "yes"][["patient_id", "event_timestamp", "label_timestamp"]]
    pairs = rows[["row", "patient_id", "event_timestamp"]].merge(
        earlier, on="patient_id", suffixes=("", "_prior")
    )
    now = pairs["event_timestamp"]
    known = (pairs["label_timestamp"] <= now) & (pairs["label_timestamp"] > now - timedelta(365))
    by_prescription = (pairs["event_timestamp_prior"] < now) & (
        pairs["event_timestamp_prior"] > now - timedelta(365)
    )

    def count(mask: pd.Series) -> np.ndarray:
        return pairs[mask].groupby("row").size().reindex(rows["row"], fill_value=0).to_numpy()

    expected, naive = count(known), count(by_prescription)
    got = rows["prior_ades_365d"].to_numpy()
    late = (rows["event_timestamp"] >= WINDOW_START + timedelta(days=365 + 30)).to_numpy()
    np.testing.assert_array_equal(got[late], expected[late])
    assert (got[~late] >= expected[~late]).all()
    assert (got[~late] > expected[~late]).sum() > 0  # history starts before the window
    assert (naive[late] != expected[late]).sum() > 20  # events of the last 30 days not yet known


def test_true_risk_gives_an_oracle_auroc_no_single_feature_reaches(labelled: pd.DataFrame) -> None:
    oracle = roc_auc_score(labelled["event"], labelled["true_risk"])
    assert 0.72 < oracle < 0.85
    best_single = max(
        roc_auc_score(labelled["event"], labelled[c])
        for c in ("age", "concurrent_medications", "interacting_pairs", "prior_ades_365d")
    )
    assert best_single < oracle - 0.05


def test_true_risk_is_the_probability_of_an_event(labelled: pd.DataFrame) -> None:
    """Observed events match the summed true_risk, overall and within tenths of it: each
    label is a Bernoulli draw given everything before it, so observed minus expected has
    variance sum(p (1 - p)) however a patient's prescriptions depend on each other."""
    risk, outcome = labelled["true_risk"].to_numpy(), labelled["event"].to_numpy(float)
    tenth = pd.qcut(risk, 10, labels=False)
    for rows in [np.ones_like(outcome, dtype=bool)] + [tenth == k for k in range(10)]:
        p, y = risk[rows], outcome[rows]
        assert abs(y.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum()), (p.mean(), y.mean())


def test_published_risk_factors_raise_the_event_rate(labelled: pd.DataFrame) -> None:
    """Age, polypharmacy, interacting drugs, renal impairment, earlier events and the
    high-risk drug classes: each higher group has more events than the lower one."""
    rate = labelled.groupby(labelled["drug_class"])["event"].mean()
    assert (rate[HIGH_RISK] > 2 * rate["other"]).all(), rate
    older = labelled[labelled["age"] >= 65]
    share = older.loc[older["event"], "drug_class"].isin(HIGH_RISK).mean()
    prescribed = older["drug_class"].isin(HIGH_RISK).mean()
    assert share > 0.45 and share > 1.6 * prescribed, (share, prescribed)  # Budnitz 2011: 67%

    def rises(groups: pd.Series) -> None:
        by_group = labelled.groupby(groups, observed=True)["event"].mean()
        assert by_group.is_monotonic_increasing and by_group.iloc[-1] > 1.5 * by_group.iloc[0], (
            by_group
        )

    rises(pd.cut(labelled["age"], [17, 50, 65, 80, 120]))
    rises(pd.cut(labelled["concurrent_medications"], [-1, 2, 5, 9, 100]))
    rises(labelled["interacting_pairs"].clip(upper=2))
    rises(labelled["prior_ades_365d"].clip(upper=1))
    rises(pd.cut(-labelled["egfr"], [-200, -60, -45, -30, 0]))  # eGFR falling


def test_prior_counts_and_risk_have_no_trend_over_the_window(cohort: pd.DataFrame) -> None:
    """Burn-in and new patients keep the extract near steady state. A quarter holds about
    15 000 prescriptions of 9 000 patients: clustered by patient, its mean prior count has
    a standard error of about 4% of the mean and its mean risk about 2%, so 15% and 10%
    are more than 3.5 of them. Without a burn-in the history starts empty and the check
    sees the count climb."""

    def by_quarter(frame: pd.DataFrame) -> pd.DataFrame:
        columns = ["true_risk", "prior_ades_365d"]
        return frame.groupby(quarter(frame))[columns].mean() / frame[columns].mean()

    means = by_quarter(cohort)
    assert means.index.tolist() == list(range(8))
    assert (means["prior_ades_365d"] - 1).abs().max() < 0.15, means
    assert (means["true_risk"] - 1).abs().max() < 0.10, means
    cold = by_quarter(generate(n_patients=28_000, seed=2024, end=END, burn_in_months=0))
    assert (cold["prior_ades_365d"] - 1).abs().max() > 0.5, cold


def test_labs_go_missing_by_setting_without_changing_the_risk(cohort: pd.DataFrame) -> None:
    missing = cohort[["egfr", "alt"]].isna()
    assert 0.40 < missing["alt"].mean() < 0.55 and 0.08 < missing["egfr"].mean() < 0.16, (
        missing.mean()
    )
    by_setting = missing.groupby(cohort["care_setting"]).mean()
    assert by_setting.loc["outpatient", "alt"] > 3 * by_setting.loc["inpatient", "alt"]
    assert by_setting.loc["outpatient", "egfr"] > 3 * by_setting.loc["inpatient", "egfr"]
    nullable = ["egfr", "alt", "ade_30d"]
    assert cohort.drop(columns=nullable).notna().all().all()

    measured = generate(3000, seed=8, end=END, shift=Shift(missing_lab_odds_ratio=0.0))
    default = generate(3000, seed=8, end=END)
    labs = ["egfr", "alt"]
    assert measured[labs].notna().all().all()
    pd.testing.assert_frame_equal(measured.drop(columns=labs), default.drop(columns=labs))
    observed = default[labs].notna()
    assert ((default[labs] == measured[labs]) | ~observed).all().all()
    assert (~observed).sum().sum() > 0


# What each shift may change; everything else must be identical for the same seed.
OUTCOME = ["ade_30d", "true_risk", "prior_ades_365d"]


def _unchanged_but(base: pd.DataFrame, shifted: pd.DataFrame, changed: list[str]) -> None:
    pd.testing.assert_frame_equal(base.drop(columns=changed), shifted.drop(columns=changed))


def _rate(frame: pd.DataFrame) -> float:
    return (frame["ade_30d"].dropna() == "yes").mean()


def test_shifts_change_what_they_say_and_nothing_else() -> None:
    base = generate(4000, seed=4, end=END)

    # A new formulary anticoagulant takes prescriptions from "other".
    weights = (0.20, 0.07, 0.05, 0.07, 0.10, 0.08, 0.20, 0.23)
    formulary = generate(4000, seed=4, end=END, shift=Shift(drug_class_weights=weights))

    def anticoagulants(frame: pd.DataFrame) -> float:
        return (frame["drug_class"] == "anticoagulant").mean()

    assert anticoagulants(formulary) > 0.15 > anticoagulants(base)
    _unchanged_but(base, formulary, ["drug_class", "interacting_pairs", *OUTCOME])

    # The new drug's class carries more risk at the same features.
    riskier = generate(4000, seed=4, end=END, shift=Shift(class_odds_ratio={"opioid": 3.0}))
    opioid = base["drug_class"] == "opioid"
    assert (riskier.loc[opioid, "true_risk"] > base.loc[opioid, "true_risk"]).all()
    _unchanged_but(base, riskier, OUTCOME)

    # More polypharmacy: more concurrent medications and interacting pairs.
    busier = generate(4000, seed=4, end=END, shift=Shift(extra_medications=3.0))
    extra = busier["concurrent_medications"] - base["concurrent_medications"]
    assert (extra >= 0).all() and 2.5 < extra.mean() < 3.5
    assert busier["interacting_pairs"].mean() > base["interacting_pairs"].mean()
    _unchanged_but(base, busier, ["concurrent_medications", "interacting_pairs", *OUTCOME])

    # The label rate at the same features (the prior-event count follows the events).
    more = generate(4000, seed=4, end=END, shift=Shift(label_odds_ratio=2.0))
    assert _rate(more) > 1.5 * _rate(base)
    _unchanged_but(base, more, OUTCOME)
    assert (more["prior_ades_365d"] >= base["prior_ades_365d"]).all()


def test_shifts_reject_what_they_cannot_mean() -> None:
    with pytest.raises(ValueError, match="drug_class_weights"):
        Shift(drug_class_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="unknown drug classes"):
        Shift(class_odds_ratio={"statin": 2.0})
    with pytest.raises(ValueError, match="extra_medications"):
        Shift(extra_medications=-1.0)
    with pytest.raises(ValueError, match="label_odds_ratio"):
        Shift(label_odds_ratio=0.0)


def test_the_loader_takes_shifts_as_spec_options() -> None:
    """A spec's YAML gives lists: the loader reads them as the shift's tuples."""
    weights = [0.20, 0.07, 0.05, 0.07, 0.10, 0.08, 0.20, 0.23]
    frame = LOADERS["ade"](4, NOW, n_patients=3000, drug_class_weights=weights)
    expected = generate(3000, seed=4, end=END, shift=Shift(drug_class_weights=tuple(weights)))
    pd.testing.assert_frame_equal(frame, expected)


@pytest.mark.slow
def test_point_in_time_features_never_leak_from_later_prescriptions(spec, tmp_path: Path) -> None:
    """A prescription sees its own values when written and the previous one's just before."""
    raw = generate(n_patients=200, seed=12, end=END)
    assert_point_in_time(
        spec,
        raw,
        END.to_pydatetime(),
        tmp_path,
        exact=("prior_ades_365d", "concurrent_medications", "drug_class", "age"),
        carried="prior_ades_365d",
    )
