"""A compiled execution path for serving: the fitted pipeline's arithmetic without its overhead.

``pipeline.predict_proba`` on one record spends most of its time outside the model: pandas
and the ``ColumnTransformer`` validate and reassemble the frame, and a forest calls every
tree from Python. :func:`compile_model` reads the fitted preprocessing and classifier once
and returns a :class:`CompiledModel` that repeats the same computation on plain arrays:

- preprocessing in numpy, straight from request dictionaries (scaling, median imputation
  with missing indicators, one-hot encoding with unknown categories as all zeros), in the
  ``ColumnTransformer``'s exact output order;
- the classifier in torch, float64 throughout, on CUDA when available. Forests and boosted
  trees are evaluated for every tree and row at once with one gather per tree level; the
  RBF SVM, its Nystroem approximation, Platt calibration, the MLP, the logistic regression
  and the prior correction of class-weighted models are the same formulas scikit-learn and
  clinml apply.

Probabilities match the pipeline's to within 1e-5 (in practice below 1e-9; the MLP, which
scikit-learn runs in float32, about 1e-7). A pipeline the compiler does not know raises
:class:`UnsupportedModel`, and the caller serves it through the pipeline instead::

    compiled = compile_model(pipeline)          # device="auto": CUDA when available
    compiled.warm_up()
    x = compiled.encode_records(records)        # list of {feature: value}
    x = compiled.encode_columns(columns)        # or {feature: values}, the same matrix
    probability = compiled.predict_proba(x)     # positive class, shape (n,)
    top = compiled.explain(x, top_k=5)          # [(feature, signed contribution), ...]

On the CPU, tree ensembles are traversed the same way level by level in numpy
(``NUMPY_TREES``): each step is a handful of small array operations, and numpy's cost
per operation is well below torch's (the measurement: docs/benchmarks.md, "What changed
for issue 7"; docs/serving.md). CUDA uses torch. Request-sized tensors gain nothing
from torch's intra-op threads, and on a busy machine a thread pool waiting for a core
adds milliseconds per call; a CPU serving process should run with
``torch.set_num_threads(1)`` (a process setting, left to it).
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from clinml.errors import ClinmlError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Rows per device pass: bounds the memory of a kernel matrix (rows x support vectors) and
# of the forest's per-row, per-tree state for large batches; a request is far smaller.
CHUNK_ROWS = 8_192
# Tree ensembles on the CPU are scored in numpy rather than torch (see above).
NUMPY_TREES = True
# From this many rows on, a boosted-tree model on the CPU is scored by scikit-learn's own
# compiled predictor (one call per tree, each walking every row to its leaf) instead of
# the level-by-level walk: the walk costs the same per row at any batch size (every row
# takes the deepest tree's number of steps in every tree), the native predictor a fixed
# ~3 µs per tree plus a few µs per row. Measured on a 300-tree model (bench/tree_dispatch_bench.py,
# docs/benchmarks.md): the native predictor wins from about 64 rows and is 3-4x cheaper
# at 1,000. It compares the rows' bins rather than their values where it can
# (``_binned_predictor``).
NATIVE_TREE_ROWS = 64

EXPLAIN_METHODS = {
    "rf": (
        "Saabas path attribution on the probability: each split's change in the node's "
        "positive-class fraction, averaged over trees, credited to the split feature; "
        "bias + contributions = probability"
    ),
    "gbm": (
        "Saabas path attribution on the log-odds: each split's change in the node's mean "
        "training output, summed over trees, credited to the split feature; "
        "bias + contributions = log-odds"
    ),
    "svm_rbf": (
        "gradient x input on the Platt-calibrated log-odds of the RBF SVM, from a zero "
        "baseline in the standardised space (training means, no category); first-order"
    ),
    "svm_nystroem": (
        "gradient x input on the Platt-calibrated log-odds of the Nystroem SVM, from a zero "
        "baseline in the standardised space (training means, no category); first-order"
    ),
    "mlp": (
        "gradient x input on the network's log-odds, from a zero baseline in the "
        "standardised space (training means, no category); first-order"
    ),
    "logreg": (
        "coefficient x input on the logistic regression's log-odds, from a zero baseline in "
        "the standardised space (training means, no category); exact for a linear model: "
        "bias (the intercept) + contributions = log-odds"
    ),
}
PRIOR_NOTES = {
    "rf": "; path contributions rescaled per row to the prior-corrected probability",
    "gbm": "; the prior correction adds log(odds factor) to the bias",
    "logreg": "; the prior correction adds log(odds factor) to the bias",
}
PRIOR_NOTE = "; on the prior-corrected log-odds (the correction shifts it by a constant)"


class UnsupportedModel(ClinmlError):
    """The pipeline holds a step the fast path cannot reproduce; serve the pipeline itself."""


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class _Scaled:
    """A StandardScaler over numeric columns: ``(x - mean) / scale``."""

    raw: np.ndarray  # positions in the raw numeric matrix
    out: slice
    mean: np.ndarray
    scale: np.ndarray

    def fill(self, raw: np.ndarray, out: np.ndarray) -> None:
        # Same operations in the same order as StandardScaler.transform: bitwise equal.
        out[:, self.out] = (raw[:, self.raw] - self.mean) / self.scale


@dataclass(frozen=True)
class _Imputed:
    """SimpleImputer (+ missing indicators), then optionally a StandardScaler."""

    raw: np.ndarray  # positions in the raw numeric matrix, one per imputed column
    kept: np.ndarray  # columns the imputer outputs (all-missing ones are dropped at fit)
    statistics: np.ndarray  # fill value per kept column
    indicators: np.ndarray  # columns that get a missing indicator (missing at fit time)
    out: slice
    mean: np.ndarray
    scale: np.ndarray

    def fill(self, raw: np.ndarray, out: np.ndarray) -> None:
        values = raw[:, self.raw]
        missing = np.isnan(values)
        imputed = np.where(missing[:, self.kept], self.statistics, values[:, self.kept])
        block = np.concatenate([imputed, missing[:, self.indicators]], axis=1)
        out[:, self.out] = (block - self.mean) / self.scale


class _Encoder:
    """The fitted ColumnTransformer as numpy operations, plus its column layout."""

    def __init__(self, transformer: Any):
        from sklearn.compose import ColumnTransformer

        if not isinstance(transformer, ColumnTransformer):
            raise UnsupportedModel(
                f"preprocessing is {type(transformer).__name__}; the fast path reads a "
                "fitted ColumnTransformer"
            )
        names_in = [str(c) for c in getattr(transformer, "feature_names_in_", [])]
        parts = []
        used: list[str] = []
        for name, fitted, columns in transformer.transformers_:
            if isinstance(fitted, str) and fitted == "drop":
                continue
            if isinstance(columns, str):
                columns = [columns]
            resolved = [names_in[c] if isinstance(c, int | np.integer) else str(c) for c in columns]
            if not resolved:
                continue
            parts.append((name, fitted, resolved))
            used += [c for c in resolved if c not in used]
        # Input columns in the order the pipeline was fitted with (the spec's order).
        order = {c: i for i, c in enumerate(names_in)}
        self.features: list[str] = sorted(used, key=lambda c: order.get(c, len(order)))
        position = {c: i for i, c in enumerate(self.features)}

        self.width = sum(
            s.stop - s.start for s in transformer.output_indices_.values() if s.stop > s.start
        )
        owner = np.full(self.width, -1, dtype=np.int64)
        self.raw_columns: list[str] = []  # numeric inputs, as gathered into the raw matrix
        self.blocks: list[_Scaled | _Imputed] = []
        strict: list[int] = []  # raw positions that must not be missing
        categorical: list[tuple[int, dict[Any, int]]] = []  # feature, category -> column
        for name, fitted, columns in parts:
            out = transformer.output_indices_[name]
            kind = _block_kind(name, fitted)
            if kind == "onehot":
                for column, categories, offset in _onehot_layout(fitted, columns, out.start):
                    lookup = {category: offset + j for j, category in enumerate(categories)}
                    categorical.append((position[column], lookup))
                    owner[offset : offset + len(categories)] = position[column]
                continue
            raw = np.arange(len(self.raw_columns), len(self.raw_columns) + len(columns))
            self.raw_columns += columns
            if kind == "scaled":
                mean, scale = _scaler_arrays(fitted, len(columns))
                self.blocks.append(_Scaled(raw, out, mean, scale))
                strict += raw.tolist()
                owner[out] = [position[c] for c in columns]
            else:
                block = _imputed_block(name, fitted, raw, out)
                self.blocks.append(block)
                owner[out] = [
                    position[columns[i]] for i in (*block.kept.tolist(), *block.indicators.tolist())
                ]
        if (owner < 0).any():
            raise UnsupportedModel("the ColumnTransformer's output layout could not be mapped")
        self.strict = np.asarray(strict, dtype=np.int64)
        self.categorical = categorical
        # itemgetter of two or more keys returns a tuple, which is what encode_records needs
        self._take_raw: Callable[[dict[str, Any]], Any] | None = (
            operator.itemgetter(*self.raw_columns) if len(self.raw_columns) > 1 else None
        )
        self.owner = owner
        try:
            self.encoded_names = [str(n) for n in transformer.get_feature_names_out()]
        except (AttributeError, ValueError):
            self.encoded_names = [f"x{i}" for i in range(self.width)]
        if len(self.encoded_names) != self.width:
            raise UnsupportedModel(
                f"the ColumnTransformer outputs {len(self.encoded_names)} columns but its "
                f"parts add up to {self.width}"
            )

    def _assemble(self, raw: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """The encoded matrix from raw numeric values and one-hot positions (-1: none)."""
        if self.strict.size and np.isnan(raw[:, self.strict]).any():
            missing = np.isnan(raw[:, self.strict]).any(axis=0)
            names = sorted({self.raw_columns[i] for i in self.strict[missing]})
            raise ValueError(
                f"missing values in {', '.join(names)}: the model does not impute "
                "these features, so every record needs a value"
            )
        out = np.zeros((raw.shape[0], self.width), dtype=np.float64)
        for block in self.blocks:
            block.fill(raw, out)
        if codes.size:
            rows, columns = np.nonzero(codes >= 0)
            out[rows, codes[rows, columns]] = 1.0
        return out

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        import pandas as pd

        raw = frame[self.raw_columns].to_numpy(dtype=np.float64, na_value=np.nan)
        codes = np.empty((len(frame), len(self.categorical)), dtype=np.int64)
        for j, (feature, lookup) in enumerate(self.categorical):
            categories = list(lookup)
            local = pd.Categorical(frame[self.features[feature]], categories=categories).codes
            offsets = np.asarray(list(lookup.values()), dtype=np.int64)
            codes[:, j] = np.where(local >= 0, offsets[np.maximum(local, 0)], -1)
        return self._assemble(raw, codes)

    def encode_records(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
        columns, take = self.raw_columns, self._take_raw
        values: list[Any] | None = None
        if take is not None:
            try:  # records from the API have every feature: take them all at once
                values = [take(record) for record in records]
            except KeyError:  # a record leaves out a nullable feature
                values = None
        if values is None:
            values = [[record.get(c) for c in columns] for record in records]
        try:
            # None (a nullable feature not measured) becomes NaN in a float array.
            raw = np.array(values, dtype=np.float64).reshape(len(records), len(columns))
        except (TypeError, ValueError):
            raw = _numbers(values, columns)
        names = [(self.features[f], lookup) for f, lookup in self.categorical]
        codes = np.array(
            [[lookup.get(record.get(name), -1) for name, lookup in names] for record in records],
            dtype=np.int64,
        ).reshape(len(records), len(names))
        return self._assemble(raw, codes)

    def encode_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """``encode_records`` from columns (feature -> values, a list or an array): the
        same conversions column by column, so the same matrix bit for bit. A feature
        without a column is missing in every row, as in a record that leaves it out."""
        rows = _rows(columns)
        raw = np.empty((rows, len(self.raw_columns)), dtype=np.float64)
        for j, name in enumerate(self.raw_columns):
            values = columns.get(name)
            if values is None:
                raw[:, j] = np.nan
                continue
            try:
                # None (a nullable feature not measured) becomes NaN in a float array.
                raw[:, j] = np.asarray(values, dtype=np.float64).reshape(rows)
            except (TypeError, ValueError):
                raw[:, j] = _numbers([[value] for value in values], [name])[:, 0]
        codes = np.empty((rows, len(self.categorical)), dtype=np.int64)
        for j, (feature, lookup) in enumerate(self.categorical):
            values = columns.get(self.features[feature])
            if values is None:
                codes[:, j] = -1
            else:
                codes[:, j] = np.fromiter(map(lookup.get, values, repeat(-1)), np.int64, rows)
        return self._assemble(raw, codes)


def _rows(columns: Mapping[str, Any]) -> int:
    """The number of rows of columns that must all have it."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        raise ValueError(
            "columns must all have the same number of values" if lengths else "no columns"
        )
    return lengths.pop()


