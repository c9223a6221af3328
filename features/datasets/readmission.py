"""The ``readmission`` use case: a seeded synthetic EHR cohort for 30-day readmission.

Everything here is synthetic. Nothing is drawn from real patients.

The cohort
----------
``n_patients`` patients are simulated, each with a hospital (one of four, with different
case mixes), an age at first admission, a sex and four chronic conditions (diabetes,
heart failure, COPD, chronic kidney disease), plus an unobserved frailty. First
admissions arrive at a constant rate over a burn-in of ``burn_in_months`` (48) before the
window and the ``months`` (24) of the window itself. Each patient's encounters follow in
order:

- each encounter draws a latent acuity (frailty, winter and the case-mix shift raise it),
  then the observed vitals (heart rate, systolic blood pressure, respiratory rate,
  temperature, SpO2) and labs (creatinine, haemoglobin, sodium, glucose, white cells)
  as noisy functions of acuity and the conditions, the length of stay and the discharge
  disposition;
- ``prior_admissions_365d`` counts the patient's admissions in the 365 days before this
  admission, burn-in ones included: a point-in-time aggregate, known at admission;
- within 30 days of discharge the patient dies with probability ``death``; a patient
  alive is readmitted with probability ``readmission``, 1-30 days after discharge.
  Otherwise the patient comes back with probability ``return``, 30 days plus an
  exponential gap (mean 60 days) after discharge, or never: patients leave. A patient
  who died has no later encounter. So the label and the encounter history always agree.

Burn-in encounters are simulated (they count in ``prior_admissions_365d``, and age
advances) but not emitted; the frame holds the encounters admitted in the window.

The risk models (logistic; ``true_risk`` is exposed so tests can compute the oracle
AUROC)::

    readmission: logit = -3.25 + 0.022 (age - 65) + 0.45 chf + 0.35 copd + 0.30 ckd
            + 0.20 diabetes + 0.55 acuity + 0.30 frailty
            + 0.40 log1p(prior_admissions_365d) (1 + 0.6 chf)          # interaction
            + 0.55 [sodium < 133] chf                                    # interaction
            + 0.35 [haemoglobin < 10] + 0.25 [glucose > 250 or < 60]     # thresholds
            + 0.25 sqrt(max(length_of_stay - 5, 0))                      # non-linear
            + disposition effect (home 0, home_health 0.25, skilled_nursing 0.55,
              rehab 0.35, against_advice 0.95) + site effect
            + log(label_odds_ratio)
    death:  logit = -4.3 + 0.06 (age - 65) + 0.45 acuity + 0.25 frailty + 0.55 chf
            + 0.30 copd + 0.30 ckd + disposition effect (home 0, home_health 0.2,
              skilled_nursing 0.6, rehab 0.1, against_advice 0.3)
    return: logit = 1.6 + 0.2 (chf + copd + ckd + diabetes)
    true_risk = readmission (1 - death)

``true_risk`` is exactly the probability that ``readmitted_30d`` is ``yes``: a
readmission needs the patient alive. ``died_30d`` (death within 30 days of discharge)
is an outcome, not a feature. Acuity and frailty are unobserved, so no model can reach
the oracle AUROC.

Missing labs: glucose, white cells and haemoglobin are not measured for every stay. The
log-odds of a missing value fall by 0.4 per unit of acuity, by 1.2 for glucose in
diabetics and by 0.6 for haemoglobin in CKD: missing at random given acuity and the
conditions. The risk models use the true values, so a missing value hides a number from
the extract and changes nothing else. Missing values are NaN.

Steady state: with constant arrivals, patients leaving and a 48-month burn-in, the window
starts near the population's steady state, so the case mix stays nearly flat over it.
Without a burn-in (``burn_in_months=0``) the history starts empty and the prior count
climbs over the window. What the defaults produce (cohort size, readmission and death
rates, missing labs, the drift across the window, the oracle AUROC) is measured in
docs/data.md, "readmission".

Encounters whose discharge would fall after ``end`` are left out: those patients are
still in hospital. Timestamps: features are known at discharge (``event_timestamp`` =
discharge time). The label becomes known 30 days after discharge (``label_timestamp``);
for encounters whose 30 days have not passed by ``end``, the label and ``died_30d`` are
missing (null), as they would be in a live EHR extract.

Shifts (:class:`Shift`), each a parameter: the site mix, creatinine reported in µmol/L
instead of mg/dL, a winter case mix (more COPD and older patients, higher acuity), the
label rate (an odds ratio on the readmission risk) and how often labs go unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from clinml.features.datasets.simulate import Columns, sigmoid

SITES = ["hosp_a", "hosp_b", "hosp_c", "hosp_d"]
# hosp_a: tertiary academic centre, sicker and older, more heart failure and CKD;
# hosp_b: community hospital, the average; hosp_c: rural, oldest, most COPD;
# hosp_d: urban safety-net, youngest, most diabetes, most self-discharges.
SITE_WEIGHTS = (0.35, 0.30, 0.20, 0.15)
SITE_AGE_MEAN = np.array([66.0, 62.0, 71.0, 54.0])
SITE_RISK = np.array([0.10, 0.0, 0.05, 0.15])
SITE_ACUITY = np.array([0.25, 0.0, 0.05, 0.10])
SITE_CONDITION_OFFSET = {  # log-odds added to each condition's prevalence, by site
    "diabetes": np.array([0.0, 0.0, -0.1, 0.6]),
    "chf": np.array([0.5, 0.0, 0.1, -0.2]),
    "copd": np.array([0.0, 0.0, 0.6, 0.1]),
    "ckd": np.array([0.4, 0.0, 0.0, 0.1]),
}
CONDITION_BASE = {"diabetes": -1.2, "chf": -2.0, "copd": -2.0, "ckd": -2.2}
DISPOSITIONS = ["home", "home_health", "skilled_nursing", "rehab", "against_advice"]
DISPOSITION_RISK = np.array([0.0, 0.25, 0.55, 0.35, 0.95])
DISPOSITION_DEATH = np.array([0.0, 0.2, 0.6, 0.1, 0.3])
CREATININE_MG_DL_TO_UMOL_L = 88.42
LABEL_DELAY_DAYS = 30
INTERCEPT = -3.25  # readmission, for a patient alive 30 days after discharge
DEATH_INTERCEPT = -4.3  # death within 30 days of discharge
RETURN_INTERCEPT = 1.6  # a later admission, after a discharge without readmission or death
RETURN_CONDITION = 0.2  # ... more likely with each chronic condition
RETURN_GAP_DAYS = 60.0  # mean delay of that admission beyond the first 30 days
LAB_MISSING_INTERCEPT = {"glucose": -1.5, "wbc": -2.45, "haemoglobin": -2.9}
HISTORY = 48  # admissions remembered per patient for the 365-day count


@dataclass(frozen=True)
class Shift:
    """Distribution shifts to inject; the defaults inject none.

    Attributes:
        site_weights: patient share per site (``SITES`` order) instead of the default.
        creatinine_unit: ``"umol/L"`` reports creatinine in µmol/L (x88.42), as a lab
            that changed its reporting would.
        winter_case_mix: 0 (none) to 1 (full): more COPD and older patients are
            admitted, and acuity is higher.
        label_odds_ratio: multiplies the odds of readmission among patients alive 30
            days after discharge (1 = unchanged).
        missing_lab_odds_ratio: multiplies the odds that glucose, white cells and
            haemoglobin go unmeasured, as a change in ordering practice would (0 = every
            lab measured, 1 = unchanged). Nothing else changes: the same seed gives the
            same patients, values and outcomes.
    """

    site_weights: tuple[float, ...] | None = None
    creatinine_unit: str = "mg/dL"
    winter_case_mix: float = 0.0
    label_odds_ratio: float = 1.0
    missing_lab_odds_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.site_weights is not None and (
            len(self.site_weights) != len(SITES) or min(self.site_weights) < 0
        ):
            raise ValueError(f"site_weights needs {len(SITES)} non-negative weights")
        if self.creatinine_unit not in {"mg/dL", "umol/L"}:
            raise ValueError("creatinine_unit must be 'mg/dL' or 'umol/L'")
        if not 0.0 <= self.winter_case_mix <= 1.0:
            raise ValueError("winter_case_mix must be between 0 and 1")
        if self.label_odds_ratio <= 0:
            raise ValueError("label_odds_ratio must be positive")
        if self.missing_lab_odds_ratio < 0:
            raise ValueError("missing_lab_odds_ratio must be 0 or more")


@dataclass(frozen=True)
class _Patients:
    """Per-patient attributes, fixed for the whole simulation."""

    site: np.ndarray
    female: np.ndarray
    frailty: np.ndarray  # unobserved
    conditions: dict[str, np.ndarray]
    comorbidity_other: np.ndarray
    first_admit: np.ndarray  # days from the start of the window (negative: burn-in)
    age_first: np.ndarray  # age at the first admission

    @property
    def age_at_start(self) -> np.ndarray:
        """Age at the start of the window."""
        return self.age_first - self.first_admit / 365.25


def _is_winter(days: np.ndarray, start: np.datetime64) -> np.ndarray:
    months = (start + (days * 86_400).astype("timedelta64[s]")).astype("datetime64[M]")
    month = months.astype(int) % 12 + 1
    return np.isin(month, (12, 1, 2))


def _patients(
    rng: np.random.Generator, n_patients: int, first_day: float, last_day: float, shift: Shift
) -> _Patients:
    """Draw the patients, each arriving (first admission) uniformly in [first_day, last_day)."""
    weights = np.asarray(shift.site_weights or SITE_WEIGHTS, dtype=float)
    site = rng.choice(len(SITES), n_patients, p=weights / weights.sum())
    age_first = np.clip(rng.normal(SITE_AGE_MEAN[site], 15.0), 18, 99)
    female = rng.random(n_patients) < 0.52
    frailty = rng.normal(0.0, 1.0, n_patients)
    conditions = {}
    for name, base in CONDITION_BASE.items():
        logit = base + 0.03 * (age_first - 62) + 0.3 * frailty + SITE_CONDITION_OFFSET[name][site]
        conditions[name] = (rng.random(n_patients) < sigmoid(logit)).astype(np.int64)
    if shift.winter_case_mix > 0:
        # Winter pressure: COPD and older patients make up more of the admissions.
        tilt = shift.winter_case_mix * (1.5 * conditions["copd"] + 0.04 * (age_first - 62))
        chosen = rng.choice(n_patients, n_patients, p=np.exp(tilt) / np.exp(tilt).sum())
        site, age_first = site[chosen], age_first[chosen]
        female, frailty = female[chosen], frailty[chosen]
        conditions = {k: v[chosen] for k, v in conditions.items()}
    comorbidity_other = rng.poisson(np.clip(0.4 + 0.02 * (age_first - 50), 0.1, None))
    first_admit = rng.uniform(first_day, last_day, n_patients)
    return _Patients(site, female, frailty, conditions, comorbidity_other, first_admit, age_first)


def _unmeasured(
    rng: np.random.Generator,
    acuity: np.ndarray,
    diabetes: np.ndarray,
    ckd: np.ndarray,
    odds_ratio: float,
) -> dict[str, np.ndarray]:
    """Which labs went unmeasured, per lab: less often the sicker the patient.

    Glucose is checked for most diabetics and haemoglobin in CKD. ``odds_ratio``
    multiplies every lab's odds of going unmeasured.
    """
    logits = {
        "glucose": LAB_MISSING_INTERCEPT["glucose"] - 1.2 * diabetes - 0.4 * acuity,
        "wbc": LAB_MISSING_INTERCEPT["wbc"] - 0.4 * acuity,
        "haemoglobin": LAB_MISSING_INTERCEPT["haemoglobin"] - 0.6 * ckd - 0.4 * acuity,
    }
    draws = rng.random((len(logits), acuity.size))
    unmeasured = {}
    for draw, (lab, logit) in zip(draws, logits.items(), strict=True):
        odds = odds_ratio * np.exp(logit)
        unmeasured[lab] = draw < odds / (1.0 + odds)
    return unmeasured


def generate(
    n_patients: int = 20_000,
    seed: int = 0,
    end: datetime | None = None,
    months: int = 24,
    shift: Shift | None = None,
    burn_in_months: int = 48,
) -> pd.DataFrame:
    """Generate the cohort, one row per encounter admitted in the window.

    Args:
        n_patients: number of patients simulated; each arrives (first admission) at a
            uniform time over the burn-in and the window, so only some have encounters
            in the window.
        seed: the same seed, ``end`` and arguments give the same frame.
        end: the end of the window (default: 2026-01-01 UTC, for determinism).
        months: length of the window.
        shift: distribution shifts to inject.
        burn_in_months: months simulated before the window and not emitted, so that
            the population and ``prior_admissions_365d`` start near their steady state.

    Returns:
        Encounters sorted by discharge time, with identifiers (``patient_id``,
        ``encounter_id``, ``date_of_birth``), timestamps (``admit_time``,
        ``event_timestamp`` = discharge, ``label_timestamp``), features, the label
        ``readmitted_30d`` and ``died_30d`` (``yes``/``no``, null while unknown) and
        ``true_risk`` (the probability that ``readmitted_30d`` is ``yes``).
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    if months < 1 or burn_in_months < 0:
        raise ValueError("months must be at least 1 and burn_in_months at least 0")
    shift = shift or Shift()
    rng = np.random.default_rng(seed)
    end_ts = pd.Timestamp(end or datetime(2026, 1, 1, tzinfo=UTC))
    end_ts = end_ts.tz_convert("UTC") if end_ts.tzinfo else end_ts.tz_localize("UTC")
    window_days = months * 365.25 / 12
    start = np.datetime64((end_ts - pd.Timedelta(days=window_days)).tz_localize(None), "s")
    patients = _patients(rng, n_patients, -burn_in_months * 365.25 / 12, window_days, shift)
    site, frailty, conditions = patients.site, patients.frailty, patients.conditions

    # --- encounters, one step per encounter index ----------------------------------
    # Every patient's first admission is before the end, so step k holds the k-th
    # encounter of every patient still coming back.
    next_admit = patients.first_admit.copy()
    history = np.full((n_patients, HISTORY), -np.inf)
    buffers = Columns()
    step = 0
    while (ids := np.flatnonzero(next_admit < window_days)).size:
        m = ids.size
        admit = next_admit[ids]
        prior = ((admit[:, None] - history[ids]) <= 365.0).sum(axis=1)
        winter = _is_winter(admit, start)
        chf, copd, ckd, dm = (conditions[k][ids] for k in ("chf", "copd", "ckd", "diabetes"))
        age = patients.age_first[ids] + (admit - patients.first_admit[ids]) / 365.25
        acuity = rng.normal(
            0.35 * frailty[ids]
            + SITE_ACUITY[site[ids]]
            + 0.15 * winter
            + 0.5 * shift.winter_case_mix,
            1.0,
        )
        heart_rate = 82 + 7 * acuity + 4 * chf + rng.normal(0, 9, m)
        systolic_bp = 132 - 7 * acuity + 0.25 * (age - 62) - 6 * chf + rng.normal(0, 15, m)
        resp_rate = 17 + 1.6 * acuity + 2.5 * copd + rng.normal(0, 2.2, m)
        temperature = 36.9 + 0.3 * acuity + rng.normal(0, 0.45, m)
        spo2 = 96.5 - 1.3 * acuity - 3.0 * copd + rng.normal(0, 1.5, m)
        creatinine = np.exp(
            np.log(0.95) + 0.75 * ckd + 0.12 * acuity + 0.004 * (age - 62) + rng.normal(0, 0.22, m)
        )
        female = patients.female[ids]
        haemoglobin = 13.6 - 1.1 * female - 0.9 * ckd - 0.45 * acuity + rng.normal(0, 1.2, m)
        sodium = 139 - 1.2 * acuity - 2.0 * chf + rng.normal(0, 3.0, m)
        glucose = np.exp(
            np.log(108) + 0.35 * dm + 0.06 * acuity + rng.normal(0, 0.25 + 0.15 * dm, m)
        )
        wbc = np.exp(np.log(8.0) + 0.12 * acuity + rng.normal(0, 0.3, m))
        los = np.exp(np.log(3.2) + 0.3 * acuity + 0.006 * (age - 62) + rng.normal(0, 0.55, m))
        disposition_logits = np.column_stack(
            [
                np.zeros(m),
                -1.2 + 0.03 * (age - 62) + 0.3 * acuity,
                -2.6 + 0.06 * (age - 62) + 0.5 * acuity + 0.4 * chf,
                -2.8 + 0.04 * (age - 62) + 0.4 * acuity,
                -3.8 - 0.03 * (age - 62) + 1.2 * (site[ids] == 3),
            ]
        )
        probs = np.exp(disposition_logits)
        probs /= probs.sum(axis=1, keepdims=True)
        disposition = (rng.random(m)[:, None] > probs.cumsum(axis=1)).sum(axis=1).clip(max=4)

        # The risk models use the true lab values: whether a lab was measured (drawn
        # below whatever the odds, so that a shift in them changes no other draw) only
        # hides a value from the extract.
        readmission_logit = (
            INTERCEPT
            + 0.022 * (age - 65)
            + 0.45 * chf
            + 0.35 * copd
            + 0.30 * ckd
            + 0.20 * dm
            + 0.55 * acuity
            + 0.30 * frailty[ids]
            + 0.40 * np.log1p(prior) * (1 + 0.6 * chf)
            + 0.55 * (sodium < 133) * chf
            + 0.35 * (haemoglobin < 10)
            + 0.25 * ((glucose > 250) | (glucose < 60))
            + 0.25 * np.sqrt(np.maximum(los - 5, 0))
            + DISPOSITION_RISK[disposition]
            + SITE_RISK[site[ids]]
            + np.log(shift.label_odds_ratio)
        )
        death_logit = (
            DEATH_INTERCEPT
            + 0.06 * (age - 65)
            + 0.45 * acuity
            + 0.25 * frailty[ids]
            + 0.55 * chf
            + 0.30 * copd
            + 0.30 * ckd
            + DISPOSITION_DEATH[disposition]
        )
        return_logit = RETURN_INTERCEPT + RETURN_CONDITION * (chf + copd + ckd + dm)
        readmission, death = sigmoid(readmission_logit), sigmoid(death_logit)
        died = rng.random(m) < death
        readmitted = ~died & (rng.random(m) < readmission)
        returns = readmitted | (~died & (rng.random(m) < sigmoid(return_logit)))
        discharge = admit + los
        gap = np.where(
            readmitted, rng.uniform(1.0, 30.0, m), 30.0 + rng.exponential(RETURN_GAP_DAYS, m)
        )
        history[ids, step % HISTORY] = admit
        next_admit[ids] = np.where(returns, discharge + gap, np.inf)
        unmeasured = _unmeasured(rng, acuity, dm, ckd, shift.missing_lab_odds_ratio)

        buffers.add(
            admit >= 0.0,  # burn-in encounters only build the history
            patient=ids,
            admit=admit,
            discharge=discharge,
            prior=prior,
            age=age,
            heart_rate=heart_rate,
            systolic_bp=systolic_bp,
            resp_rate=resp_rate,
            temperature=temperature,
            spo2=spo2,
            creatinine=creatinine,
            haemoglobin=np.where(unmeasured["haemoglobin"], np.nan, haemoglobin),
            sodium=sodium,
            glucose=np.where(unmeasured["glucose"], np.nan, glucose),
            wbc=np.where(unmeasured["wbc"], np.nan, wbc),
            los=los,
            disposition=disposition,
            # A readmission needs the patient alive: P(yes) = P(alive) P(readmitted | alive).
            risk=readmission * (1.0 - death),
            readmitted=readmitted,
            died=died,
        )
        step += 1

    enc = buffers.concat()
    # Patients still in hospital at the end of the window have no discharge yet.
    discharged = enc["discharge"] <= window_days
    enc = {name: values[discharged] for name, values in enc.items()}
    return _assemble(enc, rng, start, window_days, patients, shift)


