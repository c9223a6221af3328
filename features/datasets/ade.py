"""The ``ade`` use case: a seeded synthetic pharmacy extract for adverse drug events.

Everything here is synthetic. Nothing is drawn from real patients.

The prescriptions
-----------------
``n_patients`` adult patients are simulated, each with a sex, an age at their first new
prescription, a baseline kidney function (eGFR, falling with age), a baseline liver
enzyme (ALT; 4% have liver disease and about three times the level), a tendency to take
many medications, and an unobserved susceptibility to adverse drug events (frailty,
pharmacogenomics, adherence: whatever no extract records). First prescriptions arrive at
a constant rate over a burn-in of ``burn_in_months`` (36) before the window and the
``months`` (24) of the window. After each new prescription a patient gets another one
2 days plus an exponential gap later (mean 60 days, shorter for patients on many
medications), or, with probability 0.08, never again: patients leave. Prescription
times do not depend on outcomes, so a shift in the outcome model changes no prescription.

Each new prescription draws, as it is written:

- the care setting (outpatient, inpatient, emergency, long-term care; older patients are
  more often inpatients or in long-term care);
- the drug class of the new drug (anticoagulant, antiplatelet, insulin, oral
  hypoglycaemic, opioid, NSAID, antibiotic, other; anticoagulants and antiplatelets are
  more often prescribed to older patients);
- eGFR and ALT, the patient's baseline with measurement noise (eGFR also falls 1 mL/min
  a year); ALT is often not measured for outpatients and eGFR sometimes not;
- ``concurrent_medications``: a Poisson count around the patient's tendency, rising
  with age and in hospital;
- ``interacting_pairs``: how many of those medications are known to interact with the
  new drug (binomial; likelier for anticoagulants, antiplatelets and NSAIDs);
- ``prior_ades_365d``: the patient's adverse drug events that became *known* in the 365
  days before this prescription. An event is known 30 days after the prescription that
  caused it (when its label is), so an event of a prescription written less than 30 days
  earlier is not counted yet: a point-in-time aggregate. Burn-in events count.

The outcome (logistic; ``true_risk`` is exposed so tests can compute the oracle AUROC)::

    ade: logit = -5.0 + 0.01 (age - 65) + 0.025 max(age - 65, 0)          # steeper when old
            + 0.10 female
            + 0.25 max(60 - egfr, 0) / 10                                  # renal impairment
            + 0.45 [alt > 120]                                             # hepatic impairment
            + 0.07 concurrent_medications + 0.40 interacting_pairs
            + 0.35 log1p(prior_ades_365d)
            + drug-class effect (other 0, antibiotic 0.3, nsaid 0.6, antiplatelet 0.8,
              oral_hypoglycaemic 0.9, opioid 0.9, insulin 1.3, anticoagulant 1.3)
            + 0.50 [egfr < 45] [class renally cleared: anticoagulant, insulin,
              oral_hypoglycaemic, nsaid]                                   # interaction
            + 0.03 max(age - 70, 0) [opioid]                               # interaction
            + care-setting effect (outpatient 0, inpatient 0.2, emergency 0.35,
              long_term_care 0.3)
            + susceptibility (unobserved, per patient, sd 0.3)
            + log(class_odds_ratio[class]) + log(label_odds_ratio)

``true_risk`` is exactly the probability that ``ade_30d`` is ``yes``; the label is a
Bernoulli draw from it. The susceptibility is unobserved (a patient's earlier events
reveal some of it) and the risk uses the true eGFR and ALT whether or not they were
measured, so no model can reach the oracle AUROC. Missing values are NaN: missing at
random given the care setting.

Random draws come from separate streams (the prescription process and features;
interacting pairs; extra medications; the outcome), each of a fixed size per step, so a
shift changes the draws it names and what follows from them, and nothing else.

Burn-in prescriptions are simulated (their events count in ``prior_ades_365d``, and age
advances) but not emitted. Timestamps: features are known when the drug is prescribed
(``event_timestamp``); the label becomes known 30 days later (``label_timestamp``); for
prescriptions whose 30 days have not passed by ``end`` the label is missing (null), as it
would be in a live extract. What the defaults produce (cohort size, event rate, missing
values, the share of events per drug class, the oracle AUROC) is measured in
docs/data.md, "ade", with the published studies the effect sizes follow.

Shifts (:class:`Shift`), each a parameter: the drug-class mix (a new formulary drug
taking prescriptions from others), a class's own risk (a new drug in a class with a
different safety profile), extra concurrent medications (more polypharmacy), the label
rate at the same features, and how often eGFR and ALT go unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from clinml.features.datasets.simulate import Columns, sigmoid

DRUG_CLASSES = [
    "anticoagulant",
    "antiplatelet",
    "insulin",
    "oral_hypoglycaemic",
    "opioid",
    "nsaid",
    "antibiotic",
    "other",
]
# Share of new prescriptions per class at age 65 (chosen; "other" is everything else).
CLASS_WEIGHTS = (0.07, 0.07, 0.05, 0.07, 0.10, 0.08, 0.20, 0.36)
CLASS_AGE_TILT = np.array([0.04, 0.03, 0.0, 0.0, -0.01, -0.01, 0.0, 0.0])  # per year of age
CLASS_RISK = np.array([1.3, 0.8, 1.3, 0.9, 0.9, 0.6, 0.3, 0.0])  # log-odds vs "other"
CLASS_INTERACTION_RATE = np.array([0.12, 0.08, 0.04, 0.05, 0.06, 0.08, 0.06, 0.02])
RENALLY_CLEARED = np.isin(DRUG_CLASSES, ["anticoagulant", "insulin", "oral_hypoglycaemic", "nsaid"])
OPIOID = DRUG_CLASSES.index("opioid")
SETTINGS = ["outpatient", "inpatient", "emergency", "long_term_care"]
SETTING_LOGIT = np.array([0.0, -0.9, -1.8, -3.6])  # at age 65: 0.62, 0.25, 0.10, 0.03
SETTING_AGE_TILT = np.array([0.0, 0.02, 0.0, 0.06])
SETTING_RISK = np.array([0.0, 0.2, 0.35, 0.3])
SETTING_MEDICATIONS = np.array([0.0, 0.25, 0.1, 0.3])  # log-rate added to the medication count
# Log-odds that ALT / eGFR go unmeasured, by setting: ALT about 65% of outpatients,
# 12% of inpatients; eGFR about 17% of outpatients, 3% of inpatients.
ALT_MISSING_LOGIT = np.array([0.6, -2.0, -0.8, 0.0])
EGFR_MISSING_LOGIT = np.array([-1.6, -3.5, -2.5, -2.0])
AGE_BANDS = ["18-64", "65-79", "80+"]
INTERCEPT = -5.0
SUSCEPTIBILITY_SD = 0.3
LABEL_DELAY_DAYS = 30  # an event is known 30 days after its prescription
LEAVE_PROBABILITY = 0.08  # no further new prescription
GAP_DAYS = 60.0  # mean gap to the next new prescription, beyond the 2-day minimum
ALT_IMPAIRED = 120.0  # U/L, three times the upper limit of normal
HISTORY = 32  # events remembered per patient for the 365-day count


@dataclass(frozen=True)
class Shift:
    """Distribution shifts to inject; the defaults inject none.

    Attributes:
        drug_class_weights: share of new prescriptions per class (``DRUG_CLASSES``
            order) instead of the default: a new formulary drug, or more opioids.
        class_odds_ratio: class -> multiplier of the odds of an event for that class's
            prescriptions: a new drug in the class with a different safety profile.
        extra_medications: mean number of concurrent medications added per prescription
            (Poisson): more polypharmacy, and with it more interacting pairs.
        label_odds_ratio: multiplies the odds of an event at the same features (1 =
            unchanged); the prior-event count follows the events it changes.
        missing_lab_odds_ratio: multiplies the odds that eGFR and ALT go unmeasured (0 =
            always measured, 1 = unchanged). Nothing else changes.
    """

    drug_class_weights: tuple[float, ...] | None = None
    class_odds_ratio: dict[str, float] = field(default_factory=dict)
    extra_medications: float = 0.0
    label_odds_ratio: float = 1.0
    missing_lab_odds_ratio: float = 1.0

    def __post_init__(self) -> None:
        weights = self.drug_class_weights
        if weights is not None and (
            len(weights) != len(DRUG_CLASSES) or min(weights) < 0 or sum(weights) <= 0
        ):
            raise ValueError(f"drug_class_weights needs {len(DRUG_CLASSES)} non-negative weights")
        unknown = sorted(set(self.class_odds_ratio) - set(DRUG_CLASSES))
        if unknown:
            raise ValueError(f"class_odds_ratio: unknown drug classes {unknown}")
        if any(ratio <= 0 for ratio in self.class_odds_ratio.values()):
            raise ValueError("class_odds_ratio values must be positive")
        if self.extra_medications < 0:
            raise ValueError("extra_medications must be 0 or more")
        if self.label_odds_ratio <= 0:
            raise ValueError("label_odds_ratio must be positive")
        if self.missing_lab_odds_ratio < 0:
            raise ValueError("missing_lab_odds_ratio must be 0 or more")

    def class_log_odds(self) -> np.ndarray:
        """The log odds ratio each drug class's events are shifted by."""
        return np.log([self.class_odds_ratio.get(name, 1.0) for name in DRUG_CLASSES])


