"""The prediction log's columnar door (``PredictionLog.record_columns``): the same parquet
as ``record`` writes for the same rows, scalars for every row, mistakes named by column
(never by value), and the same queue bounds and drop counting."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clinml.predictionlog import read_predictions
from clinml.serving import requestlog
from clinml.serving.requestlog import PredictionLog
from tests.code.test_requestlog import FEATURE_VALUE, T0, _pause

FIELDS = ("time", "request_id", "model_version", "patient", "probability", "label")


def _request(i: int, count: int, when=T0, patients: bool = True) -> list[dict[str, Any]]:
    """One request's rows as the service builds them: features first, then the fields."""
    return [
        {
            "radius_mean": FEATURE_VALUE + j,
            "site": "north" if j % 3 else "south",
            "age": 40 + j,
            "glucose": None if j % 2 else 5.5 + j,
            "time": when,
            "request_id": f"req-{i}",
            "model_version": "3",
            "patient": (f"p_{i:04x}{j:04x}" if j % 4 else None) if patients else None,
            "probability": j / (count + 1),
            "label": "malignant" if j % 2 else "benign",
        }
        for j in range(count)
    ]


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The same request as columns, the way a caller would hand them over."""
    first = rows[0]
    columns: dict[str, Any] = {
        name: [row[name] for row in rows] for name in first if name not in FIELDS
    }
    patients = [row["patient"] for row in rows]
    columns.update(
        time=first["time"],
        request_id=first["request_id"],
        model_version=first["model_version"],
        patient=None if all(p is None for p in patients) else patients,
        probability=np.array([row["probability"] for row in rows]),
        label=[row["label"] for row in rows],
    )
    return columns


def _tables(directory: Path) -> dict[str, pa.Table]:
    files = sorted(directory.rglob("part-*.parquet"))
    return {file.parent.name: pq.read_table(file, partitioning=None) for file in files}


@pytest.fixture
def logs(tmp_path: Path):
    made = [PredictionLog(tmp_path / name, flush_interval_s=0.05) for name in ("rows", "columns")]
    yield made
    for log in made:
        log.close(timeout=5)


def test_record_columns_writes_the_same_parquet_as_record(logs: list[PredictionLog]) -> None:
    by_rows, by_columns = logs
    requests = [
        _request(0, 3),
        _request(1, 1, patients=False),  # patient None for the whole request
        _request(2, 5, when=T0 + timedelta(seconds=3)),  # the next day
        _request(3, 2),
    ]
    for rows in requests:
        by_rows.record(rows)
        by_columns.record_columns(_columns(rows), len(rows))
    assert by_rows.flush(10) and by_columns.flush(10)
    assert (by_columns.written, by_columns.dropped, by_columns.queued) == (11, 0, 0)

    expected, got = _tables(by_rows.directory), _tables(by_columns.directory)
    assert sorted(got) == ["date=2026-06-01", "date=2026-06-02"]
    assert got.keys() == expected.keys()
    for day, table in got.items():
        assert table.schema == expected[day].schema, day
        assert table.equals(expected[day]), day
        # and what the writer made of rows before record_columns (pa.Table.from_pylist)
        today = [row for rows in requests for row in rows if row["time"].day == int(day[-2:])]
        assert table.equals(pa.Table.from_pylist(today)), day
    frame = read_predictions(by_columns.directory)
    in_time_order = sorted((row for rows in requests for row in rows), key=lambda r: r["time"])
    assert frame["request_id"].tolist() == [row["request_id"] for row in in_time_order]
    assert frame["probability"].tolist() == [row["probability"] for row in in_time_order]


def _arrays(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The request as a ``/predict`` batch hands it over: numbers as numpy arrays (a
    missing float as NaN), categories as lists, one value for the request's fields."""
    columns = _columns(rows)
    columns["radius_mean"] = np.array([row["radius_mean"] for row in rows], dtype=np.float64)
    columns["age"] = np.array([row["age"] for row in rows], dtype=np.int64)
    columns["glucose"] = np.array(
        [math.nan if row["glucose"] is None else row["glucose"] for row in rows]
    )
    return columns


def test_numpy_columns_and_single_values_write_what_rows_would(tmp_path: Path) -> None:
    """The writer joins arrays with numpy and converts a request's single values once
    (issue 22); the parquet must be what ``pa.Table.from_pylist`` makes of the rows, for
    large and small requests, in any mix."""
    requests = [
        _request(0, 40),  # arrays large enough to be joined by numpy
        _request(1, 1),  # a one-row request: its arrays are kept as Python values
        _request(2, 300, patients=False),
        _request(3, 17, when=T0 - timedelta(minutes=5)),
    ]
    log = PredictionLog(tmp_path, flush_interval_s=60)  # every request in one batch
    for rows in requests:
        log.record_columns(_arrays(rows), len(rows))
    assert log.flush(10)
    log.close(timeout=5)
    [table] = _tables(tmp_path).values()
    rows = [row for rows in requests for row in rows]
    assert table.schema == pa.Table.from_pylist(rows).schema
    assert table.equals(pa.Table.from_pylist(rows))


