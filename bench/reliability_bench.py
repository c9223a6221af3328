"""clinml's service under sustained load, a soak, overload and hostile input (issue 8).

One server, ``ours`` as ``bench/serving_bench.py`` starts it (the gbm champion of the
pathology use case, inline execution, batching on), on core 0; ``wrk`` and a Python
probe on core 1. Four parts, each one run:

``load``      ``POST /predict`` (one record) at concurrency 64 for ``--load-s`` seconds
              (60). Every answer must be a 2xx and no socket may fail. Its req/s is the
              peak the soak is measured against.
``soak``      ``--soak-s`` seconds (600) at half of that peak (wrk connections that wait
              between requests), in windows of ``--window-s`` (30): each window's req/s,
              p99 and the worker's resident memory. Targets: memory grows at most 10% and
              p99 drifts at most 20% between the first and the last windows (the medians
              of three at each end; the first window is the warm-up).
``overload``  A closed loop of ``--overload-connections`` (1024) connections sending
              100-record requests, well past capacity, for ``--overload-s`` (20), with the
              load shedding on (``CLINML_MAX_IN_FLIGHT=128``, the default) and off (0), one
              server each (``--limits`` chooses other values). Alongside, a probe sends one request every 50 ms with a 2 s
              deadline, as a caller with a deadline would, before, during and after: what
              it got (answer, 429, timeout), how fast, and how long after the burst ends
              its answers are back to normal (three in a row within twice the calm p50).
``hostile``   Bodies an attacker or a broken client sends, each 20 times: the median
              time to its 4xx against a valid one-record request's, and the worker's
              memory after them all.

    .venv/bin/python bench/reliability_bench.py --doc docs/benchmarks.md  # about 16 minutes
    .venv/bin/python bench/reliability_bench.py --only load overload --load-s 10 --overload-s 5

The bench home is shared with serving_bench.py (``.clinml-bench``). Nothing here asserts
on timing; a failed request under ``load`` or ``soak`` fails the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import LOAD_CORE, LoadError, percentile, pinned, rss_mib, write_lua  # noqa: E402
from bench.serving_bench import (  # noqa: E402
    BenchError,
    Champion,
    ensure_wrk,
    environ,
    machine,
    prepare,
    sample_records,
    serve,
)
from clinml.errors import ClinmlError  # noqa: E402

START, END = "<!-- reliability-bench -->", "<!-- /reliability-bench -->"
PARTS = ("load", "soak", "overload", "hostile")
WORKER = "API worker"
TARGETS = {"memory_growth": 0.10, "p99_drift": 0.20}
PROBE_EVERY_S, PROBE_DEADLINE_S = 0.05, 2.0


def wrk_run(url: str, script: Path, connections: int, seconds: int, timeout_s: int = 10):
    """One wrk run pinned to the load core, counting failures instead of raising."""
    import subprocess

    command = [
        "taskset", "-c", str(LOAD_CORE), "wrk", "--latency", "-t1", f"-c{connections}",
        f"-d{seconds}s", "--timeout", f"{timeout_s}s", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LoadError(f"wrk exited with status {done.returncode}:\n{done.stdout}{done.stderr}")
    out = done.stdout
    found = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None or rps is None:
        raise LoadError(f"unexpected wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "requests": int(found.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": percentile(out, "50") * 1000,
        "p99_ms": percentile(out, "99") * 1000,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(g) for g in sockets.groups()) if sockets else 0,
        "timeouts": int(sockets.group(4)) if sockets else 0,
    }


def paced_script(path: Path, body: str, headers: dict[str, str], delay_ms: int) -> Path:
    """A wrk script whose connections each wait ``delay_ms`` before every request."""
    write_lua(path, body, headers)
    with path.open("a") as script:
        script.write(f"\nfunction delay()\n  return {delay_ms}\nend\n")
    return path


def worker_mib(pid: int) -> float:
    return rss_mib(pid).get(WORKER, 0.0)


# -- the parts ---------------------------------------------------------------------------


def part_load(url: str, pid: int, script: Path, args: argparse.Namespace) -> dict[str, Any]:
    wrk_run(url, script, 64, 5)  # warm-up
    result = wrk_run(url, script, 64, args.load_s)
    result["worker_mib"] = worker_mib(pid)
    print(json.dumps({"load": result}), flush=True)
    if result["non_2xx"] or result["socket_errors"]:
        raise LoadError(f"failed requests at concurrency 64: {result}")
    return result


def part_soak(
    url: str, pid: int, body: str, headers: dict[str, str], peak_rps: float, tmp: Path, args
) -> dict[str, Any]:
    connections = 16
    target = peak_rps / 2
    delay_ms = max(1, round(connections * 1000 / target) - 1)  # ~1 ms to answer at this load
    script = paced_script(tmp / "paced.lua", body, headers, delay_ms)
    windows = []
    for i in range(max(2, args.soak_s // args.window_s)):
        point = wrk_run(url, script, connections, args.window_s)
        point["worker_mib"] = worker_mib(pid)
        point["window"] = i
        windows.append(point)
        print(json.dumps({"soak": point}), flush=True)
        if point["non_2xx"] or point["socket_errors"]:
            raise LoadError(f"failed requests in soak window {i}: {point}")
    measured = windows[1:]  # the first window warms up
    ends = min(3, len(measured) // 2) or 1
    first, last = measured[:ends], measured[-ends:]

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    return {
        "target_rps": target,
        "connections": connections,
        "delay_ms": delay_ms,
        "windows": windows,
        "memory_first": median(first, "worker_mib"),
        "memory_last": median(last, "worker_mib"),
        "p99_first": median(first, "p99_ms"),
        "p99_last": median(last, "p99_ms"),
        "rps_mean": statistics.mean(w["rps"] for w in measured),
        "requests": sum(w["requests"] for w in windows),
    }


class Probe:
    """One request every PROBE_EVERY_S with a PROBE_DEADLINE_S deadline, in a thread;
    records (sent at, status or 0 for a timeout, seconds taken)."""

    def __init__(self, url: str, body: str, headers: dict[str, str]):
        self.url, self.body = url, body
        self.headers = {**headers, "Content-Type": "application/json"}
        self.calls: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with pinned({LOAD_CORE}), httpx.Client(timeout=PROBE_DEADLINE_S) as http:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    status = http.post(
                        self.url, content=self.body, headers=self.headers
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                self.calls.append((sent, status, time.monotonic() - sent))
                self._stop.wait(max(0.0, PROBE_EVERY_S - (time.monotonic() - sent)))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> list[tuple[float, int, float]]:
        return [c for c in self.calls if start <= c[0] < end]


def _summary(calls: list[tuple[float, int, float]]) -> dict[str, Any]:
    answered = [took for _, status, took in calls if status == 200]
    shed = [took for _, status, took in calls if status == 429]
    ms = 1000.0
    return {
        "calls": len(calls),
        "answered": len(answered),
        "shed_429": len(shed),
        "timeouts": sum(1 for _, status, _ in calls if status == 0),
        "other": sum(1 for _, status, _ in calls if status not in (0, 200, 429)),
        "answered_p50_ms": statistics.median(answered) * ms if answered else None,
        "answered_max_ms": max(answered) * ms if answered else None,
        "shed_p50_ms": statistics.median(shed) * ms if shed else None,
    }


def overload_once(
    champion: Champion, api_keys: str, secret: str, limit: int, tmp: Path, args
) -> dict[str, Any]:
    records = sample_records(champion, 100)
    headers = {"Authorization": f"Bearer {secret}"}
    heavy = write_lua(tmp / "heavy.lua", json.dumps({"records": records}), headers)
    light = json.dumps({"records": records[:1]})
    with (
        environ({**os.environ, "CLINML_MAX_IN_FLIGHT": str(limit)}),
        serve("ours", champion, api_keys) as running,
    ):
        url = running.url + "/predict"
        with Probe(url, light, headers) as probe:
            time.sleep(3)
            calm_end = time.monotonic()
            burst = wrk_run(url, heavy, args.overload_connections, args.overload_s, 2)
            burst_end = time.monotonic()
            time.sleep(args.recovery_s)
        print(json.dumps({"overload": {"limit": limit, "wrk": burst}}), flush=True)
        calm = _summary(probe.between(0, calm_end))
        during = _summary(probe.between(calm_end, burst_end))
        after_calls = probe.between(burst_end, float("inf"))
        normal = 2 * (calm["answered_p50_ms"] or 1.0) / 1000
        recovered_s = None
        for i in range(len(after_calls) - 2):
            window = after_calls[i : i + 3]
            if all(status == 200 and took <= normal for _, status, took in window):
                recovered_s = window[0][0] - burst_end
                break
        return {
            "limit": limit,
            "wrk": burst,
            "calm": calm,
            "during": during,
            "after": _summary(after_calls),
            "recovered_s": recovered_s,
            "worker_mib": worker_mib(running.pid),
        }


HOSTILE_REPEATS = 20


def hostile_bodies(records: list[dict[str, Any]], max_body: int) -> dict[str, tuple[str, bytes]]:
    """name -> (content type, body)."""
    import pickle

    depth = (max_body - 20) // 2
    one = records[0]
    first = next(iter(one))
    nan = json.dumps({"records": [{**one, first: "@"}]}).replace('"@"', "NaN")
    return {
        "valid, 1 record (reference)": ("application/json", json.dumps({"records": [one]}).encode()),
        "NaN in a feature": ("application/json", nan.encode()),
        "a string in a number": ("application/json", json.dumps({"records": [{**one, first: "x"}]}).encode()),
        "an extra field": ("application/json", json.dumps({"records": [{**one, "mrn": 1}]}).encode()),
        "10 MB body": ("application/json", b'{"records": [' + b" " * (10 << 20) + b"]}"),
        "100 000 records": ("application/json", json.dumps({"records": [one] * 100_000}).encode()),
        "100 000 empty records": ("application/json", json.dumps({"records": [{}] * 100_000}).encode()),
        "lists nested to the body limit": ("application/json", b'{"records": ' + b"[" * depth + b"]" * depth + b"}"),
        "a pickle": ("application/python-pickle", pickle.dumps({"records": [one]})),
    }  # fmt: skip


def part_hostile(url: str, pid: int, secret: str, records, max_body: int) -> dict[str, Any]:
    import httpx

    before = worker_mib(pid)
    rows = []
    with pinned({LOAD_CORE}), httpx.Client(timeout=60) as http:
        for name, (content_type, body) in hostile_bodies(records, max_body).items():
            headers = {"Authorization": f"Bearer {secret}", "Content-Type": content_type}
            times, statuses = [], set()
            for _ in range(HOSTILE_REPEATS):
                sent = time.perf_counter()
                statuses.add(http.post(url, content=body, headers=headers).status_code)
                times.append(time.perf_counter() - sent)
            rows.append(
                {
                    "body": name,
                    "bytes": len(body),
                    "status": sorted(statuses),
                    "median_ms": statistics.median(times) * 1000,
                }
            )
            print(json.dumps({"hostile": rows[-1]}), flush=True)
    return {"rows": rows, "worker_before_mib": before, "worker_after_mib": worker_mib(pid)}


# -- the report ----------------------------------------------------------------------------


def _mark(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [START, "## Reliability: load, soak, overload, hostile input (issue 8)", ""]
    lines += [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}: `ours` (the pathology gbm "
        "champion, inline execution, batching on) on core 0, wrk and the probe on core 1.",
        "",
        f"    {reproduce(args)}",
        "",
    ]
    load = results.get("load")
    if load:
        lines += [
            "### Sustained load",
            "",
            f"`POST /predict`, one record, concurrency 64 for {args.load_s} s: "
            f"{load['requests']:,} requests, {load['rps']:.0f} req/s, p50 {load['p50_ms']:.1f} ms, "
            f"p99 {load['p99_ms']:.1f} ms; **{load['non_2xx']} non-2xx answers and "
            f"{load['socket_errors']} socket errors** "
            f"({_mark(load['non_2xx'] == 0 and load['socket_errors'] == 0)}: zero failures). "
            f"Worker memory after it: {load['worker_mib']:.0f} MiB.",
            "",
        ]
    soak = results.get("soak")
    if soak:
        growth = soak["memory_last"] / soak["memory_first"] - 1
        drift = soak["p99_last"] / soak["p99_first"] - 1
        lines += [
            "### Soak",
            "",
            f"{args.soak_s} s at half of that peak ({soak['target_rps']:.0f} req/s aimed: "
            f"{soak['connections']} connections each waiting {soak['delay_ms']} ms between "
            f"requests; {soak['rps_mean']:.0f} req/s measured), {soak['requests']:,} requests, "
            "none failed.",
            "",
            "| | first windows | last windows | change | target |",
            "|---|---:|---:|---:|---|",
            f"| worker memory (MiB) | {soak['memory_first']:.1f} | {soak['memory_last']:.1f} | "
            f"{growth:+.1%} | ≤ +10%: {_mark(growth <= TARGETS['memory_growth'])} |",
            f"| p99 (ms) | {soak['p99_first']:.2f} | {soak['p99_last']:.2f} | {drift:+.1%} | "
            f"≤ +20%: {_mark(drift <= TARGETS['p99_drift'])} |",
            "",
            "Every window (req/s, p99 ms, worker MiB): "
            + "; ".join(
                f"{w['window']}: {w['rps']:.0f}, {w['p99_ms']:.2f}, {w['worker_mib']:.1f}"
                for w in soak["windows"]
            )
            + ".",
            "",
        ]
    overload = results.get("overload")
    if overload:
        lines += [
            "### Overload",
            "",
            f"{args.overload_connections} connections sending 100-record requests for "
            f"{args.overload_s} s (wrk's deadline 2 s), with the probe (one 1-record request "
            f"every {PROBE_EVERY_S * 1000:.0f} ms, deadline {PROBE_DEADLINE_S:.0f} s) before, "
            f"during and {args.recovery_s} s after.",
            "",
            "| shedding | wrk: 2xx/s | wrk: refused (429) | wrk: timed out | probe during: answered / 429 / timed out | probe answered p50 (ms) | probe 429 p50 (ms) | back to normal after the burst | worker MiB |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for run in overload:
            wrk = run["wrk"]
            ok_rps = (wrk["requests"] - wrk["non_2xx"]) / args.overload_s
            during = run["during"]
            label = f"on ({run['limit']} in flight)" if run["limit"] else "off"
            recovered = (
                "not within the window"
                if run["recovered_s"] is None
                else f"{run['recovered_s']:.2f} s"
            )
            lines.append(
                f"| {label} | {ok_rps:.0f} | {wrk['non_2xx']:,} | {wrk['timeouts']:,} | "
                f"{during['answered']} / {during['shed_429']} / {during['timeouts']} of {during['calls']} | "
                f"{_ms(during['answered_p50_ms'])} | {_ms(during['shed_p50_ms'])} | {recovered} | "
                f"{run['worker_mib']:.0f} |"
            )  # fmt: skip
        lines += [
            "",
            "Calm p50 of the probe before the burst: "
            + ", ".join(
                f"{_ms(run['calm']['answered_p50_ms'])} ms (shedding {'on' if run['limit'] else 'off'})"
                for run in overload
            )
            + ".",
            "",
        ]
    hostile = results.get("hostile")
    if hostile:
        reference = hostile["rows"][0]["median_ms"]
        lines += [
            "### Hostile input",
            "",
            f"Each body {HOSTILE_REPEATS} times, one after another; the median time to the "
            "answer, and that time over a valid one-record request's.",
            "",
            "| body | bytes | status | median (ms) | × valid request |",
            "|---|---:|---|---:|---:|",
        ]
        for row in hostile["rows"]:
            lines.append(
                f"| {row['body']} | {row['bytes']:,} | {', '.join(map(str, row['status']))} | "
                f"{row['median_ms']:.1f} | {row['median_ms'] / reference:.1f} |"
            )
        lines += [
            "",
            f"Worker memory: {hostile['worker_before_mib']:.0f} MiB before, "
            f"{hostile['worker_after_mib']:.0f} MiB after them all.",
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def reproduce(args: argparse.Namespace) -> str:
    parts = "" if set(args.only) == set(PARTS) else " --only " + " ".join(args.only)
    return (
        f".venv/bin/python bench/reliability_bench.py{parts} --load-s {args.load_s} "
        f"--soak-s {args.soak_s} --window-s {args.window_s} --overload-s {args.overload_s} "
        f"--overload-connections {args.overload_connections} "
        f"--limits {' '.join(map(str, args.limits))} --doc docs/benchmarks.md"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--home", type=Path, default=ROOT / ".clinml-bench")
    parser.add_argument("--load-s", type=int, default=60)
    parser.add_argument("--soak-s", type=int, default=600)
    parser.add_argument("--window-s", type=int, default=30)
    parser.add_argument("--overload-s", type=int, default=20)
    parser.add_argument("--overload-connections", type=int, default=1024)
    parser.add_argument("--recovery-s", type=int, default=8)
    parser.add_argument(
        "--limits",
        type=int,
        nargs="+",
        default=[128, 0],
        help="CLINML_MAX_IN_FLIGHT values for the overload part, one server each (0: off)",
    )
    parser.add_argument("--doc", type=Path, default=None, help="write the report into this file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    from clinml.serving.keys import generate_key
    from clinml.settings import Settings

    ensure_wrk()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    champion = prepare(args.home.resolve(), "pathology", "gbm", None)
    secret, entry = generate_key("bench", ["predict"])
    api_keys = json.dumps({"keys": [entry]})
    headers = {"Authorization": f"Bearer {secret}"}
    records = sample_records(champion, 100)
    body = json.dumps({"records": records[:1]})
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        script = write_lua(tmp / "one.lua", body, headers)
        if {"load", "soak", "hostile"} & set(args.only):
            with serve("ours", champion, api_keys) as running:
                url = running.url + "/predict"
                if "load" in args.only or "soak" in args.only:
                    results["load"] = part_load(url, running.pid, script, args)
                if "soak" in args.only:
                    peak = results["load"]["rps"]
                    results["soak"] = part_soak(url, running.pid, body, headers, peak, tmp, args)
                if "hostile" in args.only:
                    max_body = Settings().max_body_bytes
                    results["hostile"] = part_hostile(url, running.pid, secret, records, max_body)
        if "overload" in args.only:
            results["overload"] = [
                overload_once(champion, api_keys, secret, limit, tmp, args) for limit in args.limits
            ]
    section = report(results, args)
    print(section)
    if args.doc is not None:
        write_section(args.doc, START, END, section)
        print(f"wrote {args.doc}")
    return section


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except (BenchError, LoadError, ClinmlError) as exc:
        sys.exit(f"reliability bench failed: {exc}")


if __name__ == "__main__":
    main()
