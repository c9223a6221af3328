"""Clinical metrics: agreement with scikit-learn, hand-computed examples, the bootstrap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from clinml.training import metrics
from clinml.training.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    bootstrap_ci,
    bootstrap_values,
    calibration_table,
    choose_threshold,
    confusion,
    expected_calibration_error,
    percentile_interval,
    plot_curves,
    point_metrics,
    recentred_interval,
    subgroup_table,
    wilson_interval,
)


def _scores(n: int, seed: int, decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes at ~25% prevalence and informative probabilities, rounded to create ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(-1.0, 1.0, n) + 1.5 * y)))
    return y, (np.round(p, decimals) if decimals is not None else p)


def _sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (p >= threshold).astype(int)
    return {
        "roc_auc": skm.roc_auc_score(y, p),
        "average_precision": skm.average_precision_score(y, p),
        "accuracy": skm.accuracy_score(y, predicted),
        "sensitivity": skm.recall_score(y, predicted, zero_division=0),
        "specificity": skm.recall_score(1 - y, 1 - predicted, zero_division=0),
        "precision": skm.precision_score(y, predicted, zero_division=0),
        "f1": skm.f1_score(y, predicted, zero_division=0),
        "brier": skm.brier_score_loss(y, p),
        "alert_rate": float(predicted.mean()),
        "observed_expected": float(y.sum() / p.sum()),
    }


# --- point metrics -----------------------------------------------------------------------------


def test_metric_names_and_directions() -> None:
    assert set(HIGHER_IS_BETTER) == set(METRICS)
    assert [name for name in METRICS if not HIGHER_IS_BETTER[name]] == [
        "brier",
        "ece",
        "alert_rate",
        "observed_expected",
    ]


@pytest.mark.parametrize(("seed", "n", "decimals"), [(0, 300, 2), (1, 1000, 1), (2, 57, None)])
def test_point_metrics_match_sklearn_with_ties(seed: int, n: int, decimals: int | None) -> None:
    y, p = _scores(n, seed, decimals)
    threshold = float(np.median(p))  # a value of p itself, so rows sit exactly on it
    got = point_metrics(y, p, threshold)
    assert set(got) == set(METRICS)
    for name, expected in _sklearn_metrics(y, p, threshold).items():
        assert got[name] == pytest.approx(expected, abs=1e-12), name


def test_weighted_ranking_metrics_match_sklearn_sample_weight() -> None:
    y, p = _scores(400, seed=3, decimals=2)
    weights = np.random.default_rng(4).integers(0, 5, len(y))
    got = point_metrics(y, p, 0.3, weights=weights)
    assert got["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, p, sample_weight=weights), abs=1e-12
    )
    assert got["average_precision"] == pytest.approx(
        skm.average_precision_score(y, p, sample_weight=weights), abs=1e-12
    )
    # Integer weights are the same as repeating rows: every metric must agree.
    repeated = point_metrics(np.repeat(y, weights), np.repeat(p, weights), 0.3)
    for name in METRICS:
        assert got[name] == pytest.approx(repeated[name], abs=1e-12), name


def test_one_class_gives_nan_ranking_metrics_and_zero_division_zeros() -> None:
    y = np.zeros(6, dtype=int)
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.9])
    got = point_metrics(y, p, 0.5)
    assert math.isnan(got["roc_auc"])
    assert math.isnan(got["average_precision"])
    assert got["sensitivity"] == 0.0
    assert got["precision"] == 0.0  # 3 alerts, no true positive
    assert got["f1"] == 0.0
    assert got["specificity"] == pytest.approx(0.5)
    all_positive = point_metrics(np.ones(6, dtype=int), p, 0.5)
    assert math.isnan(all_positive["average_precision"])


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="0 \\(negative\\) and 1"):
        point_metrics([0, 2, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="probabilities"):
        point_metrics([0, 1, 1], [0.1, 1.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="rows"):
        point_metrics([0, 1], [0.1, 0.2, 0.3], 0.5)


# --- calibration -------------------------------------------------------------------------------

# Bins of width 0.1: [0.1, 0.2) holds 0.12 and 0.18; [0.5, 0.6) holds 0.55; the last bin
# [0.9, 1.0] holds 0.95 and 1.0.
CAL_Y = np.array([0, 1, 1, 0, 1])
CAL_P = np.array([0.12, 0.18, 0.55, 0.95, 1.0])


def test_ece_by_hand() -> None:
    # 2/5 * |0.15 - 0.5| + 1/5 * |0.55 - 1| + 2/5 * |0.975 - 0.5| = 0.14 + 0.09 + 0.19
    assert expected_calibration_error(CAL_Y, CAL_P) == pytest.approx(0.42, abs=1e-12)
    assert point_metrics(CAL_Y, CAL_P, 0.5)["ece"] == pytest.approx(0.42, abs=1e-12)
    # Weight 3 on the p=1.0 positive: last bin mean p (0.95 + 3) / 4, rate 3/4, weight 4/7.
    # (2 * 0.35 + 1 * 0.45 + 4 * 0.2375) / 7 = 0.3
    weighted = expected_calibration_error(CAL_Y, CAL_P, weights=[1, 1, 1, 1, 3])
    assert weighted == pytest.approx(0.3, abs=1e-12)
    # One bin: |mean p - prevalence| = |0.56 - 0.6|.
    assert expected_calibration_error(CAL_Y, CAL_P, n_bins=1) == pytest.approx(0.04, abs=1e-12)


def test_calibration_table_by_hand() -> None:
    table = calibration_table(CAL_Y, CAL_P, n_bins=10)
    assert list(table.columns) == ["lower", "upper", "n", "mean_predicted", "observed_rate"]
    np.testing.assert_allclose(table["lower"], [0.1, 0.5, 0.9])
    np.testing.assert_allclose(table["upper"], [0.2, 0.6, 1.0])
    assert table["n"].tolist() == [2, 1, 2]
    np.testing.assert_allclose(table["mean_predicted"], [0.15, 0.55, 0.975])
    np.testing.assert_allclose(table["observed_rate"], [0.5, 1.0, 0.5])


# --- operating point ---------------------------------------------------------------------------

# Positives at 0.9, 0.8, 0.6, 0.3; negatives at 0.7, 0.6 (tied with a positive), 0.4, 0.2 x2, 0.1.
OP_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
OP_P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.6, 0.4, 0.2, 0.2, 0.1])


def test_confusion_counts_rows_at_the_threshold_as_alerts() -> None:
    got = confusion(OP_Y, OP_P, 0.6)
    assert got == {"tn": 4, "fp": 2, "fn": 1, "tp": 3}
    assert all(type(v) is int for v in got.values())
    expected = skm.confusion_matrix(OP_Y, (OP_P >= 0.6).astype(int)).ravel().tolist()
    assert [got[k] for k in ("tn", "fp", "fn", "tp")] == expected


@pytest.mark.parametrize(("target", "expected"), [(0.75, 0.6), (0.5, 0.8), (1.0, 0.3), (0.2, 0.9)])
def test_min_sensitivity_picks_the_highest_threshold_reaching_it(
    target: float, expected: float
) -> None:
    threshold = choose_threshold(OP_Y, OP_P, min_sensitivity=target)
    assert threshold == expected
    assert type(threshold) is float
    assert point_metrics(OP_Y, OP_P, threshold)["sensitivity"] >= target


@pytest.mark.parametrize(("budget", "expected"), [(30, 0.7), (40, 0.7), (50, 0.6), (100, 0.1)])
def test_alert_budget_picks_the_lowest_threshold_within_it(budget: float, expected: float) -> None:
    # A budget of 40 cannot be met exactly: 0.6 alerts 5 rows (the tie moves together), so
    # the answer stays at 0.7 (3 rows).
    threshold = choose_threshold(OP_Y, OP_P, max_alerts_per_100=budget)
    assert threshold == expected
    counts = confusion(OP_Y, OP_P, threshold)
    assert (counts["tp"] + counts["fp"]) * 100 <= budget * len(OP_P)


def test_alert_budget_below_one_patient_alerts_nobody() -> None:
    threshold = choose_threshold(OP_Y, OP_P, max_alerts_per_100=5)
    assert threshold == np.nextafter(0.9, 1.0)
    assert 0.9 < threshold <= 1.0
    counts = confusion(OP_Y, OP_P, threshold)
    assert counts["tp"] + counts["fp"] == 0


def test_choose_threshold_needs_exactly_one_rule() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(OP_Y, OP_P)
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(OP_Y, OP_P, min_sensitivity=0.8, max_alerts_per_100=10)
    with pytest.raises(ValueError, match="at least one positive"):
        choose_threshold(np.zeros(4, dtype=int), [0.1, 0.2, 0.3, 0.4], min_sensitivity=0.5)


# --- bootstrap ---------------------------------------------------------------------------------


def test_vectorised_resample_metrics_equal_sklearn_on_the_materialised_resample() -> None:
    # The bootstrap's block arithmetic, checked resample by resample against scikit-learn on
    # the rows each resample actually drew (patients of 1-4 rows, so counts repeat rows).
    y, p = _scores(240, seed=5, decimals=2)
    patients = np.repeat(np.arange(100), np.random.default_rng(6).integers(1, 5, 100))[: len(y)]
    units, n_units = metrics._unit_codes(patients, len(y))
    design = metrics._design(y, p, 0.35, 10, units, n_units)
    counts = metrics._draw_counts(np.random.default_rng(7), n_units, 6)
    block = metrics._weighted_metrics(design, counts)
    for b in range(counts.shape[1]):
        rows = np.repeat(np.arange(len(y)), counts[units, b].astype(int))
        expected = _sklearn_metrics(y[rows], p[rows], 0.35)
        expected["ece"] = expected_calibration_error(y[rows], p[rows])
        for name, value in expected.items():
            assert block[name][b] == pytest.approx(value, abs=1e-12), (name, b)


def test_bootstrap_ci_contains_the_point_estimate_and_narrows_with_more_data() -> None:
    widths = {}
    for n in (400, 4000):
        y, p = _scores(n, seed=8, decimals=3)
        point = point_metrics(y, p, 0.4)
        ci = bootstrap_ci(y, p, 0.4, n_boot=300, seed=1)
        assert set(ci) == set(METRICS)
        for name in METRICS:
            low, high = ci[name]
            assert low <= point[name] <= high, (n, name, low, point[name], high)
        widths[n] = {name: ci[name][1] - ci[name][0] for name in METRICS}
    for name in METRICS:
        assert widths[4000][name] < widths[400][name], name


def test_bootstrap_ci_is_deterministic_for_a_seed() -> None:
    y, p = _scores(500, seed=9)
    first = bootstrap_ci(y, p, 0.4, n_boot=200, seed=3)
    assert bootstrap_ci(y, p, 0.4, n_boot=200, seed=3) == first
    assert bootstrap_ci(y, p, 0.4, n_boot=200, seed=4) != first


def test_cluster_bootstrap_is_wider_when_patients_repeat_identical_rows() -> None:
    # 300 patients, each contributing 10 identical rows: there are 300 independent
    # observations, not 3000, and only the patient-level bootstrap knows it.
    y_patient, p_patient = _scores(300, seed=10)
    y, p = np.repeat(y_patient, 10), np.repeat(p_patient, 10)
    patients = np.repeat(np.arange(300), 10)
    rows = bootstrap_ci(y, p, 0.4, n_boot=300, seed=0)
    clustered = bootstrap_ci(y, p, 0.4, groups=patients, n_boot=300, seed=0)
    for name in ("roc_auc", "average_precision", "sensitivity", "brier"):
        row_width = rows[name][1] - rows[name][0]
        cluster_width = clustered[name][1] - clustered[name][0]
        assert cluster_width > 2 * row_width, name  # about sqrt(10) wider


def test_bootstrap_skips_undefined_resamples() -> None:
    # One positive in 60 rows, alerted: a resample that draws it has sensitivity 1; the ~37%
    # that miss it have no sensitivity and are skipped, not counted as 0.
    y = np.zeros(60, dtype=int)
    y[0] = 1
    p = np.linspace(0.05, 0.6, 60)
    p[0] = 0.9
    ci = bootstrap_ci(y, p, 0.5, n_boot=200)
    assert ci["sensitivity"] == (1.0, 1.0)
    # With no positive at all, sensitivity and AUROC are never defined.
    none = bootstrap_ci(np.zeros(60, dtype=int), p, 0.5, n_boot=50)
    assert all(math.isnan(v) for v in none["sensitivity"] + none["roc_auc"])
    assert not any(math.isnan(v) for v in none["specificity"])


def _calibrated_window(rng: np.random.Generator, n: int, odds: float) -> tuple[np.ndarray, ...]:
    """Readmission-like risks; outcomes drawn from them at ``odds`` times their odds."""
    p = 1 / (1 + np.exp(-rng.normal(-1.8, 0.9, n)))
    shifted = odds * p / (1 - p + odds * p)
    return (rng.random(n) < shifted).astype(int), p


@pytest.mark.parametrize("odds", [1.0, 2.0])
def test_the_recentred_ece_interval_contains_the_ece_and_covers_its_expected_value(
    odds: float,
) -> None:
    """ECE's percentile interval sits above the ECE (resampling adds its bias again); the
    recentred one contains it, and covers the median ECE of same-size windows from the same
    model about as often as its level says, calibrated (odds 1) or not (odds 2)."""
    rng = np.random.default_rng(5)
    n, windows = 1000, 150
    expected = float(
        np.median(
            [expected_calibration_error(*_calibrated_window(rng, n, odds)) for _ in range(2000)]
        )
    )
    covered = percentile_covered = 0
    for seed in range(windows):
        y, p = _calibrated_window(rng, n, odds)
        ece = expected_calibration_error(y, p)
        values = bootstrap_values(y, p, 0.5, n_boot=200, seed=seed)["ece"]
        low, high = recentred_interval(values, ece, lowest=0.0)
        assert 0.0 <= low <= ece <= high, (seed, low, ece, high)
        covered += low <= expected <= high
        p_low, p_high = percentile_interval(values)
        percentile_covered += p_low <= expected <= p_high
    assert covered / windows >= 0.9
    if odds == 1.0:  # the percentile interval, centred too high, covers less
        assert percentile_covered < covered


def test_bootstrap_values_are_what_bootstrap_ci_summarises() -> None:
    y, p = _scores(400, seed=12)
    values = bootstrap_values(y, p, 0.4, n_boot=150, seed=2)
    ci = bootstrap_ci(y, p, 0.4, n_boot=150, seed=2)
    assert set(values) == set(METRICS) and all(len(v) == 150 for v in values.values())
    for name in METRICS:
        assert percentile_interval(values[name]) == ci[name], name
    assert all(math.isnan(v) for v in recentred_interval(np.full(10, np.nan), 0.1))


def test_wilson_interval() -> None:
    # Wilson's interval for 10 of 100 at 95%: (0.0552, 0.1744), e.g. Newcombe, Stat Med 1998.
    low, high = wilson_interval(0.1, 100)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)
    assert wilson_interval(0.0, 50)[0] == 0.0 and 0 < wilson_interval(0.0, 50)[1] < 0.1
    assert wilson_interval(1.0, 50)[1] == 1.0
    assert wilson_interval(0.1, 25)[1] - wilson_interval(0.1, 25)[0] > high - low  # fewer rows
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))
    with pytest.raises(ValueError, match="proportion"):
        wilson_interval(1.5, 10)


# --- subgroups ---------------------------------------------------------------------------------


def _subgroup_frame() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """12 predictions at threshold 0.5; the comment gives each row's outcome."""
    rows = [
        ("F", "a", 1, 0.90),  # TP
        ("F", "a", 1, 0.40),  # FN
        ("F", "a", 0, 0.60),  # FP
        ("F", "b", 1, 0.45),  # FN
        ("F", "b", 0, 0.20),  # TN
        ("F", "b", 0, 0.10),  # TN
        ("M", "a", 1, 0.80),  # TP
        ("M", "a", 1, 0.60),  # TP
        ("M", "a", 0, 0.30),  # TN
        ("M", "a", 0, 0.40),  # TN
        ("M", "b", 1, 0.30),  # FN
        ("M", "b", 0, 0.55),  # FP
    ]
    frame = pd.DataFrame(rows, columns=["sex", "site", "y", "p"])
    # A non-default index: rows are matched to y/p by position, not by label.
    attributes = frame[["sex", "site"]].set_axis(range(100, 112))
    return attributes, frame["y"].to_numpy(), frame["p"].to_numpy()


