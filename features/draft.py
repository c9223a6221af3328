"""Draft a use-case spec from a data file (``clinml init``).

Writing a spec by hand for a wide table is tedious; this module reads the table once and
proposes one: column types, ranges and category sets, the entity key, the event
timestamp, the label and its positive class, and the identifier (PHI) columns to drop.
The result is a starting point for a person to review, never a spec to trust blindly.

Guessing is conservative. The entity, timestamp and label are guessed only when exactly
one column fits; when several fit (or no label fits) drafting stops with a
:class:`DraftError` naming the ``clinml init`` flag to pass and the candidates. A dataset
without a patient id gets a generated row key (every row is its own patient, so
patient-level splits become row-level splits); one without timestamps is stamped with
the ingestion time.

The draft holds no data values except the category sets of low-cardinality text columns
and numeric ranges: identifiers, free text and dates never appear in it.

Usage::

    spec = draft_spec(frame, "sepsis", label="sepsis_48h", positive_class="1")
    path = draft_from_file(Path("data/sepsis.csv"), "sepsis", Path("configs/sepsis.yaml"))
"""

from __future__ import annotations

import difflib
import math
import os
import re
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from clinml.errors import ClinmlError
from clinml.spec import UseCaseSpec
from clinml.tables import read_table

MAX_CATEGORIES = 50
"""Text columns with at most this many distinct values become categories."""

FLOAT_MARGIN = 0.1
"""Numeric ranges are the observed range widened by this fraction of its width each side
(integer ranges too, rounded outwards to whole numbers)."""

UNIQUE_SHARE = 0.95
"""A column whose distinct values are at least this share of its rows is identifier-like."""

MIN_ROWS_FOR_UNIQUE = 20
"""Below this many values, "every value is distinct" says nothing about a column."""

DATE_SHARE = 0.95
"""A text column is date-like when at least this share of a sample parses as dates."""

DATE_SAMPLE = 500

SENSITIVE_NAMES = frozenset({"sex", "gender", "race", "ethnicity", "age_band", "site"})

KEY_ORDER = (
    "name",
    "description",
    "source",
    "entity",
    "event_timestamp",
    "event_timestamp_generated",
    "label",
    "primary_metric",
    "feature_service",
    "features",
    "attributes",
    "sensitive_attributes",
    "identifier_columns",
)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_ENTITY_NAME = re.compile(
    r"^(?:(?:patient|subject|person|participant)(?:_?(?:id|key|no|nr|number))?|pat_?id|pid)$"
)
_MRN_NAME = re.compile(
    r"^(?:(?:patient_?)?mrn(?:_?(?:id|no|nr|number))?|medical_record_(?:no|number))$"
)
_LABEL_NAME = re.compile(
    r"^(?:y|class|(?:label|target|outcome|diagnosis)(?:_[a-z0-9_]+)?"
    r"|(?:readmit|mortality|died|death)[a-z0-9_]*)$"
)
_DATE_TEXT = re.compile(
    r"^\s*(?:\d{4}-\d{1,2}-\d{1,2}|\d{4}/\d{1,2}/\d{1,2}|\d{1,2}/\d{1,2}/\d{2,4})"
    r"(?:[ T]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?\s*(?:Z|UTC|[+-]\d{2}:?\d{2})?\s*$"
)
_PHI_TOKENS = frozenset({"mrn", "ssn", "dob", "zip", "zipcode", "postcode"})
_PHI_SUBSTRINGS = ("email", "phone", "address", "dateofbirth", "birthdate", "birthday")
_PERSON_NAMES = frozenset(
    {"first", "last", "full", "given", "family", "middle", "maiden", "patient", "sur"}
)
_ID_PREFIXES = frozenset(
    {
        "patient",
        "subject",
        "person",
        "participant",
        "encounter",
        "visit",
        "record",
        "case",
        "admission",
        "episode",
        "member",
        "sample",
        "specimen",
        "u",
        "gu",
    }
)


