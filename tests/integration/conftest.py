"""One pipeline and one service per test session, shared by the integration modules.

The service's ASGI app can be built only once per process (BentoML's metrics registry is
global), so every module that calls it uses the session's ``client``. Modules run in file
order and some move the champion alias; each leaves the service serving a champion.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from clinml.settings import Settings
from clinml.spec import UseCaseSpec
from tests.integration.served import api_keys


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clinml-home")


@pytest.fixture(scope="session")
def pipeline(home: Path, pathology_spec: UseCaseSpec):
    """Run ingest, materialize, train, promote and package as `clinml run` does."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings = Settings(home=home, actor="e2e-test")
    lines: list[str] = []
    progress = Progress(total=6, echo=lines.append)
    stages.ingest(pathology_spec, settings, progress)
    stages.materialize(pathology_spec, settings, progress, full=True)
    version = stages.train(pathology_spec, settings, progress)
    stages.promote(pathology_spec, settings, progress)
    stages.package(pathology_spec, settings, progress)
    return settings, version, lines


@pytest.fixture(scope="session")
def client(pipeline, home: Path):
    """The service's ASGI app, authenticated with the all-roles key."""
    from starlette.testclient import TestClient

    os.environ["CLINML_HOME"] = str(home)
    os.environ["CLINML_USECASE"] = "pathology"
    key = api_keys(home)["dev"]  # the key file is read when the service module is imported
    from clinml.serving.service import ClinicalService

    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(ClinicalService.to_asgi(), headers=headers) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def keys(client, home: Path) -> dict[str, str]:
    return api_keys(home)


@pytest.fixture(scope="session")
def records(pipeline, pathology_spec: UseCaseSpec) -> pd.DataFrame:
    settings, _, _ = pipeline
    features = pd.read_parquet(settings.paths.usecase("pathology").features_file)
    return (
        features[pathology_spec.feature_names].sample(n=25, random_state=4).reset_index(drop=True)
    )
