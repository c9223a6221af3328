"""The shadow report: a shadow version against the champion, on the same live requests.

While a version runs in shadow (``clinml shadow start``), the service scores every
request with it off the response path and logs its answers beside the champion's: the
same ``request_id``, its own ``model_version`` and label, and ``shadow`` true. This module
pairs the two answers to each record and says, for a window of traffic:

- **coverage**: how many of the champion's answers have a shadow answer (the shadow queue
  drops requests under load, so fewer than all is expected; the rest are a sample of the
  traffic in time, not of the patients);
- **agreement** at each model's own threshold: both alert, only one does, neither;
- **alert rates** and their paired difference, with a 95% interval robust to a patient's
  several rows (cluster-robust variance of a mean of paired differences; Liang & Zeger
  1986): the change in the team's workload if the shadow version were champion;
- **score distributions**: each model's quantiles, the largest gap between their
  distribution functions (the Kolmogorov-Smirnov distance; no p-value is given, since the
  two scores of a record are not independent samples) and the rank correlation of the
  paired scores;
- **paired performance** on the requests whose outcomes have arrived
  (:func:`clinml.monitoring.performance.join_labels`), by the promotion gate's own method:
  a paired, patient-level bootstrap of the difference in the primary metric
  (:func:`clinml.training.metrics.paired_bootstrap`), judged for non-inferiority at
  ``promotion.max_metric_drop`` (:func:`clinml.training.governance.non_inferiority`),
  and only with at least ``promotion.min_comparison_events`` positives and negatives.

The page holds aggregates only: counts, rates, quantiles and a two-dimensional histogram
of the paired scores whose cells of fewer than :data:`SMALL_CELL` records are blanked.

Usage::

    log = read_predictions(paths.predictions, since, until, shadow=True)
    report = shadow_report(spec, log, labels, since, until, thresholds={"3": 0.31, "4": 0.28})
    report.write(out_dir)                     # shadow.json and shadow.html
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clinml.atomic import write_atomic
from clinml.errors import ClinmlError
from clinml.spec import UseCaseSpec

SHADOW_COLUMN = "shadow"
REPORT_JSON = "shadow.json"
REPORT_HTML = "shadow.html"
SMALL_CELL = 5  # histogram cells with fewer records are blanked on the page
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
N_BOOT = 1000


@dataclass(frozen=True)
class LiveComparison:
    """The gate's paired comparison on the labelled live requests (``shadow - champion``)."""

    metric: str
    labelled: int
    patients: int
    positives: int
    champion: float
    shadow: float
    difference: float
    difference_ci: tuple[float, float]
    margin: float
    verdict: str  # training.governance.non_inferiority's