@dataclass(frozen=True)
class _Patients:
    """Per-patient attributes, fixed for the whole simulation."""

    female: np.ndarray
    age_first: np.ndarray  # age at the first new prescription
    first_day: np.ndarray  # days from the start of the window (negative: burn-in)
    egfr_base: np.ndarray  # at the first prescription
    alt_base: np.ndarray
    medication_rate: np.ndarray  # the patient's usual number of concurrent medications
    gap_scale: np.ndarray  # multiplies the mean gap between new prescriptions
    susceptibility: np.ndarray  # unobserved

    @property
    def age_at_start(self) -> np.ndarray:
        """Age at the start of the window."""
        return self.age_first - self.first_day / 365.25


def _categorical(draw: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """One category per row from a uniform ``draw`` and per-row ``logits`` (inverse CDF),
    so changing the probabilities changes no other random draw."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    cumulative = probs.cumsum(axis=1)
    cumulative /= cumulative[:, -1:]
    return (draw[:, None] > cumulative).sum(axis=1).clip(max=logits.shape[1] - 1)


def _patients(
    rng: np.random.Generator, n_patients: int, first_day: float, last_day: float
) -> _Patients:
    """Draw the patients, each arriving (first prescription) uniformly in [first_day, last_day)."""
    age_first = np.clip(rng.normal(60.0, 17.0, n_patients), 18, 99)
    female = rng.random(n_patients) < 0.54
    # eGFR falls about 0.8 mL/min/1.73m² a year of age after 40 (chosen, CKD-EPI-like).
    egfr_base = np.clip(
        105.0 - 0.8 * np.maximum(age_first - 40, 0) + rng.normal(0, 15, n_patients), 5, 140
    )
    liver_disease = rng.random(n_patients) < 0.04
    alt_base = np.exp(np.log(22.0) + 1.1 * liver_disease + rng.normal(0, 0.35, n_patients))
    tendency = rng.normal(0.0, 0.45, n_patients)
    medication_rate = np.exp(np.log(4.0) + 0.015 * (age_first - 65) + tendency)
    return _Patients(
        female=female,
        age_first=age_first,
        first_day=rng.uniform(first_day, last_day, n_patients),
        egfr_base=egfr_base,
        alt_base=alt_base,
        medication_rate=medication_rate,
        gap_scale=np.exp(-0.5 * tendency),
        susceptibility=rng.normal(0.0, SUSCEPTIBILITY_SD, n_patients),
    )


def _risk_logit(
    age: np.ndarray,
    female: np.ndarray,
    egfr: np.ndarray,
    alt: np.ndarray,
    medications: np.ndarray,
    pairs: np.ndarray,
    prior: np.ndarray,
    drug_class: np.ndarray,
    setting: np.ndarray,
    susceptibility: np.ndarray,
    shift: Shift,
) -> np.ndarray:
    """The log-odds of an adverse drug event within 30 days (the module docstring's model)."""
    return (
        INTERCEPT
        + 0.01 * (age - 65)
        + 0.025 * np.maximum(age - 65, 0)
        + 0.10 * female
        + 0.25 * np.maximum(60 - egfr, 0) / 10
        + 0.45 * (alt > ALT_IMPAIRED)
        + 0.07 * medications
        + 0.40 * pairs
        + 0.35 * np.log1p(prior)
        + CLASS_RISK[drug_class]
        + 0.50 * (egfr < 45) * RENALLY_CLEARED[drug_class]
        + 0.03 * np.maximum(age - 70, 0) * (drug_class == OPIOID)
        + SETTING_RISK[setting]
        + susceptibility
        + shift.class_log_odds()[drug_class]
        + np.log(shift.label_odds_ratio)
    )


def _unmeasured(draws: np.ndarray, setting: np.ndarray, odds_ratio: float) -> dict[str, np.ndarray]:
    """Whether ALT and eGFR went unmeasured, from uniform ``draws`` (2 x rows)."""
    unmeasured = {}
    for draw, (lab, logit) in zip(
        draws, (("alt", ALT_MISSING_LOGIT), ("egfr", EGFR_MISSING_LOGIT)), strict=True
    ):
        odds = odds_ratio * np.exp(logit[setting])
        unmeasured[lab] = draw < odds / (1.0 + odds)
    return unmeasured


def generate(
    n_patients: int = 28_000,
    seed: int = 0,
    end: datetime | None = None,
    months: int = 24,
    shift: Shift | None = None,
    burn_in_months: int = 36,
) -> pd.DataFrame:
    """Generate the extract, one row per new prescription written in the window.

    Args:
        n_patients: number of patients simulated; each arrives (first new prescription)
            at a uniform time over the burn-in and the window, so only some have
            prescriptions in the window.
        seed: the same seed, ``end`` and arguments give the same frame.
        end: the end of the window (default: 2026-01-01 UTC, for determinism).
        months: length of the window.
        shift: distribution shifts to inject.
        burn_in_months: months simulated before the window and not emitted, so that
            ``prior_ades_365d`` starts near its steady state.

    Returns:
        Prescriptions sorted by time, with identifiers (``patient_id``,
        ``prescription_id``, ``date_of_birth``), timestamps (``event_timestamp`` =
        prescribing time, ``label_timestamp`` = 30 days later), features, the attribute
        ``age_band``, the label ``ade_30d`` (``yes``/``no``, null while unknown) and
        ``true_risk`` (the probability that ``ade_30d`` is ``yes``).
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    if months < 1 or burn_in_months < 0:
        raise ValueError("months must be at least 1 and burn_in_months at least 0")
    shift = shift or Shift()
    streams = np.random.default_rng(seed).spawn(4)
    rng, pairs_rng, extra_rng, outcome_rng = streams
    end_ts = pd.Timestamp(end or datetime(2026, 1, 1, tzinfo=UTC))
    end_ts = end_ts.tz_convert("UTC") if end_ts.tzinfo else end_ts.tz_localize("UTC")
    window_days = months * 365.25 / 12
    start = np.datetime64((end_ts - pd.Timedelta(days=window_days)).tz_localize(None), "s")
    patients = _patients(rng, n_patients, -burn_in_months * 365.25 / 12, window_days)
    weights = np.asarray(shift.drug_class_weights or CLASS_WEIGHTS, dtype=float)
    with np.errstate(divide="ignore"):  # a weight of 0 removes a class
        class_base = np.log(weights / weights.sum())

    # --- prescriptions, one step per prescription index -----------------------------
    next_day = patients.first_day.copy()
    known_events = np.full((n_patients, HISTORY), -np.inf)  # when each event became known
    events_so_far = np.zeros(n_patients, dtype=np.int64)
    buffers = Columns()
    while (ids := np.flatnonzero(next_day < window_days)).size:
        m = ids.size
        day = next_day[ids]
        age = patients.age_first[ids] + (day - patients.first_day[ids]) / 365.25
        known = known_events[ids]
        prior = ((known <= day[:, None]) & (known > day[:, None] - 365.0)).sum(axis=1)

        uniforms = rng.random((6, m))
        setting = _categorical(uniforms[0], SETTING_LOGIT + np.outer(age - 65, SETTING_AGE_TILT))
        drug_class = _categorical(uniforms[1], class_base + np.outer(age - 65, CLASS_AGE_TILT))
        years = (day - patients.first_day[ids]) / 365.25
        egfr = np.clip(patients.egfr_base[ids] - years + rng.normal(0, 5, m), 4, 150)
        alt = np.clip(patients.alt_base[ids] * np.exp(rng.normal(0, 0.2, m)), 4, 2000)
        medications = rng.poisson(
            patients.medication_rate[ids] * np.exp(SETTING_MEDICATIONS[setting])
        ) + extra_rng.poisson(shift.extra_medications, m)
        pairs = pairs_rng.binomial(medications, CLASS_INTERACTION_RATE[drug_class])
        female = patients.female[ids]
        logit = _risk_logit(
            age,
            female,
            egfr,
            alt,
            medications,
            pairs,
            prior,
            drug_class,
            setting,
            patients.susceptibility[ids],
            shift,
        )
        risk = sigmoid(logit)
        event = outcome_rng.random(m) < risk
        unmeasured = _unmeasured(uniforms[2:4], setting, shift.missing_lab_odds_ratio)

        # The event becomes known with its label, 30 days after the prescription.
        slot = events_so_far[ids[event]] % HISTORY
        known_events[ids[event], slot] = day[event] + LABEL_DELAY_DAYS
        events_so_far[ids[event]] += 1
        gap = 2.0 + GAP_DAYS * patients.gap_scale[ids] * -np.log1p(-uniforms[4])
        next_day[ids] = np.where(uniforms[5] < LEAVE_PROBABILITY, np.inf, day + gap)

        buffers.add(
            day >= 0.0,  # burn-in prescriptions only build the history
            patient=ids,
            day=day,
            age=age,
            egfr=np.where(unmeasured["egfr"], np.nan, egfr),
            alt=np.where(unmeasured["alt"], np.nan, alt),
            medications=medications,
            pairs=pairs,
            prior=prior,
            drug_class=drug_class,
            setting=setting,
            risk=risk,
            event=event,
        )

    return _assemble(buffers.concat(), rng, start, window_days, patients)


def _assemble(
    rx: dict[str, np.ndarray],
    rng: np.random.Generator,
    start: np.datetime64,
    window_days: float,
    patients: _Patients,
) -> pd.DataFrame:
    """The prescription buffers as a typed, time-ordered DataFrame."""
    patient = rx["patient"]
    n_patients = patients.female.size
    n = patient.size

    def at(days: np.ndarray) -> pd.DatetimeIndex:
        stamps = start + np.round(days * 86_400).astype("timedelta64[s]")
        return pd.DatetimeIndex(stamps).tz_localize("UTC")

    prescribed = at(rx["day"])
    label_time = prescribed + pd.Timedelta(days=LABEL_DELAY_DAYS)
    end = at(np.array([window_days]))[0]
    label = np.where(rx["event"], "yes", "no").astype(object)
    label[np.asarray(label_time > end)] = None  # the 30 days have not passed by the end

    patient_ids = np.array(
        [f"RX{v:08d}" for v in rng.choice(10**8, n_patients, replace=False)], dtype=object
    )
    birth_days = rng.integers(0, 365, n_patients)
    dob = (
        pd.DatetimeIndex(
            start
            - (patients.age_at_start * 365.25).astype("timedelta64[D]")
            + birth_days.astype("timedelta64[D]")
        )
        .normalize()
        .strftime("%Y-%m-%d")
        .to_numpy(dtype=object)
    )
    age = np.floor(rx["age"]).astype(np.int64)
    frame = pd.DataFrame(
        {
            "patient_id": patient_ids[patient],
            "prescription_id": np.array(
                [f"N{v:010d}" for v in rng.choice(10**10, n, replace=False)], dtype=object
            ),
            "date_of_birth": dob[patient],
            "event_timestamp": prescribed,
            "label_timestamp": label_time,
            "ade_30d": label,
            "age": age,
            "sex": np.where(patients.female[patient], "F", "M").astype(object),
            "egfr": np.round(rx["egfr"], 0),
            "alt": np.round(rx["alt"], 0),
            "concurrent_medications": rx["medications"].astype(np.int64),
            "drug_class": np.array(DRUG_CLASSES, dtype=object)[rx["drug_class"]],
            "interacting_pairs": rx["pairs"].astype(np.int64),
            "prior_ades_365d": rx["prior"].astype(np.int64),
            "care_setting": np.array(SETTINGS, dtype=object)[rx["setting"]],
            "age_band": np.array(AGE_BANDS, dtype=object)[np.digitize(age, [65, 80])],
            "true_risk": rx["risk"],
        }
    )
    return frame.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


def load(
    seed: int,
    now: datetime,
    n_patients: int = 28_000,
    months: int = 24,
    burn_in_months: int = 36,
    **shift: Any,
) -> pd.DataFrame:
    """The built-in loader: an extract ending at the start of ``now``'s UTC day.

    Ending at midnight keeps the extract identical for every run on the same day.
    Keyword arguments other than ``n_patients``, ``months`` and ``burn_in_months``
    build a :class:`Shift` (lists from a YAML spec are taken as tuples).
    """
    day = (
        pd.Timestamp(now).tz_convert("UTC").normalize()
        if pd.Timestamp(now).tzinfo
        else pd.Timestamp(now, tz="UTC").normalize()
    )
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in shift.items()}
    return generate(n_patients, seed, day.to_pydatetime(), months, Shift(**options), burn_in_months)
