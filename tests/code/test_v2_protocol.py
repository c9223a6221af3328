"""The Open Inference Protocol's translation (serving/protocol.py) and the column-wise
checks it stands on (serving/columns.py): both input styles give /predict's records, and
every bad tensor is refused with a message that names the feature and row, never the value.

The HTTP side (auth, audit, the same answers as /predict, a real tritonclient) is in
tests/integration/test_v2_protocol.py."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from clinml.serving import columns, protocol, routes
from clinml.serving.schemas import build
from clinml.spec import UseCaseSpec

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


def parsed(spec: UseCaseSpec, body: Any, max_rows: int = 10) -> list[dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return protocol.records(spec, protocol.parse(raw), max_rows)


def refused(spec: UseCaseSpec, body: Any, max_rows: int = 10) -> str:
    with pytest.raises(protocol.ProtocolError) as caught:
        parsed(spec, body, max_rows)
    return str(caught.value)


def test_one_tensor_per_feature_gives_the_records_predict_takes(tiny_spec) -> None:
    assert parsed(tiny_spec, named(GOOD)) == GOOD
    # [n, 1] shapes, nested data and FP32/INT tensors are the same rows
    body = named(
        GOOD,
        heart_rate={"shape": [2, 1], "datatype": "INT64", "data": [[88], [61]]},
        creatinine={"datatype": "FP32"},
    )
    assert parsed(tiny_spec, body) == [{**GOOD[0], "heart_rate": 88}, GOOD[1]]
    # the records validate against /predict's own schema
    adapter = TypeAdapter(build(tiny_spec, max_records=3).records)
    adapter.validate_python(parsed(tiny_spec, named(GOOD)))


def test_a_single_tensor_of_all_features_gives_the_same_records(pathology_spec) -> None:
    k = len(pathology_spec.features)
    lows, highs = [c.min for c in pathology_spec.features], [c.max for c in pathology_spec.features]
    rows = [[(lo + hi) / 2 for lo, hi in zip(lows, highs, strict=True)], [hi / 3 for hi in highs]]
    body = {"inputs": [{"name": "input", "shape": [2, k], "datatype": "FP64", "data": rows}]}
    records = parsed(pathology_spec, body)
    assert records == [dict(zip(pathology_spec.feature_names, row, strict=True)) for row in rows]
    flat = {**body["inputs"][0], "data": [v for row in rows for v in row]}
    assert parsed(pathology_spec, {"inputs": [flat]}) == records


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
    predictions = [
        {"probability": 0.9, "label": "yes", "risk_band": "high"},
        {"probability": 0.1, "label": "no", "risk_band": "low"},
    ]
    answer = protocol.response(tiny_spec, "3", "req-1", predictions)
    protocol.InferResponse.model_validate(answer)
    assert [o["name"] for o in answer["outputs"]] == ["probability", "label", "risk_band"]
    assert answer["outputs"][0] == {
        "name": "probability",
        "datatype": "FP64",
        "shape": [2],
        "data": [0.9, 0.1],
    }
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
    assert parsed(tiny_spec, body)[0]["heart_rate"] == 88.0
