"""Packaging: the MLflow champion into the BentoML store, and the bento around it.

``import_champion`` copies the model version behind the ``champion`` alias into the
BentoML model store (``$BENTOML_HOME``, set by the CLI to ``$CLINML_HOME/bentoml``),
tagged with its registered name, version and operating threshold so the service can
say which version produced each answer, and with the hashes recorded at registration so
the service can check what it loads. ``build_bento`` runs ``bentoml build`` on
``bentofile.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clinml.spec import UseCaseSpec
from clinml.training.tracking import CHAMPION, Tracker


@dataclass(frozen=True)
class PackagedModel:
    tag: str
    registered_model: str
    version: str


def import_champion(spec: UseCaseSpec, tracker: Tracker) -> PackagedModel:
    """Import ``models:/<usecase>@champion`` (and its model card) into the BentoML store.

    The metadata carries what ``GET /model`` reports (version, threshold, training time,
    test metrics) and every SHA-256 recorded at registration (``model_io.INTEGRITY_TAGS``:
    the model file, the card's JSON and HTML, the serving metadata, the spec's serving
    contract), so the bento serves, describes and checks the model without the registry.
    The card goes into the stored model as the registry holds it; nothing here is
    trusted until ``clinml.serving.runtime.load_from_bento`` has checked it against those
    hashes, and them against the registry's when it answers.
    """
    import shutil
    import tempfile

    import bentoml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from clinml.serving.runtime import CARD_SUBDIR, registry_metadata
    from clinml.training.train import CARD_ARTIFACT

    tracker.activate()  # bentoml.mlflow resolves models:/ URIs through MLflow's global URI
    version = tracker.version_by_alias(spec.name, CHAMPION)
    metadata = {**registry_metadata(tracker, version), "alias": CHAMPION}
    bento_model = bentoml.mlflow.import_model(
        spec.name,
        model_uri=f"models:/{spec.name}/{version.version}",
        labels={"usecase": spec.name, "alias": CHAMPION},
        metadata=metadata,
    )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            card = download_artifacts(
                run_id=version.run_id,
                artifact_path=CARD_ARTIFACT,
                dst_path=tmp,
                tracking_uri=tracker.uri,
            )
        except (MlflowException, OSError):
            card = None
        if card is not None:  # into the stored model (import_model's path is a staging copy)
            stored = bentoml.models.get(bento_model.tag)
            shutil.copytree(card, Path(stored.path) / CARD_SUBDIR)
    return PackagedModel(str(bento_model.tag), spec.name, str(version.version))


def build_bento(project_dir: Path) -> str:
    """``bentoml build`` of the project; returns the bento tag."""
    import bentoml

    bento = bentoml.bentos.build_bentofile(
        bentofile=str(project_dir / "bentofile.yaml"), build_ctx=str(project_dir)
    )
    return str(bento.tag)
