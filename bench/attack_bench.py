"""What network attacks without a key, and one greedy key, cost the authenticated callers
(issue 19).

One server, ``ours`` as ``bench/serving_bench.py`` starts it (the gbm champion of the
pathology use case, inline execution, batching on, the default limits), on core 0;
``wrk``, the attackers and the clients on core 1. Two parts:

``slowloris``  ``wrk`` sends one-record ``POST /predict`` with a valid key at
               ``--connections`` (8) for ``--seconds`` (10): calm, then with
               ``--hostile`` (500) hostile connections, then calm again. The hostile
               connections are five kinds in equal numbers: a one-byte chunked JSON body
               to an open path (``/docs.json``), the same to ``/predict`` without a key,
               headers sent one byte a second, the one-byte body to ``/predict`` *with* a
               valid key of its own (it may hold its share of slots,
               ``CLINML_MAX_IN_FLIGHT_PER_KEY``, until the body timeout), and connections
               that send nothing. Two attacks: *held*, each connection kept open until
               the server closes it (after answering it, at once or at a timeout) and
               reopened ``--reopen-s`` (1) later, and *flood*, closed by the attacker as
               soon as it is answered and reopened at once (a reconnect flood, which
               also takes the load core from wrk). Goal (held): throughput at least 90%
               of calm and p99 under twice calm.
``explain``    ``wrk`` as above at 2 connections, calm and then while two clients with an
               ``explain`` key send ``/explain`` calls as large as the limit allows
               (``CLINML_MAX_EXPLAIN_RECORDS`` records, top_k 5) back to back; and how the
               1,000-record call of the finding is answered now.

    .venv/bin/python bench/attack_bench.py --doc docs/benchmarks.md   # about 4 minutes

The bench home is shared with serving_bench.py (``.clinml-bench``). Nothing here
asserts on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import LOAD_CORE, LoadError, pinned, write_lua  # noqa: E402
from bench.reliability_bench import wrk_run  # noqa: E402
from bench.serving_bench import (  # noqa: E402
    BenchError,
    ensure_wrk,
    machine,
    prepare,
    sample_records,
    serve,
)
from clinml.errors import ClinmlError  # noqa: E402

START, END = "<!-- attack-bench -->", "<!-- /attack-bench -->"
PARTS = ("slowloris", "explain")
KINDS = ("open path, slow body", "/predict, no key, slow body", "slow headers",
         "/predict, own key, slow body", "silent")  # fmt: skip
GOALS = {"rps_ratio": 0.90, "p99_ratio": 2.0}
FLOOD_NOTE = (
    "The flood is a different attack: about {rate:.0f} new connections a second, each "
    "answered at once, so it costs what answering that many requests costs (the worker's "
    "core, and the load core wrk shares with the attacker). clinml bounds what each costs; "
    "their rate is for the ingress's per-client connection and rate limits "
    "(docs/security.md, T11)."
)


class Hostile:
    """``count`` slow connections of the five KINDS, each reopened when the server closes
    it, on an event loop in a thread pinned to the load core."""

    def __init__(self, port: int, count: int, attacker_secret: str, reopen_after_s: float) -> None:
        self.port, self.count, self.secret = port, count, attacker_secret
        self.reopen_after_s = reopen_after_s
        self.opened = dict.fromkeys(KINDS, 0)
        self.answered: dict[str, dict[int, int]] = {kind: {} for kind in KINDS}
        self.open_now = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _request(self, kind: str) -> bytes:
        chunked = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        if kind == KINDS[0]:
            return b"POST /docs.json HTTP/1.1\r\nHost: x\r\n" + chunked + b"\r\n1\r\n{\r\n"
        if kind == KINDS[1]:
            return b"POST /predict HTTP/1.1\r\nHost: x\r\n" + chunked + b"\r\n1\r\n{\r\n"
        if kind == KINDS[3]:
            key = f"Authorization: Bearer {self.secret}\r\n".encode()
            return b"POST /predict HTTP/1.1\r\nHost: x\r\n" + key + chunked + b"\r\n1\r\n{\r\n"
        return b""

    async def _one(self, kind: str) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.opened[kind] += 1
            self.open_now += 1
            try:
                writer.write(self._request(kind))
                if kind == KINDS[2]:
                    drip = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: "
                    writer.write(drip)
                    read = asyncio.ensure_future(reader.read(4096))
                    while not read.done() and not self._stop.is_set():
                        writer.write(b"a")
                        await asyncio.wait([read], timeout=1.0)
                    data = read.result() if read.done() else b""
                else:
                    data = await self._read_or_stop(reader)
                if data.startswith(b"HTTP/1.1 "):
                    status = int(data.split(b" ", 2)[1])
                    self.answered[kind][status] = self.answered[kind].get(status, 0) + 1
                if (
                    self.reopen_after_s
                ):  # held: the connection stays open until the server closes it
                    while data and not self._stop.is_set():
                        data = await self._read_or_stop(reader)
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                self.open_now -= 1
                writer.close()
            if self.reopen_after_s:
                await asyncio.sleep(self.reopen_after_s)

    async def _read_or_stop(self, reader: asyncio.StreamReader) -> bytes:
        read = asyncio.ensure_future(reader.read(4096))
        while not read.done() and not self._stop.is_set():
            await asyncio.wait([read], timeout=0.5)
        if not read.done():
            read.cancel()
            return b""
        return read.result()

    def _main(self) -> None:
        async def everything() -> None:
            tasks = [
                asyncio.create_task(self._one(KINDS[i % len(KINDS)])) for i in range(self.count)
            ]
            await asyncio.gather(*tasks, return_exceptions=True)

        with pinned({LOAD_CORE}):
            asyncio.run(everything())

    def __enter__(self) -> Hostile:
        self._thread.start()
        deadline = time.monotonic() + 60
        while sum(self.opened.values()) < self.count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def sample_open(self, seconds: float) -> float:
        """The mean number of hostile connections open over ``seconds``."""
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(self.open_now)
            time.sleep(0.1)
        return sum(samples) / len(samples)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def part_slowloris(champion, api_keys: str, secrets: dict[str, str], tmp: Path, args):
    headers = {"Authorization": f"Bearer {secrets['bench']}"}
    body = json.dumps({"records": sample_records(champion, 1)})
    script = write_lua(tmp / "one.lua", body, headers)
    runs: dict[str, Any] = {}
    with serve("ours", champion, api_keys) as running:
        url = running.url + "/predict"
        port = int(running.url.rsplit(":", 1)[1])
        wrk_run(url, script, args.connections, 5)  # warm-up
        runs["calm"] = wrk_run(url, script, args.connections, args.seconds)
        for mode, reopen_after_s in (("held", args.reopen_s), ("flood", 0.0)):
            with Hostile(port, args.hostile, secrets["attacker"], reopen_after_s) as hostile:
                opened_before = sum(hostile.opened.values())
                result: dict[str, Any] = {}
                sampler = threading.Thread(
                    target=lambda h=hostile, r=result: r.update(open=h.sample_open(args.seconds))
                )
                sampler.start()
                result["wrk"] = wrk_run(url, script, args.connections, args.seconds)
                sampler.join()
                result["opened"] = dict(hostile.opened)
                result["answered"] = {k: dict(v) for k, v in hostile.answered.items()}
                result["opened_during"] = sum(hostile.opened.values()) - opened_before
            runs[mode] = result
        runs["calm_again"] = wrk_run(url, script, args.connections, args.seconds)
    return runs


def part_explain(champion, api_keys: str, secrets: dict[str, str], tmp: Path, args):
    import httpx

    from clinml.settings import Settings

    cap = Settings().max_explain_records
    records = sample_records(champion, 500)
    top_k = 5
    largest = {"records": (records * 2)[:cap], "top_k": top_k}
    finding = {"records": (records * 2)[:1000], "top_k": top_k}
    headers = {"Authorization": f"Bearer {secrets['bench']}"}
    script = write_lua(tmp / "one.lua", json.dumps({"records": records[:1]}), headers)
    explain_headers = {"Authorization": f"Bearer {secrets['analyst']}"}
    stop = threading.Event()
    calls: list[tuple[int, float]] = []

    def explainer(url: str) -> None:
        with pinned({LOAD_CORE}), httpx.Client(headers=explain_headers, timeout=120) as client:
            while not stop.is_set():
                started = time.monotonic()
                status = client.post(url, json=largest).status_code
                calls.append((status, time.monotonic() - started))

    with serve("ours", champion, api_keys) as running:
        url = running.url + "/predict"
        wrk_run(url, script, 2, 5)  # warm-up
        calm = wrk_run(url, script, 2, args.seconds)
        threads = [
            threading.Thread(target=explainer, args=(running.url + "/explain",), daemon=True)
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        time.sleep(1)
        busy = wrk_run(url, script, 2, args.seconds)
        stop.set()
        for thread in threads:
            thread.join(120)
        refused = httpx.post(
            running.url + "/explain", json=finding, headers=explain_headers, timeout=120
        )
    took = sorted(seconds for status, seconds in calls if status == 200)
    return {
        "cap": cap,
        "largest_records": len(largest["records"]),
        "calm": calm,
        "with_explain": busy,
        "explain_calls": len(calls),
        "explain_statuses": sorted({status for status, _ in calls}),
        "explain_p50_ms": took[len(took) // 2] * 1000 if took else None,
        "finding_status": refused.status_code,
        "finding_type": (refused.json().get("detail") or [{}])[0].get("type"),
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        START,
        "## Attacks without a key, and a greedy key (issue 19)",
        "",
        f"`bench/attack_bench.py` on {machine()}: the gbm champion of pathology served by "
        "`clinml serve` with the default limits on core 0; `wrk` (one-record `/predict` "
        "with a valid key), the attackers and the clients on core 1. Ratios compare runs "
        "of the same server in the same run.",
        "",
    ]
    slow = results.get("slowloris")
    if slow:
        calm, again = slow["calm"], slow["calm_again"]
        lines += [
            f"**Slow connections.** {args.hostile} hostile connections, five kinds in equal "
            "numbers (the module docstring), while wrk sends one-record `/predict` with a "
            f"valid key at {args.connections} connections for {args.seconds} s. *Held*: each "
            "hostile connection is kept open until the server closes it, and reopened "
            f"{args.reopen_s:g} s later, as an attacker holding connections open would; "
            "*flood*: closed as soon as it is answered and reopened at once, a reconnect "
            "flood that also competes with wrk for the load core.",
            "",
            "| run | hostile open (mean) | hostile opened during the run | req/s | p50 ms | "
            "p99 ms | non-2xx | req/s vs calm | p99 vs calm |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| calm | 0 | 0 | {calm['rps']:.0f} | {calm['p50_ms']:.2f} | "
            f"{calm['p99_ms']:.2f} | {calm['non_2xx']} | 1.00 | 1.00x |",
        ]
        for mode in ("held", "flood"):
            point, hit = slow[mode], slow[mode]["wrk"]
            lines.append(
                f"| under attack, {mode} | {point['open']:.0f} | {point['opened_during']} | "
                f"{hit['rps']:.0f} | {hit['p50_ms']:.2f} | {hit['p99_ms']:.2f} | "
                f"{hit['non_2xx']} | {_ratio(hit['rps'], calm['rps'])} | "
                f"{_ratio(hit['p99_ms'], calm['p99_ms'])}x |"
            )
        lines.append(
            f"| calm again | 0 | 0 | {again['rps']:.0f} | {again['p50_ms']:.2f} | "
            f"{again['p99_ms']:.2f} | {again['non_2xx']} | {_ratio(again['rps'], calm['rps'])} | "
            f"{_ratio(again['p99_ms'], calm['p99_ms'])}x |"
        )
        held = slow["held"]["wrk"]
        met = (
            held["rps"] / calm["rps"] >= GOALS["rps_ratio"]
            and held["p99_ms"] / calm["p99_ms"] < GOALS["p99_ratio"]
        )
        lines += [
            "",
            f"Goal, held connections: throughput ≥ {GOALS['rps_ratio']:.0%} of calm and p99 "
            f"under {GOALS['p99_ratio']:g}x calm: **{'met' if met else 'NOT met'}**. "
            + FLOOD_NOTE.format(rate=slow["flood"]["opened_during"] / args.seconds),
            "",
            "| hostile kind | answers the attacker got (held run) | (flood run) |",
            "|---|---|---|",
        ]
        for kind in KINDS:
            cells = []
            for mode in ("held", "flood"):
                got = slow[mode]["answered"][kind]
                cells.append(", ".join(f"{n}x {s}" for s, n in sorted(got.items())) or "-")
            lines.append(f"| {kind} | {cells[0]} | {cells[1]} |")
        lines.append("")
    explain = results.get("explain")
    if explain:
        calm, busy = explain["calm"], explain["with_explain"]
        lines += [
            f"**A greedy `explain` key.** Two clients sent the largest `/explain` the limit "
            f"allows ({explain['largest_records']} records, `CLINML_MAX_EXPLAIN_RECORDS`, "
            f"top_k 5) back to back ({explain['explain_calls']} calls, "
            f"statuses {explain['explain_statuses']}, p50 "
            f"{explain['explain_p50_ms']:.0f} ms) while wrk sent one-record `/predict` at 2 "
            "connections:",
            "",
            "| run | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
            f"| calm | {calm['rps']:.0f} | {calm['p50_ms']:.2f} | {calm['p99_ms']:.2f} |",
            f"| with the explain clients | {busy['rps']:.0f} | {busy['p50_ms']:.2f} | "
            f"{busy['p99_ms']:.2f} |",
            "",
            f"p99 ratio {_ratio(busy['p99_ms'], calm['p99_ms'])}x. The finding's 1,000-record "
            f"call is now answered {explain['finding_status']} "
            f"(`{explain['finding_type']}`) at once.",
            "",
        ]
    lines += ["Reproduce:", "", f"    {reproduce(args)}", END]
    return "\n".join(lines)


def reproduce(args: argparse.Namespace) -> str:
    parts = "" if set(args.only) == set(PARTS) else " --only " + " ".join(args.only)
    return (
        f".venv/bin/python bench/attack_bench.py{parts} --seconds {args.seconds} "
        f"--connections {args.connections} --hostile {args.hostile} "
        f"--reopen-s {args.reopen_s:g} --doc docs/benchmarks.md"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--home", type=Path, default=ROOT / ".clinml-bench")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--hostile", type=int, default=500)
    parser.add_argument(
        "--reopen-s",
        type=float,
        default=1.0,
        help="how long a held hostile connection waits to reopen after the server closes it",
    )
    parser.add_argument("--doc", type=Path, default=None, help="write the report into this file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    from clinml.serving.keys import generate_key

    ensure_wrk()
    champion = prepare(args.home.resolve(), "pathology", "gbm", None)
    secrets: dict[str, str] = {}
    entries = []
    for key_id, roles in (("bench", ["predict"]), ("attacker", ["predict"]),
                          ("analyst", ["explain"])):  # fmt: skip
        secrets[key_id], entry = generate_key(key_id, roles)
        entries.append(entry)
    api_keys = json.dumps({"keys": entries})
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "slowloris" in args.only:
            results["slowloris"] = part_slowloris(champion, api_keys, secrets, tmp, args)
            print(json.dumps(results["slowloris"]), flush=True)
        if "explain" in args.only:
            results["explain"] = part_explain(champion, api_keys, secrets, tmp, args)
            print(json.dumps(results["explain"]), flush=True)
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
        sys.exit(f"attack bench failed: {exc}")


if __name__ == "__main__":
    main()
