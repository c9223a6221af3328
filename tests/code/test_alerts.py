"""Alert delivery: the alert file and history, the webhook against a real local HTTP
server (retries, timeouts, refusals), the cooldown, a corrupt state file, and the checks
that keep anything but feature names and statistics out of an alert."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clinml.monitoring.alerts import Alert, AlertSink
from clinml.settings import Settings

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HANG = "hang"  # a scripted answer: read the request, never answer


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class Webhook:
    """A local HTTP server that records each request and answers from a script."""

    url: str
    answers: list[int | str] = field(default_factory=list)  # then 200 once exhausted
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [request["body"] for request in self.requests]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    lock = threading.Lock()
    hook: Webhook

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                hook.requests.append(
                    {
                        "path": self.path,
                        "content_type": self.headers["Content-Type"],
                        "body": json.loads(body),
                    }
                )
                answer = hook.answers.pop(0) if hook.answers else 200
            if answer == HANG:
                hook.release.wait(timeout=10)  # the client times out long before
                return
            self.send_response(int(answer))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host, port = server.server_address[:2]
    # A fake token in the query: it must never appear in a failure or a log line.
    hook = Webhook(url=f"http://{host}:{port}/hook?token=SECRET")
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        hook.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _alert(key: str = "data_drift:creatinine,site", **overrides: Any) -> Alert:
    fields: dict[str, Any] = {
        "usecase": "pathology",
        "kind": "data_drift",
        "severity": "high",
        "summary": "DRIFT: 2 of 22 features drifted (creatinine, site)",
        "key": key,
        "model_version": "4",
        "window_start": "2026-05-25T00:00:00+00:00",
        "window_end": "2026-06-01T00:00:00+00:00",
        "details": {
            "drifted_share": 0.09,
            "drifted_features": ["creatinine", "site"],
            "scores": {"creatinine": 0.001, "site": 0.02},
            "current_rows": 512,
        },
    }
    return Alert(**(fields | overrides))


def _sink(tmp_path: Path, **options: Any) -> AlertSink:
    options.setdefault("clock", Clock())
    options.setdefault("backoff_s", 0.01)
    return AlertSink(tmp_path / "monitoring", **options)


def _module_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "clinml.monitoring.alerts")


# -- the alert and its payload -------------------------------------------------------


def test_payload_holds_exactly_the_phi_free_fields() -> None:
    alert = _alert(details={"n": np.int64(3), "share": np.float64(0.5), "pair": ("a", 1)})

    payload = alert.payload()

    assert list(payload) == [
        "usecase",
        "kind",
        "severity",
        "summary",
        "key",
        "model_version",
        "window_start",
        "window_end",
        "details",
    ]
    # numpy numbers and tuples become plain JSON, so the payload always serialises.
    assert payload["details"] == {"n": 3, "share": 0.5, "pair": ["a", 1]}
    assert type(payload["details"]["n"]) is int
    json.dumps(payload, allow_nan=False)


@pytest.mark.parametrize(
    "details",
    [
        {"rows": object()},
        {"features": {"creatinine", "site"}},
        {"frame": [b"raw bytes"]},
        {"note": "x" * 201},
        {"nested": {"deep": ["ok", "y" * 500]}},
        {"share": float("nan")},
        {"by_id": {7: 0.5}},
        {"k" * 201: 1},
    ],
    ids=["object", "set", "bytes", "long", "nested-long", "nan", "int-key", "long-key"],
)
def test_details_that_are_not_short_json_values_are_rejected(details: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="details"):
        _alert(details=details)


def test_a_string_of_exactly_the_limit_is_accepted() -> None:
    assert _alert(details={"feature": "f" * 200}).payload()["details"]["feature"] == "f" * 200


@pytest.mark.parametrize(
    "overrides",
    [{"kind": "drift"}, {"severity": "critical"}, {"key": ""}, {"summary": "two\nlines"}],
)
def test_unknown_kind_severity_and_empty_or_multiline_fields_are_rejected(
    overrides: dict[str, Any],
) -> None:
    with pytest.raises(ValueError):
        _alert(**overrides)


# -- files ---------------------------------------------------------------------------


def test_deliver_writes_the_alert_file_and_appends_the_history(tmp_path: Path) -> None:
    clock = Clock()
    sink = _sink(tmp_path, clock=clock)
    first, second = _alert("data_drift:creatinine"), _alert("performance:roc_auc")

    delivery = sink.deliver([first, second], run_id="run1")

    assert delivery.sent == [first, second] and delivery.suppressed == []
    assert delivery.webhook_failures == []
    assert delivery.alert_file == tmp_path / "monitoring" / "alerts" / "run1.json"
    document = json.loads(delivery.alert_file.read_text())
    assert document == {
        "run_id": "run1",
        "created_at": "2026-06-01T12:00:00+00:00",
        "alerts": [first.payload(), second.payload()],
    }
    clock.advance(hours=1)
    third = _alert("data_quality:missing")
    sink.deliver([third], run_id="run2")

    lines = [json.loads(line) for line in sink.history_file.read_text().splitlines()]
    assert [line["key"] for line in lines] == [first.key, second.key, third.key]
    assert [line["run_id"] for line in lines] == ["run1", "run1", "run2"]
    assert lines[0] == {
        "run_id": "run1",
        "created_at": "2026-06-01T12:00:00+00:00",
        "webhook": "not configured",
        **first.payload(),
    }
    # Atomic writes leave no temporary files behind.
    leftovers = [p.name for p in (tmp_path / "monitoring").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_nothing_to_send_writes_no_file_and_posts_nothing(tmp_path: Path, webhook: Webhook) -> None:
    delivery = _sink(tmp_path, webhook_url=webhook.url).deliver([], run_id="empty")

    assert delivery.alert_file is None and delivery.sent == []
    assert not (tmp_path / "monitoring" / "alerts" / "empty.json").exists()
    assert webhook.requests == []


@pytest.mark.parametrize("run_id", ["../escape", "a/b", ".hidden", ""])
def test_a_run_id_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        _sink(tmp_path).deliver([_alert()], run_id=run_id)


# -- webhook -------------------------------------------------------------------------


def test_webhook_receives_the_same_document_as_the_alert_file(
    tmp_path: Path, webhook: Webhook
) -> None:
    delivery = _sink(tmp_path, webhook_url=webhook.url).deliver([_alert()], run_id="run1")

    assert delivery.webhook_failures == []
    assert len(webhook.requests) == 1
    request = webhook.requests[0]
    assert request["path"] == "/hook?token=SECRET"
    assert request["content_type"] == "application/json"
    assert request["body"] == json.loads(delivery.alert_file.read_text())
    assert request["body"] == {
        "run_id": "run1",
        "created_at": "2026-06-01T12:00:00+00:00",
        "alerts": [_alert().payload()],
    }
    history = json.loads(AlertSink(tmp_path / "monitoring").history_file.read_text())
    assert history["webhook"] == "sent"


@pytest.mark.parametrize("answers", [[500, 500, 200], [503, 200], [429, 429, 200]])
def test_webhook_retries_server_errors_and_429_then_succeeds(
    tmp_path: Path, webhook: Webhook, answers: list[int]
) -> None:
    webhook.answers = list(answers)

    delivery = _sink(tmp_path, webhook_url=webhook.url, retries=3).deliver(
        [_alert()], run_id="run1"
    )

    assert delivery.webhook_failures == []
    assert len(webhook.requests) == len(answers)
    assert all(body == webhook.bodies[0] for body in webhook.bodies)


def test_webhook_gives_up_after_its_retries_without_raising_or_leaking_the_url(
    tmp_path: Path, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clinml.monitoring.alerts")
    webhook.answers = [500] * 10

    delivery = _sink(tmp_path, webhook_url=webhook.url, retries=2).deliver(
        [_alert()], run_id="run1"
    )

    assert len(webhook.requests) == 3  # retries + 1 tries
    assert len(delivery.webhook_failures) == 1
    reason = delivery.webhook_failures[0]
    assert "500" in reason and "3 tries" in reason
    for text in (reason, _module_log(caplog), repr(_sink(tmp_path, webhook_url=webhook.url))):
        assert "SECRET" not in text and "127.0.0.1" not in text
    assert "webhook failed after 3 tries" in _module_log(caplog)
    # The alerts are still delivered to the file.
    assert delivery.sent == [_alert()]
    assert json.loads(delivery.alert_file.read_text())["alerts"] == [_alert().payload()]
    history = json.loads(AlertSink(tmp_path / "monitoring").history_file.read_text())
    assert history["webhook"] == "failed"


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_webhook_client_errors_are_not_retried(
    tmp_path: Path, webhook: Webhook, status: int
) -> None:
    webhook.answers = [status, 200]

    delivery = _sink(tmp_path, webhook_url=webhook.url, retries=3).deliver(
        [_alert()], run_id="run1"
    )

    assert len(webhook.requests) == 1
    assert len(delivery.webhook_failures) == 1 and str(status) in delivery.webhook_failures[0]
    assert "SECRET" not in delivery.webhook_failures[0]


def test_webhook_timeout_is_retried_and_reported(tmp_path: Path, webhook: Webhook) -> None:
    webhook.answers = [HANG, HANG]

    delivery = _sink(tmp_path, webhook_url=webhook.url, timeout_s=0.2, retries=1).deliver(
        [_alert()], run_id="run1"
    )

    assert len(webhook.requests) == 2
    assert len(delivery.webhook_failures) == 1
    reason = delivery.webhook_failures[0]
    assert "Timeout" in reason and "2 tries" in reason and "SECRET" not in reason


def test_webhook_timeout_then_success_counts_as_delivered(tmp_path: Path, webhook: Webhook) -> None:
    webhook.answers = [HANG, 200]

    delivery = _sink(tmp_path, webhook_url=webhook.url, timeout_s=0.2, retries=1).deliver(
        [_alert()], run_id="run1"
    )

    assert delivery.webhook_failures == [] and len(webhook.requests) == 2


def test_unreachable_webhook_is_retried_and_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook?token=SECRET"

    delivery = _sink(tmp_path, webhook_url=url, retries=2).deliver([_alert()], run_id="run1")

    assert len(delivery.webhook_failures) == 1
    reason = delivery.webhook_failures[0]
    assert "ConnectError" in reason and "3 tries" in reason
    assert "SECRET" not in reason and str(port) not in reason


# -- cooldown ------------------------------------------------------------------------


def test_same_key_is_suppressed_within_the_cooldown_and_sent_again_after(
    tmp_path: Path, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clinml.monitoring.alerts")
    clock = Clock()
    sink = _sink(tmp_path, webhook_url=webhook.url, cooldown_h=24, clock=clock)
    assert sink.deliver([_alert()], run_id="run1").sent == [_alert()]

    clock.advance(hours=23, minutes=59)
    again = sink.deliver([_alert()], run_id="run2")
    assert again.sent == [] and again.suppressed == [_alert()]
    assert again.alert_file is None and not (sink.alerts_dir / "run2.json").exists()
    assert len(webhook.requests) == 1
    assert "suppressed by cooldown: data_drift:creatinine,site" in _module_log(caplog)

    clock.advance(minutes=1)
    after = sink.deliver([_alert()], run_id="run3")
    assert after.sent == [_alert()] and after.suppressed == []
    assert len(webhook.requests) == 2
    state = json.loads(sink.state_file.read_text())
    assert state == {"data_drift:creatinine,site": clock.now.isoformat()}


def test_a_different_key_is_not_suppressed(tmp_path: Path) -> None:
    clock = Clock()
    sink = _sink(tmp_path, clock=clock)
    sink.deliver([_alert("data_drift:creatinine")], run_id="run1")
    clock.advance(hours=1)

    delivery = sink.deliver(
        [_alert("data_drift:creatinine"), _alert("data_drift:creatinine,site")], run_id="run2"
    )

    assert [a.key for a in delivery.sent] == ["data_drift:creatinine,site"]
    assert [a.key for a in delivery.suppressed] == ["data_drift:creatinine"]
    document = json.loads(delivery.alert_file.read_text())
    assert [a["key"] for a in document["alerts"]] == ["data_drift:creatinine,site"]


def test_the_same_key_twice_in_one_run_is_sent_once(tmp_path: Path) -> None:
    first = _alert(severity="high")
    duplicate = _alert(severity="medium")

    delivery = _sink(tmp_path).deliver([first, duplicate], run_id="run1")

    assert delivery.sent == [first] and delivery.suppressed == [duplicate]


def test_cooldown_zero_never_suppresses(tmp_path: Path) -> None:
    sink = _sink(tmp_path, cooldown_h=0)
    for run in range(3):
        delivery = sink.deliver([_alert(), _alert()], run_id=f"run{run}")
        assert len(delivery.sent) == 2 and delivery.suppressed == []


def test_keys_of_a_failed_webhook_delivery_are_tried_again_next_run(
    tmp_path: Path, webhook: Webhook
) -> None:
    clock = Clock()
    sink = _sink(tmp_path, webhook_url=webhook.url, retries=1, clock=clock)
    webhook.answers = [500, 500]
    assert sink.deliver([_alert()], run_id="run1").webhook_failures
    assert not sink.state_file.exists()

    clock.advance(minutes=5)
    retry = sink.deliver([_alert()], run_id="run2")  # the server answers 200 now

    assert retry.sent == [_alert()] and retry.webhook_failures == []
    assert len(webhook.requests) == 3
    clock.advance(minutes=5)
    assert sink.deliver([_alert()], run_id="run3").suppressed == [_alert()]
    assert len(webhook.requests) == 3


def test_concurrent_runs_send_one_alert_once(tmp_path: Path) -> None:
    sinks = [_sink(tmp_path), _sink(tmp_path)]
    barrier = threading.Barrier(2)
    deliveries = []

    def run(index: int) -> None:
        barrier.wait()
        deliveries.append(sinks[index].deliver([_alert()], run_id=f"run{index}"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert sorted(len(d.sent) for d in deliveries) == [0, 1]
    assert sorted(len(d.suppressed) for d in deliveries) == [0, 1]
    assert list(json.loads(sinks[0].state_file.read_text())) == [_alert().key]
    assert len(sinks[0].history_file.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"data_drift:creatinine,site": 5}'],
    ids=["truncated", "binary", "not-an-object", "bad-time"],
)
def test_a_corrupt_state_file_is_tolerated(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    sink = _sink(tmp_path)
    sink.state_dir.mkdir(parents=True)
    sink.state_file.write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="clinml.monitoring.alerts"):
        delivery = sink.deliver([_alert()], run_id="run1")

    assert delivery.sent == [_alert()]
    assert "alert state" in _module_log(caplog)
    # The state is rewritten whole and valid.
    assert json.loads(sink.state_file.read_text()) == {_alert().key: T0.isoformat()}


def test_state_entries_are_kept_across_runs(tmp_path: Path) -> None:
    clock = Clock()
    sink = _sink(tmp_path, clock=clock)
    sink.deliver([_alert("a")], run_id="run1")
    clock.advance(hours=1)
    sink.deliver([_alert("b")], run_id="run2")

    state = json.loads(sink.state_file.read_text())
    assert state == {"a": T0.isoformat(), "b": (T0 + timedelta(hours=1)).isoformat()}


# -- settings ------------------------------------------------------------------------


def test_from_settings_uses_the_use_case_monitoring_directory(
    tmp_path: Path, webhook: Webhook
) -> None:
    settings = Settings(
        home=tmp_path,
        alert_webhook_url=webhook.url,
        alert_timeout_s=1.5,
        alert_retries=1,
        alert_cooldown_h=6,
    )

    sink = AlertSink.from_settings(settings, "pathology")

    monitoring = settings.paths.usecase("pathology").monitoring
    assert sink.state_dir == monitoring == tmp_path / "pathology" / "monitoring"
    assert sink.has_webhook and sink.timeout_s == 1.5 and sink.retries == 1
    assert sink.cooldown == timedelta(hours=6)
    assert "SECRET" not in repr(sink)
    delivery = sink.deliver([_alert()], run_id="run1")
    assert delivery.alert_file == monitoring / "alerts" / "run1.json"
    assert (monitoring / "alerts.jsonl").exists() and (monitoring / "alert_state.json").exists()
    assert len(webhook.requests) == 1


def test_from_settings_without_a_webhook_writes_files_only(tmp_path: Path) -> None:
    sink = AlertSink.from_settings(Settings(home=tmp_path), "pathology")

    assert not sink.has_webhook
    assert sink.deliver([_alert()], run_id="run1").webhook_failures == []
    assert (tmp_path / "pathology" / "monitoring" / "alerts" / "run1.json").exists()


# -- what the monitor prints about a delivery ------------------------------------------


def test_the_delivery_line_says_where_alerts_went_not_just_sent(
    tmp_path: Path, webhook: Webhook
) -> None:
    """Was "alerts: 2 sent" with no webhook configured and "3 sent" when it failed."""
    files_only = _sink(tmp_path / "a").deliver([_alert()], run_id="run1")
    line = files_only.line()
    assert line.startswith("alerts: 1 written to ") and "(no webhook configured)" in line
    assert "sent" not in line

    webhook.answers = [500] * 10
    failed = _sink(tmp_path / "b", webhook_url=webhook.url, retries=0).deliver(
        [_alert()], run_id="run1"
    )
    assert "webhook FAILED (" in failed.line() and "retried next run" in failed.line()
    assert "SECRET" not in failed.line()

    webhook.answers = []
    posted = _sink(tmp_path / "c", webhook_url=webhook.url).deliver([_alert()], run_id="run1")
    assert posted.line().endswith("and posted to the webhook")
    again = _sink(tmp_path / "c", webhook_url=webhook.url).deliver([_alert()], run_id="run2")
    assert again.line() == "alerts: none new, 1 suppressed by cooldown"


def test_a_subgroup_drift_alert_key_names_the_features_that_drifted() -> None:
    """A later shift in other features of the same groups must not be muted by the
    cooldown of the first one (the key used to name the groups only)."""
    from clinml.monitoring import drift
    from clinml.monitoring.job import _drift_alerts

    def verdict(features: list[str]) -> drift.DriftVerdict:
        drifted = [
            drift.FeatureDrift(name, "ks", 1e-9, "p_value", 0.05, True, "high") for name in features
        ]
        groups = [drift.SubgroupDrift("sex", value, 300, 300, drifted) for value in ("F", "M")]
        return drift.DriftVerdict("tiny", False, 0.0, 0.5, 600, 600, subgroups=groups)

    base = {
        "usecase": "tiny",
        "model_version": "1",
        "window_start": "2026-05-25T00:00:00+00:00",
        "window_end": "2026-06-01T00:00:00+00:00",
    }
    [first] = _drift_alerts(verdict(["creatinine"]), base)
    [later] = _drift_alerts(verdict(["creatinine", "heart_rate"]), base)
    assert first.key == "subgroup_drift:sex=F[creatinine],sex=M[creatinine]"
    assert later.key != first.key and "heart_rate" in later.key
