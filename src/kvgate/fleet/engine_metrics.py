"""What each engine type calls its load metrics, and reading them from one scrape.

Per engine (`ENGINE_METRICS`): queue length, running requests, KV-cache usage (0..1), the cache
configuration (block size and number of blocks) and, for vLLM, the LoRA adapters. Several series
of one metric (vLLM labels by ``model_name`` and ``engine``, the data-parallel engine index;
SGLang by rank) are one endpoint behind one address, so counts are **summed** and the KV usage is
**averaged** (the ranks of one endpoint have equal caches, and its internal balancer spreads over
all of them). Info metrics whose value is a timestamp (``vllm:lora_requests_info``) take the
sample with the greatest value; other info metrics take the first sample.

A scrape that shows none of the engine's queue, running and usage metrics fails (wrong engine
type or path). One that misses only some of them reads the missing ones as 0 (the caller warns):
an engine may register a gauge only when it first has a value.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Final

from kvgate.fleet.endpoint import EndpointMetrics, EngineType
from kvgate.fleet.prometheus_text import MetricsParseError, RawSample, parse_labels, scan_samples

__all__ = ["ENGINE_METRICS", "EngineMetricNames", "NoEngineMetricsError", "read_metrics"]


class NoEngineMetricsError(MetricsParseError):
    """The scrape has none of the engine's core metrics (wrong engine type, path, or filter)."""


@dataclass(frozen=True, slots=True)
class EngineMetricNames:
    path: str
    waiting: str
    running: str
    kv_usage: tuple[str, ...]
    """Candidates in order of preference (newer name first)."""
    cache_info: str | None = None
    block_size_label: str = ""
    num_blocks_label: str = ""
    block_size_flag: str = ""
    """The engine's command-line flag for its block size, quoted in the mismatch error."""
    lora_info: str | None = None
    alive: str | None = None
    """A metric served from start-up by a server whose load gauges appear only with its first
    request (a Dynamo worker's system server): with it and none of them, the scrape reads as an
    idle engine instead of failing."""

    @property
    def names(self) -> tuple[str, ...]:
        extra = (self.cache_info, self.lora_info, self.alive)
        return (self.waiting, self.running, *self.kv_usage, *(n for n in extra if n is not None))


ENGINE_METRICS: Final[dict[EngineType, EngineMetricNames]] = {
    "vllm": EngineMetricNames(
        path="/metrics",
        waiting="vllm:num_requests_waiting",
        running="vllm:num_requests_running",
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        cache_info="vllm:cache_config_info",
        block_size_label="block_size",
        num_blocks_label="num_gpu_blocks",
        block_size_flag="--block-size",
        lora_info="vllm:lora_requests_info",
        alive="dynamo_component_uptime_seconds",
    ),
    "sglang": EngineMetricNames(
        path="/metrics",
        waiting="sglang:num_queue_reqs",
        running="sglang:num_running_reqs",
        kv_usage=("sglang:token_usage",),
        cache_info="sglang:cache_config_info",
        block_size_label="page_size",
        num_blocks_label="num_pages",
        block_size_flag="--page-size",
    ),
    "trtllm": EngineMetricNames(
        path="/prometheus/metrics",
        waiting="trtllm_num_requests_waiting",
        running="trtllm_num_requests_running",
        kv_usage=("trtllm_kv_cache_utilization",),
    ),
}


def _int_label(labels: dict[str, str], key: str) -> int | None:
    value = labels.get(key, "")
    # vLLM renders unset config fields as "None".
    return int(value) if value.isascii() and value.isdigit() else None


def _adapters(labels: dict[str, str], key: str) -> frozenset[str]:
    return frozenset(name for name in labels.get(key, "").split(",") if name)


# The label text of info metrics is the same scrape after scrape, and parsing it would be most of
# a scrape's parsing cost. An entry is a few hundred bytes: the caches stay well under 1 MB.
@functools.lru_cache(maxsize=1024)
def _cache_config(text: str, names: EngineMetricNames) -> tuple[int | None, int | None]:
    labels = parse_labels(text)
    return _int_label(labels, names.block_size_label), _int_label(labels, names.num_blocks_label)


@functools.lru_cache(maxsize=1024)
def _lora_config(text: str) -> tuple[int | None, frozenset[str], frozenset[str]]:
    labels = parse_labels(text)
    return (
        _int_label(labels, "max_lora"),
        _adapters(labels, "running_lora_adapters"),
        _adapters(labels, "waiting_lora_adapters"),
    )


def _total(found: dict[str, list[RawSample]], name: str) -> float:
    total = sum(value for _, value in found.get(name, ()))
    if not math.isfinite(total):
        raise MetricsParseError(f"{name} is {total}")
    return total


def read_metrics(text: str, names: EngineMetricNames) -> tuple[EndpointMetrics, list[str]]:
    """The endpoint metrics in a scrape, and the core metrics it lacked (read as 0).

    Raises `MetricsParseError` when a wanted line is malformed or none of the core metrics
    (waiting, running, usage) is there. ``updated_at`` and ``stale`` are left for the caller.
    """
    found = scan_samples(text, names.names)
    usage_name = next((n for n in names.kv_usage if n in found), None)
    missing = [n for n in (names.waiting, names.running) if n not in found]
    if usage_name is None:
        missing.append(" or ".join(names.kv_usage))
    if len(missing) == 3:
        if names.alive is None or names.alive not in found:
            raise NoEngineMetricsError(f"none of {', '.join(missing)} is exposed")
        return EndpointMetrics(), []
    metrics = EndpointMetrics(
        waiting=round(_total(found, names.waiting)), running=round(_total(found, names.running))
    )
    if usage_name is not None:
        metrics.kv_usage = _total(found, usage_name) / len(found[usage_name])
    cache = found.get(names.cache_info or "")
    if cache:
        metrics.block_size, metrics.num_gpu_blocks = _cache_config(cache[0][0], names)
    lora = found.get(names.lora_info or "")
    if lora:
        latest = max(lora, key=lambda sample: sample[1])[0]
        metrics.max_loras, metrics.active_loras, metrics.waiting_loras = _lora_config(latest)
    return metrics, missing
