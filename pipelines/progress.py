"""Progress output for long pipelines: numbered steps with timings."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer


class Progress:
    """Prints ``[i/n] title`` when a step starts and its duration when it ends.

    Long work inside a step reports through :meth:`bar`: a live progress bar on a
    terminal, a line per quarter otherwise (CI logs, tests).
    """

    def __init__(
        self,
        total: int,
        echo: Callable[[str], None] = typer.echo,
        interactive: bool | None = None,
    ):
        self.total, self.echo, self.index = total, echo, 0
        self.interactive = sys.stdout.isatty() if interactive is None else interactive

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.index += 1
        self.echo(typer.style(f"[{self.index}/{self.total}] {title}", bold=True))
        started = time.perf_counter()
        yield
        self.echo(f"      done in {time.perf_counter() - started:.1f}s")

    def detail(self, line: str) -> None:
        self.echo(f"      {line}")

    @contextmanager
    def bar(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A callback ``(done, total)`` that drives a progress bar for ``description``."""
        if not self.interactive:
            reported = {"quarter": 0}

            def log(done: int, total: int) -> None:
                quarter = 4 * done // max(total, 1)
                if quarter > reported["quarter"]:
                    reported["quarter"] = quarter
                    self.detail(f"{description}: {done:,} of {total:,}")

            yield log
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        columns = [f"      {description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with RichProgress(*columns, transient=True) as bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
