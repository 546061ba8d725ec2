"""Counters an engine keeps about itself; exporters (Prometheus, reports) read them."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# vLLM's buckets for vllm:time_to_first_token_seconds, so dashboards built for it apply unchanged.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


class Histogram:
    """Fixed-bucket histogram; ``counts[i]`` counts observations in (bounds[i-1], bounds[i]]."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) pairs ending with +Inf, as Prometheus wants."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache (once per request, at admission)."""
    prefix_cache_hits: int = 0
    """Of those, tokens served from the cache."""
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    """Finished requests by finish reason."""
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
