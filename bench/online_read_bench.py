"""Online reads: clinml's SQLite reader vs. Feast's public read path (issue 21).

clinml reads Feast's SQLite online store directly (``features.online_sqlite.
OnlineReader``), which needs Feast's private storage layout (``clinml.features.feast_internals``).
Issue 21 keeps that reader only if Feast's public path, ``FeatureStore.
get_online_features``, measures more than 1.3× slower in the same run. This measures it.

One run, in this process: the readmission cohort (``--patients`` patients) ingested,
applied and materialized into a fresh SQLite online store by clinml's own stages, in a
temporary directory removed at the end. Then, for 1, 32 and 100 entities per call,
``--rounds`` rounds of ``--reads`` calls (after 20 warm-up calls): each call draws random
patients and reads them through both paths, in a random order per call (interleaved):

(a) ``OnlineReader.read(ids)`` (what ``clinml.features.online_feast.online_reader`` gives
    serving for SQLite): ``{feature: (value, recorded_at)}`` per entity;
(b) ``store.get_online_features(features=<the feature service>, entity_rows=...)
    .to_dict(include_event_timestamps=True)``: Feast's public read, to Python values
    with their timestamps, as clinml would have to call it without the reader.

p50 and p99 per round; the table shows the median round. Both paths are checked to
return the same values first. The process is pinned to one core and its start-up heap
frozen with ``gc.freeze()``, as a server's would be.

    .venv/bin/python bench/online_read_bench.py                  # ~2 minutes on 2 cores
    .venv/bin/python bench/online_read_bench.py --reads 50 --rounds 1 --no-doc   # a quick look

Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import p50_p99_ms, pinned  # noqa: E402
from bench.serving_bench import machine  # noqa: E402
from clinml.pseudonym import Pseudonymiser  # noqa: E402
from clinml.settings import Paths  # noqa: E402
from clinml.spec import load_spec  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- online-read-bench -->", "<!-- /online-read-bench -->"
KEEP_ABOVE = 1.3  # issue 21: the reader stays only if Feast's path is slower than this
WARMUP = 20
CHECKED = 200  # patients whose values both paths must agree on before timing


def _setup(work: Path, patients: int, now: datetime):
    """The readmission use case, ingested, applied and materialized by clinml's stages."""
    from clinml.features import ingest
    from clinml.features import store as feature_store
    from clinml.features.datasets.readmission import generate

    spec = load_spec(ROOT / "configs" / "readmission.yaml")
    paths = Paths(work).usecase(spec.name)
    started = time.perf_counter()
    ingest.run(spec, paths, now, Pseudonymiser("bench-key"), frame=generate(patients, 1, now))
    store = feature_store.open_store(spec, paths)
    feature_store.apply(store, spec, paths)
    written = feature_store.materialize(store, spec, now).entities_written
    return spec, paths, store, written, time.perf_counter() - started


def _same_values(spec, reader, store, service, ids: list[str]) -> None:
    """Refuse to time two paths that do not read the same thing."""
    mine = reader.read(ids)
    response = store.get_online_features(
        features=service, entity_rows=[{spec.entity.key: i} for i in ids]
    ).to_dict()
    for i, row in enumerate(mine):
        theirs = {f: response[f][i] for f in spec.feature_names}
        ours = {f: (row or {}).get(f, (None, None))[0] for f in spec.feature_names}
        if ours != theirs:
            raise SystemExit(f"the two paths disagree on entity {ids[i]}: {ours} vs {theirs}")


