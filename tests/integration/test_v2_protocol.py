"""The Open Inference Protocol (KServe V2) endpoint against the trained champion: the same
answers as ``/predict`` for both input styles, bad tensors refused with ``400 {"error"}``
and no value echoed, the key and role checks, the audit trail; then a real protocol client
(``tritonclient``) against a real ``bentoml serve``.

The translation itself (every shape, datatype and value rule) is unit-tested in
tests/code/test_v2_protocol.py, on a spec with a categorical feature; pathology has none.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from clinml.settings import Settings
from tests.integration.served import api_keys, service_instance
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

INFER = "/v2/models/pathology/infer"
START_DEADLINE_S = 300.0  # a loaded CI machine may take minutes to start the service


def named_body(records: pd.DataFrame) -> dict[str, Any]:
    """One FP64 tensor per feature."""
    return {
        "id": "req-7",
        "inputs": [
            {"name": name, "shape": [len(records)], "datatype": "FP64", "data": list(values)}
            for name, values in records.items()
        ],
    }


def matrix_body(records: pd.DataFrame) -> dict[str, Any]:
    """One FP64 [n, k] tensor in the metadata's order."""
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(records.shape),
                "datatype": "FP64",
                "data": records.to_numpy().tolist(),
            }
        ]
    }


def outputs(answer: dict[str, Any]) -> dict[str, list[Any]]:
    return {o["name"]: o["data"] for o in answer["outputs"]}


def test_both_input_styles_answer_what_predict_answers(client, records: pd.DataFrame) -> None:
    head = records.head(7)
    predict = client.post("/predict", json={"records": head.to_dict("records")})
    assert predict.status_code == 200, predict.text
    expected = predict.json()["predictions"]
    meta = client.get("/v2/models/pathology").json()
    assert [i["name"] for i in meta["inputs"]] == list(head.columns)
    for body in (named_body(head), matrix_body(head[[i["name"] for i in meta["inputs"]]])):
        response = client.post(INFER, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model_name"] == "pathology"
        assert answer["model_version"] == predict.json()["model"]["version"]
        got = outputs(answer)
        assert got["probability"] == [p["probability"] for p in expected]
        assert got["label"] == [p["label"] for p in expected]
        assert got["risk_band"] == [p["risk_band"] for p in expected]
        assert [o["shape"] for o in answer["outputs"]] == [[7]] * 3
    assert client.post(INFER, json=named_body(head)).json()["id"] == "req-7"


def _spoil(body: dict[str, Any], feature: str, **change: Any) -> dict[str, Any]:
    inputs = [dict(t, **change) if t["name"] == feature else t for t in body["inputs"]]
    return {**body, "inputs": inputs}


def test_bad_tensors_are_a_400_error_without_the_value(client, records: pd.DataFrame) -> None:
    head = records.head(3)
    body = named_body(head)
    radius = list(head["mean_radius"])
    cases = {
        "shape": _spoil(body, "mean_radius", shape=[3, 2]),
        "datatype": _spoil(body, "mean_radius", datatype="BYTES", data=["1", "2", "3"]),
        "out of range": _spoil(body, "mean_radius", data=[radius[0], 59.875, 612.4375]),
        "unknown input": {
            **body,
            "inputs": [
                *body["inputs"],
                {"name": "MRN-0042", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]},
            ],
        },
        "missing feature": {**body, "inputs": body["inputs"][1:]},
        "matrix shape": {
            **matrix_body(head),
            "inputs": [{**matrix_body(head)["inputs"][0], "shape": [3, 2]}],
        },
    }
    for case, bad in cases.items():
        response = client.post(INFER, json=bad)
        assert response.status_code == 400, (case, response.text)
        assert set(response.json()) == {"error"}, case
        for value in ("612.4375", "MRN-0042", str(radius[0])):
            assert value not in response.text, case
    # NaN, as a protocol client sends it (a JSON NaN token: tritonclient's encoder writes one)
    raw = json.dumps(_spoil(body, "mean_radius", data=[1.0, math.nan, 3.0])).encode()
    assert b"NaN" in raw
    response = client.post(INFER, content=raw)  # and, as such a client does, undeclared
    assert response.status_code == 400
    assert "feature mean_radius, row 1: Input should be a finite number" in response.json()["error"]


def test_the_body_is_json_declared_or_not(client, records: pd.DataFrame) -> None:
    """Protocol clients (tritonclient.http) send the body with no Content-Type: it is JSON.
    One declared as anything else is a 415, binary tensor data a 400; /predict is unchanged."""
    body = json.dumps(named_body(records.head(2))).encode()
    undeclared = client.post(INFER, content=body)
    assert undeclared.status_code == 200, undeclared.text
    assert outputs(undeclared.json()) == outputs(
        client.post(INFER, json=named_body(records.head(2))).json()
    )
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        refused = client.post(INFER, content=body, headers={"Content-Type": content_type})
        assert refused.status_code == 415 and set(refused.json()) == {"error"}, content_type
    binary = client.post(INFER, content=body, headers={"Inference-Header-Content-Length": "9"})
    assert binary.status_code == 400 and "binary tensor data" in binary.json()["error"]
    record = {"records": records.head(1).to_dict("records")}
    assert client.post("/predict", content=json.dumps(record).encode()).status_code == 415


