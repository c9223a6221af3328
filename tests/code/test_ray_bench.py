"""bench/ray_bench.py's projection arithmetic: scheduling, growth and the parts it adds."""

from __future__ import annotations

import pytest

from bench.ray_bench import driver_seconds, exponents, finish_seconds, makespan, project


def run(rows: int, finish: dict[str, float], driver: float, fits: list[float]) -> dict:
    """A run's result as `one` returns it: searches end at 10 s each, one after another,
    each followed by its candidate's refit and evaluation (in-process order)."""
    candidates, clock = {}, 0.0
    for name, seconds in finish.items():
        clock += 10.0
        candidates[name] = {
            "search_s": 10.0,
            "fits": fits,
            "searched_at": clock,
            "finished_at": clock + seconds,
        }
        clock += seconds
    return {"rows": rows, "train_s": clock + driver, "candidates": candidates}


def test_makespan_schedules_longest_first_on_the_free_worker() -> None:
    assert makespan([4, 3, 3, 2], 2) == 6  # 4+2 and 3+3
    assert makespan([5, 1, 1, 1], 8) == 5  # bounded by the longest task
    assert makespan([1.0] * 18, 8) == 3  # three waves
    assert makespan([], 4) == 0


def test_parts_of_a_run_are_recovered_from_its_timestamps() -> None:
    result = run(100, {"svm": 8.0, "gbm": 2.0}, driver=5.0, fits=[1.0])

    assert finish_seconds(result) == {"svm": 8.0, "gbm": 2.0}
    assert driver_seconds(result) == pytest.approx(5.0)


def test_growth_is_fitted_per_part_and_held_within_bounds() -> None:
    base = run(100, {"svm": 8.0, "gbm": 2.0, "mlp": 4.0}, driver=5.0, fits=[1.0])
    scaled = run(400, {"svm": 32.0, "gbm": 32.0, "mlp": 2.0}, driver=5.0, fits=[1.0])

    power = exponents(base, scaled)

    assert power["svm"] == pytest.approx(1.0)  # 4x the rows, 4x the time
    assert power["gbm"] == 2.0  # 16x for 4x: the bound
    assert power["mlp"] == 0.0  # faster on more rows: held at 0
    assert power["driver"] == pytest.approx(0.0)


def test_projection_adds_searches_then_the_parallel_refits_then_the_driver() -> None:
    base = run(100, {"svm": 8.0, "gbm": 2.0}, driver=5.0, fits=[2.0] * 6)
    power = {"svm": 1.0, "gbm": 1.0, "driver": 1.0}

    projected = project(base, power, 1_000, workers=3)

    assert projected["search"] == 2 * 4.0  # two candidates, six 2 s fits on 3 workers each
    assert projected["finish"] == 80.0  # svm's 8 s grown 10x, beside gbm's 20 s
    assert projected["driver"] == 50.0
    assert projected["total"] == 138.0
