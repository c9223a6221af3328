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
    predictions.record_columns(columns, rows=n)  # or predictions.record(row_dicts)
    audit.submit({"request_id": ..., "key_id": ..., "endpoint": "/predict", ...})
    ...
    audit.close(); predictions.close()  # on shutdown: write what is queued

The prediction log is a directory of parquet files, ``date=YYYY-MM-DD/part-<UTC
time>-<uuid8>.parquet``, partitioned by each row's ``time`` (UTC); each file is written
under a temporary name and renamed, so a reader never sees half a file. A request's rows
are queued as they come (columns or row dicts, nothing converted on the request path); the
writer appends them to one list per column as it takes them, and converts each column of
a batch in a few calls into Arrow, pausing for the request threads as it goes (``_HOLD_S``),
so that a request never waits long for the GIL behind it. Its reader,
``clinml.predictionlog.read_predictions``, lives in core, so that monitoring reads the log
without importing the serving layer.

Nothing here logs a record's values: errors name counts, paths and exception types.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinml.atomic import replacing
from clinml.audit import AuditError, AuditLog, Checkpoints
from clinml.clock import utc_now

if TYPE_CHECKING:
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

    Items are offered in chunks (a list, or anything ``len`` counts and ``chunk[:n]``
    cuts, such as one request's prediction columns); a batch is what ``new_batch`` makes,
    gathering chunks with its ``add(chunk)`` as the writer takes them and counting items
    with ``len``. The default is a list of the items.

    Args:
        name: the thread's name.
        write: writes one batch, as above; it must not raise.
        max_queue: items that may wait; ``offer`` accepts no more. None: no limit.
        batch_max: the most items in a batch; items offered together stay together, so a
            batch may go over by one offer's items.
        new_batch: makes an empty batch.
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
        new_batch: Callable[[], Any] = lambda: _Items(),
        on_start: Callable[[], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._max_queue = max_queue
        self._batch_max = batch_max
        self._interval = interval
        self._linger = linger
        self._new_batch = new_batch
        self._on_start, self._on_idle, self._on_exit = on_start, on_idle, on_exit
        # Each offer's items travel as one chunk: one hand-over per offer, not per item.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
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

    def offer(self, items: Any) -> int:
        """Queue as many of ``items`` (a chunk) as fit, in order; never waits.

        Returns:
            How many were queued (the first ones); the caller deals with the rest.
        """
        with self.lock:
            room = len(items) if self._max_queue is None else self._max_queue - self.waiting
            accepted = items if room >= len(items) else items[: max(room, 0)]
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
        batch = self._new_batch()
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
            batch = self._new_batch()

    def _collect(self, batch: Any) -> Any:
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
            batch.add(chunk)
        return batch


class _Items(list):  # type: ignore[type-arg]
    """A batch that is the list of its items (the audit trail's)."""

    add = list.extend


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
            holds whole requests, so it may go over by one request's rows. A file has a
            fixed cost besides its rows' (about that of 3,500 rows of 27 columns), so
            under load fewer, larger files keep the writer up with more rows a second
            (issue 22); with little load a batch is written after ``flush_interval_s``.
        flush_interval_s: the longest a row waits for its batch to fill up.
        clock: the current time (aware), used to name files; injected for tests.
        on_drop: called with the number of rows each time rows are dropped (the service
            counts them on ``/metrics``); it must be quick and must not raise.
    """

    def __init__(
        self,
        directory: Path,
        max_queue: int = 100_000,
        flush_rows: int = 20_000,
        flush_interval_s: float = 1.0,
        *,
        clock: Callable[[], datetime] = utc_now,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._on_drop = on_drop
        self._clock = clock
        self._dropped = 0
        self._behind_at = max(1, max_queue // BEHIND_FRACTION)
        self._drop_reported = False
        self.last_error: str | None = None
        # A request's rows are offered together, so a batch holds whole requests.
        self._writer = _BatchWriter(
            "clinml-prediction-log",
            self._write_batch,  # drops and counts the rows it cannot write (fails open)
            max_queue=max_queue,
            batch_max=flush_rows,
            interval=flush_interval_s,
            new_batch=lambda: _Predictions(self._behind),
            on_start=_lower_priority,
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

    def record_columns(self, columns: Mapping[str, Any], rows: int) -> None:
        """Queue one request's prediction rows, given as columns; never waits.

        The same rows as ``record`` takes, and written the same way (the same parquet
        columns and types), at a fraction of the request's time: nothing is converted
        here, and the writer converts each column for many requests at once.

        Args:
            columns: the row dict's keys, each to one value per row (a list, a tuple or a
                one-dimensional numpy array of ``rows`` values) or to one value for every
                row (a str, a number, a datetime or None): ``time`` (one aware datetime,
                UTC), ``request_id``, ``model_version``, ``patient`` (pseudonymised ids,
                or None), ``probability``, ``label`` and the feature columns. A NaN is
                logged as a missing value, as None is. The log keeps references to the
                values: do not change them afterwards.
            rows: how many predictions.

        Rows that find the queue full (or the log closed) are dropped and counted in
        ``dropped``, as with ``record``; so are rows whose column Arrow cannot give one
        type, when the batch is written.

        Raises:
            ValueError: a column's length is not ``rows``, a value is of a kind not
                listed, or ``time`` is not one datetime: a bug in the caller, so nothing
                is queued or counted. The message names the column, never a value.
        """
        chunk = _columns(columns, rows)
        try:
            if self._writer.stopped:
                self._drop(rows, "the prediction log is closed")
                return
            accepted = self._writer.offer(chunk) if rows else 0
            if accepted < rows:
                self._drop(rows - accepted, "the prediction log queue is full")
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

    def _write_batch(self, batch: _Predictions) -> int:
        """Write the batch, one file per date; returns how many rows were written, having
        dropped and counted the rest."""
        written = dropped = 0
        for count, exc in batch.refused:  # requests whose rows had no usable time
            dropped += count
            self._failed(count, exc)
        budget = batch.budget
        for day in sorted(batch.days):
            tables = []
            for group in batch.days[day]:
                try:
                    tables.append(group.table(budget))
                except Exception as exc:  # a column Arrow cannot give one type
                    dropped += group.rows
                    self._failed(group.rows, exc)
            rows = sum(len(table) for table in tables)
            if not rows:
                continue
            try:
                self._write_partition(day, _concat(tables))
                written += rows
            except Exception as exc:
                dropped += rows
                self._failed(rows, exc)
        with self._writer.lock:
            self._dropped += dropped
            if written and not dropped:
                self._drop_reported = False
        self._count_drop(dropped)
        return written

    def _behind(self) -> bool:
        """Whether the writer is falling behind: a ``1/BEHIND_FRACTION`` of its queue's
        room is taken. It then stops waiting for pauses between requests (``_Budget``),
        so that it does not drop rows because it yielded."""
        return self._writer.waiting >= self._behind_at

    def _failed(self, count: int, exc: Exception) -> None:
        self.last_error = (
            f"could not write {count} prediction rows to {self.directory}: {_reason(exc)}"
        )
        logger.error("prediction log: %s", self.last_error)

    def _write_partition(self, day: str, frame: pa.Table) -> Path:
        """Write one date's rows as a new parquet file, atomically (temp name, rename)."""
        partition = self.directory / f"date={day}"
        partition.mkdir(parents=True, exist_ok=True)
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Readers skip the temporary ".*.tmp". No fsync: this log fails open (a crash may
        # lose the latest batch), and a flush per batch would slow the writer under load.
        # Parquet's default codec (snappy) is kept: compressing costs next to nothing
        # beside encoding the columns, and the log is kept for months. Dictionary
        # encoding only where values repeat (strings, times): on the measurements'
        # float columns it halved nothing but the writer's speed (5,000 rows of 27
        # columns: 4.1 ms written with dictionaries everywhere, 1.9 ms like this, and a
        # smaller file), and on one core the writer's CPU is the requests' p99 (issue 22).
        # Statistics (each column's min, max and null count) only for the time, which a
        # reader filters on: for every column they cost a quarter of the write (20,000
        # rows of 27 columns: 15.5 ms with, 11.8 ms without), and nothing filters on the
        # features.
        repeating = [
            field.name
            for field in frame.schema
            if pa.types.is_string(field.type) or pa.types.is_timestamp(field.type)
        ]
        if not self._behind():  # the write is one call: start it between requests
            ACTIVITY.idle.wait(_DEFER_S)
        with replacing(partition / name, fsync=False) as tmp:
            pq.write_table(frame, tmp, use_dictionary=repeating, write_statistics=_STATISTICS)
        return partition / name


# The writer converts a column to Arrow this many rows at a time, and sleeps for
# _PAUSE_S once it has used _HOLD_S of CPU since it last did: converting Python values
# holds the GIL, and a request thread waiting for it would otherwise wait for the
# interpreter's switch interval (5 ms) or the whole conversion, whichever is shorter.
# A sleep hands the GIL over at once; a blocked writer uses no CPU, so its waits for
# records never count.
#
# Between those slices, and before it writes a file, the writer waits (up to _DEFER_S)
# until no request is being answered (``ACTIVITY``), and its thread runs at a lower
# scheduling priority (_WRITER_NICE): on a worker's one core, its CPU otherwise lands
# inside requests. With 100-record requests from one client, the log's writer was what
# put p99 at 2.5x p50 (without it: 1.3x; issue 22). The cap keeps it writing when
# requests never stop: at least _HOLD_S of every _HOLD_S + _PAUSE_S + _DEFER_S, a fifth
# of the core. That kept up with 57,000 rows a second (32 clients sending 1,000 records:
# none dropped in 20 s), but not with the 60,000-71,000 a faster worker answers since:
# the queue filled and rows were dropped (counted) with one client and with 32 sending
# 1,000 records. So once an eighth of its queue's room is taken (BEHIND_FRACTION) the
# writer stops waiting for pauses in requests (it still hands the GIL over after each
# slice): it is behind, and yielding more would drop rows.
_SLICE_ROWS = 1_024
# The columns whose parquet statistics are written (see _write_partition).
_STATISTICS = ["time"]
# The writer stops waiting for pauses in requests once this fraction of its queue's room
# is taken (PredictionLog._behind).
BEHIND_FRACTION = 8
_HOLD_S = 0.0005
_PAUSE_S = 0.0001
_DEFER_S = 0.002
_WRITER_NICE = 10


class Activity:
    """How many requests this process is answering; ``idle`` is set when none is. The
    service counts them (on its event loop); the prediction log's writer waits for
    ``idle`` between slices of its work (see above)."""

    def __init__(self) -> None:
        self._count = 0
        self.idle = threading.Event()
        self.idle.set()

    def started(self) -> None:
        self._count += 1
        if self._count == 1:
            self.idle.clear()

    def finished(self) -> None:
        self._count -= 1
        if self._count == 0:
            self.idle.set()


ACTIVITY = Activity()


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: a thread is its own task)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICE)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run as is
        logger.debug("prediction log writer keeps its priority: %s", exc)


