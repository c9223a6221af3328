"""The data-quality gate: good batches pass, bad batches stop ingestion and write nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.errors import DataValidationError
from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from features import ingest
from features.validate import validate_frame
from tests.conftest import NOW, PSEUDONYMISER, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Great Expectations


def test_a_clean_batch_passes(tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame) -> None:
    report = validate_frame(ingest.normalise_types(tiny_frame, tiny_spec), tiny_spec)
    assert report.success, report.failures
    assert report.rows == len(tiny_frame)
    assert report.checked > 20


def _corrupt(frame: pd.DataFrame) -> pd.DataFrame:
    bad = frame.copy()
    bad.loc[0:2, "heart_rate"] = 900.0  # out of range
    bad.loc[3, "creatinine"] = np.nan  # null
    bad.loc[4:5, "ward"] = "SECRET-WARD"  # unknown category
    bad.loc[6, "outcome"] = "maybe"  # unknown label
    bad["event_timestamp"] = bad["event_timestamp"].astype(object)
    bad.loc[7, "event_timestamp"] = "not a date"  # unparseable timestamp
    return bad.drop(columns=["site"])  # missing attribute


def test_failures_name_columns_and_counts_never_values(
    tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame
) -> None:
    report = validate_frame(ingest.normalise_types(_corrupt(tiny_frame), tiny_spec), tiny_spec)
    assert not report.success
    text = "\n".join(report.failures)
    assert "heart_rate: 3 of 300 rows (1.0%) outside the allowed range [20.0, 250.0]" in text
    assert "creatinine: 1 of 300 rows (0.3%) are null" in text
    assert "ward: 2 of 300 rows (0.7%) not in the allowed values {medical, surgical, icu}" in text
    assert "outcome: 1 of 300 rows (0.3%) not in the allowed values {yes, no}" in text
    assert "event_timestamp: 1 of 300 rows (0.3%) are null" in text
    assert "site: column is missing" in text
    assert len([line for line in report.failures if line.startswith("site:")]) == 1
    assert "SECRET" not in text and "900" not in text


def test_wrong_types_are_reported(tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame) -> None:
    bad = tiny_frame.astype({"heart_rate": object})
    bad.loc[0, "heart_rate"] = "fast"
    report = validate_frame(ingest.normalise_types(bad, tiny_spec), tiny_spec)
    assert report.failures == [
        "heart_rate: has type object, expected one of float64, float32, int64"
    ]


def test_duplicate_events_are_reported(tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame) -> None:
    bad = pd.concat([tiny_frame, tiny_frame.head(2)], ignore_index=True)
    report = validate_frame(ingest.normalise_types(bad, tiny_spec), tiny_spec)
    assert any("share an entity and timestamp" in line for line in report.failures)


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_failing_batch_writes_nothing(tiny_spec: UseCaseSpec, tmp_path: Path) -> None:
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    first = ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=make_tiny_frame(seed=1))
    assert first.rows == 300 and first.dropped_identifiers == ["mrn"]
    before = _digest(tmp_path)
    rows_before = len(pd.read_parquet(paths.features_file))

    with pytest.raises(DataValidationError) as caught:
        ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=_corrupt(make_tiny_frame(seed=2)))
    assert "Nothing was written" in str(caught.value)
    assert "SECRET" not in str(caught.value)
    assert _digest(tmp_path) == before
    assert len(pd.read_parquet(paths.features_file)) == rows_before


def test_a_first_failing_batch_creates_no_files(tiny_spec: UseCaseSpec, tmp_path: Path) -> None:
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    with pytest.raises(DataValidationError):
        ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=_corrupt(make_tiny_frame()))
    assert list(tmp_path.iterdir()) == []


def test_identifier_columns_never_reach_the_offline_store(
    tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    frame = make_tiny_frame()
    ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=frame)
    stored = pd.concat(
        [pd.read_parquet(paths.features_file), pd.read_parquet(paths.labels_file)], axis=1
    )
    assert "mrn" not in stored.columns
    assert not stored.astype(str).isin(frame["mrn"].tolist()).any().any()
