"""Scheduler: token budget, chunked prefill, max_num_seqs, preemption, prefix hits, finishing."""

from __future__ import annotations

import pytest

from kvgate.events.types import BlockStored
from kvgate.sim.engine import ContextLengthError, Engine, EngineConfig, SimRequest, StepResult
from kvgate.sim.timing import BatchShape, LinearTiming


def engine(**overrides: int | float) -> Engine:
    base: dict[str, int | float] = {
        "block_size": 4,
        "num_gpu_blocks": 64,
        "max_num_batched_tokens": 100,
        "max_num_seqs": 8,
        "max_model_len": 256,
        "watermark": 0.0,
    }
    base.update(overrides)
    # 1 ms per step + 1 µs per prefill token: easy to reason about.
    return Engine(EngineConfig(**base), LinearTiming(1000.0, 1.0, 0.0))  # type: ignore[arg-type]


def req(rid: str, n: int, max_tokens: int = 4, first: int = 0) -> SimRequest:
    return SimRequest(rid, list(range(first, first + n)), max_tokens=max_tokens, ignore_eos=True)


def drain(e: Engine, now: float = 0.0, limit: int = 10_000) -> list[StepResult]:
    results: list[StepResult] = []
    for _ in range(limit):
        if not e.has_work:
            return results
        result = e.step(now)
        now = result.end
        results.append(result)
    raise AssertionError("engine did not finish")


def test_budget_is_shared_and_prefill_is_chunked() -> None:
    e = engine()
    for i in range(3):
        e.add_request(req(f"r{i}", 80, first=1000 * i), 0.0)
    result = e.step(0.0)
    assert result.batch == BatchShape(prefill_tokens=100, decode_tokens=0, decode_kv_usage=0.0)
    assert e.num_running == 2 and e.num_waiting == 1
    assert [r.request_id for r in result.outputs] == ["r0"], "r1 got a 20-token chunk only"


def test_long_prompt_takes_several_steps_before_its_first_token() -> None:
    e = engine()
    r = req("long", 250)
    e.add_request(r, 0.0)
    shapes = [e.step(0.0).batch.prefill_tokens for _ in range(3)]
    assert shapes == [100, 100, 50]
    assert r.num_output_tokens == 1


def test_decode_steps_take_one_token_per_request() -> None:
    e = engine()
    for i in range(2):
        e.add_request(req(f"r{i}", 10, first=100 * i), 0.0)
    e.step(0.0)
    batch = e.step(0.0).batch
    assert (batch.prefill_tokens, batch.decode_tokens) == (0, 2)
    # Each computes its 11th token: 22 tokens of context over the pool's 64 × 4.
    assert batch.decode_kv_usage == pytest.approx(22 / 256)


def test_decoders_sharing_a_prefix_each_count_their_whole_context() -> None:
    # Attention reads each request's KV, shared blocks or not (and the Dynamo 1.6.1 mocker
    # charges copies of one prompt their summed contexts).
    e = engine()
    shared = req("a", 16, first=0)
    e.add_request(shared, 0.0)
    e.step(0.0)
    e.add_request(req("b", 16, first=0), 0.0)
    e.step(0.0)
    batch = e.step(0.0).batch
    assert batch.decode_tokens == 2
    # a computes its 18th token, b its 17th; 5 blocks each but only 6 distinct.
    assert batch.decode_kv_usage == pytest.approx(35 / 256)
    assert e.cache.usage == pytest.approx(6 / 64)


def test_summed_context_beyond_the_pool_is_clamped_at_full_usage() -> None:
    e = engine(num_gpu_blocks=8, max_model_len=32)
    for i in range(4):
        e.add_request(req(f"copy{i}", 12, max_tokens=8, first=0), 0.0)
    e.step(0.0)
    batch = e.step(0.0).batch
    # Four decoders of 13+ tokens read 52+ tokens from a 32-token pool.
    assert batch.decode_tokens == 4
    assert batch.decode_kv_usage == 1.0


def test_max_num_seqs_caps_the_running_batch() -> None:
    e = engine(max_num_seqs=2)
    for i in range(3):
        e.add_request(req(f"r{i}", 8, first=100 * i), 0.0)
    e.step(0.0)
    assert (e.num_running, e.num_waiting) == (2, 1)


def test_preemption_recomputes_the_newest_request_and_it_still_finishes() -> None:
    # 6 blocks of 4 tokens; two requests of 8 prompt tokens grow by 8 tokens each.
    e = engine(num_gpu_blocks=6, max_model_len=24)
    old, new = req("old", 8, max_tokens=9), req("new", 8, max_tokens=9, first=100)
    e.add_request(old, 0.0)
    e.add_request(new, 0.0)
    results = drain(e)
    preempted = [r.request_id for res in results for r in res.preempted]
    assert preempted and set(preempted) == {"new"}
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.finish_reason == new.finish_reason == "length"
    assert new.num_output_tokens == 9
    assert e.stats.preemptions == len(preempted)
    assert e.cache.num_free_blocks == 6


def test_preempted_request_goes_back_ahead_of_the_queue() -> None:
    e = engine(num_gpu_blocks=6, max_model_len=24, max_num_seqs=3)
    for rid, offset in (("a", 0), ("b", 100), ("c", 200), ("d", 300)):
        e.add_request(req(rid, 8, max_tokens=9, first=offset), 0.0)
    initial = e.step(0.0)
    assert not initial.preempted and e.num_waiting == 1
    second = e.step(initial.end)
    assert [r.request_id for r in second.preempted] == ["c"]
    assert [r.request_id for r in e.waiting_requests()] == ["c", "d"]
    assert second.batch.decode_tokens == 2, "nothing new admitted in a step that preempted"


