"""How well the monitor itself works: false alarms and detection on the seeded generators.

The monitor is judged the way it runs: :func:`clinml.monitoring.drift.run` on windows of
consecutive rows, as a service's prediction log would hold them, against a champion's
training reference, and :func:`clinml.monitoring.performance.performance_by_window` on
the same windows once their labels are known.

Each use case is a :class:`Cohort`: how to make one seeded system of it (its generator at
a realistic service's size), its window sizes, the ways a window differs from a random
sample of the training year without a shift (quiet conditions), the shifts with their
doses, and the smallest dose of each that is clinically meaningful. :data:`COHORTS`
holds ``readmission``, ``noshow`` and ``ade``; every function finds the cohort from the
spec's name.

The stand-in champion (a histogram gradient-boosting model: what is evaluated is the
monitor, not the model) is trained on the first year of one seeded system; every window
comes from the second year of another seed, each window's system its own seed.

Readmission (:data:`READMISSION`). The health system discharges about 100 000 patients a
year (``SYSTEM_PATIENTS`` simulated), so a window of 500 rows is two days, 2 000 a week,
10 000 five weeks and 50 000 half a year, with the repeat patients such windows hold.
Windows without a shift (:data:`QUIET`):

- ``consecutive``: consecutive discharges from any week of the year;
- ``winter``: windows starting in December or January, against the whole year (the
  generator's winters raise acuity), and ``winter, seasonal reference``: the same
  windows against the training rows of the same weeks (``monitoring.reference: seasonal``);
- ``one site``: the service of the largest hospital alone, with
  ``monitoring.population: {site: [hosp_a]}``.

Shifts (:data:`SHIFTS`), each with a dose, for the dose-response curves:

- ``site mix``: patients thinned by site towards shares 10/15/25/50% (from 35/30/20/15%);
  the dose is the mixing weight, so the site shares move by a total variation of 0.4 ×
  dose;
- ``case mix``: the generator's winter surge (more COPD, older patients, higher acuity)
  at ``winter_case_mix`` = dose;
- ``sodium offset``: an analyser reads sodium high by dose × the reference SD;
- ``lab units``: a share (dose) of creatinine results reported in µmol/L;
- ``label rate``: the odds of readmission multiplied by 1 + dose at the same features,
  which only labelled performance can see.

No-shows (:data:`NOSHOW`) and adverse drug events (:data:`ADE`): their cohorts say what
their systems, conditions and shifts are; docs/monitoring.md explains the meaningful sizes.

``tests/model/test_monitor_power.py`` (and ``_noshow``, ``_ade``) assert small versions;
``bench/monitor_eval.py --usecase NAME`` writes the tables and the plot in
docs/monitoring.md; ``bench/monitor_bench.py`` times the monitor on its windows.
It is a harness for judging the monitor, not part of it, so it lives in bench/ (the
product never imports it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clinml.spec import UseCaseSpec

NOW = datetime(2026, 11, 1, tzinfo=UTC)
REFERENCE_SEED = 2024
REFERENCE_ROWS = 50_000  # clinml.training.train.REFERENCE_MAX_ROWS
DRIFT_KINDS = ("data_drift", "prediction_drift", "data_quality", "subgroup_drift")
CONSECUTIVE = "consecutive"  # the first quiet condition of every cohort: dose 0 of a shift
SEASONAL = "winter, seasonal reference"

# --- readmission ------------------------------------------------------------------------
SYSTEM_PATIENTS = 100_000
SIZES = (500, 2_000, 10_000, 50_000)
DOSE_SIZES = (2_000, 10_000)  # a week and five weeks
TARGET_SITE_SHARES = np.array([0.10, 0.15, 0.25, 0.50])
LARGEST_SITE = "hosp_a"
QUIET = ("consecutive", "winter", "winter, seasonal reference", "one site")
SHIFTS: dict[str, tuple[float, ...]] = {
    "site mix": (0.0, 0.125, 0.25, 0.375, 0.5),
    "case mix": (0.0, 0.1, 0.2, 0.3, 0.45, 0.6),
    "sodium offset": (0.0, 0.1, 0.2, 0.3, 0.45),
    "lab units": (0.0, 0.002, 0.01, 0.05),
    "label rate": (0.0, 1.0),
}
# Shifts the generator makes (a new system per dose): its parameter and value at a dose.
GENERATED: dict[str, tuple[str, Callable[[float], Any]]] = {
    "case mix": ("winter_case_mix", lambda dose: dose),
    "label rate": ("label_odds_ratio", lambda dose: 1.0 + dose),
}
# The smallest dose of each shift docs/monitoring.md calls clinically meaningful (why:
# there); detection there should be at least 95%.
MEANINGFUL = {"site mix": 0.375, "case mix": 0.45, "sodium offset": 0.3, "lab units": 0.002}
# A shift no feature shows (the odds of readmission double at the same features, e.g. a
# change in discharge practice): only labelled performance can see it.
UNSEEN = ("label rate",)


@dataclass(frozen=True)
class WindowOutcome:
    condition: str  # a quiet condition, or a shift
    dose: float
    size: int  # as planned (one site has fewer rows than the largest size)
    rows: int
    seed: int
    drift_alerts: list[str]  # kinds among DRIFT_KINDS
    enough_data: bool
    patients: float  # effective patients in the window
    performance_alert: bool
    judged: bool
    features: list[str]  # the features that alerted

    @property
    def alarmed(self) -> bool:
        return bool(self.drift_alerts)


@dataclass
class Reference:
    """The stand-in champion: the model, its training snapshot, its held-out answers."""

    model: Any
    features: pd.DataFrame  # training rows: features, _cluster, _week, in-sample probability
    held_out: pd.DataFrame  # test patients: probability, outcome, _cluster, _week, population
    threshold: float


# A shift made on the rows before a window is cut (patients dropped): (rows, dose, seed).
Thinning = Callable[[pd.DataFrame, float, int], pd.DataFrame]
# A shift made on a window's rows: (rows, dose, rng, reference) -> rows.
Injection = Callable[[pd.DataFrame, float, np.random.Generator, Reference], pd.DataFrame]


@dataclass(frozen=True)
class Population:
    """A quiet condition that monitors one part of the service: its rows and the spec's
    ``monitoring.population`` that says so."""

    condition: str  # e.g. "one site"
    column: str
    value: str


@dataclass(frozen=True)
class Cohort:
    """One use case's evaluation: its system, windows, quiet conditions and shifts.

    Attributes:
        name: the use case (spec and generator name).
        system_patients: patients simulated per system (``n_patients``), chosen so a year
            is a realistic service.
        sizes: window sizes (rows) of the quiet conditions.
        dose_sizes: window sizes of the shifts.
        quiet: conditions without a shift; the first is ``consecutive``, conditions
            starting with ``winter`` take windows starting in December or January.
        population: the quiet condition that watches one part of the service, if any.
        shifts: each shift's doses (0 is the consecutive condition).
        generated: shifts the generator makes: its ``Shift`` parameter and its value
            at a dose (a new system per dose and window).
        thinned: shifts made by dropping patients before the window is cut.
        injected: shifts made on the window's rows.
        meaningful: the smallest clinically meaningful dose of each shift a drift alert
            should find (docs/monitoring.md says why).
        unseen: shifts no feature shows, judged by labelled performance.
        known_outcomes_only: drop the rows whose outcome is not known by the end of the
            system (the generator's last label horizon), so labelled performance sees
            only real outcomes. False for readmission, whose published figures counted
            those rows as negatives.
    """

    name: str
    system_patients: int
    sizes: tuple[int, ...]
    dose_sizes: tuple[int, ...]
    quiet: tuple[str, ...]
    population: Population | None
    shifts: dict[str, tuple[float, ...]]
    generated: dict[str, tuple[str, Callable[[float], Any]]]
    thinned: dict[str, Thinning]
    injected: dict[str, Injection]
    meaningful: dict[str, float]
    unseen: tuple[str, ...]
    known_outcomes_only: bool = True


def _frame(rows: pd.DataFrame, spec: UseCaseSpec) -> pd.DataFrame:
    x = rows[spec.feature_names].copy()
    for column in spec.features:
        if column.type == "category":
            x[column.name] = pd.Categorical(x[column.name], categories=column.categories)
    return x


def system(spec: UseCaseSpec, seed: int, **shift: Any) -> pd.DataFrame:
    """Two years of one seeded system of the spec's use case, in time order."""
    from clinml.features.datasets import LOADERS

    cohort = COHORTS[spec.name]
    rows = LOADERS[spec.name](
        seed=seed, now=NOW, n_patients=cohort.system_patients, months=24, **shift
    )
    if cohort.known_outcomes_only:
        rows = rows[rows[spec.label.column].notna()]
    rows = rows.sort_values("event_timestamp", kind="stable").reset_index(drop=True)
    return rows.assign(outcome=(rows[spec.label.column] == spec.label.positive_class) * 1)


def _second_year(cohort: pd.DataFrame) -> pd.DataFrame:
    start = cohort["event_timestamp"].min() + pd.Timedelta(days=365)
    return cohort[cohort["event_timestamp"] >= start].reset_index(drop=True)


def _monitoring_keys(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    from clinml.training.reference import CLUSTER_COLUMN, WEEK_COLUMN

    weeks = pd.to_datetime(rows["event_timestamp"], utc=True).dt.isocalendar().week
    return {
        CLUSTER_COLUMN: pd.factorize(rows["patient_id"])[0],
        WEEK_COLUMN: weeks.to_numpy(dtype=np.int16),
    }


def fit_reference(spec: UseCaseSpec) -> Reference:
    """Train the stand-in champion on the first year of the reference system, as
    clinml's training would: 80% of patients, a reference of at most 50 000 of their
    rows (features and attributes), held-out probabilities of the other 20%."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    population = COHORTS[spec.name].population
    cohort = system(spec, REFERENCE_SEED)
    first = cohort[
        cohort["event_timestamp"] < cohort["event_timestamp"].min() + pd.Timedelta(days=365)
    ]
    patients = first["patient_id"].unique()
    rng = np.random.default_rng(REFERENCE_SEED)
    test_patients = set(rng.choice(patients, size=len(patients) // 5, replace=False))
    is_test = first["patient_id"].isin(test_patients).to_numpy()
    train, test = first[~is_test], first[is_test]
    model = HistGradientBoostingClassifier(
        categorical_features="from_dtype", max_iter=200, learning_rate=0.05, random_state=0
    ).fit(_frame(train, spec), train["outcome"])
    probability = model.predict_proba(_frame(test, spec))[:, 1]
    held_out = pd.DataFrame(
        {
            "probability": probability,
            "outcome": test["outcome"].to_numpy(),
            **({population.column: test[population.column].to_numpy()} if population else {}),
            **_monitoring_keys(test),
        }
    )
    rule = spec.evaluation
    if rule.max_alerts_per_100 is not None:
        threshold = float(np.quantile(probability, 1 - rule.max_alerts_per_100 / 100))
    else:
        threshold = float(rule.operating_threshold or 0.5)
    rows = train.sample(min(REFERENCE_ROWS, len(train)), random_state=REFERENCE_SEED)
    columns = [*spec.feature_names, *(a.name for a in spec.attributes)]
    features = rows[columns].assign(
        probability=model.predict_proba(_frame(rows, spec))[:, 1], **_monitoring_keys(rows)
    )
    return Reference(model, features.reset_index(drop=True), held_out, threshold)


def _consecutive(rows: pd.DataFrame, size: int, rng: np.random.Generator) -> pd.DataFrame:
    start = int(rng.integers(0, max(len(rows) - size, 0) + 1))
    return rows.iloc[start : start + size]


def _winter(rows: pd.DataFrame, size: int, rng: np.random.Generator) -> pd.DataFrame:
    months = rows["event_timestamp"].dt.month.to_numpy()
    starts = np.flatnonzero(np.isin(months, (12, 1)))
    start = int(rng.choice(starts[starts <= max(len(rows) - size, 0)] if size < len(rows) else [0]))
    return rows.iloc[start : start + size]


def window(
    spec: UseCaseSpec,
    reference: Reference,
    year: pd.DataFrame,
    condition: str,
    dose: float,
    size: int,
    seed: int,
) -> pd.DataFrame:
    """One window as the prediction log would hold it, with the outcomes that arrive."""
    cohort = COHORTS[spec.name]
    rng = np.random.default_rng(seed)
    rows = year
    if condition in cohort.thinned:
        rows = cohort.thinned[condition](rows, dose, seed)
    elif cohort.population and condition == cohort.population.condition:
        rows = rows[rows[cohort.population.column] == cohort.population.value]
    take = _winter if condition.startswith("winter") else _consecutive
    rows = take(rows.reset_index(drop=True), size, rng).copy()
    if condition in cohort.injected:
        rows = cohort.injected[condition](rows, dose, rng, reference)
    probability = reference.model.predict_proba(_frame(rows, spec))[:, 1]
    positive, negative = spec.label.positive_class, spec.label.negative_class
    return rows[spec.feature_names].assign(
        time=rows["event_timestamp"].to_numpy(),
        request_id=[f"r{seed}-{i}" for i in range(len(rows))],
        model_version="1",
        patient=rows["patient_id"].astype(str).to_numpy(),
        probability=probability,
        label=np.where(probability >= reference.threshold, positive, negative),
        outcome=rows["outcome"].to_numpy(),
    )


def monitored_spec(spec: UseCaseSpec, condition: str) -> UseCaseSpec:
    """The spec a team would run for this condition (seasonal reference, one part of
    the service)."""
    population = COHORTS[spec.name].population
    monitoring = spec.monitoring
    if condition == SEASONAL:
        monitoring = monitoring.model_copy(update={"reference": "seasonal"})
    elif population and condition == population.condition:
        monitoring = monitoring.model_copy(
            update={"population": {population.column: [population.value]}}
        )
    return spec.model_copy(update={"monitoring": monitoring})


def judge(
    spec: UseCaseSpec,
    reference: Reference,
    current: pd.DataFrame,
    condition: str,
    dose: float,
    size: int,
    seed: int,
    out_dir: Path,
) -> WindowOutcome:
    from clinml.monitoring import drift, performance

    chosen = monitored_spec(spec, condition)
    start, end = current["time"].min().to_pydatetime(), current["time"].max().to_pydatetime()
    rows, held_out, note = drift.choose_reference(
        chosen, reference.features, (start, end), reference.held_out
    )
    verdict = drift.run(
        chosen,
        rows,
        current,
        out_dir,
        now=NOW,
        prediction_reference=held_out,
        window=(start, end),
        write=False,
        reference_note=note,
    )
    span = end - start + timedelta(seconds=1)
    [measured] = performance.performance_by_window(
        spec, current, span, start, end + timedelta(seconds=1), n_boot=0, seed=seed
    )
    alerted = sorted({f.feature for f in verdict.features if f.alerts})
    if verdict.prediction_drift:
        alerted.append("probability")
    for group in verdict.subgroups:
        alerted += [
            f"{group.attribute}={group.group}:{f.feature}" for f in group.drifted if f.alerts
        ]
    alerted += [f"quality:{q.feature}" for q in verdict.quality if q.severity in {"high", "medium"}]
    return WindowOutcome(
        condition=condition,
        dose=dose,
        size=size,
        rows=len(current),
        seed=seed,
        drift_alerts=[k for k in verdict.alerts if k in DRIFT_KINDS],
        enough_data=verdict.enough_data,
        patients=verdict.window_patients,
        performance_alert=measured.judged and bool(measured.below_floor),
        judged=measured.judged,
        features=alerted,
    )


def _plan(
    windows: int,
    sizes: tuple[int, ...],
    conditions: tuple[str, ...],
    shifts: dict[str, tuple[float, ...]],
    dose_sizes: tuple[int, ...],
) -> Iterator[tuple[int, str, float, int]]:
    for i in range(windows):
        for size in sizes:
            for condition in conditions:
                yield i, condition, 0.0, size
        for size in dose_sizes:
            for shift, doses in shifts.items():
                for dose in doses:
                    if dose > 0:  # dose 0 is the consecutive condition
                        yield i, shift, dose, size


def evaluate(
    spec: UseCaseSpec,
    windows: int,
    out_dir: Path,
    *,
    sizes: tuple[int, ...] | None = None,
    conditions: tuple[str, ...] | None = None,
    shifts: dict[str, tuple[float, ...]] | None = None,
    dose_sizes: tuple[int, ...] | None = None,
    windows_per_system: int = 1,
    echo: Callable[[str], None] = lambda _: None,
) -> list[WindowOutcome]:
    """``windows`` seeded windows per quiet condition and size (``sizes``), and per shift,
    dose and size (``dose_sizes``), each judged by the monitor. Window ``i`` of every
    condition comes from system seed ``10_000 + i // windows_per_system``: more than one
    window per system is cheaper (the tests), but its windows share the system's patients
    and are not independent. What is not given is the cohort's (``COHORTS[spec.name]``)."""
    cohort = COHORTS[spec.name]
    sizes = cohort.sizes if sizes is None else sizes
    conditions = cohort.quiet if conditions is None else conditions
    shifts = cohort.shifts if shifts is None else shifts
    dose_sizes = cohort.dose_sizes if dose_sizes is None else dose_sizes
    reference = fit_reference(spec)
    outcomes: list[WindowOutcome] = []
    years: dict[tuple[int, str, float], pd.DataFrame] = {}
    for i, condition, dose, size in _plan(windows, sizes, conditions, shifts, dose_sizes):
        seed, system_seed = 10_000 + i, 10_000 + i // windows_per_system
        parameter = cohort.generated.get(condition)
        key = (system_seed, condition, dose) if parameter else (system_seed, "", 0.0)
        if key not in years:
            # The previous system's windows are done.
            years = {k: v for k, v in years.items() if k[0] == system_seed}
            extra = {parameter[0]: parameter[1](dose)} if parameter else {}
            years[key] = _second_year(system(spec, system_seed, **extra))
        year = years[key]
        current = window(spec, reference, year, condition, dose, size, seed * 7 + size)
        outcomes.append(judge(spec, reference, current, condition, dose, size, seed, out_dir))
        if (condition, size) == (conditions[-1], sizes[-1]) if conditions else False:
            done = [o for o in outcomes if o.dose == 0]
            echo(
                f"window {i + 1}/{windows}: {sum(o.alarmed for o in done)} of {len(done)} "
                "unshifted windows alarmed so far"
            )
    return outcomes


def false_alarms(outcomes: list[WindowOutcome]) -> pd.DataFrame:
    """Per quiet condition and size: windows, the share that raised a drift alert, the
    share judged 'not enough data', and what alarmed."""
    rows = []
    for (condition, size), group in _grouped(o for o in outcomes if o.dose == 0):
        rows.append(
            {
                "condition": condition,
                "size": size,
                "windows": len(group),
                "alarmed": sum(o.alarmed for o in group),
                "false alarm rate": sum(o.alarmed for o in group) / len(group),
                "not enough data": sum(not o.enough_data for o in group) / len(group),
                "patients": float(np.median([o.patients for o in group])),
                "performance alerts": sum(o.performance_alert for o in group),
                "what alarmed": ", ".join(sorted({f for o in group for f in o.features})),
            }
        )
    return pd.DataFrame(rows)


def detection(outcomes: list[WindowOutcome]) -> pd.DataFrame:
    """Per shift, dose and size: the share of windows that raised any drift alert (dose
    0 is the consecutive quiet condition)."""
    rows = []
    quiet = {size: g for (c, size), g in _grouped(outcomes) if c == CONSECUTIVE}
    for (condition, size), group in _grouped(o for o in outcomes if o.dose > 0):
        by_dose = {0.0: quiet.get(size, [])}
        for o in group:
            by_dose.setdefault(o.dose, []).append(o)
        for dose, done in sorted(by_dose.items()):
            if done:
                rows.append(
                    {
                        "shift": condition,
                        "size": size,
                        "dose": dose,
                        "windows": len(done),
                        "detected": sum(o.alarmed for o in done) / len(done),
                        "performance alert": sum(o.performance_alert for o in done) / len(done),
                    }
                )
    return pd.DataFrame(rows)


def _grouped(outcomes: Any) -> list[tuple[tuple[str, int], list[WindowOutcome]]]:
    groups: dict[tuple[str, int], list[WindowOutcome]] = {}
    for o in outcomes:
        groups.setdefault((o.condition, o.size), []).append(o)
    return list(groups.items())


# --- how the shifts are made ------------------------------------------------------------


def _thinned_by_site(rows: pd.DataFrame, dose: float, seed: int) -> pd.DataFrame:
    """Patients kept with a probability by site, so the site shares move ``dose`` of the
    way from the generator's to TARGET_SITE_SHARES (every patient's own data unchanged)."""
    from clinml.features.datasets.readmission import SITE_WEIGHTS, SITES

    base = np.asarray(SITE_WEIGHTS, dtype=float)
    target = (1 - dose) * base + dose * TARGET_SITE_SHARES
    keep = dict(zip(SITES, (target / base) / (target / base).max(), strict=True))
    patients = rows["patient_id"].unique()
    draw = dict(zip(patients, np.random.default_rng(seed).random(len(patients)), strict=True))
    chance = rows["site"].map(keep).to_numpy()
    return rows[rows["patient_id"].map(draw).to_numpy() < chance]


def _sodium_read_high(
    rows: pd.DataFrame, dose: float, rng: np.random.Generator, reference: Reference
) -> pd.DataFrame:
    """An analyser reads sodium high by ``dose`` reference SDs."""
    rows["sodium"] = rows["sodium"] + dose * float(reference.features["sodium"].std())
    return rows


def _creatinine_in_micromoles(
    rows: pd.DataFrame, dose: float, rng: np.random.Generator, reference: Reference
) -> pd.DataFrame:
    """A share ``dose`` of creatinine results reported in µmol/L instead of mg/dL."""
    switched = rng.random(len(rows)) < dose
    rows.loc[switched, "creatinine"] = rows.loc[switched, "creatinine"] * 88.42
    return rows


def _anticoagulants_from_other(dose: float) -> tuple[float, ...]:
    """``ade`` class weights with ``dose`` of all new prescriptions moved from "other" to
    anticoagulants (a new oral anticoagulant on the formulary)."""
    from clinml.features.datasets.ade import CLASS_WEIGHTS, DRUG_CLASSES

    weights = list(CLASS_WEIGHTS)
    weights[DRUG_CLASSES.index("anticoagulant")] += dose
    weights[DRUG_CLASSES.index("other")] -= dose
    return tuple(weights)


# --- the cohorts --------------------------------------------------------------------------

READMISSION = Cohort(
    name="readmission",
    system_patients=SYSTEM_PATIENTS,
    sizes=SIZES,
    dose_sizes=DOSE_SIZES,
    quiet=QUIET,
    population=Population("one site", "site", LARGEST_SITE),
    shifts=SHIFTS,
    generated=GENERATED,
    thinned={"site mix": _thinned_by_site},
    injected={"sodium offset": _sodium_read_high, "lab units": _creatinine_in_micromoles},
    meaningful=MEANINGFUL,
    unseen=UNSEEN,
    known_outcomes_only=False,
)

# Four clinics booking about 130 000 appointments a year (about 2 500 a week): 500 rows
# are a day's list, 2 500 a week, 10 000 four weeks.
NOSHOW = Cohort(
    name="noshow",
    system_patients=80_000,
    sizes=(500, 2_500, 10_000),
    dose_sizes=(2_500, 10_000),
    quiet=("consecutive", "winter", SEASONAL, "one clinic"),
    population=Population("one clinic", "clinic", "clinic_a"),
    shifts={
        "reminder outage": (0.0, 0.05, 0.1, 0.2, 0.3),
        "new clinic": (0.0, 0.05, 0.1, 0.15, 0.2, 0.3),
        "winter weather": (0.0, 1.0),
    },
    generated={
        "reminder outage": ("reminder_outage", lambda dose: dose),
        "new clinic": ("new_clinic_share", lambda dose: dose),
        "winter weather": ("winter_weather", lambda dose: dose),
    },
    thinned={},
    injected={},
    meaningful={"reminder outage": 0.2, "new clinic": 0.15},
    # A hard winter (log-odds of a no-show +0.30, more for patients who travel far) at the
    # same features: only labelled performance can see it.
    unseen=("winter weather",),
)

# A health system's pharmacies writing about 113 000 new prescriptions a year (about
# 2 200 a week, 3.6% followed by an adverse drug event): 2 500 rows are about eight days
# (about 90 events), 10 000 about a month (about 360).
ADE = Cohort(
    name="ade",
    system_patients=56_000,
    sizes=(500, 2_500, 10_000),
    dose_sizes=(2_500, 10_000),
    quiet=("consecutive", "inpatient"),
    population=Population("inpatient", "care_setting", "inpatient"),
    shifts={
        "class mix": (0.0, 0.025, 0.05, 0.1, 0.15, 0.2),
        "polypharmacy": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5),
        "missing labs": (0.0, 0.1, 0.25, 0.5, 1.0, 2.0),
        "label rate": (0.0, 1.0),
        "anticoagulant risk": (0.0, 1.0),
    },
    generated={
        "class mix": ("drug_class_weights", _anticoagulants_from_other),
        "polypharmacy": ("extra_medications", lambda dose: dose),
        "missing labs": ("missing_lab_odds_ratio", lambda dose: 1.0 + dose),
        "label rate": ("label_odds_ratio", lambda dose: 1.0 + dose),
        "anticoagulant risk": ("class_odds_ratio", lambda dose: {"anticoagulant": 1.0 + dose}),
    },
    thinned={},
    injected={},
    meaningful={"class mix": 0.15, "polypharmacy": 1.0, "missing labs": 1.0},
    # The odds of an event doubled at the same features (all prescriptions, or one
    # class's): only labelled performance can see them.
    unseen=("label rate", "anticoagulant risk"),
)

COHORTS = {cohort.name: cohort for cohort in (READMISSION, NOSHOW, ADE)}
