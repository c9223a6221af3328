"""Performance over time, to look at: one HTML page per monitor run, and the Evidently history.

:func:`clinml.monitoring.performance.performance_by_window` judges each window of labelled
predictions; this module shows those windows side by side so a team sees a trend before a
floor is crossed:

* :func:`write_report` writes ``performance.html`` into the monitor run's directory: one
  figure per metric (AUROC, sensitivity and alert rate at the served operating point,
  observed/expected ratio, calibration slope, ECE) over the windows' start dates, each point
  with its 95% interval, the spec's floors drawn as dashed lines, windows that were not
  judged drawn hollow, and a table of the numbers. The page is self-contained (figures are
  PNG data URIs, the style is inline, no script) and holds aggregates only: counts, metrics
  and intervals per window, never a patient's row, id or probability.
* :func:`add_to_workspace` adds one Evidently snapshot per window (AUROC, sensitivity,
  observed and expected rate, alert rate, rows) to the project ``clinml <usecase>
  performance`` of the local workspace, time-stamped at the window's start, so ``evidently
  ui`` plots them over the model's life. A window judged again by a later run, with more
  labels, replaces its earlier snapshot.

Usage::

    windows = performance_by_window(spec, labelled, period, since, until)
    path = write_report(spec, windows, run_dir, model_version="7")
    add_to_workspace(spec, labelled, windows, paths.evidently_workspace, model_version="7")
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from clinml.atomic import write_atomic
from clinml.monitoring.performance import WindowPerformance
from clinml.spec import UseCaseSpec
from clinml.training.card import PAGE_CSS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_FILE = "performance.html"
# Tag and metadata key of the performance snapshots in the Evidently workspace.
SNAPSHOT_TAG = "performance"
_WINDOW_KEY = "window_start"

# Up to this many windows, each gets a tick labelled with its start date.
_TICKED_WINDOWS = 14
_FLOOR_COLOUR = "#9b1c1c"
_REFERENCE_COLOUR = "#52606d"
_CSS = (
    PAGE_CSS
    + """body { max-width: 62rem; }
