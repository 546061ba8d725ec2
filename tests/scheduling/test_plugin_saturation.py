from __future__ import annotations

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.saturation import UtilizationDetector
from tests.scheduling.utils import endpoint


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def detector(clock: Clock | None = None, **thresholds: float) -> UtilizationDetector:
    return UtilizationDetector("sd", now=clock or Clock(), **thresholds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ep", "saturated"),
    [
        pytest.param(endpoint(waiting=4, kv=0.79), False, id="below-both-thresholds"),
        pytest.param(endpoint(waiting=5), True, id="queue-at-threshold"),
        pytest.param(endpoint(kv=0.8), True, id="kv-at-threshold"),
        pytest.param(endpoint(stale=True), True, id="stale-metrics-count-as-full"),
        pytest.param(endpoint(waiting=0, kv=0.0), False, id="idle"),
    ],
)
def test_endpoint_saturation(ep: Endpoint, saturated: bool) -> None:
    assert detector().is_endpoint_saturated(ep) is saturated


def test_roofline_takes_the_most_constrained_resource() -> None:
    assert detector().endpoint_saturation(endpoint(waiting=1, kv=0.4)) == pytest.approx(0.5)
    assert detector().endpoint_saturation(endpoint(waiting=4, kv=0.4)) == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("eps", "saturated"),
    [
        pytest.param([], True, id="no-endpoints"),
        pytest.param([endpoint(waiting=10), endpoint()], True, id="one-twice-full-one-idle"),
        pytest.param([endpoint(waiting=5), endpoint(waiting=4)], False, id="mean-below-one"),
        pytest.param([endpoint(stale=True), endpoint(stale=True)], True, id="all-stale"),
    ],
)
def test_pool_saturation_is_the_mean(eps: list[Endpoint], saturated: bool) -> None:
    assert detector().is_saturated(eps) is saturated


def test_custom_thresholds() -> None:
    d = detector(queue_depth_threshold=10, kv_cache_util_threshold=0.5)
    assert not d.is_endpoint_saturated(endpoint(waiting=9, kv=0.49))
    assert d.is_endpoint_saturated(endpoint(kv=0.5))


def test_staleness_threshold_ages_metrics_with_the_context_clock() -> None:
    clock = Clock(100.0)
    d = detector(clock, metrics_staleness_threshold=0.5)
    fresh = endpoint(updated_at=99.8)
    assert not d.is_endpoint_saturated(fresh)
    clock.now = 100.4
    assert d.is_endpoint_saturated(fresh)
    assert d.is_endpoint_saturated(endpoint(updated_at=None))
