from __future__ import annotations

import numpy as np
import pytest

from kvgate.bench.bounds import (
    WorkerModel,
    _pooled_by_block,
    _pooled_by_node,
    fleet_bounds,
    floor_ttft_s,
    infinite_cache_hits,
    pooled_cache_hits,
    pooled_hit_rate,
)
from kvgate.bench.traces import TokenSynth, TraceRequest, ideal_hit_rate
from kvgate.bench.workloads import generate
from kvgate.sim.engine import Engine, EngineConfig, SimRequest
from kvgate.sim.timing import PolynomialTiming

BS = 16


def conversation() -> list[TraceRequest]:
    """Prompts that share prefixes in every way the bounds must count: whole 512-token blocks,
    a partial block that a later prompt fills (a growing conversation), a prompt equal to an
    earlier one (its last block is recomputed), one long enough to need several 8192-token
    prefill chunks, and unrelated ones."""
    return [
        TraceRequest(0.0, 1300, 3, (1, 2, 3)),
        TraceRequest(10.0, 2000, 3, (1, 2, 3, 4)),  # fills block 3, which held 276 tokens
        TraceRequest(20.0, 2000, 3, (1, 2, 3, 4)),  # the same prompt again
        TraceRequest(30.0, 700, 3, (9, 10)),
        TraceRequest(40.0, 20_000, 3, (1, 2, 3, 4, *range(100, 136))),
        TraceRequest(50.0, 1024, 3, (1, 2)),  # a prefix of what is cached, block-aligned
        TraceRequest(60.0, 530, 3, (9, 11)),
    ]


def run_alone(engine: Engine, request_id: str, tokens: list[int]) -> SimRequest:
    """Serve one request on an idle engine, stepping until it finishes."""
    sim = SimRequest(request_id, tokens, max_tokens=3, ignore_eos=True)
    engine.add_request(sim, 0.0)
    now = 0.0
    while engine.has_work:
        now = engine.step(now).end
    return sim


@pytest.mark.parametrize("speed", [1.0, 0.4])
def test_the_floor_is_what_an_idle_engine_with_the_prefix_cached_takes(speed: float) -> None:
    # One engine large enough to cache everything stands for the infinite cache; each request
    # runs alone on it after every earlier one: exactly the floor's situation.
    config = EngineConfig(block_size=BS, num_gpu_blocks=50_000, max_model_len=40_000)
    timing = PolynomialTiming(speedup=speed)
    engine = Engine(config, timing)
    trace = conversation()
    synth = TokenSynth(3)
    floors = floor_ttft_s(trace, [WorkerModel(config, timing)])
    hits = infinite_cache_hits(trace, BS)
    for i, r in enumerate(trace):
        sim = run_alone(engine, f"r{i}", synth.tokens(r))
        assert sim.first_token_time is not None
        assert sim.num_cached_tokens == hits[i], i
        assert floors[i] == pytest.approx(sim.first_token_time - sim.arrival_time, rel=1e-12), i
    # The conversation exercises what it says: partial, full, recomputed and chunked prefills.
    assert hits[1] == 1296 and hits[2] == 1984 and hits[5] == 1008
    assert 20_000 - hits[4] > config.max_num_batched_tokens


def test_the_floor_takes_the_fastest_worker_that_can_hold_the_request() -> None:
    small = EngineConfig(block_size=BS, num_gpu_blocks=200, max_model_len=3200)
    large = EngineConfig(block_size=BS, num_gpu_blocks=2000, max_model_len=32_000)
    fast, slow = PolynomialTiming(speedup=2.0), PolynomialTiming()
    trace = [TraceRequest(0.0, 3000, 10, (1, 2, 3, 4, 5, 6)), TraceRequest(1.0, 4000, 10, (7,) * 8)]
    fleet = [WorkerModel(large, slow), WorkerModel(small, fast)]
    only_slow = floor_ttft_s(trace, [WorkerModel(large, slow)])
    floors = floor_ttft_s(trace, fleet)
    assert floors[0] == pytest.approx(only_slow[0] / 2)  # fits the fast, small worker
    assert floors[1] == only_slow[1]  # too long for it
    assert floor_ttft_s(trace, [WorkerModel(small, fast)])[1] is None


def test_infinite_cache_hits_agree_with_the_ideal_hit_rate() -> None:
    # Block-aligned content (a 512-token block is 32 whole KV blocks): the engine-granular
    # count is the trace-granular ideal, less the one recomputed block of a fully cached prompt.
    w = generate("rag:requests_per_worker=40", workers=2, seed=1, default_blocks=4096)
    total = sum(r.input_length for r in w.requests)
    hits = infinite_cache_hits(w.requests, BS)
    assert sum(hits) / total == pytest.approx(ideal_hit_rate(w.requests), abs=0.01)
    assert sum(hits) / total <= ideal_hit_rate(w.requests)


