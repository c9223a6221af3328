"""The monitor's false-alarm rate and detection curves on a use case's generator.

Runs bench/monitor_evaluation.py (the code tests/model/test_monitor_power*.py assert small
versions of) for one use case and writes its tables and dose-response plot into
docs/monitoring.md (readmission between ``<!-- monitor-eval -->`` markers, the others
between ``<!-- monitor-eval-USECASE -->`` markers).

    .venv/bin/python bench/monitor_eval.py [--usecase readmission] [--windows 40] [--json out.json]
    .venv/bin/python bench/monitor_eval.py --usecase noshow --from out.json   # redraw only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from bench import monitor_evaluation as evaluation  # noqa: E402
from bench.docsection import write_section  # noqa: E402
from clinml.monitoring import drift  # noqa: E402
from clinml.spec import load_spec  # noqa: E402


@dataclass(frozen=True)
class Words:
    """What docs/monitoring.md says about one use case's run."""

    marker: str  # the section's markers are <!-- marker --> and <!-- /marker -->
    plot: str  # under docs/img/
    test: str
    system: str  # the system and its windows, in words
    dose_labels: dict[str, str]  # the x axis of each shift's plot
    unseen: dict[str, str]  # each label-only shift, in words


WORDS = {
    "readmission": Words(
        marker="monitor-eval",
        plot="monitor_dose_response.png",
        test="tests/model/test_monitor_power.py",
        system="The stand-in champion is trained on year one of a system with about 100 000 "
        "discharges a year; every window is consecutive discharges from year two of another "
        "seed (500 rows ≈ 2 days, 2 000 ≈ a week, 10 000 ≈ 5 weeks, 50 000 ≈ half a year, "
        "with the repeat patients that brings).",
        dose_labels={
            "site mix": "site shares moved (total variation = 0.4 × dose)",
            "case mix": "winter surge (winter_case_mix)",
            "sodium offset": "sodium read high (reference SDs)",
            "lab units": "share of creatinine in µmol/L",
            "label rate": "odds of readmission × (1 + dose)",
        },
        unseen={
            "label rate": "A label-rate shift (odds of readmission doubled at the same features)"
        },
    ),
    "noshow": Words(
        marker="monitor-eval-noshow",
        plot="monitor_dose_response_noshow.png",
        test="tests/model/test_monitor_power_noshow.py",
        system="The stand-in champion is trained on year one of four clinics booking about "
        "130 000 appointments a year (80 000 patients simulated); every window is consecutive "
        "appointments, in prediction-time order, from year two of another seed (500 rows ≈ "
        "one day's list, 2 500 ≈ a week, 10 000 ≈ 4 weeks).",
        dose_labels={
            "reminder outage": "share of due SMS reminders not sent",
            "new clinic": "share of patients at the new clinic_e",
            "winter weather": "hard-winter no-show risk (winter_weather)",
        },
        unseen={
            "winter weather": "A hard winter (`winter_weather` 1: log-odds of a no-show "
            "+0.30, more for patients who travel far, at the same features)"
        },
    ),
    "ade": Words(
        marker="monitor-eval-ade",
        plot="monitor_dose_response_ade.png",
        test="tests/model/test_monitor_power_ade.py",
        system="The stand-in champion is trained on year one of a system writing about "
        "113 000 new prescriptions a year (56 000 patients simulated, 3.6% followed by an "
        "adverse drug event); every window is consecutive prescriptions from year two of "
        "another seed whose 30-day outcome is known (500 rows ≈ 2 days, 2 500 ≈ 8 days and "
        "about 90 events, 10 000 ≈ a month and about 360 events).",
        dose_labels={
            "class mix": "share of prescriptions moved from other to anticoagulants",
            "polypharmacy": "extra concurrent medications (mean)",
            "missing labs": "odds of an unmeasured eGFR/ALT × (1 + dose)",
            "label rate": "odds of an ADE × (1 + dose)",
            "anticoagulant risk": "odds of an ADE on anticoagulants × (1 + dose)",
        },
        unseen={
            "label rate": "A label-rate shift (odds of an adverse drug event doubled at the "
            "same features)",
            "anticoagulant risk": "A riskier anticoagulant (odds of an event doubled for "
            "anticoagulant prescriptions only, 7% of them)",
        },
    ),
}


def _percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "–"


def plot(cohort: evaluation.Cohort, detected: pd.DataFrame, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = WORDS[cohort.name].dose_labels
    shifts = [s for s in cohort.shifts if s not in cohort.unseen]
    fig, axes = plt.subplots(
        1, len(shifts), figsize=(4 * len(shifts), 3.4), sharey=True, squeeze=False
    )
    for ax, shift in zip(axes[0], shifts, strict=True):
        rows = detected[detected["shift"] == shift]
        for size, by_size in rows.groupby("size"):
            ax.plot(by_size["dose"], by_size["detected"], marker="o", label=f"{size:,} rows")
        ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
        ax.axvline(cohort.meaningful[shift], color="firebrick", linestyle="--", linewidth=1)
        ax.set_title(shift)
        ax.set_xlabel(labels[shift], fontsize=8)
        ax.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("windows with a drift alert")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Detection by shift size (dashed: the smallest clinically meaningful size; dotted: 95%)",
        fontsize=9,
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)


