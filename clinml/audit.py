"""The append-only, hash-chained audit logs, and the signed checkpoints that detect a
cut-off tail or a deleted log.

Two logs use this module: the alias moves (``AuditLog``, written by
``training/governance.py`` before every promotion, forced promotion and rollback) and
the per-request trail (``serving/requestlog.py``'s ``RequestAudit``).

Format: JSON lines, one record per line, UTF-8. Each record is the caller's entry plus

- ``seq``: 1 for the first record, then consecutive;
- ``time``: when it was appended, UTC ISO-8601 (kept when the entry already has one);
- ``prev_hash``: the previous record's ``hash`` (64 zeros for the first record);
- ``hash``: sha256 (hex) of the record's canonical JSON without its ``hash`` key, where
  canonical means ``sort_keys=True, separators=(",", ":"), ensure_ascii=False``.

Every line is byte for byte the canonical JSON of its record: ``verify`` re-encodes each
parsed record and compares bytes, and refuses an object with a key twice. So a line
rewritten in another form (keys reordered, spaces, ``\\u`` escapes, a second
``"outcome"`` smuggled in before the real one) is reported even when it parses to a
record whose hash recomputes.

Checkpoints (``Checkpoints``): with an HMAC key (``CLINML_AUDIT_KEY``) a writer signs, now
and then, what the log holds: its path, record count, byte length and last hash. They
are numbered files, each linked to the one before by its MAC, in a directory of their
own (``CLINML_AUDIT_CHECKPOINT_DIR``). ``verify`` then also reports a log shorter than a
checkpoint (a cut-off tail), a log deleted or emptied, a record that is not the one a
checkpoint signed (a rebuilt chain), a checkpoint whose MAC fails (edited or forged), a
checkpoint missing from the numbered sequence, and a log with records but no checkpoint
at all. The alias-move log is checkpointed after every append; the request trail at
most once per ``CLINML_AUDIT_CHECKPOINT_INTERVAL_S`` while records arrive, and on close.
A writer also raises an *alarm*, signed into its next checkpoint, when it finds that the
log lost or replaced records since it last wrote them, or that a checkpoint it wrote is
gone.

What stays open, by construction (docs/security.md §8.4 has the whole table):

- records appended after the latest checkpoint: cutting or replacing them is seen only
  by a running writer that wrote them (its alarm) or by an outside witness of the record
  count and last hash (``RequestAudit.head``, which the service publishes), and a
  made-up record appended there is signed by the next checkpoint like any other;
- deleting the newest checkpoints, then cutting the log back to what the newest one left
  covers: the numbered sequence shows a missing start or middle, not a missing end; nor
  does deleting the log together with every checkpoint (it looks like a new
  installation). A checkpoint directory out of reach of whoever can write the log (or
  synced to write-once storage) closes this;
- whoever holds the key and can write both the log and the checkpoints can rewrite
  anything. Without the key only the byte-exact chain is checked: a cut-off tail, an
  emptied or deleted log and a rebuilt chain all pass.

Guarantees of ``append``:

- Append-only and crash-safe: a record is written with one ``os.write`` on a file opened
  with ``O_APPEND``, then flushed to disk (``fsync``); a failed write is truncated away,
  so the log never ends in a half line of ours. A line cut short by something else (a
  crash of the machine mid-write) is reported by ``verify`` and refused by ``append``.
- One chain under concurrency: appenders (threads or processes on this machine) hold an
  exclusive ``flock`` on ``<path>.lock`` while they read the tail and append, and while
  they write a checkpoint, so checkpoints of one log never race.
- A checkpoint is written only after the records it covers are on disk, under a temporary
  name then renamed (``os.replace``) and fsynced; a checkpoint that cannot be written is
  logged and counted (``checkpoint_failures``) and never undoes or fails the append.

Usage::

    checkpoints = Checkpoints.from_settings(settings)  # None without CLINML_AUDIT_KEY
    log = AuditLog(settings.audit_log_path, checkpoints=checkpoints)
    log.append({"action": "promote", "model": "readmission", "version": "4", ...})
    log.verify()  # number of records, or AuditError naming what is wrong
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinml.atomic import sync, write_atomic
from clinml.clock import utc_now
from clinml.errors import ClinmlError

if TYPE_CHECKING:
    from clinml.settings import Settings

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# Keys the log adds to every record; an entry that carries them is refused.
RESERVED_KEYS = ("seq", "prev_hash", "hash")
# Bytes read per step when looking for the last records from the end of the file.
_TAIL_CHUNK = 64 * 1024
# Names the checkpoint format inside what is signed, so a MAC of this key over anything
# else can never pass for a checkpoint.
CHECKPOINT_FORMAT = "clinml-audit-checkpoint/1"
# The shortest audit key accepted: 32 characters (a 128-bit key in hex).
MIN_AUDIT_KEY_CHARS = 32
_CHECKPOINT_FILE = re.compile(r"(\d{12})\.json")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# A checkpoint's fields and their types; "alarm" is present only when a writer raised one.
_CHECKPOINT_FIELDS: dict[str, type] = {
    "format": str,
    "checkpoint": int,
    "log": str,
    "records": int,
    "bytes": int,
    "last_hash": str,
    "time": str,
    "prev_mac": str,
    "mac": str,
}


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


@dataclass(frozen=True)
class Checkpoint:
    """One signed statement of what an audit log held: its first ``records`` records,
    ``bytes`` long, the last with hash ``last_hash``."""

    number: int
    log: str
    records: int
    bytes: int
    last_hash: str
    time: str
    prev_mac: str
    mac: str
    alarm: str | None = None


@dataclass(frozen=True)
class Verification:
    """What ``AuditLog.check`` found: the log is intact as far as it can tell.

    Attributes:
        path: the log.
        records: how many records it holds.
        checkpoints: how many checkpoints were checked (0 without a key).
        latest: the checkpoint covering the most records, or None.
        signed: whether checkpoints were checked at all (an audit key was given).
    """

    path: Path
    records: int
    checkpoints: int
    latest: Checkpoint | None
    signed: bool

    @property
    def uncovered(self) -> int:
        """Records after the latest checkpoint: a cut or forgery among them shows only at
        the next checkpoint or to an outside witness."""
        return self.records - (self.latest.records if self.latest else 0)

    def summary(self) -> str:
        """One line for ``clinml audit verify``."""
        if self.records == 0 and self.latest is None:
            return f"{self.path} (no records yet)"
        line = f"{self.path}: {self.records} records, chain intact"
        if self.latest is not None:
            line += (
                f"; checkpoint {self.latest.number} ({self.latest.time}) covers "
                f"{self.latest.records}"
            )
            if self.uncovered:
                line += f", {self.uncovered} appended since (not covered until the next one)"
        return line


class Checkpoints:
    """Signed, numbered checkpoints of audit logs, kept in ``directory``.

    Each log has a folder of its own, ``<directory>/<log file name>-<16 hex>`` (the hex
    from the log's absolute path), holding ``000000000001.json``, ``000000000002.json``,
    ... Each file is one canonical JSON line: the log's absolute path, the record count,
    byte length and last hash, the time, the previous checkpoint's MAC (64 zeros for the
    first) and an HMAC-SHA256 over all of it.

    Args:
        directory: where the checkpoints go; keep it apart from the logs (another volume,
            or one shipped to write-once storage), or whoever can write the log can also
            delete the latest checkpoints.
        key: the HMAC key (``CLINML_AUDIT_KEY``), at least 32 characters.
        clock: the current time (aware); injected for tests.

    Raises:
        AuditError: the key is too short.
    """

    def __init__(
        self, directory: Path, key: str | bytes, *, clock: Callable[[], datetime] = utc_now
    ) -> None:
        if len(key) < MIN_AUDIT_KEY_CHARS:
            raise AuditError(
                f"the audit key (CLINML_AUDIT_KEY) is shorter than {MIN_AUDIT_KEY_CHARS} "
                "characters: use a random key (e.g. `openssl rand -hex 32`)"
            )
        self.directory = Path(directory)
        self._key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        self._clock = clock
        # The newest checkpoint number this object wrote or read, per log folder: one that
        # disappears later was deleted.
        self._known: dict[Path, int] = {}

    def __repr__(self) -> str:
        return f"Checkpoints({str(self.directory)!r})"  # never the key

    @classmethod
    def from_settings(cls, settings: Settings) -> Checkpoints | None:
        """The checkpoints ``settings`` configure; None without ``CLINML_AUDIT_KEY``.

        Raises:
            AuditError: the key is too short.
        """
        if settings.audit_key is None:
            return None
        return cls(settings.audit_checkpoint_path, settings.audit_key.get_secret_value())

    def folder(self, log_path: Path) -> Path:
        """The folder of ``log_path``'s checkpoints."""
        identity = _identity(log_path)
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
        return self.directory / f"{Path(identity).name}-{digest}"

    def read(self, log_path: Path) -> list[Checkpoint]:
        """Every checkpoint of ``log_path``, in order, each signature and link checked.

        Returns:
            ``[]`` when there are none.

        Raises:
            AuditError: a checkpoint is unreadable, not canonical, signed with another key
                or edited, names another log, or does not link to the one before; or a
                number is missing from the sequence (naming which).
        """
        folder = self.folder(log_path)
        numbers = self._numbers(folder)
        checkpoints: list[Checkpoint] = []
        prev_mac = GENESIS_HASH
        for expected, number in enumerate(numbers, start=1):
            if number != expected:
                missing = (
                    f"checkpoint {expected}"
                    if number == expected + 1
                    else f"checkpoints {expected} to {number - 1}"
                )
                raise AuditError(
                    f"audit checkpoints {folder}: {missing} missing (deleted?), before "
                    f"checkpoint {number}"
                )
            checkpoint = self._load(folder, number, _identity(log_path))
            if checkpoint.prev_mac != prev_mac:
                raise AuditError(
                    f"audit checkpoint {folder / _file_name(number)} does not link to "
                    f"checkpoint {number - 1} (replaced?)"
                )
            checkpoints.append(checkpoint)
            prev_mac = checkpoint.mac
        if numbers:
            self._known[folder] = max(self._known.get(folder, 0), numbers[-1])
        return checkpoints

    def latest(self, log_path: Path) -> tuple[Checkpoint | None, str | None]:
        """The newest checkpoint of ``log_path`` (signature checked), for a writer to link
        the next one to, and a note when one this object wrote or read has gone since.

        Reads one file: the folder is listed only the first time, or after a deletion.

        Raises:
            AuditError: the newest checkpoint does not verify (a writer must not sign on
                top of it).
        """
        folder = self.folder(log_path)
        note = None
        number = self._known.get(folder)
        if number is not None and not (folder / _file_name(number)).exists():
            note = (
                f"checkpoint {number}, which this process wrote or read, is missing from "
                f"{folder} (deleted?)"
            )
            number = None
        if number is None:
            numbers = self._numbers(folder)
            number = numbers[-1] if numbers else 0
        while (folder / _file_name(number + 1)).exists():  # written by other processes
            number += 1
        if number == 0:
            return None, note
        checkpoint = self._load(folder, number, _identity(log_path))
        self._known[folder] = number
        return checkpoint, note

    def write(
        self,
        log_path: Path,
        *,
        records: int,
        size: int,
        last_hash: str,
        previous: Checkpoint | None,
        alarm: str | None = None,
    ) -> Checkpoint:
        """Sign and write the checkpoint after ``previous`` (the first when None).

        The caller holds the log's exclusive lock, so no other writer races it.

        Raises:
            AuditError: it could not be written (nothing is left behind).
        """
        folder = self.folder(log_path)
        number = previous.number + 1 if previous else 1
        body: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "checkpoint": number,
            "log": _identity(log_path),
            "records": records,
            "bytes": size,
            "last_hash": last_hash,
            "time": self._clock().astimezone(UTC).isoformat(),
            "prev_mac": previous.mac if previous else GENESIS_HASH,
        }
        if alarm:
            body["alarm"] = alarm
        body["mac"] = self._mac(body)
        data = (canonical_json(body) + "\n").encode("utf-8")
        final = folder / _file_name(number)
        try:
            created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            if final.exists():  # only a writer not holding the log's lock gets here
                raise OSError(errno.EEXIST, "a checkpoint with this number exists already")
            write_atomic(final, data, mode=0o644)  # read() skips the temporary ".*.tmp"
            if created:
                sync(folder.parent)
        except OSError as exc:
            raise AuditError(
                f"could not write audit checkpoint {final}: {exc.strerror or exc}"
            ) from exc
        self._known[folder] = number
        return _checkpoint_from(body)

    # -- internals -----------------------------------------------------------------

    def _mac(self, body: dict[str, Any]) -> str:
        message = canonical_json({k: v for k, v in body.items() if k != "mac"})
        return hmac.new(self._key, message.encode("utf-8"), hashlib.sha256).hexdigest()

    @staticmethod
    def _numbers(folder: Path) -> list[int]:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AuditError(f"cannot read audit checkpoints in {folder}: {exc.strerror}") from exc
        return sorted(
            int(match.group(1)) for name in names if (match := _CHECKPOINT_FILE.fullmatch(name))
        )

    def _load(self, folder: Path, number: int, identity: str) -> Checkpoint:
        path = folder / _file_name(number)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise AuditError(f"cannot read audit checkpoint {path}: {exc.strerror}") from exc
        try:
            if not raw.endswith(b"\n") or b"\n" in raw[:-1]:
                raise ValueError("not one line")
            body = _parse_canonical(raw[:-1])
        except ValueError as exc:
            raise AuditError(f"audit checkpoint {path}: {exc}") from None
        mac = body.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(body)):
            raise AuditError(
                f"audit checkpoint {path}: signature does not verify (edited or forged, or "
                "signed with another CLINML_AUDIT_KEY)"
            )
        problem = _checkpoint_problem(body, number, identity)
        if problem:  # signed, so written by a holder of the key: a bug or a misuse
            raise AuditError(f"audit checkpoint {path}: {problem}")
        return _checkpoint_from(body)


