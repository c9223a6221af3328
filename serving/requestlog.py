"""The per-request audit trail and the prediction log, written off the request path.

Both take records from the request handlers on a bounded in-memory queue (``put_nowait``,
never a wait) and write them from one daemon thread in batches, so neither slows a
prediction down. They differ in what happens when writing cannot keep up or fails:

- ``RequestAudit`` (who called which endpoint, for which pseudonymised patient, with
  what outcome) is a compliance control, so it **fails closed**: while its queue is full
  or its last write failed, ``healthy`` is False and the service answers 503. A failed
  batch is kept and retried; the first write that succeeds makes it healthy again.
  With an audit key it also signs a checkpoint of the log (``clinml.audit.Checkpoints``)
  with the first batch, then at most once per ``checkpoint_interval_s`` while records
  arrive, and on close. A checkpoint that cannot be written is logged and counted
  (``checkpoint_failures``) but does **not** make the trail unhealthy: the records are
  written and chained by then; what is lost is only how soon a cut-off tail is noticed,
  and refusing predictions for that would turn a failure of the checkpoint volume (kept
  apart from the log on purpose) into a clinical outage. ``head`` (record count, last
  hash) is there for the service to publish, so an outside witness sees the records
  after the last checkpoint too.
- ``PredictionLog`` (inputs, probability and label of every prediction, PHI-free, for
  monitoring) **fails open**: rows that do not fit in the queue, or whose write fails,
  are dropped and counted in ``dropped``; the prediction itself always goes ahead.

Usage::

    audit = RequestAudit(
        settings.paths.request_audit_log,
        checkpoints=Checkpoints.from_settings(settings),  # None without CLINML_AUDIT_KEY
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
    )
    predictions = PredictionLog(settings.home / "predictions")
    if not audit.healthy:
        ...  # answer 503: nothing is served that the audit trail would not record
    predictions.record(rows)
    audit.submit({"request_id": ..., "key_id": ..., "endpoint": "/predict", ...})
    ...
    audit.close(); predictions.close()  # on shutdown: write what is queued

The prediction log is a directory of parquet files, ``date=YYYY-MM-DD/part-<UTC
time>-<uuid8>.parquet``, partitioned by each row's ``time`` (UTC); each file is written
under a temporary name and renamed, so a reader never sees half a file. Its reader,
``clinml.predictionlog.read_predictions``, lives in core, so that monitoring reads the log
without importing the serving layer.

Nothing here logs a record's values: errors name counts, paths and exception types.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinml.atomic import replacing
from clinml.audit import AuditError, AuditLog, Checkpoints
from clinml.clock import utc_now

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

logger = logging.getLogger(__name__)

# The fields of one audit record, in the order a reader expects them.
AUDIT_FIELDS = (
    "request_id",  # the service's id for the request, to join with its logs
    "key_id",  # which API key called (never the secret)
    "endpoint",  # e.g. "/predict"
    "model_version",  # the model that answered; None when none did
    "patient",  # pseudonymised patient id, or None (never the raw id)
    "outcome",  # the HTTP status answered
    "latency_ms",  # time spent serving the request
)
_REQUIRED_AUDIT_FIELDS = frozenset({"request_id", "endpoint", "outcome", "latency_ms"})
# Fields written only when given.
AUDIT_OPTIONAL_FIELDS = (
    "count",  # how many identical refused requests the record stands for (>= 1)
)
# How long a writer waits for more records at a time, so that a flush or close is noticed
# promptly while records are being gathered into a batch.
_POLL_S = 0.05


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(exc: BaseException) -> str:
    """What went wrong, without values: data libraries quote the offending value."""
    if isinstance(exc, AuditError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return type(exc).__name__


class _BatchWriter:
    """The background writer behind both logs: a queue that never makes the caller wait,
    and one daemon thread that takes what is queued in batches and hands each to ``write``.

    What a failed write means is the owner's, told by what ``write(batch)`` returns: how
    many of the batch's items it wrote, having dropped and counted the rest itself (the
    prediction log fails open), or None to keep the whole batch and retry it, with what
    has been queued since, after ``interval`` (the audit trail fails closed).

    Args:
        name: the thread's name.
        write: writes one batch, as above; it must not raise.
        max_queue: items that may wait; ``offer`` accepts no more. None: no limit.
        batch_max: the most items in a batch; items offered together stay together, so a
            batch may go over by one offer's items.
        interval: how long the writer waits for a first item before it calls ``on_idle``
            and looks whether it is closed; also the pause before a kept batch is retried.
        linger: after the first item of a batch, how long to wait for more; None: until
            ``interval`` since the wait began is up.
        on_start, on_idle, on_exit: called in the writer thread before anything else, after
            a wait that found nothing to write, and when the writer stops.
    """

    def __init__(
        self,
        name: str,
        write: Callable[[list[Any]], int | None],
        *,
        max_queue: int | None,
        batch_max: int,
        interval: float,
        linger: float | None = None,
        on_start: Callable[[], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._max_queue = max_queue
        self._batch_max = batch_max
        self._interval = interval
        self._linger = linger
        self._on_start, self._on_idle, self._on_exit = on_start, on_idle, on_exit
        # Each offer's items travel as one list: one hand-over per offer, not per item.
        self._queue: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self.lock = threading.Lock()  # also the owner's, for its own counters and flags
        self._settled = threading.Condition(self.lock)  # notified when items are settled
        self.waiting = 0  # items in the queue, not yet taken by the writer
        self.outstanding = 0  # accepted and not yet written (or dropped by ``write``)
        self.written = 0
        self._flush_requested = threading.Event()
        self._stop = threading.Event()
        self._close_deadline = math.inf
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def full(self) -> bool:
        """Whether ``offer`` accepts nothing now; reads a counter, takes no lock."""
        return self._max_queue is not None and self.waiting >= self._max_queue

    def offer(self, items: list[Any]) -> int:
        """Queue as many of ``items`` as fit, in order; never waits.

        Returns:
            How many were queued (the first ones); the caller deals with the rest.
        """
        with self.lock:
            room = len(items) if self._max_queue is None else self._max_queue - self.waiting
            accepted = items[: max(room, 0)]
            self.waiting += len(accepted)
            self.outstanding += len(accepted)
        if accepted:
            self._queue.put(accepted)
        return len(accepted)

    def flush(self, timeout: float) -> bool:
        """Write what is queued now, without waiting for a batch to fill.

        Returns:
            True when every item offered so far is settled; False when ``timeout``
            (seconds) passed first.
        """
        self._flush_requested.set()
        try:
            with self._settled:
                return self._settled.wait_for(lambda: self.outstanding == 0, timeout)
        finally:
            self._flush_requested.clear()

    def close(self, timeout: float, join_s: float) -> None:
        """Accept no more; write what is queued, retrying a kept batch for up to
        ``timeout`` seconds; wait up to ``join_s`` seconds for the writer to stop."""
        self._close_deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(join_s)

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        try:
            self._write_batches()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _write_batches(self) -> None:
        batch: list[Any] = []
        while True:
            batch = self._collect(batch)
            if not batch:
                if self._stop.is_set():
                    return
                if self._on_idle is not None:
                    self._on_idle()
                continue
            written = self._write(batch)
            if written is None:  # kept: retried after a pause, with what queues meanwhile
                if self._stop.is_set() and time.monotonic() >= self._close_deadline:
                    return
                time.sleep(self._interval)
                continue
            with self._settled:
                self.outstanding -= len(batch)
                self.written += written
                self._settled.notify_all()
            batch = []

    def _collect(self, batch: list[Any]) -> list[Any]:
        """``batch`` topped up from the queue to about ``batch_max`` items. An empty one
        waits up to ``interval`` for a first item, then ``linger`` for more; a kept one
        takes only what is queued already. A flush or close stops the waiting."""
        wait = not batch
        deadline = time.monotonic() + self._interval
        while len(batch) < self._batch_max:
            try:
                chunk = self._queue.get_nowait()
            except queue.Empty:
                if not wait or self._flush_requested.is_set() or self._stop.is_set():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    chunk = self._queue.get(timeout=min(remaining, _POLL_S))
                except queue.Empty:
                    continue
            if not batch and self._linger is not None:
                deadline = time.monotonic() + self._linger
            with self.lock:
                self.waiting -= len(chunk)
            batch.extend(chunk)
        return batch


class RequestAudit:
    """The per-request audit trail: one hash-chained record per request (see module doc).

    Args:
        path: the JSON-lines audit log (``clinml.audit.AuditLog``) to append to.
        max_queue: records that may wait to be written; when that many wait, the trail is
            unhealthy and ``submit`` refuses more.
        flush_interval_s: how long the writer idles between checks, and waits before
            retrying a failed write. Records are written as soon as the writer is free:
            those that arrive while a batch is being written go in the next batch.
        batch_max: the most records written (and fsynced) at once.
        linger_s: how long the writer waits after the first record of a batch for more to
            arrive, so that a busy service pays for opening, locking and fsyncing the log
            once per many requests rather than once per request.
        clock: the current time (aware); injected for tests.
        checkpoints: where to sign checkpoints of the log (``Checkpoints.from_settings``);
            None (no audit key) writes none.
        checkpoint_interval_s: the least time between two checkpoints while records
            arrive (``CLINML_AUDIT_CHECKPOINT_INTERVAL_S``); one is written with the first
            batch and on close, none while nothing arrives.
    """

    def __init__(
        self,
        path: Path,
        max_queue: int = 10_000,
        flush_interval_s: float = 0.2,
        *,
        batch_max: int = 1_000,
        linger_s: float = 0.005,
        clock: Callable[[], datetime] = utc_now,
        checkpoints: Checkpoints | None = None,
        checkpoint_interval_s: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self._log = AuditLog(self.path, checkpoints=checkpoints)
        self._checkpoint_interval = checkpoint_interval_s
        self._checkpoint_due = -math.inf  # monotonic time; the first batch signs one
        self._uncheckpointed = 0  # records written since the last checkpoint
        self._head: tuple[int, str] | None = None
        self._max_queue = max_queue
        self._interval = flush_interval_s
        self._clock = clock
        self._refused = 0
        self._write_error: str | None = None
        self._full_reported = False
        self._writer = _BatchWriter(
            "clinml-request-audit",
            self._write,  # None on failure: the batch is kept and retried (fails closed)
            max_queue=max_queue if max_queue > 0 else None,  # as queue.Queue: 0 is no limit
            batch_max=batch_max,
            interval=flush_interval_s,
            linger=linger_s,
            on_start=self._read_head,
            on_idle=self._checkpoint_when_idle,
            on_exit=self._checkpoint_on_close,
        )
        self._writer.start()

    def __repr__(self) -> str:
        return f"RequestAudit({str(self.path)!r}, healthy={self.healthy})"

    # -- the request side ------------------------------------------------------------------

    def submit(self, record: dict[str, Any]) -> bool:
        """Queue one request's record for writing; never waits.

        Args:
            record: ``request_id``, ``endpoint``, ``outcome`` (HTTP status) and
                ``latency_ms``, and optionally ``key_id``, ``model_version``,
                ``patient`` (pseudonymised) and ``count`` (an int >= 1: the record stands
                for that many identical refused requests); nothing else.

        Returns:
            True when the record was queued; False when the queue is full or the trail is
            closed (the caller answers 503).

        Raises:
            ValueError: the record has unknown or missing fields or values of the wrong
                type (a bug in the caller; the message names fields, not values).
        """
        entry = self._entry(record)
        if self._writer.stopped:
            return False
        if self._writer.offer([entry]):
            return True
        with self._writer.lock:
            self._refused += 1
            report = not self._full_reported
            self._full_reported = True
        if report:
            logger.error(
                "request audit trail %s: queue full (%d records waiting); refusing "
                "requests until the writer catches up",
                self.path,
                self._max_queue,
            )
        return False

    @property
    def healthy(self) -> bool:
        """False while the queue is full, the last write failed, or the trail is closed."""
        return self.error is None

    @property
    def error(self) -> str | None:
        """Why the trail is unhealthy, in one line; None when it is healthy.

        Asked on every request, so it reads the writer's counters without taking a lock.
        """
        if self._writer.stopped:
            return "the request audit trail is closed"
        if not self._writer.alive:
            return "the request audit trail's writer has stopped"
        if self._writer.full:
            return (
                f"request audit queue full ({self._max_queue} records waiting); the "
                f"audit log {self.path} is not keeping up"
            )
        return self._write_error

    @property
    def written(self) -> int:
        return self._writer.written

    @property
    def refused(self) -> int:
        """Records ``submit`` refused because the queue was full."""
        return self._refused

    @property
    def queued(self) -> int:
        return self._writer.waiting

    @property
    def head(self) -> tuple[int, str] | None:
        """``(record count, last hash)`` of the log after this trail's latest durable
        write (or as it found the log on starting); None until then, or when the log's
        end could not be read. For an outside witness on ``/metrics``: a later log that
        lacks record ``count`` with this hash was cut or rewritten."""
        return self._head

    @property
    def checkpoint_failures(self) -> int:
        """Checkpoints that could not be written (each logged); 0 without an audit key."""
        return self._log.checkpoint_failures

    @property
    def integrity_alarms(self) -> int:
        """Times the writer found the log had lost or replaced records it had written, or
        a checkpoint gone (each logged, and signed into the next checkpoint)."""
        return self._log.integrity_alarms

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record submitted so far is written.

        Returns:
            True when they are; False when ``timeout`` (seconds) passed first.
        """
        return self._writer.flush(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new records, write the queued ones (retrying for up to ``timeout``
        seconds) and stop the writer."""
        self._writer.close(timeout, join_s=timeout + self._interval + 1.0)
        if self._writer.outstanding:
            logger.error(
                "request audit trail %s closed with %d records not written",
                self.path,
                self._writer.outstanding,
            )

    # -- internals -------------------------------------------------------------------------

    def _entry(self, record: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise ValueError(f"an audit record must be a dict, not {type(record).__name__}")
        unknown = sorted(
            str(key)
            for key in record
            if key not in AUDIT_FIELDS and key not in AUDIT_OPTIONAL_FIELDS
        )
        if unknown:
            raise ValueError(
                f"audit record has unknown field(s) {', '.join(unknown)}; the fields are "
                f"{', '.join(AUDIT_FIELDS + AUDIT_OPTIONAL_FIELDS)}"
            )
        missing = sorted(_REQUIRED_AUDIT_FIELDS - set(record))
        if missing:
            raise ValueError(f"audit record is missing field(s) {', '.join(missing)}")
        entry: dict[str, Any] = {"time": self._clock().astimezone(UTC).isoformat()}
        for field in AUDIT_FIELDS:
            value = record.get(field)
            if field == "outcome":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError("audit record field outcome must be an HTTP status (int)")
            elif field == "latency_ms":
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not math.isfinite(value)
                ):
                    raise ValueError("audit record field latency_ms must be a finite number")
                value = round(float(value), 3)
            elif not (value is None or isinstance(value, str)):
                raise ValueError(f"audit record field {field} must be a string or None")
            entry[field] = value
        if "count" in record:
            count = record["count"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError("audit record field count must be an integer >= 1")
            entry["count"] = count
        return entry

    def _read_head(self) -> None:
        try:
            self._head = self._log.head()  # what a witness sees until the first write
        except Exception as exc:  # a broken end: the first write will say so (unhealthy)
            logger.error(
                "request audit trail %s: cannot read its end (%s)", self.path, _reason(exc)
            )

    def _checkpoint_on_close(self) -> None:
        if self._uncheckpointed and self._log.checkpoints is not None:
            with contextlib.suppress(Exception):  # logged and counted by the log
                self._log.checkpoint()

    def _write(self, pending: list[dict[str, Any]]) -> int | None:
        """Append the batch; None when that failed (kept and retried, trail unhealthy)."""
        due = self._log.checkpoints is not None and time.monotonic() >= self._checkpoint_due
        try:
            records = self._log.append_many(pending, checkpoint=due)
        except Exception as exc:  # kept and retried: the trail stays unhealthy
            reason = _reason(exc)
            with self._writer.lock:
                first = self._write_error is None
                self._write_error = f"could not write the request audit trail: {reason}"
            if first:
                logger.error(
                    "request audit trail %s: write of %d records failed (%s); the "
                    "service refuses requests until a retry succeeds",
                    self.path,
                    len(pending),
                    reason,
                )
            return None
        self._head = (records[-1]["seq"], records[-1]["hash"])
        self._uncheckpointed += len(records)
        if due and self._log.checkpoint_error is None:  # else retried with the next batch
            self._checkpoint_due = time.monotonic() + self._checkpoint_interval
            self._uncheckpointed = 0
        if self._write_error is not None:  # said before waiters wake, so in order
            logger.warning("request audit trail %s: writing again", self.path)
        with self._writer.lock:
            self._write_error = None
            self._full_reported = False
        return len(pending)

    def _checkpoint_when_idle(self) -> None:
        """Sign the records written since the last checkpoint once the interval is up,
        though no more arrive: otherwise the last records before a quiet spell stay
        uncovered, and could be cut unnoticed, until traffic resumes."""
        if (
            not self._uncheckpointed
            or self._log.checkpoints is None
            or time.monotonic() < self._checkpoint_due
        ):
            return
        try:
            self._log.checkpoint()
        except Exception:  # logged and counted by the log; tried again next interval
            self._checkpoint_due = time.monotonic() + self._checkpoint_interval
            return
        self._checkpoint_due = time.monotonic() + self._checkpoint_interval
        self._uncheckpointed = 0


class PredictionLog:
    """The PHI-free log of every prediction, as date-partitioned parquet (see module doc).

    Args:
        directory: where the ``date=YYYY-MM-DD`` partitions go (created on first write).
        max_queue: rows that may wait to be written; rows beyond it are dropped.
        flush_rows: rows gathered into one batch (one file per date in it); a batch
            holds whole requests, so it may go over by one request's rows.
        flush_interval_s: the longest a row waits for its batch to fill up.
        clock: the current time (aware), used to name files; injected for tests.
        on_drop: called with the number of rows each time rows are dropped (the service
            counts them on ``/metrics``); it must be quick and must not raise.
    """

    def __init__(
        self,
        directory: Path,
        max_queue: int = 100_000,
        flush_rows: int = 5_000,
        flush_interval_s: float = 1.0,
        *,
        clock: Callable[[], datetime] = utc_now,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._on_drop = on_drop
        self._clock = clock
        self._dropped = 0
        self._drop_reported = False
        self.last_error: str | None = None
        # A request's rows are offered together, so a batch holds whole requests.
        self._writer = _BatchWriter(
            "clinml-prediction-log",
            self._write_batch,  # drops and counts the rows it cannot write (fails open)
            max_queue=max_queue,
            batch_max=flush_rows,
            interval=flush_interval_s,
        )
        self._writer.start()

    def __repr__(self) -> str:
        return (
            f"PredictionLog({str(self.directory)!r}, written={self.written}, "
            f"dropped={self.dropped}, queued={self.queued})"
        )

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Queue prediction rows for writing; never waits and never raises.

        Args:
            rows: one dict per prediction: ``time`` (aware datetime, UTC), ``request_id``,
                ``model_version``, ``patient`` (pseudonymised or None), ``probability``,
                ``label`` and the feature columns. The log keeps references to them: do
                not change them afterwards.

        Rows that find the queue full (or the log closed), and rows that are not dicts, are
        dropped and counted in ``dropped``; ``rows`` that is not a list is logged and
        ignored.
        """
        try:
            if not isinstance(rows, list | tuple):
                logger.error("prediction log: rows must be a list, not %s", type(rows).__name__)
                return
            if self._writer.stopped:
                self._drop(len(rows), "the prediction log is closed")
                return
            # A row that is not a dict would spoil the whole batch it lands in.
            good = [row for row in rows if isinstance(row, dict)]
            if len(good) < len(rows):
                self._drop(len(rows) - len(good), "a row is not a dict")
            accepted = self._writer.offer(good)
            if accepted < len(good):
                self._drop(len(good) - accepted, "the prediction log queue is full")
        except Exception as exc:  # the prediction must go ahead whatever happens here
            logger.error("prediction log: could not queue rows (%s)", type(exc).__name__)

    @property
    def written(self) -> int:
        return self._writer.written

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def queued(self) -> int:
        return self._writer.waiting

    def flush(self, timeout: float = 10.0) -> bool:
        """Write every row recorded so far now, without waiting for a batch to fill.

        Returns:
            True when every row is settled (written or dropped); False when ``timeout``
            (seconds) passed first.
        """
        return self._writer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write the queued rows and stop the writer; later rows are dropped."""
        self._writer.close(timeout, join_s=timeout)

    # -- internals -------------------------------------------------------------------------

    def _drop(self, count: int, reason: str) -> None:
        with self._writer.lock:
            self._dropped += count
            report = not self._drop_reported
            self._drop_reported = True
        self._count_drop(count)
        if report and count:  # once until rows are written again, not once per request
            logger.warning("prediction log: dropping rows (%s)", reason)

    def _count_drop(self, count: int) -> None:
        if count and self._on_drop is not None:
            try:
                self._on_drop(count)
            except Exception:  # counting must never stop the writer
                logger.exception("prediction log: on_drop failed")

    def _write_batch(self, rows: list[dict[str, Any]]) -> int:
        """Write the rows, one file per date; returns how many were written, having
        dropped and counted the rest."""
        written = dropped = 0
        try:
            for day, part in sorted(_by_day(rows).items()):
                try:
                    self._write_partition(day, _table(part))
                    written += len(part)
                except Exception as exc:
                    dropped += len(part)
                    self._failed(len(part), exc)
        except Exception as exc:  # a row without a usable time, mixed types, ...
            dropped = len(rows) - written
            self._failed(dropped, exc)
        with self._writer.lock:
            self._dropped += dropped
            if written and not dropped:
                self._drop_reported = False
        self._count_drop(dropped)
        return written

    def _failed(self, count: int, exc: Exception) -> None:
        self.last_error = (
            f"could not write {count} prediction rows to {self.directory}: {_reason(exc)}"
        )
        logger.error("prediction log: %s", self.last_error)

    def _write_partition(self, day: str, frame: pa.Table | pd.DataFrame) -> Path:
        """Write one date's rows as a new parquet file, atomically (temp name, rename)."""
        partition = self.directory / f"date={day}"
        partition.mkdir(parents=True, exist_ok=True)
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Readers skip the temporary ".*.tmp". No fsync: this log fails open (a crash may
        # lose the latest batch), and a flush per batch would slow the writer under load.
        with replacing(partition / name, fsync=False) as tmp:
            if isinstance(frame, pa.Table):
                pq.write_table(frame, tmp)
            else:
                frame.to_parquet(tmp, engine="pyarrow", index=False)
        return partition / name


def _by_day(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows by the UTC date of their ``time`` (a naive time counts as UTC).

    Raises:
        KeyError, TypeError, ValueError: a row has no time, or one that is not a datetime
            (the message never holds the value).
    """
    days: dict[Any, str] = {}  # a request's rows share one time object
    parts: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        moment = row["time"]
        day = days.get(moment)
        if day is None:
            if not isinstance(moment, datetime):
                raise ValueError(f"a prediction row's time is a {type(moment).__name__}")
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            day = days[row["time"]] = moment.astimezone(UTC).strftime("%Y-%m-%d")
        parts.setdefault(day, []).append(row)
    return parts


def _table(rows: list[dict[str, Any]]) -> pa.Table | pd.DataFrame:
    """One day's rows as an Arrow table: built in C++, faster than a pandas frame
    (docs/benchmarks.md, "What changed for issue 7"), so the writer holds the serving
    process's GIL for less time. Rows that do not share one set of columns, or whose
    values Arrow cannot put in one column type, become a pandas frame as before (object
    columns take anything)."""
    import pyarrow as pa

    columns = rows[0].keys()
    if all(row.keys() == columns for row in rows):
        try:
            return pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    import pandas as pd

    frame = pd.DataFrame.from_records(rows)
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame
