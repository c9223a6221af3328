"""The model-execution service run on its own, reached by the API over HTTP.

This is the GPU model service of docs/deployment.md: ``bentoml serve
clinml.serving.executor:ModelExecutor`` in one process (a GPU Deployment in a cluster) and the
API with ``CLINML_EXECUTION=split`` and ``CLINML_EXECUTOR_URL`` pointing at it. Here both
run on this machine's CPU; what is tested is the path between them.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.served import api_keys, serve_from_the_session_store
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


EXECUTOR = "clinml.serving.executor:ModelExecutor"


@pytest.fixture(scope="module")
def remote(pipeline, home: Path):
    from clinml.serving.launch import ServiceProcess, free_port

    settings, _, _ = pipeline
    keys = api_keys(home)
    with pytest.MonkeyPatch.context() as patch:
        serve_from_the_session_store(patch)
        log = home / "logs" / "executor-remote.log"
        executor = ServiceProcess(settings, "pathology", free_port(), log, target=EXECUTOR)
        with executor:
            patch.setenv("CLINML_EXECUTION", "split")
            patch.setenv("CLINML_EXECUTOR_URL", executor.url)
            api_log = home / "logs" / "serve-remote-executor.log"
            with ServiceProcess(settings, "pathology", free_port(), api_log) as api:
                yield api, keys, executor, settings


def test_the_api_scores_through_the_remote_executor_as_inline_does(remote, client, records) -> None:
    from clinml.training.tracking import Tracker

    api, keys, _, settings = remote
    headers = {"Authorization": f"Bearer {keys['dev']}"}
    # Earlier modules may have moved the champion: both services follow it on reload,
    # the remote one through the API, which forwards the reload to the executor.
    champion = str(Tracker.from_settings(settings).version_by_alias("pathology").version)
    reloaded = httpx.post(f"{api.url}/admin/reload", headers=headers, timeout=120)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["version"] == champion
    assert client.post("/admin/reload").json()["version"] == champion
    body = {"records": records.head(5).to_dict("records")}
    answer = httpx.post(f"{api.url}/predict", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    inline = client.post("/predict", json=body)  # the session's in-process, inline service
    assert inline.status_code == 200, inline.text
    remote_p = [p["probability"] for p in answer.json()["predictions"]]
    inline_p = [p["probability"] for p in inline.json()["predictions"]]
    assert remote_p == pytest.approx(inline_p, abs=1e-9)
    assert answer.json()["model"] == inline.json()["model"]

    explained = httpx.post(
        f"{api.url}/explain", json={**body, "top_k": 3}, headers=headers, timeout=30
    )
    assert explained.status_code == 200, explained.text
    assert len(explained.json()["explanations"]) == 5
    described = httpx.get(f"{api.url}/model", headers=headers, timeout=30).json()
    assert described["execution_service"] == "split"


def test_a_stopped_remote_executor_is_a_503_and_its_return_is_served(remote, records) -> None:
    api, keys, executor, _ = remote
    headers = {"Authorization": f"Bearer {keys['app']}"}
    body = {"records": records.head(1).to_dict("records")}
    executor.stop()
    down = httpx.post(f"{api.url}/predict", json=body, headers=headers, timeout=60)
    assert down.status_code == 503, down.text
    assert "model execution service unavailable" in down.text
    # The API's own `bentoml serve` started no executor: with the remote one stopped,
    # nothing answers.
    executor.start()
    answers: list[httpx.Response] = []

    def answered() -> bool:
        answers.append(httpx.post(f"{api.url}/predict", json=body, headers=headers, timeout=60))
        return answers[-1].status_code == 200

    wait_for(
        answered,
        "/predict answering once the executor is back",
        60,
        every_s=1,
        seen=lambda: answers[-1].text,
    )
