"""clinml.serving.framework, the BentoML adapter: every private BentoML name clinml depends on
still exists with the shape it expects, and configure() refuses another release line.

When one of these fails after a BentoML upgrade, the message says which patch in
serving/framework.py no longer fits; port it (or drop it, if BentoML fixed the problem)
before serving anything on the new release."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import bentoml
import pytest

from clinml.serving import docs_page, framework, httpguard, redaction, routes, timeouts
from clinml.serving.framework import FrameworkVersionError

SETTINGS = SimpleNamespace(max_header_bytes=32_768, max_headers=100, header_timeout_s=10.0)
UPGRADE = "BentoML changed underneath serving/framework.py: "


def test_the_installed_bentoml_is_the_pinned_release() -> None:
    assert bentoml.__version__ == framework.PINNED_VERSION, (
        f"BentoML {bentoml.__version__} is installed, the patches were written for "
        f"{framework.PINNED_VERSION}: run this module, then change PINNED_VERSION"
    )


@pytest.mark.parametrize("other", ["1.5.0", "1.3.9", "2.4.40", "1.40.0"])
def test_configure_refuses_another_release_line(
    monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    monkeypatch.setattr(bentoml, "__version__", other)
    monkeypatch.setattr(framework, "_configured", None)
    installed = framework.traffic_module().TimeoutMiddleware
    with pytest.raises(FrameworkVersionError) as caught:
        framework.configure(SETTINGS)
    message = str(caught.value)
    assert "\n" not in message
    assert f"BentoML {other} is installed" in message and framework.PINNED_VERSION in message
    assert f"bentoml=={framework.PINNED_VERSION}" in message  # what to do
    assert framework.traffic_module().TimeoutMiddleware is installed  # nothing patched


def test_another_patch_release_of_the_same_line_is_accepted() -> None:
    framework.check_version("1.4.41")
    framework.check_version(framework.PINNED_VERSION)


def test_bentomls_timeout_middleware_is_where_and_what_the_patch_expects() -> None:
    traffic = framework.traffic_module()
    upstream = getattr(traffic, "TimeoutMiddleware", None)
    assert inspect.isclass(upstream), UPGRADE + "no traffic.TimeoutMiddleware to replace"
    assert list(inspect.signature(upstream.__init__).parameters) == ["self", "app", "timeout"], (
        UPGRADE + "TimeoutMiddleware(app, timeout) changed its arguments"
    )


def test_bentoml_looks_the_timeout_middleware_up_when_it_builds_an_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traffic = framework.traffic_module()
    monkeypatch.setattr(traffic, "TimeoutMiddleware", timeouts.TimeoutMiddleware)

    class Factory(framework.base_app_factory()):  # type: ignore[misc]
        name = "test"

    built = [m.cls for m in Factory(timeout=30).middlewares]
    assert timeouts.TimeoutMiddleware in built, (
        UPGRADE + "BaseAppFactory no longer takes TimeoutMiddleware from the traffic module"
    )


def test_bentomls_request_metrics_middleware_is_where_and_what_the_patch_expects() -> None:
    import _bentoml_impl.server.app as service_app

    base = framework.instruments_module().RunnerTrafficMetricsMiddleware
    assert inspect.isclass(base), UPGRADE + "no instruments.RunnerTrafficMetricsMiddleware"
    parameters = inspect.signature(base.__init__).parameters
    assert {"app", "namespace", "skip_paths"} <= set(parameters), UPGRADE + "its arguments"
    assert inspect.iscoroutinefunction(base.__call__), UPGRADE + "its __call__"
    source = inspect.getsource(service_app.ServiceAppFactory)
    assert "from bentoml._internal.server.http.instruments import" in source and (
        "RunnerTrafficMetricsMiddleware" in source
    ), UPGRADE + "the service app no longer imports the metrics middleware when it builds"
    assert "super().middlewares" in source, UPGRADE + "the service app's middleware list"


def test_bentomls_http_app_logs_rejected_requests_on_the_logger_we_filter() -> None:
    import _bentoml_impl.server.app as service_app

    http_app = framework.http_app_module()
    assert http_app.logger.name == framework.HTTP_APP_LOGGER, UPGRADE + "the logger's name"
    assert service_app.log_exception is http_app.log_exception, (
        UPGRADE + "the service app logs request exceptions elsewhere"
    )
    assert "logger.error" in inspect.getsource(http_app.log_exception)


def test_bentoml_ships_the_swagger_ui_files_where_the_docs_page_looks() -> None:
    folder = framework.swagger_ui_folder()
    for name in docs_page.SWAGGER_UI_FILES:
        assert (folder / name).is_file(), UPGRADE + f"{name} is not in {folder}"


def test_configure_installs_every_patch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from uvicorn import config as uvicorn_config

    traffic, instruments = framework.traffic_module(), framework.instruments_module()
    # Undone after the test: other tests build BentoML apps and uvicorn servers.
    monkeypatch.setattr(framework, "_configured", None)
    monkeypatch.setattr(traffic, "TimeoutMiddleware", traffic.TimeoutMiddleware)
    metrics_base = instruments.RunnerTrafficMetricsMiddleware
    monkeypatch.setattr(instruments, "RunnerTrafficMetricsMiddleware", metrics_base)
    for name in ("auto", "httptools"):
        monkeypatch.setitem(
            uvicorn_config.HTTP_PROTOCOLS, name, uvicorn_config.HTTP_PROTOCOLS[name]
        )
    for name in ("max_header_bytes", "max_headers", "header_timeout_s"):
        cls = httpguard.GuardedHttpToolsProtocol
        monkeypatch.setattr(cls, name, getattr(cls, name))
    logger = logging.getLogger(framework.HTTP_APP_LOGGER)
    monkeypatch.setattr(logger, "filters", list(logger.filters))

    for _ in range(2):
        framework.configure(SETTINGS, frozenset({"records"}))

    assert traffic.TimeoutMiddleware is timeouts.TimeoutMiddleware
    patched = instruments.RunnerTrafficMetricsMiddleware
    if getattr(metrics_base, "known_paths", None) is None:  # not installed by an earlier test
        assert patched is not metrics_base and issubclass(patched, metrics_base)
    assert patched.known_paths == routes.metric_paths()
    assert uvicorn_config.HTTP_PROTOCOLS["auto"].endswith(":GuardedHttpToolsProtocol")
    filters = [f for f in logger.filters if isinstance(f, redaction.RedactValidationErrors)]
    assert len(filters) == 1 and filters[0].names == frozenset({"records"})


def test_the_metrics_patch_leaves_unknown_paths_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    instruments = framework.instruments_module()
    monkeypatch.setattr(
        instruments, "RunnerTrafficMetricsMiddleware", instruments.RunnerTrafficMetricsMiddleware
    )
    framework.install_metric_paths(frozenset({"/predict"}))
    patched = instruments.RunnerTrafficMetricsMiddleware
    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(scope["path"])

    middleware = patched(app)
    # An unknown path goes straight to the app, never into a metric label.
    asyncio.run(middleware({"type": "http", "path": "/patients/MRN-1"}, None, None))
    assert reached == ["/patients/MRN-1"]
    if getattr(patched, "known_paths", None) is not None:
        patched.known_paths = routes.metric_paths()  # as configure() left it