def test_keys_roles_and_other_models(client, keys: dict[str, str], records) -> None:
    body = named_body(records.head(2))
    assert client.post(INFER, json=body, headers={"Authorization": ""}).status_code == 401
    for key_id, expected in (("app", 200), ("analyst", 403), ("dev", 200)):
        headers = {"Authorization": "", "X-API-Key": keys[key_id]}
        assert client.post(INFER, json=body, headers=headers).status_code == expected, key_id
        ready = client.get("/v2/models/pathology/ready", headers=headers)
        assert ready.status_code == expected, key_id
    app = {"Authorization": "", "X-API-Key": keys["app"]}
    other = client.post("/v2/models/readmission/infer", json=body, headers=app)
    assert other.status_code == 404 and set(other.json()) == {"error"}
    assert "readmission" not in other.text
    anonymous = {"Authorization": ""}
    for open_path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        assert client.get(open_path, headers=anonymous).status_code == 200, open_path


def test_infer_is_audited_logged_and_counted(client, home: Path, records) -> None:
    from clinml.audit import AuditLog

    logged = service_instance().predictions.written
    response = client.post(INFER, json=named_body(records.head(2)))
    assert response.status_code == 200
    assert service_instance().predictions.flush(10)
    assert service_instance().predictions.written >= logged + 2  # one row per record
    request_log = Settings(home=home).paths.request_audit_log
    assert service_instance().audit.flush(10)
    found = [r for r in AuditLog(request_log).records() if r["endpoint"] == INFER]
    assert found and found[-1]["outcome"] == 200 and found[-1]["model_version"]
    text = client.get("/metrics").text
    assert f'clinml_predictions_total{{endpoint="{INFER}",label=' in text
    assert f'clinml_request_duration_seconds_count{{endpoint="{INFER}"}}' in text
    document = client.get("/docs.json").json()
    assert "400" in document["paths"][INFER]["post"]["responses"]


# -- a real protocol client against `bentoml serve` -------------------------------------


@pytest.fixture(scope="module")
def served(pipeline, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bentoml serve`` with the session's keys; its ``host:port``."""
    from clinml.serving import launch

    settings, _, _ = pipeline
    api_keys(home)
    log_file = tmp_path_factory.mktemp("v2-serve") / "serve.log"
    env = {
        **launch.service_env(settings, "pathology"),
        "BENTOML_HOME": os.environ["BENTOML_HOME"],  # the session's store (conftest)
        "CLINML_AUTH": "true",
    }
    env.pop("CLINML_API_KEYS", None)
    port = launch.free_port()
    url = f"127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"http://{url}/readyz", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    with log_file.open("wb") as log:
        process = subprocess.Popen(
            launch.serve_command("127.0.0.1", port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: process.poll() is not None or ready(), "the service ready", START_DEADLINE_S
        )
        assert process.poll() is None, log_file.read_text(errors="replace")
        yield url
    finally:
        launch.stop_group(process)


def test_tritonclient_round_trips(served: str, home: Path, records: pd.DataFrame) -> None:
    import tritonclient.http as httpclient

    key = api_keys(home)["app"]
    # the client as it is: it sends the body with no Content-Type
    headers = {"Authorization": f"Bearer {key}"}
    client = httpclient.InferenceServerClient(url=served, network_timeout=120.0)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("pathology", headers=headers)
        meta = client.get_model_metadata("pathology", headers=headers)
        names = [i["name"] for i in meta["inputs"]]
        assert meta["name"] == "pathology" and names == list(records.columns)
        head = records.head(5)
        inputs = []
        for name in names:
            tensor = httpclient.InferInput(name, [len(head)], "FP64")
            tensor.set_data_from_numpy(head[name].to_numpy(np.float64), binary_data=False)
            inputs.append(tensor)
        wanted = [
            httpclient.InferRequestedOutput(n, binary_data=False)
            for n in ("probability", "label", "risk_band")
        ]
        result = client.infer("pathology", inputs, outputs=wanted, headers=headers)
        probability = result.as_numpy("probability")
        labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        predict = httpx.post(
            f"http://{served}/predict",
            json={"records": head.to_dict("records")},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ).json()["predictions"]
        assert probability.tolist() == [p["probability"] for p in predict]
        assert labels == [p["label"] for p in predict]
        # one [n, k] tensor, as the metadata orders the features
        matrix = httpclient.InferInput("input", [len(head), len(names)], "FP64")
        matrix.set_data_from_numpy(head[names].to_numpy(np.float64), binary_data=False)
        again = client.infer("pathology", [matrix], outputs=wanted, headers=headers)
        assert again.as_numpy("probability").tolist() == probability.tolist()
        # the client's defaults: binary input data (refused, saying so), binary outputs
        # asked for (answered as JSON, which the client reads all the same)
        from tritonclient.utils import InferenceServerException

        binary = httpclient.InferInput("input", [len(head), len(names)], "FP64")
        binary.set_data_from_numpy(head[names].to_numpy(np.float64))
        with pytest.raises(InferenceServerException, match="binary tensor data"):
            # a copy: tritonclient adds its Inference-Header-Content-Length to the dict given
            client.infer("pathology", [binary], headers=dict(headers))
        default = client.infer("pathology", [matrix], headers=headers)
        assert default.as_numpy("probability").tolist() == probability.tolist()
        # no key: the client sees the 401
        with pytest.raises(InferenceServerException):
            client.infer("pathology", inputs, outputs=wanted)
    finally:
        client.close()
