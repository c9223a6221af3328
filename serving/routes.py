"""Every path the service answers, in one table, and everything derived from it.

Each row says what one path is: the methods it takes, the role a key needs for it (None:
served without a key), whether each request to it is written to the request audit trail,
whether it counts towards load shedding, the label it reports under on ``/metrics`` and
in refusals, who answers it, and, for the paths BentoML serves itself, what the OpenAPI
document says about it. Everything else is derived here, so no second list can disagree:

- the role ``AuthMiddleware`` checks (:func:`rules`) and the paths it lets through without
  a key (:func:`open_paths`); ``CLINML_PROTECT_METRICS=true`` makes ``/metrics`` need
  ``admin`` (:func:`table`);
- the paths load shedding never counts (:func:`unshed`) and the audit middleware skips
  (:func:`unaudited`);
- the paths BentoML's request metrics may use as labels and refusals report by name
  (:func:`metric_paths`, :func:`endpoint`); any other path is text the caller chose;
- BentoML's access-log ``skip_paths`` and tracing ``excluded_urls`` (:func:`own_paths`,
  in ``clinml.serving.framework.service_config``);
- the OpenAPI entries of the paths BentoML serves (:func:`documented`, in
  ``clinml.serving.openapi``).

The Open Inference Protocol's paths name the use case (``/v2/models/pathology/infer``), so
their rows are made at start-up from the served use case (:func:`protocol_routes`): every
function below takes ``usecase`` and, given it, derives from ``ROUTES`` plus those rows. The
rows hold the concrete paths, so every check stays an exact match and a metric label is
never more than the served use case's few paths. Under ``/v2/models/`` any other path (another
model's name, a version path) needs ``predict``, is audited and shed, and is answered 404
in the protocol's error shape; it is reported as ``"other"``.

A new endpoint is a new row here (docs/architecture.md, "where does my change go"). A path
in no row needs ``admin``, is audited as ``"other"`` and is never a metric label: so is
BentoML's ``/schema.json``, which clinml does not use. A path ending in ``/`` (other than
``/`` itself) stands for everything under it, except paths with dot segments.

``tests/code/test_routes.py`` checks that the FastAPI app serves exactly the rows
answered by clinml, and that auth, shedding, metrics and OpenAPI agree with the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

from clinml.serving.keys import ROLES

# Who answers a path: clinml's FastAPI app (or its HotEndpoint), BentoML itself, the docs
# page middleware (serving/docs_page.py), or nobody (kept open so it is a 404, not a 401).
Server = Literal["clinml", "bentoml", "docs_page", "nobody"]

METRICS = "/metrics"
READINESS = "/readyz"
# The role /metrics needs with CLINML_PROTECT_METRICS=true.
METRICS_ROLE = "admin"


@dataclass(frozen=True)
class Route:
    """One row of the table (see the module docstring).

    Attributes:
        path: the path; ending in "/" (other than "/"): everything under it.
        methods: the methods it answers (others: 405).
        role: the role a key needs; None: served without a key.
        audited: each request is written to the request audit trail.
        shed: each request counts towards (and may be refused by) load shedding.
        metric: the label it reports under on /metrics and in refusals; None: ``"other"``
            (and never a label of BentoML's request metrics).
        server: who answers it.
        summary, description: its OpenAPI entry, for a path BentoML serves; None: the
            path is not in the document (or FastAPI documents it).
    """

    path: str
    methods: tuple[str, ...]
    role: str | None
    audited: bool
    shed: bool
    metric: str | None
    server: Server
    summary: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"route {self.path}: unknown role {self.role!r}; roles are {ROLES}")

    @property
    def is_prefix(self) -> bool:
        return self.path != "/" and self.path.endswith("/")


def _endpoint(path: str, methods: tuple[str, ...], role: str) -> Route:
    """One of clinml's own endpoints: a key needed, audited, shed, reported by name."""
    return Route(path, methods, role, audited=True, shed=True, metric=path, server="clinml")


def _open(
    path: str,
    methods: tuple[str, ...],
    server: Server,
    *,
    named: bool = True,
    summary: str | None = None,
    description: str | None = None,
) -> Route:
    """A path served without a key, neither audited nor shed."""
    metric = path if named else None
    return Route(path, methods, None, False, False, metric, server, summary, description)


GET = ("GET",)
PAGE = ("GET", "HEAD")

ROUTES: tuple[Route, ...] = (
    _endpoint("/predict", ("POST",), "predict"),
    _endpoint("/predict_patient", ("POST",), "predict"),
    _endpoint("/explain", ("POST",), "explain"),
    _endpoint("/model", GET, "predict"),
    _endpoint("/model/card", GET, "predict"),
    _endpoint("/admin/reload", ("POST",), "admin"),
    # The OpenAPI document (FastAPI's openapi_url, answered ahead of BentoML's own).
    _open("/docs.json", PAGE, "clinml"),
    _open(
        "/livez",
        GET,
        "bentoml",
        summary="livez",
        description="Liveness: 200 while the process serves HTTP. No key needed.",
    ),
    _open(
        READINESS,
        GET,
        "bentoml",
        summary="readyz",
        description="Readiness: 200 only when the model is loaded, the request audit trail "
        "is writable, (unless CLINML_REQUIRE_ONLINE_STORE=false) the online store is readable "
        "and (unless CLINML_AUTH=false) at least one API key exists; 503 otherwise. No key "
        "needed.",
    ),
    # Kubernetes' older probe name; BentoML answers it as /livez. Not documented.
    _open("/healthz", GET, "bentoml"),
    _open(
        METRICS,
        GET,
        "bentoml",
        summary="metrics",
        description="Prometheus metrics: request latency histograms per endpoint, predictions "
        "by label, errors by kind, the served model version. A key with the admin role is "
        "needed when CLINML_PROTECT_METRICS=true.",
    ),
    # The API docs page (Swagger UI) and its files, never BentoML's page.
    _open("/", PAGE, "docs_page"),
    _open("/docs", PAGE, "docs_page"),
    _open("/docs/assets/", PAGE, "docs_page", named=False),
    # Where BentoML serves its own page's assets: answered 404 by the docs page.
    _open("/static_content/", PAGE, "docs_page", named=False),
    # FastAPI's default document path; clinml's is /docs.json. Open, so a client looking
    # for it gets a 404 rather than a 401.
    _open("/openapi.json", GET, "nobody", named=False),
)


# The Open Inference Protocol (KServe V2): server-wide paths, and the prefix of a model's.
V2 = "/v2"
V2_MODELS = "/v2/models/"


def v2_model(usecase: str) -> str:
    """``/v2/models/<use case>``: the served model's protocol path (its metadata)."""
    return f"{V2_MODELS}{usecase}"


def protocol_routes(usecase: str) -> tuple[Route, ...]:
    """The Open Inference Protocol's rows for the served use case (serving/protocol.py)."""
    model = v2_model(usecase)
    return (
        _endpoint(f"{model}/infer", ("POST",), "predict"),
        _endpoint(f"{model}/ready", GET, "predict"),
        _endpoint(model, GET, "predict"),
        # Any other model, or a version path: after the key, clinml's 404 in the protocol's
        # shape (a catch-all route; BentoML's own 404 is plain text).
        Route(V2_MODELS, ("GET", "POST"), "predict", True, True, None, "clinml"),
        # Server metadata and health, open as /livez and /readyz are.
        _open(V2, GET, "clinml"),
        _open(f"{V2}/health/live", GET, "clinml"),
        _open(f"{V2}/health/ready", GET, "clinml"),
    )


def rows(usecase: str | None = None) -> tuple[Route, ...]:
    """``ROUTES``, plus the protocol's rows when ``usecase`` (the served one) is given."""
    return ROUTES if usecase is None else (*ROUTES, *protocol_routes(usecase))


def table(protect_metrics: bool = False, usecase: str | None = None) -> tuple[Route, ...]:
    """The routes, with ``/metrics`` needing ``admin`` (and audited and shed like any
    other protected path) when ``protect_metrics`` (``CLINML_PROTECT_METRICS``)."""
    if not protect_metrics:
        return rows(usecase)
    return tuple(
        replace(route, role=METRICS_ROLE, audited=True, shed=True)
        if route.path == METRICS
        else route
        for route in rows(usecase)
    )


class PathSet:
    """A set of paths from the table: ``path in paths``.

    Args:
        paths: paths; an entry ending in "/" (other than "/" itself) holds everything under
            it, except paths with dot segments.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        paths = set(paths)
        self._paths = frozenset(p for p in paths if p == "/" or not p.endswith("/"))
        self._prefixes = tuple(sorted(p for p in paths if p != "/" and p.endswith("/")))

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str):
            return False
        if path in self._paths:
            return True
        if not path.startswith(self._prefixes):
            return False
        # "/static_content/../predict" must not ride on the prefix.
        return not any(part in (".", "..") for part in path.split("/"))

    def __repr__(self) -> str:
        return f"PathSet({sorted([*self._paths, *self._prefixes])})"


def rules(protect_metrics: bool = False, usecase: str | None = None) -> dict[str, str]:
    """Path -> the role a key needs for it; a path in no row needs ``admin``. An entry
    ending in "/" holds everything under it (:func:`role_of`)."""
    return {r.path: r.role for r in table(protect_metrics, usecase) if r.role is not None}


def role_of(path: str, rules: dict[str, str]) -> str:
    """The role ``rules`` give ``path``: its own entry, else the longest prefix entry
    that holds it (never across dot segments), else ``admin``."""
    role = rules.get(path)
    if role is not None:
        return role
    holders = [p for p in rules if p != "/" and p.endswith("/") and path.startswith(p)]
    if holders and not any(part in (".", "..") for part in path.split("/")):
        return rules[max(holders, key=len)]
    return "admin"


def open_paths(
    protect_metrics: bool = False,
    exempt: Iterable[str] | None = None,
    usecase: str | None = None,
) -> PathSet:
    """The paths served without a key: the table's (or ``exempt``, when given), less
    ``/metrics`` when it is protected."""
    if exempt is None:
        return PathSet(r.path for r in table(protect_metrics, usecase) if r.role is None)
    return PathSet(p for p in exempt if not (protect_metrics and p == METRICS))


def unshed(protect_metrics: bool = False, usecase: str | None = None) -> PathSet:
    """The paths load shedding neither counts nor refuses."""
    return PathSet(r.path for r in table(protect_metrics, usecase) if not r.shed)


def unaudited(protect_metrics: bool = False, usecase: str | None = None) -> PathSet:
    """The paths whose requests are not written to the request audit trail."""
    return PathSet(r.path for r in table(protect_metrics, usecase) if not r.audited)


@lru_cache(maxsize=8)
def metric_paths(usecase: str | None = None) -> frozenset[str]:
    """The paths reported by name (on /metrics, in refusals and audit records); BentoML's
    request metrics instrument no other path."""
    return frozenset(r.metric for r in rows(usecase) if r.metric is not None)


def endpoint(path: str, usecase: str | None = None) -> str:
    """The name a request to ``path`` is reported under: its label, else ``"other"``."""
    return path if path in metric_paths(usecase) else "other"


def own_paths(usecase: str | None = None) -> list[str]:
    """clinml's own endpoints: it audits and times each request to them itself, so
    BentoML's access log and tracing skip them by default."""
    return [r.path for r in rows(usecase) if r.server == "clinml" and r.audited]


def served_by(server: Server, usecase: str | None = None) -> tuple[Route, ...]:
    """The rows ``server`` answers."""
    return tuple(r for r in rows(usecase) if r.server == server)


def documented() -> tuple[Route, ...]:
    """The rows BentoML serves that the OpenAPI document describes."""
    return tuple(r for r in ROUTES if r.server == "bentoml" and r.description is not None)
