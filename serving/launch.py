"""Run ``bentoml serve`` for a use case as a child process.

``clinml serve`` runs it in the foreground; ``clinml demo`` starts it, waits until
``/readyz`` answers, sends requests, and stops it. The child gets ``BENTOML_HOME`` and
``CLINML_*`` from the settings so it serves the model the pipeline packaged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from clinml.errors import ClinmlError
from clinml.settings import Settings

SERVICE_IMPORT = "serving.service:ClinicalService"


def service_env(settings: Settings, usecase: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CLINML_HOME": str(settings.home),
            "CLINML_CONFIG_DIR": str(settings.config_dir),
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
        the model-execution service it needs (``serving.executor:ModelExecutor`` serves
        that one on its own)."""
        self.settings, self.usecase, self.port, self.host = settings, usecase, port, host
        self.target = target
        self.log_file = log_file
        self.url = f"http://{host}:{port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> ServiceProcess:
        """Start the service and wait until ``/readyz`` answers 200.

        Raises:
            ClinmlError: the port is taken, or the service exits or is not ready in time.
        """
        if not port_is_free(self.host, self.port):
            raise ClinmlError(f"port {self.port} is in use; pass --port to choose another")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("wb")
        self._process = subprocess.Popen(
            serve_command(self.host, self.port, self.target),
            env=service_env(self.settings, self.usecase),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
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
