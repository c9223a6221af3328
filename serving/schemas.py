"""HTTP request and response schemas, generated from the use-case spec.

A record has exactly the spec's features, each typed and range-checked from the spec:
floats and ints are strict (no strings, no booleans, no NaN or infinity), categories are
enumerations. Validation errors name the field but never echo the submitted value.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model
from typing_extensions import TypedDict

from clinml.serving import columns
from clinml.spec import ColumnSpec, UseCaseSpec

RECORD_CONFIG = ConfigDict(
    extra="forbid",
    hide_input_in_errors=True,  # errors must never echo submitted (possibly PHI) values
    allow_inf_nan=False,
    frozen=True,
)


def _field(column: ColumnSpec) -> tuple[Any, Any]:
    description = column.description + (f" [{column.unit}]" if column.unit else "")
    if column.type == "category":
        return Literal[tuple(column.categories or ())], Field(description=description)
    python_type: Any = float if column.type == "float" else int
    if column.nullable:  # the key is still required; null says "not measured"
        python_type = python_type | None
    return python_type, Field(
        ge=column.min, le=column.max, strict=True, description=description.strip()
    )


class ModelRef(BaseModel):
    """The registered model version that produced an answer."""

    name: str
    version: str
    alias: str


class Prediction(BaseModel):
    """One record's prediction."""

    probability: float = Field(description="Probability of the positive class.")
    label: str = Field(description="Predicted class at the model's operating threshold.")
    risk_band: str = Field(description="The probability's band (spec: serving.risk_bands).")


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    operating_threshold: float
    predictions: list[Prediction] = Field(description="One per record, in request order.")


class Contribution(BaseModel):
    feature: str
    contribution: float


class Explanation(BaseModel):
    probability: float
    label: str
    risk_band: str
    contributions: list[Contribution] = Field(description="Top features by |contribution|.")


class ExplainResponse(BaseModel):
    request_id: str
    model: ModelRef
    method: str = Field(description="How contributions were computed for this model type.")
    explanations: list[Explanation] = Field(description="One per record, in request order.")


class ErrorResponse(BaseModel):
    """Every error answer: what went wrong, never the submitted values."""

    detail: Any


