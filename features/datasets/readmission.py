"""The ``readmission`` use case: a seeded synthetic EHR cohort for 30-day readmission.

Everything here is synthetic. Nothing is drawn from real patients.

The cohort
----------
``n_patients`` patients, each with a hospital (one of four, with different case mixes),
an age at the start of the window, a sex and four chronic conditions (diabetes, heart
failure, COPD, chronic kidney disease), plus an unobserved frailty. Their encounters are
generated in order over ``months`` months, so most patients have several:

- the first admission falls in the first three quarters of the window;
- each encounter draws a latent acuity (frailty, winter and the case-mix shift raise it),
  then the observed vitals (heart rate, systolic blood pressure, respiratory rate,
  temperature, SpO2) and labs (creatinine, haemoglobin, sodium, glucose, white cells)
  as noisy functions of acuity and the conditions, the length of stay and the discharge
  disposition;
- ``prior_admissions_365d`` counts the patient's admissions in the 365 days before this
  admission: a point-in-time aggregate, known at admission;
- the 30-day readmission risk is the risk model below; the outcome is drawn from it, and
  it decides when the next admission happens: within 1-30 days of discharge if
  readmitted, 30 days plus an exponential gap (mean 150 days) otherwise. So the label and
  the encounter history always agree.

The risk model (``true_risk``, exposed so tests can compute the oracle AUROC)::

    logit = -3.35 + 0.022 (age - 65) + 0.45 chf + 0.35 copd + 0.30 ckd + 0.20 diabetes
            + 0.55 acuity + 0.30 frailty
            + 0.40 log1p(prior_admissions_365d) (1 + 0.6 chf)          # interaction
            + 0.55 [sodium < 133] chf                                    # interaction
            + 0.35 [haemoglobin < 10] + 0.25 [glucose > 250 or < 60]     # thresholds
            + 0.25 sqrt(max(length_of_stay - 5, 0))                      # non-linear
            + disposition effect (home 0, home_health 0.25, skilled_nursing 0.55,
              rehab 0.35, against_advice 0.95) + site effect
            + log(label_odds_ratio)
    true_risk = sigmoid(logit)

Acuity and frailty are unobserved, so no model can reach the oracle AUROC. The base rate
is about 14%.

Encounters whose discharge would fall after ``end`` are left out: those patients are
still in hospital. Timestamps: features are known at discharge (``event_timestamp`` =
discharge time). The label becomes known 30 days after discharge (``label_timestamp``);
for encounters whose 30 days have not passed by ``end``, the label is missing (null), as
it would be in a live EHR extract.

Shifts (:class:`Shift`), each a parameter: the site mix, creatinine reported in µmol/L
instead of mg/dL, a winter case mix (more COPD and older patients, higher acuity), and the
label rate (an odds ratio on the risk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

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
CREATININE_MG_DL_TO_UMOL_L = 88.42
LABEL_DELAY_DAYS = 30
INTERCEPT = -3.35
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
        label_odds_ratio: multiplies the odds of readmission (1 = unchanged).
    """

    site_weights: tuple[float, ...] | None = None
    creatinine_unit: str = "mg/dL"
    winter_case_mix: float = 0.0
    label_odds_ratio: float = 1.0

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


