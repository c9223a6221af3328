"""Training under CPU contention (issue 20, item 9): quiet vs beside three busy processes.

Two trainings, each the full training function ``clinml train`` calls
(``clinml.training.train.fit_candidates``: the patient-grouped, cross-validated search of every
candidate and the logistic-regression reference, the refits, thresholds and the clinical
evaluation with its bootstrap), on the in-memory frame; the Feast join before it and the
MLflow logging after it are not included:

- ``flchain``: a frame the size and shape of the survival data set ``flchain`` (7 874
  patients, one row each, 7 features, about 28% events), *generated* here with a fixed
  seed (the real data set cannot be downloaded in CI). Its spec takes clinml's defaults:
  svm, rf, gbm and mlp with their built-in search spaces, 6 configurations x 3 folds.
- ``readmission``: configs/readmission.yaml as it ships, on the first ~10 000 labelled
  encounters of its seeded generator (the smallest size of bench/training_bench.py).

Each is run, in a fresh process, four ways, side by side in one run: before (
``CLINML_TRAIN_THREADS=0``: every library's own thread defaults, as before issue 20) and
after (the default: the CPUs the process is given), each quiet and beside three busy
processes (``while True: pass``, started by this script, so in its session). The ratio
busy / quiet is the number to read: the machine is shared, so absolute times move with
whatever else runs. A "before" run still training after ``--limit`` seconds is stopped
and reported as "> limit".

First, the issue's isolated measurement: three histogram-gradient-boosting fits on the
flchain frame's training rows, with the library's default OpenMP threads and with one
thread, quiet and busy.

Writes a section into docs/benchmarks.md (between the contention-bench markers) and
prints it. Run from the project root:

    .venv/bin/python bench/contention_bench.py       # about 15 minutes on 2 cores

Nothing here is a test: timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.child import result_of  # noqa: E402
from bench.docsection import write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- contention-bench:start -->", "<!-- contention-bench:end -->"
DATASETS = ("flchain", "readmission")
MODES = {"before": "0", "after": None}  # CLINML_TRAIN_THREADS for each
BUSY_PROCESSES = 3
TARGET_RATIO = 2.5
FLCHAIN_ROWS = 7_874
READMISSION_ROWS = 10_000
COHORT_END = datetime(2026, 1, 1, tzinfo=UTC)
BOOTSTRAP = 200  # resamples for the CIs: the same in every run, fewer than a spec's 1 000
# Configurations per candidate: 2 instead of the specs' 6 keeps eight trainings within
# 15 minutes on a shared 2-core machine (``--n-iter 6``: the specs' own budget).
N_ITER = 2
LIMIT_S = 120.0  # a "before" run still training after this is stopped
AFTER_LIMIT_S = 900.0  # a backstop only: an "after" run is meant to finish
HGB_FITS = 3
HGB_LIMIT_S = 60.0


def flchain_like(seed: int = 20):
    """A frame and spec the shape of ``flchain``: 7 874 patients, 7 features, ~28% died."""
    import numpy as np
    import pandas as pd

    from clinml.spec import UseCaseSpec

    rng = np.random.default_rng(seed)
    n = FLCHAIN_ROWS
    age = rng.gamma(6.0, 2.4, n).round().astype(int) + 50
    sex = rng.choice(["F", "M"], n, p=[0.55, 0.45])
    kappa = rng.lognormal(0.25, 0.5, n).clip(0.01, 20)
    lam = rng.lognormal(0.45, 0.45, n).clip(0.04, 27)
    total = kappa + lam
    flc_grp = np.searchsorted(np.quantile(total, np.linspace(0.1, 0.9, 9)), total) + 1
    creatinine = rng.lognormal(0.05, 0.28, n).clip(0.4, 10.8)
    mgus = (rng.random(n) < 0.015).astype(int)
    risk = (
        0.11 * (age - 64)
        + 0.9 * np.log(total / 3)
        + 1.0 * np.log(creatinine)
        + 0.3 * (sex == "M")
        + 0.4 * mgus
        - 1.3
    )
    died = rng.random(n) < 1 / (1 + np.exp(-risk))
    creatinine = np.where(rng.random(n) < 0.17, np.nan, creatinine)  # not measured
    start = datetime(1995, 1, 1, tzinfo=UTC)
    frame = pd.DataFrame(
        {
            "patient_id": [f"F{i:05d}" for i in range(n)],
            "event_timestamp": [start + timedelta(days=int(d)) for d in rng.integers(0, 3285, n)],
            "death": np.where(died, "yes", "no"),
            "age": age,
            "sex": sex,
            "kappa": kappa,
            "lambda_": lam,
            "flc_grp": flc_grp,
            "creatinine": creatinine,
            "mgus": mgus,
        }
    )
    spec = UseCaseSpec.model_validate(
        {
            "name": "flchain",
            "description": "Death during follow-up (generated, the shape of flchain).",
            "source": {"path": "flchain.csv"},
            "entity": {"name": "patient", "key": "patient_id"},
            "event_timestamp": "event_timestamp",
            "label": {"column": "death", "positive_class": "yes", "negative_class": "no"},
            "primary_metric": "roc_auc",
            "feature_service": "flchain_v1",
            "features": [
                {"name": "age", "type": "int", "unit": "years", "min": 18, "max": 110},
                {"name": "sex", "type": "category", "categories": ["F", "M"]},
                {"name": "kappa", "type": "float", "unit": "mg/dL", "min": 0, "max": 50},
                {"name": "lambda_", "type": "float", "unit": "mg/dL", "min": 0, "max": 50},
                {"name": "flc_grp", "type": "int", "unit": "decile", "min": 1, "max": 10},
                {
                    "name": "creatinine",
                    "type": "float",
                    "unit": "mg/dL",
                    "min": 0.1,
                    "max": 20,
                    "nullable": True,
                },
                {"name": "mgus", "type": "int", "unit": "flag", "min": 0, "max": 1},
            ],
            "sensitive_attributes": ["sex"],
        }
    )
    return spec, frame


def readmission_frame():
    """configs/readmission.yaml and ~10 000 labelled encounters of its generator."""
    import numpy as np

    from clinml.features.datasets import readmission
    from clinml.spec import load_spec
    from clinml.training.search import grouped_sample

    spec = load_spec(ROOT / "configs" / "readmission.yaml")
    frame = readmission.load(spec.source.seed, COHORT_END, n_patients=READMISSION_ROWS // 3 + 50)
    frame = frame[frame[spec.label.column].notna()].reset_index(drop=True)
    keep = grouped_sample(frame[spec.entity.key].to_numpy(), READMISSION_ROWS, seed=0)
    return spec, frame.iloc[np.sort(keep)].reset_index(drop=True)


class _Stopped(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def one(dataset: str, n_iter: int, limit: float) -> dict[str, object]:
    """Train on ``dataset`` in this process (threads from CLINML_TRAIN_THREADS); stop the
    training after ``limit`` seconds (at the next Python instruction)."""
    import signal

    from clinml.training.train import fit_candidates, resolve_threads

    spec, frame = flchain_like() if dataset == "flchain" else readmission_frame()
    search = spec.training.search.model_copy(update={"n_iter": n_iter})
    training = spec.training.model_copy(update={"search": search})
    spec = spec.model_copy(update={"training": training})
    lines: list[str] = []
    signal.signal(signal.SIGALRM, _stop)
    signal.setitimer(signal.ITIMER_REAL, limit)
    started = time.perf_counter()
    try:
        fitted = fit_candidates(spec, frame, report=lines.append, n_boot=BOOTSTRAP)
    except _Stopped:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=False, kill_workers=True)
        return {"seconds": time.perf_counter() - started, "stopped": True, "done": lines}
    signal.setitimer(signal.ITIMER_REAL, 0)
    return {
        "seconds": time.perf_counter() - started,
        "stopped": False,
        "rows": len(frame),
        "threads": resolve_threads(),
        "selected": fitted.selected.name,
        "search_s": {c.name: round(c.search.seconds, 1) for c in fitted.candidates},
        "refit_s": {c.name: round(c.fit_seconds, 2) for c in fitted.candidates},
    }


def hgb_fits(threads: int, limit: float) -> dict[str, object]:
    """``HGB_FITS`` gradient-boosting fits on the flchain frame's encoded training rows,
    on ``threads`` OpenMP threads (0: the library's default); stopped after ``limit``."""
    import signal

    from clinml.cpus import limit_threads
    from clinml.training.candidates import GroupedHistGradientBoosting, make_preprocessor
    from clinml.training.train import outcome

    spec, frame = flchain_like()
    x = make_preprocessor(spec).fit_transform(frame[spec.feature_names])
    y = outcome(frame, spec)
    signal.signal(signal.SIGALRM, _stop)
    signal.setitimer(signal.ITIMER_REAL, limit)
    started = time.perf_counter()
    try:
        with limit_threads(threads, torch=False):
            for seed in range(HGB_FITS):
                GroupedHistGradientBoosting(random_state=seed).fit(x, y)
    except _Stopped:
        return {"seconds": time.perf_counter() - started, "stopped": True}
    return {"seconds": time.perf_counter() - started, "stopped": False}


def timed(arguments: list[str], env_threads: str | None, busy: bool) -> dict[str, object]:
    """One run of this script with ``arguments`` in a fresh process (with
    ``CLINML_TRAIN_THREADS=env_threads`` when given), quiet or beside busy processes."""
    env = dict(os.environ)
    env.pop("CLINML_TRAIN_THREADS", None)
    if env_threads is not None:
        env["CLINML_TRAIN_THREADS"] = env_threads
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(BUSY_PROCESSES if busy else 0)
    ]
    try:
        # the timeout is a backstop: each run stops itself
        return result_of(__file__, *arguments, env=env, timeout=AFTER_LIMIT_S + 300)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _seconds(run: dict, digits: int = 0) -> str:
    text = f"{run['seconds']:.{digits}f} s"
    return f"> {text} (stopped)" if run["stopped"] else text