td.num { white-space: nowrap; }
tr.not-judged td { color: #7b8794; }
tr.below-floor td:first-child { border-left: 3px solid #9b1c1c; }
td.below { background: #fde8e8; color: #9b1c1c; font-weight: 600; }
figure { margin: 0.5rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #cbd2d9; }
figcaption { color: #52606d; font-size: 0.9em; }
"""
)


@dataclass(frozen=True)
class _Metric:
    """One figure and table column: which WindowPerformance fields, and how to read them."""

    key: str  # the WindowPerformance attribute; ``{key}_ci`` is its interval
    title: str
    reading: str  # the figure's caption


_METRICS = (
    _Metric(
        "roc_auc",
        "AUROC",
        "How well the risks rank patients who had the outcome above those who did not "
        "(0.5 is chance, 1 perfect). Interval: patient-level bootstrap.",
    ),
    _Metric(
        "sensitivity",
        "Sensitivity at the operating point",
        "Of the patients who had the outcome, the share the service alerted on (its logged "
        "label). Interval: patient-level bootstrap.",
    ),
    _Metric(
        "alert_rate",
        "Alert rate",
        "The share of labelled predictions the service alerted on: the team's workload. "
        "Interval: Wilson, on the number of patients' worth of rows.",
    ),
    _Metric(
        "observed_expected",
        "Observed / expected outcomes",
        "Outcomes that happened divided by outcomes the model predicted (the sum of its "
        "risks). 1 is ideal; above 1 the model under-predicts risk, below 1 it over-predicts. "
        "Interval: patient-cluster-robust.",
    ),
    _Metric(
        "calibration_slope",
        "Calibration slope",
        "1 is ideal; below 1 the risks are too extreme (high ones too high, low ones too "
        "low), above 1 too timid. Interval: patient-cluster-robust.",
    ),
    _Metric(
        "ece",
        "Expected calibration error (ECE)",
        "The average gap between predicted and observed risk. Chance alone makes it larger "
        "on fewer labels, so its interval says what windows of this size would show; the "
        "ceiling was set for windows of at least the minimum number of labels.",
    ),
)


@dataclass(frozen=True)
class _Line:
    """A horizontal line on a metric's figure: a floor or ceiling, or an ideal value."""

    value: float
    label: str
    floor: bool  # a floor or ceiling the spec sets (red), else a reference value (grey)


def _lines(spec: UseCaseSpec) -> dict[str, list[_Line]]:
    """The lines each metric's figure draws, from the spec."""
    floors = spec.monitoring.performance
    budget = spec.evaluation.max_alerts_per_100
    lines: dict[str, list[_Line]] = {m.key: [] for m in _METRICS}
    if floors.min_roc_auc is not None:
        lines["roc_auc"].append(_Line(floors.min_roc_auc, f"floor {floors.min_roc_auc:g}", True))
    if floors.min_sensitivity is not None:
        lines["sensitivity"].append(
            _Line(floors.min_sensitivity, f"floor {floors.min_sensitivity:g}", True)
        )
    if budget is not None:
        days = spec.evaluation.budget_window_days
        lines["alert_rate"].append(
            _Line(
                budget / 100,
                f"alert budget {budget:g} per 100 {spec.evaluation.row_noun} (over {days:g} days)",
                True,
            )
        )
    lines["observed_expected"].append(_Line(1.0, "ideal 1", False))
    lines["calibration_slope"].append(_Line(1.0, "ideal 1", False))
    if floors.max_ece is not None:
        lines["ece"].append(_Line(floors.max_ece, f"ceiling {floors.max_ece:g}", True))
    return lines


def _breaks(window: WindowPerformance, key: str) -> bool:
    """Whether the window was judged and this metric broke its floor there."""
    return window.judged and any(reason.split()[0] == key for reason in window.below_floor)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _naive_utc(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _draw(ax: Axes, windows: Sequence[WindowPerformance], key: str) -> int:
    """The metric's points and error bars on ``ax``; returns how many windows define it."""
    groups: dict[str, list[WindowPerformance]] = {"judged": [], "below": [], "not judged": []}
    for window in windows:
        if getattr(window, key) is None:
            continue
        if not window.judged:
            groups["not judged"].append(window)
        else:
            groups["below" if _breaks(window, key) else "judged"].append(window)
    styles = {
        "judged": {"color": "C0", "markerfacecolor": "C0", "label": "judged"},
        "below": {
            "color": _FLOOR_COLOUR,
            "markerfacecolor": _FLOOR_COLOUR,
            "label": "broke its floor",
        },
        "not judged": {
            "color": "#9aa5b1",
            "markerfacecolor": "white",
            "label": "not judged (too few labels or one class)",
        },
    }
    for name, members in groups.items():
        if not members:
            continue
        x = [_naive_utc(w.start) for w in members]
        y = [float(getattr(w, key)) for w in members]
        below, above = [], []
        for window, value in zip(members, y, strict=True):
            interval = getattr(window, f"{key}_ci")
            below.append(value - interval[0] if interval else 0.0)
            above.append(interval[1] - value if interval else 0.0)
        ax.errorbar(x, y, yerr=[below, above], fmt="o", capsize=3, linestyle="none", **styles[name])
    return sum(len(members) for members in groups.values())


def metric_figure(spec: UseCaseSpec, windows: Sequence[WindowPerformance], key: str) -> Figure:
    """One metric over the windows: points with interval bars, the spec's lines dashed.

    Drawn on a bare matplotlib Figure (no pyplot), so nothing global is touched.

    Args:
        spec: the use case, for the floors and the alert budget.
        windows: ``performance_by_window`` output.
        key: ``roc_auc``, ``sensitivity``, ``alert_rate``, ``observed_expected``,
            ``calibration_slope`` or ``ece``.

    Returns:
        The figure, for :func:`render_html` to encode as PNG.
    """
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    [metric] = [m for m in _METRICS if m.key == key]
    lines = _lines(spec)[key]
    figure = Figure(figsize=(7.5, 3.3), layout="constrained")
    ax = figure.add_subplot()
    drawn = _draw(ax, windows, metric.key)
    for line in lines:
        ax.axhline(
            line.value,
            linestyle="--",
            linewidth=1.2,
            color=_FLOOR_COLOUR if line.floor else _REFERENCE_COLOUR,
            label=line.label,
        )
    if not drawn:
        ax.text(0.5, 0.5, "no window defines it", transform=ax.transAxes, ha="center")
    starts = [_naive_utc(w.start) for w in windows]
    if starts:
        pad = max((max(starts) - min(starts)) * 0.05, timedelta(days=1))
        ax.set_xlim(min(starts) - pad, max(starts) + pad)
    if 0 < len(starts) <= _TICKED_WINDOWS:  # a tick at each window's start
        ax.set_xticks(starts)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%d %b\n%Y"))
    else:
        locator = mdates.AutoDateLocator(maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set(title=metric.title, xlabel="window start (UTC)")
    ax.grid(axis="y", color="#e4e7eb")
    if drawn or lines:
        ax.legend(loc="best", fontsize="small")
    return figure


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _with_interval(value: float | None, interval: tuple[float, float] | None) -> str:
    if value is None:
        return "–"
    text = _number(value)
    return f"{text} [{_number(interval[0])}, {_number(interval[1])}]" if interval else text


def _moment(when: datetime) -> str:
    when = when.astimezone(UTC) if when.tzinfo else when
    return f"{when:%Y-%m-%d}" if when.time() == datetime.min.time() else f"{when:%Y-%m-%d %H:%M}"


def _table(windows: Sequence[WindowPerformance]) -> str:
    header = ["Window (UTC)", "Labels", "Positives", "Judged"] + [m.title for m in _METRICS]
    header.append("Below a floor")
    rows = []
    for w in windows:
        classes = []
        if not w.judged:
            classes.append("not-judged")
        if w.judged and w.below_floor:
            classes.append("below-floor")
        cells = [
            f"<td>{_esc(_moment(w.start))} – {_esc(_moment(w.end))}</td>",
            f'<td class="num">{w.n:,}</td>',
            f'<td class="num">{w.positives:,}</td>',
            f"<td>{'yes' if w.judged else 'no'}</td>",
        ]
        for metric in _METRICS:
            text = _with_interval(getattr(w, metric.key), getattr(w, f"{metric.key}_ci"))
            below = " below" if _breaks(w, metric.key) else ""
            cells.append(f'<td class="num{below}">{_esc(text)}</td>')
        cells.append(f"<td>{_esc('; '.join(w.below_floor)) if w.below_floor else ''}</td>")
        row_class = f' class="{" ".join(classes)}"' if classes else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _floors_text(spec: UseCaseSpec) -> str:
    floors = spec.monitoring.performance
    parts = []
    if floors.min_roc_auc is not None:
        parts.append(f"AUROC at least {floors.min_roc_auc:g}")
    if floors.min_sensitivity is not None:
        parts.append(f"sensitivity at least {floors.min_sensitivity:g}")
    if floors.max_ece is not None:
        parts.append(f"ECE at most {floors.max_ece:g}")
    rule = ", ".join(parts) if parts else "no floors are set"
    return (
        f"Floors (<code>monitoring.performance</code>): {_esc(rule)}. A window is judged from "
        f"{floors.min_labels:,} labelled predictions with both outcomes present; a judged "
        "window alerts when a point estimate crosses a floor. Observed/expected and the "
        "calibration slope have no floor: their dashed line is the ideal value."
    )


def render_html(
    spec: UseCaseSpec,
    windows: Sequence[WindowPerformance],
    *,
    model_version: str | None = None,
    generated: datetime | None = None,
) -> str:
    """The performance page for ``windows`` as one self-contained HTML document.

    Args:
        spec: the use case: its floors, alert budget and name.
        windows: ``performance_by_window`` output, oldest first.
        model_version: the champion's version, for the subtitle.
        generated: when the page was made (default: now), for the subtitle.

    Returns:
        The HTML text: figures as PNG data URIs, inline style, no script, no external link,
        and aggregates only (no patient's row, id or probability).
    """
    generated = generated or datetime.now(UTC)
    title = f"Performance over time: {spec.name}"
    span = (
        f"{_moment(windows[0].start)} to {_moment(windows[-1].end)}, {len(windows)} window"
        f"{'s' if len(windows) != 1 else ''}, {sum(w.judged for w in windows)} judged"
        if windows
        else "no windows with labels"
    )
    subtitle = [span]
    if model_version:
        subtitle.append(f"model version {model_version}")
    subtitle.append(f"made {generated.astimezone(UTC):%Y-%m-%d %H:%M} UTC")
    figures = []
    for metric in _METRICS:
        png = base64.b64encode(_png(metric_figure(spec, windows, metric.key))).decode("ascii")
        figures.append(
            f'<figure id="{metric.key}"><img src="data:image/png;base64,{png}" '
            f'alt="{_esc(metric.title)} per window"><figcaption>{_esc(metric.reading)}'
            "</figcaption></figure>"
        )
    reading = (
        "<p>Each point is one window of predictions whose outcomes have arrived; its bar is "
        "the 95% interval, the range the value could plausibly take given how many patients "
        "the window holds. A window on or just past a floor whose bar crosses the floor "
        "may be chance; a run of windows drifting the same way, or a bar wholly past the "
        "floor, is not. Hollow grey points were not judged: too few labels, or only one "
        "outcome. Red points broke their floor or ceiling.</p>"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_esc(title)}</h1>",
            f'<p class="subtitle">{_esc("; ".join(subtitle))}</p>',
            reading,
            f"<p>{_floors_text(spec)}</p>",
            "<h2>Per window</h2>",
            *figures,
            "<h2>The numbers</h2>",
            _table(windows),
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(
    spec: UseCaseSpec,
    windows: Sequence[WindowPerformance],
    out_dir: Path,
    *,
    model_version: str | None = None,
    generated: datetime | None = None,
) -> Path:
    """Write ``performance.html`` (:func:`render_html`) into ``out_dir`` (created).

    Returns:
        The path written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    text = render_html(spec, windows, model_version=model_version, generated=generated)
    write_atomic(path, text)
    return path


# ---------------------------------------------------------------------------------------------
# Evidently workspace
# ---------------------------------------------------------------------------------------------


def project_name(spec: UseCaseSpec) -> str:
    """The Evidently project that holds the performance snapshots of ``spec``'s use case."""
    return f"clinml {spec.name} performance"


def _window_rows(spec: UseCaseSpec, labelled: pd.DataFrame, window: WindowPerformance) -> Any:
    """The window's labelled predictions as an Evidently Dataset: outcome, decision, risk."""
    from evidently import BinaryClassification, DataDefinition, Dataset

    times = pd.to_datetime(labelled["time"], utc=True)
    rows = labelled[((times >= window.start) & (times < window.end)).to_numpy()]
    positive, negative = spec.label.positive_class, spec.label.negative_class
    alerted = (rows["label"] == positive).to_numpy()
    outcome = rows["outcome"].to_numpy(dtype="int64")
    frame = pd.DataFrame(
        {
            "target": [positive if o == 1 else negative for o in outcome],
            "decision": [positive if a else negative for a in alerted],
            "probability": rows["probability"].to_numpy(dtype=float),
            "outcome": outcome.astype(float),
            "alerted": alerted.astype(float),
        }
    )
    definition = DataDefinition(
        numerical_columns=["probability", "outcome", "alerted"],
        classification=[
            # The served decision (the logged label) for sensitivity; the risks for AUROC.
            BinaryClassification(
                name="decisions", target="target", prediction_labels="decision", pos_label=positive
            ),
            BinaryClassification(
                name="scores", target="target", prediction_probas="probability", pos_label=positive
            ),
        ],
    )
    return Dataset.from_pandas(frame, data_definition=definition)


def _snapshot(
    spec: UseCaseSpec,
    labelled: pd.DataFrame,
    window: WindowPerformance,
    model_version: str | None,
) -> Any:
    from evidently import Report
    from evidently.metrics import MeanValue, Recall, RocAuc, RowCount

    # Single values only: no ROC curve or confusion matrix, whose points would be rows'.
    metrics = [
        RowCount(),
        RocAuc(classification_name="scores", roc_curve=False),
        Recall(classification_name="decisions", conf_matrix=False),
        MeanValue(column="outcome"),  # observed rate
        MeanValue(column="probability"),  # expected rate: O/E is their ratio
        MeanValue(column="alerted"),  # alert rate
    ]
    metadata = {
        _WINDOW_KEY: window.start.astimezone(UTC).isoformat(),
        "window_end": window.end.astimezone(UTC).isoformat(),
        "judged": "yes" if window.judged else "no",
        "model_version": model_version or "",
    }
    return Report(metrics).run(
        _window_rows(spec, labelled, window),
        None,
        timestamp=_naive_utc(window.start),
        metadata=metadata,
        tags=[SNAPSHOT_TAG],
        name=f"performance {_moment(window.start)}",
    )


def _dashboard(project: Any) -> None:
    """Line panels for a new project: the metrics of :func:`_snapshot` over time."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    def metric(name: str, legend: str, **labels: str) -> PanelMetric:
        return PanelMetric(
            metric=f"evidently:metric_v2:{name}",
            legend=legend,
            tags=[SNAPSHOT_TAG],
            metric_labels=labels,
        )

    panels = [
        ("AUROC", [metric("RocAuc", "AUROC")]),
        ("Sensitivity at the operating point", [metric("Recall", "sensitivity")]),
        ("Alert rate", [metric("MeanValue", "alert rate", column="alerted")]),
        (
            "Observed and expected outcome rate",
            [
                metric("MeanValue", "observed", column="outcome"),
                metric("MeanValue", "expected (mean risk)", column="probability"),
            ],
        ),
        ("Labelled predictions per window", [metric("RowCount", "labels")]),
    ]
    for title, values in panels:
        project.dashboard.add_panel(line_plot_panel(title=title, values=values, size="half"))


def add_to_workspace(
    spec: UseCaseSpec,
    labelled: pd.DataFrame,
    windows: Sequence[WindowPerformance],
    workspace: Path,
    *,
    model_version: str | None = None,
) -> int:
    """Add one Evidently snapshot per window with both outcomes to the performance project.

    The project (:func:`project_name`) is created with a dashboard of line panels the first
    time. Each snapshot is time-stamped at its window's start and carries the window in its
    metadata; a snapshot of the same window from an earlier run is replaced, since a later
    run has at least as many labels.

    Args:
        spec: the use case (class names, project name).
        labelled: the labelled predictions the windows were computed from (``join_labels``).
        windows: ``performance_by_window`` output for ``labelled``.
        workspace: the local workspace directory (created).
        model_version: recorded in each snapshot's metadata.

    Returns:
        The number of snapshots added.
    """
    from evidently.ui.workspace import Workspace

    kept = [w for w in windows if 0 < w.positives < w.n]
    if not kept:
        return 0
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    ws = Workspace.create(str(workspace))
    name = project_name(spec)
    found = [p for p in ws.search_project(name) if p.name == name]
    if found:
        project = found[0]
    else:
        project = ws.create_project(name)
        project.description = "Labelled performance per monitoring window (clinml)."
        _dashboard(project)
        project.save()
    replaced = {w.start.astimezone(UTC).isoformat() for w in kept}
    for snapshot_id in ws.list_runs(project.id):
        stored = ws.get_run(project.id, snapshot_id)
        if stored is not None and stored.metadata.get(_WINDOW_KEY) in replaced:
            ws.delete_run(project.id, snapshot_id)
    for window in kept:
        ws.add_run(project.id, _snapshot(spec, labelled, window, model_version))
    return len(kept)
