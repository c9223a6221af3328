"""Deliver monitoring alerts: reliably, without PHI, and without repeating them.

``clinml monitor`` turns its verdicts (data drift, prediction drift, data quality,
performance below its floor) into :class:`Alert` objects and hands them to an
:class:`AlertSink`. One ``deliver`` call per monitor run

- suppresses an alert whose ``key`` was delivered less than ``cooldown_h`` hours ago
  (``alert_state.json`` maps key -> last delivery time; ``cooldown_h=0`` turns this off);
- writes the others to ``alerts/<run_id>.json`` (atomically) and appends one line per
  alert to ``alerts.jsonl``, the alert history;
- POSTs the same document to the webhook when one is configured, retrying connection
  errors, timeouts, 5xx and 429 answers with exponential backoff. A webhook that still
  fails is reported in :attr:`Delivery.webhook_failures`, never raised, and its alerts'
  keys are not recorded, so the next run tries them again.

Everything lives under the use case's monitoring directory
(``Settings().paths.usecase(name).monitoring``). A ``deliver`` call holds an exclusive
``flock`` on ``alert_state.lock`` from the cooldown check to the state update, webhook
included, so two monitor runs at once neither corrupt the state nor both send one alert.

PHI: an alert leaves the hospital's network. ``summary`` and ``details`` must carry only
feature names and statistics (counts, shares, scores, thresholds), never a record's
values, a patient or encounter identifier, or a free-text field. ``details`` is checked
for shape (JSON numbers, booleans, null, strings of at most 200 characters, and lists and
dicts of those), which stops a data frame or a long text from slipping in, but the check
cannot tell a feature name from an identifier: that is the caller's duty.

Usage::

    sink = AlertSink.from_settings(settings, "pathology")
    delivery = sink.deliver(alerts, run_id="20260601T120000Z")
    for reason in delivery.webhook_failures:
        ...  # the alerts are in the alert file; the webhook will be retried next run
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from clinml.atomic import write_atomic
from clinml.clock import utc_now

if TYPE_CHECKING:
    from clinml.settings import Settings

logger = logging.getLogger(__name__)

KINDS = ("data_drift", "prediction_drift", "data_quality", "subgroup_drift", "performance")
SEVERITIES = ("low", "medium", "high")
# Long enough for any feature name or statistic label, too short for a clinical note.
MAX_DETAIL_STRING = 200
# A run id becomes a file name: no separators, no leading dot.
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,199}")

ALERTS_DIR = "alerts"
HISTORY_FILE = "alerts.jsonl"
STATE_FILE = "alert_state.json"
LOCK_FILE = "alert_state.lock"


@dataclass(frozen=True)
class Alert:
    """One finding of a monitor run, in the PHI-free form it is delivered in.

    Args:
        usecase: the use case the model serves.
        kind: one of ``KINDS``.
        severity: one of ``SEVERITIES``.
        summary: one human line, e.g. ``"DRIFT: 3 of 22 features drifted (creatinine, ...)"``.
        key: the deduplication key; alerts with the same key are the same alert, e.g.
            ``"data_drift:creatinine,site"``.
        model_version: the registered model version monitored, when known.
        window_start, window_end: the monitored time window, ISO-8601.
        details: feature names and statistics only (see the module docstring).

    Raises:
        ValueError: an unknown kind or severity, an empty key or summary, a summary of
            more than one line, or a ``details`` value that is not JSON-shaped or holds a
            string longer than ``MAX_DETAIL_STRING``.
    """

    usecase: str
    kind: str
    severity: str
    summary: str
    key: str
    model_version: str | None = None
    window_start: str | None = None
    window_end: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"alert kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(
                f"alert severity {self.severity!r} is not one of {', '.join(SEVERITIES)}"
            )
        for name in ("usecase", "summary", "key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"alert {name} must be a non-empty string")
        if "\n" in self.summary or "\r" in self.summary:
            raise ValueError("alert summary must be one line")
        for name in ("model_version", "window_start", "window_end"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"alert {name} must be a string or None")
        if not isinstance(self.details, dict):
            raise ValueError(f"alert details must be a dict, not {type(self.details).__name__}")
        _json_value(self.details, "details")  # raises on anything that is not allowed

    def payload(self) -> dict[str, Any]:
        """The PHI-free JSON body of this alert: these nine keys and nothing else."""
        return {
            "usecase": self.usecase,
            "kind": self.kind,
            "severity": self.severity,
            "summary": self.summary,
            "key": self.key,
            "model_version": self.model_version,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "details": _json_value(self.details, "details"),
        }


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON (numpy numbers become int/float, tuples lists).

    Raises:
        ValueError: ``value`` holds something other than None, a bool, a finite number,
            a string of at most ``MAX_DETAIL_STRING`` characters, or lists and dicts (with
            string keys) of those. The message names where, never the value itself.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > MAX_DETAIL_STRING:
            raise ValueError(
                f"alert {where} is a string of {len(value)} characters (at most "
                f"{MAX_DETAIL_STRING}): details carry feature names and statistics only"
            )
        return value
    if isinstance(value, numbers.Integral):  # int and numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float and numpy floats
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"alert {where} is {number}, which is not a JSON number")
        return number
    if isinstance(value, list | tuple):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"alert {where} has a key of type {type(key).__name__}")
            _json_value(key, f"{where} key")  # the same length limit as values
            result[key] = _json_value(item, f"{where}[{key!r}]")
        return result
    raise ValueError(
        f"alert {where} is a {type(value).__name__}, not a JSON value: details carry "
        "feature names and statistics only"
    )


@dataclass(frozen=True)
class Delivery:
    """What one ``deliver`` call did.

    Attributes:
        sent: alerts delivered this run: written to the alert file and the history, and
            posted to the webhook when one is configured (see ``webhook_failures``).
        suppressed: alerts whose key was delivered within the cooldown; not re-sent.
        webhook_failures: why the webhook failed, one line each (status code or error
            type, never the URL: it may carry a token). Empty when it succeeded or none
            is configured.
        alert_file: the run's alert file, or None when nothing was sent.
        webhook_configured: whether a webhook was configured (posted to, when anything
            was sent).
    """

    sent: list[Alert]
    suppressed: list[Alert]
    webhook_failures: list[str]
    alert_file: Path | None
    webhook_configured: bool = False

    def line(self) -> str:
        """What happened, in words: written where, posted or not, suppressed."""
        suppressed = f", {len(self.suppressed)} suppressed by cooldown" if self.suppressed else ""
        if not self.sent:
            return f"alerts: none new{suppressed}"
        written = f"alerts: {len(self.sent)} written to {self.alert_file}"
        if not self.webhook_configured:
            return f"{written} (no webhook configured){suppressed}"
        if self.webhook_failures:
            failed = "; ".join(self.webhook_failures)
            return f"{written}; webhook FAILED ({failed}): they are retried next run{suppressed}"
        return f"{written} and posted to the webhook{suppressed}"


class AlertSink:
    """Delivers alerts to files under ``state_dir`` and, optionally, to a webhook.

    Args:
        state_dir: the use case's monitoring directory; created on first delivery.
        webhook_url: POST alerts here; None delivers to files only.
        timeout_s: timeout of each webhook try (connect, read, write and pool each).
        retries: retries after a failed try, so at most ``retries + 1`` tries.
        cooldown_h: an alert whose key was delivered less than this many hours ago is
            suppressed; 0 turns suppression off.
        clock: returns the current time as an aware datetime; injected for tests.
        backoff_s: wait before the first retry; doubled before each further one.
        transport: an httpx transport to send through (tests, proxies); None for the
            default network transport.
    """

    def __init__(
        self,
        state_dir: Path,
        webhook_url: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        cooldown_h: float = 24.0,
        clock: Callable[[], datetime] = utc_now,
        backoff_s: float = 0.5,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        if cooldown_h < 0:
            raise ValueError("cooldown_h must be 0 or more")
        if backoff_s < 0:
            raise ValueError("backoff_s must be 0 or more")
        self.state_dir = Path(state_dir)
        self._webhook_url = webhook_url or None
        self.timeout_s = timeout_s
        self.retries = retries
        self.cooldown = timedelta(hours=cooldown_h)
        self.backoff_s = backoff_s
        self._clock = clock
        self._transport = transport

    @classmethod
    def from_settings(cls, settings: Settings, usecase: str) -> AlertSink:
        """The sink of ``usecase`` configured by the ``CLINML_ALERT_*`` settings."""
        secret = settings.alert_webhook_url
        return cls(
            settings.paths.usecase(usecase).monitoring,
            webhook_url=secret.get_secret_value() if secret is not None else None,
            timeout_s=settings.alert_timeout_s,
            retries=settings.alert_retries,
            cooldown_h=settings.alert_cooldown_h,
        )

    def __repr__(self) -> str:  # never the URL: it may carry a token
        webhook = "configured" if self._webhook_url else "none"
        return f"AlertSink({str(self.state_dir)!r}, webhook={webhook})"

    @property
    def has_webhook(self) -> bool:
        return self._webhook_url is not None

    @property
    def alerts_dir(self) -> Path:
        return self.state_dir / ALERTS_DIR

    @property
    def history_file(self) -> Path:
        return self.state_dir / HISTORY_FILE

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.state_dir / LOCK_FILE

    def deliver(self, alerts: list[Alert], run_id: str) -> Delivery:
        """Deliver the alerts of one monitor run; see the module docstring.

        Args:
            alerts: the run's alerts. Of several with one key, the first is delivered and
                the others suppressed (unless the cooldown is 0).
            run_id: names the alert file; letters, digits and ``_.:+-``, as a timestamp.

        Returns:
            What was sent, what was suppressed, and why the webhook failed, if it did.

        Raises:
            ValueError: ``run_id`` is not a safe file name, or the clock has no time zone.
            OSError: the monitoring directory or its files cannot be written.
        """
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise ValueError(
                f"run id {run_id!r} cannot name a file: use letters, digits and _.:+- only"
            )
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the alert clock returned a time without a time zone")
        now = now.astimezone(UTC)
        created_at = now.isoformat()

        with self._locked():
            state = self._read_state()
            sent, suppressed = self._split(alerts, state, now)
            if not sent:
                return Delivery(
                    sent=[],
                    suppressed=suppressed,
                    webhook_failures=[],
                    alert_file=None,
                    webhook_configured=self.has_webhook,
                )

            document = {
                "run_id": run_id,
                "created_at": created_at,
                "alerts": [alert.payload() for alert in sent],
            }
            alert_file = self.alerts_dir / f"{run_id}.json"
            # The file first: whatever happens to the webhook, the alerts are on disk.
            write_atomic(alert_file, json.dumps(document, indent=2, ensure_ascii=False) + "\n")

            failures: list[str] = []
            if self._webhook_url is not None:
                failures = self._post(self._webhook_url, document)
                webhook = "failed" if failures else "sent"
            else:
                webhook = "not configured"
            self._append_history(run_id, created_at, document["alerts"], webhook)
            for alert in sent:
                logger.info("alert sent: %s %s %s", alert.severity, alert.kind, alert.key)

            if not failures:
                # Keys of a failed webhook delivery stay out, so the next run retries them.
                state.update({alert.key: now for alert in sent})
                stored = {key: when.isoformat() for key, when in state.items()}
                write_atomic(self.state_file, json.dumps(stored, indent=2, sort_keys=True) + "\n")
        return Delivery(
            sent=sent,
            suppressed=suppressed,
            webhook_failures=failures,
            alert_file=alert_file,
            webhook_configured=self.has_webhook,
        )

    # -- internals -----------------------------------------------------------------

    def _split(
        self, alerts: list[Alert], state: dict[str, datetime], now: datetime
    ) -> tuple[list[Alert], list[Alert]]:
        """The alerts to send and those suppressed by the cooldown."""
        sent: list[Alert] = []
        suppressed: list[Alert] = []
        sent_keys: set[str] = set()
        for alert in alerts:
            if not isinstance(alert, Alert):
                raise TypeError(f"deliver takes Alert objects, not {type(alert).__name__}")
            if self.cooldown > timedelta(0):
                if alert.key in sent_keys:
                    logger.info("suppressed by cooldown: %s (same key earlier in run)", alert.key)
                    suppressed.append(alert)
                    continue
                last = state.get(alert.key)
                if last is not None and now - last < self.cooldown:
                    logger.info(
                        "suppressed by cooldown: %s (last sent %s)", alert.key, last.isoformat()
                    )
                    suppressed.append(alert)
                    continue
            sent.append(alert)
            sent_keys.add(alert.key)
        return sent, suppressed

    def _post(self, url: str, document: dict[str, Any]) -> list[str]:
        """POST ``document`` with retries; the reasons it failed, or [] on success."""
        tries = self.retries + 1
        reason = ""
        with httpx.Client(timeout=self.timeout_s, transport=self._transport) as client:
            for attempt in range(tries):
                if attempt:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    response = client.post(url, json=document)
                except httpx.TransportError as exc:  # connection errors and timeouts
                    # The type only: httpx messages may quote the URL, and the URL may
                    # carry a token.
                    reason = type(exc).__name__
                    logger.info("webhook try %d of %d failed: %s", attempt + 1, tries, reason)
                    continue
                if response.is_success:
                    return []
                reason = f"HTTP {response.status_code}"
                if response.status_code != 429 and response.status_code < 500:
                    # The receiver refused this request; sending it again will not help.
                    logger.warning("webhook refused the alerts: %s (not retried)", reason)
                    return [f"webhook refused the alerts: {reason} (not retried)"]
                logger.info("webhook try %d of %d failed: %s", attempt + 1, tries, reason)
        logger.warning("webhook failed after %d tries: %s", tries, reason)
        return [f"webhook failed after {tries} tries: {reason}"]

    def _append_history(
        self, run_id: str, created_at: str, payloads: list[dict[str, Any]], webhook: str
    ) -> None:
        lines = "".join(
            json.dumps(
                {"run_id": run_id, "created_at": created_at, "webhook": webhook, **payload},
                ensure_ascii=False,
            )
            + "\n"
            for payload in payloads
        )
        with self.history_file.open("a", encoding="utf-8") as history:
            history.write(lines)
            history.flush()
            os.fsync(history.fileno())

    def _read_state(self) -> dict[str, datetime]:
        """Key -> last delivery time; empty, with a warning, when the file is unusable."""
        try:
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            logger.warning(
                "alert state %s is unreadable (%s); treating it as empty",
                self.state_file,
                type(exc).__name__,
            )
            return {}
        if not isinstance(raw, dict):
            logger.warning(
                "alert state %s is not a JSON object; treating it as empty", self.state_file
            )
            return {}
        state: dict[str, datetime] = {}
        for key, value in raw.items():
            try:
                when = datetime.fromisoformat(value)
            except (TypeError, ValueError):
                logger.warning("alert state: bad time for key %r; ignoring it", key)
                continue
            state[key] = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on the lock file (released when closed)."""
        self.alerts_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