def _numbers(values: list[list[Any]], columns: list[str]) -> np.ndarray:
    """The slow path of ``encode_records``: pandas' missing markers (``pd.NA``, ``NaT``)
    become NaN, and a value that is not a number is named in the error."""
    import pandas as pd

    raw = np.empty((len(values), len(columns)), dtype=np.float64)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                raw[i, j] = np.nan
                continue
            try:
                raw[i, j] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{columns[j]} must be a number") from None
    return raw


def _block_kind(name: str, fitted: Any) -> str:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if isinstance(fitted, StandardScaler):
        return "scaled"
    if isinstance(fitted, OneHotEncoder):
        return "onehot"
    if isinstance(fitted, Pipeline):
        steps = [step for _, step in fitted.steps if step not in (None, "passthrough")]
        if (
            steps
            and isinstance(steps[0], SimpleImputer)
            and all(isinstance(s, StandardScaler) for s in steps[1:])
            and len(steps) <= 2
        ):
            return "imputed"
    raise UnsupportedModel(
        f"preprocessing part '{name}' is {type(fitted).__name__}; the fast path knows "
        "StandardScaler, SimpleImputer(+StandardScaler) and OneHotEncoder"
    )


def _scaler_arrays(scaler: Any, width: int) -> tuple[np.ndarray, np.ndarray]:
    if scaler is None:
        return np.zeros(width), np.ones(width)
    mean = scaler.mean_ if scaler.with_mean else np.zeros(width)
    scale = scaler.scale_ if scaler.with_std else np.ones(width)
    return np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)


