"""A single client's latency tail on one core, with the prediction log and the audit trail
writing behind it (issue 22, item 3).

Each run is a process of its own, pinned to one core, with the serving process's heap
(pandas, pyarrow, scikit-learn and BentoML imported, then ``gc.freeze()`` as
``ClinicalService.__init__`` does). It plays one client at a steady rate: every tick a
"request" parses a JSON body of readmission records, scores them with a stand-in, encodes
an answer, logs the predictions (``PredictionLog``) and submits an audit record
(``RequestAudit``, checkpointed), while both writers run in their threads as in the
service. A request's latency is from its tick (when it would have arrived) to its end, so
time spent waiting for a writer to let go of the GIL, or for the garbage collector, counts.

Trees: ``after`` is this checkout (``PredictionLog.record_columns`` when it has it);
``before`` is another tree (``--before DIR``, e.g. ``git archive <commit> | tar -x -C DIR``)
logging row dicts with ``PredictionLog.record``, as the service did. ``--variants`` also picks
the garbage collector's setting after the freeze: ``freeze`` (what the service does) or
``off`` (no collection at all: what the collector costs, not a setting to run with); and
which writers run: ``both``, ``log``, ``audit`` or ``none`` (what each one costs). Rounds
alternate the variants. Run from the project root:

    .venv/bin/python bench/tail_bench.py --before /tmp/before         # about 4 minutes
    .venv/bin/python bench/tail_bench.py --variants after:freeze after:off after:freeze:none

Prints a table (p50 / p99 / max in ms, the median of the rounds); writes nothing else.
Nothing here is a test: timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# (records per request, requests per second): about a single client's rate against the
# service at each size (docs/benchmarks.md, issue 22).
SIZES = {1: 1_000, 100: 250}
AUDIT_KEY = "5e" * 32


def _payload(count: int) -> tuple[bytes, list[str]]:
    """A /predict body of ``count`` readmission-like records, and the feature names."""
    import random

    rng = random.Random(7)
    floats = [
        "heart_rate",
        "systolic_bp",
        "resp_rate",
        "temperature",
        "spo2",
        "creatinine",
        "haemoglobin",
        "sodium",
        "glucose",
        "wbc",
        "length_of_stay",
    ]
    ints = [
        "age",
        "diabetes",
        "heart_failure",
        "copd",
        "ckd",
        "comorbidity_count",
        "prior_admissions_365d",
    ]
    categories = {
        "sex": ["F", "M"],
        "site": ["hosp_a", "hosp_b", "hosp_c", "hosp_d"],
        "discharge_disposition": ["home", "home_health", "skilled_nursing", "rehab"],
    }
    records = []
    for _ in range(count):
        record: dict[str, Any] = {name: round(rng.uniform(1, 200), 2) for name in floats}
        record.update({name: rng.randint(0, 5) for name in ints})
        record.update({name: rng.choice(values) for name, values in categories.items()})
        record["glucose"] = None if rng.random() < 0.2 else record["glucose"]
        records.append(record)
    names = [*floats, *ints, *categories]
    return json.dumps({"records": records}).encode(), names


def _request(body: bytes, names: list[str], log: Any, audit: Any, columns: bool) -> None:
    """One /predict, less the framework: parse, score (a stand-in), answer, log, audit."""
    from datetime import UTC, datetime

    import numpy as np

    records = json.loads(body)["records"]
    request_id = uuid.uuid4().hex
    heart = np.fromiter((r["heart_rate"] for r in records), float, len(records))
    probability = 1.0 / (1.0 + np.exp(-(heart - 100.0) / 30.0))  # the model's stand-in
    labels = ["yes" if p >= 0.5 else "no" for p in probability.tolist()]
    predictions = [
        {"probability": p, "label": label, "risk_band": "high" if p > 0.8 else "low"}
        for p, label in zip(probability.tolist(), labels, strict=True)
    ]
    json.dumps({"request_id": request_id, "predictions": predictions})
    now = datetime.now(UTC)
    if columns:
        logged: dict[str, Any] = {name: [r[name] for r in records] for name in names}
        logged.update(
            time=now,
            request_id=request_id,
            model_version="3",
            patient=None,
            probability=probability,
            label=labels,
        )
        log.record_columns(logged, len(records))
    else:
        log.record(
            [
                {
                    **record,
                    "time": now,
                    "request_id": request_id,
                    "model_version": "3",
                    "patient": None,
                    "probability": p["probability"],
                    "label": p["label"],
                }
                for record, p in zip(records, predictions, strict=True)
            ]
        )
    audit.submit(
        {
            "request_id": request_id,
            "key_id": "bench",
            "endpoint": "/predict",
            "model_version": "3",
            "patient": None,
            "outcome": 200,
            "latency_ms": 0.5,
        }
    )


class _Off:
    """A writer left out (``--variants after:freeze:audit`` runs the audit trail alone)."""

    written = dropped = 0

    def record(self, rows: Any) -> None: ...

    def record_columns(self, columns: Any, rows: int) -> None: ...

    def submit(self, record: Any) -> bool:
        return True

    def flush(self, timeout: float) -> bool:
        return True

    def close(self) -> None: ...


def one(
    records: int, rate: int, seconds: float, warmup: float, gc_mode: str, writers: str
) -> dict[str, Any]:
    """One run in this process: the latencies' summary, the writers' counters and the
    garbage collector's pauses."""
    import gc

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import bentoml  # noqa: F401  (the serving process's heap)
    import numpy as np
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import sklearn.ensemble  # noqa: F401

    from clinml.audit import Checkpoints
    from clinml.serving.requestlog import PredictionLog, RequestAudit

    columns = hasattr(PredictionLog, "record_columns")
    gc.collect()
    gc.freeze()  # as ClinicalService.__init__ does
    if gc_mode == "off":
        gc.disable()
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses[info["generation"]].append(time.perf_counter() - started.pop())

    body, names = _payload(records)
    period = 1.0 / rate
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        log: Any = _Off()
        audit: Any = _Off()
        if writers in ("both", "log"):
            log = PredictionLog(home / "predictions")
        if writers in ("both", "audit"):
            audit = RequestAudit(
                home / "audit" / "requests.jsonl",
                checkpoints=Checkpoints(home / "checkpoints", AUDIT_KEY),
                checkpoint_interval_s=1.0,
            )
        latencies = []
        try:
            gc.callbacks.append(timed)
            tick = time.perf_counter()
            end_warmup = tick + warmup
            end = end_warmup + seconds
            while tick < end:
                wait = tick - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                _request(body, names, log, audit, columns)
                done = time.perf_counter()
                if tick >= end_warmup:
                    latencies.append(done - tick)
                tick += period
            gc.callbacks.remove(timed)
            log.flush(30)
            audit.flush(30)
        finally:
            log.close()
            audit.close()
        counters = {"written": log.written, "dropped": log.dropped, "audited": audit.written}
    ms = np.array(latencies) * 1000.0
    return {
        "columns": columns,
        "requests": len(ms),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "gc": {
            str(g): {"count": len(p), "max_ms": 1000.0 * max(p, default=0.0)}
            for g, p in pauses.items()
        },
        **counters,
    }


