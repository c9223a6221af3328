"""Model cards: the reviewer-facing record of what a registered model is and how it did.

The card itself is a JSON-serialisable dict assembled by the training stage; this module
only renders and writes it:

- ``write_card(card, out_dir, images)`` writes ``model_card.json`` and ``model_card.html``;
- ``render_html(card, images)`` is the HTML page alone: one self-contained file (inline
  CSS, no scripts, no external assets; the figures in ``FIGURES`` embedded as PNG data
  URIs) that can be attached to a change request or opened offline;
- ``card_summary(card)`` is a few plain lines for the terminal after training.

The page reads in the order a reviewer asks (TRIPOD+AI): intended use, training data, how
the test patients were split off, evaluation, the operating point and whether its rule
holds on held-out rows, calibration, decision curve, subgroups, model selection,
limitations, provenance.

Rendering never fails on a missing key: whatever the card lacks is shown as
"not recorded", so a card from an older run still renders; an image file that is missing
or not a PNG is left out with a note. Every string from the card is HTML-escaped. A
subgroup's gap is its metric minus the overall value; every primary metric a spec may name
is higher-is-better, so a gap below ``GAP_WARNING`` is flagged.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from clinml.atomic import write_atomic
from clinml.errors import ClinmlError

NOT_RECORDED = "not recorded"
NO_VALUE = "—"
# A subgroup whose primary metric trails the overall value by more than this is flagged.
GAP_WARNING = -0.05
CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"
# The figures training hands to ``write_card`` (key -> alt text); other keys are ignored.
FIGURES = {
    "smoothed_calibration": (
        "Smoothed calibration curves on the test rows: observed risk against predicted risk "
        "for the selected model and the reference model, beside the ideal diagonal."
    ),
    "decision_curve": (
        "Decision curves on the test rows: net benefit against threshold risk for the "
        "selected model and the reference model, with treating all and treating none."
    ),
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ideal values of the calibration fit, as (key, label, ideal).
_CALIBRATION_FIT = (
    ("intercept", "Calibration intercept (in the large)", 0.0),
    ("slope", "Calibration slope", 1.0),
    ("observed_expected", "Observed / expected events", 1.0),
)

# Subgroup keys that describe the group; every other key is a metric or a gap_<metric>.
_SUBGROUP_KEYS = ("attribute", "group", "n", "positives", "prevalence", "evaluated")
_TEMPORAL_KEYS = ("window_start", "window_end", "rows", "calibration_fit")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

# The page, headings and tables of clinml's HTML reports (the model card, the monitor's
# performance report).
PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 60rem; padding: 0 1rem; color: #1f2933; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #cbd2d9; padding-bottom: 0.2rem; margin-top: 2rem; }
.subtitle { color: #52606d; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; display: block; max-width: 100%;
        overflow-x: auto; }
th, td { border: 1px solid #cbd2d9; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""
_CSS = (
    PAGE_CSS
    + """.table-scroll { max-width: 100%; overflow-x: auto; margin: 0.5rem 0 1rem; }
