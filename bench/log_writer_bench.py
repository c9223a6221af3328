"""The prediction log's CPU per row: before and after a change, side by side (issue 22).

On a worker's one core the log's writer shares the CPU with the requests, so every
millisecond it spends per 1,000 rows is a millisecond a 1,000-record request cannot
have. This measures that cost where it is paid, in one process per measurement:

- **request**: what ``/predict`` does for the log on the request path, from the checked
  batch (``clinml.serving.columns.predict_batch``) to ``PredictionLog.record_columns``;
- **writer**: the CPU time of the process's other threads (the log's writer and any
  Arrow threads) from the log's start until it has written every row.

Rows: the readmission use case's generated cohort (``clinml.features.datasets``, with
its missing values), sent as ``/predict`` bodies of ``--rows`` records, each with a
probability and a label as the service logs them. ``--requests`` requests are queued, then
flushed; each tree is measured in its own process, ``--rounds`` rounds alternating which
goes first; the table gives medians over rounds of CPU ms per 1,000 rows.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/log_writer_bench.py --before /tmp/before          # ~1 minute
    .venv/bin/python bench/log_writer_bench.py --before /tmp/before --no-doc # print only

``--before`` is a checkout in the one-package layout (``clinml.serving``). Nothing here
asserts on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "log-writer-bench"
TITLE = "The prediction log's CPU per 1,000 rows, before and after (issue 22)"


def _cpu() -> float:
    """CPU time (user + system, s) of this process's threads other than the calling one."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    mine = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime - mine.ru_utime - mine.ru_stime


def child(rows: int, requests: int) -> dict[str, float]:
    """One measurement, in this process, with the code on ``sys.path`` (run by ``main``
    with ``PYTHONPATH`` set to the tree)."""
    import numpy as np
    import pyarrow.parquet  # noqa: F401  (a serving worker has it imported long before)

    from clinml.features.datasets import LOADERS
    from clinml.serving import columns
    from clinml.serving.requestlog import PredictionLog
    from clinml.spec import load_spec

    spec = load_spec("readmission", ROOT / "configs")
    frame = LOADERS["readmission"](7, datetime(2026, 1, 1, tzinfo=UTC), n_patients=3_000)
    frame = frame[spec.feature_names].head(rows * 4).astype(object)
    records = frame.where(frame.notna(), None).to_dict("records")
    bodies = [
        json.dumps({"records": records[i * rows : (i + 1) * rows]}, default=lambda v: v.item())
        for i in range(4)
    ]
    batches = [columns.predict_batch(spec, body.encode(), rows) for body in bodies]
    if any(batch is None for batch in batches):
        raise SystemExit("the generated records did not pass the column check")
    rng = np.random.default_rng(0)
    probability = rng.random(rows)
    names = np.array(["no", "yes"], dtype=object)
    with tempfile.TemporaryDirectory() as home:
        others = _cpu()
        log = PredictionLog(Path(home) / "predictions", max_queue=rows * requests + 1)
        request = 0.0
        for i in range(requests):
            batch = batches[i % len(batches)]
            start = time.thread_time()
            # as ClinicalService.log_predictions hands them over
            loggable = getattr(batch, "loggable", None)
            logged = {
                **(loggable() if loggable else batch.columns),
                "time": datetime.now(UTC),
                "request_id": f"{i:032x}",
                "model_version": "3",
                "patient": None,
                "probability": probability,
                "label": names[(probability >= 0.5).astype(np.intp)].tolist(),
            }
            log.record_columns(logged, batch.rows)
            request += time.thread_time() - start
        if not log.flush(timeout=600):
            raise SystemExit("the log did not write its rows in 600 s")
        writer = _cpu() - others
        log.close()
        if log.dropped or log.written != rows * requests:
            raise SystemExit(f"the log wrote {log.written} and dropped {log.dropped} rows")
    per = 1000 / (rows * requests) * 1000  # seconds per row set -> ms per 1,000 rows
    return {"request": request * per, "writer": writer * per}


def measure(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(args.rows), str(args.requests)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the measurement in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace, rev: str) -> str:
    def med(tree: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[tree])

    lines = [
        f"<!-- {SECTION} -->",
        f"## {TITLE}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}. `before` is commit `{rev}`, `after` this checkout. "
        f"{args.requests} `/predict` bodies of {args.rows} generated readmission records "
        "(with their missing values) queued, then written; CPU ms per 1,000 rows, medians "
        f"of {args.rounds} rounds alternating which tree goes first, each in its own process.",
        "",
        "| part | before | after | after ÷ before |",
        "|---|---|---|---|",
    ]
    for key, label in (("request", "request path"), ("writer", "writer")):
        before, after = med("before", key), med("after", key)
        lines.append(f"| {label} | {before:.3f} | {after:.3f} | {after / before:.2f} |")
    total_b = statistics.median(r["request"] + r["writer"] for r in runs["before"])
    total_a = statistics.median(r["request"] + r["writer"] for r in runs["after"])
    lines += [
        f"| both | {total_b:.3f} | {total_a:.3f} | {total_a / total_b:.2f} |",
        "",
        "Reproduce: `git worktree add /tmp/before "
        f"{rev} && .venv/bin/python bench/log_writer_bench.py --before /tmp/before "
        f"--rounds {args.rounds} --requests {args.requests} --rows {args.rows} "
        "--doc docs/benchmarks.md`",
        f"<!-- /{SECTION} -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rows", type=int, default=1_000, help="records per request")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    trees = {"before": args.before.resolve(), "after": ROOT}
    for round_ in range(args.rounds):
        order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
        for tree in order:
            result = measure(trees[tree], args)
            runs[tree].append(result)
            print(json.dumps({"tree": tree, **result}), flush=True)
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.before, capture_output=True, text=True
    ).stdout.strip()
    text = report(runs, args, rev)
    print(text)
    if not args.no_doc:
        sys.path.insert(0, str(ROOT))
        from bench.docsection import write_section

        write_section(args.doc, f"<!-- {SECTION} -->", f"<!-- /{SECTION} -->", text)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
