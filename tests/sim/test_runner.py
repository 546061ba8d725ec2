"""The engine runner's step loop against clients that go away at any moment."""

from __future__ import annotations

import asyncio

from kvgate.sim.engine import Engine, EngineConfig, SimRequest
from kvgate.sim.runner import EngineRunner
from kvgate.sim.timing import LinearTiming

CONFIG = EngineConfig(block_size=4, num_gpu_blocks=64, max_num_batched_tokens=100,
                      max_num_seqs=8, max_model_len=256)  # fmt: skip


class GatedClock:
    """A clock whose every sleep (the step under way) waits until the test lets it end."""

    def __init__(self) -> None:
        self.time = 0.0
        self.sleeping = asyncio.Event()
        self.release = asyncio.Event()

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.time += max(0.0, seconds)
        self.sleeping.set()
        await self.release.wait()
        self.release.clear()
        self.sleeping.clear()


async def test_a_client_gone_during_the_step_that_finishes_its_request() -> None:
    # Found by the soak (benchmarks/soak.py): the step finished the request while its client
    # went away; delivering its last token raised KeyError and stopped the engine for good.
    clock = GatedClock()
    runner = EngineRunner(Engine(CONFIG, LinearTiming(1000.0, 1.0, 0.0)), clock)
    runner.submit(SimRequest("gone", list(range(12)), max_tokens=1, ignore_eos=True))
    loop = asyncio.create_task(runner.run())
    await asyncio.wait_for(clock.sleeping.wait(), 5)
    runner.abort("gone")
    clock.release.set()
    # The engine goes on serving.
    stream = runner.submit(SimRequest("next", list(range(100, 112)), max_tokens=1))
    await asyncio.wait_for(clock.sleeping.wait(), 5)
    clock.release.set()
    assert await asyncio.wait_for(stream.next(), 5) == (stream.request.token_ids[-1], "length")
    assert not loop.done()
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
