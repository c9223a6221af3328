"""Batches of scoring-time records drawn from ingested data, with an optional shift.

Used by the demo and the tests to show the monitor on data it should pass (a plain
random sample) and data it should flag (a case-mix shift: the share of positive cases
moved, as when a referral pattern changes). Rows carry features and attributes only:
no patient ids, timestamps or labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clinml.spec import UseCaseSpec


def sample_batch(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    spec: UseCaseSpec,
    size: int,
    seed: int,
    positive_share: float | None = None,
) -> pd.DataFrame:
    """Draw ``size`` records; with ``positive_share``, fix the share of positive cases.

    Args:
        features: the offline features (``features.parquet``).
        labels: the matching events with labels (``labels.parquet``).
        spec: the use-case spec.
        size: number of records.
        seed: seeds the draw.
        positive_share: if given, the fraction of records drawn from positive cases
            (drawn with replacement when a class has too few rows).
    """
    key, ts = spec.entity.key, spec.event_timestamp
    joined = features.merge(labels, on=[key, ts], how="inner")
    rng = np.random.default_rng(seed)
    if positive_share is None:
        rows = joined.sample(n=size, replace=size > len(joined), random_state=rng)
    else:
        is_positive = joined[spec.label.column] == spec.label.positive_class
        n_positive = round(size * positive_share)
        parts = []
        for subset, n in (
            (joined[is_positive], n_positive),
            (joined[~is_positive], size - n_positive),
        ):
            if n:
                parts.append(subset.sample(n=n, replace=n > len(subset), random_state=rng))
        rows = pd.concat(parts).sample(frac=1.0, random_state=rng)
    columns = [*spec.feature_names, *(a.name for a in spec.attributes)]
    return rows[columns].reset_index(drop=True)
