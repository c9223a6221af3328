"""Bring your own data: a CSV and a drafted spec run the whole pipeline, no code change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from clinml.settings import Settings
from clinml.spec import load_spec
from tests.conftest import PROJECT_ROOT, make_tiny_frame

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def clinml(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "clinml"), *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "CLINML_HOME": str(home), "CLINML_PSEUDONYM_KEY": "byod-test-key"},
        timeout=600,
    )


def test_init_then_run_on_a_csv(tmp_path: Path) -> None:
    frame = make_tiny_frame(n=400, seed=41).rename(columns={"outcome": "readmitted"})
    frame["on_ventilator"] = frame["heart_rate"] > 110  # true/false, as exports write them
    data = tmp_path / "data" / "visits.csv"
    data.parent.mkdir()
    frame.to_csv(data, index=False)
    spec_file = tmp_path / "specs" / "visits.yaml"
    home = tmp_path / "home"

    drafted = clinml(
        "init", "--data", str(data), "--name", "visits", "--out", str(spec_file), home=home
    )
    assert drafted.returncode == 0, drafted.stderr
    spec = load_spec(spec_file)
    assert spec.entity.key == "patient_id" and spec.label.column == "readmitted"
    assert spec.label.positive_class == "yes"
    assert "mrn" in spec.identifier_columns and "on_ventilator" in spec.feature_names

    again = clinml(
        "init", "--data", str(data), "--name", "visits", "--out", str(spec_file), home=home
    )
    assert again.returncode == 2 and "pass --force" in again.stderr

    ran = clinml("run", str(spec_file), home=home)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "registered visits version 1 as 'challenger'" in ran.stdout
    assert "promote: champion -> version 1 (first champion)" in ran.stdout
    paths = Settings(home=home).paths.usecase("visits")
    stored = pd.read_parquet(paths.features_file)
    assert len(stored) == 400 and stored["patient_id"].str.startswith("ps_").all()
    assert "mrn" not in stored.columns
    assert set(stored["on_ventilator"].unique()) <= {0, 1}
