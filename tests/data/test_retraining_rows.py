"""The monitored rows a retrain on drift adds to the offline store (clinml.monitoring.retraining).

Labelled predictions become offline rows keyed by the patient's pseudonym at the time of
the prediction, with attributes from the patient's history; rows without an outcome, a
patient or a value the spec needs are counted and left out; adding them again changes
nothing; nothing that could be a raw id is stored.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.errors import ClinmlError
from clinml.features import ingest
from clinml.monitoring import performance, retraining
from clinml.settings import Settings
from tests.conftest import NOW, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Great Expectations


@pytest.fixture
def stored(tiny_spec, tmp_path: Path) -> tuple[Settings, pd.DataFrame]:
    settings = Settings(home=tmp_path)
    paths = settings.paths.usecase(tiny_spec.name)
    ingest.run(tiny_spec, paths, NOW, settings.pseudonymiser(), frame=make_tiny_frame(n=120))
    return settings, pd.read_parquet(paths.features_file)


def _log(settings: Settings, spec, rows: pd.DataFrame) -> None:
    from clinml.serving.requestlog import PredictionLog

    log = PredictionLog(settings.paths.usecase(spec.name).predictions)
    log.record(rows.to_dict("records"))
    log.close()
    assert log.written == len(rows)


def test_window_rows_keep_the_labelled_predictions_of_known_patients(tiny_spec, stored) -> None:
    settings, features = stored
    paths = settings.paths.usecase(tiny_spec.name)
    rows = features.head(40).reset_index(drop=True)
    logged = pd.DataFrame(
        {
            "heart_rate": rows["heart_rate"] + 30,  # drifted
            "creatinine": rows["creatinine"],
            "ward": rows["ward"],
            "time": [NOW + timedelta(hours=i + 1) for i in range(40)],
            "request_id": [f"r{i}" for i in range(40)],
            "model_version": "1",
            "patient": rows["patient_id"].astype(object),
            "probability": 0.5,
            "label": "no",
        }
    )
    logged.loc[30:32, "patient"] = None  # /predict by features: no patient
    logged.loc[33, "patient"] = "ps_" + "0" * 24  # a patient the store has never seen
    _log(settings, tiny_spec, logged)
    outcomes = np.where(np.arange(34) % 2 == 0, "yes", "no")  # rows 34..39: no outcome yet
    performance.ingest_labels(
        tiny_spec,
        settings,
        pd.DataFrame({"request_id": logged["request_id"][:34], "outcome": outcomes, "time": NOW}),
        now=NOW + timedelta(days=2),
    )

    found = retraining.window_rows(
        tiny_spec, settings, NOW, NOW + timedelta(days=7), timedelta(days=90)
    )
    assert found.looked_at == 40 and found.usable == 30
    assert found.skipped == {
        "without a known outcome": 6,
        "without a patient id": 3,
        "without a value of site": 1,
    }
    frame = found.frame
    assert list(frame["patient_id"]) == list(logged["patient"][:30])
    assert list(frame["outcome"]) == list(outcomes[:30])
    assert (frame["site"].to_numpy() == rows["site"][:30].to_numpy()).all()  # from history
    assert np.allclose(frame["heart_rate"], logged["heart_rate"][:30])

    added = ingest.append_monitored(tiny_spec, paths, NOW, settings.pseudonymiser(), frame)
    assert added.added_rows == 30 and not added.learned_profile
    again = ingest.append_monitored(tiny_spec, paths, NOW, settings.pseudonymiser(), frame)
    assert again.added_rows == 0
    labels = ingest.read_labels(tiny_spec, paths)
    assert len(labels) == 120 + 30
    stamps = pd.to_datetime(labels["event_timestamp"], utc=True)
    assert set(labels.loc[stamps > pd.Timestamp(NOW), "patient_id"]) == set(frame["patient_id"])


def test_raw_ids_are_never_stored_as_pseudonyms(tiny_spec, stored) -> None:
    settings, features = stored
    paths = settings.paths.usecase(tiny_spec.name)
    frame = make_tiny_frame(n=10, seed=3).drop(columns="mrn")  # raw patient ids
    with pytest.raises(ClinmlError, match=r"^10 of 10 monitored rows have a patient_id that"):
        ingest.append_monitored(tiny_spec, paths, NOW, settings.pseudonymiser(), frame)
    assert len(pd.read_parquet(paths.features_file)) == len(features)


def test_batch_rows_are_read_as_an_ingest_batch(tiny_spec, stored) -> None:
    settings, _ = stored
    batch = make_tiny_frame(n=20, seed=9, now=NOW + timedelta(days=30))
    batch.loc[:4, "outcome"] = None
    found = retraining.batch_rows(tiny_spec, settings, batch, NOW)
    assert found.looked_at == 20 and found.usable == 15
    assert found.skipped == {"without a known outcome": 5}
    assert "mrn" not in found.frame.columns
    expected = settings.pseudonymiser().many(batch["patient_id"][5:])
    assert list(found.frame["patient_id"]) == expected

    no_label = retraining.batch_rows(tiny_spec, settings, batch.drop(columns="outcome"), NOW)
    assert no_label.usable == 0 and no_label.skipped == {"without a known outcome": 20}
