"""Clinical evaluation metrics for a binary classifier, with fast bootstrap intervals.

Every function takes ``y`` (1 for the positive class, 0 otherwise) and ``p`` (the predicted
probability of the positive class); threshold metrics alert when ``p >= threshold``.
:mod:`clinml.training.evaluate` calls these functions; so do the tests, which check them against
scikit-learn.

How the arithmetic is organised: every metric here is a function of non-negative per-row
weights (1 for a plain evaluation, the number of times a row was drawn for a bootstrap
resample). The rows are grouped once, in :class:`_Design`, into

* the distinct probabilities among the positives (ascending),
* for the negatives, "buckets" between and at those probabilities, and
* per-row linear statistics (true/false positives, squared error, calibration residual per
  bin), summed per resampling unit (a row, or a patient).

A block of ``B`` resamples is then a ``(units x B)`` matrix of draw counts, and every metric for
all ``B`` resamples at once is one sparse matrix product followed by cumulative sums over the
positives. AUROC and average precision need the negatives only through those buckets, so the
work per resample is proportional to the number of rows once (the sparse product) plus the
number of distinct positive probabilities (the timing: docs/benchmarks.md, "Training").
``point_metrics`` runs exactly the same code with unit weights, so the plain metrics and
the bootstrap cannot disagree.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import sparse, stats

METRICS: tuple[str, ...] = (
    "roc_auc",
    "average_precision",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "brier",
    "ece",
    "alert_rate",
    "observed_expected",
)
# alert_rate (the share of rows at or above the threshold) is a workload, and
# observed_expected (observed positives / the sum of predicted probabilities, ideally 1)
# a calibration ratio: neither is better higher; both are listed as not higher-is-better.
HIGHER_IS_BETTER: dict[str, bool] = {
    name: name not in ("brier", "ece", "alert_rate", "observed_expected") for name in METRICS
}

# Metrics reported as 0.0 (scikit-learn's zero_division=0) when their denominator is zero.
_ZERO_WHEN_UNDEFINED = ("sensitivity", "specificity", "precision", "f1")
# Bootstrap blocks hold about this many (unit x resample) cells per array: large enough that
# numpy's per-call overhead vanishes, small enough (8 MB arrays) that a block's working set
# stays near 50 MB; larger blocks measured slower, not faster.
_BLOCK_CELLS = 1_000_000
# Blocks run on this many threads at most (numpy and scipy release the GIL in the heavy
# calls); each thread holds one block, so memory stays near 50 MB per thread at 200 000 rows.
_MAX_THREADS = 2
# Rows of _Design.matrix after the n_bins calibration residual rows.
_TP, _FP, _SQUARED_ERROR = range(3)
_LINEAR_ROWS = 3


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _check_inputs(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``y`` as 0/1 int8 and ``p`` as float64, after checking they describe the same rows."""
    y_arr = np.asarray(y)
    p_arr = np.asarray(p, dtype=float)
    if y_arr.ndim != 1 or p_arr.ndim != 1:
        raise ValueError("y and p must be one-dimensional arrays, one entry per prediction")
    if len(y_arr) != len(p_arr):
        raise ValueError(f"y has {len(y_arr)} rows but p has {len(p_arr)}; pass matching arrays")
    if len(y_arr) == 0:
        raise ValueError("no rows to evaluate; pass at least one prediction")
    if not np.isin(y_arr, (0, 1)).all():
        raise ValueError("y must hold only 0 (negative) and 1 (positive); recode the outcome")
    if not (np.isfinite(p_arr).all() and (p_arr >= 0).all() and (p_arr <= 1).all()):
        raise ValueError("p must hold probabilities in [0, 1]; got values outside or NaN")
    return y_arr.astype(np.int8), p_arr


def _check_weights(weights: ArrayLike | None, n_rows: int) -> np.ndarray:
    """Per-row weights as float64, ones when ``weights`` is None."""
    if weights is None:
        return np.ones(n_rows)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_rows,):
        raise ValueError(f"weights must have one entry per row ({n_rows}); got shape {w.shape}")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("weights must be finite and non-negative")
    return w


def _check_bins(n_bins: int) -> int:
    """``n_bins`` as an int, after checking there is at least one bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1; got {n_bins}")
    return int(n_bins)


def _calibration_bin(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability: ``[k/n_bins, (k+1)/n_bins)``, 1.0 in the last."""
    return np.minimum((p * n_bins).astype(np.intp), n_bins - 1)


def _unit_codes(groups: ArrayLike | None, n_rows: int) -> tuple[np.ndarray, int]:
    """Each row's resampling unit (0..units-1) and the number of units."""
    if groups is None:
        return np.arange(n_rows), n_rows
    codes, uniques = pd.factorize(np.asarray(groups))
    if len(codes) != n_rows:
        raise ValueError(f"groups has {len(codes)} entries but there are {n_rows} rows")
    if (codes < 0).any():
        raise ValueError("groups has missing patient ids; every row needs one")
    return codes.astype(np.intp), len(uniques)


# ---------------------------------------------------------------------------------------------
# The shared weighted implementation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Design:
    """One evaluation's rows, arranged so every metric is linear algebra on unit weights.

    ``matrix @ weights`` (``weights`` is ``(units, B)``) gives, for each of ``B`` weightings,
    these rows, where ``v_0 < ... < v_{m-1}`` are the distinct probabilities of the positives:

    * ``[0, m)``: positive weight at ``p == v_i``;
    * ``[m, 3m + 1)``: negative weight in buckets: ``2i`` holds ``v_{i-1} < p < v_i``
      (``v_{-1} = -inf``), ``2i + 1`` holds ``p == v_i``, the last one ``p > v_{m-1}``;
    * then ``n_bins`` rows of ``sum w (p - y)`` per calibration bin, the true positives and
      false positives at the threshold, and ``sum w (p - y)^2``.

    One sparse product (scipy's, single-threaded) replaces a dense BLAS one on purpose:
    multithreaded OpenBLAS was seen to take seconds for a ``(15 x 200 000) @ (200 000 x 40)``
    product when the other core was busy.
    """

    matrix: sparse.csr_array
    m: int
    n_bins: int


