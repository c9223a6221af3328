"""HTTP request and response schemas, generated from the use-case spec.

A record has exactly the spec's features, each typed and range-checked from the spec:
floats and ints are strict (no strings, no booleans, no NaN or infinity), categories are
enumerations. Validation errors name the field but never echo the submitted value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

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
    python_type = float if column.type == "float" else int
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


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    operating_threshold: float
    predictions: list[Prediction] = Field(description="One per record, in request order.")


@dataclass(frozen=True)
class Schemas:
    record: type[BaseModel]
    records: Any  # Annotated[list[record], length bounds]


def build(spec: UseCaseSpec, max_records: int) -> Schemas:
    """The request schema for ``spec``: a record model and a bounded list of them."""
    fields = {column.name: _field(column) for column in spec.features}
    name = "".join(part.capitalize() for part in spec.name.split("_")) + "Record"
    record = create_model(name, __config__=RECORD_CONFIG, **fields)
    record.__doc__ = f"Features of one {spec.entity.name} for the {spec.name} model."
    records = Annotated[list[record], Field(min_length=1, max_length=max_records)]
    return Schemas(record=record, records=records)
