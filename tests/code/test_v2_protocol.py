"""The Open Inference Protocol's translation (serving/protocol.py) and the column-wise
checks it stands on (serving/columns.py): both input styles give the batch of columns
/predict scores for the same records (and so the same probabilities), and every bad tensor
is refused with a message that names the feature and row, never the value. Then the
protocol's media type at the middleware (serving/auth.py): a body with no ``Content-Type``
is JSON, as tritonclient sends it.

The HTTP side of the real service (auth, audit, the same answers as /predict, a real
tritonclient) is in tests/integration/test_v2_protocol.py."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clinml.serving import columns, protocol, routes
from clinml.serving.auth import BodyLimitMiddleware, JsonOnlyMiddleware
from clinml.serving.schemas import build
from clinml.spec import UseCaseSpec
from tests.conftest import make_tiny_frame

SECRET = 187.25  # a value that must never appear in an error (heart_rate's max is 250)
GOOD = [
    {"heart_rate": 88.0, "creatinine": 1.1, "ward": "icu"},
    {"heart_rate": 61, "creatinine": 0.9, "ward": "medical"},
]


def named(records: list[dict[str, Any]], **override: dict[str, Any]) -> dict[str, Any]:
    """One tensor per feature of tests/fixtures/tiny.yaml, with ``override`` per tensor."""
    datatypes = {"heart_rate": "FP64", "creatinine": "FP64", "ward": "BYTES"}
    inputs = []
    for name, datatype in datatypes.items():
        tensor = {
            "name": name,
            "shape": [len(records)],
            "datatype": datatype,
            "data": [r[name] for r in records],
        }
        inputs.append({**tensor, **override.get(name, {})})
    return {"inputs": inputs}


def parsed(spec: UseCaseSpec, body: Any, max_rows: int = 10) -> columns.Batch:
    """What serving.service.infer scores for ``body``: protocol.parse, then protocol.batch."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return protocol.batch(spec, protocol.parse(raw), max_rows)


def records_of(batch: columns.Batch) -> list[dict[str, Any]]:
    """A batch's rows as the records /predict takes (JSON values), to compare with them."""
    plain = batch.plain()
    assert plain["rows"] == batch.rows
    by_feature = plain["columns"]
    rows = zip(*by_feature.values(), strict=True)
    return [dict(zip(by_feature, row, strict=True)) for row in rows]


def refused(spec: UseCaseSpec, body: Any, max_rows: int = 10) -> str:
    with pytest.raises(protocol.ProtocolError) as caught:
        parsed(spec, body, max_rows)
    return str(caught.value)


def test_one_tensor_per_feature_gives_the_records_predict_takes(tiny_spec) -> None:
    batch = parsed(tiny_spec, named(GOOD))
    assert len(batch) == 2 and list(batch.columns) == tiny_spec.feature_names
    assert records_of(batch) == GOOD
    # the very batch /predict scores for the same records
    predict = columns.predict_batch(tiny_spec, json.dumps({"records": GOOD}).encode(), 10)
    assert predict is not None and batch.plain() == predict.plain()
    # [n, 1] shapes, nested data and FP32/INT tensors are the same rows
    body = named(
        GOOD,
        heart_rate={"shape": [2, 1], "datatype": "INT64", "data": [[88], [61]]},
        creatinine={"datatype": "FP32"},
    )
    assert records_of(parsed(tiny_spec, body)) == [{**GOOD[0], "heart_rate": 88}, GOOD[1]]
    # the rows validate against /predict's own schema
    adapter = TypeAdapter(build(tiny_spec, max_records=3).records)
    adapter.validate_python(records_of(parsed(tiny_spec, named(GOOD))))


def test_a_single_tensor_of_all_features_gives_the_same_records(pathology_spec) -> None:
    k = len(pathology_spec.features)
    lows, highs = [c.min for c in pathology_spec.features], [c.max for c in pathology_spec.features]
    rows = [[(lo + hi) / 2 for lo, hi in zip(lows, highs, strict=True)], [hi / 3 for hi in highs]]
    body = {"inputs": [{"name": "input", "shape": [2, k], "datatype": "FP64", "data": rows}]}
    records = records_of(parsed(pathology_spec, body))
    assert records == [dict(zip(pathology_spec.feature_names, row, strict=True)) for row in rows]
    flat = {**body["inputs"][0], "data": [v for row in rows for v in row]}
    assert records_of(parsed(pathology_spec, {"inputs": [flat]})) == records


