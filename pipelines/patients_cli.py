"""``clinml patients``: patient ids to try ``/predict_patient`` with.

``clinml patients sample USECASE [-n N]`` prints N raw patient ids (default 5), one per
line, that the service answers for now: ids from the ingested data whose features in the
online store are all present and within the spec's ``feature_ttl_days``
(``clinml.features.patients``). It prints the ids and nothing else about the patients. The
``clinml`` app adds this group as ``app.add_typer(patients_app, name="patients")``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clinml.errors import ClinmlError, NotReadyError

if TYPE_CHECKING:
    from feast import FeatureStore

    from clinml.spec import UseCaseSpec

patients_app = typer.Typer(
    help="Patient ids the service can answer for by id (/predict_patient).",
    no_args_is_help=True,
)


@patients_app.callback()
def _patients() -> None:
    """Patient ids the service can answer for by id (/predict_patient)."""


@patients_app.command("sample")
def sample(
    usecase: Annotated[
        str,
        typer.Argument(
            help="Use-case name (yours under CLINML_HOME/configs, or a built-in such as "
            "readmission) or a spec path."
        ),
    ],
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="How many ids to print.")] = 5,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="The CSV/Parquet file you ingested, when not the spec's source."
        ),
    ] = None,
) -> None:
    """Print patient ids that /predict_patient answers for now, one per line.

    Raw ids, as a caller sends them, whose online features are all present and fresh;
    the most recently recorded first.
    """
    from clinml.features import store as feature_store
    from clinml.features.ingest import has_data, prepare_batch
    from clinml.features.offline import PostgresTables
    from clinml.features.patients import servable_patient_ids
    from clinml.pipelines import runtime
    from clinml.spec import load_spec
    from clinml.tables import read_table

    settings = runtime.load_settings()
    runtime.configure(settings)
    spec = load_spec(usecase, settings.spec_dir)
    name = spec.name
    paths = settings.paths.usecase(name)
    environment = settings.feast_environment
    if not has_data(paths, PostgresTables.for_environment(environment, name)):
        raise NotReadyError(
            f"no ingested data for '{name}': run `clinml ingest {name}` and "
            f"`clinml materialize {name}` (or `clinml run {name}`) first"
        )
    store = feature_store.open_store(spec, paths, environment)
    if not _materialized(store, spec):
        raise NotReadyError(
            f"nothing materialized for '{name}' yet: run `clinml materialize {name}` first"
        )
    now = datetime.now(UTC)
    raw = prepare_batch(spec, now, None if data is None else read_table(data))
    missing = [c for c in (spec.entity.key, spec.event_timestamp) if c not in raw.columns]
    if missing:
        source = data or "the spec's source"
        raise ClinmlError(f"{source} has no column {', '.join(missing)}: nothing to sample")
    ids = servable_patient_ids(store, spec, raw, settings.pseudonymiser(), count, now)
    if not ids:
        ttl = spec.feature_ttl_days
        stale = "" if ttl is None else f"values older than feature_ttl_days={ttl:g} are stale; "
        raise ClinmlError(
            f"no patient of '{name}' is fresh in the online store ({stale}if you ingested "
            f"another file, pass it with --data): ingest newer data, then run "
            f"`clinml materialize {name}`"
        )
    for patient_id in ids:
        typer.echo(patient_id)


def _materialized(store: FeatureStore, spec: UseCaseSpec) -> bool:
    """Whether the use case's feature view has had any interval materialized."""
    from feast.errors import FeastObjectNotFoundException, ProjectNotFoundException

    from clinml.features.store import view_name

    try:
        view = store.get_feature_view(view_name(spec))
    except (FeastObjectNotFoundException, ProjectNotFoundException):
        return False
    return view.most_recent_end_time is not None
