"""Run ``bentoml serve`` for a use case as a child process.

``clinml serve`` runs it in the foreground; ``clinml demo`` starts it, waits until
``/readyz`` answers, sends requests, and stops it. The child gets ``BENTOML_HOME`` and
``CLINML_*`` from the settings so it serves the model the pipeline packaged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import psutil

from clinml.errors import ClinmlError
from clinml.settings import Settings

SERVICE_IMPORT = "clinml.serving.service:ClinicalService"

log = logging.getLogger(__name__)

# BentoML's process manager (circus) picks free ports for its two control sockets by
# binding and releasing them, and binds them again with ZeroMQ a moment later; another
# process can take one in between, and ``bentoml serve`` then dies at start with this.
# Nothing was served yet, so the launch is simply tried again (with new ports).
CONTROL_PORT_RACE = re.compile(
    r"ZMQError: Address already in use \(addr='tcp://127\.0\.0\.1:\d+'\)"
)
START_ATTEMPTS = 3


def lost_control_port(output: str) -> bool:
    """Whether ``bentoml serve`` output shows it lost a control port at start."""
    return CONTROL_PORT_RACE.search(output) is not None


def service_env(settings: Settings, usecase: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CLINML_HOME": str(settings.home),
            "CLINML_CONFIG_DIR": str(settings.spec_dir),
            "CLINML_USECASE": usecase,
            "BENTOML_HOME": str(settings.paths.bentoml_home),
        }
    )
    return env


def serve_command(host: str, port: int, target: str = SERVICE_IMPORT) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        target,
        "--host",
        host,
        "--port",
        str(port),
    ]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def stop_group(process: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it forked
    (``bentoml serve`` forks workers): SIGTERM to the group, SIGKILL after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def run_foreground(command: list[str], env: dict[str, str]) -> int:
    """:func:`run_once`, tried again (up to ``START_ATTEMPTS`` times) when ``bentoml serve``
    lost a control port at start (``CONTROL_PORT_RACE``)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        status, raced = run_once(command, env)
        if not raced or attempt == START_ATTEMPTS:
            return status
        print(
            f"clinml: bentoml serve lost a control port to another process at start; "
            f"starting it again (attempt {attempt + 1} of {START_ATTEMPTS})",
            file=sys.stderr,
            flush=True,
        )
    raise AssertionError("unreachable")


def run_once(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    """Run ``command`` (``bentoml serve``) until it exits, as ``clinml serve`` does.

    The child runs in its own session, so the signals that stop ``clinml serve`` are
    passed on to its whole process group (``bentoml serve`` and the workers it forks)
    rather than reaching only some of them: SIGTERM and SIGINT are forwarded as they
    are, SIGHUP as SIGTERM (a closed terminal stops the server). A signal ignored when
    this process started (``nohup``, a service manager's ``SIG_IGN``) stays ignored.
    On the way out the group is stopped, so no worker outlives the command.

    The child's stderr is passed through line by line, watched for ``CONTROL_PORT_RACE``.

    Returns:
        The child's exit status (128 + signal number when a signal stopped it), and
        whether it failed because it lost a control port at start (no signal was sent).
    """
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen = _Watch()
    relay = threading.Thread(
        target=_relay, args=(process.stderr, seen), name="clinml-stderr", daemon=True
    )
    relay.start()
    forwarded = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT}
    forwarded[signal.SIGHUP] = signal.SIGTERM
    previous = {}

    def forward(signum: int, _frame: object) -> None:
        seen.signalled = True
        # BentoML's workers run in process groups of their own: remember them while
        # their parent still owns them, to make sure they are gone afterwards.
        seen.workers = _descendants(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, forwarded[signal.Signals(signum)])

    for signum in forwarded:
        handler = signal.getsignal(signum)
        if handler == signal.SIG_IGN:
            continue
        previous[signum] = handler
        signal.signal(signum, forward)
    try:
        status = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:
            seen.workers = _descendants(process.pid)
        stop_group(process)
        _reap(process.pid, seen.workers)
        relay.join(timeout=5.0)
    raced = status != 0 and seen.race and not seen.signalled
    return (128 - status if status < 0 else status), raced


@dataclass
class _Watch:
    """What one run of ``bentoml serve`` has shown: written by the stderr relay thread
    and the signal handler, read once the child has exited."""

    race: bool = False  # its stderr named the control-port race
    signalled: bool = False  # a stop signal was forwarded to it
    workers: list[psutil.Process] = field(default_factory=list)  # its last-known workers


def _relay(stream: IO[bytes], seen: _Watch) -> None:
    """Copy the child's stderr to ours as it comes, noting the control-port race."""
    out = sys.stderr.buffer
    for line in iter(stream.readline, b""):
        if not seen.race and lost_control_port(line.decode("utf-8", "replace")):
            seen.race = True
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):  # our stderr is gone; keep draining the pipe
            pass
    stream.close()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _reap(pgid: int, workers: list[psutil.Process], grace_s: float = 20.0) -> None:
    """Stop what is left of a server whose main process has exited: the workers it had
    (BentoML's arbiter stops its workers before it exits, so any still running are
    orphans) get SIGTERM, then SIGKILL after ``grace_s``, as does its process group."""
    deadline = time.monotonic() + grace_s
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.terminate()
    _, alive = psutil.wait_procs(workers, timeout=grace_s)
    for worker in alive:
        with contextlib.suppress(psutil.Error):
            worker.kill()
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


class ServiceProcess:
    """``bentoml serve`` in the background, logging to a file; a context manager."""

    def __init__(
        self,
        settings: Settings,
        usecase: str,
        port: int,
        log_file: Path,
        host: str = "127.0.0.1",
        target: str = SERVICE_IMPORT,
    ):
        """``target``: the BentoML service to serve; by default the API, which starts
        the model-execution service it needs (``clinml.serving.executor:ModelExecutor`` serves
        that one on its own)."""
        self.settings, self.usecase, self.port, self.host = settings, usecase, port, host
        self.target = target
        self.log_file = log_file
        self.url = f"http://{host}:{port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, timeout: float = 180.0) -> ServiceProcess:
        """Start the service and wait until ``/readyz`` answers 200.

        Raises:
            ClinmlError: the port is taken, or the service exits or is not ready in time.
        """
        if not port_is_free(self.host, self.port):
            raise ClinmlError(f"port {self.port} is in use; pass --port to choose another")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.write_bytes(b"")
        attempt = 1
        self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                output = self.log_file.read_text(encoding="utf-8", errors="replace")
                if attempt < START_ATTEMPTS and lost_control_port(output[self._offset :]):
                    attempt += 1
                    log.warning(
                        "bentoml serve lost a control port at start; starting it again "
                        "(attempt %d of %d)",
                        attempt,
                        START_ATTEMPTS,
                    )
                    stop_group(self._process)
                    self._spawn()
                    continue
                raise ClinmlError(
                    f"the service exited with status {self._process.returncode}; "
                    f"see {self.log_file}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ClinmlError(f"the service was not ready after {timeout:.0f}s; see {self.log_file}")

    def _spawn(self) -> None:
        """Start ``bentoml serve``, appending to the log (a retry keeps the first try's)."""
        self._offset = self.log_file.stat().st_size
        with self.log_file.open("ab") as log_handle:
            self._process = subprocess.Popen(
                serve_command(self.host, self.port, self.target),
                env=service_env(self.settings, self.usecase),
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        """The ``bentoml serve`` process (it forks the workers), while it runs."""
        return None if self._process is None else self._process.pid

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_group(process)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
