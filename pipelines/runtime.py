"""Process-wide set-up done once by the CLI, never at import time."""

from __future__ import annotations

import logging
import os
import warnings

from pydantic import ValidationError

from clinml.errors import ClinmlError
from clinml.settings import Settings

# Libraries whose INFO chatter drowns the progress lines. "py.warnings" carries the
# library deprecation warnings some of them route through logging; users cannot act
# on those, and the test suite still sees them.
QUIET_LOGGERS = [
    "mlflow",
    "alembic",
    "feast",
    "great_expectations",
    "bentoml",
    "evidently",
    "urllib3",
    "httpx",  # logs request URLs, and a webhook URL may carry a token
    "py.warnings",
]


def load_settings() -> Settings:
    """Settings from the environment, with a one-line error for a bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check across variables (the production profile's)
            raise ClinmlError(str(first["msg"]).removeprefix("Value error, ")) from None
        name = "CLINML_" + str(first["loc"][0]).upper()
        raise ClinmlError(f"environment variable {name}: {first['msg']}") from None


def configure(settings: Settings) -> None:
    """Point every library's state at CLINML_HOME and keep their output readable."""
    # BentoML reads BENTOML_HOME on first use of its store: derive it from the one root.
    os.environ["BENTOML_HOME"] = str(settings.paths.bentoml_home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("FEAST_USAGE", "False")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        # Some libraries set their own loggers to INFO; the console shows warnings only.
        handler.setLevel(logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