def _ratio(quiet: dict, busy: dict) -> str:
    value = busy["seconds"] / quiet["seconds"]
    if busy["stopped"] and not quiet["stopped"]:
        return f"> {value:.1f}x"
    if quiet["stopped"]:
        return "n/a (quiet run stopped)"
    return f"{value:.1f}x"


def _markdown(
    hgb: dict,
    results: dict,
    started: datetime,
    command: str,
    load: str,
    n_iter: int,
    limit: float,
) -> str:
    datasets = list(results)
    lines = [
        START,
        "## Training under CPU contention (issue 20, item 9)",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on this machine ({os.cpu_count()} cores, "
        f"shared with other work: load average {load} when the run started; Python "
        f"{platform.python_version()}), every run a fresh process, side by side in one run. "
        f"Reproduce: `{command}`.",
        "",
        "The full training function (`fit_candidates`: grouped-CV search of every candidate "
        "and the reference, refits, thresholds, clinical evaluation; the Feast join and "
        f"MLflow logging excluded; {BOOTSTRAP}-resample bootstrap). *flchain*: a generated "
        f"frame the shape of flchain ({FLCHAIN_ROWS:,} patients, 7 features), default spec "
        "(4 candidates + reference). *readmission*: configs/readmission.yaml on "
        f"~{READMISSION_ROWS:,} encounters. **Smaller search than the specs'**: {n_iter} "
        "configurations x 3 folds per candidate instead of 6 x 3, so that the eight "
        "trainings fit in 15 minutes (`--n-iter 6` runs the specs' own budget). *Busy*: beside "
        f"{BUSY_PROCESSES} processes spinning `while True: pass`, started by the bench. "
        "*Before*: `CLINML_TRAIN_THREADS=0` (each library's own thread defaults, as before "
        "this change); *after*: the default (search fits in as many worker processes as the "
        "process has CPUs, every pool of every process on one thread). A *before* run still "
        f"training after {limit:g} s is stopped: its time and ratio are lower bounds.",
        "",
        f"The issue's isolated case, {HGB_FITS} histogram-gradient-boosting fits (default "
        "parameters) on the flchain frame:",
        "",
        "| OpenMP threads | quiet | busy | busy / quiet |",
        "|---|---:|---:|---:|",
    ]
    for threads, label in ((0, "library default (before)"), (1, "1 (after)")):
        quiet, busy = hgb[threads]["quiet"], hgb[threads]["busy"]
        lines.append(
            f"| {label} | {quiet['seconds']:.2f} s | {_seconds(busy, 2)} | "
            f"**{_ratio(quiet, busy)}** |"
        )
    lines += [
        "",
        "The whole training:",
        "",
        "| training | threads | quiet | busy | busy / quiet |",
        "|---|---|---:|---:|---:|",
    ]
    for dataset in datasets:
        for mode in MODES:
            quiet, busy = results[dataset][mode]["quiet"], results[dataset][mode]["busy"]
            label = "library defaults (before)" if mode == "before" else "clinml.cpus (after)"
            lines.append(
                f"| {dataset} | {label} | {_seconds(quiet)} | {_seconds(busy)} | "
                f"**{_ratio(quiet, busy)}** |"
            )
    lines.append("")
    verdicts = []
    for dataset in datasets:
        after = results[dataset]["after"]
        ratio = after["busy"]["seconds"] / after["quiet"]["seconds"]
        verdict = "meets" if ratio <= TARGET_RATIO and not after["busy"]["stopped"] else "misses"
        verdicts.append(f"{dataset} {ratio:.1f}x, {verdict} it")
    lines.append(
        f"Target: beside three busy processes each training takes at most {TARGET_RATIO}x "
        f"its quiet time: **{'; '.join(verdicts)}**."
    )
    for dataset in datasets:
        before, after = results[dataset]["before"], results[dataset]["after"]
        lines.append(
            f"{dataset}: after / before, quiet {_speedup(after['quiet'], before['quiet'])}, "
            f"busy {_speedup(after['busy'], before['busy'])}."
        )
    lines.append(END)
    return "\n".join(lines)


def _speedup(after: dict, before: dict) -> str:
    value = before["seconds"] / after["seconds"]
    return f"{'> ' if before['stopped'] else ''}{value:.1f}x faster"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--limit", type=float, default=LIMIT_S, help="Stop a run after this many seconds."
    )
    parser.add_argument(
        "--n-iter", type=int, default=N_ITER, help="Configurations per candidate's search."
    )
    parser.add_argument("--one", choices=DATASETS, help=argparse.SUPPRESS)
    parser.add_argument("--hgb", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.n_iter, args.limit)))
        return
    if args.hgb is not None:
        print(json.dumps(hgb_fits(args.hgb, HGB_LIMIT_S)))
        return
    started = datetime.now(UTC)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    hgb: dict = {}
    for threads in (0, 1):
        for busy in (False, True):
            run = timed(["--hgb", str(threads)], None, busy)
            hgb.setdefault(threads, {})["busy" if busy else "quiet"] = run
            print(f"{HGB_FITS} gbm fits, threads={threads}, busy={busy}: {_seconds(run)}")
    results: dict = {}
    for dataset in args.datasets:
        for mode in ("after", "before"):
            limit = args.limit if mode == "before" else AFTER_LIMIT_S
            arguments = ["--one", dataset, "--n-iter", str(args.n_iter), "--limit", str(limit)]
            for busy in (False, True):
                run = timed(arguments, MODES[mode], busy)
                results.setdefault(dataset, {}).setdefault(mode, {})[
                    "busy" if busy else "quiet"
                ] = run
                print(
                    f"{dataset} {mode} {'busy' if busy else 'quiet'}: {_seconds(run)} "
                    f"{json.dumps({k: run.get(k) for k in ('search_s', 'refit_s')})}",
                    flush=True,
                )
    command = (
        ".venv/bin/python bench/contention_bench.py"
        + ("" if args.limit == LIMIT_S else f" --limit {args.limit:g}")
        + ("" if args.n_iter == N_ITER else f" --n-iter {args.n_iter}")
    )
    section = _markdown(hgb, results, started, command, load, args.n_iter, args.limit)
    print(section)
    if not args.no_write and tuple(args.datasets) == ("flchain", "readmission"):
        write_section(DOC, START, END, section)


if __name__ == "__main__":
    main()
