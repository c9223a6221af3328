"""Packaging: the MLflow champion into the BentoML store, and the bento around it.

``import_champion`` copies the model version behind the ``champion`` alias into the
BentoML model store (``$BENTOML_HOME``, set by the CLI to ``$CLINML_HOME/bentoml``),
tagged with its registered name, version and operating threshold so the service can
say which version produced each answer. ``build_bento`` runs ``bentoml build`` on
``bentofile.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clinml.spec import UseCaseSpec
from training.tracking import CHAMPION, Tracker


@dataclass(frozen=True)
class PackagedModel:
    tag: str
    registered_model: str
    version: str


def import_champion(spec: UseCaseSpec, tracker: Tracker) -> PackagedModel:
    """Import ``models:/<usecase>@champion`` into the BentoML model store."""
    import bentoml

    tracker.activate()  # bentoml.mlflow resolves models:/ URIs through MLflow's global URI
    version = tracker.version_by_alias(spec.name, CHAMPION)
    tags = version.tags or {}
    bento_model = bentoml.mlflow.import_model(
        spec.name,
        model_uri=f"models:/{spec.name}@{CHAMPION}",
        labels={"usecase": spec.name, "alias": CHAMPION},
        metadata={
            "registered_model": spec.name,
            "version": str(version.version),
            "alias": CHAMPION,
            "run_id": version.run_id,
            "candidate": tags.get("candidate", ""),
            "feature_service": tags.get("feature_service", spec.feature_service),
            "operating_threshold": float(tags.get("operating_threshold", 0.5)),
        },
    )
    return PackagedModel(str(bento_model.tag), spec.name, str(version.version))


def build_bento(project_dir: Path) -> str:
    """``bentoml build`` of the project; returns the bento tag."""
    import bentoml

    bento = bentoml.bentos.build_bentofile(
        bentofile=str(project_dir / "bentofile.yaml"), build_ctx=str(project_dir)
    )
    return str(bento.tag)
