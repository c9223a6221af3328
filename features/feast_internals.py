"""Every private or undocumented part of Feast that clinml stands on, in one place.

clinml writes and reads Feast's SQLite online store directly (``clinml.features.online_sqlite``:
bulk materialization, and the serving reader), because Feast's public paths are slower
(docs/benchmarks.md, "Feature pipeline" and "Online reads: clinml's reader vs. Feast's").
Doing so needs Feast's storage layout, which Feast does not publish: the table name of
a feature view, the entity-key encoding, the columns and the timestamp encoding of a
row, and a way to record a materialized interval written outside ``materialize``.
Those are here, and nowhere else; each function says what it relies on and why there
is no public way. Written for Feast 0.67.0; ``tests/code/test_library_internals.py``
fails, naming the Feast version found and what changed, when an upgrade moves any of it,
and checks that rows written here read back identically through Feast's public
``FeatureStore.get_online_features``.

The value encoding itself (Feast's ``ValueProto`` message, a public protobuf schema) stays
in ``clinml.features.online_sqlite``; ``tests/data/test_online_sqlite.py`` checks it against
Feast's own converters.

Feast is imported inside the functions: the serving process imports this module.
"""

from __future__ import annotations

import importlib.metadata
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pandas as pd

from clinml.errors import ClinmlError

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

WRITTEN_FOR = "0.67.0"  # the Feast release these functions were written and checked against

# The columns Feast's SQLite store writes for a plain (non-vector, non-OpenAI) table, in
# ``SqliteOnlineStore.online_write_batch`` order; its table also has ``vector_value``
# (and ``value_num`` when enabled), which stay NULL here as they do in Feast's own writes.
SQLITE_COLUMNS = ("entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts")


class FeastLayoutError(ClinmlError):
    """The Feast configuration asks for an online-store layout clinml does not write."""


def feast_version() -> str:
    """The installed Feast release (``importlib.metadata``)."""
    return importlib.metadata.version("feast")


def sqlite_table(store: FeatureStore, view: FeatureView) -> str:
    """The SQLite online store's table for ``view`` (``<project>_<view>``, plus a version
    suffix when the registry versions online feature views).

    Uses ``feast.infra.online_stores.sqlite._table_id(project, view, enable_versioning)``
    (private), the function Feast's SQLite store names its tables with, and the
    registry's ``enable_online_feature_view_versioning`` setting. No public API names
    an online store's tables. Written for Feast 0.67.0.
    """
    from feast.infra.online_stores.sqlite import _table_id

    versioned = store.config.registry.enable_online_feature_view_versioning
    return _table_id(store.config.project, view, versioned)


def entity_key_version(store: FeatureStore) -> int:
    """The entity-key serialization version the store reads and writes with
    (``feature_store.yaml``'s ``entity_key_serialization_version``, a public setting)."""
    return int(store.config.entity_key_serialization_version)


def entity_keys(join_key: str, ids: list[str], version: int) -> list[bytes]:
    """Feast's stored form of single string join-key entity keys, in ``ids`` order.

    Uses ``feast.infra.key_encoding_utils.serialize_entity_key(entity_key,
    entity_key_serialization_version)``, an undocumented module function that Feast's
    online stores call on every read and write: the bytes are the SQLite table's primary
    key, and no public API produces them. Written for Feast 0.67.0 (version 3 keys).
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return [
        serialize_entity_key(
            EntityKey(join_keys=[join_key], entity_values=[Value(string_val=v)]),
            entity_key_serialization_version=version,
        )
        for v in ids
    ]


def check_plain_sqlite(store: FeatureStore) -> None:
    """Raise unless the store's SQLite tables have only the columns clinml writes.

    Feast's SQLite store adds a ``value_num`` column it fills on every write when
    ``online_store.enable_openai_compatible_store`` is on, and a ``vector_value`` it
    fills when ``online_store.vector_enabled`` is on (``SqliteOnlineStore.
    online_write_batch``, Feast 0.67.0). clinml's writer fills neither, so it refuses
    those settings rather than write rows Feast's own search would read wrongly.

    Raises:
        FeastLayoutError: one of those settings is on.
    """
    online = store.config.online_store
    enabled = [
        name
        for name in ("enable_openai_compatible_store", "vector_enabled")
        if getattr(online, name, False)
    ]
    if enabled:
        raise FeastLayoutError(
            f"online_store.{enabled[0]} is on in {store.repo_path}/feature_store.yaml: "
            "clinml's SQLite writer fills only Feast's plain columns; turn it off or use "
            "another online store"
        )


def sqlite_upsert(table: str) -> str:
    """The statement Feast's SQLite store upserts one value with, for ``SQLITE_COLUMNS``.

    Mirrors ``SqliteOnlineStore.online_write_batch`` (Feast 0.67.0), which has no public
    bulk form: Feast writes one ``INSERT`` per entity and feature.
    """
    names = ", ".join(SQLITE_COLUMNS)
    update = ", ".join(f"{c} = excluded.{c}" for c in SQLITE_COLUMNS[2:])
    return (
        f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" * len(SQLITE_COLUMNS))}) '
        f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {update}"
    )


def sqlite_select(table: str, keys: int) -> str:
    """The query Feast's ``SqliteOnlineStore.online_read`` reads ``keys`` entities with
    (entity key, feature name, serialized value, event time), without its ``ORDER BY``."""
    return (
        f'SELECT entity_key, feature_name, value, event_ts FROM "{table}" '
        f"WHERE entity_key IN ({','.join('?' * keys)})"
    )


def to_sqlite_epoch(stamps: pd.Series) -> list[int]:
    """Event times as Feast's SQLite store keeps them: ``int(naive_utc.timestamp())``.

    Feast 0.67.0 registers a ``sqlite3`` adapter (``adapt_datetime_epoch`` in
    ``feast.infra.online_stores.sqlite``) that stores the naive UTC datetime its writer
    passes through ``datetime.timestamp``, which reads it in the machine's local zone,
    and reads it back the same way (``from_sqlite_epoch``); doing exactly the same keeps
    the round trip identical on any machine. The storage format is not published.
    """
    naive = stamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
    return [int(t.timestamp()) for t in naive.astype(object)]


def from_sqlite_epoch(stamp: int | str) -> datetime:
    """A stored event time as Feast reads it (its ``convert_timestamp`` converter,
    ``datetime.fromtimestamp``), marked UTC as ``online_read`` marks it."""
    return datetime.fromtimestamp(int(stamp)).replace(tzinfo=UTC)


def record_materialization(
    store: FeatureStore, view: FeatureView, start: datetime, end: datetime
) -> None:
    """Record ``[start, end)`` as materialized for ``view`` in Feast's registry.

    Uses ``store.registry.apply_materialization(view, project, start, end, commit=True)``:
    a public method of Feast's registry that only ``FeatureStore.materialize`` calls.
    Feast has no public way to record an interval written by anything but its own
    ``materialize``, and ``materialize_incremental`` starts from the recorded end.
    Written for Feast 0.67.0.
    """
    store.registry.apply_materialization(view, store.config.project, start, end, commit=True)
