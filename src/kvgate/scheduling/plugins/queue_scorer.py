"""`queue-scorer`: shorter waiting queue, higher score — ``(max - q) / (max - min)`` over the
candidates' ``waiting`` counts; when every queue is equal all score 1."""

from __future__ import annotations

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Scorer
from kvgate.scheduling.request import LLMRequest


class QueueScorer(Scorer):
    type_name = "queue-scorer"

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return min_max_inverse(endpoints, [ep.metrics.waiting for ep in endpoints])


def min_max_inverse(endpoints: list[Endpoint], values: list[int]) -> dict[str, float]:
    """``(max - v) / (max - min)`` per endpoint (1.0 for all when the values are equal)."""
    if not values:
        return {}
    low, high = min(values), max(values)
    if high == low:
        return dict.fromkeys((ep.address for ep in endpoints), 1.0)
    span = high - low
    return {ep.address: (high - v) / span for ep, v in zip(endpoints, values, strict=True)}