def _design(
    y: np.ndarray, p: np.ndarray, threshold: float, n_bins: int, units: np.ndarray, n_units: int
) -> _Design:
    """Group the rows once; see :class:`_Design` for the layout.

    Args:
        y: 0/1 outcomes.
        p: probabilities.
        threshold: rows with ``p >= threshold`` are predicted positive.
        n_bins: calibration bins.
        units: each row's resampling unit, ``0 .. n_units - 1`` (a row or a patient).
        n_units: number of units.
    """
    positive = y == 1
    values, run = np.unique(p[positive], return_inverse=True)
    m = len(values)
    p_neg = p[~positive]
    below = np.searchsorted(values, p_neg, side="left")
    tied = np.zeros(len(p_neg), dtype=bool)
    inside = below < m
    tied[inside] = values[below[inside]] == p_neg[inside]

    residual = p - y
    predicted = p >= threshold
    linear = 3 * m + 1
    # (matrix row, unit, value) triplets; duplicates are summed by the sparse constructor.
    triplets = [
        (run.ravel(), units[positive], np.ones(len(run))),
        (m + 2 * below + tied, units[~positive], np.ones(len(p_neg))),
        (linear + _calibration_bin(p, n_bins), units, residual),
    ]
    for row, mask in ((_TP, positive & predicted), (_FP, ~positive & predicted)):
        count = int(mask.sum())
        triplets.append((np.full(count, linear + n_bins + row), units[mask], np.ones(count)))
    triplets.append((np.full(len(p), linear + n_bins + _SQUARED_ERROR), units, residual**2))
    rows, cols, data = (np.concatenate(parts) for parts in zip(*triplets, strict=True))
    shape = (linear + n_bins + _LINEAR_ROWS, n_units)
    matrix = sparse.csr_array((data.astype(float), (rows, cols)), shape=shape)
    return _Design(matrix=matrix, m=m, n_bins=n_bins)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio, NaN where the denominator is zero (the metric is undefined)."""
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _ranking_metrics(
    positives: np.ndarray, negatives: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC (ties count half) and average precision from run/bucket weights.

    Args:
        positives: ``(m, B)`` positive weight at each distinct positive probability.
        negatives: ``(2m + 1, B)`` negative weight per bucket (see :class:`_Design`).
        n_pos: ``(B,)`` total positive weight.
        n_neg: ``(B,)`` total negative weight.
    """
    ties = negatives[1::2]
    # Negatives with p <= v_i, then those strictly below v_i.
    through = np.cumsum(negatives[0:-1:2] + ties, axis=0)
    below = through - ties
    # AUROC = sum_i P_i * (N_below_i + N_tied_i / 2) / (P * N).
    auc = _divide(np.einsum("ij,ij->j", positives, through - 0.5 * ties), n_pos * n_neg)
    # Average precision, scikit-learn's step form: thresholds at the distinct probabilities in
    # descending order; recall rises by P_i / P at v_i, where precision is TP_i / (TP_i + FP_i).
    # Thresholds where no positive sits add no recall, so only the v_i are needed.
    tp = np.cumsum(positives[::-1], axis=0)[::-1]
    alerts = tp + (n_neg - below)
    precision = np.divide(tp, alerts, out=np.zeros_like(tp), where=alerts > 0)
    ap = _divide(np.einsum("ij,ij->j", positives, precision), n_pos)
    ap[n_neg == 0] = np.nan  # one class: as undefined as AUROC
    return auc, ap


