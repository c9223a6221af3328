"""Ingestion: pseudonymised ids, append semantics, labels known later, generated keys."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from clinml.features import ingest
from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from tests.conftest import NOW, PSEUDONYMISER, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Great Expectations


def with_known_at(spec: UseCaseSpec) -> UseCaseSpec:
    return spec.model_copy(
        update={"label": spec.label.model_copy(update={"known_at": "label_time"})}
    )


def labelled_later(frame: pd.DataFrame, unknown: slice) -> pd.DataFrame:
    """Labels become known 30 days after the event; some are not known yet."""
    frame = frame.assign(label_time=frame["event_timestamp"] + timedelta(days=30))
    frame.loc[frame.index[unknown], "outcome"] = None
    return frame


def test_patient_ids_are_pseudonymised_before_anything_is_stored(tiny_spec, tmp_path: Path) -> None:
    frame = make_tiny_frame(n=100)
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=frame)
    stored = pd.read_parquet(paths.features_file)
    assert set(stored["patient_id"]) == set(PSEUDONYMISER.many(frame["patient_id"]))
    raw_bytes = paths.features_file.read_bytes() + paths.labels_file.read_bytes()
    for raw_id in frame["patient_id"].head(20):
        assert raw_id.encode() not in raw_bytes


def test_append_adds_new_rows_keeps_stored_ones_and_fills_in_labels(
    tiny_spec, tmp_path: Path
) -> None:
    spec = with_known_at(tiny_spec)
    paths = Paths(tmp_path).usecase(spec.name)
    whole = make_tiny_frame(n=300, seed=5)
    first = labelled_later(whole.iloc[:200].copy(), slice(150, 200))  # 50 labels unknown yet
    second = labelled_later(whole.iloc[150:].copy(), slice(0, 0))  # they are known now

    one = ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=first)
    assert (one.rows, one.added_rows, one.labelled_rows) == (200, 200, 150)
    assert len(pd.read_parquet(paths.labels_file)) == 150

    two = ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=second, append=True)
    assert two.added_rows == 100  # 50 of its 150 rows were stored already
    features = pd.read_parquet(paths.features_file)
    labels = pd.read_parquet(paths.labels_file)
    assert len(features) == 300 and not features.duplicated(["patient_id", "event_timestamp"]).any()
    assert len(labels) == 300 and labels["outcome"].notna().all()
    assert list(labels.columns) == ["patient_id", "event_timestamp", "outcome", "label_time"]

    replaced = ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=first)  # no append: replace
    assert replaced.added_rows == 200 and len(pd.read_parquet(paths.features_file)) == 200


def test_training_events_are_the_labels_known_by_then(tiny_spec, tmp_path: Path) -> None:
    spec = with_known_at(tiny_spec)
    paths = Paths(tmp_path).usecase(spec.name)
    frame = labelled_later(make_tiny_frame(n=200, seed=6), slice(0, 0))
    ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=frame)
    cutoff = frame["label_time"].sort_values().iloc[99]
    events = ingest.read_labels(spec, paths, now=cutoff)
    assert len(events) == 100
    assert list(events.columns) == ["patient_id", "event_timestamp", "outcome"]
    assert len(ingest.read_labels(spec, paths)) == 200


def test_data_without_ids_or_timestamps_gets_stable_generated_ones(
    tiny_spec, tmp_path: Path
) -> None:
    spec = tiny_spec.model_copy(
        update={
            "entity": tiny_spec.entity.model_copy(update={"generated": True}),
            "event_timestamp_generated": True,
        }
    )
    frame = make_tiny_frame(n=50).drop(columns=["patient_id", "event_timestamp"])
    frame = pd.concat([frame, frame.iloc[[0]]], ignore_index=True)  # an exact duplicate row
    paths = Paths(tmp_path).usecase(spec.name)
    result = ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=frame)
    stored = pd.read_parquet(paths.features_file)
    assert result.patients == 51  # every row is its own patient, duplicates included
    assert (stored["event_timestamp"] == pd.Timestamp(NOW)).all()
    ingest.run(spec, paths, NOW + timedelta(days=1), PSEUDONYMISER, frame=frame)
    again = pd.read_parquet(paths.features_file)
    assert set(again["patient_id"]) == set(stored["patient_id"])  # same file, same keys
