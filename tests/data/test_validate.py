"""The quality gate: spec limits, learned expectations, safe reports, nothing written on failure."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.errors import DataValidationError
from clinml.features import ingest
from clinml.features import store as feature_store
from clinml.features.profile import QualityProfile, learn
from clinml.features.validate import validate_frame, write_report
from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from tests.conftest import NOW, PSEUDONYMISER, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Great Expectations


def check(frame: pd.DataFrame, spec: UseCaseSpec, profile: QualityProfile | None = None):
    return validate_frame(ingest.normalise_types(frame, spec), spec, profile)


def test_a_clean_batch_passes(tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame) -> None:
    report = check(tiny_frame, tiny_spec)
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


def test_failures_name_columns_counts_and_rows_never_values(
    tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame, tmp_path: Path
) -> None:
    report = check(_corrupt(tiny_frame), tiny_spec)
    assert not report.success
    assert set(report.failures) == {
        "site: column is missing",
        "event_timestamp: 1 of 300 rows (0.3%) are null",
        "heart_rate: 3 of 300 rows (1.0%) are outside the declared range [20, 250]",
        "creatinine: 1 of 300 rows (0.3%) are null",
        "outcome: 1 of 300 rows (0.3%) are not one of the two classes",
        "ward: 2 of 300 rows (0.7%) are not a declared category",
    }
    assert report.failures[0] == "site: column is missing"  # schema problems first
    by_column = {f.column: f for f in report.details}
    assert by_column["heart_rate"].row_indices == [0, 1, 2]
    assert by_column["ward"].row_indices == [4, 5]
    assert by_column["creatinine"].row_indices == [3]

    json_path, md_path = write_report(report, tiny_spec, tmp_path / "report")
    summary = json.loads(json_path.read_text())
    assert summary["success"] is False and len(summary["failures"]) == 6
    assert {f["column"]: f["row_indices"] for f in summary["failures"]}["heart_rate"] == [0, 1, 2]
    markdown = md_path.read_text()
    assert (
        "| heart_rate | 3 of 300 rows (1.0%) are outside the declared range [20, 250] |" in markdown
    )
    for text in (json_path.read_text(), markdown, "\n".join(report.failures)):
        assert "SECRET" not in text and "900" not in text and "maybe" not in text


def test_a_renamed_or_retyped_column_is_named(
    tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame
) -> None:
    renamed = check(tiny_frame.rename(columns={"creatinine": "creatinine_umol"}), tiny_spec)
    assert renamed.failures == ["creatinine: column is missing (renamed to 'creatinine_umol'?)"]
    retyped = tiny_frame.astype({"heart_rate": object})
    retyped.loc[0, "heart_rate"] = "fast"
    assert check(retyped, tiny_spec).failures == [
        "heart_rate: has type object, expected one of float64, float32, int64"
    ]


def test_duplicate_events_are_reported(tiny_spec: UseCaseSpec, tiny_frame: pd.DataFrame) -> None:
    report = check(pd.concat([tiny_frame, tiny_frame.head(2)], ignore_index=True), tiny_spec)
    [failure] = report.details
    assert failure.column == "patient_id+event_timestamp" and failure.row_indices == [
        0,
        1,
        300,
        301,
    ]
    assert failure.message.endswith(
        "4 of 302 rows (1.3%) share an entity and timestamp with another row"
    )


def test_learned_expectations_catch_what_the_spec_allows(tiny_spec: UseCaseSpec) -> None:
    reference = make_tiny_frame(n=2000, seed=21)
    profile = learn(ingest.normalise_types(reference, tiny_spec), tiny_spec, NOW)
    assert profile.columns["ward"].categories == ["icu", "medical", "surgical"]
    assert 0.3 < profile.label_rate < 0.7

    same = make_tiny_frame(n=500, seed=22)
    assert check(same, tiny_spec, profile).success

    # A feed that reports creatinine three times too high stays inside the spec's
    # [0.1, 20] but not inside the reference's range: the hard limits cannot see it.
    unit_change = same.assign(creatinine=same["creatinine"] * 3)
    [failure] = check(unit_change, tiny_spec, profile).details
    assert failure.column == "creatinine" and failure.source == "learned"
    assert failure.message.startswith("creatinine: ") and "reference range" in failure.message

    label_flood = same.assign(outcome="yes")
    [failure] = check(label_flood, tiny_spec, profile).details
    assert failure.column == "label" and failure.observed == 1.0
    assert failure.message.startswith("label: positive rate 100.0% is outside [")


def test_categories_the_reference_never_had_are_flagged(tiny_spec: UseCaseSpec) -> None:
    reference = make_tiny_frame(n=1000, seed=23)
    reference = reference[reference["ward"] != "icu"]  # the reference saw no ICU patients
    profile = learn(ingest.normalise_types(reference, tiny_spec), tiny_spec, NOW)
    batch = make_tiny_frame(n=300, seed=24)
    [failure] = check(batch, tiny_spec, profile).details
    assert failure.column == "ward" and failure.message.endswith(
        "in a category the reference never had (learned)"
    )


def _state(paths) -> dict[str, object]:
    """Row counts and checksums of the offline files and the online store."""
    state: dict[str, object] = {}
    for path in (paths.features_file, paths.labels_file):
        state[path.name] = (
            len(pd.read_parquet(path)),
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
    online = paths.feast_repo / "online.db"
    with sqlite3.connect(online) as connection:
        [(rows,)] = connection.execute('SELECT COUNT(*) FROM "tiny_tiny_features"').fetchall()
        digest = hashlib.sha256(
            repr(
                connection.execute('SELECT * FROM "tiny_tiny_features" ORDER BY 1, 2').fetchall()
            ).encode()
        ).hexdigest()
    state["online"] = (rows, digest)
    state["profile"] = hashlib.sha256(paths.quality_profile.read_bytes()).hexdigest()
    return state


def test_a_failing_batch_writes_nothing_to_the_offline_or_online_store(
    tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    first = ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=make_tiny_frame(seed=1))
    assert first.rows == 300 and first.dropped_identifiers == ["mrn"] and first.learned_profile
    store = feature_store.open_store(tiny_spec, paths)
    feature_store.apply(store, tiny_spec, paths)
    feature_store.materialize(store, tiny_spec, NOW)
    before = _state(paths)
    assert before["features.parquet"][0] == 300 and before["online"][0] == 300 * 4

    for bad in (_corrupt(make_tiny_frame(seed=2)), make_tiny_frame(seed=3).assign(outcome="yes")):
        with pytest.raises(DataValidationError) as caught:
            ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=bad, append=True)
        assert "Nothing was written" in str(caught.value) and "SECRET" not in str(caught.value)
        assert Path(caught.value.report).is_file()
        assert _state(paths) == before


def test_a_first_failing_batch_creates_no_data(tiny_spec: UseCaseSpec, tmp_path: Path) -> None:
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    with pytest.raises(DataValidationError):
        ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=_corrupt(make_tiny_frame()))
    assert not paths.offline.exists() and not paths.quality_profile.exists()
    [report_dir] = paths.validation_reports.iterdir()
    assert (report_dir / "report.md").is_file() and (report_dir / "summary.json").is_file()


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
