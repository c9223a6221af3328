"""Canary releases through the command line, the registry and the session's service.

``clinml canary start/status/stop`` move the ``canary`` alias and its share, audited and
refused with one line where they must; the service follows the alias (``POST
/admin/reload``) and answers a stable share of patients, and of records, with the canary
version, every answer naming the version that gave it, the same after a restart of the
router; a canary that fails, or alerts far more than the champion, is rolled back by the
service on its own (the alias removed, a ``canary-rollback`` audit record with the reason),
with no error answer; promoting or rolling back to the canary version ends the canary.
The module leaves the registry's aliases as it found them, with no canary.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from clinml.spec import UseCaseSpec
from tests.integration.served import (
    LogLines,
    clinml,
    registry_aliases,
    restore_aliases,
    second_version,
    service_instance,
)
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "pathology"


def _aliases(tracker: Any) -> dict[str, str]:
    return registry_aliases(tracker, MODEL)


def _restore(tracker: Any, aliases: dict[str, str]) -> None:
    restore_aliases(tracker, MODEL, aliases)


@pytest.fixture(scope="module")
def registry(pipeline, client, pathology_spec: UseCaseSpec):
    """(tracker, champion, candidate): a challenger other than the champion, trained when
    the session has none; the aliases as found are restored after the module."""
    tracker, champion, candidate, found = second_version(pipeline, client, pathology_spec, "canary")
    yield tracker, champion, candidate
    _restore(tracker, found)
    assert service_instance().reload()["canary"] is None  # the service lets it go too
    assert service_instance().executor.canary is None


@pytest.fixture(scope="module")
def patients(pipeline, pathology_spec: UseCaseSpec) -> list[str]:
    """Raw ids of patients the online store knows."""
    from clinml.features.datasets import pathology

    settings, _, _ = pipeline
    raw = pathology.load(pathology_spec.source.seed, datetime.now(UTC))
    stored = set(pd.read_parquet(settings.paths.usecase(MODEL).features_file)["patient_id"])
    pseudonymiser = settings.pseudonymiser()
    known = [p for p in raw["patient_id"].head(80) if pseudonymiser.one(p) in stored]
    assert len(known) >= 20
    return known[:40]


def _canary_on(client, pipeline, registry, spec: UseCaseSpec, percent: float) -> Any:
    """Start the canary on the candidate and have the service take it up; its model."""
    from clinml.audit import AuditLog
    from clinml.training.governance import canary_start

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    canary_start(spec, tracker, AuditLog(settings.audit_log_path), "e2e-test", percent)
    reloaded = client.post("/admin/reload")
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json() == {"previous_version": champion, "version": champion, "changed": False}
    canary = service_instance().executor.canary
    assert canary is not None and canary[0].version == candidate and canary[1] == percent
    return canary[0]


def _canary_off(client, tracker) -> None:
    """Remove the alias (if the test's guard has not) and have the service let it go."""
    if "canary" in _aliases(tracker):
        tracker.client.delete_registered_model_alias(MODEL, "canary")
    assert client.post("/admin/reload").status_code == 200
    assert service_instance().executor.canary is None


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _expected(pipeline, patients: list[str], percent: float) -> dict[str, bool]:
    """Whether each patient should go to the canary: a router made afresh with the key."""
    from clinml.serving.canary import CanaryRouter

    settings, _, _ = pipeline
    router = CanaryRouter(settings.pseudonym_key.get_secret_value())
    pseudonymiser = settings.pseudonymiser()
    return {
        p: router.routed(CanaryRouter.patient_key([pseudonymiser.one(p)]), percent)
        for p in patients
    }


def test_canary_commands_are_audited_and_refuse_with_one_line(pipeline, home: Path, registry):
    from clinml.audit import AuditLog
    from clinml.training.governance import CANARY_START, CANARY_STOP

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    assert clinml(home, "canary", "status", MODEL).stdout.strip() == f"{MODEL}: no canary version"
    log = AuditLog(settings.audit_log_path)
    before = log.verify()

    refusals = [
        (("canary", "stop", MODEL), "has no canary version"),
        (("canary", "start", MODEL, "--percent", "0"), "--percent must be above 0"),
        (("canary", "start", MODEL, "--percent", "60"), "at most 50"),
        (("canary", "start", MODEL, "--percent", "5", "--version", champion), "is the champion"),
        (("canary", "start", MODEL, "--percent", "5", "--version", "999"), "has no version 999"),
    ]
    for args, message in refusals:
        refused = clinml(home, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert message in refused.stderr, (args, refused.stderr)
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert log.verify() == before  # refusals move nothing and record nothing
    assert "canary" not in _aliases(tracker)

    started = clinml(home, "canary", "start", MODEL, "--percent", "12.5", "--reason", "CAB-9")
    assert started.returncode == 0, started.stderr
    assert f"canary: version {candidate} answers 12.5% of requests" in started.stdout
    assert clinml(home, "canary", "status", MODEL).stdout.strip() == (
        f"{MODEL}: canary version {candidate} answers 12.5% of requests"
    )
    assert _aliases(tracker)["canary"] == candidate
    tags = tracker.client.get_model_version(MODEL, candidate).tags
    assert tags["clinml.canary_percent"] == "12.5"
    again = clinml(home, "canary", "start", MODEL, "--percent", "20", "--version", "challenger")
    assert again.returncode == 0, again.stderr  # the same version, a new share
    assert "answers 20% of requests" in clinml(home, "canary", "status", MODEL).stdout

    stopped = clinml(home, "canary", "stop", MODEL, "--reason", "done")
    assert stopped.returncode == 0, stopped.stderr
    assert "canary" not in _aliases(tracker)
    assert clinml(home, "canary", "status", MODEL).stdout.strip() == f"{MODEL}: no canary version"

    assert log.verify() == before + 3
    first, second, stop = log.records()[-3:]
    assert (first["action"], first["from_version"], first["to_version"]) == (
        CANARY_START,
        None,
        candidate,
    )
    assert first["percent"] == 12.5 and first["reason"] == "CAB-9"
    assert (second["action"], second["from_version"], second["percent"]) == (
        CANARY_START,
        candidate,
        20.0,
    )
    assert (stop["action"], stop["from_version"], stop["to_version"], stop["reason"]) == (
        CANARY_STOP,
        candidate,
        None,
        "done",
    )
    history = clinml(home, "models", "history", MODEL)
    assert history.returncode == 0, history.stderr
    assert "canary-start" in history.stdout and "canary-stop" in history.stdout


def test_routing_is_stable_per_patient_and_per_records_and_every_answer_names_its_version(
    client, pipeline, registry, records: pd.DataFrame, patients: list[str], pathology_spec
) -> None:
    from clinml.predictionlog import read_predictions
    from clinml.serving.canary import CanaryRouter

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    percent = 50.0
    expected = _expected(pipeline, patients, percent)
    assert any(expected.values()) and not all(expected.values())  # both ways, for 40 patients
    routed_before = _metric(client, "clinml_canary_routed_total")
    service = service_instance()
    model = _canary_on(client, pipeline, registry, pathology_spec, percent)
    versions = {True: {"version": candidate, "alias": "canary"}, False: None}
    try:
        by_patient: dict[str, set[str]] = {p: set() for p in patients}
        request_ids: dict[str, bool] = {}
        rows = records.to_dict("records")
        by_records: dict[int, set[str]] = {i: set() for i in range(len(rows))}
        for round_ in range(3):
            if round_ == 2:  # a restart: a new router with the same key, the alias re-read
                service.canary_router = CanaryRouter(settings.pseudonym_key.get_secret_value())
                assert client.post("/admin/reload").status_code == 200
            for patient in patients:
                response = client.post("/predict_patient", json={"patient_ids": [patient]})
                assert response.status_code == 200, response.text
                body = response.json()
                got = body["model"]
                by_patient[patient].add(got["version"])
                want = versions[expected[patient]] or {"version": champion, "alias": "champion"}
                assert {"version": got["version"], "alias": got["alias"]} == want
                request_ids[body["request_id"]] = expected[patient]
            for i, row in enumerate(rows):
                response = client.post("/predict", json={"records": [row]})
                assert response.status_code == 200, response.text
                by_records[i].add(response.json()["model"]["version"])
        assert all(len(v) == 1 for v in by_patient.values())  # each patient one version
        assert all(len(v) == 1 for v in by_records.values())  # each record one version
        record_versions = {v for s in by_records.values() for v in s}
        assert record_versions == {champion, candidate}  # 25 records, routed both ways
        # a multi-patient request goes where its first patient goes
        first_in = next(p for p in patients if expected[p])
        first_out = next(p for p in patients if not expected[p])
        both = client.post("/predict_patient", json={"patient_ids": [first_in, first_out]})
        assert both.json()["model"]["version"] == candidate
        both = client.post("/predict_patient", json={"patient_ids": [first_out, first_in]})
        assert both.json()["model"]["version"] == champion
        # the canary's answers are at its own operating threshold
        response = client.post("/predict_patient", json={"patient_ids": [first_in]})
        [prediction] = response.json()["predictions"]
        label = pathology_spec.label
        positive = prediction["probability"] >= model.threshold
        assert prediction["label"] == (label.positive_class if positive else label.negative_class)
    finally:
        _canary_off(client, tracker)
    canaried = sum(expected.values()) * 3 + 2
    assert _metric(client, "clinml_canary_routed_total") >= routed_before + canaried
    # the prediction log names the version that answered each request
    service.predictions.flush(120)
    since = datetime.now(UTC) - timedelta(hours=1)
    logged = read_predictions(settings.paths.usecase(MODEL).predictions, since)
    mine = logged[logged["request_id"].isin(request_ids)]
    assert len(mine) == len(request_ids)
    for request_id, version in zip(mine["request_id"], mine["model_version"], strict=True):
        assert str(version) == (candidate if request_ids[request_id] else champion)
    # stopped, the champion answers everyone
    patient = first_in
    answer = client.post("/predict_patient", json={"patient_ids": [patient]}).json()
    assert answer["model"]["version"] == champion


class _Failing:
    """The canary model, except that scoring raises, with a value in its message."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def predict_columns(self, columns: dict[str, Any]) -> Any:
        raise ValueError("mean_radius 14.2 out of range")


class _AlwaysAlerting(_Failing):
    """The canary model, except that it says every patient is positive."""

    def predict_columns(self, columns: dict[str, Any]) -> Any:
        return np.ones(len(next(iter(columns.values()))))


def _guarded(service: Any, monkeypatch, alert_rate_band: float) -> None:
    from clinml.serving.canary import Band, CanaryGuard

    band = Band(window=20, min_requests=5, max_error_rate=0.05, alert_rate_band=alert_rate_band)
    monkeypatch.setattr(service, "canary_guard", CanaryGuard(band))


def _rolled_back(pipeline, tracker, candidate: str) -> dict[str, Any]:
    from clinml.audit import AuditLog
    from clinml.training.governance import CANARY_ROLLBACK

    settings, _, _ = pipeline
    wait_for(lambda: "canary" not in _aliases(tracker), "the guard to remove the canary alias")
    records = [
        r for r in AuditLog(settings.audit_log_path).records() if r["action"] == CANARY_ROLLBACK
    ]
    assert records, "no canary-rollback record"
    record = records[-1]
    assert (record["from_version"], record["to_version"]) == (candidate, None)
    assert record["actor"].endswith("(canary guard)")
    return record


def test_a_failing_canary_is_rolled_back_and_audited_with_no_error_answer(
    client, pipeline, registry, patients: list[str], pathology_spec, monkeypatch
) -> None:
    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    expected = _expected(pipeline, patients, 50.0)
    service = service_instance()
    rollbacks = _metric(client, "clinml_canary_rollbacks_total")
    errors = _metric(client, "clinml_canary_errors_total")
    model = _canary_on(client, pipeline, registry, pathology_spec, 50.0)
    said = LogLines()
    try:
        with monkeypatch.context() as patched:
            _guarded(service, patched, alert_rate_band=1.0)
            patched.setattr(service.executor, "canary", (_Failing(model), 50.0))
            answers = [client.post("/predict_patient", json={"patient_ids": [p]}) for p in patients]
            assert [a.status_code for a in answers] == [200] * len(patients)  # never a 5xx
            assert {a.json()["model"]["version"] for a in answers} == {champion}
            record = _rolled_back(pipeline, tracker, candidate)
            assert service.canary_guard.blocked(candidate)
            after = [client.post("/predict_patient", json={"patient_ids": [p]}) for p in patients]
            assert {a.json()["model"]["version"] for a in after} == {champion}
    finally:
        said.close()
        _canary_off(client, tracker)
    assert "error rate 100.0%" in record["reason"]
    observed = record["observed"]
    assert observed["canary_requests"] == observed["canary_errors"] == 5  # the minimum
    assert observed["error_rate"] == 1.0
    text = str(record)
    pseudonymiser = settings.pseudonymiser()
    assert not any(p in text or pseudonymiser.one(p) in text for p in patients)  # no PHI
    # failures logged by type, never by value
    assert any("failed a request (ValueError)" in line for line in said.lines), said.lines
    assert "14.2" not in said.text
    assert _metric(client, "clinml_canary_rollbacks_total") == rollbacks + 1
    assert _metric(client, "clinml_canary_errors_total") == errors + 5
    assert sum(expected.values()) > 5  # more canary patients came than were failed


def test_a_canary_alerting_outside_the_band_is_rolled_back(
    client, pipeline, registry, records: pd.DataFrame, pathology_spec, monkeypatch
) -> None:
    tracker, champion, candidate = registry
    service = service_instance()
    model = _canary_on(client, pipeline, registry, pathology_spec, 50.0)
    rows = records.to_dict("records")
    try:
        with monkeypatch.context() as patched:
            _guarded(service, patched, alert_rate_band=0.10)
            patched.setattr(service.executor, "canary", (_AlwaysAlerting(model), 50.0))
            seen: set[str] = set()
            for _ in range(3):  # the champion needs its minimum before the rates compare
                for row in rows:
                    response = client.post("/predict", json={"records": [row]})
                    assert response.status_code == 200, response.text
                    seen.add(response.json()["model"]["version"])
            assert seen == {champion, candidate}  # the canary answered, until rolled back
            record = _rolled_back(pipeline, tracker, candidate)
            after = {
                client.post("/predict", json={"records": [row]}).json()["model"]["version"]
                for row in rows
            }
            assert after == {champion}
    finally:
        _canary_off(client, tracker)
    assert "alert rate 100.0%" in record["reason"] and "champion's" in record["reason"]
    observed = record["observed"]
    assert observed["canary_alert_rate"] == 1.0 and observed["canary_errors"] == 0
    assert observed["champion_requests"] >= 5
    assert abs(1.0 - observed["champion_alert_rate"]) > 0.10


def test_promoting_or_rolling_back_to_the_canary_version_ends_the_canary(
    pipeline, registry, pathology_spec: UseCaseSpec
) -> None:
    from clinml.audit import AuditLog
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.governance import CANARY_STOP, ROLLBACK, canary_start

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    found = _aliases(tracker)
    log = AuditLog(settings.audit_log_path)
    quiet = Progress(total=1, echo=lambda _: None)
    try:
        canary_start(pathology_spec, tracker, log, "e2e-test", 10.0)
        stages.promote(pathology_spec, settings, quiet, force=True, reason="canary done")
        aliases = _aliases(tracker)
        assert aliases["champion"] == candidate and "canary" not in aliases
        ended = log.records()[-1]
        assert (ended["action"], ended["from_version"], ended["reason"]) == (
            CANARY_STOP,
            candidate,
            "promoted to champion",
        )

        canary_start(pathology_spec, tracker, log, "e2e-test", 10.0, version=champion)
        stages.rollback(pathology_spec, settings, quiet, reason="back")
        aliases = _aliases(tracker)
        assert aliases["champion"] == champion and "canary" not in aliases
        rolled, ended = log.records()[-2:]
        assert rolled["action"] == ROLLBACK
        assert (ended["action"], ended["from_version"], ended["reason"]) == (
            CANARY_STOP,
            champion,
            "rolled back to champion",
        )
    finally:
        _restore(tracker, found)


def test_the_service_follows_the_share_and_a_canary_that_fails_to_load_is_left_out(
    client, pipeline, registry, patients: list[str], pathology_spec, monkeypatch
) -> None:
    from clinml.audit import AuditLog
    from clinml.errors import ClinmlError
    from clinml.serving import runtime
    from clinml.training.governance import canary_start

    settings, _, _ = pipeline
    tracker, champion, _ = registry
    service = service_instance()
    model = _canary_on(client, pipeline, registry, pathology_spec, 10.0)
    try:
        # a new share for the same version: taken up at the next check, no new load
        canary_start(pathology_spec, tracker, AuditLog(settings.audit_log_path), "e2e", 30.0)
        assert client.post("/admin/reload").status_code == 200
        assert service.executor.canary == (model, 30.0)

        # a version that fails to load (its checks, the registry): no canary, champion intact
        _canary_off(client, tracker)

        real_load = runtime.load_from_registry

        def refused(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("alias") != "canary":
                return real_load(*args, **kwargs)  # the champion loads as ever
            raise ClinmlError("the model file's hash differs from the one registered")

        monkeypatch.setattr(runtime, "load_from_registry", refused)
        canary_start(pathology_spec, tracker, AuditLog(settings.audit_log_path), "e2e", 50.0)
        reloaded = client.post("/admin/reload")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["version"] == champion
        assert service.executor.canary is None
        # Why, as the executor logged it once (read from the executor: a full test run
        # reconfigures logging, so what caplog captures depends on the modules before).
        assert "hash differs" in (service.executor._canary_problem or "")
        answers = [client.post("/predict_patient", json={"patient_ids": [p]}) for p in patients]
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["model"]["version"] for a in answers} == {champion}
    finally:
        monkeypatch.undo()
        _canary_off(client, tracker)
