"""The service's readiness, said in the log once per change.

``/readyz`` is asked every few seconds by each probe; the log says each change of
readiness once: ``not ready: <reason>`` (a warning: the reason says what to do) or
``ready``. Every reason comes through here, whichever check found it (the API keys, the
audit trail, the model, the online store), so one logger owns the lines::

    readiness = ReadinessLog()
    ready = readiness.report(service.not_ready_reason())
"""

from __future__ import annotations

import logging

# A child of the "bentoml" logger, so `bentoml serve` prints it with its own lines.
log = logging.getLogger("bentoml.clinml")

STARTING = "starting"


class ReadinessLog:
    """Logs each change of the not-ready reason once (see the module docstring)."""

    def __init__(self) -> None:
        self.reason: str | None = STARTING  # the last reason reported (None: ready)

    def report(self, reason: str | None) -> bool:
        """Record the current reason (None: ready), logging it if it changed.

        Returns:
            Whether the service is ready.
        """
        if reason != self.reason:
            self.reason = reason
            if reason is None:
                log.info("ready")
            else:
                log.warning("not ready: %s", reason)
        return reason is None
