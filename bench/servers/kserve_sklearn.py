"""The KServe peer of the serving benchmark: a custom ``kserve.Model`` around a joblib pipeline.

Serves ``<model_dir>/model.joblib`` (a scikit-learn pipeline exported by
``bench/peers.py``) on KServe's V1 protocol: ``POST /v1/models/<name>:predict`` with
``{"instances": [{feature: value, ...}, ...]}`` answers ``{"predictions": [p, ...]}``,
the positive class's probability per record. The records become a DataFrame in the
order of ``<model_dir>/features.json``, so the pipeline's own encoders see what they
were fitted on. Runs in the KServe venv the bench makes (no clinml there)::

    <venv>/bin/python bench/servers/kserve_sklearn.py --model_name m --model_dir DIR \\
        --http_port 8080 --workers 1
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
from kserve import Model, ModelServer, model_server


class SklearnProbability(Model):
    """A fitted scikit-learn classifier pipeline, answering probabilities."""

    def __init__(self, name: str, model_dir: Path) -> None:
        super().__init__(name)
        self.model_dir = model_dir
        self.pipeline: Any = None
        self.features: list[str] = []

    def load(self) -> bool:
        self.pipeline = joblib.load(self.model_dir / "model.joblib")
        self.features = json.loads((self.model_dir / "features.json").read_text())
        self.ready = True
        return self.ready

    def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict:
        frame = pd.DataFrame.from_records(payload["instances"], columns=self.features)
        return {"predictions": self.pipeline.predict_proba(frame)[:, 1].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", type=Path, required=True)
    args, _ = parser.parse_known_args()
    model = SklearnProbability(args.model_name, args.model_dir)
    model.load()
    server = ModelServer(workers=args.workers)  # configures KServe's logging
    # No log line per request (uvicorn's access log, KServe's timing trace): clinml's
    # service and MLServer write none by default either.
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # KServe 0.21 leaves FastAPI unpinned; a newer FastAPI warns on every response that
    # KServe's ORJSONResponse is deprecated. A deployment would silence it; so does this.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    server.start([model])


if __name__ == "__main__":
    main()
