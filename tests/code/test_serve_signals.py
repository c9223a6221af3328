"""`clinml serve` stops the whole server on SIGTERM, SIGINT and SIGHUP, and survives
BentoML's control-port race at start (issue 20, items 3 and 11).

A stand-in server plays `bentoml serve`: it starts a worker in a process group of its own
(as BentoML's workers are), writes both pids, and waits. The launcher under test is the
real one (`clinml.serving.launch.run_foreground`), run in a process of its own so that signals
can be sent to it as an operator or a service manager would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinml.serving import launch
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]

SERVER = """
import json, os, subprocess, sys, time
pids, mode = sys.argv[1], sys.argv[2]
attempts = os.path.join(os.path.dirname(pids), "attempts")
count = int(open(attempts).read()) + 1 if os.path.exists(attempts) else 1
open(attempts, "w").write(str(count))
if mode == "race" and count == 1:
    print("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:43953')",
          file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "broken":
    print("ModuleNotFoundError: No module named 'nothing'", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "race":
    sys.exit(0)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                          process_group=0)
with open(pids + ".tmp", "w") as out:
    json.dump({"server": os.getpid(), "worker": worker.pid}, out)
os.replace(pids + ".tmp", pids)
time.sleep(3600)
"""

DRIVER = """
import sys
from clinml.serving.launch import run_foreground
sys.exit(run_foreground(sys.argv[1:], None))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: only its parent has not collected it yet
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start(tmp_path: Path, mode: str = "serve", ignore_hup: bool = False):
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    pids = tmp_path / "pids.json"

    def dispositions() -> None:
        # The launcher keeps a signal ignored at start, so start it with the defaults
        # whatever this test runs under (a shell's background job ignores SIGINT).
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        if ignore_hup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` does

    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, sys.executable, str(server), str(pids), mode],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # signals from this test reach the launcher only
        preexec_fn=dispositions,
    )
    return driver, pids


def _serving(driver: subprocess.Popen[str], pids: Path) -> dict[str, int]:
    wait_for(lambda: pids.exists() or driver.poll() is not None, "the stand-in server to start")
    assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
    return json.loads(pids.read_text())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_stops_the_server_and_its_workers(tmp_path: Path, signum: int) -> None:
    driver, pids = _start(tmp_path)
    try:
        started = _serving(driver, pids)
        driver.send_signal(signum)
        driver.wait(timeout=120)
        wait_for(lambda: not _alive(started["server"]), "the server to stop", 60)
        wait_for(lambda: not _alive(started["worker"]), "the server's worker to stop", 60)
        # the server died of the SIGTERM/SIGINT it was sent: 128 + signal number
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        assert driver.returncode == 128 + sent
    finally:
        _kill_all(driver, pids)


def test_a_hangup_ignored_at_start_stays_ignored(tmp_path: Path) -> None:
    """Under `nohup`, closing the terminal must not stop the server."""
    driver, pids = _start(tmp_path, ignore_hup=True)
    try:
        started = _serving(driver, pids)
        driver.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # give a wrongly forwarded signal time to act; not a timing assert
        assert driver.poll() is None
        assert _alive(started["server"]) and _alive(started["worker"])
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
        wait_for(lambda: not _alive(started["worker"]), "the server's worker to stop", 60)
    finally:
        _kill_all(driver, pids)


def test_a_lost_control_port_is_tried_again(tmp_path: Path) -> None:
    driver, _ = _start(tmp_path, mode="race")
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    assert (tmp_path / "attempts").read_text() == "2"
    assert "starting it again (attempt 2 of 3)" in err
    assert "ZMQError" in err  # BentoML's own output still reaches the operator


def test_other_start_failures_are_not_retried(tmp_path: Path) -> None:
    driver, _ = _start(tmp_path, mode="broken")
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 3
    assert (tmp_path / "attempts").read_text() == "1"
    assert "ModuleNotFoundError" in err


def test_lost_control_port_matches_bentomls_error_only() -> None:
    assert launch.lost_control_port(
        "zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:43953')"
    )
    # the service's own port taken is a different failure, reported, not retried
    assert not launch.lost_control_port("OSError: [Errno 98] Address already in use")


def _kill_all(driver: subprocess.Popen[str], pids: Path) -> None:
    if driver.poll() is None:
        driver.kill()
        driver.wait()
    if pids.exists():
        for pid in json.loads(pids.read_text()).values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


READY_SERVER = """
import http.server, os, sys
port, attempts = int(sys.argv[1]), sys.argv[2]
count = int(open(attempts).read()) + 1 if os.path.exists(attempts) else 1
open(attempts, "w").write(str(count))
if count == 1:
    print("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:40001')",
          file=sys.stderr, flush=True)
    sys.exit(1)

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def test_the_test_launcher_survives_a_lost_control_port(tmp_path: Path, monkeypatch) -> None:
    """`ServiceProcess` (the demo's and the tests' launcher) starts again, too."""
    from clinml.settings import Settings

    script = tmp_path / "ready.py"
    script.write_text(READY_SERVER)
    attempts = tmp_path / "attempts"
    monkeypatch.setattr(
        launch,
        "serve_command",
        lambda host, port, target: [sys.executable, str(script), str(port), str(attempts)],
    )
    log = tmp_path / "serve.log"
    with launch.ServiceProcess(Settings(home=tmp_path), "pathology", launch.free_port(), log):
        assert attempts.read_text() == "2"
    assert "ZMQError" in log.read_text()  # the first try's output is kept
