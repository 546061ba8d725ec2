"""`lora-affinity-scorer`: prefer endpoints that already serve, or can load, the request's adapter.

1.0 the adapter is active; 0.8 the endpoint has room for one more adapter; 0.6 the adapter is
waiting to load there; 0 otherwise. Checked in that order, so an endpoint with room scores 0.8
even if the adapter is also queued there. A request for the base model (no adapter) scores 1
everywhere: every endpoint serves it.
"""

from __future__ import annotations

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import Scorer
from kvgate.scheduling.request import LLMRequest

ACTIVE = 1.0
ROOM_TO_LOAD = 0.8
WAITING = 0.6


class LoraAffinityScorer(Scorer):
    type_name = "lora-affinity-scorer"

    def score(self, request: LLMRequest, endpoints: list[Endpoint]) -> dict[str, float]:
        adapter = request.lora_name
        if adapter is None:
            return dict.fromkeys((ep.address for ep in endpoints), 1.0)
        return {ep.address: _affinity(ep, adapter) for ep in endpoints}


def _affinity(endpoint: Endpoint, adapter: str) -> float:
    m = endpoint.metrics
    if adapter in m.active_loras:
        return ACTIVE
    # An unknown adapter limit means no room can be promised.
    if m.max_loras is not None and len(m.active_loras) + len(m.waiting_loras) < m.max_loras:
        return ROOM_TO_LOAD
    if adapter in m.waiting_loras:
        return WAITING
    return 0.0
