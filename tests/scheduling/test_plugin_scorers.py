from __future__ import annotations

from typing import Any

import pytest

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Scorer
from kvgate.scheduling.plugins.kv_cache_utilization_scorer import KvCacheUtilizationScorer
from kvgate.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from kvgate.scheduling.plugins.queue_scorer import QueueScorer
from kvgate.scheduling.plugins.running_requests_size_scorer import RunningRequestsSizeScorer
from tests.scheduling.utils import endpoint, request


def scores_of(scorer: Scorer, eps: list[Endpoint], lora: str | None = None) -> list[float]:
    result = scorer.score(request(lora=lora), eps)
    return [round(result.get(ep.address, 0.0), 6) for ep in eps]


def fleet(**per_field: list[Any]) -> list[Endpoint]:
    (name, values), *_ = per_field.items()
    return [endpoint(f"10.0.0.{i + 1}:8000", **{name: v}) for i, v in enumerate(values)]


@pytest.mark.parametrize(
    ("waiting", "expected"),
    [
        pytest.param([0, 5, 10], [1.0, 0.5, 0.0], id="linear-between-min-and-max"),
        pytest.param([3, 3, 3], [1.0, 1.0, 1.0], id="all-equal-score-one"),
        pytest.param([7], [1.0], id="single-endpoint-scores-one"),
        pytest.param([2, 4], [1.0, 0.0], id="min-is-one-even-when-not-zero"),
    ],
)
def test_queue_scorer(waiting: list[int], expected: list[float]) -> None:
    assert scores_of(QueueScorer("q"), fleet(waiting=waiting)) == expected


@pytest.mark.parametrize(
    ("running", "expected"),
    [
        pytest.param([0, 2, 8], [1.0, 0.75, 0.0], id="fewer-running-is-better"),
        pytest.param([4, 4], [1.0, 1.0], id="all-equal-score-one"),
    ],
)
def test_running_requests_size_scorer(running: list[int], expected: list[float]) -> None:
    assert scores_of(RunningRequestsSizeScorer("r"), fleet(running=running)) == expected


def test_load_scorers_return_nothing_for_no_endpoints() -> None:
    assert QueueScorer("q").score(request(), []) == {}
    assert RunningRequestsSizeScorer("r").score(request(), []) == {}


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        pytest.param([0.0, 0.25, 1.0], [1.0, 0.75, 0.0], id="free-cache-is-the-score"),
        pytest.param([0.5], [0.5], id="half-full"),
    ],
)
def test_kv_cache_utilization_scorer(usage: list[float], expected: list[float]) -> None:
    assert scores_of(KvCacheUtilizationScorer("kv"), fleet(kv=usage)) == expected


@pytest.mark.parametrize(
    ("ep", "expected"),
    [
        pytest.param(endpoint(active_loras={"ad"}, max_loras=1), 1.0, id="adapter-active"),
        pytest.param(endpoint(active_loras={"x"}, max_loras=2), 0.8, id="room-to-load"),
        pytest.param(
            endpoint(waiting_loras={"ad"}, max_loras=3), 0.8, id="room-beats-already-waiting"
        ),
        pytest.param(
            endpoint(active_loras={"x"}, waiting_loras={"ad"}, max_loras=2),
            0.6,
            id="waiting-and-full",
        ),
        pytest.param(endpoint(active_loras={"x", "y"}, max_loras=2), 0.0, id="full-without-it"),
        pytest.param(endpoint(), 0.0, id="unknown-capacity-promises-no-room"),
    ],
)
def test_lora_affinity_scorer(ep: Endpoint, expected: float) -> None:
    assert scores_of(LoraAffinityScorer("l"), [ep], lora="ad") == [expected]


def test_lora_affinity_scorer_base_model_scores_one_everywhere() -> None:
    eps = [endpoint("a:1", active_loras={"x", "y"}, max_loras=2), endpoint("b:1")]
    assert scores_of(LoraAffinityScorer("l"), eps, lora=None) == [1.0, 1.0]
