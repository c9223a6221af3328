"""The model a service is serving, how it is loaded, and how it is swapped without downtime.

A :class:`ServedModel` is one registered model version ready to predict: the fitted
pipeline (loaded through :mod:`training.model_io`, so the manifest's SHA-256 and the type
allow-list are checked), its compiled fast path (:mod:`serving.fastpath`; the pipeline is
the fallback for a model the compiler does not know), and what ``GET /model`` reports.

It comes from one of two places:

- the BentoML model store (``load_from_bento``): the immutable path. A bento carries
  the model, so it serves even when the registry is unreachable;
- the MLflow registry (``load_from_registry``): used to follow the ``champion`` alias.

:class:`ModelHolder` holds the current model. A request takes one reference to it at the
start and uses that model throughout, and a swap replaces the reference in one step, so a
champion change never fails or mixes a request: requests already running finish on the
old model, the next ones use the new one. A model that fails to load (a tampered file, an
unreachable registry) is never swapped in; the old one keeps serving.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError
from training import model_io

if TYPE_CHECKING:
    from clinml.spec import UseCaseSpec
    from training.tracking import Tracker

log = logging.getLogger("bentoml.clinml")

MODEL_SUBDIR = Path("mlflow_model") / "artifacts" / "model"
CARD_SUBDIR = "model_card"
# Metrics reported by GET /model (with their CIs when recorded).
REPORTED_METRICS = ("roc_auc", "average_precision", "sensitivity", "specificity", "ece", "brier")


@dataclass(frozen=True)
class ServedModel:
    """One model version, loaded and ready to predict."""

    name: str
    version: str
    alias: str
    candidate: str
    threshold: float
    feature_service: str
    features: list[str]
    trained_at: str | None
    metrics: dict[str, Any]
    run_id: str
    card: dict[str, Any] | None = field(default=None, repr=False)
    card_html: str | None = field(default=None, repr=False)
    pipeline: Any = field(default=None, repr=False)
    compiled: Any = field(default=None, repr=False)

    @property
    def fast(self) -> bool:
        return self.compiled is not None

    def encode(self, records: list[dict[str, Any]]) -> Any:
        """Model input for ``records``: the fast path's matrix, or a DataFrame."""
        if self.compiled is not None:
            return self.compiled.encode_records(records)
        return pd.DataFrame.from_records(records, columns=self.features)

    def predict(self, encoded: Any) -> np.ndarray:
        """Positive-class probabilities for encoded records, in order."""
        if self.compiled is not None:
            return np.asarray(self.compiled.predict_proba(encoded), dtype=float)
        return self.pipeline.predict_proba(encoded)[:, 1]

    def predict_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        return self.predict(self.encode(records))

    def explain(self, records: list[dict[str, Any]], top_k: int) -> list[list[tuple[str, float]]]:
        if self.compiled is None:
            raise ClinmlError(f"explanations are not available for a {self.candidate} model")
        return self.compiled.explain(self.compiled.encode_records(records), top_k=top_k)

    @property
    def explain_method(self) -> str:
        return getattr(self.compiled, "explain_method", "not available")

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` returns."""
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "candidate": self.candidate,
            "trained_at": self.trained_at,
            "operating_threshold": self.threshold,
            "feature_service": self.feature_service,
            "features": list(self.features),
            "metrics": self.metrics,
            "execution": "compiled fast path" if self.fast else "scikit-learn pipeline",
            "device": getattr(self.compiled, "device", "cpu"),
            "explain_method": self.explain_method,
            "model_card": "/model/card" if self.card_html else None,
        }


def _compile(pipeline: Any, device: str) -> Any:
    from serving.fastpath import UnsupportedModel, compile_model

    try:
        compiled = compile_model(pipeline, device=device)
    except UnsupportedModel as exc:
        log.warning("no fast path (%s); serving through the scikit-learn pipeline", exc)
        return None
    compiled.warm_up()
    return compiled


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _read_card(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    json_file, html_file = directory / "model_card.json", directory / "model_card.html"
    if not json_file.is_file():
        return None, None
    html = html_file.read_text() if html_file.is_file() else None
    return json.loads(json_file.read_text()), html


def build(
    model_dir: Path, metadata: dict[str, Any], card_dir: Path | None, device: str
) -> ServedModel:
    """Load a clinml model directory and compile it.

    Raises:
        ModelLoadError: no hash was recorded at registration (``metadata["model_sha256"]``),
            the file's hash differs from it (checked before the file is opened) or from
            the manifest's, the directory is missing, or it holds untrusted types.
    """
    recorded = metadata.get("model_sha256")
    if not recorded:
        raise model_io.ModelLoadError(
            f"{model_dir}: no model hash was recorded at registration; refusing to load a "
            "model that cannot be checked"
        )
    loaded = model_io.load(model_dir, expected_sha256=recorded)
    card, html = _read_card(card_dir) if card_dir is not None else (None, None)
    metrics = metadata.get("metrics") or {}
    return ServedModel(
        name=str(metadata["registered_model"]),
        version=str(metadata["version"]),
        alias=str(metadata.get("alias", "champion")),
        candidate=str(metadata.get("candidate", loaded.manifest.get("candidate", ""))),
        threshold=float(metadata.get("operating_threshold", 0.5)),
        feature_service=str(metadata.get("feature_service", "")),
        features=list(loaded.manifest["features"]),
        trained_at=metadata.get("trained_at"),
        metrics={k: _finite(v) for k, v in metrics.items()},
        run_id=str(metadata.get("run_id", "")),
        card=card,
        card_html=html,
        pipeline=loaded.pipeline,
        compiled=_compile(loaded.pipeline, device),
    )


def load_from_bento(tag: str, device: str = "auto") -> ServedModel:
    """The model imported into the BentoML store under ``tag`` (e.g. ``readmission:latest``)."""
    import bentoml

    stored = bentoml.models.get(tag)
    root = Path(stored.path)
    return build(root / MODEL_SUBDIR, dict(stored.info.metadata), root / CARD_SUBDIR, device)


def registry_metadata(tracker: Tracker, version: Any) -> dict[str, Any]:
    """The serving metadata of a registered version: tags, training time, test metrics."""
    from datetime import UTC, datetime

    tags = version.tags or {}
    run = tracker.client.get_run(version.run_id)
    recorded = run.data.metrics
    metrics: dict[str, Any] = {}
    for name in REPORTED_METRICS:
        if name in recorded:
            metrics[name] = {
                "value": recorded[name],
                "ci_low": recorded.get(f"{name}_ci_low"),
                "ci_high": recorded.get(f"{name}_ci_high"),
            }
    started = run.info.start_time
    return {
        "registered_model": version.name,
        "version": str(version.version),
        "run_id": version.run_id,
        "candidate": tags.get("candidate", ""),
        "feature_service": tags.get("feature_service", ""),
        "operating_threshold": float(tags.get("operating_threshold", 0.5)),
        "model_sha256": tags.get("model_sha256", ""),
        "trained_at": datetime.fromtimestamp(started / 1000, UTC).isoformat() if started else None,
        "metrics": metrics,
    }


def load_from_registry(
    spec: UseCaseSpec, tracker: Tracker, alias: str = "champion", device: str = "auto"
) -> ServedModel:
    """The version behind ``alias`` in the MLflow registry, downloaded and compiled."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from training.train import CARD_ARTIFACT

    # `models:/` URIs resolve through MLflow's global registry URI: point it at ours (a
    # serving process has not done so otherwise).
    tracker.activate()
    version = tracker.version_by_alias(spec.name, alias)
    metadata = {**registry_metadata(tracker, version), "alias": alias}
    with tempfile.TemporaryDirectory() as tmp:
        model_root = download_artifacts(
            artifact_uri=f"models:/{spec.name}/{version.version}", dst_path=tmp
        )
        card_dir = None
        try:
            card_dir = Path(
                download_artifacts(
                    run_id=version.run_id,
                    artifact_path=CARD_ARTIFACT,
                    dst_path=str(Path(tmp) / "card"),
                    tracking_uri=tracker.uri,
                )
            )
        except (MlflowException, OSError):
            log.warning("version %s has no model card", version.version)
        return build(Path(model_root) / "artifacts" / "model", metadata, card_dir, device)


class ModelHolder:
    """The current model; replaced atomically, never mutated."""

    def __init__(self, model: ServedModel | None = None):
        self._model = model
        self._swap_lock = threading.Lock()
        self.swaps = 0
        self.last_error: str | None = None

    @property
    def current(self) -> ServedModel:
        model = self._model
        if model is None:
            raise ClinmlError("no model loaded")
        return model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def swap(self, model: ServedModel) -> ServedModel | None:
        """Serve ``model`` from now on; returns the one it replaced."""
        with self._swap_lock:
            previous, self._model = self._model, model
            self.swaps += 1
        log.info(
            "now serving %s version %s (%s)%s",
            model.name,
            model.version,
            model.alias,
            f", replacing version {previous.version}" if previous else "",
        )
        return previous
