"""Column-wise validation of feature values against the use-case spec.

The record schemas of ``clinml.serving.schemas`` (pydantic) define what a request may
hold. Column-shaped inputs (the Open Inference Protocol's tensors, ``clinml.serving.protocol``,
and ``/predict`` bodies, transposed by :func:`predict_batch`, issue 22) are checked here
whole columns at a time, with the same rules and, for a refusal, the same wording:

- a ``float`` feature takes numbers (ints too), an ``int`` feature whole numbers, never
  booleans, strings, NaN or infinity; both within the spec's ``min``/``max``;
- a ``category`` feature takes one of the spec's categories;
- null only where the spec says the feature is ``nullable``; every feature is required.

A problem names the feature and the row, never the value::

    problems = check_columns(spec, {"heart_rate": [88.0, 10.0], ...}, rows=2)
    # [Problem(feature="heart_rate", row=1, kind="greater_than_equal",
    #          message="Input should be greater than or equal to 20")]

The prediction endpoints score a :class:`Batch` of checked columns: :func:`checked_batch`
(columns, such as the protocol's tensors) and :func:`predict_batch` (a ``/predict`` body)
build one whole columns at a time, or give None when anything is off, and then
``check_columns`` (or the record schema) names the problems. No Python work per record
from the parsed body to the answer, except for a request of a few records
(``SMALL_ROWS``), for which Python is cheaper than numpy's cost per call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

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


# -- batches: checked columns as the model and the prediction log take them -------------

# Whole numbers up to this size convert to float64 exactly, so a range check on floats
# says what pydantic's check on the int says.
EXACT_INT = 2.0**53

# A request of at most this many records is checked value by value in Python, and its
# columns stay lists: for so few rows, numpy's fixed cost per call (an array made, a
# comparison, a reduction, for each group of features) is most of the check. With 32
# clients sending one record each, the array checks cost a served request some 60 us
# more than the record schema had (py-spy, issue 22); the coalescer joins such requests'
# lists, and the model's encoding makes one array of them all.
SMALL_ROWS = 16


@dataclass(frozen=True)
class Batch:
    """Checked feature columns of ``rows`` records: what the prediction endpoints hand the
    model (``encode_columns``) and the prediction log.

    A column is a float64 array (a ``float`` feature; null is NaN), an int64 array (an
    ``int`` feature without nulls), or a list of the values as sent (a category, an
    ``int`` feature with nulls, and every column of a batch built from records).
    """

    columns: dict[str, Any]
    rows: int

    def __len__(self) -> int:
        return self.rows

    @classmethod
    def of_records(cls, spec: UseCaseSpec, records: Sequence[Mapping[str, Any]]) -> Batch:
        """Records (already checked) as columns, features in the spec's order; a
        nullable feature a record leaves out is None, as ``encode_records`` takes it."""
        return cls(
            {name: [record.get(name) for record in records] for name in spec.feature_names},
            len(records),
        )

    @classmethod
    def join(cls, batches: Sequence[Batch]) -> Batch:
        """One batch of several, rows in order (the coalescer scores them in one call)."""
        if len(batches) == 1:
            return batches[0]
        names = batches[0].columns.keys()
        joined: dict[str, Any] = {}
        for name in names:
            parts = [batch.columns[name] for batch in batches]
            kinds = set(map(type, parts))
            if kinds == {list}:  # small requests' columns (SMALL_ROWS)
                joined[name] = list(chain.from_iterable(parts))
            elif kinds == {np.ndarray}:
                joined[name] = np.concatenate(parts)
            else:
                joined[name] = [
                    value
                    for part in parts
                    for value in (part.tolist() if isinstance(part, np.ndarray) else part)
                ]
        return cls(joined, sum(batch.rows for batch in batches))

    def plain(self) -> dict[str, Any]:
        """The batch as JSON-able lists (NaN as None), for the split executor."""
        return {
            "columns": {name: _plain(values) for name, values in self.columns.items()},
            "rows": self.rows,
        }

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> Batch:
        return cls(dict(plain["columns"]), int(plain["rows"]))


def _plain(values: Any) -> list[Any]:
    if not isinstance(values, np.ndarray):
        return list(values)
    if values.dtype.kind == "f":
        missing = np.isnan(values)
        if missing.any():
            out = values.astype(object)
            out[missing] = None
            return out.tolist()  # type: ignore[no-any-return]
    return values.tolist()  # type: ignore[no-any-return]


_NUMBER_TYPES = {"float": frozenset({float, int}), "int": frozenset({int})}
_NONE = type(None)


def _checked_column(column: ColumnSpec, values: Sequence[Any]) -> Any:
    """``values`` as a batch column when every one of them passes ``check_value``; else
    None (then ``check_column`` says what is wrong). Whole-column operations: the value
    types as a set, the range with numpy. Errs on the side of None."""
    types = set(map(type, values))
    if column.type == "category":
        if types != {str} or not set(values) <= set(column.categories or ()):
            return None
        return values if isinstance(values, list) else list(values)
    allowed = _NUMBER_TYPES[column.type]
    nulls = _NONE in types
    if not (types - {_NONE}) <= allowed or (nulls and not column.nullable):
        return None
    numbers = np.array(values, dtype=np.float64)  # None -> NaN
    present = numbers[~np.isnan(numbers)] if nulls else numbers
    if not np.isfinite(present).all():  # NaN or infinity sent as such
        return None
    if present.size and not (
        (np.abs(present) < EXACT_INT).all()
        and (column.min is None or present.min() >= column.min)
        and (column.max is None or present.max() <= column.max)
    ):
        return None
    if column.type == "float":
        return numbers
    if nulls:
        return values if isinstance(values, list) else list(values)
    return numbers.astype(np.int64)


def checked_batch(
    spec: UseCaseSpec, columns: Mapping[str, Sequence[Any]], rows: int
) -> Batch | None:
    """The batch of ``columns`` (feature -> ``rows`` values) when every feature is there
    and every value passes ``check_value``; None when anything is off, and then
    :func:`check_columns` (or the record schema) names the problems. Columns that are not
    features are the caller's to refuse."""
    out: dict[str, Any] = {}
    for column in spec.features:
        values = columns.get(column.name)
        if values is None or len(values) != rows:
            return None
        try:
            found = _checked_column(column, values)
        except (TypeError, ValueError, OverflowError):  # e.g. an int beyond float64
            return None
        if found is None:
            return None
        out[column.name] = found
    return Batch(out, rows)


