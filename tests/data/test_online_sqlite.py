"""The bulk SQLite materialization writes exactly what Feast's own materialize writes."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from clinml.features import ingest, online_sqlite
from clinml.features import store as feature_store
from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from tests.conftest import NOW, PSEUDONYMISER, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Feast and Great Expectations


def _published(spec: UseCaseSpec, home: Path, frame: pd.DataFrame):
    paths = Paths(home).usecase(spec.name)
    ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=frame)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    return store


def _table(store, spec: UseCaseSpec) -> pd.DataFrame:
    table = f"{spec.name}_{feature_store.view_name(spec)}"
    query = f'SELECT entity_key, feature_name, value, value_text, event_ts FROM "{table}"'
    with sqlite3.connect(online_sqlite.db_path(store)) as connection:
        rows = pd.read_sql_query(query, connection)
    return rows.sort_values(["entity_key", "feature_name"]).reset_index(drop=True)


def test_bulk_and_feast_materialize_write_identical_rows(
    tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    frame = make_tiny_frame(n=120, seed=8)
    # A second, later row for 40 patients, so "the newest row per entity" matters.
    later = frame.iloc[:40].assign(
        event_timestamp=lambda f: f["event_timestamp"] + timedelta(days=3),
        heart_rate=lambda f: f["heart_rate"] + 1,
    )
    frame = pd.concat([frame, later], ignore_index=True)
    start = frame["event_timestamp"].min().to_pydatetime()
    end = NOW

    feast_store = _published(tiny_spec, tmp_path / "feast", frame)
    feast_store.materialize(start_date=start, end_date=end)
    bulk_store = _published(tiny_spec, tmp_path / "bulk", frame)
    view = bulk_store.get_feature_view(feature_store.view_name(tiny_spec))
    result = online_sqlite.bulk_materialize(bulk_store, tiny_spec, view, start, end)

    assert result.rows_read == 160 and result.entities_written == 120
    assert result.values_written == 120 * len(tiny_spec.columns)
    pd.testing.assert_frame_equal(_table(bulk_store, tiny_spec), _table(feast_store, tiny_spec))

    ids = PSEUDONYMISER.many(frame["patient_id"].unique())
    from_feast = feature_store.online_features(feast_store, tiny_spec, ids)
    from_bulk = feature_store.online_features(bulk_store, tiny_spec, ids)
    pd.testing.assert_frame_equal(from_bulk, from_feast)
    # The registry records the interval, so the next incremental run starts from it.
    recorded = bulk_store.get_feature_view(view.name).most_recent_end_time
    assert recorded is not None and abs(recorded - end) < timedelta(seconds=1)


@pytest.mark.parametrize(
    ("kind", "values", "value_type"),
    [
        ("float", [1.5, -0.0, 1e-300, -2.25e12, None, 3.0], "DOUBLE"),
        ("int", [0, 1, 127, 128, 300, -5, 2**62, None], "INT64"),
        ("category", ["icu", "", "Ünïcödé ward", "x" * 300, None], "STRING"),
    ],
)
def test_value_encoding_matches_feast_both_ways(kind: str, values: list, value_type: str) -> None:
    from feast.infra.online_stores.helpers import extract_text_and_num
    from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
    from feast.value_type import ValueType

    series = pd.Series(
        values, dtype=object if kind == "category" else ("float" if kind == "float" else "Int64")
    )
    blobs, texts = online_sqlite.encode_column(series, kind)
    protos = python_values_to_proto_values(
        [None if v is None else v for v in values], getattr(ValueType, value_type)
    )
    assert blobs == [p.SerializeToString() for p in protos]
    assert texts == [extract_text_and_num(p, False)[0] for p in protos]
    decoded = [online_sqlite.decode_value(b) for b in blobs]
    assert decoded == [
        feast_value_type_to_python_type(p) if v is not None else None
        for p, v in zip(protos, values, strict=True)
    ]


def test_direct_reader_returns_what_feast_returns(tiny_spec: UseCaseSpec, tmp_path: Path) -> None:
    frame = make_tiny_frame(n=80, seed=9)
    store = _published(tiny_spec, tmp_path, frame)
    feature_store.materialize(store, tiny_spec, NOW)
    ids = [*PSEUDONYMISER.many(frame["patient_id"].head(30)), "ps_nobody"]
    direct = online_sqlite.OnlineReader.for_store(store, tiny_spec).read(ids)
    through_feast = feature_store._read_with_feast(store, tiny_spec, ids)
    assert direct[-1] is None and through_feast[-1] is None
    for mine, theirs in zip(direct, through_feast, strict=True):
        if mine is None:
            continue
        assert {k: v for k, v in mine.items() if k in tiny_spec.feature_names} == theirs


def test_a_reader_fails_fast_on_a_lock_and_notices_a_replaced_file(
    tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    import shutil

    frame = make_tiny_frame(n=40, seed=3)
    store = _published(tiny_spec, tmp_path, frame)
    feature_store.materialize(store, tiny_spec, NOW)
    db = online_sqlite.db_path(store)
    reader = online_sqlite.OnlineReader.for_store(store, tiny_spec)
    ids = PSEUDONYMISER.many(frame["patient_id"].head(3))
    assert all(reader.read(ids)) and reader.ping() is None

    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # a writer that holds its lock
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        reader.read(ids)  # after READ_TIMEOUT_S, not SQLite's default 5 s
    holder.rollback()
    holder.close()
    assert all(reader.read(ids))

    moved = db.with_name("moved.db")
    db.rename(moved)
    assert all(reader.read(ids))  # the open connection still reads the old file...
    with pytest.raises(FileNotFoundError):
        reader.ping()  # ...which is why readiness checks the path
    shutil.copy(moved, db)  # same content, another file
    with pytest.raises(FileNotFoundError, match="replaced"):
        reader.ping()
    reader.close()
    fresh = online_sqlite.OnlineReader.for_store(store, tiny_spec)
    assert fresh.ping() is None and all(fresh.read(ids))
    fresh.close()
