"""Deploy-time settings: where things run, read from ``CLINML_*`` environment variables.

What a model *is* lives in the use-case spec (``clinml.spec``); where its state lives
lives here. Every path a run writes is derived from one root, ``CLINML_HOME`` (default
``./.clinml``), so deleting that directory resets the installation.

Reading settings has no side effects: nothing is created until a stage writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from clinml.pseudonym import DEVELOPMENT_KEY, Pseudonymiser

if TYPE_CHECKING:
    from clinml.environment import FeastEnvironment

# The built-in use-case specs ship with the project: beside the packages in a source tree,
# a bento or a container (copied whole), inside ``clinml/`` in an installed wheel
# (pyproject.toml's package-dir). A user's own specs never go here: they live under
# CLINML_HOME (``Settings.spec_dir``).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_INSTALLED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BUILTIN_CONFIG_DIR = (
    _INSTALLED_CONFIG_DIR if _INSTALLED_CONFIG_DIR.is_dir() else PROJECT_ROOT / "configs"
)
# The production profile's floor on the pseudonym key (a 128-bit key in hex is 32).
MIN_PRODUCTION_KEY_CHARS = 32


class Settings(BaseSettings):
    """Environment-driven settings (prefix ``CLINML_``)."""

    model_config = SettingsConfigDict(env_prefix="CLINML_", extra="ignore")

    profile: Literal["embedded", "production"] = Field(
        default="embedded",
        description="embedded: everything on one machine under CLINML_HOME. production: "
        "shared stores named by CLINML_FEATURE_STORE_YAML and CLINML_TRACKING_URI; refuses "
        "to start with the development pseudonym key, with auth off, or with a store that "
        "is a local file (docs/deployment.md).",
    )
    home: Path = Field(
        default=Path(".clinml"),
        description="Root of everything clinml writes: data, Feast, MLflow, BentoML, reports.",
    )
    config_dir: Path | None = Field(
        default=None,
        description="Your use-case specs: `clinml init` writes here and names are looked up "
        "here first, then among the built-in use cases; default: CLINML_HOME/configs.",
    )
    usecase: str = Field(default="pathology", description="Use case the service serves.")
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking and registry URI; default: SQLite under CLINML_HOME.",
    )
    feature_store_yaml: Path | None = Field(
        default=None,
        description="This environment's Feast feature_store.yaml (registry, online and "
        "offline store; ${VAR} references expanded by Feast); default: the embedded stores "
        "under CLINML_HOME.",
    )
    artifact_root: str | None = Field(
        default=None,
        description="Where MLflow stores model artifacts (a path, or a URI such as "
        "s3://bucket/clinml); default: CLINML_HOME/mlflow/artifacts.",
    )
    pseudonym_key: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_KEY),
        description="Key of the keyed hash that pseudonymises patient ids. The default is "
        "a public development key; production must set its own.",
    )
    audit_log: Path | None = Field(
        default=None,
        description="Append-only log of every model alias move; default: "
        "CLINML_HOME/audit/model_registry.jsonl. Put it on storage that outlives the data "
        "directory (and ship it to WORM storage in production).",
    )
    audit_key: SecretStr | None = Field(
        default=None,
        description="HMAC key that signs the audit logs' checkpoints (at least 32 random "
        "bytes, from a secret store; never kept under CLINML_HOME). Without it no "
        "checkpoints are written and `clinml audit verify` cannot detect a cut-off tail or "
        "a deleted log.",
    )
    audit_checkpoint_dir: Path | None = Field(
        default=None,
        description="Where signed audit checkpoints are written: a location apart from "
        "CLINML_HOME (another volume, or one shipped to WORM storage); default: "
        "CLINML_HOME/audit/checkpoints, which detects only tampering with the log alone.",
    )
    audit_checkpoint_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="How often the request audit trail writes a signed checkpoint while "
        "records arrive.",
    )
    actor: str | None = Field(
        default=None,
        description="Who is running the command, as recorded in the audit log; default: the "
        "operating-system user.",
    )
    max_records_per_request: int = Field(
        default=1000, ge=1, le=100_000, description="Cap on records in one /predict call."
    )
    max_body_bytes: int = Field(
        default=2_000_000, ge=1_000, description="Largest request body the service accepts."
    )
    auth: bool = Field(
        default=True,
        description="Require API keys. Turning it off is for local experiments only; the "
        "production profile refuses to start without it.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="YAML/JSON file of hashed API keys and their roles; default: "
        "CLINML_HOME/secrets/api_keys.json.",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="The same key list as JSON, from the environment (e.g. a Kubernetes Secret).",
    )
    protect_metrics: bool = Field(default=False, description="Require a key for /metrics.")
    gpu: int = Field(
        default=0, ge=0, description="GPUs to request for model execution (BentoML resources)."
    )
    device: str = Field(
        default="auto", description="Model execution device: auto (CUDA when available), cpu, cuda."
    )
    train_threads: int | None = Field(
        default=None,
        ge=0,
        description="CPUs training uses in all (worker processes, OpenMP, BLAS, torch "
        "threads); default: the CPUs this process is given (affinity and cgroup quota, "
        "clinml/cpus.py). 0: each library's own default, one thread per host core "
        "(the behaviour before issue 20; for comparison only).",
    )
    ray_address: str | None = Field(
        default=None,
        description="Train on this Ray cluster: the search's fits, the refits and the "
        "evaluations run as Ray tasks, with the same results as in-process. 'local' starts "
        "one in the training process; HOST:6379 a cluster's head, ray://HOST:10001 Ray "
        "Client, 'auto' the cluster this process runs in. Unset: in-process (docs/training.md).",
    )
    execution: Literal["inline", "split"] = Field(
        default="inline",
        description="Where the model runs: inline, in the API worker's process, or split, in "
        "a separate model-execution service (GPU-capable, adaptive batching) that the API "
        "calls through bentoml.depends. docs/serving.md has the measurement behind the default.",
    )
    executor_url: str | None = Field(
        default=None,
        description="split only: the URL of a model-execution service run on its own "
        "(`bentoml serve clinml.serving.executor:ModelExecutor`, e.g. a GPU Deployment) that the "
        "API calls over HTTP; default: `bentoml serve` starts it beside the API.",
    )
    batching: bool = Field(
        default=True,
        description="Adaptive batching: inline, requests waiting on the event loop at the "
        "same time share one model call; split, the model-execution service batches "
        "concurrent calls (BentoML). docs/benchmarks.md has the measurement behind the default.",
    )
    max_in_flight: int = Field(
        default=128,
        ge=0,
        description="Requests a service worker answers at once; one more is refused at once "
        "with 429 and Retry-After (load shedding, serving/overload.py). 0 turns it off.",
    )
    max_in_flight_per_key: int = Field(
        default=32,
        ge=0,
        description="Requests one API key may have in flight on a worker; one more is refused "
        "with 429, so one caller cannot take the whole CLINML_MAX_IN_FLIGHT budget. 0 turns "
        "it off.",
    )
    body_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for an authenticated request's body to arrive in full; "
        "past it the request is answered 408 and its slot freed.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a request's headers to arrive in full once its first "
        "byte has; past it the connection is closed (a slow-header attack holds nothing longer).",
    )
    max_header_bytes: int = Field(
        default=32_768,
        ge=1_024,
        description="Largest request line plus headers the server reads; more is answered "
        "431 and the connection closed.",
    )
    max_headers: int = Field(
        default=100, ge=8, description="Most header fields in one request; more is answered 431."
    )
    max_explain_records: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Cap on records in one /explain call (422 above it; top_k is at most the "
        "number of features, so records x top_k is bounded too). An explanation costs several "
        "predictions and runs on the worker's event loop, so this bounds how long one call can "
        "delay everyone else's.",
    )
    max_batch_size: int = Field(
        default=256, ge=2, le=100_000, description="Most records in one adaptive batch."
    )
    max_batch_latency_ms: int = Field(
        default=2_000,
        ge=1,
        le=60_000,
        description="Latency budget of a batched call to the model-execution service. "
        "BentoML's dispatcher waits at most a fraction of it to fill a batch, and sheds a "
        "call it predicts would exceed it (the API answers 503), so keep it well above a "
        "batch's execution time.",
    )
    alert_webhook_url: SecretStr | None = Field(
        default=None,
        description="POST monitoring alerts (PHI-free JSON) to this URL; it may carry a "
        "token, so it is kept secret.",
    )
    alert_timeout_s: float = Field(default=5.0, gt=0, description="Webhook timeout per try.")
    alert_retries: int = Field(default=3, ge=0, le=10, description="Webhook retries.")
    alert_cooldown_h: float = Field(
        default=168.0,
        ge=0,
        description="An alert with the same key is not sent again within this many hours "
        "(a week by default, so a persisting drift reminds weekly, not on every run).",
    )
    access_log: bool = Field(
        default=False,
        description="BentoML's access log line (and its request metrics) for clinml's own "
        "endpoints. Off by default: the request audit trail and clinml's own latency "
        "histogram record every request, and the extra line costs throughput.",
    )
    tracing: bool = Field(
        default=False,
        description="OpenTelemetry spans for clinml's endpoints (configure the exporter "
        "in BentoML's configuration). Off by default for the same reason.",
    )
    reload_interval_s: float = Field(
        default=0.0,
        ge=0.0,
        description="Check the registry's champion alias this often and switch to a newly "
        "promoted version without downtime; 0 turns polling off (POST /admin/reload still works).",
    )
    shadow_queue: int = Field(
        default=1_000,
        ge=1,
        description="Requests that may wait to be scored by the shadow version (clinml "
        "shadow); beyond it they are dropped and counted, never delaying an answer.",
    )
    canary_window: int = Field(
        default=200,
        ge=1,
        description="The canary guard judges the canary version's most recent answered "
        "requests, this many (and the champion's, for its alert rate) (clinml canary).",
    )
    canary_min_requests: int = Field(
        default=50,
        ge=1,
        description="Canary requests seen before the guard judges the canary at all.",
    )
    canary_max_error_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="The canary is rolled back when more than this share of its requests "
        "over the window failed (each was answered by the champion instead).",
    )
    canary_alert_rate_band: float = Field(
        default=0.10,
        ge=0.0,
        le=1.0,
        description="The canary is rolled back when its alert rate (share of rows labelled "
        "positive) over the window differs from the champion's by more than this.",
    )
    require_online_store: bool = Field(
        default=True,
        description="/readyz reports not ready while the online feature store is unreachable.",
    )

    @field_validator(
        "home",
        "config_dir",
        "audit_log",
        "audit_checkpoint_dir",
        "api_keys_file",
        "feature_store_yaml",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _executor_url_needs_split(self) -> Settings:
        if self.executor_url and self.execution != "split":
            raise ValueError("CLINML_EXECUTOR_URL needs CLINML_EXECUTION=split")
        return self

    @model_validator(mode="after")
    def _production_safe(self) -> Settings:
        """The production profile refuses what is only safe on a developer's machine."""
        if self.profile != "production":
            return self
        problems = []
        key = self.pseudonym_key.get_secret_value()
        if "pseudonym_key" not in self.model_fields_set:  # the default: the development key
            problems.append("CLINML_PSEUDONYM_KEY is not set: set your own key")
        elif not key.strip():
            problems.append("CLINML_PSEUDONYM_KEY is empty: set your own key")
        elif self.pseudonymiser().is_development_key:
            problems.append("CLINML_PSEUDONYM_KEY is the public development key: set your own")
        elif "REPLACE-ME" in key:
            problems.append("CLINML_PSEUDONYM_KEY is deploy/k8s's placeholder: set your own")
        elif len(key) < MIN_PRODUCTION_KEY_CHARS:
            problems.append(
                f"CLINML_PSEUDONYM_KEY is shorter than {MIN_PRODUCTION_KEY_CHARS} characters: "
                "use a random key (e.g. `openssl rand -hex 32`)"
            )
        if not self.auth:
            problems.append("CLINML_AUTH=false: API keys cannot be turned off")
        if self.feature_store_yaml is None:
            problems.append("CLINML_FEATURE_STORE_YAML is not set: name the shared feature stores")
        if self.tracking_uri is None or self.tracking_uri.startswith("sqlite:"):
            problems.append(
                "CLINML_TRACKING_URI must name a shared MLflow (a database URI or a tracking "
                "server), not SQLite"
            )
        if problems:
            raise ValueError("CLINML_PROFILE=production refuses to start: " + "; ".join(problems))
        return self

    @property
    def feast_environment(self) -> FeastEnvironment:
        """The feature stores: this environment's file, or the embedded ones.

        Raises:
            FeastEnvironmentError: the file is unreadable or unsupported, or (production)
                names a store that is a local file.
        """
        from clinml.environment import FeastEnvironment

        if self.feature_store_yaml is None:
            return FeastEnvironment.embedded()
        environment = FeastEnvironment.load(self.feature_store_yaml)
        if self.profile == "production":
            environment.require_shared()
        return environment

    @property
    def mlflow_artifact_root(self) -> str:
        return self.artifact_root or str(self.paths.mlflow_artifacts)

    @property
    def audit_log_path(self) -> Path:
        return self.audit_log or self.paths.audit_log

    @property
    def audit_checkpoint_path(self) -> Path:
        """Where the audit logs' signed checkpoints go (``clinml.audit.Checkpoints``)."""
        return self.audit_checkpoint_dir or self.paths.audit_checkpoints

    @property
    def spec_dir(self) -> Path:
        """Where the user's specs live (``CLINML_CONFIG_DIR``, default ``CLINML_HOME/configs``)."""
        return self.config_dir or self.home / "configs"

    @property
    def api_keys_path(self) -> Path:
        return self.api_keys_file or self.home / "secrets" / "api_keys.json"

    @property
    def actor_name(self) -> str:
        import getpass

        if self.actor:
            return self.actor
        try:
            return getpass.getuser()
        except (KeyError, OSError):
            return "unknown"

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    def pseudonymiser(self) -> Pseudonymiser:
        return Pseudonymiser(self.pseudonym_key.get_secret_value())

    @property
    def mlflow_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.paths.mlflow_db}"


