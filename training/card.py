"""Model cards: the reviewer-facing record of what a registered model is and how it did.

The card itself is a JSON-serialisable dict assembled by the training stage; this module
only renders and writes it:

- ``write_card(card, out_dir)`` writes ``model_card.json`` and ``model_card.html``;
- ``render_html(card)`` is the HTML page alone: one self-contained file (inline CSS, no
  scripts, no external assets) that can be attached to a change request or opened offline;
- ``card_summary(card)`` is a few plain lines for the terminal after training.

Rendering never fails on a missing key: whatever the card lacks is shown as
"not recorded", so a card from an older run still renders. Every string from the card is
HTML-escaped. A subgroup's gap is its metric minus the overall value; every primary metric
a spec may name is higher-is-better, so a gap below ``GAP_WARNING`` is flagged.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from clinml.errors import ClinmlError

NOT_RECORDED = "not recorded"
NO_VALUE = "—"
# A subgroup whose primary metric trails the overall value by more than this is flagged.
GAP_WARNING = -0.05
CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"

# Subgroup keys that describe the group; every other key is a metric or a gap_<metric>.
_SUBGROUP_KEYS = ("attribute", "group", "n", "positives", "prevalence", "evaluated")
_TEMPORAL_KEYS = ("window_start", "window_end", "rows")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 60rem; padding: 0 1rem; color: #1f2933; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #cbd2d9; padding-bottom: 0.2rem; margin-top: 2rem; }
.subtitle { color: #52606d; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #cbd2d9; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; }
.missing { color: #9aa5b1; font-style: italic; }
td.gap-worse { background: #fde8e8; color: #9b1c1c; font-weight: 600; }
tr.gap-worse td:first-child { border-left: 3px solid #9b1c1c; }
tr.selected td { background: #e3f8e9; }
tr.not-evaluated td { color: #9aa5b1; }
code { font-size: 0.9em; word-break: break-all; }
"""


class CardError(ClinmlError):
    """A model card could not be written."""


def write_card(card: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write the card as ``model_card.json`` and ``model_card.html`` in ``out_dir``.

    NaN and infinite floats become ``null`` in the JSON (they are not JSON). Each file is
    written under a temporary name and renamed, so a reader never sees half a card.

    Args:
        card: the model card (see the module docstring).
        out_dir: the directory to write to; created if missing.

    Returns:
        ``(json_path, html_path)``.

    Raises:
        CardError: the card holds a value JSON cannot represent, or the files could not
            be written.
    """
    clean = _finite(card)
    try:
        text = json.dumps(clean, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CardError(f"model card is not JSON-serialisable: {exc}") from exc
    page = render_html(clean)
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / CARD_JSON, out_dir / CARD_HTML
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(json_path, text + "\n")
        _write_atomically(html_path, page)
    except OSError as exc:
        raise CardError(f"cannot write the model card to {out_dir}: {exc.strerror}") from exc
    return json_path, html_path


def render_html(card: dict[str, Any]) -> str:
    """The card as one self-contained HTML page (inline CSS, no scripts, no assets).

    Args:
        card: the model card; any missing part is rendered as "not recorded".

    Returns:
        The page, with every string from the card HTML-escaped.
    """
    card = _dict(card)
    title = _title(card)
    model = _dict(card.get("model"))
    subtitle = (
        f"candidate {_cell(model.get('candidate'))} · run {_cell(model.get('run_id'))} · "
        f"created {_cell(model.get('created'))} · aliases {_inline_list(model.get('aliases'))}"
    )
    sections = [
        _intended_use_section(card),
        _training_data_section(card),
        _evaluation_section(card),
        _operating_point_section(card),
        _calibration_section(card),
        _subgroups_section(card),
        _candidates_section(card),
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
        interval, the operating point, the worst evaluated subgroup gap in the primary
        metric, and the training window and size.
    """
    card = _dict(card)
    model = _dict(card.get("model"))
    evaluation = _dict(card.get("evaluation"))
    training = _dict(card.get("training_data"))
    operating = _dict(evaluation.get("operating_point"))
    primary = evaluation.get("primary_metric")
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
        f"{_fixed(operating.get('alerts_per_100'), 1)} alerts per 100"
    )
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
    lines.append(
        f"trained on {_plain(training.get('rows'))} rows, "
        f"{_plain(training.get('patients'))} patients, "
        f"{_plain(training.get('positives'))} positives, "
        f"{_plain(training.get('window_start'))} to {_plain(training.get('window_end'))}"
    )
    return lines


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


