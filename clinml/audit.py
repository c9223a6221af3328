"""The append-only, hash-chained audit log of model alias moves.

Every promotion, forced promotion and rollback is appended here before the command
reports success, so "who moved which alias, when, and why" can always be answered.

Format: JSON lines, one record per line, UTF-8. Each record is the caller's entry plus

- ``seq``: 1 for the first record, then consecutive;
- ``time``: when it was appended, UTC ISO-8601 (kept when the entry already has one);
- ``prev_hash``: the previous record's ``hash`` (64 zeros for the first record);
- ``hash``: sha256 (hex) of the record's canonical JSON without its ``hash`` key, where
  canonical means ``sort_keys=True, separators=(",", ":"), ensure_ascii=False``.

Lines are written in that canonical form, so ``verify`` can recompute every hash from the
file alone.

Guarantees:

- Append-only and crash-safe: a record is written with one ``os.write`` on a file opened
  with ``O_APPEND``, then flushed to disk (``fsync``); a failed write is truncated away,
  so the log never ends in a half line of ours. A line cut short by something else (a
  crash of the machine mid-write) is reported by ``verify`` and refused by ``append``.
- One chain under concurrency: appenders (threads or processes on this machine) hold an
  exclusive ``flock`` on ``<path>.lock`` while they read the tail and append.
- Tamper-evident, not tamper-proof: editing, deleting or reordering a record breaks the
  chain and ``verify`` names the first bad line, but whoever can rewrite the whole file
  can rebuild a valid chain. In production, ship the log to write-once (WORM) storage as
  it grows, and compare against that copy.

Usage::

    log = AuditLog(settings.home / "audit" / "aliases.jsonl")
    log.append({"action": "promote", "model": "readmission", "version": "4", ...})
    log.verify()  # number of records, or AuditError naming the first bad line
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinml.errors import ClinmlError

GENESIS_HASH = "0" * 64
# Keys the log adds to every record; an entry that carries them is refused.
RESERVED_KEYS = ("seq", "prev_hash", "hash")
# Bytes read per step when looking for the last records from the end of the file.
_TAIL_CHUNK = 64 * 1024


class AuditError(ClinmlError):
    """The audit log is unreadable, broken, or could not be appended to."""


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value``, the form that is hashed and written.

    Raises:
        TypeError, ValueError: ``value`` is not JSON-serialisable (NaN and infinity
            included: they are not JSON).
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(record: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``record`` without its ``hash`` key."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """A hash-chained JSON-lines log at ``path``; see the module docstring.

    Args:
        path: the log file. It and its parent directories are created on first append.
        clock: returns the current time as an aware datetime; injected so tests can fix
            it. Defaults to the system clock in UTC.
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one record for ``entry`` and make it durable.

        Args:
            entry: what happened, as JSON-serialisable values with string keys. It must
                not contain ``seq``, ``prev_hash`` or ``hash``; a ``time`` it contains is
                kept.

        Returns:
            The record as written (and as ``records`` will read it back).

        Raises:
            AuditError: the entry is not serialisable or uses a reserved key; the log's
                last record is broken or cut short; or the write failed (the log is left
                as it was).
        """
        if not isinstance(entry, dict):
            raise AuditError(f"an audit entry must be a dict, not {type(entry).__name__}")
        return self.append_many([entry])[0]

    def append_many(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append one record per entry, in order, as one durable write.

        The same as calling ``append`` for each entry, but under one lock with one
        ``os.write`` and one ``fsync``, so a busy writer (the per-request audit trail)
        pays for the disk once per batch. All or nothing: every entry is checked before
        anything is written, and a failed write leaves the log as it was.

        Args:
            entries: what happened, each as for ``append``. An empty list writes nothing.

        Returns:
            The records as written, in order.

        Raises:
            AuditError: an entry is not serialisable or uses a reserved key (naming its
                index); the log's last record is broken or cut short; or the write failed
                (the log is left as it was).
        """
        if not isinstance(entries, list | tuple):
            raise AuditError(f"audit entries must be a list of dicts, not {type(entries).__name__}")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise AuditError(f"audit entry {index} must be a dict, not {type(entry).__name__}")
            reserved = [key for key in RESERVED_KEYS if key in entry]
            if reserved:
                raise AuditError(
                    f"audit entry {index} uses reserved key(s) {', '.join(reserved)}; the "
                    "log sets them"
                )
            non_string = [key for key in entry if not isinstance(key, str)]
            if non_string:
                raise AuditError(f"audit entry {index} keys must be strings, got {non_string[0]!r}")
        if not entries:
            return []

        with self._lock(exclusive=True):
            created = not self.path.exists()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise AuditError(
                    f"cannot open audit log {self.path} for appending: {exc.strerror}"
                ) from exc
            try:
                size = os.fstat(fd).st_size
                seq, prev_hash = self._tail(fd, size)
                records, lines = [], []
                for index, entry in enumerate(entries):
                    record = dict(entry)
                    record.setdefault("time", self._now())
                    seq += 1
                    record["seq"] = seq
                    record["prev_hash"] = prev_hash
                    try:  # nothing is written unless every entry serialises
                        record["hash"] = prev_hash = record_hash(record)
                        lines.append(canonical_json(record) + "\n")
                    except (TypeError, ValueError) as exc:
                        if created:  # leave no empty log behind
                            self.path.unlink(missing_ok=True)
                        raise AuditError(
                            f"audit entry {index} is not JSON-serialisable: {exc}"
                        ) from exc
                    records.append(record)
                self._write(fd, "".join(lines).encode("utf-8"), size)
            finally:
                os.close(fd)
            if created:
                _fsync_directory(self.path.parent)
        return records

    def records(self) -> list[dict[str, Any]]:
        """Every record, in order; ``[]`` when the log does not exist yet.

        This parses the log but does not check the chain; ``verify`` does.

        Raises:
            AuditError: a line is not a JSON object, or the last line is cut short.
        """
        return [record for _, record in self._parsed_lines()]

    def verify(self) -> int:
        """Check the whole chain: every line parses, ``seq`` runs 1, 2, 3, ..., each
        ``prev_hash`` is the previous record's ``hash`` and each ``hash`` recomputes.

        Returns:
            The number of records (0 when the log does not exist yet).

        Raises:
            AuditError: naming the first bad line and what is wrong with it.
        """
        prev_hash = GENESIS_HASH
        count = 0
        for number, record in self._parsed_lines():
            problem = _chain_problem(record, expected_seq=number, prev_hash=prev_hash)
            if problem:
                raise AuditError(f"audit log {self.path} line {number}: {problem}")
            prev_hash = record["hash"]
            count = number
        return count

    # -- internals -----------------------------------------------------------------

    def _now(self) -> str:
        now = self._clock()
        if now.tzinfo is None:
            raise AuditError("the audit clock returned a time without a time zone")
        return now.astimezone(UTC).isoformat()

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """Hold ``flock`` on the sidecar lock file: exclusive to append, shared to read.

        Creates the log's directory for an appender. A reader that cannot create the lock
        file (a read-only copy of the log) reads without it.
        """
        fd = None
        try:
            if exclusive:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exclusive:
                raise AuditError(
                    f"cannot create audit log directory or lock file {self.lock_path}: "
                    f"{exc.strerror}"
                ) from exc
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _tail(self, fd: int, size: int) -> tuple[int, str]:
        """``(seq, hash)`` of the last record (``(0, GENESIS_HASH)`` for an empty log),
        after checking that record's hash, its seq and its link to the record before.

        Only the end of the file is read; lines are counted only to report a problem.
        """
        if size == 0:
            return 0, GENESIS_HASH
        if os.pread(fd, 1, size - 1) != b"\n":
            line = self._count_newlines(fd, size) + 1
            raise AuditError(
                f"audit log {self.path} line {line} is cut short (no end of line, "
                "probably a crash mid-write); refusing to append. Run verify, then "
                "restore the log from its copy"
            )
        start, data = size, b""
        # Grow the window from the end until it holds the last two complete lines.
        while start > 0 and data[:-1].count(b"\n") < 2:
            step = min(_TAIL_CHUNK, start)
            start -= step
            data = os.pread(fd, step, start) + data
        lines = data[:-1].split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first piece may be the end of an earlier line
        offset = 0  # which line is at fault: 0 the last, 1 the one before
        try:
            if len(lines) >= 2:
                offset = 1
                before = _parse_record(lines[-2])
                offset = 0
                seq_before = before.get("seq")
                expected_seq = seq_before + 1 if _is_seq(seq_before) else None
                prev_hash = before.get("hash")
            else:
                expected_seq, prev_hash = 1, GENESIS_HASH
            last = _parse_record(lines[-1])
            problem = _chain_problem(last, expected_seq=expected_seq, prev_hash=prev_hash)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            line = self._count_newlines(fd, size) - offset
            raise AuditError(
                f"audit log {self.path} line {line} is broken ({problem}); refusing to "
                "extend a corrupted log. Run verify to find the first bad line"
            )
        return last["seq"], last["hash"]

    @staticmethod
    def _count_newlines(fd: int, size: int) -> int:
        count, offset = 0, 0
        while offset < size:
            chunk = os.pread(fd, min(1 << 20, size - offset), offset)
            if not chunk:
                break
            count += chunk.count(b"\n")
            offset += len(chunk)
        return count

    def _write(self, fd: int, data: bytes, size: int) -> None:
        """Write ``data`` in one call and fsync; on any failure cut the file back to
        ``size`` so no partial line is left behind."""
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError as undo:
                raise AuditError(
                    f"could not append to audit log {self.path}: {reason}; removing the "
                    f"partial record also failed ({undo.strerror}), run verify"
                ) from exc
            raise AuditError(
                f"could not append to audit log {self.path}: {reason}; nothing was "
                "recorded and the alias move must not go ahead"
            ) from exc

    def _parsed_lines(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line number, record)`` for every line, read under a shared lock."""
        try:
            with self._lock(exclusive=False):
                data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditError(f"cannot read audit log {self.path}: {exc.strerror}") from exc
        if not data:
            return
        lines = data.split(b"\n")
        complete, rest = lines[:-1], lines[-1]
        for number, raw in enumerate(complete, start=1):
            try:
                yield number, _parse_record(raw)
            except ValueError as exc:
                raise AuditError(f"audit log {self.path} line {number}: {exc}") from None
        if rest:
            raise AuditError(
                f"audit log {self.path} line {len(complete) + 1}: cut short (no end of "
                "line, probably a crash mid-write)"
            )


def _parse_record(raw: bytes) -> dict[str, Any]:
    """One line as a record. Raises ValueError saying what is wrong with it."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _is_seq(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chain_problem(
    record: dict[str, Any], *, expected_seq: int | None, prev_hash: Any
) -> str | None:
    """What is wrong with ``record`` as the next link of the chain, or None."""
    try:
        recomputed = record_hash(record)
    except (TypeError, ValueError):  # e.g. NaN in a hand-edited line
        recomputed = None
    if record.get("hash") != recomputed:
        return "hash does not match the record's contents (edited?)"
    seq = record.get("seq")
    if not _is_seq(seq) or seq != expected_seq:
        return f"seq is {seq!r}, expected {expected_seq} (a record missing or out of order?)"
    if record.get("prev_hash") != prev_hash:
        return (
            "prev_hash does not match the previous record's hash (a record missing, "
            "inserted or reordered?)"
        )
    return None


def _fsync_directory(directory: Path) -> None:
    """Make a newly created file's directory entry durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
