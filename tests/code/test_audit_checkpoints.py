"""Signed audit checkpoints: what ``verify`` now detects that the hash chain alone cannot
(one test per red-team finding of issue 19), what it still cannot (said by a test too),
the checkpoint store's own tamper evidence, and ``clinml audit verify`` / ``checkpoint``.

Each finding's test first shows that the chain alone (``AuditLog`` without checkpoints,
what ``verify`` was before) still calls the damaged log intact."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clinml.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    Checkpoints,
    canonical_json,
    record_hash,
)
from clinml.errors import ClinmlError
from clinml.pipelines import cli
from clinml.settings import Settings

KEY = "a3f1" * 16  # 64 hex characters, as `openssl rand -hex 32` gives
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _clock():
    ticks = iter(range(100_000))
    return lambda: T0 + timedelta(seconds=next(ticks))


def _store(tmp_path: Path, key: str = KEY) -> Checkpoints:
    return Checkpoints(tmp_path / "checkpoints", key, clock=_clock())


def _log(tmp_path: Path, n: int = 0, store: Checkpoints | None = None) -> AuditLog:
    """The alias-move log with ``n`` records, each append signing a checkpoint."""
    log = AuditLog(
        tmp_path / "audit" / "aliases.jsonl", clock=_clock(), checkpoints=store or _store(tmp_path)
    )
    for i in range(n):
        log.append({"action": "promote", "model": "readmission", "version": str(i + 1)})
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _forged(previous: dict, **fields) -> bytes:
    """A record that links to ``previous`` with a valid hash, as anyone can compute."""
    record = {
        "action": "promote",
        "model": "readmission",
        "version": "99",
        "time": "2026-06-01T13:00:00+00:00",
        **fields,
        "seq": previous["seq"] + 1,
        "prev_hash": previous["hash"],
    }
    record["hash"] = record_hash(record)
    return (canonical_json(record) + "\n").encode()


def _chain_only(path: Path) -> int:
    """The check ``verify`` made before checkpoints: the chain alone."""
    return AuditLog(path).verify()


# -- what a checkpoint is -----------------------------------------------------------------


def test_each_append_signs_a_numbered_checkpoint_linked_to_the_one_before(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    log = _log(tmp_path, 3, store)
    folder = store.folder(log.path)
    assert folder.parent == tmp_path / "checkpoints"
    assert folder.name.startswith("aliases.jsonl-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "000000000001.json",
        "000000000002.json",
        "000000000003.json",
    ]
    checkpoints = store.read(log.path)
    records = log.records()
    assert [c.number for c in checkpoints] == [1, 2, 3]
    assert [c.records for c in checkpoints] == [1, 2, 3]
    assert [c.last_hash for c in checkpoints] == [r["hash"] for r in records]
    assert checkpoints[0].prev_mac == GENESIS_HASH
    assert [c.prev_mac for c in checkpoints[1:]] == [c.mac for c in checkpoints[:-1]]
    assert checkpoints[-1].bytes == log.path.stat().st_size
    assert checkpoints[-1].log == str(log.path.resolve())
    assert all(c.alarm is None for c in checkpoints)
    # One canonical line per file, with the key nowhere in it or in the store's repr.
    raw = (folder / "000000000003.json").read_bytes()
    assert raw == (canonical_json(json.loads(raw)) + "\n").encode()
    assert KEY not in raw.decode() and KEY not in repr(store)

    result = log.check()
    assert result.records == result.checkpoints == result.latest.number == 3
    assert result.uncovered == 0
    assert result.summary().endswith(
        "3 records, chain intact; checkpoint 3 (" + (checkpoints[-1].time) + ") covers 3"
    )
    assert log.verify() == 3


def test_a_short_audit_key_is_refused_without_showing_it() -> None:
    with pytest.raises(AuditError, match=r"shorter than 32 characters") as caught:
        Checkpoints(Path("/nowhere"), "short-key-123")
    assert "short-key-123" not in str(caught.value)


def test_settings_put_the_checkpoints_beside_the_logs_unless_told_otherwise(
    tmp_path: Path,
) -> None:
    settings = Settings(home=tmp_path, audit_key=KEY)
    assert settings.audit_checkpoint_path == tmp_path / "audit" / "checkpoints"
    store = Checkpoints.from_settings(settings)
    assert store is not None and store.directory == tmp_path / "audit" / "checkpoints"
    apart = Settings(home=tmp_path, audit_key=KEY, audit_checkpoint_dir=tmp_path / "worm")
    assert Checkpoints.from_settings(apart).directory == tmp_path / "worm"
    assert Checkpoints.from_settings(Settings(home=tmp_path)) is None


# -- the red-team findings: each passes the chain alone, each is caught now --------------------


def _delete_last_line(log: AuditLog) -> None:
    log.path.write_bytes(b"".join(_lines(log.path)[:-1]))


def _delete_last_50(log: AuditLog) -> None:
    log.path.write_bytes(b"".join(_lines(log.path)[:-50]))


def _empty(log: AuditLog) -> None:
    log.path.write_bytes(b"")


def _delete(log: AuditLog) -> None:
    log.path.unlink()


def _edit_last_and_rehash(log: AuditLog) -> None:
    lines = _lines(log.path)
    record = json.loads(lines[-1])
    record["version"] = "1"  # point the record at another version
    record["hash"] = record_hash(record)
    lines[-1] = (canonical_json(record) + "\n").encode()
    log.path.write_bytes(b"".join(lines))


def _rebuild_the_whole_chain(log: AuditLog) -> None:
    records = log.records()
    records[0]["reason"] = "rewritten"
    lines, prev_hash = [], GENESIS_HASH
    for record in records:
        record["prev_hash"] = prev_hash
        record["hash"] = prev_hash = record_hash(record)
        lines.append((canonical_json(record) + "\n").encode())
    log.path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("damage", "records_left", "match"),
    [
        (
            _delete_last_line,
            59,
            r"has 59 records, but checkpoint 60 \(.*\) signed 60 records: "
            r"1 record\(s\) cut off the end",
        ),
        (_delete_last_50, 10, r"has 10 records, but checkpoint 60 .* 50 record\(s\) cut off"),
        (_empty, 0, r"is empty \(emptied\?\), but checkpoint 60 .* signed 60 records"),
        (_delete, 0, r"is missing \(deleted\?\), but checkpoint 60 .* signed 60 records"),
        (
            _edit_last_and_rehash,
            60,
            r"line 60 is not the record checkpoint 60 \(.*\) signed: "
            r"the log was rewritten",
        ),
        (_rebuild_the_whole_chain, 60, r"line 1 is not the record checkpoint 1 \(.*\) signed"),
    ],
    ids=[
        "last-line-deleted",
        "last-50-deleted",
        "emptied",
        "deleted",
        "last-edited-rehashed",
        "whole-chain-rebuilt",
    ],
)
def test_verify_detects_what_the_chain_alone_cannot(
    tmp_path: Path, damage, records_left: int, match: str
) -> None:
    log = _log(tmp_path, 60)
    assert log.verify() == 60
    damage(log)
    assert _chain_only(log.path) == records_left  # the chain alone: "intact"
    with pytest.raises(AuditError, match=match):
        _log(tmp_path).verify()  # a fresh reader, as `clinml audit verify` is


def test_a_made_up_record_appended_after_the_last_checkpoint_is_only_in_the_window(
    tmp_path: Path,
) -> None:
    # The limit, stated as a test: a record appended at the end with a valid hash is not
    # covered by any checkpoint, so verify passes and says how many records are
    # uncovered; the next checkpoint signs it as genuine. Only an outside witness of the
    # writer's own head (RequestAudit.head on /metrics) can tell.
    log = _log(tmp_path, 3)
    with log.path.open("ab") as file:
        file.write(_forged(log.records()[-1]))
    result = _log(tmp_path).check()
    assert (result.records, result.latest.records, result.uncovered) == (4, 3, 1)
    assert "1 appended since (not covered until the next one)" in result.summary()
    log.append({"action": "rollback"})  # the next genuine append signs all five
    assert _log(tmp_path).check().uncovered == 0


# -- the checkpoint store's own tamper evidence ---------------------------------------------


def test_an_edited_or_forged_checkpoint_fails_its_signature(tmp_path: Path) -> None:
    store = _store(tmp_path)
    log = _log(tmp_path, 4, store)
    latest = store.folder(log.path) / "000000000004.json"
    body = json.loads(latest.read_bytes())
    edited = {**body, "records": 3}
    latest.write_bytes((canonical_json(edited) + "\n").encode())
    with pytest.raises(AuditError, match=r"000000000004\.json: signature does not verify"):
        _log(tmp_path).verify()

    # Re-signed with another key (the attacker's guess): refused the same way.
    impostor = Checkpoints(tmp_path / "other", "b" * 64)
    forged = {k: v for k, v in body.items() if k != "mac"}
    forged["mac"] = impostor._mac(forged)
    latest.write_bytes((canonical_json(forged) + "\n").encode())
    with pytest.raises(AuditError, match=r"signature does not verify"):
        _log(tmp_path).verify()

    # A checkpoint with a key twice is refused before its signature is looked at.
    raw = (canonical_json(body) + "\n").encode()
    latest.write_bytes(raw.replace(b'{"bytes"', b'{"records":99,"bytes"', 1))
    with pytest.raises(AuditError, match=r"key 'records' appears twice"):
        _log(tmp_path).verify()


@pytest.mark.parametrize(
    ("deleted", "match"),
    [
        ([3], r"checkpoint 3 missing \(deleted\?\), before checkpoint 4"),
        ([1], r"checkpoint 1 missing \(deleted\?\), before checkpoint 2"),
        ([2, 3, 4], r"checkpoints 2 to 4 missing \(deleted\?\), before checkpoint 5"),
        (
            [1, 2, 3, 4, 5, 6],
            r"has 6 records but no checkpoint in .*: the checkpoints were "
            r"deleted, or the log predates CLINML_AUDIT_KEY",
        ),
    ],
)
def test_a_checkpoint_deleted_from_the_sequence_is_named(
    tmp_path: Path, deleted: list[int], match: str
) -> None:
    store = _store(tmp_path)
    log = _log(tmp_path, 6, store)
    for number in deleted:
        (store.folder(log.path) / f"{number:012d}.json").unlink()
    with pytest.raises(AuditError, match=match):
        _log(tmp_path).verify()


def test_a_checkpoint_renamed_to_fill_a_gap_is_caught(tmp_path: Path) -> None:
    store = _store(tmp_path)
    log = _log(tmp_path, 4, store)
    folder = store.folder(log.path)
    (folder / "000000000003.json").unlink()
    (folder / "000000000004.json").rename(folder / "000000000003.json")
    with pytest.raises(AuditError, match=r"it says it is checkpoint 4 \(renamed\?\)"):
        _log(tmp_path).verify()


def test_deleting_the_latest_checkpoint_with_the_tail_passes_verify_but_not_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The limit, stated as a test: the numbered sequence shows a missing start or middle,
    # not a missing end. A writer that wrote the deleted checkpoint notices, though, and
    # signs an alarm into its next checkpoint, which verify then reports.
    store = _store(tmp_path)
    writer = _log(tmp_path, 5, store)
    (store.folder(writer.path) / "000000000005.json").unlink()
    _delete_last_line(writer)
    assert _log(tmp_path).verify() == 4  # not detectable from the files alone

    with caplog.at_level(logging.ERROR, logger="clinml.audit"):
        writer.append({"action": "rollback"})
    assert writer.integrity_alarms == 2  # the log shrank; a checkpoint it wrote is gone
    with pytest.raises(
        AuditError,
        match=r"checkpoint 5 \(.*\) of .* carries a writer's alarm: "
        r"the log shrank: it ended at record 5 .* now ends at record 4; "
        r"checkpoint 5, which this process wrote or read, is missing",
    ):
        _log(tmp_path).verify()
    assert any("the log shrank" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_that_cannot_be_written_loses_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = _log(tmp_path, 2)
    real_replace = os.replace

    def checkpoint_disk_full(src, dst, *args, **kwargs):
        if str(dst).endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    with caplog.at_level(logging.ERROR, logger="clinml.audit"):
        monkeypatch.setattr(os, "replace", checkpoint_disk_full)
        record = log.append({"action": "rollback"})  # not raised: the record is written
        log.append({"action": "promote"})
        monkeypatch.undo()
    assert record["seq"] == 3 and [r["seq"] for r in log.records()] == [1, 2, 3, 4]
    assert log.checkpoint_failures == 2
    assert "No space left on device" in log.checkpoint_error
    errors = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert len(errors) == 1  # logged once until a checkpoint succeeds
    assert not [p for p in _store(tmp_path).folder(log.path).iterdir() if p.suffix == ".tmp"]
    assert _log(tmp_path).check().uncovered == 2  # covered again by the next one
    log.append({"action": "promote"})
    assert log.checkpoint_error is None
    assert _log(tmp_path).check().uncovered == 0


def test_a_writer_refuses_to_sign_on_top_of_a_forged_checkpoint(tmp_path: Path) -> None:
    store = _store(tmp_path)
    log = _log(tmp_path, 2, store)
    latest = store.folder(log.path) / "000000000002.json"
    latest.write_bytes(latest.read_bytes().replace(b'"records":2', b'"records":1'))
    log.append({"action": "rollback"})
    assert log.checkpoint_failures == 1 and "signature does not verify" in log.checkpoint_error
    assert not (store.folder(log.path) / "000000000003.json").exists()


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CLINML_HOME", str(tmp_path))
    for name in ("CLINML_AUDIT_KEY", "CLINML_AUDIT_LOG", "CLINML_AUDIT_CHECKPOINT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _verify() -> object:
    return CliRunner().invoke(cli.app, ["audit", "verify"])


def test_cli_verify_without_a_key_checks_the_chains_and_says_what_it_cannot_see(
    home: Path,
) -> None:
    AuditLog(Settings().audit_log_path).append({"action": "promote"})
    result = _verify()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "no CLINML_AUDIT_KEY: chains checked without checkpoints, so a cut-off tail or a "
        "deleted log cannot be detected"
    )
    assert lines[1].startswith("model registry: ") and lines[1].endswith("1 records, chain intact")
    assert lines[2].startswith("requests: ") and lines[2].endswith("(no records yet)")


def test_cli_verify_with_a_key_exits_1_on_a_cut_tail_with_one_line(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINML_AUDIT_KEY", KEY)
    settings = Settings()
    log = AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings))
    log.append({"action": "promote"})
    log.append({"action": "rollback"})
    result = _verify()
    assert result.exit_code == 0, result.output
    assert "no CLINML_AUDIT_KEY" not in result.output
    assert "2 records, chain intact; checkpoint 2 (" in result.stdout

    _delete_last_line(log)
    result = _verify()
    assert result.exit_code == 1
    broken = [line for line in result.stderr.splitlines() if line]
    assert len(broken) == 1 and broken[0].startswith("model registry: BROKEN: ")
    assert "1 record(s) cut off the end" in broken[0]

    log.path.unlink()  # the log deleted
    result = _verify()
    assert result.exit_code == 1 and "is missing (deleted?)" in result.stderr


def test_cli_checkpoint_adopts_a_log_written_before_the_key(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Settings().audit_log_path
    AuditLog(path).append({"action": "promote"})  # no key yet
    result = CliRunner().invoke(cli.app, ["audit", "checkpoint"])
    assert isinstance(result.exception, ClinmlError)  # `clinml` prints it, exit 2
    assert "needs CLINML_AUDIT_KEY" in str(result.exception)

    monkeypatch.setenv("CLINML_AUDIT_KEY", KEY)
    result = _verify()
    assert result.exit_code == 1 and "has 1 records but no checkpoint" in result.stderr
    result = CliRunner().invoke(cli.app, ["audit", "checkpoint"])
    assert result.exit_code == 0, result.output
    assert "model registry: " in result.stdout and "checkpoint 1 signed at 1 records" in (
        result.stdout
    )
    assert "requests: " in result.stdout and "nothing to sign" in result.stdout
    assert _verify().exit_code == 0

    _delete_last_line(AuditLog(path))  # a broken log is never signed over
    result = CliRunner().invoke(cli.app, ["audit", "checkpoint"])
    assert result.exit_code == 1 and "BROKEN, not checkpointed" in result.stderr


def _append_with_checkpoints(path: str, directory: str, worker: int, count: int, barrier) -> None:
    log = AuditLog(Path(path), checkpoints=Checkpoints(Path(directory), KEY))
    barrier.wait()  # start together so the appenders really race
    for i in range(count):
        log.append({"action": "promote", "worker": worker, "i": i})


def test_concurrent_writers_keep_one_unbroken_checkpoint_sequence(tmp_path: Path) -> None:
    path, directory = tmp_path / "aliases.jsonl", tmp_path / "checkpoints"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [
        context.Process(
            target=_append_with_checkpoints, args=(str(path), str(directory), w, 15, barrier)
        )
        for w in range(4)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    store = Checkpoints(directory, KEY)
    checkpoints = store.read(path)
    assert [c.number for c in checkpoints] == list(range(1, 61))
    assert [c.records for c in checkpoints] == list(range(1, 61))  # each after its append
    assert all(c.alarm is None for c in checkpoints)
    assert AuditLog(path, checkpoints=store).verify() == 60


def test_a_writer_never_starts_a_checkpoint_sequence_over_records_it_did_not_see_written(
    tmp_path: Path,
) -> None:
    # Every checkpoint deleted, then a new process appends: signing the log as it is now
    # would hide the deletion (and any cut made with it), so the writer refuses and verify
    # keeps reporting the log broken until someone adopts it on purpose.
    store = _store(tmp_path)
    log = _log(tmp_path, 3, store)
    for file in store.folder(log.path).iterdir():
        file.unlink()
    _delete_last_line(log)
    fresh = _log(tmp_path)
    record = fresh.append({"action": "promote"})  # written all the same
    assert record["seq"] == 3 and fresh.checkpoint_failures == 1
    assert "holds records but has no checkpoint" in fresh.checkpoint_error
    assert not any(store.folder(log.path).iterdir())
    with pytest.raises(AuditError, match=r"has 3 records but no checkpoint"):
        _log(tmp_path).verify()
    with pytest.raises(AuditError, match=r"holds records but has no checkpoint"):
        fresh.checkpoint()
    assert fresh.checkpoint(adopt=True).records == 3  # `clinml audit checkpoint`
    assert _log(tmp_path).verify() == 3
