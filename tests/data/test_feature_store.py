"""The Feast repo generated from a spec: point-in-time joins and materialization."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.features import ingest
from clinml.features import store as feature_store
from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from tests.conftest import NOW, PSEUDONYMISER, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Feast and Great Expectations


@pytest.fixture
def published(tiny_spec: UseCaseSpec, tmp_path: Path):
    """A tiny use case ingested and applied in a temporary data directory.

    Patient T00000 gets a second, later feature row (heart_rate 199) 10 days after
    its first one, so point-in-time retrieval has something to get wrong.
    """
    frame = make_tiny_frame(n=60)
    first = frame.iloc[0]
    late = first.copy()
    late["event_timestamp"] = first["event_timestamp"] + timedelta(days=10)
    late["heart_rate"] = 199.0
    frame = pd.concat([frame, late.to_frame().T], ignore_index=True).astype(
        {"heart_rate": float, "creatinine": float}
    )
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=frame)
    store = feature_store.open_store(tiny_spec, paths)
    feature_store.apply(store, tiny_spec, paths)
    return store, paths, frame, first


def test_generated_repo_has_entity_view_and_versioned_service(
    published, tiny_spec: UseCaseSpec
) -> None:
    store, paths, _, _ = published
    assert (paths.feast_repo / "feature_store.yaml").is_file()
    assert not list(paths.feast_repo.glob("*.py"))  # nothing for `feast apply` to import
    assert [e.name for e in store.list_entities()] == ["patient"]
    service = store.get_feature_service("tiny_v1")
    [projection] = service.feature_view_projections
    assert [f.name for f in projection.features] == ["heart_rate", "creatinine", "ward"]
    assert feature_store.service_feature_refs(store, tiny_spec) == [
        "tiny_features:heart_rate",
        "tiny_features:creatinine",
        "tiny_features:ward",
    ]


def test_a_value_that_arrives_later_is_not_used(published, tiny_spec: UseCaseSpec) -> None:
    store, _, _, first = published
    t0 = first["event_timestamp"]
    events = pd.DataFrame(
        {
            "patient_id": [PSEUDONYMISER.one(first["patient_id"])] * 3,
            "event_timestamp": [
                t0 + timedelta(days=5),
                t0 + timedelta(days=10),
                t0 - timedelta(days=1),
            ],
            "outcome": ["yes", "no", "no"],
        }
    )
    frame = feature_store.training_frame(store, tiny_spec, events)
    # Same order as the events, with features and the attribute joined.
    assert list(frame["event_timestamp"]) == list(events["event_timestamp"])
    assert list(frame.columns) == [
        "patient_id",
        "event_timestamp",
        "outcome",
        "heart_rate",
        "creatinine",
        "ward",
        "site",
    ]
    assert frame.loc[0, "heart_rate"] == pytest.approx(first["heart_rate"])  # before the late row
    assert frame.loc[1, "heart_rate"] == 199.0  # at the late row's timestamp
    assert pd.isna(frame.loc[2, "heart_rate"])  # before any feature row: nothing, not a default


def test_materialize_loads_the_newest_row_of_every_entity(
    published, tiny_spec: UseCaseSpec
) -> None:
    """Guards against feast#5228 (the newest row skipped) as well as missing entities."""
    store, _, frame, first = published
    result = feature_store.materialize(store, tiny_spec, NOW + timedelta(seconds=1))
    assert result.mode == "full"  # the first run of a view loads all history
    ids = sorted(PSEUDONYMISER.many(frame["patient_id"].unique()))
    online = feature_store.online_features(store, tiny_spec, [*ids, "nobody"])
    known = online[online["patient_id"] != "nobody"]
    assert len(known) == len(ids)
    assert not known[["heart_rate", "creatinine", "ward"]].isna().any().any()
    by_id = online.set_index("patient_id")
    assert by_id.loc[PSEUDONYMISER.one(first["patient_id"]), "heart_rate"] == 199.0
    assert by_id.loc["nobody"].isna().all()


