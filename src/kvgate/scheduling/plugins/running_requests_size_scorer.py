"""`running-requests-size-scorer`: fewer running requests, higher score (min-max normalised over
the candidates; all equal → 1)."""

from __future__ import annotations

from typing import Self

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import LLMRequest, Scorer
from kvgate.scheduling.plugins.queue_scorer import min_max_inverse
from kvgate.scheduling.registry import NoParams, PluginContext


class RunningRequestsSizeScorer(Scorer):
    type_name = "running-requests-size-scorer"
    params_type = NoParams

    @classmethod
    def from_config(cls, name: str, params: NoParams, context: PluginContext) -> Self:
        return cls(name)

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return min_max_inverse(endpoints, [ep.metrics.running for ep in endpoints])
