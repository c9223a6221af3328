"""Shadow scoring off the request path (``clinml.serving.shadow.ShadowScorer``) and the
prediction log's reader leaving shadow rows out by default.

The scorer is driven with plain functions for the shadow model and the log, so a slow or
failing shadow model and a flood of requests are shown without a service: ``offer`` never
waits or raises, a full queue drops and counts, failures are counted and logged once per
kind without their message. tests/integration/test_shadow.py runs it in the service.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clinml.predictionlog import read_predictions
from clinml.serving.columns import Batch
from clinml.serving.requestlog import ACTIVITY, PredictionLog
from clinml.serving.shadow import ShadowRequest, ShadowScorer
from tests.waiting import wait_for

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _request(i: int) -> ShadowRequest:
    batch = Batch({"radius": np.array([1.0 + i, 2.0 + i])}, 2)
    return ShadowRequest(batch, f"req-{i}", None, T0)


class Counts:
    def __init__(self) -> None:
        self.scored = self.dropped = self.errors = 0

    def callbacks(self) -> dict[str, Any]:
        def add(name: str) -> Any:
            return lambda: setattr(self, name, getattr(self, name) + 1)

        return {"on_scored": add("scored"), "on_dropped": add("dropped"), "on_error": add("errors")}


def test_each_offered_request_is_scored_and_logged_off_the_callers_thread() -> None:
    threads: list[str] = []
    logged: list[tuple[str, Any]] = []

    def score(batch: Batch) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return batch.columns["radius"] * 0.1

    counts = Counts()
    scorer = ShadowScorer(
        score, lambda r, s: logged.append((r.request_id, s)), **counts.callbacks()
    )
    try:
        assert all(scorer.offer(_request(i)) for i in range(5))
        assert scorer.flush(120)
    finally:
        scorer.close()
    assert [request_id for request_id, _ in logged] == [f"req-{i}" for i in range(5)]
    assert np.allclose(logged[2][1], [0.3, 0.4])
    assert set(threads) == {"clinml-shadow"}
    assert scorer.scored == counts.scored == 5 and scorer.dropped == scorer.errors == 0


def test_nothing_is_queued_without_a_shadow_version_or_after_it_stopped() -> None:
    shadowed = False
    logged: list[str] = []
    scorer = ShadowScorer(
        lambda batch: None,  # the executor's answer once the shadow is stopped
        lambda r, s: logged.append(r.request_id),
        active=lambda: shadowed,
    )
    try:
        assert scorer.offer(_request(0)) is False  # no shadow: not even queued
        shadowed = True
        assert scorer.offer(_request(1)) is True  # stopped before it was scored
        assert scorer.flush(120)
    finally:
        scorer.close()
    assert logged == [] and scorer.scored == scorer.dropped == scorer.errors == 0


def test_a_slow_shadow_under_a_flood_drops_and_counts_and_never_blocks_the_caller() -> None:
    release = threading.Event()

    def slow(batch: Batch) -> np.ndarray:
        release.wait(600)  # a shadow model that takes as long as the test wants
        return np.zeros(batch.rows)

    counts = Counts()
    scorer = ShadowScorer(slow, lambda r, s: None, max_queue=10, **counts.callbacks())
    try:
        started = time.perf_counter()
        accepted = [scorer.offer(_request(i)) for i in range(1_000)]
        offering = time.perf_counter() - started
        # ten wait; the worker holds the first it took, and may have joined those waiting
        # behind it into the same (held) call, freeing their places: at most 1 + 10 + 10.
        # The rest are dropped at once.
        assert 10 <= sum(accepted) <= 21
        assert scorer.dropped == counts.dropped == 1_000 - sum(accepted)
        # not a timing check of the scorer: a thousand offers never wait for the model,
        # which is still holding its first request
        assert not release.is_set() and offering < 60
        release.set()
        assert scorer.flush(120)
    finally:
        release.set()
        scorer.close()
    assert scorer.scored == counts.scored == sum(accepted) and scorer.errors == 0


def test_requests_waiting_together_are_scored_in_one_call_and_logged_each_its_own() -> None:
    """Under load the queue holds several requests: one model call scores them all, and
    each request's rows are logged with its own slice of the scores."""
    release = threading.Event()
    calls: list[int] = []
    logged: dict[str, Any] = {}

    def score(batch: Batch) -> np.ndarray:
        release.wait(600)  # hold the first call while the rest queue up behind it
        calls.append(batch.rows)
        return batch.columns["radius"] * 0.1

    scorer = ShadowScorer(score, lambda r, s: logged.__setitem__(r.request_id, s))
    try:
        assert all(scorer.offer(_request(i)) for i in range(8))
        release.set()
        assert scorer.flush(120)
    finally:
        release.set()
        scorer.close()
    assert sum(calls) == 16 and len(calls) < 8  # 8 requests of 2 rows, fewer calls
    assert set(logged) == {f"req-{i}" for i in range(8)}
    for i in range(8):
        assert np.allclose(logged[f"req-{i}"], [0.1 * (1.0 + i), 0.1 * (2.0 + i)])
    assert scorer.scored == 8