def section(
    cohort: evaluation.Cohort,
    outcomes: list[evaluation.WindowOutcome],
    windows: int,
    minutes: float,
    needed: int,
) -> str:
    words = WORDS[cohort.name]
    start, end = f"<!-- {words.marker} -->", f"<!-- /{words.marker} -->"
    quiet = evaluation.false_alarms(outcomes)
    detected = evaluation.detection(outcomes)
    monitoring = load_spec(cohort.name).monitoring
    sizes = sorted(quiet["size"].unique())
    usecase = "" if cohort.name == "readmission" else f"--usecase {cohort.name} "
    lines = [
        start,
        f"Reproduce: `.venv/bin/python bench/monitor_eval.py {usecase}--windows {windows}` "
        f"({minutes:.0f} min here). A small version runs in `{words.test}`.",
        "",
        f"Spec as shipped: floors {monitoring.numeric_floor} SD (numbers) and "
        f"{monitoring.categorical_floor} total variation (categories), family α "
        f"{monitoring.family_alpha}; a window needs {needed:,} patients for a quiet verdict "
        f"to count. {words.system}",
        "",
        "**False alarms** (windows with any drift, prediction-drift, data-quality or "
        "subgroup alert; no shift injected):",
        "",
        "| window | " + " | ".join(f"{size:,} rows" for size in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for condition in cohort.quiet:
        cells = []
        for size in sizes:
            row = quiet[(quiet["condition"] == condition) & (quiet["size"] == size)]
            cells.append(
                _percent(int(row["alarmed"].iloc[0]), int(row["windows"].iloc[0]))
                if len(row)
                else "–"
            )
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    alarmed = sorted({f for o in outcomes if o.dose == 0 for f in o.features})
    patients = quiet.groupby("size")["patients"].median()
    lines += [
        "",
        "Median effective patients per window: "
        + ", ".join(f"{size:,} rows → {patients[size]:,.0f}" for size in sizes)
        + ". What alarmed: "
        + (", ".join(alarmed) if alarmed else "nothing")
        + ".",
    ]
    if cohort.name != "readmission":  # its published section predates this line
        cells = []
        for size in sizes:
            done = [o for o in outcomes if o.dose == 0 and o.size == size]
            alerts = sum(o.performance_alert for o in done)
            cells.append(
                f"{size:,} rows: {alerts}/{len(done)} ({sum(o.judged for o in done)} judged)"
            )
        lines += [
            "",
            "Labelled-performance alerts on the same unshifted windows (a window is judged "
            f"with at least {monitoring.performance.min_labels:,} labels): "
            + ", ".join(cells)
            + ".",
        ]
    lines += [
        "",
        "**Detection** (share of windows with a drift alert; dose 0 is the consecutive "
        "condition above):",
        "",
        "| shift | rows | " + " | ".join(["dose → detected"]) + " |",
        "|---|---|---|",
    ]
    for (shift, size), rows in detected.groupby(["shift", "size"], sort=False):
        if shift in cohort.unseen:
            continue
        meaningful = cohort.meaningful[shift]
        cells = ", ".join(
            f"{'**' if d == meaningful else ''}{d:g} → {v:.0%}{'**' if d == meaningful else ''}"
            for d, v in zip(rows["dose"], rows["detected"], strict=True)
        )
        lines.append(f"| {shift} | {size:,} | {cells} |")
    for shift, described in words.unseen.items():
        label = detected[(detected["shift"] == shift) & (detected["dose"] > 0)]
        if len(label):
            records = label.to_dict("records")
            lines += [
                "",
                f"{described} raised a drift alert in "
                + ", ".join(f"{r['detected']:.0%} ({r['size']:,} rows)" for r in records)
                + " of windows and a labelled-performance alert in "
                + ", ".join(f"{r['performance alert']:.0%} ({r['size']:,} rows)" for r in records)
                + ".",
            ]
    lines += [
        "",
        f"![detection by shift size](img/{words.plot})",
        end,
    ]
    plot(cohort, detected, ROOT / "docs" / "img" / words.plot)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--usecase", choices=sorted(evaluation.COHORTS), default="readmission")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "monitoring.md")
    parser.add_argument("--json", type=Path, help="also save every window's outcome")
    parser.add_argument("--from", dest="source", type=Path, help="redraw from a saved run")
    args = parser.parse_args()
    cohort = evaluation.COHORTS[args.usecase]
    spec = load_spec(cohort.name)
    if args.source:
        saved = json.loads(args.source.read_text())
        if saved.get("usecase", "readmission") != cohort.name:
            parser.error(f"{args.source} is a run of {saved['usecase']}, not {cohort.name}")
        outcomes = [evaluation.WindowOutcome(**o) for o in saved["outcomes"]]
        minutes, windows = saved["minutes"], saved["windows"]
    else:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            outcomes = evaluation.evaluate(spec, args.windows, Path(tmp), echo=print)
        minutes, windows = (time.perf_counter() - started) / 60, args.windows
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "usecase": cohort.name,
                        "windows": windows,
                        "minutes": minutes,
                        "outcomes": [asdict(o) for o in outcomes],
                    }
                )
            )
    words = WORDS[cohort.name]
    text = section(cohort, outcomes, windows, minutes, drift.min_patients(spec))
    write_section(args.doc, f"<!-- {words.marker} -->", f"<!-- /{words.marker} -->", text)
    print(evaluation.false_alarms(outcomes).to_string())
    print(evaluation.detection(outcomes).to_string())
    print(f"wrote {args.doc} and docs/img/{words.plot}")


if __name__ == "__main__":
    main()
