"""Request schemas generated from a spec: strict types, ranges, no echo of inputs."""

from __future__ import annotations

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from clinml.serving.schemas import build
from clinml.spec import UseCaseSpec

GOOD = {"heart_rate": 88.0, "creatinine": 1.1, "ward": "icu"}


@pytest.fixture(scope="module")
def adapter(tiny_spec: UseCaseSpec) -> TypeAdapter:
    return TypeAdapter(build(tiny_spec, max_records=3).records)


def errors_for(adapter: TypeAdapter, records) -> list[dict]:
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python(records)
    return caught.value.errors()


def test_a_valid_record_passes(adapter: TypeAdapter) -> None:
    [record] = adapter.validate_python([GOOD])
    assert record.model_dump() == GOOD


def test_integers_are_accepted_for_floats(adapter: TypeAdapter) -> None:
    [record] = adapter.validate_python([{**GOOD, "heart_rate": 90}])
    assert record.heart_rate == 90


@pytest.mark.parametrize(
    ("change", "field", "kind"),
    [
        ({"heart_rate": "SECRET"}, "heart_rate", "float_type"),
        ({"heart_rate": True}, "heart_rate", "float_type"),
        ({"heart_rate": math.nan}, "heart_rate", "finite_number"),
        ({"heart_rate": math.inf}, "heart_rate", "finite_number"),
        ({"heart_rate": 10.0}, "heart_rate", "greater_than_equal"),
        ({"creatinine": 99.0}, "creatinine", "less_than_equal"),
        ({"ward": "SECRET"}, "ward", "literal_error"),
        ({"blood_group": "O"}, "blood_group", "extra_forbidden"),
    ],
)
def test_bad_values_name_the_field(adapter: TypeAdapter, change, field, kind) -> None:
    [error] = errors_for(adapter, [{**GOOD, **change}])
    assert error["loc"] == (0, field)
    assert error["type"] == kind


def test_a_missing_feature_is_an_error_not_an_imputation(adapter: TypeAdapter) -> None:
    record = dict(GOOD)
    del record["creatinine"]
    [error] = errors_for(adapter, [record])
    assert (error["loc"], error["type"]) == ((0, "creatinine"), "missing")


def test_batch_size_is_bounded(adapter: TypeAdapter) -> None:
    assert errors_for(adapter, [])[0]["type"] == "too_short"
    assert errors_for(adapter, [GOOD] * 4)[0]["type"] == "too_long"


def test_record_errors_never_contain_the_submitted_value(tiny_spec: UseCaseSpec) -> None:
    record = build(tiny_spec, max_records=3).record
    with pytest.raises(ValidationError) as caught:
        record.model_validate({**GOOD, "heart_rate": "SECRET-1", "ward": "SECRET-2"})
    assert "SECRET" not in str(caught.value)
    assert {e["loc"] for e in caught.value.errors()} == {("heart_rate",), ("ward",)}


def test_logged_validation_errors_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """BentoML logs rejected requests with their traceback; the filter strips the input."""
    import logging

    from clinml.serving import framework, redaction

    framework.install_log_redaction()
    framework.install_log_redaction()  # idempotent
    logger = logging.getLogger(framework.HTTP_APP_LOGGER)
    assert sum(isinstance(f, redaction.RedactValidationErrors) for f in logger.filters) == 1
    try:
        TypeAdapter(list[int]).validate_json(b'{"SECRET-MRN-123"')
    except ValidationError:
        with caplog.at_level(logging.ERROR, logger=framework.HTTP_APP_LOGGER):
            logger.error("Exception on /predict [POST]", exc_info=True)
    [record] = caplog.records
    assert "SECRET" not in caplog.text
    assert record.getMessage() == "rejected request: 1 validation error(s) json_invalid at (body)"


