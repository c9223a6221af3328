"""Drafting a spec from a data file: types, guesses, fallbacks, identifiers, the YAML file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clinml.errors import ClinmlError
from clinml.features.draft import DraftError, draft_from_file, draft_spec, write_draft
from clinml.spec import UseCaseSpec, load_spec

N = 120
START = datetime(2025, 1, 1, tzinfo=UTC)


def make_frame(n: int = N, seed: int = 0) -> pd.DataFrame:
    """Synthetic encounters: one of each kind of column drafting must recognise."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "patient_id": [f"P{i % 40:04d}" for i in range(n)],
            "event_timestamp": [START + timedelta(hours=int(h)) for h in rng.integers(0, 9000, n)],
            "age": rng.integers(18, 95, n),
            "temperature": rng.normal(37.0, 0.5, n),
            "lactate": np.where(rng.random(n) < 0.2, np.nan, rng.uniform(0.5, 10.5, n)),
            "on_ventilator": rng.random(n) < 0.3,
            "ward": rng.choice(["surgical", "icu", "medical"], n),
            "sex": rng.choice(["M", "F"], n),
            "outcome": rng.choice(["no", "yes"], n),
        }
    )


def by_name(spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in spec["features"]}


def validate(spec: dict) -> UseCaseSpec:
    return UseCaseSpec.model_validate({**spec, "source": {"path": "data.csv"}})


# --- types -----------------------------------------------------------------------------


def test_integer_ranges_are_widened_so_an_older_patient_is_not_refused() -> None:
    """Ages observed from 50 to 101 must not make a 102-year-old invalid (issue 20)."""
    frame = make_frame()
    frame["age"] = np.linspace(50, 101, N).round().astype("int64")
    frame["copd"] = np.arange(N) % 2  # an integer 0/1 flag keeps its 0..1 range
    frame["admissions"] = np.arange(N) % 6  # a count: widened, never below 0

    cols = by_name(draft_spec(frame, "sepsis"))

    assert cols["age"] == {"name": "age", "type": "int", "min": 44, "max": 107}
    assert cols["copd"] == {"name": "copd", "type": "int", "min": 0, "max": 1}
    assert cols["admissions"] == {"name": "admissions", "type": "int", "min": 0, "max": 6}
    spec = validate(draft_spec(frame, "sepsis"))
    age = next(c for c in spec.features if c.name == "age")
    assert age.min <= 102 <= age.max


def test_column_types_ranges_and_nullability_are_inferred() -> None:
    frame = make_frame()
    frame.loc[0:1, "temperature"] = [36.1, 39.8]
    frame["temperature"] = frame["temperature"].clip(36.1, 39.8)
    frame.loc[0:1, "lactate"] = [0.5, 10.5]
    frame["lactate"] = frame["lactate"].clip(0.5, 10.5)
    frame["visits"] = pd.array([None, *range(1, N)], dtype="float64")  # ints with a gap (CSV)

    notes: list[str] = []
    spec = draft_spec(frame, "sepsis", notes=notes)
    cols = by_name(spec)

    assert list(cols) == [
        "age",
        "temperature",
        "lactate",
        "on_ventilator",
        "ward",
        "sex",
        "visits",
    ]
    # integer ranges are widened as float ones are, to whole numbers
    age = frame["age"]
    assert cols["age"]["type"] == "int"
    assert cols["age"]["min"] < age.min() and cols["age"]["max"] > age.max()
    # observed [36.1, 39.8] widened by 10% of the width, rounded outwards
    assert cols["temperature"] == {"name": "temperature", "type": "float", "min": 35.7, "max": 40.2}
    # non-negative data never gets a negative minimum; nulls make the column nullable
    assert cols["lactate"]["min"] == 0.0
    assert cols["lactate"]["max"] >= 11.5
    assert cols["lactate"]["nullable"] is True
    assert "nullable" not in cols["temperature"]
    # observed [1, 119]: widened by 11.8 each side, never below 0, rounded to tens
    assert cols["visits"] == {
        "name": "visits",
        "type": "int",
        "min": 0,
        "max": 140,
        "nullable": True,
    }
    assert (cols["on_ventilator"]["type"], cols["on_ventilator"]["min"]) == ("int", 0)
    assert cols["on_ventilator"]["max"] == 1
    assert any(n.startswith("on_ventilator:") for n in notes)
    assert cols["ward"] == {
        "name": "ward",
        "type": "category",
        "categories": ["icu", "medical", "surgical"],
    }
    assert spec["sensitive_attributes"] == ["sex"]
    assert spec["feature_service"] == "sepsis_v1"
    assert spec["primary_metric"] == "roc_auc"
    assert validate(spec).feature_names == list(cols)


