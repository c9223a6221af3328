"""What the ``clinml`` console entry point says when something goes wrong.

An error a user can act on (a store that does not answer, a bad setting, a bad argument,
a file that is not CSV) is exactly one line on stderr and exit status 2; a refusal is exit
status 1 from every command that can refuse; arguments are checked before any work. The
commands run through ``clinml.pipelines.cli.main`` (what the ``clinml`` script calls), or as the
script itself where the real store must fail underneath them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from clinml.pipelines import cli, stages
from clinml.training.governance import Check, Decision, PromotionRefused
from tests.conftest import FIXTURES, PROJECT_ROOT, make_tiny_frame

TINY = str(FIXTURES / "tiny.yaml")
CLINML = Path(sys.executable).parent / "clinml"
# Nothing listens on port 1: a store "down" without stopping the shared services.
CLOSED = "127.0.0.1:1"
PASSWORD = "not-a-real-password-42"


@pytest.fixture
def clinml(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Iterator[Callable[..., tuple[int, str, list[str]]]]:
    """Run ``clinml ARGS`` in this process; returns (exit status, stdout, stderr lines)."""
    for name in list(os.environ):
        if name.startswith("CLINML_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLINML_HOME", str(tmp_path / "home"))
    # `clinml` points BentoML at CLINML_HOME: give the session's value back afterwards.
    monkeypatch.setenv("BENTOML_HOME", os.environ.get("BENTOML_HOME", str(tmp_path)))

    def run(*args: str) -> tuple[int, str, list[str]]:
        monkeypatch.setattr(sys, "argv", ["clinml", *args])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        out, err = capsys.readouterr()
        return exited.value.code, out, err.splitlines()

    # `clinml` sets up logging for its process: leave this one's as it was.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield run
    root.handlers[:], root.level = handlers, level


def _script_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINML_")}
    env.update(CLINML_HOME=str(tmp_path / "home"), BENTOML_HOME=str(tmp_path / "bentoml"))
    return {**env, **values}


def _one_error_line(err: list[str]) -> str:
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


# --- exit status 1 for a refusal, from every command that can refuse ------------------


def _refuse(*args, **kwargs):
    decision = Decision("tiny", "7", "6", [Check("primary_metric", False, "too few")], "refused")
    raise PromotionRefused("tiny version 7 was not promoted: too few", decision)


@pytest.mark.parametrize("command", ["promote", "run"])
def test_a_gate_refusal_is_exit_1_from_promote_and_from_run(
    clinml, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    for name in ("ingest", "materialize", "package"):
        monkeypatch.setattr(stages, name, lambda *a, **k: None)
    monkeypatch.setattr(stages, "train", lambda *a, **k: "7")
    monkeypatch.setattr(stages, "promote", _refuse)
    code, _, err = clinml(command, TINY)
    assert code == 1, err
    assert "refused: tiny version 7 was not promoted: too few" in err


# --- arguments before any work ---------------------------------------------------------


@pytest.mark.parametrize("reason", [[], ["--reason", "  "]])
def test_promote_force_without_a_reason_is_refused_before_the_gate_runs(
    clinml, monkeypatch: pytest.MonkeyPatch, reason: list[str]
) -> None:
    gate_runs: list[bool] = []
    monkeypatch.setattr(stages, "promote", lambda *a, **k: gate_runs.append(True))
    code, _, err = clinml("promote", TINY, "--force", *reason)
    assert code == 2
    assert _one_error_line(err).startswith("error: --force needs --reason")
    assert gate_runs == []


# --- hints: `clinml run` never tells the user to run a step it runs next ---------------


def _train_without_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``stages.train`` with its collaborators replaced by plain functions."""
    import clinml.features.ingest
    import clinml.features.store
    import clinml.training.tracking
    import clinml.training.train

    metrics = {"roc_auc": 0.9, "roc_auc_ci_low": 0.8, "roc_auc_ci_high": 0.95}
    result = SimpleNamespace(
        selected=SimpleNamespace(name="gbm", metrics=metrics),
        model_name="tiny",
        version="3",
        test_rows=90,
        test_patients=90,
    )
    monkeypatch.setattr(clinml.features.store, "open_store", lambda *a, **k: None)
    monkeypatch.setattr(clinml.features.ingest, "read_labels", lambda *a, **k: None)
    monkeypatch.setattr(clinml.training.tracking.Tracker, "from_settings", lambda *a, **k: None)
    monkeypatch.setattr(clinml.training.train, "run", lambda *a, **k: result)


