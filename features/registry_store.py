"""Feast's file registry, written atomically.

Feast's ``FileRegistryStore`` rewrites ``registry.db`` in place (truncate, then write):
a process killed in between leaves an empty or half-written registry, and Feast reads
an empty file as an empty registry. This store writes the same bytes to a temporary
file and renames it over the registry, so a reader sees the old registry or the new
one. ``feature_store.yaml`` names it (``registry.registry_store_type``); Feast imports
it when it opens the repo, so nothing imports this module otherwise.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto

from clinml.atomic import write_atomic


class AtomicFileRegistryStore(FileRegistryStore):
    """``FileRegistryStore`` whose writes replace the file in one rename."""

    def _write_registry(self, registry_proto: RegistryProto) -> None:
        # The same bookkeeping as Feast's own writer, then an atomic replace.
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(datetime.now(UTC))
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self._filepath, registry_proto.SerializeToString())