STRICT = ConfigDict(extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Schemas:
    record: type[BaseModel]
    records: Any  # Annotated[list[record], length bounds]
    predict_request: type[BaseModel]
    explain_request: type[BaseModel]
    patient_request: type[BaseModel]
    # ``predict_request`` with TypedDict records: the same rules, validated straight from
    # JSON into plain dicts (no record objects to dump again); /predict uses it.
    predict_dicts: type[BaseModel]
    # every field name these schemas know: what an error's location may name
    names: frozenset[str] = frozenset()
    # ``explain_request`` with TypedDict records, as ``predict_dicts``; /explain uses it.
    explain_dicts: type[BaseModel] | None = None


UNEXPECTED = "(unexpected field)"


def error_location(loc: Any, names: frozenset[str]) -> list[Any]:
    """A validation error's location without anything the caller made up: the name of an
    unexpected field is text the caller sent (it may be a patient's name), so it is
    replaced; positions and the schema's own names are kept."""
    return [part if isinstance(part, int) or part in names else UNEXPECTED for part in loc]


def risk_band(probability: float, threshold: float, bands: list[tuple[str, float]] | None) -> str:
    """The band of a probability: the spec's bands, or low / elevated / high by threshold."""
    if bands is None:
        if probability >= threshold:
            return "high"
        return "elevated" if probability >= threshold / 2 else "low"
    for name, upper in bands:
        if probability < upper:
            return name
    return bands[-1][0]


def band_names(bands: list[tuple[str, float]] | None) -> list[str]:
    """The names :func:`risk_band_codes` indexes: the spec's bands, or low / elevated / high."""
    return ["low", "elevated", "high"] if bands is None else [name for name, _ in bands]


def risk_band_code(
    probability: float, threshold: float, bands: list[tuple[str, float]] | None
) -> int:
    """:func:`risk_band` as a position in :func:`band_names`: :func:`risk_band_codes`
    for one probability, in plain Python."""
    if bands is None:
        return 2 if probability >= threshold else 1 if probability >= threshold / 2 else 0
    for i, (_, upper) in enumerate(bands):
        if probability < upper:
            return i
    return len(bands) - 1


def risk_band_codes(
    probabilities: np.ndarray, threshold: float, bands: list[tuple[str, float]] | None
) -> np.ndarray:
    """:func:`risk_band` of every probability at once, as positions in
    :func:`band_names` (int64): the same comparisons, so the same band for every value,
    NaN included."""
    p = np.asarray(probabilities, dtype=np.float64)
    if bands is None:
        return np.where(p >= threshold, 2, np.where(p >= threshold / 2, 1, 0)).astype(np.int64)
    codes = np.full(p.shape, len(bands) - 1, dtype=np.int64)
    for i in range(len(bands) - 1, -1, -1):  # the first band whose bound it is below wins
        codes[p < bands[i][1]] = i
    return codes


@dataclass(frozen=True)
class Answer:
    """One request's predictions, column by column: what ``/predict``,
    ``/predict_patient`` and the Open Inference Protocol answer, the audit record counts
    and the prediction log holds. Each is a :class:`Prediction`: the probability, the
    label at the operating threshold, the risk band (:func:`risk_band`). Made by
    :meth:`Answering.answer`."""

    probability: np.ndarray  # float64, in request order
    # 1 at or above the operating threshold, else 0; and positions in
    # Answering.band_names: int64 arrays, or lists of ints for a few predictions
    # (Answering.answer)
    positive: np.ndarray | list[int]
    band: np.ndarray | list[int]
    model: ModelRef
    threshold: float
    answering: Answering

    def labels(self) -> list[str]:
        if isinstance(self.positive, list):
            names = self.answering.label_list
            return [names[i] for i in self.positive]
        return self.answering.label_names[self.positive].tolist()  # type: ignore[no-any-return]

    def bands(self) -> list[str]:
        if isinstance(self.band, list):
            names = self.answering.band_list
            return [names[i] for i in self.band]
        return self.answering.band_names[self.band].tolist()  # type: ignore[no-any-return]

    def label_counts(self) -> dict[str, int]:
        """How many predictions have each label (the labels that occur)."""
        negative, positive = self.answering.label_list
        positive_rows = self.positive
        positives = int(
            sum(positive_rows) if isinstance(positive_rows, list) else positive_rows.sum()
        )
        counts = {positive: positives, negative: len(self.positive) - positives}
        return {label: count for label, count in counts.items() if count}

    def predictions(self) -> list[dict[str, Any]]:
        """One :class:`Prediction` (as a dict) per record."""
        return [
            {"probability": p, "label": label, "risk_band": band}
            for p, label, band in zip(
                self.probability.tolist(), self.labels(), self.bands(), strict=True
            )
        ]


class Answering:
    """How a use case's predictions are answered, for whole columns of probabilities at
    once: labels with one comparison, bands with :func:`risk_band_codes`, and the
    ``PredictResponse`` body written in one go (:meth:`body`). A few predictions (at
    most ``columns.SMALL_ROWS``) are answered in plain Python, the same comparisons: for one
    record, numpy's fixed cost per call was most of the answer's (issue 22)."""

    _HEAD = '{"probability":'

    def __init__(self, spec: UseCaseSpec) -> None:
        self.bands = spec.serving.risk_bands
        self.label_names = np.array(
            [spec.label.negative_class, spec.label.positive_class], dtype=object
        )
        self.band_names = np.array(band_names(self.bands), dtype=object)
        self.label_list: list[str] = self.label_names.tolist()
        self.band_list: list[str] = self.band_names.tolist()
        # A prediction's JSON after its probability, by (label, band), as json.dumps
        # writes it.
        self._tails = np.array(
            [
                [
                    ',"label":' + json.dumps(label) + ',"risk_band":' + json.dumps(band) + "}"
                    for band in self.band_names
                ]
                for label in self.label_names
            ],
            dtype=object,
        )
        self._tail_list: list[list[str]] = self._tails.tolist()
        self._heads: dict[tuple[str, str | None, str | None, float], str] = {}

    def answer(self, probability: Any, threshold: float, model: ModelRef) -> Answer:
        p = np.asarray(probability, dtype=np.float64)
        if len(p) <= columns.SMALL_ROWS:
            values = p.tolist()
            return Answer(
                p,
                [1 if value >= threshold else 0 for value in values],
                [risk_band_code(value, threshold, self.bands) for value in values],
                model,
                threshold,
                self,
            )
        return Answer(
            p,
            (p >= threshold).astype(np.int64),
            risk_band_codes(p, threshold, self.bands),
            model,
            threshold,
            self,
        )

    def body(self, request_id: str, answer: Answer) -> bytes:
        """``answer`` as a ``PredictResponse``: byte for byte what
        ``json.dumps(..., separators=(",", ":"))`` writes for the same dict, assembled
        from whole columns (each probability's ``repr``, as json writes a float, then
        its label and band)."""
        head = (
            '{"request_id":' + json.dumps(request_id) + self._head(answer.model, answer.threshold)
        )
        values = answer.probability.tolist()
        if not values or not all(map(math.isfinite, values)):  # json's own NaN and Infinity
            items = json.dumps(answer.predictions(), separators=(",", ":"))
            return (head[:-1] + items + "}").encode("utf-8")
        if isinstance(answer.positive, list):
            rows = self._tail_list
            tails = [rows[i][j] for i, j in zip(answer.positive, answer.band, strict=True)]
        else:
            tails = self._tails[answer.positive, answer.band].tolist()
        items = self._HEAD + ("," + self._HEAD).join(
            map(operator.add, map(float.__repr__, values), tails)
        )
        return (head + items + "]}").encode("utf-8")

    def _head(self, model: ModelRef, threshold: float) -> str:
        """The answer's JSON from after the request id to the first prediction, as
        ``json.dumps`` writes it; made once per model and threshold."""
        key = (model.name, model.version, model.alias, threshold)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= 64:  # a long-running service sees few models
                self._heads.clear()
            rest = {
                "model": {"name": model.name, "version": model.version, "alias": model.alias},
                "operating_threshold": threshold,
                "predictions": [],
            }
            head = self._heads[key] = "," + json.dumps(rest, separators=(",", ":"))[1:-2]
        return head


def _ids_description(spec: UseCaseSpec) -> str:
    """What ``patient_ids`` holds: the raw ids callers know, never the stored pseudonyms."""
    key = spec.entity.key
    return (
        f"{spec.entity.name.capitalize()} ids as in the source data ({key}), not "
        "pseudonyms: the service pseudonymises them before reading the online store. "
        f"`clinml patients sample {spec.name}` prints some it answers for."
    )


def build(spec: UseCaseSpec, max_records: int, max_explain_records: int | None = None) -> Schemas:
    """The request schemas for ``spec``: a record model and the endpoints' bodies.

    ``/explain`` takes at most ``max_explain_records`` records (and ``max_records``), so
    that every request the schema allows is one the service answers."""
    explain_max = min(max_records, max_explain_records or max_records)
    fields = {column.name: _field(column) for column in spec.features}
    stem = "".join(part.capitalize() for part in spec.name.split("_"))
    record = create_model(f"{stem}Record", __config__=RECORD_CONFIG, **fields)
    record.__doc__ = f"Features of one {spec.entity.name} for the {spec.name} model."
    records = Annotated[list[record], Field(min_length=1, max_length=max_records)]
    predict_request = create_model(
        "PredictRequest", __config__=STRICT, records=(records, Field(description="1-N records."))
    )
    explain_records = Annotated[list[record], Field(min_length=1, max_length=explain_max)]
    explain_request = create_model(
        "ExplainRequest",
        __config__=STRICT,
        records=(explain_records, Field(description=f"1-{explain_max} records.")),
        top_k=(int, Field(default=5, ge=1, le=len(spec.features))),
    )
    ids = Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]],
        Field(min_length=1, max_length=max_records),
    ]
    patient_request = create_model(
        "PatientRequest",
        __config__=STRICT,
        patient_ids=(ids, Field(description=_ids_description(spec))),
        as_of=(
            datetime | None,
            Field(default=None, description="Time the features are needed for (default: now)."),
        ),
    )
    # The same fields and rules, validated into dicts: TypedDict records (which carry
    # their config as an attribute) in a model whose config covers every error.
    record_dict = TypedDict(  # type: ignore[misc]
        f"{stem}RecordDict",
        {name: Annotated[kind, info] for name, (kind, info) in fields.items()},
    )
    record_dict.__pydantic_config__ = RECORD_CONFIG  # type: ignore[attr-defined]
    record_dicts = Annotated[list[record_dict], Field(min_length=1, max_length=max_records)]  # type: ignore[valid-type]
    predict_dicts = create_model("PredictRequest", __config__=STRICT, records=(record_dicts, ...))
    explain_dicts = create_model(
        "ExplainRequest",
        __config__=STRICT,
        records=(
            Annotated[list[record_dict], Field(min_length=1, max_length=explain_max)],  # type: ignore[valid-type]
            ...,
        ),
        top_k=(int, Field(default=5, ge=1, le=len(spec.features))),
    )
    names = frozenset(
        [*fields, "body", "records", "top_k", "patient_ids", "as_of", *spec.feature_names]
    )
    return Schemas(
        record,
        records,
        predict_request,
        explain_request,
        patient_request,
        predict_dicts,
        names,
        explain_dicts,
    )
