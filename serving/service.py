"""The clinml prediction service (BentoML 1.4).

Run it with ``clinml serve USECASE`` (which sets ``BENTOML_HOME`` and ``CLINML_USECASE``)
or ``bentoml serve clinml.serving.service:ClinicalService``. The use case comes from
``CLINML_USECASE``; its spec generates the request schemas, and the model is the
``champion`` imported into the BentoML store by ``clinml package`` (or ``clinml build``).

The endpoints are an ASGI app mounted on the BentoML service, so clinml controls every
status code and error body (validation errors name the field and never echo the value)
and the OpenAPI document at ``/docs.json`` describes all of them. The two prediction
endpoints and ``/explain`` are answered straight from ASGI messages (:class:`HotEndpoint`:
the body is parsed once, a ``/predict`` batch checked, scored, answered and logged column
by column, and the answer encoded once); the others are FastAPI routes.
docs/benchmarks.md has the measurements behind that split.

``POST /predict``          records of features -> probability, label, risk band
``POST /predict_patient``  patient ids (+ as-of time) -> features from the Feast online
                           store -> prediction; a missing or stale feature is a 422
``POST /explain``          records -> top-k feature contributions (method by model type)
``GET /model``             the version served, its metrics, threshold and model card link
``GET /model/card``        the model card (HTML)
``POST /admin/reload``     switch to the registry's current champion without downtime
``POST /v2/models/<use case>/infer``  the Open Inference Protocol (KServe V2): tensors in,
                           the same predictions as ``/predict`` out (serving/protocol.py);
                           with ``GET /v2/models/<use case>`` (metadata), ``.../ready``,
                           ``/v2``, ``/v2/health/live`` and ``/v2/health/ready``
``/livez`` ``/readyz`` ``/metrics`` come from BentoML; ``/readyz`` asks ``__is_ready__``.

Every call needs an API key with the endpoint's role (``clinml.serving.routes``, checked by
``clinml.serving.auth``); every answer carries a request id, and every request is written to the
hash-chained request audit trail. Predictions go to the PHI-free prediction log that
``clinml monitor`` reads. While the registry names a ``shadow`` version (inline execution),
each answered prediction request is also scored by it off the response path
(:mod:`clinml.serving.shadow`) and its rows logged beside the champion's, never answered.
While it names a ``canary`` version (inline execution), a stable share of patients (or of
requests, by their records) is answered by that version instead, each answer naming it,
and the canary is rolled back on its own when it leaves its band
(:mod:`clinml.serving.canary`).

The model itself runs in :class:`clinml.serving.executor.ModelExecutor`: in this process
(``CLINML_EXECUTION=inline``, the default) or as a separate GPU-capable service with
adaptive batching that this one calls through ``bentoml.depends``
(``CLINML_EXECUTION=split``). docs/serving.md has the measurement behind the default.

Which path needs which role, is audited, shed or reported by name is one table,
``clinml.serving.routes``; the OpenAPI document is built by ``clinml.serving.openapi``.

What happens when this module is imported, and why BentoML forces it. ``bentoml serve``
imports this module in each worker and then at once builds its app from the class: the
``@bentoml.service`` options, the mounted app with its routes and the middleware list,
then uvicorn with its HTTP protocol. No hook of ours runs in between, so:

- settings and the spec are read once (``clinml.serving.executor._configuration``: the
  environment and the use case's spec YAML): the decorators' options need the settings,
  and the routes need the request schemas generated from the spec;
- ``framework.configure(SETTINGS, ...)`` (one call) checks the BentoML version and
  installs the patches of BentoML's internals and uvicorn's protocol table
  (``serving/framework.py`` lists them): BentoML picks the patched classes up when it
  builds the app, which is before any start-up hook runs;
- the ASGI middleware is registered (``add_asgi_middleware``), which reads nothing.

Nothing else: the API keys file is read when the service instance is created
(``ClinicalService.__init__``) or by the first request, whichever comes first, and the
docs page's files, the model, the audit trail and the online store when the worker
starts the service.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import bentoml
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from clinml.errors import ClinmlError
from clinml.serving import columns, framework, openapi, protocol, refusals, routes, schemas
from clinml.serving.asgi import send_json
from clinml.serving.canary import Band, CanaryGuard, CanaryRouter, Verdict
from clinml.serving.coalesce import Coalescer
from clinml.serving.columns import Batch
from clinml.serving.executor import (
    SETTINGS,
    SPEC,
    ColumnScores,
    ModelExecutor,
    Scored,
    model_tag,
)
from clinml.serving.keys import KeysOnFirstUse
from clinml.serving.readiness import ReadinessLog
from clinml.serving.requestlog import ACTIVITY
from clinml.serving.runtime import CARD_CONTENT_SECURITY_POLICY, NoModelLoaded
from clinml.serving.schemas import Answer
from clinml.serving.shadow import ShadowRequest, ShadowScorer

# A child of the "bentoml" logger, so `bentoml serve` prints it with its own lines.
log = logging.getLogger("bentoml.clinml")

# The request schemas are generated from the spec, so they must exist when the routes are
# defined. Reading settings and the spec (in clinml.serving.executor) touches no state.
SCHEMAS = schemas.build(SPEC, SETTINGS.max_records_per_request, SETTINGS.max_explain_records)
PredictRequest = SCHEMAS.predict_request
PredictDicts = SCHEMAS.predict_dicts  # PredictRequest, validated into dicts
ExplainRequest = SCHEMAS.explain_request
ExplainDicts = SCHEMAS.explain_dicts  # ExplainRequest, validated into dicts
PatientRequest = SCHEMAS.patient_request
# The start-up configuration of BentoML, before it builds its app (see the module
# docstring): the version check and every patch of its internals.
framework.configure(SETTINGS, SCHEMAS.names, SPEC.name)
# The route table's rows for the served use case: ROUTES plus the Open Inference
# Protocol's paths, which name it (serving/routes.py).
USECASE = SPEC.name
V2_MODEL = routes.v2_model(USECASE)
V2_INFER = f"{V2_MODEL}/infer"
refusals.RECORDER.known_paths = routes.metric_paths(USECASE)
# Paths whose requests are not audited (serving/routes.py).
UNAUDITED = routes.unaudited(SETTINGS.protect_metrics, USECASE)


class ClinicalAPI(FastAPI):
    """The FastAPI app, except that ``POST /predict``, ``/predict_patient`` and
    ``/explain`` go straight to their :class:`HotEndpoint`, past FastAPI's app-level
    middleware (its share of a request's time: docs/benchmarks.md, "What changed for
    issue 7"). Their routes stay in the router too, so BentoML's mount matches them and
    other methods get a 405."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.hot: dict[str, Any] = {}  # path -> HotEndpoint, filled in below

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path, root = scope["path"], scope.get("root_path", "")
            endpoint = self.hot.get(path[len(root) :] if root and path.startswith(root) else path)
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


api = ClinicalAPI(
    title=f"clinml: {SPEC.name}",
    description=SPEC.description,
    openapi_url="/docs.json",
    docs_url=None,
    redoc_url=None,
)


class ServiceUnavailable(Exception):
    """Answered 503 with a reason (no submitted values in it)."""


def _error_body(path: str, message: Any) -> dict[str, Any]:
    """An error answer: ``{"detail": ...}``, or the Open Inference Protocol's
    ``{"error": "..."}`` under ``/v2``."""
    if path == routes.V2 or path.startswith(routes.V2 + "/"):
        return {"error": str(message)}
    return {"detail": message}


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    if Metrics._made is not None:
        Metrics._made.errors.labels(request.url.path, "invalid_input").inc()
    detail = [
        {
            "loc": schemas.error_location(e.get("loc", ()), SCHEMAS.names),
            "msg": e.get("msg", ""),
            "type": e.get("type", ""),
        }
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


@api.exception_handler(ServiceUnavailable)
async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return JSONResponse(_error_body(request.url.path, str(exc)), status_code=503)


# A 404 under /v2/models/: another model's name, a version path. Only the served model is
# named (the caller's path is text it chose).
NO_SUCH_MODEL = f"unknown model: this service serves {USECASE!r} only (GET {V2_MODEL})"


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    detail = exc.detail
    if exc.status_code == 404 and path.startswith(routes.V2_MODELS):
        detail = NO_SUCH_MODEL
    # exc.headers carries a 405's Allow header (RFC 9110 requires it)
    return JSONResponse(_error_body(path, detail), status_code=exc.status_code, headers=exc.headers)


class Metrics:
    """clinml's Prometheus series, created once per process after BentoML has set up
    multiprocess collection (so they appear on /metrics next to BentoML's own)."""

    _made: Metrics | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.latency = Histogram(
            "clinml_request_duration_seconds",
            "Time to answer, by endpoint.",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.predictions = Counter(
            "clinml_predictions", "Predictions by endpoint and label.", ["endpoint", "label"]
        )
        self.errors = Counter("clinml_errors", "Errors by endpoint and kind.", ["endpoint", "kind"])
        # The shadow version's requests (clinml.serving.shadow): scored and logged,
        # dropped because its queue was full, failed. None of them touched an answer.
        self.shadow_scored = Counter(
            "clinml_shadow_scored", "Requests scored and logged by the shadow version."
        )
        self.shadow_dropped = Counter(
            "clinml_shadow_dropped",
            "Requests the shadow version did not score: its queue was full (the champion's "
            "answers were sent as always).",
        )
        self.shadow_errors = Counter(
            "clinml_shadow_errors",
            "Requests whose shadow scoring failed (the champion's answers were not affected).",
        )
        # The canary version's requests (clinml.serving.canary).
        self.canary_routed = Counter(
            "clinml_canary_routed", "Requests routed to the canary version (clinml canary)."
        )
        self.canary_errors = Counter(
            "clinml_canary_errors",
            "Canary requests whose scoring failed; the champion answered them instead.",
        )
        self.canary_rollbacks = Counter(
            "clinml_canary_rollbacks",
            "Canary versions rolled back by this worker's guard (left their band).",
        )
        self.log_dropped = Counter(
            "clinml_prediction_log_dropped_rows",
            "Prediction-log rows dropped (storage full or unwritable, queue full); the "
            "predictions themselves were answered.",
        )
        self.model = Gauge(
            "clinml_model_info",
            "1 for the model version being served.",
            ["name", "version", "alias"],
            multiprocess_mode="livemax",
        )
        # For an external witness of the request audit trail (docs/security.md, T9): a
        # record count and the last record's hash, as of the latest durable write. A
        # gauge holds a float, so the hash is given as its first 52 bits, an integer a
        # float holds exactly; a rewritten chain changes it with odds of 1 in 2**52.
        self.audit_records = Gauge(
            "clinml_audit_records",
            "Records in the request audit trail after its latest durable write.",
            multiprocess_mode="livemostrecent",
        )
        self.audit_head = Gauge(
            "clinml_audit_head_hash_prefix",
            "The first 52 bits (13 hex digits) of the last audit record's hash, as an integer.",
            multiprocess_mode="livemostrecent",
        )
        self._audit_exported: Any = None
        self._series: dict[Any, Any] = {}

    def observe(
        self, endpoint: str, seconds: float, labels: Sequence[str] | Mapping[str, int]
    ) -> None:
        """One answered request: its latency and the label of each prediction (or how
        many predictions have each label). The labelled series are looked up once per
        (endpoint, label), not per request."""
        series = self._series.get(endpoint)
        if series is None:
            series = self._series[endpoint] = self.latency.labels(endpoint)
        series.observe(seconds)
        counts: Mapping[str, int]
        if isinstance(labels, Mapping):
            counts = labels
        else:
            counted: dict[str, int] = {}
            for label in labels:
                counted[label] = counted.get(label, 0) + 1
            counts = counted
        for label, count in counts.items():
            key = (endpoint, label)
            counter = self._series.get(key)
            if counter is None:
                counter = self._series[key] = self.predictions.labels(endpoint, label)
            counter.inc(count)

    def export_audit_head(self, head: tuple[int, str] | None) -> None:
        """Put the request audit trail's ``(count, last hash)`` on /metrics when it moved."""
        if head is None or head == self._audit_exported:
            return
        self._audit_exported = head
        count, last_hash = head
        self.audit_records.set(count)
        self.audit_head.set(int(last_hash[:13], 16))

    @classmethod
    def get(cls) -> Metrics:
        if cls._made is None:
            cls._made = cls()
        return cls._made

    def serving(self, model: schemas.ModelRef, previous: schemas.ModelRef | None = None) -> None:
        if previous is not None:
            self.model.labels(previous.name, previous.version, previous.alias).set(0)
        self.model.labels(model.name, model.version, model.alias).set(1)


# Records /explain works through, inline, before it lets other requests on the worker
# run (ClinicalService.explain).
EXPLAIN_CHUNK = 16

# After the online store fails a read, /predict_patient answers 503 without trying it for
# this long (ClinicalService.read_online).
STORE_RETRY_S = 1.0

ERROR_KINDS = {
    400: "bad_request",
    401: "auth",
    403: "auth",
    404: "not_found",
    408: "too_slow",
    413: "too_large",
    415: "not_json",
    431: "headers_too_large",
    422: "invalid_input",
    429: "overloaded",
    503: "unavailable",
}


class ExecutionUnavailable(ServiceUnavailable):
    """The split model-execution service did not answer."""


# How the served use case's predictions are answered, column by column.
ANSWERING = schemas.Answering(SPEC)


class Encoded(bytes):
    """An answer's body, already JSON (``HotEndpoint`` sends it as it is)."""


@contextmanager
def _reaching_the_executor() -> Iterator[None]:
    """A split executor's failure to answer becomes a 503 (ExecutionUnavailable) naming
    only the exception's type; clinml's own errors pass through."""
    try:
        yield
    except ClinmlError:
        raise
    except Exception as exc:
        raise ExecutionUnavailable(
            f"model execution service unavailable: {type(exc).__name__}"
        ) from None


@contextmanager
def _model_loaded() -> Iterator[None]:
    """An inline executor without a model (the one at start was refused) is a 503."""
    try:
        yield
    except NoModelLoaded as exc:
        raise ServiceUnavailable(str(exc)) from None


def _ref(info: dict[str, Any]) -> schemas.ModelRef:
    """The model reference in an executor's ``describe()``."""
    return schemas.ModelRef(name=SPEC.name, version=info["version"], alias=info["alias"])


@bentoml.service(
    name="clinml",
    resources={"cpu": "1"},
    traffic={"timeout": 30},
    **framework.service_config(SETTINGS, USECASE),
)
@bentoml.asgi_app(api, path="/")
class ClinicalService:
    """Predicts the spec's positive class for records of features or for patients."""

    # Resolved lazily on first access; `bentoml build` packs the model it points at.
    bento_model = model_tag()
    if SETTINGS.execution == "split":
        # With a URL, `bentoml serve` starts no executor and the calls go over HTTP to
        # one run on its own (a GPU Deployment: docs/deployment.md).
        executor = bentoml.depends(ModelExecutor, url=SETTINGS.executor_url)

    def __init__(self) -> None:
        from clinml.audit import Checkpoints
        from clinml.serving.requestlog import PredictionLog, RequestAudit

        self.settings = SETTINGS
        if KEYS is not None:
            KEYS.get()  # read the keys file now: a broken one stops the worker at start
        else:
            log.warning(
                "API-key authentication is OFF (CLINML_AUTH=false): never do this in production"
            )
        self.readiness = ReadinessLog()
        self.metrics = Metrics.get()
        self.model: schemas.ModelRef | None = None  # the last version seen to answer
        self._bound: dict[str, Any] = {}
        self._explaining: asyncio.Semaphore | None = None  # see explain()
        self.coalescer: Coalescer[ColumnScores] | None = None
        if SETTINGS.execution == "inline":
            self.executor = ModelExecutor()
            info = self.executor.describe()
            if info.get("loaded"):  # else not ready, and describe() says why
                self.seen(_ref(info))
            if SETTINGS.batching:  # concurrent requests share one model call
                self.coalescer = Coalescer(
                    self._local("score_columns"), SETTINGS.max_batch_size, join=Batch.join
                )
        paths = SETTINGS.paths.usecase(SPEC.name)
        checkpoints = Checkpoints.from_settings(SETTINGS)  # None without CLINML_AUDIT_KEY
        if checkpoints is None:
            log.warning(
                "CLINML_AUDIT_KEY is not set: the request audit trail is not checkpointed, "
                "so a cut-off tail or a deleted trail cannot be detected (docs/security.md, T9)"
            )
        self.audit = RequestAudit(
            SETTINGS.paths.request_audit_log,
            checkpoints=checkpoints,
            checkpoint_interval_s=SETTINGS.audit_checkpoint_interval_s,
        )
        self.predictions = PredictionLog(paths.predictions, on_drop=self.metrics.log_dropped.inc)
        self.shadow: ShadowScorer | None = None
        if SETTINGS.execution == "inline":
            executor = self.executor
            self.shadow = ShadowScorer(
                executor.score_shadow,
                self.log_shadow,
                max_queue=SETTINGS.shadow_queue,
                active=lambda: executor.shadow is not None,
                on_scored=self.metrics.shadow_scored.inc,
                on_dropped=self.metrics.shadow_dropped.inc,
                on_error=self.metrics.shadow_errors.inc,
            )
        else:
            log.info(
                "shadow deployment (clinml shadow) runs with CLINML_EXECUTION=inline only: "
                "with split execution a shadow alias is not followed"
            )
        self.canary_router: CanaryRouter | None = None
        self.canary_guard: CanaryGuard | None = None
        if SETTINGS.execution == "inline":
            self.canary_router = CanaryRouter(SETTINGS.pseudonym_key.get_secret_value())
            self.canary_guard = CanaryGuard(Band.from_settings(SETTINGS))
        else:
            log.info(
                "canary release (clinml canary) runs with CLINML_EXECUTION=inline only: "
                "with split execution a canary alias is not followed"
            )
        self.pseudonymiser = SETTINGS.pseudonymiser()
        self._store_lock = threading.Lock()
        self._reader: Any = None
        self._store_down: tuple[float, str] | None = None  # (retry after, reason)
        self.lookups: Coalescer[Any] | None = None
        if SETTINGS.batching:  # /predict_patient: one store read for requests together
            self.lookups = Coalescer(self.read_online, SETTINGS.max_batch_size)
        refusals.RECORDER.sink = self.audit_refusals
        refusals.RECORDER.count = _count_refusal
        # Everything loaded so far (the frameworks, the model) lives as long as the
        # process: keep it out of the garbage collector's full passes, which otherwise
        # walk it all and stall every request in flight (the p99 tail, docs/benchmarks.md).
        gc.freeze()

    @bentoml.on_shutdown
    def close_logs(self) -> None:
        """Write what the request audit trail and the prediction log still hold before
        the worker exits (SIGTERM from Kubernetes, Ctrl-C on ``clinml serve``). Only a
        SIGKILL loses the records of the last few milliseconds (docs/security.md)."""
        refusals.RECORDER.flush()
        self.audit.close()
        if self.shadow is not None:  # its rows go to the prediction log, closed next
            self.shadow.close()
        self.predictions.close()

    def audit_refusals(self, endpoint: str, status: int, key_id: str | None, count: int) -> None:
        """One audit record for ``count`` refusals of one kind (clinml.serving.refusals)."""
        self.audit.submit(
            {
                "request_id": uuid.uuid4().hex,
                "key_id": key_id,
                "endpoint": endpoint,
                "model_version": self.current_version(),
                "patient": None,
                "outcome": status,
                "latency_ms": 0.0,
                "count": count,
            }
        )

    # -- readiness -------------------------------------------------------------------

    def __is_ready__(self) -> bool:
        # each change is logged once, not at every probe (serving/readiness.py)
        return self.readiness.report(self.not_ready_reason())

    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` answers 503 (one line, no values), or None when ready."""
        if KEYS is not None:  # no key: every call would be a 401
            no_keys = KEYS.not_ready_reason()
            if no_keys is not None:
                return no_keys
        if not self.audit.healthy:
            return (
                f"the request audit trail cannot be written ({SETTINGS.paths.request_audit_log}"
                " or its directory: check the disk and permissions)"
            )
        self.metrics.export_audit_head(self.audit.head)
        try:
            info = self.describe()
        except ExecutionUnavailable as exc:
            return f"the model-execution service does not answer ({exc})"
        if not info.get("loaded"):
            error = info.get("last_error") or "not loaded yet"
            return f"no model loaded ({error})"
        self.seen(_ref(info))
        if SETTINGS.require_online_store:
            try:
                self._online_reader().ping()
            except Exception as exc:  # any failure to read the store means not ready
                self._store_failed(exc)
                return (
                    f"the online feature store cannot be read ({type(exc).__name__}): run "
                    f"`clinml materialize {SPEC.name}` with the same CLINML_HOME (or "
                    "CLINML_FEATURE_STORE_YAML), or set CLINML_REQUIRE_ONLINE_STORE=false "
                    "to serve /predict without it"
                )
            self._store_down = None  # back: stop answering 503 without trying
        return None

    def read_online(self, ids: list[str]) -> list[Any]:
        """The online store's rows for pseudonymised ids (``OnlineReader.read``).

        Reads run on the event loop (they take microseconds), so a store that fails (a
        lock held past the reader's busy timeout, a missing file) must not be tried by
        every request: after a failure, reads answer 503 at once for ``STORE_RETRY_S``,
        then the next request tries again. ``/readyz`` clears this as soon as the store
        answers."""
        down = self._store_down
        if down is not None and time.monotonic() < down[0]:
            raise ServiceUnavailable(f"online feature store unavailable: {down[1]}")
        try:
            return self._online_reader().read(ids)
        except Exception as exc:
            self._store_failed(exc)
            raise

    def _store_failed(self, exc: Exception) -> None:
        """Forget the reader (it is reopened once the store is back) and hold off."""
        self._store_down = (time.monotonic() + STORE_RETRY_S, type(exc).__name__)
        with self._store_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _online_reader(self) -> Any:
        """The online store's reader (direct SQLite, or Feast's Redis), opened on first use."""
        with self._store_lock:
            if self._reader is None:
                from clinml.features.online_feast import online_reader
                from clinml.features.store import open_store

                paths = SETTINGS.paths.usecase(SPEC.name)
                store = open_store(SPEC, paths, SETTINGS.feast_environment)
                self._reader = online_reader(store, SPEC)
            return self._reader

    # -- the model-execution service ---------------------------------------------------

    def _execute(self, method: str, *args: Any) -> Any:
        """Call the executor; a split executor that cannot be reached is a 503."""
        if SETTINGS.execution == "inline":
            with _model_loaded():
                return self._local(method)(*args)
        with _reaching_the_executor():
            return getattr(self.executor, method)(*args)

    def _local(self, method: str) -> Any:
        """The inline executor's method, looked up once: BentoML builds a new wrapper
        (with ``inspect.signature``) on every attribute access."""
        bound = self._bound.get(method)
        if bound is None:
            bound = self._bound[method] = getattr(self.executor, method)
        return bound

    async def _execute_async(self, method: str, *args: Any) -> Any:
        """``_execute`` for the endpoints, which run on the event loop: inline, the model
        runs right here (no hop to a worker thread); split, the executor is awaited."""
        if SETTINGS.execution == "inline":
            with _model_loaded():
                return self._local(method)(*args)
        with _reaching_the_executor():
            return await getattr(self.executor.to_async, method)(*args)

    async def score(self, batch: Batch, patients: list[str] | None = None) -> Answer:
        """The batch's predictions, from one model version: the canary's when the
        request is routed to it (``canary_answer``); otherwise the champion's, inline
        through the coalescer (or straight from the executor without batching), split from
        the executor's ``predict_columns``, which batches concurrent requests.
        ``patients``: the request's pseudonymised patients, its routing key."""
        if self.canary_guard is not None:
            answer = self.canary_answer(batch, patients)
            if answer is not None:
                return answer
        if SETTINGS.execution == "inline":
            with _model_loaded():
                if self.coalescer is not None:
                    scores = await self.coalescer(batch)
                else:
                    scores = self._local("score_columns")(batch)
        else:
            with _reaching_the_executor():
                [plain] = await self.executor.to_async.predict_columns([batch.plain()])
            scores = ColumnScores.from_plain(plain)
        answer = ANSWERING.answer(
            scores.probability, scores.threshold, _model_ref(scores.version, scores.alias)
        )
        self.seen(answer.model)
        if self.canary_guard is not None and self.executor.canary is not None:
            # the champion's alert rate, the canary's yardstick (only while there is one)
            self.canary_guard.champion_answered(_positives(scores), batch.rows)
        return answer

    def canary_route(self, batch: Batch, patients: list[str] | None) -> Any:
        """The canary model when this request is routed to it, else None: a canary is
        loaded beside a loaded champion, not rolled back here, not the champion itself,
        and the request's key falls in its share (the first patient's pseudonym, or the
        records)."""
        canary = self.executor.canary  # (model, percent), taken once
        if canary is None or self.canary_router is None or self.canary_guard is None:
            return None
        model, percent = canary
        if percent <= 0 or self.canary_guard.blocked(model.version):
            return None
        if not self.executor.models.loaded:
            return None  # no champion: the service is not ready, and answers so
        if model.version == self.executor.models.current.version:
            return None  # promoted meanwhile: it answers as the champion
        key = (
            CanaryRouter.patient_key(patients)
            if patients
            else CanaryRouter.records_key(batch.columns)
        )
        return model if self.canary_router.routed(key, percent) else None

    def canary_answer(self, batch: Batch, patients: list[str] | None) -> Answer | None:
        """The canary version's answer to a request routed to it; None when the request is
        not routed to it, or when the canary failed (counted by the guard; the champion
        answers instead, so a canary never causes an error answer)."""
        assert self.canary_guard is not None
        model = self.canary_route(batch, patients)
        if model is None:
            return None
        self.metrics.canary_routed.inc()
        try:
            scores = self._local("score_canary")(model, batch)
        except Exception as exc:  # any failure of the canary: the champion answers
            self.metrics.canary_errors.inc()
            log.warning(
                "canary version %s failed a request (%s); the champion answered it",
                model.version,
                type(exc).__name__,
            )
            self._judged(self.canary_guard.canary_failed(model.version))
            return None
        self._judged(
            self.canary_guard.canary_answered(model.version, _positives(scores), batch.rows)
        )
        return ANSWERING.answer(
            scores.probability, scores.threshold, _model_ref(scores.version, scores.alias)
        )

    def _judged(self, verdict: Verdict | None) -> None:
        """Roll the canary back when the guard's verdict says so: this worker routes
        nothing more to it already (the guard blocks the version); the registry alias is
        removed and the rollback audited off the request path, so the other workers
        follow at their next alias check."""
        if verdict is None:
            return
        self.metrics.canary_rollbacks.inc()
        log.warning(
            "canary version %s rolled back: %s; the champion answers every request",
            verdict.version,
            verdict.reason,
        )
        threading.Thread(
            target=self.roll_back_canary, args=(verdict,), name="canary-rollback", daemon=True
        ).start()

    def roll_back_canary(self, verdict: Verdict) -> bool:
        """Remove the ``canary`` alias and audit it (``governance.canary_rollback``);
        failures are logged (this worker stays off the canary regardless). Returns
        whether this call removed the alias."""
        from clinml.audit import AuditLog, Checkpoints
        from clinml.training.governance import canary_rollback
        from clinml.training.tracking import Tracker

        try:
            removed = canary_rollback(
                SPEC.name,
                Tracker.from_settings(SETTINGS),
                AuditLog(SETTINGS.audit_log_path, checkpoints=Checkpoints.from_settings(SETTINGS)),
                f"{SETTINGS.actor_name} (canary guard)",
                verdict.version,
                verdict.reason,
                verdict.observed,
            )
        except Exception as exc:
            problem = str(exc) if isinstance(exc, ClinmlError) else type(exc).__name__
            log.error(
                "canary version %s: the registry alias could not be removed (%s); this "
                "worker routes nothing to it, others do until it is removed "
                "(`clinml canary stop`)",
                verdict.version,
                problem,
            )
            return False
        if removed:
            self.executor.reload_canary()
        return removed

    async def explain(self, records: list[dict[str, Any]], top_k: int) -> dict[str, Any]:
        """The executor's explanation of ``records`` (``ModelExecutor.explain``).

        Inline, the records are explained ``EXPLAIN_CHUNK`` at a time, going back to the
        event loop between chunks, so the other requests on this worker are answered in
        between instead of after the whole call (issue 19: two clients sending large
        /explain calls raised everyone's p95 a hundredfold). Every chunk must come from
        the same model version; if the champion changed in between, the records are
        explained again in one piece. One such call runs at a time (the others wait
        without holding the loop), so each turn of the loop runs at most one chunk."""
        if SETTINGS.execution != "inline" or len(records) <= EXPLAIN_CHUNK:
            return await self._execute_async("explain", records, top_k)  # type: ignore[no-any-return]
        if self._explaining is None:  # made on the event loop that serves the requests
            self._explaining = asyncio.Semaphore(1)
        async with self._explaining:  # one large explanation at a time, in arrival order
            return await self._explain_in_chunks(records, top_k)

    async def _explain_in_chunks(self, records: list[dict[str, Any]], top_k: int) -> dict[str, Any]:
        parts = []
        for start in range(0, len(records), EXPLAIN_CHUNK):
            if parts:
                await asyncio.sleep(0)  # let the requests waiting on the loop run
            chunk = records[start : start + EXPLAIN_CHUNK]
            part = await self._execute_async("explain", chunk, top_k)
            if part.get("error"):
                return part  # type: ignore[no-any-return]
            parts.append(part)
        if len({scored[1] for part in parts for scored in part["scored"]}) > 1:
            return await self._execute_async("explain", records, top_k)  # type: ignore[no-any-return]
        return {
            "scored": [scored for part in parts for scored in part["scored"]],
            "method": parts[0]["method"],
            "contributions": [row for part in parts for row in part["contributions"]],
        }

    def describe(self) -> dict[str, Any]:
        return self._execute("describe")

    def reload(self) -> dict[str, Any]:
        """Switch the executor to the registry's champion (see ModelExecutor.reload)."""
        result = self._execute("reload")
        if not result["error"]:
            self.seen(schemas.ModelRef(name=SPEC.name, version=result["version"], alias="champion"))
        return result

    def seen(self, model: schemas.ModelRef) -> None:
        """Track the version answering, for /metrics and for audit records of refusals."""
        previous = self.model
        if previous != model:
            self.model = model
            self.metrics.serving(model, previous)

    def current_version(self) -> str | None:
        """The last version seen answering (set at start-up inline, and by readiness
        checks and answers)."""
        return self.model.version if self.model else None

    # -- the work shared by the endpoints ----------------------------------------------

    def log_predictions(
        self,
        request_id: str,
        batch: Batch,
        answer: Answer,
        patients: list[str] | None = None,
        *,
        at: datetime | None = None,
        shadow: bool = False,
    ) -> datetime:
        """The request's rows in the prediction log, handed over as columns: each row
        is a record's features, the time, the request id, the model version, the
        (pseudonymised) patient or None, the probability and the label; a shadow
        version's rows also ``shadow`` True (served rows have no such column: readers
        take its absence as False). Returns the rows' time (``at``, or now)."""
        moment = at or datetime.now(UTC)
        logged: dict[str, Any] = {
            **batch.columns,  # a NaN in a float array is logged as a null, as None is
            "time": moment,
            "request_id": request_id,
            "model_version": answer.model.version,
            "patient": patients if patients else None,
            "probability": answer.probability,
            "label": answer.labels(),
        }
        if shadow:
            logged["shadow"] = True
        self.predictions.record_columns(logged, batch.rows)
        return moment

    def log_shadow(self, request: ShadowRequest, scores: ColumnScores) -> None:
        """A request's rows as the shadow version scored them, beside the champion's:
        the same time, request id and patients; the shadow's version, probabilities and
        labels at its own operating threshold (the shadow worker calls this)."""
        answer = ANSWERING.answer(
            scores.probability, scores.threshold, _model_ref(scores.version, scores.alias)
        )
        self.log_predictions(
            request.request_id,
            request.batch,
            answer,
            request.patients,
            at=request.time,
            shadow=True,
        )


CANARY = "canary"  # the alias a canary version answers under (training.tracking.CANARY)


def _positives(scores: ColumnScores) -> int:
    """Rows labelled positive (at or above the operating threshold, as the answers are)."""
    return int(np.count_nonzero(scores.probability >= scores.threshold))


@functools.lru_cache(maxsize=64)
def _model_ref(version: str, alias: str) -> schemas.ModelRef:
    """The answers' ``model``, made once per model version and alias (pydantic)."""
    return schemas.ModelRef(name=SPEC.name, version=version, alias=alias)


async def _service() -> Any:
    """The running ClinicalService instance (FastAPI dependency; async, so FastAPI does
    not hop to a worker thread to call it)."""
    return bentoml.get_current_service()


CURRENT = Depends(_service)


class _Call:
    """One request's id, timing and audit record."""

    def __init__(self, service: ClinicalService, scope: Scope, endpoint: str):
        if not service.audit.healthy:
            # The audit trail is a compliance control: without it, no predictions.
            raise ServiceUnavailable(f"request audit trail unavailable: {service.audit.error}")
        self.service, self.endpoint = service, endpoint
        self.request_id = uuid.uuid4().hex
        self.key_id = scope.get("state", {}).get("clinml_key_id")
        self.started = time.perf_counter()
        self.version: str | None = None  # set by score(); else the last version seen
        self.patients: list[str] | None = None
        self.closed = False  # its audit record was submitted

    async def score(self, batch: Batch, patients: list[str] | None = None) -> Answer:
        answer = await self.service.score(batch, patients)
        self.version = answer.model.version
        return answer

    def done(self, status: int, labels: Sequence[str] | Mapping[str, int] = ()) -> bool:
        """Time the request and queue its audit record; False when the trail refused the
        record (its queue is full), so that a 200 is not sent unaudited (``audited``)."""
        self.closed = True
        metrics = self.service.metrics
        metrics.observe(self.endpoint, time.perf_counter() - self.started, labels)
        metrics.export_audit_head(self.service.audit.head)
        if status >= 400:
            metrics.errors.labels(self.endpoint, ERROR_KINDS.get(status, str(status))).inc()
        return self.service.audit.submit(
            {
                "request_id": self.request_id,
                "key_id": self.key_id,
                "endpoint": self.endpoint,
                "model_version": self.version or self.service.current_version(),
                # pseudonymised ids only, comma-separated for a multi-patient request
                "patient": ",".join(self.patients) if self.patients else None,
                "outcome": status,
                "latency_ms": round((time.perf_counter() - self.started) * 1000, 3),
            }
        )


class AuditEveryRequest:
    """Audit every admitted request that the hot endpoints (``HOT``) do not audit
    themselves, whatever its outcome: ``GET /model``, ``/model/card``, ``/admin/reload``,
    a 404 for an unknown path, a 405, a 500.

    The innermost middleware: refusals by the ones outside it are audited in aggregate
    (serving/refusals.py), and open paths (probes, docs, metrics) are not audited. Calls
    are closed here with the status that was sent. While the trail is down, 503, as for
    predictions."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in UNAUDITED
            or (scope["method"] == "POST" and path in HOT)  # HotEndpoint audits these
        ):
            await self.app(scope, receive, send)
            return
        service = bentoml.get_current_service()
        try:
            call = _Call(service, scope, routes.endpoint(path, USECASE))
        except ServiceUnavailable as exc:
            await send_json(send, 503, {"detail": str(exc)})
            return
        status = 500  # unless a response starts

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if not call.closed:
                call.done(status)


def audited(call: _Call, labels: Sequence[str] | Mapping[str, int]) -> None:
    """Close a successful call's record; no answer goes out unless it was queued."""
    if not call.done(200, labels):
        raise ServiceUnavailable("request audit trail unavailable: its queue is full")


async def _predicted(
    service: ClinicalService,
    call: _Call,
    batch: Batch,
    patients: list[str] | None = None,
) -> Answer:
    """Predict, close the call's audit record, log the predictions: what every
    prediction endpoint does with a checked batch, whatever shape its answer takes.
    Column by column throughout: no Python work per record."""
    answer = await call.score(batch, patients)
    audited(call, answer.label_counts())
    moment = service.log_predictions(call.request_id, batch, answer, patients)
    # A canary's answer is not shadowed: the shadow is compared with the champion.
    if service.shadow is not None and answer.model.alias != CANARY:
        # never waits: the shadow runs after, on its own thread
        service.shadow.offer(ShadowRequest(batch, call.request_id, patients, moment))
    return answer


async def _respond(
    service: ClinicalService,
    call: _Call,
    batch: Batch,
    patients: list[str] | None = None,
) -> tuple[int, Encoded]:
    """Predict, log the predictions, close the call's audit record; the answer is a
    ``schemas.PredictResponse``, encoded."""
    answer = await _predicted(service, call, batch, patients)
    return 200, Encoded(ANSWERING.body(call.request_id, answer))


# -- the prediction endpoints, straight from ASGI --------------------------------------
#
# FastAPI's request machinery (JSON parsing in Python, then validation, dependency
# injection, response-model validation and encoding) cost more per request than the
# model itself (docs/benchmarks.md, "What changed for issue 7"). These two endpoints
# take the body as bytes, validate it in one pass of pydantic's Rust JSON parser, and
# encode the answer once. Their contract is the same schemas, documented by serving.openapi.


async def predict(service: ClinicalService, call: _Call, body: bytes) -> tuple[int, Any]:
    """Probability, label at the model's operating threshold, and risk band per record,
    in request order.

    A valid body is parsed once and checked column by column (``columns.predict_batch``);
    any other body is validated by the record schema, which refuses it with the errors
    it always gave (or, for the rare valid body the column check is too strict for,
    accepts it)."""
    batch = columns.predict_batch(SPEC, body, SETTINGS.max_records_per_request)
    if batch is None:
        request = PredictDicts.model_validate_json(body)
        batch = Batch.of_records(SPEC, request.records)  # type: ignore[attr-defined]
    return await _respond(service, call, batch)


async def predict_patient(service: ClinicalService, call: _Call, body: bytes) -> tuple[int, Any]:
    """Features of the model's feature service are read from the Feast online store for
    each patient (ids are pseudonymised first). Nothing is ever imputed: a missing or
    stale feature answers 422 naming the patient's position and the feature, and patients
    the store does not know at all answer 404 naming their positions."""
    from clinml.features.store import online_lookup

    request = PatientRequest.model_validate_json(body)
    ids = service.pseudonymiser.many(request.patient_ids)  # type: ignore[attr-defined]
    call.patients = ids
    as_of = request.as_of or datetime.now(UTC)  # type: ignore[attr-defined]
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    try:
        if service.lookups is not None:  # concurrent requests share one read
            rows = await service.lookups(ids)
        else:
            rows = service.read_online(ids)
        lookup = online_lookup(None, SPEC, ids, as_of, rows=rows)  # type: ignore[arg-type]
    except ServiceUnavailable:
        raise
    except Exception as exc:  # any store failure is a 503 with a reason
        raise ServiceUnavailable(
            f"online feature store unavailable: {type(exc).__name__}"
        ) from None
    problems: list[dict[str, Any]] = []
    for i, (row, found) in enumerate(zip(rows, lookup.problems, strict=True)):
        if not row:
            problems.append({"loc": ["patient_ids", i], "msg": UNKNOWN, "type": "not_found"})
            continue
        problems += [
            {"loc": ["patient_ids", i, f], "msg": f"feature {f} is {kind}", "type": kind}
            for f, kind in found.items()
        ]
    if problems:
        unknown_only = all(p["type"] == "not_found" for p in problems)
        return 404 if unknown_only else 422, {"detail": problems}
    return await _respond(service, call, Batch.of_records(SPEC, lookup.records), ids)


UNKNOWN = "no features in the online store for this patient"


async def explain(service: ClinicalService, call: _Call, body: bytes) -> tuple[int, Any]:
    """Each record's top-k input features by absolute contribution. Trees: path
    attribution (Saabas); SVM and MLP: gradient x input in the standardised space. The
    response's ``method`` says which, and on what scale. At most
    ``CLINML_MAX_EXPLAIN_RECORDS`` records per call (a 422 above it, from the schema)."""
    request = ExplainDicts.model_validate_json(body)
    records, top_k = request.records, request.top_k  # type: ignore[attr-defined]
    result = await service.explain(records, top_k)
    if result.get("error"):
        raise ServiceUnavailable(result["error"])
    scored: Sequence[Scored] = result["scored"]  # one model version: (p, version, alias, t)
    _, version, alias, threshold = scored[0]
    answer = ANSWERING.answer([s[0] for s in scored], threshold, _model_ref(version, alias))
    service.seen(answer.model)
    call.version = version
    audited(call, answer.label_counts())
    predictions = answer.predictions()
    model = answer.model
    return 200, {
        "request_id": call.request_id,
        "model": {"name": model.name, "version": model.version, "alias": model.alias},
        "method": result["method"],
        "explanations": [
            {
                **p,
                "contributions": [{"feature": f, "contribution": float(c)} for f, c in row],
            }
            for p, row in zip(predictions, result["contributions"], strict=True)
        ],
    }


async def infer(service: ClinicalService, call: _Call, body: bytes) -> tuple[int, Any]:
    """The Open Inference Protocol (KServe V2): one tensor per feature (shape [n] or
    [n, 1]; FP64, FP32, INT64 or INT32 for a number, also BOOL for an int feature,
    BYTES for a category) or, when every feature is numeric, one FP64 tensor of shape
    [n, k] in the order `GET /v2/models/{model}` lists the inputs. The same checks and
    predictions as /predict: outputs `probability` (FP64), `label` and `risk_band`
    (BYTES), one per row. A bad tensor is a 400 `{"error": ...}` that names the feature
    and row, never the value."""
    try:
        request = protocol.parse(body)
        batch = protocol.batch(SPEC, request, SETTINGS.max_records_per_request)
        outputs = protocol.requested(request)
    except protocol.ProtocolError as exc:
        return 400, {"error": str(exc)}
    answer = await _predicted(service, call, batch)
    # The request's own id is echoed in the answer, as the protocol requires; it is
    # neither logged nor audited (the audit record has the service's request id).
    answer_id = request.id or call.request_id
    data = {
        "probability": answer.probability.tolist,
        "label": answer.labels,
        "risk_band": answer.bands,
    }
    return 200, protocol.response_columns(
        SPEC, answer.model.version, answer_id, {name: data[name]() for name in outputs}
    )


# path -> (handler, request model, summary, response model)
HOT = {
    "/predict": (
        predict,
        PredictRequest,
        "Predict for records of features",
        schemas.PredictResponse,
    ),
    "/predict_patient": (
        predict_patient,
        PatientRequest,
        "Predict for patients, with features from the online store",
        schemas.PredictResponse,
    ),
    "/explain": (
        explain,
        ExplainRequest,
        "Top feature contributions per record",
        schemas.ExplainResponse,
    ),
    V2_INFER: (
        infer,
        protocol.InferRequest,
        "Open Inference Protocol (KServe V2): predict for tensors",
        protocol.InferResponse,
    ),
}
# Hot endpoints whose errors take another shape than {"detail": ...}: path -> its model.
ERROR_MODELS = {V2_INFER: protocol.ProtocolErrorResponse}


def invalid_body(exc: ValidationError) -> list[dict[str, Any]]:
    """A validation error as FastAPI reports one (``loc`` starts with ``"body"``), without
    the submitted values."""
    return [
        {
            "loc": schemas.error_location(["body", *e.get("loc", ())], SCHEMAS.names),
            "msg": e.get("msg", ""),
            "type": e.get("type", ""),
        }
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


class HotEndpoint:
    """One prediction endpoint as a plain ASGI app, called by ``ClinicalAPI`` ahead of
    FastAPI's middleware: no Request object, no dependency injection, one JSON encoding
    of the answer."""

    def __init__(self, endpoint: str, handler: Any):
        self.endpoint, self.handler = endpoint, handler
        self.error_path = endpoint  # its errors' shape (_error_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ACTIVITY.started()  # the prediction log writes between requests (requestlog)
        try:
            await self._answer(scope, receive, send)
        finally:
            ACTIVITY.finished()

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = bentoml.get_current_service()
        try:
            call = _Call(service, scope, self.endpoint)
        except ServiceUnavailable as exc:
            await send_json(send, 503, _error_body(self.error_path, str(exc)))
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                call.done(499)  # the client left before sending its body: nobody to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            status, payload = await self.handler(service, call, b"".join(chunks))
        except ValidationError as exc:
            status, payload = 422, {"detail": invalid_body(exc)}
        except ServiceUnavailable as exc:
            status, payload = 503, _error_body(self.error_path, str(exc))
        except BaseException:
            call.done(500)
            raise
        if status != 200:
            call.done(status)
        if isinstance(payload, Encoded):
            await _send_encoded(send, status, payload)
        else:
            await send_json(send, status, payload)


async def _send_encoded(send: Send, status: int, body: bytes) -> None:
    """``send_json`` for a body that is JSON already."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": bytes(body), "more_body": False})


# Answered by ClinicalAPI directly; also first in the router, so they are matched (and a
# GET gets its 405) before any other route.
for _path, (_handler, *_) in HOT.items():
    api.hot[_path] = HotEndpoint(_path, _handler)
    api.router.routes.insert(0, Route(_path, api.hot[_path], methods=["POST"]))


@api.get("/model", responses=openapi.ERRORS, summary="The model version being served")
def model_info(self: Any = CURRENT) -> dict[str, Any]:
    """Name, version, alias, training time, held-out metrics with 95% CIs, operating
    threshold, feature service, execution path and a link to the model card."""
    info = self.describe()
    if not info.pop("loaded", False):
        raise ServiceUnavailable("no model loaded")
    return {**info, "execution_service": SETTINGS.execution}


@api.get("/model/card", response_class=HTMLResponse, responses=openapi.ERRORS, summary="Model card")
def model_card(self: Any = CURRENT) -> HTMLResponse:
    """The served version's model card as a self-contained HTML page."""
    html = self._execute("card")
    if not html:
        raise StarletteHTTPException(404, "this model version has no model card")
    return HTMLResponse(html, headers=CARD_HEADERS)


# The card is a static page: whatever is in it (an edited store, a crafted metric name),
# no script runs, nothing is fetched, and it cannot be framed or sniffed as another type.
CARD_HEADERS = {
    "content-security-policy": CARD_CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@api.post("/admin/reload", responses=openapi.ERRORS, summary="Switch to the registry's champion")
def admin_reload(self: Any = CURRENT) -> dict[str, Any]:
    """Load the current ``champion`` from the registry and serve it from the next request
    on; requests in flight finish on the old version. A model that fails to load (for
    example, its file's hash differs from the one recorded at registration) is refused
    and the old one keeps serving."""
    result = self.reload()
    if result["error"]:
        raise ServiceUnavailable(
            f"reload refused, still serving the current model: {result['error']}"
        )
    old, new = result["previous_version"], result["version"]
    return {"previous_version": old, "version": new, "changed": old != new}


# -- the Open Inference Protocol's other paths (POST .../infer is in HOT) ---------------


@api.get(
    V2_MODEL, responses=openapi.PROTOCOL_ERRORS, summary="Open Inference Protocol: model metadata"
)
def v2_model_metadata(self: Any = CURRENT) -> dict[str, Any]:
    """The model's name, versions (the one served), platform, its inputs (one per
    feature, in the order a single [n, k] tensor takes them) and outputs."""
    return protocol.metadata(SPEC, self.current_version())


@api.get(
    f"{V2_MODEL}/ready",
    responses=openapi.PROTOCOL_ERRORS,
    summary="Open Inference Protocol: model ready",
)
def v2_model_ready(self: Any = CURRENT) -> dict[str, Any]:
    """200 when the model is loaded; 503 otherwise."""
    if not self.describe().get("loaded"):
        raise ServiceUnavailable("model not ready: no model loaded")
    return {"name": USECASE, "ready": True}


@api.api_route(routes.V2_MODELS + "{other:path}", methods=["GET", "POST"], include_in_schema=False)
def v2_no_such_model(other: str) -> None:
    """Any other path under /v2/models/ (another model, a version path): a 404 in the
    protocol's shape that names the served model only. Registered after the served
    model's routes, so it never shadows them; the served model's paths with another
    method are still a 405."""
    allowed = _V2_METHODS.get(routes.V2_MODELS + other)
    if allowed is not None:
        raise StarletteHTTPException(405, headers={"Allow": ", ".join(allowed)})
    raise StarletteHTTPException(404)


_V2_METHODS = {
    r.path: r.methods for r in routes.protocol_routes(USECASE) if r.path.startswith(V2_MODEL)
}


# Open, as /livez and /readyz are, and out of the OpenAPI document as they are (the route
# table documents only BentoML's open paths): docs/serving.md describes them.
@api.get(routes.V2, include_in_schema=False)
def v2_server_metadata() -> dict[str, Any]:
    from clinml import __version__

    return protocol.server_metadata(__version__)


@api.get(f"{routes.V2}/health/live", include_in_schema=False)
def v2_live() -> dict[str, Any]:
    return {"live": True}


@api.get(f"{routes.V2}/health/ready", include_in_schema=False)
def v2_ready(self: Any = CURRENT) -> dict[str, Any]:
    """What /readyz says, in the protocol's words (no reason: the path is open)."""
    if not self.__is_ready__():
        raise ServiceUnavailable("not ready")
    return {"ready": True}


openapi.install(api, HOT, SETTINGS.protect_metrics, ERROR_MODELS)


def _install_middleware() -> KeysOnFirstUse | None:
    """The first added is the outermost. Keys are checked first, from the headers alone,
    so a caller without one holds nothing; then load shedding, which counts only
    admitted work (per key too); then the body's media type (415), size (413) and
    arrival time (408). Every refusal is reported to serving.refusals.

    Returns the API keys (None with auth off), read when first needed, which follow
    changes to the keys file."""
    from clinml.serving.auth import AuthMiddleware, BodyLimitMiddleware, JsonOnlyMiddleware
    from clinml.serving.docs_page import DocsPage
    from clinml.serving.overload import ShedMiddleware

    # clinml's own API docs page and its local Swagger UI files, never BentoML's page
    # (which loads a third-party script); open, and answered without reading a body.
    ClinicalService.add_asgi_middleware(DocsPage)
    if SETTINGS.auth:
        api_keys = SETTINGS.api_keys.get_secret_value() if SETTINGS.api_keys else None
        keystore = KeysOnFirstUse(SETTINGS.api_keys_path, api_keys)
        ClinicalService.add_asgi_middleware(
            AuthMiddleware,
            keystore=keystore,
            rules=routes.rules(SETTINGS.protect_metrics, USECASE),
            protect_metrics=SETTINGS.protect_metrics,
            usecase=USECASE,
        )
    else:
        keystore = None  # ClinicalService.__init__ warns
    if SETTINGS.max_in_flight:
        ClinicalService.add_asgi_middleware(
            ShedMiddleware,
            max_in_flight=SETTINGS.max_in_flight,
            max_per_key=SETTINGS.max_in_flight_per_key,
            open_paths=routes.unshed(SETTINGS.protect_metrics, USECASE),
        )
    ClinicalService.add_asgi_middleware(JsonOnlyMiddleware)
    ClinicalService.add_asgi_middleware(
        BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes, timeout_s=SETTINGS.body_timeout_s
    )
    ClinicalService.add_asgi_middleware(AuditEveryRequest)
    return keystore


def _count_refusal(endpoint: str, status: int) -> None:
    if Metrics._made is not None:  # created with the service instance
        Metrics._made.errors.labels(endpoint, ERROR_KINDS.get(status, str(status))).inc()


# The API keys (None with CLINML_AUTH=false); without one the service is not ready.
KEYS = _install_middleware()
