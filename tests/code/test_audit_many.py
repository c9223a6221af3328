"""``AuditLog.append_many``: one chain with ``append``, one lock / write / fsync per batch,
and all-or-nothing on bad entries and failed writes."""

from __future__ import annotations

import errno
import fcntl
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clinml.audit import GENESIS_HASH, AuditError, AuditLog, record_hash

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _log(path: Path) -> AuditLog:
    ticks = iter(range(10_000))
    return AuditLog(path, clock=lambda: T0 + timedelta(seconds=next(ticks)))


def _entries(n: int, start: int = 0) -> list[dict]:
    return [{"action": "predict", "request_id": f"r{start + i}"} for i in range(n)]


def test_append_many_chains_with_append_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "requests.jsonl"
    log = _log(path)
    assert log.append_many([]) == [] and not path.exists()

    first = log.append_many(_entries(3))
    single = log.append({"action": "promote"})
    second = log.append_many([*_entries(2, 3), {"action": "x", "time": "2020-01-01T00:00Z"}])
    last = log.append({"action": "rollback"})

    assert [r["seq"] for r in first] == [1, 2, 3]
    assert first[0]["prev_hash"] == GENESIS_HASH
    assert [r["prev_hash"] for r in first[1:]] == [r["hash"] for r in first[:-1]]
    assert single["seq"] == 4 and single["prev_hash"] == first[-1]["hash"]
    assert [r["seq"] for r in second] == [5, 6, 7] and second[0]["prev_hash"] == single["hash"]
    assert second[2]["time"] == "2020-01-01T00:00Z"  # a time in the entry is kept
    assert first[1]["time"] == "2026-06-01T12:00:01+00:00"
    assert last["seq"] == 8 and last["prev_hash"] == second[-1]["hash"]
    assert all(r["hash"] == record_hash(r) for r in [*first, *second])
    assert log.records() == [*first, single, *second, last]
    assert [r["request_id"] for r in log.records() if "request_id" in r] == [
        f"r{i}" for i in range(5)
    ]
    assert log.verify() == 8


def test_a_batch_is_one_lock_one_write_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "requests.jsonl"
    log = _log(path)
    log.append({"action": "first"})  # the log and its directory exist already
    calls: dict[str, int] = {"write": 0, "fsync": 0, "flock": 0}
    real_write, real_fsync, real_flock = os.write, os.fsync, fcntl.flock

    def counting(name, real):
        def wrapper(*args):
            calls[name] += 1
            return real(*args)

        return wrapper

    monkeypatch.setattr(os, "write", counting("write", real_write))
    monkeypatch.setattr(os, "fsync", counting("fsync", real_fsync))
    monkeypatch.setattr(fcntl, "flock", counting("flock", real_flock))
    log.append_many(_entries(50))
    assert calls == {"write": 1, "fsync": 1, "flock": 1}
    monkeypatch.undo()
    assert log.verify() == 51


def test_a_failed_write_leaves_the_log_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "requests.jsonl"
    log = _log(path)
    log.append_many(_entries(3))
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])  # some whole records and a half one
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", half_then_full)
        with pytest.raises(AuditError, match=r"requests\.jsonl: No space left on device"):
            log.append_many(_entries(10, 3))
    assert path.read_bytes() == before
    assert log.verify() == 3
    assert [r["seq"] for r in log.append_many(_entries(2, 3))] == [4, 5]
    assert log.verify() == 5


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"action": "x", "hash": "f" * 64}, r"audit entry 2 uses reserved key\(s\) hash"),
        ({"action": "x", "score": float("nan")}, r"audit entry 2 is not JSON-serialisable"),
        ({"action": "x", 3: "int key"}, r"audit entry 2 keys must be strings"),
        ("not a dict", r"audit entry 2 must be a dict"),
    ],
)
def test_one_bad_entry_refuses_the_whole_batch(tmp_path: Path, bad: object, match: str) -> None:
    path = tmp_path / "requests.jsonl"
    log = _log(path)
    log.append_many(_entries(2))
    before = path.read_bytes()
    with pytest.raises(AuditError, match=match):
        log.append_many([*_entries(2, 2), bad, *_entries(1, 4)])  # type: ignore[list-item]
    assert path.read_bytes() == before


def test_a_refused_first_batch_leaves_no_log_behind(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    with pytest.raises(AuditError, match=r"audit entry 1 is not JSON-serialisable"):
        _log(path).append_many([*_entries(1), {"action": "x", "score": float("inf")}])
    assert not path.exists()


def test_a_broken_log_is_not_extended_by_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    log = _log(path)
    log.append_many(_entries(3))
    path.write_bytes(path.read_bytes()[:-5])
    before = path.read_bytes()
    with pytest.raises(AuditError, match=r"line 3 is cut short"):
        log.append_many(_entries(2))
    assert path.read_bytes() == before


def test_entries_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"must be a list of dicts, not dict"):
        _log(tmp_path / "x.jsonl").append_many({"action": "x"})  # type: ignore[arg-type]