@pytest.mark.parametrize("family", ["agentic", "rag", "longdoc", "hetero"])
def test_pooled_lru_per_trace_block_equals_one_entry_per_kv_block(family: str) -> None:
    small = {
        "agentic": "agentic:sessions_per_worker=3",
        "rag": "rag:requests_per_worker=60",
        "longdoc": "longdoc:bursts_per_worker=3",
        "hetero": "hetero:sessions_per_worker=10",
    }[family]
    requests = generate(small, workers=2, seed=5, default_blocks=4096).requests
    for capacity in (500, 3000, 20_000):
        by_node = _pooled_by_node(requests, capacity, BS)
        assert by_node == _pooled_by_block(requests, capacity, BS), capacity


def test_pooled_hit_rate_grows_with_capacity_up_to_the_infinite_cache() -> None:
    requests = generate("hetero:sessions_per_worker=10", workers=2, seed=2, default_blocks=4096)
    trace = requests.requests
    total = sum(r.input_length for r in trace)
    infinite = sum(infinite_cache_hits(trace, BS)) / total
    rates = [pooled_hit_rate(trace, c, BS) for c in (100, 1000, 10_000, 10**9)]
    assert rates == sorted(rates)
    assert rates[0] < rates[-1]
    assert rates[-1] == pytest.approx(infinite)


def test_pooled_hit_rate_evicts_the_least_recently_used() -> None:
    a = TraceRequest(0.0, 1024, 1, (1, 2))
    b = TraceRequest(1.0, 1024, 1, (3, 4))
    a_again = TraceRequest(2.0, 1024, 1, (1, 2))
    # Room for 64 blocks of 16 = one prompt: b evicts a.
    assert pooled_hit_rate([a, b, a_again], 64, BS) == 0.0
    # Room for both: a's second visit hits all but its recomputed last block.
    assert pooled_hit_rate([a, b, a_again], 128, BS) == pytest.approx(1008 / 3072)
    # Block sizes that span trace blocks take the per-block path: 2 blocks of 1024 a prompt.
    long_a = TraceRequest(0.0, 3000, 1, (1, 2, 3, 4, 5, 6))
    long_b = TraceRequest(1.0, 3000, 1, (7, 8, 9, 10, 11, 12))
    trace = [long_a, long_b, TraceRequest(2.0, 3000, 1, long_a.hash_ids)]
    assert pooled_hit_rate(trace, 4, 1024) == pytest.approx(2048 / 9000)
    assert pooled_hit_rate(trace, 2, 1024) == 0.0


def test_fleet_bounds_of_a_homogeneous_fleet() -> None:
    config = EngineConfig(block_size=BS, num_gpu_blocks=1000, max_model_len=16_000)
    fleet = [WorkerModel(config, PolynomialTiming())] * 4
    trace = conversation()[:4]
    bounds = fleet_bounds(trace, fleet)
    floors_ms = [f * 1000.0 for f in floor_ttft_s(trace, fleet[:1]) if f is not None]
    expected = np.percentile(floors_ms, (50, 90, 99))
    assert [bounds.floor_ttft_ms[p] for p in ("p50", "p90", "p99")] == pytest.approx(expected)
    assert bounds.pooled_hit_rate == pooled_hit_rate(trace, 4000, BS)


def test_pooled_hits_per_request_follow_the_lru_and_time_the_pooled_floor() -> None:
    a = TraceRequest(0.0, 1024, 1, (1, 2))
    b = TraceRequest(1.0, 1024, 1, (3, 4))
    a_again = TraceRequest(2.0, 1024, 1, (1, 2))
    # Given out of arrival order, answered in the order given.
    assert pooled_cache_hits([a_again, b, a], 128, BS) == [1008, 0, 0]
    assert pooled_cache_hits([a, b, a_again], 64, BS) == [0, 0, 0]
    config = EngineConfig(block_size=BS, num_gpu_blocks=128, max_model_len=2048)
    fleet = [WorkerModel(config, PolynomialTiming())]
    small = floor_ttft_s([a, b, a_again], fleet, pooled_cache_hits([a, b, a_again], 64, BS))
    large = floor_ttft_s([a, b, a_again], fleet, pooled_cache_hits([a, b, a_again], 128, BS))
    # Only the third request differs: evicted in the small cache, a hit in the large one.
    assert small[:2] == large[:2]
    assert small[2] is not None and large[2] is not None and large[2] < small[2]
    assert floor_ttft_s([a, b, a_again], fleet) == large
