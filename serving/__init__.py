"""Serving stage: the BentoML prediction service and the packaging of its model.

Modules:
    service     the ``@bentoml.service`` class and its endpoints
                (``bentoml serve clinml.serving.service:ClinicalService``)
    schemas     request/response models generated from the spec
    executor    ``ModelExecutor``: the model in the API worker (inline) or its own service
    runtime     the served model: loaded with its hashes checked, swapped without downtime
    fastpath    the fitted pipeline compiled to numpy/torch arithmetic for serving
    coalesce    adaptive batching of concurrent requests on the event loop
    auth        API keys with roles, and the middleware that enforces them
    httpguard   limits on request lines, headers and upgrades before the key is checked
    overload    load shedding: a 429 past a number of requests in flight
    timeouts    BentoML's request timeout without the timer it leaves on every request
    refusals    refused requests counted at once, logged and audited once per window
    requestlog  the audit trail and the prediction log, written off the request path
    redaction   keeps submitted values out of the service's logs
    docs_page   the API docs page (Swagger UI) served from this origin only
    package     import the MLflow champion into the BentoML store; build the bento
    launch      run ``bentoml serve`` for a use case as a child process
"""
