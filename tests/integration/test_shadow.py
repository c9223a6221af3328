"""Shadow deployment through the command line, the registry and the session's service.

``clinml shadow start/status/stop`` move the ``shadow`` alias, audited and refused with one
line where they must; the service follows the alias without a restart (``POST
/admin/reload``, the path its polling takes); with a shadow on, ``/predict`` and
``/predict_patient`` answer exactly what they answer with it off (bodies and status codes),
never naming the shadow version, while the prediction log gets the shadow's rows beside
the champion's; a failing or a slow shadow model costs the champion nothing; promoting or
rolling back to the shadowed version ends the shadow. The module leaves the registry's
aliases as it found them, with no shadow.
"""

from __future__ import annotations

import json
import threading
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
    tracker, champion, candidate, found = second_version(pipeline, client, pathology_spec, "shadow")
    yield tracker, champion, candidate
    _restore(tracker, found)
    assert service_instance().reload()["shadow"] is None  # the service lets it go too


@pytest.fixture(scope="module")
def patients(pipeline, pathology_spec: UseCaseSpec) -> list[str]:
    from clinml.features.datasets import pathology

    settings, _, _ = pipeline
    raw = pathology.load(pathology_spec.source.seed, datetime.now(UTC))
    stored = set(pd.read_parquet(settings.paths.usecase(MODEL).features_file)["patient_id"])
    pseudonymiser = settings.pseudonymiser()
    known = [p for p in raw["patient_id"].head(30) if pseudonymiser.one(p) in stored]
    assert len(known) >= 3
    return known[:3]


