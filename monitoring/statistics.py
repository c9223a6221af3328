"""The statistics the drift verdict stands on: effect sizes, patient-clustered tests, power.

Evidently renders the drift reports; whether a feature *alerts* is decided here, with
three rules a p-value alone lacks (docs/monitoring.md explains each in plain words):

- **An effect-size floor.** With tens of thousands of rows every test finds a difference
  nobody cares about. A feature drifts only when the difference is at least its floor:
  for a number, the Wasserstein distance between the two distributions in reference
  standard deviations (the average amount every value would have to move; for a pure
  shift it is the shift in SD, Cohen's *d*); for a category, the total-variation distance
  (the share of records that would have to change category). Both are scale-free and
  read the same whatever the window's size.
- **Patients, not rows.** A patient's encounters repeat the same sex, site and
  conditions, so rows are not independent and row counts overstate the evidence. Each
  side's sample size is Kish's effective size under the most pessimistic assumption (a
  patient's rows identical): ``n_eff = n² / Σ m_i²`` for ``m_i`` rows of patient ``i``
  (Kish 1965, *Survey Sampling*, §5.4). The Pearson chi-square is divided by the
  resulting design effect (the first-order Rao–Scott correction: Rao & Scott 1981,
  *JASA* 76:221) and the Kolmogorov–Smirnov statistic is referred to its asymptotic
  distribution at the effective sizes. With one row per patient nothing changes.
- **A minimum window.** :func:`required_patients` is the number of patients at which a
  difference the size of a floor is found with 95% power at the Bonferroni level; below
  it, a quiet window says nothing and the verdict is "not enough data".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

NUMERIC_EFFECT = "wasserstein_sd"
CATEGORICAL_EFFECT = "total_variation"
# The power a window must have to find a floor-sized difference before a quiet verdict
# means anything.
POWER = 0.95
# Kolmogorov–Smirnov against a t-test for a shift of a normal distribution: it needs about
# 1 / 0.637 times the patients (the asymptotic relative efficiency, 2/π ≈ 0.637).
KS_EFFICIENCY = 2 / math.pi


@dataclass(frozen=True)
class Comparison:
    """One feature's two samples compared."""

    test: str  # "ks" or "chisquare" (both patient-clustered)
    p_value: float
    effect: float
    effect_kind: str  # NUMERIC_EFFECT or CATEGORICAL_EFFECT
    patients_reference: float  # effective sizes
    patients_window: float


def cluster_codes(frame: pd.DataFrame, column: str | None) -> np.ndarray:
    """An integer per row naming its patient; a row without one is a patient of its own."""
    n = len(frame)
    if column is None or column not in frame.columns:
        return np.arange(n)
    values = frame[column]
    codes = pd.factorize(values, use_na_sentinel=True)[0].astype(np.int64)
    missing = codes < 0
    if missing.any():
        codes[missing] = codes.max(initial=-1) + 1 + np.arange(int(missing.sum()))
    return codes


def effective_size(codes: np.ndarray) -> float:
    """Kish's effective sample size when a patient's rows are identical: n² / Σ m_i²."""
    if len(codes) == 0:
        return 0.0
    counts = np.bincount(pd.factorize(codes)[0]).astype(float)
    return float(len(codes) ** 2 / np.sum(counts**2))


def numeric_effect(before: np.ndarray, now: np.ndarray) -> float:
    """Wasserstein-1 distance in reference standard deviations (0 when both are constant
    and equal, infinite when a constant reference meets other values)."""
    distance = float(stats.wasserstein_distance(before, now))
    scale = float(np.std(before, ddof=1)) if len(before) > 1 else 0.0
    if scale > 0:
        return distance / scale
    return 0.0 if distance == 0 else math.inf


def categorical_effect(before: pd.Series, now: pd.Series) -> float:
    """Total-variation distance: half the summed absolute differences of category shares."""
    p = before.astype(str).value_counts(normalize=True)
    q = now.astype(str).value_counts(normalize=True)
    p, q = p.align(q, fill_value=0.0)
    return float(0.5 * np.abs(p - q).sum())


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    gap = np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(
        b, grid, side="right"
    ) / len(b)
    return float(np.max(np.abs(gap)))


def compare_numeric(
    before: np.ndarray, now: np.ndarray, n_before: float, n_now: float
) -> Comparison:
    """Two-sample KS at the effective sizes, and the Wasserstein effect in SD."""
    d = _ks_statistic(before, now)
    size = n_before * n_now / (n_before + n_now)
    p = float(stats.kstwobign.sf(d * math.sqrt(size))) if d > 0 else 1.0
    return Comparison("ks", p, numeric_effect(before, now), NUMERIC_EFFECT, n_before, n_now)


def compare_categorical(
    before: pd.Series, now: pd.Series, n_before: float, n_now: float
) -> Comparison:
    """Pearson chi-square of homogeneity divided by the design effect, and the
    total-variation effect."""
    table = pd.crosstab(
        np.r_[np.zeros(len(before), int), np.ones(len(now), int)],
        np.r_[before.astype(str).to_numpy(), now.astype(str).to_numpy()],
    ).to_numpy(dtype=float)
    effect = categorical_effect(before, now)
    if table.shape[1] < 2:
        return Comparison("chisquare", 1.0, effect, CATEGORICAL_EFFECT, n_before, n_now)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    chi2 = float(np.sum((table - expected) ** 2 / expected))
    rows = (len(before), len(now))
    # Var(p̂₁ − p̂₂) grows from (1/n₁ + 1/n₂) to (1/n₁,eff + 1/n₂,eff)
    design = (1 / n_before + 1 / n_now) / (1 / rows[0] + 1 / rows[1])
    p = float(stats.chi2.sf(chi2 / design, table.shape[1] - 1))
    return Comparison("chisquare", p, effect, CATEGORICAL_EFFECT, n_before, n_now)


def required_patients(floor: float, categorical: bool, alpha: float, power: float = POWER) -> int:
    """Patients a window needs to find a difference the size of ``floor`` with ``power``
    at the two-sided level ``alpha`` against a much larger reference.

    A normal approximation for the worst case of each kind: for a category, a share moving
    by ``floor`` around 50% (standard deviation 0.5, the largest a share can have); for a
    number, a shift of ``floor`` standard deviations tested with KS, which needs
    1 / 0.637 times the patients a t-test would."""
    z = stats.norm.isf(alpha / 2) + stats.norm.isf(1 - power)
    sd = 0.5 if categorical else 1.0
    n = (z * sd / floor) ** 2
    return math.ceil(n if categorical else n / KS_EFFICIENCY)
