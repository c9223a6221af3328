"""The Feast repo generated from a spec: definitions, apply, materialize, retrieval.

Each use case gets its own Feast repo under ``$CLINML_HOME/<usecase>/feast/``. Only
``feature_store.yaml`` is written there; the feature objects are built in code from the
spec and registered with ``FeatureStore.apply``, so there are no generated ``.py`` files
for ``feast apply`` to import.

Usage::

    store = open_store(spec, paths)          # writes feature_store.yaml, opens the repo
    apply(store, spec, paths)                # entity, source, view, feature service
    materialize(store, spec, start, end)     # offline parquet -> SQLite online store
    frame = training_frame(store, spec, events)   # point-in-time join
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from clinml.settings import UseCasePaths
from clinml.spec import ColumnSpec, UseCaseSpec

if TYPE_CHECKING:
    from feast import FeatureStore


def feature_store_config(spec: UseCaseSpec) -> dict[str, Any]:
    """The embedded profile: file offline store, SQLite online store, file registry.

    Paths are relative, so Feast resolves them against the repo directory and the whole
    data directory can be moved.
    """
    return {
        "project": spec.name,
        "provider": "local",
        "registry": "registry.db",
        "online_store": {"type": "sqlite", "path": "online.db"},
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


def view_name(spec: UseCaseSpec) -> str:
    return f"{spec.name}_features"


def _feast_type(column: ColumnSpec) -> Any:
    from feast.types import Float64, Int64, String

    return {"float": Float64, "int": Int64, "category": String}[column.type]


def make_source(spec: UseCaseSpec, paths: UseCasePaths) -> Any:
    """The offline source for this environment.

    Feast couples source classes to offline stores (``FileSource`` only works with the
    file store), so every source is created here; a production profile adds its branch.
    """
    from feast import FileSource

    # Why: the validated, identifier-free parquet written by ingestion is the only
    # place features enter Feast.
    return FileSource(
        name=f"{spec.name}_source",
        path=str(paths.features_file),
        timestamp_field=spec.event_timestamp,
        description=f"Validated {spec.name} features written by clinml ingest.",
    )


@dataclass(frozen=True)
class Definitions:
    entity: Any
    source: Any
    view: Any
    service: Any

    def all(self) -> list[Any]:
        return [self.entity, self.source, self.view, self.service]


def definitions(spec: UseCaseSpec, paths: UseCasePaths) -> Definitions:
    """The Feast objects for a spec."""
    from feast import Entity, FeatureService, FeatureView, Field
    from feast.value_type import ValueType

    # Why: every feature row and every prediction is about one patient, keyed by the
    # pseudonymous id.
    entity = Entity(
        name=spec.entity.name,
        join_keys=[spec.entity.key],
        value_type=ValueType.STRING,
        description=spec.entity.description,
    )
    source = make_source(spec, paths)
    # Why: one view holds the model inputs and the subgroup attributes, so a training
    # frame and its subgroups come from the same point-in-time join. No TTL: every
    # value stays valid until a newer one arrives (staleness rules come with serving).
    view = FeatureView(
        name=view_name(spec),
        entities=[entity],
        schema=[
            Field(name=c.name, dtype=_feast_type(c), description=c.description)
            for c in spec.columns
        ],
        source=source,
        online=True,
        description=spec.description,
    )
    # Why: the versioned contract between training and serving: exactly the model
    # inputs, in spec order. A model records the service it was trained on.
    service = FeatureService(
        name=spec.feature_service,
        features=[view[spec.feature_names]],
        description=f"Model inputs for {spec.name}.",
    )
    return Definitions(entity, source, view, service)


def open_store(spec: UseCaseSpec, paths: UseCasePaths) -> FeatureStore:
    """Write the repo's ``feature_store.yaml`` if it changed and open the store."""
    from feast import FeatureStore

    repo = paths.feast_repo
    repo.mkdir(parents=True, exist_ok=True)
    config_file = repo / "feature_store.yaml"
    text = yaml.safe_dump(feature_store_config(spec), sort_keys=False)
    if not config_file.is_file() or config_file.read_text() != text:
        config_file.write_text(text)
    return FeatureStore(repo_path=str(repo))


def apply(store: FeatureStore, spec: UseCaseSpec, paths: UseCasePaths) -> Definitions:
    """Register the spec's entity, source, view and feature service."""
    defs = definitions(spec, paths)
    store.apply(defs.all())
    return defs


def materialize(store: FeatureStore, spec: UseCaseSpec, start: datetime, end: datetime) -> None:
    """Load the newest value per entity in ``[start, end]`` into the online store.

    ``materialize`` (not ``materialize_incremental``) so the first run sees all history.
    """
    store.materialize(start_date=start, end_date=end, feature_views=[view_name(spec)])


def service_feature_refs(store: FeatureStore, spec: UseCaseSpec) -> list[str]:
    """``view:feature`` references of the spec's feature service, in order."""
    service = store.get_feature_service(spec.feature_service)
    return [
        f"{projection.name_to_use()}:{feature.name}"
        for projection in service.feature_view_projections
        for feature in projection.features
    ]


ROW_ID = "_clinml_row"


def training_frame(store: FeatureStore, spec: UseCaseSpec, events: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time join of the feature service (plus attributes) onto labelled events.

    For each event, Feast takes the newest feature row whose timestamp is at or before
    the event's timestamp, so a value that arrived later is never used.

    Args:
        store: an applied feature store.
        spec: the use-case spec.
        events: entity key, event timestamp and label, one row per event.

    Returns:
        ``events`` in its original order, with every feature and attribute column added;
        a value not yet known at an event's time is null, never a default.
    """
    refs = service_feature_refs(store, spec)
    refs += [f"{view_name(spec)}:{a.name}" for a in spec.attributes]
    names = [ref.split(":", 1)[1] for ref in refs]
    ordered = events.reset_index(drop=True).assign(**{ROW_ID: lambda f: range(len(f))})
    joined = store.get_historical_features(entity_df=ordered, features=refs).to_df()
    # Feast's file offline store drops an event whose entity has feature rows, all of
    # them later than the event. Joining back on a row id keeps every event, in order,
    # with nulls where no value was known yet.
    return (
        ordered.merge(joined[[ROW_ID, *names]], on=ROW_ID, how="left", validate="one_to_one")
        .sort_values(ROW_ID)
        .drop(columns=ROW_ID)
        .reset_index(drop=True)
    )


def online_features(store: FeatureStore, spec: UseCaseSpec, entity_ids: list[str]) -> pd.DataFrame:
    """The online feature-service values for some entities (None where missing)."""
    rows = [{spec.entity.key: entity_id} for entity_id in entity_ids]
    result = store.get_online_features(
        features=store.get_feature_service(spec.feature_service), entity_rows=rows
    )
    return pd.DataFrame(result.to_dict())
