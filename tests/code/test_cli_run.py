"""`clinml run` when the promotion gate refuses: exit 1 with the reasons and what to do,
nothing packaged (the stages are replaced by plain functions: the refusal is injected)."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from clinml.pipelines import cli, stages
from clinml.training.governance import Check, Decision, PromotionRefused


def test_a_refused_promotion_ends_run_with_exit_1_and_nothing_packaged(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("CLINML_HOME", str(tmp_path))
    calls: list[str] = []

    def record(name: str):
        def stage(*args, **kwargs):
            calls.append(name)
            return "7" if name == "train" else None

        return stage

    def refuse(*args, **kwargs):
        calls.append("promote")
        check = Check("primary_metric", False, "underpowered: 12 rows")
        decision = Decision("tiny", "7", "6", [check], "promote-refused")
        raise PromotionRefused("tiny version 7 was not promoted: underpowered", decision)

    for name in ("ingest", "materialize", "train", "package"):
        monkeypatch.setattr(stages, name, record(name))
    monkeypatch.setattr(stages, "promote", refuse)
    result = CliRunner().invoke(cli.app, ["run", "tests/fixtures/tiny.yaml"])
    assert result.exit_code == 1, result.output
    assert calls == ["ingest", "materialize", "train", "promote"]  # nothing packaged
    assert "refused: tiny version 7 was not promoted: underpowered" in result.output
    assert "version 7 stays the challenger" in result.output
    assert "--force --reason" in result.output


@pytest.mark.parametrize("flag", [True, False])
def test_monitor_hands_the_retrain_on_drift_down_from_the_pipelines(
    monkeypatch: pytest.MonkeyPatch, tmp_path, flag: bool
) -> None:
    """clinml.monitoring.job never imports the wiring (tests/code/test_layering.py): with
    ``--retrain-on-drift`` the command line passes it ``stages.retrain_on_drift``, bound
    to the command line's output; without it, nothing."""
    from clinml.monitoring import job

    monkeypatch.setenv("CLINML_HOME", str(tmp_path))
    handed: dict[str, object] = {}

    def run(spec, settings, **kwargs):
        handed.update(kwargs)
        verdict = SimpleNamespace(html_path="drift.html")
        return SimpleNamespace(lines=list, verdict=verdict, verdict_path="v.json", exit_code=0)

    monkeypatch.setattr(job, "run", run)
    command = ["monitor", "tests/fixtures/tiny.yaml", "--window", "7d"]
    result = CliRunner().invoke(cli.app, command + (["--retrain-on-drift"] if flag else []))
    assert result.exit_code == 0, result.output
    if not flag:
        assert handed["retrain_on_drift"] is None
        return
    retrainer = handed["retrain_on_drift"]
    assert isinstance(retrainer, partial)
    assert retrainer.func is stages.retrain_on_drift
    assert retrainer.keywords == {"echo": typer.echo}  # progress on the command's output


def test_the_retrain_on_drift_says_why_and_retrains_for_drift(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``clinml monitor --retrain-on-drift`` shows before the retrain's steps."""
    retrained: dict[str, object] = {}

    def retrain(spec, settings, progress, **kwargs):
        progress.detail("trained")
        retrained.update(kwargs, total=progress.total)
        return "data"

    monkeypatch.setattr(stages, "retrain", retrain)
    window = {"since": None, "until": None, "lookback": timedelta(days=90), "batch": None}
    lines: list[str] = []
    data = stages.retrain_on_drift(
        "spec", "settings", monitor_run="run-1", echo=lines.append, **window
    )
    assert data == "data"
    assert retrained == {**window, "reason": "drift", "monitor_run": "run-1", "total": 4}
    assert lines[0].startswith("drift found: training a challenger")
    assert "never promoted automatically" in lines[0]
    assert lines[1:] == ["      trained"]
