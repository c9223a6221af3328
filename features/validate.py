"""The data-quality gate: a Great Expectations suite generated from the spec and profile.

Every batch (after ``clinml.features.ingest.normalise_types``) is checked before anything is
written. Two kinds of expectation:

- **spec** (hard limits): required columns present with the declared types; keys,
  timestamps and non-nullable columns never null; numeric values inside the declared
  ``[min, max]``; categories declared; labels one of the two classes; (entity,
  timestamp) pairs unique.
- **learned** (from the reference profile, ``clinml.features.profile``): numeric values
  inside the reference's observed range widened by a margin; null rates of nullable
  columns not far above the reference's; categories the reference actually had; the
  positive-label rate inside a band around the reference's. Tolerances come from the
  spec's ``quality`` section.

Every failure names the column, the rule, how many rows broke it and their row indices
(0-based positions in the batch), never the values themselves: they may be PHI. A
failing batch gets a markdown report and a JSON summary (:func:`write_report`).

Usage::

    report = validate_frame(raw, spec, profile)   # never raises on bad data
    require_valid(raw, spec, profile)             # raises DataValidationError
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinml.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd

    from clinml.features.profile import QualityProfile
    from clinml.spec import UseCaseSpec

NUMERIC_TYPES = ["float64", "float32", "int64", "int32", "int16", "int8", "Float64", "Int64"]
TEXT_TYPES = ["object", "str", "string", "category"]
POSITIVE_LABEL = "__positive_label"  # derived 0/1 column for the label-rate check
MAX_ROW_INDICES = 1000  # per failed expectation in the JSON summary


@dataclass(frozen=True)
class Failure:
    """One failed expectation, safe to show: rule, counts and row positions, no values."""

    column: str
    check: str
    source: str  # "spec" or "learned"
    message: str
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    row_indices: list[int] = field(default_factory=list)
    row_indices_truncated: bool = False
    observed: Any = None  # an aggregate (a rate, a dtype name), never a row value


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of one run of the gate."""

    success: bool
    rows: int
    checked: int
    details: list[Failure] = field(default_factory=list)
    used_profile: bool = False

    @property
    def failures(self) -> list[str]:
        return [f.message for f in self.details]

    def summary(self) -> str:
        basis = "spec and reference profile" if self.used_profile else "spec"
        if self.success:
            return f"{self.checked} checks ({basis}) passed on {self.rows:,} rows"
        return (
            f"{len(self.details)} of {self.checked} checks ({basis}) failed on {self.rows:,} rows"
        )


def _rule(expectation: Any, source: str, rule: str) -> Any:
    expectation.meta = {"source": source, "rule": rule}
    return expectation


def _label_band(
    profile: QualityProfile, spec: UseCaseSpec, labelled_rows: int
) -> tuple[float, float]:
    if spec.quality.label_rate_band is not None:
        return spec.quality.label_rate_band
    rate = profile.label_rate or 0.0
    noise = 3 * math.sqrt(max(rate * (1 - rate), 1e-9) / max(labelled_rows, 1))
    return max(0.0, 0.5 * rate - noise), min(1.0, 1.5 * rate + noise)