def test_a_whole_number_beyond_float64s_exact_range_is_kept_exactly(tiny_spec) -> None:
    """Valid values the whole-column check is stricter about (an int beyond 2**53) still
    make a batch, value for value: the column as sent, not rounded to a float."""
    features = [
        f.model_copy(update={"type": "int", "min": None, "max": None})
        if f.name == "heart_rate"
        else f
        for f in tiny_spec.features
    ]
    spec = tiny_spec.model_copy(update={"features": features})
    big = 2**53 + 1
    body = named(GOOD, heart_rate={"datatype": "INT64", "data": [big, 61]})
    batch = parsed(spec, body)
    assert batch.columns["heart_rate"] == [big, 61]
    assert records_of(batch) == [{**GOOD[0], "heart_rate": big}, GOOD[1]]


def test_a_single_tensor_is_refused_when_a_feature_is_categorical(tiny_spec) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}]}
    message = refused(tiny_spec, body)
    assert "every feature is numeric" in message and "ward" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            named(GOOD, heart_rate={"shape": [2, 2]}),
            "input heart_rate: shape must be [n] or [n, 1]",
        ),
        (named(GOOD, heart_rate={"shape": [3]}), "shape says 3 values, data holds 2"),
        (
            named(GOOD, heart_rate={"datatype": "BYTES", "data": ["88", "61"]}),
            "input heart_rate: datatype must be one of FP64, FP32, INT64, INT32",
        ),
        (named(GOOD, ward={"datatype": "INT64", "data": [1, 2]}), "datatype must be one of BYTES"),
        (
            named(GOOD, heart_rate={"datatype": "INT64", "data": [SECRET, 61]}),
            "input heart_rate: row 0: Input should be a valid integer",
        ),
        (
            named(GOOD, heart_rate={"data": [61, math.nan]}),
            "feature heart_rate, row 1: Input should be a finite number",
        ),
        (
            named(GOOD, heart_rate={"data": [61, 10.0]}),
            "feature heart_rate, row 1: Input should be greater than or equal to 20",
        ),
        (
            named(GOOD, creatinine={"data": [99.5, 1.0]}),
            "feature creatinine, row 0: Input should be less than or equal to 20",
        ),
        (
            named(GOOD, ward={"data": ["icu", "SECRET-WARD"]}),
            "feature ward, row 1: Input should be 'medical', 'surgical' or 'icu'",
        ),
        (
            named(GOOD, heart_rate={"data": [None, 61]}),
            "feature heart_rate, row 0: Input should not be None",
        ),
        (
            named(GOOD, heart_rate={"data": [True, 61]}),
            "input heart_rate: row 0: Input should be a valid number",
        ),
    ],
    ids=[
        "shape",
        "shape-vs-data",
        "datatype",
        "datatype-category",
        "datatype-vs-value",
        "nan",
        "below-min",
        "above-max",
        "category",
        "null",
        "bool",
    ],
)
def test_bad_tensors_name_feature_and_row_never_the_value(tiny_spec, body, expected) -> None:
    message = refused(tiny_spec, body)
    assert expected in message
    for value in ("187.25", "SECRET", "99.5", "10.0", "nan", "NaN"):
        assert value not in message


def test_nan_sent_as_json_token_is_refused_like_predict(tiny_spec) -> None:
    body = json.dumps(named(GOOD, heart_rate={"data": [61, math.nan]})).encode()
    assert b"NaN" in body  # what tritonclient sends for a numpy nan
    assert "row 1: Input should be a finite number" in refused(tiny_spec, body)


def test_an_unknown_input_name_is_refused_by_position(tiny_spec) -> None:
    body = named(GOOD)
    body["inputs"].append({"name": "MRN-1234", "shape": [2], "datatype": "FP64", "data": [1, 2]})
    message = refused(tiny_spec, body)
    assert "input 3 is not named as a feature" in message and "MRN" not in message


