"""The candidate models, as an explicit registry.

Every candidate is a scikit-learn ``Pipeline``: the shared preprocessing
(:func:`make_preprocessor`: standardised numeric features, one-hot categories) followed by
the candidate's classifier (:func:`build_pipeline`). A candidate's name is declared in
three places that must agree: ``clinml.spec.CandidateName``, the names a spec may list
under ``training.candidates`` (the spec refuses any other); ``CANDIDATES`` here, name ->
factory ``(params, seed, n_rows, balanced) -> unfitted classifier``; and
``SEARCH_SPACES``, its hyperparameter grid. The name is the fitted model's MLflow run name
and its manifest's ``candidate``, and ``GET /model`` reports it. An estimator class of
clinml's own goes in ``training/`` (as ``training/mlp.py``): loading refuses types outside
scikit-learn, numpy and ``training`` (``clinml.training.model_io.TRUSTED_PREFIXES``). ``logreg``,
an L2-regularised logistic regression, is the reference model: training always fits it
beside the candidates the spec names (docs/training.md, "Reference model").

Serving compiles the fitted pipeline into a fast path (``clinml.serving.fastpath.compile_model``)
chosen by the classifier's type, not by the candidate's name: ``RandomForestClassifier``,
``HistGradientBoostingClassifier``, ``LogisticRegression``, ``TorchMLPClassifier`` and a
``CalibratedClassifierCV`` around an RBF ``SVC`` or an RBF Nystroem + ``LinearSVC``
pipeline, each bare or inside :class:`PriorCorrected`, behind :func:`make_preprocessor`'s
preprocessing. A new candidate built from these gets the fast path with no change. Any
other classifier raises ``clinml.serving.fastpath.UnsupportedModel`` when the service loads the
model; the service logs a warning and serves the scikit-learn pipeline itself (the same
probabilities, slower), and ``/explain`` answers 503 for it. To give it a fast path, add
its case to ``clinml.serving.fastpath._compile_classifier`` and ``EXPLAIN_METHODS``, and one to
``CASES`` in tests/model/test_fastpath.py.

Patient-grouped inner splits: a classifier that holds rows out while fitting (boosting's
and the MLP's early stopping, the SVM's Platt calibration folds) takes the rows' patient
ids as ``groups`` and holds out whole patients, so no patient's encounters sit on both
sides. :func:`fit` passes them to whichever classifier accepts them.

Class imbalance: with ``class_weight="balanced"`` the tree and MLP candidates fit with
balanced sample weights (minority errors cost more, so the model does not just learn
the majority class), and :class:`PriorCorrected` maps their probabilities back to the
real prevalence (weighting multiplies the odds by ``w1/w0``; dividing it out is exact for
a model that fits the weighted likelihood), so calibration is not sacrificed. The SVM
weights classes inside the SVM and its Platt calibration, fitted unweighted, restores
the prevalence.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC

from clinml.errors import SpecError
from clinml.spec import UseCaseSpec
from clinml.training.mlp import TorchMLPClassifier, patient_holdout

# A kernel SVM's cost grows with the square of the rows: above this many training rows
# the RBF kernel is approximated (Nystroem features + a linear SVM). Override per spec
# with the svm hyperparameter `max_kernel_rows`.
SVM_MAX_KERNEL_ROWS = 5_000
NYSTROEM_COMPONENTS = 300


def svm_variant(params: dict[str, Any], n_rows: int) -> str:
    """``"rbf_kernel"`` (exact) or ``"nystroem_linear"`` (approximate), by training size."""
    limit = params.get("max_kernel_rows", SVM_MAX_KERNEL_ROWS)
    return "rbf_kernel" if n_rows <= limit else "nystroem_linear"


class PriorCorrected(ClassifierMixin, BaseEstimator):
    """Fit a classifier with balanced class weights; predict at the true prevalence.

    Args:
        estimator: an unfitted binary classifier whose ``fit`` takes ``sample_weight``.
    """

    def __init__(self, estimator: Any):
        self.estimator = estimator

    def fit(self, X: Any, y: Any, groups: Any = None) -> PriorCorrected:
        target = np.asarray(y)
        self.classes_, index, counts = np.unique(target, return_inverse=True, return_counts=True)
        if len(self.classes_) != 2:
            raise ValueError(f"PriorCorrected needs two classes, got {len(self.classes_)}")
        class_weights = len(target) / (2.0 * counts)
        extra = {"groups": groups} if groups is not None and accepts_groups(self.estimator) else {}
        self.estimator_ = clone(self.estimator).fit(
            X, target, sample_weight=class_weights[index], **extra
        )
        # The weighted fit estimates odds x w1/w0; this factor undoes it.
        self.odds_correction_ = float(class_weights[0] / class_weights[1])
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        weighted = self.estimator_.predict_proba(X)[:, 1]
        corrected = weighted * self.odds_correction_
        positive = corrected / (corrected + (1.0 - weighted))
        return np.column_stack([1.0 - positive, positive])

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]


def patient_folds(
    labels: np.ndarray, groups: Any, n_splits: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Stratified K-fold splits of whole patients (fewer folds when a class has few
    patients); ``None`` when not even two folds are possible."""
    from sklearn.model_selection import StratifiedGroupKFold

    patients = np.asarray(groups, dtype=object)
    smallest = min(len(set(patients[labels == label])) for label in np.unique(labels))
    folds = min(n_splits, smallest)
    if folds < 2:
        return None
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, patients))