class _Budget:
    """The writer's CPU time since it last let the request threads in (see above).
    ``behind``: whether the writer is falling behind (its queue filling); then it still
    hands the GIL over after each slice, but no longer waits for a pause in requests."""

    def __init__(self, behind: Callable[[], bool] = lambda: False) -> None:
        self._since = time.thread_time()
        self._behind = behind

    def check(self) -> None:
        if time.thread_time() - self._since >= _HOLD_S:
            time.sleep(_PAUSE_S)
            if not self._behind():
                ACTIVITY.idle.wait(_DEFER_S)
            self._since = time.thread_time()


class _Columns:
    """One request's prediction columns, as ``record_columns`` queues them: checked, not
    converted (the writer does that for many requests at once)."""

    __slots__ = ("day", "names", "rows", "values")

    def __init__(self, day: str, names: tuple[str, ...], values: tuple[Any, ...], rows: int):
        self.day, self.names, self.values, self.rows = day, names, values, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, cut: slice) -> _Columns:
        """The first rows (``chunk[:n]``), for a queue that has room for only some."""
        start, stop, _ = cut.indices(self.rows)
        values = tuple(
            value[start:stop] if isinstance(value, list | tuple) or _is_array(value) else value
            for value in self.values
        )
        return _Columns(self.day, self.names, values, max(stop - start, 0))


