"""The model service on a GPU: the split executor under `CLINML_GPU=1` (issue 25, item 5).

Skipped without a CUDA device; bench/gpu_check.sh runs it on a GPU machine. A real
`bentoml serve` with ``CLINML_EXECUTION=split``, ``CLINML_GPU=1`` (the executor asks
BentoML for a GPU, which sets ``CUDA_VISIBLE_DEVICES`` for it) and ``CLINML_DEVICE=cuda``
(no silent fallback to the CPU) serves the session's champion on CUDA, with the
probabilities of the same version run on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.integration.served import api_keys, serve_from_the_session_store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_split_executor_serves_on_cuda_with_the_cpus_probabilities(
    pipeline, home: Path, records: pd.DataFrame, pathology_spec, monkeypatch
) -> None:
    import httpx

    from clinml.serving.launch import ServiceProcess, free_port
    from clinml.serving.runtime import load_from_registry
    from clinml.training.tracking import Tracker

    settings, _, _ = pipeline
    monkeypatch.setenv("CLINML_EXECUTION", "split")
    monkeypatch.setenv("CLINML_GPU", "1")
    monkeypatch.setenv("CLINML_DEVICE", "cuda")
    serve_from_the_session_store(monkeypatch)
    on_cpu = load_from_registry(pathology_spec, Tracker.from_settings(settings), device="cpu")
    rows = records.to_dict("records")
    expected = on_cpu.predict(on_cpu.encode(rows))
    headers = {"Authorization": f"Bearer {api_keys(home)['dev']}"}
    log_file = home / "logs" / "serve-gpu.log"
    with (
        ServiceProcess(settings, "pathology", free_port(), log_file) as served,
        httpx.Client(base_url=served.url, headers=headers, timeout=60) as http,
    ):
        info = http.get("/model").json()
        answer = http.post("/predict", json={"records": rows})

    assert info["execution_service"] == "split"
    assert info["device"].startswith("cuda"), info["device"]
    assert info["version"] == on_cpu.version
    assert answer.status_code == 200, answer.text
    got = [p["probability"] for p in answer.json()["predictions"]]
    # float32 kernels on the GPU round differently from the CPU's float64
    assert got == pytest.approx(list(expected), rel=0, abs=1e-5)
    assert "falling back to the CPU" not in log_file.read_text()