class GroupedCalibratedClassifierCV(CalibratedClassifierCV):
    """Platt (sigmoid) calibration on cross-validated decision values, folds by patient.

    With ``groups`` the ``cv`` folds are ``StratifiedGroupKFold`` over patients, so a
    patient's decision values always come from an SVM that did not see that patient.
    """

    def fit(
        self, X: Any, y: Any, sample_weight: Any = None, groups: Any = None, **fit_params: Any
    ) -> GroupedCalibratedClassifierCV:
        if groups is None or not isinstance(self.cv, int):
            return super().fit(X, y, sample_weight=sample_weight, **fit_params)
        folds = patient_folds(np.asarray(y), groups, self.cv)
        if folds is None:
            return super().fit(X, y, sample_weight=sample_weight, **fit_params)
        requested = self.cv
        # The splits are this fit's data; the parameter goes back to the fold count after.
        self.cv = folds
        try:
            return super().fit(X, y, sample_weight=sample_weight, **fit_params)
        finally:
            self.cv = requested


class GroupedHistGradientBoosting(HistGradientBoostingClassifier):
    """Histogram gradient boosting whose early-stopping rows are whole patients.

    scikit-learn's own early stopping (on by default above 10 000 rows) holds out a
    stratified share of *rows*; with ``groups`` this holds out ``validation_fraction`` of
    the patients instead and hands them to ``fit`` as its validation set.
    """

    def fit(
        self, X: Any, y: Any, sample_weight: Any = None, groups: Any = None, **kwargs: Any
    ) -> GroupedHistGradientBoosting:
        stops_early = self.early_stopping is True or (
            self.early_stopping == "auto" and len(y) > 10_000
        )
        if groups is None or not stops_early or kwargs or self.validation_fraction is None:
            return super().fit(X, y, sample_weight=sample_weight, **kwargs)
        target = np.asarray(y)
        seed = self.random_state if isinstance(self.random_state, int) else 0
        held_out = patient_holdout(target, groups, self.validation_fraction, seed)
        if held_out is None:
            return super().fit(X, y, sample_weight=sample_weight)
        rows = X.iloc if hasattr(X, "iloc") else np.asarray(X)  # a frame keeps its dtypes
        weights = None if sample_weight is None else np.asarray(sample_weight)
        kept = ~held_out
        return super().fit(
            rows[kept],
            target[kept],
            sample_weight=None if weights is None else weights[kept],
            X_val=rows[held_out],
            y_val=target[held_out],
            sample_weight_val=None if weights is None else weights[held_out],
        )


def accepts_groups(estimator: Any) -> bool:
    """Whether the estimator's ``fit`` takes the rows' patient ids as ``groups``."""
    return "groups" in inspect.signature(estimator.fit).parameters


def fit(pipeline: Pipeline, x: Any, y: np.ndarray, groups: Any) -> Pipeline:
    """Fit a candidate pipeline, passing patient ids to a classifier that holds rows out."""
    model = pipeline.steps[-1][1]
    name = pipeline.steps[-1][0]
    extra = {f"{name}__groups": np.asarray(groups)} if accepts_groups(model) else {}
    return pipeline.fit(x, y, **extra)


def _svm(params: dict[str, Any], seed: int, n_rows: int, balanced: bool) -> ClassifierMixin:
    from sklearn.kernel_approximation import Nystroem
    from sklearn.svm import LinearSVC

    variant = svm_variant(params, n_rows)
    params = {k: v for k, v in params.items() if k != "max_kernel_rows"}
    weights = {"class_weight": "balanced"} if balanced else {}
    if variant == "rbf_kernel":
        base: Any = SVC(**{"C": 1.0, "kernel": "rbf", **weights, **params, "random_state": seed})
    else:
        gamma = params.pop("gamma", None)
        gamma = None if gamma == "scale" else gamma
        kernel = Nystroem(
            kernel="rbf", gamma=gamma, n_components=NYSTROEM_COMPONENTS, random_state=seed
        )
        svm = LinearSVC(**{"C": 1.0, **weights, **params}, random_state=seed)
        base = Pipeline([("kernel", kernel), ("svm", svm)])
    # SVC(probability=True) is deprecated in scikit-learn 1.9; Platt scaling fitted
    # on cross-validated decision values is its documented replacement.
    return GroupedCalibratedClassifierCV(base, method="sigmoid", ensemble=False, cv=5)


def _weighted(model: ClassifierMixin, balanced: bool) -> ClassifierMixin:
    return PriorCorrected(model) if balanced else model


