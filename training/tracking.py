"""The MLflow tracker and registry, as an object handed to the stages.

Stages never read a global tracking URI: the pipeline builds a ``Tracker`` from settings
(SQLite under ``CLINML_HOME`` by default) and tests build one on a temporary database.
Registry state uses aliases (``champion``), not the deprecated stages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from clinml.errors import NotReadyError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from clinml.settings import Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
# The champion before the current one, kept reachable for rollback.
PREVIOUS_CHAMPION = "previous_champion"
# A version scored beside the champion on live traffic, never answered with (clinml shadow).
SHADOW = "shadow"
# A version answering a stable share of patients instead of the champion (clinml canary).
CANARY = "canary"
# The model-version tag holding that share, in percent, so every worker reads the same.
CANARY_PERCENT_TAG = "clinml.canary_percent"
# The largest share of requests a canary may answer: beyond half, promote it instead.
CANARY_MAX_PERCENT = 50.0


def canary_percent(tags: Mapping[str, str]) -> float:
    """The share of requests, in percent, recorded on a canary version's tags (0, so no
    request, when the tag is missing or not a number in (0, ``CANARY_MAX_PERCENT``])."""
    try:
        percent = float(tags.get(CANARY_PERCENT_TAG, "0"))
    except ValueError:
        return 0.0
    return percent if 0.0 < percent <= CANARY_MAX_PERCENT else 0.0


class RegistryUnavailable(NotReadyError):
    """The MLflow registry is not there or does not answer."""


def redacted(uri: str) -> str:
    """``uri`` without the password of a ``user:password@host`` part."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


@dataclass(frozen=True)
class Tracker:
    """Where runs and registered models are recorded.

    Args:
        uri: MLflow tracking and registry URI, e.g. ``sqlite:////abs/path/mlflow.db``.
        artifact_root: where each experiment stores its artifacts: a directory, or a URI
            such as ``s3://bucket/clinml`` (``CLINML_ARTIFACT_ROOT``).
        create: whether this tracker may create the registry (training does). Every
            other use needs one that exists: an SQLite file that is not there is a
            volume not mounted or a wrong ``CLINML_TRACKING_URI``, and answering from a
            new empty registry would only hide that.
    """

    uri: str
    artifact_root: Path | str
    create: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, create: bool = False) -> Tracker:
        return cls(settings.mlflow_uri, settings.mlflow_artifact_root, create)

    def activate(self) -> None:
        """Point MLflow's fluent API (``start_run``, ``log_model``) at this tracker."""
        import mlflow

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    @cached_property
    def client(self) -> MlflowClient:
        """The MLflow client, once the registry is known to be there.

        Raises:
            RegistryUnavailable: the registry does not exist (and this tracker may not
                create it), or it does not answer.
        """
        from mlflow import MlflowClient

        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            if not self.create and not db.is_file():
                raise RegistryUnavailable(
                    f"no MLflow registry at {db}: run `clinml train` first, or check that "
                    "the volume holding it is mounted and CLINML_TRACKING_URI names it"
                )
            if self.create:
                db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if not self.uri.startswith("sqlite:///"):  # a server or a database: is it there?
            try:
                client.search_registered_models(max_results=1)
            except Exception as exc:
                raise RegistryUnavailable(
                    f"MLflow registry at {redacted(self.uri)} does not answer "
                    f"({type(exc).__name__}); check CLINML_TRACKING_URI and the network"
                ) from exc
        return client

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created with an explicit artifact location."""
        from mlflow.exceptions import MlflowException

        client = self.client
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        try:
            return client.create_experiment(name, artifact_location=self.artifact_location(name))
        except MlflowException as exc:
            # Two trainings starting at once: the other one created it first.
            created = client.get_experiment_by_name(name)
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or created is None:
                raise
            return created.experiment_id

    def artifact_location(self, experiment: str) -> str:
        """Where ``experiment``'s artifacts go: under the root, as a URI."""
        root = str(self.artifact_root)
        # A URI (s3://, mlflow-artifacts:/...); a one-letter scheme is a Windows drive.
        if len(urlparse(root).scheme) > 1:
            return f"{root.rstrip('/')}/{experiment}"
        return (Path(root) / experiment).resolve().as_uri()

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
