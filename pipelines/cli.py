"""The ``clinml`` command line.

Every command takes a use case by name (looked up in ``CLINML_HOME/configs``, then among
the built-in use cases in the project's ``configs/``) or a spec path. Errors
a user can act on are printed as one line with exit status 2; ``clinml monitor`` exits 0
without drift and 1 with drift.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from clinml.errors import ClinmlError, NotReadyError, store_unavailable

if TYPE_CHECKING:
    from clinml.settings import Settings
    from clinml.spec import UseCaseSpec

app = typer.Typer(
    name="clinml",
    help="Clinical prediction models: validate, feature-store, train, register, serve, monitor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

UseCase = Annotated[
    str,
    typer.Argument(
        help="Use-case name (yours under CLINML_HOME/configs, or a built-in such as "
        "pathology) or a spec path."
    ),
]
DataFile = Annotated[
    Path | None,
    typer.Option("--data", help="Ingest this CSV/Parquet file instead of the spec's source."),
]


def _setup(usecase: str) -> tuple[Settings, UseCaseSpec]:
    from clinml.pipelines import runtime
    from clinml.spec import load_spec

    settings = runtime.load_settings()
    runtime.configure(settings)
    return settings, load_spec(usecase, settings.spec_dir)


@app.command()
def init(
    data: Annotated[Path, typer.Option("--data", help="CSV or Parquet file to draft a spec from.")],
    name: Annotated[str, typer.Option(help="Use-case name (lower-case identifier).")],
    entity: Annotated[str | None, typer.Option(help="Patient-id column.")] = None,
    timestamp: Annotated[str | None, typer.Option(help="Event-time column.")] = None,
    label: Annotated[str | None, typer.Option(help="Outcome column.")] = None,
    positive_class: Annotated[
        str | None, typer.Option("--positive-class", help="Label value that is positive.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the draft (default: CLINML_HOME/configs/NAME.yaml)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Draft a use-case spec from a data file, for you to review and edit."""
    from clinml.features.draft import draft_from_file
    from clinml.pipelines import runtime
    from clinml.spec import builtin_usecases

    settings = runtime.load_settings()
    if out is None and name in builtin_usecases():
        raise ClinmlError(
            f"'{name}' is a built-in use case: choose another --name (or write elsewhere "
            "with --out)"
        )
    target = out or settings.spec_dir / f"{name}.yaml"
    written = draft_from_file(
        data,
        name,
        target,
        overwrite=force,
        entity=entity,
        timestamp=timestamp,
        label=label,
        positive_class=positive_class,
    )
    typer.echo(f"draft written to {written}: review every field, then `clinml validate {written}`")


@app.command()
def validate(usecase: UseCase, data: DataFile = None) -> None:
    """Run the quality gate only; writes just its report. Exit 1 if the batch fails."""
    from datetime import UTC, datetime

    from clinml.features.ingest import prepare_batch, reference_profile
    from clinml.features.validate import validate_frame, write_report
    from clinml.tables import read_table

    settings, spec = _setup(usecase)
    now = datetime.now(UTC)
    paths = settings.paths.usecase(spec.name)
    frame = prepare_batch(spec, now, None if data is None else read_table(data))
    report = validate_frame(frame, spec, reference_profile(paths))
    _, markdown = write_report(report, spec, paths.validation_run(now))
    typer.echo(f"{spec.name}: {report.summary()}")
    for line in report.failures:
        typer.echo(f"  - {line}")
    typer.echo(f"report: {markdown}")
    raise typer.Exit(0 if report.success else 1)


Append = Annotated[
    bool, typer.Option("--append", help="Add to the stored data instead of replacing it.")
]


@app.command()
def ingest(
    usecase: UseCase,
    data: DataFile = None,
    append: Append = False,
    learn_profile: Annotated[
        bool,
        typer.Option("--learn-profile", help="Make this batch the quality gate's reference."),
    ] = False,
) -> None:
    """Validate a batch, write the offline store and register the Feast definitions."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.ingest(
        spec, settings, Progress(total=2), data=data, append=append, learn_profile=learn_profile
    )
    typer.echo(f"next: clinml materialize {usecase}")


@app.command()
def materialize(
    usecase: UseCase,
    full: Annotated[
        bool, typer.Option("--full", help="Reload all offline history, not just what is new.")
    ] = False,
) -> None:
    """Load the newest feature values into the online store (incremental by default)."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.materialize(spec, settings, Progress(total=1), full=full)


RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="Train on this Ray cluster ('local', HOST:6379, ray://HOST:10001, auto); "
        "overrides CLINML_RAY_ADDRESS.",
    ),
]


def _on_ray(settings: Settings, ray: str | None) -> Settings:
    return settings if ray is None else settings.model_copy(update={"ray_address": ray})


@app.command()
def train(usecase: UseCase, ray: RayAddress = None) -> None:
    """Train every candidate and the logistic-regression reference; register the selected one
    (the reference unless another is clearly better) as the challenger."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.train(spec, _on_ray(settings, ray), Progress(total=1))
    typer.echo(f"next: clinml promote {usecase}")


Reason = Annotated[str | None, typer.Option("--reason", help="Why; recorded in the audit log.")]


@app.command()
def promote(
    usecase: UseCase,
    force: Annotated[
        bool, typer.Option("--force", help="Override a failed gate (needs --reason).")
    ] = False,
    reason: Reason = None,
    evidence: Annotated[
        str | None,
        typer.Option(
            help="Also gate on live evidence: 'shadow' adds the shadow report's paired "
            "comparison of the challenger with the champion on labelled live requests.",
        ),
    ] = None,
    evidence_window: Annotated[
        str, typer.Option(help="The window of live requests the evidence covers, up to now.")
    ] = "30d",
) -> None:
    """Make the challenger the champion if it passes the gate. Exit 1 when refused."""
    from clinml.monitoring.job import parse_duration
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.governance import PromotionRefused

    if force and not (reason and reason.strip()):  # before the gate's work, not after it
        raise ClinmlError("--force needs --reason: say why the gate is being overridden")
    if evidence not in (None, "shadow"):
        raise ClinmlError(f"--evidence takes 'shadow'; got {evidence!r}")
    span = parse_duration(evidence_window)
    settings, spec = _setup(usecase)
    live = None
    if evidence == "shadow":
        now = datetime.now(UTC)
        live = stages.shadow_evidence(spec, settings, now - span, now)
    try:
        stages.promote(spec, settings, Progress(total=1), force=force, reason=reason, evidence=live)
    except PromotionRefused as refused:
        typer.echo(f"refused: {refused}", err=True)
        typer.echo("override with --force --reason TEXT (recorded)", err=True)
        raise typer.Exit(1) from None


@app.command()
def rollback(usecase: UseCase, reason: Reason = None) -> None:
    """Point the champion back at the previous champion (recorded in the audit log)."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.rollback(spec, settings, Progress(total=1), reason=reason)


