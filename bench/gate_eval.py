"""Does the promotion gate decide right on growing data? (issue 17)

For each seed of the readmission generator (the spec's cohort size and window):

- **champion**: the spec's training on the labelled events a team had six months ago;
- **challenger**: the same spec retrained on today's labelled events (more months, new
  patients, new encounters of known ones);
- **worse**: the challenger's risks with noise added on the log-odds scale until its AUROC
  is 0.02 below the champion's on an independent cohort (another seed, same size): a
  challenger truly 0.02 worse.

Each is gated against the champion exactly as ``clinml promote`` does
(:func:`clinml.training.governance.assess`, on rows neither model was trained on). Reported:
how often the same-configuration retrain is refused (false refusals), how often the worse
one is refused, and whether each model's threshold rule holds on its temporal holdout.

    .venv/bin/python bench/gate_eval.py [--seeds 50] [--candidates gbm] [--select best-other]
        [--end 2026-03-01] [--rule-sensitivity 0.5] [--label NAME] [--json out.json]

Training uses the spec's candidates listed in ``--candidates`` (default: gradient boosting)
with their spec params and no search, plus the logistic-regression reference that is always
fitted: the gate and the threshold rule are what is measured, not the search. With
``--select best-other`` the parsimony rule is switched off, so the retrains are the more
variable boosted models rather than (usually) the reference. ``--end`` moves the end of the
cohort (default 1 December: the recent months are autumn); ``--label`` names the results
section in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from clinml.features.datasets import readmission  # noqa: E402
from clinml.spec import UseCaseSpec, load_spec  # noqa: E402
from clinml.training.evaluate import rule_holds, rule_metric, rule_refuted  # noqa: E402
from clinml.training.governance import (  # noqa: E402
    Contender,
    CurrentData,
    ValidationStatus,
    assess,
)
from clinml.training.metrics import point_metrics  # noqa: E402
from clinml.training.train import Fitted, fit_candidates, training_record  # noqa: E402

NOW = datetime(2026, 12, 1, tzinfo=UTC)
GROWTH_DAYS = 182
WORSE_BY = 0.02
PASSED = ValidationStatus(True, Path("bench"))


def bench_spec(args: argparse.Namespace) -> UseCaseSpec:
    spec = load_spec(ROOT / "configs" / "readmission.yaml")
    candidates = {
        name: spec.training.candidates[name].model_copy(update={"search": {}})
        for name in args.candidates
    }
    update: dict = {"candidates": candidates}
    if args.select == "best-other":
        update["selection_margin"] = -1.0  # any gain (or loss) selects the other candidate
    spec = spec.model_copy(update={"training": spec.training.model_copy(update=update)})
    if args.rule_sensitivity is not None:
        evaluation = spec.evaluation.model_copy(
            update={"max_alerts_per_100": None, "min_sensitivity": args.rule_sensitivity}
        )
        spec = spec.model_copy(update={"evaluation": evaluation})
    return spec


def known(cohort: pd.DataFrame, spec: UseCaseSpec, at: pd.Timestamp) -> pd.DataFrame:
    """The labelled events a team has at ``at``."""
    labelled = cohort[spec.label.known_at].notna() & (cohort[spec.label.known_at] <= at)
    return cohort[labelled & cohort[spec.label.column].notna()].reset_index(drop=True)


def contender(role: str, fitted: Fitted, spec: UseCaseSpec, frame: pd.DataFrame) -> Contender:
    selected = fitted.selected
    probability = selected.pipeline.predict_proba(frame[spec.feature_names])[:, 1]
    record = training_record(fitted.frame, spec, fitted.split)
    return Contender(role, None, probability, selected.threshold, record)


def _logit(p: np.ndarray) -> np.ndarray:
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(clipped / (1 - clipped))


def degrade(p: np.ndarray, noise: np.ndarray, scale: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(_logit(p) + scale * noise)))


def noise_for(target_auc: float, y: np.ndarray, p: np.ndarray, noise: np.ndarray) -> float:
    """The noise scale that brings ``p``'s AUROC down to ``target_auc`` (bisection)."""
    low, high = 0.0, 8.0
    for _ in range(40):
        middle = (low + high) / 2
        auc = point_metrics(y, degrade(p, noise, middle), 0.5)["roc_auc"]
        low, high = (middle, high) if auc > target_auc else (low, middle)
    return (low + high) / 2


