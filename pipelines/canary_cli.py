"""``clinml canary``: answer a stable share of patients with another model version.

``start`` points the registry alias ``canary`` at a version (the challenger by default)
with ``--percent`` of the requests, ``stop`` removes it, ``status`` names it and its share.
Each move is recorded in the audit log and shows in ``clinml models history``. A service
with inline execution follows the alias as it follows ``champion``
(``CLINML_RELOAD_INTERVAL_S``, or ``POST /admin/reload``), answers the routed requests
with the canary version (each answer names it), and rolls the canary back on its own
when its error or alert rate leaves the configured band (docs/serving.md, "Canary").

``clinml.pipelines.cli`` mounts it: ``app.add_typer(canary_app, name="canary")``. Errors are
``ClinmlError`` (one line, exit status 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from clinml.settings import Settings
    from clinml.spec import UseCaseSpec

canary_app = typer.Typer(
    help="Canary release: answer a stable share of patients with another version, rolled "
    "back automatically when it leaves its band (audited).",
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


@canary_app.command("start")
def start(
    usecase: UseCase,
    percent: Annotated[
        float,
        typer.Option("--percent", help="Share of patients (or requests) it answers, in (0, 50]."),
    ],
    version: Annotated[
        str | None,
        typer.Option(
            "--version", help="Version number or alias to release (default: the challenger)."
        ),
    ] = None,
    reason: Reason = None,
) -> None:
    """Answer PERCENT of the requests with a version (default: the challenger)."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.canary_start(
        spec, settings, Progress(total=1), percent=percent, version=version, reason=reason
    )


@canary_app.command("stop")
def stop(usecase: UseCase, reason: Reason = None) -> None:
    """Stop routing to the canary version: the champion answers everyone."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.canary_stop(spec, settings, Progress(total=1), reason=reason)


@canary_app.command("status")
def status(usecase: UseCase) -> None:
    """The canary version and its share, or none."""
    from clinml.training import governance
    from clinml.training.tracking import Tracker

    settings, spec = _setup(usecase)
    state = governance.canary_state(Tracker.from_settings(settings), spec.name)
    if state is None:
        typer.echo(f"{spec.name}: no canary version")
    else:
        typer.echo(f"{spec.name}: canary version {state[0]} answers {state[1]:g}% of requests")
