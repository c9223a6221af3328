"""Saving and loading a fitted clinml model without pickle.

A model directory holds ``model.skops`` (the fitted pipeline, written by skops) and
``manifest.json`` (features, classes, threshold, the file's SHA-256). Loading refuses a
file that contains types outside the allow-list (scikit-learn, numpy and clinml's own
``training`` package), and a file whose hash differs from the manifest's, which catches
corruption. (Tamper-proofing against the registry's record is a later step.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clinml.errors import ClinmlError

MODEL_FILE = "model.skops"
MANIFEST_FILE = "manifest.json"
FORMAT = "clinml-skops/1"
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "training.")


class ModelLoadError(ClinmlError):
    """A model directory is missing, corrupt or contains untrusted types."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    untrusted = [name for name in found if not name.startswith(TRUSTED_PREFIXES)]
    if untrusted:
        raise ModelLoadError(f"{model_file}: refusing to load untrusted types {untrusted}")
    pipeline = skops.io.load(model_file, trusted=found)
    return ClinicalModel(pipeline=pipeline, manifest=manifest)
