"""Calibration intercept/slope/O-E, the smoothed curve, decision curves and their plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, special
from sklearn.linear_model import LogisticRegression

from clinml.training import calibration
from clinml.training.calibration import (
    CalibrationSummary,
    calibration_summary,
    decision_curve,
    decision_thresholds,
    plot_decision_curve,
    plot_smoothed_calibration,
    smoothed_calibration,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _calibrated(n: int, seed: int, miscalibration: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from a true risk; ``p = sigmoid(miscalibration * true logit)``.

    1.0 is a perfectly calibrated model; 2.0 an overconfident one (true slope 0.5).
    """
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-1.5, 1.0, n)
    y = (rng.random(n) < special.expit(true_logit)).astype(int)
    return y, special.expit(miscalibration * true_logit)


def _sklearn_unpenalised() -> LogisticRegression:
    # C=inf is scikit-learn 1.8+'s spelling of penalty=None (penalty is deprecated there).
    return LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000)


# --- point estimates against references -------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slope_matches_sklearn(seed: int) -> None:
    y, p = _calibrated(800, seed, miscalibration=1.6)
    p = np.round(p, 3)  # ties and some exact zeros exercise the clipping
    x = special.logit(np.clip(p, calibration._CLIP, 1 - calibration._CLIP))
    reference = _sklearn_unpenalised().fit(x[:, None], y)
    summary = calibration_summary(y, p)
    assert summary.slope == pytest.approx(reference.coef_[0, 0], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intercept_solves_its_score_equation(seed: int) -> None:
    # scikit-learn has no offset, so the intercept is checked against a 1-D root solve of
    # sum(y - expit(a + logit(p))) = 0, the equation that defines it.
    y, p = _calibrated(800, seed, miscalibration=0.7)
    x = special.logit(p)
    root = optimize.brentq(lambda a: np.sum(y - special.expit(a + x)), -10, 10, xtol=1e-14)
    assert calibration_summary(y, p).intercept == pytest.approx(root, abs=1e-8)


def test_spline_fit_matches_sklearn_on_the_same_basis() -> None:
    y, p = _calibrated(1500, 3, miscalibration=1.5)
    x = special.logit(p)
    knots = calibration._knots(x, 4)
    design = calibration._spline_basis(x, knots)
    reference = _sklearn_unpenalised().fit(design[:, 1:], y)
    grid = np.array([0.05, 0.2, 0.5])
    at = calibration._spline_basis(special.logit(grid), knots)
    expected = special.expit(reference.intercept_[0] + at[:, 1:] @ reference.coef_[0])
    curve = smoothed_calibration(y, p, grid=grid)
    np.testing.assert_allclose(curve["observed"], expected, atol=1e-6)


def test_spline_is_linear_beyond_the_outer_knots() -> None:
    knots = np.array([-3.0, -1.0, 0.5, 2.0])
    x = np.array([2.0, 3.0, 4.0, 5.0, -3.0, -4.0, -5.0])
    basis = calibration._spline_basis(x, knots)
    # Second differences vanish outside [t_1, t_k]: every column is linear there.
    np.testing.assert_allclose(np.diff(basis[:4], n=2, axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.diff(basis[4:], n=2, axis=0), 0.0, atol=1e-9)


def test_intervals_match_statsmodels_cluster_robust() -> None:
    # statsmodels is no dependency of the module; it is installed with Evidently and serves
    # here as an independent implementation of the cluster-robust sandwich.
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(4)
    n, patients = 1200, 400
    groups = rng.integers(0, patients, n)
    shared = rng.normal(0, 1, patients)[groups]
    linear = rng.normal(-1.0, 1.2, n)
    y = (rng.random(n) < special.expit(0.3 + 0.8 * linear + 0.7 * shared)).astype(int)
    p = special.expit(linear)
    summary = calibration_summary(y, p, groups=groups)
    cluster = {"cov_type": "cluster", "cov_kwds": {"groups": groups}}
    family = sm.families.Binomial()
    offset = sm.GLM(y, np.ones((n, 1)), family=family, offset=linear).fit(**cluster)
    slope = sm.GLM(y, sm.add_constant(linear), family=family).fit(**cluster)
    np.testing.assert_allclose(summary.intercept_interval, offset.conf_int()[0], atol=1e-6)
    np.testing.assert_allclose(summary.slope_interval, slope.conf_int()[1], atol=1e-6)


# --- behaviour --------------------------------------------------------------------------------


def test_calibrated_model_on_a_large_sample() -> None:
    y, p = _calibrated(50_000, 5)
    summary = calibration_summary(y, p)
    assert summary.intercept == pytest.approx(0.0, abs=0.05)
    assert summary.slope == pytest.approx(1.0, abs=0.05)
    assert summary.observed_expected == pytest.approx(1.0, abs=0.03)
    assert summary.intercept_interval[0] < 0 < summary.intercept_interval[1]
    assert summary.slope_interval[0] < 1 < summary.slope_interval[1]
    assert summary.observed_expected_interval[0] < 1 < summary.observed_expected_interval[1]
    assert (summary.rows, summary.patients, summary.events) == (50_000, 50_000, int(y.sum()))
    assert summary.notes == ""


def test_overconfident_model_has_slope_one_half() -> None:
    y, p = _calibrated(50_000, 6, miscalibration=2.0)
    summary = calibration_summary(y, p)
    assert summary.slope == pytest.approx(0.5, abs=0.03)
    assert summary.slope_interval[1] < 1


def test_observed_expected_is_the_ratio_of_sums() -> None:
    y = np.array([1, 0, 0, 1, 0, 0])
    p = np.array([0.5, 0.1, 0.2, 0.4, 0.3, 0.1])
    assert calibration_summary(y, p).observed_expected == pytest.approx(2 / 1.6)


def _coverage(groups: np.ndarray | None, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Whether each interval (intercept, slope, O/E) covers the truth (0, 1, 1)."""
    summary = calibration_summary(y, p, groups=groups)
    truth = {"intercept": 0.0, "slope": 1.0, "observed_expected": 1.0}
    return np.array(
        [
            getattr(summary, f"{name}_interval")[0]
            <= value
            <= getattr(summary, f"{name}_interval")[1]
            for name, value in truth.items()
        ]
    )


def test_cluster_robust_intervals_cover_when_patients_repeat_rows() -> None:
    # 300 patients, each with 3 identical rows (same risk, same outcome): the rows carry the
    # information of 300, not 900. Cluster-robust 95% intervals should cover about 95% of the
    # time; row-level ones, treating the copies as independent, about 74% (z = 1.96 / sqrt 3).
    rng = np.random.default_rng(7)
    patients, copies, repetitions = 300, 3, 200
    groups = np.repeat(np.arange(patients), copies)
    robust = np.zeros(3)
    naive = np.zeros(3)
    for _ in range(repetitions):
        risk = special.expit(rng.normal(-1.0, 1.0, patients))
        outcome = (rng.random(patients) < risk).astype(int)
        y, p = np.repeat(outcome, copies), np.repeat(risk, copies)
        robust += _coverage(groups, y, p)
        naive += _coverage(None, y, p)
    robust /= repetitions
    naive /= repetitions
    assert ((robust >= 0.90) & (robust <= 0.99)).all(), robust
    assert (naive < 0.85).all(), naive


# --- when the data cannot support an estimate -------------------------------------------------


def test_separation_gives_nan_slope_with_a_note() -> None:
    # 143 rows whose predictions rank every malignancy above every benign case (AUROC 1), as a
    # small pathology test set can: the maximum-likelihood slope is infinite.
    rng = np.random.default_rng(8)
    y = np.r_[np.zeros(90), np.ones(53)].astype(int)
    p = np.r_[rng.uniform(0.0, 0.45, 90), rng.uniform(0.55, 1.0, 53)]
    summary = calibration_summary(y, p)
    assert math.isnan(summary.slope)
    assert all(math.isnan(v) for v in summary.slope_interval)
    assert "separate" in summary.notes
    assert math.isfinite(summary.intercept)  # calibration-in-the-large is still defined
    assert math.isfinite(summary.observed_expected)
    curve = smoothed_calibration(y, p)
    assert curve[["observed", "low", "high"]].isna().all().all()
    assert curve.attrs["notes"]


def test_near_separation_still_gives_a_finite_slope_with_a_wide_interval() -> None:
    # One benign case above one malignancy: the estimate exists, and its interval says how
    # little 143 rows tell.
    rng = np.random.default_rng(9)
    y = np.r_[np.zeros(90), np.ones(53)].astype(int)
    p = np.r_[rng.uniform(0.0, 0.45, 89), 0.6, 0.4, rng.uniform(0.55, 1.0, 52)]
    summary = calibration_summary(y, p)
    assert math.isfinite(summary.slope)
    assert summary.slope_interval[1] - summary.slope_interval[0] > 1
    assert summary.notes == ""


def test_one_outcome_class_gives_nans_with_a_note() -> None:
    summary = calibration_summary(np.zeros(50, dtype=int), np.linspace(0.01, 0.3, 50))
    assert math.isnan(summary.intercept) and math.isnan(summary.slope)
    assert summary.observed_expected == 0.0
    assert "non-events" in summary.notes


def test_constant_predictions_give_nan_slope() -> None:
    y = np.array([0, 1, 0, 0, 1, 0])
    summary = calibration_summary(y, np.full(6, 0.3))
    assert math.isnan(summary.slope)
    assert summary.intercept == pytest.approx(special.logit(2 / 6) - special.logit(0.3))
    assert "same" in summary.notes


def test_to_dict_is_flat() -> None:
    y, p = _calibrated(500, 10)
    summary = calibration_summary(y, p, groups=np.arange(500) // 2)
    flat = summary.to_dict()
    assert flat["slope"] == summary.slope
    assert (flat["slope_low"], flat["slope_high"]) == summary.slope_interval
    assert flat["patients"] == 250
    assert isinstance(summary, CalibrationSummary)
    assert all(isinstance(v, int | float | str) for v in flat.values())


def test_input_checks() -> None:
    y, p = _calibrated(100, 11)
    with pytest.raises(ValueError, match="groups"):
        calibration_summary(y, p, groups=np.arange(99))
    with pytest.raises(ValueError, match="level"):
        calibration_summary(y, p, level=95)
    with pytest.raises(ValueError, match="matching"):
        calibration_summary(y[:-1], p)
    with pytest.raises(ValueError, match="n_knots"):
        smoothed_calibration(y, p, n_knots=2)
    with pytest.raises(ValueError, match="grid"):
        smoothed_calibration(y, p, grid=[0.1, 1.5])


# --- smoothed curve ---------------------------------------------------------------------------


def test_smoothed_curve_of_a_calibrated_model_follows_the_diagonal() -> None:
    y, p = _calibrated(5000, 12)
    groups = np.arange(5000) // 2
    curve = smoothed_calibration(y, p, groups=groups)
    assert list(curve.columns) == ["predicted", "observed", "low", "high"]
    assert curve["predicted"].min() >= np.percentile(p, 1) - 1e-12
    assert curve["predicted"].max() <= np.percentile(p, 99) + 1e-12
    assert (curve["low"] <= curve["observed"]).all() and (curve["observed"] <= curve["high"]).all()
    inside = (curve["low"] <= curve["predicted"]) & (curve["predicted"] <= curve["high"])
    assert inside.mean() >= 0.9
    assert np.abs(curve["observed"] - curve["predicted"]).max() < 0.05


def test_smoothed_curve_shows_overconfidence() -> None:
    y, p = _calibrated(5000, 13, miscalibration=2.0)
    curve = smoothed_calibration(y, p)
    top = curve.iloc[-1]
    # Overconfident: the highest predicted risks are too high, beyond the band.
    assert top["high"] < top["predicted"]


def test_smoothed_curve_with_few_distinct_predictions_falls_back_to_a_line() -> None:
    rng = np.random.default_rng(14)
    p = rng.choice([0.1, 0.2, 0.4], 600, p=[0.8, 0.15, 0.05])
    y = (rng.random(600) < p).astype(int)
    curve = smoothed_calibration(y, p, grid=[0.1, 0.2, 0.4])
    assert curve["observed"].notna().all()


# --- decision curve ---------------------------------------------------------------------------


def test_net_benefit_by_hand() -> None:
    y = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.35, 0.2, 0.1, 0.2, 0.5, 0.05, 0.3, 0.25])
    table = decision_curve(y, p, thresholds=[0.2, 0.3])
    # t = 0.2: alerts p >= 0.2 -> TP 3 (0.9, 0.4, 0.2), FP 5 (0.35, 0.2, 0.5, 0.3, 0.25).
    # t = 0.3: TP 2 (0.9, 0.4), FP 3 (0.35, 0.5, 0.3).
    expected = [3 / 10 - 5 / 10 * 0.2 / 0.8, 2 / 10 - 3 / 10 * 0.3 / 0.7]
    np.testing.assert_allclose(table["net_benefit"], expected)
    np.testing.assert_allclose(table["net_benefit_all"], [0.3 - 0.7 * 0.25, 0.3 - 0.7 * 0.3 / 0.7])
    assert (table["net_benefit_none"] == 0).all()
    assert list(table.columns) == [
        "threshold",
        "net_benefit",
        "net_benefit_all",
        "net_benefit_none",
    ]


def test_decision_curve_default_grid_and_extremes() -> None:
    y, p = _calibrated(2000, 15)
    table = decision_curve(y, p)
    assert table["threshold"].iloc[0] == 0.01 and table["threshold"].iloc[-1] == 0.99
    prevalence = y.mean()
    np.testing.assert_allclose(
        table["net_benefit_all"],
        prevalence - (1 - prevalence) * table["threshold"] / (1 - table["threshold"]),
    )
    # At a threshold below every prediction, the model alerts everyone: it is treat-all.
    low = decision_curve(y, p, thresholds=[p.min() / 2])
    assert low["net_benefit"].iloc[0] == pytest.approx(low["net_benefit_all"].iloc[0])
    with pytest.raises(ValueError, match="between 0 and 1"):
        decision_curve(y, p, thresholds=[0.1, 1.0])


def test_a_calibrated_model_beats_both_defaults_near_the_prevalence() -> None:
    y, p = _calibrated(20_000, 16)
    table = decision_curve(y, p, thresholds=[y.mean()])
    row = table.iloc[0]
    assert row["net_benefit"] > max(row["net_benefit_all"], row["net_benefit_none"])


def test_decision_thresholds_span_the_operating_threshold() -> None:
    grid = decision_thresholds(0.137)
    assert 0.137 in grid
    assert grid.min() == pytest.approx(0.137 / 3) and grid.max() == pytest.approx(0.411)
    assert (np.diff(grid) > 0).all()
    wide = decision_thresholds(0.05, prevalence=0.3)
    assert wide.max() == pytest.approx(0.3) and 0.05 in wide
    high = decision_thresholds(0.6)
    assert high.max() == pytest.approx(0.99) and (high > 0).all()
    with pytest.raises(ValueError, match="operating_threshold"):
        decision_thresholds(1.0)


# --- plots ------------------------------------------------------------------------------------


def test_plots_write_pngs(tmp_path: Path) -> None:
    y, p = _calibrated(1500, 17)
    _, overconfident = _calibrated(1500, 17, miscalibration=2.0)
    curves = {"calibrated": (y, p), "overconfident": (y, overconfident)}
    groups = np.arange(1500) // 3
    written = plot_smoothed_calibration(curves, tmp_path / "plots" / "calibration.png", groups)
    decision = plot_decision_curve(
        curves, {"calibrated": 0.2, "overconfident": 0.3}, tmp_path / "decision.png"
    )
    for path in (written, decision):
        assert path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="not in curves"):
        plot_decision_curve(curves, {"gbm": 0.2}, tmp_path / "x.png")
