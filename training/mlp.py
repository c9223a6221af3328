"""A PyTorch multilayer perceptron behind the scikit-learn estimator interface.

Being a scikit-learn estimator lets the MLP share the preprocessing pipeline, the
evaluation code and the persistence format of the other candidates. Training uses CUDA
when it is available and the CPU otherwise; the fitted network is kept on the CPU so it
serialises the same way everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

log = logging.getLogger(__name__)


def resolve_device(requested: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _network(n_inputs: int, hidden_units: Sequence[int]) -> Any:
    import torch

    layers: list[Any] = []
    width = n_inputs
    for units in hidden_units:
        layers += [torch.nn.Linear(width, units), torch.nn.ReLU()]
        width = units
    layers.append(torch.nn.Linear(width, 1))  # one logit: P(positive) = sigmoid(logit)
    return torch.nn.Sequential(*layers)


class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """Binary MLP classifier trained with binary cross-entropy and Adam.

    Args:
        hidden_units: width of each hidden layer.
        epochs: passes over the training data.
        learning_rate: Adam's step size.
        batch_size: rows per gradient step.
        weight_decay: L2 penalty passed to Adam.
        seed: seeds weight initialisation and batch order.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; used for training.
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (32, 16),
        epochs: int = 100,
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        weight_decay: float = 0.0,
        seed: int = 0,
        device: str = "auto",
    ):
        self.hidden_units = hidden_units
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed
        self.device = device

    def fit(self, X: Any, y: Any) -> TorchMLPClassifier:
        import torch

        features = np.asarray(X, dtype=np.float32)
        target = np.asarray(y)
        self.classes_ = np.unique(target)
        if len(self.classes_) != 2:
            raise ValueError(f"TorchMLPClassifier needs two classes, got {len(self.classes_)}")
        labels = (target == self.classes_[1]).astype(np.float32)
        self.n_features_in_ = features.shape[1]

        device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        net = _network(self.n_features_in_, self.hidden_units).to(device)
        optimiser = torch.optim.Adam(
            net.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        loss_fn = torch.nn.BCEWithLogitsLoss()
        inputs = torch.from_numpy(features).to(device)
        outcome = torch.from_numpy(labels).to(device)
        net.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(inputs), generator=generator).to(device)
            for start in range(0, len(inputs), self.batch_size):
                batch = order[start : start + self.batch_size]
                optimiser.zero_grad()
                loss = loss_fn(net(inputs[batch]).squeeze(1), outcome[batch])
                loss.backward()
                optimiser.step()
        self.net_ = net.to("cpu").eval()
        self.trained_on_ = device
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        import torch

        features = torch.from_numpy(np.asarray(X, dtype=np.float32))
        with torch.no_grad():
            positive = torch.sigmoid(self.net_(features).squeeze(1)).numpy().astype(np.float64)
        return np.column_stack([1.0 - positive, positive])

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]

    # skops persists objects through __getstate__/__setstate__: the network is stored
    # as plain numpy arrays, so no pickle and no torch-specific format is involved.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        net = state.pop("net_", None)
        if net is not None:
            state["weights_"] = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import torch

        state = dict(state)
        weights = state.pop("weights_", None)
        self.__dict__.update(state)
        if weights is not None:
            net = _network(self.n_features_in_, self.hidden_units)
            net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            self.net_ = net.eval()
