"""Inline vs. split model execution, and adaptive batching on vs. off, side by side.

Serves the packaged pathology champion (run `make demo` first) three ways under
`bentoml serve`, one after another in the same run:

- inline: the model runs in the API worker (``CLINML_EXECUTION=inline``);
- split + batching: a separate model-execution service behind ``bentoml.depends``,
  with adaptive batching (``CLINML_EXECUTION=split``);
- split, no batching (``CLINML_BATCHING=false``).

The servers are pinned to core 0 and ``wrk`` (Debian's package) to core 1. Each point is
a warm-up and then three measured runs; the table has the medians. Any non-2xx answer
fails the run. Results go to docs/benchmarks.md.

    .venv/bin/python bench/execution_bench.py [--duration 5] [--home .clinml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import LOAD_CORE, SERVER_CORE, measure, rss_mib, write_lua  # noqa: E402
from clinml.serving.launch import ServiceProcess, free_port  # noqa: E402
from clinml.settings import Settings  # noqa: E402
from clinml.spec import load_spec  # noqa: E402

START, END = "<!-- execution-bench -->", "<!-- /execution-bench -->"
CONFIGS = {
    "inline": {"CLINML_EXECUTION": "inline"},
    "split + batching": {"CLINML_EXECUTION": "split", "CLINML_BATCHING": "true"},
    "split, no batching": {"CLINML_EXECUTION": "split", "CLINML_BATCHING": "false"},
}
CONCURRENCY = (1, 8, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=ROOT / ".clinml")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    settings = Settings(home=args.home.resolve())
    keys_file = settings.api_keys_path
    if not keys_file.is_file():
        sys.exit(f"no packaged model under {settings.home}: run `make demo` first")
    from clinml.serving.keys import generate_key

    secret, entry = generate_key("bench", ["predict"])
    spec = load_spec("pathology", settings.spec_dir)
    features = pd.read_parquet(settings.paths.usecase("pathology").features_file)
    sample = features[spec.feature_names].head(100)
    bodies = {
        "1 record": json.dumps({"records": sample.head(1).to_dict("records")}),
        "100 records": json.dumps({"records": sample.to_dict("records")}),
    }
    rows, memory = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {}
        for name, body in bodies.items():
            scripts[name] = write_lua(
                Path(tmp) / f"{name.replace(' ', '_')}.lua",
                body,
                {"Authorization": f"Bearer {secret}"},
            )
        base_env = dict(os.environ)
        for config, env in CONFIGS.items():
            os.environ.clear()
            os.environ.update({**base_env, **env, "CLINML_API_KEYS": json.dumps({"keys": [entry]})})
            os.sched_setaffinity(0, {SERVER_CORE})  # the server's processes inherit this
            port = free_port()
            log = settings.home / "logs" / f"execution-bench-{port}.log"
            with ServiceProcess(settings, "pathology", port, log) as served:
                os.sched_setaffinity(0, {LOAD_CORE})
                assert served._process is not None
                for payload, script in scripts.items():
                    for c in args.concurrency:
                        url = f"{served.url}/predict"
                        medians = measure(
                            url, script, c, args.duration, args.runs, max(2, args.duration // 2)
                        )
                        row = {"config": config, "payload": payload, "concurrency": c, **medians}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                memory[config] = rss_mib(served._process.pid)
            os.sched_setaffinity(0, {SERVER_CORE, LOAD_CORE})
        os.environ.clear()
        os.environ.update(base_env)
    write(pd.DataFrame(rows), memory, args)


def write(
    table: pd.DataFrame, memory: dict[str, dict[str, float]], args: argparse.Namespace
) -> None:
    lines = [
        START,
        "## Model execution: inline vs. split, batching on vs. off",
        "",
        "Reproduce: `make demo && .venv/bin/python bench/execution_bench.py"
        f" --duration {args.duration} --runs {args.runs}` (needs Debian's `wrk`).",
        "",
        "The pathology champion from `make demo`, served by `bentoml serve`, pinned to one",
        "core, with `wrk` on the other; `POST /predict`; medians of "
        f"{args.runs} runs of {args.duration} s after a warm-up. Ratios are against inline.",
        "",
        "| payload | concurrency | config | req/s | p50 ms | p99 ms | req/s vs. inline |",
        "|---|---|---|---|---|---|---|",
    ]
    for (payload, c), group in table.groupby(["payload", "concurrency"], sort=False):
        inline = float(group.loc[group.config == "inline", "rps"].iloc[0])
        for row in group.itertuples():
            lines.append(
                f"| {payload} | {c} | {row.config} | {row.rps:.0f} | {row.p50_ms:.1f} "
                f"| {row.p99_ms:.1f} | {row.rps / inline:.2f}× |"
            )
    lines += ["", "Resident memory after the run (MiB):", ""]
    lines += ["| config | process | RSS MiB |", "|---|---|---|"]
    for config, processes in memory.items():
        for process, mib in sorted(processes.items()):
            lines.append(f"| {config} | {process} | {mib:.0f} |")
    lines.append(END)
    write_section(args.doc, START, END, "\n".join(lines))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
