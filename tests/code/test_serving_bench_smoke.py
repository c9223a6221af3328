"""The serving benchmark harness runs end to end (``bench/serving_bench.py --smoke``).

It trains the pathology gbm champion into a temporary bench home, starts each of the
five servers in turn under ``wrk`` for a second, and reports. Only that every server
answered (every answer 2xx, or the harness exits non-zero) is checked, never a timing:
CI machines are too noisy for that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow

SERVERS = {"ours", "ours-unbatched", "mlflow", "bentoml-trivial", "starlette"}


def _wrk_or_skip() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the serving bench needs two cores (servers on one, wrk on the other)")
    if shutil.which("wrk") is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "wrk"], capture_output=True, timeout=300, check=False
        )
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        pytest.skip("wrk is not installed and could not be (apt-get install -y wrk)")


def test_smoke_run_measures_every_server(tmp_path: Path) -> None:
    _wrk_or_skip()
    env = dict(os.environ)
    # The test session's BentoML store and metrics directory are not the bench's.
    for name in ("BENTOML_HOME", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    home = tmp_path / "bench-home"
    done = subprocess.run(
        [sys.executable, "bench/serving_bench.py", "--smoke", "--home", str(home)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"model"')]
    served = {row["server"] for row in rows if "server" in row}
    assert served >= SERVERS, f"servers without a row: {SERVERS - served}\n{output[-4000:]}"
    assert any(row.get("endpoint") == "/predict_patient" for row in rows)
    assert all(row["rps"] > 0 for row in rows if "rps" in row)
    assert any("fast_ms" in row for row in rows)
    assert "<!-- serving-bench -->" in done.stdout
    assert (home / "reports" / "serving_latency_throughput.png").stat().st_size > 0
    logs = {path.name.split("-")[1] for path in (home / "logs").glob("pathology_gbm-*.log")}
    assert logs >= {"ours", "mlflow", "bentoml", "starlette"}