def test_repeated_prefix_is_served_from_cache_and_prefills_less() -> None:
    e = engine()
    cold = req("cold", 42)
    e.add_request(cold, 0.0)
    cold_results = drain(e)
    warm = req("warm", 42)
    e.add_request(warm, 0.0)
    warm_results = drain(e)
    assert cold.num_cached_tokens == 0
    assert warm.num_cached_tokens == 40, "all full blocks (the last token is recomputed)"
    assert warm_results[0].batch.prefill_tokens == 2
    assert warm_results[0].duration < cold_results[0].duration
    assert (e.stats.prefix_cache_queries, e.stats.prefix_cache_hits) == (84, 40)


def test_copies_scheduled_together_share_the_blocks_the_first_will_compute() -> None:
    """vLLM caches a block when it schedules its computation (allocate_slots), so a copy of a
    prompt admitted in the same step reuses it rather than computing it a second time."""
    e = engine()
    first, copy = req("first", 42), req("copy", 42)
    e.add_request(first, 0.0)
    e.add_request(copy, 0.0)
    result = e.step(0.0)
    assert (first.num_cached_tokens, copy.num_cached_tokens) == (0, 40)
    assert result.batch.prefill_tokens == 42 + 2
    stored = [ev for ev in result.events if isinstance(ev, BlockStored)]
    assert sum(len(ev.block_hashes) for ev in stored) == 10, "each block stored once"


def test_a_copy_arriving_during_a_chunked_prefill_reuses_every_scheduled_chunk() -> None:
    e = engine()
    long = req("long", 250)
    e.add_request(long, 0.0)
    e.step(0.0)  # 100 tokens scheduled and computed
    copy = req("copy", 250)
    e.add_request(copy, 0.0)
    e.step(0.0)  # long's second chunk takes the whole budget: the copy waits
    last = e.step(0.0)  # long's last 50 are scheduled first, then the copy is admitted
    assert copy.num_cached_tokens == 248, "all of long's blocks, the last chunk's included"
    assert last.batch.prefill_tokens == 50 + 2


def test_fully_cached_prompt_recomputes_its_last_block() -> None:
    e = engine()
    e.add_request(req("a", 40), 0.0)
    drain(e)
    again = req("b", 40)
    e.add_request(again, 0.0)
    assert e.step(0.0).batch.prefill_tokens == 4
    assert again.num_cached_tokens == 36


def test_generated_blocks_are_cached_too() -> None:
    e = engine()
    r = req("r", 4, max_tokens=6)
    e.add_request(r, 0.0)
    stored = [ev for res in drain(e) for ev in res.events if isinstance(ev, BlockStored)]
    # 4 prompt + 6 output tokens; the last output token is never computed: 9 tokens, 2 blocks.
    assert [len(ev.block_hashes) for ev in stored] == [1, 1]
    assert stored[1].token_ids == r.token_ids[4:8]
    assert stored[1].parent_block_hash == stored[0].block_hashes[0]


@pytest.mark.parametrize(
    ("ignore_eos", "max_tokens", "reason", "count"),
    [
        (False, 10, "stop", 3),
        (True, 10, "length", 10),
        (False, 2, "length", 2),
        (False, 3, "stop", 3),
    ],
    ids=["eos-before-limit", "ignore-eos-runs-to-limit", "limit-before-eos", "eos-wins-a-tie"],
)
def test_finish_reasons(ignore_eos: bool, max_tokens: int, reason: str, count: int) -> None:
    e = engine(eos_after=3)
    r = SimRequest("r", [1, 2, 3], max_tokens=max_tokens, ignore_eos=ignore_eos)
    e.add_request(r, 0.0)
    drain(e)
    assert (r.finish_reason, r.num_output_tokens) == (reason, count)


def test_without_max_tokens_output_is_bounded_by_the_context() -> None:
    e = engine(max_model_len=20)
    r = SimRequest("r", [1] * 15, ignore_eos=True)
    e.add_request(r, 0.0)
    drain(e)
    assert (r.finish_reason, r.num_output_tokens) == ("length", 5)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "error"),
    [
        (256, None, ContextLengthError),
        (200, 57, ContextLengthError),
        (0, None, ValueError),
        (5, 0, ValueError),
    ],
    ids=["prompt-fills-context", "prompt-plus-output-too-long", "empty-prompt", "zero-max-tokens"],
)
def test_refused_requests(prompt: int, max_tokens: int | None, error: type[Exception]) -> None:
    e = engine()
    with pytest.raises(error):
        e.add_request(SimRequest("r", [1] * prompt, max_tokens=max_tokens), 0.0)
    assert not e.has_work


def test_duplicate_request_id_is_refused() -> None:
    e = engine()
    e.add_request(req("r", 4), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        e.add_request(req("r", 4), 0.0)


def test_abort_returns_blocks_and_counts() -> None:
    e = engine()
    r = req("r", 30, max_tokens=50)
    e.add_request(r, 0.0)
    e.step(0.0)
    assert e.cache.num_free_blocks < 64
    assert e.abort("r", 1.0) is r
    assert (r.finish_reason, r.finish_time) == ("abort", 1.0)
    assert e.cache.num_free_blocks == 64 and not e.has_work
    assert e.abort("r", 2.0) is None
    assert e.stats.finished == {"abort": 1}


def test_timestamps_follow_step_durations() -> None:
    e = engine()
    r = req("r", 10, max_tokens=2)
    e.add_request(r, 5.0)
    first = e.step(5.0)
    second = e.step(first.end)
    assert r.first_token_time == first.end == pytest.approx(5.0 + 0.001 + 10e-6)
    assert r.finish_time == second.end
    assert e.stats.ttft.count == 1 and e.stats.ttft.total == pytest.approx(0.00101)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(num_gpu_blocks=10, block_size=16, max_model_len=1000)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
