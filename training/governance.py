"""Model governance: the promotion gate, promote, rollback, and the audit trail.

Training only ever creates a ``challenger``. ``promote`` evaluates the challenger and
the current ``champion`` on the same current test rows (the patient-disjoint test split
of today's labelled data, by the spec's seed) and checks the spec's gate:

- the primary metric is not worse than the champion's by more than ``max_metric_drop``;
- no evaluated subgroup's primary metric falls more than ``max_subgroup_gap`` below the
  challenger's overall figure;
- the expected calibration error is at most ``max_ece``, or at most what a perfectly
  calibrated model would show on these rows by chance (95th percentile), when that is
  larger: on 100 test rows chance alone gives an ECE near 0.08, and a gate that fails a
  perfect model is noise, not governance;
- the latest data-validation run passed.

On a pass (or ``force`` with a reason) the previous champion keeps the alias
``previous_champion`` and ``champion`` moves to the challenger. Every decision, moves
and refusals alike (a refusal records the version it would have moved to), is appended
to the hash-chained audit log (:mod:`clinml.audit`) *before* the registry changes, so
no alias ever moves unrecorded: if the log cannot be written, nothing moves.
``rollback`` points ``champion`` back at ``previous_champion`` and walks the audit trail
to restore the one before it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from clinml.audit import AuditLog
from clinml.errors import ClinmlError, NotReadyError
from clinml.spec import UseCaseSpec
from training.evaluate import Evaluation, evaluate
from training.tracking import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, Tracker
from training.train import outcome, split_frame

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

PROMOTE = "promote"
FORCED_PROMOTE = "forced-promote"
REFUSED = "promote-refused"
ROLLBACK = "rollback"


class PromotionRefused(ClinmlError):
    """The challenger failed the gate; the message lists every reason."""

    def __init__(self, message: str, decision: Decision):
        super().__init__(message)
        self.decision = decision


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on a challenger, and what happened to the aliases."""

    model: str
    challenger: str
    champion: str | None
    checks: list[Check]
    action: str
    reason: str | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict, repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


@dataclass(frozen=True)
class ValidationStatus:
    passed: bool | None
    where: Path | None

    @classmethod
    def latest(cls, reports: Path) -> ValidationStatus:
        """The newest data-validation run under ``reports`` (None when there is none)."""
        runs = sorted(p for p in reports.glob("*/summary.json")) if reports.is_dir() else []
        if not runs:
            return cls(None, None)
        summary = json.loads(runs[-1].read_text())
        return cls(bool(summary.get("success")), runs[-1].parent)


def gate(
    spec: UseCaseSpec,
    challenger: Evaluation,
    champion: Evaluation | None,
    validation: ValidationStatus,
) -> list[Check]:
    """Every check of the promotion gate, passed or not."""
    rules = spec.promotion
    metric = spec.primary_metric
    checks = []
    new = challenger.metrics[metric]
    if champion is None:
        checks.append(Check("primary_metric", True, f"{metric}={new:.4f}; no current champion"))
    else:
        old = champion.metrics[metric]
        ok = not math.isnan(new) and new >= old - rules.max_metric_drop
        checks.append(
            Check(
                "primary_metric",
                ok,
                f"{metric} {new:.4f} vs champion {old:.4f} "
                f"(allowed drop {rules.max_metric_drop:g}, change {new - old:+.4f})",
            )
        )
    worst = challenger.worst_gap(metric)
    if worst is None:
        checks.append(Check("subgroup_gap", True, "no subgroup large enough to evaluate"))
    else:
        attribute, group, gap = worst
        checks.append(
            Check(
                "subgroup_gap",
                gap >= -rules.max_subgroup_gap,
                f"worst {metric} gap {gap:+.4f} in {attribute}={group} "
                f"(limit -{rules.max_subgroup_gap:g}, "
                f"groups of >= {spec.evaluation.min_group_size})",
            )
        )
    ece = challenger.metrics["ece"]
    chance = challenger.ece_by_chance
    limit = max(rules.max_ece, chance) if math.isfinite(chance) else rules.max_ece
    checks.append(
        Check(
            "calibration",
            ece <= limit,
            f"expected calibration error {ece:.4f} (limit {rules.max_ece:g}; chance alone "
            f"reaches {chance:.4f} on {challenger.rows:,} rows)",
        )
    )
    if rules.require_valid_data:
        if validation.passed is None:
            checks.append(Check("data_validation", False, "no data-validation run on record"))
        else:
            state = "passed" if validation.passed else "FAILED"
            checks.append(
                Check(
                    "data_validation",
                    validation.passed,
                    f"latest validation run {state} ({validation.where})",
                )
            )
    return checks


