"""Request schemas generated from a spec: strict types, ranges, no echo of inputs."""

from __future__ import annotations

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from clinml.spec import UseCaseSpec
from serving.schemas import build

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

    from serving import redaction

    redaction.install()
    redaction.install()  # idempotent
    logger = logging.getLogger(redaction.BENTOML_HTTP_LOGGER)
    assert sum(isinstance(f, redaction.RedactValidationErrors) for f in logger.filters) == 1
    try:
        TypeAdapter(list[int]).validate_json(b'{"SECRET-MRN-123"')
    except ValidationError:
        with caplog.at_level(logging.ERROR, logger=redaction.BENTOML_HTTP_LOGGER):
            logger.error("Exception on /predict [POST]", exc_info=True)
    [record] = caplog.records
    assert "SECRET" not in caplog.text
    assert record.getMessage() == "rejected request: 1 validation error(s) json_invalid at (body)"
