"""Reading user-supplied tables (CSV or Parquet) with errors a user can act on."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from clinml.errors import ClinmlError

SUFFIXES = {".csv", ".parquet"}
# Delimiters a CSV is sometimes saved with instead of commas (spreadsheets in many locales
# use ';'), by the name the error gives them.
OTHER_DELIMITERS = {";": "';'", "\t": "tab", "|": "'|'"}


def read_table(path: Path, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame; ``text_columns`` of a CSV are read as text
    (identifiers: ``00123`` must stay ``00123``).

    Raises:
        ClinmlError: the file is missing, has another suffix, is not comma-separated, or
            cannot be parsed. The message names the file, and the line where the CSV
            breaks when the parser says, never the file's contents.
    """
    if not path.is_file():
        raise ClinmlError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ClinmlError(f"{path}: expected a .csv or .parquet file")
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for unreadable files
            raise ClinmlError(f"{path}: cannot be read ({type(exc).__name__})") from None
    _require_commas(path)
    try:
        return pd.read_csv(path, dtype=dict.fromkeys(text_columns, str) or None)
    except pd.errors.EmptyDataError:
        raise ClinmlError(f"{path}: the file is empty") from None
    except UnicodeDecodeError:
        raise ClinmlError(f"{path}: not UTF-8 text: save it as UTF-8 CSV") from None
    except pd.errors.ParserError as exc:
        raise ClinmlError(f"{path}: {_parse_failure(str(exc))}") from None
    except Exception as exc:  # pandas raises many types for unreadable files
        raise ClinmlError(f"{path}: cannot be read ({type(exc).__name__})") from None


def _require_commas(path: Path) -> None:
    """Refuse a file whose header is split by another delimiter, before pandas reads it
    as one column (or fails on the first row with a decimal comma)."""
    with path.open(encoding="utf-8-sig", errors="replace") as file:
        header = file.readline()
    if "," in header:
        return
    for delimiter, name in OTHER_DELIMITERS.items():
        if delimiter in header:
            raise ClinmlError(
                f"{path}: the file seems to be {name}-delimited; clinml reads comma-separated "
                "CSV: save it with ',' between values"
            )


def _parse_failure(message: str) -> str:
    """What the CSV parser found wrong, and on which line (the header is line 1); only
    its counts and line numbers are kept, never the text around them."""
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if fields:
        expected, line, seen = fields.groups()
        return (
            f"line {line} has {seen} values where the header names {expected} columns "
            "(a stray comma or an unquoted value with a comma in it?)"
        )
    quote = re.search(r"inside string starting at row (\d+)", message)
    if quote:  # the parser counts rows from 0
        return f"a quoted value that starts on line {int(quote.group(1)) + 1} is never closed"
    line = re.search(r"\b(?:line|row) (\d+)", message)
    where = f" at line {line.group(1)}" if line else ""
    return f"cannot be parsed as CSV{where}"