@dataclass(frozen=True)
class TestData:
    """The current patient-disjoint test rows, the same for every model compared."""

    frame: pd.DataFrame = field(repr=False)
    y: np.ndarray = field(repr=False)

    @classmethod
    def from_frame(cls, spec: UseCaseSpec, frame: pd.DataFrame) -> TestData:
        rows = split_frame(frame, spec).test
        test = frame.iloc[rows].reset_index(drop=True)
        return cls(test, outcome(test, spec))


def threshold_of(version: ModelVersion, default: float = 0.5) -> float:
    raw = (version.tags or {}).get("operating_threshold")
    return float(raw) if raw is not None else default


def evaluate_version(
    spec: UseCaseSpec, tracker: Tracker, version: ModelVersion, data: TestData
) -> Evaluation:
    """A registered model version on the test rows, at the version's own threshold."""
    import mlflow

    tracker.activate()
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    probability = model.predict(data.frame[spec.feature_names])["probability"].to_numpy()
    return evaluate(
        spec,
        data.y,
        probability,
        threshold_of(version),
        data.frame[spec.entity.key].to_numpy(),
        data.frame[spec.sensitive_attributes],
    )


def _optional_alias(tracker: Tracker, model: str, alias: str) -> ModelVersion | None:
    try:
        return tracker.version_by_alias(model, alias)
    except NotReadyError:
        return None


