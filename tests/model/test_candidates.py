"""Each candidate trains on a small frame, and a fitted model survives save and load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clinml.errors import SpecError
from clinml.spec import REFERENCE_CANDIDATE, CandidateSpec, UseCaseSpec
from clinml.training import model_io
from clinml.training.candidates import CANDIDATES, build_pipeline
from clinml.training.metrics import METRICS, point_metrics
from tests.conftest import make_tiny_frame


@pytest.fixture(scope="module")
def split(tiny_spec: UseCaseSpec):
    frame = make_tiny_frame(n=600, seed=11)
    y = (frame["outcome"] == "yes").to_numpy(dtype=int)
    x = frame[tiny_spec.feature_names]
    return x.iloc[:450], y[:450], x.iloc[450:], y[450:]


def test_registry_has_the_four_candidates_and_the_reference() -> None:
    assert set(CANDIDATES) == {"svm", "rf", "gbm", "mlp", REFERENCE_CANDIDATE}


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_candidate_learns_the_signal(name: str, tiny_spec: UseCaseSpec, split) -> None:
    x_train, y_train, x_test, y_test = split
    params = tiny_spec.training.candidates.get(name, CandidateSpec()).params
    model = build_pipeline(name, tiny_spec, params, seed=0).fit(x_train, y_train)
    probability = model.predict_proba(x_test)[:, 1]
    assert probability.shape == (len(x_test),)
    assert np.all((probability >= 0) & (probability <= 1))
    metrics = point_metrics(y_test, probability, 0.5)
    # The outcome is a logistic function of the features: any working model beats 0.7.
    assert metrics["roc_auc"] > 0.7, metrics
    assert set(metrics) == set(METRICS)


def test_mlp_is_seeded(tiny_spec: UseCaseSpec, split) -> None:
    x_train, y_train, x_test, _ = split
    params = tiny_spec.training.candidates["mlp"].params
    first = (
        build_pipeline("mlp", tiny_spec, params, seed=5).fit(x_train, y_train).predict_proba(x_test)
    )
    second = (
        build_pipeline("mlp", tiny_spec, params, seed=5).fit(x_train, y_train).predict_proba(x_test)
    )
    np.testing.assert_array_equal(first, second)


def test_unknown_hyperparameter_is_a_spec_error(tiny_spec: UseCaseSpec) -> None:
    with pytest.raises(SpecError, match=r"training.candidates.rf: .*n_trees"):
        build_pipeline("rf", tiny_spec, {"n_trees": 5}, seed=0)


def test_unseen_category_is_encoded_as_zeros_not_an_error(tiny_spec: UseCaseSpec, split) -> None:
    x_train, y_train, x_test, _ = split
    model = build_pipeline("rf", tiny_spec, {"n_estimators": 10}, seed=0).fit(x_train, y_train)
    odd = x_test.head(2).assign(ward="maternity")
    assert model.predict_proba(odd).shape == (2, 2)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_saved_model_loads_with_identical_probabilities(
    name: str, tiny_spec: UseCaseSpec, split, tmp_path: Path
) -> None:
    x_train, y_train, x_test, _ = split
    params = tiny_spec.training.candidates.get(name, CandidateSpec()).params
    model = build_pipeline(name, tiny_spec, params, seed=0).fit(x_train, y_train)
    model_io.save(model, tmp_path / "m", {"features": tiny_spec.feature_names})
    loaded = model_io.load(tmp_path / "m")
    shuffled = x_test[list(reversed(x_test.columns))]  # columns are matched by name
    np.testing.assert_allclose(
        loaded.predict_proba(shuffled), model.predict_proba(x_test)[:, 1], rtol=0, atol=1e-12
    )


def test_loading_refuses_a_corrupted_file(tiny_spec: UseCaseSpec, split, tmp_path: Path) -> None:
    x_train, y_train, _, _ = split
    model = build_pipeline("gbm", tiny_spec, {"max_iter": 5}, seed=0).fit(x_train, y_train)
    directory = model_io.save(model, tmp_path / "m", {"features": tiny_spec.feature_names})
    with (directory / model_io.MODEL_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(model_io.ModelLoadError, match="SHA-256 differs"):
        model_io.load(directory)


def test_a_file_rewritten_with_its_manifest_is_refused_unopened(
    tiny_spec: UseCaseSpec, split, tmp_path: Path, monkeypatch
) -> None:
    """Whoever can write the artifact store can rewrite the manifest too: the hash recorded
    at registration is checked first, before skops reads the file."""
    import skops.io

    x_train, y_train, _, _ = split
    model = build_pipeline("gbm", tiny_spec, {"max_iter": 5}, seed=0).fit(x_train, y_train)
    directory = model_io.save(model, tmp_path / "m", {"features": tiny_spec.feature_names})
    registered = model_io.sha256_of(directory / model_io.MODEL_FILE)
    other = build_pipeline("gbm", tiny_spec, {"max_iter": 6}, seed=1).fit(x_train, y_train)
    model_io.save(other, directory, {"features": tiny_spec.feature_names})  # both rewritten

    def opened(*args, **kwargs):
        raise AssertionError("skops opened a file whose hash is wrong")

    monkeypatch.setattr(skops.io, "get_untrusted_types", opened)
    monkeypatch.setattr(skops.io, "load", opened)
    with pytest.raises(model_io.ModelLoadError, match="recorded at registration"):
        model_io.load(directory, expected_sha256=registered)
    monkeypatch.undo()
    assert model_io.load(directory).manifest["sha256"] != registered  # consistent on its own


def test_a_model_saved_before_the_one_package_layout_still_loads(
    tiny_spec: UseCaseSpec, split, tmp_path: Path
) -> None:
    """Versions registered before issue 21 name clinml's classes ``training.<module>``:
    they load (as clinml.training's classes) with the same probabilities."""
    import zipfile

    import skops.io

    x_train, y_train, x_test, _ = split
    model = build_pipeline("gbm", tiny_spec, {"max_iter": 5}, seed=0).fit(x_train, y_train)
    saved = model_io.save(model, tmp_path / "new", {"features": tiny_spec.feature_names})
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    with (
        zipfile.ZipFile(saved / model_io.MODEL_FILE) as source,
        zipfile.ZipFile(legacy / model_io.MODEL_FILE, "w") as target,
    ):
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "schema.json":
                data = data.replace(b'"clinml.training.', b'"training.')
            target.writestr(item, data)
    names = skops.io.get_untrusted_types(file=legacy / model_io.MODEL_FILE)
    assert any(name.startswith("training.") for name in names), names  # a legacy file
    manifest = json.loads((saved / model_io.MANIFEST_FILE).read_text())
    manifest["sha256"] = model_io.sha256_of(legacy / model_io.MODEL_FILE)
    (legacy / model_io.MANIFEST_FILE).write_text(json.dumps(manifest))
    loaded = model_io.load(legacy)
    parts = [loaded.pipeline, *loaded.pipeline.get_params(deep=True).values()]
    modules = {type(part).__module__ for part in parts}
    assert any(m.startswith("clinml.training.") for m in modules), modules
    assert not any(m.startswith("training.") for m in modules), modules  # no second copy
    np.testing.assert_allclose(
        loaded.predict_proba(x_test), model.predict_proba(x_test)[:, 1], rtol=0, atol=1e-12
    )


class Intruder:
    """A type outside the allow-list (sklearn, numpy, clinml.training)."""

    def __init__(self) -> None:
        self.payload = "anything"


def test_loading_refuses_untrusted_types(tmp_path: Path) -> None:
    import skops.io

    directory = tmp_path / "m"
    directory.mkdir()
    skops.io.dump({"model": Intruder()}, directory / model_io.MODEL_FILE)
    manifest = {
        "format": model_io.FORMAT,
        "features": ["a"],
        "sha256": model_io.sha256_of(directory / model_io.MODEL_FILE),
    }
    (directory / model_io.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(
        model_io.ModelLoadError, match=r"untrusted types \['tests.model.test_candidates.Intruder'\]"
    ):
        model_io.load(directory)


def test_svm_switches_to_a_kernel_approximation_above_the_row_limit(
    tiny_spec: UseCaseSpec, split
) -> None:
    from clinml.training.candidates import svm_variant

    x_train, y_train, x_test, y_test = split
    assert svm_variant({}, 5_000) == "rbf_kernel"
    assert svm_variant({}, 5_001) == "nystroem_linear"
    assert svm_variant({"max_kernel_rows": 100}, 450) == "nystroem_linear"
    model = build_pipeline("svm", tiny_spec, {"max_kernel_rows": 100}, seed=0, n_rows=len(x_train))
    calibrated = model.named_steps["model"]
    assert type(calibrated.estimator).__name__ == "Pipeline"  # Nystroem + LinearSVC
    model.fit(x_train, y_train)
    assert point_metrics(y_test, model.predict_proba(x_test)[:, 1], 0.5)["roc_auc"] > 0.7


def test_nullable_numeric_features_are_imputed_with_an_indicator(
    tiny_spec: UseCaseSpec, split, tmp_path: Path
) -> None:
    features = [
        f.model_copy(update={"nullable": f.name == "creatinine"}) for f in tiny_spec.features
    ]
    spec = tiny_spec.model_copy(update={"features": features})
    x_train, y_train, x_test, _ = split
    x_train = x_train.copy()
    x_train.loc[x_train.index[:40], "creatinine"] = np.nan
    model = build_pipeline("svm", spec, {}, seed=0, n_rows=len(x_train)).fit(x_train, y_train)
    transformed = model.named_steps["preprocess"].transform(
        x_test.head(2).assign(creatinine=[np.nan, 1.0])
    )
    # heart_rate, creatinine, creatinine-missing indicator, three one-hot wards
    assert transformed.shape == (2, 6)
    model_io.save(model, tmp_path / "m", {"features": spec.feature_names})
    loaded = model_io.load(tmp_path / "m")
    probability = loaded.predict_proba(x_test.head(2).assign(creatinine=[np.nan, 1.0]))
    assert np.isfinite(probability).all()


def test_class_weighting_keeps_probabilities_at_the_true_prevalence() -> None:
    """Balanced weights shift the odds by n0/n1; PriorCorrected divides that back out."""
    from sklearn.linear_model import LogisticRegression

    from clinml.training.candidates import PriorCorrected

    rng = np.random.default_rng(3)
    x = rng.normal(size=(20_000, 3))
    risk = 1 / (1 + np.exp(-(x @ np.array([1.0, -0.5, 0.3]) - 3.2)))
    y = (rng.random(len(x)) < risk).astype(int)
    assert 0.04 < y.mean() < 0.10  # imbalanced

    weighted = LogisticRegression().fit(x, y, sample_weight=np.where(y == 1, 1 / y.mean(), 1.0))
    corrected = PriorCorrected(LogisticRegression()).fit(x, y)
    p_weighted = weighted.predict_proba(x)[:, 1]
    p_corrected = corrected.predict_proba(x)[:, 1]
    assert p_weighted.mean() > 0.3  # weighting alone inflates every probability
    assert abs(p_corrected.mean() - y.mean()) < 0.005
    assert point_metrics(y, p_corrected, 0.5)["ece"] < 0.01
    assert np.abs(p_corrected - risk).mean() < 0.005  # recovers the true risk
    # Same ranking as its own weighted fit: the correction is monotone.
    inner = corrected.estimator_.predict_proba(x)[:, 1]
    assert point_metrics(y, p_corrected, 0.5)["roc_auc"] == pytest.approx(
        point_metrics(y, inner, 0.5)["roc_auc"], abs=1e-12
    )


def test_forest_probabilities_match_scikit_learn_and_repeat_exactly(tiny_spec, split) -> None:
    from sklearn.ensemble import RandomForestClassifier

    from clinml.training.candidates import RandomForest

    x_train, y_train, x_test, _ = split
    encoded = build_pipeline("rf", tiny_spec, {}, seed=0)[:-1].fit(x_train).transform(x_test)
    params = {"n_estimators": 40, "n_jobs": 2, "random_state": 0}
    train = build_pipeline("rf", tiny_spec, {}, seed=0)[:-1].fit(x_train).transform(x_train)
    ours = RandomForest(**params).fit(train, y_train)
    theirs = RandomForestClassifier(**params).fit(train, y_train)
    np.testing.assert_allclose(
        ours.predict_proba(encoded), theirs.predict_proba(encoded), atol=1e-12
    )
    first = ours.predict_proba(encoded)
    assert all(np.array_equal(first, ours.predict_proba(encoded)) for _ in range(5))


def test_the_service_refuses_a_version_without_a_recorded_hash(
    tiny_spec: UseCaseSpec, split, tmp_path: Path
) -> None:
    from clinml.serving import runtime

    x_train, y_train, _, _ = split
    model = build_pipeline("gbm", tiny_spec, {"max_iter": 5}, seed=0).fit(x_train, y_train)
    directory = model_io.save(model, tmp_path / "m", {"features": tiny_spec.feature_names})
    metadata = {"registered_model": "tiny", "version": "1"}
    for recorded in (None, ""):
        with pytest.raises(model_io.ModelLoadError, match="no model hash was recorded"):
            runtime.build(
                directory, {**metadata, "model_sha256": recorded}, None, "cpu", spec=tiny_spec
            )
    good = {**metadata, "model_sha256": model_io.sha256_of(directory / model_io.MODEL_FILE)}
    assert runtime.build(directory, good, None, "cpu", spec=tiny_spec).version == "1"


# --- patient-grouped inner splits --------------------------------------------------------------


def _repeated_patients(n_patients: int = 400, seed: int = 0):
    """Rows of patients with 1-4 encounters each, and each row's patient id."""
    rng = np.random.default_rng(seed)
    frame = make_tiny_frame(n=n_patients, seed=seed)
    repeats = rng.integers(1, 5, n_patients)
    rows = frame.loc[frame.index.repeat(repeats)].reset_index(drop=True)
    return rows, rows["patient_id"].to_numpy()


def test_patient_holdout_holds_out_whole_patients_with_both_classes() -> None:
    from clinml.training.mlp import patient_holdout

    rows, patients = _repeated_patients()
    labels = (rows["outcome"] == "yes").to_numpy(dtype=int)
    held_out = patient_holdout(labels, patients, 0.2, seed=3)
    assert held_out is not None
    assert not set(patients[held_out]) & set(patients[~held_out])
    assert 0.1 < held_out.mean() < 0.3
    for part in (held_out, ~held_out):
        assert set(labels[part]) == {0, 1}
    assert patient_holdout(np.array([1, 0]), np.array(["a", "b"]), 0.5, seed=0) is None


def test_calibration_folds_never_split_a_patient() -> None:
    from clinml.training.candidates import patient_folds

    rows, patients = _repeated_patients()
    labels = (rows["outcome"] == "yes").to_numpy(dtype=int)
    folds = patient_folds(labels, patients, 5)
    assert folds is not None and len(folds) == 5
    for fit_rows, held_rows in folds:
        assert not set(patients[fit_rows]) & set(patients[held_rows])


@pytest.mark.parametrize("name", ["svm", "gbm", "mlp"])
def test_fit_hands_patient_ids_to_classifiers_that_hold_rows_out(
    name: str, tiny_spec: UseCaseSpec, monkeypatch
) -> None:
    from clinml.training import candidates

    rows, patients = _repeated_patients()
    y = (rows["outcome"] == "yes").to_numpy(dtype=int)
    pipeline = build_pipeline(name, tiny_spec, {}, seed=0)
    model = pipeline.steps[-1][1]
    seen = {}
    original = type(model).fit

    def spy(self, X, y, sample_weight=None, groups=None, **kwargs):
        seen["groups"] = groups
        return original(self, X, y, sample_weight=sample_weight, groups=groups, **kwargs)

    monkeypatch.setattr(type(model), "fit", spy)
    candidates.fit(pipeline, rows[tiny_spec.feature_names], y, patients)
    np.testing.assert_array_equal(seen["groups"], patients)


def test_boosting_stops_early_on_whole_patients(tiny_spec: UseCaseSpec) -> None:
    """With patient ids the early-stopping rows are whole patients: the same model as
    scikit-learn's fit given exactly those patients as its validation set."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from clinml.training.candidates import GroupedHistGradientBoosting
    from clinml.training.mlp import patient_holdout

    rows, patients = _repeated_patients(n_patients=300, seed=2)
    x = rows[["heart_rate", "creatinine"]].to_numpy()
    y = (rows["outcome"] == "yes").to_numpy(dtype=int)
    params = {"early_stopping": True, "max_iter": 200, "random_state": 4}
    grouped = GroupedHistGradientBoosting(**params).fit(x, y, groups=patients)
    held_out = patient_holdout(y, patients, 0.1, seed=4)
    assert held_out is not None
    plain = HistGradientBoostingClassifier(**params).fit(
        x[~held_out], y[~held_out], X_val=x[held_out], y_val=y[held_out]
    )
    assert grouped.n_iter_ == plain.n_iter_
    np.testing.assert_array_equal(grouped.predict_proba(x), plain.predict_proba(x))


def test_the_search_chooses_by_log_loss_not_by_a_sliver_of_auroc(tiny_spec: UseCaseSpec) -> None:
    """Heavy shrinkage barely moves a logistic regression's AUROC but squashes its risks
    towards the mean: the proper scoring rule refuses it."""
    from clinml.training.search import log_loss, search

    frame = make_tiny_frame(n=800, seed=5)
    y = (frame["outcome"] == "yes").to_numpy(dtype=int)
    training = tiny_spec.training.model_copy(
        update={
            "search": tiny_spec.training.search.model_copy(update={"n_iter": 2, "cv_folds": 3}),
            "candidates": {
                "logreg": CandidateSpec(params={"C": 1e-4}, search={"C": [1.0]}),
            },
        }
    )
    spec = tiny_spec.model_copy(update={"training": training})
    result = search("logreg", spec, frame[spec.feature_names], y, frame["patient_id"].to_numpy())
    squashed, fitted = result.trials
    assert squashed.params["C"] == 1e-4 and fitted.params["C"] == 1.0
    assert abs(squashed.score - fitted.score) < 0.02  # ranking nearly the same
    assert fitted.log_loss < squashed.log_loss
    assert result.best_params["C"] == 1.0
    assert result.best_score == fitted.score
    assert log_loss(y, np.full(len(y), y.mean())) == pytest.approx(
        -np.mean(y * np.log(y.mean()) + (1 - y) * np.log(1 - y.mean()))
    )
