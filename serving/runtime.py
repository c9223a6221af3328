"""The model a service is serving, how it is loaded, and how it is swapped without downtime.

A :class:`ServedModel` is one registered model version ready to predict: the fitted
pipeline (loaded through :mod:`clinml.training.model_io`, so the manifest's SHA-256 and the type
allow-list are checked), its compiled fast path (:mod:`clinml.serving.fastpath`; the pipeline is
the fallback for a model the compiler does not know), and what ``GET /model`` reports.

It comes from one of two places:

- the BentoML model store (``load_from_bento``): the immutable path. A bento carries
  the model, so it serves even when the registry is unreachable;
- the MLflow registry (``load_from_registry``): used to follow the ``champion`` alias.

Either way :func:`build` checks every artifact the service trusts against the SHA-256
recorded at registration (``clinml.training.model_io.INTEGRITY_TAGS``): the model file, the
model card's JSON and HTML, the serving metadata (threshold, candidate, features...) and
the serving contract of the spec the service runs with. A mismatch refuses the version
(``ModelLoadError`` naming the artifact and where, never a value). Hashing happens at
load only, never per request. A bento's recorded hashes are its own metadata, which
whoever writes the BentoML store could rewrite along with a value, so
``load_from_bento`` also compares them with the registry's tags for that version
whenever the registry answers (docs/security.md section 3.1).

:class:`ModelHolder` holds the current model. A request takes one reference to it at the
start and uses that model throughout, and a swap replaces the reference in one step, so a
champion change never fails or mixes a request: requests already running finish on the
old model, the next ones use the new one. A model that fails to load (a tampered file, an
unreachable registry) is never swapped in; the old one keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError
from clinml.training import model_io
from clinml.training.card import CARD_HTML, CARD_JSON
from clinml.training.tracking import redacted

if TYPE_CHECKING:
    from clinml.spec import UseCaseSpec
    from clinml.training.tracking import Tracker

log = logging.getLogger("bentoml.clinml")

MODEL_SUBDIR = Path("mlflow_model") / "artifacts" / "model"
CARD_SUBDIR = "model_card"
CARD_FILES = {model_io.CARD_JSON_SHA_TAG: CARD_JSON, model_io.CARD_HTML_SHA_TAG: CARD_HTML}
# How long load_from_bento waits for the registry before trusting the bento's own hashes.
REGISTRY_CHECK_TIMEOUT_S = 10.0
# MLflow's error codes for a model or version the registry does not have.
NO_SUCH_VERSION = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})
# The Content-Security-Policy of GET /model/card. The card (training/card.py) is one page
# with inline <style> elements and PNG figures as data: URIs, and nothing else: no
# scripts, no style attributes, no links to fetch. Inline styles are allowed by
# 'unsafe-inline' rather than a hash so that cards rendered by an older card.py (other
# CSS) still render; with every other fetch refused, CSS has no channel to send anything.
# `sandbox` without allow-scripts runs the page in an opaque origin with scripts off.
CARD_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'; sandbox"
)
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

    def encode_columns(self, columns: dict[str, Any]) -> Any:
        """Model input for columns (feature -> values, lists or arrays): the fast path's
        matrix, or a DataFrame; the same as :meth:`encode` of the same rows."""
        if self.compiled is not None:
            return self.compiled.encode_columns(columns)
        return pd.DataFrame({name: columns[name] for name in self.features})

    def predict_columns(self, columns: dict[str, Any]) -> np.ndarray:
        """Positive-class probabilities for the rows of ``columns``, in order."""
        return self.predict(self.encode_columns(columns))

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
    from clinml.serving.fastpath import UnsupportedModel, compile_model

    try:
        compiled = compile_model(pipeline, device=device)
    except UnsupportedModel as exc:
        log.warning("no fast path (%s); serving through the scikit-learn pipeline", exc)
        return None
    compiled.warm_up()
    return compiled


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _recorded(metadata: dict[str, Any], tag: str) -> str | None:
    value = metadata.get(tag)
    return str(value) if value else None


def _read_card(
    directory: Path | None, metadata: dict[str, Any], where: str
) -> tuple[dict[str, Any] | None, str | None]:
    """The card's JSON and HTML, each checked against its recorded hash.

    A file whose hash was recorded must be there and match; a version registered before
    card hashes were recorded is read unchecked, with a warning.
    """
    found: dict[str, bytes | None] = {}
    for tag, name in CARD_FILES.items():
        path = directory / name if directory is not None else None
        data = path.read_bytes() if path is not None and path.is_file() else None
        recorded = _recorded(metadata, tag)
        if recorded is None:
            if data is not None:
                log.warning(
                    "%s: no %s hash was recorded at registration (a version registered "
                    "before card hashes were); serving it unchecked",
                    where,
                    name,
                )
        elif data is None:
            raise model_io.ModelLoadError(
                f"{where}: {name} is missing, but its hash was recorded at registration; refusing"
            )
        elif hashlib.sha256(data).hexdigest() != recorded:
            raise model_io.ModelLoadError(
                f"{where}: {name} differs from the one recorded at registration; refusing"
            )
        found[name] = data
    json_bytes, html_bytes = found[CARD_JSON], found[CARD_HTML]
    if json_bytes is None:
        return None, None
    html = html_bytes.decode("utf-8") if html_bytes is not None else None
    return json.loads(json_bytes.decode("utf-8")), html


def _check_digest(
    metadata: dict[str, Any], tag: str, actual: str, where: str, refusal: str
) -> None:
    recorded = _recorded(metadata, tag)
    if recorded is None:
        log.warning(
            "%s: no %s was recorded at registration (a version registered before it "
            "was); serving it unchecked",
            where,
            tag,
        )
    elif actual != recorded:
        raise model_io.ModelLoadError(f"{where}: {refusal}; refusing")


def build(
    model_dir: Path,
    metadata: dict[str, Any],
    card_dir: Path | None,
    device: str,
    *,
    spec: UseCaseSpec,
    where: str | None = None,
) -> ServedModel:
    """Load a clinml model directory, check it against its registration, and compile it.

    Args:
        model_dir: the model directory (``model_io.save``'s).
        metadata: the version's serving metadata (``registry_metadata``), holding the
            hashes recorded at registration under ``model_io.INTEGRITY_TAGS``.
        card_dir: the directory holding the model card, if any.
        device: where the fast path runs.
        spec: the use-case spec the service runs with; its serving contract must be the
            one the version was trained for.
        where: names the version's origin in refusals (default: ``model_dir``).

    Raises:
        ModelLoadError: no model hash was recorded at registration
            (``metadata["model_sha256"]``); the model file's hash differs from it
            (checked before the file is opened) or from the manifest's; the directory is
            missing or holds untrusted types; a model card file, the serving metadata
            (threshold, candidate, features...) or the spec's serving contract differs
            from the hash recorded at registration. A hash not recorded at all (a version
            registered before it was) is logged as a warning, except the model file's.
    """
    where = where or str(model_dir)
    recorded = _recorded(metadata, model_io.MODEL_SHA_TAG)
    if not recorded:
        raise model_io.ModelLoadError(
            f"{model_dir}: no model hash was recorded at registration; refusing to load a "
            "model that cannot be checked"
        )
    _check_digest(
        metadata,
        model_io.SPEC_CONTRACT_SHA_TAG,
        model_io.spec_contract_digest(spec),
        where,
        f"the serving contract of spec '{spec.name}' (features, their types, ranges and "
        "categories, label classes, risk bands, feature service) changed since this "
        "version was trained: retrain, or restore the spec",
    )
    loaded = model_io.load(model_dir, expected_sha256=recorded)
    card, html = _read_card(card_dir, metadata, where)
    metrics = metadata.get("metrics") or {}
    served: dict[str, Any] = {
        "registered_model": str(metadata["registered_model"]),
        "run_id": str(metadata.get("run_id", "")),
        "candidate": str(metadata.get("candidate", loaded.manifest.get("candidate", ""))),
        "operating_threshold": float(metadata.get("operating_threshold", 0.5)),
        "feature_service": str(metadata.get("feature_service", "")),
        "features": list(loaded.manifest["features"]),
    }
    _check_digest(
        metadata,
        model_io.SERVING_SHA_TAG,
        model_io.serving_digest(**served),
        where,
        "the serving metadata (operating threshold, candidate, feature service, features, "
        "run) differs from the one recorded at registration",
    )
    return ServedModel(
        name=served["registered_model"],
        version=str(metadata["version"]),
        alias=str(metadata.get("alias", "champion")),
        candidate=served["candidate"],
        threshold=served["operating_threshold"],
        feature_service=served["feature_service"],
        features=served["features"],
        trained_at=metadata.get("trained_at"),
        metrics={k: _finite(v) for k, v in metrics.items()},
        run_id=served["run_id"],
        card=card,
        card_html=html,
        pipeline=loaded.pipeline,
        compiled=_compile(loaded.pipeline, device),
    )


def _registry_tags(tracker: Tracker, name: str, version: str, where: str) -> dict[str, str] | None:
    """The registry's tags of ``name`` version ``version``; None when the registry cannot
    be asked (not there, failing, or silent for ``REGISTRY_CHECK_TIMEOUT_S``).

    Raises:
        ModelLoadError: the registry answers that it has no such version.
    """
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["tags"] = dict(tracker.client.get_model_version(name, version).tags or {})
        except Exception as exc:  # reported below, on the caller's thread
            outcome["error"] = exc

    # A registry server that does not answer is retried by MLflow for minutes: a bento
    # must start without it, so the check waits a bounded time.
    asking = threading.Thread(target=ask, name="clinml-registry-check", daemon=True)
    asking.start()
    asking.join(REGISTRY_CHECK_TIMEOUT_S)
    error = outcome.get("error")
    if "tags" in outcome:
        return outcome["tags"]
    # The registry answered, and not with this version: naming a version it lacks (or
    # no valid version at all) must not be a way around the check.
    if getattr(error, "error_code", None) in NO_SUCH_VERSION:
        raise model_io.ModelLoadError(
            f"{where}: the registry at {redacted(tracker.uri)} has no version {version} of "
            f"model '{name}', which this BentoML model says it is; refusing (serve a bento "
            "beside the registry it was packaged from, or with none)"
        )
    reason = type(error).__name__ if error is not None else "no answer"
    log.warning(
        "%s: the MLflow registry could not be asked (%s); trusting the hashes recorded in "
        "the BentoML model itself",
        where,
        reason,
    )
    return None


def _cross_check(metadata: dict[str, Any], tags: dict[str, str], where: str) -> None:
    """The bento's recorded hashes must be the registry's for the same version."""
    differing = [
        tag
        for tag in model_io.INTEGRITY_TAGS
        if (_recorded(metadata, tag) or "") != (tags.get(tag) or "")
    ]
    if differing:
        raise model_io.ModelLoadError(
            f"{where}: the hashes recorded in its model.yaml ({', '.join(differing)}) differ "
            f"from the registry's for version {metadata.get('version')}: the BentoML model "
            "was changed after it was packaged; refusing"
        )


def load_from_bento(
    tag: str, spec: UseCaseSpec, tracker: Tracker | None = None, device: str = "auto"
) -> ServedModel:
    """The model imported into the BentoML store under ``tag`` (e.g. ``readmission:latest``).

    Args:
        tag: the BentoML model's tag.
        spec: the use-case spec the service runs with (see :func:`build`).
        tracker: the registry to cross-check the bento's recorded hashes with. When it
            cannot be asked, the bento's own hashes are checked alone (logged); when it
            answers, any difference, or a version it does not have, refuses the model.
        device: where the fast path runs.

    Raises:
        ModelLoadError: see :func:`build` and above.
    """
    import bentoml

    stored = bentoml.models.get(tag)
    root = Path(stored.path)
    metadata = dict(stored.info.metadata)
    where = f"BentoML model {stored.tag} ({root})"
    if tracker is not None:
        tags = _registry_tags(
            tracker, str(metadata.get("registered_model")), str(metadata.get("version")), where
        )
        if tags is not None:
            _cross_check(metadata, tags, where)
    return build(root / MODEL_SUBDIR, metadata, root / CARD_SUBDIR, device, spec=spec, where=where)


def registry_metadata(tracker: Tracker, version: Any) -> dict[str, Any]:
    """The serving metadata of a registered version: tags (the recorded hashes among
    them), training time, test metrics."""
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
        **{tag: tags.get(tag, "") for tag in model_io.INTEGRITY_TAGS},
        "trained_at": datetime.fromtimestamp(started / 1000, UTC).isoformat() if started else None,
        "metrics": metrics,
    }


def load_from_registry(
    spec: UseCaseSpec, tracker: Tracker, alias: str = "champion", device: str = "auto"
) -> ServedModel:
    """The version behind ``alias`` in the MLflow registry, downloaded, checked against
    its recorded hashes (:func:`build`) and compiled."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from clinml.training.train import CARD_ARTIFACT

    # `models:/` URIs resolve through MLflow's global registry URI: point it at ours (a
    # serving process has not done so otherwise).
    tracker.activate()
    version = tracker.version_by_alias(spec.name, alias)
    metadata = {**registry_metadata(tracker, version), "alias": alias}
    where = f"registered model {spec.name} version {version.version}"
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
        return build(
            Path(model_root) / "artifacts" / "model",
            metadata,
            card_dir,
            device,
            spec=spec,
            where=where,
        )


def starting_holder(load: Callable[[], ServedModel]) -> ModelHolder:
    """A holder of the model ``load`` returns; empty when that model is refused.

    A service whose model is refused at start keeps running without one, not ready
    (``loaded`` is False, ``last_error`` says why), so that the refusal is visible on
    ``/readyz`` and ``GET /model`` instead of as a crash loop; a reload can still bring
    a model that passes its checks.
    """
    try:
        return ModelHolder(load())
    except model_io.ModelLoadError as exc:
        log.error("refusing the model at start; not ready: %s", exc)
        holder = ModelHolder()
        holder.last_error = str(exc)
        return holder


class NoModelLoaded(ClinmlError):
    """The holder has no model (the one given at start was refused); the service
    answers 503 with this message, which names the reason, never a value."""


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
            raise NoModelLoaded(f"no model loaded: {self.last_error or 'none was given'}")
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