class DraftError(ClinmlError):
    """The data does not say enough to draft a spec; the message says which flag to pass."""


@dataclass(frozen=True)
class _Profile:
    """What drafting needs to know about one column (counts only, no values)."""

    kind: str  # "bool", "int", "float", "text", "datetime" or "empty"
    non_null: int
    nulls: int
    distinct: int

    @property
    def unique_like(self) -> bool:
        return (
            self.non_null >= MIN_ROWS_FOR_UNIQUE and self.distinct >= UNIQUE_SHARE * self.non_null
        )


def draft_spec(
    frame: pd.DataFrame,
    name: str,
    *,
    entity: str | None = None,
    timestamp: str | None = None,
    label: str | None = None,
    positive_class: str | None = None,
    identifiers: Sequence[str] = (),
    source_path: str | None = None,
    max_categories: int = MAX_CATEGORIES,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Propose a use-case spec for a table.

    Numeric columns become ``int`` or ``float`` features with the observed range widened
    by 10% of its width each side (never below 0 for non-negative data; integer bounds
    rounded outwards to whole numbers); integer columns holding only 0 and 1, and
    booleans, become ``int`` 0/1; text columns with at
    most ``max_categories`` distinct values become ``category`` features. Identifier-like
    columns (nearly one distinct value per row, or named like an id, MRN, name, e-mail,
    phone, date of birth, SSN or address) go to ``identifier_columns``; other
    high-cardinality text and unused date columns are left out. Columns with nulls are
    ``nullable``.

    Args:
        frame: the data, as read from the user's file.
        name: the use-case name (lower-case identifier); the feature service is
            ``<name>_v1``.
        entity: the patient-id column; guessed from names like ``patient_id`` when
            ``None``. With no candidate at all, a row key is generated and every row is
            its own patient.
        timestamp: the event-time column; guessed when ``None`` as the only date-like
            column. With no date-like column, rows are stamped with the ingestion time.
        label: the binary outcome column; guessed when ``None`` from names like
            ``label``, ``outcome``, ``readmitted_30d`` or ``died``.
        positive_class: the label value that is the positive class; guessed only for
            0/1, False/True, no/yes and N/Y.
        identifiers: columns to declare as identifiers (PHI, dropped at ingestion) on
            top of those detected.
        source_path: written as ``source.path`` when given (the spec needs a source).
        max_categories: the most distinct values a text column may have to be a
            category.
        notes: if given, one line is appended per decision a reviewer should check
            (skipped columns, fallbacks). Lines name columns and counts, never values.

    Returns:
        A plain dict in spec key order; with ``source`` filled it validates as a
        :class:`~clinml.spec.UseCaseSpec`.

    Raises:
        DraftError: a named column is missing or unusable, or the entity, timestamp,
            label or positive class cannot be told apart (the message names the flag to
            pass and the candidates).
    """
    out_notes: list[str] = [] if notes is None else notes
    if not _IDENTIFIER.match(name) or len(name) > 63:
        raise DraftError(
            f"use-case name '{name}' is not valid: use lower-case letters, digits and _ "
            "(starting with a letter or _)"
        )
    if len(frame.columns) == 0 or len(frame) == 0:
        raise DraftError("the data has no rows or no columns; nothing to draft from")
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise DraftError(f"the data has duplicate column names: {', '.join(dupes)}")
    data = frame.set_axis(columns, axis=1)

    for flag, column in (("--entity", entity), ("--timestamp", timestamp), ("--label", label)):
        if column is not None:
            _require_column(column, columns, flag)
    for column in identifiers:
        _require_column(column, columns, "identifiers")
    given = [c for c in (entity, timestamp, label) if c is not None]
    if len(set(given)) != len(given):
        raise DraftError("--entity, --timestamp and --label must name different columns")
    clash = sorted(set(identifiers) & set(given))
    if clash:
        raise DraftError(
            f"{', '.join(clash)} cannot be both an identifier and the entity, timestamp or label"
        )

    profiles = {c: _profile(data[c]) for c in columns}
    explicit_ids = set(identifiers)
    problems: list[str] = []

    # Entity: a patient-id-like name, preferring patient_id-style names over MRN-style.
    entity_generated = False
    if entity is None:
        taken = explicit_ids | set(given)
        usable = [c for c in columns if c not in taken and profiles[c].kind in {"int", "text"}]
        primary = [c for c in usable if _ENTITY_NAME.match(_normalise(c))]
        mrn_like = [c for c in usable if _MRN_NAME.match(_normalise(c))]
        candidates = primary or mrn_like
        entity = _only(candidates, "the patient id", "--entity", problems)
        entity_generated = not candidates

    # Timestamp: the only date-like column that is not a date of birth.
    timestamp_generated = False
    if timestamp is None:
        taken = explicit_ids | {c for c in (entity, label) if c is not None}
        candidates = [
            c
            for c in columns
            if c not in taken and profiles[c].kind == "datetime" and not _is_phi_name(c)
        ]
        timestamp = _only(candidates, "the event time", "--timestamp", problems)
        timestamp_generated = not candidates
    elif profiles[timestamp].kind != "datetime":
        raise DraftError(
            f"--timestamp: column '{timestamp}' does not hold dates or times "
            "(expected e.g. 2024-05-01 or 2024-05-01T13:45:00Z)"
        )

    # Label: the only two-valued column named like an outcome.
    label_like = [
        c
        for c in columns
        if _LABEL_NAME.match(_normalise(c)) and profiles[c].distinct == 2 and c not in explicit_ids
    ]
    if label is None:
        candidates = [c for c in label_like if c not in {entity, timestamp}]
        label = _only(candidates, "the label", "--label", problems)
        if not candidates:
            problems.append(
                "cannot tell which column is the label: pass --label (no two-valued column "
                "is named like label, target, outcome, y, class, diagnosis, readmitted*, "
                "mortality* or died*)"
            )
    elif profiles[label].distinct != 2:
        raise DraftError(
            f"--label: column '{label}' has {profiles[label].distinct} distinct values; "
            "the label must have exactly two"
        )

    positive = negative = None
    if label is not None and profiles[label].distinct == 2:
        values = sorted({str(v) for v in data[label].dropna().unique()})
        if positive_class is not None:
            if positive_class not in values:
                raise DraftError(
                    f"--positive-class: '{positive_class}' is not a value of the label "
                    f"'{label}' (values: {', '.join(values)})"
                )
            positive = positive_class
        else:
            positive = _guess_positive(values)
            if positive is None:
                problems.append(
                    f"cannot tell which value of the label '{label}' is the positive class: "
                    f"pass --positive-class (values: {', '.join(values)})"
                )
        if positive is not None:
            negative = next(v for v in values if v != positive)

    if problems:
        raise DraftError("; ".join(problems))
    assert label is not None and positive is not None and negative is not None

    for role, column in (("patient id", entity), ("event time", timestamp), ("label", label)):
        if column is not None and not _valid_name(column):
            raise DraftError(
                f"the {role} column '{column}' must be renamed in the file: names must be "
                f"lower-case letters, digits and _ (e.g. {_normalise(column) or 'column_1'})"
            )
    if profiles[label].nulls:
        out_notes.append(
            f"{label}: {profiles[label].nulls} rows have no label; they fail the quality gate "
            "unless label.known_at names a column saying when the label became known"
        )

    reserved = {c for c in (entity, timestamp, label) if c is not None}
    features: list[dict[str, Any]] = []
    identifier_columns: list[str] = []
    for column in columns:
        if column in reserved:
            continue
        profile = profiles[column]
        if column in explicit_ids:
            if _valid_name(column):
                identifier_columns.append(column)
            else:
                out_notes.append(
                    f"'{column}': not a valid name to declare; as an undeclared column "
                    "ingestion drops it anyway"
                )
            continue
        if not _valid_name(column):
            out_notes.append(_invalid_name_note(column))
            continue
        if profile.kind == "empty":
            out_notes.append(f"{column}: every value is empty; left out")
            continue
        normalised = _normalise(column)
        if (
            _is_phi_name(column)
            or _ENTITY_NAME.match(normalised)
            or _MRN_NAME.match(normalised)
            or (profile.kind == "text" and profile.unique_like)
            or (
                profile.kind in {"int", "float", "text"}
                and _is_id_name(column)
                and (profile.unique_like or profile.distinct > max_categories)
            )
        ):
            identifier_columns.append(column)
            continue
        if profile.kind == "datetime":
            out_notes.append(
                f"{column}: dates or times, never a feature; left out (if it says when the "
                "label became known, set label.known_at to it)"
            )
            continue
        if profile.kind == "text" or (profile.kind == "int" and _is_id_name(column)):
            if profile.distinct > max_categories:
                out_notes.append(
                    f"{column}: free text with {profile.distinct} distinct values (more than "
                    f"{max_categories}); left out"
                )
                continue
            features.append(_category_column(column, data[column], profile))
        else:
            features.append(_numeric_column(column, data[column], profile))
            if profile.kind == "bool":
                out_notes.append(
                    f"{column}: true/false drafted as int 0/1 (ingestion converts true/false "
                    "to 1/0)"
                )
        if column != label and column in label_like:
            out_notes.append(
                f"{column}: looks like another outcome and is drafted as a feature; remove it "
                "if it is not known at prediction time"
            )
        if column in SENSITIVE_NAMES and features[-1]["type"] != "category":
            out_notes.append(
                f"{column}: named like a sensitive attribute but numeric; add it to "
                "sensitive_attributes if its values are groups"
            )

    if not features:
        raise DraftError(
            "no column can be a feature: every column is the entity, timestamp, label, an "
            "identifier, a date, empty or free text"
        )

    spec: dict[str, Any] = {"name": name, "description": f"Predicts {label} = {positive}."}
    if source_path is not None:
        spec["source"] = {"path": str(source_path)}
    if entity_generated:
        key = _free_name("row_id", columns)
        spec["entity"] = {
            "name": "patient",
            "key": key,
            "description": "Generated: the data has no patient id, so every row is its own "
            "patient (patient-level splits are row-level splits).",
            "generated": True,
        }
        out_notes.append(
            f"no patient id column: {key} is generated per row, so every row is its own "
            "patient and patient-level splits become row-level splits (pass --entity if "
            "the data has one)"
        )
    else:
        assert entity is not None
        spec["entity"] = {
            "name": "patient",
            "key": entity,
            "description": "Patient id (pseudonymised at ingestion).",
        }
    if timestamp_generated:
        spec["event_timestamp"] = _free_name("event_timestamp", columns)
        spec["event_timestamp_generated"] = True
        out_notes.append(
            "no date or time column: every row is stamped with the ingestion time, so "
            "point-in-time joins are trivial (pass --timestamp if the data has one)"
        )
    else:
        assert timestamp is not None
        spec["event_timestamp"] = timestamp
    spec["label"] = {"column": label, "positive_class": positive, "negative_class": negative}
    spec["primary_metric"] = "roc_auc"
    spec["feature_service"] = f"{name}_v1"
    spec["features"] = features
    spec["attributes"] = []
    spec["sensitive_attributes"] = [
        f["name"] for f in features if f["name"] in SENSITIVE_NAMES and f["type"] == "category"
    ]
    spec["identifier_columns"] = identifier_columns
    return spec


def _only(candidates: list[str], role: str, flag: str, problems: list[str]) -> str | None:
    """The single candidate; with several, record which flag settles it and return None."""
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        problems.append(
            f"cannot tell which column is {role}: pass {flag} (candidates: {', '.join(candidates)})"
        )
    return None


def write_draft(
    spec: dict[str, Any], path: Path, *, overwrite: bool = False, notes: Sequence[str] = ()
) -> Path:
    """Write a drafted spec as YAML, headed by a comment asking for review.

    Keys are written in reading order (name, description, source, entity, timestamp,
    label, metric, feature service, features, attributes, sensitive attributes,
    identifiers, then anything else); each column is one flow-style line, as in
    ``configs/``.

    Args:
        spec: the draft, e.g. from :func:`draft_spec`.
        path: the YAML file to write; missing parent directories are created.
        overwrite: replace an existing file instead of refusing.
        notes: lines for the header comment (from ``draft_spec(..., notes=...)``).

    Returns:
        ``path``.

    Raises:
        ClinmlError: ``path`` exists and ``overwrite`` is false.
    """
    if path.exists() and not overwrite:
        raise ClinmlError(_exists_message(path))
    source = (spec.get("source") or {}).get("path") or "a data frame"
    header = [f"# Drafted by clinml init from {source}; review every field before use."]
    header += [
        "#",
        "# Check the label and its positive class, the identifier columns (PHI, dropped at",
        "# ingestion), the min/max of every numeric column (observed ranges widened by 10%",
        "# of their width each side; 0/1 flags kept at 0..1) and the category lists, and",
        "# add units and descriptions.",
    ]
    if notes:
        header += ["#", "# Notes from drafting:"]
        for note in notes:
            lines = textwrap.wrap(note, width=86)
            header += [f"# - {lines[0]}", *(f"#   {line}" for line in lines[1:])]
    ordered = [k for k in KEY_ORDER if k in spec] + [k for k in spec if k not in KEY_ORDER]
    body = ""
    previous_multiline = True
    for key in ordered:
        block = _dump({key: _for_yaml(key, spec[key])})
        multiline = block.count("\n") > 1
        # A blank line around every section; consecutive one-line keys stay together.
        body += ("\n" if body and (multiline or previous_multiline) else "") + block
        previous_multiline = multiline
    text = "\n".join(header) + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("w" if overwrite else "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise ClinmlError(_exists_message(path)) from None
    return path


def draft_from_file(
    data: Path, name: str, out: Path, *, overwrite: bool = False, **kwargs: Any
) -> Path:
    """Read a CSV or Parquet file, draft a spec for it, validate it and write it.

    ``source.path`` is written relative to the output file's directory (so the spec
    keeps working when both move together), or absolute when no relative path exists.

    Args:
        data: the CSV or Parquet file.
        name: the use-case name.
        out: the YAML file to write.
        overwrite: replace an existing ``out``.
        **kwargs: passed to :func:`draft_spec` (``entity``, ``timestamp``, ``label``,
            ``positive_class``, ``identifiers``, ``max_categories``).

    Returns:
        ``out``.

    Raises:
        ClinmlError: the file cannot be read, or ``out`` exists and ``overwrite`` is
            false.
        DraftError: the spec cannot be drafted or the draft does not validate (the
            message names the field).
    """
    if out.exists() and not overwrite:
        raise ClinmlError(_exists_message(out))
    frame = read_table(data)
    try:
        source = Path(os.path.relpath(data.resolve(), out.resolve().parent)).as_posix()
    except ValueError:  # no relative path between them (e.g. other drive on Windows)
        source = data.resolve().as_posix()
    notes: list[str] = []
    spec = draft_spec(frame, name, source_path=source, notes=notes, **kwargs)
    try:
        UseCaseSpec.model_validate(spec)
    except ValidationError as exc:
        problems = [f"{_field_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DraftError(f"the drafted spec is not valid: {problems[0]}{more}") from None
    return write_draft(spec, out, overwrite=overwrite, notes=notes)


# --- column profiles and specs ---------------------------------------------------------


def _profile(values: pd.Series) -> _Profile:
    non_null = values.dropna()
    n, nulls = len(non_null), int(values.isna().sum())
    if n == 0:
        return _Profile("empty", 0, nulls, 0)
    distinct = int(non_null.nunique())
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        kind = "bool"
    elif pd.api.types.is_datetime64_any_dtype(dtype):
        kind = "datetime"
    elif pd.api.types.is_integer_dtype(dtype):
        kind = "int"
    elif pd.api.types.is_float_dtype(dtype):
        kind = _float_kind(non_null, nulls)
    else:
        inferred = pd.api.types.infer_dtype(non_null, skipna=True)
        if inferred == "boolean":
            kind = "bool"
        elif inferred == "integer":
            kind = "int"
        elif inferred in {"floating", "mixed-integer-float", "decimal"}:
            kind = _float_kind(pd.to_numeric(non_null), nulls)
        elif inferred in {"datetime64", "datetime", "date"} or (
            inferred == "string" and _looks_like_dates(non_null)
        ):
            kind = "datetime"
        else:
            kind = "text"
    return _Profile(kind, n, nulls, distinct)


def _float_kind(non_null: pd.Series, nulls: int) -> str:
    """Integers stored as floats only because of missing values (CSV) are ints."""
    finite = non_null[np.isfinite(non_null.astype(float))]
    if nulls and len(finite) and bool((finite == np.round(finite)).all()):
        return "int"
    return "float"


def _looks_like_dates(non_null: pd.Series) -> bool:
    step = max(1, len(non_null) // DATE_SAMPLE)
    sample = non_null.iloc[::step].astype(str)
    if sample.str.match(_DATE_TEXT).mean() < DATE_SHARE:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = pd.to_datetime(sample, errors="coerce", format="mixed", utc=True)
    return bool(parsed.notna().mean() >= DATE_SHARE)


def _numeric_column(column: str, values: pd.Series, profile: _Profile) -> dict[str, Any]:
    out: dict[str, Any] = {"name": column, "type": "int" if profile.kind != "float" else "float"}
    if profile.kind == "bool":
        out.update(min=0, max=1)
    else:
        numbers = pd.to_numeric(values.dropna()).astype(float)
        finite = numbers[np.isfinite(numbers)]
        low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
        if profile.kind == "int" and low >= 0 and high <= 1:
            out.update(min=0, max=1)  # a 0/1 flag: no other value is possible
        elif profile.kind == "int":
            # Widened as floats are: the observed extremes are only this sample's, and a
            # patient one year older than the oldest seen must not be refused.
            wide_low, wide_high = _widen(low, high)
            out.update(min=math.floor(wide_low), max=math.ceil(wide_high))
        else:
            out.update(zip(("min", "max"), _widen(low, high), strict=True))
    if profile.nulls:
        out["nullable"] = True
    if profile.kind == "bool":
        out["description"] = "true/false as 1/0"
    return out


def _category_column(column: str, values: pd.Series, profile: _Profile) -> dict[str, Any]:
    categories = sorted({str(v) for v in values.dropna().unique()})
    out: dict[str, Any] = {"name": column, "type": "category", "categories": categories}
    if profile.nulls:
        out["nullable"] = True
    return out


def _widen(low: float, high: float, margin: float = FLOAT_MARGIN) -> tuple[float, float]:
    """The observed range widened by ``margin`` of its width, rounded outwards.

    Rounding is to two significant digits of the widened width, so ``[36.1, 39.8]``
    becomes ``[35.7, 40.2]``. The range never crosses zero when the data does not.
    """
    width = high - low
    pad = width * margin if width > 0 else (abs(high) * margin or 1.0)
    new_low, new_high = low - pad, high + pad
    if low >= 0:
        new_low = max(new_low, 0.0)
    if high < 0:
        new_high = min(new_high, 0.0)
    exponent = math.floor(math.log10(new_high - new_low)) - 1
    step, decimals = 10.0**exponent, max(0, -exponent)
    new_low = round(math.floor(new_low / step) * step, decimals)
    new_high = round(math.ceil(new_high / step) * step, decimals)
    return float(min(new_low, low)), float(max(new_high, high))


def _guess_positive(values: list[str]) -> str | None:
    """The positive class of a two-valued label, when its values say so."""
    pairs: dict[tuple[str, ...], str] = {
        ("0", "1"): "1",
        ("0.0", "1.0"): "1.0",
        ("false", "true"): "true",
        ("no", "yes"): "yes",
        ("n", "y"): "y",
    }
    lowered = {v.lower(): v for v in values}
    positive = pairs.get(tuple(sorted(lowered)))
    return lowered[positive] if positive is not None else None


# --- names ----------------------------------------------------------------------------


def _normalise(column: str) -> str:
    """``PatientID`` -> ``patient_id``, ``Date of Birth`` -> ``date_of_birth``."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", column).lower()
    return re.sub(r"[^a-z0-9]+", "_", snake).strip("_")


