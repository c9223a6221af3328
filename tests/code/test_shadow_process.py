"""The shadow version's model in a process of its own (``clinml.serving.shadow_process``).

A real child process scores a real fitted pipeline: its probabilities are the model's,
it runs niced under another pid, it holds one version at a time, and a model that raises,
a child that is killed and a child that hangs each end in a ShadowFailed naming the kind
only, after which a new child takes over. tests/integration/test_shadow.py runs it inside
the service.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from clinml.serving.runtime import ServedModel
from clinml.serving.shadow_process import CHILD_NICE, ShadowFailed, ShadowProcess

FEATURES = ["radius", "texture"]


def _model(version: str, seed: int) -> ServedModel:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 2))
    y = (x[:, 0] + rng.normal(scale=0.5, size=200) > 0).astype(int)
    pipeline = Pipeline(
        [
            ("prep", ColumnTransformer([("num", StandardScaler(), FEATURES)])),
            ("clf", LogisticRegression(C=0.1 * seed)),
        ]
    ).fit(pd.DataFrame(x, columns=FEATURES), y)
    return ServedModel(
        name="pathology",
        version=version,
        alias="shadow",
        candidate="logreg",
        threshold=0.5,
        feature_service="pathology_v1",
        features=FEATURES,
        trained_at=None,
        metrics={},
        run_id="r" * 32,
        pipeline=pipeline,
    )


COLUMNS = {"radius": np.array([0.3, -1.2, 2.0]), "texture": np.array([1.0, 0.0, -0.5])}


def _in_process(model: ServedModel, columns: dict[str, Any]) -> np.ndarray:
    return model.pipeline.predict_proba(pd.DataFrame({f: columns[f] for f in model.features}))[:, 1]


@pytest.fixture
def process() -> Iterator[ShadowProcess]:
    shadow = ShadowProcess(restart_after_s=0.0)
    yield shadow
    shadow.close()


def test_the_child_gives_the_models_probabilities_niced_in_another_process(process) -> None:
    first, second = _model("3", 1), _model("4", 7)
    np.testing.assert_allclose(process.predict(first, COLUMNS), _in_process(first, COLUMNS))
    pid = process.pid
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) == CHILD_NICE
    # the same child keeps the version, and takes the next one when asked
    np.testing.assert_allclose(process.predict(first, COLUMNS), _in_process(first, COLUMNS))
    np.testing.assert_allclose(process.predict(second, COLUMNS), _in_process(second, COLUMNS))
    assert not np.allclose(_in_process(first, COLUMNS), _in_process(second, COLUMNS))
    assert process.pid == pid and process.starts == 1


def test_a_model_that_raises_fails_the_call_by_kind_and_the_child_goes_on(process) -> None:
    model = _model("3", 1)
    with pytest.raises(ShadowFailed) as failed:
        process.predict(model, {"radius": np.array([14.2])})  # texture missing
    assert failed.value.kind in {"KeyError", "ValueError"}
    assert "14.2" not in str(failed.value) and "texture" not in str(failed.value)
    pid = process.pid
    np.testing.assert_allclose(process.predict(model, COLUMNS), _in_process(model, COLUMNS))
    assert process.pid == pid


def test_a_killed_child_fails_one_call_and_a_new_child_takes_over(process) -> None:
    model = _model("3", 1)
    process.predict(model, COLUMNS)
    killed = process.pid
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(ShadowFailed) as failed:
        process.predict(model, COLUMNS)
    assert failed.value.kind == "ShadowProcessExited"
    np.testing.assert_allclose(process.predict(model, COLUMNS), _in_process(model, COLUMNS))
    assert process.pid != killed and process.starts == 2


def test_a_hung_child_is_killed_at_the_reply_timeout_and_replaced(process) -> None:
    model = _model("3", 1)
    process.predict(model, COLUMNS)  # started and loaded, under the generous default
    hung = process.pid
    os.kill(hung, signal.SIGSTOP)
    process.reply_timeout_s = 1.0  # the limit under test: the child will never answer
    try:
        with pytest.raises(ShadowFailed) as failed:
            process.predict(model, COLUMNS)
        assert failed.value.kind == "ShadowProcessTimeout"
    finally:
        process.reply_timeout_s = 600.0
    with pytest.raises(ProcessLookupError):  # killed, and reaped
        os.kill(hung, 0)
    np.testing.assert_allclose(process.predict(model, COLUMNS), _in_process(model, COLUMNS))
    assert process.pid != hung


def test_after_a_failure_the_child_is_not_restarted_until_the_pause_ends() -> None:
    process = ShadowProcess(restart_after_s=3_600.0)
    try:
        model = _model("3", 1)
        process.predict(model, COLUMNS)
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(ShadowFailed):
            process.predict(model, COLUMNS)
        with pytest.raises(ShadowFailed) as failed:
            process.predict(model, COLUMNS)
        assert failed.value.kind == "ShadowProcessDown" and process.starts == 1
    finally:
        process.close()


def test_closing_or_releasing_stops_the_child(process) -> None:
    model = _model("3", 1)
    process.predict(model, COLUMNS)
    first = process.pid
    process.release_if_idle()
    assert process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)
    process.predict(model, COLUMNS)  # started again on the next call
    second = process.pid
    process.close()
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
