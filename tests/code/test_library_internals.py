"""The private parts of our libraries that clinml stands on are still there, and still mean
what the adapters assume (STYLE.md, habit 12).

One adapter per library holds every private use: ``clinml.features.feast_internals`` (Feast)
and ``clinml.features.gx_internals`` (Great Expectations). scikit-learn and Evidently need
none: training catches scikit-learn's parameter errors as the ``TypeError`` they are
(checked here), and the monitor uses only Evidently's public API. Each test fails with
a message naming the library, the version installed and the private thing that moved,
so an upgrade that breaks an adapter says where to look. The strongest check is for
Feast: rows written by clinml's own SQLite writer read back identically through Feast's
public ``FeatureStore.get_online_features``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from tests.conftest import NOW, PROJECT_ROOT, PSEUDONYMISER, make_tiny_frame

LAYERS = ("clinml", "features", "training", "monitoring", "pipelines")
# Each library (its import name) and the one module allowed its private parts, if any.
ADAPTERS = {
    "feast": "features/feast_internals.py",
    "great_expectations": "features/gx_internals.py",
    "sklearn": None,
    "evidently": None,
}


def _changed(library: str, distribution: str, adapter: str, written_for: str, what: str) -> str:
    version = importlib.metadata.version(distribution)
    return (
        f"{library} {version} is installed, but {adapter} was written for {library} "
        f"{written_for}: {what}. Find the new way in {library} {version}, change {adapter} "
        "(its WRITTEN_FOR and docstrings too), and run this test again."
    )


def _feast(what: str) -> str:
    from clinml.features.feast_internals import WRITTEN_FOR

    return _changed("Feast", "feast", "features/feast_internals.py", WRITTEN_FOR, what)


def _gx(what: str) -> str:
    from clinml.features.gx_internals import WRITTEN_FOR

    return _changed(
        "Great Expectations", "great-expectations", "features/gx_internals.py", WRITTEN_FOR, what
    )


def _private(module: str, name: str, fail: Callable[[str], str]) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(fail(f"`{module}.{name}` no longer exists"))


def _parameters(function: Any, expected: list[str], fail: Callable[[str], str], what: str) -> None:
    found = list(inspect.signature(function).parameters)
    if found[: len(expected)] != expected:
        pytest.fail(fail(f"`{what}` now takes ({', '.join(found)}), not ({', '.join(expected)})"))


def _private_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a private module or name of the four libraries,
    or of Evidently's legacy API, anywhere in ``path`` (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [(node.module, [a.name for a in node.names])]
        elif isinstance(node, ast.Import):
            modules = [(a.name, []) for a in node.names]
        else:
            continue
        for module, names in modules:
            parts = module.split(".")
            if parts[0] not in ADAPTERS:
                continue
            if (
                any(p.startswith("_") for p in parts)
                or any(n.startswith("_") for n in names)
                or module.startswith("evidently.legacy")
            ):
                found.append((node.lineno, module))
    return found


def test_private_library_parts_are_used_only_in_their_adapter() -> None:
    """serving/ is left out: its BentoML internals have their own owner."""
    allowed = {adapter for adapter in ADAPTERS.values() if adapter}
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line}: {module}"
        for layer in LAYERS
        for path in sorted((PROJECT_ROOT / layer).rglob("*.py"))
        if str(path.relative_to(PROJECT_ROOT)) not in allowed
        for line, module in _private_imports(path)
    ]
    assert not offenders, (
        "private parts of Feast, Great Expectations, scikit-learn or Evidently are imported "
        "outside their adapter module (features/feast_internals.py, features/gx_internals.py"
        "): move them there, with a docstring saying what they use and why no public way "
        "exists:\n" + "\n".join(offenders)
    )


# Feast -------------------------------------------------------------------------------


def test_feast_private_functions_keep_their_names_and_parameters() -> None:
    table_id = _private("feast.infra.online_stores.sqlite", "_table_id", _feast)
    _parameters(table_id, ["project", "table", "enable_versioning"], _feast, "sqlite._table_id")
    serialize = _private("feast.infra.key_encoding_utils", "serialize_entity_key", _feast)
    _parameters(
        serialize,
        ["entity_key", "entity_key_serialization_version"],
        _feast,
        "key_encoding_utils.serialize_entity_key",
    )
    from feast.infra.registry.base_registry import BaseRegistry

    _parameters(
        BaseRegistry.apply_materialization,
        ["self", "feature_view", "project", "start_date", "end_date", "commit"],
        _feast,
        "BaseRegistry.apply_materialization",
    )
    from feast.infra.registry.file import FileRegistryStore

    _parameters(
        FileRegistryStore.__init__,
        ["self", "registry_config", "repo_path"],
        _feast,
        "FileRegistryStore.__init__",
    )
    _parameters(
        FileRegistryStore.update_registry_proto,
        ["self", "registry_proto"],
        _feast,
        "FileRegistryStore.update_registry_proto",
    )


def test_feast_settings_the_adapter_reads_still_exist() -> None:
    from feast.feature_store import FeatureStore
    from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
    from feast.repo_config import RegistryConfig, RepoConfig

    for model, field in [
        (RepoConfig, "entity_key_serialization_version"),
        (RegistryConfig, "enable_online_feature_view_versioning"),
        (SqliteOnlineStoreConfig, "enable_openai_compatible_store"),
        (SqliteOnlineStoreConfig, "vector_enabled"),
        (SqliteOnlineStoreConfig, "path"),
    ]:
        if field not in model.model_fields:
            pytest.fail(_feast(f"`{model.__name__}` has no setting `{field}` any more"))
    if not isinstance(inspect.getattr_static(FeatureStore, "provider", None), property):
        pytest.fail(_feast("`FeatureStore.provider` (features/online_feast.py) is gone"))


def test_feast_config_errors_still_carry_pydantics_error(tmp_path: Path) -> None:
    """clinml.features.store.open_store names the bad setting from pydantic's error, found as the
    FeastConfigError's argument, so a secret's value is never printed."""
    from feast.repo_config import FeastConfigError, load_repo_config
    from pydantic import ValidationError

    (tmp_path / "feature_store.yaml").write_text(
        "project: p\nprovider: local\nregistry: r.db\nentity_key_serialization_version: x\n"
    )
    with pytest.raises(FeastConfigError) as caught:
        load_repo_config(tmp_path, tmp_path / "feature_store.yaml")
    if not any(isinstance(a, ValidationError) for a in caught.value.args):
        pytest.fail(
            _feast(
                "FeastConfigError no longer holds pydantic's ValidationError as its argument "
                f"(args: {[type(a).__name__ for a in caught.value.args]}); features/store.py's "
                "open_store reads it from there"
            )
        )


def _published(spec: UseCaseSpec, home: Path, frame: pd.DataFrame):
    from clinml.features import ingest
    from clinml.features import store as feature_store

    paths = Paths(home).usecase(spec.name)
    ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=frame)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    return store, paths


@pytest.mark.slow
def test_rows_clinml_writes_read_back_identically_through_feasts_public_api(
    tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    from clinml.features import feast_internals, online_sqlite
    from clinml.features import store as feature_store

    frame = make_tiny_frame(n=60, seed=21)
    # A later row for some patients: the newest row per patient is the one to read back.
    later = frame.iloc[:15].assign(
        event_timestamp=lambda f: f["event_timestamp"] + timedelta(hours=12),
        heart_rate=lambda f: f["heart_rate"] + 0.125,
        ward="icu",
    )
    store, paths = _published(tiny_spec, tmp_path, pd.concat([frame, later], ignore_index=True))
    view = store.get_feature_view(feature_store.view_name(tiny_spec))
    table = feast_internals.sqlite_table(store, view)

    with closing(sqlite3.connect(online_sqlite.db_path(store))) as connection:
        columns = {row[1]: row[2] for row in connection.execute(f'PRAGMA table_info("{table}")')}
    if not columns:
        pytest.fail(_feast(f"`feast apply` made no SQLite table named {table!r}"))
    missing = [c for c in feast_internals.SQLITE_COLUMNS if c not in columns]
    if missing or columns["event_ts"].lower() != "timestamp":
        pytest.fail(_feast(f"the SQLite table's columns are now {columns}"))

    start = datetime(2025, 1, 1, tzinfo=UTC)
    result = online_sqlite.bulk_materialize(store, tiny_spec, view, start, NOW)
    assert result.entities_written == 60

    offline = pd.read_parquet(paths.features_file)
    key, ts = tiny_spec.entity.key, tiny_spec.event_timestamp
    newest = offline.loc[offline.groupby(key)[ts].idxmax()].set_index(key)
    ids = [*newest.index[:40], "ps_nobody"]

    # A fresh store object: nothing cached from the write.
    from feast import FeatureStore

    reread = FeatureStore(repo_path=str(paths.feast_repo))
    response = reread.get_online_features(
        features=reread.get_feature_service(tiny_spec.feature_service),
        entity_rows=[{key: i} for i in ids],
    ).to_dict(include_event_timestamps=True)
    problems = []
    for i, entity in enumerate(ids):
        for name in tiny_spec.feature_names:
            got, at = response[name][i], response[f"{name}__ts"][i]
            if entity not in newest.index:
                if got is not None:
                    problems.append(f"{entity} (never written): {name}={got!r}")
                continue
            want = newest.at[entity, name]
            want_at = int(pd.Timestamp(newest.at[entity, ts]).timestamp())
            if got != want or at != want_at:
                problems.append(f"{entity}: {name}={got!r} at {at}, wrote {want!r} at {want_at}")
    if problems:
        pytest.fail(
            _feast(
                "Feast's get_online_features reads rows clinml's SQLite writer wrote "
                "differently (table, entity keys, columns or timestamps changed): "
                + "; ".join(problems[:5])
            )
        )
    recorded = reread.get_feature_view(view.name).most_recent_end_time
    if recorded is None or abs(recorded - NOW) > timedelta(seconds=1):
        pytest.fail(_feast(f"the registry records {recorded} as materialized, not {NOW}"))

    reader = online_sqlite.OnlineReader.for_store(reread, tiny_spec)
    direct = reader.read(ids)
    reader.close()
    assert direct[-1] is None
    wanted = set(tiny_spec.feature_names)
    assert [{f: v for f, (v, _) in row.items() if f in wanted} for row in direct[:-1]] == [
        {f: newest.at[e, f] for f in tiny_spec.feature_names} for e in ids[:-1]
    ]


def test_the_atomic_registry_store_writes_where_feast_reads(tmp_path: Path) -> None:
    from feast.infra.registry.file import FileRegistryStore
    from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
    from feast.repo_config import RegistryConfig

    from clinml.features.registry_store import AtomicFileRegistryStore

    config = RegistryConfig(path="data/registry.db")
    proto = RegistryProto(registry_schema_version="1")
    AtomicFileRegistryStore(config, tmp_path).update_registry_proto(proto)
    try:
        read = FileRegistryStore(config, tmp_path).get_registry_proto()
    except FileNotFoundError:
        pytest.fail(_feast("FileRegistryStore reads the registry from another path"))
    assert read.registry_schema_version == "1" and read.version_id == proto.version_id
    assert not list((tmp_path / "data").glob(".*"))  # no temporary file left behind


# Great Expectations -------------------------------------------------------------------


@pytest.mark.slow
def test_gx_progress_bars_can_still_be_turned_off(capfd) -> None:
    import great_expectations as gx

    from clinml.features.gx_internals import quiet_progress_bars

    config = _private("great_expectations.data_context.types.base", "ProgressBarsConfig", _gx)
    _parameters(config, ["globally", "metric_calculations"], _gx, "ProgressBarsConfig")
    context = gx.get_context(mode="ephemeral")
    quiet_progress_bars(context)
    batch = (
        context.data_sources.add_pandas("p")
        .add_dataframe_asset("a")
        .add_batch_definition_whole_dataframe("b")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="s"))
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(column="x", min_value=0, max_value=9)
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="v", data=batch, suite=suite)
    )
    capfd.readouterr()
    assert definition.run(batch_parameters={"dataframe": pd.DataFrame({"x": range(10)})}).success
    written = capfd.readouterr().err
    if "Calculating Metrics" in written:
        pytest.fail(_gx("setting progress_bars no longer stops the progress bars"))


# scikit-learn ---------------------------------------------------------------------------


def test_sklearn_parameter_errors_are_still_type_errors() -> None:
    """training.search and clinml.training.train turn an invalid hyperparameter from the spec
    into a SpecError by catching TypeError, the public base of scikit-learn's private
    ``InvalidParameterError`` (it also subclasses ValueError, which training must not
    catch: a data error is not a spec error)."""
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    x, y = np.zeros((4, 1)), np.array([0, 1, 0, 1])
    with pytest.raises(Exception) as caught:
        RandomForestClassifier(n_estimators="many").fit(x, y)
    if not isinstance(caught.value, TypeError):
        pytest.fail(
            f"scikit-learn {importlib.metadata.version('scikit-learn')} raises "
            f"{type(caught.value).__module__}.{type(caught.value).__name__} (bases "
            f"{[b.__name__ for b in type(caught.value).__mro__[1:]]}) for an invalid "
            "parameter, no longer a TypeError: training/search.py and training/train.py "
            "catch TypeError to report it as a spec error; catch the new class instead"
        )
