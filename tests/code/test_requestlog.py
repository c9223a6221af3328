"""The per-request audit trail (fails closed) and the prediction log (fails open, counts
what it drops), both written by background threads off the request path."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clinml.audit import AuditError, AuditLog, Checkpoints, canonical_json, record_hash
from clinml.predictionlog import read_predictions
from clinml.serving.requestlog import AUDIT_FIELDS, PredictionLog, RequestAudit
from tests.waiting import wait_for

T0 = datetime(2026, 6, 1, 23, 59, 58, tzinfo=UTC)  # two seconds before midnight
FEATURE_VALUE = 987.654321  # a distinctive feature value that must never reach a log
AUDIT_KEY = "5e" * 32  # the audit checkpoints' HMAC key in these tests


def _request(i: int, **overrides) -> dict:
    record = {
        "request_id": f"req-{i}",
        "key_id": "triage-app",
        "endpoint": "/predict_patient",
        "model_version": "3",
        "patient": f"p_{i:08x}",
        "outcome": 200,
        "latency_ms": 12.5 + i,
    }
    return {**record, **overrides}


def _row(i: int, when: datetime) -> dict:
    return {
        "time": when,
        "request_id": f"req-{i}",
        "model_version": "3",
        "patient": f"p_{i:08x}" if i % 2 else None,
        "probability": i / 100,
        "label": "malignant" if i % 2 else "benign",
        "radius_mean": FEATURE_VALUE + i,
        "site": "north" if i % 3 else "south",
    }


@pytest.fixture
def audit(tmp_path: Path):
    trail = RequestAudit(tmp_path / "audit" / "requests.jsonl", flush_interval_s=0.02)
    yield trail
    trail.close(timeout=1)


@pytest.fixture
def predictions(tmp_path: Path):
    log = PredictionLog(tmp_path / "predictions", flush_interval_s=0.05)
    yield log
    log.close(timeout=5)


def _pause(monkeypatch: pytest.MonkeyPatch, obj: object, name: str):
    """Make ``obj.name`` block until released; returns (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def paused(*args, **kwargs):
        entered.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, paused)
    return entered, release


# -- the request audit trail -----------------------------------------------------------------


