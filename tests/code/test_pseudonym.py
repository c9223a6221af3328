"""The keyed hash that pseudonymises patient ids."""

from __future__ import annotations

import pandas as pd

from clinml.pseudonym import DEVELOPMENT_KEY, PREFIX, Pseudonymiser, pseudonymise_column
from clinml.settings import Settings


def test_same_key_same_pseudonym_and_different_keys_differ() -> None:
    a, b = Pseudonymiser("key-a"), Pseudonymiser("key-b")
    assert a.one("PT0001") == a.one("PT0001")
    assert a.one("PT0001") != a.one("PT0002")
    assert a.one("PT0001") != b.one("PT0001")
    assert a.one("PT0001").startswith(PREFIX) and len(a.one("PT0001")) == len(PREFIX) + 24
    assert "PT0001" not in a.one("PT0001")


def test_column_pseudonymisation_hashes_each_id_once_and_keeps_nulls() -> None:
    p = Pseudonymiser("k")
    column = pd.Series(["x", "y", None, "x"], index=[10, 11, 12, 13])
    out = pseudonymise_column(column, p)
    assert list(out.index) == [10, 11, 12, 13]
    assert out.tolist() == [p.one("x"), p.one("y"), None, p.one("x")]
    assert p.many(["x", "y"]) == [p.one("x"), p.one("y")]


def test_the_development_key_is_marked_and_the_key_never_shown(monkeypatch) -> None:
    monkeypatch.delenv("CLINML_PSEUDONYM_KEY", raising=False)
    settings = Settings()
    assert settings.pseudonymiser().is_development_key
    assert DEVELOPMENT_KEY not in repr(settings) and DEVELOPMENT_KEY not in repr(
        settings.pseudonymiser()
    )
    monkeypatch.setenv("CLINML_PSEUDONYM_KEY", "site-secret-123")
    configured = Settings().pseudonymiser()
    assert not configured.is_development_key
    assert "site-secret-123" not in repr(Settings())
    assert configured.one("PT1") == Pseudonymiser("site-secret-123").one("PT1")


def test_a_column_of_only_nulls_stays_null() -> None:
    p = Pseudonymiser(DEVELOPMENT_KEY)
    out = pseudonymise_column(pd.Series([None, None], index=[3, 7]), p)
    assert list(out.index) == [3, 7] and out.isna().all()