def one_seed(spec: UseCaseSpec, seed: int, n_patients: int, end: datetime) -> dict:
    started = time.perf_counter()
    cohort = readmission.load(seed, end, n_patients=n_patients)
    today = pd.Timestamp(end)
    early = known(cohort, spec, today - pd.Timedelta(days=GROWTH_DAYS))
    late = known(cohort, spec, today)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": seed})})
    champion_fit = fit_candidates(spec, early)
    challenger_fit = fit_candidates(spec, late)
    data = CurrentData.from_frame(spec, late)
    champion = contender("champion", champion_fit, spec, data.frame)
    challenger = contender("challenger", challenger_fit, spec, data.frame)

    # The worse challenger: AUROC 0.02 below the champion's on an independent cohort.
    outside = known(readmission.load(seed + 100_000, end, n_patients=n_patients), spec, today)
    y_out = (outside[spec.label.column] == spec.label.positive_class).to_numpy(dtype=int)
    features = outside[spec.feature_names]
    p_champion = champion_fit.selected.pipeline.predict_proba(features)[:, 1]
    p_challenger = challenger_fit.selected.pipeline.predict_proba(features)[:, 1]
    target = point_metrics(y_out, p_champion, 0.5)["roc_auc"] - WORSE_BY
    rng = np.random.default_rng(seed)
    scale = noise_for(target, y_out, p_challenger, rng.standard_normal(len(y_out)))
    worse_p = degrade(challenger.probability, rng.standard_normal(len(data.y)), scale)
    # What 0.02 AUROC costs at the operating point: sensitivity at the same alert rate.
    p_worse_out = degrade(p_challenger, rng.standard_normal(len(y_out)), scale)
    alerts = float((p_challenger >= challenger.threshold).mean())
    cut = float(np.quantile(p_worse_out, 1 - alerts))
    sensitivity_cost = (
        point_metrics(y_out, p_challenger, challenger.threshold)["sensitivity"]
        - point_metrics(y_out, p_worse_out, cut)["sensitivity"]
    )
    worse = Contender("challenger", None, worse_p, challenger.threshold, challenger.record)

    same = assess(spec, data, challenger, champion, PASSED)
    degraded = assess(spec, data, worse, champion, PASSED)
    out = {
        "seed": seed,
        "rows_then": len(early),
        "rows_now": len(late),
        "selected_then": champion_fit.selected.name,
        "selected_now": challenger_fit.selected.name,
        "comparison_rows": same.comparison_rows,
        "retrain_passed": same.passed,
        "retrain_failed_checks": [c.name for c in same.checks if not c.passed],
        "retrain_difference": same.comparison.difference[spec.primary_metric]
        if same.comparison
        else math.nan,
        "retrain_ci": list(same.comparison.difference_ci[spec.primary_metric])
        if same.comparison
        else [math.nan, math.nan],
        "worse_refused": not degraded.passed,
        "worse_primary_refused": not next(
            c.passed for c in degraded.checks if c.name == "primary_metric"
        ),
        "worse_noise_scale": scale,
        "worse_sensitivity_cost": sensitivity_cost,
        "seconds": 0.0,
    }
    for role, fitted in (("champion", champion_fit), ("challenger", challenger_fit)):
        temporal = fitted.selected.temporal
        assert temporal is not None
        holds, _ = rule_holds(spec, temporal)
        metric = rule_metric(spec)
        assert metric is not None  # the bench needs a rule to measure
        out[f"{role}_temporal_{metric}"] = temporal.metrics[metric]
        out[f"{role}_rule_holds"] = bool(holds)
        out[f"{role}_rule_refuted"] = rule_refuted(spec, temporal)
        test_holds, _ = rule_holds(spec, fitted.selected.evaluation)
        out[f"{role}_test_rule_holds"] = bool(test_holds)
    out["seconds"] = time.perf_counter() - started
    return out


