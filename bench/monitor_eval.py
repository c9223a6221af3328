"""The monitor's false-alarm and detection rates on the readmission generator.

Runs monitoring/evaluation.py (the same code tests/model/test_monitor_power.py asserts
on) and writes the results table into docs/monitoring.md.

    .venv/bin/python bench/monitor_eval.py [--windows 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.docsection import write_section  # noqa: E402
from clinml.spec import load_spec  # noqa: E402
from monitoring import evaluation  # noqa: E402

START, END = "<!-- monitor-eval -->", "<!-- /monitor-eval -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "monitoring.md")
    args = parser.parse_args()
    spec = load_spec("readmission")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = evaluation.evaluate(spec, args.windows, Path(tmp), echo=print)
    seconds = time.perf_counter() - started
    table = evaluation.summarise(outcomes)
    floors = spec.monitoring.performance
    lines = [
        START,
        f"Reproduce: `.venv/bin/python bench/monitor_eval.py --windows {args.windows}` "
        f"({seconds / 60:.1f} min here). The same code runs in "
        "`tests/model/test_monitor_power.py`.",
        "",
        f"{args.windows} seeded windows per condition, each of {evaluation.WINDOW_ROWS} "
        "discharges (a week at the four hospitals), against the training encounters of "
        f"80% of a {evaluation.REFERENCE_PATIENTS:,}-patient cohort. Floors: AUROC ≥ "
        f"{floors.min_roc_auc}, sensitivity ≥ {floors.min_sensitivity}, ECE ≤ {floors.max_ece}"
        f", judged from {floors.min_labels} labels.",
        "",
        "| condition | windows | any alert | drift alert | data drift | prediction drift "
        "| data quality | subgroup drift | performance alert | median AUROC | median ECE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['shift']} | {r['windows']} | {r['any alert rate']:.0%} "
            f"| {r['drift alert rate']:.0%} | {r['data_drift']:.0%} "
            f"| {r['prediction_drift']:.0%} | {r['data_quality']:.0%} "
            f"| {r['subgroup_drift']:.0%} | {r['performance alert rate']:.0%} "
            f"| {r['median AUROC']:.3f} | {r['median ECE']:.3f} |"
        )
    lines.append(END)
    write_section(args.doc, START, END, "\n".join(lines))
    print(table.to_string())
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
