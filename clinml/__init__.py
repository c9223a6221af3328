"""clinml core: the use-case spec, deploy-time settings and the errors every stage shares.

Stage packages (``features``, ``training``, ``serving``, ``monitoring``) import from
here; nothing here imports them, and importing it is cheap (no Feast, GX, MLflow or
torch).

Modules:
    spec           the use-case spec: YAML -> ``${VAR}`` expansion -> ``UseCaseSpec``
    settings       deploy-time settings from ``CLINML_*`` variables; every path from one root
    environment    where a deployment keeps its features: embedded stores or its own
                   ``feature_store.yaml``
    errors         ``ClinmlError`` and the errors a user can act on
    audit          append-only, hash-chained audit logs and their signed checkpoints
    pseudonym      the keyed hash applied wherever a raw patient id enters clinml
    cpus           the CPUs this process may use, and thread limits that keep training in them
    tables         reading user-supplied CSV or Parquet with errors a user can act on
    atomic         all-or-nothing file changes (temporary file, fsync, rename) and locks
    clock          ``utc_now``, the clock modules take as their default
    predictionlog  the prediction log's reader: what serving logged, read by monitoring

Layers: ``clinml.features``, ``clinml.training``, ``clinml.serving``, ``clinml.monitoring``
and ``clinml.pipelines`` (the ``clinml`` command). Their folders sit beside this one, the
product's layout. An installed wheel holds them inside ``clinml/`` (pyproject.toml's
``package-dir``); a source checkout, an editable install and a bento hold them beside it,
so there the folder above joins this package's search path (``LAYERS_BESIDE``).
"""

from pathlib import Path as _Path

from clinml.errors import ClinmlError, DataValidationError, SpecError
from clinml.settings import Paths, Settings
from clinml.spec import UseCaseSpec, load_spec

__all__ = [
    "ClinmlError",
    "DataValidationError",
    "Paths",
    "Settings",
    "SpecError",
    "UseCaseSpec",
    "load_spec",
]

__version__ = "0.1.0"

LAYERS = ("features", "training", "serving", "monitoring", "pipelines")
_HERE = _Path(__file__).resolve().parent
LAYERS_BESIDE = not (_HERE / "features").is_dir() and (_HERE.parent / "features").is_dir()
if LAYERS_BESIDE:
    __path__.append(str(_HERE.parent))
