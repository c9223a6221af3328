"""BentoML's own overhead: the Starlette echo app mounted on a BentoML service.

Configured exactly as clinml's ``clinml.serving.service:ClinicalService`` (one CPU, a 30 s
traffic timeout with the same timeout middleware, the ASGI app mounted at ``/``), but the endpoint does no work: ``POST
/predict`` reads the body and answers a constant. clinml's ``/predict`` throughput over
this one's is the share of BentoML's ceiling that clinml keeps. ``/readyz`` is
BentoML's. Started by ``bench/serving_bench.py`` from the project root::

    python -m bentoml serve bench.servers.trivial_bento:Trivial --port 3000
"""

from __future__ import annotations

import gc

import bentoml

from bench.servers.starlette_echo import app
from clinml.serving import framework

# clinml's service replaces BentoML's request timeout with one that does not leave a
# timer per request behind (serving/timeouts.py), and freezes what start-up loaded out
# of the garbage collector's way (serving/service.py); the ceiling gets the same.
framework.install_timeout_middleware()
gc.freeze()


@bentoml.service(
    name="trivial",
    resources={"cpu": "1"},
    traffic={"timeout": 30},
    # As clinml's service by default (clinml.serving.framework.service_config): no BentoML
    # access-log line, request metrics or OpenTelemetry span for the endpoint.
    logging={"access": {"enabled": False, "skip_paths": ["/predict"]}},
    tracing={"excluded_urls": ["/predict$"]},
)
@bentoml.asgi_app(app, path="/")
class Trivial:
    """Answers every prediction request with the same constant."""
