"""The use-case spec: everything clinml knows about one dataset, in one YAML file.

A team brings its own dataset by writing a spec, not code. The file is read as YAML,
``${VAR}`` references in strings are expanded from the environment, and the result is
validated by :class:`UseCaseSpec` (``extra="forbid"``, so a misspelt key is an error, not
a silent default). Validation errors are re-raised as :class:`~clinml.errors.SpecError`
with the file name and the field path, e.g.
``configs/pathology.yaml: features[2].max: Input should be a valid number``.

Usage::

    spec = load_spec("pathology")              # configs/pathology.yaml
    spec = load_spec("site/sepsis.yaml")       # any path
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from clinml.errors import SpecError

Identifier = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$", max_length=63)]
CandidateName = Literal["svm", "rf", "gbm", "mlp", "logreg"]
# The reference model: always fitted and evaluated beside the candidates (docs/training.md).
REFERENCE_CANDIDATE = "logreg"
# Metrics a spec may name as primary; all are higher-is-better (training/metrics.py).
Metric = Literal[
    "roc_auc", "average_precision", "accuracy", "sensitivity", "specificity", "precision", "f1"
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where the raw data comes from: a built-in loader or a CSV/Parquet file."""

    loader: str | None = Field(default=None, description="Name of a built-in loader.")
    path: Path | None = Field(
        default=None, description="CSV or Parquet file (relative to the spec)."
    )
    seed: int = Field(default=0, description="Seed for loaders that synthesise columns.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the loader (e.g. n_patients)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceSpec:
        if (self.loader is None) == (self.path is None):
            raise ValueError("give exactly one of 'loader' or 'path'")
        if self.path is not None and self.options:
            raise ValueError("'options' only applies to a 'loader'")
        if self.path is not None and self.path.suffix.lower() not in {".csv", ".parquet"}:
            raise ValueError("'path' must end in .csv or .parquet")
        return self


class EntitySpec(_Strict):
    """The entity predictions are about (a patient) and its key column."""

    name: Identifier = "patient"
    key: Identifier = "patient_id"
    description: str = ""
    generated: bool = Field(
        default=False,
        description="The data has no entity ids: ingestion derives one per row from its "
        "content, so every row is its own patient (see docs/byod.md).",
    )


class LabelSpec(_Strict):
    """The outcome column and which of its two values is the positive class."""

    column: Identifier
    positive_class: str
    negative_class: str
    known_at: Identifier | None = Field(
        default=None,
        description="Column saying when each label became known. Rows whose label is not "
        "known yet (null) are stored as features but are not training events.",
    )
    horizon_days: float = Field(
        default=0.0,
        ge=0.0,
        description="The outcome window: the label says what happened within this many days "
        "after the event (30 for 30-day readmission). Training events this close before the "
        "temporal holdout are left out, so no training label looks into the holdout.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> LabelSpec:
        if self.positive_class == self.negative_class:
            raise ValueError("positive_class and negative_class must differ")
        return self


class ColumnSpec(_Strict):
    """One column: its type, unit and allowed values.

    Numeric columns (``float``, ``int``) must declare ``min`` and ``max``; categorical
    columns must declare ``categories``. These drive the data-quality gate and the
    request schema of the service.
    """

    name: Identifier
    type: Literal["float", "int", "category"]
    unit: str | None = None
    description: str = ""
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None
    nullable: bool = Field(
        default=False,
        description="Null is a legitimate value (e.g. a lab not ordered); the model "
        "imputes it explicitly. Otherwise a null fails the quality gate.",
    )
    drift_floor: float | None = Field(
        default=None,
        gt=0.0,
        description="The smallest change of this feature the monitor alerts on (Wasserstein "
        "distance in reference SDs for a number, total-variation distance for a category); "
        "default: monitoring.numeric_floor or monitoring.categorical_floor.",
    )

    @model_validator(mode="after")
    def _range_or_categories(self) -> ColumnSpec:
        if self.type == "category":
            if not self.categories:
                raise ValueError("a category column needs a non-empty 'categories' list")
            if self.min is not None or self.max is not None:
                raise ValueError("a category column takes 'categories', not 'min'/'max'")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError("'categories' has duplicates")
        else:
            if self.min is None or self.max is None:
                raise ValueError(f"a {self.type} column needs both 'min' and 'max'")
            if self.min > self.max:
                raise ValueError("'min' is greater than 'max'")
            if self.categories is not None:
                raise ValueError(f"a {self.type} column takes 'min'/'max', not 'categories'")
        return self

    @property
    def is_numeric(self) -> bool:
        return self.type != "category"


class SearchSpec(_Strict):
    """The hyperparameter-search budget, shared by every candidate."""

    n_iter: int = Field(
        default=6,
        ge=1,
        description="Configurations sampled from each candidate's search space (the first is "
        "always the candidate's own params).",
    )
    cv_folds: int = Field(
        default=3, ge=2, le=10, description="Patient-grouped, stratified cross-validation folds."
    )
    max_rows: int = Field(
        default=20_000,
        ge=100,
        description="The search runs on a patient-grouped sample of at most this many training "
        "rows; the chosen configuration is then refitted on all of them.",
    )
    time_budget_s: float | None = Field(
        default=None,
        gt=0,
        description="Stop sampling a candidate's configurations once its search has run this "
        "long (at least one configuration is always evaluated).",
    )


class CandidateSpec(_Strict):
    """One candidate: fixed hyperparameters and, optionally, a search space."""

    params: dict[str, Any] = Field(
        default_factory=dict, description="Hyperparameters (empty for the built-in defaults)."
    )
    search: dict[str, list[Any]] | None = Field(
        default=None,
        description="Hyperparameter -> values to sample from, overriding params. None: the "
        "built-in space for the candidate; {}: no search, train params as given.",
    )


class TrainingSpec(_Strict):
    """How candidates are trained and compared."""

    test_size: float = Field(
        default=0.25,
        gt=0.0,
        lt=0.9,
        description="Share of patients held out for testing. A patient is a test patient when "
        "a keyed hash of their pseudonymised id falls below this share, so the assignment "
        "never changes as data grows (docs/training.md).",
    )
    test_salt: str = Field(
        default="",
        max_length=200,
        description="Key of the test-assignment hash ('' = the use-case name). Changing it "
        "draws a new test set; versions trained under different salts are still compared "
        "only on rows neither was trained on.",
    )
    seed: int = 0
    temporal_holdout_months: float | None = Field(
        default=None,
        gt=0,
        description="Hold out every event in the most recent N months as a second, temporal "
        "test set; training uses only the events before it.",
    )
    class_weight: Literal["balanced", "none"] = Field(
        default="none",
        description="'balanced': weight classes inversely to their frequency while fitting, "
        "then correct the probabilities back to the true prevalence. Measured on the "
        "readmission cohort it does not raise AUROC and worsens the trees' calibration "
        "(docs/training.md), so it is off by default.",
    )
    search: SearchSpec = SearchSpec()
    selection_margin: float | None = Field(
        default=0.01,
        ge=0.0,
        lt=1.0,
        description="Parsimony: a candidate more complex than the logistic-regression "
        "reference is selected only when the lower 95% bound of its paired, cross-validated "
        "gain over the reference exceeds this margin (docs/training.md). null: no "
        "parsimony, the best other candidate by cross-validated score is selected (the "
        "reference is still fitted, shown and used by a first promotion).",
    )
    candidates: dict[CandidateName, CandidateSpec] = Field(
        default_factory=lambda: {n: CandidateSpec() for n in ("svm", "rf", "gbm", "mlp")},
        description="Candidate name -> its params and search space.",
        min_length=1,
    )


class QualitySpec(_Strict):
    """Tolerances of the expectations learned from the reference data.

    The first accepted batch becomes the reference profile (observed ranges, null
    rates, category sets, label rate); later batches must stay within these tolerances
    of it, on top of the spec's own hard limits.
    """

    range_margin: float = Field(
        default=0.25,
        ge=0.0,
        description="A value may exceed the reference's observed range by this fraction of "
        "its width (still within the spec's min/max).",
    )
    out_of_range_share: float = Field(
        default=0.001,
        ge=0.0,
        lt=1.0,
        description="Share of rows allowed outside the learned range before the batch fails.",
    )
    null_rate_margin: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Allowed rise of a nullable column's null rate."
    )
    label_rate_band: tuple[float, float] | None = Field(
        default=None,
        description="Allowed positive-label rate; default: the reference rate x [0.5, 1.5], "
        "widened by 3 binomial standard errors for the batch size.",
    )
    unseen_category_share: float = Field(
        default=0.01,
        ge=0.0,
        lt=1.0,
        description="Share of rows allowed in declared categories never seen in the reference.",
    )


class EvaluationSpec(_Strict):
    """How models are evaluated and how a probability becomes a label.

    The operating threshold is chosen by exactly one rule: a fixed ``operating_threshold``,
    the fewest alerts whose sensitivity still reaches ``min_sensitivity`` at its lower 95%
    confidence bound, or the most sensitive threshold whose alert rate stays within
    ``max_alerts_per_100`` at the upper 95% bound for a ``budget_window_days`` window of
    new patients. Rules are applied to out-of-fold predictions on the training data, never
    to the test split.
    """

    operating_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    min_sensitivity: float | None = Field(default=None, gt=0.0, le=1.0)
    max_alerts_per_100: float | None = Field(default=None, gt=0.0, le=100.0)
    bootstrap: int = Field(
        default=1000, ge=100, description="Patient-level bootstrap resamples for 95% CIs."
    )
    calibration_bins: int = Field(default=10, ge=2, le=50)
    min_group_size: int = Field(
        default=100,
        ge=1,
        description="Subgroups (and intersections) smaller than this are listed, not evaluated.",
    )
    min_group_events: int = Field(
        default=10,
        ge=1,
        description="Subgroups with fewer positives (or negatives) than this are listed, not "
        "evaluated: discrimination and sensitivity are undefined or pure noise below it.",
    )
    budget_window_days: float = Field(
        default=30.0,
        gt=0.0,
        description="With max_alerts_per_100: the period over which the team spends its budget. "
        "The threshold keeps the alert rate of such a period within budget with 95% "
        "probability, allowing for the chance variation of a period's patients.",
    )
    row_noun: str = Field(
        default="patients",
        pattern=r"^[a-z][a-z -]{0,39}$",
        description="What one row is, in the plural (patients, discharges, appointments, "
        "prescriptions): the model card, the gate and the reports count alerts and net "
        "benefit per 100 of them.",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> EvaluationSpec:
        rules = [self.operating_threshold, self.min_sensitivity, self.max_alerts_per_100]
        if sum(r is not None for r in rules) > 1:
            raise ValueError(
                "give only one of operating_threshold, min_sensitivity, max_alerts_per_100"
            )
        return self

    @property
    def threshold_rule(self) -> str:
        """The rule in words, e.g. ``sensitivity >= 0.8``."""
        if self.min_sensitivity is not None:
            return f"sensitivity >= {self.min_sensitivity:g}"
        if self.max_alerts_per_100 is not None:
            return f"at most {self.max_alerts_per_100:g} alerts per 100 {self.row_noun}"
        return f"fixed threshold {self.operating_threshold or 0.5:g}"


class PromotionSpec(_Strict):
    """The gate a challenger must pass to become champion (``clinml promote``).

    Every comparison is paired (both models on the same patients, rows neither was trained
    on) and decided on a 95% patient-level bootstrap interval, not a point estimate
    (docs/training.md explains each rule and its default).
    """

    max_metric_drop: float = Field(
        default=0.02,
        ge=0.0,
        lt=1.0,
        description="Non-inferiority margin: the lower 95% bound of (challenger - champion) "
        "in the primary metric must lie above -max_metric_drop. Without a champion the "
        "comparison is with the logistic-regression reference.",
    )
    max_subgroup_drop: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="Within each evaluated subgroup, the primary metric may not be shown lower "
        "than the champion's (or the reference's) in that group by more than this: the group "
        "fails when its whole 95% interval lies below -max_subgroup_drop. A group whose "
        "interval cannot decide is listed as inconclusive, not refused.",
    )
    max_subgroup_sensitivity_drop: float = Field(
        default=0.10,
        ge=0.0,
        le=1.0,
        description="Within each evaluated subgroup, the sensitivity at the operating point "
        "may not be shown lower than the reference's by more than this.",
    )
    subgroup_observed_expected: tuple[float, float] = Field(
        default=(0.8, 1.25),
        description="Within each evaluated subgroup the observed/expected ratio may not lie "
        "outside this band with 95% confidence (the model under- or over-predicts the "
        "group's risk).",
    )
    min_comparison_events: int = Field(
        default=20,
        ge=1,
        description="A comparison with fewer positives (or negatives) on rows neither model "
        "was trained on is underpowered: the gate refuses and says so.",
    )
    max_ece: float = Field(
        default=0.05, gt=0.0, description="Largest allowed expected calibration error."
    )
    require_valid_data: bool = Field(
        default=True, description="The latest ingested batch must have passed validation."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_subgroup_gap" in data:
            raise ValueError(
                "max_subgroup_gap (a subgroup's gap to the overall figure) was replaced by "
                "max_subgroup_drop, a paired comparison with the reference within the group; "
                "see docs/training.md"
            )
        return data

    @model_validator(mode="after")
    def _band(self) -> PromotionSpec:
        low, high = self.subgroup_observed_expected
        if not 0 < low < 1 < high:
            raise ValueError("subgroup_observed_expected must be (low, high) with low < 1 < high")
        return self


class PerformanceFloors(_Strict):
    """Floors for performance on labelled predictions; a window below one alerts."""

    min_roc_auc: float | None = Field(default=None, gt=0.0, le=1.0)
    min_sensitivity: float | None = Field(
        default=None, gt=0.0, le=1.0, description="At the model's operating threshold."
    )
    max_ece: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="Expected calibration error ceiling."
    )
    min_labels: int = Field(
        default=100,
        ge=10,
        description="A window with fewer labelled predictions is reported but not judged.",
    )


class MonitoringSpec(_Strict):
    """How drift is tested and when it alerts (docs/monitoring.md).

    A feature alerts when its change is both at least its effect-size floor and
    significant after Bonferroni, with patients (not rows) as the unit
    (:mod:`clinml.monitoring.statistics`). ``numeric_method`` and ``categorical_method`` choose
    the tests Evidently's HTML report shows.
    """

    numeric_method: Literal["ks", "wasserstein", "psi", "jensenshannon", "anderson"] = "ks"
    categorical_method: Literal["chisquare", "z", "psi", "jensenshannon"] = "chisquare"
    numeric_floor: float = Field(
        default=0.2,
        gt=0.0,
        description="Smallest change of a numeric feature that alerts: the Wasserstein "
        "distance in reference standard deviations (0.2: Cohen's 'small' effect).",
    )
    categorical_floor: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Smallest change of a categorical feature that alerts: the "
        "total-variation distance (0.1: one record in ten would have to change category).",
    )
    prediction_floor: float | None = Field(
        default=None,
        gt=0.0,
        description="Floor for prediction drift (the probabilities, in reference SDs); "
        "default: numeric_floor.",
    )
    min_patients: int | None = Field(
        default=None,
        ge=1,
        description="A window with fewer (effective) patients is 'not enough data' for the "
        "drift tests; default: the number that finds a change 1.5 times the floors with 95% "
        "power at the Bonferroni level.",
    )
    reference: Literal["training", "seasonal", "rolling"] = Field(
        default="training",
        description="What a window is compared with: the champion's training rows; those "
        "of the same weeks of the year (season_weeks either side); or the prediction log "
        "of the rolling_days before the window.",
    )
    season_weeks: int = Field(default=4, ge=1, le=26)
    rolling_days: int = Field(default=28, ge=1)
    population: dict[str, list[str]] = Field(
        default_factory=dict,
        description="The population the service sees, as categories of sensitive "
        "attributes (e.g. {site: [hosp_a]} for a service of one hospital): the reference "
        "is restricted to it.",
    )

    drift_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Dataset drift when at least this share of features drifted.",
    )
    column_threshold: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="Per-feature threshold: a p-value below it (ks, chisquare, z) or a "
        "distance above it (wasserstein, psi, jensenshannon) means the feature drifted.",
    )
    family_alpha: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="With p-value tests, an alert also fires when any one feature's p-value "
        "is below family_alpha / (number of tests) (Bonferroni), so the chance of a false "
        "alarm per window stays at most family_alpha however many features there are.",
    )
    performance: PerformanceFloors = PerformanceFloors()