def test_subgroup_table_by_hand() -> None:
    attributes, y, p = _subgroup_frame()
    table = subgroup_table(attributes, y, p, 0.5, ["sex", "site"], min_size=3)
    assert list(table.columns) == [
        "attribute", "group", "n", "positives", "prevalence",
        "roc_auc", "gap_roc_auc", "sensitivity", "gap_sensitivity",
        "specificity", "gap_specificity", "precision", "gap_precision",
        "ece", "gap_ece", "evaluated",
    ]  # fmt: skip
    assert list(zip(table["attribute"], table["group"], strict=True)) == [
        ("sex", "F"),
        ("sex", "M"),
        ("site", "a"),
        ("site", "b"),
        ("sex x site", "F x a"),
        ("sex x site", "F x b"),
        ("sex x site", "M x a"),
        ("sex x site", "M x b"),
    ]
    by_group = table.set_index("group")
    # Overall: 6 positives, 3 caught -> sensitivity 1/2.
    female = by_group.loc["F"]
    assert (female["n"], female["positives"]) == (6, 3)
    assert female["prevalence"] == pytest.approx(0.5)
    assert female["sensitivity"] == pytest.approx(1 / 3)
    assert female["gap_sensitivity"] == pytest.approx(1 / 3 - 1 / 2)
    assert by_group.loc["M", "gap_sensitivity"] == pytest.approx(2 / 3 - 1 / 2)
    male_a = by_group.loc["M x a"]
    assert (male_a["n"], male_a["positives"], bool(male_a["evaluated"])) == (4, 2, True)
    assert male_a["sensitivity"] == pytest.approx(1.0)
    assert male_a["gap_sensitivity"] == pytest.approx(0.5)
    assert male_a["specificity"] == pytest.approx(1.0)
    # Overall specificity: 6 negatives, 2 false alarms -> 2/3.
    assert male_a["gap_specificity"] == pytest.approx(1 / 3)
    # Two rows < min_size: listed, not evaluated, no metrics.
    small = by_group.loc["M x b"]
    assert (small["n"], small["positives"], bool(small["evaluated"])) == (2, 1, False)
    assert math.isnan(small["sensitivity"]) and math.isnan(small["gap_sensitivity"])


