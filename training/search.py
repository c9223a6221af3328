"""Hyperparameter search with patient-grouped cross-validation, under the spec's budget.

For each candidate the search samples up to ``training.search.n_iter`` configurations
from its space (the candidate's own ``params`` first), scores each by stratified,
patient-grouped K-fold cross-validation, and keeps the best. The budget is bounded two
ways: the search runs on a patient-grouped sample of at most ``search.max_rows`` training
rows (so its cost does not grow with the cohort; only the final refit does), and an
optional ``search.time_budget_s`` stops sampling early.

A configuration is chosen by its cross-validated **log loss**, a proper scoring rule: it
rewards risks that are both well ranked and right in size, so the search cannot buy a
sliver of AUROC with probabilities squashed towards the mean (an over-regularised
logistic regression ranks almost as well as a good one and is badly calibrated). The
score reported and used to compare candidates (``best_score``) is the spec's primary
metric of that configuration when it ranks probabilities (``roc_auc``,
``average_precision``); for a threshold metric it is ``roc_auc``, because a threshold
metric depends on a threshold the search has not chosen yet. The winning
configuration's out-of-fold probabilities are kept: the operating threshold is chosen
on them, so the test split is never used to pick anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from clinml.errors import SpecError
from clinml.spec import CandidateSpec, UseCaseSpec
from training.candidates import SEARCH_SPACES, build_pipeline, fit
from training.metrics import point_metrics

RANKING_METRICS = ("roc_auc", "average_precision")


@dataclass(frozen=True)
class Trial:
    params: dict[str, Any]
    score: float
    fold_scores: list[float]
    seconds: float
    log_loss: float = math.nan


@dataclass(frozen=True)
class SearchResult:
    """The outcome of one candidate's search."""

    candidate: str
    scoring: str
    best_params: dict[str, Any]
    best_score: float
    trials: list[Trial]
    search_rows: int
    seconds: float
    oof_outcome: np.ndarray = field(repr=False)
    oof_probability: np.ndarray = field(repr=False)
    # The patient of each out-of-fold row: the same rows, in the same order, for every
    # candidate of one training run (one sample and one set of folds), so candidates
    # can be compared pairwise on them.
    oof_patients: np.ndarray = field(repr=False, default_factory=lambda: np.array([]))
    # The event time of each out-of-fold row (when the search was given them).
    oof_times: np.ndarray | None = field(repr=False, default=None)

    def trials_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {
                    "trial": i,
                    "params": repr(t.params),
                    f"cv_{self.scoring}": t.score,
                    "cv_log_loss": t.log_loss,
                    "fold_scores": repr([round(s, 4) for s in t.fold_scores]),
                    "seconds": round(t.seconds, 2),
                    "selected": t.params == self.best_params,
                }
                for i, t in enumerate(self.trials)
            ]
        )


def scoring_metric(spec: UseCaseSpec) -> str:
    return spec.primary_metric if spec.primary_metric in RANKING_METRICS else "roc_auc"


def configurations(
    name: str, params: dict[str, Any], space: dict[str, list[Any]] | None, n_iter: int, seed: int
) -> list[dict[str, Any]]:
    """The candidate's own params, then up to ``n_iter - 1`` distinct sampled variants."""
    from sklearn.model_selection import ParameterSampler

    space = SEARCH_SPACES.get(name, {}) if space is None else space
    for key, values in space.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"training.candidates.{name}.search.{key}: give a non-empty list")
    configs = [dict(params)]
    if space and n_iter > 1:
        size = int(np.prod([len(v) for v in space.values()]))
        sampler = ParameterSampler(space, n_iter=min(n_iter - 1, size), random_state=seed)
        for sampled in sampler:
            config = {**params, **sampled}
            if config not in configs:
                configs.append(config)
    return configs[:n_iter]


