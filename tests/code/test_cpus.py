"""The CPU count training uses (clinml/cpus.py) and the thread limits it applies.

The cgroup files are fakes under ``tmp_path``; the affinity is patched. The thread limits
are read from inside fits, in the training process and in the search's worker processes,
by a probe estimator that writes what it sees to a file. No test looks at the clock.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.pipeline import Pipeline

from clinml import cpus


def _cgroup_v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text + "\n")
    return root


def _cgroup_v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.parametrize(
    ("text", "limit"),
    [("150000 100000", 1.5), ("400000 100000", 4.0), ("max 100000", None), ("50000", 0.5)],
)
def test_cgroup_v2_quota_in_cpus(tmp_path: Path, text: str, limit: float | None) -> None:
    assert cpus.cgroup_cpu_limit(_cgroup_v2(tmp_path, text)) == limit


@pytest.mark.parametrize(
    ("quota", "period", "limit"),
    [("200000", "100000", 2.0), ("50000", "100000", 0.5), ("-1", "100000", None)],
)
def test_cgroup_v1_quota_in_cpus(tmp_path: Path, quota: str, period: str, limit) -> None:
    assert cpus.cgroup_cpu_limit(_cgroup_v1(tmp_path, quota, period)) == limit


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_limit(tmp_path) is None


@pytest.mark.usefixtures("eight_cpus")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max 100000", 8),  # no quota: the affinity
        ("300000 100000", 3),  # a pod's limits.cpu: 3
        ("250000 100000", 2),  # 2.5 CPUs run two threads without throttling
        ("1600000 100000", 8),  # a quota above the affinity: the affinity
        ("20000 100000", 1),  # a fifth of a CPU: still one thread
    ],
)
def test_usable_cpus_is_the_affinity_capped_by_the_quota(
    tmp_path: Path, text: str, expected: int
) -> None:
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, text)) == expected


def test_usable_cpus_follows_the_affinity(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)
    assert cpus.usable_cpus(tmp_path) == 2
    assert cpus.usable_cpus(_cgroup_v1(tmp_path, "100000")) == 1


@pytest.mark.usefixtures("eight_cpus")
def test_override_wins_over_the_computed_count(tmp_path: Path) -> None:
    root = _cgroup_v2(tmp_path, "200000 100000")
    assert cpus.training_threads(None, root) == 2
    assert cpus.training_threads(5, root) == 5
    assert cpus.training_threads(0, root) == 0  # no limit: the libraries' defaults
    with pytest.raises(ValueError, match="CLINML_TRAIN_THREADS"):
        cpus.training_threads(-1, root)


def test_override_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from clinml.settings import Settings
    from clinml.training.train import resolve_threads

    monkeypatch.setenv("CLINML_TRAIN_THREADS", "3")
    assert Settings().train_threads == 3
    assert resolve_threads() == 3
    assert resolve_threads(1) == 1  # an explicit count wins
    monkeypatch.delenv("CLINML_TRAIN_THREADS")
    assert resolve_threads() == cpus.usable_cpus()
    monkeypatch.setenv("CLINML_TRAIN_THREADS", "-2")
    with pytest.raises(ValidationError):
        Settings()


def _openmp_and_blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info()]


def test_limit_threads_sets_every_pool_and_restores_them() -> None:
    import sklearn.ensemble  # noqa: F401  (loads scikit-learn's OpenMP runtime)
    import torch
    from joblib.parallel import get_active_backend

    before_torch = torch.get_num_threads()
    before_env = os.environ.get("OMP_NUM_THREADS")
    with cpus.limit_threads(2):
        assert set(_openmp_and_blas_threads()) == {2}
        assert torch.get_num_threads() == 2
        assert all(os.environ[name] == "2" for name in cpus.THREAD_ENV_VARS)
        assert get_active_backend()[1] == 2  # joblib's default n_jobs
    assert torch.get_num_threads() == before_torch
    assert os.environ.get("OMP_NUM_THREADS") == before_env


class Probe(ClassifierMixin, BaseEstimator):
    """Writes the process id and thread limits it sees while fitting to ``record_dir``."""

    def __init__(self, record_dir: str = ""):
        self.record_dir = record_dir

    def fit(self, X, y):
        import torch

        record = {
            "pid": os.getpid(),
            "pools": _openmp_and_blas_threads(),
            "torch": torch.get_num_threads(),
            "omp_env": os.environ.get("OMP_NUM_THREADS"),
        }
        Path(self.record_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
        self.classes_ = np.unique(y)
        self.rate_ = float(np.mean(y))
        return self

    def predict_proba(self, X):
        rate = np.full(len(X), self.rate_)
        return np.column_stack([1 - rate, rate])


def _search_with_probe(spec, frame, tmp_path: Path, monkeypatch, threads: int) -> list[dict]:
    import clinml.training.search as search_module
    from clinml.training.train import outcome

    records = tmp_path / f"records-{threads}"
    records.mkdir()

    def probe_pipeline(name, spec, params, seed, n_rows=0):
        return Pipeline([("model", Probe(str(records)))])

    monkeypatch.setattr(search_module, "build_pipeline", probe_pipeline)
    y = outcome(frame, spec)
    x = frame[spec.feature_names]
    result = search_module.search(
        "mlp", spec, x, y, frame["patient_id"].to_numpy(), threads=threads
    )
    seen = [json.loads(path.read_text()) for path in records.iterdir()]
    folds = len(result.trials[0].fold_scores)
    assert len(seen) == len(result.trials) * folds
    return seen


def test_search_fits_in_worker_processes_of_one_thread(
    tiny_spec, tiny_frame, tmp_path, monkeypatch
) -> None:
    seen = _search_with_probe(tiny_spec, tiny_frame, tmp_path, monkeypatch, threads=2)
    pids = {record["pid"] for record in seen}
    assert os.getpid() not in pids  # the fits ran in workers ...
    assert len(pids) <= 2  # ... no more of them than the CPUs given
    for record in seen:
        assert set(record["pools"]) == {1}
        assert record["torch"] == 1
        assert record["omp_env"] == "1"


def test_search_on_one_cpu_fits_in_this_process_on_one_thread(
    tiny_spec, tiny_frame, tmp_path, monkeypatch
) -> None:
    seen = _search_with_probe(tiny_spec, tiny_frame, tmp_path, monkeypatch, threads=1)
    assert {record["pid"] for record in seen} == {os.getpid()}
    assert all(set(record["pools"]) == {1} and record["torch"] == 1 for record in seen)


def test_refit_in_the_training_process_runs_on_one_thread(
    tiny_spec, tiny_frame, monkeypatch
) -> None:
    """fit_candidate limits the refit (and evaluation) in this process to one thread."""
    import clinml.training.candidates as candidates
    import clinml.training.train as train_module

    seen: list[list[int]] = []
    real_fit = candidates.fit

    def spy_fit(pipeline, x, y, groups):
        seen.append(_openmp_and_blas_threads())
        return real_fit(pipeline, x, y, groups)

    monkeypatch.setattr(train_module, "fit", spy_fit)
    frame = tiny_frame.drop(columns=["mrn"])
    y = train_module.outcome(frame, tiny_spec)
    split = train_module.split_frame(frame, tiny_spec)
    train_module.fit_candidate(tiny_spec, frame, y, split, "gbm", n_boot=50, threads=2)
    assert seen and all(set(pools) == {1} for pools in seen)
