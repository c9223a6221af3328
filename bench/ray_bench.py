"""Training in-process vs on a local Ray cluster, and a projection to 1M and 10M (issue 25).

On this machine, in one run, each in its own process (the cohort generated in each, not
timed):

1. **In-process vs local Ray** at about 100 000 labelled readmission encounters
   (``--size``), ``--rounds`` times each, in alternating order (in-process first in odd
   rounds, Ray first in even ones), so that a slow spell of this shared machine falls on
   both. Both run the full training stage (search, refits, threshold, clinical evaluation
   with its bootstrap, selection) on the CPUs this process is given: in-process with its
   loky workers, on Ray with ``ray.init(num_cpus=...)`` started by the run (its start-up
   counted). Goal: Ray at most 1.3x in-process. The two give the same selected model and
   the same test AUROC (checked and printed, not assumed).
2. **Per-task costs** for a projection: each search's fold fits (seconds per fit, from
   the trials), each candidate's refit + threshold + evaluation (from the time its
   progress line arrives, in-process), and the driver's own share (the rest). The search
   works on at most ``search.max_rows`` rows at any cohort size, so its tasks cost the
   same at 1M; the refits and evaluations grow with the cohort, as a power law fitted per
   candidate between ``--size`` and ``--scale-size`` (an in-process run of its own).
3. **The projection**: wall time for 1M and 10M encounters on 8 and 32 one-CPU workers,
   each candidate's search fits scheduled longest-first on the workers, the candidates
   one after another, then the five refit-and-evaluate tasks side by side, plus the
   driver. With ``--check-size`` (e.g. 1000000), the same model projects that size on
   this machine's CPUs and a Ray run measures it, so the projection is checked against
   one measurement.

Writes a section into docs/benchmarks.md (between the ray-bench markers) and prints it.
Run from the project root, nothing else running:

    .venv/bin/python bench/ray_bench.py                       # about 30 minutes on 2 cores
    .venv/bin/python bench/ray_bench.py --check-size 1000000  # about 15 minutes more

Nothing here is a test: timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.child import result_of  # noqa: E402
from bench.docsection import write_section  # noqa: E402
from bench.training_bench import cohort  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- ray-bench:start -->", "<!-- ray-bench:end -->"
MODES = ("in-process", "ray")
DRIVER = "driver"
PROJECTED_SIZES = (1_000_000, 10_000_000)
PROJECTED_WORKERS = (8, 32)
GOAL = 1.3


def one(mode: str, size: int) -> dict[str, object]:
    """Train on about ``size`` encounters in ``mode``; the timings of its parts."""
    from contextlib import nullcontext

    from clinml.training.distributed import LOCAL, RayCluster
    from clinml.training.train import fit_candidates

    spec, frame = cohort(size)
    lines: list[tuple[float, str]] = []

    def report(line: str) -> None:
        lines.append((time.perf_counter(), line))

    with tempfile.TemporaryDirectory() as home:
        if mode == "ray":
            # Ray's session files go to a directory of this run's own
            os.environ["HOME"] = home
        started = time.perf_counter()
        connect = RayCluster.connect(LOCAL) if mode == "ray" else nullcontext()
        with connect as cluster:
            connected = time.perf_counter()
            fitted = fit_candidates(spec, frame, report=report, cluster=cluster)
            trained = time.perf_counter()
        cpus = cluster.cpus if cluster is not None else None
    names = [c.name for c in fitted.candidates]
    # each candidate's last search line, and its candidate line (after its evaluation)
    searched = {name: max(t for t, line in lines if line.startswith(f"{name} [")) for name in names}
    finished = {
        name: min(t for t, line in lines if line.startswith(f"{name:<6} cv ")) for name in names
    }
    return {
        "mode": mode,
        "size": size,
        "rows": len(frame),
        "train_rows": len(fitted.split.train),
        "ray_cpus": cpus,
        "connect_s": connected - started,
        "train_s": trained - connected,
        "total_s": trained - started,
        "selected": fitted.selection.selected,
        "test_roc_auc": fitted.selected.evaluation.metrics["roc_auc"],
        "candidates": {
            c.name: {
                "search_s": c.search.seconds,
                "fits": [
                    t.seconds / len(t.fold_scores) for t in c.search.trials for _ in t.fold_scores
                ],
                "failed_trials": sum(t.failed is not None for t in c.search.trials),
                "refit_s": c.fit_seconds,
                "searched_at": searched[c.name] - connected,
                "finished_at": finished[c.name] - connected,
                "test_roc_auc": c.evaluation.metrics["roc_auc"],
            }
            for c in fitted.candidates
        },
    }


def _run(mode: str, size: int) -> dict:
    result = result_of(__file__, "--one", mode, str(size))
    print(
        f"  {mode}: {result['total_s']:.0f} s (start-up {result['connect_s']:.1f} s), "
        f"selected {result['selected']} AUROC {result['test_roc_auc']:.6f}",
        flush=True,
    )
    return result


def finish_seconds(result: dict) -> dict[str, float]:
    """Each candidate's refit + threshold + evaluation, from an in-process run: the time
    between its last search line and its candidate line."""
    return {name: c["finished_at"] - c["searched_at"] for name, c in result["candidates"].items()}


def driver_seconds(result: dict) -> float:
    """The in-process run's time outside the searches and the refit-and-evaluate steps:
    splitting, sampling, selection (its paired bootstrap), progress."""
    parts = sum(c["search_s"] for c in result["candidates"].values())
    return result["train_s"] - parts - sum(finish_seconds(result).values())


def makespan(costs: list[float], workers: int) -> float:
    """Wall time of independent tasks on ``workers`` one-CPU workers, longest first, each
    to the worker free soonest (the order Ray's scheduler tends to; a lower bound)."""
    free = [0.0] * min(workers, max(len(costs), 1))
    for cost in sorted(costs, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free) if costs else 0.0


def growth(before: float, after: float, base: dict, scaled: dict) -> float:
    """b in seconds ~ N^b through two runs' seconds, held within [0, 2]."""
    ratio = scaled["rows"] / base["rows"]
    return min(2.0, max(0.0, math.log(after / before) / math.log(ratio)))


def exponents(base: dict, scaled: dict) -> dict[str, float]:
    """Per candidate, and for the driver, b in seconds ~ N^b between two in-process runs."""
    a, b = finish_seconds(base), finish_seconds(scaled)
    power = {name: growth(a[name], b[name], base, scaled) for name in a}
    power[DRIVER] = growth(driver_seconds(base), driver_seconds(scaled), base, scaled)
    return power


def project(base: dict, power: dict[str, float], size: int, workers: int) -> dict[str, float]:
    """Projected wall seconds at ``size`` encounters on ``workers`` one-CPU workers."""
    grow = size / base["rows"]
    search = sum(makespan(c["fits"], workers) for c in base["candidates"].values())
    finish_costs = [s * grow ** power[n] for n, s in finish_seconds(base).items()]
    finish = makespan(finish_costs, workers)
    driver = max(0.0, driver_seconds(base)) * grow ** power[DRIVER]
    return {"search": search, "finish": finish, "driver": driver, "total": search + finish + driver}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _markdown(
    rounds: list[dict[str, dict]],
    scaled: dict,
    check: dict | None,
    started: datetime,
    command: str,
) -> str:
    first = rounds[0]["in-process"]
    ratios = [r["ray"]["total_s"] / r["in-process"]["total_s"] for r in rounds]
    ratio = _median(ratios)
    same = all(
        r["ray"]["selected"] == r["in-process"]["selected"]
        and abs(r["ray"]["test_roc_auc"] - r["in-process"]["test_roc_auc"]) < 1e-12
        for r in rounds
    )
    lines = [
        START,
        "## Training on Ray: in-process vs a local Ray cluster, and a projection (issue 25)",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on this machine ({os.cpu_count()} cores, "
        f"{platform.python_version()}), each run in its own process, the two modes in "
        f"alternating order. Reproduce: `{command}`.",
        "",
        f"The full training stage (search, refits, threshold, evaluation with its bootstrap, "
        f"selection; no MLflow logging) on {first['rows']:,} readmission encounters "
        f"({first['train_rows']:,} training rows), on the CPUs this process is given: "
        f"in-process with its loky workers, and on a Ray instance the run starts "
        f"(`ray.init(num_cpus={rounds[0]['ray']['ray_cpus']})`, its start-up included).",
        "",
        "| round | in-process | local Ray (of it start-up) | Ray / in-process | "
        "selected, test AUROC (in-process / Ray) |",
        "|---:|---:|---:|---:|---|",
    ]
    for i, (r, q) in enumerate(zip(rounds, ratios, strict=True), start=1):
        a, b = r["in-process"], r["ray"]
        lines.append(
            f"| {i} | {a['total_s']:.0f} s | {b['total_s']:.0f} s ({b['connect_s']:.1f} s) | "
            f"{q:.2f}x | {a['selected']} {a['test_roc_auc']:.6f} / {b['selected']} "
            f"{b['test_roc_auc']:.6f} |"
        )
    verdict = "meets" if ratio <= GOAL else "misses"
    lines += [
        "",
        f"Goal: local Ray at most {GOAL}x in-process at 100 000 encounters; at "
        f"{first['rows']:,}, median "
        f"**{ratio:.2f}x, {verdict} it**. Same selected model and test AUROC in every round: "
        f"**{'yes' if same else 'no'}**.",
        "",
        "Where the time goes, per candidate (in-process round 1, and the in-process run at "
        f"{scaled['rows']:,} encounters that gives each refit-and-evaluate its growth):",
        "",
        f"| candidate | search fits | seconds per fit (mean, max) | search wall | refit + "
        f"evaluate at {first['rows']:,} | at {scaled['rows']:,} | growth N^b |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    power = exponents(first, scaled)
    base_finish, scaled_finish = finish_seconds(first), finish_seconds(scaled)
    for name, c in first["candidates"].items():
        fits = c["fits"]
        lines.append(
            f"| {name} | {len(fits)} | {sum(fits) / len(fits):.2f} s, {max(fits):.2f} s | "
            f"{c['search_s']:.0f} s | {base_finish[name]:.1f} s | {scaled_finish[name]:.1f} s | "
            f"b = {power[name]:.2f} |"
        )
    lines += [
        "",
        f"The driver's own share (split, samples, selection's paired bootstrap, progress) "
        f"was {driver_seconds(first):.0f} s at {first['rows']:,} encounters and "
        f"{driver_seconds(scaled):.0f} s at {scaled['rows']:,}: b = {power[DRIVER]:.2f}.",
        "",
        "**Projection, not a measurement**: wall time of the training stage on a Ray cluster "
        "of one-CPU workers, from the per-task costs above: each candidate's search fits "
        "(the same at any size: the search samples at most `search.max_rows` rows) "
        "scheduled longest-first on the workers, the candidates one after another; then the "
        "five refit-and-evaluate tasks side by side, each grown by its own N^b (b from the "
        "two in-process sizes, held within [0, 2]); plus the driver, grown likewise. It assumes workers as fast as this machine's cores and ignores moving the "
        "frame to the workers' object stores.",
        "",
        "| encounters | workers | search | refit + evaluate | driver | total |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size in PROJECTED_SIZES:
        for workers in PROJECTED_WORKERS:
            p = project(first, power, size, workers)
            lines.append(
                f"| {size:,} | {workers} | {p['search'] / 60:.1f} min | "
                f"{p['finish'] / 60:.1f} min | {p['driver'] / 60:.1f} min | "
                f"**{p['total'] / 60:.1f} min** |"
            )
    slowest = max(
        base_finish, key=lambda n: base_finish[n] * (10_000_000 / first["rows"]) ** power[n]
    )
    lines += [
        "",
        f"Past five workers the refit-and-evaluate step is one task per candidate, so the "
        f"slowest one ({slowest}) bounds the wall time however many workers there are; more "
        "workers shorten only the searches.",
    ]
    if check is not None:
        projected = project(first, power, check["rows"], check["ray_cpus"])["total"]
        lines += [
            "",
            f"Check of the projection on this machine: {check['rows']:,} encounters on Ray with "
            f"{check['ray_cpus']} CPUs, projected {projected / 60:.1f} min, measured "
            f"**{check['train_s'] / 60:.1f} min** (training only, start-up excluded; "
            f"{check['train_s'] / projected:.2f}x the projection).",
        ]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale-size", type=int, default=300_000)
    parser.add_argument("--check-size", type=int, help="also measure this size on Ray")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    started = datetime.now(UTC)
    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1}: ~{args.size:,} encounters", flush=True)
        order = MODES if i % 2 == 0 else MODES[::-1]
        rounds.append({mode: _run(mode, args.size) for mode in order})
    print(f"in-process at ~{args.scale_size:,} encounters (growth of the refits)", flush=True)
    scaled = _run("in-process", args.scale_size)
    check = None
    if args.check_size:
        print(f"Ray at ~{args.check_size:,} encounters (the projection's check)", flush=True)
        check = _run("ray", args.check_size)
    command = " ".join([".venv/bin/python bench/ray_bench.py", *sys.argv[1:]])
    section = _markdown(rounds, scaled, check, started, command)
    print(section)
    if not args.no_write:
        write_section(DOC, START, END, section)


if __name__ == "__main__":
    main()
