"""This machine's PostgreSQL and Redis, for the production-profile tests.

Tests that need them call ``require_services()``: it skips with the reason when a service
does not answer, unless ``CLINML_REQUIRE_SERVICES=1`` (``.ci/run`` sets it), which turns
the skip into a failure. Each test creates its own database (``scratch_database``) and
Feast project prefix, and removes both afterwards, so runs never see each other's data
(``../shared/services.md``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_HOST = os.environ.get("CLINML_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("CLINML_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("CLINML_TEST_PG_USER", "postgres")
REDIS = os.environ.get("CLINML_TEST_REDIS", "127.0.0.1:6379")
# Trust authentication ignores it, but Feast's config needs a non-empty password.
PG_PASSWORD = "unused-under-trust-auth"


def _unreachable() -> str | None:
    """Why the services cannot be used, or None."""
    import psycopg
    import redis

    try:
        psycopg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3
        ).close()
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())[:120]  # one line in pytest's summary
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} does not answer ({reason})"
    host, port = REDIS.split(":")
    try:
        redis.Redis(host=host, port=int(port), socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS} does not answer ({exc})"
    return None


def require_services() -> None:
    """Skip (or, with CLINML_REQUIRE_SERVICES=1, fail) when PostgreSQL or Redis is down."""
    reason = _unreachable()
    if reason is None:
        return
    if os.environ.get("CLINML_REQUIRE_SERVICES") == "1":
        pytest.fail(f"CLINML_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(f"production-profile services unavailable: {reason} (../shared/services.md)")


def _admin():
    import psycopg

    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True
    )


@contextmanager
def scratch_database(prefix: str = "clinml_test") -> Iterator[str]:
    """A new, empty database, dropped afterwards (open connections included)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(name: str) -> bool:
    with _admin() as admin:
        row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def redis_client():
    import redis

    host, port = REDIS.split(":")
    return redis.Redis(host=host, port=int(port))


def redis_keys(project_prefix: str) -> list[bytes]:
    """Feast's keys of every project under a prefix (each key ends with its project)."""
    return list(redis_client().scan_iter(match=f"*{project_prefix}_*".encode(), count=1000))


def delete_redis_keys(project_prefix: str) -> None:
    keys = redis_keys(project_prefix)
    if keys:
        redis_client().delete(*keys)


def environment_file(directory: Path, database: str, project_prefix: str) -> Path:
    """A production ``feature_store.yaml``: SQL registry, Redis online, PostgreSQL offline.

    The password is a ``${VAR}`` reference, as a deployment writes it.
    """
    url = f"postgresql+psycopg://{PG_USER}:${{CLINML_TEST_PG_PASSWORD}}@{PG_HOST}:{PG_PORT}"
    text = f"""\
project: {project_prefix}
registry:
  registry_type: sql
  path: {url}/{database}
  cache_ttl_seconds: 60
online_store:
  type: redis
  connection_string: {REDIS},socket_timeout=2,socket_connect_timeout=2
offline_store:
  type: postgres
  host: {PG_HOST}
  port: {PG_PORT}
  database: {database}
  db_schema: offline
  user: {PG_USER}
  password: ${{CLINML_TEST_PG_PASSWORD}}
  sslmode: disable
"""
    path = directory / "feature_store.yaml"
    path.write_text(text)
    return path


def production_env(home: Path, database: str, project_prefix: str) -> dict[str, str]:
    """The environment variables of a production-profile deployment on these services."""
    os.environ.setdefault("CLINML_TEST_PG_PASSWORD", PG_PASSWORD)
    return {
        "CLINML_PROFILE": "production",
        "CLINML_HOME": str(home),
        "CLINML_FEATURE_STORE_YAML": str(environment_file(home.parent, database, project_prefix)),
        "CLINML_TRACKING_URI": f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}",
        "CLINML_ARTIFACT_ROOT": str(home.parent / "artifacts"),
        "CLINML_PSEUDONYM_KEY": "test-only-" + uuid.uuid4().hex,
        "CLINML_TEST_PG_PASSWORD": PG_PASSWORD,
    }
