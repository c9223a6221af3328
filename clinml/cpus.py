"""How many CPUs this process may use, and thread limits that keep training within them.

Native libraries size their thread pools from the host: OpenMP (scikit-learn's histogram
gradient boosting), BLAS and torch start one thread per *host* core, whatever the process
is allowed. In a Kubernetes pod with a CPU limit, in a container pinned to some cores, or
on a machine shared with other work, that is more threads than CPUs; an OpenMP team then
waits at every barrier for a thread the kernel has descheduled, and training collapses
(docs/training.md, "CPU use"; docs/benchmarks.md, "Training under CPU contention").

:func:`usable_cpus` counts the CPUs the process is given: its CPU affinity
(``os.sched_getaffinity``, which ``taskset``, ``cpuset`` and Kubernetes' static CPU manager
set) and its cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``: a pod's ``resources.limits.cpu``). :func:`training_threads` adds
the ``CLINML_TRAIN_THREADS`` override, and :func:`limit_threads` applies a thread count to
every pool a fit can use: OpenMP and BLAS (threadpoolctl), torch, joblib's default
``n_jobs``, and the ``*_NUM_THREADS`` variables a subprocess started meanwhile inherits.

Training (``clinml.training.train``) runs that many search worker processes, each pool of each
process on one thread::

    workers = training_threads(settings.train_threads)
    with limit_threads(1):
        model.fit(x, y)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The variables native thread pools read when they start: a subprocess (a loky worker,
# a tool training runs) inherits them, so it starts with the same limit.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (``1.5`` for a 150 ms per 100 ms quota), or ``None``.

    cgroup v2 writes ``"<quota> <period>"`` (or ``"max <period>"``) in ``cpu.max``;
    cgroup v1 writes the two numbers in ``cpu/cpu.cfs_quota_us`` (``-1``: no limit) and
    ``cpu/cpu.cfs_period_us``. Inside a container the process's own cgroup is mounted at
    ``root``.

    Args:
        root: where the cgroup file system is mounted (tests point it at a directory of
            fake files).
    """
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota == "max":
            return None
        return _ratio(quota, period or "100000")
    for directory in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _read(root / directory / "cpu.cfs_quota_us")
        if quota is not None:
            return _ratio(quota, _read(root / directory / "cpu.cfs_period_us") or "100000")
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup quota; at least 1.

    A fractional quota is rounded down: 1.5 CPUs run one thread flat out, while two would
    be throttled for part of every period (and an OpenMP team stalls with them).

    Args:
        root: where the cgroup file system is mounted.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity call, no cgroups
        return max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def training_threads(override: int | None = None, root: Path = CGROUP_ROOT) -> int:
    """CPUs training uses in all: ``override`` (``CLINML_TRAIN_THREADS``) when set, else
    :func:`usable_cpus`. ``0`` means no limit (each library's own default).

    Raises:
        ValueError: ``override`` is negative.
    """
    if override is None:
        return usable_cpus(root)
    if override < 0:
        raise ValueError(f"CLINML_TRAIN_THREADS must be 0 or more, not {override}")
    return override


def thread_env(threads: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` and its kin, all set to ``threads``."""
    return dict.fromkeys(THREAD_ENV_VARS, str(threads))


@contextmanager
def limit_threads(threads: int, torch: bool = True) -> Iterator[None]:
    """Run the block with every thread pool of a fit limited to ``threads``.

    OpenMP and BLAS pools through threadpoolctl, torch's intra-op pool
    (``torch.set_num_threads``, when torch is installed and ``torch`` is true), joblib's
    default ``n_jobs`` (an estimator left at ``n_jobs=None``, such as the random forest),
    and the ``*_NUM_THREADS`` environment variables; all are restored afterwards.

    ``threads=0`` limits nothing: every library keeps its own default (one thread per
    host core) and joblib's default ``n_jobs`` is every core, as before issue 20.
    """
    from joblib import parallel_config
    from threadpoolctl import threadpool_limits

    if threads == 0:
        with parallel_config(n_jobs=-1):
            yield
        return
    saved_env = {name: os.environ.get(name) for name in THREAD_ENV_VARS}
    with ExitStack() as stack:
        os.environ.update(thread_env(threads))
        stack.callback(_restore_env, saved_env)
        stack.enter_context(threadpool_limits(limits=threads))
        stack.enter_context(parallel_config(n_jobs=threads))
        if torch:
            try:
                import torch as torch_module
            except ImportError:
                torch_module = None
            if torch_module is not None:
                stack.callback(torch_module.set_num_threads, torch_module.get_num_threads())
                torch_module.set_num_threads(threads)
        yield


def _restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
