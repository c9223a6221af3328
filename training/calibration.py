"""Calibration and clinical usefulness of a risk model, as TRIPOD+AI asks for them.

A risk model is *calibrated* when its predicted risks match what happens: of the patients it
gives 20%, about 20 in 100 are readmitted. Discrimination (AUROC) says nothing about this, and
a well-ranked but miscalibrated model misleads every clinician who reads its number as a risk
(Van Calster et al., "Calibration: the Achilles heel of predictive analytics", BMC Med
2019;17:230). TRIPOD+AI (Collins et al., BMJ 2024;385:e078378) therefore asks for more than a
single ECE; this module reports, for a hospital ML team:

* **Observed/expected ratio** (:func:`calibration_summary`): events that happened divided by
  events the model predicted, ``sum(y) / sum(p)``. 1 is ideal; 1.2 means the model
  under-predicts overall risk by a sixth (the case mix or the outcome rate has drifted).
* **Calibration intercept** (calibration-in-the-large): ``a`` in
  ``logit P(y=1) = a + logit(p)``, fitted with ``logit(p)`` as a fixed offset. 0 is ideal;
  above 0 the model's risks are too low on average, below 0 too high. It is the log-odds
  version of O/E.
* **Calibration slope**: ``b`` in ``logit P(y=1) = a' + b * logit(p)``. 1 is ideal; below 1
  the predictions are too extreme (high risks too high, low risks too low: the usual sign of
  overfitting), above 1 too modest.
* **Flexible calibration curve** (:func:`smoothed_calibration`): observed risk as a smooth
  function of predicted risk, from a logistic regression on a restricted cubic spline of
  ``logit(p)``, with a pointwise confidence band. It shows *where* a model is off (e.g. fine
  below 10% but over-predicting the high-risk tail), which intercept and slope cannot. It
  replaces the binned reliability diagram, whose picture depends on the bins chosen
  (Van Calster et al., J Clin Epidemiol 2016;74:167-176, "A calibration hierarchy for risk
  models was defined"; Austin & Steyerberg, Stat Med 2014;33:517-535).
* **Decision curve** (:func:`decision_curve`): the net benefit of acting on the model at a
  threshold ``t``, ``TP/n - FP/n * t/(1-t)``, next to treating everybody and treating nobody
  (Vickers & Elkin, Med Decis Making 2006;26:565-574). ``t`` is the risk at which a clinician
  is indifferent between acting and not, so ``t/(1-t)`` is how many false alarms one true
  alert is worth. A model is clinically useful at ``t`` only if its net benefit beats both
  defaults there; :func:`decision_thresholds` gives a grid around the operating threshold.

Patients with several rows (admissions) make those rows correlated, so every interval here is
cluster-robust: the Huber-White sandwich variance summed over patients (Liang & Zeger,
Biometrika 1986;73:13-22), the small-sample factor ``G/(G-1) * (N-1)/(N-K)`` for ``G`` patients,
``N`` rows and ``K`` coefficients (as Stata and statsmodels use), and normal quantiles. The
logistic fits are Newton-Raphson (IRLS) with step-halving, written here so no statsmodels is
needed. A fit whose maximum-likelihood estimate does not exist (all rows one class, or
(quasi-)separation, which small near-perfectly discriminating test sets produce) gives NaN and
a note saying why, never a huge meaningless number.

Plots (:func:`plot_smoothed_calibration`, :func:`plot_decision_curve`) are drawn on matplotlib's
Agg canvas, as in :func:`clinml.training.metrics.plot_curves`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import special, stats

from clinml.training.metrics import _check_inputs, _unit_codes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Probabilities are clipped to this distance from 0 and 1 before the logit: a risk of
# exactly 0 (a forest leaf with no event) is read as 1 in 10 000, logit -9.2. A tighter
# clip (1e-10, logit -23) let a few such rows dominate the slope and the curve of forests.
_CLIP = 1e-4
# Newton-Raphson: at most this many iterations, each halving its step at most _MAX_HALVINGS
# times; converged when no coefficient moves by more than _TOLERANCE * (1 + the largest one).
_MAX_ITER = 50
_MAX_HALVINGS = 30
_TOLERANCE = 1e-10
# Harrell's knot placement (Regression Modeling Strategies, 2nd ed., table 2.3): quantiles of
# the predictor for 3 to 7 knots.
_KNOT_QUANTILES: dict[int, tuple[float, ...]] = {
    3: (0.10, 0.50, 0.90),
    4: (0.05, 0.35, 0.65, 0.95),
    5: (0.05, 0.275, 0.50, 0.725, 0.95),
    6: (0.05, 0.23, 0.41, 0.59, 0.77, 0.95),
    7: (0.025, 0.1833, 0.3417, 0.50, 0.6583, 0.8167, 0.975),
}
# The smoothed curve's default grid spans these percentiles of p, so it is not extrapolated
# into the sparse tails, in this many points.
_GRID_PERCENTILES = (1.0, 99.0)
_GRID_POINTS = 100
# decision_thresholds: the grid runs from the operating threshold divided by this to it
# multiplied by this, within [_LOWEST_THRESHOLD, _HIGHEST_THRESHOLD].
_THRESHOLD_SPAN = 3.0
_LOWEST_THRESHOLD = 0.001
_HIGHEST_THRESHOLD = 0.99


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, e.g. 0.95; got {level}")
    return float(level)


def _logit(p: np.ndarray) -> np.ndarray:
    """``logit(p)`` after clipping ``p`` to ``[_CLIP, 1 - _CLIP]``."""
    return special.logit(np.clip(p, _CLIP, 1.0 - _CLIP))


def _z(level: float) -> float:
    """The two-sided normal quantile for ``level`` (1.96 for 0.95)."""
    return float(stats.norm.ppf(0.5 + level / 2.0))


# ---------------------------------------------------------------------------------------------
# Logistic regression: Newton-Raphson with step-halving, cluster-robust covariance
# ---------------------------------------------------------------------------------------------


def _deviance(y: np.ndarray, eta: np.ndarray) -> float:
    """``-2 * log-likelihood`` of a logistic model with linear predictor ``eta``."""
    return 2.0 * float(np.sum(np.logaddexp(0.0, eta) - y * eta))


def _newton(
    x: np.ndarray, y: np.ndarray, offset: np.ndarray, start: np.ndarray
) -> np.ndarray | None:
    """Maximum-likelihood coefficients of ``logit P(y=1) = offset + x @ beta``.

    Returns:
        The coefficients, or None when Newton-Raphson did not converge in ``_MAX_ITER``
        iterations or met a singular information matrix (separation, a constant column).
    """
    beta = start.astype(float)
    eta = offset + x @ beta
    deviance = _deviance(y, eta)
    for _ in range(_MAX_ITER):
        mu = special.expit(eta)
        information = (x * (mu * (1.0 - mu))[:, None]).T @ x
        try:
            step = np.linalg.solve(information, x.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        if not np.isfinite(step).all():
            return None
        scale = _TOLERANCE * (1.0 + np.max(np.abs(beta)))
        for _ in range(_MAX_HALVINGS):
            candidate = beta + step
            candidate_eta = offset + x @ candidate
            candidate_deviance = _deviance(y, candidate_eta)
            # A little slack: at the optimum the deviance only changes by rounding.
            if candidate_deviance <= deviance + 1e-12 * (1.0 + deviance):
                break
            step = step / 2.0
        else:
            # No decrease along the Newton direction: at the optimum, or numerically stuck.
            return beta if np.max(np.abs(step)) < scale else None
        beta, eta, deviance = candidate, candidate_eta, candidate_deviance
        if np.max(np.abs(step)) < scale:
            return beta
    return None


def _robust_covariance(
    x: np.ndarray,
    y: np.ndarray,
    offset: np.ndarray,
    beta: np.ndarray,
    units: np.ndarray,
    n_units: int,
) -> np.ndarray:
    """Cluster-robust (sandwich) covariance of ``beta``, clusters given by ``units``.

    ``H^-1 (sum_g s_g s_g') H^-1 * G/(G-1) * (N-1)/(N-K)`` with ``H`` the information matrix and
    ``s_g`` the score summed over cluster ``g`` (Liang & Zeger 1986). All NaN with one cluster.
    """
    n_rows, k = x.shape
    if n_units < 2 or n_rows <= k:
        return np.full((k, k), np.nan)
    mu = special.expit(offset + x @ beta)
    bread = np.linalg.inv((x * (mu * (1.0 - mu))[:, None]).T @ x)
    residual = y - mu
    # Score per cluster: one bincount per coefficient, far faster than a grouped sum.
    scores = np.column_stack(
        [np.bincount(units, weights=x[:, j] * residual, minlength=n_units) for j in range(k)]
    )
    factor = n_units / (n_units - 1) * (n_rows - 1) / (n_rows - k)
    return factor * bread @ (scores.T @ scores) @ bread


def _interval(estimate: float, variance: float, z: float) -> tuple[float, float]:
    se = math.sqrt(variance) if variance >= 0 else math.nan
    return (estimate - z * se, estimate + z * se)


# ---------------------------------------------------------------------------------------------
# Summary: intercept, slope, observed/expected
# ---------------------------------------------------------------------------------------------

_NAN_INTERVAL = (math.nan, math.nan)


@dataclass(frozen=True)
class CalibrationSummary:
    """Calibration intercept, slope and observed/expected ratio with cluster-robust intervals.

    Attributes:
        intercept: calibration-in-the-large, ``a`` in ``logit P(y=1) = a + logit(p)``; 0 ideal.
        intercept_interval: its ``(low, high)`` interval.
        slope: ``b`` in ``logit P(y=1) = a' + b * logit(p)``; 1 ideal, below 1 too extreme.
        slope_interval: its ``(low, high)`` interval.
        observed_expected: ``sum(y) / sum(p)``; 1 ideal, above 1 the model under-predicts.
        observed_expected_interval: its ``(low, high)`` interval (delta method on the log).
        rows: predictions evaluated.
        patients: distinct patients (``rows`` when no patient ids were given).
        events: rows with ``y == 1``.
        level: coverage of the intervals, e.g. 0.95.
        notes: why an estimate or interval is NaN; empty when none is.
    """

    intercept: float
    intercept_interval: tuple[float, float]
    slope: float
    slope_interval: tuple[float, float]
    observed_expected: float
    observed_expected_interval: tuple[float, float]
    rows: int
    patients: int
    events: int
    level: float
    notes: str = ""

    def to_dict(self) -> dict[str, float | int | str]:
        """Flat ``{name: value}``, each interval as ``name_low`` and ``name_high``."""
        out: dict[str, float | int | str] = {}
        for name in ("intercept", "slope", "observed_expected"):
            low, high = getattr(self, f"{name}_interval")
            out[name] = getattr(self, name)
            out[f"{name}_low"] = low
            out[f"{name}_high"] = high
        out.update(
            rows=self.rows,
            patients=self.patients,
            events=self.events,
            level=self.level,
            notes=self.notes,
        )
        return out


def _separated(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether one predictor (quasi-)completely separates the outcomes.

    For a single predictor the maximum-likelihood slope is infinite exactly when every event
    lies on one side (ties allowed) of every non-event: AUROC 1 or 0.
    """
    events, others = x[y == 1], x[y == 0]
    return bool(events.min() >= others.max() or events.max() <= others.min())


def calibration_summary(
    y: ArrayLike, p: ArrayLike, groups: ArrayLike | None = None, level: float = 0.95
) -> CalibrationSummary:
    """Calibration intercept, slope and observed/expected ratio, with cluster-robust intervals.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class; clipped to ``[1e-10, 1 - 1e-10]``
            before the logit.
        groups: optional patient id per row. A patient's rows are correlated, so the intervals
            sum the sandwich's scores per patient; without ids every row is its own cluster.
        level: coverage of the intervals, e.g. 0.95.

    Returns:
        A :class:`CalibrationSummary`. An estimate whose fit has no maximum-likelihood solution
        (one outcome class; for the slope also (quasi-)separation, constant predictions or no
        convergence) is NaN with its interval, and ``notes`` says why. Intervals are NaN with
        a single patient.

    Raises:
        ValueError: mismatched or invalid ``y``/``p``/``groups``, or ``level`` outside (0, 1).
    """
    z = _z(_check_level(level))
    y_arr, p_arr = _check_inputs(y, p)
    units, n_units = _unit_codes(groups, len(y_arr))
    outcome = y_arr.astype(float)
    x = _logit(p_arr)
    rows, events = len(outcome), int(y_arr.sum())
    notes: list[str] = []
    if n_units < 2:
        notes.append("one patient only: no interval can be estimated")

    intercept, intercept_interval = math.nan, _NAN_INTERVAL
    slope, slope_interval = math.nan, _NAN_INTERVAL
    if events in (0, rows):
        notes.append(
            f"all {rows} rows are {'events' if events else 'non-events'}: intercept and slope "
            "have no finite estimate"
        )
    else:
        ones = np.ones((rows, 1))
        fit = _newton(ones, outcome, x, np.zeros(1))
        if fit is None:
            notes.append("intercept fit did not converge")
        else:
            cov = _robust_covariance(ones, outcome, x, fit, units, n_units)
            intercept = float(fit[0])
            intercept_interval = _interval(intercept, cov[0, 0], z)
        slope, slope_interval = _slope(x, outcome, units, n_units, z, notes)

    observed_expected, observed_expected_interval = _observed_expected(
        outcome, p_arr, units, n_units, z, notes
    )
    return CalibrationSummary(
        intercept=intercept,
        intercept_interval=intercept_interval,
        slope=slope,
        slope_interval=slope_interval,
        observed_expected=observed_expected,
        observed_expected_interval=observed_expected_interval,
        rows=rows,
        patients=n_units,
        events=events,
        level=float(level),
        notes="; ".join(notes),
    )


def _slope(
    x: np.ndarray,
    y: np.ndarray,
    units: np.ndarray,
    n_units: int,
    z: float,
    notes: list[str],
) -> tuple[float, tuple[float, float]]:
    """The calibration slope and its interval, or NaNs with a note appended to ``notes``."""
    if np.ptp(x) == 0:
        notes.append("every prediction is the same: the slope is not identifiable")
        return math.nan, _NAN_INTERVAL
    if _separated(x, y):
        notes.append(
            "slope not estimable: the predictions separate events from non-events "
            "(AUROC 1), so the fitted slope grows without bound; evaluate on more rows"
        )
        return math.nan, _NAN_INTERVAL
    design = np.column_stack([np.ones_like(x), x])
    fit = _newton(design, y, np.zeros_like(x), np.array([0.0, 1.0]))
    if fit is None:
        notes.append(
            f"slope fit did not converge in {_MAX_ITER} Newton steps (near-separation?); "
            "evaluate on more rows"
        )
        return math.nan, _NAN_INTERVAL
    cov = _robust_covariance(design, y, np.zeros_like(x), fit, units, n_units)
    slope = float(fit[1])
    return slope, _interval(slope, cov[1, 1], z)


def _observed_expected(
    y: np.ndarray,
    p: np.ndarray,
    units: np.ndarray,
    n_units: int,
    z: float,
    notes: list[str],
) -> tuple[float, tuple[float, float]]:
    """``sum(y) / sum(p)`` and a cluster-robust interval on the log scale.

    The ratio estimator's linearisation over patients: ``var(log O/E) ~= G/(G-1) *
    sum_g (O_g - R E_g)^2 / O^2`` with ``O_g``, ``E_g`` patient ``g``'s observed and expected
    events and ``R = O/E``.
    """
    observed, expected = float(y.sum()), float(p.sum())
    if expected == 0:
        notes.append("every prediction is 0: observed/expected is undefined")
        return math.nan, _NAN_INTERVAL
    ratio = observed / expected
    if observed == 0:
        notes.append("no events: observed/expected is 0 and has no log-scale interval")
        return ratio, _NAN_INTERVAL
    if n_units < 2:
        return ratio, _NAN_INTERVAL
    residual = np.bincount(units, weights=y - ratio * p, minlength=n_units)
    variance = n_units / (n_units - 1) * float(residual @ residual) / observed**2
    low, high = _interval(math.log(ratio), variance, z)
    return ratio, (math.exp(low), math.exp(high))


# ---------------------------------------------------------------------------------------------
# Flexible calibration curve
# ---------------------------------------------------------------------------------------------


def _knots(x: np.ndarray, n_knots: int) -> np.ndarray:
    """Harrell's quantile knots of ``x``, duplicates (ties, clipped predictions) dropped."""
    if n_knots not in _KNOT_QUANTILES:
        raise ValueError(f"n_knots must be one of {sorted(_KNOT_QUANTILES)}; got {n_knots}")
    return np.unique(np.quantile(x, _KNOT_QUANTILES[n_knots]))


def _spline_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Design ``[1, x, s_1(x), ..., s_{k-2}(x)]`` of a restricted (natural) cubic spline.

    Harrell's truncated-power form: linear beyond the outer knots, each non-linear term
    divided by ``(t_k - t_1)^2`` so all columns are on the scale of ``x``. With fewer than
    three knots the design is ``[1, x]``, the logistic recalibration line.
    """
    columns = [np.ones_like(x), x]
    k = len(knots)
    if k >= 3:
        first, before_last, last = knots[0], knots[-2], knots[-1]
        scale = (last - first) ** 2

        def cube(t: float) -> np.ndarray:
            return np.maximum(x - t, 0.0) ** 3

        tail_before_last, tail_last = cube(before_last), cube(last)
        for t in knots[:-2]:
            columns.append(
                (
                    cube(t)
                    - tail_before_last * (last - t) / (last - before_last)
                    + tail_last * (before_last - t) / (last - before_last)
                )
                / scale
            )
    return np.column_stack(columns)


def _default_grid(p: np.ndarray) -> np.ndarray:
    low, high = np.percentile(p, _GRID_PERCENTILES)
    return np.linspace(low, high, _GRID_POINTS) if high > low else np.array([low])


def smoothed_calibration(
    y: ArrayLike,
    p: ArrayLike,
    groups: ArrayLike | None = None,
    grid: ArrayLike | None = None,
    n_knots: int = 4,
    level: float = 0.95,
) -> pd.DataFrame:
    """Flexible calibration curve: observed risk as a smooth function of predicted risk.

    A logistic regression of ``y`` on a restricted cubic spline of ``logit(p)`` with knots at
    Harrell's quantiles, evaluated on a grid of predicted risks. Binned reliability diagrams
    change with the number and edges of the bins and hide miscalibration within a bin; a
    smooth curve with a confidence band is the "moderate calibration" check of Van Calster et
    al. (J Clin Epidemiol 2016;74:167-176, "A calibration hierarchy for risk models was
    defined"), and Austin & Steyerberg (Stat Med 2014;33:517-535) found such smoothers
    estimate the true calibration curve well. The band is pointwise, from the cluster-robust
    covariance on the linear-predictor (log-odds) scale, so it stays inside (0, 1).

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        groups: optional patient id per row, for the cluster-robust band.
        grid: predicted risks at which to evaluate the curve. By default 100 points from the
            1st to the 99th percentile of ``p``, so the curve is not extrapolated into the
            sparse tails.
        n_knots: 3 to 7 spline knots (Harrell: 4 suits most data, 3 small samples). Knots that
            coincide (many tied or clipped predictions) are merged; with fewer than three left
            the curve is the logistic recalibration line.
        level: coverage of the band, e.g. 0.95.

    Returns:
        Columns ``predicted`` (the grid), ``observed`` (estimated observed risk), ``low`` and
        ``high`` (the band), one row per grid point. When the fit has no maximum-likelihood
        solution (one outcome class, separation, no convergence) ``observed``, ``low`` and
        ``high`` are NaN and ``frame.attrs["notes"]`` says why; otherwise it is ``""``.

    Raises:
        ValueError: invalid inputs, ``n_knots`` not in 3..7, a grid value outside [0, 1], or
            ``level`` outside (0, 1).
    """
    z = _z(_check_level(level))
    y_arr, p_arr = _check_inputs(y, p)
    units, n_units = _unit_codes(groups, len(y_arr))
    if grid is None:
        grid_arr = _default_grid(p_arr)
    else:
        grid_arr = np.asarray(grid, dtype=float).ravel()
        if not (np.isfinite(grid_arr).all() and (grid_arr >= 0).all() and (grid_arr <= 1).all()):
            raise ValueError("grid must hold predicted risks in [0, 1]")
    x = _logit(p_arr)
    knots = _knots(x, n_knots)
    frame = pd.DataFrame({"predicted": grid_arr, "observed": np.nan, "low": np.nan, "high": np.nan})
    frame.attrs["notes"] = ""
    outcome = y_arr.astype(float)
    events = int(y_arr.sum())
    if events in (0, len(y_arr)):
        frame.attrs["notes"] = "all rows are one outcome class: no calibration curve"
        return frame
    if np.ptp(x) == 0:
        frame.attrs["notes"] = "every prediction is the same: no calibration curve"
        return frame
    design = _spline_basis(x, knots)
    start = np.zeros(design.shape[1])
    start[1] = 1.0  # the ideal curve, observed = predicted
    fit = _newton(design, outcome, np.zeros_like(x), start)
    if fit is None:
        frame.attrs["notes"] = (
            "calibration curve fit did not converge (separation on few rows?); "
            "evaluate on more rows or use fewer knots"
        )
        return frame
    cov = _robust_covariance(design, outcome, np.zeros_like(x), fit, units, n_units)
    at = _spline_basis(_logit(grid_arr), knots)
    eta = at @ fit
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", at, cov, at), 0.0))
    frame["observed"] = special.expit(eta)
    frame["low"] = special.expit(eta - z * se)
    frame["high"] = special.expit(eta + z * se)
    return frame


# ---------------------------------------------------------------------------------------------
# Decision curve
# ---------------------------------------------------------------------------------------------


def _check_thresholds(thresholds: ArrayLike) -> np.ndarray:
    t = np.asarray(thresholds, dtype=float).ravel()
    if len(t) == 0 or not (np.isfinite(t).all() and (t > 0).all() and (t < 1).all()):
        raise ValueError(
            "thresholds must be risks strictly between 0 and 1 (net benefit weighs false "
            "positives by t/(1-t), undefined at 1)"
        )
    return t


def decision_curve(y: ArrayLike, p: ArrayLike, thresholds: ArrayLike | None = None) -> pd.DataFrame:
    """Net benefit of acting on the model, of treating all and of treating none, per threshold.

    At threshold ``t`` the model alerts rows with ``p >= t`` (as everywhere in clinml) and its
    net benefit is ``TP/n - FP/n * t/(1-t)`` (Vickers & Elkin 2006): true alerts per patient,
    less false alerts weighted by the odds at which a clinician would be indifferent to acting.
    Treating all has ``prevalence - (1 - prevalence) * t/(1-t)``; treating none has 0.

    Args:
        y: 1 for the positive class, 0 otherwise.
        p: predicted probability of the positive class.
        thresholds: risks in (0, 1); by default 0.01, 0.02, ..., 0.99. See
            :func:`decision_thresholds` for a grid around an operating threshold.

    Returns:
        Columns ``threshold``, ``net_benefit``, ``net_benefit_all``, ``net_benefit_none``,
        one row per threshold in the order given.

    Raises:
        ValueError: invalid ``y``/``p``, or a threshold outside (0, 1).
    """
    y_arr, p_arr = _check_inputs(y, p)
    t = (
        np.round(np.arange(1, 100) / 100, 2)
        if thresholds is None
        else _check_thresholds(thresholds)
    )
    n = len(y_arr)
    positive = y_arr == 1
    # Rows at or above each threshold, counted by binary search in the sorted probabilities.
    events, others = np.sort(p_arr[positive]), np.sort(p_arr[~positive])
    tp = len(events) - np.searchsorted(events, t, side="left")
    fp = len(others) - np.searchsorted(others, t, side="left")
    odds = t / (1.0 - t)
    prevalence = len(events) / n
    return pd.DataFrame(
        {
            "threshold": t,
            "net_benefit": tp / n - fp / n * odds,
            "net_benefit_all": prevalence - (1.0 - prevalence) * odds,
            "net_benefit_none": np.zeros(len(t)),
        }
    )


def decision_thresholds(
    operating_threshold: float, prevalence: float | None = None, n_points: int = 50
) -> np.ndarray:
    """A threshold grid for a decision curve, around the operating threshold.

    Clinicians' thresholds differ, so the curve is read over a range: from a third of the
    operating threshold to three times it, widened to include ``prevalence`` (where treating
    all stops paying), within [0.001, 0.99].

    Args:
        operating_threshold: the model's alert threshold, in (0, 1).
        prevalence: optional event rate of the evaluation rows.
        n_points: evenly spaced points before the operating threshold is added.

    Returns:
        Ascending distinct thresholds, always including ``operating_threshold`` itself.

    Raises:
        ValueError: ``operating_threshold`` or ``prevalence`` outside (0, 1), or
            ``n_points < 2``.
    """
    if not 0 < operating_threshold < 1:
        raise ValueError(
            f"operating_threshold must be strictly between 0 and 1; got {operating_threshold}"
        )
    if prevalence is not None and not 0 < prevalence < 1:
        raise ValueError(f"prevalence must be strictly between 0 and 1; got {prevalence}")
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2; got {n_points}")
    anchors = [operating_threshold / _THRESHOLD_SPAN, operating_threshold * _THRESHOLD_SPAN]
    if prevalence is not None:
        anchors.append(prevalence)
    low = max(min(anchors), _LOWEST_THRESHOLD)
    high = min(max(anchors), _HIGHEST_THRESHOLD)
    grid = np.linspace(low, high, n_points) if high > low else np.array([low])
    return np.unique(np.append(grid, float(operating_threshold)))


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _groups_for(groups: Mapping[str, ArrayLike] | ArrayLike | None, label: str) -> ArrayLike | None:
    if groups is None or not isinstance(groups, Mapping):
        return groups
    return groups.get(label)


def _save(figure: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def plot_smoothed_calibration(
    curves: dict[str, tuple[ArrayLike, ArrayLike]],
    path: Path,
    groups: Mapping[str, ArrayLike] | ArrayLike | None = None,
    n_knots: int = 4,
) -> Path:
    """Smoothed calibration curves with bands, and where the predictions lie.

    The upper panel shows each label's :func:`smoothed_calibration` curve and band with the
    ideal diagonal, the legend its calibration intercept and slope; the lower panel the
    share of rows per predicted-risk bin, so a reader sees which part of each curve rests on
    many patients. Both axes stop a little above the largest risk drawn: readmission risks
    mostly sit below 0.3 and would be a sliver of a [0, 1] plot.

    Args:
        curves: label (e.g. candidate name) -> ``(y, p)``.
        path: the PNG to write; its folder is created if missing.
        groups: patient ids for the bands: one array for every label (they share rows) or
            label -> array; None treats each row as its own patient.
        n_knots: spline knots, as in :func:`smoothed_calibration`.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 6.5))
    top, bottom = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": (4, 1), "hspace": 0.08}
    )
    drawn: list[np.ndarray] = []
    limit = 0.0
    for index, (label, (y, p)) in enumerate(curves.items()):
        color = f"C{index}"
        label_groups = _groups_for(groups, label)
        curve = smoothed_calibration(y, p, groups=label_groups, n_knots=n_knots)
        summary = calibration_summary(y, p, groups=label_groups)
        estimable = curve["observed"].notna().all()
        legend = (
            f"{label} (intercept {summary.intercept:.2f}, slope {summary.slope:.2f})"
            if estimable
            else f"{label} (no curve: see its calibration notes)"
        )
        top.plot(curve["predicted"], curve["observed"], color=color, label=legend)
        top.fill_between(curve["predicted"], curve["low"], curve["high"], color=color, alpha=0.2)
        drawn.append(_check_inputs(y, p)[1])
        limit = max(limit, float(curve["predicted"].max()))
        if estimable:
            limit = max(limit, float(curve["observed"].max()))
    limit = min(1.0, math.ceil(max(limit, 0.01) * 1.1 * 20) / 20)  # up to the next 0.05
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
    top.set(
        title="Smoothed calibration",
        ylabel="observed risk",
        xlim=(0, limit),
        ylim=(0, limit),
    )
    top.legend(loc="upper left", fontsize="small")
    # Rows above the axis are left out of the histogram rather than piled into its last bin.
    edges = np.linspace(0, limit, 41)
    for index, p_arr in enumerate(drawn):
        bottom.hist(
            p_arr,
            bins=edges,
            weights=np.full(len(p_arr), 1 / len(p_arr)),
            histtype="step",
            color=f"C{index}",
        )
    bottom.set(xlabel="predicted risk", ylabel="share of rows")
    return _save(figure, path)


