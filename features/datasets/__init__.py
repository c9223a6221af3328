"""Built-in data loaders, looked up by the spec's ``source.loader``.

A loader takes ``(seed, now, **options)`` (options from the spec's ``source.options``)
and returns the raw frame: the entity key, the event
timestamp, the label, every feature and attribute, and any identifier columns.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from clinml.features.datasets import ade, noshow, pathology, readmission

Loader = Callable[..., pd.DataFrame]  # (seed: int, now: datetime, **options)

LOADERS: dict[str, Loader] = {
    "ade": ade.load,
    "noshow": noshow.load,
    "pathology": pathology.load,
    "readmission": readmission.load,
}
