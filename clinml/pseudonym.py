"""Pseudonymous patient ids: a keyed hash applied wherever a raw id enters clinml.

Ingestion applies it to the entity key before anything is written; the serving path
applies the same function to the ids callers send, so both meet in the feature store
without the raw id ever being stored. The key comes from ``CLINML_PSEUDONYM_KEY``. The
development default is public (it is in this file) and is marked as such: anything
pseudonymised with it is not protected, and the production profile refuses it.

HMAC-SHA256, truncated to 96 bits and hex-encoded with a ``ps_`` prefix: deterministic
for one key, infeasible to invert or to link across keys.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

DEVELOPMENT_KEY = "clinml-development-key-NOT-SECRET"
PREFIX = "ps_"
_HEX_CHARS = 24  # 96 bits


class Pseudonymiser:
    """Maps raw ids to pseudonyms with one key.

    Args:
        key: the secret; ``DEVELOPMENT_KEY`` only outside production.
    """

    def __init__(self, key: str):
        if not key:
            raise ValueError("the pseudonym key is empty")
        self._key = key.encode()
        self.is_development_key = key == DEVELOPMENT_KEY

    def one(self, raw_id: str) -> str:
        digest = hmac.digest(self._key, str(raw_id).encode(), "sha256")
        return PREFIX + digest.hex()[:_HEX_CHARS]

    def many(self, raw_ids: Iterable[object]) -> list[str]:
        key, digest, n = self._key, hmac.digest, _HEX_CHARS
        return [PREFIX + digest(key, str(v).encode(), "sha256").hex()[:n] for v in raw_ids]

    def __repr__(self) -> str:  # never show the key
        kind = "development" if self.is_development_key else "configured"
        return f"Pseudonymiser(<{kind} key>)"


def pseudonymise_column(values: object, pseudonymiser: Pseudonymiser) -> object:
    """Pseudonymise a pandas Series, hashing each distinct id once.

    Returns a Series of the same index; nulls stay null.
    """
    import pandas as pd

    series = pd.Series(values)
    codes, uniques = pd.factorize(series)
    if not len(uniques):  # every value null (or no values)
        return pd.Series([None] * len(series), index=series.index, dtype=object)
    mapped = pd.array(pseudonymiser.many(uniques), dtype=object)
    out = pd.Series(mapped[codes], index=series.index, dtype=object)
    return out.where(codes >= 0, None)