def _weighted_metrics(design: _Design, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric in METRICS for each column of ``weights``.

    Args:
        design: the grouped rows.
        weights: ``(units, B)`` non-negative weight of each unit in each of ``B`` evaluations.

    Returns:
        Metric name -> ``(B,)`` values, NaN where the metric is undefined (zero denominator).
    """
    stacked = design.matrix @ weights
    m, bins = design.m, design.n_bins
    positives, negatives, linear = stacked[:m], stacked[m : 3 * m + 1], stacked[3 * m + 1 :]
    tp, fp, squared = (linear[bins + row] for row in (_TP, _FP, _SQUARED_ERROR))
    n_pos, n_neg = positives.sum(axis=0), negatives.sum(axis=0)
    total = n_pos + n_neg
    fn = n_pos - tp
    tn = n_neg - fp
    auc, ap = _ranking_metrics(positives, negatives, n_pos, n_neg)
    return {
        "roc_auc": auc,
        "average_precision": ap,
        "accuracy": _divide(tp + tn, total),
        "sensitivity": _divide(tp, tp + fn),
        "specificity": _divide(tn, tn + fp),
        "precision": _divide(tp, tp + fp),
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
        "brier": _divide(squared, total),
        # ECE = sum_b (W_b / W) |mean p_b - rate_b| = sum_b |sum_b w (p - y)| / W.
        "ece": _divide(np.abs(linear[:bins]).sum(axis=0), total),
        "alert_rate": _divide(tp + fp, total),
        # sum w p = sum w y + sum w (p - y), the residuals summed over the calibration bins.
        "observed_expected": _divide(n_pos, n_pos + linear[:bins].sum(axis=0)),
    }


# ---------------------------------------------------------------------------------------------
# Point estimates
# ---------------------------------------------------------------------------------------------


def point_metrics(
    y: ArrayLike,
    p: ArrayLike,
    threshold: float,
    n_bins: int = 10,
    weights: ArrayLike | None = None,
) -> dict[str, float]:
    """Every metric in :data:`METRICS` on one set of predictions.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        threshold: rows with ``p >= threshold`` are predicted positive.
        n_bins: equal-width calibration bins for ``ece``.
        weights: optional non-negative per-row weights (scikit-learn's ``sample_weight``).

    Returns:
        Metric name -> value. ``roc_auc`` and ``average_precision`` are NaN when ``y`` holds
        one class; ``sensitivity``, ``specificity``, ``precision`` and ``f1`` are 0.0 when
        their denominator is zero (scikit-learn's ``zero_division=0``).
    """
    y_arr, p_arr = _check_inputs(y, p)
    n_bins = _check_bins(n_bins)
    w = _check_weights(weights, len(y_arr))
    units = np.arange(len(y_arr))
    design = _design(y_arr, p_arr, threshold, n_bins, units, len(y_arr))
    values = _weighted_metrics(design, w[:, None])
    out = {name: float(values[name][0]) for name in METRICS}
    for name in _ZERO_WHEN_UNDEFINED:
        if math.isnan(out[name]):
            out[name] = 0.0
    return out


def expected_calibration_error(
    y: ArrayLike, p: ArrayLike, n_bins: int = 10, weights: ArrayLike | None = None
) -> float:
    """Expected calibration error over equal-width bins on [0, 1].

    ``sum_b (W_b / W) * |mean p in b - observed positive rate in b|`` with ``W_b`` the (weighted)
    rows in bin ``b = [k/n_bins, (k+1)/n_bins)``; ``p == 1.0`` falls in the last bin.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        n_bins: number of bins.
        weights: optional non-negative per-row weights.

    Returns:
        The ECE, in [0, 1]; NaN when every weight is zero.
    """
    y_arr, p_arr = _check_inputs(y, p)
    w = _check_weights(weights, len(y_arr))
    units = np.arange(len(y_arr))
    design = _design(y_arr, p_arr, 0.5, _check_bins(n_bins), units, len(y_arr))
    return float(_weighted_metrics(design, w[:, None])["ece"][0])


def ece_by_chance(
    p: ArrayLike, n_bins: int = 10, n_sim: int = 200, quantile: float = 0.95, seed: int = 0
) -> float:
    """The ECE a perfectly calibrated model would show on these rows by chance alone.

    Outcomes are drawn as ``y ~ Bernoulli(p)`` ``n_sim`` times and the ``quantile`` of
    their ECE is returned. On a small test set this noise floor is large (about 0.08 for
    100 rows), so a calibration limit below it cannot be judged from the data.
    """
    p_arr = np.asarray(p, dtype=float)
    bins = _calibration_bin(p_arr, _check_bins(n_bins))
    rng = np.random.default_rng(seed)
    values = np.empty(n_sim)
    chunk = max(1, 4_000_000 // max(len(p_arr), 1))
    for start in range(0, n_sim, chunk):
        size = min(chunk, n_sim - start)
        drawn = rng.random((size, len(p_arr))) < p_arr
        residual = p_arr - drawn  # (size, rows)
        per_bin = np.zeros((size, n_bins))
        for b in np.unique(bins):
            per_bin[:, b] = residual[:, bins == b].sum(axis=1)
        values[start : start + size] = np.abs(per_bin).sum(axis=1) / len(p_arr)
    return float(np.quantile(values, quantile))


def calibration_table(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> pd.DataFrame:
    """The reliability table behind the ECE: one row per non-empty equal-width bin.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        n_bins: number of bins on [0, 1].

    Returns:
        Columns ``lower``, ``upper`` (the bin's edges), ``n`` (rows in it),
        ``mean_predicted`` and ``observed_rate``, in ascending bin order.
    """
    y_arr, p_arr = _check_inputs(y, p)
    n_bins = _check_bins(n_bins)
    bins = _calibration_bin(p_arr, n_bins)
    n = np.bincount(bins, minlength=n_bins)
    filled = np.flatnonzero(n)
    sum_p = np.bincount(bins, weights=p_arr, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y_arr.astype(float), minlength=n_bins)
    return pd.DataFrame(
        {
            "lower": filled / n_bins,
            "upper": (filled + 1) / n_bins,
            "n": n[filled].astype(int),
            "mean_predicted": sum_p[filled] / n[filled],
            "observed_rate": sum_y[filled] / n[filled],
        }
    )


def confusion(y: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, int]:
    """Confusion counts at the threshold (``p >= threshold`` is predicted positive).

    Returns:
        ``{"tn": ..., "fp": ..., "fn": ..., "tp": ...}`` as Python ints.
    """
    y_arr, p_arr = _check_inputs(y, p)
    actual = y_arr == 1
    predicted = p_arr >= threshold
    return {
        "tn": int((~actual & ~predicted).sum()),
        "fp": int((~actual & predicted).sum()),
        "fn": int((actual & ~predicted).sum()),
        "tp": int((actual & predicted).sum()),
    }


@dataclass(frozen=True)
class BudgetWindow:
    """The period over which a team spends an alert budget, as the data see it.

    Attributes:
        rows: predictions in one period (e.g. a month of discharges).
        rows_per_patient: mean predictions per distinct patient within one period (1 when
            nobody comes twice in a period).
    """

    rows: float
    rows_per_patient: float = 1.0


def choose_threshold(
    y: ArrayLike,
    p: ArrayLike,
    *,
    min_sensitivity: float | None = None,
    max_alerts_per_100: float | None = None,
    groups: ArrayLike | None = None,
    confidence: float | None = None,
    window: BudgetWindow | None = None,
    periods: ArrayLike | None = None,
) -> float:
    """The operating threshold by exactly one clinical rule.

    Candidate thresholds are the distinct positive values of ``p`` (a threshold of 0 would alert
    everyone, and any ``t`` between two distinct values alerts the same rows as the upper one).
    Rows tied at a probability are alerted together, so ties cannot be split: the achieved
    sensitivity can exceed ``min_sensitivity`` and the achieved alert rate can fall well below
    ``max_alerts_per_100`` when many rows share the boundary probability.

    With ``confidence`` the rule must hold at a one-sided confidence bound rather than at
    the point estimate (a threshold picked where the rule is just met on these rows falls
    short on new rows about half the time):

    - ``min_sensitivity``: the highest threshold whose sensitivity's lower Wilson bound
      still reaches the target; the bound uses the effective number of positives (the
      positives divided by the design effect of patients with several positive rows);
    - ``max_alerts_per_100``: the lowest threshold whose alert rate's upper bound is within
      the budget. With ``window`` the bound also covers the chance variation of one period
      of new rows (a prediction bound): the team spends its budget on the patients who
      actually arrive in a period, not on a long-run average. Rows of one patient within
      a period are correlated; their design effect is carried over from the patients'
      rows here by Kish's ``1 + (m - 1) rho`` with ``m`` the period's rows per patient.
      With ``periods`` (each row's period: consecutive budget windows) the variation of
      the alert rate *between* periods beyond chance (a winter case mix, a busy month) is
      added too, estimated by the method of moments from the periods' alert rates.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class (e.g. out-of-fold).
        min_sensitivity: pick the highest threshold whose sensitivity is still at least this
            (the fewest alerts that reach the target).
        max_alerts_per_100: pick the lowest threshold that alerts at most this many rows per
            100 (the most sensitive threshold within the budget). If even the highest
            probability alerts too often, the next float above it is returned: nobody alerted.
        groups: patient id per row, for the design effect (rows otherwise independent).
        confidence: one-sided confidence level of the bound (e.g. 0.95); None: point rule.
        window: with ``max_alerts_per_100`` and ``confidence``: one budget period.
        periods: with ``window``: each row's budget period (any labels; periods with fewer
            than 30 rows are left out of the between-period variance).

    Returns:
        The threshold, a Python float in (0, 1]; rows with ``p >= threshold`` alert. When even
        alerting every positive cannot bring the sensitivity's bound to the target (too few
        positives), the threshold that alerts every positive.

    Raises:
        ValueError: not exactly one rule given, a target out of range, no positives for
            ``min_sensitivity``, or no threshold in (0, 1] that satisfies the rule.
    """
    if (min_sensitivity is None) == (max_alerts_per_100 is None):
        raise ValueError("give exactly one of min_sensitivity and max_alerts_per_100")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1); got {confidence}")
    y_arr, p_arr = _check_inputs(y, p)
    candidates = np.unique(p_arr[p_arr > 0])  # ascending
    units, _ = _unit_codes(groups, len(y_arr))
    if min_sensitivity is not None:
        if confidence is None:
            return _fewest_alerts_threshold(y_arr, p_arr, candidates, min_sensitivity)
        z = float(stats.norm.ppf(confidence))
        return _fewest_alerts_threshold_bound(y_arr, p_arr, candidates, min_sensitivity, units, z)
    budget = float(max_alerts_per_100)  # type: ignore[arg-type]
    if confidence is None:
        return _alert_budget_threshold(p_arr, candidates, budget)
    z = float(stats.norm.ppf(confidence))
    period_codes = None if periods is None else _unit_codes(periods, len(y_arr))[0]
    return _alert_budget_threshold_bound(p_arr, candidates, budget, units, z, window, period_codes)


def _share_at_or_above(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each candidate threshold, the share of ``values`` that are ``>=`` it."""
    ordered = np.sort(values)
    return (len(ordered) - np.searchsorted(ordered, candidates, side="left")) / len(ordered)


def design_effect(alerted: np.ndarray, units: np.ndarray) -> float:
    """Variance inflation of a proportion whose rows come in clusters (patients).

    The cluster-robust (ratio-estimator) variance of ``mean(alerted)`` over the
    binomial one, floored at 1: 1 when every patient has one row, larger when a
    patient's rows tend to agree.
    """
    n = len(alerted)
    share = float(alerted.mean()) if n else 0.0
    clusters = int(units.max()) + 1 if n else 0
    if n == 0 or clusters < 2 or share in (0.0, 1.0):
        return 1.0
    per_unit = np.bincount(units, weights=alerted.astype(float), minlength=clusters)
    sizes = np.bincount(units, minlength=clusters)
    present = sizes > 0
    residual = per_unit[present] - share * sizes[present]
    m = int(present.sum())
    robust = m / max(m - 1, 1) * float((residual**2).sum()) / n**2
    return max(1.0, robust / (share * (1.0 - share) / n))


def between_period_variance(
    alerted: np.ndarray, periods: np.ndarray, effect: float = 1.0, min_rows: int = 30
) -> float:
    """Variance of a proportion between periods beyond what chance within a period gives.

    Method of moments: the variance of the periods' proportions minus the mean of their
    within-period sampling variances (``p (1 - p) effect / n_k``), floored at 0. Periods
    with fewer than ``min_rows`` rows (a partial first or last one) are left out.
    """
    sizes = np.bincount(periods)
    counts = np.bincount(periods, weights=alerted.astype(float))
    kept = sizes >= min_rows
    if kept.sum() < 3:
        return 0.0
    rates = counts[kept] / sizes[kept]
    overall = counts[kept].sum() / sizes[kept].sum()
    chance = overall * (1 - overall) * effect / sizes[kept]
    return max(0.0, float(rates.var(ddof=1) - chance.mean()))


def _wilson_bounds(share: np.ndarray, n: float, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score bounds of a proportion observed on ``n`` (effective) rows, unclipped."""
    centre = share + z * z / (2 * n)
    spread = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return (centre - spread) / scale, (centre + spread) / scale


def _wilson_lower(share: np.ndarray, n: float, z: float) -> np.ndarray:
    """Lower Wilson score bound of a proportion observed on ``n`` (effective) rows."""
    return _wilson_bounds(share, n, z)[0]


def wilson_interval(share: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson, JASA 1927;22:209-212).

    Unlike the normal (Wald) interval it stays within [0, 1] and keeps its coverage near 0
    and 1, where alert rates and sensitivities live.

    Args:
        share: the observed proportion, in [0, 1].
        n: the rows it was observed on; pass ``rows / design_effect(...)`` (an effective
            number) when rows come in clusters such as a patient's admissions.
        level: coverage, e.g. 0.95.

    Returns:
        ``(low, high)``; NaNs when ``n`` is not positive.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"share must be a proportion in [0, 1]; got {share}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1; got {level}")
    if not n > 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    lower, upper = _wilson_bounds(np.float64(share), n, z)
    # At 0 (or 1) the bound is exactly 0 (or 1); rounding would leave a speck above it.
    low = 0.0 if share == 0 else max(0.0, float(lower))
    high = 1.0 if share == 1 else min(1.0, float(upper))
    return (low, high)


def _fewest_alerts_threshold(
    y: np.ndarray, p: np.ndarray, candidates: np.ndarray, min_sensitivity: float
) -> float:
    """The highest candidate whose sensitivity is at least ``min_sensitivity``."""
    _check_sensitivity_target(y, min_sensitivity)
    # Sensitivity falls as the threshold rises; the same division as point_metrics uses, so
    # the reported sensitivity at the returned threshold is >= min_sensitivity exactly.
    meets = np.flatnonzero(_share_at_or_above(p[y == 1], candidates) >= min_sensitivity)
    if len(meets) == 0:
        raise ValueError(
            f"no threshold in (0, 1] reaches sensitivity {min_sensitivity:g}: positives "
            "predicted exactly 0 can never alert; lower min_sensitivity"
        )
    return float(candidates[meets[-1]])


def _check_sensitivity_target(y: np.ndarray, min_sensitivity: float) -> None:
    if not 0 <= min_sensitivity <= 1:
        raise ValueError(f"min_sensitivity must be in [0, 1]; got {min_sensitivity}")
    if not (y == 1).any():
        raise ValueError("min_sensitivity needs at least one positive row; y has none")


def _fewest_alerts_threshold_bound(
    y: np.ndarray,
    p: np.ndarray,
    candidates: np.ndarray,
    min_sensitivity: float,
    units: np.ndarray,
    z: float,
) -> float:
    """The highest candidate whose sensitivity's lower bound reaches ``min_sensitivity``."""
    _check_sensitivity_target(y, min_sensitivity)
    positive = y == 1
    p_pos, u_pos = p[positive], units[positive]
    sensitivity = _share_at_or_above(p_pos, candidates)
    n = len(p_pos)
    # The design effect depends (a little) on the threshold: settle it by iterating.
    threshold = _fewest_alerts_threshold(y, p, candidates, min_sensitivity)
    for _ in range(5):
        effective = n / design_effect(p_pos >= threshold, u_pos)
        meets = np.flatnonzero(_wilson_lower(sensitivity, effective, z) >= min_sensitivity)
        # Too few positives for the bound to reach the target: alert every positive.
        chosen = float(candidates[meets[-1]] if len(meets) else p_pos[p_pos > 0].min())
        if chosen == threshold:
            break
        threshold = chosen
    return threshold


def _alert_budget_threshold(p: np.ndarray, candidates: np.ndarray, per_100: float) -> float:
    """The lowest candidate alerting at most ``per_100`` rows in 100, else nobody alerted."""
    if not 0 <= per_100 <= 100:
        raise ValueError(f"max_alerts_per_100 must be in [0, 100]; got {per_100}")
    meets = np.flatnonzero(_share_at_or_above(p, candidates) <= per_100 / 100)
    if len(meets) > 0:
        return float(candidates[meets[0]])
    if p.max() == 1.0:
        raise ValueError(
            "rows predicted exactly 1.0 exceed the alert budget and no threshold in (0, 1] "
            "can silence them; raise max_alerts_per_100"
        )
    return float(np.nextafter(p.max(), 1.0))


def _alert_budget_threshold_bound(
    p: np.ndarray,
    candidates: np.ndarray,
    per_100: float,
    units: np.ndarray,
    z: float,
    window: BudgetWindow | None,
    periods: np.ndarray | None = None,
) -> float:
    """The lowest candidate whose alert rate's upper (prediction) bound is within budget."""
    threshold = _alert_budget_threshold(p, candidates, per_100)
    share = _share_at_or_above(p, candidates)
    n = len(p)
    rows_per_patient = n / (int(units.max()) + 1)
    for _ in range(5):
        alerted = p >= threshold
        effect = design_effect(alerted, units)
        variance = share * (1 - share) * effect / n
        if window is not None and window.rows > 0:
            # Kish: effect = 1 + (m - 1) rho; the same rho with a period's m.
            rho = (effect - 1) / (rows_per_patient - 1) if rows_per_patient > 1 else 0.0
            rho = min(max(rho, 0.0), 1.0)
            in_period = 1 + (max(window.rows_per_patient, 1.0) - 1) * rho
            variance = variance + share * (1 - share) * in_period / window.rows
            if periods is not None:
                variance = variance + between_period_variance(alerted, periods, in_period)
        meets = np.flatnonzero(share + z * np.sqrt(variance) <= per_100 / 100)
        chosen = float(candidates[meets[0]]) if len(meets) else float(np.nextafter(p.max(), 1.0))
        if chosen == threshold:
            break
        threshold = chosen
    return threshold


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _resample_block(
    designs: tuple[_Design, ...], n_units: int, size: int, stream: np.random.SeedSequence
) -> list[dict[str, np.ndarray]]:
    """Every metric of every design on the same ``size`` resamples of the units."""
    counts = _draw_counts(np.random.default_rng(stream), n_units, size)
    return [_weighted_metrics(design, counts) for design in designs]


def _bootstrap_draws(
    designs: tuple[_Design, ...], n_units: int, n_rows: int, n_boot: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """``n_boot`` resampled values of every metric, per design, on shared resamples.

    Every design sees the same resampled units in the same order, so differences between
    designs (two models on the same patients) are paired.
    """
    block = max(1, min(n_boot, _BLOCK_CELLS // max(n_rows, n_units)))
    sizes = [min(block, n_boot - start) for start in range(0, n_boot, block)]
    # One independent stream per block, so the result does not depend on thread scheduling.
    streams = np.random.SeedSequence(seed).spawn(len(sizes))
    threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(sizes)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        blocks = list(pool.map(partial(_resample_block, designs, n_units), sizes, streams))
    return [
        {name: np.concatenate([values[d][name] for values in blocks]) for name in METRICS}
        for d in range(len(designs))
    ]


def _draw_counts(rng: np.random.Generator, n_units: int, size: int) -> np.ndarray:
    """``(n_units, size)`` draw counts: each column is one resample of n_units with replacement."""
    draws = rng.integers(0, n_units, size=(size, n_units))
    counts = np.empty((n_units, size))
    for j in range(size):
        counts[:, j] = np.bincount(draws[j], minlength=n_units)
    return counts


def _defined(values: np.ndarray) -> np.ndarray | None:
    """The defined (non-NaN) values, or None when fewer than half the values are defined."""
    values = np.asarray(values, dtype=float)
    defined = values[~np.isnan(values)]
    if len(defined) == 0 or 2 * len(defined) < len(values):
        return None
    return defined


def percentile_interval(values: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values: their ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles, over the defined (non-NaN) values; NaNs if fewer than
    half are defined."""
    defined = _defined(values)
    if defined is None:
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(defined, [tail, 1.0 - tail])
    return (float(low), float(high))


def recentred_interval(
    values: ArrayLike, estimate: float, level: float = 0.95, lowest: float | None = None
) -> tuple[float, float]:
    """The percentile interval moved by the bootstrap's own bias, so it is centred on
    ``estimate``: for a statistic whose resamples sit to one side of it, such as ECE.

    The percentile interval takes the spread of the resampled values *around the estimate*
    as the spread of the estimate around what it estimates; that needs the resamples to be
    centred on the estimate (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
    ch. 13). ECE is a sum of absolute values, ``sum_b |sum_{i in b} (p_i - y_i)| / n``: the
    sampling noise in each bin's residual raises it, and resampling adds that noise a second
    time, so the resampled ECEs sit above the window's own ECE. A well-calibrated window then
    gets an interval above its estimate, sometimes excluding it (issue 18:
    ``ece 0.009 [0.011, 0.032]``).

    The bootstrap estimate of that extra bias is ``median(values) - estimate`` (ch. 10 of
    the same book, with the median for the mean so the result is certain to contain the
    estimate). Subtracting it from both ends gives

        ``(estimate - (median - q_low), estimate + (q_high - median))``,

    the resampled values' spread below and above their median, laid around the estimate. It
    is an interval for what the statistic measures on samples of this size, i.e. for ECE the
    expected ECE of a window with this many labels from the same patients, which is the
    quantity a fixed ECE ceiling is compared with. It always contains ``estimate`` (the
    median lies between the quantiles), and is clipped at ``lowest``.

    Why not the textbook corrections for the population ECE itself: the basic interval
    ``2 * estimate - q`` (Davison & Hinkley, *Bootstrap Methods and their Application*, 1997,
    section 5.2) excludes the estimate whenever the percentile interval does, and even with
    the bias-corrected estimate it covers the true ECE of a perfectly calibrated model far
    less often than its level says: at a true value on the boundary (0) the bootstrap cannot
    estimate the bias (Andrews, Econometrica 2000;68:399-405). The recentred interval keeps
    its coverage of the expected ECE for calibrated and miscalibrated models alike
    (``tests/model/test_metrics.py`` checks it; docs/monitoring.md gives the numbers).

    Args:
        values: the statistic on each resample (:func:`bootstrap_values`); NaNs are left
            out, and fewer than half defined gives ``(nan, nan)``.
        estimate: the statistic on the original rows.
        level: coverage, e.g. 0.95.
        lowest: the smallest value the statistic can take (0 for ECE); the lower end is
            clipped to it.

    Returns:
        ``(low, high)`` with ``low <= estimate <= high`` (or NaNs).
    """
    defined = _defined(values)
    if defined is None or math.isnan(estimate):
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2.0
    q_low, median, q_high = np.quantile(defined, [tail, 0.5, 1.0 - tail])
    # Differences of ordered values are >= 0 exactly, so the estimate stays inside even
    # after rounding.
    low = estimate - float(median - q_low)
    high = estimate + float(q_high - median)
    if lowest is not None:
        low = max(low, lowest)
    return (float(low), float(high))


def _check_bootstrap(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1; got {level}")


def bootstrap_ci(
    y: ArrayLike,
    p: ArrayLike,
    threshold: float,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for every metric in :data:`METRICS`.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        threshold: rows with ``p >= threshold`` are predicted positive.
        groups: optional patient id per row. When given this is a cluster bootstrap: patients
            are drawn with replacement and every row of a drawn patient counts once per draw,
            so the interval reflects the correlation between a patient's rows. Otherwise rows
            are drawn.
        n_boot: number of resamples.
        level: coverage of the interval, e.g. 0.95.
        seed: root of the random streams (``numpy.random.SeedSequence(seed)``, one child per
            block of resamples); equal inputs and seed give equal intervals.
        n_bins: calibration bins for ``ece``.

    Returns:
        Metric name -> ``(low, high)``. A resample where a metric is undefined (a zero
        denominator, e.g. no positives drawn) is left out for that metric, rather than counted
        as 0 as :func:`point_metrics` reports it; if fewer than half the resamples define it
        the interval is ``(nan, nan)``.
    """
    _check_bootstrap(n_boot, level)
    draws = bootstrap_values(y, p, threshold, groups, n_boot, seed, n_bins)
    return {name: percentile_interval(draws[name], level) for name in METRICS}


def bootstrap_values(
    y: ArrayLike,
    p: ArrayLike,
    threshold: float,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> dict[str, np.ndarray]:
    """Every metric in :data:`METRICS` on each of ``n_boot`` resamples.

    The values :func:`bootstrap_ci` summarises (the same resamples for the same arguments),
    for a caller that needs another interval than the percentile one, e.g.
    :func:`recentred_interval`.

    Args:
        y, p, threshold, groups, n_boot, seed, n_bins: as for :func:`bootstrap_ci`.

    Returns:
        Metric name -> ``(n_boot,)`` array, NaN in a resample where the metric is undefined
        (a zero denominator, e.g. no positives drawn).
    """
    _check_bootstrap(n_boot, 0.95)
    y_arr, p_arr = _check_inputs(y, p)
    units, n_units = _unit_codes(groups, len(y_arr))
    design = _design(y_arr, p_arr, threshold, _check_bins(n_bins), units, n_units)
    [draws] = _bootstrap_draws((design,), n_units, len(y_arr), n_boot, seed)
    return draws


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same rows: each one's metrics and their paired difference.

    ``difference[m]`` is ``new - reference`` on all rows, ``difference_ci[m]`` its
    percentile interval over patient-level resamples shared by both models (a patient
    drawn twice counts twice for both), so the correlation between the two models'
    errors on the same patients narrows the interval, as it should.
    """

    rows: int
    patients: int
    positives: int
    new: dict[str, float]
    reference: dict[str, float]
    difference: dict[str, float]
    difference_ci: dict[str, tuple[float, float]]
    new_ci: dict[str, tuple[float, float]]
    reference_ci: dict[str, tuple[float, float]]
    n_boot: int
    level: float

    @property
    def negatives(self) -> int:
        return self.rows - self.positives


def paired_bootstrap(
    y: ArrayLike,
    p_new: ArrayLike,
    p_reference: ArrayLike,
    threshold_new: float,
    threshold_reference: float,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    n_bins: int = 10,
) -> PairedComparison:
    """Paired, patient-level bootstrap of the difference between two models' metrics.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p_new: the new model's probabilities (e.g. the challenger's).
        p_reference: the reference model's probabilities on the same rows.
        threshold_new: the new model's operating threshold.
        threshold_reference: the reference model's operating threshold.
        groups: patient id per row (rows of a patient are resampled together).
        n_boot: resamples.
        level: coverage of the intervals.
        seed: root of the random streams.
        n_bins: calibration bins for ``ece``.

    Returns:
        Both models' point metrics and intervals, and the paired differences
        (``new - reference``) with their intervals.
    """
    _check_bootstrap(n_boot, level)
    y_arr, new_arr = _check_inputs(y, p_new)
    _, ref_arr = _check_inputs(y_arr, p_reference)
    units, n_units = _unit_codes(groups, len(y_arr))
    n_bins = _check_bins(n_bins)
    designs = (
        _design(y_arr, new_arr, threshold_new, n_bins, units, n_units),
        _design(y_arr, ref_arr, threshold_reference, n_bins, units, n_units),
    )
    new_draws, ref_draws = _bootstrap_draws(designs, n_units, len(y_arr), n_boot, seed)
    new_point = point_metrics(y_arr, new_arr, threshold_new, n_bins)
    ref_point = point_metrics(y_arr, ref_arr, threshold_reference, n_bins)
    return PairedComparison(
        rows=len(y_arr),
        patients=n_units,
        positives=int(y_arr.sum()),
        new=new_point,
        reference=ref_point,
        difference={name: new_point[name] - ref_point[name] for name in METRICS},
        difference_ci={
            name: percentile_interval(new_draws[name] - ref_draws[name], level) for name in METRICS
        },
        new_ci={name: percentile_interval(new_draws[name], level) for name in METRICS},
        reference_ci={name: percentile_interval(ref_draws[name], level) for name in METRICS},
        n_boot=n_boot,
        level=level,
    )


# ---------------------------------------------------------------------------------------------
# Subgroups
# ---------------------------------------------------------------------------------------------


def _group_row(
    attribute: str,
    group: str,
    rows: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    overall: dict[str, float],
    metrics: tuple[str, ...],
    min_size: int,
    n_bins: int,
) -> dict[str, object]:
    """One subgroup_table row for the rows at positions ``rows``."""
    n = len(rows)
    positives = int(y[rows].sum())
    evaluated = n >= min_size
    values = point_metrics(y[rows], p[rows], threshold, n_bins) if evaluated else {}
    row: dict[str, object] = {
        "attribute": attribute,
        "group": group,
        "n": n,
        "positives": positives,
        "prevalence": positives / n,
    }
    for name in metrics:
        value = values.get(name, math.nan)
        row[name] = value
        row[f"gap_{name}"] = value - overall[name]
    row["evaluated"] = evaluated
    return row


def subgroups(
    attributes: pd.DataFrame, columns: list[str], intersections: bool = True
) -> list[tuple[str, str, np.ndarray]]:
    """Every observed group: ``(attribute, group, row positions)``.

    Single attributes first, in ``columns`` order with values sorted, then (with
    ``intersections``) each pair of columns crossed, e.g. ``("sex x site", "F x hosp_a",
    rows)``. Rows with a missing attribute value belong to no group of that attribute.
    """
    frame = attributes.reset_index(drop=True)
    keys: list[list[str]] = [[c] for c in columns]
    if intersections:
        keys += [list(pair) for pair in itertools.combinations(columns, 2)]
    found = []
    for key in keys:
        groups = frame.groupby(key if len(key) > 1 else key[0], sort=True, observed=True)
        for value, positions in groups.indices.items():
            labels = value if isinstance(value, tuple) else (value,)
            found.append(
                (" x ".join(key), " x ".join(str(v) for v in labels), np.asarray(positions))
            )
    return found


def subgroup_table(
    attributes: pd.DataFrame,
    y: ArrayLike,
    p: ArrayLike,
    threshold: float,
    columns: list[str],
    min_size: int = 50,
    intersections: bool = True,
    metrics: tuple[str, ...] = ("roc_auc", "sensitivity", "specificity", "precision", "ece"),
    n_bins: int = 10,
) -> pd.DataFrame:
    """Metrics per subgroup of the sensitive attributes, and their gap to the overall value.

    Args:
        attributes: one row per prediction, in the order of ``y``/``p``, holding ``columns``.
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        threshold: rows with ``p >= threshold`` are predicted positive.
        columns: the sensitive attributes.
        min_size: groups with fewer rows are listed with ``evaluated=False`` and NaN metrics.
        intersections: also list every pair of columns (in ``columns`` order) crossed.
        metrics: names from :data:`METRICS` to report per group.
        n_bins: calibration bins for ``ece``.

    Returns:
        One row per observed group: single attributes first, in ``columns`` order with values
        sorted, then each pair's observed value combinations, sorted. Columns ``attribute``
        (``"sex"`` or ``"sex x site"``), ``group`` (``"F"`` or ``"F x hosp_a"``), ``n``,
        ``positives``, ``prevalence``, then per metric ``m``: ``m`` and ``gap_m`` (group
        minus overall, on all rows), and ``evaluated``. Rows with a missing attribute value
        belong to no group of that attribute.
    """
    y_arr, p_arr = _check_inputs(y, p)
    if len(attributes) != len(y_arr):
        raise ValueError(f"attributes has {len(attributes)} rows but y has {len(y_arr)}")
    missing = [c for c in columns if c not in attributes.columns]
    if missing:
        raise ValueError(f"attributes lacks the columns {', '.join(missing)}")
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    overall = point_metrics(y_arr, p_arr, threshold, n_bins)
    rows = [
        _group_row(
            attribute, group, positions, y_arr, p_arr, threshold, overall, metrics, min_size, n_bins
        )
        for attribute, group, positions in subgroups(attributes, columns, intersections)
    ]
    names = [c for m in metrics for c in (m, f"gap_{m}")]
    header = ["attribute", "group", "n", "positives", "prevalence", *names, "evaluated"]
    return pd.DataFrame(rows, columns=header)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: Path, n_bins: int = 10
) -> dict[str, Path]:
    """ROC, precision-recall and reliability plots for one or more sets of predictions.

    Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing global is
    touched and nothing is left open.

    Args:
        curves: label (e.g. candidate name) -> ``(y, p)``.
        out_dir: folder for the PNGs; created if missing.
        n_bins: bins of the reliability diagram.

    Returns:
        ``{"roc": ..., "precision_recall": ..., "calibration": ...}`` paths of the PNGs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        name: Figure(figsize=(5.5, 5)) for name in ("roc", "precision_recall", "calibration")
    }
    axes = {name: figure.add_subplot() for name, figure in figures.items()}
    prevalences: set[float] = set()
    for label, (y, p) in curves.items():
        y_arr, p_arr = _check_inputs(y, p)
        values = point_metrics(y_arr, p_arr, 0.5, n_bins)
        fpr, tpr, _ = roc_curve(y_arr, p_arr)
        axes["roc"].plot(fpr, tpr, label=f"{label} (AUROC {values['roc_auc']:.3f})")
        precision, recall, _ = precision_recall_curve(y_arr, p_arr)
        axes["precision_recall"].step(
            recall, precision, where="post", label=f"{label} (AP {values['average_precision']:.3f})"
        )
        prevalences.add(round(float(y_arr.mean()), 6))
        table = calibration_table(y_arr, p_arr, n_bins)
        axes["calibration"].plot(
            table["mean_predicted"],
            table["observed_rate"],
            marker="o",
            label=f"{label} (ECE {values['ece']:.3f})",
        )
    for prevalence in sorted(prevalences):
        axes["precision_recall"].axhline(
            prevalence, color="grey", linestyle="--", label=f"prevalence {prevalence:.3f}"
        )
    for name in ("roc", "calibration"):
        axes[name].plot(
            [0, 1],
            [0, 1],
            color="grey",
            linestyle="--",
            label="chance" if name == "roc" else "perfect",
        )
    titles = {
        "roc": ("ROC", "1 - specificity", "sensitivity"),
        "precision_recall": ("Precision-recall", "recall (sensitivity)", "precision"),
        "calibration": ("Reliability", "mean predicted probability", "observed positive rate"),
    }
    paths = {}
    for name, (title, x_label, y_label) in titles.items():
        ax = axes[name]
        ax.set(title=title, xlabel=x_label, ylabel=y_label, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="best", fontsize="small")
        paths[name] = out_dir / f"{name}.png"
        FigureCanvasAgg(figures[name]).print_png(str(paths[name]))
    return paths