def test_an_unexpected_field_name_never_comes_back(tiny_spec: UseCaseSpec, caplog) -> None:
    """The name of an extra field is text the caller chose: it may be a patient's name."""
    import logging

    from clinml.serving import redaction
    from clinml.serving.schemas import UNEXPECTED, error_location

    schemas = build(tiny_spec, max_records=3)
    body = {"records": [{**GOOD, "Zebulon Canaryfield": 1}], "MRN-0042": 2}
    with pytest.raises(ValidationError) as caught:
        schemas.predict_request.model_validate(body)
    locations = [error_location(e["loc"], schemas.names) for e in caught.value.errors()]
    assert sorted(locations, key=len) == [[UNEXPECTED], ["records", 0, UNEXPECTED]]
    assert error_location(["body", "records", 1, "heart_rate"], schemas.names) == [
        "body", "records", 1, "heart_rate"
    ]  # fmt: skip

    logger = logging.getLogger("clinml-test-redaction")
    logger.addFilter(redaction.RedactValidationErrors(schemas.names))
    with caplog.at_level(logging.ERROR, logger=logger.name):
        try:
            schemas.predict_request.model_validate(body)
        except ValidationError:
            logger.error("Exception on /predict [POST]", exc_info=True)
    assert "Canaryfield" not in caplog.text and "MRN-0042" not in caplog.text
    assert f"records.0.{UNEXPECTED}" in caplog.text


BODIES = [
    {"records": [GOOD]},
    {"records": [GOOD, {**GOOD, "heart_rate": 90}]},
    {"records": [{**GOOD, "heart_rate": "SECRET"}]},
    {"records": [{**GOOD, "heart_rate": True}]},
    {"records": [{**GOOD, "heart_rate": 10.0}, {**GOOD, "ward": "SECRET"}]},
    {"records": [{**GOOD, "blood_group": "O"}]},
    {"records": [{k: v for k, v in GOOD.items() if k != "creatinine"}]},
    {"records": []},
    {"records": [GOOD] * 4},
    {"records": [GOOD], "extra": 1},
    {"records": "SECRET"},
    {},
    ["SECRET"],
]


@pytest.mark.parametrize("body", BODIES)
def test_the_hot_path_validator_agrees_with_the_documented_model(
    tiny_spec: UseCaseSpec, body
) -> None:
    """/predict validates into dicts with a TypedDict twin of PredictRequest (the model
    the OpenAPI document shows): same answers, same errors, no values echoed."""
    import json

    schemas = build(tiny_spec, max_records=3)
    raw = json.dumps(body).encode()
    outcomes = []
    for validate in (
        schemas.predict_request.model_validate_json,
        schemas.predict_dicts.model_validate_json,
    ):
        try:
            result = validate(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            assert "SECRET" not in str(exc)
            outcomes.append(sorted((e["loc"], e["type"], e["msg"]) for e in errors))
        else:
            outcomes.append([r if isinstance(r, dict) else r.model_dump() for r in result.records])
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"records": [{"heart_rate": NaN, "creatinine": 1.1, "ward": "icu"}]}',
        b'{"records": [{"heart_rate": Infinity}]}',
    ],
)
def test_bodies_that_are_not_json_fail_alike(tiny_spec: UseCaseSpec, raw: bytes) -> None:
    schemas = build(tiny_spec, max_records=3)
    kinds = []
    for validate in (
        schemas.predict_request.model_validate_json,
        schemas.predict_dicts.model_validate_json,
    ):
        with pytest.raises(ValidationError) as caught:
            validate(raw)
        kinds.append([(e["loc"], e["type"]) for e in caught.value.errors()])
    assert kinds[0] == kinds[1]


def test_a_record_that_is_not_an_object_is_a_dict_type_error(tiny_spec: UseCaseSpec) -> None:
    """The one difference from the model: it says dict_type where the model says model_type."""
    with pytest.raises(ValidationError) as caught:
        build(tiny_spec, max_records=3).predict_dicts.model_validate_json(b'{"records": [7]}')
    assert [(e["loc"], e["type"]) for e in caught.value.errors()] == [(("records", 0), "dict_type")]


def test_the_patient_ids_description_reads_as_a_sentence_about_raw_ids() -> None:
    """/docs.json read "...(pseudonymised at ingestion).s." for readmission (issue 20)."""
    from clinml.spec import load_spec

    spec = load_spec("readmission")
    schema = build(spec, max_records=3).patient_request.model_json_schema()
    text = schema["properties"]["patient_ids"]["description"]
    assert ").s." not in text and not text.endswith("s.s.")
    assert text.startswith("Patient ids as in the source data (patient_id), not pseudonyms")
    assert "`clinml patients sample readmission`" in text