@dataclass(frozen=True)
class Paths:
    """Every location under ``CLINML_HOME``, derived from the one root."""

    home: Path

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlflow" / "artifacts"

    @property
    def audit_log(self) -> Path:
        return self.home / "audit" / "model_registry.jsonl"

    @property
    def request_audit_log(self) -> Path:
        """The per-request audit trail of the prediction service."""
        return self.home / "audit" / "requests.jsonl"

    @property
    def audit_checkpoints(self) -> Path:
        """Default home of the audit logs' signed checkpoints: beside the logs, so it
        catches tampering with a log alone; CLINML_AUDIT_CHECKPOINT_DIR moves it apart."""
        return self.home / "audit" / "checkpoints"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def logs(self) -> Path:
        """Logs of the services clinml starts in the background (demo, tests, benchmarks)."""
        return self.home / "logs"

    @property
    def serve_log(self) -> Path:
        """The log of the service ``clinml demo`` starts."""
        return self.logs / "serve.log"

    def usecase(self, name: str) -> UseCasePaths:
        return UseCasePaths(self.home / name)


@dataclass(frozen=True)
class UseCasePaths:
    """Locations belonging to one use case."""

    root: Path

    @property
    def offline(self) -> Path:
        """Validated, identifier-free parquet: the Feast offline store's files."""
        return self.root / "offline"

    @property
    def ingest_runs(self) -> Path:
        """Where each ingest run stages its files; ``offline`` links to the committed
        run's, and the lock that makes ingests take turns is here (``clinml.features.ingest``)."""
        return self.root / ".ingest"

    @property
    def features_file(self) -> Path:
        return self.offline / "features.parquet"

    @property
    def labels_file(self) -> Path:
        return self.offline / "labels.parquet"

    @property
    def feast_repo(self) -> Path:
        return self.root / "feast"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_reports(self) -> Path:
        """One directory per run of the quality gate: report.md and summary.json."""
        return self.reports / "validation"

    def validation_run(self, when: datetime) -> Path:
        """The report directory of the gate run at ``when`` (UTC, to the microsecond)."""
        return self.validation_reports / f"{when.astimezone(UTC):%Y%m%dT%H%M%S%fZ}"

    @property
    def model_cards(self) -> Path:
        """Model cards downloaded by ``clinml models card``, one directory per version."""
        return self.reports / "model_cards"

    def model_card(self, version: int | str) -> Path:
        """The directory ``clinml models card`` downloads version ``version``'s card to."""
        return self.model_cards / f"v{version}"

    @property
    def quality_profile(self) -> Path:
        """The reference profile the gate's learned expectations come from."""
        return self.root / "quality" / "profile.json"

    @property
    def batches(self) -> Path:
        return self.root / "batches"

    @property
    def predictions(self) -> Path:
        """The PHI-free prediction log (parquet partitions by date) that monitoring reads."""
        return self.root / "predictions"

    @property
    def labels(self) -> Path:
        """Ground-truth outcomes as they arrive (``clinml labels ingest``), PHI-free."""
        return self.root / "labels"

    @property
    def monitoring(self) -> Path:
        """Monitor runs: verdicts, reports, alerts and the alert cooldown state."""
        return self.root / "monitoring"

    @property
    def monitor_runs(self) -> Path:
        """One directory per monitor run: verdict.json and its reports."""
        return self.monitoring / "runs"

    def monitor_run(self, run_id: str) -> Path:
        """The directory of the monitor run ``run_id``."""
        return self.monitor_runs / run_id

    @property
    def shadow_reports(self) -> Path:
        """One directory per shadow report: shadow.json and shadow.html."""
        return self.monitoring / "shadow"

    @property
    def evidently_workspace(self) -> Path:
        """The Evidently local workspace that ``evidently ui`` shows the history of."""
        return self.root / "evidently"
