"""`clinml train --ray` on a Ray cluster that `ray start --head` runs on loopback (issue 25).

A data directory of its own with a reduced copy of the shipped readmission spec (name
kept). ``clinml run`` trains in-process and registers version 1; ``clinml train --ray
127.0.0.1:PORT`` trains again on a real Ray cluster (a head node with 2 CPUs, started by
the module in a temporary HOME, where Ray keeps its authentication token, and stopped at
the end) and registers version 2. The two trainings must leave MLflow in the same shape
with the same numbers: the same candidate runs with the same parameters, metrics (all but
the seconds they took), tags and artifacts, and registered versions with the same tags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clinml.settings import Settings
from tests.integration.served import clinml as served_cli
from tests.integration.served import reduced_spec

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.e2e]

KEY = "ray-cli-pseudonym-key-0123456789abcdef"
TIMINGS = {"fit_seconds", "search_seconds"}


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A Ray head node on loopback: (its address, the HOME it keeps its token in)."""
    from clinml.serving.launch import free_port

    home = tmp_path_factory.mktemp("ray-head-home")
    env = {**os.environ, "HOME": str(home)}
    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    started = subprocess.run(
        [
            ray, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
            "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}", home
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, head: tuple[str, Path]
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    address, ray_home = head
    home = tmp_path_factory.mktemp("ray-cli-home")
    _, spec_file = reduced_spec(home, "readmission", 3_000, bootstrap=100)
    env = {"CLINML_PSEUDONYM_KEY": KEY, "HOME": str(ray_home)}
    ran = served_cli(home, "run", str(spec_file), env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    on_ray = served_cli(home, "train", str(spec_file), "--ray", address, env=env)
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    return home, on_ray


def _runs(home: Path) -> list[Any]:
    from clinml.training.tracking import Tracker

    tracker = Tracker.from_settings(Settings(home=home, pseudonym_key=KEY))
    experiment = tracker.client.get_experiment_by_name("readmission")
    return tracker.client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time ASC"]
    )


def _artifacts(client: Any, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_the_progress_says_it_trained_on_the_cluster(trained, head) -> None:
    _, on_ray = trained
    address, _ = head
    assert f"training on Ray at {address} (2 CPUs)" in on_ray.stdout + on_ray.stderr


def test_both_trainings_leave_the_same_runs_and_registered_versions(trained) -> None:
    from clinml.training.tracking import Tracker

    home, _ = trained
    runs = _runs(home)
    assert len(runs) % 2 == 0 and runs
    first, second = runs[: len(runs) // 2], runs[len(runs) // 2 :]
    client = Tracker.from_settings(Settings(home=home, pseudonym_key=KEY)).client
    assert [r.info.run_name for r in first] == [r.info.run_name for r in second]
    for a, b in zip(first, second, strict=True):
        name = a.info.run_name
        assert a.data.params == b.data.params, name
        assert set(a.data.metrics) == set(b.data.metrics), name
        for key, value in a.data.metrics.items():
            if key not in TIMINGS:
                assert b.data.metrics[key] == value, (name, key)
        assert set(a.data.tags) == set(b.data.tags), name
        assert _artifacts(client, a.info.run_id) == _artifacts(client, b.info.run_id), name
    versions = sorted(
        client.search_model_versions("name='readmission'"), key=lambda v: int(v.version)
    )
    assert [str(v.version) for v in versions] == ["1", "2"]
    one, two = (v.tags for v in versions)
    # version 1 was then promoted by `clinml run`, which tags it
    assert {k for k in one if not k.startswith("clinml.promoted")} == set(two)
    # the same model, chosen and judged the same way, on the same rows
    for key in ("candidate", "data_fingerprint", "operating_threshold", "test_ece"):
        assert one[key] == two[key], key
    assert one["run_id"] != two["run_id"]
