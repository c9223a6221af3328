"""Where a deployment keeps its features: the embedded stores or a per-environment file.

The embedded profile (one machine) needs no configuration: a file offline store, a
SQLite online store and a file registry, all under the use case's directory. A shared
deployment names its stores in a Feast ``feature_store.yaml`` of its own
(``CLINML_FEATURE_STORE_YAML``), one per environment, for example::

    project: clinml_staging            # optional: prefixes each use case's Feast project
    registry:
      registry_type: sql
      path: postgresql+psycopg://feast:${FEAST_DB_PASSWORD}@postgres:5432/feast
    online_store:
      type: redis
      connection_string: redis:6379,password=${REDIS_PASSWORD}
    offline_store:
      type: postgres
      host: postgres
      database: feast
      db_schema: offline
      user: feast
      password: ${FEAST_DB_PASSWORD}

clinml copies these sections, unexpanded, into each use case's generated repo and adds
``project`` and ``provider``: Feast expands ``${VAR}`` from the environment when it
loads the file (``os.path.expandvars``), so secrets stay in the environment and are
never written to disk. The offline store's type selects the source class
(``clinml.features.store.make_source``) and where ingestion writes (``clinml.features.offline``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clinml.errors import SpecError

REGISTRY_FILE = "registry.db"

# Offline stores ingestion can write to. Another store (Spark, BigQuery, Snowflake) needs
# a source branch in clinml.features.store.make_source and a writer in clinml.features.offline
# (docs/deployment.md).
OFFLINE_TYPES = ("file", "postgres")
_SECTIONS = ("registry", "online_store", "offline_store")
_PROJECT = re.compile(r"^[A-Za-z0-9_]+$")


class FeastEnvironmentError(SpecError):
    """The per-environment feature_store.yaml is missing, unreadable or unsupported."""


@dataclass(frozen=True)
class FeastEnvironment:
    """The stores of one environment.

    Attributes:
        sections: ``registry``, ``online_store`` and ``offline_store`` as written in the
            environment's file (``${VAR}`` references not expanded).
        project_prefix: prefixed to each use case's Feast project (tests use a unique
            one so runs sharing Redis and PostgreSQL never see each other's keys).
        source: the file it came from (None: the embedded profile).
    """

    sections: dict[str, Any]
    project_prefix: str = ""
    source: Path | None = None

    @classmethod
    def embedded(cls) -> FeastEnvironment:
        """File offline store, SQLite online store, file registry (replaced atomically).

        Paths are relative, so Feast resolves them against the use case's repo directory.
        """
        return cls(
            {
                "registry": {
                    "path": REGISTRY_FILE,
                    "registry_store_type": "clinml.features.registry_store.AtomicFileRegistryStore",
                },
                "online_store": {"type": "sqlite", "path": "online.db"},
                "offline_store": {"type": "file"},
            }
        )

    @classmethod
    def load(cls, path: Path) -> FeastEnvironment:
        """Read an environment's ``feature_store.yaml``.

        Raises:
            FeastEnvironmentError: the file is missing or unreadable, lacks a section, or
                names an offline store ingestion cannot write to.
        """
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise FeastEnvironmentError(
                f"CLINML_FEATURE_STORE_YAML: cannot read {path}: {exc}"
            ) from None
        if not isinstance(raw, dict):
            raise FeastEnvironmentError(f"CLINML_FEATURE_STORE_YAML: {path} is not a YAML mapping")
        missing = [s for s in _SECTIONS if not isinstance(raw.get(s), dict)]
        if missing:
            raise FeastEnvironmentError(
                f"CLINML_FEATURE_STORE_YAML: {path} lacks the {', '.join(missing)} section(s); "
                "docs/deployment.md has an example"
            )
        offline = raw["offline_store"].get("type")
        if offline not in OFFLINE_TYPES:
            raise FeastEnvironmentError(
                f"CLINML_FEATURE_STORE_YAML: offline_store type {offline!r} is not supported "
                f"(supported: {', '.join(OFFLINE_TYPES)}; docs/deployment.md says how to add one)"
            )
        prefix = str(raw.get("project", ""))
        if prefix and not _PROJECT.match(prefix):
            raise FeastEnvironmentError(
                f"CLINML_FEATURE_STORE_YAML: project {prefix!r} may hold only letters, "
                "digits and underscores"
            )
        unknown = sorted(set(raw) - {*_SECTIONS, "project", "provider"})
        if unknown:
            raise FeastEnvironmentError(
                f"CLINML_FEATURE_STORE_YAML: unexpected key(s) {', '.join(unknown)} in {path} "
                "(clinml sets the rest per use case)"
            )
        return cls({s: raw[s] for s in _SECTIONS}, prefix, path)

    @property
    def offline_type(self) -> str:
        return str(self.sections["offline_store"].get("type", "file"))

    @property
    def online_type(self) -> str:
        return str(self.sections["online_store"].get("type", "sqlite"))

    @property
    def registry_type(self) -> str:
        return str(self.sections["registry"].get("registry_type", "file"))

    @property
    def registry_path(self) -> str:
        return str(self.sections["registry"].get("path", ""))

    @property
    def is_embedded(self) -> bool:
        return self.source is None

    def require_shared(self) -> None:
        """Raise unless every store is shared (what the production profile needs)."""
        # A file registry in object storage (s3://, gs://) is shared; on a disk it is not.
        registry_local = self.registry_type == "file" and "://" not in self.registry_path
        local = [
            f"{name} {kind}"
            for name, kind, is_local in (
                ("online_store type", self.online_type, self.online_type == "sqlite"),
                ("offline_store type", self.offline_type, self.offline_type == "file"),
                ("registry_type", self.registry_type, registry_local),
            )
            if is_local
        ]
        if local:
            raise FeastEnvironmentError(
                f"CLINML_PROFILE=production: {self.source} names stores that are local files "
                f"({', '.join(local)}); use shared ones (docs/deployment.md)"
            )

    def project(self, usecase: str) -> str:
        return f"{self.project_prefix}_{usecase}" if self.project_prefix else usecase

    def config(self, usecase: str) -> dict[str, Any]:
        """The ``feature_store.yaml`` of one use case's repo (``${VAR}`` left for Feast)."""
        return {
            "project": self.project(usecase),
            "provider": "local",
            **self.sections,
            "entity_key_serialization_version": 3,
        }

    def expanded(self, section: str) -> dict[str, Any]:
        """A section with ``${VAR}`` references expanded, as Feast reads it (not cached
        on disk; for clinml's own connections to the same stores)."""
        text = os.path.expandvars(yaml.safe_dump(self.sections[section]))
        return dict(yaml.safe_load(text))