def test_run_does_not_tell_the_user_to_promote_what_it_promotes(
    clinml, monkeypatch: pytest.MonkeyPatch
) -> None:
    _train_without_training(monkeypatch)
    for name in ("ingest", "materialize", "promote", "package"):
        monkeypatch.setattr(stages, name, lambda *a, **k: None)
    code, out, err = clinml("run", TINY)
    assert code == 0, err
    assert "challenger: gbm = tiny version 3" in out  # the real train stage reported
    assert "next:" not in out and "clinml promote" not in out


def test_train_alone_still_says_what_comes_next(clinml, monkeypatch: pytest.MonkeyPatch) -> None:
    _train_without_training(monkeypatch)
    code, out, err = clinml("train", TINY)
    assert code == 0, err
    assert out.rstrip().splitlines()[-1] == f"next: clinml promote {TINY}"


# --- settings ---------------------------------------------------------------------------


def test_production_without_a_pseudonym_key_says_it_is_not_set(
    clinml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINML_PROFILE", "production")
    code, _, err = clinml("models", "list", TINY)
    assert code == 2
    line = _one_error_line(err)
    assert "CLINML_PROFILE=production refuses to start" in line
    assert "CLINML_PSEUDONYM_KEY is not set" in line
    assert "development key" not in line


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        # The Dockerfile's CMD: `bentoml serve` imports the service, which reads the settings.
        ["-m", "bentoml", "serve", "clinml.serving.service:ClinicalService", "--port", "0"],
        # The module imported with no logging set up: the line is shown once, not twice.
        ["-c", "import clinml.serving.service"],
    ],
    ids=["bentoml-serve", "import"],
)
def test_the_service_refuses_production_in_one_line(tmp_path: Path, command: list[str]) -> None:
    env = _script_env(tmp_path, CLINML_PROFILE="production")
    # Generous: it must exit by itself; how fast is not what this test is about.
    done = subprocess.run(
        [sys.executable, *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output and "ValidationError" not in output, output
    lines = [line for line in done.stderr.splitlines() if "refuses to start" in line]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: CLINML_PROFILE=production refuses to start: ")
    assert "CLINML_PSEUDONYM_KEY is not set" in lines[0]


# --- a file that is not comma-separated CSV ---------------------------------------------


def test_init_from_a_semicolon_file_names_the_delimiter(clinml, tmp_path: Path) -> None:
    data = tmp_path / "export.csv"
    make_tiny_frame(40).to_csv(data, sep=";", index=False)
    code, _, err = clinml("init", "--data", str(data), "--name", "export")
    assert code == 2
    line = _one_error_line(err)
    assert "seems to be ';'-delimited; clinml reads comma-separated CSV" in line
    assert "label" not in line


def test_ingest_of_a_malformed_csv_names_the_line(clinml, tmp_path: Path) -> None:
    data = tmp_path / "batch.csv"
    rows = make_tiny_frame(20).to_csv(index=False).splitlines()
    rows[6] += ",T-SECRET-VALUE"  # line 7 of the file: one value too many
    data.write_text("\n".join(rows) + "\n")
    code, _, err = clinml("validate", TINY, "--data", str(data))
    assert code == 2
    line = _one_error_line(err)
    assert "line 7 has 9 values where the header names 8 columns" in line
    assert "SECRET" not in line


# --- stores that do not answer ----------------------------------------------------------


def _environment_file(tmp_path: Path, registry: str, online: str) -> Path:
    path = tmp_path / "feature_store.yaml"
    path.write_text(
        f"registry:\n{registry}\nonline_store:\n{online}\noffline_store:\n  type: file\n"
    )
    return path


def _ingest(env: dict[str, str], data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLINML), "ingest", TINY, "--data", str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=PROJECT_ROOT,
    )


@pytest.mark.slow
def test_redis_down_during_materialize_is_one_line_and_exit_2(tmp_path: Path) -> None:
    online = (
        f"  type: redis\n  connection_string: {CLOSED},password={PASSWORD},socket_connect_timeout=2"
    )
    registry = f"  path: {tmp_path / 'registry.db'}"
    env = _script_env(
        tmp_path, CLINML_FEATURE_STORE_YAML=str(_environment_file(tmp_path, registry, online))
    )
    data = tmp_path / "tiny.csv"
    make_tiny_frame(60).to_csv(data, index=False)
    ingested = _ingest(env, data)  # writes no online store: Redis is not needed yet
    assert ingested.returncode == 0, ingested.stderr
    done = subprocess.run(
        [str(CLINML), "materialize", TINY],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done.stderr.splitlines())
    assert f"the online feature store (Redis) at {CLOSED} does not answer" in line
    assert "CLINML_FEATURE_STORE_YAML" in line
    assert PASSWORD not in done.stdout + done.stderr


@pytest.mark.slow
def test_postgres_registry_down_during_ingest_is_one_line_and_exit_2(tmp_path: Path) -> None:
    registry = f"  registry_type: sql\n  path: postgresql+psycopg://feast:{PASSWORD}@{CLOSED}/feast"
    online = f"  type: sqlite\n  path: {tmp_path / 'online.db'}"
    env = _script_env(
        tmp_path, CLINML_FEATURE_STORE_YAML=str(_environment_file(tmp_path, registry, online))
    )
    data = tmp_path / "tiny.csv"
    make_tiny_frame(60).to_csv(data, index=False)
    done = _ingest(env, data)
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done.stderr.splitlines())
    assert f"the Feast registry or offline store (PostgreSQL) at {CLOSED} does not answer" in line
    assert "the batch is stored" in line
    assert PASSWORD not in done.stdout + done.stderr


