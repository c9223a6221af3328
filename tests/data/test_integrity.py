"""An ingest or a materialization that fails or is killed midway leaves the stores as
they were before it (docs/feature-store.md, "All or nothing").

Every test starts from a non-empty state (a first batch ingested and materialized) and
runs the real stages (``clinml.pipelines.stages``: GX gate, parquet, Feast repo, SQLite online
store). A killed run happens in a child process that SIGKILLs itself at a chosen write
step: the child wraps one function (``os.replace``, ``DataFrame.to_parquet``, SQLite's
``executemany``...) so that its Nth call kills the process, before or after the call.
The child is forked from the test process, so it starts with Feast and Great
Expectations already imported (a fresh interpreter would spend ~16 s importing them
for each kill point); it is still a separate process that dies by a real SIGKILL. Its
outcome is checked: a kill point that is never reached fails the test.

A kill before a run's commit point must leave a full snapshot of the use case's
directory unchanged (``_snapshot``). A kill after it must leave the run's result
visible. Either way, the next normal run must succeed and give the same result as a
run that was never interrupted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pkgutil
import shutil
import signal
import sqlite3
import traceback
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import pytest

from clinml.errors import DataValidationError
from clinml.settings import Settings
from tests.conftest import NOW, make_tiny_frame

pytestmark = pytest.mark.slow  # Feast, Great Expectations, a forked child per kill point

T1, T2 = NOW, NOW + timedelta(days=1)  # the first batch's runs, the second batch's


# -- running the stages ---------------------------------------------------------------


def _ingest(spec, settings: Settings, batch: Path, at) -> None:
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    quiet = Progress(total=1, echo=lambda _: None, interactive=False)
    with mock.patch.object(stages, "utc_now", return_value=at):
        stages.ingest(spec, settings, quiet, data=batch, append=True)


def _materialize(spec, settings: Settings, at) -> None:
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    quiet = Progress(total=1, echo=lambda _: None, interactive=False)
    with mock.patch.object(stages, "utc_now", return_value=at):
        stages.materialize(spec, settings, quiet)


# -- killing a child at a chosen step --------------------------------------------------


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(target: str, nth: int, when: str, on: str = "") -> None:
    """In this process, SIGKILL at the ``nth`` call of ``target``, ``before`` or ``after``
    it, counting only calls whose first argument contains ``on`` (libraries call
    ``shutil.rmtree`` too)."""
    original = pkgutil.resolve_name(target)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        counted = bool(args) and on in str(args[0])
        calls += counted
        if counted and calls == nth and when == "before":
            _die()
        result = original(*args, **kwargs)
        if counted and calls == nth and when == "after":
            _die()
        return result

    mock.patch(target, wrapper).start()


def _fault_in_sqlite(point: str, fault: Callable[[], None] = _die) -> Any:
    """A patch of ``sqlite3.connect``: ``fault`` halfway through the third bulk ``executemany`` call
    (two chunks of rows written before it: set ``CHUNK_ROWS``) or at the ``COMMIT``."""
    connect = sqlite3.connect
    calls = 0

    class Faulty(sqlite3.Connection):
        def executemany(self, sql: str, rows: Any) -> Any:
            nonlocal calls
            calls += 1
            rows = list(rows)

            def until_halfway() -> Any:
                for i, row in enumerate(rows):
                    if point == "third-chunk" and calls == 3 and i == len(rows) // 2:
                        fault()
                    yield row

            return super().executemany(sql, until_halfway())

        def execute(self, sql: str, *args: Any) -> Any:
            if point == "commit" and sql == "COMMIT":
                fault()
            return super().execute(sql, *args)

    return mock.patch("sqlite3.connect", lambda *a, **k: connect(*a, factory=Faulty, **k))


def _killed(run: Callable[[], None], arm: Callable[[], None]) -> None:
    """Run ``run`` in a forked child armed with ``arm``; it must die by SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            arm()
            run()
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child was not killed (exit status {os.waitstatus_to_exitcode(status)}): "
        "its kill point was never reached"
    )


# -- what the stores hold ----------------------------------------------------------------

