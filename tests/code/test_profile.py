"""The production profile's configuration: what it refuses, and what it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from clinml.environment import FeastEnvironment, FeastEnvironmentError
from clinml.pseudonym import DEVELOPMENT_KEY
from clinml.settings import Settings

SHARED = """\
project: staging
registry:
  registry_type: sql
  path: postgresql+psycopg://feast:${FEAST_PW}@db:5432/feast
online_store:
  type: redis
  connection_string: redis:6379,password=${REDIS_PW}
offline_store:
  type: postgres
  host: db
  database: feast
  user: feast
  password: ${FEAST_PW}
"""


def _production(tmp_path: Path, **overrides) -> Settings:
    environment = tmp_path / "feature_store.yaml"
    environment.write_text(SHARED)
    values = {
        "profile": "production",
        "home": tmp_path / "home",
        "feature_store_yaml": environment,
        "tracking_uri": "postgresql+psycopg://mlflow@db/mlflow",
        "pseudonym_key": "a-real-key-from-a-secret-of-32-characters-or-more",
        **overrides,
    }
    return Settings(**values)


def test_a_complete_production_configuration_is_accepted(tmp_path: Path) -> None:
    settings = _production(tmp_path)
    environment = settings.feast_environment
    assert (environment.online_type, environment.offline_type) == ("redis", "postgres")
    assert environment.registry_type == "sql"
    assert environment.project("pathology") == "staging_pathology"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"pseudonym_key": DEVELOPMENT_KEY}, "CLINML_PSEUDONYM_KEY is the public development key"),
        ({"pseudonym_key": "REPLACE-ME-pseudonym-key-not-a-real-key"}, "placeholder"),
        ({"pseudonym_key": "short-key"}, "shorter than 32 characters"),
        ({"auth": False}, "CLINML_AUTH=false"),
        ({"feature_store_yaml": None}, "CLINML_FEATURE_STORE_YAML is not set"),
        ({"tracking_uri": None}, "CLINML_TRACKING_URI must name a shared MLflow"),
        ({"tracking_uri": "sqlite:////tmp/m.db"}, "CLINML_TRACKING_URI must name a shared MLflow"),
    ],
)
def test_production_refuses_what_is_only_safe_on_one_machine(
    tmp_path: Path, override: dict, message: str
) -> None:
    with pytest.raises(ValidationError, match="CLINML_PROFILE=production refuses to start") as info:
        _production(tmp_path, **override)
    assert message in str(info.value)


def test_the_embedded_profile_keeps_its_development_defaults(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, auth=False)
    assert settings.pseudonymiser().is_development_key
    assert settings.feast_environment.is_embedded
    assert settings.feast_environment.online_type == "sqlite"


def test_state_locations_derive_from_the_home(tmp_path: Path) -> None:
    """Where the demo's log, ingest runs, monitor runs and model cards live
    (docs/architecture.md, "Where state lives"): named once, in ``Paths``."""
    paths = Settings(home=tmp_path).paths
    usecase = paths.usecase("pathology")
    assert paths.serve_log == tmp_path / "logs" / "serve.log"
    assert usecase.ingest_runs == tmp_path / "pathology" / ".ingest"
    assert usecase.monitor_run("r1") == tmp_path / "pathology" / "monitoring" / "runs" / "r1"
    assert usecase.model_card(3) == tmp_path / "pathology" / "reports" / "model_cards" / "v3"


def test_the_cli_reports_the_refusal_in_one_line(monkeypatch, tmp_path: Path) -> None:
    from clinml.errors import ClinmlError
    from clinml.pipelines.runtime import load_settings

    monkeypatch.setenv("CLINML_PROFILE", "production")
    monkeypatch.setenv("CLINML_HOME", str(tmp_path))
    with pytest.raises(ClinmlError) as info:
        load_settings()
    text = str(info.value)
    assert text.startswith("CLINML_PROFILE=production refuses to start: ")
    assert "\n" not in text and "Value error" not in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"online_store": {"type": "sqlite", "path": "online.db"}}, "online_store type sqlite"),
        ({"offline_store": {"type": "file"}}, "offline_store type file"),
        ({"registry": {"path": "registry.db"}}, "registry_type file"),
    ],
)
def test_production_refuses_stores_that_are_local_files(
    tmp_path: Path, change: dict, message: str
) -> None:
    settings = _production(tmp_path)
    environment = {**yaml.safe_load(SHARED), **change}
    settings.feature_store_yaml.write_text(yaml.safe_dump(environment))
    with pytest.raises(FeastEnvironmentError, match="local files") as info:
        _ = settings.feast_environment
    assert message in str(info.value)


def test_a_file_registry_in_object_storage_counts_as_shared(tmp_path: Path) -> None:
    settings = _production(tmp_path)
    environment = {**yaml.safe_load(SHARED), "registry": {"path": "s3://bucket/registry.pb"}}
    settings.feature_store_yaml.write_text(yaml.safe_dump(environment))
    assert settings.feast_environment.registry_type == "file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "not a YAML mapping"),
        ("registry: {path: r.db}\nonline_store: {type: redis}\n", "lacks the offline_store"),
        (SHARED.replace("type: postgres", "type: bigquery"), "'bigquery' is not supported"),
        (SHARED.replace("project: staging", "project: staging-1"), "letters, digits"),
        (SHARED + "entity_key_serialization_version: 2\n", "unexpected key"),
        ("registry: [", "cannot read"),
    ],
)
def test_a_bad_environment_file_is_named_with_what_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "feature_store.yaml"
    path.write_text(text)
    with pytest.raises(FeastEnvironmentError, match="CLINML_FEATURE_STORE_YAML") as info:
        FeastEnvironment.load(path)
    assert message in str(info.value)


def test_a_missing_environment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FeastEnvironmentError, match="cannot read"):
        FeastEnvironment.load(tmp_path / "absent.yaml")


def test_the_generated_repo_config_keeps_secrets_as_references(tmp_path: Path, monkeypatch) -> None:
    """The per-use-case feature_store.yaml holds ${VAR}, never the secret's value."""
    monkeypatch.setenv("FEAST_PW", "s3cr3t-value")
    monkeypatch.setenv("REDIS_PW", "r3dis-value")
    environment = _production(tmp_path).feast_environment
    text = yaml.safe_dump(environment.config("pathology"))
    assert "${FEAST_PW}" in text and "${REDIS_PW}" in text
    assert "s3cr3t" not in text and "r3dis" not in text
    config = environment.config("pathology")
    assert config["project"] == "staging_pathology" and config["provider"] == "local"
    assert environment.expanded("offline_store")["password"] == "s3cr3t-value"


