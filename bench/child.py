"""Run one measurement of a benchmark in a process of its own, and read its result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def result_of(script: str, *args: str, **options: Any) -> dict:
    """``python script args`` in a new process (so its peak memory and imports are its
    own); its last line of output, parsed as JSON. Exits with the end of its error output
    when it fails. ``options`` go to :func:`subprocess.run` (``env``, ``timeout``)."""
    done = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        **options,
    )
    if done.returncode != 0:
        sys.exit(f"{Path(script).name} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
