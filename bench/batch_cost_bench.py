"""Where a 1,000-record request's time goes: the model call against the rest (issue 22).

Loads the readmission gbm champion of the serving bench's home (``.clinml-bench``, made
by ``bench/serving_bench.py`` on first use) as the peers serve it (the joblib export in
``peers/models``), pins this process to one core and times, median of ``--repeats``:
clinml's encoding of the records and its model call (the compiled fast path, which hands
a batch this large to scikit-learn's own tree predictor), scikit-learn's model alone on
the same encoded rows, and what a peer does per request (a DataFrame from the records,
then the whole pipeline). The serving bench's req/s for the same payload, set beside
these, shows how much of a request is the model, which no server can skip.

    .venv/bin/python bench/batch_cost_bench.py          # a few seconds, after serving_bench

Prints; writes nothing. Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import serving_bench  # noqa: E402
from clinml.serving.fastpath import compile_model  # noqa: E402


def _ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    import joblib
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    home = (ROOT / ".clinml-bench").resolve()
    champion = serving_bench.prepare(home, "readmission", "gbm", 5000)
    exported = (
        home / "peers" / "models" / f"{champion.spec.name}-v{champion.version}" / "model.joblib"
    )
    if not exported.is_file():
        sys.exit(
            f"no exported model at {exported}: run bench/serving_bench.py --servers ours kserve first"
        )
    pipeline = joblib.load(exported)
    compiled = compile_model(pipeline, device="cpu")
    records = serving_bench.sample_records(champion, args.records)
    names = champion.spec.feature_names
    encoded = compiled.encode_records(records)
    os.sched_setaffinity(0, {0})
    rows = {
        "clinml: encode the records": _ms(lambda: compiled.encode_records(records), args.repeats),
        "clinml: model call": _ms(lambda: compiled.predict_proba(encoded), args.repeats),
        "scikit-learn's model alone, encoded rows": _ms(
            lambda: pipeline[-1].predict_proba(encoded), args.repeats
        ),
        "a peer: DataFrame from the records": _ms(
            lambda: pd.DataFrame(records, columns=names), args.repeats
        ),
        "a peer: the pipeline on the DataFrame": _ms(
            lambda: pipeline.predict_proba(pd.DataFrame(records, columns=names)), args.repeats
        ),
    }
    print(f"{args.records} records, {champion.spec.name} v{champion.version}, one core, median ms:")
    for name, ms in rows.items():
        print(f"  {name:45s} {ms:7.2f}")


if __name__ == "__main__":
    main()
