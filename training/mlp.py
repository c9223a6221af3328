"""A PyTorch multilayer perceptron behind the scikit-learn estimator interface.

Being a scikit-learn estimator lets the MLP share the preprocessing pipeline, the
evaluation code and the persistence format of the other candidates. Training uses CUDA
when it is available and the CPU otherwise; the fitted network is kept on the CPU so it
serialises the same way everywhere.

Inputs are expected to be standardised already (the shared ``ColumnTransformer`` does
it), so the estimator does no scaling of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
# Below these sizes a held-out split cannot contain both classes reliably, so early
# stopping is skipped and the network trains for the full number of epochs.
MIN_ROWS_FOR_VALIDATION = 20
MIN_ROWS_PER_CLASS_FOR_VALIDATION = 2
# A validation loss must beat the best so far by this fraction to reset the patience.
RELATIVE_IMPROVEMENT = 1e-4
# Rows per forward pass when predicting or scoring the validation set: bounds memory
# for large inputs without slowing small ones.
CHUNK_ROWS = 65_536


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


def balanced_class_weights(labels: np.ndarray) -> np.ndarray:
    """Per-row weight ``n / (2 * rows of that class)`` for 0/1 ``labels``, as scikit-learn's
    ``class_weight="balanced"``: both classes then carry the same total weight."""
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    return (len(labels) / (2.0 * counts))[labels.astype(np.int64)]


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """Boolean mask of the rows held out for validation, or ``None`` when too few rows.

    Each class contributes ``round(fraction * its rows)`` rows, at least one and never
    all of them, so both the training and the validation part contain both classes.
    """
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if len(labels) < MIN_ROWS_FOR_VALIDATION or counts.min() < MIN_ROWS_PER_CLASS_FOR_VALIDATION:
        return None
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(labels), dtype=bool)
    for label, count in enumerate(counts):
        rows = np.flatnonzero(labels == label)
        take = min(max(round(fraction * count), 1), count - 1)
        held_out[rng.choice(rows, size=take, replace=False)] = True
    return held_out


def patient_holdout(
    labels: np.ndarray, groups: Any, fraction: float, seed: int, min_per_class: int = 1
) -> np.ndarray | None:
    """Boolean mask of whole patients held out for validation (about ``fraction`` of them).

    Patients are drawn separately among those with a positive row and those without, so
    both parts keep both classes; ``None`` when that is impossible (too few patients).
    """
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups, dtype=object)))
    positive = np.zeros(len(uniques), dtype=bool)
    positive[codes[np.asarray(labels) == 1]] = True
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(uniques), dtype=bool)
    for stratum in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        take = min(max(round(fraction * len(stratum)), 1), len(stratum) - 1)
        if take < 1:
            continue
        chosen[rng.choice(stratum, size=take, replace=False)] = True
    held_out = chosen[codes]
    for part in (held_out, ~held_out):
        counts = np.bincount(np.asarray(labels, dtype=np.int64)[part], minlength=2)
        if counts.min() < min_per_class:
            return None
    return held_out


class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """Binary MLP classifier trained on (weighted) binary cross-entropy.

    Every argument is stored unchanged and checked at ``fit``, so ``sklearn.base.clone``
    and ``get_params``/``set_params`` work as for any scikit-learn estimator.

    Args:
        hidden_units: width of each hidden layer (ReLU activations).
        epochs: maximum passes over the training rows; early stopping may end sooner.
        learning_rate: the optimiser's step size. The default suits Adam; SGD usually
            needs a larger one (around 0.01–0.1).
        batch_size: rows per gradient step.
        weight_decay: L2 penalty passed to the optimiser.
        seed: seeds weight initialisation, the validation split and the batch order;
            two fits with the same seed and data give identical models on the CPU.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``;
            used for training only, the fitted network always lives on the CPU.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: SGD momentum (classical, not Nesterov); ignored by Adam.
        early_stopping: hold out ``validation_fraction`` of the training rows
            (stratified, seeded), stop once the validation loss has not improved for
            ``patience`` epochs and keep the weights of the best epoch. Skipped, with a
            DEBUG log line, when there are fewer than 20 rows or a class has fewer
            than 2.
        validation_fraction: share of the training rows held out for early stopping.
        patience: epochs without an improvement of at least 1e-4 (relative) in the
            validation loss before training stops.
        class_weight: ``None`` or ``"balanced"``; balanced multiplies each row's weight
            by ``n_rows / (2 * rows of its class)``, on top of any ``sample_weight``.

    Attributes:
        classes_: the two class labels; ``classes_[1]`` is the positive class.
        n_features_in_: number of input columns seen in ``fit``.
        trained_on_: the device that trained the network (``"cpu"`` or ``"cuda"``).
        n_epochs_: epochs actually run.
        best_epoch_: the epoch (counting from 1) whose weights were kept; equals
            ``n_epochs_`` without early stopping.
        best_validation_loss_: the validation loss of ``best_epoch_``, or ``None``
            without early stopping.
        loss_curve_: the validation loss after each epoch (empty without early stopping).
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
        optimizer: str = "adam",
        momentum: float = 0.9,
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        patience: int = 5,
        class_weight: str | None = None,
    ):
        self.hidden_units = hidden_units
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed
        self.device = device
        self.optimizer = optimizer
        self.momentum = momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.class_weight = class_weight

    def _check_params(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}; "
                f"got {self.optimizer!r}"
            )
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced'; got {self.class_weight!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(
                "epochs, batch_size and patience must be at least 1; got "
                f"{self.epochs}, {self.batch_size} and {self.patience}"
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must lie strictly between 0 and 1; "
                f"got {self.validation_fraction}"
            )

    def _optimiser(self, net: Any) -> Any:
        import torch

        # fused=True: one kernel per step instead of one per parameter tensor; with
        # networks this small the per-step overhead dominates (the measurement:
        # docs/benchmarks.md, "Training").
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                net.parameters(),
                lr=self.learning_rate,
                momentum=self.momentum,
                nesterov=False,
                weight_decay=self.weight_decay,
                fused=True,
            )
        return torch.optim.Adam(
            net.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay, fused=True
        )

    def _row_weights(self, labels: np.ndarray, sample_weight: Any) -> np.ndarray:
        if sample_weight is None:
            weights = np.ones(len(labels), dtype=np.float64)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != labels.shape:
                raise ValueError(
                    f"sample_weight has shape {weights.shape}; expected ({len(labels)},)"
                )
            if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("sample_weight must be finite, non-negative and not all zero")
        if self.class_weight == "balanced":
            weights = weights * balanced_class_weights(labels)
        return weights.astype(np.float32)

    def fit(
        self, X: Any, y: Any, sample_weight: Any = None, groups: Any = None
    ) -> TorchMLPClassifier:
        """Train the network on standardised ``X`` and binary ``y``.

        Args:
            X: array-like of shape (n_rows, n_features), already standardised.
            y: the two class labels, one per row.
            sample_weight: optional non-negative weight per row; the loss of each batch
                is the weighted mean, so scaling every weight by a constant changes
                nothing.
            groups: optional patient id per row: the early-stopping rows are then whole
                patients (about ``validation_fraction`` of them), never some of a
                patient's rows.

        Returns:
            The fitted estimator.

        Raises:
            ValueError: a parameter is invalid, ``y`` does not hold exactly two
                classes, or ``X``/``sample_weight`` do not match ``y``.
        """
        import torch
        from sklearn.utils.validation import check_array, check_consistent_length

        self._check_params()
        features = check_array(X, dtype=np.float32, order="C")
        target = np.asarray(y)
        check_consistent_length(features, target)
        self.classes_ = np.unique(target)
        if len(self.classes_) != 2:
            raise ValueError(f"TorchMLPClassifier needs two classes, got {len(self.classes_)}")
        labels = (target == self.classes_[1]).astype(np.float32)
        weights = self._row_weights(labels, sample_weight)
        self.n_features_in_ = features.shape[1]

        held_out = None
        if self.early_stopping:
            if groups is None:
                held_out = stratified_holdout(labels, self.validation_fraction, self.seed)
            elif len(labels) >= MIN_ROWS_FOR_VALIDATION:
                held_out = patient_holdout(
                    labels,
                    groups,
                    self.validation_fraction,
                    self.seed,
                    min_per_class=MIN_ROWS_PER_CLASS_FOR_VALIDATION,
                )
            if held_out is not None and weights[held_out].sum() <= 0:
                held_out = None
            if held_out is None:
                log.debug(
                    "TorchMLPClassifier: %d rows (%d positive) are too few for a validation "
                    "split with both classes; training %d epochs without early stopping",
                    len(labels),
                    int(labels.sum()),
                    self.epochs,
                )

        device = resolve_device(self.device)
        # Initialise on the CPU from a forked RNG: the weights depend on the seed only,
        # not on the device or on what else used torch's global generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = _network(self.n_features_in_, self.hidden_units)
        net = net.to(device)
        optimiser = self._optimiser(net)
        generator = torch.Generator().manual_seed(self.seed)

        def to_device(array: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        train = slice(None) if held_out is None else ~held_out
        inputs, outcome, weight = (to_device(a[train]) for a in (features, labels, weights))
        if held_out is not None:
            validation = tuple(to_device(a[held_out]) for a in (features, labels, weights))

        loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        n_rows = len(inputs)
        best_loss, best_epoch, best_state = float("inf"), 0, None
        curve: list[float] = []
        waited = 0
        for epoch in range(1, self.epochs + 1):
            net.train()
            order = torch.randperm(n_rows, generator=generator).to(device)
            for start in range(0, n_rows, self.batch_size):
                batch = order[start : start + self.batch_size]
                batch_weight = weight[batch]
                per_row = loss_fn(net(inputs[batch]).squeeze(1), outcome[batch])
                # Weighted mean; the clamp only matters for a batch whose weights are all 0.
                loss = (per_row * batch_weight).sum() / batch_weight.sum().clamp_min(1e-12)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            if held_out is None:
                continue
            current = _weighted_loss(net, *validation)
            curve.append(current)
            log.debug("TorchMLPClassifier epoch %d: validation loss %.6f", epoch, current)
            # Cross-entropy is never negative, so a relative threshold is a product.
            if current < best_loss * (1.0 - RELATIVE_IMPROVEMENT):
                waited = 0
            else:
                waited += 1
            if current < best_loss:
                best_loss, best_epoch = current, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if waited >= self.patience:
                break

        if best_state is not None:
            net.load_state_dict(best_state)
        self.n_epochs_ = epoch
        self.loss_curve_ = curve
        self.best_epoch_ = best_epoch if held_out is not None else epoch
        self.best_validation_loss_ = best_loss if held_out is not None else None
        self.net_ = net.to("cpu").eval()
        self.trained_on_ = device
        log.info(
            "TorchMLPClassifier trained on %s: %d epochs, kept epoch %d%s",
            device,
            self.n_epochs_,
            self.best_epoch_,
            "" if held_out is None else f" (validation loss {best_loss:.4f})",
        )
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape (n_rows, 2), float64; column 1 is ``classes_[1]``.

        Rows are scored in chunks of ``CHUNK_ROWS`` so memory stays bounded.
        """
        import torch
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, "net_")
        rows = np.asarray(X)
        if rows.ndim != 2 or rows.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {rows.shape}; expected (n_rows, {self.n_features_in_})")
        positive = np.empty(len(rows), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(rows), CHUNK_ROWS):
                chunk = np.ascontiguousarray(rows[start : start + CHUNK_ROWS], dtype=np.float32)
                if not np.isfinite(chunk).all():
                    raise ValueError("X contains NaN or infinite values; impute them first")
                logits = self.net_(torch.from_numpy(chunk)).squeeze(1)
                positive[start : start + len(chunk)] = torch.sigmoid(logits).numpy()
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


def _weighted_loss(net: Any, inputs: Any, outcome: Any, weight: Any) -> float:
    """Weighted mean binary cross-entropy of ``net`` on a held-out set, in chunks."""
    import torch

    net.eval()
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    with torch.inference_mode():
        for start in range(0, len(inputs), CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            per_row = torch.nn.functional.binary_cross_entropy_with_logits(
                net(inputs[part]).squeeze(1), outcome[part], reduction="none"
            )
            total += (per_row * weight[part]).sum(dtype=torch.float64)
    return float(total / weight.sum(dtype=torch.float64))