def test_audit_records_are_written_in_order_and_the_chain_verifies(
    audit: RequestAudit,
) -> None:
    assert audit.healthy and audit.error is None
    for i in range(25):
        assert audit.submit(_request(i, **({"patient": None} if i == 3 else {})))
    assert audit.submit(
        {"request_id": "r", "endpoint": "/predict", "outcome": 401, "latency_ms": 1}
    )
    assert audit.flush(10)
    log = AuditLog(audit.path)
    assert log.verify() == 26 == audit.written
    records = log.records()
    assert [r["request_id"] for r in records] == [f"req-{i}" for i in range(25)] + ["r"]
    first = records[0]
    assert {key: first[key] for key in AUDIT_FIELDS} == _request(0)
    assert set(first) == {*AUDIT_FIELDS, "time", "seq", "prev_hash", "hash"}
    assert datetime.fromisoformat(first["time"]).tzinfo is not None
    assert records[3]["patient"] is None
    assert records[-1] == {**records[-1], "key_id": None, "model_version": None, "outcome": 401}
    assert audit.healthy and audit.queued == 0


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({**_request(0), "patient_id": "MRN-0042"}, r"unknown field\(s\) patient_id"),
        ({"request_id": "r", "endpoint": "/predict"}, r"missing field\(s\) latency_ms, outcome"),
        (_request(0, outcome="200"), r"outcome must be an HTTP status"),
        (_request(0, latency_ms=float("nan")), r"latency_ms must be a finite number"),
        (_request(0, patient=42), r"patient must be a string or None"),
    ],
)
def test_a_malformed_audit_record_is_a_bug_reported_without_its_values(
    audit: RequestAudit, record: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        audit.submit(record)
    assert "MRN-0042" not in str(caught.value)
    assert audit.queued == 0 and audit.healthy


def test_the_audit_trail_fails_closed_on_a_failed_write_then_recovers(
    audit: RequestAudit, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert audit.submit(_request(0)) and audit.flush(10)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with caplog.at_level(logging.INFO, logger="clinml.serving.requestlog"):
        monkeypatch.setattr(os, "write", disk_full)
        assert audit.submit(_request(1))  # accepted: it is kept until it can be written
        wait_for(lambda: not audit.healthy, "the audit trail to report the failed write")
        assert "No space left on device" in audit.error
        assert "\n" not in audit.error
        assert not audit.flush(0.1)  # not written while the disk is full
        monkeypatch.undo()
        assert audit.flush(10)
    assert audit.healthy and audit.error is None
    log = AuditLog(audit.path)
    assert log.verify() == 2
    assert [r["request_id"] for r in log.records()] == ["req-0", "req-1"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("No space left" in message for message in messages)
    assert any("writing again" in message for message in messages)
    assert not any("p_00000001" in message for message in messages)  # no record values


def test_a_full_audit_queue_makes_the_trail_unhealthy_until_it_drains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = RequestAudit(tmp_path / "requests.jsonl", max_queue=3, flush_interval_s=0.02)
    try:
        entered, release = _pause(monkeypatch, audit._log, "append_many")
        assert audit.submit(_request(0))
        assert entered.wait(10)  # the writer holds record 0 and is stuck writing it
        assert [audit.submit(_request(i)) for i in range(1, 4)] == [True] * 3
        assert audit.queued == 3
        assert not audit.healthy and "queue full" in audit.error
        assert audit.submit(_request(4)) is False
        assert audit.refused == 1
        release.set()
        assert audit.flush(10)
        assert audit.healthy and audit.written == 4
        assert [r["request_id"] for r in AuditLog(audit.path).records()] == [
            f"req-{i}" for i in range(4)
        ]
    finally:
        audit.close(timeout=1)
    assert not audit.healthy and audit.submit(_request(9)) is False  # closed


def test_a_count_summarises_refusals_and_is_written_only_when_given(
    audit: RequestAudit,
) -> None:
    refusals = {"request_id": "agg-1", "key_id": "triage-app", "endpoint": "/predict"}
    assert audit.submit({**refusals, "outcome": 429, "latency_ms": 0.0, "count": 17})
    assert audit.submit(_request(1))
    assert audit.flush(10)
    first, second = AuditLog(audit.path).records()
    assert first["count"] == 17 and first["outcome"] == 429
    assert "count" not in second  # ordinary requests carry no count


@pytest.mark.parametrize("count", [0, -3, True, "17", 2.0, None])
def test_a_bad_count_is_refused_naming_the_field_not_the_value(
    audit: RequestAudit, count: object
) -> None:
    with pytest.raises(ValueError, match=r"^audit record field count must be an integer >= 1$"):
        audit.submit({**_request(0), "count": count})
    assert audit.queued == 0


def test_head_follows_each_durable_write_and_starts_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    first = RequestAudit(path, flush_interval_s=0.02)
    try:
        wait_for(lambda: first.head is not None, "the first trail's first record")
        assert first.head == (0, "0" * 64)  # no log yet
        for i in range(5):
            assert first.submit(_request(i))
        assert first.flush(10)
        last = AuditLog(path).records()[-1]
        assert first.head == (5, last["hash"])
    finally:
        first.close(timeout=5)
    second = RequestAudit(path, flush_interval_s=0.02)  # a restart: the witness's count holds
    try:
        wait_for(lambda: second.head is not None, "the second trail's first record")
        assert second.head == (5, last["hash"])
    finally:
        second.close(timeout=5)


def _trail(tmp_path: Path, interval: float) -> tuple[RequestAudit, Checkpoints]:
    store = Checkpoints(tmp_path / "checkpoints", AUDIT_KEY)
    trail = RequestAudit(
        tmp_path / "audit" / "requests.jsonl",
        flush_interval_s=0.02,
        checkpoints=store,
        checkpoint_interval_s=interval,
    )
    return trail, store


def test_the_trail_signs_a_checkpoint_with_its_first_batch_then_per_interval_and_on_close(
    tmp_path: Path,
) -> None:
    trail, store = _trail(tmp_path, interval=3600.0)  # no second one within the test
    try:
        assert trail.submit(_request(0)) and trail.flush(10)
        assert [c.records for c in store.read(trail.path)] == [1]  # with the first batch
        for i in range(1, 6):
            assert trail.submit(_request(i))
        assert trail.flush(10)
        assert [c.records for c in store.read(trail.path)] == [1]  # not yet due
    finally:
        trail.close(timeout=5)
    assert [c.records for c in store.read(trail.path)] == [1, 6]  # on close
    assert trail.checkpoint_failures == 0 and trail.integrity_alarms == 0
    result = AuditLog(trail.path, checkpoints=store).check()
    assert result.records == 6 and result.uncovered == 0


def test_records_before_a_quiet_spell_are_signed_once_the_interval_is_up(
    tmp_path: Path,
) -> None:
    # Found by tests/integration/test_attacks.py: checkpoints were signed only when more
    # records arrived, so the last records before traffic stopped stayed uncovered (and
    # could be cut unnoticed) for as long as the service was quiet.
    trail, store = _trail(tmp_path, interval=0.05)
    try:
        assert trail.submit(_request(0)) and trail.flush(10)
        for i in range(1, 6):
            assert trail.submit(_request(i))
        assert trail.flush(10)
        # no more records arrive: the idle writer signs the five once the interval is up
        wait_for(
            lambda: [c.records for c in store.read(trail.path)][-1] == 6,
            "a checkpoint covering all 6 records",
        )
        assert trail.checkpoint_failures == 0
    finally:
        trail.close(timeout=5)


def test_lines_cut_under_flock_from_a_running_trail_are_detected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The red-team finding: 10 lines cut under the log's own lock while the service ran
    # went unnoticed. The chain alone still calls the cut log intact; the checkpoint that
    # covered those lines does not, and the writer raises an alarm at its next write.
    trail, store = _trail(tmp_path, interval=0.0)  # a checkpoint with every batch
    try:
        for i in range(20):
            assert trail.submit(_request(i))
        assert trail.flush(10)
        log = AuditLog(trail.path)
        with open(log.lock_path, "a+") as lock:  # as an attacker with `flock` would
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = trail.path.read_bytes().splitlines(keepends=True)
            trail.path.write_bytes(b"".join(lines[:-10]))
        assert log.verify() == 10  # the chain alone: "intact"
        with pytest.raises(AuditError, match=r"has 10 records, but checkpoint \d+ .* signed 20"):
            AuditLog(trail.path, checkpoints=store).verify()

        with caplog.at_level(logging.ERROR, logger="clinml.audit"):
            for i in range(20, 25):
                assert trail.submit(_request(i))
            assert trail.flush(10)
        assert trail.healthy  # detected and reported, not failed closed
        assert trail.integrity_alarms >= 1
        assert any("the log shrank" in r.getMessage() for r in caplog.records)
        assert not any("p_000000" in r.getMessage() for r in caplog.records)
        with pytest.raises(AuditError, match=r"has 15 records, but checkpoint \d+ .* signed 20"):
            AuditLog(trail.path, checkpoints=store).verify()
    finally:
        trail.close(timeout=5)
    alarms = [c.alarm for c in store.read(trail.path) if c.alarm]
    assert alarms and "the log shrank" in alarms[0]


def test_a_failed_checkpoint_leaves_the_trail_healthy_and_loses_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail, store = _trail(tmp_path, interval=0.0)
    try:
        real_replace = os.replace

        def checkpoint_disk_full(src, dst, *args, **kwargs):
            if str(dst).endswith(".json"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", checkpoint_disk_full)
        for i in range(3):
            assert trail.submit(_request(i))
        assert trail.flush(10)
        assert trail.healthy and trail.checkpoint_failures >= 1
        assert AuditLog(trail.path).verify() == 3 == trail.written
        monkeypatch.undo()
        assert trail.submit(_request(3)) and trail.flush(10)  # retried with the next batch
        assert store.read(trail.path)[-1].records == 4
    finally:
        trail.close(timeout=5)
    assert AuditLog(trail.path, checkpoints=store).verify() == 4


def test_a_keyed_trail_on_a_log_written_before_the_key_stays_healthy_until_adopted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit" / "requests.jsonl"
    before = RequestAudit(path, flush_interval_s=0.02)  # no key yet
    assert before.submit(_request(0)) and before.flush(10)
    before.close(timeout=5)
    trail, store = _trail(tmp_path, interval=0.0)
    try:
        assert trail.submit(_request(1)) and trail.flush(10)
        assert trail.healthy and trail.checkpoint_failures >= 1  # refused, not failed closed
        assert store.read(path) == []
        AuditLog(path, checkpoints=store).checkpoint(adopt=True)  # `clinml audit checkpoint`
        assert trail.submit(_request(2)) and trail.flush(10)
        assert store.read(path)[-1].records == 3
    finally:
        trail.close(timeout=5)
    assert AuditLog(path, checkpoints=store).verify() == 3


def test_a_made_up_record_appended_to_a_running_trail_shows_only_to_the_witness(
    tmp_path: Path,
) -> None:
    # The window, stated as a test: a record appended with a valid hash after the last
    # checkpoint passes verify (it is counted as uncovered) and the next checkpoint signs
    # it. The trail's head, published for an outside witness, does not include it.
    trail, store = _trail(tmp_path, interval=3600.0)
    try:
        assert trail.submit(_request(0)) and trail.flush(10)
        genuine = AuditLog(trail.path).records()[-1]
        forged = {**_request(99), "time": genuine["time"], "seq": 2, "prev_hash": genuine["hash"]}
        forged["hash"] = record_hash(forged)
        with trail.path.open("ab") as file:
            file.write((canonical_json(forged) + "\n").encode())
        result = AuditLog(trail.path, checkpoints=store).check()
        assert (result.records, result.uncovered) == (2, 1)
        assert trail.head == (1, genuine["hash"])  # the witness saw one record
        assert trail.submit(_request(1)) and trail.flush(10)
    finally:
        trail.close(timeout=5)
    assert AuditLog(trail.path, checkpoints=store).verify() == 3  # signed in with the rest


# -- the prediction log ----------------------------------------------------------------------


def test_predictions_round_trip_across_two_days_with_windows(predictions: PredictionLog) -> None:
    times = [T0 + timedelta(seconds=s) for s in range(4)]  # 23:59:58, :59, 00:00:00, :01
    predictions.record([_row(i, when) for i, when in enumerate(times)])
    predictions.record([_row(9, T0 - timedelta(days=3))])
    assert predictions.flush(10)
    assert (predictions.written, predictions.dropped, predictions.queued) == (5, 0, 0)
    assert predictions.last_error is None

    files = sorted(p.relative_to(predictions.directory) for p in predictions.directory.rglob("*"))
    names = [str(f) for f in files if f.suffix == ".parquet"]
    assert [n.split("/")[0] for n in names] == [
        "date=2026-05-29",
        "date=2026-06-01",
        "date=2026-06-02",
    ]
    assert all(
        re.fullmatch(r"date=[\d-]+/part-\d{8}T\d{12}Z-[0-9a-f]{8}\.parquet", n) for n in names
    )
    assert not [f for f in files if f.name.startswith(".")]  # no temporary files left

    everything = read_predictions(predictions.directory)
    assert list(everything["request_id"]) == ["req-9", "req-0", "req-1", "req-2", "req-3"]
    assert "date" not in everything.columns
    assert str(everything["time"].dt.tz) == "UTC"
    assert everything.loc[1, "radius_mean"] == FEATURE_VALUE
    assert everything.loc[2, "patient"] == "p_00000001" and everything.loc[1, "patient"] is None

    midnight = datetime(2026, 6, 2, tzinfo=UTC)
    assert list(read_predictions(predictions.directory, midnight, None)["request_id"]) == [
        "req-2",
        "req-3",
    ]
    assert list(read_predictions(predictions.directory, None, midnight)["request_id"]) == [
        "req-9",
        "req-0",
        "req-1",
    ]
    window = read_predictions(predictions.directory, times[1], times[3])  # until is exclusive
    assert list(window["request_id"]) == ["req-1", "req-2"]
    assert read_predictions(predictions.directory, T0 + timedelta(days=5), None).empty
    assert read_predictions(predictions.directory.parent / "nowhere", None, None).empty
    with pytest.raises(ValueError, match=r"since needs a time zone"):
        read_predictions(predictions.directory, datetime(2026, 6, 1), None)


def test_read_predictions_opens_only_the_partitions_in_the_window(
    predictions: PredictionLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    predictions.record([_row(i, T0 - timedelta(days=i)) for i in range(5)])
    assert predictions.flush(10)
    import pyarrow.parquet as pq

    opened: list[str] = []
    real = pq.ParquetFile

    def spying(source, *args, **kwargs):
        opened.append(Path(source).parent.name)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", spying)
    frame = read_predictions(predictions.directory, T0 - timedelta(days=1, hours=1), T0)
    assert list(frame["request_id"]) == ["req-1"]
    assert sorted(opened) == ["date=2026-05-31", "date=2026-06-01"]


def test_a_full_prediction_queue_drops_and_counts_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = PredictionLog(tmp_path / "predictions", max_queue=5, flush_rows=1, flush_interval_s=0.02)
    try:
        entered, release = _pause(monkeypatch, log, "_write_partition")
        log.record([_row(0, T0)])
        assert entered.wait(10)  # the writer holds row 0 and is stuck writing it
        log.record([_row(i, T0) for i in range(1, 4)])
        log.record([_row(i, T0) for i in range(4, 9)])  # two fit, three do not
        assert (log.queued, log.dropped) == (5, 3)
        release.set()
        assert log.flush(10)
        assert (log.written, log.dropped, log.queued) == (6, 3, 0)
        frame = read_predictions(log.directory)
        assert list(frame["request_id"]) == [f"req-{i}" for i in range(6)]
    finally:
        log.close()


def test_every_dropped_row_is_reported_to_on_drop(tmp_path: Path, monkeypatch) -> None:
    reported: list[int] = []
    log = PredictionLog(
        tmp_path / "predictions",
        max_queue=2,
        flush_rows=1,
        flush_interval_s=0.02,
        on_drop=reported.append,
    )
    try:

        def disk_full(day, frame):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(log, "_write_partition", disk_full)
        log.record([_row(0, T0)])
        assert log.flush(10)
        monkeypatch.undo()  # the disk has room again
        entered, release = _pause(monkeypatch, log, "_write_partition")
        log.record([_row(1, T0)])
        assert entered.wait(10)
        log.record([_row(i, T0) for i in range(2, 6)])  # two queue, two do not fit
        release.set()
        assert log.flush(10)
    finally:
        log.close()
    assert sum(reported) == log.dropped == 3 and log.written == 3


def test_a_failed_write_counts_the_rows_as_dropped_and_never_reaches_the_caller(
    predictions: PredictionLog, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def read_only(day, frame):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(predictions.directory))

    with caplog.at_level(logging.INFO, logger="clinml.serving.requestlog"):
        monkeypatch.setattr(predictions, "_write_partition", read_only)
        predictions.record([_row(i, T0) for i in range(3)])  # does not raise
        assert predictions.flush(10)
        assert (predictions.written, predictions.dropped) == (0, 3)
        assert "could not write 3 prediction rows" in predictions.last_error
        assert "Read-only file system" in predictions.last_error
        monkeypatch.undo()

        # Rows the data libraries refuse (no time; a value of the wrong type) are dropped
        # too, and the error names the exception type, not the value.
        predictions.record([{"request_id": "no-time", "probability": FEATURE_VALUE}])
        predictions.record([_row(1, T0), {**_row(2, T0), "time": "MRN-0042"}])
        assert predictions.flush(10)
        assert (predictions.written, predictions.dropped) == (0, 6)

        predictions.record([_row(7, T0)])
        assert predictions.flush(10)
    assert (predictions.written, predictions.dropped) == (1, 6)
    assert list(read_predictions(predictions.directory)["request_id"]) == ["req-7"]
    logged = caplog.text + (predictions.last_error or "")
    assert str(FEATURE_VALUE) not in logged and "MRN-0042" not in logged
    assert "p_00000001" not in logged


def test_record_never_blocks_or_raises_and_the_counters_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = PredictionLog(tmp_path / "predictions", max_queue=2_000, flush_rows=500)
    try:
        entered, release = _pause(monkeypatch, log, "_write_partition")
        log.record([_row(0, T0)])
        assert entered.wait(10)  # the writer is stuck: nothing drains the queue
        returned = []

        def hammer() -> None:
            for i in range(1, 10_001):
                log.record([_row(i, T0)])
                returned.append(i)
            log.record("not a list of rows")  # type: ignore[arg-type]
            log.record(None)  # type: ignore[arg-type]
            log.record([["not", "a", "dict"]])  # type: ignore[list-item]
            returned.append("junk")

        caller = threading.Thread(target=hammer, daemon=True)
        caller.start()
        caller.join(20)  # a hang guard: a blocking put would never return
        assert not caller.is_alive() and len(returned) == 10_001
        assert log.queued == 2_000
        assert log.dropped == 10_000 - 2_000 + 1  # the non-dict row counts; junk does not
        release.set()
        assert log.flush(20)
        assert log.written == 2_001
        assert log.written + log.dropped + log.queued == 10_001 + 1
    finally:
        log.close()


def test_rows_with_uneven_columns_are_written_through_pandas(predictions: PredictionLog) -> None:
    rows = [_row(0, T0), {**_row(1, T0), "extra": "x"}, _row(2, T0 + timedelta(seconds=3))]
    predictions.record(rows)
    assert predictions.flush(10)
    assert (predictions.written, predictions.dropped) == (3, 0)
    frame = read_predictions(predictions.directory)
    assert list(frame["request_id"]) == ["req-0", "req-1", "req-2"]
    assert frame["time"].dt.strftime("%Y-%m-%d").tolist() == ["2026-06-01"] * 2 + ["2026-06-02"]
    assert frame["extra"].isna().tolist() == [True, False, True]


def test_a_column_of_mixed_types_drops_its_day_only(predictions: PredictionLog) -> None:
    rows = [_row(0, T0), {**_row(1, T0), "site": 3}, _row(2, T0 + timedelta(seconds=3))]
    predictions.record(rows)
    assert predictions.flush(10)
    assert (predictions.written, predictions.dropped) == (1, 2)
    assert list(read_predictions(predictions.directory)["request_id"]) == ["req-2"]