def test_a_column_of_int_and_float_arrays_is_written_as_rows_of_both_would_be(
    tmp_path: Path,
) -> None:
    rows = _request(0, 20) + _request(1, 30)
    for j, row in enumerate(rows[:20]):
        row["radius_mean"] = j  # ints in the first request, floats in the second
    log = PredictionLog(tmp_path, flush_interval_s=60)  # both requests in one batch
    first, second = _arrays(rows[:20]), _arrays(rows[20:])
    first["radius_mean"] = np.arange(20, dtype=np.int64)
    log.record_columns(first, 20)
    log.record_columns(second, 30)
    assert log.flush(10)
    log.close(timeout=5)
    [table] = _tables(tmp_path).values()
    assert table.equals(pa.Table.from_pylist(rows))


def test_a_column_whose_slices_convert_to_different_types_is_promoted_as_rows_would_be(
    tmp_path: Path,
) -> None:
    """The writer converts Python values a slice at a time and keeps each column in those
    chunks; where one slice comes out ints and a later one floats, or nulls and then
    strings, the column must still be the one type ``from_pylist`` gives the rows."""
    count = requestlog._SLICE_ROWS + 500
    rows = _request(0, count)
    for j, row in enumerate(rows):
        early = j < requestlog._SLICE_ROWS + 50
        row["radius_mean"] = j if early else j + 0.5
        row["note"] = None if early else "checked"
    log = PredictionLog(tmp_path, flush_interval_s=60)
    log.record(rows)  # row dicts: every column as Python values
    assert log.flush(10)
    log.close(timeout=5)
    [table] = _tables(tmp_path).values()
    expected = pa.Table.from_pylist(rows)
    assert expected.schema.field("radius_mean").type == pa.float64()
    assert expected.schema.field("note").type == pa.string()
    assert table.schema == expected.schema
    assert table.equals(expected)


def test_request_times_in_another_time_zone_keep_it(tmp_path: Path) -> None:
    from datetime import timezone

    when = T0.astimezone(timezone(timedelta(hours=2)))
    rows = _request(0, 20, when=when) + _request(1, 20, when=when + timedelta(seconds=1))
    log = PredictionLog(tmp_path, flush_interval_s=60)  # both requests in one batch
    log.record_columns(_arrays(rows[:20]), 20)
    log.record_columns(_arrays(rows[20:]), 20)
    assert log.flush(10)
    log.close(timeout=5)
    [table] = _tables(tmp_path).values()
    assert table.equals(pa.Table.from_pylist(rows))


def test_scalars_apply_to_every_row(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "predictions", flush_interval_s=0.05)
    try:
        log.record_columns(
            {
                "radius_mean": np.array([1.0, 2.0, math.nan]),  # NaN: missing, as None
                "site": "north",
                "age": np.int64(61),
                "time": T0,
                "request_id": "req-7",
                "model_version": "3",
                "patient": None,
                "probability": 0.25,
                "label": ("benign", "benign", "malignant"),
            },
            rows=3,
        )
        assert log.flush(10)
    finally:
        log.close()
    assert (log.written, log.dropped) == (3, 0)
    frame = read_predictions(log.directory)
    assert frame["site"].tolist() == ["north"] * 3
    assert frame["age"].tolist() == [61] * 3
    assert frame["request_id"].tolist() == ["req-7"] * 3
    assert frame["patient"].tolist() == [None] * 3
    assert frame["probability"].tolist() == [0.25] * 3
    assert frame["label"].tolist() == ["benign", "benign", "malignant"]
    assert frame["time"].tolist() == [T0] * 3
    (table,) = _tables(log.directory).values()
    assert table.column("radius_mean").null_count == 1  # written as missing, not NaN


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("radius_mean", [FEATURE_VALUE, FEATURE_VALUE + 1], r"'radius_mean' has 2 values for 3"),
        ("patient", np.array(["MRN-0042"] * 4), r"'patient' has 4 values for 3 rows"),
        ("label", {"MRN-0042": 1}, r"'label' is a dict; give a list"),
        ("probability", np.zeros((3, 2)), r"'probability' is a 2-dimensional array"),
        ("time", [T0] * 3, r"'time' must be one datetime"),
    ],
)
def test_a_malformed_column_is_a_value_error_naming_the_column_not_its_values(
    tmp_path: Path, column: str, value: Any, match: str
) -> None:
    log = PredictionLog(tmp_path / "predictions", flush_interval_s=0.05)
    try:
        columns = _columns(_request(0, 3))
        columns[column] = value
        with pytest.raises(ValueError, match=match) as caught:
            log.record_columns(columns, 3)
        message = str(caught.value)
        assert "MRN-0042" not in message and str(FEATURE_VALUE) not in message
        assert "p_0000" not in message
        assert (log.queued, log.dropped) == (0, 0)  # a caller's bug: nothing queued or counted
    finally:
        log.close()


def test_columns_without_a_time_are_refused(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "predictions")
    try:
        columns = _columns(_request(0, 2))
        del columns["time"]
        with pytest.raises(ValueError, match=r"have no 'time'"):
            log.record_columns(columns, 2)
    finally:
        log.close()


