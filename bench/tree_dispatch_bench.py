"""Boosted trees on the CPU: the fast path's level-by-level walk vs. scikit-learn's predictor.

The compiled fast path (``clinml.serving.fastpath``) walks every tree of an ensemble one
level per step for all rows at once in numpy. Its cost per row does not fall with the
batch: every row takes the deepest tree's number of steps in every tree. scikit-learn's
own predictor for ``HistGradientBoostingClassifier`` is compiled code called once per
tree; it costs a fixed few µs per tree plus little per row. It takes the rows' values, or
their bins (mapped once by the model's bin mapper; the fast path's choice, same log-odds
bit for bit); both are timed. ``NATIVE_TREE_ROWS`` in
``serving/fastpath.py`` is where the fast path switches from the one to the other (issue 22:
at 1,000 records per request the walk was most of the request's time).

This measures both on one core, in this process, for a model with the readmission spec's
``gbm`` hyperparameters (300 trees of at most 31 leaves) fitted on generated rows with the
spec's number of input features as columns and 5% missing values; each batch size is timed
alternately, ``--rounds`` rounds of ``--repeats`` calls, median per round, median over
rounds. Both must give the same probabilities (checked first, to 1e-12).

    .venv/bin/python bench/tree_dispatch_bench.py            # ~1 minute
    .venv/bin/python bench/tree_dispatch_bench.py --no-doc   # print only

Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import pinned  # noqa: E402
from bench.serving_bench import machine  # noqa: E402
from clinml.serving import fastpath  # noqa: E402
from clinml.spec import load_spec  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- tree-dispatch-bench -->", "<!-- /tree-dispatch-bench -->"
SIZES = (1, 16, 32, 64, 100, 300, 1000)


def _model(width: int, params: dict) -> tuple[fastpath._Boosting, Any]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, width))
    y = (x[:, :5].sum(axis=1) + rng.normal(size=len(x)) > 0).astype(int)
    x[rng.random(x.shape) < 0.05] = np.nan
    model = HistGradientBoostingClassifier(early_stopping=False, random_state=0, **params)
    model.fit(x, y)
    return fastpath._Boosting(model, "cpu"), model


def _seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rounds: int, repeats: int) -> dict:
    spec = load_spec("readmission")
    params = dict(spec.training.candidates["gbm"].params)
    width = len(spec.features)
    scorer, model = _model(width, params)
    native = scorer._native
    values = scorer._native_predictor(model, binned=False)
    if native is None or values is None:
        raise SystemExit(
            "scikit-learn's predictor is not usable with this version; nothing to compare"
        )
    rows = np.random.default_rng(1).normal(size=(max(SIZES), width))
    rows[np.random.default_rng(2).random(rows.shape) < 0.05] = np.nan

    def walk(x: np.ndarray) -> np.ndarray:
        return scorer.baseline + scorer.trees.leaf_values_numpy(x, True).sum(axis=1)

    np.testing.assert_allclose(walk(rows), native(rows), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(values(rows), native(rows))
    calls = (("walk", walk), ("values", values), ("native", native))
    results: dict[int, dict[str, list[float]]] = {n: {name: [] for name, _ in calls} for n in SIZES}
    with pinned({0}):
        for _ in range(rounds):
            for n in SIZES:
                x = rows[:n]
                for name, call in calls:
                    results[n][name].append(_seconds(lambda c=call, x=x: c(x), repeats))
    return {
        "params": params,
        "width": width,
        "depth": scorer.trees.depth,
        "trees": scorer.trees.n_trees,
        "medians": {
            n: {name: statistics.median(v) for name, v in by.items()} for n, by in results.items()
        },
    }


def section(run: dict, command: str) -> str:
    lines = []
    for n, by in run["medians"].items():
        walk, values, native = by["walk"], by["values"], by["native"]
        used = "bins" if n >= fastpath.NATIVE_TREE_ROWS else "walk"
        lines.append(
            f"| {n:,} | {walk * 1e3:.3f} ({walk / n * 1e6:.1f}) | "
            f"{values * 1e3:.3f} ({values / n * 1e6:.1f}) | "
            f"{native * 1e3:.3f} ({native / n * 1e6:.1f}) | {walk / native:.2f} | "
            f"{values / native:.2f} | {used} |"
        )
    return "\n".join(
        [
            START,
            "## Boosted trees: the level walk vs. scikit-learn's predictor",
            "",
            f"Machine: {machine()}. Run {datetime.now(UTC):%Y-%m-%d}, one core.",
            "",
            f"Reproduce: `{command}`",
            "",
            f"A `HistGradientBoostingClassifier` with the readmission spec's gbm parameters "
            f"({run['params']}; {run['trees']} trees, deepest {run['depth']} levels) fitted on "
            f"generated rows, {run['width']} columns, 5% missing. ms per call (µs per row), "
            "median over rounds; all gave the same log-odds to 1e-12 first (scikit-learn on "
            "values and on bins: the same bit for bit). The last column is what the fast "
            f"path uses (`NATIVE_TREE_ROWS = {fastpath.NATIVE_TREE_ROWS}`).",
            "",
            "| rows | walk, ms (µs/row) | scikit-learn on values, ms (µs/row) "
            "| scikit-learn on bins, ms (µs/row) | walk ÷ bins | values ÷ bins | used |",
            "|---:|---:|---:|---:|---:|---:|---|",
            *lines,
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = (
        f".venv/bin/python bench/tree_dispatch_bench.py --rounds {args.rounds} "
        f"--repeats {args.repeats}"
    )
    text = section(measure(args.rounds, args.repeats), command)
    if not args.no_doc:
        write_section(DOC, START, END, text)
    print(text)


if __name__ == "__main__":
    main()