def _calls(records: pd.DataFrame, patients: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Requests whose answers must not change with a shadow: predictions, and refusals."""
    rows = records.head(6).to_dict("records")
    return [
        ("/predict", {"records": rows}),
        ("/predict", {"records": rows[:1]}),
        ("/predict_patient", {"patient_ids": patients}),
        ("/predict_patient", {"patient_ids": [patients[0], "NOBODY-42"]}),  # 404
        ("/predict", {"records": [{**rows[0], "mean_radius": "x"}]}),  # 422
    ]


def _answers(client, calls) -> list[tuple[int, dict[str, Any], str | None]]:
    """(status, body without its request id, request id) of each call."""
    out = []
    for path, body in calls:
        response = client.post(path, json=body)
        payload = response.json()
        request_id = payload.pop("request_id", None)
        out.append((response.status_code, payload, request_id))
    return out


def _logged(pipeline, request_ids: set[str]) -> pd.DataFrame:
    """The logged rows of these requests, shadow rows too (marked), as written by now."""
    from clinml.predictionlog import read_predictions

    settings, _, _ = pipeline
    service = service_instance()
    service.shadow.flush(120)
    service.predictions.flush(120)
    since = datetime.now(UTC) - timedelta(hours=1)
    frame = read_predictions(settings.paths.usecase(MODEL).predictions, since, shadow=True)
    if frame.empty:
        return frame
    return frame[frame["request_id"].isin(request_ids)]


def _shadow_on(client, pipeline, registry, pathology_spec: UseCaseSpec) -> None:
    """Shadow the candidate, and have the service take it up (its alias check, on demand)."""
    from clinml.audit import AuditLog
    from clinml.training.governance import shadow_start

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    shadow_start(pathology_spec, tracker, AuditLog(settings.audit_log_path), "e2e-test")
    reloaded = client.post("/admin/reload")
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json() == {"previous_version": champion, "version": champion, "changed": False}
    shadow = service_instance().executor.shadow
    assert shadow is not None and shadow.version == candidate


def _shadow_off(client, pipeline, registry, pathology_spec: UseCaseSpec) -> None:
    from clinml.audit import AuditLog
    from clinml.training.governance import shadow_stop

    settings, _, _ = pipeline
    tracker, _, _ = registry
    shadow_stop(pathology_spec, tracker, AuditLog(settings.audit_log_path), "e2e-test")
    assert client.post("/admin/reload").status_code == 200
    assert service_instance().executor.shadow is None


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_shadow_commands_are_audited_and_refuse_with_one_line(pipeline, home: Path, registry):
    from clinml.audit import AuditLog
    from clinml.training.governance import SHADOW_START, SHADOW_STOP

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    assert clinml(home, "shadow", "status", MODEL).stdout.strip() == f"{MODEL}: no shadow version"

    nothing = clinml(home, "shadow", "stop", MODEL)
    assert nothing.returncode == 2 and "has no shadow version" in nothing.stderr
    itself = clinml(home, "shadow", "start", MODEL, "--version", champion)
    assert itself.returncode == 2, itself.stderr
    assert f"version {champion} is the champion" in itself.stderr
    assert len(itself.stderr.strip().splitlines()) == 1 and "Traceback" not in itself.stderr
    missing = clinml(home, "shadow", "start", MODEL, "--version", "999")
    assert missing.returncode == 2 and "has no version 999" in missing.stderr
    tracker.client.delete_registered_model_alias(MODEL, "challenger")
    try:
        no_challenger = clinml(home, "shadow", "start", MODEL)
    finally:
        tracker.client.set_registered_model_alias(MODEL, "challenger", candidate)
    assert no_challenger.returncode == 2 and "has no challenger to shadow" in no_challenger.stderr
    log = AuditLog(settings.audit_log_path)
    before = log.verify()  # refusals move nothing and record nothing

    started = clinml(home, "shadow", "start", MODEL, "--reason", "CAB-77 trial")
    assert started.returncode == 0, started.stderr
    assert f"shadow: version {candidate}" in started.stdout
    assert clinml(home, "shadow", "status", MODEL).stdout.strip() == (
        f"{MODEL}: shadow version {candidate}"
    )
    assert _aliases(tracker)["shadow"] == candidate
    again = clinml(home, "shadow", "start", MODEL, "--version", "challenger")
    assert again.returncode == 2 and "already the shadow" in again.stderr

    stopped = clinml(home, "shadow", "stop", MODEL)
    assert stopped.returncode == 0, stopped.stderr
    assert "shadow" not in _aliases(tracker)

    assert log.verify() == before + 2
    start, stop = log.records()[-2:]
    assert (start["action"], start["from_version"], start["to_version"]) == (
        SHADOW_START,
        None,
        candidate,
    )
    assert start["reason"] == "CAB-77 trial" and start["actor"] == "e2e-cli"
    assert (stop["action"], stop["from_version"], stop["to_version"]) == (
        SHADOW_STOP,
        candidate,
        None,
    )
    history = clinml(home, "models", "history", MODEL)
    assert history.returncode == 0, history.stderr
    assert "shadow-start" in history.stdout and "CAB-77 trial" in history.stdout
    assert "shadow-stop" in history.stdout


def test_with_a_shadow_the_answers_are_the_same_and_its_rows_are_logged_beside(
    client, pipeline, registry, records: pd.DataFrame, patients: list[str], pathology_spec
) -> None:
    from clinml.predictionlog import read_predictions

    settings, _, _ = pipeline
    _, champion, candidate = registry
    calls = _calls(records, patients)
    off = _answers(client, calls)
    assert [status for status, _, _ in off] == [200, 200, 200, 404, 422]
    scored_before = _metric(client, "clinml_shadow_scored_total")

    _shadow_on(client, pipeline, registry, pathology_spec)
    try:
        shadow_model = service_instance().executor.shadow
        threshold = shadow_model.threshold
        on = _answers(client, calls)
        assert [(s, b) for s, b, _ in on] == [(s, b) for s, b, _ in off]
        for status, body, _ in on:
            assert '"shadow"' not in json.dumps(body)
            if status == 200:
                assert body["model"] == {"name": MODEL, "version": champion, "alias": "champion"}
        answered = {rid: body for status, body, rid in on if status == 200}

        def all_logged() -> list[pd.DataFrame]:
            frame = _logged(pipeline, set(answered))
            done = not frame.empty and int(frame["shadow"].sum()) == 6 + 1 + 3
            return [frame] if done else []

        [rows] = wait_for(
            all_logged, "the shadow's rows of the three answered requests in the prediction log"
        )
    finally:
        _shadow_off(client, pipeline, registry, pathology_spec)
    label = pathology_spec.label
    for request_id, body in answered.items():
        mine = rows[rows["request_id"] == request_id]
        served, shadowed = mine[~mine["shadow"]], mine[mine["shadow"]]
        assert len(served) == len(shadowed) == len(body["predictions"])
        assert set(served["model_version"]) == {champion}
        assert set(shadowed["model_version"]) == {candidate}
        assert served["time"].tolist() == shadowed["time"].tolist()
        assert np.allclose(served["probability"], [p["probability"] for p in body["predictions"]])
        # the shadow's labels are its own, at its own operating threshold
        expected = np.where(
            shadowed["probability"] >= threshold, label.positive_class, label.negative_class
        )
        assert shadowed["label"].tolist() == expected.tolist()
    # the logged probabilities are the shadow model's
    first = rows[rows["request_id"] == on[0][2]]
    in_process = shadow_model.predict_records(calls[0][1]["records"])
    assert np.allclose(first[first["shadow"]]["probability"], in_process, rtol=1e-9)
    by_patient = rows[rows["request_id"] == on[2][2]]
    assert len(by_patient) == 6 and by_patient["patient"].notna().all()  # pseudonymised
    assert _metric(client, "clinml_shadow_scored_total") >= scored_before + 3

    # monitoring reads the served rows only
    since = datetime.now(UTC) - timedelta(hours=1)
    served_only = read_predictions(settings.paths.usecase(MODEL).predictions, since)
    assert "shadow" not in served_only.columns
    mine = served_only[served_only["request_id"].isin(answered)]
    assert len(mine) == 6 + 1 + 3 and set(mine["model_version"]) == {champion}

    # stopped (and taken up by the service, above), the shadow scores nothing more
    [(status, _, request_id)] = _answers(client, calls[:1])
    assert status == 200
    logged = _logged(pipeline, {request_id})
    assert len(logged) == 6 and not logged["shadow"].any()


class _Failing:
    """The shadow model, except that scoring raises, with a value in its message."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def predict_columns(self, columns: dict[str, Any]) -> Any:
        raise ValueError("mean_radius 14.2 out of range")


class _Slow(_Failing):
    """The shadow model, except that scoring waits until the test lets it go."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.release = threading.Event()
        self.waiting = threading.Event()

    def predict_columns(self, columns: dict[str, Any]) -> Any:
        self.waiting.set()
        self.release.wait(600)
        return self._real.predict_columns(columns)


def test_a_failing_or_slow_shadow_costs_the_champion_nothing(
    client, pipeline, registry, records, patients, pathology_spec, monkeypatch
) -> None:
    calls = _calls(records, patients)
    off = _answers(client, calls)
    service = service_instance()
    _shadow_on(client, pipeline, registry, pathology_spec)
    try:
        real = service.executor.shadow
        errors = service.shadow.errors
        service.shadow._reported.discard("ValueError")  # logged once per kind: once more here
        said = LogLines()
        monkeypatch.setattr(service.executor, "shadow", _Failing(real))
        failing = _answers(client, calls)
        assert [(s, b) for s, b, _ in failing] == [(s, b) for s, b, _ in off]
        wait_for(lambda: service.shadow.errors >= errors + 3, "the shadow's failures counted")
        assert _metric(client, "clinml_shadow_errors_total") >= 3
        said.close()
        # failures are logged by type, never by value
        assert any("shadow scoring failed (ValueError)" in line for line in said.lines)
        assert "14.2" not in said.text

        slow = _Slow(real)
        monkeypatch.setattr(service.executor, "shadow", slow)
        scored = service.shadow.scored
        # the shadow holds the first request until released: every answer still comes
        slowed = [_answers(client, calls) for _ in range(5)]
        wait_for(slow.waiting.is_set, "the slow shadow to take up a request")
        assert not slow.release.is_set()  # still held: the answers above never waited
        for answers in slowed:
            assert [(s, b) for s, b, _ in answers] == [(s, b) for s, b, _ in off]
        slow.release.set()
        wait_for(lambda: service.shadow.scored >= scored + 15, "the slow shadow to catch up")
    finally:
        monkeypatch.undo()
        _shadow_off(client, pipeline, registry, pathology_spec)


def test_a_shadow_version_that_fails_its_checks_is_not_used(
    client, pipeline, registry, records, patients, pathology_spec
) -> None:
    """Its model file rewritten after registration: the service logs it and scores no
    shadow; the champion answers as before. Put back, the next check takes it up."""
    from clinml.audit import AuditLog
    from clinml.training.governance import shadow_start

    settings, _, _ = pipeline
    tracker, _, candidate = registry
    calls = _calls(records, patients)
    off = _answers(client, calls)
    logged_model = tracker.client.get_model_version(MODEL, candidate).source
    [model_file] = Path(settings.mlflow_artifact_root).rglob(
        f"{logged_model.removeprefix('models:/')}/**/model.skops"
    )
    original = model_file.read_bytes()
    model_file.write_bytes(original + b"\0")
    try:
        shadow_start(pathology_spec, tracker, AuditLog(settings.audit_log_path), "e2e-test")
        reloaded = client.post("/admin/reload")  # the champion's reload is unaffected
        assert reloaded.status_code == 200 and reloaded.json()["changed"] is False
        service = service_instance()
        assert service.executor.shadow is None  # refused, logged
        scored = service.shadow.scored
        tampered = _answers(client, calls)
        assert [(s, b) for s, b, _ in tampered] == [(s, b) for s, b, _ in off]
        assert service.shadow.flush(120) and service.shadow.scored == scored
    finally:
        model_file.write_bytes(original)
    try:
        assert client.post("/admin/reload").status_code == 200
        assert service_instance().executor.shadow.version == candidate
    finally:
        _shadow_off(client, pipeline, registry, pathology_spec)


def test_promoting_or_rolling_back_to_the_shadowed_version_ends_the_shadow(
    pipeline, registry, pathology_spec: UseCaseSpec
) -> None:
    from clinml.audit import AuditLog
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.governance import (
        FORCED_PROMOTE,
        PROMOTE,
        ROLLBACK,
        SHADOW_STOP,
        shadow_start,
    )

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    found = _aliases(tracker)
    log = AuditLog(settings.audit_log_path)
    quiet = Progress(total=1, echo=lambda _: None)
    try:
        shadow_start(pathology_spec, tracker, log, "e2e-test")
        stages.promote(pathology_spec, settings, quiet, force=True, reason="shadow trial done")
        aliases = _aliases(tracker)
        assert aliases["champion"] == candidate and "shadow" not in aliases
        promoted, ended = log.records()[-2:]
        assert promoted["action"] in {PROMOTE, FORCED_PROMOTE}
        assert (ended["action"], ended["from_version"], ended["to_version"]) == (
            SHADOW_STOP,
            candidate,
            None,
        )
        assert ended["reason"] == "promoted to champion"

        # the old champion, now the previous one, shadowed; rolled back to, it ends too
        shadow_start(pathology_spec, tracker, log, "e2e-test", version=champion)
        stages.rollback(pathology_spec, settings, quiet, reason="back")
        aliases = _aliases(tracker)
        assert aliases["champion"] == champion and "shadow" not in aliases
        rolled, ended = log.records()[-2:]
        assert rolled["action"] == ROLLBACK
        assert (ended["action"], ended["from_version"], ended["reason"]) == (
            SHADOW_STOP,
            champion,
            "rolled back to champion",
        )
    finally:
        _restore(tracker, found)


def test_the_serving_version_is_never_scored_as_its_own_shadow(
    client, records: pd.DataFrame, pathology_spec: UseCaseSpec, monkeypatch
) -> None:
    """Between a promotion of the shadowed version and the alias check that drops it, the
    slot may hold the champion itself: it is not scored twice."""
    from clinml.serving.columns import Batch

    executor = service_instance().executor
    batch = Batch.of_records(pathology_spec, records.head(2).to_dict("records"))
    monkeypatch.setattr(executor, "shadow", executor.models.current)
    assert executor.score_shadow(batch) is None
    monkeypatch.setattr(executor, "shadow", None)
    assert executor.score_shadow(batch) is None


def test_the_shadow_report_and_a_promotion_on_live_evidence(
    client, pipeline, home: Path, registry, pathology_spec: UseCaseSpec
) -> None:
    """Shadow the challenger, answer every stored record once, ingest their outcomes by
    request id; `clinml shadow report` pairs the two versions' answers and compares them
    on the labelled requests, and `clinml promote --evidence shadow` adds that comparison
    to the gate and names it in the audit record."""
    from clinml.audit import AuditLog

    settings, _, _ = pipeline
    tracker, champion, candidate = registry
    found = _aliases(tracker)
    paths = settings.paths.usecase(MODEL)
    stored = pd.read_parquet(paths.features_file).merge(
        pd.read_parquet(paths.labels_file), on=["patient_id", "event_timestamp"]
    )
    try:
        _shadow_on(client, pipeline, registry, pathology_spec)
        request_ids = []
        for record in stored[pathology_spec.feature_names].to_dict("records"):
            answer = client.post("/predict", json={"records": [record]})
            assert answer.status_code == 200, answer.text
            request_ids.append(answer.json()["request_id"])
        logged = _logged(pipeline, set(request_ids))
        assert int(logged["shadow"].sum()) == len(stored)  # none dropped at this pace
        outcomes = pd.DataFrame(
            {
                "request_id": request_ids,
                "outcome": stored[pathology_spec.label.column].to_numpy(),
                "time": datetime.now(UTC).isoformat(),
            }
        )
        outcomes.to_csv(home / "shadow-outcomes.csv", index=False)
        ingested = clinml(home, "labels", "ingest", MODEL, str(home / "shadow-outcomes.csv"))
        assert ingested.returncode == 0, ingested.stderr

        reported = clinml(home, "shadow", "report", MODEL, "--window", "1h")
        assert reported.returncode == 0, reported.stdout + reported.stderr
        out = reported.stdout
        assert f"shadow version {candidate} vs champion version {champion}" in out
        assert "answers paired" in out and "agreement at each model's threshold" in out
        assert f"labelled comparison on {len(stored):,} requests" in out
        data = Path(out.strip().splitlines()[-1].removeprefix("data: "))
        document = json.loads(data.read_text())
        # The hour holds the module's earlier shadow traffic too; only these have outcomes.
        assert document["paired"] >= len(stored) and document["labelled"] == len(stored)
        assert document["comparison"]["verdict"] in {
            "non-inferior",
            "underpowered",
            "inferior",
            "not shown non-inferior",
        }
        assert (data.parent / "shadow.html").is_file()

        promoted = clinml(home, "promote", MODEL, "--evidence", "shadow", "--evidence-window", "1h")
        assert promoted.returncode in (0, 1), promoted.stdout + promoted.stderr
        assert "live_shadow: " in promoted.stdout + promoted.stderr
        record = AuditLog(settings.audit_log_path).records()[-1 if promoted.returncode else -2]
        assert record["to_version"] == candidate
        assert "live_shadow" in {check["check"] for check in record["gate"]}
        [retrospective, live] = record["evidence"]
        assert retrospective == {"kind": "retrospective"}
        assert live["kind"] == "shadow" and live["labelled"] == len(stored)
        assert live["verdict"] == document["comparison"]["verdict"]
    finally:
        _restore(tracker, found)
        assert client.post("/admin/reload").status_code == 200


def test_live_evidence_is_refused_without_shadow_answers(home: Path, registry) -> None:
    refused = clinml(home, "shadow", "report", MODEL, "--window", "1h", "--until", "2001-01-01")
    assert refused.returncode == 2 and "no shadow answers logged" in refused.stderr
    wrong = clinml(home, "promote", MODEL, "--evidence", "canary")
    assert wrong.returncode == 2 and "--evidence takes 'shadow'" in wrong.stderr