def test_an_invalid_feast_setting_is_named_without_its_value(
    tmp_path: Path, monkeypatch, pathology_spec
) -> None:
    """Feast's own error would print the expanded value, which may be a secret."""
    from clinml.features.store import open_store

    monkeypatch.setenv("FEAST_PW", "s3cr3t-value")
    monkeypatch.setenv("REDIS_PW", "r3dis-value")
    settings = _production(tmp_path)
    bad = SHARED.replace("  database: feast\n", "  database: feast\n  port: ${FEAST_PW}\n")
    settings.feature_store_yaml.write_text(bad)
    paths = settings.paths.usecase("pathology")
    with pytest.raises(FeastEnvironmentError, match="invalid Feast configuration") as info:
        open_store(pathology_spec, paths, settings.feast_environment)
    assert "port" in str(info.value)
    assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in (paths.feast_repo / "feature_store.yaml").read_text()


def test_artifact_locations_accept_a_directory_or_a_uri(tmp_path: Path) -> None:
    from clinml.training.tracking import Tracker

    local = Tracker("sqlite:///x.db", tmp_path / "artifacts")
    assert local.artifact_location("pathology") == (tmp_path / "artifacts/pathology").as_uri()
    remote = Tracker("postgresql+psycopg://db/mlflow", "s3://bucket/clinml/")
    assert remote.artifact_location("pathology") == "s3://bucket/clinml/pathology"
    proxied = Tracker("http://mlflow:5000", "mlflow-artifacts:/clinml")
    assert proxied.artifact_location("pathology") == "mlflow-artifacts:/clinml/pathology"
    assert _production(tmp_path, artifact_root="s3://b/c").mlflow_artifact_root == "s3://b/c"
