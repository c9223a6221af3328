"""The noshow appointment book: determinism, realism checks, timestamps, point-in-time
prior counts, the exactness of ``true_risk``, missing distances, shifts, Feast PIT."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from clinml.features.datasets.noshow import CLINICS, SPECIALTIES, Shift, generate
from clinml.spec import load_spec
from tests.conftest import PROJECT_ROOT
from tests.data.point_in_time import assert_point_in_time

END = datetime(2026, 3, 1, tzinfo=UTC)
WINDOW_START = (pd.Timestamp(END) - pd.Timedelta(days=24 * 365.25 / 12)).normalize()
# Columns a risk-only shift may change: the outcome, its probability, and the later
# appointments' count of known no-shows.
OUTCOME_COLUMNS = ["no_show", "true_risk", "prior_noshows_365d"]


@pytest.fixture(scope="module")
def book() -> pd.DataFrame:
    """The default size (42 000 patients simulated, about 130 000 appointments)."""
    return generate(seed=8, end=END)


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return generate(n_patients=3000, seed=4, end=END)


@pytest.fixture(scope="module")
def spec():
    return load_spec(PROJECT_ROOT / "configs" / "noshow.yaml")


def labelled(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``true_risk`` and the outcome (1 = no-show) of the rows whose outcome is known."""
    known = frame[frame["no_show"].notna()]
    return known["true_risk"].to_numpy(), (known["no_show"] == "yes").to_numpy(float)


