"""Keep submitted values out of the service's logs.

BentoML logs every rejected request with its traceback, and a pydantic error for the
request envelope (invalid JSON, an empty or oversized list) carries the raw input in its
text. This filter replaces such a record with the error count, types and field paths.
:func:`clinml.serving.framework.configure` attaches it to BentoML's logger (and, for the same
reason, keeps paths the service does not serve out of BentoML's request metrics).
"""

from __future__ import annotations

import logging


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
