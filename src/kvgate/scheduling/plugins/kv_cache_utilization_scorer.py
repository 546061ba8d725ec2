"""`kv-cache-utilization-scorer`: more free KV cache, higher score (``1 - kv_usage``)."""

from __future__ import annotations

from typing import Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import LLMRequest, Scorer
from kvgate.scheduling.registry import NoParams, PluginContext


class KvCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"
    params_type = NoParams

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        return cls(name)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return {ep.address: 1.0 - ep.metrics.kv_usage for ep in endpoints}
