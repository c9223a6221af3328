"""Serving stage: the BentoML prediction service and the packaging of its model.

Modules:
    service     the ``@bentoml.service`` class and its endpoints
                (``bentoml serve clinml.serving.service:ClinicalService``)
    schemas     request/response models generated from the spec
    columns     column-wise checks of feature values against the spec, worded as /predict's
    protocol    the Open Inference Protocol (KServe V2): tensors -> records -> tensors
    routes      the route table: every path's methods, role, audit, shedding and metric
                label; auth, shedding, metrics, refusals and OpenAPI derive from it
    framework   the BentoML adapter: version check and every patch of its internals, in one
                start-up call (``configure``); the only module that touches bentoml._internal
    openapi     the OpenAPI document (``/docs.json``), from the route table and the schemas
    executor    ``ModelExecutor``: the model in the API worker (inline) or its own service
    runtime     the served model: loaded with its hashes checked, swapped without downtime
    fastpath    the fitted pipeline compiled to numpy/torch arithmetic for serving
    coalesce    adaptive batching of concurrent requests on the event loop
    keys        API keys with roles: the key store, hashing, the keys file (``clinml keys``)
    auth        the ASGI middleware that checks keys and caps request bodies
    asgi        the ASGI types and ``send_json``, an answer from plain ASGI messages
    readiness   the readiness log: each change of ``/readyz``'s reason said once
    httpguard   limits on request lines, headers and upgrades before the key is checked
    overload    load shedding: a 429 past a number of requests in flight
    timeouts    BentoML's request timeout without the timer it leaves on every request
    refusals    refused requests counted at once, logged and audited once per window
    requestlog  the audit trail and the prediction log, written off the request path
    shadow      the shadow version scored on answered requests, off the response path
    redaction   keeps submitted values out of the service's logs
    docs_page   the API docs page (Swagger UI) served from this origin only
    package     import the MLflow champion into the BentoML store; build the bento
    launch      run ``bentoml serve`` for a use case as a child process
"""
