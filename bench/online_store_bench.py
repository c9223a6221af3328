"""Online store: Redis (production profile) vs SQLite (embedded profile), issue 9.

One run sets up both profiles on the same data, measures, and removes what it made:

``setup``    A fresh bench home under ``.clinml-bench/online-store/``; a PostgreSQL
             database ``clinml_bench_<random>`` (Feast's SQL registry, the PostgreSQL
             offline store and MLflow) and a Feast project prefix of the same name, so
             its Redis keys are its own. The production profile (``CLINML_PROFILE=
             production``, Redis online store) runs ``clinml ingest``, ``materialize``,
             ``train``, ``promote`` and ``package`` on the readmission cohort (one gbm
             candidate, the spec ``bench/serving_bench.py`` serves); the embedded profile
             (``CLINML_HOME`` only, SQLite) runs ``ingest`` and ``materialize`` on the same
             cohort and imports the production champion's BentoML model (``bentoml
             models export`` / ``import``), so both serve the same model file.
``reads``    In this process, pinned to core 0: ``OnlineReader.read`` (direct SQLite) and
             ``FeastOnlineReader.read`` (the store's ``online_read``, one Redis pipeline),
             with Feast's ``get_online_features`` on each store as the reference path
             (``clinml.features.store._read_with_feast``); 1 and 100 entities per call, the same
             random patients for all four paths in a shuffled order per call, ``--rounds``
             rounds of ``--reads`` calls; p50 and p99 (the median of the rounds).
``serving``  Both services as ``clinml serve`` runs them (``clinml.serving.launch``: inline
             execution, adaptive batching on), pinned to core 0, both up for the whole
             part; ``wrk`` on core 1 sends ``POST /predict_patient`` (raw patient ids, 1
             and 20 per request) at ``--concurrency`` for ``--duration`` seconds,
             alternating between the two (A B, then B A, ...), ``--runs`` runs each after a
             warm-up; then the control, ``POST /predict`` with the same patients' stored
             features in the body (no store read). Non-2xx answers are counted, not hidden.

Before each measured part it waits (polling every 30 s, up to ``--idle-wait-s``) until
no pytest process runs, and watches for one during the part; the report says whether
the machine was otherwise idle. At the end, also on failure or Ctrl-C, the database is
dropped and the Redis keys of the project are deleted (the report gives their count).
It refuses to measure a Redis reader whose work grows with every read (``check_reader``).

    .venv/bin/python bench/online_store_bench.py --doc docs/benchmarks.md   # ~8 minutes
    .venv/bin/python bench/online_store_bench.py --patients 1000 --reads 30 --rounds 1 \\
        --duration 2 --runs 1                                            # a quick look

Needs PostgreSQL and Redis (``--postgres``, ``--redis``) and Debian's ``wrk``. Nothing
here asserts on timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from bench.loadgen import SERVER_CORE, LoadError, p50_p99_ms, pinned, write_lua  # noqa: E402
from bench.reliability_bench import wrk_run  # noqa: E402
from bench.serving_bench import (  # noqa: E402
    BenchError,
    Champion,
    bench_spec,
    ensure_wrk,
    environ,
    machine,
    serve,
)
from clinml.errors import ClinmlError  # noqa: E402

START, END = "<!-- online-store-bench -->", "<!-- /online-store-bench -->"
USECASE, KIND = "readmission", "gbm"
PROFILES = ("embedded", "production")  # A and B: SQLite and Redis
STORE = {"embedded": "SQLite", "production": "Redis"}
PG_PASSWORD_VAR = "CLINML_BENCH_PG_PASSWORD"  # Feast expands it from the environment
WARMUP_READS = 20
ENDPOINTS = ("/predict_patient", "/predict")  # /predict: the control, no store read
POLL_S = 30


class Run:
    """Names of one run's own database, Feast project prefix and bench home."""

    def __init__(self, root: Path, postgres: str, redis_url: str):
        self.name = f"clinml_bench_{secrets.token_hex(4)}"
        self.dir = root / self.name
        self.host, _, port = postgres.partition(":")
        self.port = int(port or 5432)
        self.redis_host, _, redis_port = redis_url.partition(":")
        self.redis_port = int(redis_port or 6379)
        self.password = os.environ.get(PG_PASSWORD_VAR, "unused")  # trust auth: any string
        self.key = f"bench-{secrets.token_hex(16)}"  # the production pseudonym key

    @property
    def feature_store_yaml(self) -> Path:
        return self.dir / "feature_store.yaml"

    @property
    def configs(self) -> Path:
        return self.dir / "configs"

    def home(self, profile: str) -> Path:
        return self.dir / profile

    def pg(self, database: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host, port=self.port, user="postgres", password=self.password,
            dbname=database, autocommit=True, connect_timeout=10,
        )  # fmt: skip

    def redis(self) -> Any:
        import redis

        return redis.Redis(host=self.redis_host, port=self.redis_port, db=0)

    def write_feature_store_yaml(self) -> None:
        """The environment's stores, like deploy/k8s/configmap.yaml's (no TLS here)."""
        import yaml

        url = f"postgresql+psycopg://postgres:${{{PG_PASSWORD_VAR}}}@{self.host}:{self.port}"
        config = {
            "project": self.name,
            "registry": {
                "registry_type": "sql",
                "path": f"{url}/{self.name}",
                "cache_ttl_seconds": 60,
                "sqlalchemy_config_kwargs": {"echo": False, "pool_pre_ping": True},
            },
            "online_store": {
                "type": "redis",
                "connection_string": f"{self.redis_host}:{self.redis_port},db=0",
            },
            "offline_store": {
                "type": "postgres",
                "host": self.host,
                "port": self.port,
                "database": self.name,
                "db_schema": "offline",
                "user": "postgres",
                "password": f"${{{PG_PASSWORD_VAR}}}",
                "sslmode": "disable",
            },
        }
        self.feature_store_yaml.write_text(yaml.safe_dump(config, sort_keys=False))

    def env(self, profile: str) -> dict[str, str]:
        """The whole environment of a ``clinml`` command or server of ``profile``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLINML_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            {
                PG_PASSWORD_VAR: self.password,
                "CLINML_HOME": str(self.home(profile)),
                "CLINML_CONFIG_DIR": str(self.configs),
                "CLINML_ACTOR": "online-store-bench",
                "CLINML_PROFILE": profile,
                "BENTOML_DO_NOT_TRACK": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            }
        )
        if profile == "production":
            env.update(
                {
                    "CLINML_FEATURE_STORE_YAML": str(self.feature_store_yaml),
                    "CLINML_TRACKING_URI": f"postgresql+psycopg://postgres:{self.password}"
                    f"@{self.host}:{self.port}/{self.name}",
                    "CLINML_ARTIFACT_ROOT": str(self.home(profile) / "artifacts"),
                    "CLINML_PSEUDONYM_KEY": self.key,
                }
            )
        return env

    def redis_keys(self) -> int:
        return sum(1 for _ in self.redis().scan_iter(match=f"*{self.name}*", count=1000))

    def clean(self) -> dict[str, Any]:
        """Drop the database and delete the project's Redis keys (Feast's Redis keys end
        with the project name, which starts with this run's name)."""
        done: dict[str, Any] = {}
        try:
            client = self.redis()
            deleted = 0
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"*{self.name}*", count=1000):
                batch.append(key)
                if len(batch) == 500:
                    deleted += client.delete(*batch)
                    batch = []
            if batch:
                deleted += client.delete(*batch)
            done["redis_deleted"], done["redis_left"] = deleted, self.redis_keys()
        except Exception as exc:  # report, and still drop the database
            done["redis_error"] = f"{type(exc).__name__}: {exc}"
        try:
            from psycopg import sql

            with self.pg("postgres") as connection:
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.name)
                    )
                )
            done["database_dropped"] = True
        except Exception as exc:
            done["database_error"] = f"{type(exc).__name__}: {exc}"
        print(f"cleaned up {self.name}: {json.dumps(done)}", flush=True)
        return done


