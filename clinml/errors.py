"""Errors a user can act on.

Every error clinml raises on purpose is a ``ClinmlError``: its message is one line that
says what was wrong and what to do. The CLI prints that line and exits with status 2;
anything else is a bug and keeps its traceback. A store that does not answer is turned
into one such line by ``store_unavailable`` (the CLI's last resort).
"""

from __future__ import annotations

import re
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ClinmlError(Exception):
    """Base class for errors that are reported to the user as one line."""


class SpecError(ClinmlError):
    """A use-case spec is missing, unreadable or invalid."""


class DataValidationError(ClinmlError):
    """A data batch failed the quality gate; nothing downstream was written.

    Attributes:
        failures: one human-readable line per failed expectation. The lines name
            columns and counts, never the offending values (they may be PHI).
        report: the markdown report of the failure, when one was written.
    """

    def __init__(self, message: str, failures: list[str], report: object = None):
        super().__init__(message)
        self.failures = failures
        self.report = report


class NotReadyError(ClinmlError):
    """A stage needs the output of an earlier stage that has not run yet."""


class SettingsError(ClinmlError):
    """A ``CLINML_*`` environment variable is invalid, or the profile refuses to start."""

    @classmethod
    def from_validation(cls, exc: ValidationError) -> SettingsError:
        """The one line for pydantic's ``ValidationError`` of ``Settings``: its first
        problem, named by its environment variable (never the variable's value)."""
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        if not first["loc"]:  # a check across variables (the production profile's)
            return cls(message)
        return cls(f"environment variable CLINML_{str(first['loc'][0]).upper()}: {message}")


class StoreUnavailable(ClinmlError):
    """A store clinml talks to (Redis, PostgreSQL, the MLflow server) does not answer."""


# Connection failures of the stores, recognised by their classes' module and name so that
# recognising one imports none of the libraries (``clinml --help`` stays fast).
_REDIS = {("redis.exceptions", "ConnectionError"), ("redis.exceptions", "TimeoutError")}
_POSTGRES = {("psycopg", "OperationalError"), ("psycopg2", "OperationalError")}
_SQLALCHEMY = {("sqlalchemy.exc", "OperationalError")}
_HTTP = {("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")}
_MLFLOW = {("mlflow.exceptions", "MlflowException")}

# What went wrong, from the library's text; the text itself is not shown (it may carry a
# connection string's options or, from a query, a value).
_FAILURES = (
    (
        re.compile(r"password|authentication|NOAUTH|WRONGPASS|AuthenticationError", re.I),
        "authentication failed",
    ),
    (re.compile(r'role "[^"]*" does not exist'), "no such user"),
    (re.compile(r'database "[^"]*" does not exist'), "no such database"),
    (re.compile(r"refused", re.I), "connection refused"),
    (re.compile(r"timed? ?out|timeout", re.I), "timed out"),
    (
        re.compile(r"name or service not known|translate host name|name resolution|nodename", re.I),
        "host name not found",
    ),
)
_REFUSALS = {"authentication failed", "no such user", "no such database"}
_WHERE = (
    re.compile(r"connecting to (?P<host>[\w.\-\[\]:]+?):(?P<port>\d+)"),  # redis
    re.compile(r'server at "(?P<host>[^"]+)"(?: \([^)]*\))?, port (?P<port>\d+)'),  # psycopg
    re.compile(r"host='(?P<host>[^']+)', port=(?P<port>\d+)"),  # urllib3, via requests/MLflow
    re.compile(r'(?P<host>socket "[^"]+")'),  # psycopg, a Unix socket
)


def _is(exc: BaseException, kinds: set[tuple[str, str]]) -> bool:
    return any((k.__module__, k.__qualname__) in kinds for k in type(exc).__mro__)


def _origin(exc: BaseException) -> str:
    """Which configured store raised ``exc``: "mlflow", "feast" or "" (from its traceback)."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        module = str(frame.f_globals.get("__name__", ""))
        for origin in ("mlflow", "feast"):
            if module == origin or module.startswith(origin + "."):
                return origin
    return ""


def store_unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The one-line error for a store that does not answer, or None when ``exc`` is not
    such a failure.

    The line names the store, its host and port, what failed (refused, timed out, ...)
    and the setting to check; never a password, a query or a value.
    """
    failure, store, setting = None, "", ""
    for error in _chain(exc):
        if _is(error, _REDIS):
            failure, store = error, "the online feature store (Redis)"
            setting = "online_store in CLINML_FEATURE_STORE_YAML"
        elif _is(error, _POSTGRES) or (
            _is(error, _SQLALCHEMY) and _is(getattr(error, "orig", None) or error, _POSTGRES)
        ):
            failure, store = error, "PostgreSQL"
        elif (_is(error, _HTTP) and _origin(exc) == "mlflow") or (
            _is(error, _MLFLOW) and str(error).startswith("API request to")
        ):
            failure, store = error, "the MLflow tracking server"
            setting = "CLINML_TRACKING_URI"
        if failure is not None:
            break
    if failure is None:
        return None
    if store == "PostgreSQL":
        store, setting = {
            "mlflow": ("the MLflow database (PostgreSQL)", "CLINML_TRACKING_URI"),
            "feast": (
                "the Feast registry or offline store (PostgreSQL)",
                "CLINML_FEATURE_STORE_YAML",
            ),
        }.get(_origin(exc), ("PostgreSQL", "CLINML_FEATURE_STORE_YAML and CLINML_TRACKING_URI"))
    text = " ".join(str(e) for e in _chain(failure))
    where = next((m for m in (p.search(text) for p in _WHERE) if m), None)
    at = ""
    if where is not None:
        port = where.groupdict().get("port")
        at = f" at {where['host']}:{port}" if port else f" at {where['host']}"
    what = next((name for pattern, name in _FAILURES if pattern.search(text)), None)
    if what in _REFUSALS:  # it answers, and says no
        return StoreUnavailable(f"{store}{at} refuses the connection ({what}): check {setting}")
    return StoreUnavailable(
        f"{store}{at} does not answer ({what or type(failure).__name__}): check {setting} "
        "and that it is running"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``raise ... from``), outermost first."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    return chain
