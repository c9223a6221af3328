"""Bulk materialization into Feast's SQLite online store.

Feast's own ``materialize`` into SQLite converts every value to a protobuf through
Arrow and writes one ``INSERT`` per entity and feature (its rate beside this module's:
docs/benchmarks.md, "Feature pipeline"). This module writes the same rows, in Feast's
own table layout and value encoding, in bulk: it picks the newest row per entity in the
window with pandas, encodes each column with Feast's converters, writes with
``executemany`` in one transaction, and records the interval in the registry exactly as
Feast does, so ``get_online_features`` and ``materialize_incremental`` work on the
result unchanged. What it needs of Feast's storage layout (table names, entity keys,
columns, timestamps, the registry record) comes from ``clinml.features.feast_internals``, the
one module that uses Feast's private parts.
``bulk_materialize`` says what a run that fails or is killed midway leaves behind.

:class:`OnlineReader` reads the same table for online lookups without Feast's per-value
Python overhead. ``tests/data/test_online_sqlite.py`` checks that both writers give
identical rows and that both readers give identical values.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.features import feast_internals
from clinml.spec import UseCaseSpec

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

CHUNK_ROWS = 50_000  # entities encoded and written per executemany call
CACHE_KIB = 512 * 1024  # SQLite page cache for the bulk write: keeps the index in memory
MMAP_BYTES = 1 << 30  # memory-mapped reads: point lookups without a read() per page
# How long a serving read waits for a writer's lock before it fails. Reads take
# microseconds and run on the service's event loop, so a held lock must fail fast (a 503
# for /predict_patient) rather than stall every request (docs/serving.md).
READ_TIMEOUT_S = 0.1


@dataclass(frozen=True)
class BulkResult:
    rows_read: int
    entities_written: int
    values_written: int


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values as ten-byte two's complement."""
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Feast's ValueProto field tags: int64_val = 4 (varint), double_val = 5 (64-bit),
# string_val = 2 (length-delimited). A null is the empty message.
_INT64_TAG, _DOUBLE_TAG, _STRING_TAG = b"\x20", b"\x29", b"\x12"


def encode_column(values: pd.Series, kind: str) -> tuple[list[bytes], list[str | None]]:
    """Serialized Feast ValueProto and ``value_text`` per value, as Feast writes them.

    ``kind`` is the spec column type (``float``, ``int``, ``category``). The test suite
    checks the bytes against Feast's own converters.
    """
    present = values.notna().to_numpy()
    blobs: list[bytes] = []
    texts: list[str | None] = []
    if kind == "float":
        packed = np.zeros(len(values), dtype=[("tag", "u1"), ("value", "<f8")])
        packed["tag"] = _DOUBLE_TAG[0]
        packed["value"] = values.to_numpy(dtype=float, na_value=0.0)
        raw = packed.tobytes()
        numbers = values.to_numpy(dtype=float, na_value=0.0).tolist()
        blobs = [raw[9 * i : 9 * i + 9] for i in range(len(values))]
        texts = [str(v) for v in numbers]
    elif kind == "int":
        numbers = values.to_numpy(dtype="float", na_value=0.0).astype(np.int64).tolist()
        blobs = [_INT64_TAG + _varint(v) for v in numbers]
        texts = [str(v) for v in numbers]
    else:
        strings = values.astype(object).where(values.notna(), "").tolist()
        encoded = [v.encode() for v in strings]
        blobs = [_STRING_TAG + _varint(len(b)) + b for b in encoded]
        texts = strings
    if not present.all():
        for i in np.flatnonzero(~present):
            blobs[i], texts[i] = b"", None
    return blobs, texts


def db_path(store: FeatureStore) -> Path:
    path = Path(store.config.online_store.path)
    return path if path.is_absolute() else Path(store.repo_path) / path


# clinml's own table in the online store: the last interval committed per view, written
# in the same transaction as the rows, so a run killed before copying it into Feast's
# registry is completed by the next one (``complete_registry_record``).
INTERVALS_TABLE = "clinml_materializations"


def has_table(store: FeatureStore, view: FeatureView) -> bool:
    """Whether the online store has the view's table (``apply`` creates it)."""
    if not db_path(store).is_file():
        return False
    with closing(_connect(db_path(store))) as connection:
        found = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
            (feast_internals.sqlite_table(store, view),),
        ).fetchall()
    return bool(found)


