"""Canary routing and its automatic rollback (``clinml canary``, docs/serving.md "Canary").

:class:`CanaryRouter` decides which requests the canary version answers: a keyed hash
(HMAC-SHA256 with the pseudonymisation key) of the request's routing key, bucketed into
``BUCKETS``; a request goes to the canary when its bucket is below ``percent`` hundredths
of them. The key is the first patient's pseudonymised id (``/predict_patient``: the whole
request follows its first patient), or else the request's records as canonical JSON. The
same key always lands in the same bucket, in every worker and after every restart, while
the key is the same; and without the key nobody can tell which patients are canaried.

:class:`CanaryGuard` watches the canary's most recent answered requests (a sliding window)
and the champion's, and says when the canary leaves its band: too many failed requests
(a failed canary request is answered by the champion and counted here), or an alert rate
(share of rows labelled positive) too far from the champion's. The service then stops
routing to it at once and has the registry alias removed and the rollback audited
(``clinml.training.governance.canary_rollback``), so the other workers follow.

Both are plain objects, driven by the service (:mod:`clinml.serving.service`) and by tests.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Routing resolution: a share is honoured to a hundredth of a percent.
BUCKETS = 10_000
# Keeps the canary's buckets apart from any other use of the same key.
_DOMAIN = b"clinml-canary\x00"


class CanaryRouter:
    """Which requests the canary answers.

    Args:
        key: the pseudonymisation key (``CLINML_PSEUDONYM_KEY``): secret, and the same in
            every worker, so every worker routes a patient alike.
    """

    def __init__(self, key: str):
        if not key:
            raise ValueError("the canary routing key is empty")
        self._key = key.encode()

    def bucket(self, routing_key: str) -> int:
        """The key's bucket in ``[0, BUCKETS)``."""
        digest = hmac.digest(self._key, _DOMAIN + routing_key.encode(), "sha256")
        return int.from_bytes(digest[:8], "big") % BUCKETS

    def routed(self, routing_key: str, percent: float) -> bool:
        """Whether the canary answers the request with this key, at ``percent``."""
        return self.bucket(routing_key) < round(percent * BUCKETS / 100)

    @staticmethod
    def patient_key(patients: list[str]) -> str:
        """A multi-patient request goes where its first (pseudonymised) patient goes."""
        return "patient:" + patients[0]

    @staticmethod
    def records_key(columns: Mapping[str, Any]) -> str:
        """The request's records (checked feature columns) as canonical JSON: the same
        records give the same key whatever the order of the fields or the spacing."""
        plain = {name: np.asarray(values).tolist() for name, values in columns.items()}
        return "records:" + json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Band:
    """When the guard rolls a canary back (settings ``CLINML_CANARY_*``)."""

    window: int = 200
    min_requests: int = 50
    max_error_rate: float = 0.05
    alert_rate_band: float = 0.10

    @classmethod
    def from_settings(cls, settings: Any) -> Band:
        return cls(
            window=settings.canary_window,
            min_requests=settings.canary_min_requests,
            max_error_rate=settings.canary_max_error_rate,
            alert_rate_band=settings.canary_alert_rate_band,
        )


@dataclass(frozen=True)
class Verdict:
    """Why a canary version is rolled back, and the counts and rates behind it (no PHI)."""

    version: str
    reason: str
    observed: dict[str, Any]


class _Window:
    """The last ``size`` requests: (failed, positive rows, rows) each, with running sums."""

    def __init__(self, size: int):
        self.requests: deque[tuple[bool, int, int]] = deque(maxlen=size)
        self.failed = self.positives = self.rows = 0

    def add(self, failed: bool, positives: int, rows: int) -> None:
        if len(self.requests) == self.requests.maxlen:
            old_failed, old_positives, old_rows = self.requests[0]
            self.failed -= old_failed
            self.positives -= old_positives
            self.rows -= old_rows
        self.requests.append((failed, positives, rows))
        self.failed += failed
        self.positives += positives
        self.rows += rows

    def __len__(self) -> int:
        return len(self.requests)

    def alert_rate(self) -> float | None:
        return self.positives / self.rows if self.rows else None


class CanaryGuard:
    """Judges the canary version over a sliding window of its answered requests.

    The rule is on point rates over the window, judged from ``min_requests`` canary
    requests on: a rollback is the safe direction, so it should not wait for an interval
    to clear the band. The alert rate is compared with the champion's over its own last
    ``window`` requests, once the champion has ``min_requests`` too. A version is judged
    once: after its verdict the guard routes nothing more to it (``blocked``), even
    before the registry alias is gone.
    """

    def __init__(self, band: Band):
        self.band = band
        self._lock = threading.Lock()
        self._version: str | None = None
        self._canary = _Window(band.window)
        self._champion = _Window(band.window)
        self.rolled_back: set[str] = set()

    def blocked(self, version: str) -> bool:
        """Whether ``version`` was rolled back in this worker."""
        return version in self.rolled_back

    def champion_answered(self, positives: int, rows: int) -> None:
        with self._lock:
            self._champion.add(False, positives, rows)

    def canary_answered(self, version: str, positives: int, rows: int) -> Verdict | None:
        """One request answered by the canary; its verdict when this one took it out of
        the band."""
        return self._record(version, False, positives, rows)

    def canary_failed(self, version: str) -> Verdict | None:
        """One canary request that failed (answered by the champion instead)."""
        return self._record(version, True, 0, 0)

    def _record(self, version: str, failed: bool, positives: int, rows: int) -> Verdict | None:
        with self._lock:
            if version in self.rolled_back:
                return None
            if version != self._version:  # a new canary starts with an empty window
                self._version, self._canary = version, _Window(self.band.window)
            self._canary.add(failed, positives, rows)
            verdict = self._judge(version)
            if verdict is not None:
                self.rolled_back.add(version)
            return verdict

    def _judge(self, version: str) -> Verdict | None:
        band, canary, champion = self.band, self._canary, self._champion
        if len(canary) < band.min_requests:
            return None
        error_rate = canary.failed / len(canary)
        canary_alerts = canary.alert_rate()
        champion_alerts = champion.alert_rate() if len(champion) >= band.min_requests else None
        observed = {
            "canary_requests": len(canary),
            "canary_errors": canary.failed,
            "error_rate": round(error_rate, 4),
            "max_error_rate": band.max_error_rate,
            "canary_rows": canary.rows,
            "canary_alert_rate": None if canary_alerts is None else round(canary_alerts, 4),
            "champion_requests": len(champion),
            "champion_alert_rate": None if champion_alerts is None else round(champion_alerts, 4),
            "alert_rate_band": band.alert_rate_band,
        }
        if error_rate > band.max_error_rate:
            return Verdict(
                version,
                f"error rate {error_rate:.1%} over the canary's last {len(canary)} requests "
                f"is above {band.max_error_rate:.1%}",
                observed,
            )
        if canary_alerts is not None and champion_alerts is not None:
            difference = canary_alerts - champion_alerts
            if abs(difference) > band.alert_rate_band:
                return Verdict(
                    version,
                    f"alert rate {canary_alerts:.1%} over the canary's last {len(canary)} "
                    f"requests differs from the champion's {champion_alerts:.1%} by "
                    f"{difference:+.1%}, beyond the band of ±{band.alert_rate_band:.1%}",
                    observed,
                )
        return None