def build_expectations(
    spec: UseCaseSpec, profile: QualityProfile | None = None, labelled_rows: int = 0
) -> list[Any]:
    """The expectations for one spec (and profile), in the order a reader would check them."""
    import great_expectations.expectations as gxe

    key, ts, label = spec.entity.key, spec.event_timestamp, spec.label.column
    known_at = spec.label.known_at
    out: list[Any] = []
    required = [key, ts, *([known_at] if known_at else []), *(c.name for c in spec.columns)]
    for column in [*required, label]:
        out.append(_rule(gxe.ExpectColumnToExist(column=column), "spec", "is missing"))
    nullable = {c.name for c in spec.columns if c.nullable}
    for column in required:
        if column not in nullable:
            out.append(_rule(gxe.ExpectColumnValuesToNotBeNull(column=column), "spec", "are null"))
    if known_at is None:
        # Without a known-at column every row is a training event and needs its label;
        # with one, a null label means "not known yet".
        out.append(_rule(gxe.ExpectColumnValuesToNotBeNull(column=label), "spec", "are null"))
    out.append(
        _rule(
            gxe.ExpectColumnValuesToBeInTypeList(column=key, type_list=TEXT_TYPES),
            "spec",
            "has the wrong type",
        )
    )
    # No type expectation on timestamps: ingestion parses them to UTC first and an
    # unparseable value becomes null, which the not-null expectation reports.
    out.append(
        _rule(
            gxe.ExpectCompoundColumnsToBeUnique(column_list=[key, ts]),
            "spec",
            "share an entity and timestamp with another row",
        )
    )
    classes = [spec.label.positive_class, spec.label.negative_class]
    out.append(
        _rule(
            gxe.ExpectColumnValuesToBeInSet(column=label, value_set=classes),
            "spec",
            "are not one of the two classes",
        )
    )
    for col in spec.columns:
        if col.is_numeric:
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToBeInTypeList(column=col.name, type_list=NUMERIC_TYPES),
                    "spec",
                    "has the wrong type",
                )
            )
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToBeBetween(
                        column=col.name, min_value=col.min, max_value=col.max
                    ),
                    "spec",
                    f"are outside the declared range [{col.min:g}, {col.max:g}]",
                )
            )
        else:
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToBeInTypeList(column=col.name, type_list=TEXT_TYPES),
                    "spec",
                    "has the wrong type",
                )
            )
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToBeInSet(column=col.name, value_set=col.categories),
                    "spec",
                    "are not a declared category",
                )
            )
    if profile is not None:
        out.extend(_learned_expectations(spec, profile, labelled_rows))
    return out


def _learned_expectations(
    spec: UseCaseSpec, profile: QualityProfile, labelled_rows: int
) -> list[Any]:
    import great_expectations.expectations as gxe

    quality = spec.quality
    out: list[Any] = []
    for col in spec.columns:
        learned = profile.columns.get(col.name)
        if learned is None:
            continue
        if col.nullable:
            allowed = min(1.0, learned.null_rate + quality.null_rate_margin)
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToNotBeNull(
                        column=col.name, mostly=max(0.0, 1.0 - allowed)
                    ),
                    "learned",
                    f"are null, above {allowed:.1%} (reference {learned.null_rate:.1%})",
                )
            )
        if col.is_numeric and learned.min is not None and learned.max is not None:
            width = max(learned.max - learned.min, abs(learned.max) * 0.01, 1e-9)
            low = max(col.min, learned.min - quality.range_margin * width)  # type: ignore[type-var]
            high = min(col.max, learned.max + quality.range_margin * width)  # type: ignore[type-var]
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToBeBetween(
                        column=col.name,
                        min_value=low,
                        max_value=high,
                        mostly=1 - quality.out_of_range_share,
                    ),
                    "learned",
                    f"are outside the reference range, widened to [{low:.4g}, {high:.4g}]",
                )
            )
        elif (
            not col.is_numeric
            and learned.categories
            and set(learned.categories) != set(col.categories or [])
        ):
            out.append(
                _rule(
                    gxe.ExpectColumnValuesToBeInSet(
                        column=col.name,
                        value_set=learned.categories,
                        mostly=1 - quality.unseen_category_share,
                    ),
                    "learned",
                    "are in a category the reference never had",
                )
            )
    if profile.label_rate is not None and labelled_rows > 0:
        low, high = _label_band(profile, spec, labelled_rows)
        out.append(
            _rule(
                gxe.ExpectColumnMeanToBeBetween(
                    column=POSITIVE_LABEL, min_value=low, max_value=high
                ),
                "learned",
                f"outside [{low:.1%}, {high:.1%}] (reference {profile.label_rate:.1%})",
            )
        )
    return out


