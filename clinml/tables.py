"""Reading user-supplied tables (CSV or Parquet) with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clinml.errors import ClinmlError

SUFFIXES = {".csv", ".parquet"}


def read_table(path: Path, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame; ``text_columns`` of a CSV are read as text
    (identifiers: ``00123`` must stay ``00123``).

    Raises:
        ClinmlError: the file is missing, has another suffix, or cannot be parsed. The
            message names the file and the error type, never the file's contents.
    """
    if not path.is_file():
        raise ClinmlError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ClinmlError(f"{path}: expected a .csv or .parquet file")
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=dict.fromkeys(text_columns, str) or None)
        return pd.read_parquet(path)
    except Exception as exc:  # pandas/pyarrow raise many types for unreadable files
        raise ClinmlError(f"{path}: cannot be read ({type(exc).__name__})") from None