def _imputed_block(name: str, fitted: Any, raw: np.ndarray, out: slice) -> _Imputed:
    steps = [step for _, step in fitted.steps if step not in (None, "passthrough")]
    imputer, scaler = steps[0], (steps[1] if len(steps) > 1 else None)
    missing_value = imputer.missing_values
    if not (isinstance(missing_value, float) and math.isnan(missing_value)):
        raise UnsupportedModel(
            f"preprocessing part '{name}' imputes {missing_value!r}; the fast path imputes NaN"
        )
    statistics = np.asarray(imputer.statistics_, dtype=np.float64)
    kept = np.flatnonzero(~np.isnan(statistics))
    indicator = getattr(imputer, "indicator_", None)
    indicators = (
        np.asarray(indicator.features_, dtype=np.int64)
        if indicator is not None
        else np.empty(0, dtype=np.int64)
    )
    width = len(kept) + len(indicators)
    if width != out.stop - out.start:
        raise UnsupportedModel(f"preprocessing part '{name}': unexpected output width")
    mean, scale = _scaler_arrays(scaler, width)
    return _Imputed(raw, kept, statistics[kept], indicators, out, mean, scale)


def _onehot_layout(encoder: Any, columns: list[str], start: int) -> list[tuple[str, Any, int]]:
    if encoder.drop_idx_ is not None or getattr(encoder, "_infrequent_enabled", False):
        raise UnsupportedModel("a OneHotEncoder with drop or infrequent categories")
    if encoder.handle_unknown == "error":
        raise UnsupportedModel(
            "a OneHotEncoder with handle_unknown='error'; the fast path encodes unknown "
            "categories as all zeros"
        )
    layout = []
    offset = start
    for column, categories in zip(columns, encoder.categories_, strict=True):
        layout.append((column, categories.tolist(), offset))
        offset += len(categories)
    return layout


# --------------------------------------------------------------------------- models