def _valid_name(column: str) -> bool:
    return bool(_IDENTIFIER.match(column)) and len(column) <= 63


def _is_phi_name(column: str) -> bool:
    """Named like a direct identifier: MRN, SSN, date of birth, name, contact details."""
    tokens = _normalise(column).split("_")
    compact = "".join(tokens)
    if _PHI_TOKENS & set(tokens) or any(s in compact for s in _PHI_SUBSTRINGS):
        return True
    if "birth" in tokens and {"date", "day", "dt"} & set(tokens):
        return True
    if compact == "name" or compact in {f"{p}name" for p in _PERSON_NAMES}:
        return True
    return len(tokens) >= 2 and tokens[-1] == "name" and tokens[-2] in _PERSON_NAMES


def _is_id_name(column: str) -> bool:
    """Named like an id: ``id``, ``encounter_id``, ``visitid``, ``uuid``."""
    for token in _normalise(column).split("_"):
        if token in {"id", "ids", "uuid", "guid"}:
            return True
        if token.endswith("id") and token[:-2] in _ID_PREFIXES:
            return True
    return False


def _invalid_name_note(column: str) -> str:
    if _is_phi_name(column) or _is_id_name(column):
        return f"'{column}': looks like an identifier; not declared, so ingestion drops it"
    suggestion = _normalise(column) or "a lower-case name"
    return (
        f"'{column}': not a valid column name (lower-case letters, digits and _); left out "
        f"- rename it (e.g. {suggestion}) to use it"
    )


