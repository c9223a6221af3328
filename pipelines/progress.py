"""Progress output for long pipelines: numbered steps with timings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer


class Progress:
    """Prints ``[i/n] title`` when a step starts and its duration when it ends."""

    def __init__(self, total: int, echo: Callable[[str], None] = typer.echo):
        self.total, self.echo, self.index = total, echo, 0

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.index += 1
        self.echo(typer.style(f"[{self.index}/{self.total}] {title}", bold=True))
        started = time.perf_counter()
        yield
        self.echo(f"      done in {time.perf_counter() - started:.1f}s")

    def detail(self, line: str) -> None:
        self.echo(f"      {line}")