def predict_batch(spec: UseCaseSpec, body: bytes, max_records: int) -> Batch | None:
    """A ``/predict`` body (``{"records": [{feature: value}, ...]}``) as a checked batch,
    parsed once and checked whole columns at a time; None for any body that is not
    plainly valid (not JSON, another shape, a missing or unexpected field, a refused
    value, more than ``max_records`` records, ...). The service then validates it with
    the record schema, which gives the answer it always gave: the same errors, worded
    alike.

    Never accepts a body the record schema (``schemas.build``'s ``predict_dicts``)
    refuses; may refuse (return None for) a few it accepts.
    """
    import msgspec

    layout = _layout(spec)
    try:
        request = layout.decoder.decode(body)
    except (msgspec.DecodeError, ValueError):  # ValueError: bytes that are not UTF-8
        return None
    records = request.records
    if not 1 <= len(records) <= max_records:
        return None
    # The decoder took each record's features by name, typed: feature order, per column.
    transposed = zip(*map(msgspec.structs.astuple, records), strict=True)
    by_feature = dict(zip(layout.names, transposed, strict=True))
    out: dict[str, Any] = {}
    small = len(records) <= SMALL_ROWS
    for group in (layout.floats, layout.ints):
        if group is None:
            continue
        if not (group.check_few(by_feature, out) if small else group.check(by_feature, out)):
            return None
    for column in layout.categories:
        values = by_feature[column.name]
        if not set(values) <= set(column.categories or ()):
            return None
        out[column.name] = list(values)
    return Batch({name: out[name] for name in layout.names}, len(records))