def _connect(db: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection that never creates the file and issues no writes; it waits up to
    ``timeout`` seconds for another connection's lock.

    Read-write mode only so that SQLite can roll back the journal of a writer that
    was killed while committing (its own recovery, before the first read); a
    read-only connection would fail on such a journal until a writer opened the file.
    """
    connection = sqlite3.connect(
        f"file:{db}?mode=rw", uri=True, check_same_thread=False, timeout=timeout
    )
    connection.execute("PRAGMA query_only = ON")
    return connection


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of ``path``; FileNotFoundError when it is gone."""
    found = path.stat()
    return found.st_dev, found.st_ino


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def committed_interval(store: FeatureStore, view_name: str) -> tuple[datetime, datetime] | None:
    """The last interval committed to the online store for a view (None if none)."""
    if not db_path(store).is_file():
        return None
    with closing(_connect(db_path(store))) as connection:
        try:
            rows = connection.execute(
                f'SELECT start_ts, end_ts FROM "{INTERVALS_TABLE}" WHERE feature_view = ?',
                (view_name,),
            ).fetchall()
        except sqlite3.OperationalError:  # no such table: nothing committed by clinml yet
            return None
    if not rows:
        return None
    [(start, end)] = rows
    return datetime.fromisoformat(start), datetime.fromisoformat(end)


def complete_registry_record(store: FeatureStore, view: FeatureView) -> bool:
    """Record in Feast's registry an interval the online store committed but it lacks.

    That happens only when a run is killed between its commit and its registry write.
    Returns whether the registry was written.
    """
    committed = committed_interval(store, view.name)
    recorded = view.most_recent_end_time
    if committed is None or (recorded is not None and _as_utc(recorded) >= committed[1]):
        return False
    feast_internals.record_materialization(store, view, *committed)
    return True


def newest_rows(
    frame: pd.DataFrame, spec: UseCaseSpec, start: datetime, end: datetime
) -> pd.DataFrame:
    """The newest row per entity with ``start <= timestamp < end``, as Feast selects them."""
    ts = frame[spec.event_timestamp]
    window = frame[(ts >= pd.Timestamp(start)) & (ts < pd.Timestamp(end))]
    ordered = window.sort_values(spec.event_timestamp, kind="stable")
    return ordered.drop_duplicates(spec.entity.key, keep="last").reset_index(drop=True)


def bulk_materialize(
    store: FeatureStore,
    spec: UseCaseSpec,
    view: FeatureView,
    start: datetime,
    end: datetime,
    progress: Callable[[int, int], Any] | None = None,
) -> BulkResult:
    """Write the newest row per entity in ``[start, end)`` into the online store.

    All or nothing: every row, and the interval (in ``clinml_materializations``), go
    in one SQLite transaction, so a run that fails or is killed before its commit
    leaves the online store as it was (SQLite rolls back or ignores the journal of an
    unfinished transaction). Only then is the interval recorded in Feast's registry
    (one atomic file replace): a run killed between the two has committed, and
    ``complete_registry_record`` copies its interval into the registry on the next
    run. The registry is never ahead of the online store, so even Feast's own
    ``materialize_incremental`` would not skip rows.

    Args:
        store: an applied feature store with the SQLite online store.
        spec: the use-case spec (entity key, timestamp, column types).
        view: the feature view being materialized.
        start: window start (inclusive).
        end: window end (exclusive).
        progress: called after each chunk with (entities written so far, entities in all).

    Returns:
        How many offline rows were read and how many entities and values written.
    """
    feast_internals.check_plain_sqlite(store)
    columns = spec.columns
    key, ts = spec.entity.key, spec.event_timestamp
    offline = pd.read_parquet(view.batch_source.path, columns=[key, ts, *(c.name for c in columns)])
    newest = newest_rows(offline, spec, start, end)
    sql = feast_internals.sqlite_upsert(feast_internals.sqlite_table(store, view))
    # Rows are written in primary-key order (entity key, then feature name), so the
    # table's B-tree grows by appends instead of random inserts.
    keys = feast_internals.entity_keys(
        key, newest[key].tolist(), feast_internals.entity_key_version(store)
    )
    newest = newest.assign(_key=keys).sort_values("_key")
    ordered_columns = sorted(columns, key=lambda c: c.name)
    created = feast_internals.to_sqlite_epoch(pd.Series([pd.Timestamp.now(UTC)]))[0]
    # isolation_level=None: the transaction is begun and committed explicitly below.
    connection = sqlite3.connect(db_path(store), isolation_level=None)
    values_written = 0
    try:
        connection.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        connection.execute("BEGIN IMMEDIATE")
        for first in range(0, len(newest), CHUNK_ROWS):
            chunk = newest.iloc[first : first + CHUNK_ROWS]
            keys = chunk["_key"].tolist()
            stamps = feast_internals.to_sqlite_epoch(chunk[ts])
            encoded = [encode_column(chunk[c.name], c.type) for c in ordered_columns]
            names = [c.name for c in ordered_columns]
            rows = [
                (entity, name, blobs[i], texts[i], stamps[i], created)
                for i, entity in enumerate(keys)
                for name, (blobs, texts) in zip(names, encoded, strict=True)
            ]
            connection.executemany(sql, rows)
            values_written += len(rows)
            if progress is not None:
                progress(first + len(chunk), len(newest))
        connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{INTERVALS_TABLE}" '
            "(feature_view TEXT PRIMARY KEY, start_ts TEXT NOT NULL, end_ts TEXT NOT NULL)"
        )
        connection.execute(
            f'INSERT INTO "{INTERVALS_TABLE}" VALUES (?, ?, ?) ON CONFLICT(feature_view) '
            "DO UPDATE SET start_ts = excluded.start_ts, end_ts = excluded.end_ts",
            (view.name, _as_utc(start).isoformat(), _as_utc(end).isoformat()),
        )
        connection.execute("COMMIT")  # the commit point: all of it, or none of it
    finally:
        connection.close()  # without a COMMIT, this rolls the transaction back
    feast_internals.record_materialization(store, view, start, end)
    return BulkResult(len(offline), len(newest), values_written)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[offset]
        result |= (byte & 0x7F) << shift
        offset += 1
        if byte < 0x80:
            return result, offset
        shift += 7


