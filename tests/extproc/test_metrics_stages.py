"""Stage timings go to one histogram child per stage, however often they are reported."""

from __future__ import annotations

from kvgate.extproc.metrics import EppMetrics


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
