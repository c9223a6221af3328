"""The MLflow tracker and registry, as an object handed to the stages.

Stages never read a global tracking URI: the pipeline builds a ``Tracker`` from settings
(SQLite under ``CLINML_HOME`` by default) and tests build one on a temporary database.
Registry state uses aliases (``champion``), not the deprecated stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clinml.errors import NotReadyError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from clinml.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
# The champion before the current one, kept reachable for rollback.
PREVIOUS_CHAMPION = "previous_champion"


@dataclass(frozen=True)
class Tracker:
    """Where runs and registered models are recorded.

    Args:
        uri: MLflow tracking and registry URI, e.g. ``sqlite:////abs/path/mlflow.db``.
        artifact_root: directory under which each experiment stores its artifacts.
    """

    uri: str
    artifact_root: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracker:
        return cls(settings.mlflow_uri, settings.paths.mlflow_artifacts)

    def activate(self) -> None:
        """Point MLflow's fluent API (``start_run``, ``log_model``) at this tracker."""
        import mlflow

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    @property
    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created with an explicit artifact location."""
        client = self.client
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = (self.artifact_root / name).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)

    def version_by_alias(self, model_name: str, alias: str = CHAMPION) -> ModelVersion:
        """The model version an alias points at.

        Raises:
            NotReadyError: the model or the alias does not exist yet.
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(model_name, alias)
        except MlflowException as exc:
            # A missing model or alias; anything else (an unreachable store) propagates.
            if exc.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                raise
            raise NotReadyError(
                f"no '{alias}' version of model '{model_name}' in {self.uri}: "
                f"run `clinml train {model_name}` first"
            ) from None
