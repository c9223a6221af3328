"""Online reads from any Feast online store (Redis in the production profile).

:class:`FeastOnlineReader` has :class:`clinml.features.online_sqlite.OnlineReader`'s interface
(``read``, ``ping``, ``close``), so serving uses either. It calls the store's own
``online_read`` for the feature view: one pipelined round trip for Redis, without the
registry lookups and response building of ``FeatureStore.get_online_features``.
``tests/integration/test_production_profile.py`` checks it against that API.

Usage::

    reader = online_reader(store, spec)     # the SQLite reader or this one
    rows = reader.read(["p-3f2a...", ...])  # per id: {feature: (value, recorded_at)} or None
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from clinml.spec import UseCaseSpec

if TYPE_CHECKING:
    from feast import FeatureStore


class FeastOnlineReader:
    """Reads one feature view's rows through the store's provider."""

    def __init__(self, store: FeatureStore, spec: UseCaseSpec):
        from clinml.features.store import view_name

        self.store = store
        self.view = store.get_feature_view(view_name(spec))
        self.join_key = spec.entity.key
        self.features = list(spec.feature_names)
        self.wanted = frozenset(self.features)
        # The store's provider (``FeatureStore.provider``, public); its ``online_read``
        # is the read under ``get_online_features``, without the response building.
        self.provider = store.provider
        self._lock = threading.Lock()

    def read(self, entity_ids: list[str]) -> list[dict[str, tuple[Any, datetime]] | None]:
        """Per id, ``{feature: (value, recorded_at)}`` for the values present, or None."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = [
            EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=str(i))])
            for i in entity_ids
        ]
        with self._lock:  # Feast's clients are created lazily and not thread safe
            found = self.provider.online_read(
                config=self.store.config,
                table=self.view,
                entity_keys=keys,
                # A copy: Feast's Redis store appends its timestamp field to the list
                # it is given, which would grow by one name on every read.
                requested_features=list(self.features),
            )
        rows: list[dict[str, tuple[Any, datetime]] | None] = []
        for recorded, values in found:
            # An entity the store does not have: no values, or (Redis) every value empty
            # under the epoch as its timestamp.
            if recorded is None or (
                recorded.timestamp() <= 0
                and all(v.WhichOneof("val") is None for v in (values or {}).values())
            ):
                rows.append(None)
                continue
            at = recorded if recorded.tzinfo else recorded.replace(tzinfo=UTC)
            # A stored null is (None, at), as the SQLite reader gives it. The spec's
            # types are scalars (double, int64, string), read straight off the message:
            # Feast's general converter is slower (docs/benchmarks.md, "Online store").
            row: dict[str, tuple[Any, datetime]] = {}
            for name, value in values.items():
                if name in self.wanted:
                    kind = value.WhichOneof("val")
                    row[name] = (None if kind is None else getattr(value, kind), at)
            rows.append(row or None)
        return rows

    def ping(self) -> None:
        """Raise if the store does not answer (one read of an id nobody has)."""
        self.read(["clinml-readiness-probe"])

    def close(self) -> None:
        """Nothing to release: Feast keeps its client for the process."""


def online_reader(store: FeatureStore, spec: UseCaseSpec) -> Any:
    """The fastest reader for the store: direct SQLite, or the store's own ``online_read``."""
    if store.config.online_store.type == "sqlite":
        from clinml.features.online_sqlite import OnlineReader

        return OnlineReader.for_store(store, spec)
    return FeastOnlineReader(store, spec)