def quarter(frame: pd.DataFrame) -> pd.Series:
    days = (frame["event_timestamp"] - WINDOW_START).dt.total_seconds() / 86_400
    return (days // (365.25 / 4)).clip(upper=7).astype(int)


def test_same_seed_same_book_other_seed_other_book() -> None:
    a, b = generate(400, seed=9, end=END), generate(400, seed=9, end=END)
    pd.testing.assert_frame_equal(a, b)
    assert not generate(400, seed=10, end=END)["lead_time_days"].equals(a["lead_time_days"])


def test_default_book_is_large_and_realistic(book: pd.DataFrame, spec) -> None:
    """At least 100 000 appointments of 20 000 patients; a no-show rate within the 15-30%
    of outpatient clinics; weekdays in clinic hours; every open clinic and specialty."""
    assert len(book) >= 100_000
    assert book["patient_id"].nunique() >= 20_000
    _, outcome = labelled(book)
    assert 0.15 <= outcome.mean() <= 0.30
    assert set(book["weekday"]) == {"mon", "tue", "wed", "thu", "fri"}
    assert book["hour"].between(8, 16).all()
    assert sorted(book["clinic"].unique()) == CLINICS[:4]  # clinic_e opens only in a shift
    assert sorted(book["specialty"].unique()) == sorted(SPECIALTIES)
    assert (book.groupby("patient_id").size() >= 2).mean() > 0.6
    # Every value lies within the spec's declared ranges and categories.
    for column in spec.features:
        values = book[column.name].dropna()
        if column.is_numeric:
            assert values.between(column.min, column.max).all(), column.name
        else:
            assert set(values) <= set(column.categories), column.name
    assert not book.duplicated(["patient_id", "event_timestamp"]).any()


def test_prediction_time_booking_and_label_time(book: pd.DataFrame) -> None:
    """Scored at 17:00 two days before the slot's day, or at a later booking; the outcome is
    known at the slot, at most label.horizon_days (2) later; null after the window's end."""
    predicted, slot = book["event_timestamp"], book["appointment_time"]
    listed = slot.dt.normalize() - pd.Timedelta(days=2) + pd.Timedelta(hours=17)
    at_booking = book["booking_time"] > listed
    assert (predicted[~at_booking] == listed[~at_booking]).all()
    assert (predicted[at_booking] == book.loc[at_booking, "booking_time"]).all()
    assert 0.02 < at_booking.mean() < 0.15  # same- and next-day bookings
    assert (book["booking_time"] <= predicted).all()
    assert (slot > predicted).all() and (slot - predicted <= timedelta(days=2)).all()
    assert (book["no_show"].isna() == (slot > pd.Timestamp(END))).all()
    lead = (slot - book["booking_time"]).dt.total_seconds() / 86_400
    assert np.allclose(lead, book["lead_time_days"], atol=0.01)


def test_prior_counts_are_those_known_at_the_prediction_time(small: pd.DataFrame) -> None:
    """Exactly the patient's slots in the 365 days before the prediction time (once those
    days lie inside the window; before, burn-in appointments add). A slot between the
    prediction time and this appointment (the day before) is not yet known: not counted."""

    def days(times: pd.Series) -> np.ndarray:
        return ((times - WINDOW_START).dt.total_seconds() / 86_400).to_numpy()

    pending_seen = burn_in_counted = 0
    sample = small[small["patient_id"].isin(small["patient_id"].unique()[:300])]
    for _, rows in sample.groupby("patient_id"):
        slots, predicted = days(rows["appointment_time"]), days(rows["event_timestamp"])
        missed = (rows["no_show"] == "yes").to_numpy()
        counts = rows[["prior_appointments_365d", "prior_noshows_365d"]].to_numpy()
        for at, slot, got in zip(predicted, slots, counts, strict=True):
            known = (slots < at) & (slots >= at - 365)
            pending_seen += int(((slots >= at) & (slots < slot)).any())
            expected = (known.sum(), (known & missed).sum())
            if at >= 365:
                assert tuple(got) == expected
            else:
                assert got[0] >= expected[0] and got[1] >= expected[1]
                burn_in_counted += int(got[0] > expected[0])
    assert pending_seen > 0  # the case the rule is about occurs
    assert burn_in_counted > 0  # history starts before the window


def test_true_risk_gives_an_oracle_auroc_no_feature_reaches(book: pd.DataFrame) -> None:
    risk, outcome = labelled(book)
    oracle = roc_auc_score(outcome, risk)
    assert 0.68 < oracle < 0.80
    known = book[book["no_show"].notna()]
    single = {
        c: roc_auc_score(outcome, known[c])
        for c in ("prior_noshows_365d", "lead_time_days", "prior_appointments_365d")
    }
    single["age"] = roc_auc_score(outcome, -known["age"])  # younger patients miss more
    assert max(single, key=single.get) == "prior_noshows_365d", single  # the strongest
    assert max(single.values()) < oracle - 0.05


def test_true_risk_is_the_probability_of_a_no_show(book: pd.DataFrame) -> None:
    """Observed no-shows match the summed true_risk overall and within tenths of it:
    each outcome is a Bernoulli draw given everything before it (4 standard errors)."""
    risk, outcome = labelled(book)
    tenth = pd.qcut(risk, 10, labels=False)
    for rows in [np.ones_like(outcome, dtype=bool)] + [tenth == k for k in range(10)]:
        p, y = risk[rows], outcome[rows]
        assert abs(y.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum()), (p.mean(), y.mean())


def test_no_shows_follow_the_published_directions(book: pd.DataFrame) -> None:
    """Observed rates: more with prior no-shows, longer lead times, younger patients,
    Medicaid or self-pay; fewer with a reminder. Weekday and hour (smaller effects) on the
    generating probability: Mondays and the first hour are the riskiest."""
    known = book[book["no_show"].notna()]
    missed = known["no_show"] == "yes"

    def rate(rows: pd.Series) -> float:
        return float(missed[rows].mean())

    assert rate(known["prior_noshows_365d"] >= 2) > rate(known["prior_noshows_365d"] == 0) + 0.1
    assert rate(known["lead_time_days"] > 60) > rate(known["lead_time_days"].between(3, 14))
    assert rate(known["age"] < 35) > rate(known["age"] >= 65) + 0.05
    assert rate(known["insurance"].isin(["medicaid", "self_pay"])) > rate(
        known["insurance"] == "private"
    )
    ahead = known["lead_time_days"] >= 3
    assert rate(ahead & (known["reminder_sent"] == 0)) > rate(ahead & (known["reminder_sent"] == 1))
    by_day = known.groupby("weekday")["true_risk"].mean()
    assert by_day.idxmax() == "mon"
    by_hour = known.groupby("hour")["true_risk"].mean()
    assert by_hour.idxmax() == 8


def test_no_trend_over_the_window(book: pd.DataFrame) -> None:
    """Steady state: quarterly mean prior counts within 6% of the overall mean, and risk
    within 5% of the same quarter a year later (the winter quarter is about 8% riskier).

    Frequent attenders make the prior counts noisy by quarter (on 200 000 simulated
    patients every quarter is within 1.3% of the mean); 6% is about 4 standard errors
    at the default size.
    """
    columns = ["true_risk", "prior_appointments_365d", "prior_noshows_365d"]
    means = book.groupby(quarter(book))[columns].mean() / book[columns].mean()
    assert means.index.tolist() == list(range(8))
    assert (means[columns[1:]] - 1).abs().max().max() < 0.06, means
    risk = means["true_risk"].to_numpy()
    assert np.abs(risk[4:] / risk[:4] - 1).max() < 0.05, means


def test_distance_goes_missing_at_random_without_changing_the_risk(book: pd.DataFrame) -> None:
    missing = book["distance_km"].isna()
    assert 0.05 < missing.mean() < 0.11
    by_insurance = missing.groupby(book["insurance"]).mean()
    assert by_insurance["self_pay"] > 1.5 * by_insurance["private"]
    assert book.drop(columns=["distance_km", "no_show"]).notna().all().all()
    # The risk uses the true distance: a missing value does not move it.
    known = book["distance_km"].notna()
    assert abs(book.loc[missing, "true_risk"].mean() - book.loc[known, "true_risk"].mean()) < 0.03


def test_shifts_change_what_they_say_and_nothing_else(small: pd.DataFrame) -> None:
    base = small

    def rate(frame: pd.DataFrame) -> float:
        return float((frame["no_show"].dropna() == "yes").mean())

    outage = generate(3000, seed=4, end=END, shift=Shift(reminder_outage=1.0))
    assert base["reminder_sent"].mean() > 0.6 and outage["reminder_sent"].sum() == 0
    pd.testing.assert_frame_equal(
        base.drop(columns=[*OUTCOME_COLUMNS, "reminder_sent"]),
        outage.drop(columns=[*OUTCOME_COLUMNS, "reminder_sent"]),
    )
    assert rate(outage) > rate(base) + 0.03

    weather = generate(3000, seed=4, end=END, shift=Shift(winter_weather=1.0))
    pd.testing.assert_frame_equal(
        base.drop(columns=OUTCOME_COLUMNS), weather.drop(columns=OUTCOME_COLUMNS)
    )
    assert rate(weather) > rate(base) + 0.04
    far = base["distance_km"] > 30
    rise = weather["true_risk"] / base["true_risk"]
    assert rise[far].mean() > rise[base["distance_km"] < 5].mean()  # travel is harder

    opened = generate(3000, seed=4, end=END, shift=Shift(new_clinic_share=0.3))
    patients = opened.groupby("patient_id")["clinic"].first()
    assert 0.25 < (patients == "clinic_e").mean() < 0.35
    # The same slots. Every other patient's appointments are unchanged but for the
    # outcomes; the new clinic's patients are younger, on Medicaid or self-pay more often,
    # farther away and more often on a new visit (so booked further ahead).
    slots = ["patient_id", "appointment_time", "weekday", "hour", "specialty"]
    before = base.sort_values(slots[:2]).reset_index(drop=True)
    after = opened.sort_values(slots[:2]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before[slots], after[slots])
    moved = (after["clinic"] == "clinic_e").to_numpy()
    pd.testing.assert_frame_equal(
        before[~moved].drop(columns=OUTCOME_COLUMNS), after[~moved].drop(columns=OUTCOME_COLUMNS)
    )
    new_clinic, elsewhere = after[moved], before[moved]  # the same patients, before it opened
    assert new_clinic["age"].mean() < elsewhere["age"].mean() - 5
    public = ["medicaid", "self_pay"]
    assert new_clinic["insurance"].isin(public).mean() > elsewhere["insurance"].isin(public).mean()
    assert new_clinic["distance_km"].median() > elsewhere["distance_km"].median()
    assert (
        (new_clinic["visit_type"] == "new").mean() > 0.5 > (elsewhere["visit_type"] == "new").mean()
    )

    with pytest.raises(ValueError, match="reminder_outage"):
        Shift(reminder_outage=1.5)
    with pytest.raises(ValueError, match="winter_weather"):
        Shift(winter_weather=-0.1)


@pytest.mark.slow
def test_point_in_time_features_never_leak_from_later_appointments(spec, tmp_path: Path) -> None:
    """An appointment sees its own values at its prediction time and the previous
    appointment's (if within the TTL) one second before."""
    raw = generate(n_patients=200, seed=12, end=END)
    assert_point_in_time(
        spec,
        raw,
        END,
        tmp_path,
        exact=("prior_noshows_365d", "prior_appointments_365d", "lead_time_days", "clinic"),
        carried="prior_noshows_365d",
    )
