"""Canary routing and the canary guard (``clinml.serving.canary``), without a service.

The router is a keyed hash: the same key lands in the same bucket for any router made with
the same secret (a restart, another worker), the share routed over many keys is the share
asked for, and another secret routes differently. The guard rolls a canary back once, when
its error rate or its alert rate leaves the band over its sliding window, and not before
it has seen enough requests. tests/integration/test_serving_canary.py runs both in the
service (named to run after test_end_to_end.py, whose governance test counts the versions
it registers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clinml.serving.canary import BUCKETS, Band, CanaryGuard, CanaryRouter
from clinml.settings import Settings
from clinml.training.tracking import CANARY_PERCENT_TAG, canary_percent

KEY = "test-routing-key-0123456789abcdef"


def test_a_key_is_routed_alike_by_every_router_with_the_same_secret() -> None:
    keys = [CanaryRouter.patient_key([f"ps_{i:024x}"]) for i in range(500)]
    first, restarted = CanaryRouter(KEY), CanaryRouter(KEY)
    buckets = [first.bucket(k) for k in keys]
    assert buckets == [restarted.bucket(k) for k in keys]  # a restart, another worker
    assert buckets == [first.bucket(k) for k in keys]  # request after request
    assert all(0 <= b < BUCKETS for b in buckets)
    assert [first.routed(k, 20) for k in keys] == [restarted.routed(k, 20) for k in keys]
    other = CanaryRouter("another-secret-key-fedcba9876543210")
    assert sum(other.bucket(k) == b for k, b in zip(keys, buckets, strict=True)) < 10


def test_a_multi_patient_request_follows_its_first_patient() -> None:
    assert CanaryRouter.patient_key(["ps_a", "ps_b"]) == CanaryRouter.patient_key(["ps_a"])
    assert CanaryRouter.patient_key(["ps_b", "ps_a"]) != CanaryRouter.patient_key(["ps_a"])


def test_the_same_records_give_the_same_key_whatever_the_field_order_or_container() -> None:
    one = {"radius": np.array([1.5, 2.0]), "site": ["a", "b"]}
    same = {"site": np.array(["a", "b"], dtype=object), "radius": [1.5, 2.0]}
    other = {"radius": np.array([1.5, 2.1]), "site": ["a", "b"]}
    assert CanaryRouter.records_key(one) == CanaryRouter.records_key(same)
    assert CanaryRouter.records_key(one) != CanaryRouter.records_key(other)
    # a record never routes like a patient whose pseudonym happens to match its JSON
    assert CanaryRouter.records_key(one).startswith("records:")


@pytest.mark.parametrize("percent", [1.0, 10.0, 25.0, 50.0])
def test_the_share_routed_over_distinct_keys_is_the_share_asked_for(percent: float) -> None:
    router, n = CanaryRouter(KEY), 2_000
    routed = sum(router.routed(f"patient:ps_{i:024x}", percent) for i in range(n))
    p = percent / 100
    tolerance = 4 * math.sqrt(n * p * (1 - p))  # four standard deviations of a binomial
    assert abs(routed - n * p) <= tolerance, (routed, n * p, tolerance)


def test_a_larger_share_keeps_everyone_the_smaller_one_routed() -> None:
    router = CanaryRouter(KEY)
    keys = [f"patient:ps_{i:024x}" for i in range(1_000)]
    small = {k for k in keys if router.routed(k, 5)}
    large = {k for k in keys if router.routed(k, 20)}
    assert small and small <= large  # raising the share adds patients, moves none back


def test_the_router_refuses_an_empty_secret() -> None:
    with pytest.raises(ValueError, match="empty"):
        CanaryRouter("")


def test_the_percent_tag_is_read_only_within_the_allowed_share() -> None:
    assert canary_percent({CANARY_PERCENT_TAG: "12.5"}) == 12.5
    assert canary_percent({CANARY_PERCENT_TAG: "50"}) == 50.0
    for bad in ("0", "-3", "51", "lots"):
        assert canary_percent({CANARY_PERCENT_TAG: bad}) == 0.0
    assert canary_percent({}) == 0.0


BAND = Band(window=20, min_requests=10, max_error_rate=0.1, alert_rate_band=0.2)


def _champion(guard: CanaryGuard, requests: int = 20, positives: int = 3, rows: int = 10) -> None:
    for _ in range(requests):
        guard.champion_answered(positives, rows)


def test_failures_roll_the_canary_back_once_enough_requests_were_seen() -> None:
    guard = CanaryGuard(BAND)
    _champion(guard)
    for _ in range(BAND.min_requests - 1):
        assert guard.canary_failed("7") is None  # too few to judge, however bad
    verdict = guard.canary_failed("7")
    assert verdict is not None and verdict.version == "7"
    assert "error rate 100.0%" in verdict.reason and "above 10.0%" in verdict.reason
    assert verdict.observed["canary_requests"] == 10
    assert verdict.observed["canary_errors"] == 10
    assert verdict.observed["error_rate"] == 1.0
    assert guard.blocked("7") and not guard.blocked("8")
    assert guard.canary_failed("7") is None  # judged once: no second rollback
    assert guard.canary_answered("7", 1, 10) is None


def test_errors_within_the_band_do_not_roll_back_and_age_out_of_the_window() -> None:
    guard = CanaryGuard(BAND)
    _champion(guard)
    assert guard.canary_failed("7") is None
    for _ in range(BAND.window):
        assert guard.canary_answered("7", 3, 10) is None  # 1 error in 20 is 5%
    for _ in range(2):  # the old error left the window: 2 in 20 is 10%, not above
        assert guard.canary_failed("7") is None
    verdict = guard.canary_failed("7")  # 3 in 20: 15%
    assert verdict is not None and verdict.observed["canary_errors"] == 3
    assert verdict.observed["canary_requests"] == BAND.window


def test_an_alert_rate_outside_the_band_rolls_back() -> None:
    guard = CanaryGuard(BAND)
    _champion(guard, positives=3, rows=10)  # champion alerts on 30%
    verdict = None
    for _ in range(BAND.min_requests):
        verdict = guard.canary_answered("7", 10, 10)  # canary alerts on everyone
    assert verdict is not None
    assert "alert rate 100.0%" in verdict.reason and "champion's 30.0%" in verdict.reason
    assert verdict.observed["canary_alert_rate"] == 1.0
    assert verdict.observed["champion_alert_rate"] == 0.3


def test_an_alert_rate_within_the_band_does_not_roll_back() -> None:
    guard = CanaryGuard(BAND)
    _champion(guard, positives=3, rows=10)
    for _ in range(3 * BAND.window):
        assert guard.canary_answered("7", 4, 10) is None  # 40% against 30%: within 20%
    assert not guard.blocked("7")


def test_the_alert_rate_is_not_judged_before_the_champion_has_enough_requests() -> None:
    guard = CanaryGuard(BAND)
    _champion(guard, requests=BAND.min_requests - 1)
    for _ in range(BAND.window):
        assert guard.canary_answered("7", 10, 10) is None
    guard.champion_answered(3, 10)
    assert guard.canary_answered("7", 10, 10) is not None


def test_a_new_canary_version_starts_with_an_empty_window() -> None:
    guard = CanaryGuard(BAND)
    _champion(guard)
    for _ in range(BAND.min_requests - 1):
        assert guard.canary_failed("7") is None
    assert guard.canary_failed("8") is None  # 1 request of version 8, not 10
    assert not guard.blocked("7") and not guard.blocked("8")


def test_the_band_comes_from_the_settings() -> None:
    settings = Settings(
        canary_window=30,
        canary_min_requests=5,
        canary_max_error_rate=0.2,
        canary_alert_rate_band=0.05,
    )
    assert Band.from_settings(settings) == Band(30, 5, 0.2, 0.05)
    assert Band.from_settings(Settings()) == Band(200, 50, 0.05, 0.10)