def summarise(results: list[dict], spec: UseCaseSpec) -> dict:
    n = len(results)
    frame = pd.DataFrame(results)
    metric = rule_metric(spec)
    return {
        "seeds": n,
        "false_refusal_rate": float((~frame["retrain_passed"]).mean()),
        "worse_refusal_rate": float(frame["worse_refused"].mean()),
        "worse_primary_refusal_rate": float(frame["worse_primary_refused"].mean()),
        "challenger_rule_holds_temporal": float(frame["challenger_rule_holds"].mean()),
        "champion_rule_holds_temporal": float(frame["champion_rule_holds"].mean()),
        "rule_holds_temporal_all": float(
            pd.concat([frame["challenger_rule_holds"], frame["champion_rule_holds"]]).mean()
        ),
        "rule_refuted_temporal_all": float(
            pd.concat([frame["challenger_rule_refuted"], frame["champion_rule_refuted"]]).mean()
        ),
        "rule_holds_test_all": float(
            pd.concat(
                [frame["challenger_test_rule_holds"], frame["champion_test_rule_holds"]]
            ).mean()
        ),
        "temporal_metric": metric,
        "temporal_median": float(
            pd.concat(
                [frame[f"challenger_temporal_{metric}"], frame[f"champion_temporal_{metric}"]]
            ).median()
        ),
        "temporal_p90": float(
            pd.concat(
                [frame[f"challenger_temporal_{metric}"], frame[f"champion_temporal_{metric}"]]
            ).quantile(0.9)
        ),
        "median_comparison_rows": float(frame["comparison_rows"].median()),
        "median_rows_then": float(frame["rows_then"].median()),
        "median_rows_now": float(frame["rows_now"].median()),
        "median_retrain_difference": float(frame["retrain_difference"].median()),
        "median_ci_width": float(frame["retrain_ci"].map(lambda ci: ci[1] - ci[0]).median()),
        "selected_now": frame["selected_now"].value_counts().to_dict(),
        "failed_checks": pd.Series(
            [name for names in frame["retrain_failed_checks"] for name in names], dtype=object
        )
        .value_counts()
        .to_dict(),
        "median_seconds_per_seed": float(frame["seconds"].median()),
        "median_sensitivity_cost": float(frame["worse_sensitivity_cost"].median()),
    }