class ServingSpec(_Strict):
    """How a probability is presented to the application."""

    risk_bands: list[tuple[str, float]] | None = Field(
        default=None,
        description="Ordered (name, upper bound) pairs; a probability gets the first band "
        "whose bound it is below, and the last bound must be 1.0 (inclusive). Default: "
        "low below half the operating threshold, elevated below it, high at or above it.",
    )

    @model_validator(mode="after")
    def _bands_ordered(self) -> ServingSpec:
        if self.risk_bands is None:
            return self
        bounds = [b for _, b in self.risk_bands]
        if not bounds or bounds != sorted(set(bounds)) or bounds[-1] != 1.0 or bounds[0] <= 0:
            raise ValueError("risk_bands: bounds must increase strictly, be > 0 and end at 1.0")
        return self


class UseCaseSpec(_Strict):
    """One use case: the data, the label, the features and the thresholds."""

    name: Identifier
    description: str = ""
    intended_use: str = Field(default="", description="Who uses the model, for what decision.")
    out_of_scope_use: list[str] = Field(default_factory=list)
    limitations: list[str] = Field(default_factory=list)
    source: SourceSpec
    entity: EntitySpec = EntitySpec()
    event_timestamp: Identifier = "event_timestamp"
    event_timestamp_generated: bool = Field(
        default=False,
        description="The data has no timestamps: ingestion stamps every row of a batch with "
        "the ingestion time (see docs/byod.md).",
    )
    label: LabelSpec
    features: list[ColumnSpec] = Field(min_length=1, description="Model inputs, in order.")
    attributes: list[ColumnSpec] = Field(
        default_factory=list,
        description="Columns kept for subgroup evaluation and monitoring, never model inputs.",
    )
    sensitive_attributes: list[Identifier] = Field(default_factory=list)
    identifier_columns: list[Identifier] = Field(
        default_factory=list, description="PHI columns, dropped at ingestion."
    )
    primary_metric: Metric = "roc_auc"
    feature_service: str = Field(pattern=r"^[a-z_][a-z0-9_]*_v[0-9]+$")
    feature_ttl_days: float | None = Field(
        default=None,
        gt=0,
        description="How long a feature value stays valid; older online values are stale. "
        "None: valid until replaced.",
    )
    quality: QualitySpec = QualitySpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    promotion: PromotionSpec = PromotionSpec()
    serving: ServingSpec = ServingSpec()
    monitoring: MonitoringSpec = MonitoringSpec()

    # Where the spec was read from; set by load_spec, never by the YAML itself.
    _source_file: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _columns_consistent(self) -> UseCaseSpec:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"columns declared twice: {', '.join(dupes)}")
        reserved = {self.entity.key, self.event_timestamp, self.label.column}
        if len(reserved) != 3:
            raise ValueError("entity.key, event_timestamp and label.column must be distinct")
        if self.label.known_at is not None:
            if self.label.known_at in reserved | set(names):
                raise ValueError("label.known_at must be a column of its own")
            reserved.add(self.label.known_at)
        clash = sorted(reserved & set(names))
        if clash:
            raise ValueError(f"{', '.join(clash)} cannot also be a feature or attribute")
        unknown = sorted(set(self.sensitive_attributes) - set(names))
        if unknown:
            raise ValueError(f"sensitive_attributes not declared as columns: {', '.join(unknown)}")
        phi = sorted(set(self.identifier_columns) & (set(names) | reserved))
        if phi:
            raise ValueError(
                "identifier_columns are dropped at ingestion, so they cannot be used: "
                + ", ".join(phi)
            )
        by_name = {c.name: c for c in self.columns}
        for attribute, values in self.monitoring.population.items():
            column = by_name.get(attribute)
            if attribute not in self.sensitive_attributes or column is None:
                raise ValueError(
                    f"monitoring.population: {attribute} is not one of sensitive_attributes"
                )
            unknown = sorted(set(values) - set(column.categories or ()))
            if column.type != "category" or not values or unknown:
                raise ValueError(
                    f"monitoring.population.{attribute} needs one or more of its declared "
                    "categories"
                )
        return self

    @property
    def source_file(self) -> Path | None:
        """The YAML file this spec was loaded from, if any."""
        return self._source_file

    @property
    def columns(self) -> list[ColumnSpec]:
        """Features then attributes: everything stored in the feature store."""
        return [*self.features, *self.attributes]

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.features]

    def fingerprint(self) -> str:
        """SHA-256 of the validated spec, recorded with every model version."""
        canonical = self.model_dump_json()
        return hashlib.sha256(canonical.encode()).hexdigest()


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise SpecError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    return value


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def resolve_spec_path(name_or_path: str | Path, config_dir: Path | None = None) -> Path:
    """A spec given by name (``pathology``) is looked up in the user's spec directory
    (``config_dir``, default ``Settings().spec_dir``), then among the built-in use cases."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.parent != Path("."):
        return candidate
    from clinml.settings import BUILTIN_CONFIG_DIR, Settings

    directory = config_dir or Settings().spec_dir
    mine = directory / f"{name_or_path}.yaml"
    builtin = BUILTIN_CONFIG_DIR / f"{name_or_path}.yaml"
    return builtin if not mine.is_file() and builtin.is_file() else mine


def builtin_usecases() -> list[str]:
    """Names of the use cases shipped with the project (``configs/``)."""
    from clinml.settings import BUILTIN_CONFIG_DIR

    return sorted(path.stem for path in BUILTIN_CONFIG_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path, config_dir: Path | None = None) -> UseCaseSpec:
    """Read and validate a use-case spec.

    Args:
        name_or_path: a spec name looked up in ``config_dir`` (``CLINML_CONFIG_DIR``,
            default ``CLINML_HOME/configs``) and then among the built-in use cases in the
            project's ``configs/``, or a path to a YAML file.
        config_dir: overrides the settings' config directory for name lookups.

    Returns:
        The validated spec; ``source.path`` is made absolute relative to the spec file.

    Raises:
        SpecError: the file is missing, is not YAML, or fails validation. The message
            names the file and the field path.
    """
    path = resolve_spec_path(name_or_path, config_dir)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level")
    raw = _expand_env(raw, str(path))
    try:
        spec = UseCaseSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_field_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SpecError(f"{path}: {problems[0]}{more}") from None
    if spec.source.path is not None and not spec.source.path.is_absolute():
        absolute = (path.parent / spec.source.path).resolve()
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={"path": absolute})})
    spec._source_file = path.resolve()
    return spec