class _TreeEnsemble:
    """Every tree of an ensemble in flat, padded tensors, traversed one level per step.

    Node ``i`` of the flat arrays is addressed by the state ``2 i``; the state plus the
    split's outcome (0: left, 1: right) indexes ``children``, which holds the child's
    state. A leaf points to itself on both sides, so a fixed number of steps (the
    deepest tree's depth) lands every tree of every row on its leaf.
    """

    def __init__(
        self,
        trees: list[dict[str, np.ndarray]],
        float32_inputs: bool,
        device: str,
    ):
        import torch

        offsets = np.cumsum([0] + [len(t["feature"]) for t in trees])
        feature, threshold, children, value, missing_right = [], [], [], [], []
        self.depth = 0
        for tree, offset in zip(trees, offsets[:-1], strict=True):
            leaf = tree["left"] < 0
            local = np.arange(len(leaf))
            left = np.where(leaf, local, tree["left"]) + offset
            right = np.where(leaf, local, tree["right"]) + offset
            feature.append(np.where(leaf, 0, tree["feature"]))
            # +inf never sends a leaf "right": x > inf is False, NaN included.
            threshold.append(np.where(leaf, np.inf, tree["threshold"]))
            children.append(np.stack([2 * left, 2 * right], axis=1).ravel())
            value.append(tree["value"])
            missing_right.append(~leaf & ~tree["missing_left"])
            self.depth = max(self.depth, int(tree["depth"]))

        def doubled(parts: list[np.ndarray], dtype: Any) -> Any:
            return torch.as_tensor(np.repeat(np.concatenate(parts), 2), dtype=dtype, device=device)

        self.feature = doubled(feature, torch.int64)
        self.threshold = doubled(threshold, torch.float64)
        self.value = doubled(value, torch.float64)
        self.missing_right = doubled(missing_right, torch.bool)
        self.children = torch.as_tensor(np.concatenate(children), dtype=torch.int64, device=device)
        self.roots = torch.as_tensor(2 * offsets[:-1], dtype=torch.int64, device=device)
        self.n_trees = len(trees)
        self.float32_inputs = float32_inputs
        # The same tables as numpy arrays: on the CPU, leaf_values_numpy scores with them.
        self.tables = None
        if device == "cpu":
            self.tables = tuple(
                t.numpy()
                for t in (
                    self.feature,
                    self.threshold,
                    self.children,
                    self.value,
                    self.missing_right,
                    self.roots,
                )
            )

    def _inputs(self, x: Any) -> Any:
        import torch

        # scikit-learn's trees compare float32 inputs with float64 thresholds.
        return x.to(torch.float32).to(torch.float64) if self.float32_inputs else x

    def _step(self, x: Any, state: Any, has_nan: bool) -> tuple[Any, Any]:
        # take() on flat tables is faster than advanced indexing on the CPU
        # (docs/benchmarks.md, "What changed for issue 7").
        feature = self.feature.take(state)
        values = x.gather(1, feature)
        right = values > self.threshold.take(state)  # scikit-learn: x <= threshold goes left
        if has_nan:
            right |= values.isnan() & self.missing_right.take(state)
        return self.children.take(state + right), feature

    def leaf_values(self, x: Any, has_nan: bool) -> Any:
        """Value of the leaf each row reaches in each tree, shape (rows, trees)."""
        x = self._inputs(x)
        state = self.roots.expand(x.shape[0], -1)
        for _ in range(self.depth):
            state, _ = self._step(x, state, has_nan)
        return self.value.take(state)

    def leaf_values_numpy(self, x: np.ndarray, has_nan: bool) -> np.ndarray:
        """``leaf_values`` for a float64 array on the CPU, step for step in numpy."""
        assert self.tables is not None, "numpy tables exist on the CPU only"
        feature, threshold, children, value, missing_right, roots = self.tables
        if self.float32_inputs:
            x = x.astype(np.float32).astype(np.float64)
        rows, width = x.shape
        flat = np.ascontiguousarray(x).ravel()
        start = (np.arange(rows) * width)[:, None]  # each row's offset in ``flat``
        state = np.broadcast_to(roots, (rows, roots.shape[0]))
        for _ in range(self.depth):
            values = flat.take(start + feature.take(state))  # flat take beats x[i, j]
            right = values > threshold.take(state)
            if has_nan:
                right |= np.isnan(values) & missing_right.take(state)
            state = children.take(state + right)
        return value.take(state)

    def saabas(self, x: Any, has_nan: bool) -> tuple[Any, Any]:
        """Per-row sums over trees of each split's value change, by encoded column; and
        the sum of the root values (the bias)."""
        import torch

        x = self._inputs(x)
        state = self.roots.expand(x.shape[0], -1)
        contributions = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for _ in range(self.depth):
            child, feature = self._step(x, state, has_nan)
            contributions.scatter_add_(1, feature, self.value.take(child) - self.value.take(state))
            state = child
        bias = self.value[self.roots].sum().expand(x.shape[0])
        return contributions, bias


class _Forest:
    """RandomForestClassifier: the mean over trees of the leaf's positive-class fraction."""

    kind = "rf"

    def __init__(self, forest: Any, device: str):
        if forest.n_outputs_ != 1 or len(forest.classes_) != 2:
            raise UnsupportedModel("a forest that is not a binary, single-output classifier")
        trees = []
        for estimator in forest.estimators_:
            tree = estimator.tree_
            counts = tree.value[:, 0, :].astype(np.float64)
            # scikit-learn >= 1.4 stores class fractions; normalising again is a no-op
            # then and makes counts (older trees) work too, exactly as predict_proba does.
            total = counts.sum(axis=1)
            positive = counts[:, 1] / np.where(total == 0.0, 1.0, total)
            trees.append(
                {
                    "feature": tree.feature,
                    "threshold": tree.threshold,
                    "left": tree.children_left,
                    "right": tree.children_right,
                    "value": positive,
                    # inputs are imputed before the forest; NaN never reaches a split
                    "missing_left": np.ones(tree.node_count, dtype=bool),
                    "depth": tree.max_depth,
                }
            )
        self.trees = _TreeEnsemble(trees, float32_inputs=True, device=device)

    def probability(self, x: Any, has_nan: bool) -> Any:
        return self.trees.leaf_values(x, has_nan).sum(dim=1) / self.trees.n_trees

    def probability_numpy(self, x: np.ndarray, has_nan: bool) -> np.ndarray:
        return self.trees.leaf_values_numpy(x, has_nan).sum(axis=1) / self.trees.n_trees

    def attributions(self, x: Any, has_nan: bool) -> tuple[Any, Any]:
        contributions, bias = self.trees.saabas(x, has_nan)
        return contributions / self.trees.n_trees, bias / self.trees.n_trees


