"""The use-case spec loader: valid specs load, invalid ones name the file and the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clinml.errors import SpecError
from clinml.spec import UseCaseSpec, load_spec
from tests.conftest import FIXTURES, PROJECT_ROOT


def write_spec(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    mutate(raw)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_pathology_spec_declares_what_the_design_requires(pathology_spec: UseCaseSpec) -> None:
    spec = pathology_spec
    assert spec.name == "pathology"
    assert spec.source.loader == "pathology"
    assert spec.entity.key == "patient_id"
    assert spec.event_timestamp == "event_timestamp"
    assert (spec.label.column, spec.label.positive_class) == ("diagnosis", "malignant")
    assert len(spec.features) == 30
    assert all(f.unit and f.min is not None and f.max is not None for f in spec.features)
    assert spec.sensitive_attributes == ["age_band", "site"]
    assert spec.identifier_columns == ["mrn"]
    assert spec.primary_metric == "roc_auc"
    assert spec.feature_service == "pathology_v1"


def test_name_lookup_uses_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text((FIXTURES / "tiny.yaml").read_text())
    spec = load_spec("tiny", config_dir=tmp_path)
    assert spec.name == "tiny"
    assert spec.source_file == (tmp_path / "tiny.yaml").resolve()
    # source.path is resolved against the spec's directory, not the working directory
    assert spec.source.path == (tmp_path / "tiny.csv").resolve()


@pytest.mark.parametrize(
    ("mutate", "field_path", "message"),
    [
        (lambda r: r.update(colour="red"), "colour", "Extra inputs are not permitted"),
        (lambda r: r["features"][1].update(max="high"), "features[1].max", "valid number"),
        (lambda r: r["features"][0].pop("min"), "features[0]", "needs both 'min' and 'max'"),
        (lambda r: r["label"].update(negative_class="yes"), "label", "must differ"),
        (lambda r: r.update(primary_metric="auc"), "primary_metric", "Input should be"),
        (lambda r: r["training"].update(test_size=1.5), "training.test_size", "less than"),
        (lambda r: r.update(sensitive_attributes=["race"]), "(top level)", "race"),
        (lambda r: r.update(identifier_columns=["heart_rate"]), "(top level)", "heart_rate"),
        (
            lambda r: r["features"].append(
                {"name": "ward", "type": "category", "categories": ["a"]}
            ),
            "(top level)",
            "declared twice: ward",
        ),
        (lambda r: r["features"][2].update(categories=[]), "features[2]", "non-empty"),
        (
            lambda r: r.update(monitoring={"population": {"ward": ["icu"]}}),
            "(top level)",
            "monitoring.population: ward is not one of sensitive_attributes",
        ),
        (
            lambda r: r.update(monitoring={"population": {"site": ["east"]}}),
            "(top level)",
            "monitoring.population.site needs one or more of its declared categories",
        ),
        (lambda r: r.update(monitoring={"numeric_floor": 0}), "monitoring.numeric_floor", ""),
    ],
)
def test_invalid_spec_names_file_and_field(
    tmp_path: Path, mutate, field_path: str, message: str
) -> None:
    path = write_spec(tmp_path, mutate)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: {field_path}"), text
    assert message in text
    assert "\n" not in text


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: not valid YAML \(line"):
        load_spec(bad)


def test_environment_variables_are_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_spec(tmp_path, lambda r: r["source"].update(path="${TINY_DATA_DIR}/x.csv"))
    monkeypatch.setenv("TINY_DATA_DIR", str(tmp_path / "data"))
    assert load_spec(path).source.path == tmp_path / "data" / "x.csv"
    monkeypatch.delenv("TINY_DATA_DIR")
    with pytest.raises(SpecError, match="TINY_DATA_DIR is not set"):
        load_spec(path)


def test_fingerprint_changes_with_content(tiny_spec: UseCaseSpec) -> None:
    changed = tiny_spec.model_copy(update={"primary_metric": "f1"})
    assert tiny_spec.fingerprint() != changed.fingerprint()
    assert tiny_spec.fingerprint() == tiny_spec.model_copy().fingerprint()


def test_cli_reports_a_bad_spec_in_one_line_without_traceback(tmp_path: Path) -> None:
    path = write_spec(tmp_path, lambda r: r["features"][1].update(max="high"))
    clinml = Path(sys.executable).parent / "clinml"
    result = subprocess.run(
        [str(clinml), "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "CLINML_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: {path}: features[1].max: "
        "Input should be a valid number, unable to parse string as a number"
    ]
    assert not (tmp_path / "home").exists()


def test_the_alert_budget_is_counted_in_the_spec_s_row_noun(tmp_path: Path) -> None:
    """A row is an appointment or a prescription in some use cases: the budget's words
    say so, and a noun that could carry markup or another line is refused."""

    def budget(noun: str | None):
        def mutate(raw: dict) -> None:
            raw.setdefault("evaluation", {})["max_alerts_per_100"] = 10
            if noun is not None:
                raw["evaluation"]["row_noun"] = noun

        return mutate

    default = load_spec(write_spec(tmp_path, budget(None)))
    assert default.evaluation.threshold_rule == "at most 10 alerts per 100 patients"
    rows = load_spec(write_spec(tmp_path, budget("appointments")))
    assert rows.evaluation.threshold_rule == "at most 10 alerts per 100 appointments"
    for bad in ("<b>visits</b>", "visits\nrm", ""):
        with pytest.raises(SpecError, match="row_noun"):
            load_spec(write_spec(tmp_path, budget(bad)))