def test_subgroup_table_lists_small_single_groups_without_evaluating_them() -> None:
    attributes, y, p = _subgroup_frame()
    table = subgroup_table(
        attributes, y, p, 0.5, ["sex", "site"], min_size=8, intersections=False,
        metrics=("sensitivity", "brier"),
    )  # fmt: skip
    assert table["group"].tolist() == ["F", "M", "a", "b"]
    assert table["n"].tolist() == [6, 6, 7, 5]
    assert not table["evaluated"].any()
    assert table[["sensitivity", "gap_sensitivity", "brier", "gap_brier"]].isna().all().all()


# --- plots -------------------------------------------------------------------------------------


def test_plot_curves_writes_three_pngs(tmp_path: Path) -> None:
    y, p = _scores(300, seed=11)
    y2, p2 = _scores(300, seed=12)
    paths = plot_curves({"rf": (y, p), "gbm": (y2, p2)}, tmp_path / "plots")
    assert set(paths) == {"roc", "precision_recall", "calibration"}
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        content = path.read_bytes()
        assert content.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(content) > 5_000


def test_ece_by_chance_is_large_on_small_sets_and_small_on_large_ones() -> None:
    from clinml.training.metrics import ece_by_chance

    rng = np.random.default_rng(5)
    small, large = rng.uniform(0.02, 0.6, 100), rng.uniform(0.02, 0.6, 100_000)
    assert ece_by_chance(small) > 0.05
    assert ece_by_chance(large) < 0.01
    assert ece_by_chance(small, seed=1) == ece_by_chance(small, seed=1)
    # A calibrated model's observed ECE stays under the floor about 95% of the time.
    floor = ece_by_chance(small, n_sim=400)
    observed = [
        expected_calibration_error((rng.random(100) < small).astype(int), small) for _ in range(400)
    ]
    assert 0.9 <= np.mean(np.array(observed) <= floor) <= 0.99


