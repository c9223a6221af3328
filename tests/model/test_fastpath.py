"""The compiled fast path reproduces each candidate's pipeline, and explains it.

Every candidate and the regularised logistic regression (and the class-weighted,
prior-corrected variants) is fitted on the tiny use case, with and without a nullable
feature, and the compiled model must give the pipeline's probabilities to within 1e-5
(the logistic regression: 1e-9) on held-out rows that include an unseen category and
missing values.

``latency_benchmark`` (not a test) times single records and 100-record batches on the
readmission cohort; run ``.venv/bin/python -m tests.model.test_fastpath`` to print it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from clinml.errors import ClinmlError
from clinml.serving import fastpath
from clinml.serving.fastpath import CompiledModel, UnsupportedModel, compile_model
from clinml.spec import UseCaseSpec
from clinml.training import model_io
from clinml.training.candidates import PriorCorrected, build_pipeline, make_preprocessor
from tests.conftest import make_tiny_frame

TOLERANCE = 1e-5
# The logistic regression is one dot product and a sigmoid: float64 rounding only.
LINEAR_TOLERANCE = 1e-9
# The Nystroem case keeps 300 components of about 300 training rows; sklearn says so.
pytestmark = pytest.mark.filterwarnings("ignore:n_components > n_samples:UserWarning")
# name, candidate, hyperparameters, class-weighted (-> PriorCorrected), expected kind
CASES = {
    "svm": ("svm", {}, False, "svm_rbf"),
    "svm_nystroem": ("svm", {"max_kernel_rows": 100}, False, "svm_nystroem"),
    "rf": ("rf", {"n_estimators": 30}, False, "rf"),
    "gbm": ("gbm", {"max_iter": 30}, False, "gbm"),
    "mlp": ("mlp", {"hidden_units": [8], "epochs": 30}, False, "mlp"),
    "rf_balanced": ("rf", {"n_estimators": 30}, True, "rf"),
    "gbm_balanced": ("gbm", {"max_iter": 30}, True, "gbm"),
    "mlp_balanced": ("mlp", {"hidden_units": [8], "epochs": 30}, True, "mlp"),
    "logreg": ("logreg", {}, False, "logreg"),
    "logreg_balanced": ("logreg", {}, True, "logreg"),
}
LOGISTIC = [case for case, (_, _, _, kind) in CASES.items() if kind == "logreg"]
NULLABLE = {False: "plain", True: "creatinine_nullable"}


def logistic_pipeline(spec: UseCaseSpec, params: dict[str, Any], balanced: bool) -> Any:
    """The L2 logistic reference model, built here rather than through the training
    registry: the fast path must compile it however training wraps it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    model = LogisticRegression(**{"C": 1.0, "max_iter": 1000, **params})
    classifier = PriorCorrected(model) if balanced else model
    return Pipeline([("preprocess", make_preprocessor(spec)), ("model", classifier)])


def variant(spec: UseCaseSpec, nullable: bool, balanced: bool) -> UseCaseSpec:
    if nullable:
        features = [
            f.model_copy(update={"nullable": True}) if f.name == "creatinine" else f
            for f in spec.features
        ]
        spec = spec.model_copy(update={"features": features})
    if balanced:
        training = spec.training.model_copy(update={"class_weight": "balanced"})
        spec = spec.model_copy(update={"training": training})
    return spec


@pytest.fixture(scope="module")
def data() -> dict[bool, tuple[pd.DataFrame, np.ndarray, pd.DataFrame]]:
    """Per nullable flag: training rows, labels, held-out rows (unseen ward, maybe NaN)."""
    frame = make_tiny_frame(n=600, seed=11)
    y = (frame["outcome"] == "yes").to_numpy(dtype=int)
    features = ["heart_rate", "creatinine", "ward"]
    # Keep one positive in three, so the class weights (and the prior correction) are far
    # from 1 and a wrong correction shows.
    positive_rank = np.cumsum(y) * y
    train = np.flatnonzero((np.arange(len(y)) < 450) & ((y == 0) | (positive_rank % 3 == 0)))
    held_out = frame[features].iloc[450:].reset_index(drop=True)
    held_out.loc[0, "ward"] = "maternity"
    out = {}
    for nullable in NULLABLE:
        x_train, x_test = frame[features].iloc[train].copy(), held_out.copy()
        if nullable:
            x_train.loc[x_train.index[::7], "creatinine"] = np.nan
            x_test.loc[[1, 2, 10, 40], "creatinine"] = np.nan
        out[nullable] = (x_train, y[train], x_test)
    return out