def measure(patients: int, reads: int, rounds: int, sizes: list[int]) -> dict:
    from clinml.features.online_sqlite import OnlineReader

    now = datetime.now(UTC).replace(microsecond=0)
    work = Path(tempfile.mkdtemp(prefix="clinml-online-read-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        spec, paths, store, written, setup_s = _setup(work, patients, now)
        import pandas as pd

        key = spec.entity.key
        ids = pd.read_parquet(paths.features_file, columns=[key])[key].unique().tolist()
        reader = OnlineReader.for_store(store, spec)
        stack.callback(reader.close)
        service = store.get_feature_service(spec.feature_service)
        rng = random.Random(21)
        checked = rng.sample(ids, min(CHECKED, len(ids)))
        _same_values(spec, reader, store, service, checked)

        paths_read = {
            "reader": lambda batch: reader.read(batch),
            "feast": lambda batch: store.get_online_features(
                features=service, entity_rows=[{key: i} for i in batch]
            ).to_dict(include_event_timestamps=True),
        }
        gc.collect()
        gc.freeze()
        os.sync()  # the materialization's writes, flushed before reads are timed
        if len(os.sched_getaffinity(0)) > 1:
            stack.enter_context(pinned({min(os.sched_getaffinity(0))}))
        load_before = os.getloadavg()[0]
        results: dict[int, dict[str, list[tuple[float, float]]]] = {}
        started = time.perf_counter()
        for n in sizes:
            results[n] = {name: [] for name in paths_read}
            for _ in range(rounds):
                samples: dict[str, list[float]] = {name: [] for name in paths_read}
                for _ in range(WARMUP + reads):
                    batch = rng.sample(ids, n)
                    order = list(paths_read)
                    rng.shuffle(order)
                    for name in order:
                        t0 = time.perf_counter()
                        paths_read[name](batch)
                        samples[name].append(time.perf_counter() - t0)
                for name, timings in samples.items():
                    results[n][name].append(p50_p99_ms(timings[WARMUP:]))
        return {
            "results": results,
            "entities": written,
            "setup_s": setup_s,
            "measure_s": time.perf_counter() - started,
            "load": (load_before, os.getloadavg()[0]),
        }


def _median_round(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return (
        statistics.median(r[0] for r in rounds),
        statistics.median(r[1] for r in rounds),
    )


def section(run: dict, command: str, reads: int, rounds: int) -> str:
    lines, ratios = [], {}
    for n, by_path in run["results"].items():
        (r50, r99), (f50, f99) = _median_round(by_path["reader"]), _median_round(by_path["feast"])
        ratios[n] = f50 / r50
        lines.append(
            f"| {n} | {r50:.2f} / {r99:.2f} | {f50:.2f} / {f99:.2f} | "
            f"{f50 / r50:.1f}× | {f99 / r99:.1f}× |"
        )
    slowest = min(ratios.values())
    keep = slowest > KEEP_ABOVE
    decision = (
        f"**Decision: keep the reader.** Feast's public path was {slowest:.1f}× to "
        f"{max(ratios.values()):.1f}× the reader's median at every size measured, above the "
        f"issue's {KEEP_ABOVE}× bar."
        if keep
        else "**Decision: the reader does not earn its keep** at "
        + ", ".join(f"{n} entities ({r:.2f}×)" for n, r in ratios.items() if r <= KEEP_ABOVE)
        + f": Feast's public path is within the issue's {KEEP_ABOVE}× bar there. "
        "The lead decides whether to drop it."
    )
    per_round = "; ".join(
        f"{n}: "
        + ", ".join(f"{f[0] / r[0]:.1f}×" for r, f in zip(by["reader"], by["feast"], strict=True))
        for n, by in run["results"].items()
    )
    return "\n".join(
        [
            START,
            "## Online reads: clinml's SQLite reader vs. Feast's public read (issue 21)",
            "",
            f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, Python "
            f"{platform.python_version()}, with:",
            "",
            f"    {command}",
            "",
            f"The readmission cohort, {run['entities']:,} patients in a fresh SQLite online "
            f"store (ingested, applied and materialized by clinml's stages in "
            f"{run['setup_s']:.0f} s). {rounds} round(s) of {reads} calls per size after "
            f"{WARMUP} warm-up calls; each call reads the same random patients through both "
            "paths in a random order (interleaved), pinned to one core, start-up heap "
            "frozen. **clinml reader**: `clinml.features.online_sqlite.OnlineReader.read`, what "
            "serving uses on SQLite. **Feast public**: `store.get_online_features(features="
            "<feature service>, entity_rows=...).to_dict(include_event_timestamps=True)`. "
            "The feature service is fetched once, as a server would keep it (the issue-9 "
            "section's Feast figures fetch it on every call, which costs several ms more). "
            f"Both returned the same values for {CHECKED} patients before timing. p50 / p99 "
            "in ms, the median of the rounds; ratio = Feast ÷ reader.",
            "",
            "| entities per call | clinml reader p50 / p99 | Feast public p50 / p99 | "
            "p50 ratio | p99 ratio |",
            "|---:|---:|---:|---:|---:|",
            *lines,
            "",
            f"p50 ratio per round: {per_round}. Load average (1 min) "
            f"{run['load'][0]:.2f} before the timed part and {run['load'][1]:.2f} after it "
            f"({run['measure_s']:.0f} s): the machine is shared, which is why the two paths "
            "are interleaved and only their ratio is read.",
            "",
            f"Rule (issue 21): the hand-written reader, and the private Feast layout it needs "
            f"(`features/feast_internals.py`), stay only if Feast's public read is more than "
            f"{KEEP_ABOVE}× slower. {decision}",
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--reads", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 100])
    parser.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    command = (
        f".venv/bin/python bench/online_read_bench.py --patients {args.patients} "
        f"--reads {args.reads} --rounds {args.rounds} --sizes {' '.join(map(str, args.sizes))}"
    )
    run = measure(args.patients, args.reads, args.rounds, args.sizes)
    text = section(run, command, args.reads, args.rounds)
    if not args.no_doc:
        write_section(DOC, START, END, text)
    print(text)
    print(f"\nreproduce: {command}")


if __name__ == "__main__":
    main()
