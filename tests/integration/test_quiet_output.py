"""clinml's output stays clinml's: what libraries print goes to the log (issue 20, item 8).

Feast's own ``materialize`` (every online store but SQLite: Redis here, on this machine's
services) prints colour-coded progress text; psycopg warns "pipeline aborted" when
MLflow's SQLAlchemy store on PostgreSQL recovers from a failed statement.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from clinml.features import ingest
from clinml.features import store as feature_store
from clinml.features.offline import PostgresTables
from clinml.settings import Settings
from clinml.spec import UseCaseSpec
from tests.conftest import NOW, make_tiny_frame
from tests.services import (
    delete_redis_keys,
    production_env,
    redis_keys,
    require_services,
    scratch_database,
)

pytestmark = pytest.mark.slow

ANSI_ESCAPE = "\x1b["


def test_materialize_through_feast_prints_nothing_of_feasts(
    tiny_spec: UseCaseSpec,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_services()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    with scratch_database() as database:
        try:
            for name, value in production_env(tmp_path / "home", database, prefix).items():
                monkeypatch.setenv(name, value)
            settings = Settings()
            environment = settings.feast_environment
            paths = settings.paths.usecase(tiny_spec.name)
            tables = PostgresTables.for_environment(environment, tiny_spec.name)
            frame = make_tiny_frame(n=30)
            ingest.run(tiny_spec, paths, NOW, settings.pseudonymiser(), frame=frame, tables=tables)
            store = feature_store.open_store(tiny_spec, paths, environment)
            feature_store.apply(store, tiny_spec, paths)
            capfd.readouterr()

            with caplog.at_level(logging.DEBUG, logger="clinml.features.store"):
                result = feature_store.materialize(store, tiny_spec, NOW + timedelta(seconds=1))

            printed = capfd.readouterr()
            written = len(redis_keys(prefix))
        finally:
            delete_redis_keys(prefix)
    assert result.entities_written == -1  # Feast's own materialize wrote Redis
    assert written == frame["patient_id"].nunique()
    assert ANSI_ESCAPE not in printed.out + printed.err
    assert "Materializing" not in printed.out + printed.err
    # ...it is in the log instead, without the colour codes
    logged = [r.getMessage() for r in caplog.records if r.name == "clinml.features.store"]
    assert any("Materializing 1 feature views" in m for m in logged), logged
    assert not any(ANSI_ESCAPE in m for m in logged)


def test_psycopg_warnings_do_not_reach_the_console(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's logging set-up keeps psycopg below ERROR off the console."""
    import os

    from clinml.pipelines import runtime

    root = logging.getLogger()
    quiet = [logging.getLogger(name) for name in runtime.QUIET_LOGGERS]
    saved_levels = [(logger, logger.level) for logger in [root, *quiet]]
    saved_handlers = list(root.handlers)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # configure() sets variables
    try:
        for handler in saved_handlers:  # pytest's capture handlers; basicConfig adds one
            root.removeHandler(handler)
        monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
        runtime.configure(Settings(home=tmp_path))
        capfd.readouterr()
        psycopg = logging.getLogger("psycopg")
        psycopg.warning("error ignored terminating <psycopg.Pipeline [INERROR]>: pipeline aborted")
        psycopg.error("a real psycopg error still shows")
        printed = capfd.readouterr()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        for logger, level in saved_levels:
            logger.setLevel(level)
    assert "pipeline aborted" not in printed.out + printed.err
    assert "a real psycopg error still shows" in printed.err