def test_a_full_queue_drops_and_counts_columns_like_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[int] = []
    log = PredictionLog(
        tmp_path / "predictions",
        max_queue=5,
        flush_rows=1,
        flush_interval_s=0.02,
        on_drop=reported.append,
    )
    try:
        entered, release = _pause(monkeypatch, log, "_write_partition")
        log.record_columns(_columns(_request(0, 1)), 1)
        assert entered.wait(10)  # the writer holds request 0 and is stuck writing it
        log.record_columns(_columns(_request(1, 3)), 3)
        log.record_columns(_columns(_request(2, 5)), 5)  # two rows fit, three do not
        assert (log.queued, log.dropped) == (5, 3)
        release.set()
        assert log.flush(10)
        assert (log.written, log.dropped, log.queued) == (6, 3, 0)
        frame = read_predictions(log.directory)
        assert frame["request_id"].tolist() == ["req-0"] + ["req-1"] * 3 + ["req-2"] * 2
        assert frame["radius_mean"].tolist()[-2:] == [FEATURE_VALUE, FEATURE_VALUE + 1]
    finally:
        log.close()
    log.record_columns(_columns(_request(3, 4)), 4)  # closed: dropped and counted
    assert log.dropped == 7 and sum(reported) == 7


def test_a_column_arrow_cannot_type_drops_its_rows_and_names_no_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = PredictionLog(tmp_path / "predictions", flush_interval_s=0.05)
    try:
        good = _request(0, 2)
        bad = _columns(_request(1, 2))
        bad["site"] = ["MRN-0042", 7]  # a string and a number in one column
        log.record_columns(bad, 2)
        log.record_columns(_columns(_request(2, 3, when=T0 + timedelta(days=1))), 3)
        assert log.flush(10)
        assert (log.written, log.dropped) == (3, 2)
        assert "could not write 2 prediction rows" in log.last_error
        log.record_columns(_columns(good), 2)
        assert log.flush(10)
    finally:
        log.close()
    assert (log.written, log.dropped) == (5, 2)
    assert "MRN-0042" not in caplog.text + (log.last_error or "")


def test_rows_and_columns_of_one_day_share_a_file(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "predictions", flush_interval_s=0.5)
    try:
        log.record(_request(0, 2))
        log.record_columns(_columns(_request(1, 3)), 3)
        assert log.flush(10)
    finally:
        log.close()
    tables = _tables(log.directory)
    assert list(tables) == ["date=2026-06-01"]
    assert tables["date=2026-06-01"]["request_id"].to_pylist() == ["req-0"] * 2 + ["req-1"] * 3


def test_the_writer_runs_at_a_lower_priority(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, flush_interval_s=0.05)
    try:
        log.record_columns(_arrays(_request(0, 20)), 20)
        assert log.flush(10)
        thread = log._writer._thread
        if not hasattr(os, "getpriority"):
            pytest.skip("no thread priorities on this platform")
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) >= requestlog._WRITER_NICE
    finally:
        log.close(timeout=5)


def test_the_writer_keeps_writing_when_requests_never_stop(tmp_path: Path) -> None:
    """Between slices of its work the writer waits for a moment with no request being
    answered, but only so long: a worker that is never idle still gets its log."""
    requestlog.ACTIVITY.started()  # a request that never finishes
    log = PredictionLog(tmp_path, flush_interval_s=0.05)
    try:
        for i in range(40):  # enough rows for many slices of the writer's work
            log.record_columns(_arrays(_request(i, 500)), 500)
        assert log.flush(60)
        assert (log.written, log.dropped) == (20_000, 0)
    finally:
        requestlog.ACTIVITY.finished()
        log.close(timeout=5)
    assert requestlog.ACTIVITY.idle.is_set()


class _Idle:
    """ACTIVITY's stand-in: a worker that is never idle, counting the writer's waits."""

    def __init__(self) -> None:
        self.waits = 0
        self.idle = self

    def wait(self, timeout: float) -> bool:
        self.waits += 1
        return False


@pytest.mark.parametrize("behind", [False, True])
def test_a_writer_behind_stops_waiting_for_pauses_in_requests(monkeypatch, behind: bool) -> None:
    """After a slice of work the writer always hands the GIL over; it waits for a pause
    in requests only while it keeps up (at 60,000+ rows a second, waiting dropped rows)."""
    busy = _Idle()
    monkeypatch.setattr(requestlog, "ACTIVITY", busy)
    budget = requestlog._Budget(lambda: behind)
    budget._since -= 1.0  # a slice's worth of CPU used
    budget.check()
    assert busy.waits == (0 if behind else 1)


def test_the_writer_is_behind_once_a_fraction_of_its_queue_is_taken(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, max_queue=4_000, flush_interval_s=60)
    try:
        assert not log._behind()
        log._writer.waiting = 4_000 // requestlog.BEHIND_FRACTION - 1
        assert not log._behind()
        log._writer.waiting += 1
        assert log._behind()
        # and the batches the writer makes ask the log
        assert log._writer._new_batch().budget._behind() is True
    finally:
        log._writer.waiting = 0
        log.close(timeout=5)
