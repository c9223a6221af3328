"""TorchMLPClassifier: optimisers, early stopping, weighting, determinism and persistence."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from clinml.training import mlp
from clinml.training.mlp import TorchMLPClassifier, balanced_class_weights, stratified_holdout


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


SMALL = {"hidden_units": (16,), "epochs": 30, "batch_size": 64, "device": "cpu"}


def logistic_data(
    n: int, seed: int, n_features: int = 8, intercept: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised features and labels drawn from a known logistic model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    coefficients = np.linspace(-2.0, 2.0, n_features)
    probability = 1.0 / (1.0 + np.exp(-(x @ coefficients + intercept)))
    return x, (rng.random(n) < probability).astype(int)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = logistic_data(1_200, seed=1)
    return x[:800], y[:800], x[800:], y[800:]


@pytest.fixture(scope="module")
def fitted(data) -> TorchMLPClassifier:
    x_train, y_train, _, _ = data
    return TorchMLPClassifier(**SMALL, seed=3).fit(x_train, y_train)


def test_clone_keeps_every_parameter_and_no_fitted_state(fitted: TorchMLPClassifier) -> None:
    model = TorchMLPClassifier(
        hidden_units=[8, 4],
        epochs=7,
        optimizer="sgd",
        momentum=0.5,
        early_stopping=False,
        validation_fraction=0.2,
        patience=2,
        class_weight="balanced",
    )
    copy = clone(model)
    assert copy.get_params() == model.get_params()
    assert copy.set_params(patience=9).patience == 9
    assert not hasattr(clone(fitted), "net_")


@pytest.mark.parametrize(("optimizer", "learning_rate"), [("adam", 1e-2), ("sgd", 5e-2)])
def test_both_optimisers_learn(data, optimizer: str, learning_rate: float) -> None:
    x_train, y_train, x_test, y_test = data
    model = TorchMLPClassifier(**SMALL, optimizer=optimizer, learning_rate=learning_rate)
    probability = model.fit(x_train, y_train).predict_proba(x_test)
    assert probability.dtype == np.float64
    assert probability.shape == (len(x_test), 2)
    np.testing.assert_allclose(probability.sum(axis=1), 1.0)
    assert roc_auc_score(y_test, probability[:, 1]) > 0.8


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"optimizer": "rmsprop"}, r"optimizer must be one of 'adam', 'sgd'; got 'rmsprop'"),
        ({"class_weight": "auto"}, r"class_weight must be None or 'balanced'"),
        ({"validation_fraction": 1.0}, r"validation_fraction must lie strictly between"),
    ],
)
def test_invalid_parameters_raise_at_fit(data, params: dict, message: str) -> None:
    x_train, y_train, _, _ = data
    model = TorchMLPClassifier(**{**SMALL, **params})  # accepted as given, like sklearn
    with pytest.raises(ValueError, match=message):
        model.fit(x_train, y_train)


def test_early_stopping_keeps_the_best_epoch_on_a_problem_it_overfits() -> None:
    # Three informative features among twenty and few rows: a wide network first learns
    # the signal, then memorises the training rows and the validation loss rises.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20))
    y = (rng.random(400) < 1 / (1 + np.exp(-x[:, :3].sum(axis=1)))).astype(int)
    model = TorchMLPClassifier(
        hidden_units=(64, 64),
        epochs=200,
        learning_rate=1e-3,
        batch_size=32,
        patience=3,
        validation_fraction=0.2,
        device="cpu",
    ).fit(x, y)
    assert model.n_epochs_ < model.epochs
    assert len(model.loss_curve_) == model.n_epochs_
    assert model.best_epoch_ == int(np.argmin(model.loss_curve_)) + 1
    assert model.best_validation_loss_ == min(model.loss_curve_)
    assert model.best_epoch_ > 1  # it did improve before overfitting
    # The loss rose after the best epoch, so training ran exactly `patience` more epochs.
    assert model.n_epochs_ - model.best_epoch_ == model.patience
    assert model.loss_curve_[-1] > model.best_validation_loss_

    # The kept weights are the best epoch's: recomputing the loss on the held-out rows
    # gives the best loss, not the last epoch's.
    held_out = stratified_holdout(y, model.validation_fraction, model.seed)
    positive = model.predict_proba(x[held_out])[:, 1]
    loss = -np.mean(np.where(y[held_out] == 1, np.log(positive), np.log(1.0 - positive)))
    assert loss == pytest.approx(model.best_validation_loss_, abs=1e-5)


def test_too_few_rows_train_every_epoch_without_validation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x, y = logistic_data(15, seed=2)
    y[:2] = [0, 1]  # both classes present
    with caplog.at_level(logging.DEBUG, logger=mlp.__name__):
        model = TorchMLPClassifier(**{**SMALL, "epochs": 4}).fit(x, y)
    assert "without early stopping" in caplog.text
    assert "trained on cpu" in caplog.text
    assert model.n_epochs_ == model.best_epoch_ == 4
    assert model.loss_curve_ == []
    assert model.best_validation_loss_ is None
    assert model.trained_on_ == "cpu"


def test_holdout_is_stratified_and_keeps_both_classes_in_training() -> None:
    labels = np.array([1] * 3 + [0] * 97, dtype=np.float32)
    held_out = stratified_holdout(labels, 0.1, seed=0)
    assert held_out is not None
    assert held_out.sum() == 11  # 10 negatives, 1 positive
    assert labels[held_out].sum() == 1
    assert labels[~held_out].sum() == 2
    assert stratified_holdout(labels[:19], 0.1, seed=0) is None  # too few rows
    assert stratified_holdout(np.r_[labels[:1], labels[3:]], 0.1, seed=0) is None  # 1 positive


def test_balanced_class_weight_raises_the_probability_of_rare_positives() -> None:
    x, y = logistic_data(2_000, seed=4, intercept=-7.0)
    assert 0.03 < y.mean() < 0.08
    plain = TorchMLPClassifier(**SMALL).fit(x, y)
    balanced = TorchMLPClassifier(**SMALL, class_weight="balanced").fit(x, y)
    positives = y == 1
    assert (
        balanced.predict_proba(x[positives])[:, 1].mean()
        > plain.predict_proba(x[positives])[:, 1].mean() + 0.1
    )


def test_class_weight_multiplies_into_the_callers_sample_weight(data) -> None:
    x_train, y_train, x_test, _ = data
    weights = np.random.default_rng(5).uniform(0.5, 2.0, len(y_train))
    combined = TorchMLPClassifier(**SMALL, class_weight="balanced").fit(
        x_train, y_train, sample_weight=weights
    )
    explicit = TorchMLPClassifier(**SMALL).fit(
        x_train, y_train, sample_weight=weights * balanced_class_weights(y_train)
    )
    np.testing.assert_array_equal(combined.predict_proba(x_test), explicit.predict_proba(x_test))


def test_sample_weights_are_normalised_but_not_ignored(data, fitted) -> None:
    x_train, y_train, x_test, _ = data
    reference = fitted.predict_proba(x_test)
    doubled = TorchMLPClassifier(**SMALL, seed=3).fit(
        x_train, y_train, sample_weight=np.full(len(y_train), 2.0)
    )
    np.testing.assert_allclose(doubled.predict_proba(x_test), reference, rtol=0, atol=1e-6)
    uneven = np.where(y_train == 1, 3.0, 1.0)
    reweighted = TorchMLPClassifier(**SMALL, seed=3).fit(x_train, y_train, sample_weight=uneven)
    assert reweighted.predict_proba(x_test)[:, 1].mean() > reference[:, 1].mean() + 0.05


def test_sample_weight_must_match_the_rows(data) -> None:
    x_train, y_train, _, _ = data
    with pytest.raises(ValueError, match="sample_weight has shape"):
        TorchMLPClassifier(**SMALL).fit(x_train, y_train, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        TorchMLPClassifier(**SMALL).fit(x_train, y_train, sample_weight=-np.ones(len(y_train)))


def test_same_seed_is_bitwise_identical_and_another_seed_differs(data, fitted) -> None:
    x_train, y_train, x_test, _ = data
    again = TorchMLPClassifier(**SMALL, seed=3).fit(x_train, y_train)
    other = TorchMLPClassifier(**SMALL, seed=4).fit(x_train, y_train)
    np.testing.assert_array_equal(again.predict_proba(x_test), fitted.predict_proba(x_test))
    assert again.loss_curve_ == fitted.loss_curve_
    assert not np.array_equal(other.predict_proba(x_test), fitted.predict_proba(x_test))


def test_predictions_do_not_depend_on_the_chunk_size(
    data, fitted, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, x_test, _ = data
    whole = fitted.predict_proba(x_test)
    monkeypatch.setattr(mlp, "CHUNK_ROWS", 7)  # 400 rows -> 58 chunks, the last partial
    np.testing.assert_allclose(fitted.predict_proba(x_test), whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        fitted.predict_proba(x_test[:, :3])


def test_predict_returns_the_original_labels(data) -> None:
    x_train, y_train, x_test, _ = data
    labels = np.array(["no", "yes"])[y_train]
    model = TorchMLPClassifier(**SMALL).fit(x_train, labels)
    assert list(model.classes_) == ["no", "yes"]
    expected = np.where(model.predict_proba(x_test)[:, 1] >= 0.5, "yes", "no")
    np.testing.assert_array_equal(model.predict(x_test), expected)


def test_skops_round_trip_gives_identical_probabilities(data, fitted) -> None:
    import skops.io

    from clinml.training.model_io import TRUSTED_PREFIXES

    _, _, x_test, _ = data
    payload = skops.io.dumps(fitted)
    untrusted = skops.io.get_untrusted_types(data=payload)
    assert all(name.startswith(TRUSTED_PREFIXES) for name in untrusted), untrusted
    loaded = skops.io.loads(payload, trusted=untrusted)
    np.testing.assert_array_equal(loaded.predict_proba(x_test), fitted.predict_proba(x_test))
    assert loaded.loss_curve_ == fitted.loss_curve_
    assert (loaded.n_epochs_, loaded.best_epoch_) == (fitted.n_epochs_, fitted.best_epoch_)


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cuda_training_learns_like_the_cpu_and_leaves_a_cpu_network(data, fitted) -> None:
    """Run by bench/gpu_check.sh on a GPU machine: the network trains on CUDA ("auto"
    picks it), lands on the CPU, and persists like a CPU-trained one."""
    import skops.io

    from clinml.training.model_io import TRUSTED_PREFIXES

    x_train, y_train, x_test, y_test = data
    params = {**SMALL, "device": "auto"}
    model = TorchMLPClassifier(**params, seed=3).fit(x_train, y_train)

    assert model.trained_on_ == "cuda"
    assert {p.device.type for p in model.net_.parameters()} == {"cpu"}
    # CUDA kernels round differently from the CPU's: the same quality, not the same bits
    cpu_auc = roc_auc_score(y_test, fitted.predict_proba(x_test)[:, 1])
    assert roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]) == pytest.approx(
        cpu_auc, abs=0.02
    )
    payload = skops.io.dumps(model)
    untrusted = skops.io.get_untrusted_types(data=payload)
    assert all(name.startswith(TRUSTED_PREFIXES) for name in untrusted), untrusted
    loaded = skops.io.loads(payload, trusted=untrusted)
    np.testing.assert_array_equal(loaded.predict_proba(x_test), model.predict_proba(x_test))
