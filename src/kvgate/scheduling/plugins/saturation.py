"""`utilization-detector`: is the pool too busy to take more work?

Each endpoint gets a saturation score from its most constrained resource (a roofline)::

    score = max(waiting / queueDepthThreshold, kv_usage / kvCacheUtilThreshold)

so an endpoint is saturated (score >= 1) when its queue reaches ``queueDepthThreshold`` (5) or its
KV cache reaches ``kvCacheUtilThreshold`` (0.8) of capacity. An endpoint whose metrics are stale
scores 1: with no recent numbers it is assumed full. The pool is saturated when the mean score is
>= 1; an empty pool is saturated. The admission step asks `is_saturated` before scheduling a
sheddable request.

Staleness is the data layer's ``stale`` flag; ``metricsStalenessThreshold``, when set, adds a
tighter limit on the age of the last scrape, measured with the plugin context's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Protocol, Self, runtime_checkable

from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.framework import SECONDS, Plugin, PluginContext, Range

DEFAULT_QUEUE_DEPTH_THRESHOLD = 5
DEFAULT_KV_CACHE_UTIL_THRESHOLD = 0.8


@runtime_checkable
class SaturationDetector(Protocol):
    """What the admission step asks of a saturation detector."""

    def is_saturated(self, endpoints: Iterable[Endpoint]) -> bool: ...


@dataclass(frozen=True, slots=True)
class UtilizationDetectorParams:
    queue_depth_threshold: Annotated[int, Range(ge=1)] = DEFAULT_QUEUE_DEPTH_THRESHOLD
    """Waiting requests at which an endpoint counts as full."""
    kv_cache_util_threshold: Annotated[float, Range(gt=0, le=1)] = DEFAULT_KV_CACHE_UTIL_THRESHOLD
    """KV cache fraction in use at which an endpoint counts as full."""
    metrics_staleness_threshold: Annotated[float | None, SECONDS, Range(gt=0)] = None
    """Metrics older than this count as stale; None: trust the data layer's stale flag."""


class UtilizationDetector(Plugin):
    type_name = "utilization-detector"
    params_type = UtilizationDetectorParams

    def __init__(
        self,
        name: str,
        *,
        queue_depth_threshold: int = DEFAULT_QUEUE_DEPTH_THRESHOLD,
        kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL_THRESHOLD,
        metrics_staleness_threshold: float | None = None,
        now: Callable[[], float],
    ) -> None:
        super().__init__(name)
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.metrics_staleness_threshold = metrics_staleness_threshold
        self._now = now

    @classmethod
    def from_config(
        cls, name: str, params: UtilizationDetectorParams, context: PluginContext
    ) -> Self:
        return cls(
            name,
            queue_depth_threshold=params.queue_depth_threshold,
            kv_cache_util_threshold=params.kv_cache_util_threshold,
            metrics_staleness_threshold=params.metrics_staleness_threshold,
            now=context.now,
        )

    def endpoint_saturation(self, endpoint: Endpoint, now: float | None = None) -> float:
        """The endpoint's roofline score; >= 1 means saturated."""
        m = endpoint.metrics
        if m.stale:
            return 1.0
        if self.metrics_staleness_threshold is not None:
            if m.updated_at is None:
                return 1.0
            age = (self._now() if now is None else now) - m.updated_at
            if age > self.metrics_staleness_threshold:
                return 1.0
        return max(
            m.waiting / self.queue_depth_threshold, m.kv_usage / self.kv_cache_util_threshold
        )

    def is_endpoint_saturated(self, endpoint: Endpoint) -> bool:
        return self.endpoint_saturation(endpoint) >= 1.0

    def saturation(self, endpoints: Iterable[Endpoint]) -> float:
        """Mean endpoint score; 1.0 for no endpoints."""
        now = self._now()
        total, count = 0.0, 0
        for endpoint in endpoints:
            total += self.endpoint_saturation(endpoint, now)
            count += 1
        return total / count if count else 1.0

    def is_saturated(self, endpoints: Iterable[Endpoint]) -> bool:
        return self.saturation(endpoints) >= 1.0