def test_a_missing_feature_is_named_and_never_imputed(tiny_spec) -> None:
    body = named(GOOD)
    del body["inputs"][1]
    assert "missing feature(s): creatinine" in refused(tiny_spec, body)


def test_tensors_of_different_lengths_and_too_many_rows(tiny_spec) -> None:
    body = named(GOOD, ward={"shape": [1], "data": ["icu"]})
    assert "same number of rows" in refused(tiny_spec, body)
    assert "at most 1 rows" in refused(tiny_spec, named(GOOD), max_rows=1)


def test_structure_errors_never_echo_the_callers_keys_or_values(tiny_spec) -> None:
    body = {**named(GOOD), "SECRET-KEY": "SECRET-VALUE"}
    message = refused(tiny_spec, body)
    assert "SECRET" not in message and "(unexpected field)" in message
    assert "not valid JSON" in refused(tiny_spec, b"{SECRET")


def test_requested_outputs(tiny_spec) -> None:
    request = protocol.parse(json.dumps({**named(GOOD), "outputs": [{"name": "label"}]}).encode())
    assert protocol.requested(request) == ["label"]
    request = protocol.parse(json.dumps({**named(GOOD), "outputs": [{"name": "SECRET"}]}).encode())
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.requested(request)
    assert "SECRET" not in str(caught.value) and "position 0" in str(caught.value)


def test_response_and_metadata_shapes(tiny_spec) -> None:
    predictions = {  # output -> one value per row, as serving.service.infer hands them
        "probability": [0.9, 0.1],
        "label": ["yes", "no"],
        "risk_band": ["high", "low"],
    }
    answer = protocol.response_columns(tiny_spec, "3", "req-1", predictions)
    protocol.InferResponse.model_validate(answer)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("tiny", "3", "req-1")
    assert [o["name"] for o in answer["outputs"]] == ["probability", "label", "risk_band"]
    assert answer["outputs"][0] == {
        "name": "probability",
        "datatype": "FP64",
        "shape": [2],
        "data": [0.9, 0.1],
    }
    # only the outputs asked for, in the order asked
    request = protocol.parse(
        json.dumps({**named(GOOD), "outputs": [{"name": "risk_band"}, {"name": "label"}]}).encode()
    )
    asked = {name: predictions[name] for name in protocol.requested(request)}
    answer = protocol.response_columns(tiny_spec, "3", "req-1", asked)
    assert answer["outputs"] == [
        {"name": "risk_band", "datatype": "BYTES", "shape": [2], "data": ["high", "low"]},
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["yes", "no"]},
    ]
    meta = protocol.metadata(tiny_spec, "3")
    assert meta["versions"] == ["3"]
    assert [i["name"] for i in meta["inputs"]] == tiny_spec.feature_names
    assert [i["datatype"] for i in meta["inputs"]] == ["FP64", "FP64", "BYTES"]


def test_column_checks_agree_with_predicts_schema(tiny_spec) -> None:
    """The same value refused by both, with the same words."""
    adapter = TypeAdapter(build(tiny_spec, max_records=3).records)
    for change in (
        {"heart_rate": 10.0},
        {"creatinine": 99.0},
        {"ward": "x"},
        {"heart_rate": math.inf},
        {"heart_rate": "x"},
    ):
        record = {**GOOD[0], **change}
        with pytest.raises(ValidationError) as caught:
            adapter.validate_python([record])
        [error] = caught.value.errors()
        cols = {name: [record[name]] for name in tiny_spec.feature_names}
        [problem] = columns.check_columns(tiny_spec, cols, rows=1)
        assert (problem.kind, problem.message) == (error["type"], error["msg"]), change


def test_the_table_holds_the_served_use_cases_protocol_paths() -> None:
    rules = routes.rules(usecase="pathology")
    assert rules["/v2/models/pathology/infer"] == "predict"
    assert routes.role_of("/v2/models/other/infer", rules) == "predict"  # then a 404
    assert routes.role_of("/v2/models/../admin/reload", rules) == "admin"
    assert routes.role_of("/v2/other", rules) == "admin"
    assert "/v2/health/ready" in routes.open_paths(usecase="pathology")
    named_paths = routes.metric_paths("pathology")
    assert "/v2/models/pathology/infer" in named_paths
    assert routes.endpoint("/v2/models/MRN-1/infer", "pathology") == "other"
    assert "/v2/models/pathology/infer" not in routes.metric_paths()  # no use case, no rows