def grouped_sample(groups: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Row indices of whole patients, shuffled, until ``max_rows`` rows (all if fewer)."""
    if len(groups) <= max_rows:
        return np.arange(len(groups))
    codes, _ = pd.factorize(groups)
    order = np.random.default_rng(seed).permutation(codes.max() + 1)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    row_rank = rank[codes]
    sizes = np.bincount(row_rank, minlength=len(order))
    keep_patients = int(np.searchsorted(np.cumsum(sizes), max_rows, side="right"))
    return np.flatnonzero(row_rank < keep_patients)


def search(
    name: str,
    spec: UseCaseSpec,
    x: pd.DataFrame,
    y: np.ndarray,
    groups: np.ndarray,
    report: Callable[[str], None] = lambda _: None,
    times: np.ndarray | None = None,
) -> SearchResult:
    """Cross-validated search over one candidate's configurations.

    Args:
        name: the candidate.
        spec: the use-case spec (candidate params, search space, budget, seed).
        x: training features (the spec's feature columns).
        y: 0/1 outcomes.
        groups: the patient of each row; no patient is split across folds.
        report: receives one line per evaluated configuration.
        times: optional event time of each row, kept with the out-of-fold predictions.
    """
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.utils._param_validation import InvalidParameterError

    budget = spec.training.search
    seed = spec.training.seed
    # The reference model is searched even when the spec does not list it.
    candidate = spec.training.candidates.get(name, CandidateSpec())
    scoring = scoring_metric(spec)
    rows = grouped_sample(groups, budget.max_rows, seed)
    xs, ys, gs = x.iloc[rows], y[rows], groups[rows]
    n_folds = min(budget.cv_folds, int(np.bincount(ys).min()), len(np.unique(gs)))
    if n_folds < 2:
        raise SpecError("training: too few patients or positives for a cross-validated search")
    folds = list(
        StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(xs, ys, gs)
    )
    configs = configurations(name, candidate.params, candidate.search, budget.n_iter, seed)
    started = time.perf_counter()
    trials: list[Trial] = []
    best: tuple[float, float, dict[str, Any], np.ndarray] | None = None
    for i, config in enumerate(configs):
        if trials and budget.time_budget_s and time.perf_counter() - started > budget.time_budget_s:
            report(f"{name}: time budget reached after {len(trials)} of {len(configs)} configs")
            break
        trial_started = time.perf_counter()
        oof = np.empty(len(ys))
        scores = []
        for fit_rows, score_rows in folds:
            pipeline = build_pipeline(name, spec, config, seed, n_rows=len(fit_rows))
            try:
                fit(pipeline, xs.iloc[fit_rows], ys[fit_rows], gs[fit_rows])
            except (InvalidParameterError, TypeError) as exc:
                raise SpecError(f"training.candidates.{name}: {config}: {exc}") from None
            oof[score_rows] = pipeline.predict_proba(xs.iloc[score_rows])[:, 1]
            scores.append(point_metrics(ys[score_rows], oof[score_rows], 0.5)[scoring])
        score = float(np.mean(scores))
        loss = log_loss(ys, oof)
        trials.append(Trial(config, score, scores, time.perf_counter() - trial_started, loss))
        report(
            f"{name} [{i + 1}/{len(configs)}] cv log loss={loss:.4f} {scoring}={score:.4f} "
            f"({time.perf_counter() - trial_started:.1f}s) {_short(config)}"
        )
        if best is None or loss < best[0]:
            best = (loss, score, config, oof)
    assert best is not None
    return SearchResult(
        candidate=name,
        scoring=scoring,
        best_params=best[2],
        best_score=best[1],
        trials=trials,
        search_rows=len(rows),
        seconds=time.perf_counter() - started,
        oof_outcome=ys,
        oof_probability=best[3],
        oof_patients=gs,
        oof_times=None if times is None else np.asarray(times)[rows],
    )


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-15, 1 - 1e-15]."""
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items()) or "defaults"