def _decoder(spec: UseCaseSpec) -> Any:
    """A JSON decoder of ``{"records": [{feature: value}, ...]}`` that takes exactly the
    spec's features, each of its type (an int, a number, a string; null only where the
    feature may be missing), in C: the body is never a tree of Python dicts."""
    import msgspec

    kinds = {"float": float, "int": int, "category": str}
    fields = []
    for i, column in enumerate(spec.features):
        kind: Any = kinds[column.type]
        typed = kind | None if column.nullable else kind
        fields.append((f"f{i}", typed, msgspec.field(name=column.name)))
    record = msgspec.defstruct("Record", fields, forbid_unknown_fields=True)
    records = list[record]  # type: ignore[valid-type]
    body = msgspec.defstruct("Body", [("records", records)], forbid_unknown_fields=True)
    return msgspec.json.Decoder(body)


class _Numbers:
    """The numeric features of one type, checked as one (rows, features) array."""

    def __init__(self, features: list[ColumnSpec], kind: str) -> None:
        self.names = [c.name for c in features]
        self.kind = kind
        self.nullable = np.array([c.nullable for c in features])
        self.low = np.array([-np.inf if c.min is None else c.min for c in features])
        self.high = np.array([np.inf if c.max is None else c.max for c in features])
        self.bounds = [
            (c.name, c.nullable, -math.inf if c.min is None else float(c.min),
             math.inf if c.max is None else float(c.max))
            for c in features
        ]  # fmt: skip

    def check(self, by_feature: Mapping[str, Sequence[Any]], out: dict[str, Any]) -> bool:
        """Check the group's columns (typed by the decoder: numbers, or None where the
        feature may be missing) and put them in ``out``: floats as float64 arrays (None as
        NaN), ints as int64 arrays, or as a list where one holds None."""
        data = [by_feature[name] for name in self.names]
        numbers = np.array(data, dtype=np.float64)  # (features, rows); None -> NaN
        missing = np.isnan(numbers)  # a JSON body holds no NaN: each one was a null
        if missing[~self.nullable].any():
            return False
        # NaN compares False, so nulls pass; infinity (an overflowing number) does not
        if ((numbers < self.low[:, None]) | (numbers > self.high[:, None])).any():
            return False
        if self.kind == "int" and (np.abs(numbers) >= EXACT_INT).any():
            return False
        for j, name in enumerate(self.names):
            if self.kind == "float":
                out[name] = numbers[j]
            elif missing[j].any():
                out[name] = list(data[j])
            else:
                out[name] = numbers[j].astype(np.int64)
        return True

    def check_few(self, by_feature: Mapping[str, Sequence[Any]], out: dict[str, Any]) -> bool:
        """:meth:`check` for a few rows (``SMALL_ROWS``), value by value, the same
        comparisons (a null passes the range, infinity does not pass a finite bound);
        each column goes in ``out`` as a list of the values."""
        whole = self.kind == "int"
        for name, nullable, low, high in self.bounds:
            values = by_feature[name]
            for value in values:
                if value is None:
                    if not nullable:
                        return False
                elif not low <= value <= high or (whole and abs(value) >= EXACT_INT):
                    return False
            out[name] = list(values)
        return True


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]  # the features, in the spec's order
    decoder: Any
    floats: _Numbers | None
    ints: _Numbers | None
    categories: list[ColumnSpec]


_LAYOUTS: dict[int, tuple[UseCaseSpec, _Layout]] = {}


def _layout(spec: UseCaseSpec) -> _Layout:
    """The spec's features grouped for :func:`predict_batch`, made once per spec."""
    found = _LAYOUTS.get(id(spec))
    if found is not None and found[0] is spec:
        return found[1]
    floats = [c for c in spec.features if c.type == "float"]
    ints = [c for c in spec.features if c.type == "int"]
    layout = _Layout(
        tuple(spec.feature_names),
        _decoder(spec),
        _Numbers(floats, "float") if floats else None,
        _Numbers(ints, "int") if ints else None,
        [c for c in spec.features if c.type == "category"],
    )
    _LAYOUTS[id(spec)] = (spec, layout)
    return layout
