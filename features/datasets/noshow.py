"""The ``noshow`` use case: seeded synthetic outpatient appointments and their no-shows.

Everything here is synthetic. Nothing is drawn from real patients or real clinics.

The appointment book
--------------------
``n_patients`` patients are simulated. Each has a home clinic (one of four, plus
``clinic_e``, a clinic that opens only under the :class:`Shift` ``new_clinic_share``), an
age, a sex, an insurance class, a travel distance to the clinic, a home specialty, an
appointment rate and an unobserved propensity to miss appointments. A patient is *active*
(under the clinic's care) for an exponential time of mean ``ACTIVE_MONTHS``; patients
start care at a constant rate over the burn-in and the window, and the patients already
in care when the burn-in starts are drawn from the steady state (as many as the arrival
rate times the mean stay, each with a fresh exponential stay: the exponential forgets
its past), so the number of patients in care is constant over time.

While active, a patient's appointments arrive as a Poisson process (mean
``APPOINTMENTS_PER_YEAR``, gamma-distributed between patients, more for older ones); each
falls on a weekday (a weekend draw moves to a random weekday of its week) in a 15-minute
slot between 08:00 and 16:45, at most one a day per patient. Each appointment has:

- a specialty (the patient's own three times in four), a visit type (``new`` for a
  patient's first appointment in care and for 15% of the others, referrals to a new
  problem; otherwise ``follow_up``), and a lead time from booking to the appointment:
  8% (20% in primary care) are same- or next-day bookings, the rest lognormal around a
  median that depends on the specialty, 30% longer for new visits, at most 180 days;
- an SMS reminder three days before, for appointments booked at least three days ahead
  with a mobile number on file (88%);
- the prediction time (``event_timestamp``): 17:00 two days before the appointment's day,
  when the next-but-one day's list is drawn up for reminder calls and overbooking, or the
  booking itself when it comes later (same- and next-day bookings);
- ``prior_appointments_365d`` and ``prior_noshows_365d``: the patient's appointments,
  and no-shows among them, in the 365 days before the prediction time whose slot had
  passed by then (so whose outcome was known), burn-in appointments included. An
  appointment the day before this one is *not* counted: at the prediction time it has
  not happened yet.

The risk model (logistic; ``true_risk`` is exposed so tests can compute the oracle AUROC)::

    logit = -2.4 + propensity                                   # patient, N(0, 0.2^2)
          + 0.70 log1p(prior_noshows_365d)                      # known at prediction
          + 0.35 log1p(lead_time_days / 7)
          - 0.50 reminder_sent
          - 0.018 (min(age, 80) - 45)
          + insurance (private 0, medicare 0.05, medicaid 0.45, self_pay 0.60)
          + 0.20 [new visit]  + 0.05 [male]
          + weekday (mon 0.15, tue 0, wed 0, thu 0.02, fri 0.10)
          + hour (0.20 at 08:00-08:59, 0.10 from 16:00, else 0)
          + 0.15 log1p(distance_km / 10)
          + specialty (primary_care 0, cardiology -0.20, dermatology 0.10,
                       behavioural_health 0.45, orthopaedics -0.10, endocrinology 0.05)
          + clinic (clinic_a 0, clinic_b -0.05, clinic_c 0.05, clinic_d 0.10, clinic_e 0.10)
          + 0.15 [December-February]
          + winter_weather (0.30 + 0.20 log1p(distance_km / 10))   # the season shift

``true_risk`` is exactly the probability that ``no_show`` is ``yes``: each outcome is a
draw given the patient's propensity and the no-shows known at the prediction time (so
outcomes are drawn one appointment index at a time). The propensity is unobserved; a
patient's earlier no-shows reveal it and raise the risk themselves, which is why they are
the strongest observed predictor, and why no model reaches the oracle AUROC. The
appointment book does not depend on outcomes, so a shift that changes risk changes no
appointment.

Missing values: ``distance_km`` is unknown (no geocodable address) for about 8% of
appointments, more often for self-paying patients and new visits: missing at random
given insurance and visit type. The risk uses the true distance, so a missing value hides
a number and changes nothing else. Missing values are NaN.

Steady state: the 24-month default burn-in fills the 365-day history and the patients in
care start at their steady-state number, so the case mix, the prior counts and the no-show
rate are flat over the window (winter aside: its quarter is about 8% riskier). What the
defaults produce is measured in docs/data.md, "noshow".

Timestamps: ``booking_time``, ``appointment_time`` (when the outcome becomes known:
``label.known_at``), ``event_timestamp`` (the prediction time). Rows are the appointments
whose prediction time falls in the window; those whose slot lies after ``end`` have a
null ``no_show``, as a live appointment extract would.

Shifts (:class:`Shift`), each a parameter: an SMS-reminder outage (a share of reminders
not sent), a new clinic (``clinic_e``: younger patients, more on Medicaid or paying
themselves, living farther away, mostly new visits), and winter weather (no-shows rise,
more for patients who travel farther).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from clinml.features.datasets.simulate import sigmoid

CLINICS = ["clinic_a", "clinic_b", "clinic_c", "clinic_d", "clinic_e"]
# clinic_a: urban academic centre, patients close by; clinic_b: suburban; clinic_c: rural,
# the farthest travel; clinic_d: community health centre, more Medicaid and self-pay;
# clinic_e: opens only under Shift(new_clinic_share=...).
CLINIC_WEIGHTS = np.array([0.35, 0.30, 0.15, 0.20, 0.0])
CLINIC_DISTANCE_KM = np.array([6.0, 12.0, 35.0, 8.0, 25.0])  # median travel distance
CLINIC_AGE_SHIFT = np.array([0.0, 2.0, 5.0, -4.0, -12.0])
CLINIC_RISK = np.array([0.0, -0.05, 0.05, 0.10, 0.10])
INSURANCE = ["private", "medicare", "medicaid", "self_pay"]
INSURANCE_RISK = np.array([0.0, 0.05, 0.45, 0.60])
# Insurance of patients under 65, by clinic (rows); 65 and over: mostly Medicare.
INSURANCE_UNDER_65 = np.array(
    [
        [0.62, 0.05, 0.25, 0.08],
        [0.70, 0.05, 0.18, 0.07],
        [0.58, 0.07, 0.25, 0.10],
        [0.35, 0.05, 0.45, 0.15],
        [0.25, 0.03, 0.50, 0.22],
    ]
)
INSURANCE_65_PLUS = np.array([0.10, 0.85, 0.03, 0.02])
SPECIALTIES = [
    "primary_care",
    "cardiology",
    "dermatology",
    "behavioural_health",
    "orthopaedics",
    "endocrinology",
]
SPECIALTY_WEIGHTS = np.array([0.35, 0.15, 0.12, 0.12, 0.14, 0.12])
SPECIALTY_RISK = np.array([0.0, -0.20, 0.10, 0.45, -0.10, 0.05])
SPECIALTY_LEAD_DAYS = np.array([10.0, 21.0, 35.0, 14.0, 18.0, 28.0])  # median, booked ahead
SPECIALTY_URGENT = np.array([0.20, 0.08, 0.08, 0.08, 0.08, 0.08])  # same- or next-day share
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]
WEEKDAY_RISK = np.array([0.15, 0.0, 0.0, 0.02, 0.10])
INTERCEPT = -2.4
PROPENSITY_SD = 0.2  # unobserved, per patient
HISTORY_RISK = 0.7  # per log1p(prior_noshows_365d)
ACTIVE_MONTHS = 18.0  # mean time a patient stays in care
APPOINTMENTS_PER_YEAR = 6.0  # mean, while in care
MAX_LEAD_DAYS = 180.0
REMINDER_DAYS = 3  # SMS reminders go out this many days before the appointment
REMINDER_ON_FILE = 0.88  # share of patients with a mobile number for reminders
PREDICTION_DAYS = 2  # the list is drawn up this many days before the appointment ...
PREDICTION_HOUR = 17  # ... at this hour
HISTORY_DAYS = 365
DISTANCE_MISSING_INTERCEPT = -2.75


@dataclass(frozen=True)
class Shift:
    """Distribution shifts to inject; the defaults inject none.

    The same seed gives the same patients and appointment book under every shift; a shift
    changes the columns it names and, through the risk, the outcomes (and so the later
    appointments' ``prior_noshows_365d``).

    Attributes:
        reminder_outage: share of due SMS reminders that are not sent (0: none fails, 1:
            the reminder system is down for the whole extract).
        new_clinic_share: share of patients whose home clinic is ``clinic_e``, a clinic
            opened after the model was trained: younger patients, more on Medicaid or
            paying themselves, living farther away, and mostly new visits.
        winter_weather: 0 (none) to 1 (a hard winter): raises every appointment's
            log-odds of a no-show by 0.30, plus 0.20 log1p(distance_km / 10) for travel.
    """

    reminder_outage: float = 0.0
    new_clinic_share: float = 0.0
    winter_weather: float = 0.0

    def __post_init__(self) -> None:
        for name in ("reminder_outage", "new_clinic_share", "winter_weather"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True)
class _Draws:
    """Each patient's random draws, made whatever the shift (so a shift moves no other)."""

    stock: np.ndarray  # already in care when the burn-in starts
    entry: np.ndarray  # days from the window start (negative: burn-in)
    exit: np.ndarray
    clinic: np.ndarray  # one of the four open clinics
    new_clinic: np.ndarray  # uniform: below Shift.new_clinic_share moves to clinic_e
    female: np.ndarray
    age: np.ndarray  # standard normal
    insurance: np.ndarray  # uniform
    distance: np.ndarray  # normal, log scale
    specialty: np.ndarray
    rate: np.ndarray  # gamma, mean 1
    propensity: np.ndarray  # unobserved


@dataclass(frozen=True)
class _Patients:
    """Per-patient attributes, fixed while the patient is in care."""

    stock: np.ndarray
    entry: np.ndarray
    clinic: np.ndarray
    female: np.ndarray
    age_at_entry: np.ndarray
    insurance: np.ndarray
    distance_km: np.ndarray
    specialty: np.ndarray
    rate_per_day: np.ndarray
    propensity: np.ndarray
    exit: np.ndarray


def _draws(
    rng: np.random.Generator, n_patients: int, burn_in_days: float, window_days: float
) -> _Draws:
    """Draw the patients' time in care and the raw draws behind their attributes."""
    active_days = ACTIVE_MONTHS * 365.25 / 12
    # Steady state: the stock in care at -burn_in is the arrival rate times the mean stay.
    stock = rng.random(n_patients) < active_days / (active_days + burn_in_days + window_days)
    entry = np.where(stock, -burn_in_days, rng.uniform(-burn_in_days, window_days, n_patients))
    open_clinics = CLINIC_WEIGHTS[:4] / CLINIC_WEIGHTS[:4].sum()
    return _Draws(
        stock=stock,
        entry=entry,
        exit=entry + rng.exponential(active_days, n_patients),
        clinic=rng.choice(4, n_patients, p=open_clinics),
        new_clinic=rng.random(n_patients),
        female=rng.random(n_patients) < 0.58,  # women use outpatient care more
        age=rng.normal(0.0, 1.0, n_patients),
        insurance=rng.random(n_patients),
        distance=rng.normal(0.0, 0.8, n_patients),
        specialty=rng.choice(len(SPECIALTIES), n_patients, p=SPECIALTY_WEIGHTS),
        rate=rng.gamma(1.5, 1.0 / 1.5, n_patients),
        propensity=rng.normal(0.0, PROPENSITY_SD, n_patients),
    )


def _patients(draws: _Draws, shift: Shift) -> _Patients:
    """The patients' attributes from their draws, ``new_clinic_share`` of them at clinic_e.

    The new clinic's patients are younger, more often on Medicaid or paying themselves
    and live farther away, from the same draws as they would have had elsewhere.
    """
    clinic = np.where(draws.new_clinic < shift.new_clinic_share, 4, draws.clinic)
    age = np.clip(52.0 + CLINIC_AGE_SHIFT[clinic] + 17.0 * draws.age, 18.0, 95.0)
    shares = np.where(age[:, None] < 65, INSURANCE_UNDER_65[clinic], INSURANCE_65_PLUS)
    insurance = (draws.insurance[:, None] > shares.cumsum(axis=1)).sum(axis=1).clip(max=3)
    return _Patients(
        stock=draws.stock,
        entry=draws.entry,
        clinic=clinic,
        female=draws.female,
        age_at_entry=age,
        insurance=insurance,
        distance_km=CLINIC_DISTANCE_KM[clinic] * np.exp(draws.distance),
        specialty=draws.specialty,
        # Older patients come more often (0.01 log-rate per year of age, from the age
        # draw, so that moving a patient to the new clinic moves no appointment).
        rate_per_day=APPOINTMENTS_PER_YEAR / 365.25 * draws.rate * np.exp(0.17 * draws.age),
        propensity=draws.propensity,
        exit=draws.exit,
    )


def _appointment_days(
    rng: np.random.Generator, patients: _Patients, start: np.datetime64, end_day: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's appointment days (days from the window start, whole), one a day.

    Returns ``(patient index, day)`` sorted by patient then day.
    """
    begin = patients.entry
    finish = np.minimum(patients.exit, end_day)
    counts = rng.poisson(patients.rate_per_day * np.clip(finish - begin, 0.0, None))
    patient = np.repeat(np.arange(begin.size), counts)
    when = begin[patient] + rng.random(patient.size) * (finish - begin)[patient]
    day = np.floor(when)
    # A weekend draw moves to a random weekday of its (Monday-based) week.
    weekday = (start.astype("datetime64[D]") + day.astype("timedelta64[D]")).astype(int)
    weekday = (weekday + 3) % 7  # 1970-01-01 was a Thursday
    moved = rng.integers(0, 5, patient.size)
    day = np.where(weekday >= 5, day - weekday + moved, day)
    order = np.lexsort((day, patient))
    patient, day = patient[order], day[order]
    first_of_day = np.ones(patient.size, dtype=bool)
    first_of_day[1:] = (patient[1:] != patient[:-1]) | (day[1:] != day[:-1])
    return patient[first_of_day], day[first_of_day]


def _history_windows(
    patient: np.ndarray, slot: np.ndarray, at: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the positions ``[lo, hi)`` of the patient's appointments with
    ``at - 365 days <= slot < at``: those whose outcome was known at ``at``.

    ``patient``/``slot`` must be sorted by patient then slot. One sorted key per
    (patient, time) finds them all at once, with no per-patient loop.
    """
    origin = slot.min() - HISTORY_DAYS - 5.0
    span = float(np.ceil(max(slot.max(), at.max()) - origin) + 5.0)
    key = patient * span + (slot - origin)
    hi = np.searchsorted(key, patient * span + (at - origin), side="left")
    lo = np.searchsorted(key, patient * span + (at - HISTORY_DAYS - origin), side="left")
    return lo, hi


def _outcomes(
    patient: np.ndarray,
    slot: np.ndarray,
    predicted_at: np.ndarray,
    logit: np.ndarray,
    draw: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Risk, outcome and the point-in-time prior counts of every appointment.

    A patient's risk depends on their no-shows known at the prediction time, so the
    outcomes are drawn one appointment index at a time (every patient's k-th
    appointment together): the appointments a k-th one counts all come before it.

    Returns:
        ``(true_risk, no_show, prior_appointments_365d, prior_noshows_365d)``.
    """
    lo, hi = _history_windows(patient, slot, predicted_at)
    starts = np.flatnonzero(np.r_[True, patient[1:] != patient[:-1]])
    index = np.arange(patient.size) - np.repeat(starts, np.diff(np.r_[starts, patient.size]))
    risk = np.zeros(patient.size)
    no_show = np.zeros(patient.size, dtype=bool)
    prior_noshows = np.zeros(patient.size, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(index.max() + 2))
    for k in range(index.max() + 1):
        rows = order[bounds[k] : bounds[k + 1]]
        known = np.r_[0, np.cumsum(no_show)]
        prior_noshows[rows] = known[hi[rows]] - known[lo[rows]]
        risk[rows] = sigmoid(logit[rows] + HISTORY_RISK * np.log1p(prior_noshows[rows]))
        no_show[rows] = draw[rows] < risk[rows]
    return risk, no_show, hi - lo, prior_noshows


def _month(days: np.ndarray, start: np.datetime64) -> np.ndarray:
    months = (start + (days * 86_400).astype("timedelta64[s]")).astype("datetime64[M]")
    return months.astype(int) % 12 + 1


def generate(
    n_patients: int = 42_000,
    seed: int = 0,
    end: datetime | None = None,
    months: int = 24,
    shift: Shift | None = None,
    burn_in_months: int = 24,
) -> pd.DataFrame:
    """Generate the appointment book, one row per appointment scored in the window.

    Args:
        n_patients: number of patients simulated over the burn-in and the window; with
            the defaults about half have an appointment in the window.
        seed: the same seed, ``end`` and arguments give the same frame.
        end: the end of the window (default: 2026-01-01 UTC, for determinism).
        months: length of the window.
        shift: distribution shifts to inject.
        burn_in_months: months simulated before the window and not emitted; at least
            12, so that the 365-day prior counts are complete from the window's start.

    Returns:
        Appointments sorted by prediction time, with identifiers (``patient_id``,
        ``appointment_id``, ``date_of_birth``), timestamps (``booking_time``,
        ``event_timestamp`` = prediction time, ``appointment_time`` = when the outcome
        is known), features, the label ``no_show`` (``yes``/``no``, null while the slot
        is in the future) and ``true_risk`` (the probability that ``no_show`` is ``yes``).
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    if months < 1 or burn_in_months < 12:
        raise ValueError("months must be at least 1 and burn_in_months at least 12")
    shift = shift or Shift()
    rng = np.random.default_rng(seed)
    end_ts = pd.Timestamp(end or datetime(2026, 1, 1, tzinfo=UTC))
    end_ts = end_ts.tz_convert("UTC") if end_ts.tzinfo else end_ts.tz_localize("UTC")
    window_days = months * 365.25 / 12
    start_ts = (end_ts - pd.Timedelta(days=window_days)).normalize()
    window_days = (end_ts - start_ts) / pd.Timedelta(days=1)
    start = np.datetime64(start_ts.tz_localize(None), "s")
    burn_in_days = burn_in_months * 365.25 / 12
    patients = _patients(_draws(rng, n_patients, burn_in_days, window_days), shift)

    # --- the appointment book (independent of outcomes) ---------------------------
    patient, day = _appointment_days(rng, patients, start, window_days + PREDICTION_DAYS + 1)
    n = patient.size
    slot_of_day = rng.choice(36, n, p=_slot_weights())  # 08:00 ... 16:45, 15 minutes
    slot = day + (8.0 + slot_of_day / 4.0) / 24.0
    first = np.ones(n, dtype=bool)
    first[1:] = patient[1:] != patient[:-1]
    new_visit = (first & ~patients.stock[patient]) | (rng.random(n) < 0.15)
    new_visit |= (patients.clinic[patient] == 4) & (rng.random(n) < 0.6)  # a clinic just opened
    own = rng.random(n) < 0.75
    specialty = np.where(
        own, patients.specialty[patient], rng.choice(len(SPECIALTIES), n, p=SPECIALTY_WEIGHTS)
    )
    urgent = rng.random(n) < SPECIALTY_URGENT[specialty]
    lead_median = SPECIALTY_LEAD_DAYS[specialty] * np.where(new_visit, 1.3, 1.0)
    lead = np.where(
        urgent,
        rng.uniform(0.05, 1.6, n),
        np.minimum(lead_median * np.exp(rng.normal(0.0, 0.8, n)), MAX_LEAD_DAYS),
    )
    lead = np.maximum(lead, 0.05)
    booking = slot - lead
    list_time = day - PREDICTION_DAYS + PREDICTION_HOUR / 24.0
    predicted_at = np.maximum(list_time, booking)
    on_file = rng.random(n) < REMINDER_ON_FILE
    outage = rng.random(n) < shift.reminder_outage
    reminder = (lead >= REMINDER_DAYS) & on_file & ~outage
    missing_distance = rng.random(n) < sigmoid(
        DISTANCE_MISSING_INTERCEPT + 0.9 * (patients.insurance[patient] == 3) + 0.6 * new_visit
    )
    outcome_draw = rng.random(n)

    # --- risk and outcomes ---------------------------------------------------------
    age = patients.age_at_entry[patient] + np.maximum(slot - patients.entry[patient], 0) / 365.25
    weekday = ((start.astype("datetime64[D]") + day.astype("timedelta64[D]")).astype(int) + 3) % 7
    hour = 8 + slot_of_day // 4
    distance = patients.distance_km[patient]
    winter = np.isin(_month(slot, start), (12, 1, 2))
    logit = (
        INTERCEPT
        + patients.propensity[patient]
        + 0.35 * np.log1p(lead / 7.0)
        - 0.50 * reminder
        - 0.018 * (np.minimum(age, 80.0) - 45.0)
        + INSURANCE_RISK[patients.insurance[patient]]
        + 0.20 * new_visit
        + 0.05 * ~patients.female[patient]
        + WEEKDAY_RISK[weekday]
        + 0.20 * (hour == 8)
        + 0.10 * (hour >= 16)
        + 0.15 * np.log1p(distance / 10.0)
        + SPECIALTY_RISK[specialty]
        + CLINIC_RISK[patients.clinic[patient]]
        + 0.15 * winter
        + shift.winter_weather * (0.30 + 0.20 * np.log1p(distance / 10.0))
    )
    risk, no_show, prior, prior_noshows = _outcomes(
        patient, slot, predicted_at, logit, outcome_draw
    )

    emitted = (predicted_at >= 0.0) & (predicted_at <= window_days)
    columns = {
        "patient": patient,
        "booking": booking,
        "predicted_at": predicted_at,
        "slot": slot,
        "lead": lead,
        "weekday": weekday,
        "hour": hour,
        "reminder": reminder,
        "distance": np.where(missing_distance, np.nan, distance),
        "age": age,
        "new_visit": new_visit,
        "specialty": specialty,
        "prior": prior,
        "prior_noshows": prior_noshows,
        "no_show": no_show,
        "risk": risk,
    }
    rows = {name: values[emitted] for name, values in columns.items()}
    return _assemble(rows, rng, start, window_days, patients)


def _slot_weights() -> np.ndarray:
    """Clinic sessions: fuller mornings, a lunch dip, fewer late slots."""
    hour = 8 + np.arange(36) // 4
    weight = np.where(hour < 12, 1.2, 1.0) * np.where(hour == 12, 0.4, 1.0)
    weight = weight * np.where(hour >= 16, 0.7, 1.0)
    return weight / weight.sum()


def _assemble(
    rows: dict[str, np.ndarray],
    rng: np.random.Generator,
    start: np.datetime64,
    window_days: float,
    patients: _Patients,
) -> pd.DataFrame:
    """The appointment buffers as a typed, prediction-time-ordered DataFrame."""
    patient = rows["patient"]
    n_patients = patients.clinic.size
    n = patient.size

    def at(days: np.ndarray) -> pd.DatetimeIndex:
        stamps = start + np.round(days * 86_400).astype("timedelta64[s]")
        return pd.DatetimeIndex(stamps).tz_localize("UTC")

    appointment_time = at(rows["slot"])
    end = at(np.array([window_days]))[0]
    label = np.where(rows["no_show"], "yes", "no").astype(object)
    label[np.asarray(appointment_time > end)] = None  # the slot has not come yet

    patient_ids = np.array(
        [f"PT{v:08d}" for v in rng.choice(10**8, n_patients, replace=False)], dtype=object
    )
    age_at_start = patients.age_at_entry - patients.entry / 365.25
    birth_days = rng.integers(0, 365, n_patients)
    dob = (
        pd.DatetimeIndex(
            start
            - (age_at_start * 365.25).astype("timedelta64[D]")
            + birth_days.astype("timedelta64[D]")
        )
        .normalize()
        .strftime("%Y-%m-%d")
        .to_numpy(dtype=object)
    )
    frame = pd.DataFrame(
        {
            "patient_id": patient_ids[patient],
            "appointment_id": np.array(
                [f"A{v:010d}" for v in rng.choice(10**10, n, replace=False)], dtype=object
            ),
            "date_of_birth": dob[patient],
            "booking_time": at(rows["booking"]),
            "event_timestamp": at(rows["predicted_at"]),
            "appointment_time": appointment_time,
            "no_show": label,
            "lead_time_days": np.round(rows["lead"], 2),
            "weekday": np.array(WEEKDAYS, dtype=object)[rows["weekday"]],
            "hour": rows["hour"].astype(np.int64),
            "reminder_sent": rows["reminder"].astype(np.int64),
            "distance_km": np.round(np.clip(rows["distance"], 0.1, 500.0), 1),
            "age": np.floor(rows["age"]).astype(np.int64),
            "sex": np.where(patients.female[patient], "F", "M").astype(object),
            "insurance": np.array(INSURANCE, dtype=object)[patients.insurance[patient]],
            "visit_type": np.where(rows["new_visit"], "new", "follow_up").astype(object),
            "clinic": np.array(CLINICS, dtype=object)[patients.clinic[patient]],
            "specialty": np.array(SPECIALTIES, dtype=object)[rows["specialty"]],
            "prior_appointments_365d": rows["prior"].astype(np.int64),
            "prior_noshows_365d": rows["prior_noshows"].astype(np.int64),
            "true_risk": rows["risk"],
        }
    )
    return frame.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


def load(
    seed: int,
    now: datetime,
    n_patients: int = 42_000,
    months: int = 24,
    burn_in_months: int = 24,
    **shift: object,
) -> pd.DataFrame:
    """The built-in loader: an appointment book ending at the start of ``now``'s UTC day.

    Ending at midnight keeps the book identical for every run on the same day. Keyword
    arguments other than ``n_patients``, ``months`` and ``burn_in_months`` build a
    :class:`Shift`.
    """
    day = (
        pd.Timestamp(now).tz_convert("UTC").normalize()
        if pd.Timestamp(now).tzinfo
        else pd.Timestamp(now, tz="UTC").normalize()
    )
    shifts = Shift(**shift)  # type: ignore[arg-type]
    return generate(n_patients, seed, day.to_pydatetime(), months, shifts, burn_in_months)
