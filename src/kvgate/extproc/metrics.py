"""The picker's Prometheus metrics: the upstream EPP names that apply, plus kvgate's own.

Upstream names (``inference_objective_*``, ``inference_pool_*``, ``inference_extension_*``) keep
existing dashboards working. kvgate's own (``kvgate_*``) answer the questions a KV-aware router
raises: how long each stage takes, where decisions go, and — the parity alarm — whether the cached
tokens the engines report match the overlap the picker predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvgate.fleet.endpoint import EndpointSet
    from kvgate.scheduling.active import LoadColumns
    from kvgate.scheduling.framework import Plugin
    from kvgate.scheduling.request import LLMRequest, ResponseInfo, SchedulingResult
    from kvgate.scheduling.services import Stage

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
_REQUEST_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)


class _PoolCollector(Collector):
    """Pool gauges computed from the endpoint set at scrape time."""

    def __init__(self, endpoints: EndpointSet, pool: str) -> None:
        self._endpoints = endpoints
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        eps = [ep for ep in self._endpoints if not ep.metrics.stale]
        ready = GaugeMetricFamily(
            "inference_pool_ready_pods", "Endpoints with fresh metrics", labels=["name"]
        )
        ready.add_metric([self._pool], len(eps))
        kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache utilisation over ready endpoints",
            labels=["name"],
        )
        kv.add_metric([self._pool], sum(e.metrics.kv_usage for e in eps) / len(eps) if eps else 0)
        queue = GaugeMetricFamily(
            "inference_pool_average_queue_size",
            "Mean waiting requests over ready endpoints",
            labels=["name"],
        )
        queue.add_metric([self._pool], sum(e.metrics.waiting for e in eps) / len(eps) if eps else 0)
        return [ready, kv, queue]


class _EndpointCollector(Collector):
    """Per-endpoint gauges computed at scrape time: what the engine's metrics said (queue,
    running batch, KV usage) and what this picker has booked there (in flight, prompt tokens
    waiting for prefill) — the two views the routing decision weighs."""

    def __init__(self, endpoints: EndpointSet, load: Callable[[list[str]], LoadColumns]) -> None:
        self._endpoints = endpoints
        self._load = load

    def collect(self) -> Iterable[Metric]:
        eps = self._endpoints.snapshot()
        addresses = [ep.address for ep in eps]
        pending, _, in_flight, _, _ = self._load(addresses)
        families = {
            "waiting": GaugeMetricFamily(
                "kvgate_endpoint_waiting_requests",
                "Requests waiting in the engine's queue (its metrics)",
                labels=["endpoint"],
            ),
            "running": GaugeMetricFamily(
                "kvgate_endpoint_running_requests",
                "Requests in the engine's running batch (its metrics)",
                labels=["endpoint"],
            ),
            "kv": GaugeMetricFamily(
                "kvgate_endpoint_kv_cache_usage",
                "Fraction of the engine's KV cache in use (its metrics)",
                labels=["endpoint"],
            ),
            "in_flight": GaugeMetricFamily(
                "kvgate_endpoint_booked_requests",
                "Requests this picker (and its synced replicas) booked there and not yet complete",
                labels=["endpoint"],
            ),
            "pending": GaugeMetricFamily(
                "kvgate_endpoint_pending_prefill_tokens",
                "Prompt tokens booked there whose prefill has not finished",
                labels=["endpoint"],
            ),
        }
        for ep, p, f in zip(eps, pending, in_flight, strict=True):
            m = ep.metrics
            families["waiting"].add_metric([ep.address], m.waiting)
            families["running"].add_metric([ep.address], m.running)
            families["kv"].add_metric([ep.address], m.kv_usage)
            families["in_flight"].add_metric([ep.address], f)
            families["pending"].add_metric([ep.address], p)
        return list(families.values())


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class _Children(Generic[_Metric]):
    """``metric.labels(*values)``, each child looked up once: ``labels()`` validates, converts
    and locks on every call (~10k instructions), and a routed request makes a dozen such calls.
    Nothing removes a child here, so a remembered one stays the metric's own; this holds one
    reference per child prometheus_client already keeps."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Metric) -> None:
        self._metric: _Metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def _no_load(workers: list[str]) -> LoadColumns:
    zeros = [0] * len(workers)
    return zeros, zeros, zeros, zeros, zeros


class EppMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        model = ["model_name", "target_model_name"]
        self.requests = Counter(
            "inference_objective_request", "Requests scheduled", model, registry=r
        )
        self.request_errors = Counter(
            "inference_objective_request_error",
            "Requests answered with an error by the picker",
            ["code"],
            registry=r,
        )
        self.duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Request latency as seen by the picker",
            model,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "inference_objective_request_ttft_seconds",
            "Time to the first response byte",
            model,
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens", "Prompt tokens", model,
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.output_tokens = Histogram(
            "inference_objective_output_tokens", "Completion tokens", model,
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.cached_tokens = Histogram(
            "inference_objective_prompt_cached_tokens", "Prompt tokens served from cache", model,
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.running = Gauge(
            "inference_objective_running_requests", "Requests in flight", ["model_name"],
            registry=r,
        )  # fmt: skip
        self.scheduler_duration = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Scheduling time from body complete to decision",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.plugin_duration = Histogram(
            "inference_extension_plugin_duration_seconds",
            "Time spent in each plugin",
            ["extension_point", "plugin_type", "plugin_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "kvgate_stage_duration_seconds",
            "Time per routing stage (parse, tokenize, hash, match, score, total)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "kvgate_decisions", "Routing decisions per endpoint", ["endpoint"], registry=r
        )
        self.profile_decisions = Counter(
            "kvgate_profile_decisions",
            "Endpoint picked per scheduling profile (disaggregated serving: prefill and decode)",
            ["profile", "endpoint"],
            registry=r,
        )
        self.rejections = Counter(
            "kvgate_rejections", "Requests refused by the picker", ["code", "reason"], registry=r
        )
        self.predicted_overlap = Histogram(
            "kvgate_predicted_overlap_blocks",
            "Leading blocks the chosen endpoint was predicted to cache",
            buckets=(0, 1, 4, 16, 64, 256, 1024, 4096),
            registry=r,
        )
        self.predicted_cached_tokens = Counter(
            "kvgate_predicted_cached_tokens",
            "Prompt tokens the picker predicted the engine would serve from cache",
            registry=r,
        )
        self.engine_cached_tokens = Counter(
            "kvgate_engine_cached_tokens",
            "Prompt tokens the engines reported as served from cache (usage.cached_tokens)",
            registry=r,
        )
        self.cache_prediction_error = Histogram(
            "kvgate_cache_prediction_error_tokens",
            "engine-reported minus predicted cached tokens per request (parity alarm)",
            buckets=(-4096, -1024, -256, -64, -16, -1, 0, 1, 16, 64, 256, 1024, 4096),
            registry=r,
        )
        self.non_max_overlap_picks = Counter(
            "kvgate_non_max_overlap_picks",
            "Picks of an endpoint other than the one caching the longest prefix",
            registry=r,
        )
        self.nvext_unchanged = Counter(
            "kvgate_inline_nvext_unchanged",
            "Bodies passed on without nvext routing fields in inline mode, by reason",
            ["reason"],
            registry=r,
        )
        self.observer_streams = Counter(
            "kvgate_response_observer_streams",
            "Streams of an observe-only ext_proc filter, by whether they named a request awaiting "
            "its response (matched) or not (unmatched: refused, or completed already)",
            ["outcome"],
            registry=r,
        )
        self.busy_rejections = Counter(
            "kvgate_busy_rejections", "Requests refused because every worker was busy", registry=r
        )
        self.sheds = Counter(
            "kvgate_sheds",
            "Sheddable requests refused by a plugin (no endpoint predicted to meet the SLO)",
            ["reason"],
            registry=r,
        )
        self.ttft_prediction_error = Histogram(
            "kvgate_ttft_prediction_error_ratio",
            "(observed - predicted) / predicted time to first token, per request",
            buckets=(-0.75, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 4),
            registry=r,
        )
        # The children a routed request uses, looked up once (see `_Children`).
        self._requests = _Children(self.requests)
        self._running = _Children(self.running)
        self._duration = _Children(self.duration)
        self._ttft = _Children(self.ttft)
        self._input_tokens = _Children(self.input_tokens)
        self._output_tokens = _Children(self.output_tokens)
        self._cached_tokens = _Children(self.cached_tokens)
        self._decisions = _Children(self.decisions)
        self._profile_decisions = _Children(self.profile_decisions)
        self._stage = _Children(self.stage_duration)
        self._plugin_duration = _Children(self.plugin_duration)

    # -- what plugins report (kvgate.scheduling.services.SchedulingMetrics) -----------------

    def stage(self, stage: Stage | Literal["parse", "total"], seconds: float) -> None:
        self._stage(stage).observe(seconds)

    def plugin_timed(self, point: str, plugin: Plugin, seconds: float) -> None:
        """One plugin call's time (``inference_extension_plugin_duration_seconds``): the
        scheduler's `Observer`, a dozen calls per routed request."""
        self._plugin_duration(point, plugin.type_name, plugin.name).observe(seconds)

    def picked(self, overlap_blocks: int, best_overlap_blocks: int, block_size: int) -> None:
        self.predicted_overlap.observe(overlap_blocks)
        self.predicted_cached_tokens.inc(overlap_blocks * block_size)
        if overlap_blocks < best_overlap_blocks:
            self.non_max_overlap_picks.inc()

    def busy_rejection(self) -> None:
        self.busy_rejections.inc()

    def shed(self, reason: str) -> None:
        self.sheds.labels(reason).inc()

    def ttft_observed(self, predicted_s: float, observed_s: float) -> None:
        if predicted_s > 0:
            self.ttft_prediction_error.observe((observed_s - predicted_s) / predicted_s)

    def watch(
        self,
        endpoints: EndpointSet,
        pool: str,
        gauges: dict[str, tuple[str, Callable[[], float]]],
        load: Callable[[list[str]], LoadColumns] = _no_load,
    ) -> None:
        """Register pool and per-endpoint gauges and named gauges read at scrape time (index
        size, event counters); ``load`` gives the booked load per endpoint."""
        self.registry.register(_PoolCollector(endpoints, pool))
        self.registry.register(_EndpointCollector(endpoints, load))
        for name, (help_, read) in gauges.items():
            gauge = Gauge(name, help_, registry=self.registry)
            gauge.set_function(read)

    def watch_process(self) -> None:
        """The process's own gauges (``process_resident_memory_bytes``, ``process_open_fds``,
        CPU seconds), as the reference EPP exports them through the default registry."""
        ProcessCollector(registry=self.registry)

    def observe_decision(
        self, request: LLMRequest, result: SchedulingResult, seconds: float
    ) -> None:
        model = request.model
        self._requests(model, model).inc()
        self._running(model).inc()
        self.scheduler_duration.observe(seconds)
        self._stage("total").observe(seconds)
        self._decisions(result.endpoint.address).inc()
        for profile, chosen in result.profiles.items():
            if chosen.endpoints:
                self._profile_decisions(profile, chosen.endpoints[0].address).inc()
        if request.tokens is not None:
            self._input_tokens(model, model).observe(len(request.tokens))

    def observe_ttft(self, request: LLMRequest, seconds: float) -> None:
        self._ttft(request.model, request.model).observe(seconds)

    def observe_completion(
        self,
        request: LLMRequest,
        result: SchedulingResult,
        response: ResponseInfo,
        seconds: float,
    ) -> None:
        model = request.model
        self._running(model).dec()
        if not response.aborted:
            self._duration(model, model).observe(seconds)
        if response.completion_tokens is not None:
            self._output_tokens(model, model).observe(response.completion_tokens)
        if response.cached_tokens is not None:
            self._cached_tokens(model, model).observe(response.cached_tokens)
            self.engine_cached_tokens.inc(response.cached_tokens)
            if request.predicted_overlap_blocks is not None and request.block_size:
                predicted = request.predicted_overlap_blocks * request.block_size
                self.cache_prediction_error.observe(response.cached_tokens - predicted)