@pytest.fixture(scope="module")
def fitted(tiny_spec: UseCaseSpec, data):
    """(case, nullable) -> fitted pipeline, built on first use."""
    cache: dict[tuple[str, bool], Any] = {}

    def get(case: str, nullable: bool = False):
        if (case, nullable) not in cache:
            candidate, params, balanced, _ = CASES[case]
            spec = variant(tiny_spec, nullable, balanced)
            x_train, y_train, _ = data[nullable]
            if candidate == "logreg":
                pipeline = logistic_pipeline(spec, params, balanced)
            else:
                pipeline = build_pipeline(candidate, spec, params, seed=0, n_rows=len(x_train))
            cache[case, nullable] = pipeline.fit(x_train, y_train)
        return cache[case, nullable]

    return get


def records_of(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """What the HTTP layer hands over: plain dicts, None for a value not measured."""
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]


@pytest.mark.parametrize("nullable", list(NULLABLE), ids=list(NULLABLE.values()))
@pytest.mark.parametrize("case", list(CASES))
def test_probabilities_match_the_pipeline(case: str, nullable: bool, fitted, data) -> None:
    pipeline = fitted(case, nullable)
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[nullable]
    expected = pipeline.predict_proba(x_test)[:, 1]

    fast = compiled.predict_proba(compiled.encode_records(records_of(x_test)))

    assert compiled.kind == CASES[case][3]
    assert compiled.device == "cpu"
    assert fast.dtype == np.float64 and fast.shape == (len(x_test),)
    np.testing.assert_allclose(fast, expected, rtol=0, atol=TOLERANCE)
    # The rows that exercise the unseen category and the imputation match too.
    special = [0, 1, 2, 10, 40] if nullable else [0]
    np.testing.assert_allclose(fast[special], expected[special], rtol=0, atol=TOLERANCE)
    if CASES[case][2]:
        # one positive in three kept: the odds factor is about 1/3, far from 1
        assert compiled.odds_correction is not None and compiled.odds_correction < 0.6


