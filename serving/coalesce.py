"""Adaptive batching on the event loop: concurrent requests share one model call.

With inline execution the model runs in the API worker, on its event loop. Scoring one
record with the compiled gradient-boosting model costs little less than scoring eight:
almost all of it is fixed per call (docs/benchmarks.md, "What changed for issue 7"). So
when several requests are waiting to be scored at once, scoring them together is much
cheaper than one after another.

:class:`Coalescer` does that without a timer: the first request to arrive schedules a
flush with ``loop.call_soon`` and waits; every request that reaches the scoring point
before the loop gets to the flush joins the same batch. A request alone on an idle
server therefore waits for nothing (the flush runs on the loop's next turn), and under
load the batch is whatever arrived together. A batch holds at most ``max_records``
records unless one request alone is larger; it is scored by one call, so one model
version scores all of it. One batch is scored per turn of the loop: with 32 clients
sending 1,000 records each, scoring every waiting request in one turn left bodies
unread and answers unsent for the whole of it, and wrk's p99 was 2.3 s at a p50 of
0.58 s; one batch per turn gave 1.03-1.07 s at the same req/s (issue 22).

If a batch fails, each of its requests is scored again on its own, so one request's
failure is never another's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Records = list[dict[str, Any]]


def _concatenate(parts: Sequence[Any]) -> Any:
    """Lists of records (or ids) as one list, in order: the default ``join``."""
    return [item for part in parts for item in part]


class Coalescer(Generic[T]):
    """Score the records of requests that arrive together in one call of ``score``.

    Args:
        score: a batch -> its results, one per record in order, as a sequence that
            slicing splits (a list; ``ColumnScores`` for batches of columns). It runs on
            the event loop.
        max_records: the most records in one call, unless one request alone has more.
        join: several requests' batches -> one batch, records in order. Default: lists
            of records concatenated; ``columns.Batch.join`` for batches of columns.
            Each batch's ``len`` is its number of records.
    """

    def __init__(
        self,
        score: Callable[[Any], Any],
        max_records: int = 256,
        join: Callable[[Sequence[Any]], Any] = _concatenate,
    ):
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self._score = score
        self._join = join
        self.max_records = max_records
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._scheduled = False
        self.calls = 0  # model calls made, for tests and the benchmark
        self.batched = 0  # requests scored together with at least one other

    async def __call__(self, records: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((records, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        """Score the oldest waiting requests, up to ``max_records``, in one call; the
        rest wait for the loop's next turn (scheduled again here), so the loop reads
        bodies and sends answers between model calls instead of after all of them."""
        self._scheduled = False
        batch: list[tuple[Any, asyncio.Future[Any]]] = []
        size, taken = 0, 0
        for records, future in self._pending:
            if future.cancelled():  # the client went away
                taken += 1
                continue
            if batch and size + len(records) > self.max_records:
                break
            batch.append((records, future))
            size += len(records)
            taken += 1
        del self._pending[:taken]
        if self._pending:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        if batch:
            self._run(batch)

    def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            self._one(*batch[0])
            return
        try:
            together = self._join([records for records, _ in batch])
            self.calls += 1
            results = self._score(together)
            if len(results) != len(together):
                raise RuntimeError(
                    f"the model returned {len(results)} results for {len(together)} records"
                )
        except Exception:  # each request is scored alone, and fails alone
            for records, future in batch:
                self._one(records, future)
            return
        self.batched += len(batch)
        start = 0
        for records, future in batch:
            future.set_result(results[start : start + len(records)])
            start += len(records)

    def _one(self, records: Any, future: asyncio.Future[Any]) -> None:
        try:
            self.calls += 1
            results = self._score(records)
        except Exception as exc:  # handed to the request that caused it
            future.set_exception(exc)
        else:
            future.set_result(results)