class _Boosting:
    """HistGradientBoostingClassifier: sigmoid(baseline + sum of the trees' leaf values)."""

    kind = "gbm"

    def __init__(self, model: Any, device: str):
        if getattr(model, "n_trees_per_iteration_", 1) != 1 or len(model.classes_) != 2:
            raise UnsupportedModel("a HistGradientBoostingClassifier that is not binary")
        trees = []
        for (predictor,) in model._predictors:
            nodes = predictor.nodes
            if nodes["is_categorical"].any():
                raise UnsupportedModel("a HistGradientBoostingClassifier with native categories")
            leaf = nodes["is_leaf"].astype(bool)
            trees.append(
                {
                    "feature": nodes["feature_idx"],
                    "threshold": nodes["num_threshold"],
                    "left": np.where(leaf, -1, nodes["left"].astype(np.int64)),
                    "right": np.where(leaf, -1, nodes["right"].astype(np.int64)),
                    "value": _mean_leaf_values(nodes),
                    "missing_left": nodes["missing_go_to_left"].astype(bool),
                    "depth": int(nodes["depth"].max()),
                }
            )
        self.trees = _TreeEnsemble(trees, float32_inputs=False, device=device)
        baseline = getattr(model, "_baseline_prediction", None)
        if baseline is None:
            baseline = model.baseline_prediction_
        self.baseline = float(np.asarray(baseline).ravel()[0])
        self._native = self._native_predictor(model) if device == "cpu" else None

    def log_odds(self, x: Any, has_nan: bool) -> Any:
        return self.baseline + self.trees.leaf_values(x, has_nan).sum(dim=1)

    def probability(self, x: Any, has_nan: bool) -> Any:
        import torch

        return torch.sigmoid(self.log_odds(x, has_nan))

    def probability_numpy(self, x: np.ndarray, has_nan: bool) -> np.ndarray:
        if self._native is not None and len(x) >= NATIVE_TREE_ROWS:
            log_odds = self._native(x)
        else:
            log_odds = self.baseline + self.trees.leaf_values_numpy(x, has_nan).sum(axis=1)
        return 1.0 / (1.0 + np.exp(-log_odds))

    def _native_predictor(
        self, model: Any, binned: bool = True
    ) -> Callable[[np.ndarray], np.ndarray] | None:
        """scikit-learn's compiled per-tree predictor, on one thread (a serving worker has
        one core); ``None`` where this scikit-learn's private predictor API differs from
        the one this was written against, or disagrees with the walk on a probe batch."""
        predictors = [predictor for (predictor,) in model._predictors]
        try:
            bitsets, feature_map = model._bin_mapper.make_known_categories_bitsets()
        except AttributeError:
            return None

        def log_odds(x: np.ndarray) -> np.ndarray:
            rows = np.ascontiguousarray(x, dtype=np.float64)
            raw = np.full(len(rows), self.baseline)
            for predictor in predictors:
                raw += predictor.predict(rows, bitsets, feature_map, 1)
            return raw

        probe = np.zeros((2, model.n_features_in_))
        probe[1] = np.nan
        try:
            agrees = np.allclose(
                log_odds(probe),
                self.baseline + self.trees.leaf_values_numpy(probe, True).sum(axis=1),
                rtol=0,
                atol=1e-9,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            log.info("scikit-learn's tree predictor is not usable here (%s); trees are walked", exc)
            return None
        if not agrees:
            return None
        if not binned:
            return log_odds
        return self._binned_predictor(model, predictors, log_odds) or log_odds

    def _binned_predictor(
        self,
        model: Any,
        predictors: list[Any],
        raw_log_odds: Callable[[np.ndarray], np.ndarray],
    ) -> Callable[[np.ndarray], np.ndarray] | None:
        """The same log-odds from binned rows: each value mapped once to its bin by the
        model's own bin mapper (as in training), then every tree compares small bin
        numbers instead of floats: 7.9 ms instead of 9.1 for 1,000 rows and 300 trees,
        the mapping included (issue 22). A value goes left of a split exactly when its
        bin does (a split's threshold is a bin's upper edge, and a value's bin is the
        first whose edge it does not exceed), so the sums are the same bit for bit;
        ``None`` unless they are on a probe at every split's threshold, a step either
        side of it, NaN and infinity, or where scikit-learn's private API differs."""
        try:
            from sklearn.ensemble._hist_gradient_boosting._binning import _map_to_bins

            mapper = model._bin_mapper
            edges, missing_bin = mapper.bin_thresholds_, mapper.missing_values_bin_idx_
            categorical = getattr(mapper, "is_categorical_", None)
        except (ImportError, AttributeError):
            return None
        if categorical is None:
            categorical = np.zeros(len(edges), dtype=np.uint8)

        def binned_log_odds(x: np.ndarray) -> np.ndarray:
            rows = np.ascontiguousarray(x, dtype=np.float64)
            bins = np.empty(rows.shape, dtype=np.uint8, order="F")
            _map_to_bins(rows, edges, categorical, missing_bin, 1, bins)
            raw = np.full(len(rows), self.baseline)
            for predictor in predictors:
                raw += predictor.predict_binned(bins, missing_bin, 1)
            return raw

        probe = _split_probe(predictors, model.n_features_in_)
        try:
            same = np.array_equal(binned_log_odds(probe), raw_log_odds(probe))
        except (TypeError, ValueError, AttributeError) as exc:
            log.info("scikit-learn's binned predictor is not usable here (%s)", exc)
            return None
        return binned_log_odds if same else None

    def attributions(self, x: Any, has_nan: bool) -> tuple[Any, Any]:
        contributions, bias = self.trees.saabas(x, has_nan)
        return contributions, bias + self.baseline


def _split_probe(predictors: list[Any], width: int) -> np.ndarray:
    """Rows that put every feature at each threshold the trees split it on, and a step
    (one float) below and above it, cycling where a feature has fewer; then rows of
    NaN, infinity and minus infinity."""
    values: list[np.ndarray] = []
    for feature in range(width):
        found = [
            p.nodes["num_threshold"][
                (p.nodes["feature_idx"] == feature) & ~p.nodes["is_leaf"].astype(bool)
            ]
            for p in predictors
        ]
        edges = np.unique(np.concatenate(found)) if found else np.zeros(0)
        values.append(
            np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
            if len(edges)
            else np.zeros(1)
        )
    rows = max(len(v) for v in values)
    probe = np.column_stack([np.resize(v, rows) for v in values])
    extremes = np.array([[np.nan], [np.inf], [-np.inf]]).repeat(width, axis=1)
    return np.vstack([probe, extremes])


def _mean_leaf_values(nodes: np.ndarray) -> np.ndarray:
    """Leaves keep their (shrunk) value; an internal node gets the training-count-weighted
    mean of its leaves, i.e. the tree's mean output over the samples that reached it.

    HGB stores internal values without the learning rate and gives the root 0, so they
    are not on the leaves' scale; this recomputes them for path attribution.
    """
    leaf = nodes["is_leaf"].astype(bool)
    count = nodes["count"].astype(np.float64)
    weighted = np.where(leaf, nodes["value"] * count, 0.0)
    total = np.where(leaf, count, 0.0)
    # Children are always created after their parent, so a reverse pass sees them first.
    for i in range(len(nodes) - 1, -1, -1):
        if not leaf[i]:
            left, right = nodes["left"][i], nodes["right"][i]
            weighted[i] = weighted[left] + weighted[right]
            total[i] = total[left] + total[right]
    mean = np.divide(weighted, total, out=np.zeros_like(weighted), where=total > 0)
    return np.where(leaf, nodes["value"], mean)


class _Differentiable:
    """A model whose log-odds is a differentiable torch function of the encoded input."""

    kind = ""
    float32_inputs = False

    def log_odds(self, x: Any, has_nan: bool = False) -> Any:
        raise NotImplementedError

    def probability(self, x: Any, has_nan: bool) -> Any:
        import torch

        return torch.sigmoid(self.log_odds(x))

    def attributions(self, x: Any, has_nan: bool) -> tuple[Any, Any]:
        import torch

        if self.float32_inputs:
            x = x.to(torch.float32).to(torch.float64)
        with torch.enable_grad():
            inputs = x.clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.log_odds(inputs).sum(), inputs)
            baseline = self.log_odds(torch.zeros_like(x[:1])).detach().expand(x.shape[0])
        return gradient * x, baseline.clone()


