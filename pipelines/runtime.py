"""Process-wide set-up done once by the CLI, never at import time."""

from __future__ import annotations

import logging
import os
import warnings

from pydantic import ValidationError

from clinml.errors import SettingsError
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
    # psycopg warns "error ignored terminating <Pipeline>: pipeline aborted" when SQLAlchemy
    # (MLflow's store on PostgreSQL, seen during `clinml train`) ends a pipeline after a
    # statement error it handles itself: nothing for a user to act on.
    "psycopg",
    "py.warnings",
]


def load_settings() -> Settings:
    """Settings from the environment, with a one-line error for a bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError.from_validation(exc) from None


def configure(settings: Settings) -> None:
    """Point every library's state at CLINML_HOME and keep their output readable."""
    # BentoML reads BENTOML_HOME on first use of its store: derive it from the one root.
    os.environ["BENTOML_HOME"] = str(settings.paths.bentoml_home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow sets its own loggers' level from this when it is imported, after QUIET_LOGGERS
    # below; at WARNING it prints every retry of a database that does not answer (a dozen
    # blocks over two minutes) before the one line that says so.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
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
