"""Hostile input: each request gets a 4xx that names no submitted value, the memory it
costs is bounded by its size, and the service keeps answering valid requests after.

Sent to the service's ASGI app in process, so ``tracemalloc`` sees every allocation the
request causes (the client's and the app's). How long each takes against a real
``bentoml serve`` is in docs/security.md (``bench/reliability_bench.py --only hostile``).
"""

from __future__ import annotations

import json
import tracemalloc

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CANARY = "Zq7-hostile-canary"  # sent in values and names; must never come back
MB = 1 << 20


def _record(records: pd.DataFrame) -> dict:
    return records.head(1).to_dict("records")[0]


def _with(record: dict, field: str, raw: str) -> bytes:
    """A /predict body whose ``field`` is the raw JSON text ``raw`` (NaN is not JSON, so
    json.dumps cannot be trusted to write it)."""
    body = json.dumps({"records": [{**record, field: "@@"}]})
    return body.replace('"@@"', raw).encode()


def hostile_bodies(record: dict) -> dict[str, tuple[str, bytes]]:
    """name -> (endpoint, body), all declared application/json."""
    first = next(iter(record))
    bodies = {
        f"{first} is {raw}": ("/predict", _with(record, first, raw))
        for raw in ("NaN", "Infinity", "-Infinity", "1e400", "-1e308", "1e308")
    }
    bodies |= {
        f"{first} is {kind}": ("/predict", _with(record, first, raw))
        for kind, raw in {
            "a string": json.dumps(CANARY),
            "a numeric string": '"12.5"',
            "true": "true",
            "null": "null",
            "a list": "[1, 2]",
            "an object": '{"value": 1}',
        }.items()
    }
    missing = {k: v for k, v in record.items() if k != first}
    bodies["a missing field"] = ("/predict", json.dumps({"records": [missing]}).encode())
    extra = {**record, CANARY: 1}
    bodies["an extra field"] = ("/predict", json.dumps({"records": [extra]}).encode())
    bodies["no records key"] = ("/predict", json.dumps({"rows": [record]}).encode())
    bodies["records not a list"] = ("/predict", json.dumps({"records": record}).encode())
    bodies |= {
        f"a field name with {kind}": (
            "/predict",
            json.dumps({"records": [{**record, k: 1}]}).encode(),
        )
        for kind, k in {
            "a NUL": f"{first}\u0000",
            "right-to-left override": f"\u202e{first}",
            "a look-alike letter": first.replace("a", "\u0430", 1),
            "an emoji": f"{first}\U0001f489",
        }.items()
    }
    bodies["a lone surrogate"] = ("/predict", b'{"records": [{"\\ud800": 1}]}')
    bodies["invalid UTF-8"] = ("/predict", b'{"records": [{"\xff\xfe": 1}]}')
    bodies["a byte-order mark"] = (
        "/predict",
        b"\xef\xbb\xbf" + json.dumps({"records": []}).encode(),
    )
    bodies["a pickle declared JSON"] = (
        "/predict",
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    )
    bodies["not JSON at all"] = ("/predict", CANARY.encode())
    bodies["a patient id that is a number"] = ("/predict_patient", b'{"patient_ids": [12345]}')
    bodies["a patient id of 10 000 characters"] = (
        "/predict_patient",
        json.dumps({"patient_ids": [CANARY * 600]}).encode(),
    )
    bodies["an as_of that is not a time"] = (
        "/predict_patient",
        json.dumps({"patient_ids": [CANARY], "as_of": CANARY}).encode(),
    )
    bodies["top_k of a million"] = (
        "/explain",
        json.dumps({"records": [record], "top_k": 10**6}).encode(),
    )
    return bodies


def big_bodies(record: dict, max_body: int) -> dict[str, tuple[str, bytes]]:
    depth = (max_body - 20) // 2  # as deep as the body limit allows
    return {
        "a 10 MB body": ("/predict", b'{"records": [' + b" " * (10 * MB) + b"]}"),
        "100 000 records": ("/predict", json.dumps({"records": [record] * 100_000}).encode()),
        "100 000 empty records": ("/predict", json.dumps({"records": [{}] * 100_000}).encode()),
        "100 000 patient ids": (
            "/predict_patient",
            json.dumps({"patient_ids": [f"p{i}" for i in range(100_000)]}).encode(),
        ),
        "lists nested to the body limit": (
            "/predict",
            b'{"records": ' + b"[" * depth + b"]" * depth + b"}",
        ),
        "objects nested 100 000 deep": (
            "/explain",
            b'{"records": [' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"]}",
        ),
    }


def _post(client, endpoint: str, body: bytes, content_type: str = "application/json"):
    return client.post(endpoint, content=body, headers={"content-type": content_type})


def _refused_cleanly(response) -> None:
    assert 400 <= response.status_code < 500, response.text[:300]
    assert CANARY not in response.text
    assert "Traceback" not in response.text


def test_malformed_values_names_and_encodings_are_4xx(client, records) -> None:
    for name, (endpoint, body) in hostile_bodies(_record(records)).items():
        response = _post(client, endpoint, body)
        _refused_cleanly(response)
        assert response.status_code in (400, 404, 422), name


def test_large_and_deep_bodies_are_4xx_with_bounded_memory(client, records) -> None:
    from clinml.settings import Settings

    max_body = Settings().max_body_bytes
    for name, (endpoint, body) in big_bodies(_record(records), max_body).items():
        tracemalloc.start()
        try:
            response = _post(client, endpoint, body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        _refused_cleanly(response)
        # 413 unread; else 422
        expected = {413} if len(body) > max_body else {422}
        assert response.status_code in expected, (name, response.status_code)
        # what the body costs in memory while it is refused: at most a few copies of
        # it, however many records or levels it has
        assert peak < 4 * min(len(body), max_body) + 8 * MB, (name, peak // MB)


@pytest.mark.parametrize(
    "content_type",
    ["application/python-pickle", "application/x-www-form-urlencoded", "text/plain", "text/csv"],
)
def test_unexpected_content_types_are_415(client, records, content_type) -> None:
    import pickle

    payloads = {
        "application/python-pickle": pickle.dumps({"records": [_record(records)]}),
        "application/x-www-form-urlencoded": f"records={CANARY}".encode(),
        "text/plain": CANARY.encode(),
        "text/csv": f"mean_radius\n{CANARY}\n".encode(),
    }
    for endpoint in ("/predict", "/predict_patient", "/explain"):
        response = _post(client, endpoint, payloads[content_type], content_type)
        _refused_cleanly(response)
        assert response.status_code == 415


def test_the_service_still_answers_after_hostile_input(client, records) -> None:
    for endpoint, body in hostile_bodies(_record(records)).values():
        _post(client, endpoint, body)
    assert client.get("/readyz").status_code == 200
    answer = client.post("/predict", json={"records": records.head(3).to_dict("records")})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
