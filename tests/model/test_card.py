"""Model card rendering: the JSON and HTML files, escaping, missing parts, the summary."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from clinml.training.card import CardError, card_summary, render_html, write_card

SECTIONS = [
    "Intended use",
    "Training data",
    "Split",
    "Evaluation",
    "Operating point",
    "Calibration",
    "Decision curve",
    "Subgroups",
    "Model selection",
    "Limitations",
    "Provenance",
]
HOSTILE = "<script>alert(1)</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OPERATING_THRESHOLD = 0.2345
PREVALENCE = 0.12


def _metric(value: float, half_width: float = 0.02) -> dict[str, float]:
    return {"value": value, "ci_low": value - half_width, "ci_high": value + half_width}


def _decision_curve() -> list[dict[str, float]]:
    """Net benefit on a grid from a third of the operating threshold to three times it."""
    low, high = OPERATING_THRESHOLD / 3, OPERATING_THRESHOLD * 3
    grid = sorted({low + i * (high - low) / 49 for i in range(50)} | {OPERATING_THRESHOLD})
    curve = []
    for t in grid:
        odds = t / (1 - t)
        treat_all = PREVALENCE - (1 - PREVALENCE) * odds
        curve.append(
            {
                "threshold": t,
                "net_benefit": 0.09 - 0.3 * t,
                "net_benefit_all": treat_all,
                "net_benefit_none": 0.0,
            }
        )
    return curve


def _fit(**values: Any) -> dict[str, Any]:
    fit = {"rows": 246_913, "patients": 91_358, "events": 29_630, "level": 0.95, "notes": ""}
    for name, (value, low, high) in values.items():
        fit |= {name: value, f"{name}_low": low, f"{name}_high": high}
    return fit


def make_png(path: Path, width: int = 2, height: int = 2) -> Path:
    """A real (tiny, grey) PNG file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    path.write_bytes(
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )
    return path


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
        "split": {
            "test_assignment": "keyed SHA-256 hash of the pseudonymised patient id",
            "test_fraction": 0.2,
            "salt": "readmission",
            "test_rows": 246_913,
            "test_patients": 91_358,
            "temporal_holdout_months": 3,
            "temporal_rows": 61_000,
            "gap_days": 30,
            "gap_rows": 4_321,
        },
        "evaluation": {
            "test_rows": 246_913,
            "test_patients": 91_358,
            "positives": 29_630,
            "bootstrap": {"n_boot": 1000, "level": 0.95, "unit": "patient"},
            "metrics": {
                "roc_auc": _metric(0.8123),
                "average_precision": _metric(0.4412, 0.03),
                "sensitivity": _metric(0.7001),
                "specificity": _metric(0.7788),
                "brier": {"value": float("nan"), "ci_low": None, "ci_high": None},
                "ece": _metric(0.0101, 0.003),
                "alert_rate": _metric(0.2782, 0.004),
                "observed_expected": _metric(1.0123, 0.024),
            },
            "temporal_holdout": {
                "window_start": "2026-01-01T00:00:00+00:00",
                "window_end": "2026-03-31T00:00:00+00:00",
                "rows": 61_000,
                "roc_auc": _metric(0.7954),
                "sensitivity": _metric(0.6811),
                "calibration_fit": _fit(
                    intercept=(0.1544, 0.0412, 0.2676),
                    slope=(None, None, None),
                    observed_expected=(0.8766, 0.8412, 0.9135),
                )
                | {
                    "rows": 61_000,
                    "patients": 24_000,
                    "events": 7_320,
                    "notes": "slope fit did not converge",
                },
            },
            "operating_point": {
                "threshold": OPERATING_THRESHOLD,
                "rule": "sensitivity >= 0.7",
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
            "calibration_fit": _fit(
                intercept=(-0.0312, -0.0811, 0.0187),
                slope=(0.9213, 0.8862, 0.9564),
                observed_expected=(1.0123, 0.9876, 1.0371),
            ),
            "smoothed_calibration": [
                {"predicted": p, "observed": 0.95 * p, "low": 0.9 * p, "high": p}
                for p in (0.05, 0.15, 0.3, 0.5)
            ],
            "decision_curve": _decision_curve(),
            "ece_by_chance": 0.0042,
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
        "operating_point": {
            "rule": "sensitivity >= 0.7",
            "threshold": OPERATING_THRESHOLD,
            "chosen_on": "out-of-fold predictions of 987,654 training rows, so that the rule "
            "holds at its one-sided 95% confidence bound",
            "achieved": [
                {
                    "rows": "test",
                    "metric": "sensitivity",
                    "value": 0.7001,
                    "ci_low": 0.6801,
                    "ci_high": 0.7201,
                    "holds": True,
                    "text": "sensitivity 0.700 [0.680, 0.720] vs target 0.7 on 29,630 positives",
                },
                {
                    "rows": "temporal holdout",
                    "metric": "sensitivity",
                    "value": 0.6811,
                    "ci_low": 0.6611,
                    "ci_high": 0.7011,
                    "holds": False,
                    "text": "sensitivity 0.681 [0.661, 0.701] vs target 0.7 on 7,320 positives",
                },
            ],
        },
        "selection": {
            "selected": "gbm",
            "reference": "logreg",
            "best_other": "gbm",
            "scoring": "roc_auc",
            "gain": 0.0312,
            "gain_ci": [0.0187, 0.0441],
            "margin": 0.01,
            "rows": 987_654,
            "patients": 365_431,
            "reason": "gbm - logreg cross-validated roc_auc +0.0312 [+0.0187, +0.0441] on "
            "987,654 out-of-fold rows (365,431 patients): the lower bound is above the "
            "margin 0.01",
        },
        "candidates": [
            {"name": "svm", "metrics": {"roc_auc": 0.781, "average_precision": 0.39}},
            {
                "name": "gbm",
                "reference": False,
                "metrics": {
                    "cv_roc_auc": 0.8201,
                    "roc_auc": 0.812,
                    "roc_auc_ci_low": 0.7921,
                    "roc_auc_ci_high": 0.8323,
                    "average_precision": 0.44,
                },
                "selected": True,
            },
            {"name": "mlp", "metrics": {"roc_auc": 0.803}, "selected": False},
            {
                "name": "logreg",
                "reference": True,
                "selected": False,
                "metrics": {
                    "cv_roc_auc": 0.7889,
                    "roc_auc": 0.7812,
                    "roc_auc_ci_low": 0.7601,
                    "roc_auc_ci_high": 0.8023,
                },
            },
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
    assert "0.234" in operating and "<dd>sensitivity &gt;= 0.7</dd>" in operating
    assert re.search(r"Actual positive</th><td[^>]*>20,569</td><td[^>]*>8,765</td>", operating)
    assert re.search(r"Actual negative</th><td[^>]*>48,123</td><td[^>]*>169,456</td>", operating)
    assert "<dd>27.8</dd>" in operating  # alerts per 100, as in the achieved table
    assert re.search(r"0.100–0.300</td>.*100,000</td>.*0.180</td>.*0.171</td>", page)
    assert re.search(r'<tr class="selected"><td>gbm</td>', _section(page, "Model selection"))
    assert "Deaths after discharge" in _section(page, "Limitations")
    assert "scikit-learn" in _section(page, "Provenance")


def test_html_subgroups_show_every_metric_dash_for_missing_and_flag_large_gaps() -> None:
    subgroups = _section(render_html(make_card()), "Subgroups")
    header = re.search(r"<thead>(.*?)</thead>", subgroups, re.S).group(1).replace("<wbr>", "")
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


def test_a_wide_subgroup_table_fits_the_page_or_scrolls_within_it() -> None:
    """Headers break after underscores, and the table scrolls inside its own box
    instead of widening the page (issue 20)."""
    page = render_html(make_card())
    subgroups = _section(page, "Subgroups")
    assert re.search(r'<div class="table-scroll">\s*<table>', subgroups)
    assert "<th>gap_<wbr>roc_<wbr>auc</th>" in subgroups
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert re.search(r"\.table-scroll \{[^}]*max-width: 100%;[^}]*overflow-x: auto;", css)
    assert page.count('<div class="table-scroll">') == page.count("<table>")


def test_a_card_states_no_aliases_so_a_promoted_champion_reads_true(tmp_path: Path) -> None:
    """A card is written when its version becomes the challenger and never rewritten
    (it is hash-checked at load), so it must not say where aliases point (issue 20)."""
    card = make_card()
    assert card["model"]["aliases"] == ["challenger"]  # as registration hands it over
    json_path, html_path = write_card(card, tmp_path)

    written = json.loads(json_path.read_text())
    assert "aliases" not in written["model"]
    assert written["model"]["version"] == "7"
    page = html_path.read_text()
    assert "alias" not in page.lower() and "challenger" not in page.lower()
    subtitle = re.search(r'<p class="subtitle">(.*?)</p>', page).group(1)
    assert subtitle.startswith("candidate gbm · run 4f2a9c0d1e · created 2026-06-01")
    assert "alias" not in render_html(card).lower()  # an old card's aliases are not shown


def test_html_escapes_hostile_strings_and_loads_nothing_external(tmp_path: Path) -> None:
    card = make_card()
    card["use_case"]["intended_use"] = HOSTILE
    card["model"]["name"] = '"><img src=x onerror=alert(1)>'
    card["limitations"].append(HOSTILE)
    card["evaluation"]["metrics"][HOSTILE] = _metric(0.5)
    card["split"]["salt"] = HOSTILE
    card["operating_point"]["chosen_on"] = HOSTILE
    card["operating_point"]["achieved"][1] |= {"rows": HOSTILE, "text": HOSTILE}
    card["evaluation"]["calibration_fit"]["notes"] = HOSTILE
    card["selection"]["reason"] = HOSTILE
    card["candidates"][0]["name"] = HOSTILE
    page = render_html(card)

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in _section(page, "Intended use")
    assert "<script" not in page.lower()
    assert "<img" not in page and "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<li>&lt;script&gt;alert(1)&lt;/script&gt;</li>" in _section(page, "Limitations")
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in _section(page, "Evaluation")
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for heading, count in (
        ("Split", 1),
        ("Operating point", 4),  # chosen on; the missed rows in the flag and the table; text
        ("Calibration", 1),
        ("Model selection", 2),
    ):
        assert _section(page, heading).count(escaped) == count, heading
    # Self-contained: inline CSS, no scripts, nothing fetched from anywhere. The only
    # sources are our own figures, embedded as PNG data URIs.
    images = {
        "smoothed_calibration": make_png(tmp_path / "calibration.png"),
        "decision_curve": make_png(tmp_path / "decision.png"),
        "unknown_figure": make_png(tmp_path / "other.png"),
    }
    ordinary = render_html(make_card(), images)
    embedded = re.findall(
        r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="[^"<>]+">', ordinary
    )
    assert len(embedded) == 2  # a key training does not use is not embedded
    rest = ordinary
    for img in embedded:
        rest = rest.replace(img, "")
    rest = rest.lower()
    assert "<style>" in rest
    for external in ("<script", "http", "src=", "href=", "<link", "@import", "url(", "<img"):
        assert external not in rest


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
    for heading in ("Subgroups", "Calibration", "Operating point", "Model selection"):
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
    assert "operating threshold 0.234 (sensitivity >= 0.7)" in text
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


def _images(tmp_path: Path) -> dict[str, Path]:
    return {
        "smoothed_calibration": make_png(tmp_path / "smoothed_calibration.png", 3, 2),
        "decision_curve": make_png(tmp_path / "decision_curve.png", 2, 3),
    }


def _old_card() -> dict[str, Any]:
    """A card from before the split, selection, calibration fit and decision curve."""
    card = make_card()
    del card["split"], card["selection"], card["operating_point"]
    evaluation = card["evaluation"]
    for key in ("calibration_fit", "smoothed_calibration", "decision_curve", "ece_by_chance"):
        del evaluation[key]
    del evaluation["temporal_holdout"]["calibration_fit"]
    return card


def test_split_section_says_how_test_patients_are_assigned_and_the_holdout_gap() -> None:
    split = _section(render_html(make_card()), "Split")
    assert "keyed SHA-256 hash of the pseudonymised patient id" in split
    assert "no patient moves between training and test" in split
    assert "<dd>20%</dd>" in split and "<code>readmission</code>" in split
    assert "<dd>246,913</dd>" in split and "<dd>91,358</dd>" in split
    assert "the last 3 months: 61,000 rows" in split
    assert "30 days between training and the holdout: 4,321 rows used for neither" in split

    card = make_card()
    card["split"] |= {"temporal_holdout_months": None, "temporal_rows": 0, "gap_days": None}
    card["evaluation"]["temporal_holdout"] = None
    page = render_html(card)
    assert "<dt>Temporal holdout</dt><dd>none</dd>" in _section(page, "Split")
    assert "<dt>Gap</dt><dd>none</dd>" in _section(page, "Split")
    # No holdout configured is "none", not "not recorded".
    holdout = _section(page, "Evaluation").split("Temporal holdout")[1]
    assert "none (no temporal holdout configured)" in holdout and "not recorded" not in holdout


def test_evaluation_lists_the_new_metrics_and_keeps_the_holdout_fit_out_of_its_table() -> None:
    evaluation = _section(render_html(make_card()), "Evaluation")
    assert "(29,630 positives)" in evaluation
    assert re.search(r"<td>alert_rate</td><td[^>]*>0.278</td><td[^>]*>0.274–0.282</td>", evaluation)
    assert re.search(
        r"<td>observed_expected</td><td[^>]*>1.012</td><td[^>]*>0.988–1.036</td>", evaluation
    )
    assert "calibration_fit" not in evaluation


def test_operating_point_shows_how_it_was_chosen_and_flags_a_missed_rule() -> None:
    operating = _section(render_html(make_card()), "Operating point")
    assert "one-sided 95% confidence bound" in operating
    assert "<th>Rule holds</th>" in operating and "<th>95% CI</th>" in operating
    rows = re.findall(r"<tr[^>]*>.*?</tr>", operating.split("Does the rule hold")[1], re.S)
    _, test, temporal = rows
    assert "<td>test</td><td>sensitivity</td>" in test
    assert '<td class="num">0.700</td><td class="num">0.680–0.720</td><td>yes</td>' in test
    assert "rule-missed" not in test
    assert temporal.startswith('<tr class="rule-missed">')
    assert '0.681</td><td class="num">0.661–0.701</td><td class="gap-worse">no — missed</td>' in (
        temporal
    )
    assert '<p class="flag">The rule is missed on the temporal holdout rows' in operating


def test_operating_point_shows_an_alert_budget_per_100_and_a_fixed_threshold_as_a_dash() -> None:
    card = make_card()
    card["operating_point"]["achieved"] = [
        {
            "rows": "test",
            "metric": "alert_rate",
            "value": 0.142,
            "ci_low": 0.131,
            "ci_high": 0.153,
            "holds": None,
            "text": "fixed threshold 0.2345",
        }
    ]
    operating = _section(render_html(card), "Operating point")
    assert (
        '<td>alerts per 100 patients</td><td class="num">14.2</td>'
        '<td class="num">13.1–15.3</td><td>—</td>'
    ) in operating
    assert 'class="flag"' not in operating and "rule-missed" not in operating


def test_alerts_and_net_benefit_are_counted_in_the_spec_s_row_noun() -> None:
    """A no-show model's budget is per 100 appointments, not per 100 patients (a patient
    has several): the card's summary, operating point and decision curve say which."""
    card = make_card()
    card["operating_point"] |= {
        "rule": "at most 10 alerts per 100 appointments",
        "row_noun": "appointments",
        "achieved": [
            {
                "rows": "test",
                "metric": "alert_rate",
                "value": 0.094,
                "ci_low": 0.088,
                "ci_high": 0.1,
                "holds": True,
            },
        ],
    }
    page = render_html(card)
    operating = _section(page, "Operating point")
    assert "<dt>Alerts per 100 appointments (test)</dt>" in operating
    assert "<td>alerts per 100 appointments</td>" in operating
    assert "10 true positives per 100 appointments" in _section(page, "Decision curve")
    lines = card_summary(card)
    assert any(
        line.startswith("operating point on test: 9.4 [8.8, 10.0] alerts per 100 appointments")
        for line in lines
    ), lines
    assert "patients" not in " ".join(line for line in lines if "alerts per 100" in line)


def test_calibration_shows_intercept_slope_and_oe_with_intervals_ideals_and_notes() -> None:
    calibration = _section(render_html(make_card()), "Calibration")
    assert "intercept 0" in calibration and "slope 1" in calibration
    header = re.search(r"<thead>(.*?)</thead>", calibration, re.S).group(1)
    assert header == (
        "<tr><th>Measure</th><th>Ideal</th><th>Test</th><th>95% CI</th>"
        "<th>Temporal holdout</th><th>95% CI</th></tr>"
    )
    intercept, slope, ratio = re.findall(
        r"<tr><td>[^<]*</td>.*?</tr>", calibration.split("<tbody>")[1].split("</tbody>")[0]
    )
    # A negative bound reads "to", not a dash; an interval excluding the ideal is flagged.
    assert '<td class="num">0</td><td class="num">-0.031</td>' in intercept
    assert '<td class="num">-0.081 to 0.019</td>' in intercept
    assert '<td class="num">0.154</td><td class="num gap-worse">0.041–0.268</td>' in intercept
    assert '<td class="num">0.921</td><td class="num gap-worse">0.886–0.956</td>' in slope
    assert '<td class="num">—</td><td class="num">—</td>' in slope  # not estimable
    assert '<td class="num">1.012</td><td class="num">0.988–1.037</td>' in ratio
    assert '<td class="num gap-worse">0.841–0.913</td>' in ratio
    assert "Test: 246,913 rows, 91,358 patients, 29,630 events." in calibration
    assert "Notes: slope fit did not converge." in calibration
    assert "0.010" in calibration and "0.004 on rows like these by chance" in calibration
    # The curve comes before the binned table, which is kept.
    assert calibration.index("Smoothed calibration curve") < calibration.index("<h3>Binned</h3>")
    assert "Figure: <span" in calibration  # rendered without images: noted, not a crash


def test_decision_curve_tabulates_net_benefit_around_the_operating_threshold() -> None:
    decision = _section(render_html(make_card()), "Decision curve")
    assert "Net benefit is the true positives minus the false positives" in decision
    rows = re.findall(r"<tr[^>]*>.*?</tr>", decision.split("<tbody>")[1], re.S)
    assert len(rows) == 5
    thresholds = [float(re.search(r"<td[^>]*>([0-9.]+)", row).group(1)) for row in rows]
    assert thresholds == sorted(thresholds)
    assert thresholds[0] < OPERATING_THRESHOLD < thresholds[-1]
    operating = rows[2]
    treat_all = PREVALENCE - (1 - PREVALENCE) * OPERATING_THRESHOLD / (1 - OPERATING_THRESHOLD)
    assert operating.startswith('<tr class="operating"><td class="num">0.234 (operating)</td>')
    assert f'<td class="num">{0.09 - 0.3 * OPERATING_THRESHOLD:.3f}</td>' in operating
    assert f'<td class="num">{treat_all:.3f}</td>' in operating
    assert operating.endswith("<td>yes</td></tr>")
    assert rows[-1].endswith("<td>no</td></tr>")  # treating none beats the model there


def test_model_selection_gives_the_reason_marks_the_reference_and_highlights_the_choice() -> None:
    selection = _section(render_html(make_card()), "Model selection")
    assert "the lower bound is above the margin 0.01" in selection
    assert "lower 95% bound above the margin" in selection  # the rule, stated
    assert "+0.0312 (95% CI +0.0187 to +0.0441) in cross-validated roc_auc" in selection
    assert "987,654 out-of-fold rows, 365,431 patients" in selection
    assert "<dt>Margin</dt><dd>0.01</dd>" in selection
    header = re.search(r"<thead>(.*?)</thead>", selection, re.S).group(1).replace("<wbr>", "")
    assert "<th>roc_auc 95% CI</th>" in header and "roc_auc_ci_low" not in header
    assert re.search(
        r'<tr class="selected"><td>gbm</td><td>best other, selected</td>'
        r'<td class="num">0.820</td><td class="num">0.812</td><td class="num">0.792–0.832</td>'
        r'<td class="num">0.440</td></tr>',
        selection,
    )
    assert '<tr class="reference"><td>logreg</td><td>reference</td>' in selection
    assert "<tr><td>svm</td><td></td>" in selection


def test_images_are_embedded_as_png_data_uris_and_kept_out_of_the_json(tmp_path: Path) -> None:
    images = _images(tmp_path)
    json_path, html_path = write_card(make_card(), tmp_path / "card", images)
    page = html_path.read_text(encoding="utf-8")

    for key, heading in (
        ("smoothed_calibration", "Calibration"),
        ("decision_curve", "Decision curve"),
    ):
        found = re.search(
            r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', _section(page, heading)
        )
        assert found, key
        data = base64.b64decode(found.group(1), validate=True)
        assert data.startswith(PNG_SIGNATURE) and data == images[key].read_bytes()
        assert len(found.group(2)) > 40  # alt text says what the figure shows
    text = json_path.read_text(encoding="utf-8")
    assert "base64" not in text and "image/png" not in text and "iVBORw0KGgo" not in text
    assert page == render_html(json.loads(text), images)


def test_a_missing_or_garbage_image_is_skipped_with_a_note(tmp_path: Path) -> None:
    garbage = tmp_path / "decision_curve.png"
    garbage.write_bytes(b"GIF89a not a png at all")
    images = {"smoothed_calibration": tmp_path / "nowhere.png", "decision_curve": garbage}
    _, html_path = write_card(make_card(), tmp_path / "card", images)
    page = html_path.read_text(encoding="utf-8")

    assert "<img" not in page
    calibration, decision = _section(page, "Calibration"), _section(page, "Decision curve")
    assert (
        'Figure: <span class="missing">not recorded</span> (the image file could not be read)'
        in (calibration)
    )
    assert "not recorded</span> (the image file is not a PNG)" in decision
    assert str(tmp_path) not in page  # no machine paths in the page


def test_an_old_card_renders_every_new_part_as_not_recorded(tmp_path: Path) -> None:
    page = render_html(_old_card(), _images(tmp_path))

    assert all(f"<h2>{heading}</h2>" in page for heading in SECTIONS)
    assert "not recorded" in _section(page, "Split")
    operating = _section(page, "Operating point")
    assert (
        '<dt>How the threshold was chosen</dt><dd><span class="missing">not recorded' in operating
    )
    assert "20,569" in operating  # the older operating point is still shown
    assert "not recorded" in operating.split("Does the rule hold")[1]
    calibration = _section(page, "Calibration")
    fit = calibration.split("<h3>Smoothed calibration curve</h3>")[0]
    assert "not recorded" in fit and "<table>" not in fit
    assert "0.100–0.300" in calibration  # the binned table is kept
    decision = _section(page, "Decision curve")
    assert 'Net benefit table: <span class="missing">not recorded</span>' in decision
    selection = _section(page, "Model selection")
    assert 'Selection rule and reason: <span class="missing">not recorded</span>' in selection
    assert '<tr class="selected"><td>gbm</td>' in selection
    lines = card_summary(_old_card())
    assert "operating point achieved: not recorded" in lines
    assert "calibration on test: not recorded" in lines
    assert "calibration on temporal holdout: not recorded" in lines
    assert "selection: not recorded" in lines


def test_card_summary_has_selection_calibration_and_the_rule_achieved_per_held_out_set() -> None:
    lines = card_summary(make_card())
    assert (
        "operating point on test: sensitivity 0.700 [0.680, 0.720] "
        "(rule: sensitivity >= 0.7) — holds"
    ) in lines
    assert (
        "operating point on temporal holdout: sensitivity 0.681 [0.661, 0.701] "
        "(rule: sensitivity >= 0.7) — MISSED, review"
    ) in lines
    assert (
        "calibration on test: intercept -0.031 [-0.081, 0.019], slope 0.921 [0.886, 0.956], "
        "O/E 1.012 [0.988, 1.037] (ideal 0, 1, 1)"
    ) in lines
    assert (
        "calibration on temporal holdout: intercept 0.154 [0.041, 0.268], slope — [—, —], "
        "O/E 0.877 [0.841, 0.913] (ideal 0, 1, 1)"
    ) in lines
    selected = next(line for line in lines if line.startswith("selected "))
    assert selected.startswith("selected gbm: gbm - logreg cross-validated roc_auc +0.0312")
    net = next(line for line in lines if line.startswith("net benefit"))
    model = 0.09 - 0.3 * OPERATING_THRESHOLD
    assert f"model {model:.3f}" in net and "above treat-all and treat-none" in net
    assert lines[-1].startswith("trained on")

    card = make_card()
    card["operating_point"] |= {"rule": "at most 15 alerts per 100 patients"}
    card["operating_point"]["achieved"] = [
        {
            "rows": "test",
            "metric": "alert_rate",
            "value": 0.142,
            "ci_low": 0.131,
            "ci_high": 0.153,
            "holds": True,
        },
    ]
    del card["selection"]["reason"]
    lines = card_summary(card)
    assert (
        "operating point on test: 14.2 [13.1, 15.3] alerts per 100 patients "
        "(rule: at most 15 alerts per 100 patients) — holds"
    ) in lines
    assert (
        "selected gbm: gain of gbm over the reference +0.0312 [+0.0187, +0.0441], margin 0.01"
        in lines
    )
