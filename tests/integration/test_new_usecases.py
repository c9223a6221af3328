"""The `noshow` and `ade` use cases through the whole product, by their specs alone (issue 23).

Each runs as a user would run it, with the real `clinml` command line in subprocesses on
a data directory of its own: a reduced copy of the shipped spec (fewer patients, one
candidate, a small search) under ``CLINML_HOME/configs`` and ``clinml run`` up to a
packaged champion; ``clinml serve`` answering ``/predict``, ``/predict_patient`` and
``/explain`` until SIGTERM; weeks of traffic in the prediction log, some weeks shifted by
the generator's ``Shift``, which ``clinml monitor --window 7d`` must flag by the
feature each shift moves while an unshifted week stays quiet; and outcomes ingested with
the use case's own label delay, which the performance windows must reflect.

The traffic is scored by the served champion (``/predict``) and written through the
service's own ``PredictionLog`` writer with each row's prediction time in the weeks before
today, since the live service stamps its rows with the clock. Each row gets a request id
of its own, as a scheduling or pharmacy system calling once per appointment or
prescription would get, so that outcomes join by request id.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from clinml.settings import Settings
from clinml.spec import UseCaseSpec, load_spec
from tests.integration.served import clinml as served_cli
from tests.integration.served import clinml_serve, reduced_spec

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PSEUDONYM_KEY = "new-usecases-test-key"
WEEK = timedelta(days=7)


@dataclass(frozen=True)
class UseCase:
    """A built-in use case, how far to shrink it, and the traffic that checks it.

    Attributes:
        name: the shipped spec's name, kept, so that nothing can be special-cased.
        n_patients: the reduced spec's cohort: enough for the gate, the temporal holdout
            and the bootstrap to decide.
        traffic_patients: the cohort the monitored traffic is drawn from (another seed):
            enough that a week holds more patients than ``min_patients`` asks.
        weeks: weeks of traffic before ``until``; week 1 is the last.
        label_time: the generator's column with the time an outcome becomes known.
        shifts: week -> (the generator's ``Shift`` arguments, the feature it moves).
        quiet_week: an unshifted week, which must raise no alert.
    """

    name: str
    n_patients: int
    traffic_patients: int
    weeks: int
    label_time: str
    shifts: dict[int, tuple[dict[str, Any], str]] = field(default_factory=dict)
    quiet_week: int = 3

    def generator(self) -> Any:
        return importlib.import_module(f"clinml.features.datasets.{self.name}")


def _opioids_tripled() -> tuple[float, ...]:
    from clinml.features.datasets import ade

    return tuple(
        w * (3 if name == "opioid" else 1)
        for name, w in zip(ade.DRUG_CLASSES, ade.CLASS_WEIGHTS, strict=True)
    )


USECASES = [
    UseCase(
        "noshow",
        n_patients=6_000,  # about 18 700 appointments, 2 900 patients with one
        traffic_patients=20_000,  # about 900 appointments a week
        weeks=4,
        shifts={
            1: ({"reminder_outage": 0.5}, "reminder_sent"),
            2: ({"new_clinic_share": 0.3}, "clinic"),
        },
        label_time="appointment_time",  # the slot: at most 2 days after the prediction
    ),
    UseCase(
        "ade",
        n_patients=12_000,  # about 48 000 labelled prescriptions, 3% events
        traffic_patients=20_000,  # about 1 150 prescriptions a week
        weeks=8,  # longer than the 30-day label delay plus the weeks judged
        shifts={
            1: ({"extra_medications": 3.0}, "concurrent_medications"),
            2: ({"drug_class_weights": _opioids_tripled()}, "drug_class"),
        },
        label_time="label_timestamp",  # 30 days after the prescription
    ),
]


def clinml(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return served_cli(home, *args, env={"CLINML_PSEUDONYM_KEY": PSEUDONYM_KEY})


@dataclass(frozen=True)
class Trained:
    usecase: UseCase
    home: Path
    spec_file: Path
    spec: UseCaseSpec
    run: subprocess.CompletedProcess[str]
    until: datetime  # today's start (UTC): the simulated traffic ends here


@pytest.fixture(scope="module", params=USECASES, ids=lambda usecase: usecase.name)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`clinml run` on a reduced copy of the shipped spec, kept under its own name."""
    usecase: UseCase = request.param
    # Before anything is served: every row the live service logs comes after it.
    until = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    home = tmp_path_factory.mktemp(f"{usecase.name}-home")
    _, spec_file = reduced_spec(home, usecase.name, usecase.n_patients)
    ran = clinml(home, "run", str(spec_file))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return Trained(usecase, home, spec_file, load_spec(spec_file), ran, until)


@dataclass(frozen=True)
class Served:
    url: str
    headers: dict[str, str]


@pytest.fixture(scope="module")
def served(trained: Trained) -> Iterator[Served]:
    """`clinml serve` on the reduced spec until the module's tests are done, then SIGTERM."""
    from tests.integration.served import api_keys

    key = api_keys(trained.home)["dev"]
    env = {"CLINML_PSEUDONYM_KEY": PSEUDONYM_KEY}
    with clinml_serve(trained.home, trained.spec_file, env) as url:
        yield Served(url, {"X-API-Key": key})


def _records(spec: UseCaseSpec, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The feature columns as JSON records: whole numbers as ints, a missing value null."""
    return json.loads(frame[spec.feature_names].to_json(orient="records"))


def test_run_promotes_and_packages_a_champion(trained: Trained) -> None:
    name, out = trained.usecase.name, trained.run.stdout
    assert f"registered {name} version 1 as 'challenger'" in out
    assert "promote: champion -> version 1 (first champion)" in out
    assert f"BentoML model {name}:" in out and f"= {name} v1" in out


def test_the_service_answers_by_features_by_patient_and_explains(
    trained: Trained, served: Served
) -> None:
    spec = trained.spec
    sample = trained.usecase.generator().generate(n_patients=300, seed=5, months=2)
    records = _records(spec, sample.head(20))
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=60) as client:
        answer = client.post("/predict", json={"records": records})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == {"name": spec.name, "version": "1", "alias": "champion"}
        assert len(body["predictions"]) == len(records)
        for prediction in body["predictions"]:
            assert 0.0 <= prediction["probability"] <= 1.0
            assert prediction["label"] in {spec.label.positive_class, spec.label.negative_class}

        sampled = clinml(trained.home, "patients", "sample", str(trained.spec_file), "-n", "3")
        assert sampled.returncode == 0, sampled.stderr
        patients = sampled.stdout.split()
        assert len(patients) == 3
        answer = client.post("/predict_patient", json={"patient_ids": patients})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 3
        assert all(0.0 <= p["probability"] <= 1.0 for p in predictions)
        unknown = client.post("/predict_patient", json={"patient_ids": ["NOBODY-23"]})
        assert unknown.status_code == 404

        answer = client.post("/explain", json={"records": records[:3], "top_k": 4})
        assert answer.status_code == 200, answer.text
        explanations = answer.json()["explanations"]
        assert len(explanations) == 3
        for explanation in explanations:
            named = [c["feature"] for c in explanation["contributions"]]
            assert len(named) == 4 and set(named) <= set(spec.feature_names)
            assert all(math.isfinite(c["contribution"]) for c in explanation["contributions"])


@pytest.fixture(scope="module")
def traffic(trained: Trained, served: Served) -> pd.DataFrame:
    """``weeks`` of appointments or prescriptions before ``until``, the shifted weeks drawn
    from the same seed under their ``Shift``, scored by the served champion and written to
    the prediction log with their prediction times. Returns the rows, with ``week``
    (1: the last), ``request_id`` and the generator's columns."""
    from clinml.serving.requestlog import PredictionLog

    usecase, spec, until = trained.usecase, trained.spec, trained.until
    generator = usecase.generator()
    months = math.ceil(usecase.weeks * 7 / 30) + 1

    def weeks_of(shift: dict[str, Any]) -> pd.DataFrame:
        frame = generator.generate(
            n_patients=usecase.traffic_patients,
            seed=23,
            end=until,
            months=months,
            shift=generator.Shift(**shift),
        )
        before = pd.Timestamp(until) - frame[spec.event_timestamp]
        frame["week"] = (before // pd.Timedelta(WEEK)).astype(int) + 1
        return frame[(before > pd.Timedelta(0)) & (frame["week"] <= usecase.weeks)]

    frame = weeks_of({})
    for week, (shift, _) in usecase.shifts.items():
        shifted = weeks_of(shift)
        frame = pd.concat([frame[frame["week"] != week], shifted[shifted["week"] == week]])
    frame = frame.sort_values(spec.event_timestamp, kind="stable").reset_index(drop=True)

    records = _records(spec, frame)
    probability, label, version = [], [], set()
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=300) as client:
        for start in range(0, len(records), 1000):
            answer = client.post("/predict", json={"records": records[start : start + 1000]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            version.add(body["model"]["version"])
            probability += [p["probability"] for p in body["predictions"]]
            label += [p["label"] for p in body["predictions"]]
    assert version == {"1"}
    frame["request_id"] = [uuid.uuid4().hex for _ in range(len(frame))]
    pseudonymiser = Settings(home=trained.home, pseudonym_key=PSEUDONYM_KEY).pseudonymiser()
    patients = pseudonymiser.many(frame[spec.entity.key].tolist())
    rows = [
        {
            **record,
            "time": when.to_pydatetime(),
            "request_id": request_id,
            "model_version": "1",
            "patient": patient,
            "probability": p,
            "label": served_label,
        }
        for record, when, request_id, patient, p, served_label in zip(
            records,
            frame[spec.event_timestamp],
            frame["request_id"],
            patients,
            probability,
            label,
            strict=True,
        )
    ]
    log = PredictionLog(Settings(home=trained.home).paths.usecase(spec.name).predictions)
    log.record(rows)
    log.close()
    assert log.written == len(rows) and log.dropped == 0
    return frame


@dataclass(frozen=True)
class Monitored:
    exit_code: int
    verdict: dict[str, Any]  # the verdict JSON the last line of the output names
    stdout: str


def _monitor(trained: Trained, until: datetime, *extra: str) -> Monitored:
    """`clinml monitor --window 7d --until` on the prediction log: the week before ``until``
    (without ``--until`` the window ends now, as a scheduled job runs it)."""
    result = clinml(
        trained.home,
        "monitor",
        str(trained.spec_file),
        "--window",
        "7d",
        "--until",
        f"{until:%Y-%m-%dT%H:%M:%S}",
        *extra,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    verdict_path = Path(result.stdout.strip().splitlines()[-1].removeprefix("verdict: "))
    verdict = json.loads(verdict_path.read_text())
    assert verdict["exit_code"] == result.returncode
    return Monitored(result.returncode, verdict, result.stdout)


def test_monitor_flags_each_injected_shift_and_not_an_unshifted_week(
    trained: Trained, traffic: pd.DataFrame
) -> None:
    """Before any outcome is ingested, so that only drift can alert."""
    from clinml.monitoring.drift import min_patients

    usecase, until = trained.usecase, trained.until
    assert not Settings(home=trained.home).paths.usecase(usecase.name).labels.is_dir()
    for week, (shift, feature) in usecase.shifts.items():
        end = until - (week - 1) * WEEK
        shifted = _monitor(trained, end)
        drift = shifted.verdict["drift"]
        assert drift["current_rows"] == int((traffic["week"] == week).sum())
        alerting = {f["feature"] for f in drift["features"] if f["severity"] == "high"}
        assert shifted.exit_code == 1 and feature in alerting, (shift, shifted.stdout)
        [data_drift] = [a for a in shifted.verdict["alerts"] if a["kind"] == "data_drift"]
        assert feature in {f["feature"] for f in data_drift["details"]["features"]}

    end = until - (usecase.quiet_week - 1) * WEEK
    quiet = _monitor(trained, end)
    assert quiet.verdict["drift"]["window_patients"] >= min_patients(trained.spec)
    assert quiet.verdict["drift"]["enough_data"]
    assert quiet.exit_code == 0 and quiet.verdict["alerts"] == [], quiet.stdout


def test_performance_windows_follow_the_label_delay(
    trained: Trained, traffic: pd.DataFrame, tmp_path: Path
) -> None:
    """Outcomes known by ``until`` are ingested; each week of predictions is judged on
    those that arrived: every outcome of the weeks older than the label delay, some of the
    week it ends in, none of the weeks after it (a window without labels is not
    reported)."""
    usecase, spec, until = trained.usecase, trained.spec, trained.until
    known_at = pd.to_datetime(traffic[usecase.label_time], utc=True)
    known = traffic[known_at <= pd.Timestamp(until)]
    # The generator's extract ends at `until`, where an outcome not known yet is missing.
    assert known[spec.label.column].notna().all()
    assert traffic.loc[known_at > pd.Timestamp(until), spec.label.column].isna().all()
    outcomes = pd.DataFrame(
        {
            "request_id": known["request_id"],
            "outcome": known[spec.label.column],
            "time": known[usecase.label_time].map(lambda t: t.isoformat()),
        }
    )
    outcomes.to_csv(tmp_path / "outcomes.csv", index=False)
    ingested = clinml(
        trained.home, "labels", "ingest", str(trained.spec_file), str(tmp_path / "outcomes.csv")
    )
    assert ingested.returncode == 0, ingested.stderr
    assert f"{len(known)} outcomes stored (0 by patient, {len(known)} by request" in ingested.stdout

    lookback = f"{usecase.weeks * 7}d"
    monitored = _monitor(trained, until, "--label-lookback", lookback)
    windows = monitored.verdict["performance"]
    reported = {datetime.fromisoformat(w["start"]): w["n"] for w in windows}
    delay = timedelta(days=spec.label.horizon_days)
    expected: dict[datetime, int] = {}
    for week in range(usecase.weeks, 0, -1):
        start, end = until - week * WEEK, until - (week - 1) * WEEK
        predictions = int((traffic["week"] == week).sum())
        labelled = int((known["week"] == week).sum())
        assert predictions > 0
        if end <= until - delay:  # every outcome of the week is known by `until`
            assert labelled == predictions, week
        elif start < until - delay:  # the delay ends within the week
            assert 0 < labelled < predictions, week
        else:  # the whole week is younger than the delay
            assert labelled == 0, week
            assert start not in reported, week
        if labelled:
            expected[start] = labelled
    assert reported == expected, monitored.stdout
    for window in windows:
        assert 0 < window["positives"] < window["n"]
        assert window["roc_auc"] is not None and 0.5 < window["roc_auc"] <= 1.0
    # The weeks not reported are accounted for: predictions still within the label delay.
    coverage = monitored.verdict["label_coverage"]
    recent = traffic[spec.event_timestamp] >= pd.Timestamp(until - delay)
    assert coverage["predictions"] == len(traffic) and coverage["labelled"] == len(known)
    assert coverage["within_delay"] == int(recent.sum()) and coverage["delay_days"] == delay.days
    assert (
        f"outcomes: {len(known):,} of {len(traffic):,} predictions since "
        f"{until - usecase.weeks * WEEK:%Y-%m-%d} have one; {int(recent.sum()):,} were made in "
        f"the last {delay.days} days (the label delay)"
    ) in monitored.stdout
