"""The tests' one waiting helper (tests/waiting.py): it returns what the condition found,
and a wait that runs out fails the test naming what was waited for."""

from __future__ import annotations

import pytest

from tests.waiting import wait_for


def test_returns_the_conditions_first_true_value() -> None:
    answers = iter([None, 0, "ready"])
    assert wait_for(lambda: next(answers), "a third answer", every_s=0) == "ready"


def test_a_wait_that_runs_out_fails_naming_what_and_what_was_seen() -> None:
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    with pytest.raises(pytest.fail.Exception) as failed:
        wait_for(never, "the server to stop", 0.05, every_s=0.01, seen=lambda: "still running")
    assert "the server to stop" in str(failed.value)
    assert "seen instead: still running" in str(failed.value)
    assert len(calls) >= 2  # polled, then checked once more after the deadline
