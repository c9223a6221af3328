"""Loaded by the Schemathesis CLI (``SCHEMATHESIS_HOOKS``) in tests/integration/test_api_fuzz.py.

``/model/card`` is an HTML page and the health endpoints answer plain text; both are
documented as strings, so their bodies are validated as text rather than skipped.
"""

import schemathesis


@schemathesis.deserializer("text/html", "text/plain")
def as_text(ctx, response) -> str:
    return response.content.decode("utf-8")
