"""Bring your own data: a CSV and a drafted spec run the whole pipeline, no code change,
and `clinml serve` serves it until SIGTERM stops the whole server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
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
        timeout=1800,  # a deadline for a busy machine, not a speed check
    )


def test_init_then_run_on_a_csv(tmp_path: Path) -> None:
    frame = make_tiny_frame(n=400, seed=41).rename(columns={"outcome": "readmitted"})
    frame["on_ventilator"] = frame["heart_rate"] > 110  # true/false, as exports write them
    data = tmp_path / "data" / "visits.csv"
    data.parent.mkdir()
    frame.to_csv(data, index=False)
    home = tmp_path / "home"
    spec_file = home / "configs" / "visits.yaml"  # a user's specs live under CLINML_HOME

    drafted = clinml("init", "--data", str(data), "--name", "visits", home=home)
    assert drafted.returncode == 0, drafted.stderr
    assert f"draft written to {spec_file}" in drafted.stdout
    assert not (PROJECT_ROOT / "configs" / "visits.yaml").exists()  # not in the source tree
    spec = load_spec(spec_file)
    assert spec.entity.key == "patient_id" and spec.label.column == "readmitted"
    assert spec.label.positive_class == "yes"
    assert "mrn" in spec.identifier_columns and "on_ventilator" in spec.feature_names

    again = clinml("init", "--data", str(data), "--name", "visits", home=home)
    assert again.returncode == 2 and "pass --force" in again.stderr
    builtin = clinml("init", "--data", str(data), "--name", "pathology", home=home)
    assert builtin.returncode == 2 and "built-in use case" in builtin.stderr

    ran = clinml("run", "visits", home=home)  # by name, from CLINML_HOME/configs
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "registered visits version 1 as 'challenger'" in ran.stdout
    assert "promote: champion -> version 1 (first champion)" in ran.stdout
    paths = Settings(home=home).paths.usecase("visits")
    stored = pd.read_parquet(paths.features_file)
    assert len(stored) == 400 and stored["patient_id"].str.startswith("ps_").all()
    assert "mrn" not in stored.columns
    assert set(stored["on_ventilator"].unique()) <= {0, 1}

    _serve_then_sigterm(home)


def _serve_then_sigterm(home: Path) -> None:
    """`clinml serve`, ready, then SIGTERM as a service manager sends it: the server and
    every worker it started are gone afterwards and the port is free again."""
    from tests.integration.served import api_keys, clinml_serve

    key = api_keys(home)["dev"]
    with clinml_serve(home, "visits", {"CLINML_PSEUDONYM_KEY": "byod-test-key"}) as url:
        answer = httpx.get(f"{url}/model", headers={"X-API-Key": key}, timeout=30)
        assert answer.status_code == 200