class RandomForest(RandomForestClassifier):
    """A random forest that predicts on one thread, adding the trees in a fixed order.

    scikit-learn's forest sums tree probabilities from several threads in whatever order
    they finish, so the last bits of a probability vary between calls; this one is
    bitwise reproducible (and, for the small batches a service sees, faster). Fitting
    still uses ``n_jobs``: left at ``None``, it takes joblib's current default, which
    training sets to 1 in each of its processes (``clinml.cpus.limit_threads``), so a
    forest never starts more threads than training was given.
    """

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._validate_X_predict(X)
        proba = np.zeros((X.shape[0], self.n_classes_), dtype=np.float64)
        for tree in self.estimators_:
            proba += tree.predict_proba(X, check_input=False)
        return proba / len(self.estimators_)


def _random_forest(
    params: dict[str, Any], seed: int, n_rows: int, balanced: bool
) -> ClassifierMixin:
    forest = RandomForest(**{"n_estimators": 200, **params, "random_state": seed})
    return _weighted(forest, balanced)


def _gradient_boosting(
    params: dict[str, Any], seed: int, n_rows: int, balanced: bool
) -> ClassifierMixin:
    return _weighted(GroupedHistGradientBoosting(**{**params, "random_state": seed}), balanced)


def _logistic_regression(
    params: dict[str, Any], seed: int, n_rows: int, balanced: bool
) -> ClassifierMixin:
    model = LogisticRegression(**{"C": 1.0, "max_iter": 2000, **params, "random_state": seed})
    return _weighted(model, balanced)


def _mlp(params: dict[str, Any], seed: int, n_rows: int, balanced: bool) -> ClassifierMixin:
    return _weighted(TorchMLPClassifier(**{**params, "seed": seed}), balanced)


# name -> factory(hyperparameters, seed, training rows, balanced) -> unfitted classifier
CANDIDATES: dict[str, Callable[[dict[str, Any], int, int, bool], ClassifierMixin]] = {
    "svm": _svm,
    "rf": _random_forest,
    "gbm": _gradient_boosting,
    "mlp": _mlp,
    "logreg": _logistic_regression,
}

# name -> hyperparameter -> values the search samples from (a spec's `search` overrides).
SEARCH_SPACES: dict[str, dict[str, list[Any]]] = {
    "svm": {"C": [0.1, 0.3, 1.0, 3.0, 10.0], "gamma": ["scale", 0.01, 0.03, 0.1]},
    "rf": {"min_samples_leaf": [1, 5, 20, 50], "max_features": ["sqrt", 0.3, 0.5]},
    "gbm": {
        "learning_rate": [0.03, 0.06, 0.1],
        "max_leaf_nodes": [15, 31, 63],
        "l2_regularization": [0.0, 1.0],
    },
    "mlp": {
        "hidden_units": [[32], [64, 32], [128, 64]],
        "learning_rate": [3e-4, 1e-3, 3e-3],
        "weight_decay": [0.0, 1e-4],
    },
    # L2 strength on standardised features; C=1 (the default params) is mild shrinkage.
    "logreg": {"C": [0.01, 0.03, 0.1, 0.3, 3.0]},
}


def make_preprocessor(spec: UseCaseSpec) -> ColumnTransformer:
    """Standardise numeric features and one-hot encode categories (unknowns -> all zeros).

    Numeric features the spec declares ``nullable`` are imputed explicitly: the training
    median, plus an indicator column saying the value was absent. A null category
    encodes as all zeros, like an unknown one.
    """
    from sklearn.impute import SimpleImputer

    numeric = [c.name for c in spec.features if c.is_numeric and not c.nullable]
    nullable = [c.name for c in spec.features if c.is_numeric and c.nullable]
    categorical = [c for c in spec.features if not c.is_numeric]
    steps: list[tuple[str, Any, list[str]]] = []
    if numeric:
        steps.append(("numeric", StandardScaler(), numeric))
    if nullable:
        imputed = Pipeline(
            [
                ("impute", SimpleImputer(strategy="median", add_indicator=True)),
                ("scale", StandardScaler()),
            ]
        )
        steps.append(("nullable", imputed, nullable))
    if categorical:
        encoder = OneHotEncoder(
            categories=[c.categories for c in categorical],
            handle_unknown="ignore",
            sparse_output=False,
        )
        steps.append(("categorical", encoder, [c.name for c in categorical]))
    return ColumnTransformer(steps, remainder="drop", verbose_feature_names_out=False)


def build_pipeline(
    name: str, spec: UseCaseSpec, params: dict[str, Any], seed: int, n_rows: int = 0
) -> Pipeline:
    """Preprocessing plus the named candidate, sized for ``n_rows`` training rows.

    Class weighting follows ``spec.training.class_weight``.

    Raises:
        SpecError: the candidate is unknown or a hyperparameter is not accepted.
    """
    if name not in CANDIDATES:
        raise SpecError(
            f"training.candidates: unknown candidate '{name}' (known: {', '.join(CANDIDATES)})"
        )
    try:
        balanced = spec.training.class_weight == "balanced"
        model = CANDIDATES[name](dict(params), seed, n_rows, balanced)
    except TypeError as exc:
        raise SpecError(f"training.candidates.{name}: {exc}") from None
    return Pipeline([("preprocess", make_preprocessor(spec)), ("model", model)])
