"""clinml core: the use-case spec, deploy-time settings and the errors every stage shares.

Stage packages (``features``, ``training``, ``serving``, ``monitoring``) import from
here; nothing here imports them, and importing it is cheap (no Feast, GX, MLflow or
torch).
"""

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
