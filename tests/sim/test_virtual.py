"""Virtual time: runs repeat exactly, and the wall-clock runner follows the same model."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvgate.sim.clock import VirtualClock
from kvgate.sim.engine import Engine, EngineConfig, SimRequest, StepResult
from kvgate.sim.runner import EngineRunner
from kvgate.sim.virtual import VirtualDriver
from kvgate.sim.wire import encode_batch

SMALL = EngineConfig(
    block_size=16, num_gpu_blocks=120, max_num_batched_tokens=512, max_model_len=1024
)


def workload(seed: int, n: int = 120) -> list[tuple[float, int, list[int], int]]:
    """(arrival, engine, prompt, max_tokens): a few shared system prompts, varied tails."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(150_000) for _ in range(rng.randrange(100, 500))] for _ in range(5)]
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(40.0)
        tail = [rng.randrange(150_000) for _ in range(rng.randrange(1, 200))]
        out.append((t, rng.randrange(2), rng.choice(prefixes) + tail, rng.randrange(1, 40)))
    return out


Record = tuple[str, int, float, float | None, float | None, str | None, int, tuple[int, ...]]


def submit_at(driver: VirtualDriver, at: float, engine: int, request: SimRequest) -> None:
    driver.call_at(at, lambda: driver.submit(engine, request))


def simulate(seed: int) -> tuple[list[Record], list[bytes]]:
    engines = [Engine(SMALL), Engine(SMALL)]
    batches: list[bytes] = []

    def on_step(index: int, result: StepResult) -> None:
        if result.events:
            batches.append(encode_batch(result.end, result.events, data_parallel_rank=index))

    driver = VirtualDriver(engines, on_step=on_step)
    requests = []
    for i, (at, target, prompt, max_tokens) in enumerate(workload(seed)):
        request = SimRequest(f"r{i}", prompt, max_tokens=max_tokens, ignore_eos=True)
        requests.append(request)
        submit_at(driver, at, target, request)
    driver.run()
    records: list[Record] = [
        (
            r.request_id,
            r.num_cached_tokens,
            r.arrival_time,
            r.first_token_time,
            r.finish_time,
            r.finish_reason,
            r.num_preemptions,
            tuple(r.output_token_ids),
        )
        for r in requests
    ]
    return records, batches


def test_same_seed_same_run_bit_for_bit() -> None:
    first = simulate(7)
    second = simulate(7)
    assert first == second
    records, batches = first
    assert all(rec[5] is not None for rec in records), "every request finished"
    assert any(rec[1] > 0 for rec in records), "the workload exercises prefix hits"
    assert any(rec[6] > 0 for rec in records), "and preemption"
    assert batches


def test_different_seed_different_run() -> None:
    assert simulate(7)[0] != simulate(8)[0]


def test_until_stops_early_and_resumes() -> None:
    engine = Engine(SMALL)
    driver = VirtualDriver([engine])
    request = SimRequest("r", list(range(300)), max_tokens=50, ignore_eos=True)
    driver.submit(0, request)
    driver.run(until=0.05)
    assert driver.clock.now() == 0.05 and request.finish_reason is None
    driver.run()
    assert request.finish_reason == "length"


def test_step_results_arrive_in_time_order_across_engines() -> None:
    ends: list[float] = []
    engines = [Engine(SMALL), Engine(SMALL)]
    driver = VirtualDriver(engines, on_step=lambda _i, res: ends.append(res.end))
    for i, (at, target, prompt, max_tokens) in enumerate(workload(3, n=40)):
        submit_at(driver, at, target, SimRequest(f"r{i}", prompt, max_tokens=max_tokens))
    driver.run()
    assert ends == sorted(ends)


async def test_wall_runner_on_a_virtual_clock_matches_the_driver() -> None:
    """One engine model, two drivers: the asyncio runner used by the HTTP server and the
    discrete-event driver agree on every token time."""
    prompts = [p for _, _, p, _ in workload(11, n=30)]

    driven = [SimRequest(f"r{i}", p, max_tokens=12, ignore_eos=True) for i, p in enumerate(prompts)]
    driver = VirtualDriver([Engine(SMALL)])
    for r in driven:
        driver.submit(0, r)
    driver.run()

    clock = VirtualClock()
    runner = EngineRunner(Engine(SMALL), clock)
    served = [SimRequest(f"r{i}", p, max_tokens=12, ignore_eos=True) for i, p in enumerate(prompts)]
    streams = [runner.submit(r) for r in served]
    task = asyncio.create_task(runner.run())
    delivered: list[list[int]] = []
    for stream in streams:
        tokens = []
        while True:
            token, reason = await asyncio.wait_for(stream.next(), timeout=5)
            tokens.append(token)
            if reason:
                break
        delivered.append(tokens)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    for a, b, tokens in zip(driven, served, delivered, strict=True):
        assert (a.first_token_time, a.finish_time) == (b.first_token_time, b.finish_time)
        assert a.output_token_ids == b.output_token_ids == tokens
