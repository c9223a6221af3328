"""The floor of the serving benchmark: a plain Starlette app under uvicorn.

``POST /predict`` reads the request body and answers a constant prediction; nothing is
parsed, validated or scored, so its throughput is what one uvicorn worker on one core
can do with HTTP alone. ``bench/servers/trivial_bento.py`` mounts the same app on a
BentoML service. Started by ``bench/serving_bench.py`` from the project root::

    python -m uvicorn bench.servers.starlette_echo:app --workers 1 --port 8000
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# The shape of clinml's answer to a one-record /predict, so the bytes sent back are alike.
ANSWER = (
    b'{"request_id":"00000000000000000000000000000000",'
    b'"model":{"name":"bench","version":"1","alias":"champion"},'
    b'"operating_threshold":0.5,'
    b'"predictions":[{"probability":0.5,"label":"no","risk_band":"elevated"}]}'
)


async def predict(request: Request) -> Response:
    await request.body()  # received in full, like a real endpoint, then ignored
    return Response(ANSWER, media_type="application/json")


async def ready(_: Request) -> Response:
    return Response(b"ok", media_type="text/plain")


app = Starlette(
    routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", ready, methods=["GET"])]
)
