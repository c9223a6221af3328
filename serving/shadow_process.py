"""The shadow version scored in a process of its own, at the lowest scheduling priority.

Scoring the shadow on a thread of the API worker costs the champion's answers their tail:
the shadow's model calls hold the interpreter lock, and a request that arrives during one
waits for it, whatever the thread's OS priority (docs/benchmarks.md, "Shadow scoring's
cost to the champion"). Here the shadow's model runs in a child process instead
(``python -m clinml.serving.shadow_process``), niced to 19 and limited to one thread, so
the lock is not shared and the OS hands the core to the worker first. The worker's shadow
thread only sends the joined columns and waits for the probabilities, without the lock.

The child holds one model at a time. The parent has already loaded it from the registry
and checked it against its recorded hashes (:mod:`clinml.serving.runtime`); it sends the
fitted pipeline, pickled over the child's own stdin pipe (never through a file), and the
child compiles its fast path on the CPU. Messages are length-prefixed pickles, both ways:

    ("load", ServedModel without card or compiled model)  ->  ("loaded", None)
    ("score", {feature: values})                          ->  ("scored", probabilities)
    any failure in the child                              ->  ("failed", its type's name)

Only the type of a child's failure comes back: a library's message may quote an input
value. A child that exits, or answers nothing within ``reply_timeout_s``, is killed; the
call raises :class:`ShadowFailed` (the shadow worker counts it), and the next call after
``restart_after_s`` starts a new child. The child exits by itself when the worker does
(its stdin closes).

Usage::

    process = ShadowProcess()
    probabilities = process.predict(served_model, batch.columns)
    process.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

logger = logging.getLogger("bentoml.clinml")

_HEADER = struct.Struct("<Q")
# The child's nice value: the OS runs it when the worker's threads leave the core free.
CHILD_NICE = 19
# One thread for the child's libraries: it must not fan out over the worker's cores.
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


class ShadowFailed(Exception):
    """The shadow process could not score: ``kind`` names why (the type of the child's
    failure, or ``ShadowProcessExited`` / ``ShadowProcessTimeout``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ShadowProcess:
    """The parent's side: starts the child on first use, keeps it holding the version it
    is asked to score, and restarts it after a failure (see the module docstring).

    Calls are serialised (the shadow worker is the only caller; a lock makes sure).

    Args:
        reply_timeout_s: the longest a call waits for the child. Generous by default: at
            nice 19 on a busy core the child may be starved for a while, and the shadow's
            queue drops requests meanwhile; only a hung child should reach it.
        restart_after_s: after the child failed, calls fail at once for this long before
            a new child is started (a model that kills its process does not restart it on
            every request).
    """

    def __init__(self, *, reply_timeout_s: float = 600.0, restart_after_s: float = 10.0) -> None:
        self.reply_timeout_s = reply_timeout_s
        self.restart_after_s = restart_after_s
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._holding: tuple[str, int] | None = None  # (version, id of the parent's model)
        self._down_until = 0.0
        self.starts = 0

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    def predict(self, model: Any, columns: dict[str, Any]) -> np.ndarray:
        """``model``'s positive-class probabilities for the rows of ``columns``, computed in
        the child (``model``: a :class:`~clinml.serving.runtime.ServedModel`).

        Raises:
            ShadowFailed: the child failed, exited or did not answer in time.
        """
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                self._start()
            if self._holding != (model.version, id(model)):
                self._ask(("load", _portable(model)))
                self._holding = (model.version, id(model))
            return np.asarray(self._ask(("score", columns)), dtype=np.float64)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (waiting for a call in flight up to ``timeout`` seconds)."""
        if not self._lock.acquire(timeout=timeout):
            self._kill()  # a call is stuck: it fails, and the child goes
            return
        try:
            self._kill()
        finally:
            self._lock.release()

    def release_if_idle(self) -> None:
        """Stop the child unless a call is in flight (the shadow was stopped: its model
        need not stay in memory)."""
        if self._child is None or not self._lock.acquire(blocking=False):
            return
        try:
            self._kill()
        finally:
            self._lock.release()

    # -- under the lock ----------------------------------------------------------------

    def _start(self) -> None:
        self._kill()
        if time.monotonic() < self._down_until:
            raise ShadowFailed(
                "ShadowProcessDown", "the shadow process failed recently; not restarted yet"
            )
        self._child = subprocess.Popen(
            [sys.executable, "-m", "clinml.serving.shadow_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **_ONE_THREAD},
            close_fds=True,
        )
        os.set_blocking(self._child.stdin.fileno(), False)
        os.set_blocking(self._child.stdout.fileno(), False)
        self.starts += 1
        logger.info("shadow process %d started (nice %d)", self._child.pid, CHILD_NICE)

    def _ask(self, message: tuple[str, Any]) -> Any:
        child = self._child
        assert child is not None and child.stdin is not None and child.stdout is not None
        deadline = time.monotonic() + self.reply_timeout_s
        try:
            _write(child.stdin.fileno(), _frame(message), deadline)
            kind, value = pickle.loads(_read(child.stdout.fileno(), deadline))
        except TimeoutError:
            self._fail()
            raise ShadowFailed(
                "ShadowProcessTimeout",
                f"the shadow process did not answer within {self.reply_timeout_s:g} s",
            ) from None
        except (OSError, EOFError, pickle.UnpicklingError):
            self._fail()
            raise ShadowFailed("ShadowProcessExited", "the shadow process exited") from None
        if kind == "failed":
            if message[0] == "load":
                self._holding = None
            raise ShadowFailed(str(value), f"the shadow model raised {value} in its process")
        return value

    def _fail(self) -> None:
        self._kill()
        self._down_until = time.monotonic() + self.restart_after_s

    def _kill(self) -> None:
        child, self._child, self._holding = self._child, None, None
        if child is None:
            return
        for stream in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # the child reads the end of its input and exits
        try:
            child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _portable(model: Any) -> Any:
    """What the child needs of a served model: no card, no compiled fast path (it holds
    device tensors and a module reference; the child compiles its own on the CPU)."""
    return dataclasses.replace(model, card=None, card_html=None, compiled=None)


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _write(fd: int, data: bytes, deadline: float | None) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, deadline, write=True)
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


def _read(fd: int, deadline: float | None) -> bytes:
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    return _read_exactly(fd, size, deadline)


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    parts, left = [], size
    while left:
        _wait(fd, deadline, write=False)
        try:
            part = os.read(fd, min(left, 1 << 20))
        except BlockingIOError:
            continue
        if not part:
            raise EOFError("the other end closed the pipe")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _wait(fd: int, deadline: float | None, *, write: bool) -> None:
    """Until ``fd`` can be written (or read); TimeoutError past ``deadline``."""
    while True:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise TimeoutError
        ready = select.select([], [fd], [], wait) if write else select.select([fd], [], [], wait)
        if ready[1] or ready[0]:
            return


# -- the child -------------------------------------------------------------------------


def main() -> None:
    """The child's loop: one message in, one answer out, until its input closes."""
    # Its own copy of the protocol pipe; anything a library prints goes to stderr.
    replies = os.dup(1)
    os.dup2(2, 1)
    requests = sys.stdin.fileno()
    with contextlib.suppress(OSError):  # not allowed here: run as is
        os.nice(CHILD_NICE)
    model: Any = None
    while True:
        try:
            kind, value = pickle.loads(_read(requests, None))
        except EOFError:  # the worker closed the pipe, or exited
            return
        try:
            if kind == "load":
                from clinml.serving.runtime import _compile

                model = dataclasses.replace(value, compiled=_compile(value.pipeline, "cpu"))
                answer: tuple[str, Any] = ("loaded", None)
            else:
                answer = ("scored", np.asarray(model.predict_columns(value), dtype=np.float64))
        except Exception as exc:  # the type only goes back
            answer = ("failed", type(exc).__name__)
        try:
            _write(replies, _frame(answer), None)
        except BrokenPipeError:  # the worker went while this call ran
            return


if __name__ == "__main__":
    main()
