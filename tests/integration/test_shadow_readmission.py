"""Shadow to promotion on live evidence, on readmission, through the command line (issue 24).

A data directory of its own: ``clinml run`` on a reduced copy of the shipped readmission
spec makes the champion; ``clinml train`` on another configuration of the same use case
(a smaller gradient-boosting model, selected without the parsimony margin) registers a
challenger that is a different model. A real ``clinml serve`` process answers; the
challenger is shadowed (``clinml shadow start``, taken up by ``POST /admin/reload``); one
request per discharge is answered; the discharges' outcomes are ingested by request id
(``clinml labels ingest``); ``clinml shadow report`` pairs the two versions' answers and
compares them on the labelled requests; ``clinml promote --evidence shadow`` adds that
comparison to the gate, and the audit record names it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from clinml.settings import Settings
from clinml.spec import UseCaseSpec, load_spec
from tests.integration.served import clinml as served_cli
from tests.integration.served import clinml_serve, reduced_spec
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

KEY = "shadow-readmission-test-key"
N_PATIENTS = 3_000
REQUESTS = 1_200


def clinml(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return served_cli(home, *args, env={"CLINML_PSEUDONYM_KEY": KEY})


@dataclass(frozen=True)
class Served:
    home: Path
    spec_file: Path
    spec: UseCaseSpec
    url: str
    headers: dict[str, str]
    champion: str
    challenger: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from clinml.training.tracking import Tracker
    from tests.integration.served import api_keys, registry_aliases

    home = tmp_path_factory.mktemp("shadow-readmission-home")
    raw, spec_file = reduced_spec(home, "readmission", N_PATIENTS)
    training = raw["training"]
    ran = clinml(home, "run", str(spec_file))
    assert ran.returncode == 0, ran.stdout + ran.stderr

    # The challenger: a smaller boosted model of the same use case, selected as is.
    gbm = training["candidates"]["gbm"]
    gbm["params"] = {**gbm.get("params", {}), "max_iter": 30, "max_leaf_nodes": 5}
    training["search"]["n_iter"] = 1
    training["selection_margin"] = None
    spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    trained = clinml(home, "train", str(spec_file))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    settings = Settings(home=home, pseudonym_key=KEY)
    aliases = registry_aliases(Tracker.from_settings(settings), "readmission")
    assert aliases["challenger"] != aliases["champion"]

    key = api_keys(home)["dev"]
    with clinml_serve(home, spec_file, {"CLINML_PSEUDONYM_KEY": KEY}) as url:
        yield Served(
            home,
            spec_file,
            load_spec(spec_file),
            url,
            {"Authorization": f"Bearer {key}"},
            aliases["champion"],
            aliases["challenger"],
        )


def _metric(client: httpx.Client, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_shadow_then_promotion_on_live_evidence(served: Served) -> None:
    from clinml.audit import AuditLog
    from clinml.features.datasets.readmission import generate
    from clinml.predictionlog import read_predictions

    spec, home = served.spec, served.home
    started = clinml(home, "shadow", "start", str(served.spec_file), "--reason", "trial")
    assert started.returncode == 0, started.stdout + started.stderr
    since = datetime.now(UTC) - timedelta(seconds=1)

    discharges = generate(n_patients=N_PATIENTS, seed=31)
    discharges = discharges[discharges[spec.label.column].notna()].head(REQUESTS)
    records = json.loads(discharges[spec.feature_names].to_json(orient="records"))
    request_ids = []
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=120) as client:
        reloaded = client.post("/admin/reload")
        assert reloaded.status_code == 200, reloaded.text
        for record in records:
            answer = client.post("/predict", json={"records": [record]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"]["version"] == served.champion  # the shadow never answers
            request_ids.append(body["request_id"])
        wait_for(
            lambda: (
                _metric(client, "clinml_shadow_scored_total")
                + _metric(client, "clinml_shadow_dropped_total")
                >= REQUESTS
            ),
            "the shadow to take every request",
            300,
        )
        scored = _metric(client, "clinml_shadow_scored_total")
    assert scored > REQUESTS / 2  # one client at a time leaves the shadow idle time

    log_dir = Settings(home=home).paths.usecase(spec.name).predictions

    def shadow_rows() -> int:
        logged = read_predictions(log_dir, since, shadow=True)
        return int(logged["shadow"].sum()) if "shadow" in logged.columns else 0

    wait_for(lambda: shadow_rows() == scored, "the shadow's rows in the prediction log", 300)

    outcomes = pd.DataFrame(
        {
            "request_id": request_ids,
            "outcome": discharges[spec.label.column].to_numpy(),
            "time": datetime.now(UTC).isoformat(),
        }
    )
    outcomes.to_csv(home / "outcomes.csv", index=False)
    ingested = clinml(home, "labels", "ingest", str(served.spec_file), str(home / "outcomes.csv"))
    assert ingested.returncode == 0, ingested.stderr

    reported = clinml(home, "shadow", "report", str(served.spec_file), "--window", "1h")
    assert reported.returncode == 0, reported.stdout + reported.stderr
    data = Path(reported.stdout.strip().splitlines()[-1].removeprefix("data: "))
    document: dict[str, Any] = json.loads(data.read_text())
    assert (document["champion_version"], document["shadow_version"]) == (
        served.champion,
        served.challenger,
    )
    assert document["paired"] == scored == document["labelled"]
    assert document["champion_rows"] == REQUESTS
    assert document["agreement"] < 1.0 and document["rank_correlation"] < 1.0  # two models
    comparison = document["comparison"]
    assert comparison is not None and comparison["labelled"] == scored
    low, high = comparison["difference_ci"]
    assert low <= comparison["difference"] <= high
    assert f"labelled comparison on {int(scored):,} requests" in reported.stdout

    promoted = clinml(
        home, "promote", str(served.spec_file), "--evidence", "shadow", "--evidence-window", "1h"
    )
    assert promoted.returncode in (0, 1), promoted.stdout + promoted.stderr
    assert "live_shadow: " in promoted.stdout
    # the gate's record: the last promote or promote-refused (a pass is followed by the
    # shadow's end, recorded as shadow-stop)
    decision = next(
        r
        for r in reversed(AuditLog(Settings(home=home).audit_log_path).records())
        if r.get("action", "").startswith("promote")
    )
    assert decision["to_version"] == served.challenger
    gate = {check["check"]: check["passed"] for check in decision["gate"]}
    assert gate["live_shadow"] == (comparison["verdict"] == "non-inferior")
    [retrospective, live] = decision["evidence"]
    assert retrospective == {"kind": "retrospective"}
    assert live["kind"] == "shadow" and live["verdict"] == comparison["verdict"]
    assert live["labelled"] == scored