# -- waiting for an idle machine -------------------------------------------------------


def pytest_running() -> bool:
    """Whether a pytest process runs: a Python process (or the ``pytest`` script) with
    pytest on its command line; a shell whose command merely mentions it does not count."""
    found = subprocess.run(["pgrep", "-a", "-f", "pytest"], capture_output=True, text=True)
    for line in found.stdout.splitlines():
        _, _, command = line.partition(" ")
        program = Path(command.split(" ", 1)[0]).name
        if program.startswith(("python", "pytest")):
            return True
    return False


def wait_idle(what: str, limit_s: float) -> bool:
    """Wait until no pytest process runs (at most ``limit_s``); whether it got there."""
    deadline = time.monotonic() + limit_s
    while pytest_running():
        if time.monotonic() >= deadline:
            print(f"{what}: pytest still running after {limit_s:.0f} s; measuring anyway")
            return False
        print(f"{what}: waiting for the running pytest to finish", flush=True)
        time.sleep(POLL_S)
    return True


class Watch:
    """Polls for a pytest process during a measured part, in a thread."""

    def __init__(self, every_s: float = 5.0):
        self.seen = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.seen = self.seen or pytest_running()

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- setup -------------------------------------------------------------------------------


def clinml(run: Run, profile: str, *args: str) -> float:
    """``clinml ARGS`` in ``profile``'s environment; seconds it took."""
    log = run.dir / "logs" / f"{profile}-{args[0]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("clinml")), *args]
    started = time.perf_counter()
    with log.open("wb") as out:
        done = subprocess.run(
            command, env=run.env(profile), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    took = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"{profile}: `clinml {' '.join(args)}` failed (see {log}):\n{tail}")
    print(f"{profile}: clinml {' '.join(args)}: {took:.1f} s", flush=True)
    return took


