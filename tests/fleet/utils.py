"""Builders for the fleet tests.

Fake engines' /metrics: texts rendered by prometheus_client, as vLLM, SGLang and trtllm-serve
render theirs, with their families, label sets and histogram layouts (values made up), and
`MetricsServer`, a loopback server that answers ``name[]=`` filters the way prometheus_client's
exposition app does. Then what the endpoint-source tests share: `Changes`, `wait_until`, and
`discovery` (the Kubernetes API server itself is faked in `fake_apiserver`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvgate.fleet.endpoint import Endpoint, EndpointSet, EngineType
from kvgate.fleet.kube_api import KubeConfig
from kvgate.fleet.pool_discovery import PoolDiscovery
from tests.fleet.fake_apiserver import FakeApiServer

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 40000)
VLLM_LATENCY_HISTOGRAMS = (
    "time_to_first_token_seconds",
    "time_per_output_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_inference_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
)
VLLM_TOKEN_HISTOGRAMS = (
    "iteration_tokens_total",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_max_num_generation_tokens",
    "request_params_n",
    "request_params_max_tokens",
)


@dataclass
class EngineState:
    """What a fake engine reports; tests change it between scrapes."""

    engine: EngineType = "vllm"
    model: str = "Qwen/Qwen3-0.6B"
    waiting: Sequence[float] = (0.0,)
    """One value per data-parallel engine (vLLM's ``engine`` label) or rank (SGLang)."""
    running: Sequence[float] = (0.0,)
    usage: Sequence[float] = (0.0,)
    block_size: int = 16
    num_blocks: int = 4096
    lora_samples: list[tuple[int, str, str, float]] = field(default_factory=list)
    """vLLM lora_requests_info series: (max_lora, running, waiting, timestamp value)."""
    usage_name: str = "vllm:kv_cache_usage_perc"
    """vLLM's usage gauge; older versions call it vllm:gpu_cache_usage_perc."""
    full: bool = True
    """Also render the families a real engine has that the scraper does not want."""


def _histogram(name: str, labels: dict[str, str], bounds: Iterable[float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, f"Histogram of {name}.", labels=list(labels))
    buckets = [(str(float(b)), float(i * 3)) for i, b in enumerate(bounds)]
    buckets.append(("+Inf", float(len(buckets) * 3)))
    family.add_metric(list(labels.values()), buckets, sum_value=1234.5)
    return family


def _gauge(name: str, per_series: list[tuple[dict[str, str], float]]) -> GaugeMetricFamily:
    labels = list(per_series[0][0]) if per_series else []
    family = GaugeMetricFamily(name, f"Gauge {name}.", labels=labels)
    for series, value in per_series:
        family.add_metric(list(series.values()), value)
    return family


def _info(name: str, labels: dict[str, str], value: float = 1.0) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, f"Information of {name}.", labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, f"Counter {name}.", labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class FakeEngineCollector(Collector):
    def __init__(self, state: EngineState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        yield from {"vllm": self._vllm, "sglang": self._sglang, "trtllm": self._trtllm}[
            self.state.engine
        ]()

    def _vllm(self) -> Iterator[Metric]:
        s = self.state

        def series(values: Sequence[float]) -> list[tuple[dict[str, str], float]]:
            return [({"engine": str(i), "model_name": s.model}, v) for i, v in enumerate(values)]

        base = {"engine": "0", "model_name": s.model}
        yield _gauge("vllm:num_requests_running", series(s.running))
        yield _gauge("vllm:num_requests_waiting", series(s.waiting))
        if s.full:
            yield _gauge(
                "vllm:num_requests_waiting_by_reason",
                [({**base, "reason": "capacity"}, 99.0), ({**base, "reason": "deferred"}, 7.0)],
            )
        yield _gauge(s.usage_name, series(s.usage))
        if s.lora_samples:
            family = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            for max_lora, running, waiting, stamp in s.lora_samples:
                family.add_metric([str(max_lora), running, waiting], stamp)
            yield family
        yield _info(
            "vllm:cache_config_info",
            {
                "block_size": str(s.block_size),
                "cache_dtype": "auto",
                "calculate_kv_scales": "False",
                "enable_prefix_caching": "True",
                "gpu_memory_utilization": "0.9",
                "num_cpu_blocks": "None",
                "num_gpu_blocks": str(s.num_blocks),
                "num_gpu_blocks_override": "None",
                "prefix_caching_hash_algo": "sha256",
                "sliding_window": "None",
                "swap_space": "4",
            },
        )
        if not s.full:
            return
        for name in ("num_preemptions", "prompt_tokens", "generation_tokens"):
            yield _counter(f"vllm:{name}", base, 1000.0)
        yield _counter("vllm:prefix_cache_queries", base, 5e6)
        yield _counter("vllm:prefix_cache_hits", base, 3.2e6)
        success = CounterMetricFamily(
            "vllm:request_success", "Finished requests.", labels=[*base, "finished_reason"]
        )
        for reason in ("abort", "length", "stop"):
            success.add_metric([*base.values(), reason], 17.0)
        yield success
        for name in VLLM_LATENCY_HISTOGRAMS:
            yield _histogram(f"vllm:{name}", base, LATENCY_BUCKETS)
        for name in VLLM_TOKEN_HISTOGRAMS:
            yield _histogram(f"vllm:{name}", base, TOKEN_BUCKETS)
        yield _gauge("process_resident_memory_bytes", [({}, 2.1e9)])
        yield _gauge("process_open_fds", [({}, 211.0)])
        yield _counter("process_cpu_seconds", {}, 1234.5)

    def _sglang(self) -> Iterator[Metric]:
        s = self.state

        def series(values: Sequence[float]) -> list[tuple[dict[str, str], float]]:
            return [
                ({"engine_type": "unified", "model_name": s.model, "dp_rank": str(i)}, v)
                for i, v in enumerate(values)
            ]

        yield _gauge("sglang:num_running_reqs", series(s.running))
        yield _gauge("sglang:num_queue_reqs", series(s.waiting))
        yield _gauge("sglang:token_usage", series(s.usage))
        yield _info(
            "sglang:cache_config_info",
            {"model_name": s.model, "num_pages": str(s.num_blocks), "page_size": str(s.block_size)},
        )
        if not s.full:
            return
        base = {"engine_type": "unified", "model_name": s.model}
        yield _gauge("sglang:num_used_tokens", series([1234.0]))
        yield _gauge("sglang:gen_throughput", series([88.5]))
        yield _gauge("sglang:cache_hit_rate", series([0.42]))
        yield _counter("sglang:prompt_tokens", base, 3.5e7)
        yield _counter("sglang:generation_tokens", base, 1.2e6)
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
            yield _histogram(f"sglang:{name}", base, LATENCY_BUCKETS)

    def _trtllm(self) -> Iterator[Metric]:
        s = self.state
        base = {"engine_type": "trtllm", "model_name": s.model}

        def series(values: Sequence[float]) -> list[tuple[dict[str, str], float]]:
            return [(base, v) for v in values]

        yield _gauge("trtllm_num_requests_waiting", series(s.waiting))
        yield _gauge("trtllm_num_requests_running", series(s.running))
        yield _gauge("trtllm_kv_cache_utilization", series(s.usage))
        if not s.full:
            return
        yield _counter("trtllm_request_success", {**base, "finished_reason": "stop"}, 150.0)
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
            yield _histogram(f"trtllm_{name}", base, LATENCY_BUCKETS)


FilterMode = Literal["honour", "ignore", "drop-unnamed"]


def render(
    state: EngineState, names: Iterable[str] | None = None, mode: FilterMode = "honour"
) -> str:
    """The exposition; with `names`, filtered as prometheus_client would. ``drop-unnamed`` is
    prometheus_client 0.2x with a collector that describes nothing (vLLM's multiprocess mode): a
    filtered answer is empty."""
    registry = CollectorRegistry(support_collectors_without_names=mode != "drop-unnamed")
    registry.register(FakeEngineCollector(state))
    if names is None or mode == "ignore":
        return generate_latest(registry).decode()
    return generate_latest(registry.restricted_registry(names)).decode()


PATHS: dict[EngineType, str] = {
    "vllm": "/metrics",
    "sglang": "/metrics",
    "trtllm": "/prometheus/metrics",
}


@dataclass
class InFlight:
    """Requests being answered right now across the servers sharing it, and the peak."""

    now: int = 0
    peak: int = 0


class MetricsServer:
    """A fake engine's HTTP server on 127.0.0.1: its state's metrics at the engine's path.

    ``status`` other than 200 answers with that status; ``body`` replaces the exposition;
    ``delay_s`` delays every answer; ``filter_mode`` says what ``name[]`` does.
    """

    def __init__(self, state: EngineState | None = None, in_flight: InFlight | None = None) -> None:
        self.state = state or EngineState()
        self.in_flight = in_flight or InFlight()
        self.filter_mode: FilterMode = "honour"
        self.status = 200
        self.body: str | None = None
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "at": time.monotonic(),
                "path": request.path,
                "names": request.query.getall("name[]", []),
                "encoding": request.headers.get("Accept-Encoding"),
                "peer": request.transport and request.transport.get_extra_info("peername"),
            }
        )
        self.in_flight.now += 1
        self.in_flight.peak = max(self.in_flight.peak, self.in_flight.now)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight.now -= 1
        if self.status != 200:
            return web.Response(status=self.status, text="boom")
        names = request.query.getall("name[]", None)
        text = self.body if self.body is not None else render(self.state, names, self.filter_mode)
        return web.Response(text=text, content_type="text/plain")

    async def start(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get(PATHS[self.state.engine], self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.address = f"{host}:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` every 10 ms until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


class Changes:
    """Records every (joined, left) an endpoint set announces, as addresses."""

    def __init__(self, endpoints: EndpointSet) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []
        endpoints.subscribe(self)

    def __call__(self, joined: list[Endpoint], left: list[Endpoint]) -> None:
        self.calls.append(([e.address for e in joined], [e.address for e in left]))

    @property
    def left(self) -> set[str]:
        """Every address that ever left."""
        return {address for _, gone in self.calls for address in gone}


POOL = "qwen-pool"
LABELS = {"app": "qwen3-vllm"}


def discovery(api: FakeApiServer, endpoints: EndpointSet, **kwargs: Any) -> PoolDiscovery:
    """Discovery of `POOL` from the fake API server, with short backoffs."""
    kwargs.setdefault("backoff_initial_s", 0.01)
    kwargs.setdefault("backoff_max_s", 0.05)
    return PoolDiscovery(endpoints, KubeConfig(server=api.url), POOL, api.namespace, **kwargs)


def write_kubeconfig(
    path: Path, cluster: dict[str, Any], user: dict[str, Any] | None = None, context: str = "test"
) -> Path:
    """A kubeconfig at `path` whose current context names `cluster` and, when given, `user`."""
    names = {"cluster": "c"} if user is None else {"cluster": "c", "user": "u"}
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": context,
        "contexts": [{"name": context, "context": names}],
        "clusters": [{"name": "c", "cluster": cluster}],
    }
    if user is not None:
        doc["users"] = [{"name": "u", "user": user}]
    path.write_text(yaml.safe_dump(doc))
    return path
