"""The serving bench's peers (``bench/peers.py``): the exported model, the bodies, the venvs.

Offline and fast: no venv is made and no peer started (the measured run does that).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from bench import peers, serving_bench
from bench.serving_bench import SERVERS, parse_args
from clinml.training.candidates import GroupedHistGradientBoosting, PriorCorrected


def _rows(n: int = 80) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n)})
    return frame, (frame["a"] + rng.normal(scale=0.5, size=n) > 0).astype(int).to_numpy()


def test_gbm_export_holds_only_scikit_learn_and_predicts_the_same() -> None:
    frame, label = _rows()
    pipeline = Pipeline(
        [("scale", StandardScaler()), ("model", GroupedHistGradientBoosting(max_iter=5))]
    ).fit(frame, label)
    plain = peers.plain_pipeline(pipeline)
    assert not [m for m in peers.pickled_modules(plain) if m.startswith("clinml")]
    assert np.array_equal(plain.predict_proba(frame), pipeline.predict_proba(frame))
    assert type(pipeline.named_steps["model"]) is GroupedHistGradientBoosting  # a copy


def test_a_clinml_class_that_changes_prediction_is_refused() -> None:
    frame, label = _rows()
    pipeline = Pipeline([("model", PriorCorrected(LogisticRegression()))]).fit(frame, label)
    with pytest.raises(peers.PeerError, match=r"clinml\.training\.candidates"):
        peers.plain_pipeline(pipeline)


def test_bodies_carry_every_record_in_each_peer_protocol() -> None:
    records = [{"age": 70, "sex": "F", "wbc": 5.5}, {"age": 44, "sex": "M", "wbc": None}]
    kserve = json.loads(peers.peer_body("kserve", records, ["age", "sex", "wbc"]))
    assert kserve == {"instances": records}
    mlserver = json.loads(peers.peer_body("mlserver", records, ["age", "sex", "wbc"]))
    assert mlserver["parameters"] == {"content_type": "pd"}
    assert mlserver["outputs"] == [{"name": "predict_proba"}]
    columns = {i["name"]: (i["datatype"], i["shape"], i["data"]) for i in mlserver["inputs"]}
    assert columns == {
        "age": ("FP64", [2], [70, 44]),
        "sex": ("BYTES", [2], ["F", "M"]),
        "wbc": ("FP64", [2], [5.5, None]),
    }


def test_a_venv_with_the_pinned_stamp_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = peers.venv_dir(tmp_path, "kserve")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / peers.STAMP).write_text(json.dumps(list(peers.PINS["kserve"])))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a venv with the pinned stamp was made again")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert peers.ensure_venv(tmp_path, "kserve", tmp_path / "logs") == venv / "bin" / "python"


def test_a_venv_with_other_pins_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = peers.venv_dir(tmp_path, "mlserver")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / "stale").touch()
    (venv / peers.STAMP).write_text(json.dumps(["mlserver==1.0.0"]))
    commands: list[list[str]] = []

    def record(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        commands.append(command)
        if command[1:3] == ["-m", "venv"]:
            (Path(command[3]) / "bin").mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(peers.shutil, "which", lambda name: "/usr/bin/python3.11")
    monkeypatch.setattr(subprocess, "run", record)
    peers.ensure_venv(tmp_path, "mlserver", tmp_path / "logs")
    assert not (venv / "stale").exists()
    assert commands[0] == ["/usr/bin/python3.11", "-m", "venv", str(venv)]
    assert commands[1][-len(peers.PINS["mlserver"]) :] == list(peers.PINS["mlserver"])
    assert json.loads((venv / peers.STAMP).read_text()) == list(peers.PINS["mlserver"])


def test_peers_are_measured_only_when_asked() -> None:
    assert parse_args(["--smoke"]).servers == list(SERVERS)
    assert not set(SERVERS) & set(peers.PEERS)
    assert parse_args(["--servers", "ours", "kserve"]).servers == ["ours", "kserve"]


def _point(server: str, endpoint: str, n: int, c: int, rps: float, p50: float, p99: float) -> dict:
    return {
        "model": "gbm",
        "server": server,
        "endpoint": endpoint,
        "payload": serving_bench.payload_label(n),
        "concurrency": c,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
    }


def test_peer_targets_compare_each_endpoint_with_the_best_peer() -> None:
    args = parse_args(
        [
            "--usecase",
            "readmission",
            "--models",
            "gbm",
            "--servers",
            "ours",
            "kserve",
            "mlserver",
            "--payloads",
            "1",
            "100",
            "--concurrency",
            "1",
        ]
    )
    v2 = "/v2/models/readmission_gbm/infer"  # the bench names its champion by kind
    rows = [
        _point("kserve", "/v1/models/readmission:predict", 1, 1, 100, 5, 9),
        _point("mlserver", "/v2/models/readmission/infer", 1, 1, 300, 2, 4),  # the best at 1
        _point("ours", "/predict", 1, 1, 1000, 1, 2),  # 3.3x, p99 0.5, tail 2: met
        _point("ours", v2, 1, 1, 800, 1, 2),  # 2.7x: missed
        _point("kserve", "/v1/models/readmission:predict", 100, 1, 50, 10, 20),
        _point("ours", "/predict", 100, 1, 70, 5, 19),  # 1.4x but its tail is 3.8x: missed
        _point("ours", v2, 100, 1, 70, 7, 21),  # p99 above kserve's: missed
    ]
    lines = serving_bench.peer_checks(rows, args)[2:]
    cells = [[cell.strip() for cell in line.split("|")] for line in lines]
    marks = [(cell[2], cell[3], cell[-2] == "met") for cell in cells]
    assert marks == [
        ("`/predict`", "1", True),
        (f"`{v2}`", "1", False),
        ("`/predict`", "100", False),
        (f"`{v2}`", "100", False),
    ]
    assert "3.33× (mlserver; need ≥ 3×)" in lines[0]