def _identity(log_path: Path) -> str:
    """The log's identity in its checkpoints: its absolute path, symlinks resolved."""
    return str(Path(log_path).resolve())


def _file_name(number: int) -> str:
    return f"{number:012d}.json"


def _checkpoint_problem(body: dict[str, Any], number: int, identity: str) -> str | None:
    fields = set(body) - {"alarm"}
    if fields != set(_CHECKPOINT_FIELDS):
        return "unexpected fields"
    for field, kind in _CHECKPOINT_FIELDS.items():
        if not isinstance(body[field], kind) or isinstance(body[field], bool):
            return f"field {field} has the wrong type"
    if "alarm" in body and not isinstance(body["alarm"], str):
        return "field alarm has the wrong type"
    if body["format"] != CHECKPOINT_FORMAT:
        return "unknown checkpoint format"
    if body["checkpoint"] != number:
        return f"it says it is checkpoint {body['checkpoint']} (renamed?)"
    if body["log"] != identity:
        return "it belongs to another log (copied?)"
    if body["records"] < 1 or body["bytes"] < 1:
        return "it covers no records"
    if not (_HEX64.fullmatch(body["last_hash"]) and _HEX64.fullmatch(body["prev_mac"])):
        return "a hash is not 64 hex digits"
    return None


def _checkpoint_from(body: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        number=body["checkpoint"],
        log=body["log"],
        records=body["records"],
        bytes=body["bytes"],
        last_hash=body["last_hash"],
        time=body["time"],
        prev_mac=body["prev_mac"],
        mac=body["mac"],
        alarm=body.get("alarm"),
    )