# --- operating thresholds with a margin --------------------------------------------------------


def test_design_effect_counts_patients_whose_rows_agree() -> None:
    from clinml.training.metrics import design_effect

    rng = np.random.default_rng(0)
    alerted = rng.random(2_000) < 0.2
    independent = design_effect(alerted, np.arange(2_000))
    repeated = design_effect(np.repeat(alerted, 3), np.repeat(np.arange(2_000), 3))
    assert independent == pytest.approx(1.0, abs=0.15)
    assert repeated == pytest.approx(3.0, rel=0.15)  # three identical rows per patient


def test_sensitivity_target_is_met_at_its_lower_confidence_bound() -> None:
    y, p = _scores(3_000, seed=8, decimals=None)
    point = choose_threshold(y, p, min_sensitivity=0.9)
    bounded = choose_threshold(y, p, min_sensitivity=0.9, confidence=0.95)
    assert bounded < point  # a margin costs alerts
    positives = int(y.sum())
    achieved = point_metrics(y, p, bounded)["sensitivity"]
    z = 1.6448536269514722
    wilson_low = (
        achieved
        + z * z / (2 * positives)
        - z * math.sqrt(achieved * (1 - achieved) / positives + z * z / (4 * positives**2))
    ) / (1 + z * z / positives)
    assert wilson_low >= 0.9
    # Too few positives to reach the bound: every positive is alerted, nothing raises.
    few = choose_threshold(y[:40], p[:40], min_sensitivity=0.95, confidence=0.95)
    assert point_metrics(y[:40], p[:40], few)["sensitivity"] == 1.0


