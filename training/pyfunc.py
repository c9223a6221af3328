"""The MLflow pyfunc form of a clinml model.

Every candidate is logged as this one pyfunc ("models from code", so MLflow pickles
nothing): ``predict`` takes a DataFrame with the spec's feature columns and returns a
DataFrame with one column, ``probability`` (of the positive class). The weights live in
the ``model`` artifact directory, read by :mod:`clinml.training.model_io`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from clinml.training import model_io

ARTIFACT_KEY = "model"


class ClinicalPyfunc(mlflow.pyfunc.PythonModel):
    """Loads a clinml model directory and predicts positive-class probabilities."""

    def load_context(self, context: Any) -> None:
        self.model = model_io.load(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        return pd.DataFrame({"probability": self.model.predict_proba(model_input)})