def test_nothing_is_scored_while_a_request_is_being_answered() -> None:
    """The shadow's model calls hold the interpreter lock: it waits for a moment when no
    request is in flight, however long that takes (before, it waited 2 ms and scored
    anyway), and a closing scorer does not wait for one."""
    scored: list[str] = []
    scorer = ShadowScorer(
        lambda batch: np.zeros(batch.rows), lambda r, s: scored.append(r.request_id)
    )
    ACTIVITY.started()  # a request is being answered
    answering = True
    try:
        assert scorer.offer(_request(1))
        # the one wait in this module that is meant to expire: a busy service, for a
        # while far longer than the 2 ms the worker used to defer to it
        assert not scorer.flush(0.5) and scored == []
        ACTIVITY.finished()
        answering = False
        assert scorer.flush(120) and scored == ["req-1"]
        ACTIVITY.started()
        answering = True
        assert scorer.offer(_request(2))
        scorer.close(timeout=120)  # closing scores what is queued, busy or not
        assert scored == ["req-1", "req-2"]
    finally:
        if answering:
            ACTIVITY.finished()
        scorer.close()


class Leaky(Exception):
    pass


def test_failures_are_counted_logged_once_per_kind_without_their_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    def failing(batch: Batch) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise Leaky("value 14.2 of patient MRN-0042")
        raise RuntimeError("radius 17.9")

    counts = Counts()
    scorer = ShadowScorer(failing, lambda r, s: None, **counts.callbacks())
    with caplog.at_level(logging.WARNING, logger="bentoml.clinml"):
        try:
            for i in range(6):  # one at a time: each its own model call
                assert scorer.offer(_request(i))
                assert scorer.flush(120)
            assert scorer.worker_alive  # the worker survived every failure
        finally:
            scorer.close()
    assert scorer.errors == counts.errors == 6 and scorer.scored == 0
    failures = [r.getMessage() for r in caplog.records if "shadow scoring failed" in r.message]
    assert len(failures) == 2 and any("Leaky" in m for m in failures)
    assert any("RuntimeError" in m for m in failures)
    text = caplog.text
    assert "14.2" not in text and "MRN-0042" not in text and "17.9" not in text


def test_a_failing_log_or_counter_is_a_counted_error_not_a_dead_worker() -> None:
    def broken_log(request: ShadowRequest, scores: Any) -> None:
        raise OSError("disk full")

    def broken_counter() -> None:
        raise ValueError("counter")

    scorer = ShadowScorer(
        lambda b: np.zeros(b.rows), broken_log, on_error=broken_counter, on_dropped=broken_counter
    )
    try:
        assert scorer.offer(_request(0))
        assert scorer.flush(120)
        assert scorer.errors == 1 and scorer.worker_alive
    finally:
        scorer.close()
    assert scorer.offer(_request(1)) is False and scorer.dropped == 1  # closed: dropped


def test_offer_never_raises_even_when_asking_for_the_shadow_fails() -> None:
    def broken_active() -> bool:
        raise RuntimeError("registry")

    scorer = ShadowScorer(lambda b: None, lambda r, s: None, active=broken_active)
    try:
        assert scorer.offer(_request(0)) is False
        assert scorer.errors == 1
    finally:
        scorer.close()


# -- the reader ---------------------------------------------------------------------------


def _rows(log: PredictionLog, request_id: str, version: str, shadow: bool | None) -> None:
    columns: dict[str, Any] = {
        "radius": np.array([1.0, 2.0]),
        "time": T0,
        "request_id": request_id,
        "model_version": version,
        "patient": None,
        "probability": np.array([0.2, 0.9]),
        "label": ["benign", "malignant"],
    }
    if shadow is not None:
        columns["shadow"] = shadow
    log.record_columns(columns, 2)


def test_read_predictions_leaves_shadow_rows_out_unless_asked(tmp_path: Path) -> None:
    directory = tmp_path / "predictions"
    # an older file with no shadow column at all, then a batch of served and shadow rows
    old = PredictionLog(directory)
    _rows(old, "req-old", "1", None)
    old.close()
    log = PredictionLog(directory)
    _rows(log, "req-1", "1", None)  # the champion's rows: no shadow column
    _rows(log, "req-1", "2", True)  # the shadow's rows of the same request
    _rows(log, "req-2", "1", False)
    log.close()
    wait_for(lambda: log.written == 6, "the prediction log to write its rows")

    window = {"since": T0 - timedelta(hours=1), "until": T0 + timedelta(hours=1)}
    served = read_predictions(directory, **window)
    assert len(served) == 6 and "shadow" not in served.columns
    assert set(served["model_version"]) == {"1"}
    assert sorted(served["request_id"].unique()) == ["req-1", "req-2", "req-old"]

    everything = read_predictions(directory, **window, shadow=True)
    assert len(everything) == 8 and everything["shadow"].dtype == bool
    shadow_rows = everything[everything["shadow"]]
    assert set(shadow_rows["request_id"]) == {"req-1"}
    assert set(shadow_rows["model_version"]) == {"2"}
    assert not everything[~everything["shadow"]]["model_version"].eq("2").any()
