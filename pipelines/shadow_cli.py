"""``clinml shadow``: score a second model version beside the champion on live traffic.

``start`` points the registry alias ``shadow`` at a version (the challenger by default),
``stop`` removes it, ``status`` names it. Each move is recorded in the audit log, like a
promotion, and shows in ``clinml models history``. A service follows the alias as it
follows ``champion`` (``CLINML_RELOAD_INTERVAL_S``, or ``POST /admin/reload``): it scores
the shadow version off the response path and logs its rows beside the champion's, never
answering with them (docs/serving.md, "Shadow").

``clinml.pipelines.cli`` mounts it: ``app.add_typer(shadow_app, name="shadow")``. Errors are
``ClinmlError`` (one line, exit status 2).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from clinml.settings import Settings
    from clinml.spec import UseCaseSpec

shadow_app = typer.Typer(
    help="Shadow deployment: score another version beside the champion, never answering "
    "with it (audited).",
    no_args_is_help=True,
)

UseCase = Annotated[
    str,
    typer.Argument(
        help="Use-case name (yours under CLINML_HOME/configs, or a built-in such as "
        "pathology) or a spec path."
    ),
]
Reason = Annotated[str | None, typer.Option("--reason", help="Why; recorded in the audit log.")]


def _setup(usecase: str) -> tuple[Settings, UseCaseSpec]:
    from clinml.pipelines import runtime
    from clinml.spec import load_spec

    settings = runtime.load_settings()
    runtime.configure(settings)
    return settings, load_spec(usecase, settings.spec_dir)


@shadow_app.command("start")
def start(
    usecase: UseCase,
    version: Annotated[
        str | None,
        typer.Option(
            "--version", help="Version number or alias to shadow (default: the challenger)."
        ),
    ] = None,
    reason: Reason = None,
) -> None:
    """Shadow a version (default: the challenger) beside the champion."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.shadow_start(spec, settings, Progress(total=1), version=version, reason=reason)


@shadow_app.command("stop")
def stop(usecase: UseCase, reason: Reason = None) -> None:
    """Stop scoring the shadow version."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.shadow_stop(spec, settings, Progress(total=1), reason=reason)


@shadow_app.command("status")
def status(usecase: UseCase) -> None:
    """The version shadowed, or none."""
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    settings, spec = _setup(usecase)
    shadowed = governance.shadow_version(Tracker.from_settings(settings), spec.name)
    if shadowed is None:
        typer.echo(f"{spec.name}: no shadow version")
    else:
        typer.echo(f"{spec.name}: shadow version {shadowed}")


@shadow_app.command("report")
def report(
    usecase: UseCase,
    window: Annotated[
        str, typer.Option(help="The prediction log's last WINDOW (e.g. 7d, 24h) up to --until.")
    ] = "7d",
    until: Annotated[
        datetime | None, typer.Option(help="Window end (ISO time, UTC when no zone; default: now).")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            help="Shadow version to report on (default: the one shadowed now, else the newest "
            "in the window).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report directory (default: CLINML_HOME/<usecase>/monitoring/shadow/)."),
    ] = None,
) -> None:
    """The shadow version against the champion on the window's requests: agreement, alert
    rates, score distributions and, where outcomes have arrived, the gate's paired
    comparison. Writes shadow.json and shadow.html."""
    from clinml.monitoring.job import parse_duration
    from clinml.pipelines import stages

    settings, spec = _setup(usecase)
    end = datetime.now(UTC) if until is None else _utc(until)
    result, data, page = stages.shadow_report(
        spec, settings, end - parse_duration(window), end, version=version, out_dir=out
    )
    for line in result.lines():
        typer.echo(line)
    typer.echo(f"report: {page}\ndata: {data}")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