def bentoml(run: Run, profile: str, *args: str) -> None:
    env = {**run.env(profile), "BENTOML_HOME": str(run.home(profile) / "bentoml")}
    done = subprocess.run(
        [sys.executable, "-m", "bentoml", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchError(f"bentoml {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def setup(run: Run, patients: int) -> tuple[Any, dict[str, dict[str, float]]]:
    """Both profiles ingested and materialized, one champion packaged in both homes."""
    import yaml
    from psycopg import sql

    from clinml.spec import load_spec

    run.configs.mkdir(parents=True)
    with run.pg("postgres") as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(run.name)))
    run.write_feature_store_yaml()
    spec = bench_spec(load_spec(USECASE, ROOT / "configs"), KIND, patients)
    spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    (run.configs / f"{spec.name}.yaml").write_text(spec_text)
    timings: dict[str, dict[str, float]] = {p: {} for p in PROFILES}
    for step in ("ingest", "materialize", "train", "promote", "package"):
        timings["production"][step] = clinml(run, "production", step, spec.name)
    for step in ("ingest", "materialize"):
        timings["embedded"][step] = clinml(run, "embedded", step, spec.name)
    archive = run.dir / f"{spec.name}.bentomodel"
    bentoml(run, "production", "models", "export", f"{spec.name}:latest", str(archive))
    bentoml(run, "embedded", "models", "import", str(archive))
    return load_spec(spec.name, run.configs), timings


# -- reads in this process ---------------------------------------------------------------


@dataclass
class Stores:
    """Both profiles' stores opened in this process, and one patient set in both."""

    spec: Any
    raw_ids: list[str]
    ids: dict[str, list[str]]  # profile -> pseudonymised ids, in raw_ids' order
    stores: dict[str, Any]
    readers: dict[str, Any]


def open_stores(run: Run, spec: Any) -> Stores:
    """Both stores and readers, and the raw ids of the patients the stores hold."""
    import pandas as pd

    from clinml.environment import FeastEnvironment
    from clinml.features.ingest import load_raw
    from clinml.features.online_feast import FeastOnlineReader, online_reader
    from clinml.features.online_sqlite import OnlineReader
    from clinml.features.store import open_store
    from clinml.pseudonym import DEVELOPMENT_KEY, Pseudonymiser
    from clinml.settings import Paths

    os.environ[PG_PASSWORD_VAR] = run.password
    raw = load_raw(spec, datetime.now(UTC))
    embedded = Paths(run.home("embedded")).usecase(spec.name).features_file
    stored = set(pd.read_parquet(embedded, columns=[spec.entity.key])[spec.entity.key])
    development = Pseudonymiser(DEVELOPMENT_KEY)
    raw_ids = [
        i for i in sorted(raw[spec.entity.key].astype(str).unique()) if development.one(i) in stored
    ]
    environments = {
        "embedded": None,
        "production": FeastEnvironment.load(run.feature_store_yaml),
    }
    keys = {"embedded": DEVELOPMENT_KEY, "production": run.key}
    stores, readers, ids = {}, {}, {}
    for profile in PROFILES:
        paths = Paths(run.home(profile)).usecase(spec.name)
        stores[profile] = open_store(spec, paths, environments[profile])
        readers[profile] = online_reader(stores[profile], spec)  # as the service picks it
        ids[profile] = Pseudonymiser(keys[profile]).many(raw_ids)
    if not isinstance(readers["embedded"], OnlineReader) or not isinstance(
        readers["production"], FeastOnlineReader
    ):
        raise BenchError(f"unexpected readers: {readers}")
    found = Stores(spec, raw_ids, ids, stores, readers)
    check_reader(found)
    return found


def check_reader(stores: Stores) -> None:
    """Refuse to measure a Redis reader whose work grows with every call.

    Feast's Redis ``online_read`` appends its timestamp field to the
    ``requested_features`` list it is given; a reader that hands it its own list asks
    Redis for one more field per entity on every later call, so its latency would
    depend on how many reads came before, not on the store.
    """
    reader, wanted = stores.readers["production"], len(stores.spec.feature_names)
    reader.read(stores.ids["production"][:1])
    if len(reader.features) != wanted:
        raise BenchError(
            f"FeastOnlineReader.features grew from {wanted} to {len(reader.features)} names "
            "in one read: Feast's online_read appends '_ts:<view>' to the requested_features "
            "list it is given, and features/online_feast.py passes its own list, so every "
            "read (and every /readyz ping) makes the next one ask Redis for one more field. "
            "Pass a copy (requested_features=list(self.features)) and run again."
        )


def same_values(stores: Stores, sample: int = 500) -> dict[str, int]:
    """Whether both stores hold the same feature values for the same patients."""
    chosen = random.Random(3).sample(range(len(stores.raw_ids)), min(sample, len(stores.raw_ids)))
    counts = {"compared": 0, "identical": 0, "missing": 0}
    for first in range(0, len(chosen), 100):
        part = chosen[first : first + 100]
        rows = {p: stores.readers[p].read([stores.ids[p][i] for i in part]) for p in PROFILES}
        for a, b in zip(rows["embedded"], rows["production"], strict=True):
            counts["compared"] += 1
            if a is None or b is None:
                counts["missing"] += 1
                continue
            values = [{f: v for f, (v, _) in row.items()} for row in (a, b)]
            counts["identical"] += values[0] == values[1]
    return counts


def read_latency(stores: Stores, sizes: list[int], rounds: int, reads: int) -> list[dict]:
    """p50/p99 (ms) per path and size, the median of ``rounds`` rounds."""
    from clinml.features.store import _read_with_feast

    spec = stores.spec
    paths = {("reader", p): (lambda ids, p=p: stores.readers[p].read(ids)) for p in PROFILES} | {
        ("feast", p): (lambda ids, p=p: _read_with_feast(stores.stores[p], spec, ids))
        for p in PROFILES
    }
    # Where the Redis reader's time goes: its store call alone, without the conversion.
    paths[("online_read", "production")] = lambda ids: online_read(
        stores.readers["production"], ids
    )
    rng = random.Random(7)
    n_ids = len(stores.raw_ids)
    results = []
    for size in sizes:
        per_round: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in paths}
        for _ in range(rounds):
            times: dict[tuple[str, str], list[float]] = {k: [] for k in paths}
            for _ in range(reads + WARMUP_READS):
                chosen = rng.sample(range(n_ids), size)
                order = list(paths)
                rng.shuffle(order)  # no path always runs first (or right after another)
                for path, profile in order:
                    ids = [stores.ids[profile][i] for i in chosen]
                    started = time.perf_counter()
                    rows = paths[(path, profile)](ids)
                    times[(path, profile)].append(time.perf_counter() - started)
                    if path != "online_read" and any(row is None for row in rows):
                        raise BenchError(f"{path} on {STORE[profile]} found no row for an id")
            for key, samples in times.items():
                per_round[key].append(p50_p99_ms(samples[WARMUP_READS:]))
        for (path, profile), measured in per_round.items():
            results.append(
                {
                    "entities": size,
                    "path": path,
                    "profile": profile,
                    "p50_ms": statistics.median(r[0] for r in measured),
                    "p99_ms": statistics.median(r[1] for r in measured),
                }
            )
            print(json.dumps({"read": results[-1]}), flush=True)
    return results


