"""Built-in data loaders, looked up by the spec's ``source.loader``.

A loader takes ``(seed, now)`` and returns the raw frame: the entity key, the event
timestamp, the label, every feature and attribute, and any identifier columns.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pandas as pd

from features.datasets import pathology

Loader = Callable[[int, datetime], pd.DataFrame]

LOADERS: dict[str, Loader] = {
    "pathology": pathology.load,
}
