"""``clinml demo``: every stage in order on a built-in use case, then a look at each result.

ingest -> validate -> Feast -> train (4 candidates, grouped-CV search) -> register the
challenger -> gated promotion to champion (audit log) -> BentoML package -> ``bentoml
serve`` + real HTTP requests -> drift check on an unshifted and a deliberately shifted
batch -> where to look next.
"""

from __future__ import annotations

import json

import httpx
import pandas as pd
import typer

from clinml.pipelines import stages
from clinml.pipelines.progress import Progress
from clinml.settings import Settings
from clinml.spec import UseCaseSpec

BATCH_SIZE = 150
SHIFTED_POSITIVE_SHARE = 0.9


def _write_batches(spec: UseCaseSpec, settings: Settings) -> dict[str, pd.DataFrame]:
    from clinml.features.datasets.batches import sample_batch

    paths = settings.paths.usecase(spec.name)
    features = pd.read_parquet(paths.features_file)
    labels = pd.read_parquet(paths.labels_file)
    batches = {
        "unshifted": sample_batch(features, labels, spec, BATCH_SIZE, seed=1),
        # A case-mix shift: far more positive cases than in training, as when a new
        # referral pathway starts sending mostly suspicious lesions.
        "shifted": sample_batch(
            features, labels, spec, BATCH_SIZE, seed=2, positive_share=SHIFTED_POSITIVE_SHARE
        ),
    }
    paths.batches.mkdir(parents=True, exist_ok=True)
    for name, frame in batches.items():
        frame.to_parquet(paths.batches / f"{name}.parquet", index=False)
    # A ready-made request body for trying the service by hand (curl -d @request.json).
    example = {"records": batches["unshifted"][spec.feature_names].head(3).to_dict("records")}
    (paths.batches / "request.json").write_text(json.dumps(example, indent=2))
    return batches


def _call_service(
    url: str, spec: UseCaseSpec, batch: pd.DataFrame, key: str, progress: Progress
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    records = batch[spec.feature_names].head(3).to_dict("records")
    refused = httpx.post(f"{url}/predict", json={"records": records}, timeout=30)
    progress.detail(f"POST /predict without an API key -> {refused.status_code}")
    answer = httpx.post(f"{url}/predict", json={"records": records}, headers=headers, timeout=30)
    answer.raise_for_status()
    body = answer.json()
    model = body["model"]
    progress.detail(f"POST /predict with {len(records)} records -> {answer.status_code}")
    for i, prediction in enumerate(body["predictions"]):
        progress.detail(
            f"  record {i}: probability {prediction['probability']:.3f} -> {prediction['label']}"
            f" ({prediction['risk_band']} risk)"
            f"  ({model['name']} v{model['version']}, request {body['request_id'][:8]})"
        )
    bad = dict(records[0])
    first = spec.features[0]
    bad[first.name] = (first.min or 0) - 1 if first.is_numeric else "not-a-category"
    rejected = httpx.post(f"{url}/predict", json={"records": [bad]}, headers=headers, timeout=30)
    detail = rejected.json().get("detail", [{}])[0]
    progress.detail(
        f"POST /predict with {first.name} out of range -> {rejected.status_code}: "
        f"{'.'.join(map(str, detail.get('loc', [])))}: {detail.get('msg', '')}"
    )


def run(spec: UseCaseSpec, settings: Settings, port: int, keep_serving: bool) -> None:
    """The whole demo; prints progress and ends with where to look next."""
    from clinml.serving.launch import ServiceProcess, free_port, port_is_free

    progress = Progress(total=9)
    stages.ingest(spec, settings, progress)
    stages.materialize(spec, settings, progress, full=True)
    stages.train(spec, settings, progress)
    stages.promote(spec, settings, progress)
    stages.package(spec, settings, progress)
    batches = _write_batches(spec, settings)
    paths = settings.paths.usecase(spec.name)

    if not port_is_free("127.0.0.1", port):
        chosen = free_port()
        typer.echo(f"      port {port} is busy; using {chosen}")
        port = chosen
    from clinml.serving.keys import write_dev_key

    key = write_dev_key(settings.api_keys_path)
    service = ServiceProcess(settings, spec.name, port, settings.paths.serve_log)
    with progress.step(f"start the service (bentoml serve) on {service.url}"):
        service.start()
        progress.detail(f"log: {service.log_file}")
    try:
        with progress.step("call the service"):
            _call_service(service.url, spec, batches["unshifted"], key, progress)
        with progress.step("check drift (Evidently) against the champion's training reference"):
            outcomes = {}
            for name, batch in batches.items():
                outcome = stages.monitor(spec, settings, batch, paths.reports / f"demo-{name}")
                outcomes[name] = outcome
                progress.detail(f"{name:>9} batch of {len(batch)}: {outcome.line}")
        _where_next(spec, settings, service.url, outcomes, keep_serving, key)
        if keep_serving:
            typer.echo(f"\nServing on {service.url} (API docs: {service.url}/). Ctrl-C to stop.")
            try:
                service.wait()
            except KeyboardInterrupt:
                typer.echo("stopping")
    finally:
        service.stop()


def _where_next(
    spec: UseCaseSpec,
    settings: Settings,
    url: str,
    outcomes: dict[str, stages.MonitorOutcome],
    serving: bool,
    key: str,
) -> None:
    paths = settings.paths.usecase(spec.name)
    lines = [
        "",
        typer.style("Where to look next", bold=True),
        f"  everything this run wrote:  {settings.home}",
        "  MLflow UI:                  .venv/bin/mlflow ui --backend-store-uri "
        f"{settings.mlflow_uri}"
        " --port 5000   (then open http://127.0.0.1:5000)",
        f"  service API docs:           {url}/  (OpenAPI: {url}/docs.json)"
        + ("" if serving else f"   (run `clinml serve {spec.name}` first)"),
        f"  development API key:        {key}   (all roles; stored hashed in "
        f"{settings.api_keys_path})",
        f"  try it:                     curl -s -X POST {url}/predict "
        f"-H 'Authorization: Bearer {key}' -H 'content-type: application/json' "
        f"-d @{paths.batches / 'request.json'}",
        f"  drift report (shifted):     {outcomes['shifted'].html}",
        f"  drift verdict (JSON):       {outcomes['shifted'].json}",
        f"  Feast repo:                 {paths.feast_repo}",
        f"  model card:                 clinml models card {spec.name}",
        f"  alias history (audit log):  clinml models history {spec.name}",
        f"  re-run a drift check:       clinml monitor {spec.name} "
        f"--batch {paths.batches / 'shifted.parquet'}",
    ]
    typer.echo("\n".join(lines))
    summary = {name: o.exit_code for name, o in outcomes.items()}
    typer.echo(f"  monitor exit codes:         {json.dumps(summary)} (0 = no drift, 1 = drift)")
