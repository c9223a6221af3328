"""Shared fixtures. Heavy libraries are imported inside fixtures, not here.

The session's BentoML store and Prometheus directory live in a temporary directory set
before anything imports BentoML, so tests never touch ``~/bentoml`` or ``./.clinml``.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinml.pseudonym import Pseudonymiser

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="clinml-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_SESSION_DIR / "prometheus")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("FEAST_USAGE", "False")
(_SESSION_DIR / "prometheus").mkdir(parents=True, exist_ok=True)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PSEUDONYMISER = Pseudonymiser("test-key")


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def tiny_spec():
    from clinml.spec import load_spec

    return load_spec(FIXTURES / "tiny.yaml")


@pytest.fixture(scope="session")
def pathology_spec():
    from clinml.spec import load_spec

    return load_spec(PROJECT_ROOT / "configs" / "pathology.yaml")


def make_tiny_frame(n: int = 300, seed: int = 0, now: datetime = NOW) -> pd.DataFrame:
    """Synthetic raw rows for tests/fixtures/tiny.yaml; the outcome depends on the features."""
    rng = np.random.default_rng(seed)
    heart_rate = rng.normal(90, 20, n).clip(30, 200)
    creatinine = rng.lognormal(0.0, 0.5, n).clip(0.2, 15)
    ward = rng.choice(["medical", "surgical", "icu"], n)
    risk = 0.08 * (heart_rate - 90) + 3.0 * np.log(creatinine) + 2.0 * (ward == "icu") - 0.7
    outcome = np.where(rng.random(n) < 1 / (1 + np.exp(-risk)), "yes", "no")
    return pd.DataFrame(
        {
            "patient_id": [f"T{i:05d}" for i in range(n)],
            "mrn": [f"MRN{rng.integers(10**7, 10**8)}" for _ in range(n)],
            "event_timestamp": [now - timedelta(days=int(d)) for d in rng.integers(1, 300, n)],
            "outcome": outcome,
            "heart_rate": heart_rate,
            "creatinine": creatinine,
            "ward": ward,
            "site": rng.choice(["north", "south"], n),
        }
    )


@pytest.fixture
def tiny_frame() -> pd.DataFrame:
    return make_tiny_frame()
