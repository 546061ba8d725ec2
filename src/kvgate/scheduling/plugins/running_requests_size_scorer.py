"""`running-requests-size-scorer`: fewer running requests, higher score (min-max normalised over
the candidates; all equal → 1)."""

from __future__ import annotations

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Scorer
from kvgate.scheduling.plugins.queue_scorer import min_max_inverse
from kvgate.scheduling.request import LLMRequest


class RunningRequestsSizeScorer(Scorer):
    type_name = "running-requests-size-scorer"

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        return min_max_inverse(endpoints, [ep.metrics.running for ep in endpoints])