def test_reserved_columns_are_never_features() -> None:
    spec = draft_spec(make_frame(), "sepsis")
    names = set(by_name(spec))
    assert not names & {"patient_id", "event_timestamp", "outcome"}


def test_max_categories_is_configurable() -> None:
    frame = make_frame()
    frame["ward"] = [f"ward_{i % 8}" for i in range(N)]
    notes: list[str] = []
    spec = draft_spec(frame, "sepsis", max_categories=5, notes=notes)
    assert "ward" not in by_name(spec)
    assert "ward" not in spec["identifier_columns"]
    assert any(n.startswith("ward: free text with 8 distinct values") for n in notes)
    assert len(by_name(draft_spec(frame, "sepsis"))["ward"]["categories"]) == 8


def test_text_dates_are_timestamp_candidates_not_features() -> None:
    frame = make_frame().drop(columns=["event_timestamp"])
    frame["seen_at"] = [f"2025-03-{1 + i % 28:02d} 08:{i % 60:02d}" for i in range(N)]
    frame.loc[3, "seen_at"] = "unknown"  # under 5% unparseable still reads as dates
    frame["year"] = [str(2000 + i % 20) for i in range(N)]  # numbers as text are not dates
    spec = draft_spec(frame, "sepsis")
    assert spec["event_timestamp"] == "seen_at"
    assert "seen_at" not in by_name(spec)
    assert by_name(spec)["year"]["type"] == "category"


# --- guesses ---------------------------------------------------------------------------


def test_unambiguous_entity_timestamp_label_and_positive_class_are_guessed() -> None:
    spec = draft_spec(make_frame(), "sepsis")
    assert spec["entity"]["key"] == "patient_id"
    assert "generated" not in spec["entity"]
    assert spec["event_timestamp"] == "event_timestamp"
    assert "event_timestamp_generated" not in spec
    assert spec["label"] == {"column": "outcome", "positive_class": "yes", "negative_class": "no"}


@pytest.mark.parametrize(
    ("values", "positive", "negative"),
    [
        ([0, 1], "1", "0"),
        ([False, True], "True", "False"),
        (["N", "Y"], "Y", "N"),
        (["No", "Yes"], "Yes", "No"),
        ([0.0, 1.0], "1.0", "0.0"),
    ],
)
def test_positive_class_is_guessed_from_conventional_values(
    values: list, positive: str, negative: str
) -> None:
    frame = make_frame().drop(columns=["outcome"])
    frame["died_in_hospital"] = [values[i % 2] for i in range(N)]
    spec = draft_spec(frame, "sepsis")
    assert spec["label"] == {
        "column": "died_in_hospital",
        "positive_class": positive,
        "negative_class": negative,
    }
    validate(spec)


def test_patient_id_is_preferred_over_an_mrn_which_becomes_an_identifier() -> None:
    frame = make_frame()
    frame["mrn"] = [f"M{i:06d}" for i in range(N)]
    spec = draft_spec(frame, "sepsis")
    assert spec["entity"]["key"] == "patient_id"
    assert spec["identifier_columns"] == ["mrn"]


# --- ambiguity -------------------------------------------------------------------------