class AuditLog:
    """A hash-chained JSON-lines log at ``path``; see the module docstring.

    Args:
        path: the log file. It and its parent directories are created on first append.
        clock: returns the current time as an aware datetime; injected so tests can fix
            it. Defaults to the system clock in UTC.
        checkpoints: where to sign checkpoints of this log (``Checkpoints.from_settings``);
            None (no audit key) writes and checks none.

    Attributes:
        checkpoint_failures: checkpoints this object could not write (each is logged once
            until one succeeds; the records themselves were written).
        checkpoint_error: why the last checkpoint failed, or None after a success.
        integrity_alarms: times this object found the log had lost or replaced records
            since it last wrote or read its end, or a checkpoint gone.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime] = utc_now,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.checkpoints = checkpoints
        self._clock = clock
        self._last: tuple[int, str] | None = None  # (seq, hash) this object last saw at the end
        self._alarm: str | None = None  # found, and not yet signed into a checkpoint
        # Whether this object found the log empty: only then may it start a checkpoint
        # sequence on its own (a log with records and no checkpoint needs `adopt`).
        self._saw_empty = False
        self.checkpoint_failures = 0
        self.checkpoint_error: str | None = None
        self.integrity_alarms = 0

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one record for ``entry``, make it durable, and (with checkpoints)
        sign a checkpoint of the log.

        Args:
            entry: what happened, as JSON-serialisable values with string keys. It must
                not contain ``seq``, ``prev_hash`` or ``hash``; a ``time`` it contains is
                kept.

        Returns:
            The record as written (and as ``records`` will read it back).

        Raises:
            AuditError: the entry is not serialisable or uses a reserved key; the log's
                last record is broken or cut short; or the write failed (the log is left
                as it was). A failed checkpoint is not raised (see ``checkpoint_error``).
        """
        if not isinstance(entry, dict):
            raise AuditError(f"an audit entry must be a dict, not {type(entry).__name__}")
        return self.append_many([entry])[0]

    def append_many(
        self, entries: list[dict[str, Any]], *, checkpoint: bool = True
    ) -> list[dict[str, Any]]:
        """Append one record per entry, in order, as one durable write.

        The same as calling ``append`` for each entry, but under one lock with one
        ``os.write`` and one ``fsync``, so a busy writer (the per-request audit trail)
        pays for the disk once per batch. All or nothing: every entry is checked before
        anything is written, and a failed write leaves the log as it was.

        Args:
            entries: what happened, each as for ``append``. An empty list writes nothing.
            checkpoint: with ``checkpoints``, sign a checkpoint once the records are on
                disk (still under the lock). The request trail passes False except once
                per interval.

        Returns:
            The records as written, in order.

        Raises:
            AuditError: an entry is not serialisable or uses a reserved key (naming its
                index); the log's last record is broken or cut short; or the write failed
                (the log is left as it was). A failed checkpoint is logged and counted,
                never raised: the records are written by then.
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
                self._notice(seq, prev_hash)
                self._saw_empty = self._saw_empty or seq == 0
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
                data = "".join(lines).encode("utf-8")
                self._write(fd, data, size)
                self._last = (seq, prev_hash)
                if created:
                    sync(self.path.parent)
                if checkpoint and self.checkpoints is not None:
                    # The records are durable: whatever happens here must not undo them.
                    self._try_checkpoint(fd, size + len(data), seq, prev_hash, raise_errors=False)
            finally:
                os.close(fd)
        return records

    def checkpoint(self, *, adopt: bool = False) -> Checkpoint | None:
        """Sign a checkpoint of the log as it is now.

        For the request trail's close, and for ``clinml audit checkpoint``.

        Args:
            adopt: start a checkpoint sequence for a log that has records but no
                checkpoint (written before the key was set), once someone has checked it
                against its archived copy. Without it, a writer that did not see the log
                empty refuses: its checkpoints may have been deleted, and signing the log
                as it is now would hide that.

        Returns:
            The checkpoint; None when the log has no records.

        Raises:
            AuditError: no ``checkpoints`` were given; the log's end is broken; or the
                checkpoint could not be written or was refused (also counted in
                ``checkpoint_failures``).
        """
        if self.checkpoints is None:
            raise AuditError("audit checkpoints need an audit key: set CLINML_AUDIT_KEY")
        with self._lock(exclusive=True):
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise AuditError(f"cannot read audit log {self.path}: {exc.strerror}") from exc
            try:
                size = os.fstat(fd).st_size
                seq, last_hash = self._tail(fd, size)
                self._notice(seq, last_hash)
                if seq == 0:
                    return None
                self._last = (seq, last_hash)
                return self._try_checkpoint(
                    fd, size, seq, last_hash, raise_errors=True, adopt=adopt
                )
            finally:
                os.close(fd)

    def head(self) -> tuple[int, str]:
        """``(record count, last hash)`` of the log now, reading only its end;
        ``(0, GENESIS_HASH)`` when it does not exist. A writer that calls it first can tell
        later when records it saw have gone.

        Raises:
            AuditError: the log's end is unreadable, broken or cut short.
        """
        with self._lock(exclusive=False):
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return 0, GENESIS_HASH
            except OSError as exc:
                raise AuditError(f"cannot read audit log {self.path}: {exc.strerror}") from exc
            try:
                seq, last_hash = self._tail(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        self._notice(seq, last_hash)
        self._last = (seq, last_hash)
        self._saw_empty = self._saw_empty or seq == 0
        return seq, last_hash

    def records(self) -> list[dict[str, Any]]:
        """Every record, in order; ``[]`` when the log does not exist yet.

        This parses the log but does not check the chain; ``verify`` does.

        Raises:
            AuditError: a line is not a JSON object in canonical form, or the last line is
                cut short.
        """
        data = self._read()
        return [record for _, record, _ in self._lines(data or b"")]

    def verify(self) -> int:
        """Check the log as ``check`` does.

        Returns:
            The number of records (0 when the log does not exist yet).

        Raises:
            AuditError: naming the first bad line, or what the checkpoints show is missing.
        """
        return self.check().records

    def check(self, *, require_checkpoint: bool = True) -> Verification:
        """Check the whole log: every line is the canonical JSON of a record with no key
        twice, ``seq`` runs 1, 2, 3, ..., each ``prev_hash`` is the previous record's
        ``hash`` and each ``hash`` recomputes. With ``checkpoints``, also: every
        checkpoint verifies and none is missing from the sequence; the log holds the very
        record (and byte length) each one signed, so it is neither shorter, nor emptied,
        nor deleted, nor rebuilt; no checkpoint carries a writer's alarm; and a log with
        records has at least one checkpoint.

        Args:
            require_checkpoint: False accepts a log with records but no checkpoint
                (``clinml audit checkpoint``, before it signs the first one).

        Raises:
            AuditError: naming the first bad line, or what is wrong.
        """
        signed: list[Checkpoint] = []
        # One snapshot: the checkpoints before the log, under the appenders' lock, so a
        # checkpoint is never newer than the log read with it.
        with self._lock(exclusive=False):
            if self.checkpoints is not None:
                signed = self.checkpoints.read(self.path)
            data = self._read(locked=True)
        by_count: dict[int, list[Checkpoint]] = {}
        for checkpoint in signed:
            by_count.setdefault(checkpoint.records, []).append(checkpoint)
        prev_hash, count = GENESIS_HASH, 0
        for number, record, end in self._lines(data or b""):
            problem = _chain_problem(record, expected_seq=number, prev_hash=prev_hash)
            if problem:
                raise AuditError(f"audit log {self.path} line {number}: {problem}")
            for checkpoint in by_count.get(number, ()):
                if record["hash"] != checkpoint.last_hash or end != checkpoint.bytes:
                    raise AuditError(
                        f"audit log {self.path} line {number} is not the record checkpoint "
                        f"{checkpoint.number} ({checkpoint.time}) signed: the log was "
                        "rewritten at or before this line"
                    )
            prev_hash, count = record["hash"], number
        latest = max(signed, key=lambda c: (c.records, c.number)) if signed else None
        if latest is not None and count < latest.records:
            if data is None:
                state = "is missing (deleted?)"
            elif count == 0:
                state = "is empty (emptied?)"
            else:
                state = f"has {count} records"
            raise AuditError(
                f"audit log {self.path} {state}, but checkpoint {latest.number} "
                f"({latest.time}) signed {latest.records} records: "
                f"{latest.records - count} record(s) cut off the end"
            )
        for checkpoint in signed:
            if checkpoint.alarm:
                raise AuditError(
                    f"audit checkpoint {checkpoint.number} ({checkpoint.time}) of {self.path} "
                    f"carries a writer's alarm: {checkpoint.alarm}"
                )
        if self.checkpoints is not None and count and not signed and require_checkpoint:
            raise AuditError(
                f"audit log {self.path} has {count} records but no checkpoint in "
                f"{self.checkpoints.folder(self.path)}: the checkpoints were deleted, or the "
                "log predates CLINML_AUDIT_KEY (check it against its archived copy, then "
                "run `clinml audit checkpoint`)"
            )
        return Verification(
            path=self.path,
            records=count,
            checkpoints=len(signed),
            latest=latest,
            signed=self.checkpoints is not None,
        )

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

    def _notice(self, seq: int, last_hash: str) -> None:
        """Compare the log's end with the end this object last saw: the log only grows,
        so an end before it, or another record in its place, means records were cut or
        replaced. Counted, logged and kept for the next checkpoint to sign."""
        if self._last is None:
            return
        seen_seq, seen_hash = self._last
        if seq < seen_seq:
            alarm = (
                f"the log shrank: it ended at record {seen_seq} when this process last "
                f"wrote or read it, and now ends at record {seq}"
            )
        elif seq == seen_seq and last_hash != seen_hash:
            alarm = f"record {seq} was replaced after this process wrote or read it"
        else:
            return
        self.integrity_alarms += 1
        self._alarm = f"{self._alarm}; {alarm}" if self._alarm else alarm
        logger.error("audit log %s: %s", self.path, alarm)

    def _try_checkpoint(
        self,
        fd: int,
        size: int,
        seq: int,
        last_hash: str,
        *,
        raise_errors: bool,
        adopt: bool = False,
    ) -> Checkpoint | None:
        """Sign a checkpoint of the first ``seq`` records (``size`` bytes); on failure
        count it and log it (once until one succeeds)."""
        try:
            checkpoint = self._checkpoint(fd, size, seq, last_hash, adopt=adopt)
        except Exception as exc:
            reason = " ".join(str(exc).split()) if isinstance(exc, AuditError) else None
            self.checkpoint_failures += 1
            first = self.checkpoint_error is None
            self.checkpoint_error = reason or f"checkpoint failed ({type(exc).__name__})"
            if first:
                logger.error(
                    "audit log %s: %s; the records are written, but are not covered by a "
                    "checkpoint until one succeeds",
                    self.path,
                    self.checkpoint_error,
                )
            if raise_errors:
                if isinstance(exc, AuditError):
                    raise
                raise AuditError(self.checkpoint_error) from exc
            return None
        if self.checkpoint_error is not None:
            logger.warning("audit log %s: checkpoints written again", self.path)
        self.checkpoint_error = None
        return checkpoint

    def _checkpoint(
        self, fd: int, size: int, seq: int, last_hash: str, *, adopt: bool
    ) -> Checkpoint:
        assert self.checkpoints is not None
        latest, missing = self.checkpoints.latest(self.path)
        if latest is None and not missing and not (adopt or self._saw_empty):
            raise AuditError(
                f"audit log {self.path} holds records but has no checkpoint in "
                f"{self.checkpoints.folder(self.path)}; not starting a sequence over them "
                "(checkpoints deleted, or the log predates CLINML_AUDIT_KEY: check it "
                "against its archived copy, then run `clinml audit checkpoint`)"
            )
        if missing:  # kept with the other alarms until a checkpoint carries it
            self.integrity_alarms += 1
            logger.error("audit log %s: %s", self.path, missing)
            self._alarm = f"{self._alarm}; {missing}" if self._alarm else missing
        alarms = [self._alarm] if self._alarm else []
        if latest is not None and not self._holds(fd, size, latest):
            alarms.append(
                f"record {latest.records}, which checkpoint {latest.number} signed, is no "
                "longer in the log (cut off or rewritten)"
            )
        alarm = "; ".join(alarms) or None
        checkpoint = self.checkpoints.write(
            self.path,
            records=seq,
            size=size,
            last_hash=last_hash,
            previous=latest,
            alarm=alarm,
        )
        self._alarm = None
        if alarm:
            logger.error(
                "audit log %s: alarm signed into checkpoint %d: %s",
                self.path,
                checkpoint.number,
                alarm,
            )
        return checkpoint

    @staticmethod
    def _holds(fd: int, size: int, checkpoint: Checkpoint) -> bool:
        """Whether the log's line ending at the checkpoint's byte length is the record it
        signed (reads only that line)."""
        end = checkpoint.bytes
        if end > size or os.pread(fd, 1, end - 1) != b"\n":
            return False
        try:
            record = _parse_canonical(_line_before(fd, end - 1))
        except ValueError:
            return False
        return (
            record.get("seq") == checkpoint.records and record.get("hash") == checkpoint.last_hash
        )

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
                before = _parse_canonical(lines[-2])
                offset = 0
                seq_before = before.get("seq")
                expected_seq = seq_before + 1 if _is_seq(seq_before) else None
                prev_hash = before.get("hash")
            else:
                expected_seq, prev_hash = 1, GENESIS_HASH
            last = _parse_canonical(lines[-1])
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

    def _read(self, *, locked: bool = False) -> bytes | None:
        """The whole log (under a shared lock unless the caller holds one); None when it
        does not exist."""
        try:
            if locked:
                return self.path.read_bytes()
            with self._lock(exclusive=False):
                return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"cannot read audit log {self.path}: {exc.strerror}") from exc

    def _lines(self, data: bytes) -> Iterator[tuple[int, dict[str, Any], int]]:
        """``(line number, record, byte offset of the line's end)`` for every line."""
        if not data:
            return
        lines = data.split(b"\n")
        complete, rest = lines[:-1], lines[-1]
        end = 0
        for number, raw in enumerate(complete, start=1):
            end += len(raw) + 1
            try:
                yield number, _parse_canonical(raw), end
            except ValueError as exc:
                raise AuditError(f"audit log {self.path} line {number}: {exc}") from None
        if rest:
            raise AuditError(
                f"audit log {self.path} line {len(complete) + 1}: cut short (no end of "
                "line, probably a crash mid-write)"
            )


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key that appears twice: ``json``
    would keep the last silently, so a second ``"outcome"`` could hide the first."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            name = key if len(key) <= 40 else key[:40] + "..."
            raise _DuplicateKey(f"key {name!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _parse_canonical(raw: bytes) -> dict[str, Any]:
    """One line as a record: a JSON object with no key twice, whose bytes are exactly
    its canonical JSON. Raises ValueError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
        record = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    try:
        canonical = canonical_json(record).encode("utf-8")
    except (TypeError, ValueError):  # NaN, a lone surrogate
        canonical = None
    if canonical != raw:
        # Canonical bytes never hold a key twice, so a line with one always lands here;
        # parse it again, slowly, only to say so.
        try:
            json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise ValueError(str(exc)) from None
        raise ValueError(
            "not byte for byte the canonical JSON of its record (keys reordered, spacing "
            "or escapes changed, or a value that JSON cannot hold)"
        )
    return record


def _line_before(fd: int, end: int) -> bytes:
    """The bytes from the last newline before ``end`` (or the file's start) to ``end``."""
    start, data = end, b""
    while start > 0:
        step = min(_TAIL_CHUNK, start)
        start -= step
        chunk = os.pread(fd, step, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return chunk[cut + 1 :] + data
        data = chunk + data
    return data


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
