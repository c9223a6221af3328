"""The service's OpenAPI document (``/docs.json``), from the route table and the schemas.

FastAPI documents its own routes (``GET /model``, ``/model/card``, ``POST /admin/reload``).
The rest is added here:

- the endpoints :class:`clinml.serving.service.HotEndpoint` answers straight from ASGI
  (``/predict``, ``/predict_patient``, ``/explain``), described from the same pydantic
  schemas that validate them, as FastAPI would have;
- the paths BentoML serves itself that the route table documents
  (``clinml.serving.routes.documented``), marked as needing no key unless the table says so;
- error answers as JSON (``ERRORS``) and the two ways to present a key.

Built once, on the first request for the document::

    openapi.install(api, HOT, protect_metrics=settings.protect_metrics)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI

from clinml.serving import routes, schemas

# A hot endpoint's documentation: (handler, request model, summary, response model); the
# handler's docstring is the description, its name the operationId.
HotRoute = tuple[Callable[..., Any], type, str, type]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorResponse, "description": "Missing or invalid API key."},
    403: {"model": schemas.ErrorResponse, "description": "The key lacks the endpoint's role."},
    400: {"model": schemas.ErrorResponse, "description": "The body could not be read."},
    408: {
        "model": schemas.ErrorResponse,
        "description": "The body did not arrive in time (CLINML_BODY_TIMEOUT_S).",
    },
    413: {"model": schemas.ErrorResponse, "description": "Request body too large."},
    415: {"model": schemas.ErrorResponse, "description": "The body is not application/json."},
    429: {
        "model": schemas.ErrorResponse,
        "description": "Over capacity, overall or for this key: retry after 1 s.",
    },
    431: {"model": schemas.ErrorResponse, "description": "Request headers too large."},
    422: {"model": schemas.ErrorResponse, "description": "Invalid input (never echoed)."},
    503: {"model": schemas.ErrorResponse, "description": "Not ready, or the audit trail is down."},
}


def _protocol_errors() -> dict[int | str, dict[str, Any]]:
    """``ERRORS`` for the Open Inference Protocol's paths: what clinml itself answers
    there (400, 404, 503) is ``{"error": "..."}``; the middleware's refusals are as on
    every other path."""
    from clinml.serving.protocol import ProtocolErrorResponse

    shaped = {
        400: "A bad tensor: shape, datatype, name, a missing feature or a value (never echoed).",
        404: "Another model than the one served.",
        503: "Not ready, or the audit trail is down.",
    }
    errors = {status: error for status, error in ERRORS.items() if status != 422}
    for status, description in shaped.items():
        errors[status] = {"model": ProtocolErrorResponse, "description": description}
    return errors


PROTOCOL_ERRORS = _protocol_errors()

# The one hot endpoint that answers 404: patients the online store does not know.
UNKNOWN_PATIENTS_PATH = "/predict_patient"


def install(
    api: FastAPI,
    hot: Mapping[str, HotRoute],
    protect_metrics: bool,
    error_models: Mapping[str, type] | None = None,
) -> None:
    """Make ``api`` serve :func:`build`'s document, built on first use."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = build(api, hot, protect_metrics, error_models)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def build(
    api: FastAPI,
    hot: Mapping[str, HotRoute],
    protect_metrics: bool,
    error_models: Mapping[str, type] | None = None,
) -> dict[str, Any]:
    """The whole document (see the module docstring).

    Args:
        api: the FastAPI app (its title, description and routes).
        hot: path -> how to document the endpoint answered from ASGI.
        protect_metrics: ``CLINML_PROTECT_METRICS``: whether ``/metrics`` needs a key.
        error_models: hot path -> the model of its own 400, 404 and 503 answers, where
            not ``ErrorResponse`` (the Open Inference Protocol's ``{"error": ...}``); such
            a path answers no 422.
    """
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(
        title=api.title, version=api.version, description=api.description, routes=api.routes
    )
    _document_hot_paths(document, hot, error_models or {})
    _errors_are_json(document)
    needs_key = routes.rules(protect_metrics)
    for route in routes.documented():
        document["paths"][route.path] = {
            "get": {
                "summary": route.summary,
                "description": route.description,
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {}}},
                    **(
                        {"503": {"description": "Not ready"}}
                        if route.path == routes.READINESS
                        else {}
                    ),
                },
                # no key needed (for /metrics, unless CLINML_PROTECT_METRICS=true)
                **({} if route.path in needs_key else {"security": []}),
            }
        }
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    document["security"] = [{"bearer": []}, {"apiKey": []}]
    return document


def _errors_are_json(document: dict[str, Any]) -> None:
    """FastAPI documents a route's error answers in the route's own media type; the
    card's are JSON like every other error, not HTML."""
    for item in document["paths"].values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[0] in "45" and "text/html" in content:
                    content["application/json"] = content.pop("text/html")


def _document_hot_paths(
    document: dict[str, Any], hot: Mapping[str, HotRoute], error_models: Mapping[str, type]
) -> None:
    """Describe the endpoints HotEndpoint answers from the same pydantic schemas that
    validate them, as FastAPI would have."""
    from pydantic.json_schema import models_json_schema

    models: list[tuple[Any, Any]] = [(entry[1], "validation") for entry in hot.values()]
    models += [(entry[3], "serialization") for entry in hot.values()]
    models += [(schemas.ErrorResponse, "serialization")]
    models += [(model, "serialization") for model in set(error_models.values())]
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    document.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])

    def content(model: Any, mode: Any) -> dict[str, Any]:
        return {"application/json": {"schema": refs[(model, mode)]}}

    errors = {
        str(status): {
            "description": error["description"],
            "content": content(error["model"], "serialization"),
        }
        for status, error in ERRORS.items()
    }
    unknown = {
        "404": {
            "description": "None of the patients with a problem is known to the online store.",
            "content": content(schemas.ErrorResponse, "serialization"),
        }
    }
    for path, (handler, request_model, summary, response_model) in hot.items():
        own = error_models.get(path)
        path_errors = errors
        if own is not None:
            path_errors = {
                str(status): {
                    "description": error["description"],
                    "content": content(
                        own if error["model"] is not schemas.ErrorResponse else error["model"],
                        "serialization",
                    ),
                }
                for status, error in PROTOCOL_ERRORS.items()
            }
        document["paths"][path] = {
            "post": {
                "summary": summary,
                "description": handler.__doc__,
                "operationId": handler.__name__,
                "requestBody": {
                    "required": True,
                    "content": content(request_model, "validation"),
                },
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        "content": content(response_model, "serialization"),
                    },
                    **path_errors,
                    **(unknown if path == UNKNOWN_PATIENTS_PATH else {}),
                },
            }
        }