def test_two_label_candidates_ask_for_label() -> None:
    frame = make_frame().drop(columns=["outcome"])
    frame["readmitted"] = ["no", "yes"] * (N // 2)
    frame["died"] = [0, 0, 1] * (N // 3)
    with pytest.raises(DraftError) as err:
        draft_spec(frame, "sepsis")
    assert str(err.value) == (
        "cannot tell which column is the label: pass --label (candidates: readmitted, died)"
    )


def test_no_label_candidate_asks_for_label() -> None:
    frame = make_frame().drop(columns=["outcome"])
    with pytest.raises(DraftError, match=r"^cannot tell which column is the label: pass --label"):
        draft_spec(frame, "sepsis")


def test_two_patient_id_candidates_ask_for_entity_instead_of_generating_one() -> None:
    frame = make_frame()
    frame["subject_id"] = [f"S{i % 30:03d}" for i in range(N)]
    with pytest.raises(DraftError) as err:
        draft_spec(frame, "sepsis")
    assert str(err.value) == (
        "cannot tell which column is the patient id: pass --entity "
        "(candidates: patient_id, subject_id)"
    )


def test_two_date_columns_ask_for_timestamp_instead_of_stamping_rows() -> None:
    frame = make_frame()
    frame["label_timestamp"] = frame["event_timestamp"] + timedelta(days=30)
    with pytest.raises(DraftError) as err:
        draft_spec(frame, "sepsis")
    assert str(err.value) == (
        "cannot tell which column is the event time: pass --timestamp "
        "(candidates: event_timestamp, label_timestamp)"
    )


def test_unconventional_label_values_ask_for_positive_class() -> None:
    frame = make_frame()
    frame["outcome"] = ["malignant", "benign"] * (N // 2)
    with pytest.raises(DraftError) as err:
        draft_spec(frame, "sepsis")
    assert str(err.value) == (
        "cannot tell which value of the label 'outcome' is the positive class: "
        "pass --positive-class (values: benign, malignant)"
    )


def test_every_ambiguity_is_reported_in_one_line() -> None:
    frame = make_frame()
    frame["subject_id"] = frame["patient_id"]
    frame["target"] = frame["outcome"]
    with pytest.raises(DraftError) as err:
        draft_spec(frame, "sepsis")
    message = str(err.value)
    assert "\n" not in message
    assert "pass --entity" in message
    assert "pass --label" in message


# --- explicit arguments ----------------------------------------------------------------


def test_explicit_arguments_win_over_guesses() -> None:
    frame = make_frame()
    frame["encounter_key"] = [f"E{i % 50:03d}" for i in range(N)]
    frame["admitted_at"] = frame["event_timestamp"] - timedelta(days=2)
    frame["readmitted"] = ["benign", "malignant"] * (N // 2)
    notes: list[str] = []
    spec = draft_spec(
        frame,
        "sepsis",
        entity="encounter_key",
        timestamp="admitted_at",
        label="readmitted",
        positive_class="malignant",
        identifiers=["ward"],
        notes=notes,
    )
    assert spec["entity"]["key"] == "encounter_key"
    assert spec["event_timestamp"] == "admitted_at"
    assert spec["label"] == {
        "column": "readmitted",
        "positive_class": "malignant",
        "negative_class": "benign",
    }
    assert "ward" in spec["identifier_columns"]
    assert "ward" not in by_name(spec)
    # the guessed label is now just another column, flagged for review
    assert by_name(spec)["outcome"]["type"] == "category"
    assert any(n.startswith("outcome: looks like another outcome") for n in notes)
    # patient_id is not the entity any more; it must not leak into features
    assert "patient_id" in spec["identifier_columns"]
    validate(spec)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": "outcom"}, "--label: the data has no column 'outcom' (did you mean 'outcome'?)"),
        ({"entity": "zzz"}, "--entity: the data has no column 'zzz' (columns: patient_id,"),
        ({"timestamp": "when"}, "--timestamp: the data has no column 'when'"),
        ({"identifiers": ["nope"]}, "identifiers: the data has no column 'nope'"),
        ({"positive_class": "maybe"}, "--positive-class: 'maybe' is not a value of the label"),
        ({"timestamp": "ward"}, "--timestamp: column 'ward' does not hold dates or times"),
        ({"label": "ward"}, "--label: column 'ward' has 3 distinct values"),
        (
            {"label": "sex", "entity": "sex"},
            "--entity, --timestamp and --label must name different",
        ),
    ],
)
def test_bad_explicit_arguments_name_the_column(kwargs: dict, message: str) -> None:
    with pytest.raises(DraftError) as err:
        draft_spec(make_frame(), "sepsis", **kwargs)
    assert str(err.value).startswith(message)


def test_a_guessed_column_with_an_invalid_name_must_be_renamed() -> None:
    frame = make_frame().rename(columns={"patient_id": "PatientID"})
    with pytest.raises(DraftError) as err:
        draft_spec(frame, "sepsis")
    assert str(err.value).startswith("the patient id column 'PatientID' must be renamed")
    assert "patient_id" in str(err.value)


def test_invalid_use_case_name_is_refused() -> None:
    with pytest.raises(DraftError, match="use-case name 'Sepsis-2' is not valid"):
        draft_spec(make_frame(), "Sepsis-2")


# --- fallbacks -------------------------------------------------------------------------


def test_no_patient_id_and_no_timestamp_fall_back_to_generated_columns() -> None:
    frame = make_frame().drop(columns=["patient_id", "event_timestamp"])
    notes: list[str] = []
    spec = draft_spec(frame, "sepsis", notes=notes)
    assert spec["entity"]["key"] == "row_id"
    assert spec["entity"]["generated"] is True
    assert spec["event_timestamp"] == "event_timestamp"
    assert spec["event_timestamp_generated"] is True
    assert any("row-level splits" in n for n in notes)
    assert any("ingestion time" in n for n in notes)
    parsed = validate(spec)
    assert parsed.entity.generated
    assert parsed.event_timestamp_generated


def test_generated_names_do_not_clash_with_data_columns() -> None:
    frame = make_frame().drop(columns=["patient_id", "event_timestamp"])
    frame["row_id"] = np.arange(N) % 7
    spec = draft_spec(frame, "sepsis")
    assert spec["entity"]["key"] == "row_id_2"
    validate(spec)


# --- identifiers -----------------------------------------------------------------------


def test_identifier_like_columns_are_routed_to_identifier_columns() -> None:
    frame = make_frame()
    frame["accession"] = [f"A{i:07d}" for i in range(N)]  # unique text
    frame["encounter_id"] = np.arange(N) + 5000  # unique integers named like an id
    frame["email"] = ["someone@example.org"] * N  # PHI name, whatever its cardinality
    frame["date_of_birth"] = [f"19{50 + i % 40}-01-01" for i in range(N)]  # a date, but PHI
    frame["first_name"] = ["Alex", "Sam"] * (N // 2)
    frame["comment"] = [f"note {i % 70}" for i in range(N)]  # free text, not an identifier
    frame["site_id"] = [i % 3 for i in range(N)]  # a coded category, not an identifier
    notes: list[str] = []
    spec = draft_spec(frame, "sepsis", notes=notes)

    assert spec["identifier_columns"] == [
        "accession",
        "encounter_id",
        "email",
        "date_of_birth",
        "first_name",
    ]
    assert spec["event_timestamp"] == "event_timestamp"  # a date of birth is no candidate
    assert "comment" not in by_name(spec)
    assert "comment" not in spec["identifier_columns"]
    assert any(n.startswith("comment: free text with 70 distinct values") for n in notes)
    assert by_name(spec)["site_id"]["categories"] == ["0", "1", "2"]
    dumped = yaml.safe_dump(spec) + "\n".join(notes)
    for value in ("A0000001", "someone@example.org", "Alex", "1950", "note 1", "P0001"):
        assert value not in dumped
    validate(spec)


def test_invalid_column_names_are_left_out_with_a_note() -> None:
    frame = make_frame()
    frame["Heart Rate"] = np.linspace(50, 120, N)
    notes: list[str] = []
    spec = draft_spec(frame, "sepsis", notes=notes)
    assert "Heart Rate" not in by_name(spec)
    assert any("'Heart Rate': not a valid column name" in n and "heart_rate" in n for n in notes)


# --- files -----------------------------------------------------------------------------


def write_csv(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "data" / "encounters.csv"
    path.parent.mkdir()
    frame.to_csv(path, index=False)
    return path


def test_drafted_file_round_trips_through_load_spec(tmp_path: Path) -> None:
    frame = make_frame()
    frame["mrn"] = [f"M{i:06d}" for i in range(N)]
    frame.loc[5, "ward"] = None
    data = write_csv(tmp_path, frame)
    out = tmp_path / "configs" / "sepsis.yaml"

    assert draft_from_file(data, "sepsis", out) == out

    text = out.read_text()
    assert text.startswith(
        "# Drafted by clinml init from ../data/encounters.csv; review every field before use."
    )
    assert yaml.safe_load(text)["source"] == {"path": "../data/encounters.csv"}
    assert list(yaml.safe_load(text))[:4] == ["name", "description", "source", "entity"]
    spec = load_spec(out)
    assert spec.source.path == data.resolve()
    assert spec.entity.key == "patient_id"
    assert spec.event_timestamp == "event_timestamp"
    assert (spec.label.column, spec.label.positive_class) == ("outcome", "yes")
    assert spec.identifier_columns == ["mrn"]
    assert spec.feature_names == ["age", "temperature", "lactate", "on_ventilator", "ward", "sex"]
    ward = next(c for c in spec.features if c.name == "ward")
    assert ward.nullable
    assert ward.categories == ["icu", "medical", "surgical"]


def test_drafted_file_without_ids_or_times_round_trips(tmp_path: Path) -> None:
    data = write_csv(tmp_path, make_frame().drop(columns=["patient_id", "event_timestamp"]))
    out = tmp_path / "sepsis.yaml"
    draft_from_file(data, "sepsis", out)
    spec = load_spec(out)
    assert spec.entity.generated
    assert spec.event_timestamp_generated
    assert "row-level splits" in out.read_text()


def test_draft_from_file_passes_flags_through(tmp_path: Path) -> None:
    frame = make_frame()
    frame["outcome"] = ["benign", "malignant"] * (N // 2)
    data = write_csv(tmp_path, frame)
    out = tmp_path / "sepsis.yaml"
    with pytest.raises(DraftError, match="pass --positive-class"):
        draft_from_file(data, "sepsis", out)
    assert not out.exists()
    draft_from_file(data, "sepsis", out, positive_class="malignant")
    assert load_spec(out).label.negative_class == "benign"


def test_existing_file_is_not_overwritten_without_force(tmp_path: Path) -> None:
    data = write_csv(tmp_path, make_frame())
    out = tmp_path / "sepsis.yaml"
    out.write_text("# hand-written\n")
    with pytest.raises(ClinmlError, match="already exists: pass --force"):
        draft_from_file(data, "sepsis", out)
    assert out.read_text() == "# hand-written\n"
    with pytest.raises(ClinmlError, match="already exists"):
        write_draft(draft_spec(make_frame(), "sepsis"), out)
    assert out.read_text() == "# hand-written\n"

    draft_from_file(data, "sepsis", out, overwrite=True)
    assert load_spec(out).name == "sepsis"


def test_an_invalid_draft_is_reported_with_its_field_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clinml.features.draft as draft

    original = draft.draft_spec

    def broken(*args, **kwargs) -> dict:
        spec = original(*args, **kwargs)
        spec["features"][0]["max"] = "high"
        return spec

    monkeypatch.setattr(draft, "draft_spec", broken)
    data = write_csv(tmp_path, make_frame())
    out = tmp_path / "sepsis.yaml"
    with pytest.raises(DraftError, match=r"not valid: features\[0\]\.max: Input should be"):
        draft_from_file(data, "sepsis", out)
    assert not out.exists()


def test_missing_data_file_is_a_clinml_error(tmp_path: Path) -> None:
    with pytest.raises(ClinmlError, match="file not found"):
        draft_from_file(tmp_path / "nope.csv", "sepsis", tmp_path / "sepsis.yaml")
