"""Refused requests: counted at once, logged and audited once per window per kind.

A refusal (401, 403, 408, 413, 415, 429, 431, a refused upgrade) costs the service
almost nothing, so an attacker can send thousands a second. Logging or auditing each
one would hand that attacker the log's disk and the audit trail's queue (a full queue
makes the service refuse predictions: the trail fails closed). So each refusal is
counted on ``/metrics`` at once, and refusals are *aggregated*: every ``window_s``
seconds, one INFO line and one audit record per kind of refusal seen, where a kind is
(endpoint, status, key id, reason) and the record carries how many there were. The
number of kinds is bounded (the endpoints the service names plus ``"other"``, the
statuses, the configured key ids), so the log and the trail grow by at most a fixed
number of lines per window whatever the attack.

Nothing a caller sent is kept: the endpoint is one the service serves or ``"other"``,
the key id is a configured one (never a presented secret), the reason is clinml's own
text.

    refusals.record("/predict", 401, None, "missing or invalid API key")
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable

from clinml.serving.routes import metric_paths

log = logging.getLogger("bentoml.clinml.refusals")

# (endpoint, status, key id or None, reason)
Kind = tuple[str, int, str | None, str]


class Recorder:
    """Counts refusals and reports them per window (see the module docstring).

    Args:
        window_s: how often the aggregated log lines and audit records are written.
        known_paths: endpoints reported by name; any other path is ``"other"``.
    """

    def __init__(self, window_s: float = 5.0, known_paths: Iterable[str] = ()) -> None:
        self.window_s = window_s
        self.known_paths = frozenset(known_paths)
        # Told (endpoint, status) of every refusal at once, e.g. to count it on /metrics.
        self.count: Callable[[str, int], None] | None = None
        # Told (endpoint, status, key id, how many) once per kind per window, e.g. to
        # write an audit record; it must not raise.
        self.sink: Callable[[str, int, str | None, int], None] | None = None
        self._lock = threading.Lock()
        self._pending: dict[Kind, int] = {}
        self._flush_at: float | None = None
        self.recorded = 0

    def endpoint(self, path: str) -> str:
        """The name a refusal is reported under: the path when the service serves it."""
        return path if path in self.known_paths else "other"

    def record(self, path: str, status: int, key_id: str | None, reason: str) -> None:
        """One refused request to ``path``; ``reason`` is clinml's own text."""
        endpoint = path if path.startswith("(") else self.endpoint(path)
        if self.count is not None:
            self.count(endpoint, status)
        kind = (endpoint, status, key_id, reason)
        with self._lock:
            self.recorded += 1
            self._pending[kind] = self._pending.get(kind, 0) + 1
            now = time.monotonic()
            if self._flush_at is None:
                self._flush_at = now + self.window_s
                due = False
                self._schedule()
            else:
                due = now >= self._flush_at  # the timer could not be set: flush here
        if due:
            self.flush()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a test, a thread): the next record after the window flushes
        loop.call_later(self.window_s, self.flush)

    def flush(self) -> None:
        """Write what has been counted since the last flush (also at shutdown)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flush_at = None
        for (endpoint, status, key_id, reason), how_many in sorted(
            pending.items(), key=lambda item: (item[0][0], item[0][1], item[0][2] or "")
        ):
            log.info(
                "refused %d request(s) to %s with %d (%s)%s",
                how_many,
                endpoint,
                status,
                reason,
                f", API key {key_id!r}" if key_id else "",
            )
            if self.sink is not None:
                try:
                    self.sink(endpoint, status, key_id, how_many)
                except Exception:  # a failing sink must not turn a refusal into a 500
                    log.exception("could not audit refused requests")


# Reports the paths the route table names (clinml.serving.routes) by name.
RECORDER = Recorder(known_paths=metric_paths())


def record(path: str, status: int, key_id: str | None, reason: str) -> None:
    """``RECORDER.record``: one refused request (see :class:`Recorder`)."""
    RECORDER.record(path, status, key_id, reason)