def markdown(summary: dict, spec: UseCaseSpec, args: argparse.Namespace, minutes: float) -> str:
    rule = spec.evaluation.threshold_rule
    per_100 = summary["temporal_metric"] == "alert_rate"
    scale = 100 if per_100 else 1
    unit = " alerts per 100" if per_100 else ""
    command = (
        f".venv/bin/python bench/gate_eval.py --seeds {args.seeds} --candidates "
        f"{' '.join(args.candidates)} --select {args.select} --end {args.end:%Y-%m-%d} "
        f"--label {args.label}"
        + (f" --rule-sensitivity {args.rule_sensitivity}" if args.rule_sensitivity else "")
    )
    selection = (
        "the parsimony rule (the reference unless clearly beaten)"
        if args.select == "parsimony"
        else "always the other candidate (parsimony rule off)"
    )
    return "\n".join(
        [
            f"Reproduce: `{command}` ({minutes:.0f} min here, "
            f"{summary['median_seconds_per_seed']:.0f} s per seed).",
            "",
            f"{summary['seeds']} seeds of the readmission generator ({args.patients:,} "
            f"patients, 24 months ending {args.end:%Y-%m-%d}). Champion: trained on the "
            f"labelled events known {GROWTH_DAYS} days before the end "
            f"({summary['median_rows_then']:,.0f} rows, median); challenger: the same spec on "
            f"today's ({summary['median_rows_now']:,.0f} rows). Candidates: "
            f"{', '.join(args.candidates)} (spec params, no search) and the "
            f"logistic-regression reference; selection: {selection}; selected today: "
            f"{summary['selected_now']}. Threshold rule: {rule}.",
            "",
            "| measure | target | result |",
            "|---|---|---|",
            f"| same-configuration retrain on grown data refused (false refusals) | ≤ 5% | "
            f"{summary['false_refusal_rate']:.0%} |",
            f"| challenger {WORSE_BY} AUROC worse refused | ≥ 90% | "
            f"{summary['worse_refusal_rate']:.0%} (on the primary metric alone: "
            f"{summary['worse_primary_refusal_rate']:.0%}) |",
            f"| threshold rule holds on the temporal holdout (point estimate; champion and "
            f"challenger, {2 * summary['seeds']} models) | ≥ 90% | "
            f"{summary['rule_holds_temporal_all']:.0%} |",
            f"| … and on the test split | – | {summary['rule_holds_test_all']:.0%} |",
            f"| … refuted by the temporal interval (what the gate refuses on) | – | "
            f"{summary['rule_refuted_temporal_all']:.0%} |",
            "",
            f"Temporal-holdout {summary['temporal_metric'].replace('_', ' ')}: median "
            f"{summary['temporal_median'] * scale:.2f}{unit}, 90th percentile "
            f"{summary['temporal_p90'] * scale:.2f}{unit}. Comparison rows (neither model "
            f"trained on them): median {summary['median_comparison_rows']:,.0f}; AUROC "
            f"difference of the retrain: median {summary['median_retrain_difference']:+.4f}, "
            f"median 95% CI width {summary['median_ci_width']:.4f}. Checks that refused a "
            f"retrain: {summary['failed_checks'] or 'none'}. What {WORSE_BY} AUROC costs at "
            f"the operating point (sensitivity at the same alert rate, independent cohort): "
            f"median {summary['median_sensitivity_cost']:.3f}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--candidates", nargs="+", default=["gbm"])
    parser.add_argument("--select", choices=["parsimony", "best-other"], default="parsimony")
    parser.add_argument(
        "--end",
        type=lambda text: datetime.fromisoformat(text).replace(tzinfo=UTC),
        default=NOW,
        help="end of the cohort (YYYY-MM-DD)",
    )
    parser.add_argument(
        "--rule-sensitivity",
        type=float,
        default=None,
        help="replace the spec's alert budget by this sensitivity target",
    )
    parser.add_argument("--label", default="default", help="names the docs section")
    parser.add_argument("--json", type=Path, default=None, help="also write every seed here")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    spec = bench_spec(args)
    started = time.perf_counter()
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        result = one_seed(spec, seed, args.patients, args.end)
        results.append(result)
        print(
            f"seed {seed}: retrain {'passed' if result['retrain_passed'] else 'REFUSED'} "
            f"{result['retrain_failed_checks']} diff {result['retrain_difference']:+.4f} "
            f"[{result['retrain_ci'][0]:+.4f}, {result['retrain_ci'][1]:+.4f}]; worse "
            f"{'refused' if result['worse_refused'] else 'PASSED'}; temporal rule holds "
            f"{result['champion_rule_holds']}/{result['challenger_rule_holds']} "
            f"({result['seconds']:.0f}s)",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    summary = summarise(results, spec)
    print(json.dumps(summary, indent=1, default=str))
    if not args.no_doc:
        start, end = f"<!-- gate-eval-{args.label} -->", f"<!-- /gate-eval-{args.label} -->"
        text = markdown(summary, spec, args, (time.perf_counter() - started) / 60)
        write_section(args.doc, start, end, "\n".join([start, text, end]))
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
