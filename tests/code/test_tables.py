"""Reading a user's CSV: errors that say where the file breaks, never what it holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinml.errors import ClinmlError
from clinml.tables import read_table

HEADER = "patient_id,age,outcome"


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batch.csv"
    path.write_text(text)
    return path


def test_a_row_with_too_many_values_names_its_line_and_not_its_values(tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\nP1,54,yes\nP2,61,no\nP-SECRET,70,yes,extra\nP4,33,no\n")
    with pytest.raises(ClinmlError) as failed:
        read_table(path)
    message = str(failed.value)
    assert message == (
        f"{path}: line 4 has 4 values where the header names 3 columns (a stray comma or an "
        "unquoted value with a comma in it?)"
    )
    assert "SECRET" not in message


def test_an_unclosed_quote_names_the_line_it_starts_on(tmp_path: Path) -> None:
    path = _csv(tmp_path, f'{HEADER}\nP1,54,yes\n"P-SECRET,61,no\nP3,70,yes\n')
    with pytest.raises(ClinmlError, match=r"a quoted value that starts on line 3 is never closed"):
        read_table(path)


@pytest.mark.parametrize(
    ("delimiter", "name"),
    [(";", "';'"), ("\t", "tab"), ("|", "'|'")],
    ids=["semicolon", "tab", "pipe"],
)
def test_another_delimiter_is_named(tmp_path: Path, delimiter: str, name: str) -> None:
    rows = [HEADER, "P1,54,yes", "P2,61,no"]
    path = _csv(tmp_path, "\n".join(row.replace(",", delimiter) for row in rows) + "\n")
    with pytest.raises(ClinmlError) as failed:
        read_table(path)
    assert str(failed.value) == (
        f"{path}: the file seems to be {name}-delimited; clinml reads comma-separated CSV: "
        "save it with ',' between values"
    )


def test_a_semicolon_file_with_decimal_commas_is_named_too(tmp_path: Path) -> None:
    # Spreadsheets that write ';' between values write ',' in numbers.
    path = _csv(tmp_path, "patient_id;creatinine;outcome\nP1;1,2;yes\nP2;0,9;no\n")
    with pytest.raises(ClinmlError, match=r"seems to be ';'-delimited"):
        read_table(path)


def test_an_empty_file_and_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ClinmlError, match=r": the file is empty$"):
        read_table(_csv(tmp_path, ""))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"{HEADER}\nP1,54,s\xed\n".encode("latin-1"))
    with pytest.raises(ClinmlError, match=r": not UTF-8 text: save it as UTF-8 CSV$"):
        read_table(latin)


def test_a_well_formed_csv_is_read(tmp_path: Path) -> None:
    path = _csv(tmp_path, f'{HEADER}\n00123,54,yes\n"P2, jr",61,no\n')
    frame = read_table(path, text_columns=("patient_id",))
    assert list(frame.columns) == ["patient_id", "age", "outcome"]
    assert frame["patient_id"].tolist() == ["00123", "P2, jr"]