def _check_name(kind: str) -> str:
    return kind.removeprefix("expect_column_values_to_").removeprefix("expect_").replace("_", " ")


def _renamed_hint(column: str, frame: pd.DataFrame, spec: UseCaseSpec) -> str:
    declared = {
        spec.entity.key,
        spec.event_timestamp,
        spec.label.column,
        spec.label.known_at,
        *(c.name for c in spec.columns),
        *spec.identifier_columns,
    }
    undeclared = [str(c) for c in frame.columns if c not in declared]
    close = difflib.get_close_matches(column, undeclared, n=1, cutoff=0.6)
    return f" (renamed to '{close[0]}'?)" if close else ""


def _failure(result: Any, rows: int, frame: pd.DataFrame, spec: UseCaseSpec) -> Failure:
    """One safe description of one failed expectation."""
    config = result.expectation_config
    kind, kwargs = config.type, config.kwargs
    meta = config.meta or {}
    source, rule = meta.get("source", "spec"), meta.get("rule", kind)
    column = kwargs.get("column") or "+".join(kwargs.get("column_list", []))
    shown = "label" if column == POSITIVE_LABEL else column
    detail = result.result or {}
    base = {"column": shown, "check": kind, "source": source}
    if kind == "expect_column_to_exist":
        return Failure(
            **base, message=f"{shown}: column is missing{_renamed_hint(column, frame, spec)}"
        )
    if result.exception_info and result.exception_info.get("raised_exception"):
        message = f"{shown}: {_check_name(kind)} could not be checked (mixed or wrong value types)"
        return Failure(**base, message=message)
    if kind == "expect_column_values_to_be_in_type_list":
        dtype = str(frame[column].dtype) if column in frame.columns else "unknown"
        expected = ", ".join(kwargs["type_list"][:3])
        return Failure(
            **base, message=f"{shown}: has type {dtype}, expected one of {expected}", observed=dtype
        )
    if kind == "expect_column_mean_to_be_between":
        observed = detail.get("observed_value")
        value = f"{float(observed):.1%}" if observed is not None else "unknown"
        message = f"{shown}: positive rate {value} is {rule} (learned)"
        return Failure(**base, message=message, observed=observed)
    count = detail.get("unexpected_count")
    indices = [
        int(i) for i in detail.get("unexpected_index_list") or [] if isinstance(i, int | float)
    ]
    share = (
        f"{count:,} of {rows:,} rows ({100 * count / max(rows, 1):.1f}%)"
        if count is not None
        else "some rows"
    )
    return Failure(
        **base,
        message=f"{shown}: {share} {rule}" + (" (learned)" if source == "learned" else ""),
        unexpected_count=count,
        unexpected_percent=detail.get("unexpected_percent"),
        row_indices=indices[:MAX_ROW_INDICES],
        row_indices_truncated=len(indices) > MAX_ROW_INDICES,
    )


