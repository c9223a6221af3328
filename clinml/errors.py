"""Errors a user can act on.

Every error clinml raises on purpose is a ``ClinmlError``: its message is one line that
says what was wrong and what to do. The CLI prints that line and exits with status 2;
anything else is a bug and keeps its traceback.
"""


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
