"""The candidate models, as an explicit registry.

Every candidate is a scikit-learn ``Pipeline``: the shared preprocessing (standardised
numeric features, one-hot categories) followed by the candidate's classifier. Adding a
candidate means adding one entry to ``CANDIDATES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC

from clinml.errors import SpecError
from clinml.spec import UseCaseSpec
from training.mlp import TorchMLPClassifier

# A kernel SVM's cost grows with the square of the rows: above this many training rows
# the RBF kernel is approximated (Nystroem features + a linear SVM). Override per spec
# with the svm hyperparameter `max_kernel_rows`.
SVM_MAX_KERNEL_ROWS = 5_000
NYSTROEM_COMPONENTS = 300


def svm_variant(params: dict[str, Any], n_rows: int) -> str:
    """``"rbf_kernel"`` (exact) or ``"nystroem_linear"`` (approximate), by training size."""
    limit = params.get("max_kernel_rows", SVM_MAX_KERNEL_ROWS)
    return "rbf_kernel" if n_rows <= limit else "nystroem_linear"


def _svm(params: dict[str, Any], seed: int, n_rows: int) -> ClassifierMixin:
    from sklearn.kernel_approximation import Nystroem
    from sklearn.svm import LinearSVC

    variant = svm_variant(params, n_rows)
    params = {k: v for k, v in params.items() if k != "max_kernel_rows"}
    if variant == "rbf_kernel":
        base: Any = SVC(**{"C": 1.0, "kernel": "rbf", **params, "random_state": seed})
    else:
        gamma = params.pop("gamma", None)
        kernel = Nystroem(
            kernel="rbf", gamma=gamma, n_components=NYSTROEM_COMPONENTS, random_state=seed
        )
        base = Pipeline(
            [("kernel", kernel), ("svm", LinearSVC(**{"C": 1.0, **params}, random_state=seed))]
        )
    # SVC(probability=True) is deprecated in scikit-learn 1.9; Platt scaling fitted
    # on cross-validated decision values is its documented replacement.
    return CalibratedClassifierCV(base, method="sigmoid", ensemble=False, cv=5)


def _random_forest(params: dict[str, Any], seed: int, n_rows: int) -> ClassifierMixin:
    return RandomForestClassifier(
        **{"n_estimators": 200, "n_jobs": -1, **params, "random_state": seed}
    )


def _gradient_boosting(params: dict[str, Any], seed: int, n_rows: int) -> ClassifierMixin:
    return HistGradientBoostingClassifier(**{**params, "random_state": seed})


def _mlp(params: dict[str, Any], seed: int, n_rows: int) -> ClassifierMixin:
    return TorchMLPClassifier(**{**params, "seed": seed})


# name -> factory(hyperparameters, seed, training rows) -> unfitted classifier
CANDIDATES: dict[str, Callable[[dict[str, Any], int, int], ClassifierMixin]] = {
    "svm": _svm,
    "rf": _random_forest,
    "gbm": _gradient_boosting,
    "mlp": _mlp,
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

    Raises:
        SpecError: the candidate is unknown or a hyperparameter is not accepted.
    """
    if name not in CANDIDATES:
        raise SpecError(
            f"training.candidates: unknown candidate '{name}' (known: {', '.join(CANDIDATES)})"
        )
    try:
        model = CANDIDATES[name](params, seed, n_rows)
    except TypeError as exc:
        raise SpecError(f"training.candidates.{name}: {exc}") from None
    return Pipeline([("preprocess", make_preprocessor(spec)), ("model", model)])
