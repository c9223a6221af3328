"""The reference profile: what the first accepted batch looked like.

The quality gate checks every batch against the spec's hard limits *and* against this
profile, learned from the reference data: each numeric column's observed range, each
column's null rate, each category column's observed categories, and the positive-label
rate. A batch that drifts far from the reference (a unit change, a broken feed, a label
pipeline that stopped) fails even when every value is within the spec's limits.

The profile holds ranges, rates and category names only, never row values or ids.
It lives at ``$CLINML_HOME/<usecase>/quality/profile.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from clinml.spec import UseCaseSpec


@dataclass(frozen=True)
class ColumnProfile:
    null_rate: float
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None


@dataclass(frozen=True)
class QualityProfile:
    usecase: str
    rows: int
    learned_at: str
    spec_sha256: str
    label_rate: float | None
    labelled_rows: int
    columns: dict[str, ColumnProfile] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path) -> QualityProfile:
        raw = json.loads(path.read_text())
        columns = {name: ColumnProfile(**values) for name, values in raw.pop("columns").items()}
        return cls(**raw, columns=columns)


def positive_label(frame: pd.DataFrame, spec: UseCaseSpec) -> pd.Series:
    """1.0 for the positive class, 0.0 for the negative, NaN where the label is unknown."""
    label = frame[spec.label.column]
    return (label == spec.label.positive_class).astype(float).where(label.notna())


def learn(frame: pd.DataFrame, spec: UseCaseSpec, now: datetime) -> QualityProfile:
    """Profile a batch that passed the spec's own checks."""
    columns: dict[str, ColumnProfile] = {}
    for column in spec.columns:
        values = frame[column.name]
        null_rate = float(values.isna().mean()) if len(values) else 0.0
        if column.is_numeric:
            present = values.dropna()
            columns[column.name] = ColumnProfile(
                null_rate=null_rate,
                min=float(present.min()) if len(present) else None,
                max=float(present.max()) if len(present) else None,
            )
        else:
            seen = sorted(str(v) for v in values.dropna().unique())
            columns[column.name] = ColumnProfile(null_rate=null_rate, categories=seen)
    positive = positive_label(frame, spec).dropna()
    return QualityProfile(
        usecase=spec.name,
        rows=len(frame),
        learned_at=pd.Timestamp(now).isoformat(),
        spec_sha256=spec.fingerprint(),
        label_rate=float(positive.mean()) if len(positive) else None,
        labelled_rows=len(positive),
        columns=columns,
    )