def online_read(reader: Any, entity_ids: list[str]) -> list[Any]:
    """``FeastOnlineReader.read`` up to the store's answer: the entity keys and the
    provider's ``online_read`` (one Redis pipeline, the stored protobufs parsed), without
    converting the values to Python."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    keys = [
        EntityKey(join_keys=[reader.join_key], entity_values=[Value(string_val=i)])
        for i in entity_ids
    ]
    return reader.provider.online_read(
        config=reader.store.config,
        table=reader.view,
        entity_keys=keys,
        requested_features=list(reader.features),  # Feast appends to the list it is given
    )


# -- serving -----------------------------------------------------------------------------


def fresh_patients(stores: Stores, urls: dict[str, str], secret: str, wanted: int) -> list[str]:
    """Raw ids, newest event first, that both services answer 200 for (within the TTL)."""
    import httpx

    from clinml.features.ingest import load_raw

    spec = stores.spec
    raw = load_raw(spec, datetime.now(UTC))
    newest = raw.groupby(spec.entity.key)[spec.event_timestamp].max().sort_values(ascending=False)
    found: list[str] = []
    headers = {"Authorization": f"Bearer {secret}"}
    for patient in [str(p) for p in newest.index[: wanted * 5]]:
        statuses = [
            httpx.post(
                f"{urls[p]}/predict_patient", json={"patient_ids": [patient]},
                headers=headers, timeout=30,
            ).status_code
            for p in PROFILES
        ]  # fmt: skip
        if statuses == [200, 200]:
            found.append(patient)
        if len(found) == wanted:
            return found
    raise BenchError(f"only {len(found)} of the newest patients answer 200 on both services")


def stored_records(stores: Stores, raw_ids: list[str]) -> list[dict[str, Any]]:
    """The feature records the embedded store holds for ``raw_ids``, as /predict takes them."""
    position = {raw: i for i, raw in enumerate(stores.raw_ids)}
    ids = [stores.ids["embedded"][position[raw]] for raw in raw_ids]
    rows = stores.readers["embedded"].read(ids)
    return [{f: row[f][0] for f in stores.spec.feature_names} for row in rows]


def serving(
    run: Run, stores: Stores, args: argparse.Namespace, tmp: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every wrk run on each service and endpoint, and the raw ids sent."""
    from clinml.serving.keys import generate_key
    from clinml.settings import Settings

    secret, entry = generate_key("bench", ["predict"])
    api_keys = json.dumps({"keys": [entry]})
    headers = {"Authorization": f"Bearer {secret}"}
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        urls = {}
        for profile in PROFILES:
            with environ(run.env(profile)):
                champion = Champion(KIND, stores.spec, Settings(), version="latest")
                urls[profile] = stack.enter_context(serve("ours", champion, api_keys)).url
            print(f"{profile} ({STORE[profile]}) serving at {urls[profile]}", flush=True)
        patients = fresh_patients(stores, urls, secret, max(args.request_sizes))
        for size in args.request_sizes:
            bodies = {
                "/predict_patient": {"patient_ids": patients[:size]},
                # The control: the same patients' features in the body, no store read.
                "/predict": {"records": stored_records(stores, patients[:size])},
            }
            for endpoint, body in bodies.items():
                name = f"{endpoint.strip('/')}-{size}.lua"
                script = write_lua(tmp / name, json.dumps(body), headers)
                for profile in PROFILES:  # warm-up
                    wrk_run(urls[profile] + endpoint, script, args.concurrency, args.warmup)
                for i in range(args.runs):
                    for profile in PROFILES if i % 2 == 0 else PROFILES[::-1]:
                        point = wrk_run(
                            urls[profile] + endpoint, script, args.concurrency, args.duration
                        )
                        rows.append(
                            {"profile": profile, "endpoint": endpoint, "patients": size, "run": i}
                            | point
                        )
                        print(json.dumps({"serve": rows[-1]}), flush=True)
    return rows, patients


