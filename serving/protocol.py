"""The Open Inference Protocol (KServe V2, REST) in front of the same model as ``/predict``.

``POST /v2/models/<use case>/infer`` takes tensors and answers tensors; this module turns
a request body into the checked batch of columns ``/predict`` scores for the same rows
(:func:`batch`), and predictions, given as columns, into output tensors
(:func:`response_columns`). It holds no HTTP: ``clinml.serving.service`` wires it, and the
column-wise checks are ``clinml.serving.columns``'s, worded as ``/predict``'s.

Two ways to send the features:

- one tensor per feature, named as the feature, shape ``[n]`` or ``[n, 1]``, every
  tensor the same ``n``: numeric features as ``FP64``, ``FP32``, ``INT64`` or ``INT32``
  (an ``int`` feature also as ``BOOL``, a 0/1 flag; a whole number sent as FP is taken),
  categorical ones as ``BYTES``;
- when every feature is numeric, one ``FP64`` tensor of any name that is not a feature's,
  shape ``[n, k]``, its columns the features in the order ``GET /v2/models/<use case>``
  publishes.

Anything else is a :class:`ProtocolError` (the service answers ``400 {"error": ...}``):
the message names features, rows and tensor positions, never a submitted value or a
name the caller made up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clinml.serving import columns
from clinml.spec import ColumnSpec, UseCaseSpec

# The outputs, in the order they are answered.
OUTPUTS = ("probability", "label", "risk_band")
OUTPUT_DATATYPES = {"probability": "FP64", "label": "BYTES", "risk_band": "BYTES"}
# Datatypes a feature's tensor may have (the first is the one metadata publishes).
DATATYPES = {
    "float": ("FP64", "FP32", "INT64", "INT32"),
    "int": ("INT64", "INT32", "FP64", "FP32", "BOOL"),
    "category": ("BYTES",),
}
MATRIX_DATATYPE = "FP64"
PLATFORM = "clinml"
# At most this many problems are listed in one error message.
MAX_LISTED = 20

_TENSOR = ConfigDict(extra="forbid", hide_input_in_errors=True)


class ProtocolError(Exception):
    """A request the protocol refuses (400); the message holds no submitted value."""


class InferInput(BaseModel):
    """One input tensor."""

    model_config = _TENSOR
    name: str = Field(max_length=256)
    shape: list[int] = Field(min_length=1, max_length=2)
    datatype: str = Field(max_length=16)
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    """An output the caller asks for (default: all of them)."""

    model_config = _TENSOR
    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/<use case>/infer``. ``parameters`` (such as tritonclient's
    ``binary_data_output``) are accepted and ignored: answers are always JSON."""

    model_config = _TENSOR
    id: str | None = Field(default=None, max_length=256)
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(BaseModel):
    """The answer: the same probability, label and risk band as ``/predict``, one per
    row, in request order; ``id`` is the request's ``id``, else the service's request id."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


class ProtocolErrorResponse(BaseModel):
    """The protocol's error answer: what was wrong, never a submitted value."""

    error: str


def parse(body: bytes) -> InferRequest:
    """The request's structure (names, shapes, datatypes are checked later).

    Raises:
        ProtocolError: not JSON, not an inference request, or an input's data sent by an
            extension clinml does not take (binary data, shared memory).
    """
    document = _document(body)
    unsupported = _extension_used(document)
    if unsupported:
        raise ProtocolError(unsupported)
    try:
        return InferRequest.model_validate(document)
    except ValidationError as exc:
        raise ProtocolError(_structure_errors(exc)) from None


def _document(body: bytes) -> Any:
    """The body as Python values, as ``json.loads`` reads it (not pydantic's parser: a
    NaN in a tensor is refused by the column check, with the same words as /predict, not
    as unparseable JSON). msgspec reads it first, in C, three times faster: for any JSON
    both read, the same values (ints of any size, floats correctly rounded, the last of
    a repeated key); what msgspec does not take (NaN, Infinity, 1e400, a lone surrogate,
    UTF-16, a byte-order mark, nesting deeper than its limit) is left to ``json``.

    Raises:
        ProtocolError: not JSON, or nested too deeply.
    """
    import msgspec

    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError):
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ProtocolError("the body is not valid JSON (or nested too deeply)") from None


