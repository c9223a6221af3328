"""The statistics under the drift verdict (monitoring/statistics.py): patients as the unit,
effect sizes, and the power a minimum window promises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from clinml.monitoring import statistics


def test_effective_size_counts_patients_not_rows() -> None:
    assert statistics.effective_size(np.arange(10)) == 10  # one row each
    assert statistics.effective_size(np.zeros(10, dtype=int)) == 1  # one patient
    # rows of patients 0, 0, 1, 2: n² / Σ m² = 16 / 6
    assert statistics.effective_size(np.array([0, 0, 1, 2])) == pytest.approx(16 / 6)


def test_cluster_codes_give_rows_without_a_patient_their_own() -> None:
    frame = pd.DataFrame({"patient": ["a", None, "a", None, "b"]})
    codes = statistics.cluster_codes(frame, "patient")
    assert codes[0] == codes[2] and len(set(codes)) == 4
    assert list(statistics.cluster_codes(frame, None)) == [0, 1, 2, 3, 4]


def test_with_one_row_per_patient_the_tests_are_the_textbook_ones() -> None:
    rng = np.random.default_rng(0)
    before = pd.Series(rng.choice(["a", "b", "c"], 3000, p=[0.5, 0.3, 0.2]))
    now = pd.Series(rng.choice(["a", "b", "c"], 400, p=[0.45, 0.33, 0.22]))
    found = statistics.compare_categorical(before, now, len(before), len(now))
    table = pd.crosstab(
        np.r_[np.zeros(len(before)), np.ones(len(now))], np.r_[before.to_numpy(), now.to_numpy()]
    )
    assert found.p_value == pytest.approx(stats.chi2_contingency(table, correction=False)[1])

    x, y = rng.normal(0, 1, 3000), rng.normal(0.15, 1, 400)
    numeric = statistics.compare_numeric(x, y, len(x), len(y))
    reference = stats.ks_2samp(x, y, method="asymp")
    assert numeric.p_value == pytest.approx(reference.pvalue, rel=0.1)  # limit vs finite n


def test_repeated_rows_of_a_patient_are_no_extra_evidence() -> None:
    """A window of 100 patients with 20 identical rows each says what 100 rows say."""
    rng = np.random.default_rng(1)
    before = pd.Series(rng.choice(["a", "b"], 5000))
    patients = pd.Series(rng.choice(["a", "b"], 100, p=[0.6, 0.4]))
    repeated = patients.repeat(20).reset_index(drop=True)
    once = statistics.compare_categorical(before, patients, 5000, 100)
    codes = np.repeat(np.arange(100), 20)
    clustered = statistics.compare_categorical(
        before, repeated, 5000, statistics.effective_size(codes)
    )
    assert clustered.p_value == pytest.approx(once.p_value, rel=0.01)
    naive = statistics.compare_categorical(before, repeated, 5000, len(repeated))
    assert naive.p_value < 0.001 < 0.1 < once.p_value  # what counting rows would claim


def test_effect_sizes_read_in_plain_units() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(50, 10, 200_000)
    assert statistics.numeric_effect(x, x + 3) == pytest.approx(0.3, abs=0.005)  # 0.3 SD
    before = pd.Series(["a"] * 70 + ["b"] * 30)
    now = pd.Series(["a"] * 55 + ["b"] * 45)
    assert statistics.categorical_effect(before, now) == pytest.approx(0.15)  # 15 in 100 moved


@pytest.mark.parametrize("categorical", [False, True])
def test_the_minimum_window_finds_one_and_a_half_floors_with_95_percent_power(
    categorical: bool,
) -> None:
    """At required_patients(1.5 × floor) a change of 1.5 floors passes the whole rule (past
    the floor and past Bonferroni) in about 95% of windows, and no change almost never."""
    floor, alpha = (0.1, 0.001) if categorical else (0.2, 0.001)
    n = statistics.required_patients(1.5 * floor, categorical, alpha)
    rng = np.random.default_rng(3)
    found = {0.0: 0, 1.5: 0}
    runs = 300
    for shift in found:
        for _ in range(runs):
            if categorical:  # a share of 50% moving by 1.5 floors
                before = pd.Series(rng.random(20_000) < 0.5)
                now = pd.Series(rng.random(n) < 0.5 + shift * floor)
                result = statistics.compare_categorical(before, now, 20_000, n)
            else:
                before, now = rng.normal(0, 1, 20_000), rng.normal(shift * floor, 1, n)
                result = statistics.compare_numeric(before, now, 20_000, n)
            found[shift] += result.p_value < alpha and result.effect >= floor
    assert found[1.5] / runs >= 0.88  # 95% by design; the margin is sampling error
    assert found[0.0] / runs <= 0.01
