"""Retrain on drift trains on the drifted rows it reacted to (issue 18).

A champion trained on the built-in pathology data; then a window of logged predictions
whose texture features drifted (a scanner's grey levels), most with their outcomes
ingested. ``clinml monitor --retrain-on-drift`` must train the challenger on the offline
store plus that window's labelled rows, never on the unlabelled ones, say so on the
command line, in the verdict and in the challenger's MLflow tags, and show its progress.
(It used to regenerate the spec's seeded source, so the window never reached training.)
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clinml.settings import Settings
from clinml.spec import load_spec
from tests.conftest import PROJECT_ROOT
from tests.integration.served import clinml

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

LABELLED, UNLABELLED, ANONYMOUS = 500, 69, 20  # 569 patients, and 20 /predict requests
SHIFTED = ("mean_texture", "worst_texture")


def _spec_file(directory: Path) -> Path:
    """The pathology spec with a small training budget (the data are the built-in ones)."""
    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "pathology.yaml").read_text())
    raw["training"]["search"] = {"n_iter": 1, "cv_folds": 2}
    raw["training"]["candidates"] = {"gbm": {"params": {"max_iter": 40}, "search": {}}}
    raw["evaluation"]["bootstrap"] = 200
    path = directory / "pathology.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _log_window(spec, settings: Settings, start: datetime, end: datetime) -> pd.DataFrame:
    """One prediction per stored row, textures shifted, between ``start`` and ``end``; and
    20 predictions by features alone (no patient). Returns what was logged."""
    from clinml.serving.requestlog import PredictionLog

    paths = settings.paths.usecase(spec.name)
    stored = pd.read_parquet(paths.features_file)
    rng = np.random.default_rng(18)
    rows = stored.sample(frac=1.0, random_state=18).reset_index(drop=True)
    anonymous = rows.sample(ANONYMOUS, random_state=3).assign(patient_id=None)
    rows = pd.concat([rows, anonymous], ignore_index=True)
    for name in SHIFTED:
        rows[name] = rows[name] * 1.5
    logged = pd.DataFrame(
        {
            **{name: rows[name] for name in spec.feature_names},
            "time": [start + (end - start) * (i + 1) / (len(rows) + 1) for i in range(len(rows))],
            "request_id": [uuid.uuid4().hex for _ in range(len(rows))],
            "model_version": "1",
            "patient": rows[spec.entity.key].astype(object),
            "probability": rng.uniform(0, 1, len(rows)),
            "label": "benign",
        }
    )
    log = PredictionLog(paths.predictions)
    log.record(logged.to_dict("records"))
    log.close()
    assert log.written == len(logged)
    return logged


def _pairs(patients: pd.Series, times: pd.Series) -> set[tuple[str, pd.Timestamp]]:
    return set(zip(patients, pd.to_datetime(times, utc=True), strict=True))


def test_retrain_on_drift_trains_on_the_labelled_rows_of_the_window(tmp_path: Path) -> None:
    from clinml.features.ingest import read_labels
    from clinml.monitoring import performance
    from clinml.monitoring.retraining import TAG_PREFIX
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.assignment import TAG as RECORD_TAG
    from clinml.training.assignment import TrainingRecord
    from clinml.training.tracking import Tracker

    spec_file = _spec_file(tmp_path)
    spec = load_spec(spec_file)
    home = tmp_path / "home"
    settings = Settings(home=home, actor="retrain-test")
    quiet = Progress(total=4, echo=lambda _: None)
    start = datetime.now(UTC)  # the loader's event times end here
    stages.ingest(spec, settings, quiet)
    stages.materialize(spec, settings, quiet, full=True)
    stages.train(spec, settings, quiet)
    stages.promote(spec, settings, quiet, force=True, reason="the test's champion")
    paths = settings.paths.usecase(spec.name)
    stored = read_labels(spec, paths)
    diagnosis = dict(zip(stored[spec.entity.key], stored[spec.label.column], strict=True))

    logged = _log_window(spec, settings, start, datetime.now(UTC))
    known = logged["patient"].notna()
    outcome_of = logged["patient"].map(diagnosis).fillna("malignant")
    labelled = logged[known].iloc[:LABELLED]
    unlabelled = logged[known].iloc[LABELLED:]
    assert len(unlabelled) == UNLABELLED
    labels = pd.concat([labelled, logged[~known]])
    performance.ingest_labels(
        spec,
        settings,
        pd.DataFrame(
            {
                "request_id": labels["request_id"],
                "outcome": outcome_of[labels.index],
                "time": datetime.now(UTC),
            }
        ),
    )

    tracker = Tracker.from_settings(settings)
    champion = tracker.version_by_alias(spec.name)
    result = clinml(
        home,
        "monitor",
        str(spec_file),
        "--since",
        f"{start - timedelta(hours=1):%Y-%m-%dT%H:%M:%S}",
        "--retrain-on-drift",
        "--no-subgroups",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout

    # Progress: numbered steps with their times, and the training's own lines.
    for step in ("[1/4] gather", "[2/4] add them to the offline store", "[3/4] materialize"):
        assert step in out, out
    assert "[4/4] train" in out and out.count("done in") >= 4
    assert "registered pathology version 2 as 'challenger'" in out
    # What it trained on, in numbers.
    events = len(stored) + LABELLED
    said = (
        f"retraining on {events:,} labelled events up to {labelled['time'].max():%Y-%m-%d} "
        f"({len(stored):,} from the offline store, {LABELLED:,} labelled rows of the predictions"
    )
    assert said in out, out
    assert f"skipped: {UNLABELLED} without a known outcome, {ANONYMOUS} without a patient id" in out
    assert "retrained: challenger version 2 registered" in out and "retrained on " in out

    # The offline store holds the window's labelled rows, with their outcomes, and none
    # of the rows without one.
    features = pd.read_parquet(paths.features_file)
    after = read_labels(spec, paths, datetime.now(UTC))
    assert len(after) == events and len(features) == len(stored) + LABELLED
    key, ts, label = spec.entity.key, spec.event_timestamp, spec.label.column
    added = after[pd.to_datetime(after[ts], utc=True) > start]
    assert _pairs(added[key], added[ts]) == _pairs(labelled["patient"], labelled["time"])
    assert len(added) == LABELLED
    assert (added[label].to_numpy() == added[key].map(diagnosis).to_numpy()).all()
    new_features = features[pd.to_datetime(features[ts], utc=True) > start]
    assert new_features[key].str.startswith("ps_").all()
    unused = _pairs(unlabelled["patient"], unlabelled["time"])
    assert not unused & _pairs(new_features[key], new_features[ts])
    as_logged = new_features.assign(time=pd.to_datetime(new_features[ts], utc=True)).merge(
        labelled.assign(time=pd.to_datetime(labelled["time"], utc=True)),
        left_on=[key, "time"],
        right_on=["patient", "time"],
        suffixes=("", "_logged"),
        validate="one_to_one",
    )
    assert len(as_logged) == LABELLED
    for name in SHIFTED:  # the drifted values, as logged
        assert np.allclose(as_logged[name], as_logged[f"{name}_logged"])
    assert as_logged[["age_band", "site"]].notna().all().all()  # from the patient's history

    # The challenger records it; the champion is unchanged.
    challenger = tracker.version_by_alias(spec.name, "challenger")
    assert str(challenger.version) == "2"
    assert tracker.version_by_alias(spec.name).version == champion.version
    tags = challenger.tags
    assert tags[TAG_PREFIX + "reason"] == "drift"
    assert tags[TAG_PREFIX + "events"] == str(events)
    assert tags[TAG_PREFIX + "events_added"] == str(LABELLED)
    assert tags[TAG_PREFIX + "events_stored"] == str(len(stored))
    assert json.loads(tags[TAG_PREFIX + "skipped"]) == {
        "without a known outcome": UNLABELLED,
        "without a patient id": ANONYMOUS,
    }
    run_tags = tracker.client.get_run(challenger.run_id).data.tags
    assert run_tags[TAG_PREFIX + "summary"] == tags[TAG_PREFIX + "summary"]
    trained = TrainingRecord.from_json(tags[RECORD_TAG])
    before = TrainingRecord.from_json(champion.tags[RECORD_TAG])
    assert trained.window_end >= pd.Timestamp(start) > before.window_end
    assert trained.rows > before.rows

    verdict_path = Path(out.strip().splitlines()[-1].removeprefix("verdict: "))
    verdict = json.loads(verdict_path.read_text())
    assert verdict["retrained_version"] == "2"
    retraining = verdict["retraining"]
    assert (retraining["events"], retraining["added"], retraining["stored"]) == (
        events,
        LABELLED,
        len(stored),
    )
    assert retraining["monitor_run"] == verdict["run_id"]
