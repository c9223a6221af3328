"""The service before and after a change to its code, side by side in one run (issue 21).

``--before DIR`` is a checkout of the earlier commit (``git worktree add /tmp/before
REV``). One champion is trained by the earlier code (so both can serve it: the current
code reads models saved before the one-package layout), then both services answer the
same ``POST /predict`` of the same records, in rounds that alternate which goes first:

``before``  ``bentoml serve`` of DIR's service (``clinml.serving.service`` in the
            one-package layout, ``serving.service`` before it), run from DIR with DIR
            first on ``PYTHONPATH`` (BentoML puts the working folder first on the path);
``after``   this checkout's service, as ``clinml serve`` starts it.

Each server runs on core 0 and ``wrk`` on core 1 (``bench/loadgen.py``), inline execution
and adaptive batching on, auth, audit and the prediction log on, as deployed. Each point
is the median over the rounds; the report gives after ÷ before. Nothing asserts on
timing::

    git worktree add /tmp/before 7ca3b7f
    .venv/bin/python bench/refactor_bench.py --before /tmp/before --doc docs/benchmarks.md

``--section NAME --title TEXT`` write the table to its own section of the doc, for a
before/after of another change (``--section single-record --title "..."``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import SERVER_CORE, measure, pinned, write_lua  # noqa: E402
from bench.serving_bench import (  # noqa: E402
    STARTUP_TIMEOUT_S,
    Background,
    BenchError,
    Champion,
    _champion_version,
    _server_env,
    bench_spec,
    ensure_wrk,
    log_rows_dropped,
    machine,
    payload_label,
    sample_records,
)
from clinml.serving.launch import ServiceProcess, free_port, service_env  # noqa: E402
from clinml.settings import Settings  # noqa: E402
from clinml.spec import load_spec  # noqa: E402

SECTION = "refactor-bench"
TITLE = "The serving layer before and after issue 21's refactoring"


def layout(before: Path) -> tuple[str, str]:
    """The service import path and the CLI module of the checkout in ``before``."""
    if (before / "clinml" / "__init__.py").is_file():  # the one-package layout (issue 21)
        return "clinml.serving.service:ClinicalService", "clinml.pipelines.cli"
    return "serving.service:ClinicalService", "pipelines.cli"


def prepare(home: Path, before: Path, usecase: str, kind: str, n_patients: int) -> Champion:
    """The ``kind`` champion of ``usecase`` in ``home``, trained by the earlier code."""
    import yaml

    config_dir = home / "configs"
    settings = Settings(home=home, config_dir=config_dir)
    spec = bench_spec(load_spec(usecase, ROOT / "configs"), kind, n_patients)
    spec_file = config_dir / f"{spec.name}.yaml"
    version = _champion_version(settings, spec.name)
    if version is None:
        config_dir.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        log = home / "logs" / f"prepare-{spec.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "CLINML_HOME": str(home),
            "CLINML_CONFIG_DIR": str(config_dir),
            "PYTHONPATH": str(before),
        }
        cli = [sys.executable, "-c", f"from {layout(before)[1]} import main; main()"]
        print(f"training {spec.name} with the code in {before} (log: {log})", flush=True)
        with log.open("wb") as out:
            for step in (
                ["run", str(spec_file)],
                ["promote", str(spec_file), "--force", "--reason", "refactor benchmark"],
                ["package", str(spec_file)],
            ):
                done = subprocess.run(
                    [*cli, *step], env=env, cwd=before, stdout=out, stderr=subprocess.STDOUT
                )
                if done.returncode not in (0, 1) or (done.returncode and step[0] != "run"):
                    raise BenchError(f"`clinml {' '.join(step)}` failed; see {log}")
                if step[0] == "run" and done.returncode == 0:
                    break  # promoted and packaged by run itself
        version = _champion_version(settings, spec.name)
        if version is None:
            raise BenchError(f"no packaged {spec.name} champion after training; see {log}")
    spec = load_spec(spec.name, config_dir)
    return Champion(kind, spec, settings, version)


def server_pid(server: Any) -> int:
    """The process that runs ``server`` (it forks the workers)."""
    pid = server.pid if isinstance(server, ServiceProcess) else server.process.pid
    if pid is None:
        raise BenchError("the server is not running")
    return int(pid)


class BeforeService(Background):
    """The earlier checkout's service: run from its folder, its code first on the path."""

    def __init__(self, before: Path, champion: Champion, port: int, env: dict[str, str]):
        command = [
            sys.executable, "-m", "bentoml", "serve", layout(before)[0],
            "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        env = {
            **service_env(champion.settings, champion.spec.name),
            **env,
            "PYTHONPATH": str(before),
        }
        log = champion.settings.home / "logs" / f"before-{port}.log"
        super().__init__(command, env, f"http://127.0.0.1:{port}/readyz", log, cwd=before)