models_app = typer.Typer(
    help="Registered model versions: list, show, model cards, alias history.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
VersionRef = Annotated[
    str, typer.Argument(help="Version number or alias (champion, challenger, previous_champion).")
]


@models_app.command("list")
def models_list(usecase: UseCase) -> None:
    """Every registered version, newest first, with aliases and headline metrics."""
    from datetime import UTC, datetime

    from clinml.training import governance
    from clinml.training.tracking import Tracker

    settings, spec = _setup(usecase)
    tracker = Tracker.from_settings(settings)
    found = governance.versions(tracker, spec.name)
    if not found:
        raise NotReadyError(f"no registered versions of '{spec.name}': run `clinml train` first")
    pointers = governance.aliases(tracker, spec.name)
    metric = f"test_{spec.primary_metric}"
    typer.echo(f"{'version':>7}  {'created (UTC)':<16}  {'candidate':<9}  {metric:<14}  aliases")
    for v in found:
        created = datetime.fromtimestamp(v.creation_timestamp / 1000, UTC)
        tags = v.tags or {}
        typer.echo(
            f"{v.version:>7}  {created:%Y-%m-%d %H:%M}  {tags.get('candidate', '?'):<9}  "
            f"{tags.get(metric, '?'):<14}  {', '.join(pointers.get(str(v.version), [])) or '-'}"
        )


@models_app.command("show")
def models_show(usecase: UseCase, ref: VersionRef = "champion") -> None:
    """One version: aliases, provenance tags and held-out metrics."""
    from clinml.training import governance
    from clinml.training.metrics import METRICS
    from clinml.training.tracking import Tracker

    settings, spec = _setup(usecase)
    tracker = Tracker.from_settings(settings)
    version = governance.resolve(tracker, spec.name, ref)
    run = tracker.client.get_run(version.run_id)
    typer.echo(
        f"{spec.name} version {version.version}  aliases: "
        + (", ".join(governance.aliases(tracker, spec.name).get(str(version.version), [])) or "-")
    )
    typer.echo(f"  run: {version.run_id}")
    for key, value in sorted((version.tags or {}).items()):
        typer.echo(f"  {key}: {value}")
    typer.echo("  held-out metrics (95% CI):")
    metrics = run.data.metrics
    for name in METRICS:
        if name in metrics:
            low = metrics.get(f"{name}_ci_low", float("nan"))
            high = metrics.get(f"{name}_ci_high", float("nan"))
            typer.echo(f"    {name:<18} {metrics[name]:.4f}  [{low:.4f}, {high:.4f}]")


@models_app.command("card")
def models_card(usecase: UseCase, ref: VersionRef = "champion") -> None:
    """A version's model card: a summary here, the full card as HTML and JSON on disk."""
    from clinml.training import governance
    from clinml.training.card import card_summary
    from clinml.training.tracking import Tracker

    settings, spec = _setup(usecase)
    tracker = Tracker.from_settings(settings)
    version = governance.resolve(tracker, spec.name, ref)
    target = settings.paths.usecase(spec.name).model_card(version.version)
    card = governance.download_card(tracker, version, target)
    for line in card_summary(card):
        typer.echo(line)
    typer.echo(f"card: {target / 'model_card' / 'model_card.html'}")
    typer.echo(f"json: {target / 'model_card' / 'model_card.json'}")


@models_app.command("history")
def models_history(usecase: UseCase) -> None:
    """Every alias move (and refused promotion) from the audit log, oldest first."""
    from clinml.audit import AuditLog, Checkpoints
    from clinml.training import governance

    settings, spec = _setup(usecase)
    log = AuditLog(settings.audit_log_path, checkpoints=Checkpoints.from_settings(settings))
    log.verify()
    records = governance.history(log, spec.name)
    if not records:
        typer.echo(f"no alias moves recorded for {spec.name} in {log.path}")
        return
    for r in records:
        failed = [g["check"] for g in r.get("gate", []) if not g["passed"]]
        gate = (
            "gate passed"
            if r.get("gate") and not failed
            else (f"gate failed: {', '.join(failed)}" if failed else "no gate")
        )
        typer.echo(
            f"{r['seq']:>4}  {r['time']}  {r['action']:<15} v{r.get('from_version') or '-'} -> "
            f"v{r.get('to_version') or '-'}  by {r['actor']}  {gate}"
            + (f"  reason: {r['reason']}" if r.get("reason") else "")
        )
    typer.echo(f"audit log: {log.path} ({len(records)} records for {spec.name}; chain verified)")


@app.command()
def package(
    usecase: UseCase,
    build: Annotated[bool, typer.Option("--build", help="Also run `bentoml build`.")] = False,
) -> None:
    """Import the champion into the BentoML store (and build the bento)."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.package(spec, settings, Progress(total=2 if build else 1), build=build)


@app.command()
def build(usecase: UseCase) -> None:
    """Import the champion into the BentoML store and build the bento (immutable path)."""
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress

    settings, spec = _setup(usecase)
    stages.package(spec, settings, Progress(total=2), build=True)


audit_app = typer.Typer(help="The audit trails: alias moves and served requests.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the model-registry and request audit logs: byte-exact hash chains and, with
    CLINML_AUDIT_KEY, their signed checkpoints (a cut-off tail, a deleted or emptied log, a
    rebuilt chain, a forged or missing checkpoint). Exit 1 if either is broken."""
    from clinml.audit import AuditError, AuditLog, Checkpoints
    from clinml.pipelines import runtime

    settings = runtime.load_settings()
    checkpoints = Checkpoints.from_settings(settings)
    if checkpoints is None:
        typer.echo(
            "no CLINML_AUDIT_KEY: chains checked without checkpoints, so a cut-off tail or "
            "a deleted log cannot be detected"
        )
    broken = False
    for name, path in (
        ("model registry", settings.audit_log_path),
        ("requests", settings.paths.request_audit_log),
    ):
        try:
            verification = AuditLog(path, checkpoints=checkpoints).check()
        except AuditError as exc:
            broken = True
            typer.echo(f"{name}: BROKEN: {exc}", err=True)
            continue
        typer.echo(f"{name}: {verification.summary()}")
    raise typer.Exit(1 if broken else 0)


@audit_app.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign a checkpoint of each audit log as it is now (needs CLINML_AUDIT_KEY), once its
    chain and any checkpoints it has verify. For logs written before the key was set:
    check them against their archived copies first. Exit 1 if a log is broken."""
    from clinml.audit import AuditError, AuditLog, Checkpoints
    from clinml.pipelines import runtime

    settings = runtime.load_settings()
    checkpoints = Checkpoints.from_settings(settings)
    if checkpoints is None:
        raise ClinmlError("clinml audit checkpoint needs CLINML_AUDIT_KEY (the audit key)")
    broken = False
    for name, path in (
        ("model registry", settings.audit_log_path),
        ("requests", settings.paths.request_audit_log),
    ):
        log = AuditLog(path, checkpoints=checkpoints)
        try:
            log.check(require_checkpoint=False)
            checkpoint = log.checkpoint(adopt=True)
        except AuditError as exc:
            broken = True
            typer.echo(f"{name}: BROKEN, not checkpointed: {exc}", err=True)
            continue
        if checkpoint is None:
            typer.echo(f"{name}: {path} (no records yet, nothing to sign)")
        else:
            typer.echo(
                f"{name}: {path}: checkpoint {checkpoint.number} signed at "
                f"{checkpoint.records} records"
            )
    raise typer.Exit(1 if broken else 0)


@app.command()
def run(usecase: UseCase, data: DataFile = None, ray: RayAddress = None) -> None:
    """ingest + materialize + train + promote + package: up to a servable champion.

    Exit 1 when the gate refuses the challenger (nothing is packaged), as `clinml promote`.
    """
    from clinml.pipelines import stages
    from clinml.pipelines.progress import Progress
    from clinml.training.governance import PromotionRefused

    settings, spec = _setup(usecase)
    progress = Progress(total=6)
    stages.ingest(spec, settings, progress, data=data)
    stages.materialize(spec, settings, progress, full=True)
    version = stages.train(spec, _on_ray(settings, ray), progress)
    try:
        stages.promote(spec, settings, progress)
    except PromotionRefused as refused:
        typer.echo(f"refused: {refused}", err=True)
        typer.echo(
            f"version {version} stays the challenger and nothing was packaged; override with "
            f"`clinml promote {usecase} --force --reason TEXT` (recorded), then "
            f"`clinml package {usecase}`",
            err=True,
        )
        raise typer.Exit(1) from None
    stages.package(spec, settings, progress)


@app.command()
def serve(
    usecase: UseCase,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
) -> None:
    """Serve the packaged champion with `bentoml serve` (foreground). SIGTERM, SIGINT and
    SIGHUP stop the server and its workers."""
    import bentoml
    from bentoml.exceptions import NotFound

    from clinml.serving.launch import run_foreground, serve_command, service_env

    settings, spec = _setup(usecase)
    try:
        bentoml.models.get(f"{spec.name}:latest")
    except NotFound:
        raise NotReadyError(
            f"no packaged model for '{spec.name}': run `clinml package {spec.name}` first"
        ) from None
    url = f"http://{host}:{port}"
    typer.echo(f"serving {spec.name} on {url} (API docs: {url}/, OpenAPI: {url}/docs.json)")
    raise typer.Exit(
        run_foreground(serve_command(host, port), env=service_env(settings, spec.name))
    )


@app.command()
def monitor(
    usecase: UseCase,
    window: Annotated[
        str | None,
        typer.Option(help="Check the prediction log's last WINDOW (e.g. 7d, 24h) up to now."),
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Window start (ISO time, UTC when no zone).")
    ] = None,
    until: Annotated[datetime | None, typer.Option(help="Window end (default: now).")] = None,
    batch: Annotated[
        Path | None,
        typer.Option(help="Check this CSV/Parquet file of records instead of the log."),
    ] = None,
    label_lookback: Annotated[
        str, typer.Option(help="How far back performance looks for labelled predictions.")
    ] = "90d",
    subgroups: Annotated[
        bool, typer.Option(help="Also test drift within each sensitive-attribute group.")
    ] = True,
    retrain_on_drift: Annotated[
        bool,
        typer.Option(
            "--retrain-on-drift",
            help="On data or prediction drift, train a new challenger on the offline store "
            "plus the monitored rows whose outcomes are known (never promoted automatically).",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Report directory (default: monitoring/runs/RUN_ID).")
    ] = None,
) -> None:
    """Drift, data quality, subgroup drift and performance of a window of predictions,
    against the champion's training reference. Exit 0: no alert; 1: an alert (delivered);
    2: an error."""
    from functools import partial

    from clinml.monitoring import job
    from clinml.pipelines import stages
    from clinml.tables import read_table

    settings, spec = _setup(usecase)
    now = datetime.now(UTC)
    frame = None
    if batch is not None:
        if window or since:
            raise ClinmlError("give either --batch or a window (--window / --since), not both")
        frame = read_table(batch)
    else:
        until_at = _utc(until) if until else now
        if window and since:
            raise ClinmlError("give either --window or --since, not both")
        if not window and not since:
            raise ClinmlError("give a window: --window 7d, or --since (and --until)")
        since_at = _utc(since) if since else until_at - job.parse_duration(window or "")
        since, until = since_at, until_at
    try:
        result = job.run(
            spec,
            settings,
            since=since if frame is None else None,
            until=until if frame is None else None,
            batch=frame,
            out_dir=out,
            label_lookback=job.parse_duration(label_lookback),
            subgroups=subgroups,
            # the retrain's progress on the command line's output, as `clinml run` shows it
            retrain_on_drift=partial(stages.retrain_on_drift, echo=typer.echo)
            if retrain_on_drift
            else None,
            now=now,
        )
    except (ClinmlError, typer.Exit):
        raise
    except Exception as exc:
        unavailable = store_unavailable(exc)
        if unavailable is not None:
            raise unavailable from exc
        # Exit 1 means an alert and nothing else: a failure is exit 2, one line. Only the
        # exception's type is shown (its text may quote a value of the input); the
        # traceback goes to the log.
        logging.getLogger(__name__).exception("clinml monitor failed")
        raise ClinmlError(
            f"monitoring failed with an unexpected {type(exc).__name__} (the traceback is in "
            "the log); nothing was alerted"
        ) from None
    for line in result.lines():
        typer.echo(line)
    typer.echo(f"report: {result.verdict.html_path}\nverdict: {result.verdict_path}")
    raise typer.Exit(result.exit_code)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


labels_app = typer.Typer(help="Ground-truth outcomes for performance monitoring.")
app.add_typer(labels_app, name="labels")

from clinml.pipelines.keys_cli import keys_app  # noqa: E402 (the sub-apps after the main commands)

app.add_typer(keys_app, name="keys")

from clinml.pipelines.patients_cli import patients_app  # noqa: E402

app.add_typer(patients_app, name="patients")

from clinml.pipelines.shadow_cli import shadow_app  # noqa: E402

app.add_typer(shadow_app, name="shadow")

from clinml.pipelines.canary_cli import canary_app  # noqa: E402

app.add_typer(canary_app, name="canary")


@labels_app.command("ingest")
def labels_ingest(
    usecase: UseCase,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV/Parquet with outcome, time, and patient_id and/or request_id columns."
        ),
    ],
) -> None:
    """Store outcomes as they arrive; `clinml monitor` joins them to the predictions.
    Patient ids are pseudonymised before they are stored."""
    from clinml.monitoring import performance
    from clinml.tables import read_table

    settings, spec = _setup(usecase)
    frame = read_table(file, text_columns=("patient_id", "request_id"))
    result = performance.ingest_labels(spec, settings, frame)
    where = result.path if result.path else "nothing new to store"
    typer.echo(
        f"{result.rows} outcomes stored ({result.by_patient} by patient, {result.by_request} "
        f"by request; {result.duplicates_skipped} duplicates skipped): {where}"
    )


@app.command()
def demo(
    usecase: Annotated[str, typer.Argument(help="Built-in use case to run.")] = "pathology",
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the service running afterwards.")
    ] = False,
    port: Annotated[int, typer.Option(help="Port for the service (a free one if busy).")] = 3000,
) -> None:
    """Run every stage on a built-in use case, call the service, check drift."""
    from clinml.pipelines import demo as demo_pipeline

    settings, spec = _setup(usecase)
    demo_pipeline.run(spec, settings, port=port, keep_serving=serve)


def main() -> None:
    """Console entry point: ClinmlError, or a store that does not answer -> one line on
    stderr, exit status 2. Anything else is a bug and keeps its traceback."""
    try:
        app()
    except ClinmlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        # The last resort for a store that fails where no stage knew to expect it.
        unavailable = store_unavailable(exc)
        if unavailable is None:
            raise
        _fail(unavailable)


def _fail(error: ClinmlError) -> NoReturn:
    # One line, whatever the message holds (a library's text quoted in it may have more).
    line = " ".join(str(error).split())
    typer.echo(f"error: {line}", err=True)
    sys.exit(2)
