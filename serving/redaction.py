"""Keep submitted values out of the service's logs.

BentoML logs every rejected request with its traceback, and a pydantic error for the
request envelope (invalid JSON, an empty or oversized list) carries the raw input in its
text. This filter replaces such a record with the error count, types and field paths.
"""

from __future__ import annotations

import logging
from typing import Any

# BentoML's HTTP app logs request exceptions here (bentoml._internal.server.http_app).
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"


class RedactValidationErrors(logging.Filter):
    """Drop the traceback and input of logged request-validation errors, and any field
    name the schemas do not know (``names``): the caller made it up."""

    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        from clinml.serving.schemas import error_location

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            errors = exc.errors(include_input=False, include_context=False, include_url=False)
            paths = (".".join(map(str, error_location(e["loc"], self.names))) for e in errors)
            where = sorted({path or "(body)" for path in paths})
            kinds = sorted({e["type"] for e in errors})
            record.msg = "rejected request: %d validation error(s) %s at %s"
            record.args = (len(errors), ",".join(kinds), ", ".join(where[:10]))
            record.exc_info = None
            record.exc_text = None
        return True


def install(names: frozenset[str] = frozenset()) -> None:
    """Attach the filter to BentoML's HTTP logger (idempotent); ``names`` are the field
    names the request schemas know."""
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    if not any(isinstance(f, RedactValidationErrors) for f in logger.filters):
        logger.addFilter(RedactValidationErrors(names))


def install_metric_paths(known: frozenset[str]) -> None:
    """Keep request paths the service does not serve out of BentoML's request metrics.

    BentoML labels its request counters and histograms with the raw path of every
    request, so ``GET /patients/<patient id>`` would put the id on ``/metrics`` and into
    the Prometheus files. Its ``skip_paths`` spares only one timestamp, so the class is
    replaced (BentoML imports it when it builds the app, after this module is imported)
    by one that does not instrument a path outside ``known``; such a request is answered
    404 all the same, and clinml's own series count it with a fixed label.
    """
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "known_paths", None) is not None:  # installed already
        base.known_paths = known
        return

    class KnownPathMetrics(base):  # type: ignore[misc, valid-type]
        known_paths: frozenset[str] = known

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket") and scope["path"] not in self.known_paths:
                await self.app(scope, receive, send)
                return
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = KnownPathMetrics  # type: ignore[misc]
