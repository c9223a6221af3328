"""Model card rendering: the JSON and HTML files, escaping, missing parts, the summary."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from training.card import CardError, card_summary, render_html, write_card

SECTIONS = [
    "Intended use",
    "Training data",
    "Evaluation",
    "Operating point",
    "Calibration",
    "Subgroups",
    "Candidates compared",
    "Limitations",
    "Provenance",
]
HOSTILE = "<script>alert(1)</script>"


def _metric(value: float, half_width: float = 0.02) -> dict[str, float]:
    return {"value": value, "ci_low": value - half_width, "ci_high": value + half_width}


def make_card() -> dict[str, Any]:
    """A card as the training stage would build it for the readmission use case."""
    return {
        "model": {
            "name": "readmission",
            "version": "7",
            "candidate": "gbm",
            "run_id": "4f2a9c0d1e",
            "created": "2026-06-01T12:00:00+00:00",
            "aliases": ["challenger"],
        },
        "use_case": {
            "name": "readmission",
            "description": "30-day readmission risk at discharge",
            "intended_use": "Flag adult inpatients for a transitional-care call.",
            "out_of_scope_use": ["Paediatric patients", "Denying or rationing care"],
            "label": "readmitted_30d = yes",
        },
        "training_data": {
            "window_start": "2024-01-01T00:00:00+00:00",
            "window_end": "2025-12-31T00:00:00+00:00",
            "rows": 1_234_567,
            "patients": 456_789,
            "positives": 148_148,
            "feature_service": "readmission_v3",
            "data_fingerprint": "sha256:9b1c" + "0" * 60,
            "features": ["age", "creatinine", "prior_admissions_12m", "site"],
        },
        "evaluation": {
            "test_rows": 246_913,
            "test_patients": 91_358,
            "bootstrap": {"n_boot": 1000, "level": 0.95, "unit": "patient"},
            "metrics": {
                "roc_auc": _metric(0.8123),
                "average_precision": _metric(0.4412, 0.03),
                "sensitivity": _metric(0.7001),
                "specificity": _metric(0.7788),
                "brier": {"value": float("nan"), "ci_low": None, "ci_high": None},
            },
            "temporal_holdout": {
                "window_start": "2026-01-01T00:00:00+00:00",
                "window_end": "2026-03-31T00:00:00+00:00",
                "rows": 61_000,
                "roc_auc": _metric(0.7954),
                "sensitivity": _metric(0.6811),
            },
            "operating_point": {
                "threshold": 0.2345,
                "rule": "sensitivity >= 0.70",
                "confusion": {"tn": 169_456, "fp": 48_123, "fn": 8_765, "tp": 20_569},
                "alerts_per_100": 27.8,
            },
            "calibration": [
                {
                    "lower": 0.0,
                    "upper": 0.1,
                    "n": 90_000,
                    "mean_predicted": 0.05,
                    "observed_rate": 0.04,
                },
                {
                    "lower": 0.1,
                    "upper": 0.3,
                    "n": 100_000,
                    "mean_predicted": 0.18,
                    "observed_rate": 0.171,
                },
                {
                    "lower": 0.3,
                    "upper": 1.0,
                    "n": 56_913,
                    "mean_predicted": 0.45,
                    "observed_rate": 0.5,
                },
            ],
            "subgroups": [
                {
                    "attribute": "sex",
                    "group": "female",
                    "n": 120_000,
                    "positives": 14_400,
                    "prevalence": 0.12,
                    "evaluated": True,
                    "roc_auc": 0.809,
                    "gap_roc_auc": -0.0033,
                    "sensitivity": 0.71,
                    "gap_sensitivity": 0.0099,
                },
                {
                    "attribute": "site",
                    "group": "north & <east>",
                    "n": 8_000,
                    "positives": 900,
                    "prevalence": 0.1125,
                    "evaluated": True,
                    "roc_auc": 0.7412,
                    "gap_roc_auc": -0.0711,
                    "sensitivity": 0.6,
                    "gap_sensitivity": -0.1001,
                },
                {
                    "attribute": "site",
                    "group": "island",
                    "n": 40,
                    "positives": 3,
                    "prevalence": 0.075,
                    "evaluated": False,
                    "roc_auc": float("nan"),
                    "gap_roc_auc": float("nan"),
                    "sensitivity": None,
                    "gap_sensitivity": None,
                },
            ],
            "primary_metric": "roc_auc",
        },
        "candidates": [
            {"name": "svm", "metrics": {"roc_auc": 0.781, "average_precision": 0.39}},
            {
                "name": "gbm",
                "metrics": {"roc_auc": 0.812, "average_precision": 0.44},
                "selected": True,
            },
            {"name": "mlp", "metrics": {"roc_auc": 0.803}, "selected": False},
        ],
        "limitations": [
            "Trained on two sites; performance elsewhere is unknown.",
            "Deaths after discharge are not counted as readmissions.",
        ],
        "provenance": {
            "git_commit": "b49486f0c0ffee",
            "spec_sha256": "e3b0c44298fc1c149afbf4c8996fb924" * 2,
            "packages": {"scikit-learn": "1.9.1", "mlflow": "3.17.2", "torch": "2.13.0"},
        },
    }


def _section(page: str, heading: str) -> str:
    """The HTML of one section, from its heading to the next section."""
    match = re.search(rf"<h2>{re.escape(heading)}</h2>(.*?)</section>", page, re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def test_write_card_writes_json_with_nan_as_null_and_html(tmp_path: Path) -> None:
    card = make_card()
    json_path, html_path = write_card(card, tmp_path / "cards" / "v7")

    assert json_path == tmp_path / "cards" / "v7" / "model_card.json"
    assert html_path == tmp_path / "cards" / "v7" / "model_card.html"
    text = json_path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert text.startswith('{\n  "model"')  # indent=2, keys in the card's order
    loaded = json.loads(text)
    assert loaded["evaluation"]["metrics"]["brier"]["value"] is None
    assert loaded["evaluation"]["subgroups"][2]["roc_auc"] is None
    assert loaded["evaluation"]["subgroups"][2]["gap_roc_auc"] is None
    assert loaded["evaluation"]["metrics"]["roc_auc"] == card["evaluation"]["metrics"]["roc_auc"]
    assert list(loaded) == list(card)
    assert html_path.read_text(encoding="utf-8") == render_html(loaded)
    assert sorted(p.name for p in json_path.parent.iterdir()) == [
        "model_card.html",
        "model_card.json",
    ]  # no temporary files left behind
    assert math.isnan(card["evaluation"]["metrics"]["brier"]["value"])  # input untouched


def test_write_card_refuses_a_value_json_cannot_hold(tmp_path: Path) -> None:
    card = make_card()
    card["model"]["created"] = object()
    with pytest.raises(CardError, match="not JSON-serialisable"):
        write_card(card, tmp_path)
    assert not (tmp_path / "model_card.json").exists()


def test_html_has_every_section_in_order_with_formatted_numbers() -> None:
    page = render_html(make_card())
    assert "<h1>readmission v7</h1>" in page
    positions = [page.index(f"<h2>{heading}</h2>") for heading in SECTIONS]
    assert positions == sorted(positions)

    assert "1,234,567" in _section(page, "Training data")  # counts with separators
    evaluation = _section(page, "Evaluation")
    assert "95% CI" in evaluation and "0.812" in evaluation and "0.792–0.832" in evaluation
    assert "<h3>Temporal holdout</h3>" in evaluation and "0.795" in evaluation
    assert "61,000" in evaluation
    operating = _section(page, "Operating point")
    assert "0.234" in operating and "sensitivity &gt;= 0.70" in operating
    assert re.search(r"Actual positive</th><td[^>]*>20,569</td><td[^>]*>8,765</td>", operating)
    assert re.search(r"Actual negative</th><td[^>]*>48,123</td><td[^>]*>169,456</td>", operating)
    assert "27.800" in operating
    assert re.search(r"0.100–0.300</td>.*100,000</td>.*0.180</td>.*0.171</td>", page)
    assert re.search(r'<tr class="selected"><td>gbm</td>', _section(page, "Candidates compared"))
    assert "Deaths after discharge" in _section(page, "Limitations")
    assert "scikit-learn" in _section(page, "Provenance")


def test_html_subgroups_show_every_metric_dash_for_missing_and_flag_large_gaps() -> None:
    subgroups = _section(render_html(make_card()), "Subgroups")
    header = re.search(r"<thead>(.*?)</thead>", subgroups, re.S).group(1)
    for column in ("roc_auc", "gap_roc_auc", "sensitivity", "gap_sensitivity"):
        assert f"<th>{column}</th>" in header
    rows = re.findall(r"<tr[^>]*>.*?</tr>", subgroups.split("<tbody>")[1], re.S)
    female, north, island = rows
    # -0.0711 in the primary metric is flagged; -0.1001 in another metric is not.
    assert '<td class="num gap-worse">-0.071</td>' in north and 'class="gap-worse"' in north
    assert '<td class="num">-0.100</td>' in north
    assert "gap-worse" not in female and '<td class="num">-0.003</td>' in female
    assert island.count('<td class="num">—</td>') == 4 and "not-evaluated" in island
    assert "north &amp; &lt;east&gt;" in north


def test_html_escapes_hostile_strings_and_loads_nothing_external() -> None:
    card = make_card()
    card["use_case"]["intended_use"] = HOSTILE
    card["model"]["name"] = '"><img src=x onerror=alert(1)>'
    card["limitations"].append(HOSTILE)
    card["evaluation"]["metrics"][HOSTILE] = _metric(0.5)
    page = render_html(card)

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _section(page, "Intended use")
    assert "<script" not in page.lower()
    assert "<img" not in page and "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>" in _section(page, "Limitations")
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in _section(page, "Evaluation")
    # Self-contained: inline CSS, no scripts, nothing fetched from anywhere.
    ordinary = render_html(make_card()).lower()
    assert "<style>" in ordinary
    for external in ("<script", "http", "src=", "href=", "<link", "@import", "url("):
        assert external not in ordinary


def test_missing_optional_parts_render_as_not_recorded() -> None:
    card = make_card()
    evaluation = card["evaluation"]
    evaluation["temporal_holdout"] = None
    del evaluation["subgroups"], evaluation["calibration"], evaluation["operating_point"]
    del card["candidates"], card["provenance"], card["use_case"]["out_of_scope_use"]
    card["model"]["version"] = None
    page = render_html(card)

    assert "<h1>readmission (unregistered)</h1>" in page
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    for heading in ("Subgroups", "Calibration", "Operating point", "Candidates compared"):
        assert "not recorded" in _section(page, heading)
    assert "not recorded" in _section(page, "Evaluation").split("Temporal holdout")[1]
    assert "not recorded" in _section(page, "Intended use").split("Out of scope")[1]
    # An empty card still renders every section.
    empty = render_html({})
    assert all(f"<h2>{heading}</h2>" in empty for heading in SECTIONS)
    assert empty.count("not recorded") > 20


def test_card_summary_names_model_metric_threshold_worst_subgroup_and_data() -> None:
    lines = card_summary(make_card())
    text = "\n".join(lines)
    assert lines[0] == "readmission v7 — candidate gbm"
    assert "roc_auc: 0.812 (95% CI 0.792–0.832)" in text
    assert "operating threshold 0.234 (sensitivity >= 0.70)" in text
    worst = next(line for line in lines if line.startswith("worst subgroup"))
    # The not-evaluated island group (NaN gap) and sensitivity's larger gap do not count.
    assert "site = north & <east>" in worst and "gap -0.071" in worst and "review" in worst
    assert "1,234,567 rows" in text and "2024-01-01T00:00:00+00:00 to 2025-12-31" in text


def test_a_subgroup_not_evaluated_is_neither_flagged_nor_the_worst() -> None:
    # Too small to evaluate: its point estimate may exist but is not to be trusted.
    card = make_card()
    card["evaluation"]["subgroups"].append(
        {
            "attribute": "site",
            "group": "valley",
            "n": 25,
            "positives": 2,
            "prevalence": 0.08,
            "evaluated": False,
            "roc_auc": 0.5,
            "gap_roc_auc": -0.3123,
        }
    )
    subgroups = _section(render_html(card), "Subgroups")
    valley = next(row for row in subgroups.split("<tr") if "valley" in row)
    assert "gap-worse" not in valley and "-0.312" in valley and "not-evaluated" in valley
    worst = next(line for line in card_summary(card) if line.startswith("worst subgroup"))
    assert "north & <east>" in worst and "valley" not in worst


def test_card_summary_without_subgroups_or_metrics_says_so() -> None:
    card = copy.deepcopy(make_card())
    del card["evaluation"]["subgroups"]
    card["evaluation"]["metrics"] = {}
    card["model"]["name"] = "readmission\x1b[31m\nEVIL"
    lines = card_summary(card)
    assert "no subgroup evaluated" in "\n".join(lines)
    assert "primary metric: not recorded" in lines
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert card_summary({})  # an empty card still summarises