def _child(
    tree: Path, records: int, gc_mode: str, writers: str, args: argparse.Namespace
) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        str(records),
        "--gc",
        gc_mode,
        "--writers",
        writers,
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
    ]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"a run in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the earlier tree (for before:* variants)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["before:freeze", "after:freeze"],
        help="TREE:GC[:WRITERS]; TREE is before or after, GC is freeze or off, "
        "WRITERS is both (the default), log, audit or none",
    )
    parser.add_argument("--records", type=int, nargs="+", default=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gc", default="freeze", help=argparse.SUPPRESS)
    parser.add_argument("--writers", default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        result = one(args.one, SIZES[args.one], args.seconds, args.warmup, args.gc, args.writers)
        print(json.dumps(result))
        return
    trees = {"after": ROOT}
    if any(v.startswith("before:") for v in args.variants):
        if args.before is None:
            parser.error("before:* variants need --before DIR")
        trees["before"] = args.before.resolve()
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for records in args.records:
            for variant in args.variants:
                tree, gc_mode, writers = (variant + ":both").split(":")[:3]
                result = _child(trees[tree], records, gc_mode, writers, args)
                results.setdefault((variant, records), []).append(result)
                print(
                    f"round {round_ + 1} {variant:14} {records:>3} records: "
                    f"p50 {result['p50']:.3f} p99 {result['p99']:.3f} max {result['max']:.2f} "
                    f"ms; gc2 {result['gc']['2']['count']}x max "
                    f"{result['gc']['2']['max_ms']:.2f} ms; written {result['written']} "
                    f"dropped {result['dropped']}",
                    flush=True,
                )
    print()
    print(
        f"one core, {args.rounds} round(s) of {args.seconds:g} s after {args.warmup:g} s, "
        "median of the rounds (ms)"
    )
    print(
        "| variant | records | req/s | p50 | p99 | p99 ÷ p50 | max | gc gen-2 passes (max ms) "
        "| rows written / dropped |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (variant, records), runs in results.items():
        p50 = statistics.median(r["p50"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        worst = statistics.median(r["max"] for r in runs)
        gc2 = statistics.median(r["gc"]["2"]["count"] for r in runs)
        gc2_ms = statistics.median(r["gc"]["2"]["max_ms"] for r in runs)
        written = statistics.median(r["written"] for r in runs)
        dropped = statistics.median(r["dropped"] for r in runs)
        path = "columns" if runs[0]["columns"] else "rows"
        print(
            f"| {variant} ({path}) | {records} | {SIZES[records]} | {p50:.3f} | {p99:.3f} | "
            f"{p99 / p50:.2f} | {worst:.2f} | {gc2:g} ({gc2_ms:.2f}) | "
            f"{written:g} / {dropped:g} |"
        )


if __name__ == "__main__":
    main()