.table-scroll table { display: table; margin: 0; }
td.num { white-space: nowrap; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; }
.missing { color: #9aa5b1; font-style: italic; }
td.gap-worse { background: #fde8e8; color: #9b1c1c; font-weight: 600; }
tr.gap-worse td:first-child { border-left: 3px solid #9b1c1c; }
tr.selected td { background: #e3f8e9; }
tr.not-evaluated td { color: #9aa5b1; }
tr.reference td:first-child { font-style: italic; }
tr.operating td { font-weight: 600; }
tr.rule-missed td:first-child { border-left: 3px solid #9b1c1c; }
p.flag { color: #9b1c1c; font-weight: 600; }
figure { margin: 0.5rem 0 1rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #cbd2d9; }
figcaption { color: #52606d; font-size: 0.9em; }
code { font-size: 0.9em; word-break: break-all; }
"""
)


class CardError(ClinmlError):
    """A model card could not be written."""


# Registry state that changes after a card is written and hash-checked (a promotion or a
# rollback moves the aliases), so a card never states it: `clinml models list` and
# `clinml models show` give the current aliases.
VOLATILE_MODEL_KEYS = ("aliases",)


def _without_volatile(card: Any) -> Any:
    if not isinstance(card, dict) or not isinstance(card.get("model"), dict):
        return card
    model = {k: v for k, v in card["model"].items() if k not in VOLATILE_MODEL_KEYS}
    return {**card, "model": model}


def write_card(
    card: dict[str, Any], out_dir: Path, images: dict[str, Path] | None = None
) -> tuple[Path, Path]:
    """Write the card as ``model_card.json`` and ``model_card.html`` in ``out_dir``.

    NaN and infinite floats become ``null`` in the JSON (they are not JSON). The images are
    embedded in the HTML only, never in the JSON. Registry state that moves after the card
    is written (``VOLATILE_MODEL_KEYS``: the aliases) is left out of both, so the card of a
    promoted or rolled-back version still reads true. Each file is written under a temporary
    name and renamed, so a reader never sees half a card.

    Args:
        card: the model card (see the module docstring).
        out_dir: the directory to write to; created if missing.
        images: PNG files by figure key (see ``FIGURES``); a missing or non-PNG file is
            left out of the page with a note.

    Returns:
        ``(json_path, html_path)``.

    Raises:
        CardError: the card holds a value JSON cannot represent, or the files could not
            be written.
    """
    clean = _without_volatile(_finite(card))
    try:
        text = json.dumps(clean, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CardError(f"model card is not JSON-serialisable: {exc}") from exc
    page = render_html(clean, images)
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / CARD_JSON, out_dir / CARD_HTML
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(json_path, text + "\n")
        write_atomic(html_path, page)
    except OSError as exc:
        raise CardError(f"cannot write the model card to {out_dir}: {exc.strerror}") from exc
    return json_path, html_path


def render_html(card: dict[str, Any], images: dict[str, Path] | None = None) -> str:
    """The card as one self-contained HTML page (inline CSS, no scripts, no assets).

    Args:
        card: the model card; any missing part is rendered as "not recorded".
        images: PNG files by figure key (see ``FIGURES``), embedded as data URIs; a
            missing or non-PNG file is left out with a note.

    Returns:
        The page, with every string from the card HTML-escaped.
    """
    card = _dict(card)
    figures = _figures(images)
    title = _title(card)
    model = _dict(card.get("model"))
    # No aliases: they move after the card is written (VOLATILE_MODEL_KEYS).
    subtitle = (
        f"candidate {_cell(model.get('candidate'))} · run {_cell(model.get('run_id'))} · "
        f"created {_cell(model.get('created'))}"
    )
    sections = [
        _intended_use_section(card),
        _training_data_section(card),
        _split_section(card),
        _evaluation_section(card),
        _operating_point_section(card),
        _calibration_section(card, figures["smoothed_calibration"]),
        _decision_curve_section(card, figures["decision_curve"]),
        _subgroups_section(card),
        _selection_section(card),
        _limitations_section(card),
        _provenance_section(card),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>Model card: {_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_esc(title)}</h1>",
            f'<p class="subtitle">{subtitle}</p>',
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )


def card_summary(card: dict[str, Any]) -> list[str]:
    """A few plain-text lines about the card, for the terminal.

    Args:
        card: the model card; missing parts read "not recorded".

    Returns:
        Lines naming the model and candidate, the primary metric with its confidence
        interval, the operating point and whether its rule holds on each held-out set,
        the calibration intercept, slope and observed/expected with their intervals, the
        worst evaluated subgroup gap in the primary metric, why the model was selected,
        and the training window and size.
    """
    card = _dict(card)
    model = _dict(card.get("model"))
    evaluation = _dict(card.get("evaluation"))
    training = _dict(card.get("training_data"))
    operating = _dict(evaluation.get("operating_point"))
    primary = evaluation.get("primary_metric")
    primary = primary if isinstance(primary, str) else None  # a key of the metrics
    level = _dict(evaluation.get("bootstrap")).get("level")

    lines = [f"{_title(card)} — candidate {_plain(model.get('candidate'))}"]
    result = _dict(_dict(evaluation.get("metrics")).get(primary))
    if primary is None or not result:
        lines.append(f"primary metric: {NOT_RECORDED}")
    else:
        lines.append(
            f"{_plain(primary)}: {_number(result.get('value'))} ({_level(level)} CI "
            f"{_interval(result.get('ci_low'), result.get('ci_high'))}) on "
            f"{_plain(evaluation.get('test_rows'))} held-out rows, "
            f"{_plain(evaluation.get('test_patients'))} patients"
        )
    lines.append(
        f"operating threshold {_number(operating.get('threshold'))} "
        f"({_plain(operating.get('rule'))}), "
        f"{_fixed(operating.get('alerts_per_100'), 1)} alerts per 100 {_row_noun(card)}"
    )
    lines += _achieved_lines(card)
    lines += _calibration_lines(evaluation)
    lines.append(_decision_line(evaluation, operating.get("threshold")))
    worst = _worst_subgroup(evaluation.get("subgroups"), primary)
    if worst is None:
        lines.append(f"worst subgroup gap in {_plain(primary)}: no subgroup evaluated")
    else:
        gap = worst[f"gap_{primary}"]
        flag = f" — below {GAP_WARNING:+.2f}, review" if gap < GAP_WARNING else ""
        lines.append(
            f"worst subgroup: {_plain(worst.get('attribute'))} = {_plain(worst.get('group'))}, "
            f"{_plain(primary)} {_number(worst.get(primary))} (gap {_signed(gap)}, "
            f"n={_plain(worst.get('n'))}){flag}"
        )
    lines.append(_selection_line(card))
    lines.append(
        f"trained on {_plain(training.get('rows'))} rows, "
        f"{_plain(training.get('patients'))} patients, "
        f"{_plain(training.get('positives'))} positives, "
        f"{_plain(training.get('window_start'))} to {_plain(training.get('window_end'))}"
    )
    # Numbers are formatted with _number, which passes a string from the card through.
    return [_CONTROL_CHARACTERS.sub("", line) for line in lines]


def _achieved_lines(card: dict[str, Any]) -> list[str]:
    """One line per held-out set: the rule's value with its interval, and whether it holds."""
    point = _dict(card.get("operating_point"))
    achieved = [_dict(a) for a in _list(point.get("achieved")) or []]
    if not achieved:
        return [f"operating point achieved: {NOT_RECORDED}"]
    rule = _first(
        point.get("rule"), _dict(_dict(card.get("evaluation")).get("operating_point")).get("rule")
    )
    lines = []
    for row in achieved:
        value, low, high = _achieved_values(row)
        measure = f"{value} [{low}, {high}]"
        if row.get("metric") == "alert_rate":
            measure += f" alerts per 100 {_row_noun(card)}"
        else:
            measure = f"{_plain(row.get('metric'))} {measure}"
        holds = row.get("holds")
        verdict = (
            "holds" if holds is True else "MISSED, review" if holds is False else "no rule to meet"
        )
        lines.append(
            f"operating point on {_plain(row.get('rows'))}: {measure} "
            f"(rule: {_plain(rule)}) — {verdict}"
        )
    return lines


def _calibration_lines(evaluation: dict[str, Any]) -> list[str]:
    """Intercept, slope and O/E with intervals, for the test rows and the temporal holdout."""
    holdout = evaluation.get("temporal_holdout")
    fits = [("test", _dict(evaluation.get("calibration_fit")))]
    if isinstance(holdout, dict):
        fits.append(("temporal holdout", _dict(holdout.get("calibration_fit"))))
    lines = []
    for name, fit in fits:
        if not fit:
            lines.append(f"calibration on {name}: {NOT_RECORDED}")
            continue
        parts = [
            f"{label} {_number(fit.get(key))} "
            f"[{_number(fit.get(f'{key}_low'))}, {_number(fit.get(f'{key}_high'))}]"
            for key, label in (
                ("intercept", "intercept"),
                ("slope", "slope"),
                ("observed_expected", "O/E"),
            )
        ]
        lines.append(f"calibration on {name}: {', '.join(parts)} (ideal 0, 1, 1)")
    return lines


def _decision_line(evaluation: dict[str, Any], threshold: Any) -> str:
    """Net benefit of the model against treat-all at the operating threshold (test rows)."""
    points = [_dict(row) for row in _list(evaluation.get("decision_curve")) or []]
    at = [row for row in points if _is_number(row.get("threshold"))]
    if not at or not _is_number(threshold):
        return f"net benefit at the operating threshold: {NOT_RECORDED}"
    row = min(at, key=lambda r: abs(r["threshold"] - threshold))
    model, everyone = row.get("net_benefit"), row.get("net_benefit_all")
    verdict = (
        "above treat-all and treat-none"
        if _is_number(model) and _is_number(everyone) and model > max(everyone, 0.0)
        else "NOT above both defaults, review"
    )
    return (
        f"net benefit at threshold {_number(row['threshold'])} on test: model "
        f"{_number(model)}, treat all {_number(everyone)}, treat none 0 — {verdict}"
    )


def _selection_line(card: dict[str, Any]) -> str:
    selection = _dict(card.get("selection"))
    if not selection:
        return f"selection: {NOT_RECORDED}"
    reason = selection.get("reason")
    if reason is None:
        low, high = _pair(selection.get("gain_ci"))
        reason = (
            f"gain of {_plain(selection.get('best_other'))} over the reference "
            f"{_signed(selection.get('gain'), 4)} [{_signed(low, 4)}, {_signed(high, 4)}], "
            f"margin {_general(selection.get('margin'))}"
        )
    return f"selected {_plain(selection.get('selected'))}: {_plain(reason)}"


# -- sections ---------------------------------------------------------------------------


def _title(card: dict[str, Any]) -> str:
    model = _dict(card.get("model"))
    name, version = _plain(model.get("name")), model.get("version")
    return f"{name} v{_plain(version)}" if version is not None else f"{name} (unregistered)"


def _intended_use_section(card: dict[str, Any]) -> str:
    use_case = _dict(card.get("use_case"))
    body = _definitions(
        [
            ("Use case", use_case.get("name")),
            ("Description", use_case.get("description")),
            ("Intended use", use_case.get("intended_use")),
            ("Predicts", use_case.get("label")),
        ]
    )
    out_of_scope = _bullets(_list(use_case.get("out_of_scope_use")))
    return _section("Intended use", f"{body}\n<h3>Out of scope</h3>\n{out_of_scope}")


def _training_data_section(card: dict[str, Any]) -> str:
    data = _dict(card.get("training_data"))
    features = _list(data.get("features"))
    rows, positives = data.get("rows"), data.get("positives")
    prevalence = positives / rows if _is_count(rows) and _is_count(positives) and rows else None
    window = f"{_cell(data.get('window_start'))} to {_cell(data.get('window_end'))}"
    body = _definitions(
        [
            ("Window", _Raw(window)),
            ("Rows", rows),
            ("Patients", data.get("patients")),
            ("Positives", positives),
            ("Prevalence", prevalence),
            ("Feature service", data.get("feature_service")),
            ("Data fingerprint", _Raw(f"<code>{_cell(data.get('data_fingerprint'))}</code>")),
            (
                "Features" if features is None else f"Features ({len(features):,})",
                _Raw(_inline_list(features)),
            ),
        ]
    )
    return _section("Training data", body)


def _split_section(card: dict[str, Any]) -> str:
    split = _dict(card.get("split"))
    if not split:
        return _section("Split", f"<p>{_missing()}</p>")
    assignment = split.get("test_assignment")
    explanation = (
        f"<p>Test patients are chosen by a {_esc(_text(assignment))}: a patient's side "
        "depends on that patient alone, so as data grow no patient moves between training "
        "and test, and every retrain and every candidate is tested on the same patients.</p>"
        if assignment is not None
        else ""
    )
    months = split.get("temporal_holdout_months")
    if months is not None:
        holdout = _Raw(
            f"the last {_esc(_general(months))} months: {_cell(split.get('temporal_rows'))} rows"
        )
        gap = _Raw(
            f"{_days(split.get('gap_days'))} between training and the holdout: "
            f"{_cell(split.get('gap_rows'))} rows used for neither"
        )
    else:
        holdout = _Raw("none" if "temporal_holdout_months" in split else _missing())
        gap = _Raw("none" if "gap_days" in split else _missing())
    body = _definitions(
        [
            ("Test assignment", assignment),
            ("Test share", _Raw(_percent(split.get("test_fraction")))),
            ("Salt (hash key)", _Raw(f"<code>{_cell(split.get('salt'))}</code>")),
            ("Test rows", split.get("test_rows")),
            ("Test patients", split.get("test_patients")),
            ("Temporal holdout", holdout),
            ("Gap", gap),
        ]
    )
    return _section("Split", f"{explanation}\n{body}")


def _evaluation_section(card: dict[str, Any]) -> str:
    evaluation = _dict(card.get("evaluation"))
    bootstrap = _dict(evaluation.get("bootstrap"))
    level = bootstrap.get("level")
    parts = [
        f"<p>Held out: {_cell(evaluation.get('test_rows'))} rows from "
        f"{_cell(evaluation.get('test_patients'))} patients"
        f"{_positives(evaluation.get('positives'))}. Confidence intervals: "
        f"{_esc(_level(level))}, {_cell(bootstrap.get('n_boot'))} bootstrap resamples by "
        f"{_cell(bootstrap.get('unit'))}. Primary metric: "
        f"<strong>{_cell(evaluation.get('primary_metric'))}</strong>.</p>",
        _metrics_table(evaluation.get("metrics"), level),
        "<h3>Temporal holdout</h3>",
    ]
    holdout = evaluation.get("temporal_holdout")
    if isinstance(holdout, dict):
        parts.append(
            f"<p>Later data: {_cell(holdout.get('window_start'))} to "
            f"{_cell(holdout.get('window_end'))}, {_cell(holdout.get('rows'))} rows.</p>"
        )
        metrics = holdout.get("metrics")
        if not isinstance(metrics, dict):  # the metrics sit beside the window keys
            metrics = {k: v for k, v in holdout.items() if k not in _TEMPORAL_KEYS}
        parts.append(_metrics_table(metrics, level))
    else:
        parts.append(f"<p>{_no_holdout(card)}</p>")
    return _section("Evaluation", "\n".join(parts))


def _metrics_table(metrics: Any, level: Any) -> str:
    if not isinstance(metrics, dict) or not metrics:
        return f"<p>{_missing()}</p>"
    rows = []
    for name, result in metrics.items():
        result = _dict(result)
        rows.append(
            [
                _td(name),
                _num_td(result.get("value")),
                _td(_interval(result.get("ci_low"), result.get("ci_high")), "num"),
            ]
        )
    return _table(["Metric", "Value", f"{_level(level)} CI"], rows)


def _operating_point_section(card: dict[str, Any]) -> str:
    evaluation = _dict(card.get("evaluation"))
    at_test = _dict(evaluation.get("operating_point"))
    point = _dict(card.get("operating_point"))
    if not at_test and not point:
        return _section("Operating point", f"<p>{_missing()}</p>")
    confusion = _dict(at_test.get("confusion"))
    alerts = at_test.get("alerts_per_100")
    body = _definitions(
        [
            ("Rule", _first(point.get("rule"), at_test.get("rule"))),
            ("Threshold", _first(point.get("threshold"), at_test.get("threshold"))),
            ("How the threshold was chosen", point.get("chosen_on")),
            (
                f"Alerts per 100 {_row_noun(card)} (test)",
                _Raw(_fixed(alerts, 1)) if _is_number(alerts) else alerts,
            ),
        ]
    )
    matrix = _table(
        ["", "Predicted positive", "Predicted negative"],
        [
            [_th("Actual positive"), _num_td(confusion.get("tp")), _num_td(confusion.get("fn"))],
            [_th("Actual negative"), _num_td(confusion.get("fp")), _num_td(confusion.get("tn"))],
        ],
    )
    level = _dict(evaluation.get("bootstrap")).get("level")
    parts = [
        body,
        "<h3>Test rows at this threshold</h3>",
        matrix,
        "<h3>Does the rule hold on held-out rows?</h3>",
        _achieved_table(_list(point.get("achieved")), level, _row_noun(card)),
    ]
    return _section("Operating point", "\n".join(parts))


def _achieved_table(achieved: list[Any] | None, level: Any, row_noun: str) -> str:
    rows_ = [_dict(a) for a in achieved or []]
    if not rows_:
        return f"<p>{_missing()}</p>"
    rows, classes, missed = [], [], []
    for row in rows_:
        value, low, high = _achieved_values(row)
        holds = row.get("holds")
        if holds is False:
            missed.append(_text(row.get("rows")))
        rows.append(
            [
                _td(_text(row.get("rows"))),
                _td(_achieved_unit(row.get("metric"), row_noun)),
                _td(value, "num"),
                _td(_interval_text(low, high), "num"),
                _td(_holds_text(holds), "gap-worse" if holds is False else ""),
                _td(_text(row.get("text"), missing="")),
            ]
        )
        classes.append("rule-missed" if holds is False else "")
    parts = []
    if missed:
        parts.append(
            f'<p class="flag">The rule is missed on the {_esc(" and ".join(missed))} rows: '
            "this threshold does not deliver what the rule promises there; review before use.</p>"
        )
    parts.append(
        _table(
            ["Rows", "Measure", "Value", f"{_level(level)} CI", "Rule holds", "Detail"],
            rows,
            classes,
        )
    )
    parts.append(
        "<p>Rule holds: whether the value on these rows meets the rule; a dash when the "
        "threshold is fixed and there is no rule to meet.</p>"
    )
    return "\n".join(parts)


def _calibration_section(card: dict[str, Any], figure: str) -> str:
    evaluation = _dict(card.get("evaluation"))
    parts = ["<h3>Intercept, slope and observed/expected</h3>", _calibration_fit_table(card)]
    ece = _dict(_dict(evaluation.get("metrics")).get("ece")).get("value")
    by_chance = evaluation.get("ece_by_chance")
    if _is_number(ece) and _is_number(by_chance):
        parts.append(
            f"<p>Expected calibration error on the test rows: {_esc(_number(ece))}. A "
            "perfectly calibrated model would show up to "
            f"{_esc(_number(by_chance))} on rows like these by chance alone (95th "
            "percentile), so an ECE below that cannot be told apart from noise.</p>"
        )
    parts += ["<h3>Smoothed calibration curve</h3>", figure]
    bins = [_dict(b) for b in _list(evaluation.get("calibration")) or []]
    parts.append("<h3>Binned</h3>")
    if bins:
        rows = [
            [
                _td(_interval(b.get("lower"), b.get("upper")), "num"),
                _num_td(b.get("n")),
                _num_td(b.get("mean_predicted")),
                _num_td(b.get("observed_rate")),
            ]
            for b in bins
        ]
        parts.append(_table(["Predicted risk", "Rows", "Mean predicted", "Observed rate"], rows))
    else:
        parts.append(f"<p>{_missing()}</p>")
    return _section("Calibration", "\n".join(parts))


def _calibration_fit_table(card: dict[str, Any]) -> str:
    evaluation = _dict(card.get("evaluation"))
    holdout = evaluation.get("temporal_holdout")
    sets = [("Test", _dict(evaluation.get("calibration_fit")))]
    if isinstance(holdout, dict):
        sets.append(("Temporal holdout", _dict(holdout.get("calibration_fit"))))
    if not any(fit for _, fit in sets):
        return f"<p>{_missing()}</p>"
    level = _first(
        *(fit.get("level") for _, fit in sets),
        _dict(evaluation.get("bootstrap")).get("level"),
    )
    header = ["Measure", "Ideal"]
    for name, _ in sets:
        header += [name, f"{_level(level)} CI"]
    rows = []
    for key, label, ideal in _CALIBRATION_FIT:
        row = [_td(label), _td(f"{ideal:g}", "num")]
        for _, fit in sets:
            low, high = fit.get(f"{key}_low"), fit.get(f"{key}_high")
            off = _is_number(low) and _is_number(high) and not low <= ideal <= high
            row += [
                _num_td(fit.get(key)),
                _td(_interval(low, high), "num gap-worse" if off else "num"),
            ]
        rows.append(row)
    parts = [
        "<p>Ideal values: intercept 0 (predicted risks are right on average), slope 1 "
        "(below 1: predictions too extreme; above 1: too timid), observed/expected events 1. "
        "An interval that excludes its ideal value is highlighted. These intervals come from "
        "the calibration fit, so the observed/expected interval may differ slightly from the "
        "bootstrap one under Evaluation.</p>",
        _table(header, rows),
    ]
    for name, fit in sets:
        if not fit:
            parts.append(f"<p>{_esc(name)}: {_missing()}</p>")
            continue
        notes = fit.get("notes")
        parts.append(
            f"<p>{_esc(name)}: {_cell(fit.get('rows'))} rows, {_cell(fit.get('patients'))} "
            f"patients, {_cell(fit.get('events'))} events."
            + (f" Notes: {_esc(_text(notes))}." if notes else "")
            + "</p>"
        )
    if not isinstance(holdout, dict):
        parts.append(f"<p>Temporal holdout: {_no_holdout(card)}</p>")
    return "\n".join(parts)


def _decision_curve_section(card: dict[str, Any], figure: str) -> str:
    evaluation = _dict(card.get("evaluation"))
    threshold = _first(
        _dict(card.get("operating_point")).get("threshold"),
        _dict(evaluation.get("operating_point")).get("threshold"),
    )
    curve = [
        _dict(point)
        for point in _list(evaluation.get("decision_curve")) or []
        if _is_number(_dict(point).get("threshold"))
    ]
    parts = [
        figure,
        f"<p>Net benefit is the true positives minus the false positives weighted by the "
        f"odds of the threshold, t/(1−t), per row ({_esc(_row_noun(card))}), so 0.10 is as "
        f"good as finding 10 true positives per 100 {_esc(_row_noun(card))} with no false "
        "alarm; the model is worth "
        "using at a threshold only where its net benefit is above both treating all and "
        "treating none (0).</p>",
    ]
    if not curve:
        parts.append(f"<p>Net benefit table: {_missing()}</p>")
        return _section("Decision curve", "\n".join(parts))
    operating, picked = _around(curve, threshold)
    rows, classes = [], []
    for i in picked:
        point = curve[i]
        model, treat_all = point.get("net_benefit"), point.get("net_benefit_all")
        treat_none = point.get("net_benefit_none")
        above = (
            _text(model > max(treat_all, treat_none))
            if all(_is_number(v) for v in (model, treat_all, treat_none))
            else NO_VALUE
        )
        label = _number(point.get("threshold"))
        rows.append(
            [
                _td(f"{label} (operating)" if i == operating else label, "num"),
                _num_td(model),
                _num_td(treat_all),
                _num_td(treat_none),
                _td(above),
            ]
        )
        classes.append("operating" if i == operating else "")
    header = ["Threshold", "Model", "Treat all", "Treat none", "Model above both"]
    parts.append("<p>Net benefit of the selected model on the test rows:</p>")
    parts.append(_table(header, rows, classes))
    return _section("Decision curve", "\n".join(parts))


def _around(curve: list[dict[str, Any]], threshold: Any) -> tuple[int | None, list[int]]:
    """The index of the operating threshold in ``curve`` (None when unknown) and a few
    indices spread around it: two grid steps of a sixteenth of the curve on either side."""
    step = max(1, len(curve) // 16)
    if not _is_number(threshold):
        return None, sorted({round(i * (len(curve) - 1) / 4) for i in range(5)})
    operating = min(range(len(curve)), key=lambda i: abs(curve[i]["threshold"] - threshold))
    picked = {operating + k * step for k in (-2, -1, 0, 1, 2)}
    return operating, sorted(i for i in picked if 0 <= i < len(curve))


def _subgroups_section(card: dict[str, Any]) -> str:
    evaluation = _dict(card.get("evaluation"))
    groups = [_dict(g) for g in _list(evaluation.get("subgroups")) or []]
    if not groups:
        return _section("Subgroups", f"<p>{_missing()}</p>")
    primary = evaluation.get("primary_metric")
    columns = _subgroup_columns(groups)
    rows, classes = [], []
    for group in groups:
        worse = _is_evaluated(group, primary) and group[f"gap_{primary}"] < GAP_WARNING
        row = [
            _td(_text(group.get("attribute"))),
            _td(_text(group.get("group"))),
            _num_td(group.get("n")),
            _num_td(group.get("positives")),
            _num_td(group.get("prevalence")),
            _td(_text(group.get("evaluated"))),
        ]
        for column in columns:
            flagged = worse and column == f"gap_{primary}"
            row.append(
                _num_td(group.get(column), signed=column.startswith("gap_"), flagged=flagged)
            )
        rows.append(row)
        not_evaluated = group.get("evaluated") is False
        classes.append("gap-worse" if worse else "not-evaluated" if not_evaluated else "")
    note = (
        f"<p>Gap: the subgroup's metric minus the overall value. Gaps in "
        f"{_cell(primary)} below {GAP_WARNING:+.2f} are highlighted.</p>"
    )
    header = ["Attribute", "Group", "n", "Positives", "Prevalence", "Evaluated", *columns]
    return _section("Subgroups", f"{note}\n{_table(header, rows, classes)}")


def _subgroup_columns(groups: list[dict[str, Any]]) -> list[str]:
    """The metric columns present in any subgroup, each followed by its gap column."""
    metrics: list[str] = []
    gaps: set[str] = set()
    for group in groups:
        for key in group:
            if key in _SUBGROUP_KEYS:
                continue
            if key.startswith("gap_"):
                gaps.add(key)
                key = key.removeprefix("gap_")
            if key not in metrics:
                metrics.append(key)
    columns = []
    for metric in metrics:
        columns.append(metric)
        if f"gap_{metric}" in gaps:
            columns.append(f"gap_{metric}")
    return columns


def _selection_section(card: dict[str, Any]) -> str:
    selection = _dict(card.get("selection"))
    level = _dict(_dict(card.get("evaluation")).get("bootstrap")).get("level")
    if selection:
        low, high = _pair(selection.get("gain_ci"))
        gain = _Raw(
            f"{_esc(_signed(selection.get('gain'), 4))} (95% CI "
            f"{_esc(_signed(low, 4))} to {_esc(_signed(high, 4))}) in cross-validated "
            f"{_cell(selection.get('scoring'))}, paired on the same out-of-fold rows"
        )
        compared = _Raw(
            f"{_cell(selection.get('rows'))} out-of-fold rows, "
            f"{_cell(selection.get('patients'))} patients"
        )
        parts = [
            f"<p><strong>{_cell(selection.get('reason'))}</strong></p>",
            "<p>Parsimony rule: the reference model is kept unless the best other candidate's "
            "gain over it has its lower 95% bound above the margin.</p>",
            _definitions(
                [
                    ("Selected", selection.get("selected")),
                    ("Reference", selection.get("reference")),
                    ("Best other candidate", _first(selection.get("best_other"), "none")),
                    ("Gain over the reference", gain),
                    ("Margin", _Raw(_general(selection.get("margin")))),
                    ("Compared on", compared),
                ]
            ),
        ]
    else:
        parts = [f"<p>Selection rule and reason: {_missing()}</p>"]
    parts.append("<h3>Candidates</h3>")
    parts.append(_candidates_table(card, selection, level))
    return _section("Model selection", "\n".join(parts))


def _candidates_table(card: dict[str, Any], selection: dict[str, Any], level: Any) -> str:
    candidates = [_dict(c) for c in _list(card.get("candidates")) or []]
    if not candidates:
        return f"<p>{_missing()}</p>"
    names: list[str] = []
    for candidate in candidates:
        for name in _dict(candidate.get("metrics")):
            if name not in names:
                names.append(name)
    # A metric's <name>_ci_low/_ci_high pair becomes one interval column beside it.
    with_ci = {n for n in names if f"{n}_ci_low" in names and f"{n}_ci_high" in names}
    bounds = {f"{n}_ci_{side}" for n in with_ci for side in ("low", "high")}
    # The cross-validated score the selection rests on comes first.
    columns = sorted((n for n in names if n not in bounds), key=lambda n: not n.startswith("cv_"))
    header = ["Candidate", "Role"]
    for name in columns:
        header.append(name)
        if name in with_ci:
            header.append(f"{name} {_level(level)} CI")
    best_other = selection.get("best_other")
    rows, classes = [], []
    for candidate in candidates:
        metrics = _dict(candidate.get("metrics"))
        reference = candidate.get("reference") is True
        selected = candidate.get("selected") is True
        roles = [
            role
            for role, applies in (
                ("reference", reference),
                ("best other", best_other is not None and candidate.get("name") == best_other),
                ("selected", selected),
            )
            if applies
        ]
        row = [_td(_text(candidate.get("name"))), _td(", ".join(roles))]
        for name in columns:
            row.append(_num_td(metrics.get(name)))
            if name in with_ci:
                interval = _interval(metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high"))
                row.append(_td(interval, "num"))
        rows.append(row)
        classes.append(
            " ".join(c for c, on in (("selected", selected), ("reference", reference)) if on)
        )
    return _table(header, rows, classes)


def _limitations_section(card: dict[str, Any]) -> str:
    return _section("Limitations", _bullets(_list(card.get("limitations"))))


def _provenance_section(card: dict[str, Any]) -> str:
    provenance = _dict(card.get("provenance"))
    body = _definitions(
        [
            ("Git commit", _Raw(f"<code>{_cell(provenance.get('git_commit'))}</code>")),
            ("Spec sha256", _Raw(f"<code>{_cell(provenance.get('spec_sha256'))}</code>")),
        ]
    )
    packages = _dict(provenance.get("packages"))
    if packages:
        rows = [[_td(name), _td(_text(packages[name]))] for name in sorted(packages, key=str)]
        body += "\n" + _table(["Package", "Version"], rows)
    else:
        body += f"\n<p>Packages: {_missing()}</p>"
    return _section("Provenance", body)


# -- figures ------------------------------------------------------------------------------


def _figures(images: dict[str, Path] | None) -> dict[str, str]:
    """Each figure in ``FIGURES`` as HTML: the PNG embedded as a data URI, or a note."""
    images = images if isinstance(images, dict) else {}
    out = {}
    for key, alt in FIGURES.items():
        path = images.get(key)
        data, why = _png_base64(path)
        if data is None:
            out[key] = f"<p>Figure: {_missing()}{f' ({_esc(why)})' if why else ''}</p>"
        else:
            out[key] = (
                f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'
                "<figcaption>The selected model and the reference model on the test rows."
                "</figcaption></figure>"
            )
    return out


def _png_base64(path: Any) -> tuple[str | None, str]:
    """The file at ``path`` base64-encoded, or None and why not (empty when no file given)."""
    if path is None:
        return None, ""
    try:
        data = Path(path).read_bytes()
    except (OSError, TypeError, ValueError):
        return None, "the image file could not be read"
    if not data.startswith(_PNG_SIGNATURE):
        return None, "the image file is not a PNG"
    return base64.b64encode(data).decode("ascii"), ""


# -- HTML building blocks -----------------------------------------------------------------


class _Raw(str):
    """HTML that is already safe: built here from escaped parts."""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _missing() -> str:
    return f'<span class="missing">{NOT_RECORDED}</span>'


def _cell(value: Any) -> str:
    """A value as escaped HTML; "not recorded" (styled) when missing."""
    return _missing() if value is None else _esc(_text(value))


def _td(text: Any, css: str = "") -> str:
    """A table cell holding ``text``, escaped."""
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{_esc(text)}</td>"


def _th(text: Any) -> str:
    # Metric names are long snake_case words (gap_average_precision): a header may break
    # after an underscore, so wide tables narrow to the page before they scroll.
    return f"<th>{_esc(text).replace('_', '_<wbr>')}</th>"


def _num_td(value: Any, *, signed: bool = False, flagged: bool = False) -> str:
    """A right-aligned number cell; a dash for a missing or non-finite value."""
    return _td(_signed(value) if signed else _number(value), "num gap-worse" if flagged else "num")


def _section(heading: str, body: str) -> str:
    return f"<section>\n<h2>{_esc(heading)}</h2>\n{body}\n</section>"


def _definitions(items: list[tuple[str, Any]]) -> str:
    """A definition list; values are escaped unless already ``_Raw`` HTML."""
    parts = [
        f"<dt>{_esc(term)}</dt><dd>{value if isinstance(value, _Raw) else _cell(value)}</dd>"
        for term, value in items
    ]
    return "<dl>\n" + "\n".join(parts) + "\n</dl>"


def _bullets(items: list[Any] | None) -> str:
    if not items:
        return f"<p>{_missing()}</p>"
    return "<ul>\n" + "\n".join(f"<li>{_esc(_text(item))}</li>" for item in items) + "\n</ul>"


def _inline_list(items: Any) -> str:
    items = _list(items)
    if items is None:
        return _missing()
    return ", ".join(_esc(_text(item)) for item in items) or "none"


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    """A table from header names (escaped here) and rows of ``_td``/``_th`` cells."""
    lines = [
        '<div class="table-scroll">',
        "<table>",
        f"<thead><tr>{''.join(_th(name) for name in header)}</tr></thead>",
        "<tbody>",
    ]
    for i, cells in enumerate(rows):
        css = row_classes[i] if row_classes else ""
        attribute = f' class="{css}"' if css else ""
        lines.append(f"<tr{attribute}>{''.join(cells)}</tr>")
    lines += ["</tbody>", "</table>", "</div>"]
    return "\n".join(lines)


# -- values -------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, list | tuple) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _text(value: Any, *, missing: str = NOT_RECORDED) -> str:
    """Plain text for a value: counts with thousands separators, other numbers to three
    decimals, NaN and infinity as a dash, booleans as yes/no, lists comma-joined."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_count(value):
        return f"{value:,}"
    if isinstance(value, Real):
        return f"{value:,.3f}" if math.isfinite(value) else NO_VALUE
    if isinstance(value, list | tuple):
        return ", ".join(_text(item) for item in value)
    return str(value)


def _plain(value: Any) -> str:
    """Text for a terminal line, without control characters (escape codes, newlines)."""
    return _CONTROL_CHARACTERS.sub("", _text(value))


def _number(value: Any) -> str:
    return _text(value, missing=NO_VALUE)


def _signed(value: Any, digits: int = 3) -> str:
    return f"{value:+.{digits}f}" if _is_number(value) else NO_VALUE


def _interval(low: Any, high: Any) -> str:
    """``low–high``; ``low to high`` when a bound is negative (a dash would read as a minus)."""
    if not (_is_number(low) and _is_number(high)):
        return NO_VALUE
    return _interval_text(_number(low), _number(high))


def _interval_text(low: str, high: str) -> str:
    """An interval from bounds already formatted as text."""
    if NO_VALUE in (low, high):
        return NO_VALUE
    return f"{low} to {high}" if low.startswith("-") or high.startswith("-") else f"{low}–{high}"


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next((value for value in values if value is not None), None)


def _pair(value: Any) -> tuple[Any, Any]:
    """``[low, high]`` as a tuple; ``(None, None)`` when it is not a pair."""
    items = _list(value)
    return (items[0], items[1]) if items is not None and len(items) == 2 else (None, None)


def _percent(value: Any) -> str:
    """A share as escaped HTML: ``0.3`` as ``30%``."""
    return _esc(f"{value * 100:g}%") if _is_number(value) else _missing()


def _days(value: Any) -> str:
    return _esc(f"{value:g} days") if _is_number(value) else _missing()


def _general(value: Any) -> str:
    """A number as written in a spec (``0.01``, ``0.0025``); "not recorded" when missing."""
    return f"{value:g}" if _is_number(value) else NOT_RECORDED


def _positives(value: Any) -> str:
    return f" ({_esc(_text(value))} positives)" if _is_count(value) else ""


def _no_holdout(card: dict[str, Any]) -> str:
    """HTML for an absent temporal holdout: "none" when the split says none was configured."""
    split = _dict(card.get("split"))
    if "temporal_holdout_months" in split and split["temporal_holdout_months"] is None:
        return "none (no temporal holdout configured)"
    return _missing()


def _achieved_values(row: dict[str, Any]) -> tuple[str, str, str]:
    """An achieved row's value and interval bounds as text: an alert rate per 100
    patients to one decimal, any other measure to three."""
    per_100 = row.get("metric") == "alert_rate"

    def text(value: Any) -> str:
        return _fixed(100 * value, 1) if per_100 and _is_number(value) else _number(value)

    return text(row.get("value")), text(row.get("ci_low")), text(row.get("ci_high"))


def _achieved_unit(metric: Any, row_noun: str) -> str:
    return f"alerts per 100 {row_noun}" if metric == "alert_rate" else _text(metric)


def _row_noun(card: dict[str, Any]) -> str:
    """What one row is, in the plural (``evaluation.row_noun``); cards written before the
    spec named it counted patients."""
    noun = _dict(card.get("operating_point")).get("row_noun")
    return _plain(noun) if isinstance(noun, str) and noun else "patients"


def _holds_text(holds: Any) -> str:
    if holds is True:
        return "yes"
    if holds is False:
        return "no — missed"
    return NO_VALUE


def _level(level: Any) -> str:
    """``0.95`` as ``"95%"``; the conventional 95% when the level was not recorded."""
    return f"{level * 100:g}%" if _is_number(level) else "95%"


def _is_evaluated(group: dict[str, Any], primary: Any) -> bool:
    """Whether ``group`` was evaluated and has a finite gap in the primary metric."""
    return group.get("evaluated") is not False and _is_number(group.get(f"gap_{primary}"))


def _worst_subgroup(subgroups: Any, primary: Any) -> dict[str, Any] | None:
    groups = [_dict(g) for g in _list(subgroups) or []]
    evaluated = [group for group in groups if _is_evaluated(group, primary)]
    return min(evaluated, key=lambda group: group[f"gap_{primary}"], default=None)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, recursively."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fixed(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else NO_VALUE
