"""`clinml patients sample`: raw ids that /predict_patient answers for, and clear errors
when there are none (issue 20, item 5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from clinml.errors import ClinmlError, NotReadyError
from clinml.features import ingest
from clinml.features import store as feature_store
from clinml.pipelines.patients_cli import patients_app
from clinml.settings import Settings
from tests.conftest import FIXTURES, make_tiny_frame

pytestmark = pytest.mark.slow  # imports Feast

TTL_DAYS = 30


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CLINML_HOME", str(home))
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))  # set by the CLI; restored
    return home


def write_use_case(directory: Path, frame: pd.DataFrame) -> Path:
    """The tiny spec with a TTL, its source the given frame."""
    spec = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    spec["feature_ttl_days"] = TTL_DAYS
    frame.to_csv(directory / "tiny.csv", index=False)
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load(spec_path: Path, home: Path, *, materialize: bool = True) -> None:
    """Ingest the spec's source and (optionally) materialize it, as `clinml run` does."""
    from clinml.spec import load_spec

    settings = Settings(home=home)
    spec = load_spec(spec_path)
    paths = settings.paths.usecase(spec.name)
    now = datetime.now(UTC)
    ingest.run(spec, paths, now, settings.pseudonymiser())
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    if materialize:
        feature_store.materialize(store, spec, now + timedelta(seconds=1))


def sample(*args: str):
    return CliRunner().invoke(patients_app, ["sample", *args])


def test_sample_prints_raw_ids_that_are_fresh_newest_first(home: Path, tmp_path: Path) -> None:
    frame = make_tiny_frame(n=300, now=datetime.now(UTC))  # events 1-300 days old
    spec_path = write_use_case(tmp_path, frame)
    load(spec_path, home)

    result = sample(str(spec_path), "-n", "4")

    assert result.exit_code == 0, result.output
    printed = result.output.splitlines()
    newest = frame.sort_values("event_timestamp", ascending=False, kind="stable")
    assert printed == newest["patient_id"].head(4).tolist()  # raw ids, as a caller sends
    ages = datetime.now(UTC) - frame.set_index("patient_id").loc[printed, "event_timestamp"]
    assert (ages < timedelta(days=TTL_DAYS)).all()
    assert not any(line.startswith("ps_") for line in printed)  # never the pseudonyms
    assert not any(mrn in result.output for mrn in frame["mrn"])  # nothing else of theirs

    fresh = int((datetime.now(UTC) - frame["event_timestamp"] < timedelta(days=TTL_DAYS)).sum())
    assert 5 < fresh < len(frame)  # the data has stale patients to leave out
    assert len(sample(str(spec_path)).output.splitlines()) == 5  # the default
    everyone = sample(str(spec_path), "--count", "1000").output.splitlines()
    assert len(everyone) == fresh  # all the fresh ones, and none of the stale


def test_sample_says_which_command_to_run_before_ingest_and_materialize(
    home: Path, tmp_path: Path
) -> None:
    spec_path = write_use_case(tmp_path, make_tiny_frame(n=40, now=datetime.now(UTC)))

    before_ingest = sample(str(spec_path))
    assert isinstance(before_ingest.exception, NotReadyError)
    assert "`clinml run tiny`" in str(before_ingest.exception)

    load(spec_path, home, materialize=False)
    before_materialize = sample(str(spec_path))
    assert isinstance(before_materialize.exception, NotReadyError)
    message = str(before_materialize.exception)
    assert "nothing materialized" in message and "`clinml materialize tiny`" in message
    assert "\n" not in message


def test_sample_says_when_no_patient_is_fresh(home: Path, tmp_path: Path) -> None:
    old = make_tiny_frame(n=40, now=datetime.now(UTC) - timedelta(days=TTL_DAYS + 5))
    spec_path = write_use_case(tmp_path, old)
    load(spec_path, home)

    result = sample(str(spec_path))

    assert isinstance(result.exception, ClinmlError) and result.exit_code != 0
    message = str(result.exception)
    assert "no patient of 'tiny' is fresh" in message
    assert f"feature_ttl_days={TTL_DAYS}" in message and "`clinml materialize tiny`" in message
    assert "\n" not in message and not any(p in message for p in old["patient_id"])
