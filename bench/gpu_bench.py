"""Training and model execution, CPU vs CUDA (issue 25, item 5); bench/gpu_check.sh runs it.

On a machine with a CUDA device, in one run:

1. **Training**: the readmission spec's MLP candidate, with its own hyperparameters,
   fitted on about ``--rows`` labelled encounters (the cohort bench/training_bench.py makes):
   on the CPU with one thread (what a clinml refit uses, ``clinml.training.train``), on
   the CPU with every core, and on CUDA; ``--rounds`` times each, the order rotating.
2. **Model execution** (what a request costs the model service, without HTTP): the
   compiled fast path of the readmission MLP and gradient-boosting candidates, built for
   the CPU (one torch thread, as the executor sets) and for CUDA, scoring requests of 1,
   100 and 10 000 records (encoding the records included), median of repeated calls.

Writes a section into docs/benchmarks.md (between the gpu-bench markers) and prints it.
Without CUDA it measures the CPU side only, prints it and writes nothing (a dry run).

    .venv/bin/python bench/gpu_bench.py            # about 3 minutes on a GPU machine

Nothing here is a test: timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.training_bench import cohort  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"
BATCHES = {1: 300, 100: 100, 10_000: 10}  # records per request: timed calls
MODELS = ("mlp", "gbm")


def training_setups(cuda: bool) -> dict[str, tuple[str, int]]:
    """Name -> (device, torch threads)."""
    setups = {"CPU, 1 thread": ("cpu", 1), f"CPU, {os.cpu_count()} threads": ("cpu", 0)}
    if cuda:
        setups["CUDA"] = ("cuda", 1)
    return setups


def pipeline_on(name: str, spec: Any, rows: int, device: str) -> Any:
    """The spec's candidate ``name``, its MLP (if any) set to train on ``device``."""
    from clinml.training.candidates import build_pipeline

    pipeline = build_pipeline(
        name, spec, dict(spec.training.candidates[name].params), spec.training.seed, rows
    )
    devices = {key: device for key in pipeline.get_params() if key.endswith("__device")}
    return pipeline.set_params(**devices)


def train(spec: Any, rows: tuple[Any, Any, Any], device: str, threads: int) -> tuple[float, Any]:
    """Seconds to fit the MLP candidate on ``rows`` (features, outcomes, patients), and
    the fitted pipeline."""
    from clinml.cpus import limit_threads
    from clinml.training.candidates import fit

    x, y, patients = rows
    pipeline = pipeline_on("mlp", spec, len(x), device)
    with limit_threads(threads, torch=True):
        started = time.perf_counter()
        fit(pipeline, x, y, patients)
        return time.perf_counter() - started, pipeline


def execution_ms(compiled: Any, records: list[dict[str, Any]], calls: int) -> float:
    """Median milliseconds of one request: encode the records, score them."""
    compiled.predict_proba(compiled.encode_records(records))
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        compiled.predict_proba(compiled.encode_records(records))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    import torch
    from sklearn.metrics import roc_auc_score

    from clinml.serving.fastpath import compile_model
    from clinml.training.candidates import fit
    from clinml.training.train import outcome

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    started = datetime.now(UTC)
    spec, frame = cohort(args.rows)
    print(f"{len(frame):,} encounters; CUDA: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    x, y = frame[spec.feature_names], outcome(frame, spec)
    patients = frame[spec.entity.key].to_numpy()
    warm = (x.iloc[:2_000], y[:2_000], patients[:2_000])

    setups = training_setups(cuda)
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    aurocs: dict[str, float] = {}
    names = list(setups)
    for name in names:  # imports, CUDA's context and kernels: not part of a fit's time
        train(spec, warm, *setups[name])
    for i in range(args.rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            took, fitted = train(spec, (x, y, patients), *setups[name])
            seconds[name].append(took)
            print(f"  train {name}: {took:.1f} s", flush=True)
            if name not in aurocs:
                aurocs[name] = roc_auc_score(y, fitted.predict_proba(x)[:, 1])

    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    execution: dict[tuple[str, str, int], float] = {}
    torch.set_num_threads(1)  # as the model executor does on the CPU
    for model in MODELS:
        pipeline = fit(pipeline_on(model, spec, len(x), "cpu"), x, y, patients)
        for device in devices:
            compiled = compile_model(pipeline, device=device)
            compiled.warm_up()
            for batch, calls in BATCHES.items():
                records = x.iloc[:batch].to_dict("records")
                execution[model, device, batch] = execution_ms(compiled, records, calls)
                print(
                    f"  {model} on {device}, {batch} records: "
                    f"{execution[model, device, batch]:.3f} ms",
                    flush=True,
                )

    section = _markdown(frame, spec, cuda, seconds, aurocs, execution, devices, started)
    print(section)
    if cuda and not args.no_write:
        write_section(DOC, START, END, section)
    elif not cuda:
        print("no CUDA device: a dry run, docs/benchmarks.md left as it was")


def _markdown(
    frame: Any,
    spec: Any,
    cuda: bool,
    seconds: dict[str, list[float]],
    aurocs: dict[str, float],
    execution: dict[tuple[str, str, int], float],
    devices: list[str],
    started: datetime,
) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    baseline = statistics.median(seconds["CPU, 1 thread"])
    lines = [
        START,
        "## CPU vs CUDA: MLP training and fast-path execution (issue 25)",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on a GPU machine "
        f"({os.cpu_count()} cores, {device}, torch {torch.__version__}, Python "
        f"{platform.python_version()}). Reproduce: `bench/gpu_check.sh` (or "
        "`.venv/bin/python bench/gpu_bench.py`).",
        "",
        f"Training: the readmission MLP candidate (configs/readmission.yaml's hyperparameters, "
        f"early stopping) fitted on {len(frame):,} encounters, after one untimed warm-up fit "
        "on each; median of the rounds.",
        "",
        "| trained on | seconds (each round) | speed-up over CPU, 1 thread | AUROC on its training rows |",
        "|---|---:|---:|---:|",
    ]
    for name, values in seconds.items():
        median = statistics.median(values)
        each = ", ".join(f"{v:.1f}" for v in values)
        lines.append(
            f"| {name} | {median:.1f} ({each}) | {baseline / median:.2f}x | {aurocs[name]:.3f} |"
        )
    lines += [
        "",
        "Model execution: the compiled fast path, one request of N records (encoding "
        "included), median milliseconds; the CPU with one torch thread, as the model "
        "executor runs it.",
        "",
        "| model | records | "
        + " | ".join(devices)
        + (" | CPU time / CUDA time |" if cuda else " |"),
        "|---|---:|" + "---:|" * len(devices) + ("---:|" if cuda else ""),
    ]
    for model in MODELS:
        for batch in BATCHES:
            cells = [f"{execution[model, d, batch]:.3f} ms" for d in devices]
            ratio = (
                f" {execution[model, 'cpu', batch] / execution[model, 'cuda', batch]:.2f}x |"
                if cuda
                else ""
            )
            lines.append(f"| {model} | {batch:,} | " + " | ".join(cells) + " |" + ratio)
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