def test_online_lookup_tells_missing_from_stale(tiny_spec: UseCaseSpec, tmp_path: Path) -> None:
    spec = tiny_spec.model_copy(update={"feature_ttl_days": 30.0})
    frame = make_tiny_frame(n=200, seed=31)
    paths = Paths(tmp_path).usecase(spec.name)
    ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=frame)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    feature_store.materialize(store, spec, NOW)

    latest = frame.groupby("patient_id")["event_timestamp"].max()
    fresh_id = latest[latest > NOW - timedelta(days=20)].index[0]
    stale_id = latest[latest < NOW - timedelta(days=60)].index[0]
    ids = [
        PSEUDONYMISER.one(fresh_id),
        PSEUDONYMISER.one(stale_id),
        PSEUDONYMISER.one("never-seen"),
    ]
    for reader in (None, "feast"):  # the direct SQLite reader and Feast's own API agree
        lookup = (
            feature_store.online_lookup(store, spec, ids, NOW)
            if reader is None
            else _lookup_through_feast(store, spec, ids)
        )
        assert lookup.problems[0] == {}
        assert lookup.problems[1] == dict.fromkeys(spec.feature_names, "stale")
        assert lookup.problems[2] == dict.fromkeys(spec.feature_names, "missing")
        assert lookup.usable == [True, False, False]
        assert lookup.values.loc[2, spec.feature_names].isna().all()  # nothing imputed
        assert lookup.values.loc[1, "heart_rate"] is not None  # a stale value is still shown
        assert lookup.event_times[0] == latest[fresh_id]

    # asked for a time before the fresh patient's values were recorded: nothing to answer
    # with (the store keeps only the newest), not the later values
    before = latest[fresh_id] - timedelta(days=1)
    early = feature_store.online_lookup(store, spec, ids[:1], before)
    assert early.problems[0] == dict.fromkeys(spec.feature_names, "recorded_after_as_of")


def _lookup_through_feast(store, spec, ids):
    from unittest import mock

    with mock.patch.object(store.config.online_store, "type", "feast-api"):
        return feature_store.online_lookup(store, spec, ids, NOW)


def test_incremental_materialization_loads_only_what_is_new(
    tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    paths = Paths(tmp_path).usecase(tiny_spec.name)
    first = make_tiny_frame(n=150, seed=51)
    ingest.run(tiny_spec, paths, NOW, PSEUDONYMISER, frame=first)
    store = feature_store.open_store(tiny_spec, paths)
    feature_store.apply(store, tiny_spec, paths)
    full = feature_store.materialize(store, tiny_spec, NOW)
    assert (full.mode, full.entities_written) == ("full", 150)

    # A day later, 30 of the patients come back with new measurements.
    later = first.head(30).assign(
        event_timestamp=NOW + timedelta(hours=6), heart_rate=lambda f: f["heart_rate"] + 1.0
    )
    ingest.run(tiny_spec, paths, NOW + timedelta(days=1), PSEUDONYMISER, frame=later, append=True)
    incremental = feature_store.materialize(store, tiny_spec, NOW + timedelta(days=1))
    assert incremental.mode == "incremental"
    assert abs(incremental.start - NOW) < timedelta(seconds=1)
    assert incremental.entities_written == 30 and incremental.rows_read == 180

    online = feature_store.online_features(
        store, tiny_spec, PSEUDONYMISER.many(first["patient_id"])
    )
    np.testing.assert_allclose(online["heart_rate"].head(30), later["heart_rate"])
    np.testing.assert_allclose(online["heart_rate"].iloc[30:], first["heart_rate"].iloc[30:])


def test_training_frame_gives_feast_the_event_time_so_it_guesses_and_prints_nothing(
    tiny_spec: UseCaseSpec, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A spec whose timestamp is not called event_timestamp made Feast print "Using
    sample_date as the event timestamp..." on every join (issue 20)."""
    spec = tiny_spec.model_copy(update={"event_timestamp": "sample_date"})
    frame = make_tiny_frame(n=40).rename(columns={"event_timestamp": "sample_date"})
    paths = Paths(tmp_path).usecase(spec.name)
    ingest.run(spec, paths, NOW, PSEUDONYMISER, frame=frame)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    events = pd.DataFrame(
        {
            "patient_id": PSEUDONYMISER.many(frame["patient_id"]),
            "sample_date": frame["sample_date"],
            "outcome": frame["outcome"],
            # another time column: Feast would have refused to guess between the two
            "known_at": frame["sample_date"] + timedelta(days=30),
        }
    )
    capfd.readouterr()

    joined = feature_store.training_frame(store, spec, events)

    printed = capfd.readouterr()
    assert "as the event timestamp" not in printed.out + printed.err
    assert list(joined.columns[:4]) == ["patient_id", "sample_date", "outcome", "known_at"]
    assert joined["heart_rate"].tolist() == pytest.approx(frame["heart_rate"].tolist())
    assert joined["sample_date"].tolist() == events["sample_date"].tolist()
