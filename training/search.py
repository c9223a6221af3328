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

CPU use: with ``threads`` above 1, the (configuration, fold) fits run in that many joblib
worker processes (loky), each fit on one thread (OpenMP, BLAS, torch, joblib), so the
search never starts more threads than it was given and no thread pool is nested inside
another. Independent fits in separate processes share no barrier, so they keep their
speed when other work takes CPUs from them; one fit spread over OpenMP threads does not
(docs/training.md, "CPU use"). With a Ray cluster (``cluster``), the fits are Ray tasks
instead, all of a candidate's at once, the search sample put in the object store once
(:mod:`clinml.training.distributed`).

A fit that raises (other than a spec error, which stops training) fails its
configuration: the trial is recorded with the exception's type (``failed``) and no score,
and the search goes on with the others; only when every configuration fails does the
search stop. In-process and on Ray alike.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from clinml.cpus import limit_threads
from clinml.errors import ClinmlError, SpecError
from clinml.spec import CandidateSpec, UseCaseSpec
from clinml.training.candidates import SEARCH_SPACES, build_pipeline, fit
from clinml.training.distributed import Failed, RayCluster
from clinml.training.metrics import point_metrics

RANKING_METRICS = ("roc_auc", "average_precision")


@dataclass(frozen=True)
class Trial:
    params: dict[str, Any]
    score: float
    fold_scores: list[float]
    # Fit and predict seconds of its folds, summed (the folds may run side by side).
    seconds: float
    log_loss: float = math.nan
    # The type of the exception a fold's fit raised; None when every fold was fitted.
    failed: str | None = None


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
                    "failed": t.failed or "",
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
    threads: int = 1,
    cluster: RayCluster | None = None,
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
        threads: CPUs to use: worker processes, one thread each (1: every fit in this
            process, on one thread; 0: in this process, with each library's own thread
            defaults, as before issue 20). Unused with ``cluster``.
        cluster: run the fits as tasks on this Ray cluster instead.

    Raises:
        ClinmlError: every configuration failed.
    """
    from sklearn.model_selection import StratifiedGroupKFold

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
    # Configurations fitted per round: one at a time in this process (progress per
    # configuration); in workers, all at once, or under a time budget enough to keep
    # every worker busy, the budget being checked between rounds.
    workers = cluster.cpus if cluster is not None else threads
    if workers <= 1:
        per_round = 1
    elif budget.time_budget_s:
        per_round = -(-workers // len(folds))
    else:
        per_round = len(configs)
    started = time.perf_counter()
    trials: list[Trial] = []
    best: tuple[float, float, dict[str, Any], np.ndarray] | None = None
    for first in range(0, len(configs), per_round):
        if trials and budget.time_budget_s and time.perf_counter() - started > budget.time_budget_s:
            report(f"{name}: time budget reached after {len(trials)} of {len(configs)} configs")
            break
        batch = configs[first : first + per_round]
        fitted = _fit_folds(name, spec, batch, folds, xs, ys, gs, threads, cluster)
        for i, (config, config_folds) in enumerate(zip(batch, fitted, strict=True), start=first):
            failed = next((f.kind for f in config_folds if isinstance(f, Failed)), None)
            if failed is not None:
                trials.append(Trial(config, math.nan, [], 0.0, math.nan, failed))
                report(f"{name} [{i + 1}/{len(configs)}] failed ({failed}) {_short(config)}")
                continue
            oof = np.empty(len(ys))
            scores = []
            seconds = 0.0
            for (_, score_rows), (probability, fold_seconds) in zip(
                folds, config_folds, strict=True
            ):
                oof[score_rows] = probability
                scores.append(point_metrics(ys[score_rows], probability, 0.5)[scoring])
                seconds += fold_seconds
            score = float(np.mean(scores))
            loss = log_loss(ys, oof)
            trials.append(Trial(config, score, scores, seconds, loss))
            report(
                f"{name} [{i + 1}/{len(configs)}] cv log loss={loss:.4f} {scoring}={score:.4f} "
                f"({seconds:.1f}s) {_short(config)}"
            )
            if best is None or loss < best[0]:
                best = (loss, score, config, oof)
    if best is None:
        kinds = sorted({t.failed for t in trials if t.failed})
        raise ClinmlError(
            f"training.candidates.{name}: every configuration searched failed "
            f"({', '.join(kinds)}); the training log has each one"
        )
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


def _fit_folds(
    name: str,
    spec: UseCaseSpec,
    configs: list[dict[str, Any]],
    folds: list[tuple[np.ndarray, np.ndarray]],
    x: pd.DataFrame,
    y: np.ndarray,
    groups: np.ndarray,
    threads: int,
    cluster: RayCluster | None = None,
) -> list[list[tuple[np.ndarray, float] | Failed]]:
    """Fit every configuration on every fold: per configuration, per fold, the held-out
    rows' probabilities and the seconds the fit took, or :class:`Failed`.

    With ``threads`` above 1 the fits run in ``threads`` loky worker processes (fewer when
    there are fewer fits), one thread each; ``inner_max_num_threads`` makes loky start its
    workers with ``OMP_NUM_THREADS=1`` and its kin, before any library reads them. With
    ``cluster``, they are Ray tasks sharing ``x``, ``y`` and ``groups`` through the
    object store, each told its rows.
    """
    # torch is imported by the first fit of a worker when any candidate needs it: loky
    # takes a worker's memory after its first task as the reference, and restarts a
    # worker that grows by 300 MB beyond it (importing torch later would look like that).
    torch = "mlp" in spec.training.candidates
    fits = [
        (
            f"training.candidates.{name}: {config}",
            build_pipeline(name, spec, config, spec.training.seed, n_rows=len(fit_rows)),
            fit_rows,
            score_rows,
        )
        for config in configs
        for fit_rows, score_rows in folds
    ]
    if cluster is not None:
        results = cluster.map(_fit_fold_rows, (x, y, groups), fits, torch=torch)
    else:
        tasks = [
            (what, pipeline, x.iloc[fit_rows], y[fit_rows], groups[fit_rows], x.iloc[score_rows])
            for what, pipeline, fit_rows, score_rows in fits
        ]
        if threads <= 1 or len(tasks) == 1:
            inner = 0 if threads == 0 else 1
            results = [_fit_fold(*task, threads=inner, torch=torch) for task in tasks]
        else:
            from joblib import Parallel, delayed, parallel_config

            workers = min(threads, len(tasks))
            with parallel_config(backend="loky", n_jobs=workers, inner_max_num_threads=1):
                results = Parallel()(
                    delayed(_fit_fold)(*task, threads=1, torch=torch) for task in tasks
                )
    return [results[i : i + len(folds)] for i in range(0, len(results), len(folds))]


def _fit_fold_rows(
    shared: tuple[pd.DataFrame, np.ndarray, np.ndarray],
    what: str,
    pipeline: Any,
    fit_rows: np.ndarray,
    score_rows: np.ndarray,
) -> tuple[np.ndarray, float] | Failed:
    """:func:`_fit_fold` of one fold given by its rows of the shared search sample (a Ray
    task; its threads are set by the task)."""
    x, y, groups = shared
    fold = (x.iloc[fit_rows], y[fit_rows], groups[fit_rows], x.iloc[score_rows])
    return _fit_fold(what, pipeline, *fold, threads=-1)


def _fit_fold(
    what: str,
    pipeline: Any,
    x_fit: pd.DataFrame,
    y_fit: np.ndarray,
    groups_fit: np.ndarray,
    x_score: pd.DataFrame,
    threads: int = 1,
    torch: bool = False,
) -> tuple[np.ndarray, float] | Failed:
    """Fit one unfitted pipeline on one fold's rows: the held-out rows' probabilities and
    the seconds it took, on ``threads`` threads (-1: as the caller set them), or
    :class:`Failed` when the fit raised. Runs in a search worker, a Ray task or the
    training process; ``what`` names the candidate and configuration in a spec error."""
    started = time.perf_counter()
    with limit_threads(threads, torch=torch) if threads >= 0 else contextlib.nullcontext():
        try:
            try:
                fit(pipeline, x_fit, y_fit, groups_fit)
            except TypeError as exc:  # scikit-learn's InvalidParameterError is a TypeError
                raise SpecError(f"{what}: {exc}") from None
            probability = pipeline.predict_proba(x_score)[:, 1]
        except ClinmlError:
            raise
        except Exception as exc:  # this configuration failed; the search goes on
            return Failed(type(exc).__name__)
    return probability, time.perf_counter() - started


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-15, 1 - 1e-15]."""
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items()) or "defaults"
