"""``POST /predict`` with a shadow version on and off, one server, side by side (issue 24).

One bench home holds the readmission champion (``bench.serving_bench.prepare``: one
candidate kind, clinml's own training) and a second version of the same spec, trained by
``clinml train`` and registered as the challenger, which is the version shadowed. One
service, as deployed (inline execution, adaptive batching, auth, the audit trail and the
prediction log on), runs on the server core and ``wrk`` on the load core
(``bench/loadgen.py``). The rounds alternate the order of ``off`` and ``on``; between
them ``clinml shadow start`` / ``stop`` and ``POST /admin/reload`` switch the shadow
without restarting the server, so both conditions meet the same process, the same
caches and the same machine state. Each point is the median over the rounds; the report
gives on ÷ off for req/s and p99, and how much of the traffic the shadow scored (its
requests scored ÷ requests answered, from ``/metrics``): the shadow's queue drops
requests rather than slow the champion, so a point where it dropped most of them says
so. Nothing asserts on timing::

    .venv/bin/python bench/shadow_bench.py --doc docs/benchmarks.md
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
from bench.loadgen import LOAD_CORE, measure, pinned, write_lua  # noqa: E402
from bench.serving_bench import (  # noqa: E402
    BenchError,
    Champion,
    _server_env,
    ensure_wrk,
    log_rows_dropped,
    machine,
    metric,
    payload_label,
    prepare,
    sample_records,
    serve,
)

SECTION = "shadow-bench"
GOAL_RPS, GOAL_P99 = 0.80, 1.30  # shadow on keeps >= 80% of req/s, p99 <= 1.3x


def _clinml(champion: Champion, *args: str) -> subprocess.CompletedProcess[str]:
    settings = champion.settings
    env = {
        **os.environ,
        "CLINML_HOME": str(settings.home),
        "CLINML_CONFIG_DIR": str(settings.home / "configs"),
    }
    return subprocess.run(
        [str(Path(sys.executable).with_name("clinml")), *args],
        env=env,
        capture_output=True,
        text=True,
    )


def ensure_challenger(champion: Champion) -> str:
    """A second registered version of the champion's spec (the challenger), trained by
    ``clinml train`` when the home has none; returns its version."""
    from clinml.training.tracking import Tracker

    tracker = Tracker.from_settings(champion.settings)
    name = champion.spec.name
    aliases = tracker.client.get_registered_model(name).aliases or {}
    challenger = aliases.get("challenger")
    if challenger is None or str(challenger) == champion.version:
        print(f"training a second {name} version to shadow: clinml train {name}", flush=True)
        done = _clinml(champion, "train", name)
        if done.returncode != 0:
            raise BenchError(f"`clinml train {name}` failed:\n{done.stdout[-2000:]}{done.stderr}")
        aliases = tracker.client.get_registered_model(name).aliases or {}
        challenger = aliases["challenger"]
    return str(challenger)


def switch(champion: Champion, url: str, secret: str, on: bool, version: str) -> None:
    """Shadow ``version`` (or stop), and have the server take it up now."""
    import httpx

    name = champion.spec.name
    done = _clinml(champion, "shadow", "status", name)
    shadowing = done.returncode == 0 and "no shadow version" not in done.stdout
    if on and not shadowing:
        done = _clinml(champion, "shadow", "start", name, "--version", version, "--reason", "bench")
    elif not on and shadowing:
        done = _clinml(champion, "shadow", "stop", name, "--reason", "bench")
    if done.returncode != 0:
        raise BenchError(f"clinml shadow: {done.stdout}{done.stderr}")
    reloaded = httpx.post(
        f"{url}/admin/reload", headers={"Authorization": f"Bearer {secret}"}, timeout=600
    )
    if reloaded.status_code != 200:
        raise BenchError(f"POST /admin/reload: {reloaded.status_code} {reloaded.text}")


def _until_the_shadow_scores(url: str, secret: str, record: dict[str, Any]) -> None:
    """Send single requests until the shadow has scored one, so that the points measure
    a running shadow, not its start."""
    import time

    import httpx

    headers = {"Authorization": f"Bearer {secret}"}
    name = "clinml_shadow_scored_total"
    before = metric(url, name, secret)
    deadline = time.monotonic() + 600
    while metric(url, name, secret) <= before:
        if time.monotonic() > deadline:
            raise BenchError("the shadow scored nothing within 600 s of its start")
        httpx.post(f"{url}/predict", json={"records": [record]}, headers=headers, timeout=60)
        time.sleep(0.2)


def one_round(
    condition: str,
    champion: Champion,
    url: str,
    secret: str,
    args: argparse.Namespace,
    scripts: dict[int, Path],
    version: str,
    server_pid: int,
    record: dict[str, Any],
) -> list[dict[str, Any]]:
    switch(champion, url, secret, condition == "on", version)
    if condition == "on":
        _until_the_shadow_scores(url, secret, record)
    rows = []
    warmup = max(1, args.duration // 2)
    for n, script in scripts.items():
        for c in args.concurrency:
            before = {
                key: metric(url, f"clinml_shadow_{key}_total", secret)
                for key in ("scored", "dropped", "errors")
            }
            dropped = log_rows_dropped(url, secret)
            with pinned({LOAD_CORE}):
                medians = measure(f"{url}/predict", script, c, args.duration, 1, warmup, server_pid)
            row = {"condition": condition, "payload": payload_label(n), "concurrency": c}
            row |= medians
            for key, value in before.items():
                row[f"shadow_{key}"] = metric(url, f"clinml_shadow_{key}_total", secret) - value
            row["log_dropped_rows"] = log_rows_dropped(url, secret) - dropped
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace, kind: str) -> str:
    def median(condition: str, payload: str, c: int, key: str) -> float:
        return statistics.median(
            r[key]
            for r in rows
            if r["condition"] == condition and r["payload"] == payload and r["concurrency"] == c
        )

    def total(condition: str, payload: str, c: int, key: str) -> float:
        return sum(
            r[key]
            for r in rows
            if r["condition"] == condition and r["payload"] == payload and r["concurrency"] == c
        )

    lines = [
        f"<!-- {SECTION} -->",
        "## Shadow scoring's cost to the champion (issue 24)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine()}. One service (readmission `{kind}` "
        "champion; a second version of the same spec shadowed), inline execution and "
        "adaptive batching, auth, audit and the prediction log on; server on core 0, `wrk` "
        f"on core 1; {args.rounds} rounds alternating whether the shadow is off or on first "
        "(switched by `clinml shadow start/stop` and `POST /admin/reload`, no restart), "
        f"{args.duration} s per point after a warm-up; medians over the rounds. Goal: with "
        f"the shadow on, at least {GOAL_RPS:.0%} of the req/s and a p99 at most "
        f"{GOAL_P99:g}× the shadow-off one. Shadow coverage: of the requests answered "
        "while the shadow was on (warm-up included), the share it scored; its queue "
        "dropped the rest rather than slow an answer.",
        "",
        "| records per request | concurrency | off req/s | on req/s | on ÷ off | off p99 ms "
        "| on p99 ms | on ÷ off | off CPU ms/request | on CPU ms/request | shadow coverage "
        "| goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.payloads:
        payload = payload_label(n)
        for c in args.concurrency:
            off_rps, on_rps = median("off", payload, c, "rps"), median("on", payload, c, "rps")
            off_p99, on_p99 = (
                median("off", payload, c, "p99_ms"),
                median("on", payload, c, "p99_ms"),
            )
            off_cpu, on_cpu = (
                median("off", payload, c, "cpu_ms"),
                median("on", payload, c, "cpu_ms"),
            )
            scored = total("on", payload, c, "shadow_scored")
            offered = scored + total("on", payload, c, "shadow_dropped")
            met = on_rps / off_rps >= GOAL_RPS and on_p99 / off_p99 <= GOAL_P99
            lines.append(
                f"| {n} | {c} | {off_rps:.0f} | {on_rps:.0f} | {on_rps / off_rps:.2f} "
                f"| {off_p99:.1f} | {on_p99:.1f} | {on_p99 / off_p99:.2f} "
                f"| {off_cpu:.2f} | {on_cpu:.2f} | {scored / offered:.0%} "
                f"| {'met' if met else 'MISSED'} |"
            )
    errors = sum(r["shadow_errors"] for r in rows)
    stray = sum(r["shadow_scored"] for r in rows if r["condition"] == "off")
    dropped_rows = sum(r["log_dropped_rows"] for r in rows)
    lines += [
        "",
        f"Shadow errors over the run: {errors:.0f}; shadow requests scored while it was off "
        f"(should be 0): {stray:.0f}; prediction-log rows dropped: {dropped_rows:.0f}.",
        "",
        "Reproduce: `.venv/bin/python bench/shadow_bench.py "
        f"--rounds {args.rounds} --duration {args.duration} "
        f"--payloads {' '.join(map(str, args.payloads))} "
        f"--concurrency {' '.join(map(str, args.concurrency))} --doc docs/benchmarks.md`",
        f"<!-- /{SECTION} -->",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=ROOT / ".clinml-bench-shadow")
    parser.add_argument("--usecase", default="readmission")
    parser.add_argument("--kind", default="gbm")
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--duration", type=int, default=8, help="seconds per point")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--payloads", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--doc", type=Path, default=None)
    args = parser.parse_args(argv)
    from clinml.serving.keys import generate_key

    ensure_wrk()
    os.environ.update(_server_env())
    champion = prepare(args.home.resolve(), args.usecase, args.kind, args.patients)
    version = ensure_challenger(champion)
    secret, entry = generate_key("bench", ["predict", "admin"])
    api_keys = json.dumps({"keys": [entry]})
    records = sample_records(champion, max(args.payloads))
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve("ours", champion, api_keys, max(args.payloads)) as running,
    ):
        scripts = {
            n: write_lua(
                Path(tmp) / f"{n}.lua",
                json.dumps({"records": records[:n]}),
                {"Authorization": f"Bearer {secret}"},
            )
            for n in args.payloads
        }
        try:
            for i in range(args.rounds):
                for condition in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    rows += one_round(
                        condition, champion, running.url, secret, args, scripts, version,
                        running.pid, records[0],
                    )  # fmt: skip
        finally:
            switch(champion, running.url, secret, False, version)
    section = report(rows, args, args.kind)
    print(section)
    if args.doc is not None:
        write_section(args.doc, f"<!-- {SECTION} -->", f"<!-- /{SECTION} -->", section)
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