class _CalibratedSVM(_Differentiable):
    """CalibratedClassifierCV(sigmoid) around an RBF SVC or a Nystroem + LinearSVC pipeline.

    scikit-learn's binary positive-class probability is ``1 / (1 + exp(a d + b))`` for
    the decision value ``d`` (``_SigmoidCalibration.predict``), so the log-odds is
    ``-(a d + b)``.
    """

    def __init__(self, calibrated: Any, device: str):
        import torch
        from sklearn.pipeline import Pipeline
        from sklearn.svm import SVC

        if calibrated.method != "sigmoid" or len(calibrated.classes_) != 2:
            raise UnsupportedModel("a CalibratedClassifierCV that is not binary and sigmoid")
        if len(calibrated.calibrated_classifiers_) != 1:
            raise UnsupportedModel(
                "a CalibratedClassifierCV with ensemble=True (several calibrated SVMs)"
            )
        member = calibrated.calibrated_classifiers_[0]
        (calibrator,) = member.calibrators
        self.a, self.b = float(calibrator.a_), float(calibrator.b_)
        estimator = member.estimator

        def tensor(array: Any) -> Any:
            return torch.as_tensor(np.asarray(array, dtype=np.float64), device=device)

        if isinstance(estimator, SVC) and estimator.kernel == "rbf":
            self.kind = "svm_rbf"
            self.centres = tensor(estimator.support_vectors_)
            self.gamma = float(estimator._gamma)
            self.weights = tensor(estimator.dual_coef_[0])
            self.intercept = float(estimator.intercept_[0])
        elif isinstance(estimator, Pipeline) and _is_nystroem_linear(estimator):
            self.kind = "svm_nystroem"
            kernel, svm = estimator[0], estimator[-1]
            self.centres = tensor(kernel.components_)
            gamma = kernel.gamma
            self.gamma = float(1.0 / kernel.components_.shape[1] if gamma is None else gamma)
            # (K @ N.T) @ w == K @ (N.T @ w): one small product per call instead of two.
            self.weights = tensor(kernel.normalization_.T @ svm.coef_[0])
            self.intercept = float(svm.intercept_[0])
        else:
            raise UnsupportedModel(
                f"a CalibratedClassifierCV around {type(estimator).__name__}; the fast path "
                "knows an RBF SVC and a Nystroem(rbf) + LinearSVC pipeline"
            )
        self.centre_norms = (self.centres * self.centres).sum(dim=1)
        self.centres_t = self.centres.T.contiguous()

    def decision(self, x: Any) -> Any:
        distance = (
            (x * x).sum(dim=1, keepdim=True) + self.centre_norms - 2.0 * (x @ self.centres_t)
        ).clamp_min(0.0)
        return (-self.gamma * distance).exp() @ self.weights + self.intercept

    def log_odds(self, x: Any, has_nan: bool = False) -> Any:
        return -(self.a * self.decision(x) + self.b)


def _is_nystroem_linear(pipeline: Any) -> bool:
    from sklearn.kernel_approximation import Nystroem
    from sklearn.svm import LinearSVC

    steps = [step for _, step in pipeline.steps]
    return (
        len(steps) == 2
        and isinstance(steps[0], Nystroem)
        and steps[0].kernel == "rbf"
        and not steps[0].kernel_params
        and isinstance(steps[1], LinearSVC)
    )


class _MLP(_Differentiable):
    """TorchMLPClassifier's network, copied to ``device`` in float64."""

    kind = "mlp"
    float32_inputs = True  # TorchMLPClassifier feeds the network float32 inputs

    def __init__(self, model: Any, device: str):
        import copy

        import torch

        if len(model.classes_) != 2:
            raise UnsupportedModel("a TorchMLPClassifier that is not binary")
        self.net = copy.deepcopy(model.net_).to(device=device, dtype=torch.float64).eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    def log_odds(self, x: Any, has_nan: bool = False) -> Any:
        return self.net(x).squeeze(1)

    def probability(self, x: Any, has_nan: bool) -> Any:
        import torch

        return torch.sigmoid(self.log_odds(x.to(torch.float32).to(torch.float64)))


