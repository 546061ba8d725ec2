"""Reading each engine's load metrics from one scrape."""

from __future__ import annotations

import pytest

from kvgate.fleet.endpoint import EngineType
from kvgate.fleet.engine_metrics import ENGINE_METRICS, NoEngineMetricsError, read_metrics
from kvgate.fleet.prometheus_text import MetricsParseError
from tests.fleet.utils import EngineState, render


def test_vllm_data_parallel_series_are_summed_and_usage_averaged() -> None:
    state = EngineState(waiting=[3, 4], running=[1, 2], usage=[0.5, 0.7])
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["vllm"])
    assert (metrics.waiting, metrics.running) == (7, 3)
    assert metrics.kv_usage == pytest.approx(0.6)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (16, 4096)
    assert missing == []


def test_vllm_reads_the_older_usage_name() -> None:
    state = EngineState(usage=[0.3], usage_name="vllm:gpu_cache_usage_perc")
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["vllm"])
    assert metrics.kv_usage == pytest.approx(0.3)
    assert missing == []


def test_vllm_prefers_the_newer_usage_name() -> None:
    text = (
        "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.2\nvllm:num_requests_waiting 0\n"
    )
    metrics, _ = read_metrics(text, ENGINE_METRICS["vllm"])
    assert metrics.kv_usage == pytest.approx(0.2)


def test_vllm_lora_info_takes_the_latest_sample() -> None:
    state = EngineState(
        lora_samples=[(4, "old", "", 1.9e9), (4, "a,b", "c", 2.0e9), (4, "older", "", 1.0e9)]
    )
    metrics, _ = read_metrics(render(state), ENGINE_METRICS["vllm"])
    assert metrics.max_loras == 4
    assert metrics.active_loras == frozenset({"a", "b"})
    assert metrics.waiting_loras == frozenset({"c"})


def test_vllm_without_lora_reports_none() -> None:
    metrics, _ = read_metrics(render(EngineState()), ENGINE_METRICS["vllm"])
    assert (metrics.max_loras, metrics.active_loras, metrics.waiting_loras) == (
        None,
        frozenset(),
        frozenset(),
    )


def test_unset_cache_config_fields_read_as_none() -> None:
    text = (
        "vllm:num_requests_waiting 1\n"
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="None"} 1.0\n'
    )
    metrics, _ = read_metrics(text, ENGINE_METRICS["vllm"])
    assert (metrics.block_size, metrics.num_gpu_blocks) == (32, None)


def test_sglang_maps_pages_to_blocks() -> None:
    state = EngineState(engine="sglang", waiting=[2, 2], running=[1, 0], usage=[0.1, 0.3])
    state.block_size, state.num_blocks = 64, 900
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["sglang"])
    assert (metrics.waiting, metrics.running) == (4, 1)
    assert metrics.kv_usage == pytest.approx(0.2)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (64, 900)
    assert missing == []


def test_trtllm_has_no_cache_config() -> None:
    state = EngineState(engine="trtllm", waiting=[5], running=[7], usage=[0.75])
    metrics, missing = read_metrics(render(state), ENGINE_METRICS["trtllm"])
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (5, 7, 0.75)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (None, None)
    assert missing == []


def test_missing_core_metrics_are_listed_and_read_as_zero() -> None:
    metrics, missing = read_metrics("vllm:num_requests_running 3\n", ENGINE_METRICS["vllm"])
    assert (metrics.waiting, metrics.running, metrics.kv_usage) == (0, 3, 0.0)
    assert missing == [
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc or vllm:gpu_cache_usage_perc",
    ]


@pytest.mark.parametrize(
    ("engine", "text"),
    [
        ("vllm", ""),
        ("vllm", render(EngineState(engine="sglang"))),
        ("trtllm", render(EngineState())),
    ],
    ids=["empty body", "sglang text read as vllm", "vllm text read as trtllm"],
)
def test_no_core_metric_at_all_is_an_error(engine: EngineType, text: str) -> None:
    with pytest.raises(NoEngineMetricsError, match="none of"):
        read_metrics(text, ENGINE_METRICS[engine])


def test_a_dynamo_worker_before_its_first_request_reads_as_idle() -> None:
    """A Dynamo mocker registers its vllm:* gauges with its first request; until then its system
    server shows only Dynamo's own metrics. It answers, so it is alive and idle."""
    text = (
        "# TYPE dynamo_component_uptime_seconds gauge\n"
        'dynamo_component_uptime_seconds{worker_id="74c82a1312f4650e"} 3.5\n'
        'dynamo_component_requests_total{dynamo_endpoint="generate"} 0\n'
    )
    metrics, missing = read_metrics(text, ENGINE_METRICS["vllm"])
    assert (metrics.waiting, metrics.running, metrics.kv_usage, missing) == (0, 0, 0.0, [])


def test_a_non_finite_count_is_an_error() -> None:
    with pytest.raises(MetricsParseError, match="vllm:num_requests_waiting is nan"):
        read_metrics("vllm:num_requests_waiting NaN\n", ENGINE_METRICS["vllm"])
