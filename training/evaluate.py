"""Held-out evaluation of a fitted candidate.

The skeleton reports discrimination and threshold metrics; calibration, confidence
intervals and subgroups are deliberately left to the model-governance work.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def evaluate(
    y_true: np.ndarray, probability: np.ndarray, operating_threshold: float
) -> dict[str, float]:
    """Metrics of positive-class probabilities against 0/1 outcomes.

    Args:
        y_true: 1 for the positive class, 0 otherwise.
        probability: predicted probability of the positive class.
        operating_threshold: probabilities at or above it are called positive.

    Returns:
        ``roc_auc``, ``accuracy``, ``precision``, ``recall`` (sensitivity) and ``f1``.
    """
    y_true = np.asarray(y_true).astype(int)
    predicted = (np.asarray(probability) >= operating_threshold).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y_true, probability)),
        "accuracy": float(accuracy_score(y_true, predicted)),
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
    }