def test_mlflow_database_down_is_one_line_and_exit_2(
    clinml, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.store.db.utils

    # MLflow retries a database that does not answer for about two minutes; once is enough.
    monkeypatch.setattr(mlflow.store.db.utils, "MAX_RETRY_COUNT", 1)
    monkeypatch.setenv("CLINML_TRACKING_URI", f"postgresql+psycopg://mlflow:{PASSWORD}@{CLOSED}/m")
    code, out, err = clinml("models", "list", TINY)
    assert code == 2
    line = _one_error_line(err)
    assert f"the MLflow database (PostgreSQL) at {CLOSED} does not answer" in line
    assert "CLINML_TRACKING_URI" in line
    assert PASSWORD not in out + "\n".join(err)


def test_an_mlflow_server_that_does_not_answer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from clinml.errors import store_unavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as failed:
        MlflowClient(f"http://{CLOSED}").search_experiments()
    error = store_unavailable(failed.value)
    assert error is not None
    assert str(error).startswith(
        f"the MLflow tracking server at {CLOSED} does not answer (connection refused): "
        "check CLINML_TRACKING_URI"
    )


def test_an_unexpected_error_keeps_its_traceback(clinml, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(stages, "rollback", broken)
    monkeypatch.setattr(sys, "argv", ["clinml", "rollback", TINY])
    with pytest.raises(KeyError):
        cli.main()


def test_store_failures_are_named_by_store_and_address_and_nothing_else() -> None:
    import psycopg
    import redis

    from clinml.errors import store_unavailable

    host, port = CLOSED.split(":")
    with pytest.raises(redis.exceptions.ConnectionError) as redis_down:
        redis.Redis(host=host, port=int(port), password=PASSWORD).ping()
    with pytest.raises(psycopg.OperationalError) as postgres_down:
        psycopg.connect(host=host, port=int(port), user="u", password=PASSWORD, dbname="d")
    assert str(store_unavailable(redis_down.value)) == (
        f"the online feature store (Redis) at {CLOSED} does not answer (connection refused): "
        "check online_store in CLINML_FEATURE_STORE_YAML and that it is running"
    )
    # Raised outside MLflow and Feast: both settings that can name a PostgreSQL server.
    assert str(store_unavailable(postgres_down.value)) == (
        f"PostgreSQL at {CLOSED} does not answer (connection refused): check "
        "CLINML_FEATURE_STORE_YAML and CLINML_TRACKING_URI and that it is running"
    )
    assert store_unavailable(KeyError("patient P-1")) is None
    assert store_unavailable(ConnectionRefusedError()) is None  # not a store's own error
