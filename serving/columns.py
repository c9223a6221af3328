"""Column-wise validation of feature values against the use-case spec.

``/predict`` validates record by record (the pydantic models of ``clinml.serving.schemas``).
Column-shaped inputs (the Open Inference Protocol's tensors, ``clinml.serving.protocol``;
later, batches of ``/predict``, issue 22) are checked here one feature at a time, with the
same rules and the same wording as those models:

- a ``float`` feature takes numbers (ints too), an ``int`` feature whole numbers, never
  booleans, strings, NaN or infinity; both within the spec's ``min``/``max``;
- a ``category`` feature takes one of the spec's categories;
- null only where the spec says the feature is ``nullable``; every feature is required.

A problem names the feature and the row, never the value::

    problems = check_columns(spec, {"heart_rate": [88.0, 10.0], ...}, rows=2)
    # [Problem(feature="heart_rate", row=1, kind="greater_than_equal",
    #          message="Input should be greater than or equal to 20")]
    records = to_records(spec, columns, rows)  # once there are no problems
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clinml.spec import ColumnSpec, UseCaseSpec

# pydantic's own messages for the same errors (clinml.serving.schemas), so that a caller
# reads the same words whichever endpoint refused the value.
NOT_A_NUMBER = ("float_type", "Input should be a valid number")
NOT_AN_INTEGER = ("int_type", "Input should be a valid integer")
NOT_FINITE = ("finite_number", "Input should be a finite number")
MISSING = ("missing", "Field required")
NOT_NULL = ("none_forbidden", "Input should not be None")


@dataclass(frozen=True)
class Problem:
    """One refused value: the feature, the row (None: the whole column) and what is
    wrong, in pydantic's words. Never the value itself."""

    feature: str
    row: int | None
    kind: str
    message: str

    def line(self) -> str:
        """One line for an error answer: ``feature mean_radius, row 3: ...``."""
        where = f"feature {self.feature}" + ("" if self.row is None else f", row {self.row}")
        return f"{where}: {self.message}"


def _number(limit: float) -> str:
    """A limit as pydantic prints it (``20`` for 20.0)."""
    return str(int(limit)) if float(limit).is_integer() else repr(limit)


def _categories(categories: Sequence[str]) -> str:
    """The allowed categories as pydantic's ``literal_error`` lists them."""
    quoted = [repr(c) for c in categories]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_value(column: ColumnSpec, value: Any) -> tuple[str, str] | None:
    """``(kind, message)`` when ``value`` breaks ``column``'s rules, else None."""
    if value is None:
        return None if column.nullable else NOT_NULL
    if column.type == "category":
        if not isinstance(value, str) or value not in (column.categories or ()):
            return "literal_error", f"Input should be {_categories(column.categories or [])}"
        return None
    if isinstance(value, bool):  # strict, as /predict: true is not 1
        return NOT_A_NUMBER if column.type == "float" else NOT_AN_INTEGER
    if column.type == "int":
        if not isinstance(value, int):
            return NOT_AN_INTEGER
    elif not isinstance(value, int | float):
        return NOT_A_NUMBER
    if isinstance(value, float) and not math.isfinite(value):
        return NOT_FINITE
    if column.min is not None and value < column.min:
        return (
            "greater_than_equal",
            f"Input should be greater than or equal to {_number(column.min)}",
        )
    if column.max is not None and value > column.max:
        return "less_than_equal", f"Input should be less than or equal to {_number(column.max)}"
    return None


def check_column(column: ColumnSpec, values: Sequence[Any]) -> list[Problem]:
    """Every refused value of one feature's column, in row order."""
    problems = []
    for row, value in enumerate(values):
        found = check_value(column, value)
        if found is not None:
            problems.append(Problem(column.name, row, *found))
    return problems


def check_columns(
    spec: UseCaseSpec, columns: Mapping[str, Sequence[Any]], rows: int
) -> list[Problem]:
    """Every problem with ``columns`` (feature name -> ``rows`` values), features in the
    spec's order. A feature without a column is ``missing``; a column of another length
    is refused whole. Columns that are not features are the caller's to refuse (their
    names are the caller's text, so they are not named here)."""
    problems: list[Problem] = []
    for column in spec.features:
        values = columns.get(column.name)
        if values is None:
            problems.append(Problem(column.name, None, *MISSING))
        elif len(values) != rows:
            problems.append(
                Problem(column.name, None, "length", f"Should have {rows} values, one per row")
            )
        else:
            problems += check_column(column, values)
    return problems


def to_records(
    spec: UseCaseSpec, columns: Mapping[str, Sequence[Any]], rows: int
) -> list[dict[str, Any]]:
    """Checked columns as the records ``/predict`` hands the model: one dict per row,
    features in the spec's order."""
    names = spec.feature_names
    return [{name: columns[name][row] for name in names} for row in range(rows)]
