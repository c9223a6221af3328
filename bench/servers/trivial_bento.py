"""BentoML's own overhead: the Starlette echo app mounted on a BentoML service.

Configured exactly as clinml's ``serving.service:ClinicalService`` (one CPU, a 30 s
traffic timeout, the ASGI app mounted at ``/``), but the endpoint does no work: ``POST
/predict`` reads the body and answers a constant. clinml's ``/predict`` throughput over
this one's is the share of BentoML's ceiling that clinml keeps. ``/readyz`` is
BentoML's. Started by ``bench/serving_bench.py`` from the project root::

    python -m bentoml serve bench.servers.trivial_bento:Trivial --port 3000
"""

from __future__ import annotations

import bentoml

from bench.servers.starlette_echo import app


@bentoml.service(
    name="trivial",
    resources={"cpu": "1"},
    traffic={"timeout": 30},
    # As clinml's service by default (serving.service._framework_config): no BentoML
    # access-log line, request metrics or OpenTelemetry span for the endpoint.
    logging={"access": {"enabled": False, "skip_paths": ["/predict"]}},
    tracing={"excluded_urls": ["/predict$"]},
)
@bentoml.asgi_app(app, path="/")
class Trivial:
    """Answers every prediction request with the same constant."""
