"""The hash-chained audit log of alias moves: round trip, tamper evidence, concurrency,
and failed writes that leave the log as it was."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clinml.audit import GENESIS_HASH, AuditError, AuditLog, record_hash

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _fixed_clock():
    ticks = iter(range(10_000))
    return lambda: T0 + timedelta(seconds=next(ticks))


def _log_with(path: Path, n: int) -> AuditLog:
    log = AuditLog(path, clock=_fixed_clock())
    for i in range(n):
        log.append({"action": "promote", "model": "readmission", "version": str(i + 1)})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_chains_records_and_records_reads_them_back(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "nested" / "aliases.jsonl"
    log = AuditLog(path, clock=_fixed_clock())
    assert log.records() == [] and log.verify() == 0 and not path.exists()

    first = log.append({"action": "promote", "to_version": "1", "reason": "first — ünïcode"})
    second = log.append({"action": "rollback", "to_version": "0", "time": "2020-01-01T00:00Z"})
    third = log.append({"action": "promote", "forced": True, "metrics": {"roc_auc": 0.81}})

    assert path.exists() and log.lock_path == path.with_name("aliases.jsonl.lock")
    assert [r["seq"] for r in (first, second, third)] == [1, 2, 3]
    assert first["prev_hash"] == GENESIS_HASH
    assert second["prev_hash"] == first["hash"] and third["prev_hash"] == second["hash"]
    assert first["time"] == "2026-06-01T12:00:00+00:00"
    assert second["time"] == "2020-01-01T00:00Z"  # a time in the entry is kept
    assert all(r["hash"] == record_hash(r) and len(r["hash"]) == 64 for r in (first, third))
    assert log.records() == [first, second, third]
    assert log.verify() == 3
    # One canonical line per record, each ending in a newline, UTF-8 kept as is.
    lines = _lines(path)
    assert len(lines) == 3 and all(line.endswith(b"\n") for line in lines)
    assert "first — ünïcode".encode() in lines[0]
    expected = json.dumps(first, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert lines[0] == (expected + "\n").encode()


def test_verify_detects_an_edited_field(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 4)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"version":"2"', b'"version":"9"')
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 2: hash does not match"):
        log.verify()


def test_verify_detects_a_deleted_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 5)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 3: seq is 4, expected 3"):
        log.verify()


def test_verify_detects_a_rehashed_record_that_no_longer_links(tmp_path: Path) -> None:
    # An edit that recomputes the record's own hash still breaks the next link.
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    records = log.records()
    records[1]["version"] = "9"
    records[1]["hash"] = record_hash(records[1])
    lines = _lines(path)
    lines[1] = (json.dumps(records[1], sort_keys=True, separators=(",", ":")) + "\n").encode()
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 3: prev_hash does not match"):
        log.verify()


def test_verify_and_records_report_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # a crash mid-write of the third record
    with pytest.raises(AuditError, match=r"line 3: cut short"):
        log.verify()
    with pytest.raises(AuditError, match=r"line 3: cut short"):
        log.records()
    # Even a line complete but for its newline counts as cut short.
    path.write_bytes(data[:-1])
    with pytest.raises(AuditError, match=r"line 3: cut short"):
        log.verify()


def test_append_refuses_a_cut_short_last_line_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    path.write_bytes(path.read_bytes()[:-20])
    before = path.read_bytes()
    with pytest.raises(AuditError, match=r"line 3 is cut short.*refusing to append"):
        log.append({"action": "promote"})
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "line"),
    [
        ("edit_last", 3),  # the last record's own hash no longer recomputes
        ("delete_last_but_one", 2),  # the last record no longer links to the one before
        ("garbage_last", 3),  # the last line is not JSON
        ("garbage_before_last", 2),  # the line the last record links to is not JSON
    ],
)
def test_append_refuses_to_extend_a_broken_chain(tmp_path: Path, damage: str, line: int) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    lines = _lines(path)
    if damage == "edit_last":
        lines[-1] = lines[-1].replace(b'"version":"3"', b'"version":"7"')
    elif damage == "delete_last_but_one":
        del lines[1]
    elif damage == "garbage_last":
        lines[-1] = b"{not json\n"
    else:
        lines[-2] = b"{not json\n"
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    with pytest.raises(AuditError, match=rf"line {line} is broken.*refusing to extend"):
        log.append({"action": "promote"})
    assert path.read_bytes() == before


def test_append_reads_only_the_tail_of_a_long_log(tmp_path: Path) -> None:
    # Records larger than the tail window still chain: the window grows as needed.
    path = tmp_path / "aliases.jsonl"
    log = AuditLog(path, clock=_fixed_clock())
    for i in range(4):
        log.append({"action": "promote", "note": "x" * (50_000 + i)})
    assert log.verify() == 4


@pytest.mark.parametrize(
    "entry",
    [
        {"action": "promote", "when": datetime(2026, 1, 1)},
        {"action": "promote", "score": float("nan")},
        {"action": "promote", "seq": 7},
        {"action": "promote", 3: "int key"},
        ["not", "a", "dict"],
    ],
)
def test_unserialisable_or_reserved_entries_are_refused_before_writing(
    tmp_path: Path, entry: object
) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 2)
    before = path.read_bytes()
    with pytest.raises(AuditError, match=r"audit entry"):
        log.append(entry)  # type: ignore[arg-type]
    assert path.read_bytes() == before
    assert log.verify() == 2


def _append_many(path: str, worker: int, count: int, barrier) -> None:
    log = AuditLog(Path(path))
    barrier.wait()  # start together so the appenders really race
    for i in range(count):
        log.append({"action": "promote", "worker": worker, "i": i})


def test_concurrent_appends_from_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [
        context.Process(target=_append_many, args=(str(path), w, 25, barrier)) for w in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]

    log = AuditLog(path)
    assert log.verify() == 100
    records = log.records()
    assert sorted((r["worker"], r["i"]) for r in records) == [
        (w, i) for w in range(4) for i in range(25)
    ]


def test_concurrent_appends_from_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            _append_many(str(path), worker, 20, barrier)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert AuditLog(path).verify() == 160


def test_a_failed_write_raises_and_leaves_the_log_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    before = path.read_bytes()

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", disk_full)
        with pytest.raises(AuditError, match=r"aliases\.jsonl: No space left on device"):
            log.append({"action": "promote"})
    assert path.read_bytes() == before
    assert log.append({"action": "promote"})["seq"] == 4


def test_a_write_that_fails_midway_is_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", half_then_full)
        with pytest.raises(AuditError, match=r"No space left on device"):
            log.append({"action": "promote"})
    assert path.read_bytes() == before
    assert log.verify() == 3


def test_a_read_only_file_system_is_refused_with_the_path_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 1)
    before = path.read_bytes()
    real_open = os.open

    def read_only(file, flags, *args, **kwargs):
        if Path(file) == path and flags & os.O_APPEND:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, flags, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", read_only)
        with pytest.raises(AuditError, match=r"aliases\.jsonl.*Read-only file system"):
            log.append({"action": "promote"})
    assert path.read_bytes() == before


# -- byte-exact records (issue 19): what parses to a valid record is not enough ---------------


def test_verify_refuses_a_key_smuggled_in_twice_and_names_the_line(tmp_path: Path) -> None:
    # json keeps the last of two equal keys, so a first "action" placed before the real
    # one is invisible to a parser, and the hash recomputes over the real one.
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 3)
    lines = _lines(path)
    original = json.loads(lines[1])
    lines[1] = b'{"action":"rollback","model":"someone-else",' + lines[1][1:]
    path.write_bytes(b"".join(lines))
    assert json.loads(lines[1]) == original  # what a parser sees: the record, unchanged
    with pytest.raises(AuditError, match=r"line 2: key 'action' appears twice in one object"):
        log.verify()
    with pytest.raises(AuditError, match=r"line 2: key 'action' appears twice"):
        log.records()


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda record: json.dumps(record, sort_keys=True, ensure_ascii=False),  # spaces
        lambda record: json.dumps(
            dict(reversed(record.items())), separators=(",", ":"), ensure_ascii=False
        ),
        lambda record: json.dumps(record, sort_keys=True, separators=(",", ":")),  # escapes
    ],
    ids=["spaces", "keys-reordered", "unicode-escaped"],
)
def test_verify_refuses_a_line_that_is_not_its_records_canonical_bytes(
    tmp_path: Path, rewrite
) -> None:
    path = tmp_path / "aliases.jsonl"
    log = AuditLog(path, clock=_fixed_clock())
    for reason in ("first — ünïcode", "second — ünïcode", "third"):
        log.append({"action": "promote", "reason": reason})
    lines = _lines(path)
    record = json.loads(lines[1])
    lines[1] = (rewrite(record) + "\n").encode()
    assert json.loads(lines[1]) == record and record["hash"] == record_hash(record)
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=r"line 2: not byte for byte the canonical JSON"):
        log.verify()


def test_append_refuses_to_extend_a_non_canonical_last_line(tmp_path: Path) -> None:
    path = tmp_path / "aliases.jsonl"
    log = _log_with(path, 2)
    lines = _lines(path)
    lines[-1] = (json.dumps(json.loads(lines[-1]), sort_keys=True) + "\n").encode()
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()
    with pytest.raises(AuditError, match=r"line 2 is broken \(not byte for byte.*refusing"):
        log.append({"action": "promote"})
    assert path.read_bytes() == before
