"""KServe and MLServer, the serving bench's peers: their venvs, the shared model, their servers.

``bench/serving_bench.py --servers ... kserve mlserver`` measures them beside clinml's
service. Each peer runs from its own virtual environment, made on first use under
``<bench home>/peers/<peer>-venv`` with ``python3.11 -m venv`` and pip, at the versions
pinned in ``PINS``; a stamp file in the venv records the pins it was made with, and a venv
whose stamp differs is made again. Both peers serve the champion clinml serves, exported
by :func:`export_model` as ``model.joblib``::

    python = ensure_venv(home, "mlserver")        # minutes the first time
    model_dir = export_model(pipeline, features, home / "peers" / "models" / name)
    command, ready = peer_command("mlserver", python, model_dir, "bench-model", port)

Only scikit-learn and numpy types may be in the exported pickle (a peer venv has no
clinml); :func:`plain_pipeline` swaps clinml's own estimator classes for the scikit-learn
class they extend where clinml's class changes only ``fit``, and refuses the rest.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("kserve", "mlserver")
# The peers' versions, pinned: a venv whose stamp records other pins is made again.
PINS: dict[str, tuple[str, ...]] = {
    "kserve": ("kserve==0.21.0", "scikit-learn==1.9.1"),
    # MLServer 1.7.1 breaks with uvloop 0.20 and later (its event-loop policy setup).
    "mlserver": (
        "mlserver==1.7.1",
        "mlserver-sklearn==1.7.1",
        "uvloop<0.20",
        "scikit-learn==1.9.1",
    ),
}
PYTHON = "python3.11"
STAMP = "clinml-peer-pins.json"
# Modules whose types may be in the exported pickle: what a peer venv has.
PLAIN_MODULES = ("sklearn.", "numpy", "scipy.", "builtins", "copyreg", "collections", "_codecs")


class PeerError(RuntimeError):
    """A peer cannot be set up; the message says why and what to do."""


def venv_dir(home: Path, peer: str) -> Path:
    return home / "peers" / f"{peer}-venv"


def ensure_venv(home: Path, peer: str, log_dir: Path) -> Path:
    """The python of ``peer``'s venv, made (or made again) when its stamp is not ``PINS``.

    Raises:
        PeerError: no ``python3.11``, or pip failed (its output is in ``log_dir``).
    """
    pins = list(PINS[peer])
    venv = venv_dir(home, peer)
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == pins:
        return python
    interpreter = shutil.which(PYTHON)
    if interpreter is None:
        raise PeerError(f"{peer} needs {PYTHON} to make its venv; install it or drop {peer}")
    if venv.exists():
        print(f"{peer}: {venv} was made with other pins; making it again", flush=True)
        shutil.rmtree(venv)
    log = log_dir / f"{peer}-venv.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{peer}: making {venv} with {' '.join(pins)} (minutes; log: {log})", flush=True)
    started = time.monotonic()
    with log.open("wb") as out:
        for command in (
            [interpreter, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *pins],
        ):
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise PeerError(f"{' '.join(command[:4])} failed (see {log}):\n{tail}")
    stamp.write_text(json.dumps(pins))  # last: a half-made venv has no stamp
    print(f"{peer}: venv ready in {time.monotonic() - started:.0f}s", flush=True)
    return python


def plain_pipeline(pipeline: Any) -> Any:
    """A copy of ``pipeline`` holding only scikit-learn types, predicting bit for bit alike.

    clinml's ``GroupedHistGradientBoosting`` extends ``HistGradientBoostingClassifier``
    and changes only how it is fitted (whole patients held out for early stopping), so its
    fitted state predicts the same as the scikit-learn class. Other clinml classes
    (``PriorCorrected``, the forest, the MLP) change prediction and are refused.

    Raises:
        PeerError: the pipeline holds a clinml class that changes prediction.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    plain = copy.deepcopy(pipeline)
    for step in _estimators(plain):
        if type(step).__name__ == "GroupedHistGradientBoosting":
            step.__class__ = HistGradientBoostingClassifier
    foreign = sorted(m for m in pickled_modules(plain) if not m.startswith(PLAIN_MODULES))
    if foreign:
        raise PeerError(
            f"the champion's pipeline holds types from {foreign}, which a peer venv cannot "
            "load: the peers serve gbm champions only (pass --models gbm)"
        )
    return plain


