"""Load generation and process measurement shared by the serving benchmarks.

The benchmarks that put a server under HTTP load (``execution_bench.py``,
``serving_bench.py``) all work the same way on a 2-core machine: the server's processes
run on one core and ``wrk`` (Debian's package) on the other, each point is a warm-up and
then a few measured runs whose medians are reported, and any non-2xx answer or socket
error fails the benchmark instead of flattering it. This module holds those pieces:

    script = write_lua(tmp / "one.lua", body, {"Authorization": "Bearer ..."})
    with pinned({SERVER_CORE}):
        server = start_the_server()        # its processes inherit the affinity
    point = measure(f"{url}/predict", script, connections=8, duration=10, runs=3, warmup=5)
    memory = rss_mib(server_pid, label=bentoml_role)

Nothing here knows about clinml.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SERVER_CORE, LOAD_CORE = 0, 1
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# A Lua long string with a level-4 bracket, so a JSON body containing "]]" stays intact.
LUA = """
wrk.method = "{method}"
{headers}
wrk.body = [====[{body}]====]
"""


class LoadError(RuntimeError):
    """wrk failed, or a request failed under load (non-2xx answer or socket error)."""


def write_lua(
    path: Path, body: str, headers: dict[str, str] | None = None, method: str = "POST"
) -> Path:
    """Write a wrk script that sends ``body`` as JSON with ``headers`` on every request."""
    every = {"Content-Type": "application/json", **(headers or {})}
    lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in every.items())
    path.write_text(LUA.format(method=method, headers=lines, body=body))
    return path


def p50_p99_ms(samples_s: list[float]) -> tuple[float, float]:
    """p50 and p99 in ms of timings measured in seconds (numpy's linear interpolation)."""
    ms = np.array(samples_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def percentile(out: str, label: str) -> float:
    """A latency percentile from wrk's ``--latency`` table, in seconds."""
    found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, flags=re.M)
    if found is None:
        raise LoadError(f"no {label}% latency in wrk's output:\n{out}")
    return float(found.group(1)) * UNITS[found.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """req/s, p50 and p99 (ms) from wrk's output; raises on any failed request."""
    if "Non-2xx" in out or "Socket errors" in out:
        raise LoadError(f"wrk saw failed requests:\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise LoadError(f"no Requests/sec in wrk's output:\n{out}")
    p50, p99 = percentile(out, "50"), percentile(out, "99")
    done = re.search(r"(\d+) requests in", out)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "requests": float(done.group(1)) if done else math.nan,
    }


def wrk(
    url: str, script: Path, connections: int, duration: int, core: int = LOAD_CORE
) -> dict[str, float]:
    """One wrk run (one thread) pinned to ``core``.

    Raises:
        LoadError: wrk exited non-zero, or saw a non-2xx answer or a socket error.
    """
    command = [
        "taskset", "-c", str(core), "wrk", "--latency", "-t1", f"-c{connections}",
        f"-d{duration}s", "--timeout", "10s", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LoadError(f"wrk exited with status {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def measure(
    url: str,
    script: Path,
    connections: int,
    duration: int,
    runs: int,
    warmup: int,
    server_pid: int | None = None,
) -> dict[str, float]:
    """A warm-up run of ``warmup`` seconds, then the medians of ``runs`` measured runs.

    With ``server_pid``, also ``cpu_ms``: the CPU time (user and system) the server's
    processes used per request answered during a run. On a shared, noisy machine it
    varies less than req/s: a neighbour slows the wall clock more than it adds CPU time.
    """
    wrk(url, script, connections, warmup)
    measured = []
    for _ in range(runs):
        before = cpu_seconds(server_pid) if server_pid else 0.0
        run = wrk(url, script, connections, duration)
        if server_pid:
            run["cpu_ms"] = (cpu_seconds(server_pid) - before) * 1000 / run["requests"]
        measured.append(run)
    return {key: statistics.median(run[key] for run in measured) for key in measured[0]}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, seconds) used so far by ``pid`` and its descendants
    (those still running)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child, _, _ in process_tree(pid):
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


@contextmanager
def pinned(cores: set[int]) -> Iterator[None]:
    """Run this process on ``cores`` inside the block; a child started there inherits it."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def process_tree(pid: int) -> list[tuple[int, int, str]]:
    """``(pid, rss_kib, command line)`` of ``pid`` and every descendant."""
    listing = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,rss=,args="], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split(None, 3) for line in listing.splitlines()]
    children: dict[int, list[int]] = {}
    for pid_, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid_))
    wanted, stack = set(), [pid]
    while stack:
        current = stack.pop()
        wanted.add(current)
        stack.extend(children.get(current, []))
    return [
        (int(row[0]), int(row[2]), row[3] if len(row) > 3 else "")
        for row in rows
        if int(row[0]) in wanted
    ]


def bentoml_role(args: str) -> str:
    """The role of a ``bentoml serve`` process of clinml's, from its command line."""
    if "--service-name clinml-model" in args:
        return "model-execution worker"
    if "--service-name clinml" in args:
        return "API worker"
    return "bentoml serve (arbiter)"


def rss_mib(pid: int, label: Callable[[str], str] = bentoml_role) -> dict[str, float]:
    """Resident memory (MiB) of ``pid`` and its descendants, summed by ``label(args)``."""
    result: dict[str, float] = {}
    for _, rss_kib, args in process_tree(pid):
        name = label(args)
        result[name] = result.get(name, 0.0) + rss_kib / 1024
    return result
