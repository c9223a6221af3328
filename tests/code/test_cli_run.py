"""`clinml run` when the promotion gate refuses: exit 1 with the reasons and what to do,
nothing packaged (the stages are replaced by plain functions: the refusal is injected)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipelines import cli, stages
from training.governance import Check, Decision, PromotionRefused


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