def _estimators(estimator: Any) -> list[Any]:
    """``estimator`` and every estimator nested in it (pipeline steps, transformers)."""
    found, stack = [], [estimator]
    while stack:
        current = stack.pop()
        found.append(current)
        if hasattr(current, "get_params"):
            stack += [v for v in current.get_params(deep=False).values() if hasattr(v, "fit")]
        for attribute in ("steps", "transformers_"):
            for item in getattr(current, attribute, []):
                stack += [v for v in item if hasattr(v, "fit")]
        for attribute in ("estimator_", "named_steps"):
            value = getattr(current, attribute, None)
            if hasattr(value, "fit"):
                stack.append(value)
    return found


def pickled_modules(obj: Any) -> set[str]:
    """The modules ``obj``'s pickle imports when loaded (what its loader must have)."""
    modules: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            modules.add(module)
            return super().find_class(module, name)

    Recorder(io.BytesIO(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))).load()
    return modules


def export_model(pipeline: Any, features: list[str], model_dir: Path) -> Path:
    """``pipeline`` (scikit-learn types only) as ``model_dir/model.joblib``, with the
    feature order in ``features.json``; returns ``model_dir``."""
    import joblib

    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipeline, model_dir / "model.joblib")
    (model_dir / "features.json").write_text(json.dumps(features))
    return model_dir


def peer_command(
    peer: str, python: Path, model_dir: Path, name: str, ports: tuple[int, int, int]
) -> tuple[list[str], str]:
    """The command that serves ``model_dir`` as ``name`` on ``ports[0]`` (one worker), and
    the path that answers 200 once the model is loaded. MLServer also takes its gRPC and
    metrics ports (``ports[1:]``)."""
    http, grpc, metrics = ports
    if peer == "kserve":
        command = [
            str(python), str(ROOT / "bench" / "servers" / "kserve_sklearn.py"),
            "--model_name", name, "--model_dir", str(model_dir),
            "--http_port", str(http), "--grpc_port", str(grpc), "--workers", "1",
        ]  # fmt: skip
        return command, f"/v1/models/{name}"
    if peer == "mlserver":
        serve_dir = model_dir.parent / f"{model_dir.name}-mlserver"
        if serve_dir.exists():
            shutil.rmtree(serve_dir)
        (serve_dir / name).mkdir(parents=True)
        (serve_dir / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": http,
                    "grpc_port": grpc,
                    "metrics_port": metrics,
                    "parallel_workers": 0,  # inference in the server process itself
                    "debug": False,
                }
            )
        )
        (serve_dir / name / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": str(model_dir / "model.joblib")},
                }
            )
        )
        mlserver = python.with_name("mlserver")
        return [str(mlserver), "start", str(serve_dir)], f"/v2/models/{name}/ready"
    raise PeerError(f"unknown peer {peer!r}")


def peer_body(peer: str, records: list[dict[str, Any]], features: list[str]) -> str:
    """The request body ``peer`` takes for ``records`` (JSON objects in feature order).

    KServe (V1): ``{"instances": [...]}``, one JSON object per record, which the predictor
    makes a DataFrame. MLServer (V2): one input per feature column, decoded as a pandas
    DataFrame (``content_type: pd``), asking for the ``predict_proba`` output.
    """
    if peer == "kserve":
        return json.dumps({"instances": records})
    if peer == "mlserver":
        inputs = []
        for feature in features:
            column = [record[feature] for record in records]
            text = any(isinstance(value, str) for value in column)
            inputs.append(
                {
                    "name": feature,
                    "shape": [len(column)],
                    "datatype": "BYTES" if text else "FP64",
                    "data": column,
                }
            )
        return json.dumps(
            {
                "parameters": {"content_type": "pd"},
                "inputs": inputs,
                "outputs": [{"name": "predict_proba"}],
            }
        )
    raise PeerError(f"unknown peer {peer!r}")