def _free_name(base: str, columns: Sequence[str]) -> str:
    name, number = base, 2
    while name in columns:
        name, number = f"{base}_{number}", number + 1
    return name


def _require_column(column: str, columns: list[str], flag: str) -> None:
    if column in columns:
        return
    close = difflib.get_close_matches(column, columns, n=1)
    if close:
        hint = f"did you mean '{close[0]}'?"
    else:
        shown = ", ".join(columns[:20]) + (
            f", ... ({len(columns)} in all)" if len(columns) > 20 else ""
        )
        hint = f"columns: {shown}"
    raise DraftError(f"{flag}: the data has no column '{column}' ({hint})")


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _exists_message(path: Path) -> str:
    return f"{path} already exists: pass --force to overwrite it"


# --- YAML -----------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style overall, flow style for one column or one list of names."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Indent list items under their key, as in configs/.
        super().increase_indent(flow, False)


class _FlowMap(dict):
    pass


class _FlowList(list):
    pass


_Dumper.add_representer(
    _FlowMap,
    lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True),
)
_Dumper.add_representer(
    _FlowList,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def _for_yaml(key: str, value: Any) -> Any:
    """Plain Python values, with columns and name lists marked for flow style."""
    value = _plain(value)
    if key in {"features", "attributes"} and isinstance(value, list):
        return [_FlowMap({k: _flow_lists(v) for k, v in col.items()}) for col in value]
    if key in {"sensitive_attributes", "identifier_columns"} and isinstance(value, list):
        return _FlowList(value)
    return value


def _flow_lists(value: Any) -> Any:
    return _FlowList(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    """numpy scalars and paths as the Python values YAML's safe dumper knows."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _dump(mapping: dict[str, Any]) -> str:
    return yaml.dump(
        mapping,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )
