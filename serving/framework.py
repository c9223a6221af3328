"""The BentoML adapter: every use of BentoML's private modules, and its start-up configuration.

clinml stands on BentoML's public API (``@bentoml.service``, ``@bentoml.asgi_app``,
``add_asgi_middleware``) except where BentoML gives no public way to do what the service
needs. Those places are all here, each with the reason:

- ``TimeoutMiddleware`` (``bentoml._internal.server.http.traffic``) leaves a live timer per
  request; replaced by :class:`clinml.serving.timeouts.TimeoutMiddleware`;
- ``RunnerTrafficMetricsMiddleware`` (``bentoml._internal.server.http.instruments``)
  labels its series with any raw path; replaced by a subclass that instruments only the
  route table's paths (``clinml.serving.routes.metric_paths``);
- BentoML's HTTP app logs rejected requests with their input on the logger
  ``HTTP_APP_LOGGER``; :class:`clinml.serving.redaction.RedactValidationErrors` is attached there;
- the Swagger UI files the docs page serves ship in a private BentoML folder
  (:func:`swagger_ui_folder`).

uvicorn's HTTP protocol table is pointed at :mod:`clinml.serving.httpguard` here too, since it is
part of the same start-up configuration.

:func:`configure` is the one start-up call (``clinml.serving.service`` makes it when it is
imported: BentoML builds its app, with its middleware classes and uvicorn's protocol,
right after importing the service module, so no later hook would be in time). It first
checks that the installed BentoML is the release line these patches were written for.
``tests/code/test_framework.py`` checks that every private name used here still exists
with the shape expected, so an upgrade fails there with a message, not in production.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from clinml.errors import ClinmlError

# The BentoML release these patches were written and measured against; any 1.4.x is
# accepted (the private names are checked by tests/code/test_framework.py), any other
# minor is refused.
PINNED_VERSION = "1.4.40"
# BentoML's HTTP app logs request exceptions here (bentoml/_internal/server/http_app.py,
# `logger = logging.getLogger(__name__)`, used by its `log_exception`).
HTTP_APP_LOGGER = "bentoml._internal.server.http_app"

log = logging.getLogger("bentoml.clinml")

_configured: tuple[Any, ...] | None = None


class FrameworkVersionError(ClinmlError):
    """The installed BentoML is not the release line clinml's serving was written for."""


def _minor(version: str) -> tuple[str, str]:
    major, minor, *_ = [*version.split("."), "", ""]
    return major, minor


def check_version(installed: str | None = None) -> None:
    """Refuse a BentoML outside ``PINNED_VERSION``'s minor release line.

    Args:
        installed: the version to check (default: ``bentoml.__version__``).

    Raises:
        FrameworkVersionError: naming both versions and what to do.
    """
    if installed is None:
        import bentoml

        installed = bentoml.__version__
    if _minor(installed) != _minor(PINNED_VERSION):
        raise FrameworkVersionError(
            f"BentoML {installed} is installed, but clinml's serving was written for BentoML "
            f"{PINNED_VERSION} ({'.'.join(_minor(PINNED_VERSION))}.x) and patches its "
            f"internals: install bentoml=={PINNED_VERSION} (constraints.txt), or port "
            "serving/framework.py and run tests/code/test_framework.py against the new release"
        )


# -- BentoML's private modules, each looked up in one place --------------------------------


def traffic_module() -> ModuleType:
    """``bentoml._internal.server.http.traffic``: BentoML's ``TimeoutMiddleware``."""
    from bentoml._internal.server.http import traffic

    return traffic


def instruments_module() -> ModuleType:
    """``bentoml._internal.server.http.instruments``: its request metrics middleware."""
    from bentoml._internal.server.http import instruments

    return instruments


def base_app_factory() -> type:
    """``BaseAppFactory``, which builds the middleware list of every BentoML app."""
    from bentoml._internal.server.base_app import BaseAppFactory

    return BaseAppFactory


def http_app_module() -> ModuleType:
    """``bentoml._internal.server.http_app``, whose logger is ``HTTP_APP_LOGGER``."""
    from bentoml._internal.server import http_app

    return http_app


