"""The Feast repo generated from a spec: definitions, apply, materialize, retrieval.

Each use case gets its own Feast repo under ``$CLINML_HOME/<usecase>/feast/``. Only
``feature_store.yaml`` is written there (the embedded stores, or the environment's:
``clinml.environment``); the feature objects are built in code from the
spec and registered with ``FeatureStore.apply``, so there are no generated ``.py`` files
for ``feast apply`` to import.

Writers of the repo (``apply``, ``materialize``) take turns (a lock in the repo) and
change it all or nothing: the registry is replaced in one rename
(``clinml.features.registry_store``), ``apply`` writes nothing when the registry already holds
the spec's definitions, and a materialization commits in one SQLite transaction
(``clinml.features.online_sqlite.bulk_materialize`` says what a kill at each point leaves).
Other online stores (Redis) are written by Feast's own ``materialize``, which is not all
or nothing: a failed run leaves some entities updated, and running it again completes it.

Usage::

    store = open_store(spec, paths)          # writes feature_store.yaml, opens the repo
    apply(store, spec, paths)                # entity, source, view, feature service
    materialize(store, spec, end)            # offline parquet -> online store (incremental)
    frame = training_frame(store, spec, events)   # point-in-time join
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from clinml import atomic
from clinml.environment import REGISTRY_FILE, FeastEnvironment, FeastEnvironmentError
from clinml.settings import UseCasePaths
from clinml.spec import ColumnSpec, UseCaseSpec

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


def feature_store_config(
    spec: UseCaseSpec, environment: FeastEnvironment | None = None
) -> dict[str, Any]:
    """The use case's ``feature_store.yaml``: the environment's stores (``clinml.environment``).

    By default the embedded profile: file offline store, SQLite online store and a file
    registry, at paths relative to the repo so the data directory can be moved. The
    registry file is Feast's own format, written by a store that replaces it atomically
    (Feast's rewrites it in place).
    """
    return (environment or FeastEnvironment.embedded()).config(spec.name)


def view_name(spec: UseCaseSpec) -> str:
    return f"{spec.name}_features"


# Tag carrying a digest of the registered definitions, so apply can tell that the
# registry already holds them.
DEFINITIONS_TAG = "clinml.definitions_sha256"


def registry_tags(spec: UseCaseSpec) -> dict[str, str]:
    """Tags on every registered object: which use case and spec version made it."""
    return {
        "clinml.usecase": spec.name,
        "clinml.spec_sha256": spec.fingerprint()[:16],
        "clinml.entity_ids": "pseudonymised",
    }


def ttl(spec: UseCaseSpec) -> timedelta | None:
    return None if spec.feature_ttl_days is None else timedelta(days=spec.feature_ttl_days)


def _feast_type(column: ColumnSpec) -> Any:
    from feast.types import Float64, Int64, String

    return {"float": Float64, "int": Int64, "category": String}[column.type]


def make_source(spec: UseCaseSpec, paths: UseCasePaths, config: Any = None) -> Any:
    """The offline source for this environment's offline store.

    Feast couples source classes to offline stores (``FileSource`` only works with the
    file store), so every source is created here, one branch per offline store type
    (``config``: the opened store's ``RepoConfig``; None for the embedded file store).
    docs/deployment.md says what a branch for Spark, BigQuery or Snowflake needs.
    """
    kind = "file" if config is None else config.offline_store.type
    name = f"{spec.name}_source"
    description = f"Validated, pseudonymised {spec.name} features written by clinml ingest."
    # Why: the validated, identifier-free data written by ingestion is the only place
    # features enter Feast.
    if kind == "file":
        from feast import FileSource

        return FileSource(
            name=name,
            path=str(paths.features_file),
            timestamp_field=spec.event_timestamp,
            description=description,
            tags=registry_tags(spec),
        )
    if kind == "postgres":
        from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
            PostgreSQLSource,
        )

        from clinml.features.offline import PostgresTables

        # The table ingestion replaces (clinml.features.offline), by its schema-qualified name.
        table = PostgresTables(config.offline_store.model_dump(), config.project)
        return PostgreSQLSource(
            name=name,
            query=f"SELECT * FROM {table.qualified('features')}",
            timestamp_field=spec.event_timestamp,
            description=description,
            tags=registry_tags(spec),
        )
    raise FeastEnvironmentError(
        f"offline store type {kind!r} has no source branch in clinml.features.store.make_source "
        "(docs/deployment.md says how to add one)"
    )


@dataclass(frozen=True)
class Definitions:
    entity: Any
    source: Any
    view: Any
    service: Any

    def all(self) -> list[Any]:
        return [self.entity, self.source, self.view, self.service]


def definitions(spec: UseCaseSpec, paths: UseCasePaths, config: Any = None) -> Definitions:
    """The Feast objects for a spec (``config``: the store's, for its source class)."""
    from feast import Entity, FeatureService, FeatureView, Field
    from feast.value_type import ValueType

    # Why: every feature row and every prediction is about one patient, keyed by the
    # pseudonymous id.
    entity = Entity(
        name=spec.entity.name,
        join_keys=[spec.entity.key],
        value_type=ValueType.STRING,
        description=spec.entity.description or f"The {spec.entity.name}, by pseudonymous id.",
        tags=registry_tags(spec),
    )
    source = make_source(spec, paths, config)
    # Why: one view holds the model inputs and the subgroup attributes, so a training
    # frame and its subgroups come from the same point-in-time join. Its TTL is the
    # spec's: older values are not joined in training and are reported stale online.
    view = FeatureView(
        name=view_name(spec),
        entities=[entity],
        schema=[
            Field(
                name=c.name,
                dtype=_feast_type(c),
                description=c.description + (f" [{c.unit}]" if c.unit else ""),
                tags={"unit": c.unit or "", "type": c.type},
            )
            for c in spec.columns
        ],
        source=source,
        ttl=ttl(spec),
        online=True,
        description=spec.description or f"Features of {spec.name}.",
        tags=registry_tags(spec),
    )
    # Why: the versioned contract between training and serving: exactly the model
    # inputs, in spec order. A model records the service it was trained on.
    service = FeatureService(
        name=spec.feature_service,
        features=[view[spec.feature_names]],
        description=f"Model inputs for {spec.name}, in spec order.",
        tags=registry_tags(spec),
    )
    defs = Definitions(entity, source, view, service)
    digest = _digest(defs)
    for obj in defs.all():
        obj.tags[DEFINITIONS_TAG] = digest
    return defs


def _digest(defs: Definitions) -> str:
    """A digest of the definitions as Feast would register them, minus its timestamps."""
    from google.protobuf.message import Message

    def without_meta(message: Message) -> Message:
        for field, value in message.ListFields():
            if field.name == "meta":  # created/updated timestamps, set at construction
                message.ClearField("meta")
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                for item in [value] if isinstance(value, Message) else value:
                    without_meta(item)
        return message

    digest = hashlib.sha256()
    for obj in defs.all():
        digest.update(without_meta(obj.to_proto()).SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def open_store(
    spec: UseCaseSpec, paths: UseCasePaths, environment: FeastEnvironment | None = None
) -> FeatureStore:
    """Write the repo's ``feature_store.yaml`` if it changed (atomically) and open the store.

    ``environment``: the deployment's stores (``Settings.feast_environment``); default
    the embedded ones. The file keeps ``${VAR}`` references unexpanded: Feast expands
    them when it loads it, so no secret is written here.
    """
    from feast import FeatureStore

    repo = paths.feast_repo
    repo.mkdir(parents=True, exist_ok=True)
    config_file = repo / "feature_store.yaml"
    text = yaml.safe_dump(feature_store_config(spec, environment), sort_keys=False)
    if not config_file.is_file() or config_file.read_text() != text:
        atomic.write_atomic(config_file, text)
    from feast.repo_config import FeastConfigError
    from pydantic import ValidationError

    try:
        return FeatureStore(repo_path=str(repo))
    except FeastConfigError as exc:
        # Say which setting is wrong, never its value (it may be an expanded secret).
        # Feast wraps pydantic's error: it is the exception's argument (and its context).
        error = next(
            (e for e in (*exc.args, exc.__context__) if isinstance(e, ValidationError)), exc
        )
        where = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in (error.errors() if isinstance(error, ValidationError) else [])
        )
        source = (environment.source if environment else None) or config_file
        raise FeastEnvironmentError(
            f"invalid Feast configuration from {source}: {where or type(error).__name__} "
            "(an empty ${VAR} reads as a missing value)"
        ) from None


@contextmanager
def _writing(store: FeatureStore) -> Iterator[None]:
    """Hold the repo's writer lock, with the registry re-read under it."""
    repo = Path(store.repo_path)
    with atomic.locked(repo / ".clinml.lock"):
        atomic.remove_leftovers(repo / REGISTRY_FILE)  # of a writer killed mid-write
        store.refresh_registry()
        yield


def _registered(store: FeatureStore, defs: Definitions) -> bool:
    """Whether the registry (and the online table) already hold exactly ``defs``."""
    from feast.errors import FeastObjectNotFoundException, ProjectNotFoundException

    from clinml.features import online_sqlite

    try:
        registered = [
            store.get_entity(defs.entity.name),
            store.get_data_source(defs.source.name),
            store.get_feature_view(defs.view.name),
            store.get_feature_service(defs.service.name),
        ]
    except (FeastObjectNotFoundException, ProjectNotFoundException):
        return False
    wanted = defs.view.tags[DEFINITIONS_TAG]
    if any(obj.tags.get(DEFINITIONS_TAG) != wanted for obj in registered):
        return False
    if store.config.online_store.type == "sqlite":
        return online_sqlite.has_table(store, defs.view)
    return True


def apply(store: FeatureStore, spec: UseCaseSpec, paths: UseCasePaths) -> Definitions:
    """Register the spec's entity, source, view and feature service.

    Nothing is written when the registry already holds exactly these definitions
    (Feast would rewrite every object's timestamps), so applying an unchanged spec
    leaves the repo as it was.
    """
    defs = definitions(spec, paths, store.config)
    with _writing(store):
        if not _registered(store, defs):
            store.apply(defs.all())
    return defs


@dataclass(frozen=True)
class MaterializeResult:
    mode: str  # "full" or "incremental"
    start: datetime
    end: datetime
    rows_read: int
    entities_written: int


def materialize(
    store: FeatureStore,
    spec: UseCaseSpec,
    end: datetime,
    full: bool = False,
    progress: Callable[[int, int], Any] | None = None,
) -> MaterializeResult:
    """Load the newest value per entity up to ``end`` into the online store.

    Incremental by default: from where the last run ended. With ``full``, and always on
    a view's first run, from its earliest offline row (Feast's own
    ``materialize_incremental`` would look back only one TTL). The SQLite online store
    is written in bulk and in one transaction (``clinml.features.online_sqlite``), which
    leaves it as it was if the run fails or is killed before committing; a run that
    committed but was killed before recording its interval in Feast's registry has the
    record completed here, first. Other online stores go through Feast's
    ``materialize``, which gives no such guarantee.
    """
    from clinml.features import online_sqlite

    with _writing(store):
        view = store.get_feature_view(view_name(spec))
        sqlite = store.config.online_store.type == "sqlite"
        if sqlite and online_sqlite.complete_registry_record(store, view):
            view = store.get_feature_view(view.name)
        mode = "full" if full or view.most_recent_end_time is None else "incremental"
        if mode == "full":
            start = earliest_offline_timestamp(store, spec, view) - timedelta(seconds=1)
        else:
            start = view.most_recent_end_time
        if start >= end:  # nothing new since the last run: record no empty interval
            return MaterializeResult(mode, start, end, rows_read=0, entities_written=0)
        if sqlite:
            bulk = online_sqlite.bulk_materialize(store, spec, view, start, end, progress)
            return MaterializeResult(mode, start, end, bulk.rows_read, bulk.entities_written)
        _quietly(store.materialize, start_date=start, end_date=end, feature_views=[view.name])
        return MaterializeResult(mode, start, end, rows_read=-1, entities_written=-1)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _quietly(call: Callable[..., Any], **kwargs: Any) -> Any:
    """Run a Feast call with what it prints (colour-coded progress text) sent to the log.

    Feast's ``materialize`` prints to stdout; clinml's commands print their own progress,
    so Feast's text goes to this module's logger at DEBUG, without its colour codes.
    """
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            return call(**kwargs)
    finally:
        text = _ANSI_ESCAPE.sub("", printed.getvalue()).strip()
        if text:
            log.debug("Feast printed: %s", " | ".join(text.splitlines()))


def earliest_offline_timestamp(store: FeatureStore, spec: UseCaseSpec, view: Any) -> datetime:
    if store.config.offline_store.type == "postgres":
        from clinml.features.offline import PostgresTables

        tables = PostgresTables.for_store(store)
        earliest = tables.earliest(spec.event_timestamp)
        if earliest is None:
            raise ValueError(f"no rows in {tables.qualified('features')} to materialize")
        return earliest
    path = view.batch_source.path
    stamps = pd.read_parquet(path, columns=[spec.event_timestamp])[spec.event_timestamp]
    if stamps.empty:
        raise ValueError(f"no rows in {path} to materialize")
    return stamps.min().to_pydatetime()


def service_feature_refs(store: FeatureStore, spec: UseCaseSpec) -> list[str]:
    """``view:feature`` references of the spec's feature service, in order."""
    service = store.get_feature_service(spec.feature_service)
    return [
        f"{projection.name_to_use()}:{feature.name}"
        for projection in service.feature_view_projections
        for feature in projection.features
    ]


ROW_ID = "_clinml_row"
# The entity-frame column Feast reads event times from without guessing (Feast's
# DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL).
FEAST_EVENT_TIMESTAMP = "event_timestamp"


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
    # Feast takes the entity frame's time from a column named "event_timestamp" and
    # otherwise guesses (printing "Using ... as the event timestamp"), so it is handed
    # just the key, the spec's timestamp under that name, and the row id.
    key, stamp = spec.entity.key, spec.event_timestamp
    entity_df = ordered[[key, stamp, ROW_ID]].rename(columns={stamp: FEAST_EVENT_TIMESTAMP})
    joined = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    # Feast's file offline store drops an event whose entity has feature rows, all of
    # them later than the event. Joining back on a row id keeps every event, in order,
    # with nulls where no value was known yet.
    return (
        ordered.merge(joined[[ROW_ID, *names]], on=ROW_ID, how="left", validate="one_to_one")
        .sort_values(ROW_ID)
        .drop(columns=ROW_ID)
        .reset_index(drop=True)
    )


MISSING = "missing"
STALE = "stale"
LATER = "recorded_after_as_of"  # a value from after the time asked for: using it would leak
_FIELD_STATUS_PRESENT = 1  # feast.protos...FieldStatus.PRESENT


@dataclass(frozen=True)
class OnlineLookup:
    """Online feature-service values for some entities, with what is wrong with them.

    Attributes:
        key: the entity key column's name.
        entity_ids: the requested ids, in request order.
        records: per id, ``{feature: value}`` in spec order. A missing value is None,
            never a default. (Plain dicts: serving scores them without building a frame.)
        recorded_at: when each row's values were recorded (None where nothing was found).
        problems: per row, ``{feature: "missing" | "stale"}``; empty when usable.
    """

    key: str
    entity_ids: list[str]
    records: list[dict[str, Any]]
    recorded_at: list[datetime | None]
    problems: list[dict[str, str]]

    @property
    def values(self) -> pd.DataFrame:
        """One row per requested id: the entity key, then the features in spec order."""
        frame = pd.DataFrame.from_records(self.records)
        frame.insert(0, self.key, self.entity_ids)
        return frame

    @property
    def event_times(self) -> pd.Series:
        """When each row's values were recorded (NaT where missing)."""
        return pd.Series(
            [pd.NaT if t is None else t for t in self.recorded_at], dtype="datetime64[ns, UTC]"
        )

    @property
    def usable(self) -> list[bool]:
        return [not p for p in self.problems]


def online_lookup(
    store: FeatureStore,
    spec: UseCaseSpec,
    entity_ids: list[str],
    as_of: datetime,
    reader: Any = None,
    rows: list[dict[str, tuple[Any, datetime]] | None] | None = None,
) -> OnlineLookup:
    """Read the feature service online and tell missing values from stale ones.

    A feature is *missing* when the store has no value for the entity (or a null in a
    column the spec does not declare nullable), *stale* when its value was recorded
    more than the spec's TTL before ``as_of``, and *recorded after as_of* when its value
    is from later than the time asked for (the online store holds only the newest
    value, so there is nothing older to answer with). Nothing is imputed.

    Args:
        store: the applied feature store.
        spec: the use-case spec.
        entity_ids: pseudonymised entity ids, in the order wanted back.
        as_of: the time the values are needed for.
        reader: an ``online_feast.online_reader`` to reuse (serving keeps one); by
            default one is opened for this call.
        rows: the entities' rows already read (``OnlineReader.read``'s shape, one per
            id), for a caller that batches reads; then nothing is read here.
    """
    from clinml.features.online_feast import online_reader

    if rows is not None:
        if len(rows) != len(entity_ids):
            raise ValueError(f"{len(rows)} rows read for {len(entity_ids)} entity ids")
    elif reader is not None:
        rows = reader.read(entity_ids)
    else:
        own = online_reader(store, spec)
        try:
            rows = own.read(entity_ids)
        finally:
            own.close()
    features = spec.feature_names
    nullable = {c.name for c in spec.features if c.nullable}
    limit = ttl(spec)
    # Plain datetimes: comparing against a pandas Timestamp costs microseconds per value.
    oldest_valid = as_of - limit if limit is not None else None
    records: list[dict[str, Any]] = []
    recorded_at: list[datetime | None] = []
    problems: list[dict[str, str]] = []
    for row in rows:
        row = row or {}
        found: dict[str, str] = {}
        record: dict[str, Any] = {}
        newest = None
        for f in features:
            value, recorded = row.get(f, (None, None))
            record[f] = value
            if f not in row or (value is None and f not in nullable):
                found[f] = MISSING
                continue
            newest = recorded if newest is None or recorded > newest else newest
            if oldest_valid is not None and recorded < oldest_valid:
                found[f] = STALE
            elif recorded > as_of:
                found[f] = LATER
        records.append(record)
        recorded_at.append(newest)
        problems.append(found)
    return OnlineLookup(spec.entity.key, list(entity_ids), records, recorded_at, problems)


def _read_with_feast(
    store: FeatureStore, spec: UseCaseSpec, entity_ids: list[str]
) -> list[dict[str, tuple[Any, datetime]] | None]:
    """Rows in the readers' shape through Feast's own ``get_online_features``: the
    reference the readers are tested and benchmarked against (any online store)."""
    rows = [{spec.entity.key: entity_id} for entity_id in entity_ids]
    response = store.get_online_features(
        features=store.get_feature_service(spec.feature_service), entity_rows=rows
    )
    data = response.to_dict(include_event_timestamps=True)
    names = list(response.proto.metadata.feature_names.val)
    statuses = {
        name: list(r.statuses) for name, r in zip(names, response.proto.results, strict=True)
    }
    out: list[dict[str, tuple[Any, datetime]] | None] = []
    for i in range(len(entity_ids)):
        # Feast's Redis store answers an entity it does not have with every feature
        # PRESENT, null, recorded at the epoch: that is not found, as SQLite reports it.
        row = {
            f: (data[f][i], datetime.fromtimestamp(data[f"{f}__ts"][i], UTC))
            for f in spec.feature_names
            if statuses[f][i] == _FIELD_STATUS_PRESENT and data[f"{f}__ts"][i]
        }
        out.append(row or None)
    return out


def online_features(store: FeatureStore, spec: UseCaseSpec, entity_ids: list[str]) -> pd.DataFrame:
    """The online feature-service values for some entities (None where missing)."""
    return online_lookup(store, spec, entity_ids, datetime.now(UTC)).values
