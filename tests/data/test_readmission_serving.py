"""The readmission spec serves by patient id what its labels need (issue 20, item 5).

The label arrives 30 days after discharge; with a TTL shorter than that, every patient
whose outcome was known was stale online, so `/predict_patient` answered none of them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clinml.features import ingest
from clinml.features import store as feature_store
from clinml.features.datasets.readmission import generate
from clinml.features.patients import servable_patient_ids
from clinml.settings import Paths
from clinml.spec import load_spec
from tests.conftest import PROJECT_ROOT, PSEUDONYMISER

END = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def spec():
    return load_spec(PROJECT_ROOT / "configs" / "readmission.yaml")


def test_the_ttl_covers_the_outcome_window_and_a_cadence_margin(spec) -> None:
    """A stay stays servable through its outcome window, plus at least a week of
    ingest/materialization and label-extract cadence (docs/data.md)."""
    assert spec.feature_ttl_days is not None
    assert spec.feature_ttl_days >= spec.label.horizon_days + 7


@pytest.mark.slow
def test_patients_whose_outcome_is_known_are_servable_a_week_after_ingest(
    spec, tmp_path: Path
) -> None:
    raw = generate(n_patients=1500, seed=21, end=END)
    paths = Paths(tmp_path).usecase(spec.name)
    ingest.run(spec, paths, END, PSEUDONYMISER, frame=raw)
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    feature_store.materialize(store, spec, END + timedelta(seconds=1))

    # Each patient's newest stay is what the online store holds.
    newest = raw.sort_values("event_timestamp", kind="stable").groupby("patient_id").tail(1)
    known = newest[newest["readmitted_30d"].notna()]  # its outcome has arrived
    as_of = END + timedelta(days=7)
    lookup = feature_store.online_lookup(
        store, spec, PSEUDONYMISER.many(known["patient_id"]), as_of
    )
    servable = known[lookup.usable]
    assert len(servable) >= 20, f"{len(servable)} of {len(known)} labelled patients servable"
    # Every stay still inside its outcome window is servable too.
    open_window = newest[newest["event_timestamp"] > as_of - timedelta(days=30)]
    pending = feature_store.online_lookup(
        store, spec, PSEUDONYMISER.many(open_window["patient_id"]), as_of
    )
    assert len(open_window) > 0 and all(pending.usable)

    # `clinml patients sample` picks from the same: raw ids, freshest first.
    ids = servable_patient_ids(store, spec, raw, PSEUDONYMISER, 10, as_of)
    assert len(ids) == 10 and all(i.startswith("PT") for i in ids)
    check = feature_store.online_lookup(store, spec, PSEUDONYMISER.many(ids), as_of)
    assert all(check.usable)
