"""The ``pathology`` use case: malignancy of breast masses from fine-needle-aspirate cytology.

The 30 cytology features and the diagnosis are the real Wisconsin Diagnostic Breast
Cancer data shipped inside scikit-learn (569 cases, ``load_breast_cancer``). They carry
no patient identifiers, dates or demographics, so this loader adds, from a seeded
generator:

- ``patient_id``: a pseudonymous id (``P`` + 10 hex digits), one per case;
- ``mrn``: a fake medical record number, declared as an identifier column in the spec so
  that ingestion drops it; it exists to exercise that path;
- ``event_timestamp``: when the aspirate was read, spread uniformly over the 12 months
  before ``now``;
- ``age_band`` and ``site``: synthetic attributes for subgroup evaluation, drawn
  independently of the diagnosis (so any subgroup gap a model shows is chance).

Only the cytology features and the diagnosis are real.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

AGE_BANDS = ["18-39", "40-49", "50-59", "60-69", "70+"]
AGE_BAND_WEIGHTS = [0.15, 0.2, 0.25, 0.22, 0.18]
SITES = ["north", "south", "east", "west"]
SITE_WEIGHTS = [0.35, 0.3, 0.2, 0.15]


def feature_name(sklearn_name: str) -> str:
    """``'mean radius'`` -> ``'mean_radius'``, ``'radius error'`` -> ``'radius_error'``."""
    return sklearn_name.strip().replace(" ", "_")


def load(seed: int, now: datetime) -> pd.DataFrame:
    """The raw pathology frame: real cytology and diagnosis plus synthetic columns.

    Args:
        seed: seeds every synthetic column; the same seed and ``now`` give the same frame.
        now: the reference time; event timestamps fall in the 12 months before it.

    Returns:
        One row per case with ``patient_id``, ``mrn``, ``event_timestamp`` (UTC),
        ``diagnosis`` (``malignant``/``benign``), 30 float features, ``age_band`` and
        ``site``.
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.data.rename(columns=feature_name)
    n = len(frame)
    rng = np.random.default_rng(seed)

    ids = rng.choice(16**10, size=n, replace=False)
    seconds = rng.uniform(0, timedelta(days=365).total_seconds(), size=n).astype(np.int64)
    now_utc = (
        pd.Timestamp(now).tz_convert("UTC")
        if pd.Timestamp(now).tzinfo
        else pd.Timestamp(now, tz="UTC")
    )
    # sklearn codes malignant as 0 and benign as 1.
    diagnosis = np.where(bunch.target.to_numpy() == 0, "malignant", "benign")

    synthetic = pd.DataFrame(
        {
            "patient_id": [f"P{i:010x}" for i in ids],
            "mrn": [f"MRN{v:08d}" for v in rng.integers(0, 10**8, size=n)],
            "event_timestamp": now_utc.floor("s") - pd.to_timedelta(seconds, unit="s"),
            "diagnosis": diagnosis,
        }
    )
    attributes = pd.DataFrame(
        {
            "age_band": rng.choice(AGE_BANDS, size=n, p=AGE_BAND_WEIGHTS),
            "site": rng.choice(SITES, size=n, p=SITE_WEIGHTS),
        }
    )
    return pd.concat([synthetic, frame.astype("float64"), attributes], axis=1)