class _Logistic(_Differentiable):
    """A binary LogisticRegression (any penalty and solver): log-odds ``x @ coef + intercept``.

    scikit-learn's binary ``predict_proba`` is the sigmoid of ``decision_function``
    (``_predict_proba_lr``), whatever penalty and solver fitted the coefficients.
    """

    kind = "logreg"

    def __init__(self, model: Any, device: str):
        import torch

        if len(model.classes_) != 2:
            raise UnsupportedModel(
                f"a LogisticRegression with {len(model.classes_)} classes; the fast path "
                "knows binary ones"
            )
        # scikit-learn < 1.8 could fit a binary model as a two-class softmax
        # (multi_class="multinomial"), whose probability is not the sigmoid used here.
        if getattr(model, "multi_class", None) == "multinomial":
            raise UnsupportedModel("a multinomial LogisticRegression; the fast path knows binary")
        coef = np.asarray(model.coef_, dtype=np.float64)
        if coef.shape[0] != 1:
            raise UnsupportedModel(f"a LogisticRegression with coef_ of shape {coef.shape}")
        self.coef = torch.as_tensor(coef[0], device=device)
        self.intercept = float(np.asarray(model.intercept_, dtype=np.float64).ravel()[0])

    def log_odds(self, x: Any, has_nan: bool = False) -> Any:
        return x @ self.coef + self.intercept

    def attributions(self, x: Any, has_nan: bool) -> tuple[Any, Any]:
        # What gradient x input gives for a linear function, without autograd: each column's
        # coefficient times its value, and the intercept, the log-odds at the zero baseline.
        return x * self.coef, x.new_full((x.shape[0],), self.intercept)


def _compile_classifier(model: Any, device: str) -> Any:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    from clinml.training.mlp import TorchMLPClassifier

    if isinstance(model, CalibratedClassifierCV):
        return _CalibratedSVM(model, device)
    if isinstance(model, RandomForestClassifier):
        return _Forest(model, device)
    if isinstance(model, HistGradientBoostingClassifier):
        return _Boosting(model, device)
    if isinstance(model, TorchMLPClassifier):
        return _MLP(model, device)
    if isinstance(model, LogisticRegression):
        return _Logistic(model, device)
    raise UnsupportedModel(
        f"no fast path for a {type(model).__module__}.{type(model).__name__} classifier; "
        "it is served through the scikit-learn pipeline"
    )


# --------------------------------------------------------------------------- public API


