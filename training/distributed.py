"""Training's independent work as tasks on a Ray cluster (``CLINML_RAY_ADDRESS``).

Without an address, training runs in this process and its loky workers, as it always has
(:mod:`clinml.training.search`). With one, the search's (configuration, fold) fits and each
candidate's refit and evaluation (its bootstrap included) run as Ray tasks, and the
results are the same as in-process for the same seed: a task runs the same function on the
same rows, and every random draw in it comes from the spec's seed, not from where it runs.

- **Data.** The rows a set of tasks shares (the search sample, the training frame) are put
  in Ray's object store once (``ray.put``); each task receives a reference and the indices
  of its rows, never a pickled frame of its own.
- **Threads.** A task asks for one CPU, and runs its OpenMP, BLAS and torch pools on as
  many threads as Ray gave it (:func:`clinml.cpus.limit_threads`); the worker processes
  also start with ``OMP_NUM_THREADS=1`` and its kin, so nothing oversubscribes a node.
- **Failures.** A task whose worker dies (a killed process, a lost node) is retried by Ray
  up to :data:`RETRIES` times. A task that raises is not retried: the call comes back as a
  :class:`Failed` naming the exception's type (never its message: a library may quote a
  value), which the search records as a failed trial. A :class:`~clinml.errors.ClinmlError`
  (a configuration the spec got wrong) is raised in the driver, as in-process.

Addresses: ``local`` starts a Ray instance inside this process on the CPUs it is given (a
laptop, a CI job, the benchmark); anything else is passed to ``ray.init(address=...)``:
``HOST:6379`` for a cluster's head node, ``ray://HOST:10001`` for Ray Client, ``auto`` for
the cluster this process runs on (a KubeRay job's submitter; docs/deployment.md).

Usage::

    with RayCluster.connect("local") as cluster:
        results = cluster.map(fit_rows, shared=(x, y), calls=[(rows_a,), (rows_b,)])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from clinml.cpus import THREAD_ENV_VARS, limit_threads, usable_cpus
from clinml.errors import ClinmlError

log = logging.getLogger(__name__)

# Ray retries a task this many times when its worker process dies (not when it raises).
RETRIES = 3
LOCAL = "local"


@dataclass(frozen=True)
class Failed:
    """A call that raised in its task: ``kind`` is the exception's type."""

    kind: str


class RayCluster:
    """A connection to a Ray cluster for training's tasks (see the module docstring).
    Made by :meth:`connect`; ``cpus`` is the cluster's CPU count when it connected."""

    def __init__(self, address: str, cpus: int) -> None:
        self.address = address
        self.cpus = cpus
        self._remote: Any = None

    @classmethod
    @contextmanager
    def connect(cls, address: str) -> Iterator[RayCluster]:
        """Connect to the cluster at ``address`` (``local``: start one in this process),
        and disconnect on the way out (a local cluster stops).

        Raises:
            ClinmlError: Ray is not installed, or nothing answers at ``address``.
        """
        try:
            import ray
        except ImportError:
            raise ClinmlError(
                "training on Ray needs the ray package: pip install 'clinml[ray]'"
            ) from None
        started_here = not ray.is_initialized()
        environment = dict(os.environ)  # ray.init sets RAY_AUTH_MODE, PYTHONBREAKPOINT, ...
        if started_here:
            options: dict[str, Any] = {
                "logging_level": logging.WARNING,
                "log_to_driver": False,
                # every worker process starts with one thread per native pool; a task
                # raises it to the CPUs it was given
                "runtime_env": {"env_vars": dict.fromkeys(THREAD_ENV_VARS, "1")},
            }
            if address == LOCAL:
                options |= {"num_cpus": usable_cpus(), "include_dashboard": False}
            else:
                _answers(address)  # Ray itself retries an unreachable address for minutes
                options["address"] = address
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ClinmlError(
                    f"cannot reach the Ray cluster at {address!r} ({type(exc).__name__}): "
                    "check CLINML_RAY_ADDRESS (or --ray), or unset it to train in-process"
                ) from None
        cpus = int(ray.cluster_resources().get("CPU", 0))
        log.info("training on Ray at %s: %d CPUs", address, cpus)
        try:
            yield cls(address, cpus)
        finally:
            if started_here:
                ray.shutdown()
                _restore(environment)  # a later `ray start` or Ray job must not inherit them

    def map(
        self,
        function: Callable[..., Any],
        shared: Any,
        calls: Sequence[tuple[Any, ...]],
        *,
        torch: bool = False,
    ) -> list[Any]:
        """``function(shared, *call)`` for each call, as Ray tasks of one CPU each; the
        results in the order of ``calls``, a :class:`Failed` for each call that raised.

        ``shared`` is put in the object store once, for all the calls. ``torch``: the
        function uses torch (its thread pool is limited too).

        Raises:
            ClinmlError: a call raised one (a spec error), or a task's worker died more
                than :data:`RETRIES` times.
        """
        import ray

        if self._remote is None:
            self._remote = ray.remote(num_cpus=1, max_retries=RETRIES)(_task)
        reference = ray.put(shared)
        pending = [self._remote.remote(function, reference, call, torch) for call in calls]
        results: list[Any] = []
        for ref in pending:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, ClinmlError):
                    raise cause from None
                results.append(Failed(type(cause).__name__ if cause else "RayTaskError"))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
                raise ClinmlError(
                    f"a training task's worker died {RETRIES + 1} times "
                    f"({type(exc).__name__}); see the Ray cluster's logs"
                ) from None
        return results


def _restore(environment: dict[str, str]) -> None:
    """Put ``os.environ`` back as ``environment`` was."""
    for key in set(os.environ) - set(environment):
        del os.environ[key]
    os.environ.update(environment)


def _answers(address: str, timeout_s: float = 10.0) -> None:
    """Raise a ClinmlError unless something accepts a TCP connection at ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``; other forms, like ``auto``, are Ray's to
    resolve)."""
    import socket

    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClinmlError(
            f"cannot reach the Ray cluster at {address!r} ({type(exc).__name__}): check "
            "CLINML_RAY_ADDRESS (or --ray), or unset it to train in-process"
        ) from None


def _task(function: Callable[..., Any], shared: Any, call: tuple[Any, ...], torch: bool) -> Any:
    """One call in a Ray worker, on the CPUs Ray assigned to it."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    with limit_threads(max(1, int(cpus)), torch=torch):
        return function(shared, *call)
