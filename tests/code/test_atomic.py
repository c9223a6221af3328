"""``clinml.atomic``: the one all-or-nothing file write (issue 21)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from clinml.atomic import remove_leftovers, replacing, write_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_text_and_bytes_replace_the_file_and_leave_nothing_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "één\n")
    assert path.read_bytes() == "één\n".encode()
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["state.json"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.yaml"
    write_atomic(path, "old")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and _names(tmp_path) == ["keys.yaml"]


def test_private_is_owner_only_whatever_the_umask_and_mode_follows_it(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        write_atomic(tmp_path / "secret", "s", private=True)
        write_atomic(tmp_path / "checkpoint", "c", mode=0o644)
        write_atomic(tmp_path / "report", "r")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"secret": 0o600, "checkpoint": 0o644, "report": 0o666}


def test_fsync_flushes_the_file_and_its_directory_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    write_atomic(tmp_path / "a", "x")
    assert len(calls) == 2  # the file, then the directory
    calls.clear()
    write_atomic(tmp_path / "b", "x", fsync=False)
    with replacing(tmp_path / "c", fsync=False) as tmp:
        tmp.write_text("x")
    assert calls == []


def test_replacing_lets_a_library_write_and_removes_its_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "part.parquet"
    with replacing(target) as tmp:
        assert tmp.name.startswith(".part.parquet.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"written by a library")
    assert target.read_bytes() == b"written by a library"
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed midway")
    assert target.read_bytes() == b"written by a library"
    assert _names(tmp_path) == ["part.parquet"]


def test_remove_leftovers_deletes_only_the_temporary_files_of_that_path(tmp_path: Path) -> None:
    for name in (".registry.db.1a2b.tmp", ".other.db.1a2b.tmp", "registry.db"):
        (tmp_path / name).write_text("x")
    remove_leftovers(tmp_path / "registry.db")
    assert _names(tmp_path) == [".other.db.1a2b.tmp", "registry.db"]
