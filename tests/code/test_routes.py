"""The route table (serving/routes.py) is the one list of paths: the FastAPI app serves
exactly its clinml rows, and the key check, load shedding, the audit trail, BentoML's
request metrics, refusals, BentoML's log and tracing skips and the OpenAPI document all
say what it says, as the service module actually wires them.

The service module is imported in a child process: importing it installs the BentoML
patches (serving/framework.py), which other tests check against BentoML's own classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route as StarletteRoute
from starlette.testclient import TestClient

from clinml.serving import routes
from clinml.serving.auth import AuthMiddleware
from clinml.serving.keys import KeyStore, generate_key
from tests.conftest import PROJECT_ROOT

# The use case the wired service serves: the table holds its Open Inference Protocol rows.
USECASE = "pathology"
SERVED = routes.rows(USECASE)

# Paths outside the table: caller-chosen text, BentoML's unused /schema.json, look-alikes.
UNKNOWN = [
    "/schema.json",
    "/patients/MRN-123",
    "/predict/",
    "/modelx",
    "/static_content/../predict",
]
# Under /v2/models/ but not the served model's: a key with predict, then a 404.
OTHER_MODELS = ["/v2/models/other/infer", "/v2/models/pathology/versions/1/infer"]
PROBES = [
    *(r.path for r in SERVED),
    "/static_content/app.js",
    "/docs/assets/x.css",
    *UNKNOWN,
    *OTHER_MODELS,
]

_WIRING = r"""
import json, sys
from clinml.serving import framework, refusals, routes, service
from clinml.serving.auth import AuthMiddleware
from clinml.serving.overload import ShedMiddleware

