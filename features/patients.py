"""Patient ids that ``/predict_patient`` answers for: the ones fresh in the online store.

The online store is keyed by pseudonyms (``clinml.pseudonym``), and callers send raw ids,
which the service pseudonymises. So the raw ids come from the data that was ingested (the
spec's source, or the file given to ``clinml ingest --data``); each is pseudonymised with
the service's key and looked up in the online store exactly as ``/predict_patient`` looks
it up (``clinml.features.store.online_lookup``). An id qualifies when none of its features is
missing, stale or recorded after the time asked for.

Usage::

    raw = prepare_batch(spec, now)                  # the ingested source, with raw ids
    ids = servable_patient_ids(store, spec, raw, settings.pseudonymiser(), 5, now)
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from clinml.pseudonym import Pseudonymiser
from clinml.spec import UseCaseSpec

if TYPE_CHECKING:
    from feast import FeatureStore

# Ids looked up per online read: one read per chunk, stopping once enough are found.
CHUNK = 512


def candidate_ids(spec: UseCaseSpec, raw: pd.DataFrame) -> list[str]:
    """Distinct raw patient ids, the most recently recorded first (they stay fresh longest).

    Args:
        spec: the use case (its entity key and event timestamp).
        raw: the ingested rows with their raw ids (``clinml.features.ingest.prepare_batch``).
    """
    key, stamp = spec.entity.key, spec.event_timestamp
    rows = raw.loc[raw[key].notna(), [key, stamp]]
    newest = rows.groupby(rows[key].astype(str), sort=False)[stamp].max()
    return newest.sort_values(ascending=False, kind="stable").index.tolist()


def servable_patient_ids(
    store: FeatureStore,
    spec: UseCaseSpec,
    raw: pd.DataFrame,
    pseudonymiser: Pseudonymiser,
    n: int,
    as_of: datetime,
    reader: Any = None,
) -> list[str]:
    """Up to ``n`` raw ids whose online features are all present and fresh at ``as_of``.

    Args:
        store: the applied, materialized feature store.
        spec: the use case.
        raw: rows with raw ids, as ingested (``clinml.features.ingest.prepare_batch``).
        pseudonymiser: the service's (``Settings.pseudonymiser``), so ids map to the keys
            the online store holds.
        n: how many ids are wanted.
        as_of: the time a prediction would be asked for (usually now).
        reader: an ``online_feast.online_reader`` to use (default: one for this call).

    Returns:
        Raw ids as a caller sends them, the most recently recorded first; fewer than ``n``
        (or none) when fewer are fresh.
    """
    from clinml.features.online_feast import online_reader
    from clinml.features.store import online_lookup

    own = reader is None
    reader = online_reader(store, spec) if own else reader
    found: list[str] = []
    try:
        candidates = candidate_ids(spec, raw)
        for start in range(0, len(candidates), CHUNK):
            chunk = candidates[start : start + CHUNK]
            pseudonyms = pseudonymiser.many(chunk)
            rows = reader.read(pseudonyms)
            lookup = online_lookup(store, spec, pseudonyms, as_of, rows=rows)
            found += [
                raw_id
                for raw_id, row, usable in zip(chunk, rows, lookup.usable, strict=True)
                if row and usable
            ]
            if len(found) >= n:
                break
    finally:
        if own:
            reader.close()
    return found[:n]
