"""Per-request series (stages, decisions, plugin times) go to one child per label set, however
often they are reported."""

from __future__ import annotations

import random

from kvgate.extproc.metrics import EppMetrics
from kvgate.fleet.endpoint import Endpoint
from kvgate.scheduling.plugins.max_score_picker import MaxScorePicker
from kvgate.scheduling.request import LLMRequest, ProfileResult, ResponseInfo, SchedulingResult


def test_each_stage_accumulates_in_its_own_series() -> None:
    metrics = EppMetrics()
    for seconds in (0.001, 0.002, 0.004):
        metrics.stage("tokenize", seconds)
    metrics.stage("match", 0.0005)

    def sample(name: str, stage: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"stage": stage})

    assert sample("kvgate_stage_duration_seconds_count", "tokenize") == 3
    assert sample("kvgate_stage_duration_seconds_sum", "tokenize") == 0.007
    assert sample("kvgate_stage_duration_seconds_count", "match") == 1
    assert sample("kvgate_stage_duration_seconds_count", "score") is None


def test_per_request_series_stay_apart_by_their_labels() -> None:
    metrics = EppMetrics()
    endpoints = [Endpoint("10.0.0.1:8000"), Endpoint("10.0.0.2:8000")]
    for i, (model, endpoint) in enumerate([("a", 0), ("b", 1), ("a", 1), ("a", 0)]):
        request = LLMRequest(f"r{i}", model=model, kind="chat", body={}, headers={})
        request.tokens = [1] * (10 * (i + 1))
        result = SchedulingResult(
            "default", {"default": ProfileResult("default", [endpoints[endpoint]])}
        )
        metrics.observe_decision(request, result, 0.001)
        metrics.observe_completion(request, result, ResponseInfo(completion_tokens=5), 0.5)
    picker = MaxScorePicker("picker", rng=random.Random(0))
    for seconds in (0.001, 0.003):
        metrics.plugin_timed("picker", picker, seconds)
    metrics.plugin_timed("pre_request", picker, 0.002)
    get = metrics.registry.get_sample_value
    model_a = {"model_name": "a", "target_model_name": "a"}
    assert get("inference_objective_request_total", model_a) == 3
    assert get("inference_objective_input_tokens_sum", model_a) == 10 + 30 + 40
    assert (
        get("inference_objective_request_total", {"model_name": "b", "target_model_name": "b"}) == 1
    )
    assert get("inference_objective_running_requests", {"model_name": "a"}) == 0
    assert get("kvgate_decisions_total", {"endpoint": "10.0.0.1:8000"}) == 2
    assert get("kvgate_decisions_total", {"endpoint": "10.0.0.2:8000"}) == 2
    assert get("kvgate_stage_duration_seconds_count", {"stage": "total"}) == 4
    plugin = {"plugin_type": "max-score-picker", "plugin_name": "picker"}
    count = "inference_extension_plugin_duration_seconds_count"
    assert get(count, {"extension_point": "picker", **plugin}) == 2
    assert get(count, {"extension_point": "pre_request", **plugin}) == 1