@pytest.mark.parametrize("nullable", list(NULLABLE), ids=list(NULLABLE.values()))
def test_encoding_matches_the_column_transformer(nullable: bool, fitted, data) -> None:
    pipeline = fitted("rf", nullable)
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[nullable]
    expected = pipeline[:-1].transform(x_test)

    encoded = compiled.encode(x_test)

    assert encoded.shape == expected.shape
    np.testing.assert_allclose(encoded, expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(compiled.encode_records(records_of(x_test)), encoded)
    assert compiled.features == ["heart_rate", "creatinine", "ward"]
    assert compiled.encoded_features == list(pipeline[:-1].get_feature_names_out())
    # the unseen ward is all zeros in the one-hot block
    ward = [i for i, name in enumerate(compiled.encoded_features) if name.startswith("ward_")]
    assert len(ward) == 3 and not encoded[0, ward].any()
    if nullable:
        assert "missingindicator_creatinine" in compiled.encoded_features


def test_records_may_omit_a_nullable_feature(fitted, data) -> None:
    compiled = compile_model(fitted("gbm", True), device="cpu")
    _, _, x_test = data[True]
    row = records_of(x_test.iloc[[1]])  # creatinine is missing in this row
    without_key = [{k: v for k, v in row[0].items() if k != "creatinine"}]

    np.testing.assert_array_equal(
        compiled.encode_records(without_key), compiled.encode_records(row)
    )


def test_pandas_missing_markers_count_as_missing(fitted, data) -> None:
    compiled = compile_model(fitted("gbm", True), device="cpu")
    _, _, x_test = data[True]
    row = records_of(x_test.iloc[[1]])  # creatinine is missing in this row

    expected = compiled.encode_records(row)

    np.testing.assert_array_equal(
        compiled.encode_records([{**row[0], "creatinine": pd.NA}]), expected
    )
    np.testing.assert_array_equal(
        compiled.encode_records([{**row[0], "creatinine": np.nan}]), expected
    )
    with pytest.raises(ValueError, match="heart_rate must be a number"):
        compiled.encode_records([{**row[0], "heart_rate": "fast"}])


def test_missing_value_in_a_feature_the_model_does_not_impute_is_refused(fitted) -> None:
    compiled = compile_model(fitted("rf"), device="cpu")
    record = {"heart_rate": None, "creatinine": 1.0, "ward": "icu"}

    with pytest.raises(ValueError, match="heart_rate"):
        compiled.encode_records([record])


def test_an_unknown_classifier_is_unsupported(tiny_spec: UseCaseSpec, data) -> None:
    from sklearn.naive_bayes import GaussianNB

    x_train, y_train, _ = data[False]
    pipeline = build_pipeline("rf", tiny_spec, {"n_estimators": 3}, seed=0)
    pipeline.steps[-1] = ("model", GaussianNB())
    pipeline.fit(x_train, y_train)

    with pytest.raises(UnsupportedModel, match="GaussianNB"):
        compile_model(pipeline, device="cpu")
    with pytest.raises(UnsupportedModel, match="Pipeline"):
        compile_model(GaussianNB(), device="cpu")


@pytest.mark.parametrize("nullable", list(NULLABLE), ids=list(NULLABLE.values()))
@pytest.mark.parametrize("case", LOGISTIC)
def test_logistic_regression_matches_the_pipeline_to_float_rounding(
    case: str, nullable: bool, fitted, data
) -> None:
    pipeline = fitted(case, nullable)
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[nullable]
    expected = pipeline.predict_proba(x_test)[:, 1]
    records = records_of(x_test)

    batch = compiled.predict_proba(compiled.encode_records(records))
    single = np.concatenate([compiled.predict_proba(compiled.encode_records([r])) for r in records])

    # rows 0 (unseen ward) and 1, 2, 10, 40 (creatinine missing when nullable) included
    np.testing.assert_allclose(batch, expected, rtol=0, atol=LINEAR_TOLERANCE)
    np.testing.assert_allclose(single, expected, rtol=0, atol=LINEAR_TOLERANCE)
    if nullable:
        assert "missingindicator_creatinine" in compiled.encoded_features
    assert isinstance(pipeline[-1], PriorCorrected) == CASES[case][2]


@pytest.mark.parametrize(
    "params",
    [
        {"solver": "liblinear", "intercept_scaling": 5.0},  # intercept_ includes the scaling
        {"solver": "liblinear", "l1_ratio": 1.0, "C": 0.05},  # L1: some coefficients zero
        {"solver": "saga", "l1_ratio": 0.5, "C": 0.1, "max_iter": 5000},  # elastic net
        {"C": np.inf},  # unpenalised
        {"fit_intercept": False},
    ],
    ids=["liblinear", "l1", "elasticnet", "unpenalised", "no_intercept"],
)
def test_any_penalty_and_solver_compiles(params: dict[str, Any], tiny_spec, data) -> None:
    x_train, y_train, x_test = data[True]
    pipeline = logistic_pipeline(variant(tiny_spec, True, False), params, balanced=False)
    pipeline.fit(x_train, y_train)

    compiled = compile_model(pipeline, device="cpu")

    np.testing.assert_allclose(
        compiled.predict_proba(compiled.encode_records(records_of(x_test))),
        pipeline.predict_proba(x_test)[:, 1],
        rtol=0,
        atol=LINEAR_TOLERANCE,
    )


def test_a_multiclass_logistic_regression_is_unsupported(tiny_spec: UseCaseSpec, data) -> None:
    x_train, _, _ = data[False]
    ward = x_train["ward"].map({"medical": 0, "surgical": 1, "icu": 2}).to_numpy()
    pipeline = logistic_pipeline(tiny_spec, {}, balanced=False).fit(x_train, ward)

    with pytest.raises(UnsupportedModel, match="3 classes"):
        compile_model(pipeline, device="cpu")


def test_a_binary_multinomial_logistic_regression_is_unsupported(fitted) -> None:
    # scikit-learn < 1.8 could fit two classes as a softmax; its probability is not the
    # sigmoid of the decision function, so such a model must not be compiled.
    pipeline = fitted("logreg")
    pipeline[-1].multi_class = "multinomial"
    try:
        with pytest.raises(UnsupportedModel, match="multinomial"):
            compile_model(pipeline, device="cpu")
    finally:
        del pipeline[-1].multi_class


@pytest.mark.parametrize("case", LOGISTIC)
def test_a_saved_logistic_pipeline_loads_and_compiles(
    case: str, fitted, data, tiny_spec: UseCaseSpec, tmp_path: Path
) -> None:
    pipeline = fitted(case, True)
    _, _, x_test = data[True]
    model_io.save(pipeline, tmp_path / "m", {"features": tiny_spec.feature_names})

    loaded = model_io.load(tmp_path / "m")  # the allow-list accepts it
    compiled = compile_model(loaded.pipeline, device="cpu")

    assert compiled.kind == "logreg"
    np.testing.assert_allclose(
        compiled.predict_proba(compiled.encode(x_test)),
        pipeline.predict_proba(x_test)[:, 1],
        rtol=0,
        atol=LINEAR_TOLERANCE,
    )


@pytest.mark.parametrize("case", ["svm", "svm_nystroem", "rf", "gbm", "mlp", "logreg"])
def test_explain_names_input_features_by_absolute_contribution(case: str, fitted, data) -> None:
    compiled = compile_model(fitted(case, True), device="cpu")
    _, _, x_test = data[True]
    x = compiled.encode(x_test.iloc[:20])

    top = compiled.explain(x, top_k=2)
    everything = compiled.explain(x, top_k=10)

    assert compiled.explain_method
    assert len(top) == 20
    for pairs, full in zip(top, everything, strict=True):
        assert len(pairs) == 2 and len(full) == len(compiled.features)
        # input features only: one-hot and missing-indicator columns are folded in
        assert {name for name, _ in full} == set(compiled.features)
        sizes = [abs(c) for _, c in full]
        assert sizes == sorted(sizes, reverse=True)
        assert pairs == full[:2]
    # contributions vary between patients (not a constant ranking)
    assert len({tuple(name for name, _ in pairs) for pairs in everything}) > 1


@pytest.mark.parametrize("case", ["rf", "rf_balanced"])
def test_forest_contributions_and_bias_add_up_to_the_probability(case: str, fitted, data) -> None:
    compiled = compile_model(fitted(case, True), device="cpu")
    _, _, x_test = data[True]
    x = compiled.encode(x_test)
    probability = compiled.predict_proba(x)

    contributions, bias = compiled.attributions(x)
    everything = compiled.explain(x, top_k=len(compiled.features))

    np.testing.assert_allclose(contributions.sum(axis=1) + bias, probability, atol=1e-6)
    from_explain = np.array([sum(c for _, c in pairs) for pairs in everything])
    np.testing.assert_allclose(from_explain + bias, probability, atol=1e-6)
    # the bias is the forest's mean training fraction, the same for every row
    assert np.ptp(bias) == 0 and 0 < bias[0] < 1


@pytest.mark.parametrize("case", ["gbm", "gbm_balanced"])
def test_boosting_contributions_and_bias_add_up_to_the_log_odds(case: str, fitted, data) -> None:
    compiled = compile_model(fitted(case, True), device="cpu")
    _, _, x_test = data[True]
    x = compiled.encode(x_test)
    probability = compiled.predict_proba(x)

    contributions, bias = compiled.attributions(x)

    np.testing.assert_allclose(
        contributions.sum(axis=1) + bias, np.log(probability / (1 - probability)), atol=1e-6
    )


@pytest.mark.parametrize("nullable", list(NULLABLE), ids=list(NULLABLE.values()))
@pytest.mark.parametrize("case", LOGISTIC)
def test_logistic_contributions_and_bias_add_up_to_the_log_odds(
    case: str, nullable: bool, fitted, data
) -> None:
    pipeline = fitted(case, nullable)
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[nullable]
    x = compiled.encode(x_test)
    model = pipeline[-1]
    shift = 0.0
    if isinstance(model, PriorCorrected):
        model, shift = model.estimator_, np.log(model.odds_correction_)
    # scikit-learn's own log-odds (the prior correction moves it by a constant)
    log_odds = model.decision_function(pipeline[:-1].transform(x_test)) + shift

    contributions, bias = compiled.attributions(x)
    everything = compiled.explain(x, top_k=len(compiled.features))

    np.testing.assert_allclose(contributions.sum(axis=1) + bias, log_odds, rtol=0, atol=1e-12)
    from_explain = np.array([sum(c for _, c in pairs) for pairs in everything])
    np.testing.assert_allclose(from_explain + bias, log_odds, rtol=0, atol=1e-12)
    # the bias is the log-odds at the zero baseline (training means, no category)
    np.testing.assert_array_equal(bias, np.full(len(x), model.intercept_[0] + shift))
    # heart rate has one standardised column: its contribution is coefficient x value
    column = compiled.encoded_features.index("heart_rate")
    np.testing.assert_allclose(
        contributions[:, compiled.features.index("heart_rate")],
        model.coef_[0, column] * x[:, column],
        rtol=0,
        atol=1e-15,
    )
    assert "exact" in compiled.explain_method


@pytest.mark.parametrize("case", ["gbm", "gbm_balanced"])
def test_boosting_bias_is_the_mean_training_log_odds(case: str, fitted, data) -> None:
    # Internal nodes carry the count-weighted mean of their leaves, so the bias (the
    # roots summed) is the model's mean output over the rows it was fitted on.
    compiled = compile_model(fitted(case, True), device="cpu")
    x_train, _, _ = data[True]
    probability = compiled.predict_proba(compiled.encode(x_train))

    _, bias = compiled.attributions(compiled.encode(x_train.iloc[:1]))

    assert bias[0] == pytest.approx(np.log(probability / (1 - probability)).mean(), abs=1e-9)


@pytest.mark.parametrize("case", ["svm", "svm_nystroem", "mlp", "mlp_balanced", "logreg"])
def test_gradient_times_input_matches_finite_differences(case: str, fitted, data) -> None:
    compiled = compile_model(fitted(case, True), device="cpu")
    _, _, x_test = data[True]
    x = compiled.encode(x_test.iloc[:5])
    # Large enough that rounding (float32 MLP inputs, the Nystroem map's cancellation)
    # stays small next to it; central differences are then accurate to about step**2.
    step = 1e-3

    contributions, _ = compiled.attributions(x)

    def log_odds(rows: np.ndarray) -> np.ndarray:
        p = compiled.predict_proba(rows)
        return np.log(p / (1 - p))

    gradient = np.empty_like(x)
    for j in range(x.shape[1]):
        shift = np.zeros_like(x)
        shift[:, j] = step
        gradient[:, j] = (log_odds(x + shift) - log_odds(x - shift)) / (2 * step)
    owner = np.array(
        [
            compiled.features.index(next(f for f in compiled.features if f in name))
            for name in compiled.encoded_features
        ]
    )
    expected = np.zeros_like(contributions)
    np.add.at(expected.T, owner, (gradient * x).T)
    np.testing.assert_allclose(contributions, expected, atol=1e-4)


TREES = [case for case, (_, _, _, kind) in CASES.items() if kind in ("rf", "gbm")]


@pytest.fixture(params=["numpy", "torch"])
def tree_path(request, monkeypatch) -> str:
    """Trees on the CPU are scored in numpy, on CUDA in torch: test both on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(fastpath, "NUMPY_TREES", False)
    return request.param


@pytest.mark.parametrize("nullable", list(NULLABLE), ids=list(NULLABLE.values()))
@pytest.mark.parametrize("case", TREES)
def test_numpy_and_torch_tree_paths_agree(
    case: str, nullable: bool, fitted, data, monkeypatch
) -> None:
    compiled = compile_model(fitted(case, nullable), device="cpu")
    _, _, x_test = data[nullable]
    x = compiled.encode(x_test)
    small = compiled.predict_proba(x)
    one = np.concatenate([compiled.predict_proba(x[i : i + 1]) for i in range(5)])
    monkeypatch.setattr(fastpath, "NUMPY_TREES", False)

    np.testing.assert_allclose(small, compiled.predict_proba(x), rtol=0, atol=1e-15)
    np.testing.assert_allclose(one, small[:5], rtol=0, atol=1e-15)


def test_boosting_sends_missing_values_where_sklearn_does(fitted, data, tree_path) -> None:
    pipeline = fitted("gbm")
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[False]
    x = compiled.encode(x_test.iloc[:40])
    x[::2, 0] = np.nan  # encoded heart rate missing: follows missing_go_to_left
    x[1::3, 1] = np.nan

    np.testing.assert_allclose(
        compiled.predict_proba(x), pipeline[-1].predict_proba(x)[:, 1], atol=1e-12
    )


@pytest.mark.parametrize("case", ["gbm", "gbm_balanced"])
def test_large_boosting_batches_use_sklearns_predictor_with_the_same_answer(
    case: str, fitted, data, monkeypatch
) -> None:
    pipeline = fitted(case)
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[False]
    x = compiled.encode(pd.concat([x_test] * (1 + 300 // len(x_test))).iloc[:300])
    x[::2, 0] = np.nan
    x[1::3, 1] = np.nan
    native = compiled._scorer._native
    assert native is not None, "scikit-learn's predictor should be usable with its pinned version"
    calls = []

    def counted(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return native(rows)

    monkeypatch.setattr(compiled._scorer, "_native", counted)

    batch = compiled.predict_proba(x)
    small = compiled.predict_proba(x[: fastpath.NATIVE_TREE_ROWS - 1])

    assert calls == [300]  # the large batch went to scikit-learn, the small one was walked
    np.testing.assert_allclose(batch[: len(small)], small, rtol=0, atol=1e-14)
    np.testing.assert_allclose(batch, pipeline[-1].predict_proba(x)[:, 1], rtol=0, atol=1e-12)


def test_boosting_falls_back_to_the_walk_when_sklearns_predictor_differs(
    fitted, data, monkeypatch
) -> None:
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    def other_signature(self, x):  # a future scikit-learn with another private API
        raise TypeError("predict() takes 2 positional arguments but 5 were given")

    monkeypatch.setattr(TreePredictor, "predict", other_signature)
    pipeline = fitted("gbm")
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[False]
    x = compiled.encode(pd.concat([x_test] * (1 + 300 // len(x_test))).iloc[:300])
    monkeypatch.undo()

    assert compiled._scorer._native is None
    np.testing.assert_allclose(
        compiled.predict_proba(x), pipeline[-1].predict_proba(x)[:, 1], rtol=0, atol=1e-12
    )


def test_forest_rounds_inputs_to_float32_like_sklearn(fitted, data, tree_path) -> None:
    pipeline = fitted("rf")
    compiled = compile_model(pipeline, device="cpu")
    _, _, x_test = data[False]
    base = compiled.encode(x_test.iloc[:1])
    # Rows sitting exactly on split thresholds (float64): a float64 comparison sends some
    # of them the other way than scikit-learn's float32 one does.
    rows = []
    for tree in pipeline[-1].estimators_[:10]:
        internal = tree.tree_.children_left >= 0
        for feature, threshold in zip(
            tree.tree_.feature[internal], tree.tree_.threshold[internal], strict=True
        ):
            row = base[0].copy()
            row[feature] = threshold
            rows.append(row)
    x = np.array(rows)

    np.testing.assert_allclose(
        compiled.predict_proba(x), pipeline[-1].predict_proba(x)[:, 1], rtol=0, atol=TOLERANCE
    )


def test_large_batches_are_scored_in_chunks(fitted, data, monkeypatch, tree_path) -> None:
    compiled = compile_model(fitted("rf", True), device="cpu")
    _, _, x_test = data[True]
    x = compiled.encode(x_test)
    whole = compiled.predict_proba(x)
    contributions, bias = compiled.attributions(x)
    monkeypatch.setattr(fastpath, "CHUNK_ROWS", 7)

    np.testing.assert_array_equal(compiled.predict_proba(x), whole)
    chunked, chunked_bias = compiled.attributions(x)
    np.testing.assert_allclose(chunked, contributions, atol=1e-15)
    np.testing.assert_array_equal(chunked_bias, bias)


def test_input_of_the_wrong_width_is_refused(fitted) -> None:
    compiled = compile_model(fitted("gbm"), device="cpu")

    with pytest.raises(ValueError, match="expected"):
        compiled.predict_proba(np.zeros((1, 3)))


def test_auto_device_falls_back_to_the_cpu_and_says_so(fitted, monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="clinml.serving.fastpath"):
        compiled = compile_model(fitted("mlp"), device="auto")
    compiled.warm_up()

    assert isinstance(compiled, CompiledModel)
    assert compiled.device == "cpu"
    assert "CUDA is not available" in caplog.text
    assert "on cpu" in caplog.text
    with pytest.raises(ClinmlError, match="CUDA is not available"):
        compile_model(fitted("mlp"), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "case", ["svm", "svm_nystroem", "rf_balanced", "gbm", "mlp_balanced", "logreg_balanced"]
)
def test_cuda_matches_the_pipeline(case: str, fitted, data) -> None:
    pipeline = fitted(case, True)
    compiled = compile_model(pipeline, device="auto")
    _, _, x_test = data[True]
    x = compiled.encode(x_test)

    assert compiled.device == "cuda"
    np.testing.assert_allclose(
        compiled.predict_proba(x), pipeline.predict_proba(x_test)[:, 1], atol=TOLERANCE
    )
    cpu = compile_model(pipeline, device="cpu")
    np.testing.assert_allclose(compiled.attributions(x)[0], cpu.attributions(x)[0], atol=1e-6)


# --------------------------------------------------------------------------- benchmark


def _median_ms(call: Any, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def _time_both(
    pipeline: Any, compiled: CompiledModel, frame: pd.DataFrame, records: list, repeats: int
) -> tuple[float, float]:
    sklearn = _median_ms(lambda: pipeline.predict_proba(frame), repeats)
    fast = _median_ms(lambda: compiled.predict_proba(compiled.encode_records(records)), repeats)
    return sklearn, fast


def latency_benchmark(
    n_patients: int = 6000, device: str = "auto", repeats: int = 200
) -> list[dict[str, Any]]:
    """Single-record and 100-record latency: the pipeline vs the compiled fast path.

    Each readmission candidate is fitted with the spec's own hyperparameters on the
    labelled encounters of a ``n_patients`` cohort (about 21 500 rows for 6 000; the SVM
    becomes the Nystroem variant at that size). The pipeline is timed on a one-row (or
    100-row) DataFrame, the fast path on ``encode_records`` + ``predict_proba`` from
    dicts, each twice: with the default thread pools and with every pool (torch,
    OpenMP, BLAS) limited to one thread, because intra-op threads stall on a busy CPU.
    Medians in milliseconds; nothing is asserted.
    """
    from datetime import UTC, datetime

    from threadpoolctl import threadpool_limits

    from clinml.features.datasets import readmission
    from clinml.spec import load_spec
    from tests.conftest import PROJECT_ROOT

    spec = load_spec(PROJECT_ROOT / "configs" / "readmission.yaml")
    frame = readmission.load(spec.source.seed, datetime(2026, 6, 1, tzinfo=UTC), n_patients)
    frame = frame[frame[spec.label.column].notna()].reset_index(drop=True)
    y = (frame[spec.label.column] == spec.label.positive_class).to_numpy(dtype=int)
    x = frame[spec.feature_names]
    one, batch = x.iloc[[7]], x.iloc[:100]
    one_records, batch_records = one.to_dict("records"), batch.to_dict("records")
    default_threads = torch.get_num_threads()
    rows = []
    for name in ("rf", "gbm", "mlp", "svm"):
        params = spec.training.candidates[name].params
        pipeline = build_pipeline(name, spec, params, seed=0, n_rows=len(x)).fit(x, y)
        compiled = compile_model(pipeline, device=device)
        compiled.warm_up()
        difference = np.abs(
            compiled.predict_proba(compiled.encode(x.iloc[:2000]))
            - pipeline.predict_proba(x.iloc[:2000])[:, 1]
        ).max()
        for threads in (default_threads, 1):
            row = {"kind": compiled.kind, "device": compiled.device, "threads": threads}
            torch.set_num_threads(threads)
            try:
                with threadpool_limits(limits=threads):
                    for label, frame_in, records, n in (
                        ("single", one, one_records, repeats),
                        ("batch100", batch, batch_records, max(repeats // 5, 10)),
                    ):
                        row[f"{label}_sklearn_ms"], row[f"{label}_fast_ms"] = _time_both(
                            pipeline, compiled, frame_in, records, n
                        )
            finally:
                torch.set_num_threads(default_threads)
            row["max_abs_difference"] = float(difference)
            rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| kind | device | threads | 1 record: sklearn / fast (ms) | speed-up | "
        "100 records: sklearn / fast (ms) | speed-up | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        single = r["single_sklearn_ms"] / r["single_fast_ms"]
        batch = r["batch100_sklearn_ms"] / r["batch100_fast_ms"]
        lines.append(
            f"| {r['kind']} | {r['device']} | {r['threads']} | {r['single_sklearn_ms']:.3f} / "
            f"{r['single_fast_ms']:.3f} | {single:.1f}x | {r['batch100_sklearn_ms']:.3f} / "
            f"{r['batch100_fast_ms']:.3f} | {batch:.1f}x | {r['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(latency_benchmark()))


@pytest.mark.parametrize("case", ["gbm", "gbm_balanced"])
def test_large_boosting_batches_are_scored_from_bins_bit_for_bit(case: str, fitted) -> None:
    """scikit-learn's trees compare the rows' bins (mapped once by the model's own bin
    mapper) instead of their values: the same log-odds, bit for bit, at every split's
    threshold, a float either side of it, NaN and infinity."""
    pipeline = fitted(case)
    compiled = compile_model(pipeline, device="cpu")
    model = getattr(pipeline[-1], "estimator_", pipeline[-1])  # inside a PriorCorrected
    native = compiled._scorer._native
    assert native is not None and native.__name__ == "binned_log_odds"
    predictors = [p for (p,) in model._predictors]
    x = fastpath._split_probe(predictors, model.n_features_in_)
    assert len(x) > fastpath.NATIVE_TREE_ROWS
    rng = np.random.default_rng(0)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.02] = np.inf

    np.testing.assert_array_equal(native(x), model._raw_predict(x).ravel())
    np.testing.assert_allclose(
        compiled.predict_proba(x), pipeline[-1].predict_proba(x)[:, 1], rtol=0, atol=1e-12
    )


def test_boosting_keeps_sklearns_value_predictor_when_the_binned_one_differs(
    fitted, monkeypatch
) -> None:
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    def off_by_one(self, x, missing_bin, n_threads):  # a binning this code does not know
        return np.ones(len(x))

    monkeypatch.setattr(TreePredictor, "predict_binned", off_by_one)
    pipeline = fitted("gbm")
    compiled = compile_model(pipeline, device="cpu")
    monkeypatch.undo()

    native = compiled._scorer._native
    assert native is not None and native.__name__ == "log_odds"
    x = np.zeros((fastpath.NATIVE_TREE_ROWS, pipeline[-1].n_features_in_))
    np.testing.assert_array_equal(native(x), pipeline[-1]._raw_predict(x).ravel())