def served_runs(served: list[dict], endpoint: str, size: int, profile: str) -> list[dict]:
    return [
        r
        for r in served
        if r["endpoint"] == endpoint and r["patients"] == size and r["profile"] == profile
    ]


# -- the report --------------------------------------------------------------------------


def reproduce(args: argparse.Namespace) -> str:
    return (
        f".venv/bin/python bench/online_store_bench.py --patients {args.patients} "
        f"--rounds {args.rounds} --reads {args.reads} --entities "
        f"{' '.join(map(str, args.entities))} --duration {args.duration} --runs {args.runs} "
        f"--concurrency {args.concurrency} --warmup {args.warmup} --request-sizes "
        f"{' '.join(map(str, args.request_sizes))} --doc docs/benchmarks.md"
    )


def _x(value: float) -> str:
    return f"{value:.2f}×"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    reads, served = results["reads"], results["serving"]
    quiet = results["idle"]
    lines = [
        START,
        "## Online store: Redis vs SQLite (issue 9)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; PostgreSQL "
        f"{results['versions']['postgres']} and Redis {results['versions']['redis']} on the "
        "same machine, reached over loopback TCP. "
        + (
            "No test suite (pytest) ran before or during the measured parts."
            if quiet
            else "**The machine was not idle:** a pytest process ran before or during a "
            "measured part, so these figures carry that noise."
        ),
        "",
        f"    {reproduce(args)}",
        "",
        f"The readmission cohort ({args.patients:,} patients, {results['entities']:,} in the "
        "online store) and its gbm champion (`bench/serving_bench.py`'s spec), set up in "
        "both profiles in one run: **embedded** (SQLite online store, `CLINML_HOME` only) "
        "and **production** (`CLINML_PROFILE=production`: Redis online store, Feast's SQL "
        "registry, the PostgreSQL offline store and MLflow in a database of the run's own, "
        "dropped at the end). Both stores hold the same values: "
        f"{results['check']['identical']} of {results['check']['compared']} patients compared "
        f"identical, {results['check']['missing']} missing in either. Both services serve the "
        "same model file (the production champion, imported into the embedded home).",
        "",
        "### Online reads, in one process",
        "",
        f"Pinned to core 0; {args.rounds} round(s) of {args.reads} calls per size after "
        f"{WARMUP_READS} warm-up calls, the same random patients for all four paths in a "
        "shuffled order per call; p50 / p99 in ms, the median of the rounds. "
        "**clinml reader** is what `/predict_patient` uses (`features.online_feast."
        "online_reader`): `OnlineReader` (one indexed query on a memory-mapped SQLite "
        "connection, values decoded by hand) and `FeastOnlineReader` (the Redis store's "
        "`online_read`: one pipelined round trip, each value read off its protobuf); "
        "**Feast `get_online_features`** is the reference path on each store.",
        "",
        "| entities per call | path | SQLite p50 / p99 | Redis p50 / p99 | Redis ÷ SQLite p50 | Redis ÷ SQLite p99 |",
        "|---:|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    labels = {"reader": "clinml reader", "feast": "Feast `get_online_features`"}
    for size in args.entities:
        for path in ("reader", "feast"):
            by = {r["profile"]: r for r in reads if r["entities"] == size and r["path"] == path}
            s, r = by["embedded"], by["production"]
            lines.append(
                f"| {size} | {labels[path]} | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {_x(r['p50_ms'] / s['p50_ms'])} | "
                f"{_x(r['p99_ms'] / s['p99_ms'])} |"
            )
    lines += [
        "",
        "### Served: `/predict_patient`, with `/predict` as the control",
        "",
        f"Both services up together, each as `clinml serve` starts it (inline execution, "
        f"adaptive batching on, an API key), pinned to core 0; `wrk` (1 thread) on core 1 at "
        f"concurrency {args.concurrency}, {args.warmup} s warm-up per service, then "
        f"{args.runs} run(s) of {args.duration} s each, alternating between the services "
        "(A B, B A, ...); medians of the runs. The same raw patient ids go to both (each "
        "service pseudonymises them with its own key); every id is within the feature TTL. "
        "The control, `/predict`, sends the same patients' stored features in the body: the "
        "same work without the online read.",
        "",
        "| endpoint | patients per request | online store | req/s | p50 ms | p99 ms | non-2xx | socket errors | requests |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    ratios = []
    for endpoint in ENDPOINTS:
        for size in args.request_sizes:
            medians = {}
            for profile in PROFILES:
                runs = served_runs(served, endpoint, size, profile)
                medians[profile] = {
                    k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p99_ms")
                }
                m = medians[profile]
                lines.append(
                    f"| `{endpoint}` | {size} | {STORE[profile]} | {m['rps']:.0f} | "
                    f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {sum(r['non_2xx'] for r in runs)} | "
                    f"{sum(r['socket_errors'] for r in runs)} | "
                    f"{sum(r['requests'] for r in runs):,} |"
                )
            s, r = medians["embedded"], medians["production"]
            ratios.append(
                f"`{endpoint}`, {size} per request: req/s {_x(r['rps'] / s['rps'])}, p50 "
                f"{_x(r['p50_ms'] / s['p50_ms'])}, p99 {_x(r['p99_ms'] / s['p99_ms'])}"
            )
    lines += ["", "Redis ÷ SQLite: " + "; ".join(ratios) + ".", ""]
    lines += [
        "Each run's req/s (SQLite | Redis): "
        + "; ".join(
            f"`{endpoint}` {size}: "
            + " | ".join(
                ", ".join(f"{r['rps']:.0f}" for r in served_runs(served, endpoint, size, profile))
                for profile in PROFILES
            )
            for endpoint in ENDPOINTS
            for size in args.request_sizes
        )
        + ".",
        "",
        "Setup, one run each (not interleaved, so only indicative): "
        + "; ".join(
            f"{profile} {', '.join(f'{step} {s:.0f} s' for step, s in steps.items())}"
            for profile, steps in results["setup"].items()
        )
        + f". Cleanup deleted {results['clean'].get('redis_deleted', '?')} Redis keys "
        f"({results['clean'].get('redis_left', '?')} left) and dropped the database.",
        "",
        "### What the numbers say",
        "",
        *analysis(results, args),
        "",
        END,
    ]
    return "\n".join(lines)


def analysis(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The reading of this run's numbers: every figure and direction comes from them."""
    reads = {(r["entities"], r["path"], r["profile"]): r for r in results["reads"]}
    small, large = min(args.entities), max(args.entities)

    def p50(size: int, path: str, profile: str) -> float:
        return float(reads[(size, path, profile)]["p50_ms"])

    reader = {
        n: (p50(n, "reader", "embedded"), p50(n, "reader", "production")) for n in (small, large)
    }
    store_call = p50(large, "online_read", "production")
    converting = reader[large][1] - store_call
    values = large * len(results["features"])
    feast = (p50(small, "feast", "embedded"), p50(small, "feast", "production"))
    lines = [
        f"- **Reads.** Through clinml's readers, Redis took {_x(reader[small][1] / reader[small][0])} "
        f"SQLite's p50 for {small} entit{'y' if small == 1 else 'ies'} ({reader[small][1]:.2f} vs "
        f"{reader[small][0]:.2f} ms) and {_x(reader[large][1] / reader[large][0])} for {large} "
        f"({reader[large][1]:.2f} vs {reader[large][0]:.2f} ms). `OnlineReader` answers from "
        "pages of a file mapped into the serving process: no socket, no other process, values "
        "decoded by hand. A Redis read is a request and a reply over TCP to another process "
        "(loopback here; another host in a cluster, which adds the network's round trip to "
        "every read), and then Feast's work on the answer.",
        f"- **Where the Redis reader's time goes** ({large} entities, {values:,} values): "
        f"Feast's `online_read` alone (entity keys, one pipelined `HMGET` per entity, the "
        f"stored protobufs parsed) took {store_call:.2f} ms at p50, so about "
        f"{converting:.2f} ms ({converting / reader[large][1]:.0%}) of `FeastOnlineReader.read` "
        "is turning the answer into rows (each value read off its protobuf, the unknown "
        "entities told apart). "
        + (
            "That work, not the store, is the larger share."
            if converting > store_call
            else "The store call (the round trip and Feast parsing the stored protobufs) is "
            "the larger share."
        ),
        f"- **Feast's `get_online_features`** took {feast[0]:.2f} ms (SQLite) and "
        f"{feast[1]:.2f} ms (Redis) at p50 for {small} entit{'y' if small == 1 else 'ies'}, "
        f"against clinml's readers' {reader[small][0]:.2f} and {reader[small][1]:.2f} ms: a "
        "cost per call that does not depend on the store (a cProfile of the call, made while "
        "writing this bench, puts most of it in rebuilding the feature service and view from "
        "the registry's protobufs on every call, with typeguard checking each `Field`)"
        + (
            f", which is why the Redis ÷ SQLite ratio on that path is only "
            f"{_x(feast[1] / feast[0])}"
            if 0.8 <= feast[1] / feast[0] <= 1.25
            else ""
        )
        + ". Serving does not use this path.",
    ]
    served = results["serving"]

    def rps_ratio(endpoint: str, size: int) -> float:
        rps = {
            p: statistics.median(r["rps"] for r in served_runs(served, endpoint, size, p))
            for p in PROFILES
        }
        return rps["production"] / rps["embedded"]

    sizes = sorted(args.request_sizes)
    patient = {n: rps_ratio("/predict_patient", n) for n in sizes}
    control = {n: rps_ratio("/predict", n) for n in sizes}
    alike = all(0.9 <= c <= 1.1 for c in control.values())
    lines.append(
        "- **Served.** On `/predict_patient` the Redis-backed service answered "
        + ", ".join(
            f"{_x(patient[n])} the SQLite one's req/s with {n} patient{'s' if n > 1 else ''} "
            "per request"
            for n in sizes
        )
        + "; on the control, `/predict`, "
        + ", ".join(f"{_x(control[n])}" for n in sizes)
        + (
            ", so the two services are otherwise equally fast and the gap is the online read."
            if alike
            else ": the services differ even without a store read, so only part of the gap "
            "is the online read."
        )
        + " The service reads the store on the worker's event loop, and with adaptive "
        "batching concurrent requests share one read (`Coalescer` in `clinml.serving.service`): a "
        "batch makes one Redis round trip, but each of its values is still decoded, and the "
        "event loop waits for the round trip (a network in a cluster would add to it)"
        + (
            "; the more patients per request, the larger the share of the worker's time the "
            "read takes, the same shape as the reads above."
            if len(sizes) > 1 and patient[sizes[-1]] < patient[sizes[0]]
            else "."
        )
    )
    lines.append(
        "- **What it means for a deployment.** SQLite is a file on one machine: replicas share "
        "it only by sharing that machine's disk, and each further machine needs its own copy, "
        "materialized separately. "
        "Redis is one store shared by every replica: one materialization serves them all, and "
        "replicas scale out and restart holding no feature data. The price is the read cost "
        "measured above, paid by each `/predict_patient` batch; on this 2-core machine Redis "
        "also shared the cores with the service and `wrk`, and a real network adds its round "
        "trip, which loopback does not show."
    )
    return lines


# -- the command line --------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--home", type=Path, default=ROOT / ".clinml-bench" / "online-store",
        help="where each run's bench home is made (removed after a successful run)")  # fmt: skip
    add("--postgres", default="127.0.0.1:5432", help="host:port; user postgres, password "
        f"from ${PG_PASSWORD_VAR} (default 'unused', for trust auth)")  # fmt: skip
    add("--redis", default="127.0.0.1:6379", help="host:port, database 0")
    add("--patients", type=int, default=5000, help="readmission cohort size")
    add("--entities", type=int, nargs="+", default=[1, 100], help="entities per read call")
    add("--rounds", type=int, default=3, help="rounds of reads per size")
    add("--reads", type=int, default=300, help="measured read calls per round and path")
    add("--concurrency", type=int, default=32)
    add("--duration", type=int, default=10, help="seconds per measured wrk run")
    add("--warmup", type=int, default=5, help="seconds of wrk warm-up per service and size")
    add("--runs", type=int, default=3, help="measured wrk runs per service and request size")
    add("--request-sizes", type=int, nargs="+", default=[1, 20],
        help="patient ids per /predict_patient request")  # fmt: skip
    add("--idle-wait-s", type=float, default=2400.0,
        help="longest wait for running pytest processes to finish before a measured part")  # fmt: skip
    add("--doc", type=Path, default=None, help="write the section into this file")
    return parser.parse_args(argv)


def versions(run: Run) -> dict[str, str]:
    with run.pg("postgres") as connection:
        postgres = connection.execute("SHOW server_version").fetchone()[0]
    return {"postgres": postgres.split()[0], "redis": run.redis().info()["redis_version"]}


def main_run(args: argparse.Namespace) -> str:
    ensure_wrk()
    run = Run(args.home.resolve(), args.postgres, args.redis)
    results: dict[str, Any] = {"idle": True}
    ok = False
    try:
        results["versions"] = versions(run)
        print(f"run {run.name}: bench home {run.dir}", flush=True)
        spec, results["setup"] = setup(run, args.patients)
        stores = open_stores(run, spec)
        results["entities"] = len(stores.raw_ids)
        results["features"] = list(spec.feature_names)
        results["check"] = same_values(stores)
        print(json.dumps({"same_values": results["check"]}), flush=True)
        results["idle"] &= wait_idle("reads", args.idle_wait_s)
        gc.collect()
        gc.freeze()  # as a server does after start-up
        with Watch() as watch, pinned({SERVER_CORE}):
            results["reads"] = read_latency(stores, args.entities, args.rounds, args.reads)
        results["idle"] &= not watch.seen
        check_reader(stores)  # still the same work per call after all the reads
        results["idle"] &= wait_idle("serving", args.idle_wait_s)
        with tempfile.TemporaryDirectory() as tmp, Watch() as watch:
            results["serving"], _ = serving(run, stores, args, Path(tmp))
        results["idle"] &= not watch.seen
        for reader in stores.readers.values():
            reader.close()
        ok = True
    finally:
        results["clean"] = run.clean()
        if ok:
            shutil.rmtree(run.dir, ignore_errors=True)
        elif run.dir.exists():
            print(f"kept {run.dir} (logs) after the failure", flush=True)
    section = report(results, args)
    if args.doc is not None:
        write_section(args.doc, START, END, section)
        print(f"wrote {args.doc}")
    print(section)
    return section


def main(argv: list[str] | None = None) -> None:
    # A SIGTERM unwinds like Ctrl-C, so the database and the Redis keys are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main_run(parse_args(argv))
    except (BenchError, LoadError, ClinmlError) as exc:
        sys.exit(f"online store bench failed: {exc}")


if __name__ == "__main__":
    main()