def test_an_alert_budget_chosen_with_a_prediction_bound_holds_in_new_periods() -> None:
    """Out-of-fold rows and later months from the same population: a threshold chosen
    where the budget is just met on the first overshoots about half the months; one
    chosen at the 95% prediction bound keeps about 95% of months within budget."""
    from clinml.training.metrics import BudgetWindow

    rng = np.random.default_rng(12)

    def draw(n: int) -> np.ndarray:
        return 1 / (1 + np.exp(-rng.normal(-2.0, 1.0, n)))

    month = 1_500
    met = {"point": 0, "bounded": 0}
    trials = 200
    for _ in range(trials):
        oof = draw(20_000)
        y = (rng.random(len(oof)) < oof).astype(int)
        thresholds = {
            "point": choose_threshold(y, oof, max_alerts_per_100=15),
            "bounded": choose_threshold(
                y, oof, max_alerts_per_100=15, confidence=0.95, window=BudgetWindow(month)
            ),
        }
        future = draw(month)
        for name, threshold in thresholds.items():
            met[name] += (future >= threshold).mean() <= 0.15
    assert 0.35 < met["point"] / trials < 0.65
    # Expected about 0.945 (the bound is 95% for a known population; the threshold's own
    # sampling error takes a little off); 200 trials have a standard error of 0.016.
    assert met["bounded"] / trials >= 0.87


