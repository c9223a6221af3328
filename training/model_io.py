"""Saving and loading a fitted clinml model without pickle.

A model directory holds ``model.skops`` (the fitted pipeline, written by skops) and
``manifest.json`` (features, classes, threshold, the file's SHA-256). Loading refuses a
file that contains types outside the allow-list (scikit-learn, numpy and clinml's own
``training`` package), a file whose hash differs from the one recorded at registration
(``expected_sha256``), and one whose hash differs from the manifest's.

The registered version also records the SHA-256 of everything else the service trusts
(``INTEGRITY_TAGS``): the model card's two files, the serving metadata its answers
depend on (``serving_digest``) and the parts of the use-case spec the model's inputs
and answers depend on (``spec_contract``). Training writes them (``training/train.py``);
the service checks them at every load (``serving/runtime.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError

if TYPE_CHECKING:
    from clinml.spec import UseCaseSpec

MODEL_FILE = "model.skops"
MANIFEST_FILE = "manifest.json"
FORMAT = "clinml-skops/1"
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "clinml.training.")
# Models saved before the layers became one package (issue 21) name clinml's own classes
# ``training.<module>.<Class>``; they load with those names pointed at ``clinml.training``
# (:func:`_alias_legacy_modules`), so a registry's existing versions keep serving.
LEGACY_PREFIX = "training."


# Model-version tags holding the SHA-256 recorded at registration of each artifact the
# service trusts. The model file's tag is required; the others arrived later, so a version
# registered before them loads with a warning (docs/security.md section 3.1).
MODEL_SHA_TAG = "model_sha256"
CARD_JSON_SHA_TAG = "card_json_sha256"  # model_card.json, the bytes logged
CARD_HTML_SHA_TAG = "card_html_sha256"  # model_card.html, the page GET /model/card serves
SERVING_SHA_TAG = "serving_sha256"  # serving_digest: threshold, candidate, features...
SPEC_CONTRACT_SHA_TAG = "serving_spec_sha256"  # spec_contract of the spec it was trained on
INTEGRITY_TAGS = (
    MODEL_SHA_TAG,
    CARD_JSON_SHA_TAG,
    CARD_HTML_SHA_TAG,
    SERVING_SHA_TAG,
    SPEC_CONTRACT_SHA_TAG,
)
# The parts of a feature's declaration the request schema and the model depend on; its
# description and drift floor may change after training.
_CONTRACT_COLUMN_FIELDS = {"name", "type", "unit", "min", "max", "categories", "nullable"}


class ModelLoadError(ClinmlError):
    """A model directory is missing, corrupt or contains untrusted types, or an artifact
    differs from the hash recorded at registration."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical_sha256(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys, no whitespace, no NaN)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def serving_digest(
    *,
    registered_model: str,
    run_id: str,
    candidate: str,
    operating_threshold: float,
    feature_service: str,
    features: list[str],
) -> str:
    """SHA-256 of the serving metadata a version's answers depend on.

    The operating threshold turns a probability into a label; the features (in order) are
    the model's input columns; the registered name, run and candidate say what answers.
    What ``GET /model`` only reports (metrics, training time) is left out.
    """
    return _canonical_sha256(
        {
            "registered_model": registered_model,
            "run_id": run_id,
            "candidate": candidate,
            "operating_threshold": float(operating_threshold),
            "feature_service": feature_service,
            "features": list(features),
        }
    )


def spec_contract(spec: UseCaseSpec) -> dict[str, Any]:
    """The parts of a use-case spec that the model's inputs and answers depend on.

    In: the use case's name, the feature service, each feature's name, type, unit, range,
    categories and nullability, in order (the request schema and the model's columns),
    the label's two classes (the answers' labels) and the serving risk bands. Out:
    descriptions, the data source, attributes, and the quality, training, evaluation,
    promotion and monitoring settings (including features' drift floors), which may be
    tuned after training without changing what the model answers.
    """
    return {
        "usecase": spec.name,
        "feature_service": spec.feature_service,
        "features": [
            c.model_dump(mode="json", include=_CONTRACT_COLUMN_FIELDS) for c in spec.features
        ],
        "label": {
            "positive_class": spec.label.positive_class,
            "negative_class": spec.label.negative_class,
        },
        "risk_bands": spec.serving.model_dump(mode="json")["risk_bands"],
    }


def spec_contract_digest(spec: UseCaseSpec) -> str:
    """SHA-256 of :func:`spec_contract`, recorded with the version it was trained for."""
    return _canonical_sha256(spec_contract(spec))


@dataclass(frozen=True)
class ClinicalModel:
    """A fitted pipeline plus what is needed to call it correctly."""

    pipeline: Any
    manifest: dict[str, Any]

    @property
    def features(self) -> list[str]:
        return list(self.manifest["features"])

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class for each row (columns by name)."""
        return self.pipeline.predict_proba(frame[self.features])[:, 1]


def save(pipeline: Any, directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``pipeline`` and its manifest to ``directory`` (created if missing)."""
    import skops.io

    directory.mkdir(parents=True, exist_ok=True)
    model_file = directory / MODEL_FILE
    skops.io.dump(pipeline, model_file)
    full = {**manifest, "format": FORMAT, "sha256": sha256_of(model_file)}
    (directory / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True))
    return directory


def load(directory: Path, expected_sha256: str | None = None) -> ClinicalModel:
    """Load a model directory written by :func:`save`.

    Args:
        directory: the model directory.
        expected_sha256: the hash recorded elsewhere (at registration). The file is
            checked against it before skops reads a byte of it, so a file rewritten
            together with its manifest is refused unopened.

    Raises:
        ModelLoadError: files missing, hash mismatch, or untrusted types inside.
    """
    import skops.io

    model_file, manifest_file = directory / MODEL_FILE, directory / MANIFEST_FILE
    if not model_file.is_file() or not manifest_file.is_file():
        raise ModelLoadError(f"{directory}: not a clinml model directory")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{directory}: unsupported model format {manifest.get('format')!r}")
    actual = sha256_of(model_file)
    if expected_sha256 is not None and actual != expected_sha256:
        raise ModelLoadError(
            f"{model_file}: model hash differs from the one recorded at registration; refusing"
        )
    if actual != manifest["sha256"]:
        raise ModelLoadError(f"{model_file}: SHA-256 differs from the manifest; refusing to load")
    found = skops.io.get_untrusted_types(file=model_file)
    untrusted = [name for name in found if not name.startswith((*TRUSTED_PREFIXES, LEGACY_PREFIX))]
    if untrusted:
        raise ModelLoadError(f"{model_file}: refusing to load untrusted types {untrusted}")
    _alias_legacy_modules(found)
    pipeline = skops.io.load(model_file, trusted=found)
    return ClinicalModel(pipeline=pipeline, manifest=manifest)


def _alias_legacy_modules(types: list[str]) -> None:
    """Point each ``training.<module>`` a legacy model names at ``clinml.training.<module>``
    (in ``sys.modules``, where skops' loader imports it from), so the class it finds is
    the one clinml uses. Only modules of clinml's own training layer are aliased."""
    import importlib
    import sys

    modules = {name.rsplit(".", 1)[0] for name in types if name.startswith(LEGACY_PREFIX)}
    if not modules:
        return
    sys.modules.setdefault("training", importlib.import_module("clinml.training"))
    for legacy in sorted(modules):
        module = importlib.import_module(f"clinml.{legacy}")
        if sys.modules.setdefault(legacy, module) is not module:
            raise ModelLoadError(f"{legacy} is another module than clinml.{legacy}; refusing")