def _entry(
    action: str,
    model: str,
    actor: str,
    from_version: str | None,
    to_version: str | None,
    reason: str | None,
    checks: list[Check],
    evaluations: dict[str, Evaluation],
    metric: str,
) -> dict[str, Any]:
    return {
        "action": action,
        "model": model,
        "actor": actor,
        "from_version": from_version,
        "to_version": to_version,
        "reason": reason,
        "gate": [c.to_dict() for c in checks],
        "metrics": {
            role: {
                "rows": e.rows,
                metric: _finite(e.metrics[metric]),
                "ece": _finite(e.metrics["ece"]),
            }
            for role, e in evaluations.items()
        },
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def promote(
    spec: UseCaseSpec,
    tracker: Tracker,
    audit: AuditLog,
    data: TestData,
    validation: ValidationStatus,
    actor: str,
    force: bool = False,
    reason: str | None = None,
) -> Decision:
    """Gate the challenger against the champion and move ``champion`` if it passes.

    Raises:
        NotReadyError: there is no challenger.
        ClinmlError: ``force`` without a reason, or the challenger already is champion.
        PromotionRefused: the gate failed and ``force`` was not given (recorded).
    """
    if force and not (reason and reason.strip()):
        raise ClinmlError("--force needs --reason: say why the gate is being overridden")
    model = spec.name
    challenger = tracker.version_by_alias(model, CHALLENGER)
    champion = _optional_alias(tracker, model, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        raise ClinmlError(f"{model} version {challenger.version} already is the champion")
    evaluations = {"challenger": evaluate_version(spec, tracker, challenger, data)}
    if champion is not None:
        evaluations["champion"] = evaluate_version(spec, tracker, champion, data)
    checks = gate(spec, evaluations["challenger"], evaluations.get("champion"), validation)
    passed = all(c.passed for c in checks)
    action = PROMOTE if passed else FORCED_PROMOTE if force else REFUSED
    from_version = str(champion.version) if champion is not None else None
    to_version = str(challenger.version)
    audit.append(
        _entry(
            action,
            model,
            actor,
            from_version,
            to_version,
            reason,
            checks,
            evaluations,
            spec.primary_metric,
        )
    )
    decision = Decision(model, to_version, from_version, checks, action, reason, evaluations)
    if action == REFUSED:
        reasons = "; ".join(c.detail for c in decision.failures)
        raise PromotionRefused(
            f"{model} version {to_version} was not promoted: {reasons}", decision
        )
    client = tracker.client
    if champion is not None:
        client.set_registered_model_alias(model, PREVIOUS_CHAMPION, str(champion.version))
    client.set_registered_model_alias(model, CHAMPION, to_version)
    client.delete_registered_model_alias(model, CHALLENGER)
    client.set_model_version_tag(model, to_version, "clinml.promoted_by", actor)
    return decision


def rollback(
    spec: UseCaseSpec, tracker: Tracker, audit: AuditLog, actor: str, reason: str | None = None
) -> tuple[str, str]:
    """Point ``champion`` back at ``previous_champion``; returns (from, to) versions.

    Raises:
        NotReadyError: there is no champion or no previous champion.
    """
    model = spec.name
    current = tracker.version_by_alias(model, CHAMPION)
    previous = _optional_alias(tracker, model, PREVIOUS_CHAMPION)
    if previous is None:
        raise NotReadyError(f"{model} has no previous champion to roll back to")
    from_version, to_version = str(current.version), str(previous.version)
    audit.append(_entry(ROLLBACK, model, actor, from_version, to_version, reason, [], {}, ""))
    client = tracker.client
    client.set_registered_model_alias(model, CHAMPION, to_version)
    before = champion_before(audit, model, to_version)
    if before is not None and before != to_version:
        client.set_registered_model_alias(model, PREVIOUS_CHAMPION, before)
    else:
        client.delete_registered_model_alias(model, PREVIOUS_CHAMPION)
    return from_version, to_version


def champion_before(audit: AuditLog, model: str, version: str) -> str | None:
    """The champion that ``version`` replaced when it was last promoted, per the audit log."""
    for record in reversed(audit.records()):
        if (
            record.get("model") == model
            and record.get("action") in {PROMOTE, FORCED_PROMOTE}
            and record.get("to_version") == version
        ):
            return record.get("from_version")
    return None


def history(audit: AuditLog, model: str) -> list[dict[str, Any]]:
    """Every audit record about ``model``, oldest first."""
    return [r for r in audit.records() if r.get("model") == model]


def resolve(tracker: Tracker, model: str, ref: str) -> ModelVersion:
    """A model version by number (``3``) or alias (``champion``).

    Raises:
        NotReadyError: no such version or alias.
    """
    from mlflow.exceptions import MlflowException

    if not ref.isdigit():
        return tracker.version_by_alias(model, ref)
    try:
        return tracker.client.get_model_version(model, ref)
    except MlflowException as exc:
        if exc.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise
        raise NotReadyError(f"model '{model}' has no version {ref}") from None


def versions(tracker: Tracker, model: str) -> list[ModelVersion]:
    """Every registered version of ``model``, newest first."""
    found = tracker.client.search_model_versions(f"name = '{model}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def aliases(tracker: Tracker, model: str) -> dict[str, list[str]]:
    """Version number -> the aliases pointing at it (version search does not return them)."""
    found: dict[str, list[str]] = {}
    for alias, number in (tracker.client.get_registered_model(model).aliases or {}).items():
        found.setdefault(str(number), []).append(alias)
    return {number: sorted(names) for number, names in found.items()}


def download_card(tracker: Tracker, version: ModelVersion, destination: Path) -> dict[str, Any]:
    """Fetch a version's model card (JSON and HTML) into ``destination``; returns the JSON."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from training.train import CARD_ARTIFACT

    destination.mkdir(parents=True, exist_ok=True)
    try:
        local = download_artifacts(
            run_id=version.run_id,
            artifact_path=CARD_ARTIFACT,
            dst_path=str(destination),
            tracking_uri=tracker.uri,
        )
    except (MlflowException, OSError):
        raise NotReadyError(
            f"{version.name} version {version.version} has no model card "
            "(it was registered before model cards existed)"
        ) from None
    return json.loads((Path(local) / "model_card.json").read_text())