# Input parameters that say a tensor's data is not in the JSON: what each extension is, and
# what to send instead.
_EXTENSIONS = {
    "binary_data_size": "binary tensor data (the binary data extension)",
    "shared_memory_region": "shared memory (the shared-memory extension)",
}


def _extension_used(document: Any) -> str | None:
    """Why the request is refused, when an input's data is elsewhere than in the JSON
    (else pydantic would say no more than that ``data`` is missing)."""
    inputs = document.get("inputs") if isinstance(document, dict) else None
    for tensor in inputs if isinstance(inputs, list) else ():
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        for parameter, extension in _EXTENSIONS.items():
            if isinstance(parameters, dict) and parameter in parameters:
                return (
                    f"{extension} is not supported: send every input's data as JSON "
                    "(tritonclient: set_data_from_numpy(..., binary_data=False))"
                )
    return None


def _structure_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        # positions and the schema's own field names only; an extra key is the caller's
        where = ".".join(
            str(part) if isinstance(part, int) or part in _FIELDS else "(unexpected field)"
            for part in error["loc"]
        )
        lines.append(f"{where}: {error['msg']}")
    return "invalid inference request: " + _join(lines)


_FIELDS = frozenset(
    [*InferRequest.model_fields, *InferInput.model_fields, *RequestedOutput.model_fields]
)


def _join(lines: Sequence[str]) -> str:
    listed = "; ".join(lines[:MAX_LISTED])
    more = len(lines) - MAX_LISTED
    return listed + (f"; and {more} more" if more > 0 else "")


def _flat(data: list[Any], types: set[type] | None = None) -> list[Any]:
    """Row-major data, flat (the protocol allows nested lists); without recursion, so no
    depth of nesting a body can hold is an error of the service's. ``types``: the types
    of ``data``'s values, when the caller has them."""
    if list not in (set(map(type, data)) if types is None else types):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def batch(spec: UseCaseSpec, request: InferRequest, max_rows: int) -> columns.Batch:
    """The request's rows as the checked batch of columns the service scores
    (``/predict``'s too, for the same rows): checked whole columns at a time, and value
    by value only to word a refusal.

    Raises:
        ProtocolError: a wrong shape, datatype, name, missing feature or value.
    """
    rows, by_feature = _columns(spec, request, max_rows)
    checked = columns.checked_batch(spec, by_feature, rows)
    if checked is not None:
        return checked
    problems = columns.check_columns(spec, by_feature, rows)
    if problems:
        raise ProtocolError(_join([p.line() for p in problems]))
    # valid values the whole-column check is stricter about (an int beyond 2**53)
    return columns.Batch({name: list(by_feature[name]) for name in spec.feature_names}, rows)


def _columns(
    spec: UseCaseSpec, request: InferRequest, max_rows: int
) -> tuple[int, dict[str, list[Any]]]:
    """(rows, feature -> values) of a request, the values as /predict's JSON holds them.

    Raises:
        ProtocolError: a wrong shape, datatype, name or missing feature, too few or too
            many rows.
    """
    names = spec.feature_names
    inputs = request.inputs
    if len(inputs) == 1 and inputs[0].name not in names:
        rows, by_feature = _matrix(spec, inputs[0])
    else:
        rows, by_feature = _named(spec, inputs)
    if rows < 1:
        raise ProtocolError("the tensors hold no rows")
    if rows > max_rows:
        raise ProtocolError(f"at most {max_rows} rows per request (CLINML_MAX_RECORDS_PER_REQUEST)")
    return rows, by_feature


