"""Training on a real, local Ray cluster (``clinml.training.distributed``; issue 25).

The cluster is started by the module (``RayCluster.connect("local")``: ``ray.init`` on
the CPUs this process is given), with HOME pointed at a temporary directory, where Ray
2.60 writes its authentication token. Shown: the whole of ``fit_candidates`` on Ray gives
the in-process results for the same seed (searches, refits, thresholds, evaluations with
their bootstrap intervals, the selection); a worker process killed while it runs a fit is
replaced and the search completes with the same results; a fit that raises is a failed
trial, recorded by type, on Ray and in-process alike, while a spec error still stops
training.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from clinml.errors import ClinmlError, SpecError
from clinml.spec import UseCaseSpec, load_spec
from clinml.training import search as search_module
from clinml.training.distributed import Failed, RayCluster
from clinml.training.search import search
from clinml.training.train import Fitted, fit_candidates
from tests.conftest import PROJECT_ROOT

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

N_BOOT = 50


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> UseCaseSpec:
    """Readmission, reduced: boosting and the reference, three configurations each."""
    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "readmission.yaml").read_text())
    training = raw["training"]
    training["candidates"] = {"gbm": training["candidates"]["gbm"]}
    training["search"]["n_iter"] = 3
    path = tmp_path_factory.mktemp("ray-spec") / "readmission.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_spec(path)


@pytest.fixture(scope="module")
def frame(spec: UseCaseSpec) -> pd.DataFrame:
    from clinml.features.datasets import readmission

    raw = readmission.load(spec.source.seed, datetime(2026, 1, 1, tzinfo=UTC), n_patients=1_500)
    return raw[raw[spec.label.column].notna()].reset_index(drop=True)


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HOME of every Ray instance this module starts (Ray 2.60 does not start a
    second instance in one process under another HOME)."""
    return tmp_path_factory.mktemp("ray-home")


@pytest.fixture(scope="module")
def cluster(ray_home: Path) -> Iterator[RayCluster]:
    home = ray_home
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))  # Ray's token goes here, not the user's home
        with RayCluster.connect("local") as connected:
            yield connected


@pytest.fixture(scope="module")
def in_process(spec: UseCaseSpec, frame: pd.DataFrame) -> Fitted:
    return fit_candidates(spec, frame, n_boot=N_BOOT, threads=1)


def _same_search(a: Any, b: Any) -> None:
    assert [(t.params, t.score, t.fold_scores, t.log_loss) for t in a.trials] == [
        (t.params, t.score, t.fold_scores, t.log_loss) for t in b.trials
    ]
    assert a.best_params == b.best_params and a.best_score == b.best_score
    np.testing.assert_array_equal(a.oof_probability, b.oof_probability)
    np.testing.assert_array_equal(a.oof_patients, b.oof_patients)


