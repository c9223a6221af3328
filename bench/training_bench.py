"""Training benchmark on the readmission cohort (issue 4).

For cohorts of about 10 000, 100 000 and 1 000 000 labelled encounters, each in its own
process (so peak memory is that size's alone), in one run on this machine:

1. generate the cohort (not counted in the training time);
2. the full training stage on the in-memory frame, with the readmission spec's own
   budget: the patient-grouped, cross-validated search of all four candidates, the
   refit of each winner on every training row, the clinical evaluation (bootstrap CIs,
   subgroups, temporal holdout), and the MLflow logging and registration (a temporary
   SQLite tracker).

The Feast point-in-time join that feeds training in the product is not included: it is
measured by bench/features_bench.py. Reports wall time per stage and peak resident memory
of the process, writes a section into docs/benchmarks.md (between the training-bench
markers) and prints it. Run from the project root:

    .venv/bin/python bench/training_bench.py                 # about 30 minutes on 2 cores
    .venv/bin/python bench/training_bench.py --sizes 10000 100000

Nothing here is a test: timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.child import result_of  # noqa: E402
from bench.docsection import write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- training-bench:start -->", "<!-- training-bench:end -->"
COHORT_END = datetime(2026, 1, 1, tzinfo=UTC)
# Labelled encounters per generated patient: 2.09 measured at 1 478 patients since issue 17
# changed the generator (3.5 before). Fewer, so the sample can take every size asked for.
ENCOUNTERS_PER_PATIENT = 1.8
SIZES = (10_000, 100_000, 1_000_000)


def cohort(size: int) -> tuple[Any, Any]:  # (UseCaseSpec, DataFrame), imported lazily
    """The readmission spec, and about ``size`` labelled encounters of its generator
    (whole patients, sampled with a fixed seed)."""
    import numpy as np

    from clinml.features.datasets import readmission
    from clinml.spec import load_spec
    from clinml.training.search import grouped_sample

    spec = load_spec(ROOT / "configs" / "readmission.yaml")
    frame = readmission.load(
        spec.source.seed, COHORT_END, n_patients=int(size / ENCOUNTERS_PER_PATIENT) + 50
    )
    frame = frame[frame[spec.label.column].notna()].reset_index(drop=True)
    keep = grouped_sample(frame[spec.entity.key].to_numpy(), size, seed=0)
    return spec, frame.iloc[np.sort(keep)].reset_index(drop=True)


def one(size: int) -> dict[str, object]:
    """Generate a cohort of about ``size`` labelled encounters and train on it."""
    from clinml.training.tracking import Tracker
    from clinml.training.train import fit_candidates, register

    started = time.perf_counter()
    spec, frame = cohort(size)
    generated = time.perf_counter() - started

    lines: list[str] = []
    started = time.perf_counter()
    fitted = fit_candidates(spec, frame, report=lines.append)
    fit_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", Path(tmp) / "artifacts", create=True)
        started = time.perf_counter()
        result = register(spec, fitted, tracker)
        register_seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "size": size,
        "rows": len(frame),
        "patients": int(frame[spec.entity.key].nunique()),
        "train_rows": len(fitted.split.train),
        "generate_s": generated,
        "fit_evaluate_s": fit_seconds,
        "register_s": register_seconds,
        "total_s": fit_seconds + register_seconds,
        "peak_rss_mib": peak_kib / 1024,
        "selected": result.selected.name,
        "test_roc_auc": fitted.selected.evaluation.metrics["roc_auc"],
        "candidates": {
            c.name: {
                "search_s": c.search.seconds,
                "search_rows": c.search.search_rows,
                "trials": len(c.search.trials),
                "refit_s": c.fit_seconds,
                "test_roc_auc": c.evaluation.metrics["roc_auc"],
                "variant": c.svm_variant,
            }
            for c in fitted.candidates
        },
    }


def _markdown(results: list[dict], started: datetime, command: str) -> str:
    spec_budget = "6 configurations x 3 patient-grouped folds per candidate, on <= 20 000 rows"
    lines = [
        START,
        "## Training: the full search on the readmission cohort",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on this machine ({os.cpu_count()} cores, "
        f"{platform.python_version()}), each size in its own process, one after another in "
        f"one run. Reproduce: `{command}`.",
        "",
        f"Budget (configs/readmission.yaml): {spec_budget}, then each candidate's best "
        "configuration refitted on every training row; 1 000-resample patient bootstrap, "
        "subgroups and a 3-month temporal holdout; MLflow logging and registration. "
        "Cohort generation and the Feast point-in-time join are not included "
        "(bench/features_bench.py measures the join).",
        "",
        "| encounters | patients | training rows | search + refit + evaluate | MLflow logging "
        "| total | peak RSS | selected (test AUROC) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['patients']:,} | {r['train_rows']:,} | "
            f"{r['fit_evaluate_s']:.0f} s | {r['register_s']:.0f} s | "
            f"**{r['total_s'] / 60:.1f} min** | {r['peak_rss_mib']:,.0f} MiB | "
            f"{r['selected']} ({r['test_roc_auc']:.3f}) |"
        )
    lines += ["", "Per candidate (search on the grouped sample; refit on all training rows):", ""]
    lines += [
        "| encounters | candidate | search rows | trials | search | refit | test AUROC |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, c in r["candidates"].items():
            label = f"{name} ({c['variant']})" if c["variant"] else name
            lines.append(
                f"| {r['rows']:,} | {label} | {c['search_rows']:,} | {c['trials']} | "
                f"{c['search_s']:.0f} s | {c['refit_s']:.1f} s | {c['test_roc_auc']:.3f} |"
            )
    by_size = {r["size"]: r for r in results}
    lines.append("")
    if 100_000 in by_size:
        minutes = by_size[100_000]["total_s"] / 60
        verdict = "meets" if minutes <= 10 else "misses"
        lines.append(
            f"Target: the 100 000-encounter search in at most 10 minutes: **{minutes:.1f} min, "
            f"{verdict} it**."
        )
    if 100_000 in by_size and 1_000_000 in by_size:
        ratio = by_size[1_000_000]["total_s"] / by_size[100_000]["total_s"]
        verdict = "meets" if ratio <= 12 else "misses"
        lines.append(
            f"Target: 100 000 -> 1 000 000 encounters costs at most 12x: **{ratio:.1f}x, "
            f"{verdict} it**. The search's cost is bounded by `search.max_rows`, so only the "
            "refits, predictions and bootstrap grow with the cohort."
        )
    largest = results[-1]
    name, worst = max(largest["candidates"].items(), key=lambda item: item[1]["refit_s"])
    lines.append(
        f"The largest single cost at {largest['rows']:,} encounters is the {name} refit: "
        f"{worst['refit_s']:.0f} s of {largest['fit_evaluate_s']:.0f} s"
        + (
            " (Nystroem features + LinearSVC, Platt-calibrated over 5 folds, so six linear "
            "fits on every training row)."
            if name == "svm"
            else "."
        )
    )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    started = datetime.now(UTC)
    results = []
    for size in args.sizes:
        print(f"training on ~{size:,} encounters ...", flush=True)
        result = result_of(__file__, "--one", str(size))
        print(f"  {result['total_s'] / 60:.1f} min, peak {result['peak_rss_mib']:,.0f} MiB")
        results.append(result)
    command = ".venv/bin/python bench/training_bench.py" + (
        "" if tuple(args.sizes) == SIZES else " --sizes " + " ".join(map(str, args.sizes))
    )
    section = _markdown(results, started, command)
    print(section)
    if not args.no_write:
        write_section(DOC, START, END, section)


if __name__ == "__main__":
    main()