def _named(spec: UseCaseSpec, inputs: Sequence[InferInput]) -> tuple[int, dict[str, list[Any]]]:
    """One tensor per feature -> (rows, feature -> values)."""
    by_name = {c.name: c for c in spec.features}
    lines, rows_seen = [], set()
    by_feature: dict[str, list[Any]] = {}
    for position, tensor in enumerate(inputs):
        column = by_name.get(tensor.name)
        if column is None:
            lines.append(
                f"input {position} is not named as a feature of this model (one tensor per "
                "feature, or a single [n, k] tensor of all features)"
            )
            continue
        if column.name in by_feature:
            lines.append(f"input {position}: feature {column.name} is sent twice")
            continue
        shape = tensor.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
            lines.append(f"input {column.name}: shape must be [n] or [n, 1]")
            continue
        rows_seen.add(shape[0])
        found = _values(column, tensor, shape[0])
        if isinstance(found, str):
            lines.append(f"input {column.name}: {found}")
            continue
        by_feature[column.name] = found
    if len(rows_seen) > 1:
        lines.append("every input must have the same number of rows (shape[0])")
    missing = [c.name for c in spec.features if c.name not in by_feature]
    if missing and not lines:
        lines.append(f"missing feature(s): {', '.join(missing)}")
    if lines:
        raise ProtocolError(_join(lines))
    return rows_seen.pop(), by_feature


def _values(column: ColumnSpec, tensor: InferInput, rows: int) -> list[Any] | str:
    """A feature's values, as /predict's JSON would hold them; else what is wrong."""
    allowed = DATATYPES[column.type]
    if tensor.datatype not in allowed:
        return f"datatype must be one of {', '.join(allowed)} for a {column.type} feature"
    types = set(map(type, tensor.data))
    data = _flat(tensor.data, types)
    if len(data) != rows:
        return f"shape says {rows} values, data holds {len(data)}"
    fast = _whole(column, tensor.datatype, data, types if data is tensor.data else None)
    if fast is not None:
        return fast
    out = []
    for row, value in enumerate(data):
        converted = _convert(column, tensor.datatype, value)
        if isinstance(converted, _Bad):
            return f"row {row}: {converted.message}"
        out.append(converted)
    return out


# Python types a tensor's values may have, by datatype, for _convert to keep them as
# they are (a FP value for an int feature is not among them: it becomes an int).
_KEPT = {
    "BYTES": frozenset({str}),
    "INT64": frozenset({int}),
    "INT32": frozenset({int}),
    "FP64": frozenset({int, float}),
    "FP32": frozenset({int, float}),
}


_NULL = frozenset({type(None)})


def _whole(
    column: ColumnSpec, datatype: str, data: list[Any], types: set[type] | None = None
) -> list[Any] | None:
    """What the value-by-value conversion (``_convert``) gives, found for the whole
    column at once when every value's type says so; None otherwise (then ``_convert``
    goes value by value and words any refusal). ``types``: those of ``data``'s values,
    when the caller has them."""
    if types is None:
        types = set(map(type, data))
    if datatype == "BOOL":
        return list(map(int, data)) if types <= {bool} else None
    kept = _KEPT.get(datatype)
    if kept is None or not types - _NULL <= kept:  # a null stays null (_convert)
        return None
    if column.type == "int" and datatype.startswith("FP") and float in types:
        return None  # whole floats become ints, value by value
    return data


class _Bad:
    def __init__(self, message: str) -> None:
        self.message = message


def _convert(column: ColumnSpec, datatype: str, value: Any) -> Any:
    """One value of a tensor of ``datatype`` as a feature's value (range and category
    checks are the column check's); a ``_Bad`` when it does not match the datatype."""
    if value is None:
        return None  # the column check knows whether the feature may be null
    if datatype == "BYTES":
        return value if isinstance(value, str) else _Bad("Input should be a valid string")
    if datatype == "BOOL":
        return int(value) if isinstance(value, bool) else _Bad("Input should be a valid boolean")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _Bad(columns.NOT_A_NUMBER[1])
    if datatype.startswith("INT"):
        return value if isinstance(value, int) else _Bad(columns.NOT_AN_INTEGER[1])
    if column.type == "int" and isinstance(value, float):  # FP for an int feature
        if not math.isfinite(value):
            return value  # the column check says "finite"
        if not value.is_integer():
            return _Bad("Input should be a valid integer, got a number with a fractional part")
        return int(value)
    return value


