"""Feast's file registry, written atomically.

Feast's ``FileRegistryStore`` rewrites ``registry.db`` in place (truncate, then write):
a process killed in between leaves an empty or half-written registry, and Feast reads
an empty file as an empty registry. This store writes the same bytes to a temporary
file and renames it over the registry, so a reader sees the old registry or the new
one. ``feature_store.yaml`` names it (``registry.registry_store_type``); Feast imports
it when it opens the repo, so nothing imports this module otherwise.

It overrides only ``update_registry_proto``, part of Feast's public ``RegistryStore``
interface (every write of the registry, project metadata included, goes through it),
and keeps Feast's own reading and teardown. ``tests/code/test_library_internals.py``
checks that Feast's plain ``FileRegistryStore`` reads back what this one writes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RegistryConfig

from clinml.atomic import write_atomic


class AtomicFileRegistryStore(FileRegistryStore):
    """``FileRegistryStore`` whose writes replace the file in one rename."""

    def __init__(self, registry_config: RegistryConfig, repo_path: Path):
        super().__init__(registry_config, repo_path)
        # The registry's file, resolved as Feast resolves it: relative to the repo.
        path = Path(registry_config.path)
        self.path = path if path.is_absolute() else Path(repo_path) / path

    def update_registry_proto(self, registry_proto: RegistryProto) -> None:
        # The same bookkeeping as Feast's own writer, then an atomic replace.
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(datetime.now(UTC))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, registry_proto.SerializeToString())