# Fields that record when a run happened, not what it stored: they differ between two
# runs of the same steps, and only between two runs are they left out (below).
_WALL_CLOCK_FIELDS = {"version_id", "last_updated", "created_timestamp", "last_updated_timestamp"}


def _without_wall_clock(message: Any) -> Any:
    from google.protobuf.message import Message

    for field, value in message.ListFields():
        if field.name in _WALL_CLOCK_FIELDS:
            message.ClearField(field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in [value] if isinstance(value, Message) else value:
                _without_wall_clock(item)
    return message


def _registry(path: Path, between_runs: bool) -> str | None:
    from feast.protos.feast.core.Registry_pb2 import Registry
    from google.protobuf import text_format

    if not path.is_file():
        return None
    proto = Registry()
    proto.ParseFromString(path.read_bytes())
    return text_format.MessageToString(_without_wall_clock(proto) if between_runs else proto)


def _online_tables(db: Path, between_runs: bool) -> dict[str, list] | None:
    """Every table of the online store, schema and rows (read as serving reads it)."""
    if not db.is_file():
        return None
    # Opened read-write like the serving reader, so that SQLite rolls back the journal
    # of a writer killed while committing before anything is read (its own recovery).
    with closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True)) as connection:
        connection.execute("PRAGMA query_only = ON")
        dump: dict[str, list] = {
            "schema": connection.execute(
                "SELECT type, name, sql FROM sqlite_master ORDER BY name"
            ).fetchall()
        }
        for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            columns = [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]
            if between_runs:
                # The wall-clock time each value was written: Feast's tie-breaker.
                columns = [c for c in columns if c != "created_ts"]
            listed = ", ".join(f'"{c}"' for c in columns)
            dump[table] = connection.execute(
                f'SELECT {listed} FROM "{table}" ORDER BY 1, 2'
            ).fetchall()
    return dump


def _committed_run(root: Path) -> str | None:
    link = root / "offline"
    return Path(os.readlink(link)).parent.as_posix() if link.is_symlink() else None


