"""Waiting in tests: poll a condition until it holds, up to a generous deadline.

A test that needs a server, a child process or a background writer to do something
polls for it with ``wait_for`` rather than sleeping a fixed time. The deadline guards
against a hang; it is not a timing check, so it is set for a busy CI machine (a loaded
machine may take minutes to start a Python process or a service), never tight. When it
passes, the test fails with a message naming what it waited for.

    wait_for(lambda: status(url, "/readyz") == 200, "the service to become ready", 300)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

# A deadline for something that normally takes well under a second.
DEADLINE_S = 120.0


def wait_for(
    condition: Callable[[], T],
    what: str,
    deadline_s: float = DEADLINE_S,
    *,
    every_s: float = 0.1,
    seen: Callable[[], object] | None = None,
) -> T:
    """Call ``condition`` every ``every_s`` seconds until it returns something true.

    It is called once more after the deadline, so a process descheduled for the whole
    wait still sees a condition that has come true.

    Args:
        condition: the check; it should be cheap and must not raise for "not yet".
        what: what is waited for, as the failure message names it ("the server to stop").
        deadline_s: how long to wait at most.
        every_s: the pause between checks.
        seen: called on failure to add what was seen instead (a log, a last answer).

    Returns:
        The condition's first true value.

    Raises:
        pytest.fail.Exception: the condition did not hold within ``deadline_s``.
    """
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every_s)
    if result := condition():
        return result
    message = f"waited {deadline_s:.0f} s for {what}; it did not happen"
    if seen is not None:
        message += f"; seen instead: {seen()}"
    pytest.fail(message)