def decode_value(blob: bytes) -> Any:
    """The Python value of a serialized Feast ValueProto (the inverse of ``encode_column``).

    The three scalar types clinml writes are decoded by hand; anything else goes
    through Feast's own converter.
    """
    if not blob:
        return None
    tag = blob[0]
    if tag == _DOUBLE_TAG[0] and len(blob) == 9:
        return struct.unpack("<d", blob[1:])[0]
    if tag == _INT64_TAG[0]:
        value, _ = _read_varint(blob, 1)
        return value - (1 << 64) if value >= 1 << 63 else value
    if tag == _STRING_TAG[0]:
        length, start = _read_varint(blob, 1)
        return blob[start : start + length].decode()
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    proto = Value()
    proto.ParseFromString(blob)
    return feast_value_type_to_python_type(proto)


class OnlineReader:
    """Reads a feature view's rows straight from Feast's SQLite online store.

    The same rows ``FeatureStore.get_online_features`` reads, without its per-value
    Python overhead: one indexed query per call on a long-lived, memory-mapped
    connection. Values come back as ``{feature: (value, recorded_at)}`` per entity;
    an entity the store does not have comes back as ``None``.

    Args:
        db: the SQLite file of the online store.
        table: the feature view's table (``feast_internals.sqlite_table``).
        join_key: the entity's join key (for key serialization).
        key_version: the store's entity-key serialization version.
    """

    def __init__(self, db: Path, table: str, join_key: str, key_version: int):
        self.table, self.join_key, self.db = table, join_key, Path(db)
        self.key_version = key_version
        if not self.db.is_file():
            raise FileNotFoundError(f"online store {db} does not exist: run `clinml materialize`")
        # A reader never creates or changes the store (``_connect``).
        self._connection = _connect(self.db, timeout=READ_TIMEOUT_S)
        self._file = _identity(self.db)  # the file the connection holds open
        self._connection.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        self._lock = threading.Lock()

    @classmethod
    def for_store(cls, store: FeatureStore, spec: UseCaseSpec) -> OnlineReader:
        from clinml.features.store import view_name

        view = store.get_feature_view(view_name(spec))
        return cls(
            db_path(store),
            feast_internals.sqlite_table(store, view),
            spec.entity.key,
            feast_internals.entity_key_version(store),
        )

    def read(self, entity_ids: list[str]) -> list[dict[str, tuple[Any, datetime]] | None]:
        keys = feast_internals.entity_keys(self.join_key, entity_ids, self.key_version)
        query = feast_internals.sqlite_select(self.table, len(keys))
        with self._lock:
            rows = self._connection.execute(query, keys).fetchall()
        found: dict[bytes, dict[str, tuple[Any, datetime]]] = {}
        times: dict[Any, datetime] = {}  # an entity's features mostly share one event time
        for key, name, blob, stamp in rows:
            recorded = times.get(stamp)
            if recorded is None:
                recorded = times[stamp] = feast_internals.from_sqlite_epoch(stamp)
            found.setdefault(key, {})[name] = (decode_value(blob), recorded)
        return [found.get(key) for key in keys]

    def ping(self) -> None:
        """Raise if the table cannot be read (locked or corrupt), or if the store's path
        no longer names the file this reader has open (deleted, moved or replaced: an
        open connection would go on reading the old file)."""
        if _identity(self.db) != self._file:
            raise FileNotFoundError(f"online store {self.db} was replaced since it was opened")
        with self._lock:
            self._connection.execute(f'SELECT 1 FROM "{self.table}" LIMIT 1').fetchall()

    def close(self) -> None:
        self._connection.close()