def _snapshot(root: Path, between_runs: bool = False) -> dict[str, Any]:
    """Everything stored under a use case's directory.

    Every file's hash (and every link's target), the offline parquet contents, every
    table of the online store and Feast's registry. Left out, always:

    - the directories of ingest runs that never committed (``.ingest/run-*`` other than
      the one ``offline`` points at): nothing reads them, since every reader goes
      through ``offline``, and the next ingest deletes them (``_leftovers`` checks);
    - ``feast/online.db-journal``: SQLite's journal of the killed, uncommitted
      transaction. SQLite ignores it (or rolls the database back with it, before the
      first read: the database's bytes are compared after that) and its next write
      deletes it.

    ``between_runs`` compares two runs of the same steps instead of one state before
    and after: it also leaves out what records when a run happened (registry
    timestamps and version id, the online rows' ``created_ts``) and the random names of
    run directories (the committed run's files are compared through ``offline``).
    """
    feast = root / "feast"
    state: dict[str, Any] = {
        # First: reading the store is what triggers SQLite's own recovery.
        "online": _online_tables(feast / "online.db", between_runs),
        "registry": _registry(feast / "registry.db", between_runs),
    }
    committed = _committed_run(root)
    files: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        for name in sorted([*filenames, *(d for d in dirnames if (here / d).is_symlink())]):
            path = here / name
            relative = path.relative_to(root).as_posix()
            if relative == "feast/online.db-journal":
                continue
            if relative.startswith(".ingest/run-") and (
                between_runs or not relative.startswith(f"{committed}/")
            ):
                continue
            if between_runs and relative in ("offline", "feast/registry.db", "feast/online.db"):
                continue  # compared through ``offline/``, the registry and the tables
            files[relative] = (
                f"-> {os.readlink(path)}"
                if path.is_symlink()
                else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    state["offline"] = {}
    if (root / "offline").is_dir():
        for path in sorted((root / "offline").iterdir()):
            files[f"offline/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
            frame = pd.read_parquet(path)
            state["offline"][path.name] = frame.to_json(orient="split", date_format="iso")
    state["files"] = files
    return state


def _leftovers(root: Path) -> list[str]:
    """What a finished run must not leave: uncommitted runs, temporary files."""
    committed = _committed_run(root)
    runs = [f".ingest/{p.name}" for p in (root / ".ingest").glob("run-*")]
    temporary = [p.name for p in root.rglob("*.tmp")]
    return sorted([r for r in runs if r != committed] + temporary)


# -- the states every test starts from ---------------------------------------------------


class World:
    """A data directory, copies of it at known states, and their snapshots.

    ``home`` is always the same path, so the absolute paths Feast records (the offline
    source) stay valid when a copy is put back.
    """

    first: Path  # the batches, as files for `clinml ingest --data`
    second: Path
    rejected: Path
    ingested: dict[str, Any]  # snapshots of the states described in ``world``
    after_second: dict[str, Any]
    after_second_run: dict[str, Any]
    materialized: dict[str, Any]
    materialized_run: dict[str, Any]
    served_second: list  # the serving reader's rows after the second batch's ingest

    def __init__(self, spec, base: Path):
        self.spec = spec
        self.home = base / "home"
        self.settings = Settings(home=self.home)
        self.root = self.settings.paths.usecase(spec.name).root
        self.copies = base / "copies"
        self.batches = base / "batches"
        self.batches.mkdir()

    def save(self, name: str) -> None:
        shutil.copytree(self.home, self.copies / name, symlinks=True)

    def restore(self, name: str) -> None:
        shutil.rmtree(self.home)
        shutil.copytree(self.copies / name, self.home, symlinks=True)

    def batch(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.batches / f"{name}.parquet"
        frame.to_parquet(path, index=False)
        return path


def _second_batch(first: pd.DataFrame) -> pd.DataFrame:
    """120 encounters between T1 and T2: 60 of known patients, 60 of new ones.

    Values are drawn from the first batch, so the batch passes the learned profile.
    """
    batch = first.sample(120, random_state=1).reset_index(drop=True)
    batch["patient_id"] = [*first["patient_id"].iloc[:60], *(f"N{i:05d}" for i in range(60))]
    batch["event_timestamp"] = [T1 + timedelta(minutes=10 * (i + 1)) for i in range(120)]
    return batch


@pytest.fixture(scope="module")
def world(tiny_spec, tmp_path_factory) -> World:
    """Saved copies ``ingested`` (batch 1 ingested and materialized at T1) and
    ``second`` (then batch 2 ingested at T2, not materialized), and snapshots of
    these and of ``materialized`` (then materialized at T2): what runs are compared to."""
    world = World(tiny_spec, tmp_path_factory.mktemp("integrity"))
    first = make_tiny_frame(n=300, seed=0)
    world.first = world.batch("first", first)
    world.second = world.batch("second", _second_batch(first))
    world.rejected = world.batch("rejected", _second_batch(first).assign(heart_rate=1000.0))

    _ingest(tiny_spec, world.settings, world.first, T1)
    _materialize(tiny_spec, world.settings, T1)
    world.save("ingested")
    world.ingested = _snapshot(world.root)
    _ingest(tiny_spec, world.settings, world.second, T2)
    world.save("second")
    world.served_second = _served(world)
    world.after_second = _snapshot(world.root)
    world.after_second_run = _snapshot(world.root, between_runs=True)
    _materialize(tiny_spec, world.settings, T2)
    world.materialized = _snapshot(world.root)
    world.materialized_run = _snapshot(world.root, between_runs=True)
    return world


def test_the_starting_states_differ_where_the_second_batch_writes(world: World) -> None:
    """Guards the tests below: what they compare is not empty, and does change."""
    first, second, done = world.ingested, world.after_second, world.materialized

    def rows(state: dict[str, Any]) -> int:
        return len(pd.read_json(io.StringIO(state["offline"]["features.parquet"]), orient="split"))

    assert rows(first) == 300 and rows(second) == 420
    assert second["offline"]["labels.parquet"] != first["offline"]["labels.parquet"]
    assert first["online"]["tiny_tiny_features"] and done["online"] != second["online"]
    assert done["registry"] != second["registry"]  # the interval (T1, T2) was recorded
    assert any(name.startswith("reports/validation/") for name in second["files"])
    assert not _leftovers(world.root)


# -- ingest -----------------------------------------------------------------------------

BEFORE, COMMITTED = "unchanged", "committed"


# The ingest's write steps, in order: features.parquet and labels.parquet written into a
# new run directory, a link to it renamed over ``offline`` (the commit), the report's
# report.md and summary.json moved into reports/validation/, the run's publish/ and the
# previous run's directory deleted, then Feast's apply.
@pytest.mark.parametrize(
    ("target", "nth", "when", "expected"),
    [
        # The window this guards: new features beside old labels.
        pytest.param("pandas.DataFrame.to_parquet", 1, "after", BEFORE, id="features-written"),
        pytest.param("pandas.DataFrame.to_parquet", 2, "after", BEFORE, id="labels-written"),
        pytest.param("os.replace", 1, "before", BEFORE, id="at-the-commit"),
        pytest.param("os.replace", 1, "after", COMMITTED, id="committed-report-unpublished"),
        pytest.param("os.replace", 2, "after", COMMITTED, id="report-half-published"),
        pytest.param("shutil.rmtree", 2, "before", COMMITTED, id="previous-run-not-deleted"),
        pytest.param(
            "clinml.features.store.apply", 1, "before", COMMITTED, id="before-feast-apply"
        ),
    ],
)
def test_a_killed_ingest_leaves_the_stores_as_before_or_committed(
    world: World, target: str, nth: int, when: str, expected: str
) -> None:
    world.restore("ingested")
    spec, settings, root = world.spec, world.settings, world.root

    _killed(
        lambda: _ingest(spec, settings, world.second, T2),
        lambda: _kill_at(target, nth, when, on=".ingest/" if target == "shutil.rmtree" else ""),
    )

    if expected == BEFORE:
        assert _snapshot(root) == world.ingested
    else:  # all of the batch is visible, whatever is still to be tidied up
        assert _snapshot(root)["offline"] == world.after_second["offline"]
    _ingest(spec, settings, world.second, T2)  # the next run: the same batch again
    assert _snapshot(root, between_runs=True) == world.after_second_run
    assert not _leftovers(root)


def test_an_ingest_that_fails_writing_changes_nothing(world: World) -> None:
    world.restore("ingested")
    real = pd.DataFrame.to_parquet
    calls = []

    def disk_full_at_the_labels(frame: pd.DataFrame, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(frame, *args, **kwargs)

    with (
        mock.patch.object(pd.DataFrame, "to_parquet", disk_full_at_the_labels),
        pytest.raises(OSError, match="No space left"),
    ):
        _ingest(world.spec, world.settings, world.second, T2)
    assert _snapshot(world.root) == world.ingested
    assert not _leftovers(world.root)  # a failed run tidies up after itself


def test_a_rejected_batch_changes_nothing_but_adds_its_report(world: World) -> None:
    world.restore("ingested")
    with pytest.raises(DataValidationError) as rejected:
        _ingest(world.spec, world.settings, world.rejected, T2)
    report = Path(rejected.value.report)
    assert report.is_file() and report.parent.parent == world.root / "reports" / "validation"

    after = _snapshot(world.root)
    added = sorted(set(after["files"]) - set(world.ingested["files"]))
    run = report.parent.relative_to(world.root).as_posix()
    assert added == [f"{run}/report.md", f"{run}/summary.json"]
    after["files"] = {k: v for k, v in after["files"].items() if k not in added}
    assert after == world.ingested
    assert not _leftovers(world.root)


def test_an_offline_directory_of_the_old_layout_is_converted_even_if_killed(
    world: World,
) -> None:
    """Before runs were committed through a link, ``offline`` was a plain directory."""
    world.restore("ingested")
    root = world.root
    committed = (root / "offline").resolve()
    (root / "offline").unlink()
    shutil.copytree(committed, root / "offline")
    shutil.rmtree(committed.parent)

    # The conversion is two renames; killed between them, ``offline`` is missing
    # (nothing looks ingested, never mixed data) until the next ingest completes it.
    _killed(
        lambda: _ingest(world.spec, world.settings, world.second, T2),
        lambda: _kill_at("os.symlink", 1, "before"),
    )
    assert not os.path.lexists(root / "offline")
    _ingest(world.spec, world.settings, world.second, T2)
    assert (root / "offline").is_symlink()
    assert _snapshot(root, between_runs=True) == world.after_second_run
    assert not _leftovers(root)


# -- materialize ------------------------------------------------------------------------


# Entities per executemany call: the 120 new entities are written in three calls.
SMALL_CHUNKS = 50


@pytest.mark.parametrize(
    ("point", "cache_kib", "expected"),
    [
        pytest.param("third-chunk", None, BEFORE, id="two-of-three-chunks-written"),
        # A cache too small for the write: SQLite moves changed pages into the database
        # file before the commit, so the kill leaves a hot journal to roll back.
        pytest.param("third-chunk", 1, BEFORE, id="two-chunks-written-pages-spilled"),
        pytest.param("commit", None, BEFORE, id="at-the-commit"),
        pytest.param("registry", None, COMMITTED, id="committed-registry-not-written"),
    ],
)
def test_a_killed_materialization_leaves_the_stores_as_before_or_committed(
    world: World, point: str, cache_kib: int | None, expected: str
) -> None:
    from clinml.features import online_sqlite

    world.restore("second")
    spec, settings, root = world.spec, world.settings, world.root

    def arm() -> None:
        mock.patch.object(online_sqlite, "CHUNK_ROWS", SMALL_CHUNKS).start()
        if cache_kib is not None:
            mock.patch.object(online_sqlite, "CACHE_KIB", cache_kib).start()
        if point == "registry":  # the registry file's replace: after the SQLite commit
            _kill_at("os.replace", 1, "before")
        else:
            _fault_in_sqlite(point).start()

    _killed(lambda: _materialize(spec, settings, T2), arm)

    if expected == BEFORE:
        if cache_kib is not None:
            # The kill left changed pages in the database file, and the serving reader,
            # the first to open it, still reads exactly the old rows.
            db = root / "feast" / "online.db"
            spilled = hashlib.sha256(db.read_bytes()).hexdigest()
            assert spilled != world.after_second["files"]["feast/online.db"]
            assert _served(world) == world.served_second
        assert _snapshot(root) == world.after_second
    else:
        # The rows are committed; Feast's registry is behind, never ahead.
        after = _snapshot(root, between_runs=True)
        assert after["online"] == world.materialized_run["online"]
        assert after["registry"] == world.after_second_run["registry"]
    _materialize(spec, settings, T2)  # the next run
    assert _snapshot(root, between_runs=True) == world.materialized_run
    assert not _leftovers(root)


def test_a_materialization_that_fails_writing_changes_nothing(world: World) -> None:
    from clinml.features import online_sqlite

    world.restore("second")

    def disk_full() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with (
        _fault_in_sqlite("third-chunk", disk_full),
        mock.patch.object(online_sqlite, "CHUNK_ROWS", SMALL_CHUNKS),
        pytest.raises(sqlite3.OperationalError, match="disk is full"),
    ):
        _materialize(world.spec, world.settings, T2)
    assert _snapshot(world.root) == world.after_second
    _materialize(world.spec, world.settings, T2)
    assert _snapshot(world.root, between_runs=True) == world.materialized_run


def _served(world: World) -> list:
    """What the serving reader returns for every stored patient."""
    from clinml.features import online_sqlite
    from clinml.features import store as feature_store

    paths = world.settings.paths.usecase(world.spec.name)
    store = feature_store.open_store(world.spec, paths)
    ids = sorted(pd.read_parquet(paths.features_file)["patient_id"].unique())
    reader = online_sqlite.OnlineReader.for_store(store, world.spec)
    try:
        return reader.read(ids)
    finally:
        reader.close()