def _evaluation_section(card: dict[str, Any]) -> str:
    evaluation = _dict(card.get("evaluation"))
    bootstrap = _dict(evaluation.get("bootstrap"))
    level = bootstrap.get("level")
    parts = [
        f"<p>Held out: {_cell(evaluation.get('test_rows'))} rows from "
        f"{_cell(evaluation.get('test_patients'))} patients. Confidence intervals: "
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
        parts.append(f"<p>{_missing()}</p>")
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
    operating = _dict(_dict(card.get("evaluation")).get("operating_point"))
    if not operating:
        return _section("Operating point", f"<p>{_missing()}</p>")
    confusion = _dict(operating.get("confusion"))
    body = _definitions(
        [
            ("Threshold", operating.get("threshold")),
            ("Rule", operating.get("rule")),
            ("Alerts per 100 patients", operating.get("alerts_per_100")),
        ]
    )
    matrix = _table(
        ["", "Predicted positive", "Predicted negative"],
        [
            [_th("Actual positive"), _num_td(confusion.get("tp")), _num_td(confusion.get("fn"))],
            [_th("Actual negative"), _num_td(confusion.get("fp")), _num_td(confusion.get("tn"))],
        ],
    )
    return _section("Operating point", f"{body}\n{matrix}")


def _calibration_section(card: dict[str, Any]) -> str:
    bins = [_dict(b) for b in _list(_dict(card.get("evaluation")).get("calibration")) or []]
    if not bins:
        return _section("Calibration", f"<p>{_missing()}</p>")
    rows = [
        [
            _td(_interval(b.get("lower"), b.get("upper")), "num"),
            _num_td(b.get("n")),
            _num_td(b.get("mean_predicted")),
            _num_td(b.get("observed_rate")),
        ]
        for b in bins
    ]
    table = _table(["Predicted risk", "Rows", "Mean predicted", "Observed rate"], rows)
    return _section("Calibration", table)


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


def _candidates_section(card: dict[str, Any]) -> str:
    candidates = [_dict(c) for c in _list(card.get("candidates")) or []]
    if not candidates:
        return _section("Candidates compared", f"<p>{_missing()}</p>")
    metric_names: list[str] = []
    for candidate in candidates:
        for name in _dict(candidate.get("metrics")):
            if name not in metric_names:
                metric_names.append(name)
    rows, classes = [], []
    for candidate in candidates:
        metrics = _dict(candidate.get("metrics"))
        selected = candidate.get("selected") is True
        rows.append(
            [
                _td(_text(candidate.get("name"))),
                *(_num_td(metrics.get(name)) for name in metric_names),
                _td("selected" if selected else ""),
            ]
        )
        classes.append("selected" if selected else "")
    table = _table(["Candidate", *metric_names, ""], rows, classes)
    return _section("Candidates compared", table)


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
    return f"<th>{_esc(text)}</th>"


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
    lines = ["<table>", f"<thead><tr>{''.join(_th(name) for name in header)}</tr></thead>"]
    lines.append("<tbody>")
    for i, cells in enumerate(rows):
        css = row_classes[i] if row_classes else ""
        attribute = f' class="{css}"' if css else ""
        lines.append(f"<tr{attribute}>{''.join(cells)}</tr>")
    lines += ["</tbody>", "</table>"]
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


def _signed(value: Any) -> str:
    return f"{value:+.3f}" if _is_number(value) else NO_VALUE


def _interval(low: Any, high: Any) -> str:
    return f"{_number(low)}–{_number(high)}" if _is_number(low) and _is_number(high) else NO_VALUE


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


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fixed(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else NO_VALUE