def swagger_ui_folder() -> Path:
    """The folder of BentoML's static files, which holds the Swagger UI files (not
    checked here: ``clinml.serving.docs_page.swagger_ui_dist`` says what is missing)."""
    from bentoml._internal import server

    return Path(server.__file__).parent / "static_content"


# -- the patches ---------------------------------------------------------------------------


def install_timeout_middleware() -> None:
    """Make every BentoML app built in this process use
    :class:`clinml.serving.timeouts.TimeoutMiddleware`. BentoML imports the class from its module
    when it builds an app's middleware, so replacing the module attribute is enough."""
    from clinml.serving.timeouts import TimeoutMiddleware

    traffic_module().TimeoutMiddleware = TimeoutMiddleware  # type: ignore[attr-defined]


def install_metric_paths(known: frozenset[str]) -> None:
    """Keep request paths the service does not serve out of BentoML's request metrics.

    BentoML labels its request counters and histograms with the raw path of every
    request, so ``GET /patients/<patient id>`` would put the id on ``/metrics`` and into
    the Prometheus files. Its ``skip_paths`` spares only one timestamp, so the class is
    replaced (BentoML imports it when it builds the app) by one that does not instrument a
    path outside ``known``; such a request is answered 404 all the same, and clinml's own
    series count it with a fixed label. Installing again only updates ``known``.
    """
    instruments = instruments_module()
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

    instruments.RunnerTrafficMetricsMiddleware = KnownPathMetrics  # type: ignore[attr-defined]


def install_log_redaction(names: frozenset[str] = frozenset()) -> None:
    """Attach :class:`clinml.serving.redaction.RedactValidationErrors` to BentoML's HTTP logger
    (once; installing again only updates ``names``, the schemas' field names)."""
    from clinml.serving.redaction import RedactValidationErrors

    logger = logging.getLogger(HTTP_APP_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, RedactValidationErrors):
            existing.names = names
            return
    logger.addFilter(RedactValidationErrors(names))


# -- start-up ------------------------------------------------------------------------------


def service_config(settings: Any, usecase: str | None = None) -> dict[str, Any]:
    """BentoML's per-request extras for clinml's own endpoints (``@bentoml.service``
    options): its access log line and OpenTelemetry spans. clinml audits and times every
    request itself, so by default BentoML skips those paths (measured in
    docs/benchmarks.md)."""
    from clinml.serving.routes import own_paths

    own = own_paths(usecase)
    return {
        "logging": {
            "access": {
                "enabled": settings.access_log,
                "skip_paths": [] if settings.access_log else own,
            }
        },
        "tracing": {"excluded_urls": [] if settings.tracing else [f"{p}$" for p in own]},
    }


def configure(
    settings: Any, schema_names: frozenset[str] = frozenset(), usecase: str | None = None
) -> None:
    """Check the BentoML version and install every patch, once per process (a second call
    with the same arguments does nothing; with others, it updates them).

    Args:
        settings: ``clinml.settings.Settings`` (the header limits for httpguard).
        schema_names: the field names the request schemas know, which the log filter
            keeps (any other name in a logged error is the caller's text).
        usecase: the served use case, whose Open Inference Protocol paths BentoML's
            request metrics may label too (``clinml.serving.routes.metric_paths``).

    Raises:
        FrameworkVersionError: the installed BentoML is another minor release.
    """
    global _configured
    from clinml.serving import httpguard
    from clinml.serving.routes import metric_paths

    arguments = (
        settings.max_header_bytes,
        settings.max_headers,
        settings.header_timeout_s,
        schema_names,
        usecase,
    )
    if _configured == arguments:
        return
    check_version()
    install_timeout_middleware()
    # Header size, count and time limits and no protocol upgrades, before any middleware
    # runs (serving/httpguard.py has the findings behind each).
    httpguard.install(settings.max_header_bytes, settings.max_headers, settings.header_timeout_s)
    install_metric_paths(metric_paths(usecase))
    install_log_redaction(schema_names)
    _configured = arguments