probes = json.loads(sys.argv[1])
options = {cls.__name__: opts for cls, opts in service.ClinicalService.middlewares}
auth = AuthMiddleware(None, **options["AuthMiddleware"])
shed = ShedMiddleware(None, **options["ShedMiddleware"])
document = service.api.openapi()
config = service.ClinicalService.config
metrics = framework.instruments_module().RunnerTrafficMetricsMiddleware
print(json.dumps({
    "app": sorted([r.path, sorted(r.methods or ())] for r in service.api.routes),
    "hot": sorted(service.HOT),
    "role": {p: None if auth.is_exempt(p) else auth.required_role(p) for p in probes},
    "shed": {p: p not in shed.open_paths for p in probes},
    "audited": {p: p not in service.UNAUDITED for p in probes},
    "refusal_name": {p: refusals.RECORDER.endpoint(p) for p in probes},
    "metric_paths": sorted(metrics.known_paths),
    "openapi": {
        p: {m: op.get("security") for m, op in item.items()}
        for p, item in document["paths"].items()
    },
    "skip_paths": config["logging"]["access"]["skip_paths"],
    "excluded_urls": config["tracing"]["excluded_urls"],
}))
"""


def _wiring(tmp_path: Path, protect_metrics: bool) -> dict[str, Any]:
    home = tmp_path / "home"
    keys_file = home / "secrets" / "api_keys.json"
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("{not json")  # importing the service must not read it
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINML_")}
    env.update(
        CLINML_HOME=str(home),
        CLINML_USECASE="pathology",
        CLINML_PROTECT_METRICS=str(protect_metrics).lower(),
        BENTOML_HOME=str(tmp_path / "bentoml"),
        PYTHONPATH=str(PROJECT_ROOT),
    )
    done = subprocess.run(
        [sys.executable, "-c", _WIRING, json.dumps(PROBES)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=[False, True], ids=["metrics-open", "metrics-protected"])
def wiring(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    protect = request.param
    return protect, _wiring(tmp_path_factory.mktemp("routes"), protect)


def test_the_fastapi_app_serves_exactly_the_clinml_rows(wiring) -> None:
    _, wired = wiring
    # a catch-all route ("/v2/models/{other:path}") serves its row's prefix
    served = {
        path.split("{")[0] if path.endswith(":path}") else path: set(methods)
        for path, methods in wired["app"]
    }
    table = {r.path: set(r.methods) for r in routes.served_by("clinml", USECASE)}
    assert served == table, "serving/routes.py and the FastAPI app disagree: add or fix a row"
    assert set(wired["hot"]) <= set(table)


def test_the_key_check_asks_for_the_tables_role(wiring) -> None:
    protect, wired = wiring
    expected = {r.path: r.role for r in routes.table(protect, USECASE)}
    for path, role in wired["role"].items():
        if path in expected:
            assert role == expected[path], path
    assert wired["role"]["/model/card"] == "predict"
    assert wired["role"]["/metrics"] == ("admin" if protect else None)
    assert wired["role"]["/static_content/app.js"] is None  # under an open prefix
    assert wired["role"]["/v2/models/pathology/infer"] == "predict"
    assert wired["role"]["/v2/health/ready"] is None


@pytest.mark.parametrize("path", OTHER_MODELS)
def test_another_models_path_needs_predict_and_is_audited_shed_and_unnamed(wiring, path) -> None:
    _, wired = wiring
    assert wired["role"][path] == "predict"
    assert wired["audited"][path] and wired["shed"][path]
    assert wired["refusal_name"][path] == "other"
    assert path not in wired["metric_paths"]


@pytest.mark.parametrize("path", UNKNOWN)
def test_a_path_not_in_the_table_is_closed_audited_shed_and_unnamed(wiring, path: str) -> None:
    _, wired = wiring
    assert wired["role"][path] == "admin"
    assert wired["audited"][path] and wired["shed"][path]
    assert wired["refusal_name"][path] == "other"
    assert path not in wired["metric_paths"]


def test_shedding_auditing_and_names_agree_with_the_table(wiring) -> None:
    protect, wired = wiring
    for route in routes.table(protect, USECASE):
        assert wired["shed"][route.path] is route.shed, route.path
        assert wired["audited"][route.path] is route.audited, route.path
        named = route.metric or "other"
        assert wired["refusal_name"][route.path] == named, route.path
    assert set(wired["metric_paths"]) == {r.metric for r in SERVED if r.metric}


def test_bentoml_skips_logging_and_tracing_clinmls_own_endpoints(wiring) -> None:
    _, wired = wiring
    own = [r.path for r in SERVED if r.server == "clinml" and r.audited]
    assert wired["skip_paths"] == own
    assert wired["excluded_urls"] == [f"{p}$" for p in own]


def test_the_openapi_document_covers_the_table(wiring) -> None:
    protect, wired = wiring
    documented = wired["openapi"]
    for route in routes.table(protect, USECASE):
        if route.server == "clinml" and route.role is not None and route.is_prefix:
            assert route.path not in documented, route.path  # a catch-all 404, undocumented
        elif route.server == "clinml" and route.role is not None:
            assert set(documented[route.path]) == {m.lower() for m in route.methods}, route.path
            assert documented[route.path][route.methods[0].lower()] is None  # needs a key
        elif route.description is not None:
            needs_key = route.role is not None
            assert documented[route.path]["get"] == (None if needs_key else []), route.path
        else:
            assert route.path not in documented, route.path
    assert {r.path for r in routes.documented()} == {"/livez", "/readyz", "/metrics"}


def test_model_card_needs_the_predict_role_by_default() -> None:
    """auth.DEFAULT_RULES lacked /model/card, which the service's own list had: a predict
    key got 403 from the middleware's defaults. The table gives every default the same rule."""
    secret, entry = generate_key("app", ["predict"])
    app = Starlette(routes=[StarletteRoute("/model/card", lambda r: PlainTextResponse("card"))])
    client = TestClient(AuthMiddleware(app, KeyStore([entry])))
    assert client.get("/model/card", headers={"X-API-Key": secret}).status_code == 200
    assert client.get("/model/card").status_code == 401


def test_every_row_is_well_formed() -> None:
    paths = [r.path for r in SERVED]
    assert len(paths) == len(set(paths)), "a path is in the table twice"
    for route in SERVED:
        assert route.path.startswith("/")
        assert (route.role is None) == (not route.audited) == (not route.shed), route.path
        assert route.metric in (route.path, None), route.path
        if route.is_prefix:
            assert route.metric is None, f"{route.path}: a prefix holds caller-chosen text"
        if route.description is not None:
            assert route.server == "bentoml" and route.summary, route.path