def test_between_period_variance_is_zero_by_chance_and_positive_for_seasons() -> None:
    from clinml.training.metrics import between_period_variance

    rng = np.random.default_rng(3)
    periods = np.repeat(np.arange(24), 800)
    steady = rng.random(len(periods)) < 0.15
    assert between_period_variance(steady, periods) < 0.01**2
    seasonal_rate = 0.15 + 0.03 * np.sin(np.arange(24) / 12 * 2 * np.pi)
    seasonal = rng.random(len(periods)) < seasonal_rate[periods]
    estimate = between_period_variance(seasonal, periods)
    assert estimate == pytest.approx(seasonal_rate.var(ddof=1), rel=0.5)
    # A partial period (a few rows) does not count.
    assert between_period_variance(steady[:10], np.zeros(10, dtype=int)) == 0.0


def test_paired_bootstrap_is_narrower_than_two_separate_intervals() -> None:
    from clinml.training.metrics import paired_bootstrap

    rng = np.random.default_rng(9)
    n = 3_000
    truth = rng.normal(-1.5, 1.2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-truth))).astype(int)
    a = 1 / (1 + np.exp(-(truth + rng.normal(0, 0.5, n))))
    b = 1 / (1 + np.exp(-(truth + rng.normal(0, 0.5, n))))
    paired = paired_bootstrap(y, a, b, 0.3, 0.3, groups=np.arange(n) // 2, n_boot=400)
    auc = paired.difference["roc_auc"]
    assert auc == pytest.approx(skm.roc_auc_score(y, a) - skm.roc_auc_score(y, b), abs=1e-12)
    low, high = paired.difference_ci["roc_auc"]
    assert low <= auc <= high
    separate = (paired.new_ci["roc_auc"][1] - paired.new_ci["roc_auc"][0]) + (
        paired.reference_ci["roc_auc"][1] - paired.reference_ci["roc_auc"][0]
    )
    assert high - low < 0.75 * separate / 2 * 2  # the shared patients cancel out
    assert paired.patients == n // 2 and paired.rows == n
