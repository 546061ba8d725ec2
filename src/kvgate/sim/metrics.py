"""Prometheus exposition of an engine under vLLM's metric names.

A collector reads the engine's live state and counters at scrape time, so the engine keeps no
metric objects and a scrape costs nothing between scrapes. Each worker has its own registry:
several engines share a process and must not share series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvgate.sim.engine import Engine


class EngineCollector(Collector):
    def __init__(self, engine: Engine, model_name: str, engine_index: int = 0) -> None:
        self._engine = engine
        self._labels = {"model_name": model_name, "engine": str(engine_index)}

    def describe(self) -> Iterable[Metric]:
        # Series depend on live state; describing them would call collect() at registration.
        return ()

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        stats = engine.stats
        names = list(self._labels)
        values = list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge(
            "vllm:num_requests_running", "Requests in the running batch.", engine.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", engine.num_waiting
        )
        usage = engine.cache.usage
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (pre-0.10 vLLM name).", usage)

        config = engine.config
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache configuration.",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        info.add_metric([str(config.block_size), str(config.num_gpu_blocks), "True"], 1.0)
        yield info

        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens served from the prefix cache.",
            stats.prefix_cache_hits,
        )
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield counter("vllm:num_preemptions", "Preemptions.", stats.preemptions)

        success = CounterMetricFamily(
            "vllm:request_success",
            "Finished requests by finish reason.",
            labels=[*names, "finished_reason"],
        )
        for reason in sorted(stats.finished):
            success.add_metric([*values, reason], stats.finished[reason])
        yield success

        ttft = stats.ttft
        histogram = HistogramMetricFamily(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", labels=names
        )
        buckets = [
            ("+Inf" if bound == float("inf") else repr(bound), float(n))
            for bound, n in ttft.cumulative()
        ]
        histogram.add_metric(values, buckets, ttft.total)
        yield histogram


def engine_registry(engine: Engine, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry
