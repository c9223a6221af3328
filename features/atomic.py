"""All-or-nothing file changes for the stores that ingestion and materialization write.

A process can be killed between any two system calls. Each change here is made
visible in one atomic step (a ``rename`` over the old name) after its bytes are on
disk (``fsync``), so a reader sees the old version or the new one, never a part of
either. ``locked`` keeps two writers of the same store from interleaving; the kernel
releases the lock when its holder dies, so a killed writer never blocks the next run.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sync(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a temporary file renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    sync(path.parent)


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files a killed ``write_file(path, ...)`` left beside ``path``.

    Only while holding the lock that every writer of ``path`` takes: a live writer's
    temporary file looks the same.
    """
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
