"""`queue-scorer`: shorter waiting queue, higher score — ``(max - q) / (max - min)`` over the
candidates' ``waiting`` counts; when every queue is equal all score 1."""

from __future__ import annotations

from typing import Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import LLMRequest, Scorer
from kvgate.scheduling.registry import NoParams, PluginContext


class QueueScorer(Scorer):
    type_name = "queue-scorer"
    params_type = NoParams

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        return cls(name)

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