class _Repeat:
    """One value for each of ``rows`` rows (a request's time, id, model version)."""

    __slots__ = ("rows", "value")

    def __init__(self, value: Any, rows: int):
        self.value, self.rows = value, rows

    def tolist(self) -> list[Any]:
        return [self.value] * self.rows


class _Group:
    """A batch's rows of one date with one set of columns. A column given as numpy
    arrays (int64, float64, bool: a ``/predict`` batch's numbers, the probabilities) or
    as one value for all of a request's rows keeps those parts, which Arrow converts
    whole when the batch is written; any other column is a list of Python values, as
    ``pa.Table.from_pylist`` takes them. Both give the same Arrow type."""

    __slots__ = ("columns", "names", "parts", "rows")

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.columns: list[list[Any]] = [[] for _ in names]
        # per column: its parts so far, or None once a part was a list of values
        self.parts: list[list[Any] | None] = [[] for _ in names]
        self.rows = 0

    def extend(self, index: int, value: Any, rows: int) -> None:
        """Append one request's values (an array, a list, or one value for every row)."""
        parts = self.parts[index]
        if parts is not None:
            if not isinstance(value, list | tuple) and not _is_array(value):
                parts.append(_Repeat(value, rows))
                return
            if _is_array(value) and value.dtype.str in _ARRAY_TYPES and len(value) >= _ARRAY_ROWS:
                parts.append(value)
                return
        column = self.values(index)
        if isinstance(value, list | tuple):
            column.extend(value)
        elif _is_array(value):
            column.extend(value.tolist())
        else:
            column.extend([value] * rows)

    def values(self, index: int) -> list[Any]:
        """The column as a list of Python values (its parts, if any, converted)."""
        parts = self.parts[index]
        if parts is not None:
            for part in parts:
                self.columns[index].extend(part.tolist())
            self.parts[index] = None
        return self.columns[index]

    def _whole(self, index: int) -> pa.Array | None:
        """A column kept as parts, as one Arrow array: arrays of one dtype joined by
        numpy, or each request's one value converted once and repeated for its rows.
        None for any other mix (an int array and a float one, arrays and single values):
        the column is then converted from Python values, as from rows."""
        import numpy as np
        import pyarrow as pa

        parts = self.parts[index]
        if not parts:
            return None
        if all(isinstance(part, _Repeat) for part in parts):
            values = [part.value for part in parts]
            if all(type(v) is datetime and v.tzinfo is UTC for v in values):
                # datetime by datetime, Arrow takes ~2 µs each; as integers, far less
                micros = np.array([(v - _EPOCH) // _MICROSECOND for v in values])
                distinct = pa.array(micros, type=pa.timestamp("us", tz="UTC"))
            else:
                distinct = pa.array(values, from_pandas=True)
            if len(parts) == self.rows:
                return distinct
            return distinct.take(np.repeat(np.arange(len(parts)), [part.rows for part in parts]))
        if all(_is_array(part) and part.dtype == parts[0].dtype for part in parts):
            # NaN is a missing value, as None is in a row (features are never NaN)
            return pa.array(np.concatenate(parts), from_pandas=True)
        return None

    def table(self, budget: _Budget) -> pa.Table:
        """The rows as one Arrow table, each column of the type ``pa.Table.from_pylist``
        gives it. A column of Python values is converted a slice at a time; where its
        slices come out of different types (ints, then floats), the slices are promoted
        to one type, as ``from_pylist`` would type the whole column."""
        import pyarrow as pa

        columns: list[pa.Array | list[pa.Array]] = []
        for index in range(len(self.names)):
            array = self._whole(index)
            if array is None:
                values = self.values(index)
                chunks = []
                for start in range(0, self.rows, _SLICE_ROWS):
                    chunks.append(pa.array(values[start : start + _SLICE_ROWS], from_pandas=True))
                    budget.check()
                columns.append(chunks)
            else:
                columns.append(array)
            budget.check()
        if all(
            not isinstance(column, list) or len({chunk.type for chunk in column}) == 1
            for column in columns
        ):  # the usual case: each column of one type, kept in the chunks it was made in
            return pa.Table.from_arrays(
                [pa.chunked_array(c) if isinstance(c, list) else c for c in columns],
                names=list(self.names),
            )
        slices = []
        for number, start in enumerate(range(0, self.rows, _SLICE_ROWS)):
            arrays = [
                column[number] if isinstance(column, list) else column.slice(start, _SLICE_ROWS)
                for column in columns
            ]
            slices.append(pa.Table.from_arrays(arrays, names=list(self.names)))
        return _concat(slices)


# numpy dtypes whose arrays Arrow converts to the type their Python values would get
_ARRAY_TYPES = frozenset({"<f8", "<i8", "|b1"})
# Smaller arrays are kept as Python values: joining thousands of one-row arrays costs
# more than converting their values.
_ARRAY_ROWS = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class _Predictions:
    """A prediction-log batch: each request's rows appended, as the writer takes them,
    to a list per column for their date and set of columns (``_Group``). Converting one
    column of thousands of values is one call into Arrow; a table per request, or a dict
    per row, would be thousands of calls when the batch is written."""

    def __init__(self, behind: Callable[[], bool] = lambda: False) -> None:
        self.days: dict[str, list[_Group]] = {}
        self.refused: list[tuple[int, Exception]] = []  # (rows, why) with no usable time
        self.budget = _Budget(behind)
        self._groups: dict[tuple[str, tuple[str, ...]], _Group] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, chunk: _Columns | list[dict[str, Any]]) -> None:
        self._count += len(chunk)
        if isinstance(chunk, _Columns):
            # record_columns checked each value's kind and length, so every column of
            # the group grows by the same number of rows
            group = self._group(chunk.day, chunk.names)
            for index, value in enumerate(chunk.values):
                group.extend(index, value, chunk.rows)
            group.rows += chunk.rows
        else:
            try:
                days = _days(chunk)
            except Exception as exc:  # the request's rows are dropped, not the batch
                self.refused.append((len(chunk), exc))
                return
            for row, day in zip(chunk, days, strict=True):
                names = tuple(row)
                group = self._group(day, names)
                for index, value in enumerate(row.values()):
                    group.values(index).append(value)
                group.rows += 1
        self.budget.check()

    def _group(self, day: str, names: tuple[str, ...]) -> _Group:
        group = self._groups.get((day, names))
        if group is None:
            group = self._groups[(day, names)] = _Group(names)
            self.days.setdefault(day, []).append(group)
        return group


def _is_array(value: Any) -> bool:
    """Whether ``value`` is a numpy array (numpy is imported only if the caller has)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


# What a column may map to for every row at once.
_SCALARS = (str, bytes, int, float, datetime, type(None))


def _columns(columns: Mapping[str, Any], rows: int) -> _Columns:
    """One request's columns, checked (``PredictionLog.record_columns``)."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError("prediction log: rows must be a whole number >= 0")
    if not isinstance(columns, Mapping):
        raise ValueError(f"prediction log: columns must be a mapping, not {type(columns).__name__}")
    values = []
    for name, value in columns.items():
        if not isinstance(name, str):
            raise ValueError("prediction log: column names must be strings")
        if isinstance(value, list | tuple):
            count = len(value)
        elif _is_array(value):
            if value.ndim == 0:  # one numpy value
                value = value.item()
                count = None
            elif value.ndim == 1:
                count = len(value)
            else:
                raise ValueError(
                    f"prediction log column {name!r} is a {value.ndim}-dimensional array; "
                    "give one value per row"
                )
        elif isinstance(value, _SCALARS) or _is_number(value):
            count = None
        else:
            raise ValueError(
                f"prediction log column {name!r} is a {type(value).__name__}; give a list "
                "or a numpy array of one value per row, or one str, number, datetime or None"
            )
        if count is not None and count != rows:
            raise ValueError(f"prediction log column {name!r} has {count} values for {rows} rows")
        values.append(value)
    if "time" not in columns:
        raise ValueError("prediction log columns have no 'time'")
    moment = columns["time"]
    if not isinstance(moment, datetime):
        raise ValueError(
            "prediction log column 'time' must be one datetime for the request's rows, "
            f"not a {type(moment).__name__}"
        )
    return _Columns(_day(moment), tuple(columns), tuple(values), rows)


def _is_number(value: Any) -> bool:
    """Whether ``value`` is one numpy number or bool (``np.float64(0.5)``)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.generic)


def _day(moment: Any) -> str:
    """The UTC date of a prediction's ``time`` (a naive time counts as UTC).

    Raises:
        ValueError: it is not a datetime (the message never holds the value).
    """
    if not isinstance(moment, datetime):
        raise ValueError(f"a prediction row's time is a {type(moment).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).date().isoformat()  # strftime's "%Y-%m-%d", faster


def _days(rows: list[dict[str, Any]]) -> list[str]:
    """The UTC date of each row's ``time``.

    Raises:
        KeyError, ValueError: a row has no time, or one that is not a datetime.
    """
    days: dict[Any, str] = {}  # a request's rows share one time object
    out = []
    for row in rows:
        moment = row["time"]
        day = days.get(moment)
        if day is None:
            day = days[moment] = _day(moment)
        out.append(day)
    return out


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table of ``tables``: columns matched by name, a column missing from some is
    null there, and int and float columns become float, as ``pa.Table.from_pylist``
    types rows with uneven columns or numbers.

    Raises:
        pa.ArrowTypeError, pa.ArrowInvalid: a column has types that do not promote (a
            string and a number).
    """
    if len(tables) == 1:
        return tables[0]
    import pyarrow as pa

    return pa.concat_tables(tables, promote_options="permissive")
