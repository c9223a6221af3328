"""The Feast point-in-time check every generated use case's tests run on its own rows."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

from clinml.features import ingest
from clinml.features import store as feature_store
from clinml.settings import Paths
from clinml.spec import UseCaseSpec
from tests.conftest import PSEUDONYMISER


def assert_point_in_time(
    spec: UseCaseSpec,
    raw: pd.DataFrame,
    end: datetime,
    home: Path,
    exact: tuple[str, ...],
    carried: str,
) -> None:
    """Ingest ``raw`` into a real Feast repo under ``home``, then ask for every row's
    features at its own event time and one second before.

    At its event time a row sees its own ``exact`` columns. One second before, the row is
    not known yet: ``carried`` (a history count) is the patient's previous row's value when
    that row is within the spec's TTL, and missing otherwise; both cases must occur.
    """
    paths = Paths(home).usecase(spec.name)
    ingest.run(spec, paths, end, PSEUDONYMISER, frame=raw)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)

    pseudonyms = dict(zip(raw["patient_id"], PSEUDONYMISER.many(raw["patient_id"]), strict=True))
    events = pd.DataFrame(
        {
            "patient_id": raw["patient_id"].map(pseudonyms),
            "event_timestamp": raw["event_timestamp"],
            spec.label.column: raw[spec.label.column],
        }
    )
    at_event = feature_store.training_frame(store, spec, events)
    for column in exact:
        assert (at_event[column].to_numpy() == raw[column].to_numpy()).all(), column

    before = feature_store.training_frame(
        store, spec, events.assign(event_timestamp=events["event_timestamp"] - timedelta(seconds=1))
    )
    ordered = raw.assign(row=range(len(raw))).sort_values(["patient_id", "event_timestamp"])
    previous = ordered.groupby("patient_id")[["event_timestamp", carried]].shift(1)
    previous.index = ordered["row"]
    previous = previous.sort_index()
    within_ttl = (raw["event_timestamp"] - previous["event_timestamp"]) <= timedelta(
        days=spec.feature_ttl_days
    )
    got = before[carried]
    assert got[within_ttl].tolist() == previous.loc[within_ttl, carried].astype(int).tolist()
    assert got[~within_ttl].isna().all()
    assert (~within_ttl).sum() > 0 and within_ttl.sum() > 0