def _matrix(spec: UseCaseSpec, tensor: InferInput) -> tuple[int, dict[str, list[Any]]]:
    """One [n, k] tensor of every feature -> (rows, feature -> values)."""
    categorical = [c.name for c in spec.features if c.type == "category"]
    if categorical:
        raise ProtocolError(
            "a single [n, k] tensor is taken only when every feature is numeric; this model "
            f"has categorical features ({', '.join(categorical)}): send one tensor per feature"
        )
    k = len(spec.features)
    if tensor.datatype != MATRIX_DATATYPE:
        raise ProtocolError(f"input 0: a single tensor of all features must be {MATRIX_DATATYPE}")
    if len(tensor.shape) != 2 or tensor.shape[1] != k or tensor.shape[0] < 0:
        raise ProtocolError(
            f"input 0: a single tensor of all features must have shape [n, {k}] (its "
            "columns in the order GET /v2/models/{model} lists the inputs); or name one "
            "tensor per feature"
        )
    rows = tensor.shape[0]
    data = _flat(tensor.data)
    if len(data) != rows * k:
        raise ProtocolError(f"input 0: shape says {rows * k} values, data holds {len(data)}")
    by_feature: dict[str, list[Any]] = {}
    lines = []
    for j, column in enumerate(spec.features):
        values = []
        for row in range(rows):
            converted = _convert(column, MATRIX_DATATYPE, data[row * k + j])
            if isinstance(converted, _Bad):
                lines.append(f"feature {column.name}, row {row}: {converted.message}")
                break
            values.append(converted)
        by_feature[column.name] = values
    if lines:
        raise ProtocolError(_join(lines))
    return rows, by_feature


def requested(request: InferRequest) -> list[str]:
    """The outputs to answer, in the order asked (default: all).

    Raises:
        ProtocolError: an output this model does not have (named by position).
    """
    if not request.outputs:
        return list(OUTPUTS)
    unknown = [i for i, o in enumerate(request.outputs) if o.name not in OUTPUTS]
    if unknown:
        raise ProtocolError(
            f"requested output(s) at position {', '.join(map(str, unknown))} are not outputs "
            f"of this model ({', '.join(OUTPUTS)})"
        )
    return [o.name for o in request.outputs]


def response_columns(
    spec: UseCaseSpec, version: str, request_id: str, data: dict[str, list[Any]]
) -> dict[str, Any]:
    """The ``InferResponse`` for predictions given as columns: output name -> one value
    per row, in the order the outputs are answered."""
    return {
        "model_name": spec.name,
        "model_version": version,
        "id": request_id,
        "outputs": [
            {
                "name": name,
                "datatype": OUTPUT_DATATYPES[name],
                "shape": [len(values)],
                "data": values,
            }
            for name, values in data.items()
        ],
    }


def metadata(spec: UseCaseSpec, version: str | None) -> dict[str, Any]:
    """``GET /v2/models/<use case>``: the inputs in the order a single [n, k] tensor
    takes them, and the outputs."""
    return {
        "name": spec.name,
        "versions": [version] if version else [],
        "platform": PLATFORM,
        "inputs": [
            {"name": c.name, "datatype": DATATYPES[c.type][0], "shape": [-1]} for c in spec.features
        ],
        "outputs": [{"name": n, "datatype": OUTPUT_DATATYPES[n], "shape": [-1]} for n in OUTPUTS],
    }


def server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": "clinml", "version": version, "extensions": []}