def one_round(
    tree: str,
    champion: Champion,
    args: argparse.Namespace,
    scripts: dict[int, Path],
    api_keys: str,
) -> list[dict[str, Any]]:
    port = free_port()
    env = {"CLINML_API_KEYS": api_keys, "CLINML_EXECUTION": "inline", "CLINML_BATCHING": "true"}
    rows = []
    if tree == "before":
        server: Any = BeforeService(args.before.resolve(), champion, port, env)
    else:
        os.environ.update(env)
        log = champion.settings.home / "logs" / f"after-{port}.log"
        server = ServiceProcess(champion.settings, champion.spec.name, port, log)
    with pinned({SERVER_CORE}):
        server.start(timeout=STARTUP_TIMEOUT_S)
    try:
        base = f"http://127.0.0.1:{port}"
        warmup = max(1, args.duration // 2)
        for n, script in scripts.items():
            for c in args.concurrency:
                dropped = log_rows_dropped(base)
                medians = measure(
                    f"{base}/predict", script, c, args.duration, 1, warmup, server_pid(server)
                )
                row = {"tree": tree, "payload": payload_label(n), "concurrency": c, **medians}
                row["log_dropped_rows"] = log_rows_dropped(base) - dropped
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        server.stop()
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, rev: str) -> str:
    def median(tree: str, payload: str, c: int, key: str) -> float:
        values = [
            r[key]
            for r in rows
            if r["tree"] == tree and r["payload"] == payload and r["concurrency"] == c
        ]
        return statistics.median(values)

    what = (
        " (the six top-level packages, service.py's own route lists and import-time set-up)"
        if args.section == SECTION
        else ""
    )
    lines = [
        f"<!-- {args.section} -->",
        f"## {args.title}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine()}. `before` is commit `{rev}`{what}; "
        "`after` is this checkout. One champion (readmission "
        f"`{args.kind}`, trained by the earlier code), both services with auth, audit and "
        "the prediction log on, inline execution and adaptive batching; server on core 0, "
        f"`wrk` on core 1; {args.rounds} rounds alternating which goes first, "
        f"{args.duration} s per point after a warm-up; medians over the rounds. CPU "
        "ms/request: the CPU time (user + system) of the server's processes over a point, "
        "per request answered; on a busy shared machine it varies less than req/s.",
        "",
        "| records per request | concurrency | before req/s | after req/s | after ÷ before "
        "| before p99 ms | after p99 ms | after ÷ before "
        "| before CPU ms/request | after CPU ms/request | after ÷ before |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.payloads:
        payload = payload_label(n)
        for c in args.concurrency:
            b_rps, a_rps = median("before", payload, c, "rps"), median("after", payload, c, "rps")
            b_p99 = median("before", payload, c, "p99_ms")
            a_p99 = median("after", payload, c, "p99_ms")
            b_cpu, a_cpu = (
                median("before", payload, c, "cpu_ms"),
                median("after", payload, c, "cpu_ms"),
            )
            lines.append(
                f"| {n} | {c} | {b_rps:.0f} | {a_rps:.0f} | {a_rps / b_rps:.2f} "
                f"| {b_p99:.1f} | {a_p99:.1f} | {a_p99 / b_p99:.2f} "
                f"| {b_cpu:.2f} | {a_cpu:.2f} | {a_cpu / b_cpu:.2f} |"
            )

    def spread(tree: str) -> float:
        """The largest max ÷ min of one point's req/s over the rounds: the run's noise."""
        points: dict[tuple[str, int], list[float]] = {}
        for r in rows:
            if r["tree"] == tree:
                points.setdefault((r["payload"], r["concurrency"]), []).append(r["rps"])
        return max(max(v) / min(v) for v in points.values())

    dropped = {
        tree: sum(r.get("log_dropped_rows", 0.0) for r in rows if r["tree"] == tree)
        for tree in ("before", "after")
    }
    named = (
        ""
        if args.section == SECTION
        else f" --section {args.section} --title {json.dumps(args.title)}"
    )
    lines += [
        "",
        f"Noise in this run: one tree's req/s at one point varied over the rounds by up to "
        f"{spread('before'):.2f}× (before) and {spread('after'):.2f}× (after); a ratio "
        "inside that is no change.",
        "",
        f"Prediction-log rows dropped (its queue full) over all points and rounds: "
        f"{dropped['before']:.0f} before, {dropped['after']:.0f} after.",
        "",
        "Reproduce: `git worktree add /tmp/before "
        f"{rev} && .venv/bin/python bench/refactor_bench.py --before /tmp/before "
        f"--rounds {args.rounds} --duration {args.duration} "
        f"--payloads {' '.join(map(str, args.payloads))} "
        f"--concurrency {' '.join(map(str, args.concurrency))}{named} "
        "--doc docs/benchmarks.md`",
        f"<!-- /{args.section} -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier commit")
    parser.add_argument("--home", type=Path, default=ROOT / ".clinml-bench-refactor")
    parser.add_argument("--usecase", default="readmission")
    parser.add_argument("--kind", default="gbm")
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--duration", type=int, default=5, help="seconds per point")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--payloads", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--section", default=SECTION, help="the doc section's marker name")
    parser.add_argument("--title", default=TITLE, help="the doc section's heading")
    args = parser.parse_args(argv)
    from clinml.serving.keys import generate_key

    if not (args.before / "serving" / "service.py").is_file():
        sys.exit(f"refactor bench: {args.before} is not a clinml checkout")
    ensure_wrk()
    rev = subprocess.run(
        ["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    os.environ.update(_server_env())
    champion = prepare(args.home.resolve(), args.before.resolve(), args.usecase, args.kind,
                       args.patients)  # fmt: skip
    secret, entry = generate_key("bench", ["predict"])
    api_keys = json.dumps({"keys": [entry]})
    records = sample_records(champion, max(args.payloads))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {
            n: write_lua(
                Path(tmp) / f"{n}.lua",
                json.dumps({"records": records[:n]}),
                {"Authorization": f"Bearer {secret}"},
            )
            for n in args.payloads
        }
        for i in range(args.rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            for tree in order:
                rows += one_round(tree, champion, args, scripts, api_keys)
    section = report(rows, args, rev)
    print(section)
    if args.doc is not None:
        write_section(args.doc, f"<!-- {args.section} -->", f"<!-- /{args.section} -->", section)
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
