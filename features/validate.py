"""The data-quality gate: a Great Expectations suite generated from the spec.

Every batch (after ``features.ingest.normalise_types``) is checked before anything is
written: required columns are present, types match the spec, numeric values fall inside
their allowed range, categories are known, keys, timestamps and labels are never null,
and (entity, timestamp) pairs are unique.

Failures are summarised one line per problem, naming the column and how many rows are
affected, never the values themselves (they may be PHI).

Usage::

    report = validate_frame(raw, spec)   # ValidationReport, never raises on bad data
    require_valid(raw, spec)             # raises DataValidationError on bad data
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clinml.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd

    from clinml.spec import UseCaseSpec

NUMERIC_TYPES = ["float64", "float32", "int64", "int32", "int16", "int8", "Float64", "Int64"]
TEXT_TYPES = ["object", "str", "string", "category"]


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of one run of the gate."""

    success: bool
    rows: int
    checked: int
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.success:
            return f"{self.checked} checks passed on {self.rows} rows"
        return f"{len(self.failures)} of {self.checked} checks failed on {self.rows} rows"


def build_expectations(spec: UseCaseSpec) -> list[Any]:
    """The expectations for one spec, in the order a reader would check them."""
    import great_expectations.expectations as gxe

    key, ts, label = spec.entity.key, spec.event_timestamp, spec.label.column
    known_at = spec.label.known_at
    out: list[Any] = []
    required = [key, ts, *([known_at] if known_at else []), *(c.name for c in spec.columns)]
    for column in [*required, label]:
        out.append(gxe.ExpectColumnToExist(column=column))
    for column in required:
        nullable = any(c.name == column and c.nullable for c in spec.columns)
        if not nullable:
            out.append(gxe.ExpectColumnValuesToNotBeNull(column=column))
    if known_at is None:
        # Without a known-at column every row is a training event and needs its label;
        # with one, a null label means "not known yet".
        out.append(gxe.ExpectColumnValuesToNotBeNull(column=label))
    out.append(gxe.ExpectColumnValuesToBeInTypeList(column=key, type_list=TEXT_TYPES))
    # No type expectation on the timestamp: ingestion parses it to UTC first and an
    # unparseable value becomes null, which the not-null expectation reports.
    out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=[key, ts]))
    out.append(
        gxe.ExpectColumnValuesToBeInSet(
            column=label, value_set=[spec.label.positive_class, spec.label.negative_class]
        )
    )
    for col in spec.columns:
        if col.is_numeric:
            out.append(
                gxe.ExpectColumnValuesToBeInTypeList(column=col.name, type_list=NUMERIC_TYPES)
            )
            out.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=col.name, min_value=col.min, max_value=col.max
                )
            )
        else:
            out.append(gxe.ExpectColumnValuesToBeInTypeList(column=col.name, type_list=TEXT_TYPES))
            out.append(gxe.ExpectColumnValuesToBeInSet(column=col.name, value_set=col.categories))
    return out


def _describe(result: Any, rows: int, dtypes: dict[str, str]) -> str:
    """One line for one failed expectation: column, check, affected row count; no values."""
    config = result.expectation_config
    kind = config.type
    kwargs = config.kwargs
    column = kwargs.get("column") or "+".join(kwargs.get("column_list", []))
    detail = result.result or {}
    if kind == "expect_column_to_exist":
        return f"{column}: column is missing"
    if result.exception_info and result.exception_info.get("raised_exception"):
        check = kind.removeprefix("expect_column_values_to_")
        return f"{column}: {check} could not be checked (mixed or wrong value types)"
    if kind == "expect_column_values_to_be_in_type_list":
        expected = ", ".join(kwargs["type_list"][:3])
        return f"{column}: has type {dtypes.get(column, 'unknown')}, expected one of {expected}"
    count = detail.get("unexpected_count")
    share = (
        f"{count} of {rows} rows ({100 * count / max(rows, 1):.1f}%)"
        if count is not None
        else "some rows"
    )
    if kind == "expect_column_values_to_not_be_null":
        return f"{column}: {share} are null"
    if kind == "expect_column_values_to_be_between":
        low, high = kwargs["min_value"], kwargs["max_value"]
        return f"{column}: {share} outside the allowed range [{low}, {high}]"
    if kind == "expect_column_values_to_be_in_set":
        allowed = ", ".join(map(str, kwargs["value_set"]))
        return f"{column}: {share} not in the allowed values {{{allowed}}}"
    if kind == "expect_compound_columns_to_be_unique":
        return f"{column}: {share} share an entity and timestamp with another row"
    return f"{column}: {kind} failed ({share})"


def validate_frame(frame: pd.DataFrame, spec: UseCaseSpec) -> ValidationReport:
    """Run the spec's suite on a frame.

    Args:
        frame: the raw batch, before identifier columns are dropped.
        spec: the use-case spec the suite is generated from.

    Returns:
        A report whose ``failures`` name columns and row counts, never values.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("clinml")
        .add_dataframe_asset(spec.name)
        .add_batch_definition_whole_dataframe("batch")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{spec.name}_gate"))
    for expectation in build_expectations(spec):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{spec.name}_gate", data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame})

    # A missing column, or one of the wrong type, fails (or garbles) every other check
    # on it: report only the root cause.
    def failed(kind: str) -> set[str]:
        return {
            r.expectation_config.kwargs["column"]
            for r in result.results
            if r.expectation_config.type == kind and not r.success
        }

    root_cause = dict.fromkeys(
        failed("expect_column_values_to_be_in_type_list"), "expect_column_values_to_be_in_type_list"
    )
    root_cause.update(dict.fromkeys(failed("expect_column_to_exist"), "expect_column_to_exist"))
    dtypes = {str(name): str(dtype) for name, dtype in frame.dtypes.items()}
    failures: list[str] = []
    for r in result.results:
        if r.success:
            continue
        column = r.expectation_config.kwargs.get("column")
        if column in root_cause and r.expectation_config.type != root_cause[column]:
            continue
        line = _describe(r, len(frame), dtypes)
        if line not in failures:
            failures.append(line)
    return ValidationReport(
        success=bool(result.success),
        rows=len(frame),
        checked=len(result.results),
        failures=failures,
    )


def require_valid(frame: pd.DataFrame, spec: UseCaseSpec) -> ValidationReport:
    """Validate a batch and stop if it fails.

    Raises:
        DataValidationError: with one summary line and the per-problem ``failures``.
    """
    report = validate_frame(frame, spec)
    if not report.success:
        raise DataValidationError(
            f"data validation failed for '{spec.name}': {report.summary()}; "
            f"first problem: {report.failures[0]}. Nothing was written.",
            report.failures,
        )
    return report