def plot_decision_curve(
    curves: dict[str, tuple[ArrayLike, ArrayLike]],
    operating_thresholds: dict[str, float],
    path: Path,
    thresholds: ArrayLike | None = None,
) -> Path:
    """Decision curves: each model's net benefit, treat-all and treat-none, per threshold.

    Args:
        curves: label (e.g. candidate name) -> ``(y, p)``.
        operating_thresholds: label -> the model's alert threshold, drawn as a dotted vertical
            line in the model's colour; labels without one get no line.
        path: the PNG to write; its folder is created if missing.
        thresholds: the x grid; by default the union of :func:`decision_thresholds` around
            each operating threshold (with the prevalence), or 0.01..0.99 when none is given.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    unknown = sorted(set(operating_thresholds) - set(curves))
    if unknown:
        raise ValueError(f"operating_thresholds names labels not in curves: {', '.join(unknown)}")
    checked = {label: _check_inputs(y, p) for label, (y, p) in curves.items()}
    if thresholds is None and operating_thresholds:
        grids = []
        for label, threshold in operating_thresholds.items():
            prevalence = float(checked[label][0].mean())
            grids.append(decision_thresholds(threshold, prevalence if 0 < prevalence < 1 else None))
        thresholds = np.unique(np.concatenate(grids))

    figure = Figure(figsize=(6.5, 5))
    ax = figure.add_subplot()
    treat_all: dict[float, pd.DataFrame] = {}
    top = 0.0
    for index, (label, (y_arr, p_arr)) in enumerate(checked.items()):
        table = decision_curve(y_arr, p_arr, thresholds)
        ax.plot(table["threshold"], table["net_benefit"], color=f"C{index}", label=label)
        if label in operating_thresholds:
            threshold = operating_thresholds[label]
            ax.axvline(
                threshold,
                color=f"C{index}",
                linestyle=":",
                label=f"{label} operating threshold {threshold:.3g}",
            )
        treat_all.setdefault(round(float(y_arr.mean()), 6), table)
        top = max(top, float(table["net_benefit"].max()), float(table["net_benefit_all"].max()))
    for prevalence, table in sorted(treat_all.items()):
        ax.plot(
            table["threshold"],
            table["net_benefit_all"],
            color="grey",
            linestyle="--",
            label=f"treat all (prevalence {prevalence:.3f})",
        )
    ax.axhline(0.0, color="black", linewidth=0.8, label="treat none")
    top = max(top, 0.01)
    # Treat-all plunges at high thresholds; keep the region where models differ readable.
    ax.set(
        title="Decision curve",
        xlabel="threshold risk",
        ylabel="net benefit",
        ylim=(-0.25 * top, 1.1 * top),
    )
    ax.legend(loc="upper right", fontsize="small")
    return _save(figure, path)
