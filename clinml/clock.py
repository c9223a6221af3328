"""The current time: the one clock that modules take as their default ``clock`` or ``now``.

Code that needs the time takes it as a parameter (a ``clock`` callable or a ``now``
value) defaulting to ``utc_now``, so a test hands in a fixed time instead of patching.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)
