"""`kv-cache-utilization-scorer`: more free KV cache, higher score (``1 - kv_usage``)."""

from __future__ import annotations

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Scorer
from kvgate.scheduling.request import LLMRequest


class KvCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return {ep.address: 1.0 - ep.metrics.kv_usage for ep in endpoints}