@dataclass(frozen=True)
class ShadowReport:
    """What the shadow version would have done on a window of the champion's traffic."""

    usecase: str
    since: datetime
    until: datetime
    champion_version: str
    shadow_version: str
    champion_rows: int  # the champion version's answers in the window
    paired: int  # of those, the ones with a shadow answer
    patients: int  # distinct patients (requests without one count as one each)
    both_alert: int
    champion_only: int
    shadow_only: int
    neither: int
    alert_rate_champion: float
    alert_rate_shadow: float
    alert_rate_difference_ci: tuple[float, float]
    score_quantiles: dict[str, list[float]]  # "champion"/"shadow" -> QUANTILES
    ks_distance: float
    rank_correlation: float
    labelled: int
    comparison: LiveComparison | None
    why_no_comparison: str | None
    histogram: dict[str, Any] = field(repr=False)  # edges and counts, small cells blanked

    @property
    def coverage(self) -> float:
        return self.paired / self.champion_rows if self.champion_rows else math.nan

    @property
    def agreement(self) -> float:
        return (self.both_alert + self.neither) / self.paired if self.paired else math.nan

    @property
    def alert_rate_difference(self) -> float:
        return self.alert_rate_shadow - self.alert_rate_champion

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document.update(
            coverage=self.coverage,
            agreement=self.agreement,
            alert_rate_difference=self.alert_rate_difference,
            since=self.since.isoformat(),
            until=self.until.isoformat(),
        )
        return _json_safe(document)

    def lines(self) -> list[str]:
        """What the command line prints."""
        per_100 = 100 * self.alert_rate_difference
        low, high = (100 * v for v in self.alert_rate_difference_ci)
        lines = [
            f"shadow version {self.shadow_version} vs champion version {self.champion_version}, "
            f"{self.since:%Y-%m-%d %H:%M}..{self.until:%Y-%m-%d %H:%M} UTC: "
            f"{self.paired:,} of {self.champion_rows:,} answers paired ({self.coverage:.1%})",
            f"agreement at each model's threshold {self.agreement:.1%}: both alert "
            f"{self.both_alert:,}, champion only {self.champion_only:,}, shadow only "
            f"{self.shadow_only:,}, neither {self.neither:,}",
            f"alert rate champion {100 * self.alert_rate_champion:.1f}, shadow "
            f"{100 * self.alert_rate_shadow:.1f} per 100: difference {per_100:+.1f} "
            f"[{low:+.1f}, {high:+.1f}]",
            f"scores: Kolmogorov-Smirnov distance {self.ks_distance:.3f}, rank correlation "
            f"{self.rank_correlation:.3f}",
        ]
        c = self.comparison
        if c is None:
            lines.append(f"labelled comparison: none ({self.why_no_comparison})")
        else:
            lines.append(
                f"labelled comparison on {c.labelled:,} requests ({c.patients:,} patients, "
                f"{c.positives:,} positives): {c.metric} shadow {c.shadow:.4f} vs champion "
                f"{c.champion:.4f}, difference {c.difference:+.4f} "
                f"[{c.difference_ci[0]:+.4f}, {c.difference_ci[1]:+.4f}]; {c.verdict} "
                f"(margin -{c.margin:g})"
            )
        return lines

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """``shadow.json`` and ``shadow.html`` in ``out_dir`` (created)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        data, page = out_dir / REPORT_JSON, out_dir / REPORT_HTML
        write_atomic(data, json.dumps(self.to_dict(), indent=2))
        write_atomic(page, render_html(self))
        return data, page


def pair_answers(log: pd.DataFrame, champion: str, shadow: str) -> tuple[pd.DataFrame, int]:
    """Each record's champion and shadow answers side by side.

    A request's rows are logged in record order, by each version, so the ``k``-th row of a
    request from one version is the same record as the ``k``-th from the other.

    Returns:
        The pairs (``request_id``, ``time``, ``patient``, ``p_champion``, ``p_shadow``,
        ``label_champion``, ``label_shadow``, and the champion row's other columns), and
        the number of the champion version's answers in ``log``.
    """
    if log.empty or "model_version" not in log.columns:
        return pd.DataFrame(), 0
    is_shadow = _shadow_rows(log)
    version = log["model_version"].astype(str)
    served = log[~is_shadow & (version == champion)].copy()
    shadowed = log[is_shadow & (version == shadow)]
    served["record"] = served.groupby("request_id", sort=False).cumcount()
    mirrored = pd.DataFrame(
        {
            "request_id": shadowed["request_id"].to_numpy(),
            "record": shadowed.groupby("request_id", sort=False).cumcount().to_numpy(),
            "p_shadow": shadowed["probability"].to_numpy(dtype=float),
            "label_shadow": shadowed["label"].to_numpy(),
        }
    )
    pairs = served.merge(mirrored, on=["request_id", "record"], how="inner", validate="1:1")
    pairs = pairs.rename(columns={"probability": "p_champion", "label": "label_champion"})
    pairs["p_champion"] = pairs["p_champion"].astype(float)
    return pairs.reset_index(drop=True), len(served)


def shadow_report(
    spec: UseCaseSpec,
    log: pd.DataFrame,
    labels: pd.DataFrame | None,
    since: datetime,
    until: datetime,
    *,
    champion: str,
    shadow: str,
    thresholds: dict[str, float],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> ShadowReport:
    """The shadow version against the champion on the window's logged requests.

    Args:
        spec: the use case: classes, primary metric, promotion margins.
        log: the prediction log with shadow rows (``read_predictions(..., shadow=True)``).
        labels: the stored outcomes (``read_labels``), or None.
        since, until: the window (for the report's title; ``log`` is already cut to it).
        champion, shadow: the two versions compared.
        thresholds: version -> operating threshold, for the labelled comparison's
            sensitivity and alert rate.

    Raises:
        ClinmlError: no record of the window has both answers.
    """
    from clinml.monitoring.performance import join_labels

    pairs, champion_rows = pair_answers(log, champion, shadow)
    if pairs.empty:
        raise ClinmlError(
            f"no request between {since:%Y-%m-%d %H:%M} and {until:%Y-%m-%d %H:%M} UTC has "
            f"answers from both champion version {champion} and shadow version {shadow}: is "
            f"the shadow on (`clinml shadow status {spec.name}`) and the service logging?"
        )
    positive = spec.label.positive_class
    alert_c = (pairs["label_champion"] == positive).to_numpy()
    alert_s = (pairs["label_shadow"] == positive).to_numpy()
    clusters = _clusters(pairs)
    p_c, p_s = pairs["p_champion"].to_numpy(), pairs["p_shadow"].to_numpy()
    comparison, why = None, "no outcomes stored"
    labelled_rows = 0
    if labels is not None and not labels.empty:
        # The outcomes join to the champion's rows (request id, or patient and time).
        as_logged = pairs.assign(probability=p_c, label=pairs["label_champion"])
        labelled = join_labels(as_logged, labels)
        labelled_rows = len(labelled)
        comparison, why = _live_comparison(
            spec, labelled, champion, shadow, thresholds, n_boot, seed
        )
    return ShadowReport(
        usecase=spec.name,
        since=since,
        until=until,
        champion_version=champion,
        shadow_version=shadow,
        champion_rows=champion_rows,
        paired=len(pairs),
        patients=len(np.unique(clusters)),
        both_alert=int((alert_c & alert_s).sum()),
        champion_only=int((alert_c & ~alert_s).sum()),
        shadow_only=int((~alert_c & alert_s).sum()),
        neither=int((~alert_c & ~alert_s).sum()),
        alert_rate_champion=float(alert_c.mean()),
        alert_rate_shadow=float(alert_s.mean()),
        alert_rate_difference_ci=clustered_mean_interval(
            alert_s.astype(float) - alert_c.astype(float), clusters
        ),
        score_quantiles={
            "champion": [float(v) for v in np.quantile(p_c, QUANTILES)],
            "shadow": [float(v) for v in np.quantile(p_s, QUANTILES)],
        },
        ks_distance=ks_distance(p_c, p_s),
        rank_correlation=_rank_correlation(p_c, p_s),
        labelled=labelled_rows,
        comparison=comparison,
        why_no_comparison=None if comparison is not None else why,
        histogram=_histogram(p_c, p_s),
    )


def _live_comparison(
    spec: UseCaseSpec,
    labelled: pd.DataFrame,
    champion: str,
    shadow: str,
    thresholds: dict[str, float],
    n_boot: int,
    seed: int,
) -> tuple[LiveComparison | None, str]:
    from clinml.training.governance import non_inferiority
    from clinml.training.metrics import paired_bootstrap

    minimum = spec.promotion.min_comparison_events
    y = labelled["outcome"].to_numpy(dtype=int)
    positives = int(y.sum())
    if positives < minimum or len(y) - positives < minimum:
        return None, (
            f"{len(y):,} labelled requests with {positives:,} positives; at least {minimum} "
            "positives and negatives are needed to compare"
        )
    result = paired_bootstrap(
        y,
        labelled["p_shadow"].to_numpy(dtype=float),
        labelled["p_champion"].to_numpy(dtype=float),
        thresholds[shadow],
        thresholds[champion],
        groups=_clusters(labelled),
        n_boot=n_boot,
        seed=seed,
        n_bins=spec.evaluation.calibration_bins,
    )
    metric, margin = spec.primary_metric, spec.promotion.max_metric_drop
    ci = result.difference_ci[metric]
    return LiveComparison(
        metric=metric,
        labelled=result.rows,
        patients=result.patients,
        positives=result.positives,
        champion=result.reference[metric],
        shadow=result.new[metric],
        difference=result.difference[metric],
        difference_ci=(float(ci[0]), float(ci[1])),
        margin=margin,
        verdict=non_inferiority(ci, margin),
    ), ""


def clustered_mean_interval(
    values: np.ndarray, clusters: np.ndarray, z: float = 1.959964
) -> tuple[float, float]:
    """A 95% interval for the mean of ``values`` whose rows are correlated within
    ``clusters`` (a patient's several requests): the cluster-robust (sandwich) variance
    of a mean, with the small-sample factor G / (G - 1) for G clusters."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan)
    mean = float(values.mean())
    codes, _ = pd.factorize(clusters)
    groups = int(codes.max()) + 1
    if groups < 2:
        return (math.nan, math.nan)
    sums = np.bincount(codes, weights=values - mean, minlength=groups)
    variance = groups / (groups - 1) * float((sums**2).sum()) / n**2
    half = z * math.sqrt(variance)
    return (mean - half, mean + half)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The largest gap between the empirical distribution functions of ``a`` and ``b``."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def _clusters(pairs: pd.DataFrame) -> np.ndarray:
    """The patient of each row; a row without one (a ``/predict`` call) is its own."""
    patient = pairs["patient"] if "patient" in pairs.columns else pd.Series(None, pairs.index)
    own = "request:" + pairs["request_id"].astype(str) + ":" + pairs.index.astype(str)
    return patient.where(patient.notna(), own).astype(str).to_numpy()


def _shadow_rows(log: pd.DataFrame) -> np.ndarray:
    if SHADOW_COLUMN not in log.columns:
        return np.zeros(len(log), dtype=bool)
    return log[SHADOW_COLUMN].fillna(False).astype(bool).to_numpy()


def _histogram(p_c: np.ndarray, p_s: np.ndarray, bins: int = 20) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, _, _ = np.histogram2d(p_c, p_s, bins=[edges, edges])
    counts[counts < SMALL_CELL] = 0
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figure(report: ShadowReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from clinml.monitoring.performance_report import _png

    figure = Figure(figsize=(9, 3.8))
    joint, margins = figure.subplots(1, 2)
    edges = np.asarray(report.histogram["edges"])
    counts = np.asarray(report.histogram["counts"], dtype=float)
    shown = np.ma.masked_where(counts == 0, counts)
    mesh = joint.pcolormesh(edges, edges, shown.T, cmap="Blues")
    figure.colorbar(mesh, ax=joint, label="records")
    joint.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    joint.set_xlabel(f"champion (version {report.champion_version})")
    joint.set_ylabel(f"shadow (version {report.shadow_version})")
    joint.set_title("paired scores (cells under 5 records blank)", fontsize=9)
    centres = (edges[:-1] + edges[1:]) / 2
    margins.step(centres, counts.sum(axis=1), where="mid", label="champion")
    margins.step(centres, counts.sum(axis=0), where="mid", label="shadow")
    margins.set_xlabel("probability")
    margins.set_ylabel("records")
    margins.set_title(f"score distributions (KS distance {report.ks_distance:.3f})", fontsize=9)
    margins.legend(fontsize="small")
    figure.tight_layout()
    png = base64.b64encode(_png(figure)).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{png}" alt="paired scores"></figure>'


def render_html(report: ShadowReport) -> str:
    """The report as one self-contained page: aggregates only, no script, no link."""
    from clinml.training.card import PAGE_CSS

    title = f"Shadow report: {report.usecase}"
    lines = "".join(f"<li>{_esc(line)}</li>" for line in report.lines())
    quantiles = "".join(
        f"<tr><th>{_esc(name)}</th>"
        + "".join(f'<td class="num">{v:.3f}</td>' for v in values)
        + "</tr>"
        for name, values in report.score_quantiles.items()
    )
    header = "".join(f"<th>{q:.0%}</th>" for q in QUANTILES)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{_esc(title)}</title>",
            f"<style>{PAGE_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_esc(title)}</h1>",
            f'<p class="subtitle">made {datetime.now(UTC):%Y-%m-%d %H:%M} UTC</p>',
            f"<ul>{lines}</ul>",
            _figure(report),
            "<h2>Score quantiles</h2>",
            f"<table><thead><tr><th></th>{header}</tr></thead><tbody>{quantiles}</tbody></table>",
            "<p>Agreement and alert rates use each model's own operating threshold. The "
            "alert-rate interval is cluster-robust over patients; the labelled comparison is "
            "the promotion gate's paired patient-level bootstrap, judged for "
            "non-inferiority at the spec's <code>promotion.max_metric_drop</code>.</p>",
            "</body>",
            "</html>",
            "",
        ]
    )