def test_deeply_nested_bodies_are_a_400_not_a_crash(tiny_spec) -> None:
    assert "not valid JSON" in refused(tiny_spec, b"[" * 100_000)
    nested: Any = [88.0]
    for _ in range(500):
        nested = [nested]
    body = named(GOOD[:1], heart_rate={"data": nested})
    assert records_of(parsed(tiny_spec, body))[0]["heart_rate"] == 88.0


# ServedModel's bookkeeping fields, which play no part in a prediction.
MODEL_FIELDS: dict[str, Any] = {
    "name": "tiny",
    "version": "1",
    "alias": "champion",
    "candidate": "logreg",
    "threshold": 0.5,
    "feature_service": "tiny",
    "trained_at": None,
    "metrics": {},
    "run_id": "run",
}


def test_v2_and_predict_give_the_same_probabilities_for_the_same_records(tiny_spec) -> None:
    """The same rows sent to /predict (validated by its own schema, scored as records) and
    as tensors (each numeric datatype; protocol.batch, scored by ServedModel.predict_columns
    as the service scores it) give identical probabilities, through the pipeline and the
    compiled fast path alike."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from clinml.serving.fastpath import compile_model
    from clinml.serving.runtime import ServedModel
    from clinml.training.candidates import make_preprocessor

    frame = make_tiny_frame(n=200, seed=3)
    features = tiny_spec.feature_names
    pipeline = Pipeline(
        [("preprocess", make_preprocessor(tiny_spec)), ("model", LogisticRegression())]
    )
    pipeline.fit(frame[features], (frame["outcome"] == "yes").to_numpy(dtype=int))
    rows = [*GOOD, {"heart_rate": 120.5, "creatinine": 3.25, "ward": "surgical"}]
    whole = [{**r, "heart_rate": round(r["heart_rate"])} for r in rows]  # for an INT tensor
    cases = {  # the rows /predict is sent, and the same rows as tensors
        "FP64": (rows, named(rows)),
        "FP32, [n, 1]": (
            rows,
            named(
                rows,
                heart_rate={"shape": [3, 1], "data": [[r["heart_rate"]] for r in rows]},
                creatinine={"datatype": "FP32"},
            ),
        ),
        "INT64": (whole, named(whole, heart_rate={"datatype": "INT64"})),
    }
    predict_dicts = build(tiny_spec, max_records=10).predict_dicts
    for compiled in (None, compile_model(pipeline, device="cpu")):
        model = ServedModel(**MODEL_FIELDS, features=features, pipeline=pipeline, compiled=compiled)
        for case, (sent, tensors) in cases.items():
            body = json.dumps({"records": sent})
            expected = model.predict_records(predict_dicts.model_validate_json(body).records)
            assert len(set(expected.tolist())) == len(sent)  # rows the model tells apart
            got = model.predict_columns(parsed(tiny_spec, tensors).columns)
            np.testing.assert_array_equal(got, expected, err_msg=f"{case}, compiled={compiled}")


# -- the protocol's media type, at the middleware ---------------------------------------------

INFER = "/v2/models/tiny/infer"


def _stack(spec: UseCaseSpec) -> TestClient:
    """serving/auth.py's body middleware, in the service's order, around stand-ins for the
    infer endpoint (serving.service.infer: protocol.parse and batch, a ProtocolError
    answered 400 {"error"}) and /predict."""

    async def infer(request: Request) -> JSONResponse:
        try:
            batch = protocol.batch(spec, protocol.parse(await request.body()), 10)
        except protocol.ProtocolError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"rows": len(batch)})

    async def predict(request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(
        routes=[Route(INFER, infer, methods=["POST"]), Route("/predict", predict, methods=["POST"])]
    )
    return TestClient(JsonOnlyMiddleware(BodyLimitMiddleware(app, 1 << 20)))


def test_a_v2_body_without_content_type_is_taken_as_json(tiny_spec) -> None:
    """tritonclient.http posts the infer body with no Content-Type at all."""
    body = json.dumps(named(GOOD)).encode()
    with _stack(tiny_spec) as client:
        request = client.build_request("POST", INFER, content=body)
        assert "content-type" not in request.headers
        response = client.send(request)
        assert response.status_code == 200, response.text
        assert response.json() == {"rows": 2}
        declared = client.post(INFER, content=body, headers={"content-type": "application/json"})
        assert declared.status_code == 200
        # /predict and the rest keep refusing an undeclared body
        assert client.post("/predict", content=body).status_code == 415
        # a dot segment does not borrow the protocol's leniency
        assert client.post("/v2/../predict", content=body).status_code == 415


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream", "text/json"],
)
def test_a_v2_body_declared_as_another_type_is_415(tiny_spec, content_type) -> None:
    body = json.dumps(named(GOOD)).encode()
    with _stack(tiny_spec) as client:
        response = client.post(INFER, content=body, headers={"content-type": content_type})
    assert response.status_code == 415
    assert set(response.json()) == {"error"}  # the protocol's error shape
    assert "JSON" in response.json()["error"]


def test_binary_tensor_data_is_a_clear_400(tiny_spec) -> None:
    """What tritonclient sends for set_data_from_numpy(..., binary_data=True), its default:
    the JSON part's length in a header, the tensor's bytes after the JSON, and a
    binary_data_size parameter instead of data."""
    tensors = named(GOOD)
    raw = np.array([88.0, 61.0]).tobytes()
    heart_rate = {k: v for k, v in tensors["inputs"][0].items() if k != "data"}
    heart_rate["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [heart_rate, *tensors["inputs"][1:]]}).encode()
    with _stack(tiny_spec) as client:
        response = client.post(
            INFER,
            content=header + raw,
            headers={"inference-header-content-length": str(len(header))},
        )
        assert response.status_code == 400
        assert set(response.json()) == {"error"}
        assert "binary tensor data" in response.json()["error"]
        assert "binary_data=False" in response.json()["error"]
        # the parameter alone (no header: the body is all JSON) says the same
        response = client.post(INFER, content=header)
        assert response.status_code == 400
        assert "binary tensor data" in response.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs": [1, 2.5, -0, -0.0, 1E2, 123456789012345678901234567890]}',
        b'{"a": 1, "a": 2}',  # the last of a repeated key
        b"[NaN, Infinity, -Infinity, 1e400]",  # json's, not msgspec's
        b'["\\ud800", "\\u00e9"]',  # a lone surrogate: json's
        b"\xef\xbb\xbf[1]",  # a byte-order mark: json's
        "[1]".encode("utf-16"),
        b'[true, false, null, "x"]',
    ],
)
def test_the_body_is_read_as_json_reads_it(body: bytes) -> None:
    """msgspec reads a V2 body first; whatever it reads, it reads as ``json.loads``
    does, and what it does not take is json's to read."""
    got, expected = protocol._document(body), json.loads(body)
    assert repr(got) == repr(expected)  # repr: NaN equals nothing, -0.0 equals 0


@pytest.mark.parametrize(
    "body", [b"[1,]", b"[01]", b"[1] x", b'["a\x01b"]', b"\xff\xfe\xfd", b"[" * 100_000]
)
def test_a_body_neither_reads_is_refused_as_not_json(body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError, match="not valid JSON"):
        protocol._document(body)


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("FP64", [1.5, None, 2, None]),
        ("FP32", [None, None, 0.25, 7]),
        ("INT64", [3, None, -1, 0]),
        ("BYTES", ["icu", None, "medical", "icu"]),
        ("FP64", [None, None, None, None]),
    ],
)
@pytest.mark.parametrize("kind", ["float", "int", "category"])
def test_a_column_with_nulls_is_taken_whole_as_value_by_value(
    tiny_spec, kind: str, datatype: str, data: list[Any]
) -> None:
    """Nulls stay nulls whether a column is converted whole or value by value (the
    column check then says whether the feature may be null)."""
    column = tiny_spec.features[0].model_copy(update={"type": kind})
    whole = protocol._whole(column, datatype, data)
    one_by_one = [protocol._convert(column, datatype, value) for value in data]
    if whole is not None:
        assert whole == one_by_one
        assert not any(isinstance(value, protocol._Bad) for value in one_by_one)
