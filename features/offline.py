"""The offline store when it is PostgreSQL: ingestion's tables, replaced all or nothing.

In the embedded profile ingestion commits parquet files (``clinml.features.ingest``). With a
PostgreSQL offline store (``offline_store: {type: postgres}`` in the environment's
``feature_store.yaml``) the same two frames go to two tables in the store's schema,
``<project>_features`` (the Feast source, read by point-in-time joins and by
materialization) and ``<project>_labels`` (the training events). ``replace`` writes
both into new tables and swaps them in in one transaction, so a reader sees the
previous batch or this one, and an ingest that fails or is killed before the commit
changes nothing (PostgreSQL's DDL is transactional).

Usage::

    tables = PostgresTables.for_environment(environment, "pathology")  # None: files
    tables.replace({"features": features, "labels": labels})
    labels = tables.read("labels")
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.errors import NotReadyError

if TYPE_CHECKING:
    import psycopg

    from clinml.environment import FeastEnvironment

TABLES = ("features", "labels")


class OfflineStoreUnavailable(NotReadyError):
    """The PostgreSQL offline store does not answer."""


def _sql_type(values: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(values):
        return "boolean"
    if pd.api.types.is_integer_dtype(values):
        return "bigint"
    if pd.api.types.is_float_dtype(values):
        return "double precision"
    if pd.api.types.is_datetime64_any_dtype(values):
        return "timestamptz"
    return "text"


def _python_rows(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    """Rows as Python values, NULL for missing ones, for COPY."""
    columns = []
    for name in frame.columns:
        values = frame[name]
        if pd.api.types.is_datetime64_any_dtype(values):
            stamps = values.dt.tz_localize(UTC) if values.dt.tz is None else values
            column = [None if pd.isna(v) else v.to_pydatetime() for v in stamps]
        else:
            column = values.astype(object).where(values.notna(), None).tolist()
            column = [v.item() if isinstance(v, np.generic) else v for v in column]
        columns.append(column)
    return list(zip(*columns, strict=True)) if columns else []


class PostgresTables:
    """Ingestion's two tables of one use case in a PostgreSQL offline store.

    Args:
        config: the ``offline_store`` section with its values expanded (Feast's
            ``PostgreSQLConfig`` fields: host, port, database, db_schema, user,
            password, sslmode...).
        project: the use case's Feast project; the tables are named after it.
    """

    def __init__(self, config: Mapping[str, Any], project: str):
        self.config = dict(config)
        self.schema = str(self.config.get("db_schema") or "public")
        self.project = project

    @classmethod
    def for_environment(cls, environment: FeastEnvironment, usecase: str) -> PostgresTables | None:
        """The tables of ``usecase``, or None when the offline store is files."""
        if environment.offline_type != "postgres":
            return None
        return cls(environment.expanded("offline_store"), environment.project(usecase))

    @classmethod
    def for_store(cls, store: Any) -> PostgresTables:
        """The tables behind an opened Feast store (its config is already expanded)."""
        return cls(store.config.offline_store.model_dump(), store.config.project)

    def table(self, which: str) -> str:
        if which not in TABLES:
            raise ValueError(f"unknown offline table {which!r}")
        return f"{self.project}_{which}"

    def qualified(self, which: str) -> str:
        """``"schema"."table"`` for SQL that Feast runs (the source's query)."""
        return f'"{self.schema}"."{self.table(which)}"'

    def connect(self) -> psycopg.Connection:
        """A connection with UTC as its time zone.

        Raises:
            OfflineStoreUnavailable: PostgreSQL does not answer (the message has no password).
        """
        import psycopg

        c = self.config
        try:
            connection = psycopg.connect(
                host=c.get("host"),
                port=int(c.get("port") or 5432),
                dbname=c.get("database"),
                user=c.get("user"),
                password=c.get("password") or None,
                sslmode=c.get("sslmode") or "require",
                sslrootcert=c.get("sslrootcert_path"),
                sslcert=c.get("sslcert_path"),
                sslkey=c.get("sslkey_path"),
                connect_timeout=10,
                options="-c TimeZone=UTC",
            )
        except psycopg.OperationalError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OfflineStoreUnavailable(
                f"PostgreSQL offline store {c.get('host')}:{c.get('port') or 5432}/"
                f"{c.get('database')} does not answer ({reason}); check "
                "CLINML_FEATURE_STORE_YAML and the network"
            ) from None
        return connection

    def replace(self, frames: Mapping[str, pd.DataFrame]) -> None:
        """Replace the tables with ``frames``, all in one transaction."""
        from psycopg import sql

        schema = sql.Identifier(self.schema)
        with self.connect() as connection, connection.transaction():
            connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            for which, frame in frames.items():
                final = sql.Identifier(self.table(which))
                staged = sql.Identifier(f"{self.table(which)}_{uuid.uuid4().hex[:8]}")
                columns = sql.SQL(", ").join(
                    sql.SQL("{} {}").format(
                        sql.Identifier(str(name)), sql.SQL(_sql_type(frame[name]))
                    )
                    for name in frame.columns
                )
                connection.execute(
                    sql.SQL("CREATE TABLE {}.{} ({})").format(schema, staged, columns)
                )
                names = sql.SQL(", ").join(sql.Identifier(str(n)) for n in frame.columns)
                with connection.cursor() as cursor:
                    copy_sql = sql.SQL("COPY {}.{} ({}) FROM STDIN").format(schema, staged, names)
                    with cursor.copy(copy_sql) as copy:
                        for row in _python_rows(frame):
                            copy.write_row(row)
                connection.execute(sql.SQL("DROP TABLE IF EXISTS {}.{}").format(schema, final))
                connection.execute(
                    sql.SQL("ALTER TABLE {}.{} RENAME TO {}").format(schema, staged, final)
                )

    def exists(self, which: str, connection: psycopg.Connection | None = None) -> bool:
        if connection is None:
            with self.connect() as own:
                return self.exists(which, own)
        row = connection.execute("SELECT to_regclass(%s)", (self.qualified(which),)).fetchone()
        return row is not None and row[0] is not None

    def read(self, which: str) -> pd.DataFrame | None:
        """A table as a frame (None before the first ingest); timestamps in UTC."""
        from psycopg import sql

        query = sql.SQL("SELECT * FROM {}.{}").format(
            sql.Identifier(self.schema), sql.Identifier(self.table(which))
        )
        with self.connect() as connection:
            if not self.exists(which, connection):
                return None
            with connection.cursor() as cursor:
                cursor.execute(query)
                names = [d.name for d in cursor.description or []]
                types = {d.name: d.type_code for d in cursor.description or []}
                frame = pd.DataFrame.from_records(cursor.fetchall(), columns=names)
        return _restore_types(frame, types)

    def earliest(self, column: str) -> datetime | None:
        """The oldest value of a timestamp column of the features table."""
        from psycopg import sql

        query = sql.SQL("SELECT min({}) FROM {}.{}").format(
            sql.Identifier(column),
            sql.Identifier(self.schema),
            sql.Identifier(self.table("features")),
        )
        with self.connect() as connection:
            row = connection.execute(query).fetchone()
        return None if row is None or row[0] is None else row[0].astimezone(UTC)

    def drop(self) -> None:
        """Remove both tables (tests, and resetting an installation)."""
        from psycopg import sql

        with self.connect() as connection, connection.transaction():
            for which in TABLES:
                connection.execute(
                    sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                        sql.Identifier(self.schema), sql.Identifier(self.table(which))
                    )
                )


# PostgreSQL type OIDs whose columns need a pandas dtype restored.
_TIMESTAMPTZ, _FLOAT8, _INT8, _BOOL = 1184, 701, 20, 16


def _restore_types(frame: pd.DataFrame, types: Mapping[str, int]) -> pd.DataFrame:
    """Give each column the dtype the parquet files would have (NULL-safe)."""
    for name, oid in types.items():
        if oid == _TIMESTAMPTZ:
            frame[name] = pd.to_datetime(frame[name], utc=True)
        elif oid == _FLOAT8:
            frame[name] = frame[name].astype("float64")
        elif oid == _INT8:
            values = frame[name]
            frame[name] = values.astype("int64") if values.notna().all() else values.astype("Int64")
        elif oid == _BOOL:
            frame[name] = frame[name].astype("boolean")
    return frame
