"""Shadow scoring: a second model version scored on live traffic, off the response path.

While the registry's ``shadow`` alias names a version (``clinml shadow start``), the
executor holds it beside the champion (``ModelExecutor.score_shadow``). After a
prediction endpoint has answered a request from the champion and logged it, the service
offers the request to a :class:`ShadowScorer`: a bounded queue and one daemon thread at a
lower scheduling priority, which scores the request with the shadow version and logs its
rows beside the champion's (``shadow`` True, its own ``model_version``). Nothing of it
reaches an answer:

- ``offer`` never waits and never raises; a full queue drops the request and counts it;
- the worker catches everything a shadow model raises, counts it, and logs each kind of
  failure once (its type only: a library's message may quote an input value);
- the worker scores only while no request is being answered (``requestlog.ACTIVITY``),
  however long it must wait for such a moment: its model calls hold the interpreter lock,
  and a request arriving during one waits for it. A worker that is never idle therefore
  drops (and counts) most shadow requests rather than slow the champion;
- the worker scores the requests waiting in its queue together, up to
  :data:`MAX_JOINED_ROWS` rows, in one model call (as the champion's coalescer does), so
  that its fixed cost per call is paid once for many requests, while a call stays short
  (256 rows; 4,096 before it waited for idle moments) for a request that arrives during it.

Usage::

    scorer = ShadowScorer(executor.score_shadow, service.log_shadow, max_queue=1_000,
                          active=lambda: executor.shadow is not None)
    scorer.offer(ShadowRequest(batch, request_id, patients, time))  # after the answer
    scorer.close()
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clinml.serving.columns import Batch
from clinml.serving.requestlog import ACTIVITY, _lower_priority

logger = logging.getLogger("bentoml.clinml")

# How often the worker waiting for a pause in requests checks whether it was closed.
_CLOSED_CHECK_S = 0.05
# The most rows the worker joins into one model call (docs/benchmarks.md, "Shadow
# scoring's cost to the champion": 4,096 when it scored after at most 2 ms of waiting).
MAX_JOINED_ROWS = 256


@dataclass(frozen=True)
class ShadowRequest:
    """One answered request, as the shadow version sees it: the checked batch the
    champion scored, and what its log rows share with the champion's."""

    batch: Batch = field(repr=False)
    request_id: str
    patients: list[str] | None = field(repr=False)
    time: datetime


class ShadowScorer:
    """Scores answered requests with the shadow version, one at a time, off the request
    path (see the module docstring).

    Args:
        score: the shadow version's scores of a batch (``ModelExecutor.score_shadow``), or
            None when no version is shadowed (the request is then let go).
        log: writes a request's shadow rows, given the request and those scores.
        max_queue: requests that may wait; more are dropped and counted.
        active: whether a version is shadowed now; ``offer`` queues nothing while it is
            not. It must be quick (it runs on the request path).
        on_scored, on_dropped, on_error: called once per request scored, dropped or
            failed (the service counts them on ``/metrics``); they must be quick.
    """

    def __init__(
        self,
        score: Callable[[Batch], Any],
        log: Callable[[ShadowRequest, Any], None],
        *,
        max_queue: int = 1_000,
        active: Callable[[], bool] = lambda: True,
        on_scored: Callable[[], None] | None = None,
        on_dropped: Callable[[], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._score, self._log, self._active = score, log, active
        self._on_scored, self._on_dropped, self._on_error = on_scored, on_dropped, on_error
        self._queue: queue.Queue[ShadowRequest | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self.scored = 0
        self.dropped = 0
        self.errors = 0
        self._reported: set[str] = set()  # the kinds of failure logged so far
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clinml-shadow", daemon=True)
        self._thread.start()

    def offer(self, request: ShadowRequest) -> bool:
        """Queue an answered request for the shadow version; never waits, never raises.

        Returns:
            Whether it was queued: False with no shadow version, or when it was dropped
            (the queue full, the scorer closed; counted in ``dropped``).
        """
        try:
            if not self._active():
                return False
            if self._closed.is_set():
                self._count_drop()
                return False
            self._queue.put_nowait(request)
            return True
        except queue.Full:
            self._count_drop()
            return False
        except Exception as exc:  # the champion's answer goes out whatever happens here
            self._failed(exc)
            return False

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    def flush(self, timeout: float) -> bool:
        """Wait until every request queued so far is scored (or failed); False when
        ``timeout`` (seconds) passed first."""
        done = threading.Event()
        finished = threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True)
        finished.start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking requests; score what is queued for up to ``timeout`` seconds."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(queue.Full):  # the worker stops when it reaches it
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        _lower_priority()
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            while not ACTIVITY.idle.wait(_CLOSED_CHECK_S) and not self._closed.is_set():
                pass  # until no request is being answered (or the scorer is closing)
            requests, stop = self._waiting(first)
            try:
                self._score_together(requests)
            finally:
                for _ in requests:
                    self._queue.task_done()
            if stop:
                self._queue.task_done()
                return

    def _waiting(self, first: ShadowRequest) -> tuple[list[ShadowRequest], bool]:
        """``first`` and the requests queued behind it, up to ``MAX_JOINED_ROWS`` rows;
        and whether the close marker was among them."""
        requests, rows = [first], first.batch.rows
        while rows < MAX_JOINED_ROWS:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:
                return requests, True
            requests.append(request)
            rows += request.batch.rows
        return requests, False

    def _score_together(self, requests: list[ShadowRequest]) -> None:
        """Score the requests in one call and log each one's rows; a failure counts for
        every request of the call."""
        try:
            scores = self._score(Batch.join([r.batch for r in requests]))
            if scores is None:  # the shadow was stopped since the requests were queued
                return
            start = 0
            for request in requests:
                self._log(request, scores[start : start + request.batch.rows])
                start += request.batch.rows
        except Exception as exc:
            for _ in requests:
                self._failed(exc)
            return
        with self._lock:
            self.scored += len(requests)
        for _ in requests:
            self._call(self._on_scored)

    def _count_drop(self) -> None:
        with self._lock:
            self.dropped += 1
            first = self.dropped == 1
        if first:
            logger.warning(
                "shadow scoring: dropping requests (its queue is full); the champion's "
                "answers are not affected (clinml_shadow_dropped_total counts them)"
            )
        self._call(self._on_dropped)

    def _failed(self, exc: Exception) -> None:
        kind = type(exc).__name__
        with self._lock:
            self.errors += 1
            new = kind not in self._reported
            self._reported.add(kind)
        if new:  # the type only: a library's message may quote an input value
            logger.error(
                "shadow scoring failed (%s); the champion's answers are not affected "
                "(clinml_shadow_errors_total counts every failure, this is logged once)",
                kind,
            )
        self._call(self._on_error)

    @staticmethod
    def _call(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:  # counting must never stop the worker
            logger.exception("shadow scoring: a counter failed")
