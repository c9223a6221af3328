"""The monitor's false-alarm rate and detection curves on the readmission generator.

Runs bench/monitor_evaluation.py (the code tests/model/test_monitor_power.py asserts a small
version of) and writes the tables and the dose-response plot into docs/monitoring.md.

    .venv/bin/python bench/monitor_eval.py [--windows 40] [--json out.json]
    .venv/bin/python bench/monitor_eval.py --from out.json   # redraw without rerunning
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from bench import monitor_evaluation as evaluation  # noqa: E402
from bench.docsection import write_section  # noqa: E402
from clinml.monitoring import drift  # noqa: E402
from clinml.spec import load_spec  # noqa: E402

START, END = "<!-- monitor-eval -->", "<!-- /monitor-eval -->"
PLOT = ROOT / "docs" / "img" / "monitor_dose_response.png"
DOSE_LABEL = {
    "site mix": "site shares moved (total variation = 0.4 × dose)",
    "case mix": "winter surge (winter_case_mix)",
    "sodium offset": "sodium read high (reference SDs)",
    "lab units": "share of creatinine in µmol/L",
    "label rate": "odds of readmission × (1 + dose)",
}


def _percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "–"


def plot(detected: pd.DataFrame, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = [s for s in evaluation.SHIFTS if s not in evaluation.UNSEEN]
    fig, axes = plt.subplots(1, len(shifts), figsize=(4 * len(shifts), 3.4), sharey=True)
    for ax, shift in zip(axes, shifts, strict=True):
        rows = detected[detected["shift"] == shift]
        for size, by_size in rows.groupby("size"):
            ax.plot(by_size["dose"], by_size["detected"], marker="o", label=f"{size:,} rows")
        ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
        ax.axvline(evaluation.MEANINGFUL[shift], color="firebrick", linestyle="--", linewidth=1)
        ax.set_title(shift)
        ax.set_xlabel(DOSE_LABEL[shift], fontsize=8)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("windows with a drift alert")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Detection by shift size (dashed: the smallest clinically meaningful size; dotted: 95%)",
        fontsize=9,
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)


def section(
    outcomes: list[evaluation.WindowOutcome], windows: int, minutes: float, needed: int
) -> str:
    quiet = evaluation.false_alarms(outcomes)
    detected = evaluation.detection(outcomes)
    spec = load_spec("readmission")
    monitoring = spec.monitoring
    sizes = sorted(quiet["size"].unique())
    lines = [
        START,
        f"Reproduce: `.venv/bin/python bench/monitor_eval.py --windows {windows}` "
        f"({minutes:.0f} min here). A small version runs in "
        "`tests/model/test_monitor_power.py`.",
        "",
        f"Spec as shipped: floors {monitoring.numeric_floor} SD (numbers) and "
        f"{monitoring.categorical_floor} total variation (categories), family α "
        f"{monitoring.family_alpha}; a window needs {needed:,} patients for a quiet verdict "
        "to count. The stand-in champion is trained on year one of a system with about "
        "100 000 discharges a year; every window is consecutive discharges from year two of "
        "another seed (500 rows ≈ 2 days, 2 000 ≈ a week, 10 000 ≈ 5 weeks, 50 000 ≈ half a "
        "year, with the repeat patients that brings).",
        "",
        "**False alarms** (windows with any drift, prediction-drift, data-quality or "
        "subgroup alert; no shift injected):",
        "",
        "| window | " + " | ".join(f"{size:,} rows" for size in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for condition in evaluation.QUIET:
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
        "",
        "**Detection** (share of windows with a drift alert; dose 0 is the consecutive "
        "condition above):",
        "",
        "| shift | rows | " + " | ".join(["dose → detected"]) + " |",
        "|---|---|---|",
    ]
    for (shift, size), rows in detected.groupby(["shift", "size"], sort=False):
        if shift in evaluation.UNSEEN:
            continue
        cells = ", ".join(
            f"{'**' if d == evaluation.MEANINGFUL[shift] else ''}{d:g} → {v:.0%}"
            f"{'**' if d == evaluation.MEANINGFUL[shift] else ''}"
            for d, v in zip(rows["dose"], rows["detected"], strict=True)
        )
        lines.append(f"| {shift} | {size:,} | {cells} |")
    label = detected[detected["shift"].isin(evaluation.UNSEEN) & (detected["dose"] > 0)]
    if len(label):
        lines += [
            "",
            "A label-rate shift (odds of readmission doubled at the same features) raised a "
            "drift alert in "
            + ", ".join(
                f"{r['detected']:.0%} ({r['size']:,} rows)" for r in label.to_dict("records")
            )
            + " of windows and a labelled-performance alert in "
            + ", ".join(
                f"{r['performance alert']:.0%} ({r['size']:,} rows)"
                for r in label.to_dict("records")
            )
            + ".",
        ]
    lines += [
        "",
        f"![detection by shift size](img/{PLOT.name})",
        END,
    ]
    plot(detected, PLOT)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "monitoring.md")
    parser.add_argument("--json", type=Path, help="also save every window's outcome")
    parser.add_argument("--from", dest="source", type=Path, help="redraw from a saved run")
    args = parser.parse_args()
    spec = load_spec("readmission")
    if args.source:
        saved = json.loads(args.source.read_text())
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
                        "windows": windows,
                        "minutes": minutes,
                        "outcomes": [asdict(o) for o in outcomes],
                    }
                )
            )
    needed = drift.min_patients(spec)
    write_section(args.doc, START, END, section(outcomes, windows, minutes, needed))
    print(evaluation.false_alarms(outcomes).to_string())
    print(evaluation.detection(outcomes).to_string())
    print(f"wrote {args.doc} and {PLOT}")


if __name__ == "__main__":
    main()