def test_an_address_where_nothing_answers_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """Ray itself retries an unreachable address for minutes; clinml says so at once.
    (First in the module: the module's own cluster is not started yet.)"""
    import ray

    assert not ray.is_initialized()
    monkeypatch.setenv("HOME", str(tmp_path))
    with (
        pytest.raises(ClinmlError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:9'"),
        RayCluster.connect("127.0.0.1:9"),
    ):
        pass


def test_a_local_cluster_leaves_the_environment_as_it_found_it(ray_home: Path, monkeypatch) -> None:
    """ray.init exports RAY_AUTH_MODE=token (and more) into the process: a `ray start`
    run later from it then demands a token it never made."""
    monkeypatch.setenv("HOME", str(ray_home))
    before = dict(os.environ)
    with RayCluster.connect("local") as cluster:
        assert cluster.cpus >= 1
        assert os.environ.get("RAY_AUTH_MODE") == "token"  # what Ray did meanwhile
    assert dict(os.environ) == before


def test_training_on_ray_gives_the_in_process_results(
    spec: UseCaseSpec, frame: pd.DataFrame, cluster: RayCluster, in_process: Fitted
) -> None:
    lines: list[str] = []
    on_ray = fit_candidates(spec, frame, report=lines.append, n_boot=N_BOOT, cluster=cluster)
    assert lines[1].startswith(f"training on Ray at local ({cluster.cpus} CPUs)")
    assert [c.name for c in on_ray.candidates] == [c.name for c in in_process.candidates]
    for ours, theirs in zip(on_ray.candidates, in_process.candidates, strict=True):
        _same_search(ours.search, theirs.search)
        assert ours.threshold == theirs.threshold
        np.testing.assert_array_equal(ours.test_probability, theirs.test_probability)
        assert ours.evaluation.metrics == theirs.evaluation.metrics
        assert ours.evaluation.ci == theirs.evaluation.ci  # the bootstrap, same draws
        assert ours.temporal is not None and theirs.temporal is not None
        assert ours.temporal.metrics == theirs.temporal.metrics
    assert on_ray.selection.selected == in_process.selection.selected
    assert on_ray.selection.reason == in_process.selection.reason


def _training_rows(spec: UseCaseSpec, frame: pd.DataFrame, fitted: Fitted) -> tuple:
    """The training split's features, outcomes, patients and event times, as the
    training gave them to each candidate's search."""
    rows = fitted.split.train
    x = frame.iloc[rows][spec.feature_names]
    patients = frame[spec.entity.key].to_numpy()[rows]
    return x, fitted.y[rows], patients, frame.iloc[rows][spec.event_timestamp].to_numpy()


class _Killer(threading.Thread):
    """SIGKILLs the first Ray worker seen running a task (its title ``ray::_task``)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                if cmdline and cmdline[0].startswith("ray::_task"):
                    try:
                        os.kill(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.killed = process.pid
                    return
            time.sleep(0.01)


def test_a_worker_killed_mid_search_is_replaced_and_the_search_completes(
    spec: UseCaseSpec, frame: pd.DataFrame, cluster: RayCluster, in_process: Fitted
) -> None:
    [gbm] = [c for c in in_process.candidates if c.name == "gbm"]
    x, y, patients, times = _training_rows(spec, frame, in_process)
    killer = _Killer()
    killer.start()
    try:
        result = search("gbm", spec, x, y, patients, times=times, cluster=cluster)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None  # a worker died while it ran a fit
    assert not any(t.failed for t in result.trials)  # Ray ran the lost fit again
    _same_search(result, gbm.search)


def _failing_for(value: Any) -> Any:
    """The search's ``fit``, except that configurations with ``learning_rate=value``
    raise a RuntimeError (a fault injected on purpose: numerical trouble in one fit)."""
    real = search_module.fit

    def fit(pipeline: Any, *args: Any) -> Any:
        if pipeline[-1].get_params().get("learning_rate") == value:
            raise RuntimeError("learning rate 0.1 diverged at row 17")
        return real(pipeline, *args)

    return fit


def _always_failing(*args: Any) -> Any:
    raise RuntimeError("every fit fails")


def test_a_fit_that_raises_is_a_failed_trial_and_the_search_goes_on(
    spec: UseCaseSpec, frame: pd.DataFrame, in_process: Fitted, monkeypatch
) -> None:
    [gbm] = [c for c in in_process.candidates if c.name == "gbm"]
    x, y, patients, _ = _training_rows(spec, frame, in_process)
    rates = [t.params.get("learning_rate") for t in gbm.search.trials]
    failing = next(r for r in rates if r != gbm.search.best_params.get("learning_rate"))
    monkeypatch.setattr(search_module, "fit", _failing_for(failing))
    lines: list[str] = []
    result = search("gbm", spec, x, y, patients, lines.append, threads=1)
    failed = [t for t in result.trials if t.failed]
    assert failed and all(t.params["learning_rate"] == failing for t in failed)
    assert {t.failed for t in failed} == {"RuntimeError"} and all(np.isnan(t.score) for t in failed)
    assert any("failed (RuntimeError)" in line for line in lines)
    assert not any("diverged" in line or "row 17" in line for line in lines)  # type only
    assert result.best_params == gbm.search.best_params
    assert "failed" in result.trials_frame().columns

    monkeypatch.setattr(search_module, "fit", _always_failing)
    with pytest.raises(ClinmlError, match=r"every configuration searched failed \(RuntimeError\)"):
        search("gbm", spec, x, y, patients, threads=1)


def _raise(shared: Any, kind: str) -> str:
    if kind == "spec":
        raise SpecError("training.candidates.gbm: max_iter must be positive")
    if kind == "value":
        raise ValueError("a value 14.2 in the message")
    return kind


def test_on_ray_a_raising_task_is_failed_by_type_and_a_spec_error_stops(
    cluster: RayCluster,
) -> None:
    assert cluster.map(_raise, None, [("ok",), ("value",)]) == ["ok", Failed("ValueError")]
    with pytest.raises(SpecError, match="max_iter must be positive"):
        cluster.map(_raise, None, [("spec",)])
