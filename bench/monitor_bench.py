"""Monitor runtime for windows of 10 000, 100 000 and 1 000 000 logged predictions (issue 6).

Each size runs in its own process (so peak memory is that size's alone), in one run:

1. a window of readmission encounters, scored by the stand-in model of
   bench/monitor_evaluation.py, is written as prediction-log partitions (not timed);
2. timed: reading the window back (``read_predictions``), the drift verdict with every
   report written (features, quality, prediction drift, subgroups: ``drift.run``), and
   labelled performance with bootstrap CIs (``performance_by_window``, 500 resamples).

Reports wall time per stage, the time per row relative to the smallest window, and peak
resident memory; writes a section into docs/benchmarks.md. Run from the project root:

    .venv/bin/python bench/monitor_bench.py                 # a few minutes on 2 cores
    .venv/bin/python bench/monitor_bench.py --sizes 10000 100000

Nothing here is a test: timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- monitor-bench -->", "<!-- /monitor-bench -->"
SIZES = (10_000, 100_000, 1_000_000)


def one(size: int) -> dict[str, object]:
    import numpy as np
    import pandas as pd

    from bench import monitor_evaluation as evaluation
    from clinml.features.datasets import readmission
    from clinml.monitoring import drift, performance
    from clinml.predictionlog import read_predictions
    from clinml.spec import load_spec

    spec = load_spec("readmission")
    reference = evaluation.fit_reference(spec)
    cohort = readmission.load(
        seed=7, now=evaluation.NOW, n_patients=max(2_000, size // 3), months=24
    )
    rows = cohort.sample(n=size, replace=len(cohort) < size, random_state=7)
    rows = rows.assign(outcome=(rows[spec.label.column] == spec.label.positive_class) * 1)
    probability = reference.model.predict_proba(evaluation._frame(rows, spec))[:, 1]
    since = evaluation.NOW - timedelta(days=7)
    offsets = np.random.default_rng(7).uniform(0, 7 * 86400, size)
    window = rows[spec.feature_names].assign(
        time=pd.Timestamp(since) + pd.to_timedelta(offsets, unit="s"),
        request_id=[f"r{i}" for i in range(size)],
        model_version="1",
        patient=rows["patient_id"].astype(str).to_numpy(),
        probability=probability,
        label=np.where(probability >= reference.threshold, "yes", "no"),
    )
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "predictions"
        for day, part in window.groupby(window["time"].dt.date):
            (log_dir / f"date={day}").mkdir(parents=True)
            part.to_parquet(log_dir / f"date={day}" / "part-0.parquet", index=False)
        started = time.perf_counter()
        current = read_predictions(log_dir, since, evaluation.NOW)
        timings["read"] = time.perf_counter() - started
        started = time.perf_counter()
        verdict = drift.run(
            spec,
            reference.features,
            current,
            Path(tmp) / "report",
            prediction_reference=reference.held_out,
            window=(since, evaluation.NOW),
        )
        timings["drift"] = time.perf_counter() - started
        labelled = current.assign(outcome=rows["outcome"].to_numpy()[: len(current)])
        started = time.perf_counter()
        performance.performance_by_window(
            spec, labelled, timedelta(days=7), since, evaluation.NOW, n_boot=500
        )
        timings["performance"] = time.perf_counter() - started
        html_mib = sum(f.stat().st_size for f in (Path(tmp) / "report").glob("*.html")) / 2**20
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": len(current),
        **timings,
        "total": sum(timings.values()),
        "peak_mib": peak_mib,
        "html_mib": html_mib,
        "subgroups": len(verdict.subgroups),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    results = []
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(size)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        ).stdout  # fmt: skip
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["total"] / results[0]["rows"]
    lines = [
        START,
        "## Monitor runtime (issue 6)",
        "",
        "Reproduce: `.venv/bin/python bench/monitor_bench.py`. One window of logged "
        "readmission predictions per size, each size in its own process, on this machine's "
        "2 cores: read from the prediction log's parquet partitions, the drift verdict with "
        "every report written (22 features, data quality, prediction drift, subgroups by "
        "sex and site), and labelled performance with 500 bootstrap resamples.",
        "",
        "| rows | read s | drift s | performance s | total s | time per row vs. smallest "
        "| peak RSS MiB | HTML MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_row = r["total"] / r["rows"] / base
        lines.append(
            f"| {r['rows']:,} | {r['read']:.1f} | {r['drift']:.1f} | {r['performance']:.1f} "
            f"| {r['total']:.1f} | {per_row:.2f}× | {r['peak_mib']:.0f} | {r['html_mib']:.1f} |"
        )
    lines.append(END)
    write_section(DOC, START, END, "\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