@dataclass
class _Encounters:
    """Column buffers filled one generation step at a time."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **values: np.ndarray) -> None:
        for name, value in values.items():
            self.columns.setdefault(name, []).append(value)

    def concat(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.columns.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _is_winter(days: np.ndarray, start: np.datetime64) -> np.ndarray:
    months = (start + (days * 86_400).astype("timedelta64[s]")).astype("datetime64[M]")
    month = months.astype(int) % 12 + 1
    return np.isin(month, (12, 1, 2))


def generate(
    n_patients: int = 20_000,
    seed: int = 0,
    end: datetime | None = None,
    months: int = 24,
    shift: Shift | None = None,
) -> pd.DataFrame:
    """Generate the cohort, one row per encounter.

    Args:
        n_patients: number of patients.
        seed: the same seed, ``end`` and arguments give the same frame.
        end: the end of the window (default: 2026-01-01 UTC, for determinism).
        months: length of the window.
        shift: distribution shifts to inject.

    Returns:
        Encounters sorted by discharge time, with identifiers (``patient_id``,
        ``encounter_id``, ``date_of_birth``), timestamps (``admit_time``,
        ``event_timestamp`` = discharge, ``label_timestamp``), features, the label
        ``readmitted_30d`` (``yes``/``no``, null while unknown) and ``true_risk``.
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    shift = shift or Shift()
    rng = np.random.default_rng(seed)
    end_ts = pd.Timestamp(end or datetime(2026, 1, 1, tzinfo=UTC))
    end_ts = end_ts.tz_convert("UTC") if end_ts.tzinfo else end_ts.tz_localize("UTC")
    window_days = months * 365.25 / 12
    start = np.datetime64((end_ts - pd.Timedelta(days=window_days)).tz_localize(None), "s")

    # --- patients ---------------------------------------------------------------
    weights = np.asarray(shift.site_weights or SITE_WEIGHTS, dtype=float)
    site = rng.choice(len(SITES), n_patients, p=weights / weights.sum())
    age0 = np.clip(rng.normal(SITE_AGE_MEAN[site], 15.0), 18, 99)
    female = rng.random(n_patients) < 0.52
    frailty = rng.normal(0.0, 1.0, n_patients)
    conditions = {}
    for name, base in CONDITION_BASE.items():
        logit = base + 0.03 * (age0 - 62) + 0.3 * frailty + SITE_CONDITION_OFFSET[name][site]
        conditions[name] = (rng.random(n_patients) < _sigmoid(logit)).astype(np.int64)
    if shift.winter_case_mix > 0:
        # Winter pressure: COPD and older patients make up more of the admissions.
        tilt = shift.winter_case_mix * (1.5 * conditions["copd"] + 0.04 * (age0 - 62))
        chosen = rng.choice(n_patients, n_patients, p=np.exp(tilt) / np.exp(tilt).sum())
        site, age0, female, frailty = site[chosen], age0[chosen], female[chosen], frailty[chosen]
        conditions = {k: v[chosen] for k, v in conditions.items()}
    comorbidity_other = rng.poisson(np.clip(0.4 + 0.02 * (age0 - 50), 0.1, None))

    # --- encounters, one step per encounter index ----------------------------------
    next_admit = rng.uniform(0.0, 0.75 * window_days, n_patients)
    history = np.full((n_patients, HISTORY), -1e9)
    buffers = _Encounters()
    step = 0
    while True:
        ids = np.flatnonzero(next_admit < window_days)
        if ids.size == 0:
            break
        m = ids.size
        admit = next_admit[ids]
        prior = ((admit[:, None] - history[ids]) <= 365.0).sum(axis=1)
        winter = _is_winter(admit, start)
        chf, copd, ckd, dm = (conditions[k][ids] for k in ("chf", "copd", "ckd", "diabetes"))
        age = age0[ids] + admit / 365.25
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
        haemoglobin = 13.6 - 1.1 * female[ids] - 0.9 * ckd - 0.45 * acuity + rng.normal(0, 1.2, m)
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

        logit = (
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
        risk = _sigmoid(logit)
        readmitted = rng.random(m) < risk
        discharge = admit + los
        gap = np.where(readmitted, rng.uniform(1.0, 30.0, m), 30.0 + rng.exponential(150.0, m))
        history[ids, step % HISTORY] = admit
        next_admit[ids] = discharge + gap

        buffers.add(
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
            haemoglobin=haemoglobin,
            sodium=sodium,
            glucose=glucose,
            wbc=wbc,
            los=los,
            disposition=disposition,
            risk=risk,
            readmitted=readmitted,
        )
        step += 1

    enc = buffers.concat()
    # Patients still in hospital at the end of the window have no discharge yet.
    discharged = enc["discharge"] <= window_days
    enc = {name: values[discharged] for name, values in enc.items()}
    return _assemble(
        enc, rng, start, window_days, site, female, conditions, comorbidity_other, age0, shift
    )


def _assemble(
    enc: dict[str, np.ndarray],
    rng: np.random.Generator,
    start: np.datetime64,
    window_days: float,
    site: np.ndarray,
    female: np.ndarray,
    conditions: dict[str, np.ndarray],
    comorbidity_other: np.ndarray,
    age0: np.ndarray,
    shift: Shift,
) -> pd.DataFrame:
    """The encounter buffers as a typed, time-ordered DataFrame."""
    patient = enc["patient"]
    n_patients = site.size
    n = patient.size

    def at(days: np.ndarray) -> pd.DatetimeIndex:
        stamps = start + np.round(days * 86_400).astype("timedelta64[s]")
        return pd.DatetimeIndex(stamps).tz_localize("UTC")

    discharge = at(enc["discharge"])
    label_time = discharge + pd.Timedelta(days=LABEL_DELAY_DAYS)
    end = at(np.array([window_days]))[0]
    label = np.where(enc["readmitted"], "yes", "no").astype(object)
    label[np.asarray(label_time > end)] = None  # not known yet at the end of the window

    patient_ids = np.array(
        [f"PT{v:08d}" for v in rng.choice(10**8, n_patients, replace=False)], dtype=object
    )
    birth_days = rng.integers(0, 365, n_patients)
    dob = (
        pd.DatetimeIndex(
            start - (age0 * 365.25).astype("timedelta64[D]") + birth_days.astype("timedelta64[D]")
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
            "encounter_id": [f"E{v:010d}" for v in rng.choice(10**10, n, replace=False)],
            "date_of_birth": dob[patient],
            "admit_time": at(enc["admit"]),
            "event_timestamp": discharge,
            "label_timestamp": label_time,
            "readmitted_30d": label,
            "age": np.floor(enc["age"]).astype(np.int64),
            "sex": np.where(female[patient], "F", "M").astype(object),
            "site": np.array(SITES, dtype=object)[site[patient]],
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
                + comorbidity_other
            )[patient],
            "length_of_stay": np.round(enc["los"], 2),
            "discharge_disposition": np.array(DISPOSITIONS, dtype=object)[enc["disposition"]],
            "prior_admissions_365d": enc["prior"].astype(np.int64),
            "true_risk": enc["risk"],
        }
    )
    return frame.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


def load(
    seed: int, now: datetime, n_patients: int = 20_000, months: int = 24, **shift: object
) -> pd.DataFrame:
    """The built-in loader: a cohort ending at the start of ``now``'s UTC day.

    Ending at midnight keeps the cohort identical for every run on the same day.
    Keyword arguments other than ``n_patients`` and ``months`` build a :class:`Shift`.
    """
    day = (
        pd.Timestamp(now).tz_convert("UTC").normalize()
        if pd.Timestamp(now).tzinfo
        else pd.Timestamp(now, tz="UTC").normalize()
    )
    return generate(n_patients, seed, day.to_pydatetime(), months, Shift(**shift))  # type: ignore[arg-type]