class CompiledModel:
    """A fitted clinml pipeline compiled for serving (see the module docstring).

    Attributes:
        kind: ``"svm_rbf"``, ``"svm_nystroem"``, ``"rf"``, ``"gbm"``, ``"mlp"`` or
            ``"logreg"``.
        device: ``"cpu"`` or ``"cuda"``.
        features: the input columns, in the order the pipeline was fitted with.
        encoded_features: the preprocessed columns (``get_feature_names_out`` order).
        explain_method: one line saying how :meth:`explain` computes contributions.
        odds_correction: the prior correction's odds factor, or ``None``.
    """

    def __init__(self, encoder: _Encoder, scorer: Any, odds_correction: float | None, device: str):
        import torch

        self._encoder = encoder
        self._scorer = scorer
        self.kind: str = scorer.kind
        self.device = device
        self.features = list(encoder.features)
        self.encoded_features = list(encoder.encoded_names)
        self.odds_correction = odds_correction
        self.explain_method = EXPLAIN_METHODS[self.kind] + (
            PRIOR_NOTES.get(self.kind, PRIOR_NOTE) if odds_correction is not None else ""
        )
        # encoded column -> input feature, to sum contributions back per feature
        self._owner = np.zeros((encoder.width, len(self.features)), dtype=np.float64)
        self._owner[np.arange(encoder.width), encoder.owner] = 1.0
        self._torch = torch
        trees = getattr(scorer, "trees", None)
        self._numpy: Callable[[np.ndarray, bool], np.ndarray] | None = (
            scorer.probability_numpy if trees is not None and trees.tables is not None else None
        )

    def __repr__(self) -> str:
        return (
            f"CompiledModel(kind={self.kind!r}, device={self.device!r}, "
            f"features={len(self.features)}, encoded={len(self.encoded_features)})"
        )

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Preprocess a DataFrame with (at least) the ``features`` columns.

        Returns:
            float64 array (rows, encoded columns), equal to ``pipeline[:-1].transform``.

        Raises:
            ValueError: a feature the model does not impute is missing.
        """
        return self._encoder.encode(frame)

    def encode_records(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
        """Preprocess records given as ``{feature: value}`` (``None`` for not measured).

        Same result as :meth:`encode` on the equivalent DataFrame, without building one.
        """
        return self._encoder.encode_records(records)

    def encode_columns(self, columns: Mapping[str, Any]) -> np.ndarray:
        """Preprocess columns given as ``{feature: values}`` (a list or an array per
        feature, every one the same length; ``None`` or NaN for not measured).

        Same result, bit for bit, as :meth:`encode_records` on the same rows.
        """
        return self._encoder.encode_columns(columns)

    def _array(self, x: np.ndarray) -> np.ndarray:
        array = np.asarray(x, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self._encoder.width:
            raise ValueError(
                f"x has shape {array.shape}; expected (rows, {self._encoder.width}) from encode"
            )
        return array

    def _tensor(self, x: np.ndarray) -> tuple[Any, bool]:
        array = self._array(x)
        has_nan = bool(np.isnan(array).any())
        tensor = self._torch.from_numpy(np.ascontiguousarray(array))
        return tensor.to(self.device, non_blocking=False), has_nan

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Positive-class probability for encoded rows, float64 of shape (rows,)."""
        if NUMPY_TREES and self._numpy is not None:
            array = self._array(x)
            has_nan = bool(np.isnan(array).any())
            parts = [
                self._numpy(array[start : start + CHUNK_ROWS], has_nan)
                for start in range(0, len(array), CHUNK_ROWS)
            ] or [np.zeros(0)]
            return self._corrected_probability(np.concatenate(parts))
        torch = self._torch
        tensor, has_nan = self._tensor(x)
        with torch.inference_mode():
            if len(tensor) <= CHUNK_ROWS:
                return self._probability(tensor, has_nan).cpu().numpy()
            parts = [
                self._probability(tensor[start : start + CHUNK_ROWS], has_nan).cpu().numpy()
                for start in range(0, len(tensor), CHUNK_ROWS)
            ]
        return np.concatenate(parts)

    def _probability(self, x: Any, has_nan: bool) -> Any:
        return self._corrected_probability(self._scorer.probability(x, has_nan))

    def _corrected_probability(self, weighted: Any) -> Any:
        if self.odds_correction is None:
            return weighted
        # PriorCorrected.predict_proba, operation for operation.
        corrected = weighted * self.odds_correction
        return corrected / (corrected + (1.0 - weighted))

    def attributions(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Signed contribution of every input feature, and the bias, per row.

        Returns:
            ``(contributions, bias)``: arrays of shape (rows, features) in ``features``
            order and (rows,). For ``rf`` bias + contributions = the probability, for
            ``gbm`` and ``logreg`` = the log-odds (all exact). For SVMs and the MLP the
            bias is the log-odds at the zero baseline; gradient x input is a first-order
            estimate and does not sum to the output.
        """
        torch = self._torch
        tensor, has_nan = self._tensor(x)
        encoded_parts, bias_parts = [], []
        # no_grad rather than inference_mode: the gradient methods switch autograd back on.
        with torch.no_grad():
            for start in range(0, max(len(tensor), 1), CHUNK_ROWS):
                chunk = tensor[start : start + CHUNK_ROWS]
                encoded, bias = self._scorer.attributions(chunk, has_nan)
                if self.odds_correction is not None:
                    encoded, bias = self._corrected(chunk, has_nan, encoded, bias)
                encoded_parts.append(encoded.cpu().numpy())
                bias_parts.append(bias.cpu().numpy())
        contributions = np.concatenate(encoded_parts) @ self._owner
        return contributions, np.concatenate(bias_parts).astype(np.float64)

    def _corrected(self, x: Any, has_nan: bool, encoded: Any, bias: Any) -> tuple[Any, Any]:
        """Move attributions to the prior-corrected output."""
        c = self.odds_correction
        if self.kind != "rf":
            # log-odds: the correction adds log(c) to every row, a constant.
            return encoded, bias + math.log(c)

        # Probability: the correction is monotone, so the path contributions are scaled
        # by one positive factor per row, keeping signs and shares and making
        # bias + contributions equal the corrected probability again.
        def correct(p: Any) -> Any:
            return p * c / (p * c + (1.0 - p))

        weighted = bias + encoded.sum(dim=1)
        corrected_bias = correct(bias)
        change = weighted - bias
        factor = (correct(weighted) - corrected_bias) / change.where(change != 0, 1.0)
        return encoded * factor.unsqueeze(1), corrected_bias

    def explain(self, x: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per row, the ``top_k`` input features by |contribution|, largest first.

        One-hot and missing-indicator columns count towards the feature they encode.
        See ``explain_method`` for the method and its scale.
        """
        contributions, _ = self.attributions(x)
        k = max(0, min(top_k, len(self.features)))
        order = np.argsort(-np.abs(contributions), axis=1, kind="stable")[:, :k]
        return [
            [(self.features[j], float(row[j])) for j in ranks]
            for row, ranks in zip(contributions, order, strict=True)
        ]

    def warm_up(self) -> None:
        """One prediction and one explanation, so the first request pays no set-up cost."""
        zeros = np.zeros((1, self._encoder.width))
        self.predict_proba(zeros)
        self.attributions(zeros)


def compile_model(pipeline: Any, device: str = "auto") -> CompiledModel:
    """Compile a fitted clinml pipeline (ColumnTransformer + classifier) for serving.

    Args:
        pipeline: a fitted ``Pipeline([("preprocess", ColumnTransformer), ("model", ...)])``.
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda"``.

    Returns:
        The compiled model; its probabilities match ``pipeline.predict_proba(...)[:, 1]``.

    Raises:
        UnsupportedModel: a step has no fast path (serve the pipeline itself).
        ClinmlError: ``device="cuda"`` was asked for but no GPU is visible.
    """
    import torch
    from sklearn.pipeline import Pipeline

    from clinml.training.candidates import PriorCorrected

    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        raise UnsupportedModel(
            f"expected a fitted Pipeline of preprocessing and a classifier, got {pipeline!r:.80}"
        )
    resolved = _resolve_device(device, torch.cuda.is_available)
    encoder = _Encoder(pipeline[0])
    model = pipeline[-1]
    odds_correction = None
    if isinstance(model, PriorCorrected):
        odds_correction = float(model.odds_correction_)
        model = model.estimator_
    scorer = _compile_classifier(model, resolved)
    compiled = CompiledModel(encoder, scorer, odds_correction, resolved)
    log.info(
        "fast path compiled: %s%s on %s (%d features, %d encoded columns)",
        compiled.kind,
        " with prior correction" if odds_correction is not None else "",
        resolved,
        len(compiled.features),
        len(compiled.encoded_features),
    )
    return compiled


def _resolve_device(device: str, cuda_available: Callable[[], bool]) -> str:
    if device == "auto":
        if cuda_available():
            return "cuda"
        log.info("CUDA is not available; the fast path runs on the CPU")
        return "cpu"
    if device.startswith("cuda"):
        if not cuda_available():
            raise ClinmlError(
                f"device {device!r} was requested but CUDA is not available; "
                "use device='auto' or 'cpu'"
            )
        return device
    if device != "cpu":
        raise ClinmlError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'")
    return device