def _assemble(
    enc: dict[str, np.ndarray],
    rng: np.random.Generator,
    start: np.datetime64,
    window_days: float,
    patients: _Patients,
    shift: Shift,
) -> pd.DataFrame:
    """The encounter buffers as a typed, time-ordered DataFrame."""
    patient = enc["patient"]
    n_patients = patients.site.size
    n = patient.size
    conditions = patients.conditions

    def at(days: np.ndarray) -> pd.DatetimeIndex:
        stamps = start + np.round(days * 86_400).astype("timedelta64[s]")
        return pd.DatetimeIndex(stamps).tz_localize("UTC")

    discharge = at(enc["discharge"])
    label_time = discharge + pd.Timedelta(days=LABEL_DELAY_DAYS)
    end = at(np.array([window_days]))[0]
    unknown = np.asarray(label_time > end)  # the 30 days have not passed by the end
    label = np.where(enc["readmitted"], "yes", "no").astype(object)
    label[unknown] = None
    died = np.where(enc["died"], "yes", "no").astype(object)
    died[unknown] = None

    patient_ids = np.array(
        [f"PT{v:08d}" for v in rng.choice(10**8, n_patients, replace=False)], dtype=object
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
    creatinine = enc["creatinine"]
    if shift.creatinine_unit == "umol/L":
        creatinine = creatinine * CREATININE_MG_DL_TO_UMOL_L

    frame = pd.DataFrame(
        {
            "patient_id": patient_ids[patient],
            "encounter_id": np.array(
                [f"E{v:010d}" for v in rng.choice(10**10, n, replace=False)], dtype=object
            ),
            "date_of_birth": dob[patient],
            "admit_time": at(enc["admit"]),
            "event_timestamp": discharge,
            "label_timestamp": label_time,
            "readmitted_30d": label,
            "died_30d": died,
            "age": np.floor(enc["age"]).astype(np.int64),
            "sex": np.where(patients.female[patient], "F", "M").astype(object),
            "site": np.array(SITES, dtype=object)[patients.site[patient]],
            "heart_rate": np.round(np.clip(enc["heart_rate"], 30, 220), 0),
            "systolic_bp": np.round(np.clip(enc["systolic_bp"], 60, 250), 0),
            "resp_rate": np.round(np.clip(enc["resp_rate"], 6, 50), 0),
            "temperature": np.round(np.clip(enc["temperature"], 34.0, 42.0), 1),
            "spo2": np.round(np.clip(enc["spo2"], 70, 100), 0),
            "creatinine": np.round(creatinine, 2),
            "haemoglobin": np.round(np.clip(enc["haemoglobin"], 4.0, 20.0), 1),
            "sodium": np.round(np.clip(enc["sodium"], 115, 165), 0),
            "glucose": np.round(np.clip(enc["glucose"], 30, 900), 0),
            "wbc": np.round(np.clip(enc["wbc"], 0.5, 60), 1),
            "diabetes": conditions["diabetes"][patient],
            "heart_failure": conditions["chf"][patient],
            "copd": conditions["copd"][patient],
            "ckd": conditions["ckd"][patient],
            "comorbidity_count": (
                conditions["diabetes"]
                + conditions["chf"]
                + conditions["copd"]
                + conditions["ckd"]
                + patients.comorbidity_other
            )[patient],
            "length_of_stay": np.round(enc["los"], 2),
            "discharge_disposition": np.array(DISPOSITIONS, dtype=object)[enc["disposition"]],
            "prior_admissions_365d": enc["prior"].astype(np.int64),
            "true_risk": enc["risk"],
        }
    )
    return frame.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


def load(
    seed: int,
    now: datetime,
    n_patients: int = 20_000,
    months: int = 24,
    burn_in_months: int = 48,
    **shift: object,
) -> pd.DataFrame:
    """The built-in loader: a cohort ending at the start of ``now``'s UTC day.

    Ending at midnight keeps the cohort identical for every run on the same day.
    Keyword arguments other than ``n_patients``, ``months`` and ``burn_in_months``
    build a :class:`Shift`.
    """
    day = (
        pd.Timestamp(now).tz_convert("UTC").normalize()
        if pd.Timestamp(now).tzinfo
        else pd.Timestamp(now, tz="UTC").normalize()
    )
    shifts = Shift(**shift)  # type: ignore[arg-type]
    return generate(n_patients, seed, day.to_pydatetime(), months, shifts, burn_in_months)
