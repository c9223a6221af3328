"""All-or-nothing file changes: the one way clinml replaces a file.

A process can be killed between any two system calls. ``write_atomic`` (and
``replacing``, for a library that writes the file itself) writes a temporary file beside
the target and makes it visible in one atomic step, a ``rename`` over the old name, after
its bytes are on disk (``fsync``), then makes the rename itself durable (``fsync`` of the
directory). A reader sees the old version or the new one, never a part of either.

The temporary file is named ``.<name>.<random>.tmp``: hidden from readers that skip
names starting with ``.``, and removed when the write fails. ``remove_leftovers`` deletes
those a killed writer left. ``locked`` keeps two writers of the same file from
interleaving; the kernel releases the lock when its holder dies.

Usage::

    write_atomic(path, text)                          # umask permissions, fsynced
    write_atomic(secret_path, secret, private=True)   # 0600 whatever the umask
    with replacing(target) as tmp:                    # a library writes the file
        pq.write_table(table, tmp)
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["locked", "remove_leftovers", "replacing", "sync", "write_atomic"]


def sync(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(
    path: Path, *, mode: int = 0o666, private: bool = False, fsync: bool = True
) -> Iterator[Path]:
    """Yield a new, empty temporary file beside ``path``; when the block ends without an
    error, rename it over ``path``; when it raises, delete it.

    The caller writes the temporary file by its name (a library's own writer may
    truncate and rewrite it; its permissions stay). ``path``'s directory must exist.

    Args:
        path: the file to replace (or create).
        mode: the permissions asked for, less the umask, as ``open()`` does.
        private: the file is readable and writable by its owner only (0600), whatever
            the umask: for secrets. Overrides ``mode``.
        fsync: flush the file before the rename and the directory after it, so the new
            version survives a crash of the machine. False only where losing the latest
            write to a crash is acceptable and the fsyncs cost too much (say why).

    Raises:
        OSError: the file could not be written, renamed or flushed (the temporary file
            is removed; ``path`` is unchanged unless the rename happened).
    """
    with _replace(Path(path), mode, private, fsync) as (tmp, _fd):
        yield tmp


def write_atomic(
    path: Path,
    data: str | bytes,
    *,
    mode: int = 0o666,
    private: bool = False,
    fsync: bool = True,
) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) in one step.

    Args:
        path: the file to replace (or create); its directory must exist.
        data: the whole new content.
        mode, private, fsync: as for ``replacing``; by default the file gets the umask's
            permissions and is flushed to disk with its directory.

    Raises:
        OSError: the file could not be written (``path`` is unchanged).
    """
    content = data.encode("utf-8") if isinstance(data, str) else data
    with _replace(Path(path), mode, private, fsync) as (_tmp, fd):
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]


@contextmanager
def _replace(path: Path, mode: int, private: bool, fsync: bool) -> Iterator[tuple[Path, int]]:
    """The temporary file (its name, and a descriptor open for writing) for one change."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else mode)
    try:
        try:
            if private:
                os.fchmod(fd, 0o600)  # whatever the umask
            yield tmp, fd
            if fsync:
                os.fsync(fd)  # the file's data, whichever descriptor wrote it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        sync(path.parent)


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files a killed ``write_atomic(path, ...)`` left beside ``path``.

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