def validate_frame(
    frame: pd.DataFrame, spec: UseCaseSpec, profile: QualityProfile | None = None
) -> ValidationReport:
    """Run the gate on a frame.

    Args:
        frame: the raw batch, before identifier columns are dropped.
        spec: the use-case spec the suite is generated from.
        profile: the reference profile for the learned expectations, if one exists.

    Returns:
        A report whose failures name columns, rules, counts and row indices, never values.
    """
    import great_expectations as gx

    from clinml.features.gx_internals import quiet_progress_bars
    from clinml.features.profile import positive_label

    batch_frame = frame.reset_index(drop=True)
    labelled_rows = 0
    if spec.label.column in batch_frame.columns:
        batch_frame = batch_frame.assign(**{POSITIVE_LABEL: positive_label(batch_frame, spec)})
        labelled_rows = int(batch_frame[POSITIVE_LABEL].notna().sum())
    context = gx.get_context(mode="ephemeral")
    quiet_progress_bars(context)
    batch = (
        context.data_sources.add_pandas("clinml")
        .add_dataframe_asset(spec.name)
        .add_batch_definition_whole_dataframe("batch")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=f"{spec.name}_gate"))
    for expectation in build_expectations(spec, profile, labelled_rows):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{spec.name}_gate", data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": batch_frame}, result_format={"result_format": "COMPLETE"}
    )

    # A missing column, or one of the wrong type, fails (or garbles) every other check
    # on it: report only the root cause.
    def failed(kind: str) -> set[str]:
        return {
            r.expectation_config.kwargs["column"]
            for r in result.results
            if r.expectation_config.type == kind and not r.success
        }

    type_check, exist_check = "expect_column_values_to_be_in_type_list", "expect_column_to_exist"
    root_cause = dict.fromkeys(failed(type_check), type_check)
    root_cause.update(dict.fromkeys(failed(exist_check), exist_check))
    details: list[Failure] = []
    for r in result.results:
        if r.success:
            continue
        column = r.expectation_config.kwargs.get("column")
        if column in root_cause and r.expectation_config.type != root_cause[column]:
            continue
        failure = _failure(r, len(batch_frame), batch_frame, spec)
        if failure.message not in {d.message for d in details}:
            details.append(failure)
    # Schema problems first: they explain everything after them.
    details.sort(key=lambda f: f.check not in root_cause.values())
    return ValidationReport(
        success=bool(result.success),
        rows=len(batch_frame),
        checked=len(result.results),
        details=details,
        used_profile=profile is not None,
    )


def write_report(report: ValidationReport, spec: UseCaseSpec, directory: Path) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``report.md`` for a run of the gate (no row values)."""
    directory.mkdir(parents=True, exist_ok=True)
    summary = {
        "usecase": spec.name,
        "success": report.success,
        "rows": report.rows,
        "checks": report.checked,
        "used_profile": report.used_profile,
        "failures": [asdict(f) for f in report.details],
    }
    json_path = directory / "summary.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    lines = [
        f"# Data validation: {spec.name}",
        "",
        f"**{'PASSED' if report.success else 'FAILED'}**: {report.summary()}.",
        "",
    ]
    if report.details:
        lines += [
            "| column | rule | source | rows | share | first row indices |",
            "|---|---|---|---|---|---|",
        ]
        for f in report.details:
            rows = "" if f.unexpected_count is None else f"{f.unexpected_count:,}"
            share = "" if f.unexpected_percent is None else f"{f.unexpected_percent:.2f}%"
            first = ", ".join(map(str, f.row_indices[:10])) + (
                " …" if len(f.row_indices) > 10 else ""
            )
            problem = f.message.split(": ", 1)[-1]
            lines.append(f"| {f.column} | {problem} | {f.source} | {rows} | {share} | {first} |")
        lines += [
            "",
            "Row indices are 0-based positions in the batch. Values are never shown: they may "
            "be PHI. summary.json lists every failed expectation with its row indices "
            f"(up to {MAX_ROW_INDICES} each).",
        ]
    md_path = directory / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def require_valid(
    frame: pd.DataFrame,
    spec: UseCaseSpec,
    profile: QualityProfile | None = None,
    report_dir: Path | None = None,
) -> ValidationReport:
    """Validate a batch and stop if it fails.

    Args:
        frame, spec, profile: as for :func:`validate_frame`.
        report_dir: where to write the failure report (``report.md``, ``summary.json``).

    Raises:
        DataValidationError: one summary line; ``failures`` holds one line per problem
            and ``report`` the path of the markdown report, if written.
    """
    report = validate_frame(frame, spec, profile)
    if not report.success:
        written = write_report(report, spec, report_dir)[1] if report_dir is not None else None
        where = f" Report: {written}" if written is not None else ""
        raise DataValidationError(
            f"data validation failed for '{spec.name}': {report.summary()}; "
            f"first problem: {report.failures[0]}. Nothing was written.{where}",
            report.failures,
            report=written,
        )
    return report
