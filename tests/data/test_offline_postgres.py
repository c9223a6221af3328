"""Ingestion into a real PostgreSQL offline store: what is read back, and all or nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pandas as pd
import pytest

from tests.services import PG_HOST, PG_PORT, PG_USER, require_services, scratch_database

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def database():
    require_services()
    with scratch_database() as name:
        yield name


@pytest.fixture
def tables(database: str):
    from clinml.features.offline import PostgresTables

    config = {
        "host": PG_HOST,
        "port": PG_PORT,
        "database": database,
        "db_schema": "offline",
        "user": PG_USER,
        "password": "unused",
        "sslmode": "disable",
    }
    return PostgresTables(config, f"t{uuid.uuid4().hex[:8]}_tiny")


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": ["ps_a", "ps_b", "ps_c"],
            "event_timestamp": pd.to_datetime(
                [
                    "2026-01-01T08:00:00.000000Z",
                    "2026-01-02T09:30:00.123456Z",
                    "2026-01-03T00:00:00.000000Z",
                ]
            ),
            "heart_rate": [72.5, None, 110.25],
            "visits": pd.array([1, None, 3], dtype="Int64"),
            "count": [4, 5, 6],
            "ward": ["icu", None, "medical"],
        }
    )


def test_frames_come_back_as_they_were_written(tables) -> None:
    frame = _frame()
    assert tables.read("features") is None and not tables.exists("features")
    tables.replace({"features": frame, "labels": frame[["patient_id", "event_timestamp"]]})
    back = tables.read("features")
    pd.testing.assert_frame_equal(back, frame, check_dtype=True)
    assert tables.earliest("event_timestamp") == datetime(2026, 1, 1, 8, tzinfo=UTC)
    assert len(tables.read("labels")) == 3


def test_a_failed_replace_leaves_both_tables_as_they_were(tables, monkeypatch) -> None:
    from clinml.features import offline

    first = _frame()
    tables.replace({"features": first, "labels": first[["patient_id", "event_timestamp"]]})
    calls = {"n": 0}
    real_rows = offline._python_rows

    def fail_on_the_second_table(frame):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("connection lost mid-copy")
        return real_rows(frame)

    monkeypatch.setattr(offline, "_python_rows", fail_on_the_second_table)
    second = _frame().assign(heart_rate=[1.0, 2.0, 3.0])
    with pytest.raises(OSError, match="mid-copy"):
        tables.replace({"features": second, "labels": second[["patient_id", "event_timestamp"]]})
    pd.testing.assert_frame_equal(tables.read("features"), first)
    with tables.connect() as connection:  # no staged table left behind
        names = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (tables.schema,)
        ).fetchall()
    assert sorted(n for (n,) in names if n.startswith(tables.project)) == [
        tables.table("features"),
        tables.table("labels"),
    ]


def test_an_unreachable_store_is_a_clear_error_without_the_password(tables) -> None:
    from clinml.features.offline import OfflineStoreUnavailable, PostgresTables

    config = {**tables.config, "port": 1, "password": "s3cr3t"}
    with pytest.raises(OfflineStoreUnavailable, match="does not answer") as info:
        PostgresTables(config, tables.project).read("features")
    assert "s3cr3t" not in str(info.value)


def test_ingest_appends_into_the_tables(tables, tmp_path, tiny_spec, tiny_frame) -> None:
    """`ingest --append` merges with what the tables hold, as with parquet files."""
    from clinml.features import ingest
    from clinml.pseudonym import Pseudonymiser
    from clinml.settings import Paths

    paths = Paths(tmp_path).usecase("tiny")
    pseudonymiser = Pseudonymiser("test-key")
    now = datetime.now(UTC)
    half = len(tiny_frame) // 2
    ingest.run(tiny_spec, paths, now, pseudonymiser, frame=tiny_frame.iloc[:half], tables=tables)
    stored = tables.read("features")
    assert len(stored) == half and "mrn" not in stored.columns
    result = ingest.run(
        tiny_spec, paths, now, pseudonymiser, frame=tiny_frame, append=True, tables=tables
    )
    assert result.added_rows == len(tiny_frame) - half
    assert len(tables.read("features")) == len(tiny_frame)
    labels = ingest.read_labels(tiny_spec, paths, tables=tables)
    assert len(labels) == tiny_frame[tiny_spec.label.column].notna().sum()
    # the local files mirror the committed run, and every read came from PostgreSQL
    assert ingest.has_data(paths, tables)
